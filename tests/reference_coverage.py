"""Brute-force coverage backtest: a plain Python loop over bars, sharing no engine code."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class SideResult:
    observations: int
    breaches: int
    max_uncovered: float
    sum_uncovered: float
    sum_loss_in_breach: float
    sum_margin: float
    transitions: tuple[int, int, int, int]


def brute_force_side(
    low: list[float], high: list[float], close: list[float], margin: list[float],
    horizon: int, side: str, first: int, stop: int, step: int,
) -> SideResult:
    """Observe bars ``first, first+step, ... < stop`` where margin and a full horizon exist."""
    obs = breaches = 0
    max_u = sum_u = sum_lb = sum_m = 0.0
    seq: list[bool] = []
    n = len(close)
    t = first
    while t < stop:
        m = margin[t]
        if not math.isnan(m) and t + horizon < n:
            if side == "long":
                worst = min(low[t + 1 : t + horizon + 1])
                loss = 1.0 - worst / close[t]
            else:
                worst = max(high[t + 1 : t + horizon + 1])
                loss = worst / close[t] - 1.0
            obs += 1
            sum_m += m
            breach = loss > m
            seq.append(breach)
            if breach:
                breaches += 1
                sum_u += loss - m
                sum_lb += loss
                max_u = max(max_u, loss - m)
        t += step
    counts = [0, 0, 0, 0]
    for a, b in itertools.pairwise(seq):
        counts[2 * int(a) + int(b)] += 1
    return SideResult(obs, breaches, max_u, sum_u, sum_lb, sum_m, tuple(counts))  # type: ignore[arg-type]


def window_span(timestamp_ms: Sequence[int], bar_ms: int, horizon: int, start_ms: int,
                end_ms: int) -> tuple[int, int]:
    """``(first, stop)`` of the observations t whose loss interval, bars t+1..t+h, has a bar
    whose period ``[open, open + bar)`` meets ``[start_ms, end_ms)``; checked bar by bar."""
    ts = [int(v) for v in timestamp_ms]
    n = len(ts)
    members = []
    for t in range(n - 1):
        last = min(t + horizon, n - 1)
        if ts[last] + bar_ms <= start_ms:  # the whole interval ends before the window
            continue
        if ts[t + 1] >= end_ms:  # it starts after the window, and so do all later ones
            break
        if any(ts[s] < end_ms and ts[s] + bar_ms > start_ms for s in range(t + 1, last + 1)):
            members.append(t)
    return (members[0], members[-1] + 1) if members else (0, 0)
