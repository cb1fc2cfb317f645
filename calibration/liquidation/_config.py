"""The liquidation simulation's settings: the position population and the close-out mechanics,
validated (``InvalidParameters`` naming the setting at fault). Their semantics are the rules in
``calibration.liquidation``'s docstring.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from calibration._errors import InvalidParameters
from calibration.models import Rule

SIDES = ("long", "short")
#: Values of ``LiquidationConfig.closeout_basis``; the first is the default.
CLOSEOUT_BASES = ("adverse_extreme", "liquidation_price")


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
    """The position population and the close-out mechanics (``calibration.liquidation``
    for semantics).

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
