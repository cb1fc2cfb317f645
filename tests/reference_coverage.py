"""Brute-force coverage backtest: a plain Python loop over bars, sharing no engine code."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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


def coverage_stats_loop(margin, long_loss, short_loss, start, stop, step, im_to_mm):  # type: ignore[no-untyped-def]
    """``_kernels.coverage_stats`` as it was before its chunked fast path (a copy of its
    loop, one bar at a time): the reference its output must equal to the bit. Plain Python
    that numba can compile (``nb.njit(coverage_stats_loop)``), for long series."""
    nobs = 0.0
    sum_m = 0.0
    min_m = math.inf
    max_m = -math.inf
    l_x = l_su = l_mu = l_sl = 0.0
    s_x = s_su = s_mu = s_sl = 0.0
    l_01 = l_10 = l_11 = s_01 = s_10 = s_11 = 0
    prev_long = prev_short = 0
    first_bl = first_bs = 0
    cap_from = 1.0 / im_to_mm
    im_excess = 0.0
    for t in range(start, stop, step):
        m = margin[t]
        xl = long_loss[t]
        xs = short_loss[t]
        if math.isnan(m + xl + xs):
            continue
        nobs += 1.0
        sum_m += m
        if m < min_m:
            min_m = m
        if m > max_m:
            max_m = m
        if m > cap_from:
            im_excess += m * im_to_mm - max(m, 1.0)
        bl = 1 if xl > m else 0
        bs = 1 if xs > m else 0
        if bl:
            ul = xl - m
            l_x += 1.0
            l_su += ul
            l_sl += xl
            if ul > l_mu:
                l_mu = ul
        if bs:
            us = xs - m
            s_x += 1.0
            s_su += us
            s_sl += xs
            if us > s_mu:
                s_mu = us
        if bl | bs | prev_long | prev_short:
            l_11 += prev_long & bl
            l_01 += (1 - prev_long) & bl
            l_10 += prev_long & (1 - bl)
            s_11 += prev_short & bs
            s_01 += (1 - prev_short) & bs
            s_10 += prev_short & (1 - bs)
            if nobs == 1.0:
                first_bl = bl
                first_bs = bs
        prev_long = bl
        prev_short = bs
    l_01 -= first_bl
    s_01 -= first_bs
    pairs = max(nobs - 1.0, 0.0)
    side_l = (nobs, l_x, l_su, l_mu, l_sl, pairs - l_01 - l_10 - l_11,
              float(l_01), float(l_10), float(l_11))
    side_s = (nobs, s_x, s_su, s_mu, s_sl, pairs - s_01 - s_10 - s_11,
              float(s_01), float(s_10), float(s_11))
    out = np.zeros(22)
    for k in range(9):
        out[k] = side_l[k]
        out[9 + k] = side_s[k]
    out[18] = sum_m
    out[19] = min_m
    out[20] = max_m
    out[21] = sum_m * im_to_mm - im_excess
    return out
