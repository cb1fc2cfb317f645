"""What a simulation returns: per-trigger aggregates (all the metrics need), the replay that
recomputes per-position details on demand, and the public result types."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

from calibration.liquidation import _kernels as _lk
from calibration.liquidation._config import LiquidationConfig
from calibration.liquidation._fund import InsuranceFund, _iso
from calibration.liquidation._population import _ExplicitLayout, _GridLayout, _Group
from calibration.report import FundPoint, LiquidationMetrics

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]
Int8Array = NDArray[np.int8]


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


def _no_details() -> _lk.PositionSlots:
    """Empty per-position outputs, for the close-out pass that only aggregates."""
    i64 = np.zeros(0, dtype=np.int64)
    return _lk.PositionSlots(
        position=i64, trigger_bar=i64, notional_usd=np.zeros(0), liquidation_price=np.zeros(0),
        closeout_price=np.zeros(0), closeout_equity_usd=np.zeros(0),
        premature=np.zeros(0, dtype=bool),
    )


def closeout_settings(config: LiquidationConfig) -> _lk.CloseoutSettings:
    """The close-out kernel's scalars from ``config`` (plain Python numbers: one numba
    specialisation whatever types the config holds)."""
    return _lk.CloseoutSettings(
        latency_bars=int(config.latency_bars),
        at_liquidation_price=config.closeout_basis == "liquidation_price",
        recovery_bars=int(config.recovery_bars),
        spread_rate=float(config.spread_rate),
        impact_coef=float(config.impact_coef),
        impact_exponent=float(config.impact_exponent),
        fee_rate=float(config.liquidation_fee_rate),
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

    def slots(self) -> _lk.TriggerSlots:
        """The kernel's view of these arrays (shared, written in place)."""
        return _lk.TriggerSlots(
            trigger_bar=self.trigger_bar, premature=self.premature, positions=self.count,
            notional_usd=self.notional, bad_debt_usd=self.bad_debt, fee_usd=self.fee,
            bad_count=self.bad_count, worst_usd=self.worst,
        )


@dataclass(eq=False)
class _SideData:
    """What the close-out kernel needs for one side: its bars (extremes after the cascade),
    the block index of the extremes, their ``window_min`` over the premature test's window
    (per block of 8 bars; empty after a cascade: searched), and its query groups."""

    sign: int
    bars: _lk.SideBars
    extreme_index: _lk.BlockIndex
    recovery_min: FloatArray
    groups: list[_Group]


@dataclass(frozen=True, eq=False)
class _Replay:
    """Inputs to re-run the close-out kernel with per-position details (``events``)."""

    mm_series: list[FloatArray]
    sides: list[_SideData]
    config: LiquidationConfig
    bar_count: int

    def events(self, total: int) -> LiquidationEvents:
        out = _lk.PositionSlots(
            position=np.empty(total, dtype=np.int64), trigger_bar=np.empty(total, dtype=np.int64),
            notional_usd=np.empty(total), liquidation_price=np.empty(total),
            closeout_price=np.empty(total), closeout_equity_usd=np.empty(total),
            premature=np.empty(total, dtype=bool),
        )
        side = np.empty(total, dtype=np.int8)
        slot = 0
        no_fund = _lk.FundLedger(np.zeros(0), np.zeros(0, dtype=bool), 1.0)
        settings = closeout_settings(self.config)
        for sd in self.sides:
            for g in sd.groups:
                agg = _Aggregates.empty(int(np.count_nonzero(g.query_rows().trig >= 0)))
                start = slot
                _, slot = _lk.outcomes(
                    sd.bars, self.mm_series[g.series], sd.extreme_index, sd.recovery_min,
                    g.query_rows(), g.position_rows(), settings, no_fund, agg.slots(), 0, out,
                    slot, True,
                )
                side[start:slot] = sd.sign
        position, trigger, notional = out.position, out.trigger_bar, out.notional_usd
        liq, closeout = out.liquidation_price, out.closeout_price
        equity, premature = out.closeout_equity_usd, out.premature
        return LiquidationEvents(
            position=position, side=side, trigger_bar=trigger, notional_usd=notional,
            liquidation_price=liq, closeout_price=closeout, closeout_equity_usd=equity,
            premature=premature, latency_bars=int(self.config.latency_bars),
            fee_rate=float(self.config.liquidation_fee_rate), bar_count=self.bar_count,
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
