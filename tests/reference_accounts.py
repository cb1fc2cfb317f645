"""Brute-force account replay (domain.md §7 core), written apart from the engine.

Plain Python over bars and positions: no numpy arithmetic, no shared code with
``calibration.accounts``. Margin comes in as a function ``mm_usd(instrument, notional, bar)``
the test builds from an independent reference (tests/reference_models.py) or a model's rate
series.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass
class RefAccount:
    """``units``: instrument → signed units; ``usd``: stable collateral; ``collateral``:
    pricing instrument → units of that asset held as collateral."""

    entry: int
    units: dict[str, float]
    usd: float
    collateral: dict[str, float]


@dataclass
class RefOutcome:
    trigger: int | None
    closeout_equity: float | None
    leg_pnl: dict[str, float]

    @property
    def bad_debt(self) -> float:
        if self.closeout_equity is None:
            return 0.0
        return max(0.0, -self.closeout_equity)


def replay(
    prices: Mapping[str, Mapping[str, Sequence[float]]],
    asset_of: Mapping[str, str],
    mm_usd: Callable[[str, float, int], float],
    account: RefAccount,
    *,
    holding_bars: int,
    latency_bars: int,
    portfolio_mm: Callable[[dict[str, float], int], float] | None = None,
) -> RefOutcome:
    """One account through the bars by the §7 core rules.

    ``prices[instrument]`` has ``low``, ``high``, ``close`` lists; ``asset_of`` maps an
    instrument to its underlying asset. With ``portfolio_mm`` (domain.md §8) the requirement
    is ``portfolio_mm(exposure, bar)`` of the USD exposure per instrument (positions plus the
    collateral it prices, at the same adverse prices) instead of the sum of ``mm_usd``.
    """
    n = len(next(iter(prices.values()))["close"])
    e = account.entry
    net: dict[str, float] = {}
    for inst, u in account.collateral.items():
        net[asset_of[inst]] = net.get(asset_of[inst], 0.0) + u
    for inst, q in account.units.items():
        net[asset_of[inst]] = net.get(asset_of[inst], 0.0) + q

    def adverse(inst: str, bar: int) -> float:
        long_asset = net[asset_of[inst]] >= 0
        return prices[inst]["low"][bar] if long_asset else prices[inst]["high"][bar]

    trigger = None
    for t in range(e + 1, min(e + holding_bars, n - 1) + 1):
        equity = account.usd
        requirement = 0.0
        exposure: dict[str, float] = {}
        for inst, q in account.units.items():
            if q == 0:
                continue
            p = adverse(inst, t)
            equity += q * (p - prices[inst]["close"][e])
            requirement += mm_usd(inst, abs(q) * p, t)
            exposure[inst] = exposure.get(inst, 0.0) + q * p
        for inst, u in account.collateral.items():
            if u:
                equity += u * adverse(inst, t)
                exposure[inst] = exposure.get(inst, 0.0) + u * adverse(inst, t)
        if portfolio_mm is not None:
            requirement = portfolio_mm(exposure, t)
        if equity <= requirement:
            trigger = t
            break
    if trigger is None:
        return RefOutcome(None, None, {})
    end = min(trigger + latency_bars, n - 1)

    def worst(inst: str) -> float:
        window = range(trigger, end + 1)
        if net[asset_of[inst]] >= 0:
            return min(prices[inst]["low"][s] for s in window)
        return max(prices[inst]["high"][s] for s in window)

    equity = account.usd
    legs = {}
    for inst, q in account.units.items():
        if q == 0:
            continue
        legs[inst] = q * (worst(inst) - prices[inst]["close"][e])
        equity += legs[inst]
    for inst, u in account.collateral.items():
        if u:
            equity += u * worst(inst)
    return RefOutcome(trigger, equity, legs)
