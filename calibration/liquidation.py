"""Liquidation and insolvency simulation, exchange style: who pays when margin fails? (§4)

A population of positions is replayed through the bars of one instrument under a margin model:

Positions
    Grid (default): at the close of bars ``0, k, 2k, ...`` (``k = entry_every_bars``) one
    position per side × notional × leverage opens, but only at bars with a margin (``e >=
    first_valid_bar``, finite MM and IM rates for every notional) and with a bar after them
    (``e + 1 < n``). Alternatively the caller gives the positions (``config.positions``);
    those whose entry bar has no margin or no next bar are not opened (``PositionTable.opened``).
    A position of notional ``N`` and requested leverage ``l`` opens at the close ``C_e``:
    leverage ``L = min(l, 1 / IM_e)`` (``IM_e`` the IM rate at ``e`` for that notional),
    collateral ``N / L``, quantity ``qty = N / C_e``.

Equity and funding
    ``D_t = cumsum(funding_rate * close)`` (price units; 0 without funding data), settled per bar
    on the current notional: long equity at price ``P`` and bar ``t`` is ``collateral +
    qty (P - C_e) - qty (D_t - D_e)``, short ``collateral + qty (C_e - P) + qty (D_t - D_e)``.

Trigger
    The first bar ``t`` in ``(e, e + holding_bars]`` (and before the end of the data) where the
    equity at the bar's adverse extreme (low for longs, high for shorts) is ``<= mm_t * qty *
    extreme``. A position that does not trigger is closed without event. Rewritten, the test
    compares a series that does not depend on the position with a threshold that does not
    depend on t (see ``calibration._liquidation_kernels``): one O(n) pass per MM series and
    side builds a two-level block-minimum index, and each entry bar's positions are found with
    one walk of about ``holding_bars / 64`` steps. Positions that differ only in notional share
    the trigger when the model is not notional-dependent.

Liquidation and bankruptcy prices
    The liquidation price is the price at which equity equals MM at the trigger bar:
    long ``(C_e - C_e/L + D_t - D_e) / (1 - mm_t)`` (the bar's low when ``mm_t >= 1``, where no
    such price exists), short ``(C_e + C_e/L + D_t - D_e) / (1 + mm_t)``. The bankruptcy price
    (equity 0) is the numerator alone. Both use the funding up to the trigger bar.

Close-out
    After a latency of ``L = latency_bars`` bars, at the worst price of bars ``t .. t+L`` (min
    low for longs, max high for shorts; cut at the last bar), the trigger bar included: the
    engine takes the position over during bar ``t`` and cannot fill better than the worst price
    it meets from there to the close-out. ``L = 0`` is the one-bar window, the trigger bar's
    adverse extreme: the conservative reading of domain.md §4 (a bar that gaps through the
    liquidation price fills at its low / high, not at the liquidation price). Filling at the
    liquidation price is an optimistic engine, the named option ``closeout_basis =
    "liquidation_price"``, never the default; it has no window, so it needs ``L = 0``.
    Then slippage ``spread_rate + impact_coef * (N / depth_t) ** impact_exponent`` against the
    position (long sells at ``P (1 - slip)``, short buys at ``P (1 + slip)``), capped at 100%.
    ``depth_t`` is the bid (longs) / ask (shorts) depth at the trigger bar when the series has
    both, else ``depth_fraction_of_adv * ADV_t`` with ``ADV_t`` the mean traded USD per day over
    the last ``adv_window_bars`` bars up to ``t`` (fewer at the start). Zero depth means the
    capped slippage. The impact term uses the position's own notional (not scaled by
    ``population_scale``). Close-out equity = collateral + PnL at the close-out price, funding
    to the trigger bar.

Insurance fund and bad debt
    Close-out equity < 0: bad debt ``-equity`` is drawn from the fund, no fee. Otherwise the
    fund receives ``min(liquidation_fee_rate * N, equity)``; the trader keeps the rest. The fund
    starts at ``insurance_fund_usd`` and moves at each close-out bar ``min(t + L, n - 1)``; all
    close-outs of one bar settle together (net). Its path is the level after each bar with a
    close-out, stamped with the bar's open time (as every bar in marginlab). It is exhausted
    the first time it is below 0 (where exchanges turn to auto-deleveraging).

    One fund per venue (domain.md §4): ``shared_insurance_fund`` merges the close-outs of every
    instrument of a backtest into one ledger (``InsuranceFund``) in time order, starting once
    from ``insurance_fund_usd``. Close-outs stamped with the same time settle together (net),
    whatever their instrument, so the order among them cannot change the path; their sum is
    taken in the order the instruments were given, then in the engine's order, so the result
    is the same bit for bit on every run. With bars of different sizes the stamp is still the
    close-out bar's open time: a 15-minute bar's close-outs settle at its open, before a
    5-minute bar opening 5 minutes later. ``LiquidationResult.fund`` is the ledger of one
    instrument alone (what the venue's fund would be if it listed that instrument only); with
    one instrument the two are the same.

Premature liquidations
    The bankruptcy price is not reached (by the low / high of bars ``t .. t+R``, ``R =
    recovery_bars``, cut at the last bar) and the close of bar ``min(t + R, n - 1)`` is strictly
    back on the safe side of the liquidation price (above it for longs, below for shorts). The
    trigger bar ``t`` is part of the window: a bar whose extreme ran through bankruptcy made
    the liquidation necessary even when it closed back above it (domain.md §4).

Cascade (``cascade=True``)
    The USD notional (× ``population_scale``) of the long positions that trigger in bar ``s``,
    ``Q_s``, pushes the low of bar ``s+1`` to ``low * max(0, 1 - cascade_kappa * Q_s /
    depth_s)``; short liquidations push the next high to ``high * (1 + min(1, kappa Q_s /
    depth_s))`` (the move is capped at 100% both ways), with ``depth_s`` the bid / ask depth or
    the ADV-based depth as for slippage. Liquidated notional is counted at the trigger bar (the
    liquidation engine takes the position over then). The moved extremes are used for every
    later step (triggers, close-out, premature test). Because a bar only depends on the
    liquidations of the bar before, the fixed point of "liquidations ⇒ impact ⇒ liquidations"
    is unique and is found exactly in one forward pass (equivalent to iterating the whole
    simulation until nothing changes, with no iteration cap); it can only add or advance
    liquidations compared with no cascade.

Scaling
    Every grid (or explicit) position stands for ``population_scale`` identical positions: USD
    totals (notional opened and liquidated, bad debt, fees, the fund's moves, cascade ``Q``) are
    multiplied by it; counts and the worst single position's bad debt are not.

Per window (``LiquidationResult.metrics``), positions count where they open, liquidations,
bad debt and fees where they trigger, by bar open time in ``[start_ms, end_ms)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from calibration import _liquidation_kernels as _lk
from calibration._bars import BarSeries
from calibration._errors import DataError, InvalidParameters
from calibration.models import MarginModel, MarginRates, Rule
from calibration.report import FundPoint, LiquidationMetrics

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]
Int8Array = NDArray[np.int8]

SIDES = ("long", "short")
#: Values of ``LiquidationConfig.closeout_basis``; the first is the default.
CLOSEOUT_BASES = ("adverse_extreme", "liquidation_price")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso(ms: int) -> str:
    """Epoch milliseconds → ``YYYY-MM-DDTHH:MM:SSZ`` (UTC)."""
    return (_EPOCH + timedelta(milliseconds=int(ms))).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ExplicitPosition:
    """One position given by the caller.

    Attributes:
        side: ``"long"`` or ``"short"``.
        entry_bar: 0-based bar at whose close the position opens; or ``None`` with
            ``entry_ms``.
        notional_usd: notional at entry, USD.
        leverage: requested leverage (capped at ``1 / IM`` at entry).
        entry_ms: instead of ``entry_bar``, an instant (epoch ms UTC): the position opens at
            the close of the bar in progress then (the last bar whose open time is
            ``<= entry_ms``).
    """

    side: str
    entry_bar: int | None
    notional_usd: float
    leverage: float
    entry_ms: int | None = None


_POSITIVE = Rule(low=0.0, low_open=True)
_NON_NEGATIVE = Rule(low=0.0)
_FRACTION = Rule(low=0.0, high=1.0, high_open=True)
#: Upper bounds of the grid and the bar counts: the simulation's cost grows with the grid
#: (leverages × notionals × sides per entry bar), so a request cannot buy an unbounded one.
#: 1000x is above any venue's leverage (Binance: 125x), 10^12 USD above any position, 10^7
#: bars is 19 years of 1-minute bars.
MAX_GRID_VALUES = 64
MAX_GRID_POSITIONS = 4096
MAX_EXPLICIT_POSITIONS = 100_000
MAX_BARS = 10**7
_LEVERAGE = Rule(low=0.0, low_open=True, high=1000.0)
_NOTIONAL = Rule(low=0.0, low_open=True, high=1e12)
_BARS = Rule(low=1, high=MAX_BARS, integer=True)


@dataclass(frozen=True)
class LiquidationConfig:
    """The position population and the close-out mechanics (module docstring for semantics).

    Attributes:
        leverages: requested leverages of the grid (each capped at ``1 / IM`` at entry).
        notionals_usd: notionals of the grid, USD (so size brackets matter).
        sides: ``"long"`` and/or ``"short"``.
        entry_every_bars: grid positions open at the close of bars ``0, k, 2k, ...``.
        holding_bars: bars after entry within which a position may be liquidated; after
            them it is closed without event.
        latency_bars: bars between trigger and close-out; the close-out fills at the worst
            price of bars ``t .. t + latency_bars`` (0: the trigger bar's adverse extreme).
        closeout_basis: the price the close-out fills at before slippage:
            ``"adverse_extreme"`` (default), the worst low (longs) / high (shorts) of bars
            ``t .. t + latency_bars``; ``"liquidation_price"``, the optimistic engine that
            fills at the liquidation price even when the bar gaps through it (needs
            ``latency_bars = 0``).
        recovery_bars: look-ahead of the premature-liquidation test: bars ``t .. t + R``
            after a trigger at ``t``, the trigger bar included.
        spread_rate: half-spread paid on close-out, fraction of price.
        impact_coef, impact_exponent: market impact ``coef * (N / depth) ** exponent``. The
            default (1% when the position equals the ±1% book depth, square-root beyond)
            brackets a linear book's 0.5% average fill for eating the whole band.
        liquidation_fee_rate: fee to the insurance fund, fraction of notional.
        insurance_fund_usd: the fund's starting level, USD. The default keeps Binance's
            ratio (a ~$1B fund against ~$30B open interest, ~3%) for the default grid, which
            holds up to ~$6B of notional open at any time (24 cohorts of $267M).
        depth_fraction_of_adv: without order-book depth, ``depth = this * ADV`` (1%: the
            ±1% band of BTCUSDT perpetuals on 2025-10-10 held ~1% of the day's volume).
        adv_window_bars: look-back of the ADV (trailing, up to and including the bar).
        cascade: let liquidated notional move the next bar's extreme.
        cascade_kappa: price move per unit of ``Q / depth`` in the cascade.
        population_scale: identical positions each grid position stands for.
        positions: explicit positions replacing the grid, or ``None``.
    """

    leverages: tuple[float, ...] = (2, 3, 5, 10, 15, 20, 25, 33, 50, 75, 100, 125)
    notionals_usd: tuple[float, ...] = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
    sides: tuple[str, ...] = ("long", "short")
    entry_every_bars: int = 60
    holding_bars: int = 1440
    latency_bars: int = 1
    closeout_basis: Literal["adverse_extreme", "liquidation_price"] = "adverse_extreme"
    recovery_bars: int = 60
    spread_rate: float = 0.0005
    impact_coef: float = 0.01
    impact_exponent: float = 0.5
    liquidation_fee_rate: float = 0.005
    insurance_fund_usd: float = 200_000_000.0
    depth_fraction_of_adv: float = 0.01
    adv_window_bars: int = 1440
    cascade: bool = False
    cascade_kappa: float = 0.01
    population_scale: float = 1.0
    positions: tuple[ExplicitPosition, ...] | None = None

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any],
                     defaults: Mapping[str, Any] | None = None) -> LiquidationConfig:
        """A validated config from JSON-like fields (lists become tuples) over ``defaults``.

        Raises:
            InvalidParameters: an unknown field (named) or a value out of range.
        """
        known = set(cls.__dataclass_fields__)
        for key in fields:
            if key not in known:
                raise InvalidParameters(
                    f"unknown liquidation setting {key!r}; known: {', '.join(sorted(known))}",
                    field=key,
                )
        merged: dict[str, Any] = dict(defaults or {})
        merged.update({k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        config = cls(**merged)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``InvalidParameters`` (``field`` = the setting at fault) for a bad value."""
        for name in ("leverages", "notionals_usd"):
            values = getattr(self, name)
            if isinstance(values, str | bytes) or not isinstance(values, tuple | list):
                raise InvalidParameters(f"{name} must be a list of numbers", field=name)
            if len(values) == 0:
                raise InvalidParameters(f"{name} must not be empty", field=name)
            if len(values) > MAX_GRID_VALUES:
                raise InvalidParameters(f"{name}: at most {MAX_GRID_VALUES} values, got "
                                        f"{len(values)}", field=name)
            for v in values:
                _check(_LEVERAGE if name == "leverages" else _NOTIONAL, name, v)
        sides = self.sides
        if isinstance(sides, str) or not isinstance(sides, tuple | list) or not sides:
            raise InvalidParameters("sides must be a non-empty list of 'long'/'short'",
                                    field="sides")
        if any(s not in SIDES for s in sides) or len(set(sides)) != len(sides):
            raise InvalidParameters(
                f"sides must be distinct values of 'long', 'short'; got {sides!r}", field="sides"
            )
        grid = len(self.leverages) * len(self.notionals_usd) * len(sides)
        if grid > MAX_GRID_POSITIONS:
            raise InvalidParameters(
                f"leverages x notionals_usd x sides is {grid} positions per entry bar; at most "
                f"{MAX_GRID_POSITIONS}", field="leverages")
        _check(_BARS, "entry_every_bars", self.entry_every_bars)
        _check(_BARS, "holding_bars", self.holding_bars)
        _check(Rule(low=0, high=MAX_BARS, integer=True), "latency_bars", self.latency_bars)
        if self.closeout_basis not in CLOSEOUT_BASES:
            raise InvalidParameters(
                f"closeout_basis must be one of {', '.join(map(repr, CLOSEOUT_BASES))}; "
                f"got {self.closeout_basis!r}",
                field="closeout_basis",
            )
        if self.closeout_basis == "liquidation_price" and self.latency_bars != 0:
            raise InvalidParameters(
                "closeout_basis 'liquidation_price' fills at the trigger, so it needs "
                f"latency_bars = 0 (got {int(self.latency_bars)}); with a latency the fill is "
                "the worst price of the window ('adverse_extreme')",
                field="closeout_basis",
            )
        _check(_BARS, "recovery_bars", self.recovery_bars)
        _check(_FRACTION, "spread_rate", self.spread_rate)
        _check(Rule(low=0.0, high=100.0), "impact_coef", self.impact_coef)
        _check(Rule(low=0.0, high=3.0, low_open=True), "impact_exponent", self.impact_exponent)
        _check(Rule(low=0.0, high=1.0), "liquidation_fee_rate", self.liquidation_fee_rate)
        _check(Rule(low=0.0, high=1e15), "insurance_fund_usd", self.insurance_fund_usd)
        _check(Rule(low=0.0, low_open=True, high=1e3), "depth_fraction_of_adv",
               self.depth_fraction_of_adv)
        _check(_BARS, "adv_window_bars", self.adv_window_bars)
        if not isinstance(self.cascade, bool):
            raise InvalidParameters(f"cascade must be true or false, got {self.cascade!r}",
                                    field="cascade")
        _check(Rule(low=0.0, high=100.0), "cascade_kappa", self.cascade_kappa)
        _check(Rule(low=0.0, low_open=True, high=1e6), "population_scale",
               self.population_scale)
        if self.positions is not None:
            if not isinstance(self.positions, tuple | list):
                raise InvalidParameters("positions must be a list of positions",
                                        field="positions")
            if len(self.positions) > MAX_EXPLICIT_POSITIONS:
                raise InvalidParameters(f"at most {MAX_EXPLICIT_POSITIONS} positions",
                                        field="positions")
            for i, p in enumerate(self.positions):
                _check_position(i, p)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (explicit positions as a count)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "positions":
                out[name] = None if value is None else len(value)
            elif isinstance(value, tuple):
                out[name] = list(value)
            else:
                out[name] = value
        return out


def _check(rule: Rule, name: str, value: Any) -> None:
    rule.check(name, value)


def _check_position(i: int, p: Any) -> None:
    where = f"positions[{i}]"
    if not isinstance(p, ExplicitPosition):
        raise InvalidParameters(f"{where} must be an ExplicitPosition", field="positions")
    if p.side not in SIDES:
        raise InvalidParameters(f"{where}.side must be 'long' or 'short', got {p.side!r}",
                                field="positions")
    for name in ("notional_usd", "leverage"):
        try:
            _POSITIVE.check(f"{where}.{name}", getattr(p, name))
        except InvalidParameters as exc:
            raise InvalidParameters(str(exc), field="positions") from exc
    if (p.entry_bar is None) == (p.entry_ms is None):
        raise InvalidParameters(f"{where} needs exactly one of entry_bar and entry_ms",
                                field="positions")
    value = p.entry_bar if p.entry_bar is not None else p.entry_ms
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidParameters(f"{where}: the entry must be a whole number, got {value!r}",
                                field="positions")
    if p.entry_bar is not None and p.entry_bar < 0:
        raise InvalidParameters(f"{where}.entry_bar must be >= 0", field="positions")


@dataclass(frozen=True, eq=False)
class LiquidationEvents:
    """One row per liquidated position, in no particular order (arrays of shape ``(m,)``).

    Money is USD for one position (not scaled by ``population_scale``). Entry bar, leverage
    and collateral of each position are in ``LiquidationResult.position_table``.

    Attributes:
        position: index of the position (see ``LiquidationResult.position_table``).
        side: +1 long, -1 short.
        trigger_bar: bar at which the position was liquidated.
        notional_usd: the position's notional.
        liquidation_price: price at which equity equals MM at the trigger bar.
        closeout_price: the fill after latency and slippage.
        closeout_equity_usd: collateral + PnL at the close-out price (negative: insolvent).
        premature: the liquidation was premature.
        latency_bars, fee_rate, bar_count: settings the derived columns need.
    """

    position: IntArray
    side: Int8Array
    trigger_bar: IntArray
    notional_usd: FloatArray
    liquidation_price: FloatArray
    closeout_price: FloatArray
    closeout_equity_usd: FloatArray
    premature: BoolArray
    latency_bars: int
    fee_rate: float
    bar_count: int

    def __len__(self) -> int:
        return int(self.position.shape[0])

    @cached_property
    def closeout_bar(self) -> IntArray:
        """``min(trigger_bar + latency_bars, n - 1)``: where the fund settles."""
        result: IntArray = np.minimum(self.trigger_bar + self.latency_bars, self.bar_count - 1)
        return result

    @cached_property
    def bad_debt_usd(self) -> FloatArray:
        """``max(0, -closeout_equity_usd)``: drawn from the insurance fund."""
        result: FloatArray = np.maximum(-self.closeout_equity_usd, 0.0)
        return result

    @cached_property
    def fee_usd(self) -> FloatArray:
        """``min(fee_rate * notional, equity)`` when equity >= 0, else 0: paid to the fund."""
        eq = self.closeout_equity_usd
        result: FloatArray = np.where(
            eq >= 0.0, np.minimum(self.fee_rate * self.notional_usd, eq), 0.0
        )
        return result


@dataclass(frozen=True, eq=False)
class PositionTable:
    """Every position of a simulation, one row each (arrays of shape ``(P,)``).

    Rows that were not liquidated have ``trigger_bar = -1``, NaN prices and equity, zero bad
    debt and fee. Rows that were not opened (explicit positions without margin at entry) have
    ``opened = False`` and NaN leverage and collateral.
    """

    side: Int8Array
    entry_bar: IntArray
    notional_usd: FloatArray
    leverage: FloatArray
    collateral_usd: FloatArray
    opened: BoolArray
    trigger_bar: IntArray
    liquidation_price: FloatArray
    closeout_price: FloatArray
    closeout_equity_usd: FloatArray
    bad_debt_usd: FloatArray
    fee_usd: FloatArray
    premature: BoolArray

    def __len__(self) -> int:
        return int(self.side.shape[0])


@dataclass(frozen=True, eq=False)
class _GridLayout:
    """Grid positions: index ``((k * S + s) * J + j) * K + c`` for entry ``k``, side ``s``,
    notional ``j`` and leverage ``c``; ``leverage[m]`` is the effective leverage per entry and
    requested leverage of MM series ``m``."""

    sides: tuple[int, ...]
    notionals: FloatArray
    entry_bars: IntArray
    leverage: tuple[FloatArray, ...]
    series_of_notional: IntArray

    def base(self) -> tuple[Int8Array, IntArray, FloatArray, FloatArray, BoolArray]:
        s_n, j_n = len(self.sides), self.notionals.shape[0]
        k_n = self.leverage[0].shape[1] if self.leverage else 0
        e_n = self.entry_bars.shape[0]
        shape = (e_n, s_n, j_n, k_n)
        kk, ss, jj, cc = (a.ravel() for a in np.indices(shape, dtype=np.int64))
        side = np.asarray(self.sides, dtype=np.int8)[ss]
        entry = self.entry_bars[kk]
        notional = self.notionals[jj]
        stacked = np.stack(self.leverage) if self.leverage else np.zeros((1, e_n, k_n))
        leverage = stacked[self.series_of_notional[jj], kk, cc]
        return side, entry, notional, leverage, np.ones(side.shape[0], dtype=bool)


@dataclass(frozen=True, eq=False)
class _ExplicitLayout:
    side: Int8Array
    entry_bar: IntArray
    notional: FloatArray
    leverage: FloatArray
    opened: BoolArray

    def base(self) -> tuple[Int8Array, IntArray, FloatArray, FloatArray, BoolArray]:
        return self.side, self.entry_bar, self.notional, self.leverage, self.opened


@dataclass(frozen=True, eq=False)
class InsuranceFund:
    """A venue's insurance fund through time: a start level, then one net settlement per
    close-out time (module docstring, "Insurance fund and bad debt").

    Attributes:
        start_usd: the level before any close-out, USD.
        start_ms: open time of the first bar of any instrument (epoch ms UTC): where the path
            starts.
        time_ms: times with at least one close-out (close-out bar open times, epoch ms UTC),
            strictly ascending, shape ``(F,)``.
        delta_usd: net move of the fund at each time (fees in minus bad debt out, USD, ×
            ``population_scale``), shape ``(F,)``.
        level_usd: level after the settlement at each time, USD, shape ``(F,)``.
    """

    start_usd: float
    start_ms: int | None
    time_ms: IntArray
    delta_usd: FloatArray
    level_usd: FloatArray

    @cached_property
    def _neg_since(self) -> IntArray:
        """Per settlement, the index of the settlement that began the current run below zero
        (meaningful where the level is negative)."""
        neg = self.level_usd < 0.0
        run_start = neg & ~np.r_[False, neg[:-1]]
        result: IntArray = np.maximum.accumulate(
            np.where(run_start, np.arange(neg.shape[0]), 0)
        ).astype(np.int64)
        return result

    @property
    def min_usd(self) -> float:
        """Lowest level over the whole path (the start level if never lower), USD."""
        if self.level_usd.size == 0:
            return float(self.start_usd)
        return min(float(self.start_usd), float(self.level_usd.min()))

    @property
    def exhausted_at(self) -> str | None:
        """When the fund first went below zero (ISO-8601 UTC), or ``None``."""
        neg = np.flatnonzero(self.level_usd < 0.0)
        return None if neg.size == 0 else _iso(int(self.time_ms[neg[0]]))

    def window(self, start_ms: int | None, end_ms: int | None) -> tuple[float, str | None]:
        """``(minimum, exhausted_at)`` over the window ``[start_ms, end_ms)`` (``None``:
        open-ended).

        The minimum is over the level entering the window and every level after a settlement
        in it. ``exhausted_at`` is the first settlement in the window that leaves the fund below
        zero, or, if the fund enters the window already below zero, the time it went below
        zero (before the window); ``None`` if it is never below zero in the window.
        """
        t = self.time_ms
        f0 = 0 if start_ms is None else int(np.searchsorted(t, start_ms, "left"))
        f1 = t.shape[0] if end_ms is None else int(np.searchsorted(t, end_ms, "left"))
        f1 = max(f0, f1)
        entering = float(self.level_usd[f0 - 1]) if f0 > 0 else float(self.start_usd)
        inside = self.level_usd[f0:f1]
        lowest = min(entering, float(inside.min())) if inside.size else entering
        exhausted: str | None = None
        if entering < 0.0:
            exhausted = _iso(int(t[self._neg_since[f0 - 1]]))
        else:
            neg = np.flatnonzero(inside < 0.0)
            if neg.size:
                exhausted = _iso(int(t[f0 + neg[0]]))
        return lowest, exhausted

    def path(self, max_points: int = 500) -> list[FundPoint]:
        """The fund through time: its start level at ``start_ms``, then the level after each
        settlement.

        With more than ``max_points`` points, the first and last are kept and the others are
        split into ``max_points - 2`` consecutive groups, each represented by its lowest point,
        so the minimum (and every drawdown's trough at that resolution) is never lost.
        """
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
            raise InvalidParameters(f"max_points must be an integer >= 2, got {max_points!r}",
                                    field="max_points")
        if self.start_ms is None:
            return []
        times = np.concatenate([[int(self.start_ms)], self.time_ms]).astype(np.int64)
        levels = np.concatenate([[float(self.start_usd)], self.level_usd])
        count = levels.shape[0]
        if count > max_points:
            groups = max_points - 2
            inner = np.arange(1, count - 1)
            bounds = np.linspace(0, inner.shape[0], groups + 1).astype(np.int64)
            keep = [0]
            for g in range(groups):
                a, b = int(bounds[g]), int(bounds[g + 1])
                if b > a:
                    keep.append(int(inner[a + int(np.argmin(levels[inner[a:b]]))]))
            keep.append(count - 1)
            idx = np.asarray(keep, dtype=np.int64)
            times, levels = times[idx], levels[idx]
        return [FundPoint(_iso(int(t)), float(v)) for t, v in zip(times, levels, strict=True)]


def shared_insurance_fund(
    results: Sequence[LiquidationResult], start_usd: float | None = None
) -> InsuranceFund:
    """One insurance fund for the venue: every instrument's close-outs on one ledger.

    Args:
        results: the simulations of the venue's instruments, in a fixed order (it fixes the
            summation order of close-outs settling at the same time).
        start_usd: the fund's start level, USD; by default the ``insurance_fund_usd`` every
            result's config shares.

    Raises:
        InvalidParameters: ``start_usd`` omitted and the results' configs disagree on
            ``insurance_fund_usd``, or no results and no ``start_usd``.
    """
    if start_usd is None:
        starts = {float(r.config.insurance_fund_usd) for r in results}
        if len(starts) != 1:
            raise InvalidParameters(
                "one insurance fund per venue needs one start level; the instruments' "
                f"insurance_fund_usd values are {sorted(starts)}",
                field="insurance_fund_usd",
            )
        start_usd = starts.pop()
    if not results:
        return InsuranceFund(float(start_usd), None, np.zeros(0, dtype=np.int64), np.zeros(0),
                             np.zeros(0))
    times = np.concatenate([r.fund.time_ms for r in results]).astype(np.int64)
    deltas = np.concatenate([r.fund.delta_usd for r in results])
    which = np.concatenate([np.full(r.fund.time_ms.shape[0], i, dtype=np.int64)
                            for i, r in enumerate(results)])
    order = np.lexsort((which, times))  # by time, then instrument order: a fixed sum order
    times, deltas = times[order], deltas[order]
    first = np.flatnonzero(np.r_[True, times[1:] != times[:-1]]) if times.size else np.zeros(
        0, dtype=np.int64)
    merged_delta = np.add.reduceat(deltas, first) if times.size else np.zeros(0)
    level = np.cumsum(np.r_[float(start_usd), merged_delta])[1:]
    starts_ms = [int(r.timestamp_ms[0]) for r in results if r.timestamp_ms.size]
    return InsuranceFund(
        start_usd=float(start_usd), start_ms=min(starts_ms) if starts_ms else None,
        time_ms=np.ascontiguousarray(times[first]), delta_usd=merged_delta, level_usd=level,
    )


@dataclass(frozen=True, eq=False)
class LiquidationResult:
    """Outcome of ``simulate_liquidations`` on one bar series.

    Attributes:
        config: the settings used.
        instrument, fingerprint: the bar series simulated.
        timestamp_ms: bar open times of the series (epoch ms UTC), shape ``(n,)``.
        positions_opened: positions opened (grid points × entries, or explicit positions).
        entry_bars: bars at which positions opened, ascending, shape ``(E,)``.
        entry_positions: positions opened at each entry bar, shape ``(E,)``.
        entry_notional_usd: notional opened at each entry bar (× ``population_scale``).
        liquidations: positions liquidated over the whole series.
        fund_bars: bars with at least one close-out, ascending.
        fund_usd: insurance fund level after the close-outs of each of ``fund_bars``, this
            instrument alone moving a fund of ``insurance_fund_usd`` (see ``fund``).
        fund_delta_usd: net move of the fund at each of ``fund_bars`` (fees minus bad debt).

    The per-position details (``events``, ``position_table()``) are computed on first use by
    re-running the close-out kernel, so a simulation that only needs metrics never holds one
    row per liquidated position.
    """

    config: LiquidationConfig
    instrument: str
    fingerprint: str
    timestamp_ms: IntArray
    positions_opened: int
    entry_bars: IntArray
    entry_positions: IntArray
    entry_notional_usd: FloatArray
    liquidations: int
    fund_bars: IntArray
    fund_usd: FloatArray
    fund_delta_usd: FloatArray
    _layout: _GridLayout | _ExplicitLayout = field(repr=False)
    _agg: _Aggregates = field(repr=False)
    _replay: _Replay = field(repr=False)

    @cached_property
    def events(self) -> LiquidationEvents:
        """One row per liquidated position (computed on first access, then kept)."""
        return self._replay.events(self.liquidations)

    @cached_property
    def fund(self) -> InsuranceFund:
        """The fund's ledger with this instrument alone on the venue (a venue of several
        instruments shares one: ``shared_insurance_fund``)."""
        return InsuranceFund(
            start_usd=float(self.config.insurance_fund_usd),
            start_ms=int(self.timestamp_ms[0]) if self.timestamp_ms.size else None,
            time_ms=np.ascontiguousarray(self.timestamp_ms[self.fund_bars]),
            delta_usd=self.fund_delta_usd, level_usd=self.fund_usd,
        )

    @property
    def insurance_fund_min_usd(self) -> float:
        """Lowest level of this instrument's own fund (``fund``) over the whole series."""
        return self.fund.min_usd

    @property
    def insurance_fund_exhausted_at(self) -> str | None:
        """When this instrument's own fund (``fund``) first went below zero, or ``None``."""
        return self.fund.exhausted_at

    def _bar_range(self, start_ms: int | None, end_ms: int | None) -> tuple[int, int]:
        n = self.timestamp_ms.shape[0]
        lo = 0 if start_ms is None else int(np.searchsorted(self.timestamp_ms, start_ms, "left"))
        hi = n if end_ms is None else int(np.searchsorted(self.timestamp_ms, end_ms, "left"))
        return lo, max(lo, hi)

    def metrics(
        self, window_name: str, start_ms: int | None, end_ms: int | None,
        fund: InsuranceFund | None = None,
    ) -> LiquidationMetrics:
        """The figures of one window ``[start_ms, end_ms)`` (``None``: open-ended).

        Positions count where they open (entry bar), liquidations, bad debt and fees where
        they trigger: this instrument's own. ``bad_debt_bps`` is bad debt per notional opened
        in the window (×1e4), ``None`` if nothing opened; ``premature_share`` is ``None``
        without liquidations. The fund figures are those of ``fund`` (the venue's shared fund;
        by default this instrument's own, ``self.fund``) over the window
        (``InsuranceFund.window``).
        """
        lo, hi = self._bar_range(start_ms, end_ms)
        scale = float(self.config.population_scale)
        e0, e1 = np.searchsorted(self.entry_bars, [lo, hi], "left")
        positions = int(self.entry_positions[e0:e1].sum())
        opened = float(self.entry_notional_usd[e0:e1].sum())
        ag = self._agg
        mask = (ag.trigger_bar >= lo) & (ag.trigger_bar < hi)
        count = int(ag.count[mask].sum())
        premature = int(ag.count[mask & ag.premature].sum())
        bad_total = float(ag.bad_debt[mask].sum()) * scale
        worst = ag.worst[mask]
        fund_min, exhausted = (fund if fund is not None else self.fund).window(start_ms, end_ms)
        return LiquidationMetrics(
            window=window_name,
            start=None if start_ms is None else _iso(start_ms),
            end=None if end_ms is None else _iso(end_ms),
            positions=positions,
            notional_opened_usd=opened,
            liquidations=count,
            liquidated_notional_usd=float(ag.notional[mask].sum()) * scale,
            premature_liquidations=premature,
            premature_share=premature / count if count else None,
            bad_debt_usd=bad_total,
            bad_debt_bps=bad_total / opened * 1e4 if opened > 0 else None,
            bad_debt_positions=int(ag.bad_count[mask].sum()),
            worst_position_bad_debt_usd=float(worst.max()) if worst.size else 0.0,
            fees_to_fund_usd=float(ag.fee[mask].sum()) * scale,
            insurance_fund_min_usd=fund_min,
            insurance_fund_exhausted_at=exhausted,
        )

    def fund_path(self, max_points: int = 500) -> list[FundPoint]:
        """This instrument's own fund (``fund``) through time: ``InsuranceFund.path``."""
        return self.fund.path(max_points)

    def fund_contribution_path(self, max_points: int = 500) -> list[FundPoint]:
        """This instrument's own cumulative net contribution to the venue's fund (USD: fees
        paid in minus bad debt drawn, from 0 at its first bar), thinned as
        ``InsuranceFund.path``; negative: what it has taken out of the shared fund so far."""
        own = InsuranceFund(
            start_usd=0.0, start_ms=self.fund.start_ms, time_ms=self.fund.time_ms,
            delta_usd=self.fund_delta_usd, level_usd=np.cumsum(self.fund_delta_usd),
        )
        return own.path(max_points)

    def position_table(self) -> PositionTable:
        """Every position with its outcome (memory: ~100 bytes per position; for inspection
        and tests rather than full default grids on long series).

        Row order (the ``position`` index of ``events``): grid positions by entry bar, then
        side, notional and leverage, each in the config's order; explicit positions as given.
        """
        side, entry, notional, leverage, opened = self._layout.base()
        p = side.shape[0]
        ev = self.events
        trigger = np.full(p, -1, dtype=np.int64)
        liq = np.full(p, np.nan)
        closeout = np.full(p, np.nan)
        equity = np.full(p, np.nan)
        bad = np.zeros(p)
        fee = np.zeros(p)
        premature = np.zeros(p, dtype=bool)
        trigger[ev.position] = ev.trigger_bar
        liq[ev.position] = ev.liquidation_price
        closeout[ev.position] = ev.closeout_price
        equity[ev.position] = ev.closeout_equity_usd
        bad[ev.position] = ev.bad_debt_usd
        fee[ev.position] = ev.fee_usd
        premature[ev.position] = ev.premature
        return PositionTable(
            side=side, entry_bar=entry, notional_usd=notional, leverage=leverage,
            collateral_usd=notional / leverage, opened=opened, trigger_bar=trigger,
            liquidation_price=liq, closeout_price=closeout, closeout_equity_usd=equity,
            bad_debt_usd=bad, fee_usd=fee, premature=premature,
        )


def _depths(bars: BarSeries, config: LiquidationConfig) -> tuple[FloatArray, FloatArray]:
    """Depth (USD) per bar for long and short close-outs (bid / ask, or a share of ADV)."""
    needed = config.impact_coef > 0 or (config.cascade and config.cascade_kappa > 0)
    if bars.bid_depth_usd is not None and bars.ask_depth_usd is not None:
        return bars.bid_depth_usd, bars.ask_depth_usd
    traded = bars.traded_usd()
    if traded is None:
        if needed:
            raise DataError(
                f"market impact and cascades need order-book depth or volume; "
                f"{bars.instrument!r} has neither (set impact_coef=0 and cascade=false)"
            )
        zeros = np.zeros(len(bars))
        return zeros, zeros
    # cached on the series, like its other features: calibration re-simulates the same bars
    key = ("liquidation_depth_usd", int(config.adv_window_bars),
           float(config.depth_fraction_of_adv))
    if key not in bars._cache:
        bars._cache[key] = _lk.trailing_mean(
            np.ascontiguousarray(traded, dtype=np.float64), int(config.adv_window_bars),
            86_400.0 / bars.bar_seconds * float(config.depth_fraction_of_adv),
        )
    depth = bars._cache[key]
    return depth, depth


def _extreme_blocks(bars: BarSeries, sign: int) -> tuple[FloatArray, FloatArray]:
    """``block_minima`` of the lows (``sign`` 1) or of minus the highs (-1), cached on the
    series."""
    keys = (("liquidation_blocks", sign, 8), ("liquidation_blocks", sign, 64))
    if keys[0] not in bars._cache or keys[1] not in bars._cache:
        price = np.ascontiguousarray(bars.low if sign > 0 else bars.high, dtype=np.float64)
        bars._cache[keys[0]], bars._cache[keys[1]] = _lk.block_minima(
            price, price, price, sign > 0, True
        )
    return bars._cache[keys[0]], bars._cache[keys[1]]


@dataclass(eq=False)
class _Group:
    """Query rows of one side and one MM series (rows ascending by entry bar)."""

    series: int
    entries: IntArray
    leverage: FloatArray  # (R, K) effective
    notional: FloatArray  # (R, J)
    pos_base: IntArray
    col_stride: int
    notional_stride: int
    order: IntArray  # column visiting order: leverage descending
    trig: IntArray | None = None
    notional_pow: FloatArray = field(init=False)


_NO_DETAILS = (
    np.zeros(0, dtype=np.int64), 0, 0, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
    np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool),
)


@dataclass(frozen=True, eq=False)
class _Aggregates:
    """One row per liquidation trigger: the positions that share it (one per notional for
    models that do not depend on size) and their sums; everything the metrics need."""

    trigger_bar: IntArray
    side: Int8Array
    premature: BoolArray
    count: IntArray
    notional: FloatArray
    bad_debt: FloatArray
    fee: FloatArray
    bad_count: IntArray
    worst: FloatArray

    @classmethod
    def empty(cls, size: int) -> _Aggregates:
        return cls(
            trigger_bar=np.empty(size, dtype=np.int64), side=np.empty(size, dtype=np.int8),
            premature=np.empty(size, dtype=bool), count=np.empty(size, dtype=np.int64),
            notional=np.empty(size), bad_debt=np.empty(size), fee=np.empty(size),
            bad_count=np.empty(size, dtype=np.int64), worst=np.empty(size),
        )

    def arrays(self) -> tuple[Any, ...]:
        """The kernel's ``agg_*`` arguments."""
        return (self.trigger_bar, self.premature, self.count, self.notional, self.bad_debt,
                self.fee, self.bad_count, self.worst)


@dataclass(eq=False)
class _SideData:
    """What the close-out kernel needs for one side: extremes (after cascade), depth and the
    block index of the extremes."""

    sign: int
    price: FloatArray
    depth: FloatArray
    groups: list[_Group]
    q8: FloatArray
    q64: FloatArray

    def kernel_args(
        self, g: _Group, close: FloatArray, mm: FloatArray, funding_cum: FloatArray,
        config: LiquidationConfig,
    ) -> tuple[Any, ...]:
        """The close-out kernel's arguments up to ``fee_rate``."""
        return (
            self.sign > 0, g.entries, close, self.price, mm, funding_cum, self.depth, self.q8,
            self.q64, g.leverage, g.trig, g.notional, g.notional_pow, int(config.latency_bars),
            config.closeout_basis == "liquidation_price", int(config.recovery_bars),
            float(config.spread_rate), float(config.impact_coef),
            float(config.impact_exponent), float(config.liquidation_fee_rate),
        )


@dataclass(frozen=True, eq=False)
class _Replay:
    """Inputs to re-run the close-out kernel with per-position details (``events``)."""

    close: FloatArray
    funding_cum: FloatArray
    mm_series: list[FloatArray]
    sides: list[_SideData]
    config: LiquidationConfig
    bar_count: int

    def events(self, total: int) -> LiquidationEvents:
        position = np.empty(total, dtype=np.int64)
        side = np.empty(total, dtype=np.int8)
        trigger = np.empty(total, dtype=np.int64)
        notional = np.empty(total)
        liq = np.empty(total)
        closeout = np.empty(total)
        equity = np.empty(total)
        premature = np.empty(total, dtype=bool)
        slot = 0
        empty_f = np.zeros(0)
        empty_b = np.zeros(0, dtype=bool)
        for sd in self.sides:
            for g in sd.groups:
                assert g.trig is not None
                agg = _Aggregates.empty(int(np.count_nonzero(g.trig >= 0)))
                start = slot
                _, slot = _lk.outcomes(
                    *sd.kernel_args(g, self.close, self.mm_series[g.series], self.funding_cum,
                                    self.config),
                    1.0, empty_f, empty_b, *agg.arrays(), 0, True, g.pos_base, g.col_stride,
                    g.notional_stride, position, trigger, notional, liq, closeout, equity,
                    premature, slot,
                )
                side[start:slot] = sd.sign
        return LiquidationEvents(
            position=position, side=side, trigger_bar=trigger, notional_usd=notional,
            liquidation_price=liq, closeout_price=closeout, closeout_equity_usd=equity,
            premature=premature, latency_bars=int(self.config.latency_bars),
            fee_rate=float(self.config.liquidation_fee_rate), bar_count=self.bar_count,
        )


def _effective_leverage(requested: FloatArray, im_at_entry: FloatArray) -> FloatArray:
    """``min(requested, 1 / IM)`` per entry (rows) and requested leverage (columns)."""
    with np.errstate(divide="ignore"):
        cap = np.where(im_at_entry > 0, 1.0 / im_at_entry, np.inf)
    return np.ascontiguousarray(np.minimum(requested[None, :], cap[:, None]))


def simulate_liquidations(
    bars: BarSeries, model: MarginModel, config: LiquidationConfig | None = None
) -> LiquidationResult:
    """Replay a population of positions through ``bars`` under ``model`` (domain.md §4).

    See the module docstring for every convention. MM and IM rates come from
    ``model.margin_rates`` once per notional when ``model.notional_dependent``, else once.

    Raises:
        InvalidParameters: a bad setting (``field`` names it) or an explicit position whose
            ``entry_ms`` lies before the first bar or whose ``entry_bar`` is past the last.
        DataError: market impact or cascade requested on bars with neither depth nor volume.
        InsufficientData: the series is too short for the model's warm-up.
    """
    config = config if config is not None else LiquidationConfig()
    config.validate()
    n = len(bars)
    close = np.ascontiguousarray(bars.close, dtype=np.float64)
    low = np.ascontiguousarray(bars.low, dtype=np.float64)
    high = np.ascontiguousarray(bars.high, dtype=np.float64)
    explicit = config.positions is not None
    sides_cfg = tuple(config.sides)
    side_signs = tuple(1 if s == "long" else -1 for s in sides_cfg)

    # MM / IM series: one per distinct notional when the model depends on size, else one.
    if explicit:
        assert config.positions is not None
        notionals = np.asarray([float(p.notional_usd) for p in config.positions])
    else:
        notionals = np.asarray([float(v) for v in config.notionals_usd])
    rates: list[MarginRates] = []
    if model.notional_dependent:
        by_value: dict[float, int] = {}
        for value in notionals.tolist():
            if value not in by_value:
                by_value[value] = len(rates)
                rates.append(model.margin_rates(bars, notional_usd=value))
        series_of = np.asarray([by_value[v] for v in notionals.tolist()], dtype=np.int64)
    else:
        rates.append(model.margin_rates(bars))
        series_of = np.zeros(notionals.shape[0], dtype=np.int64)
    first_valid = max(r.first_valid_bar for r in rates)
    mm_series = [np.ascontiguousarray(r.mm_rate, dtype=np.float64) for r in rates]
    im_series = [np.asarray(r.im_rate, dtype=np.float64) for r in rates]

    if bars.funding_rate is not None:
        funding_cum = np.cumsum(np.asarray(bars.funding_rate, dtype=np.float64) * close)
    else:
        funding_cum = np.zeros(n)
    depth_long, depth_short = _depths(bars, config)
    depth_long = np.ascontiguousarray(depth_long, dtype=np.float64)
    depth_short = np.ascontiguousarray(depth_short, dtype=np.float64)
    scale = float(config.population_scale)

    groups: dict[int, list[_Group]] = {1: [], -1: []}
    layout: _GridLayout | _ExplicitLayout
    if explicit:
        assert config.positions is not None
        layout, entry_bars, entry_positions, entry_notional = _explicit_groups(
            bars, config.positions, notionals, series_of, mm_series, im_series, first_valid,
            close, funding_cum, groups, scale,
        )
    else:
        layout, entry_bars, entry_positions, entry_notional = _grid_groups(
            n, config, notionals, series_of, mm_series, im_series, first_valid, side_signs,
            close, funding_cum, groups, scale, model.notional_dependent,
        )

    for side_groups in groups.values():
        for g in side_groups:
            g.notional_pow = np.ascontiguousarray(g.notional ** float(config.impact_exponent))
    holding = int(config.holding_bars)
    # First passage without cascade, then (optionally) the cascade's forward pass.
    extremes: dict[int, FloatArray] = {1: low, -1: high}
    depths = {1: depth_long, -1: depth_short}
    for sign, side_groups in groups.items():
        blocks: dict[int, tuple[FloatArray, FloatArray]] = {}
        for g in side_groups:
            if g.series not in blocks:
                blocks[g.series] = _lk.block_minima(
                    extremes[sign], mm_series[g.series], funding_cum, sign > 0, False
                )
            b8, b64 = blocks[g.series]
            g.trig = _lk.first_passage(
                extremes[sign], mm_series[g.series], funding_cum, sign > 0, b8, b64, close,
                g.entries, g.leverage, g.order, holding,
            )
        if config.cascade and config.cascade_kappa > 0 and side_groups:
            extremes[sign] = _run_cascade(
                side_groups, extremes[sign], close, mm_series, funding_cum, depths[sign], sign > 0,
                float(config.cascade_kappa), holding, scale,
            )

    agg_total = 0
    for side_groups in groups.values():
        for g in side_groups:
            assert g.trig is not None
            agg_total += int(np.count_nonzero(g.trig >= 0))
    agg = _Aggregates.empty(agg_total)
    fund_delta = np.zeros(n)
    fund_seen = np.zeros(n, dtype=bool)
    side_data: list[_SideData] = []
    slot = 0
    for sign, side_groups in groups.items():
        if not side_groups:
            continue
        if extremes[sign] is (low if sign > 0 else high):
            q8, q64 = _extreme_blocks(bars, sign)
        else:  # moved by the cascade
            q8, q64 = _lk.block_minima(extremes[sign], low, low, sign > 0, True)
        side = _SideData(sign, extremes[sign], depths[sign], side_groups, q8, q64)
        side_data.append(side)
        for g in side_groups:
            start = slot
            slot, _ = _lk.outcomes(
                *side.kernel_args(g, close, mm_series[g.series], funding_cum, config),
                scale, fund_delta, fund_seen, *agg.arrays(), slot, False,
                *_NO_DETAILS, 0,
            )
            agg.side[start:slot] = sign
    replay = _Replay(close, funding_cum, mm_series, side_data, config, n)

    # Insurance fund: the running level after each bar with a close-out.
    fund_bars, fund_usd = _lk.fund_levels(fund_delta, fund_seen, float(config.insurance_fund_usd))

    return LiquidationResult(
        config=config,
        instrument=bars.instrument,
        fingerprint=bars.fingerprint,
        timestamp_ms=bars.timestamp_ms,
        positions_opened=int(entry_positions.sum()),
        entry_bars=entry_bars,
        entry_positions=entry_positions,
        entry_notional_usd=entry_notional,
        liquidations=int(agg.count.sum()),
        fund_bars=fund_bars,
        fund_usd=fund_usd,
        fund_delta_usd=np.ascontiguousarray(fund_delta[fund_bars]),
        _layout=layout,
        _agg=agg,
        _replay=replay,
    )


def _valid_at(bars_idx: IntArray, mm: list[FloatArray], im: list[FloatArray]) -> BoolArray:
    ok = np.ones(bars_idx.shape[0], dtype=bool)
    for m, i in zip(mm, im, strict=True):
        ok &= np.isfinite(m[bars_idx]) & np.isfinite(i[bars_idx])
    return ok


def _grid_groups(
    n: int, config: LiquidationConfig, notionals: FloatArray, series_of: IntArray,
    mm: list[FloatArray], im: list[FloatArray], first_valid: int, side_signs: tuple[int, ...],
    close: FloatArray, funding_cum: FloatArray, groups: dict[int, list[_Group]], scale: float,
    dependent: bool,
) -> tuple[_GridLayout, IntArray, IntArray, FloatArray]:
    step = int(config.entry_every_bars)
    candidates = np.arange(0, max(n - 1, 0), step, dtype=np.int64)
    candidates = candidates[candidates >= first_valid]
    entries = candidates[_valid_at(candidates, mm, im)]
    e_n = entries.shape[0]
    s_n, j_n = len(side_signs), notionals.shape[0]
    requested = np.asarray([float(v) for v in config.leverages])
    k_n = requested.shape[0]
    leverage = tuple(_effective_leverage(requested, im_m[entries]) for im_m in im)
    per_entry = s_n * j_n * k_n
    layout = _GridLayout(
        sides=side_signs, notionals=notionals, entry_bars=entries, leverage=leverage,
        series_of_notional=series_of,
    )
    if e_n == 0:
        return layout, entries, np.zeros(0, dtype=np.int64), np.zeros(0)
    entry_positions = np.full(e_n, per_entry, dtype=np.int64)
    entry_notional = np.full(e_n, s_n * k_n * float(notionals.sum()) * scale)
    k_idx = np.arange(e_n, dtype=np.int64)
    order = np.argsort(-requested, kind="stable").astype(np.int64)
    for s, sign in enumerate(side_signs):
        base = (k_idx * s_n + s) * j_n * k_n
        if dependent:
            for j in range(j_n):
                m = int(series_of[j])
                groups[sign].append(_Group(
                    series=m, entries=entries, leverage=leverage[m],
                    notional=np.full((e_n, 1), notionals[j]),
                    pos_base=np.ascontiguousarray(base + j * k_n), col_stride=1,
                    notional_stride=0, order=order,
                ))
        else:
            groups[sign].append(_Group(
                series=0, entries=entries, leverage=leverage[0],
                notional=np.ascontiguousarray(np.broadcast_to(notionals, (e_n, j_n))),
                pos_base=np.ascontiguousarray(base), col_stride=1, notional_stride=k_n,
                order=order,
            ))
    return layout, entries, entry_positions, entry_notional


def _explicit_groups(
    bars: BarSeries, positions: tuple[ExplicitPosition, ...], notionals: FloatArray,
    series_of: IntArray, mm: list[FloatArray], im: list[FloatArray], first_valid: int,
    close: FloatArray, funding_cum: FloatArray, groups: dict[int, list[_Group]], scale: float,
) -> tuple[_ExplicitLayout, IntArray, IntArray, FloatArray]:
    n = len(bars)
    p_n = len(positions)
    entry = np.empty(p_n, dtype=np.int64)
    for i, p in enumerate(positions):
        if p.entry_bar is not None:
            if p.entry_bar >= n:
                raise InvalidParameters(
                    f"positions[{i}].entry_bar {p.entry_bar} is past the last bar ({n - 1})",
                    field="positions",
                )
            entry[i] = int(p.entry_bar)
        else:
            assert p.entry_ms is not None
            e = int(np.searchsorted(bars.timestamp_ms, int(p.entry_ms), "right")) - 1
            if e < 0:
                raise InvalidParameters(
                    f"positions[{i}].entry_ms {p.entry_ms} is before the first bar",
                    field="positions",
                )
            entry[i] = e
    side = np.asarray([1 if p.side == "long" else -1 for p in positions], dtype=np.int8)
    requested = np.asarray([float(p.leverage) for p in positions])
    leverage = np.full(p_n, np.nan)
    opened = (entry >= first_valid) & (entry + 1 < n)
    for row in np.flatnonzero(opened):
        m = int(series_of[row])
        e = int(entry[row])
        im_e = float(im[m][e])
        if not (math.isfinite(mm[m][e]) and math.isfinite(im_e)):
            opened[row] = False
            continue
        leverage[row] = min(requested[row], 1.0 / im_e) if im_e > 0 else requested[row]
    layout = _ExplicitLayout(side=side, entry_bar=entry, notional=notionals, leverage=leverage,
                             opened=opened)
    idx = np.flatnonzero(opened)
    for sign in (1, -1):
        for m in range(len(mm)):
            sel = idx[(side[idx] == sign) & (series_of[idx] == m)]
            if sel.size == 0:
                continue
            sel = sel[np.argsort(entry[sel], kind="stable")]
            ent = np.ascontiguousarray(entry[sel])
            lev = np.ascontiguousarray(leverage[sel][:, None])
            groups[sign].append(_Group(
                series=m, entries=ent, leverage=lev,
                notional=np.ascontiguousarray(notionals[sel][:, None]),
                pos_base=np.ascontiguousarray(sel.astype(np.int64)), col_stride=0,
                notional_stride=0, order=np.zeros(1, dtype=np.int64),
            ))
    entry_bars, inverse = np.unique(entry[idx], return_inverse=True)
    entry_positions = np.bincount(inverse, minlength=entry_bars.shape[0]).astype(np.int64)
    entry_notional = np.asarray(
        np.bincount(inverse, weights=notionals[idx] * scale, minlength=entry_bars.shape[0]),
        dtype=np.float64,
    )
    return layout, entry_bars.astype(np.int64), entry_positions, entry_notional


def _run_cascade(
    side_groups: list[_Group], price: FloatArray, close: FloatArray, mm: list[FloatArray],
    funding_cum: FloatArray, depth: FloatArray, is_long: bool, kappa: float, holding: int,
    scale: float,
) -> FloatArray:
    """Run the cascade kernel over every group of one side; updates each group's triggers."""
    sizes = [g.entries.shape[0] for g in side_groups]
    series_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    entries = np.concatenate([g.entries for g in side_groups]).astype(np.int64)
    leverage = np.ascontiguousarray(np.concatenate([g.leverage for g in side_groups]))
    weight = np.concatenate([g.notional.sum(axis=1) * scale for g in side_groups])
    trig = np.ascontiguousarray(np.concatenate([g.trig for g in side_groups if g.trig is not None]))
    mm_stack = np.ascontiguousarray(np.stack([mm[g.series] for g in side_groups]))
    adj: FloatArray = _lk.cascade(
        price, mm_stack, funding_cum, depth, is_long, kappa, holding, series_start, close,
        entries, leverage, weight, trig,
    )
    for i, g in enumerate(side_groups):
        g.trig = np.ascontiguousarray(trig[series_start[i]:series_start[i + 1]])
    return adj
