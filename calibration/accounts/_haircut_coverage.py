"""Haircut coverage backtest (domain.md §9): did collateral's sale value cover its haircut value?

A venue counts collateral at its haircut value; when it liquidates an account it sells the
collateral. For each observation bar t (with ``liquidation_bars`` = h future bars) and each
holding of ``V`` USD at t's close, the **realised sale value** is the holding sold at the
adverse extreme of the close-out interval, less the cost of selling it::

    realised_t(V) = V · min(low_{t+1..t+h}) / C_t · (1 − min(1, spread + impact · (V / depth_t)^β))

(``depth_t`` the order-book bid depth in force at t, else — a bar
without a fresh snapshot, or bars without depth — ``depth_fraction_of_adv`` of the trailing
``adv_window_bars`` mean traded USD per day, both as the account engine reads them). A
**breach** is ``realised_t(V) < H(V)``, the schedule's haircut value; the shortfall is
``H(V) − realised_t(V)``, USD. Observations follow §3: every bar (overlapping) or every h-th,
an observation belongs to a stress window when (t, t+h] overlaps it, and the statistics
(Kupiec, Christoffersen, traffic light) use ``p = expected_breach_rate``.

Only long holdings are tested: collateral is an asset the account owns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from calibration._bars import BarSeries
from calibration._errors import InvalidParameters
from calibration.accounts._haircuts import HaircutSchedule
from calibration.accounts._market import volume_depth_usd
from calibration.stats import (
    chi2_pvalue,
    christoffersen_lr,
    kupiec_lr,
    traffic_light,
    transitions,
)
from calibration.windows import StressWindow


@dataclass(frozen=True)
class HaircutCoverage:
    """One holding size over one window.

    Attributes:
        window: ``all`` or the stress window's name.
        holding_usd: the holding's value at each observation's close, USD.
        haircut_value_usd: what the schedule counts it at, USD (``H(V)``).
        haircut_ratio: ``H(V) / V``, a fraction.
        observations, breaches: counts; ``breach_rate`` their ratio (a fraction).
        kupiec_lr, kupiec_pvalue, christoffersen_lr, conditional_coverage_lr,
            traffic_light: §3's statistics at ``p = expected_breach_rate``.
        max_shortfall_usd: the largest ``H(V) − realised`` over breaches, USD (0 without).
        worst_at: the observation bar (UTC ISO 8601) of the largest shortfall, or ``None``.
    """

    window: str
    holding_usd: float
    haircut_value_usd: float
    haircut_ratio: float
    observations: int
    breaches: int
    breach_rate: float
    expected_breach_rate: float
    kupiec_lr: float
    kupiec_pvalue: float
    christoffersen_lr: float
    conditional_coverage_lr: float
    traffic_light: str
    max_shortfall_usd: float
    worst_at: str | None


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _depth(bars: BarSeries, depth_fraction_of_adv: float, adv_window_bars: int
           ) -> np.ndarray:
    from_volume = volume_depth_usd(bars, depth_fraction_of_adv, adv_window_bars)
    if bars.bid_depth_usd is not None:
        book = np.asarray(bars.bid_depth_usd, dtype=np.float64)
        if from_volume is None:
            return book
        return np.where(np.isnan(book), from_volume, book)
    if from_volume is None:
        return np.full(len(bars), np.nan)
    return from_volume


def haircut_coverage(
    bars: BarSeries,
    schedule: HaircutSchedule,
    *,
    holdings_usd: Sequence[float],
    liquidation_bars: int,
    spread_rate: float = 0.0005,
    impact_coef: float = 0.0,
    impact_exponent: float = 0.5,
    depth_fraction_of_adv: float = 0.01,
    adv_window_bars: int = 288,
    expected_breach_rate: float = 0.01,
    overlapping: bool = True,
    stress_windows: Sequence[StressWindow] = (),
) -> list[HaircutCoverage]:
    """The haircut coverage backtest of ``schedule`` on ``bars`` (see the module doc): one
    row per holding and window (``all`` first, then each stress window), holdings in order.

    Raises:
        InvalidParameters: no holding, a holding ≤ 0, ``liquidation_bars`` < 1, a rate
            outside (0, 1), or impact without depth or volume in the bars.
    """
    schedule.validate()
    if not holdings_usd or any(not (math.isfinite(v) and v > 0) for v in holdings_usd):
        raise InvalidParameters("holdings_usd: give one or more positive USD amounts",
                                field="holdings_usd")
    h = int(liquidation_bars)
    if h < 1:
        raise InvalidParameters("liquidation_bars must be >= 1", field="liquidation_bars")
    if not 0 < expected_breach_rate < 1:
        raise InvalidParameters("expected_breach_rate must be in (0, 1)",
                                field="expected_breach_rate")
    n = len(bars)
    close = np.asarray(bars.close, dtype=np.float64)
    low = np.asarray(bars.low, dtype=np.float64)
    depth = _depth(bars, depth_fraction_of_adv, adv_window_bars)
    if impact_coef > 0 and np.isnan(depth).any():
        raise InvalidParameters("impact needs order-book depth or volume in the bars; set "
                                "impact_coef 0", field="impact_coef")
    last = n - h  # observation bars 0 .. last-1 have h future bars
    if last <= 0:
        return []
    starts = np.arange(0, last, 1 if overlapping else h)
    # min(low_{t+1..t+h}) for every start: a sliding minimum over the shifted lows
    windows = np.lib.stride_tricks.sliding_window_view(low[1:], h)
    worst = windows.min(axis=1)[starts] / close[starts]
    ts = np.asarray(bars.timestamp_ms, dtype=np.int64)
    interval_end = ts[starts + h] + bars.bar_seconds * 1000  # (t, t+h] ends with bar t+h
    rows: list[HaircutCoverage] = []
    for holding in holdings_usd:
        value = float(holding)
        haircut = schedule.value_usd(value)
        cost = np.zeros(len(starts)) if impact_coef == 0 else \
            impact_coef * (value / depth[starts]) ** impact_exponent
        realised = value * worst * (1.0 - np.minimum(1.0, spread_rate + cost))
        shortfall = haircut - realised
        breach = shortfall > 0
        groups = [("all", np.ones(len(starts), dtype=bool))]
        for w in stress_windows:
            groups.append((w.name, (ts[starts] + bars.bar_seconds * 1000 < w.end_ms)
                           & (interval_end > w.start_ms)))
        for name, member in groups:
            obs = int(member.sum())
            hits = breach & member
            x = int(hits.sum())
            p = expected_breach_rate
            pof = kupiec_lr(obs, x, p) if obs else 0.0
            ind = christoffersen_lr(transitions(breach[member].tolist())) if obs > 1 else 0.0
            worst_i = int(np.argmax(np.where(hits, shortfall, -np.inf))) if x else -1
            rows.append(HaircutCoverage(
                window=name, holding_usd=value, haircut_value_usd=haircut,
                haircut_ratio=haircut / value, observations=obs, breaches=x,
                breach_rate=x / obs if obs else 0.0, expected_breach_rate=p,
                kupiec_lr=pof, kupiec_pvalue=chi2_pvalue(pof, 1) if obs else 1.0,
                christoffersen_lr=ind, conditional_coverage_lr=pof + ind,
                traffic_light=traffic_light(obs, x, p) if obs else "insufficient",
                max_shortfall_usd=float(shortfall[worst_i]) if x else 0.0,
                worst_at=_iso(int(ts[starts[worst_i]])) if x else None))
    return rows
