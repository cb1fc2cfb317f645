"""Brute-force liquidation simulation (domain.md §4): plain Python loops over the bars of each
position, sharing no code with ``calibration.liquidation``. Slow; for small series only.

Positions are listed in the engine's order: grid by entry bar, side, notional, leverage (in the
config's orders), explicit positions as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from calibration._bars import BarSeries
from calibration.liquidation import LiquidationConfig
from calibration.models import MarginModel


@dataclass
class RefPosition:
    side: str
    entry: int
    notional: float
    requested_leverage: float
    opened: bool = False
    leverage: float = math.nan
    collateral: float = math.nan
    trigger: int = -1
    liq_price: float = math.nan
    closeout_price: float = math.nan
    equity: float = math.nan
    bad_debt: float = 0.0
    fee: float = 0.0
    premature: bool = False
    closeout_bar: int = -1


@dataclass
class RefResult:
    positions: list[RefPosition]
    fund: list[tuple[int, float]] = field(default_factory=list)  # (bar, level after it)
    timestamps: list[int] = field(default_factory=list)
    start_fund: float = 0.0
    scale: float = 1.0


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def simulate(bars: BarSeries, model: MarginModel, config: LiquidationConfig) -> RefResult:
    n = len(bars)
    low = [float(v) for v in bars.low]
    high = [float(v) for v in bars.high]
    close = [float(v) for v in bars.close]
    ts = [int(v) for v in bars.timestamp_ms]

    # margin per notional
    def rates_for(notional: float) -> tuple[list[float], list[float], int]:
        r = model.margin_rates(bars, notional_usd=notional) if model.notional_dependent \
            else model.margin_rates(bars)
        return [float(v) for v in r.mm_rate], [float(v) for v in r.im_rate], r.first_valid_bar

    # funding in price units, running sum
    cum_funding = [0.0] * n
    running = 0.0
    for t in range(n):
        if bars.funding_rate is not None:
            running += float(bars.funding_rate[t]) * close[t]
        cum_funding[t] = running

    # depth per side
    bid: list[float] | None = None
    ask: list[float] | None = None
    if bars.bid_depth_usd is not None and bars.ask_depth_usd is not None:
        bid = [float(v) for v in bars.bid_depth_usd]
        ask = [float(v) for v in bars.ask_depth_usd]
    elif bars.volume is not None:
        w = config.adv_window_bars
        adv_depth = []
        for t in range(n):
            first = max(0, t - w + 1)
            total = 0.0
            for u in range(first, t + 1):
                total += float(bars.volume[u]) * close[u]
            per_day = total / (t + 1 - first) * 86_400.0 / bars.bar_seconds
            adv_depth.append(config.depth_fraction_of_adv * per_day)
        bid = ask = adv_depth

    # positions
    positions: list[RefPosition] = []
    if config.positions is None:
        notionals = [float(v) for v in config.notionals_usd]
        per_notional = [rates_for(v) for v in notionals]
        first_valid = max(p[2] for p in per_notional)
        for e in range(0, n - 1, config.entry_every_bars):
            if e < first_valid:
                continue
            if not all(math.isfinite(p[0][e]) and math.isfinite(p[1][e]) for p in per_notional):
                continue
            for side in config.sides:
                for notional in notionals:
                    for lev in config.leverages:
                        positions.append(RefPosition(side, e, notional, float(lev)))
    else:
        for p in config.positions:
            if p.entry_bar is not None:
                e = p.entry_bar
            else:
                e = max(i for i in range(n) if ts[i] <= p.entry_ms)  # type: ignore[operator]
            positions.append(RefPosition(p.side, e, float(p.notional_usd), float(p.leverage)))
    cache: dict[float, tuple[list[float], list[float], int]] = {}

    def rates(notional: float) -> tuple[list[float], list[float], int]:
        if notional not in cache:
            cache[notional] = rates_for(notional)
        return cache[notional]

    first = max(rates(p.notional)[2] for p in positions) if positions else 0
    for p in positions:
        mm, im, _ = rates(p.notional)
        e = p.entry
        if e < first or e + 1 >= n or not (math.isfinite(mm[e]) and math.isfinite(im[e])):
            continue
        p.opened = True
        p.leverage = min(p.requested_leverage, 1.0 / im[e]) if im[e] > 0 else p.requested_leverage
        p.collateral = p.notional / p.leverage

    def equity_at(p: RefPosition, price: float, t: int) -> float:
        qty = p.notional / close[p.entry]
        funding = qty * (cum_funding[t] - cum_funding[p.entry])
        if p.side == "long":
            return p.collateral + qty * (price - close[p.entry]) - funding
        return p.collateral + qty * (close[p.entry] - price) + funding

    def triggers(p: RefPosition, t: int, lo: float, hi: float) -> bool:
        mm = rates(p.notional)[0][t]
        qty = p.notional / close[p.entry]
        extreme = lo if p.side == "long" else hi
        # Equity within 1e-9 of notional above MM counts as at MM (ties on round prices).
        return equity_at(p, extreme, t) <= mm * qty * extreme + 1e-9 * p.notional

    eff_low = list(low)
    eff_high = list(high)
    opened = [p for p in positions if p.opened]
    if not config.cascade:
        for p in opened:
            for t in range(p.entry + 1, min(p.entry + config.holding_bars, n - 1) + 1):
                if triggers(p, t, low[t], high[t]):
                    p.trigger = t
                    break
    else:
        q_long = [0.0] * n
        q_short = [0.0] * n
        for t in range(n):
            if t >= 1:
                for q, prices, is_long in ((q_long, eff_low, True), (q_short, eff_high, False)):
                    if q[t - 1] > 0:
                        d = (bid if is_long else ask)[t - 1]  # type: ignore[index]
                        move = config.cascade_kappa * q[t - 1] / d if d > 0 else math.inf
                        base = low[t] if is_long else high[t]
                        prices[t] = base * (max(0.0, 1.0 - move) if is_long
                                            else 1.0 + min(1.0, move))
            for p in opened:
                if p.trigger >= 0 or not (p.entry < t <= p.entry + config.holding_bars):
                    continue
                if triggers(p, t, eff_low[t], eff_high[t]):
                    p.trigger = t
                    (q_long if p.side == "long" else q_short)[t] += (
                        p.notional * config.population_scale
                    )

    for p in opened:
        t = p.trigger
        if t < 0:
            continue
        e = p.entry
        qty = p.notional / close[e]
        mm = rates(p.notional)[0][t]
        funding = qty * (cum_funding[t] - cum_funding[e])
        if p.side == "long":
            numerator = qty * close[e] - p.collateral + funding
            p.liq_price = numerator / (qty * (1.0 - mm)) if mm < 1.0 else eff_low[t]
            bankrupt = numerator / qty
        else:
            numerator = qty * close[e] + p.collateral + funding
            p.liq_price = numerator / (qty * (1.0 + mm))
            bankrupt = numerator / qty
        # Close-out: the worst price the engine meets from the trigger bar t through the
        # close-out bar t + latency (so latency 0 is bar t alone), unless the config asks for
        # the optimistic fill at the liquidation price.
        last = min(t + config.latency_bars, n - 1)
        p.closeout_bar = last
        if config.closeout_basis == "liquidation_price":
            base = p.liq_price
        else:
            base = eff_low[t] if p.side == "long" else eff_high[t]
            u = t + 1
            while u <= last:
                if p.side == "long" and eff_low[u] < base:
                    base = eff_low[u]
                if p.side == "short" and eff_high[u] > base:
                    base = eff_high[u]
                u += 1
        slip = config.spread_rate
        if config.impact_coef > 0:
            d = (bid if p.side == "long" else ask)[t]  # type: ignore[index]
            slip = slip + config.impact_coef * (p.notional / d) ** config.impact_exponent \
                if d > 0 else math.inf
        slip = min(slip, 1.0)
        p.closeout_price = base * (1 - slip) if p.side == "long" else base * (1 + slip)
        p.equity = equity_at(p, p.closeout_price, t)
        if abs(p.equity) <= 1e-9 * p.notional:
            p.equity = 0.0  # rounding noise around bankruptcy is not bad debt
        if p.equity < 0:
            p.bad_debt = -p.equity
            p.fee = 0.0
        else:
            p.fee = min(config.liquidation_fee_rate * p.notional, p.equity)
        # Premature: bankruptcy never touched from the trigger bar itself through the recovery
        # window, and the window's last close back on the safe side of the liquidation price.
        end = min(t + config.recovery_bars, n - 1)
        tol = 1e-9 * close[p.entry]
        reached = False
        u = t
        while u <= end:
            if p.side == "long" and eff_low[u] <= bankrupt + tol:
                reached = True
            if p.side == "short" and eff_high[u] >= bankrupt - tol:
                reached = True
            u += 1
        back = close[end] > p.liq_price if p.side == "long" else close[end] < p.liq_price
        p.premature = (not reached) and back

    # insurance fund, close-outs in time order, one settlement per bar
    by_bar: dict[int, float] = {}
    for p in opened:
        if p.trigger >= 0:
            bar = min(p.trigger + config.latency_bars, n - 1)
            by_bar[bar] = by_bar.get(bar, 0.0) + (p.fee - p.bad_debt) * config.population_scale
    level = config.insurance_fund_usd
    fund = []
    for bar in sorted(by_bar):
        level += by_bar[bar]
        fund.append((bar, level))
    return RefResult(positions, fund, ts, config.insurance_fund_usd, config.population_scale)


def venue_fund(refs: list[RefResult]) -> list[tuple[int, float]]:
    """One fund for several instruments: every liquidated position of every instrument, by
    close-out time (epoch ms); all those at one time settle together. ``(time, level)``."""
    moves: dict[int, float] = {}
    for ref in refs:
        for p in ref.positions:
            if p.opened and p.trigger >= 0:
                when = ref.timestamps[p.closeout_bar]
                moves[when] = moves.get(when, 0.0) + (p.fee - p.bad_debt) * ref.scale
    level = refs[0].start_fund
    path = []
    for when in sorted(moves):
        level += moves[when]
        path.append((when, level))
    return path


def metrics(
    ref: RefResult, start_ms: int | None, end_ms: int | None,
    fund: list[tuple[int, float]] | None = None,
) -> dict[str, Any]:
    """Every LiquidationMetrics field but the window's name, by loops; the fund figures from
    ``fund`` (``(time_ms, level)`` points, e.g. ``venue_fund``) or this instrument's own."""
    ts = ref.timestamps

    def inside(bar: int) -> bool:
        t = ts[bar]
        return (start_ms is None or t >= start_ms) and (end_ms is None or t < end_ms)

    scale = ref.scale
    positions = 0
    opened = 0.0
    liq = 0
    liq_notional = 0.0
    premature = 0
    bad = 0.0
    bad_n = 0
    worst = 0.0
    fees = 0.0
    for p in ref.positions:
        if not p.opened:
            continue
        if inside(p.entry):
            positions += 1
            opened += p.notional * scale
        if p.trigger >= 0 and inside(p.trigger):
            liq += 1
            liq_notional += p.notional * scale
            premature += int(p.premature)
            bad += p.bad_debt * scale
            if p.bad_debt > 0:
                bad_n += 1
                worst = max(worst, p.bad_debt)
            fees += p.fee * scale
    points = fund if fund is not None else [(ts[bar], value) for bar, value in ref.fund]
    lowest, exhausted = fund_window(points, ref.start_fund, start_ms, end_ms)
    return {
        "start": None if start_ms is None else _iso(start_ms),
        "end": None if end_ms is None else _iso(end_ms),
        "positions": positions,
        "notional_opened_usd": opened,
        "liquidations": liq,
        "liquidated_notional_usd": liq_notional,
        "premature_liquidations": premature,
        "premature_share": premature / liq if liq else None,
        "bad_debt_usd": bad,
        "bad_debt_bps": bad / opened * 1e4 if opened > 0 else None,
        "bad_debt_positions": bad_n,
        "worst_position_bad_debt_usd": worst,
        "fees_to_fund_usd": fees,
        "insurance_fund_min_usd": lowest,
        "insurance_fund_exhausted_at": exhausted,
    }


def fund_window(
    points: list[tuple[int, float]], start_level: float, start_ms: int | None,
    end_ms: int | None,
) -> tuple[float, str | None]:
    """(minimum, exhausted_at) of a fund path over ``[start_ms, end_ms)``: the level entering
    the window, then every level inside it."""
    level = start_level
    went_negative_at: int | None = None  # time the current negative run began
    lowest = math.inf
    exhausted: str | None = None
    entered = False
    for when, value in points:
        before = start_ms is not None and when < start_ms
        after = end_ms is not None and when >= end_ms
        if not before and not entered:
            entered = True
            lowest = level
            if level < 0:
                exhausted = _iso(went_negative_at)  # type: ignore[arg-type]
        if after:
            break
        if level >= 0 and value < 0:
            went_negative_at = when
        level = value
        if not before:
            lowest = min(lowest, value)
            if exhausted is None and value < 0:
                exhausted = _iso(when)
    if not entered:
        lowest = level
        if level < 0:
            exhausted = _iso(went_negative_at)  # type: ignore[arg-type]
    return lowest, exhausted
