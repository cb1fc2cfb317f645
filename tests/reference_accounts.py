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


# --- Mechanics: funding, impact, a shared cascade and the liquidation policies ------------
# Written from calibration/accounts/_engine.py's "Mechanics" docstring, as a plain loop: all
# accounts walk the bars together (the cascade makes them interact), one dict per account.


@dataclass
class MechOutcome:
    trigger: int | None = None
    closeout_bar: int | None = None
    closeout_equity: float | None = None
    bad_debt: float = 0.0
    fee: float = 0.0
    steps: int = 0
    finished: bool = False
    leg_pnl: dict[str, float] | None = None
    leg_closed_usd: dict[str, float] | None = None
    queued: int | None = None
    wait_bars: int = 0


@dataclass
class MechSettings:
    holding_bars: int
    latency_bars: int
    policy: str = "close_all"
    spread_rate: float = 0.0
    impact_coef: float = 0.0
    impact_exponent: float = 0.5
    fee_rate: float = 0.0
    cascade: bool = False
    kappa: float = 0.01
    partial_fraction: float = 0.25
    cooldown_bars: int = 1
    upnl_weight: float = 1.0
    max_per_bar: int | None = None
    max_usd_per_bar: float | None = None
    queue_order: str = "most_undercollateralised"


def replay_mech(
    prices: Mapping[str, Mapping[str, Sequence[float]]],
    instruments: Sequence[str],
    asset_of: Mapping[str, str],
    mm_usd: Callable[[str, float, int], float],
    accounts: Sequence[RefAccount],
    settings: MechSettings,
    *,
    funding_cum: Mapping[str, Sequence[float]] | None = None,
    bid_depth: Mapping[str, Sequence[float]] | None = None,
    ask_depth: Mapping[str, Sequence[float]] | None = None,
    backlog: list[int] | None = None,
    portfolio_mm: Callable[[dict[str, float], int], float] | None = None,
) -> list[MechOutcome]:
    """Every account through the bars under the mechanics (one population, one cascade),
    and the engine's capacity: each bar, the accounts asking for a step are sorted and the
    first ones served, the rest wait (``backlog`` gets their count per bar).

    With ``portfolio_mm`` (domain.md §8) an account's requirement is ``portfolio_mm(exposure,
    bar)`` of what it still holds (USD per instrument: the units left plus the collateral the
    instrument prices, at the bar's marks), and ``largest_requirement_first`` ranks a
    position by ``portfolio_mm`` of that position alone."""
    import math

    st = settings
    n = len(prices[instruments[0]]["close"])
    low = {i: list(prices[i]["low"]) for i in instruments}
    high = {i: list(prices[i]["high"]) for i in instruments}

    def fcum(inst: str, t: int) -> float:
        return 0.0 if funding_cum is None else funding_cum[inst][t]

    def slip(inst: str, units: float, c0: float, t: int) -> float:
        s = st.spread_rate
        if st.impact_coef > 0:
            d = (bid_depth if units > 0 else ask_depth)[inst][t]  # type: ignore[index]
            s = s + st.impact_coef * (abs(units) * c0 / d) ** st.impact_exponent if d > 0 else 1.0
        return min(1.0, s)

    gap = max(1, st.latency_bars)
    if st.policy == "partial":
        gap = max(gap, st.cooldown_bars)
    n_partial = max(1, math.ceil(1.0 / st.partial_fraction - 1e-9))
    state = []
    for acc in accounts:
        net: dict[str, float] = {}
        for inst, u in acc.collateral.items():
            net[asset_of[inst]] = net.get(asset_of[inst], 0.0) + u
        for inst, q in acc.units.items():
            net[asset_of[inst]] = net.get(asset_of[inst], 0.0) + q
        state.append({
            "acc": acc, "rem": {i: acc.units.get(i, 0.0) for i in instruments},
            "cash": acc.usd, "anchor": {i: acc.entry for i in instruments}, "net": net,
            "next": acc.entry + 1, "in_liq": False, "done": False, "pending": None,
            "waiting": False, "since": None,
            "out": MechOutcome(leg_pnl={i: 0.0 for i in instruments},
                               leg_closed_usd={i: 0.0 for i in instruments}),
        })
    q_long = {i: [0.0] * n for i in instruments}
    q_short = {i: [0.0] * n for i in instruments}

    def mark(inst: str, t: int, net: dict[str, float]) -> float:
        return low[inst][t] if net.get(asset_of[inst], 0.0) >= 0 else high[inst][t]

    def evaluate(s: dict, t: int, closing: dict[str, float]) -> tuple[float, float]:
        acc = s["acc"]
        e = acc.entry
        upnl = realised = funding = mm = 0.0
        exposure: dict[str, float] = {}
        for inst in instruments:
            q = s["rem"][inst]
            if q == 0:
                continue
            p = mark(inst, t, s["net"])
            c0 = prices[inst]["close"][e]
            d = closing.get(inst, 0.0)
            if d:
                realised += d * (p - c0) - (slip(inst, d, c0, t) + st.fee_rate) * abs(d) * p
            if q - d:
                upnl += (q - d) * (p - c0)
                mm += mm_usd(inst, abs(q - d) * p, t)
                exposure[inst] = exposure.get(inst, 0.0) + (q - d) * p
            funding += q * (fcum(inst, t) - fcum(inst, s["anchor"][inst]))
        equity = s["cash"] + (upnl if upnl <= 0 else st.upnl_weight * upnl) + realised - funding
        for inst, u in acc.collateral.items():
            if u:
                equity += u * mark(inst, t, s["net"])
                exposure[inst] = exposure.get(inst, 0.0) + u * mark(inst, t, s["net"])
        if portfolio_mm is not None:
            mm = portfolio_mm(exposure, t)
        return equity, mm

    def plan(s: dict, t: int, last: bool) -> dict[str, float]:
        rem = s["rem"]
        open_legs = [i for i in instruments if rem[i] != 0]
        if st.policy == "close_all" or last:
            return {i: rem[i] for i in open_legs}
        if st.policy == "largest_requirement_first":
            def requirement(i: str) -> float:
                value = rem[i] * mark(i, t, s["net"])
                if portfolio_mm is not None:
                    return portfolio_mm({i: value}, t)
                return mm_usd(i, abs(value), t)

            ranked = sorted(open_legs, key=lambda i: (-requirement(i), instruments.index(i)))
            closing: dict[str, float] = {}
            for inst in ranked:
                closing[inst] = rem[inst]
                equity, mm = evaluate(s, t, closing)
                if equity > mm:
                    break
            return closing
        if st.policy == "partial":
            if s["out"].steps + 1 >= n_partial:
                return {i: rem[i] for i in open_legs}
            return {i: s["acc"].units[i] * st.partial_fraction for i in open_legs}
        # hedge_preserving
        closing = {}
        for asset in {asset_of[i] for i in open_legs}:
            residual = s["net"].get(asset, 0.0)
            same = [i for i in open_legs if asset_of[i] == asset and residual != 0
                    and (rem[i] > 0) == (residual > 0)]
            total = sum(abs(rem[i]) for i in same)
            for inst in same:
                share = abs(residual) / total
                closing[inst] = rem[inst] if share >= 1 else rem[inst] * share
        equity, mm = evaluate(s, t, closing)
        if equity <= mm:
            closing = {i: rem[i] for i in open_legs}
        return closing

    def settle(s: dict, end: int) -> None:
        t, closing, net, final = s["pending"]
        acc = s["acc"]
        out: MechOutcome = s["out"]
        e = acc.entry
        gross = 0.0
        for inst, d in closing.items():
            if d == 0:
                continue
            window = range(t, end + 1)
            if net.get(asset_of[inst], 0.0) >= 0:
                p = min(low[inst][b] for b in window)
            else:
                p = max(high[inst][b] for b in window)
            c0 = prices[inst]["close"][e]
            dfund = fcum(inst, t) - fcum(inst, s["anchor"][inst])
            pnl = d * (p - c0) - slip(inst, d, c0, t) * abs(d) * p - d * dfund
            s["cash"] -= (s["rem"][inst] - d) * dfund
            s["anchor"][inst] = t
            out.leg_pnl[inst] += pnl  # type: ignore[index]
            out.leg_closed_usd[inst] += abs(d) * p  # type: ignore[index]
            gross += abs(d) * p
            s["cash"] += pnl
            s["rem"][inst] = 0.0 if d == s["rem"][inst] else s["rem"][inst] - d
        equity = s["cash"]
        if final:
            for inst, u in acc.collateral.items():
                if u:
                    window = range(t, end + 1)
                    if net.get(asset_of[inst], 0.0) >= 0:
                        equity += u * min(low[inst][b] for b in window)
                    else:
                        equity += u * max(high[inst][b] for b in window)
        else:
            for inst in instruments:
                q = s["rem"][inst]
                if q:
                    equity += q * (mark(inst, t, net) - prices[inst]["close"][e])
            for inst, u in acc.collateral.items():
                if u:
                    equity += u * mark(inst, t, net)
        fee = min(st.fee_rate * gross, equity) if equity > 0 else 0.0
        out.fee += fee
        s["cash"] -= fee
        out.closeout_equity = equity - fee
        out.closeout_bar = end
        if final:
            out.finished = True
            out.bad_debt = max(0.0, -(equity - fee))
            s["done"] = True
        s["pending"] = None

    for t in range(n):
        if st.cascade and t > 0:
            for inst in instruments:
                if q_long[inst][t - 1] > 0:
                    d = bid_depth[inst][t - 1]  # type: ignore[index]
                    move = st.kappa * q_long[inst][t - 1] / d if d > 0 else math.inf
                    low[inst][t] = prices[inst]["low"][t] * max(0.0, 1 - move)
                if q_short[inst][t - 1] > 0:
                    d = ask_depth[inst][t - 1]  # type: ignore[index]
                    move = st.kappa * q_short[inst][t - 1] / d if d > 0 else math.inf
                    high[inst][t] = prices[inst]["high"][t] * (1 + min(1.0, move))
        asking = []
        for s in state:
            acc = s["acc"]
            if acc.entry >= t or s["done"]:
                continue
            if s["pending"] is not None:
                if min(s["pending"][0] + st.latency_bars, n - 1) != t:
                    continue
                settle(s, t)
                if s["done"]:
                    continue
            if not s["in_liq"] and not s["waiting"] and t > acc.entry + st.holding_bars:
                continue
            last = t == n - 1
            forced = s["in_liq"] and last
            if t < s["next"] and not forced:
                continue
            ratio = -math.inf
            if not forced:
                equity, mm = evaluate(s, t, {})
                if equity > mm:
                    s["in_liq"] = False
                    s["waiting"] = False
                    s["since"] = None
                    continue
                if mm > 0:
                    ratio = equity / mm
            if s["out"].queued is None:
                s["out"].queued = t
            if s["since"] is None:
                s["since"] = t
            asking.append((ratio if st.queue_order == "most_undercollateralised"
                           else s["since"], len(asking), s))
        limited = st.max_per_bar is not None or st.max_usd_per_bar is not None
        if limited and t != n - 1:
            # ties: entry bar, then the order given
            asking.sort(key=lambda row: (row[0], row[2]["acc"].entry, row[1]))
        started = 0
        started_usd = 0.0
        waiting = 0
        for _, _, s in asking:
            if limited and t != n - 1 and (
                    (st.max_per_bar is not None and started >= st.max_per_bar)
                    or (st.max_usd_per_bar is not None and started_usd >= st.max_usd_per_bar)):
                s["waiting"] = True
                if s["out"].trigger is None:
                    s["out"].wait_bars += 1
                waiting += 1
                continue
            s["waiting"] = False
            s["since"] = None
            started += 1
            acc = s["acc"]
            last = t == n - 1
            out = s["out"]
            if out.trigger is None:
                out.trigger = t
            closing = plan(s, t, last)
            started_usd += sum(abs(d) * mark(i, t, s["net"]) for i, d in closing.items())
            final = all(s["rem"][i] == 0 or closing.get(i, 0.0) == s["rem"][i]
                        for i in instruments)
            for inst, d in closing.items():
                c0 = prices[inst]["close"][acc.entry]
                if d > 0:
                    q_long[inst][t] += d * c0
                elif d < 0:
                    q_short[inst][t] += -d * c0
            out.steps += 1
            if not final:
                equity, mm = evaluate(s, t, closing)
                s["in_liq"] = equity <= mm
            s["pending"] = (t, dict(closing), dict(s["net"]), final)
            s["next"] = t + gap
            for inst, d in closing.items():
                s["net"][asset_of[inst]] -= d
            if min(t + st.latency_bars, n - 1) == t:
                settle(s, t)
        if backlog is not None:
            backlog.append(waiting)
    return [s["out"] for s in state]
