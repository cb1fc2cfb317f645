"""Liquidation and insolvency simulation (domain.md §4): engine vs brute force, hand cases."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration._bars import BarSeries
from calibration._errors import DataError, InvalidParameters
from calibration.backtest import run_backtest
from calibration.liquidation import (
    ExplicitPosition,
    LiquidationConfig,
    LiquidationResult,
    shared_insurance_fund,
    simulate_liquidations,
)
from calibration.models import EwmaMargin, MarginModel, Rule, TieredMargin
from calibration.models._base import FloatArray
from tests import reference_liquidation as reference

START_MS = 1_600_000_000_000
MINUTE_MS = 60_000


class ConstantMargin(MarginModel):
    """MM rate ``mm`` at every bar, IM rate ``2 * mm``: numbers easy to check by hand."""

    family = "constant"
    rules: ClassVar[dict[str, Rule]] = {"mm": Rule(low=0.0, high=1.0)}

    def __init__(self, *, mm: float = 0.01) -> None:
        self.mm = mm

    def _mm_rate(self, bars: BarSeries, notional_usd: float) -> FloatArray:
        return np.full(len(bars), float(self.mm))


def make_bars(
    close: list[float] | np.ndarray,
    *,
    low: list[float] | np.ndarray | None = None,
    high: list[float] | np.ndarray | None = None,
    seed: int = 0,
    funding: bool = False,
    depth: bool = False,
    volume: bool = True,
) -> BarSeries:
    """Bars around ``close`` (open = previous close); random wicks unless lows/highs given."""
    rng = np.random.default_rng(seed)
    close = np.asarray(close, dtype=np.float64)
    n = close.shape[0]
    open_ = np.r_[close[0], close[:-1]]
    if low is None:
        low = np.minimum(open_, close) * (1 - rng.exponential(0.004, n))
    if high is None:
        high = np.maximum(open_, close) * (1 + rng.exponential(0.004, n))
    funding_rate = None
    if funding:
        funding_rate = np.where(np.arange(n) % 8 == 0, rng.normal(0.0, 0.002, n), 0.0)
    bid = ask = None
    if depth:
        bid = rng.uniform(2e5, 2e6, n)
        ask = rng.uniform(2e5, 2e6, n)
    return BarSeries(
        instrument="TEST",
        timestamp_ms=START_MS + np.arange(n, dtype=np.int64) * MINUTE_MS,
        open=open_,
        high=np.asarray(high, dtype=np.float64),
        low=np.asarray(low, dtype=np.float64),
        close=close,
        bar_seconds=60,
        fingerprint="synthetic",
        volume=rng.uniform(50.0, 500.0, n) if volume else None,
        funding_rate=funding_rate,
        bid_depth_usd=bid,
        ask_depth_usd=ask,
    )


def crash_path(n: int = 300, *, seed: int = 0, vol: float = 0.01) -> np.ndarray:
    """Random walk with a -20% bar at n/2 and a +15% bar at 3n/4."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, vol, n)
    r[0] = 0.0
    r[n // 2] = math.log(0.8)
    r[3 * n // 4] = math.log(1.15)
    result: np.ndarray = 100.0 * np.exp(np.cumsum(r))
    return result


def windows(bars: BarSeries) -> list[tuple[int | None, int | None]]:
    ts = bars.timestamp_ms
    n = len(bars)
    return [
        (None, None),
        (int(ts[0]), int(ts[n // 10])),
        (int(ts[n // 3]), int(ts[2 * n // 3])),
        (int(ts[n // 2]), None),
        (None, int(ts[n // 2 + 1])),
        (int(ts[-1]) + MINUTE_MS, None),
    ]


def assert_matches_reference(
    bars: BarSeries, model: MarginModel, config: LiquidationConfig
) -> LiquidationResult:
    """Per-position outcomes, every metric of several windows and the fund path agree."""
    result = simulate_liquidations(bars, model, config)
    ref = reference.simulate(bars, model, config)
    table = result.position_table()
    assert len(table) == len(ref.positions)
    for i, p in enumerate(ref.positions):
        where = f"position {i} ({p})"
        assert bool(table.opened[i]) == p.opened, where
        assert table.entry_bar[i] == p.entry, where
        assert table.side[i] == (1 if p.side == "long" else -1), where
        assert table.notional_usd[i] == p.notional, where
        if not p.opened:
            assert table.trigger_bar[i] == -1, where
            continue
        tol = 1e-9 * p.notional
        assert table.leverage[i] == pytest.approx(p.leverage, rel=1e-12), where
        assert table.collateral_usd[i] == pytest.approx(p.collateral, rel=1e-12), where
        assert table.trigger_bar[i] == p.trigger, where
        if p.trigger < 0:
            continue
        assert table.liquidation_price[i] == pytest.approx(p.liq_price, rel=1e-9), where
        assert table.closeout_price[i] == pytest.approx(p.closeout_price, rel=1e-9), where
        assert table.closeout_equity_usd[i] == pytest.approx(p.equity, abs=tol), where
        assert table.bad_debt_usd[i] == pytest.approx(p.bad_debt, abs=tol), where
        assert table.fee_usd[i] == pytest.approx(p.fee, abs=tol), where
        assert bool(table.premature[i]) == p.premature, where
    total = sum(p.notional for p in ref.positions) * config.population_scale + 1.0
    assert [int(b) for b in result.fund_bars] == [b for b, _ in ref.fund]
    for level, (_, expected) in zip(result.fund_usd, ref.fund, strict=True):
        assert level == pytest.approx(expected, abs=1e-9 * total)
    for start, end in windows(bars):
        got = msgspec.structs.asdict(result.metrics("w", start, end))
        want = reference.metrics(ref, start, end)
        assert got.pop("window") == "w"
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9 * total), key
            else:
                assert got[key] == value, (key, start, end)
    return result


GRID = {
    "leverages": (2, 5, 10, 20, 50, 100),
    "notionals_usd": (1_000, 100_000, 2_000_000),
    "entry_every_bars": 7,
    "holding_bars": 60,
    "recovery_bars": 10,
    "insurance_fund_usd": 20_000.0,
    # a thin book, so that even the optimistic fill at the liquidation price leaves bad debt
    "impact_coef": 0.1,
}


@pytest.mark.parametrize(
    ("latency", "basis"),
    [(0, "adverse_extreme"), (0, "liquidation_price"), (1, "adverse_extreme"),
     (3, "adverse_extreme")],
)
def test_ewma_grid_with_crash_funding_and_depth_matches_reference(
    latency: int, basis: str
) -> None:
    """EWMA margins, funding, order-book depth, a crash and a spike: engine = brute force."""
    bars = make_bars(crash_path(300), funding=True, depth=True, seed=latency)
    model = EwmaMargin(warmup_bars=20, horizon_bars=5, decay=0.9, floor_rate=0.002)
    config = LiquidationConfig(latency_bars=latency, closeout_basis=basis, **GRID)  # type: ignore[arg-type]
    result = assert_matches_reference(bars, model, config)
    m = result.metrics("all", None, None)
    assert m.liquidations > 0
    assert m.bad_debt_usd > 0
    assert m.premature_liquidations > 0


@pytest.mark.parametrize(("latency", "recovery"), [(127, 127), (128, 128), (140, 300)])
def test_long_closeout_windows_match_reference(latency: int, recovery: int) -> None:
    """Close-out and recovery windows of 128 bars and more go through the block index
    (shorter ones are scanned bar by bar): both agree with the brute-force loop."""
    bars = make_bars(crash_path(700, seed=11), funding=True, depth=True, seed=11)
    model = EwmaMargin(warmup_bars=20, horizon_bars=5, decay=0.9, floor_rate=0.002)
    config = LiquidationConfig(**{**GRID, "holding_bars": 300, "latency_bars": latency,  # type: ignore[arg-type]
                                  "recovery_bars": recovery})
    result = assert_matches_reference(bars, model, config)
    m = result.metrics("all", None, None)
    assert m.liquidations > 0
    assert m.premature_liquidations > 0


def test_tiered_notional_dependent_grid_matches_reference() -> None:
    """Notional brackets give each size its own MM/IM series (and leverage cap)."""
    bars = make_bars(crash_path(250, seed=3), seed=3)
    model = TieredMargin(bracket_caps_usd=(50_000, 500_000), mmr_schedule=(0.005, 0.01, 0.05))
    config = LiquidationConfig(sides=("short", "long"), population_scale=3.0, **GRID)  # type: ignore[arg-type]
    result = assert_matches_reference(bars, model, config)
    table = result.position_table()
    big = table.notional_usd == 2_000_000
    assert np.all(table.leverage[big] <= 10.0 + 1e-12)  # IM 10% caps the largest size
    assert np.any(table.leverage[~big] > 10.0)


def test_volume_based_depth_and_no_funding_match_reference() -> None:
    """Without depth, slippage uses a share of the trailing ADV."""
    bars = make_bars(crash_path(200, seed=5, vol=0.02), seed=5, depth=False)
    model = EwmaMargin(warmup_bars=15, horizon_bars=3)
    config = LiquidationConfig(adv_window_bars=30, depth_fraction_of_adv=0.05, **GRID)  # type: ignore[arg-type]
    assert_matches_reference(bars, model, config)


def test_no_liquidity_data_needs_no_impact() -> None:
    """Bars without volume or depth still simulate with impact_coef=0 (spread only)."""
    bars = make_bars(crash_path(150, seed=8), seed=8, volume=False)
    config = LiquidationConfig(**{**GRID, "impact_coef": 0.0})  # type: ignore[arg-type]
    assert_matches_reference(bars, EwmaMargin(warmup_bars=10), config)


def test_explicit_positions_match_reference() -> None:
    """Caller-given positions, by bar or by time; those without margin at entry do not open."""
    bars = make_bars(crash_path(200, seed=11), funding=True, seed=11)
    ts = bars.timestamp_ms
    positions = (
        ExplicitPosition("long", 5, 10_000.0, 10.0),  # EWMA warm-up: not opened
        ExplicitPosition("long", 60, 50_000.0, 25.0),
        ExplicitPosition("short", None, 20_000.0, 40.0, entry_ms=int(ts[90]) + 30_000),
        ExplicitPosition("long", 95, 3_000_000.0, 100.0),
        ExplicitPosition("short", 140, 10_000.0, 5.0),
        ExplicitPosition("long", 199, 10_000.0, 5.0),  # last bar: not opened
        ExplicitPosition("long", 60, 50_000.0, 25.0),  # duplicate of the second
    )
    model = TieredMargin(bracket_caps_usd=(50_000, 500_000), mmr_schedule=(0.005, 0.01, 0.05))
    for m, warm in ((model, True), (EwmaMargin(warmup_bars=10, horizon_bars=5), False)):
        config = LiquidationConfig(positions=positions, holding_bars=150, latency_bars=2)
        result = assert_matches_reference(bars, m, config)
        table = result.position_table()
        assert table.opened.tolist() == [warm, True, True, True, True, False, True]
        assert table.entry_bar[2] == 90
        assert result.positions_opened == 5 + warm


def test_cascade_matches_reference() -> None:
    """The cascade's fixed point equals a bar-by-bar replay with moved extremes."""
    bars = make_bars(crash_path(240, seed=2), depth=True, seed=2)
    config = LiquidationConfig(
        cascade=True, cascade_kappa=0.02, population_scale=200.0, **GRID  # type: ignore[arg-type]
    )
    assert_matches_reference(bars, EwmaMargin(warmup_bars=20, horizon_bars=5), config)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    latency=st.integers(0, 3),
    optimistic=st.booleans(),
    recovery=st.integers(1, 8),
    holding=st.integers(1, 40),
    every=st.integers(1, 6),
    cascade=st.booleans(),
    funding=st.booleans(),
    depth=st.booleans(),
    tiered=st.booleans(),
    sides=st.sampled_from([("long",), ("short",), ("long", "short"), ("short", "long")]),
)
def test_random_paths_match_reference(
    seed: int, latency: int, optimistic: bool, recovery: int, holding: int, every: int,
    cascade: bool, funding: bool, depth: bool, tiered: bool, sides: tuple[str, ...],
) -> None:
    """On random paths and settings the engine equals the brute-force loop."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 90))
    r = rng.standard_t(3, n) * rng.uniform(0.002, 0.015)
    r[0] = 0.0
    bars = make_bars(100.0 * np.exp(np.cumsum(r)), seed=seed, funding=funding, depth=depth)
    model: MarginModel
    if tiered:
        model = TieredMargin(bracket_caps_usd=(30_000, 400_000), mmr_schedule=(0.004, 0.02, 0.06))
    else:
        model = EwmaMargin(warmup_bars=8, horizon_bars=int(rng.integers(1, 6)), decay=0.9)
    config = LiquidationConfig(
        leverages=(3, 12, 30, 80),
        notionals_usd=(1_000, 200_000, 3_000_000),
        sides=sides,
        entry_every_bars=every,
        holding_bars=holding,
        latency_bars=latency,
        closeout_basis="liquidation_price" if optimistic and latency == 0 else "adverse_extreme",
        recovery_bars=recovery,
        impact_exponent=float(rng.uniform(0.3, 1.0)),
        insurance_fund_usd=float(rng.uniform(0.0, 5e4)),
        cascade=cascade,
        cascade_kappa=float(rng.uniform(0.0, 0.05)),
        population_scale=float(rng.uniform(1.0, 20.0)),
    )
    assert_matches_reference(bars, model, config)


# ---------------------------------------------------------------- hand-computed cases


def flat_bars(rows: list[tuple[float, float, float, float]], instrument: str = "HAND",
              bar_minutes: int = 1) -> BarSeries:
    """Bars from explicit ``(open, high, low, close)`` rows, no volume, no depth."""
    o, h, lo, c = (np.asarray(col, dtype=np.float64) for col in zip(*rows, strict=True))
    n = len(rows)
    return BarSeries(
        instrument=instrument,
        timestamp_ms=START_MS + np.arange(n, dtype=np.int64) * MINUTE_MS * bar_minutes,
        open=o, high=h, low=lo, close=c, bar_seconds=60 * bar_minutes, fingerprint=instrument,
    )


HAND = {"spread_rate": 0.001, "impact_coef": 0.0, "liquidation_fee_rate": 0.005}


def test_long_10x_single_crash_bar_bad_debt_by_hand() -> None:
    """A 10x long at 100 with MM 1% and one -20% bar leaves 1008 USD of bad debt."""
    # notional 10,000 at close 100: qty 100, collateral 1,000. Bar 1 low 80: equity
    # 1000 + 100 * (80 - 100) = -1000 <= MM 0.01 * 100 * 80 = 80, so it triggers at bar 1.
    # Liquidation price (100 - 10) / (1 - 0.01) = 90.9090...; latency 1: worst low of bars
    # 1..2 = 80, minus 0.1% spread = 79.92. Close-out equity 1000 + 100 * (79.92 - 100) =
    # -1008: bad debt 1008, no fee; fund 5,000 -> 3,992; 1008 / 10,000 = 1008 bps.
    bars = flat_bars([(100, 100, 100, 100), (100, 100, 80, 80), (80, 80, 80, 80),
                      (80, 80, 80, 80)])
    config = LiquidationConfig(
        positions=(ExplicitPosition("long", 0, 10_000.0, 10.0),), insurance_fund_usd=5_000.0,
        latency_bars=1, **HAND,  # type: ignore[arg-type]
    )
    result = simulate_liquidations(bars, ConstantMargin(mm=0.01), config)
    ev = result.events
    assert len(ev) == 1
    assert ev.trigger_bar[0] == 1
    assert ev.closeout_bar[0] == 2
    assert ev.liquidation_price[0] == pytest.approx(90 / 0.99, rel=1e-12)
    assert ev.closeout_price[0] == pytest.approx(79.92, rel=1e-12)
    assert ev.bad_debt_usd[0] == pytest.approx(1008.0, rel=1e-9)
    assert ev.fee_usd[0] == 0.0
    assert not ev.premature[0]  # bankruptcy price 90 reached by the low of bar 2
    m = result.metrics("all", None, None)
    assert m.positions == 1
    assert m.liquidations == 1
    assert m.liquidated_notional_usd == 10_000.0
    assert m.bad_debt_usd == pytest.approx(1008.0)
    assert m.bad_debt_bps == pytest.approx(1008.0)
    assert m.bad_debt_positions == 1
    assert m.worst_position_bad_debt_usd == pytest.approx(1008.0)
    assert m.insurance_fund_min_usd == pytest.approx(3992.0)
    assert m.insurance_fund_exhausted_at is None
    assert m.premature_share == 0.0


@pytest.mark.parametrize(
    ("side", "crash_row", "basis", "price", "bad_debt", "fee"),
    [
        # Long 10x at 100 (qty 100, collateral 1,000), MM 1%: bar 1 falls to 80 and triggers
        # (equity 1000 + 100 * (80 - 100) = -1000 <= MM 0.01 * 100 * 80 = 80). Liquidation
        # price (100 - 10) / 0.99 = 90.9090...
        # Adverse extreme: the low 80, less 0.1% spread = 79.92; equity 1000 + 100 * (79.92
        # - 100) = -1008, all bad debt.
        ("long", (100, 100, 80, 80), "adverse_extreme", 79.92, 1008.0, 0.0),
        # Liquidation price: 90.9090... * 0.999 = 90.8181...; equity 1000 + 100 * (90.8181...
        # - 100) = 81.8181... >= 0: no bad debt, the fund gets min(0.5% * 10,000, 81.82) = 50.
        ("long", (100, 100, 80, 80), "liquidation_price", 90 / 0.99 * 0.999, 0.0, 50.0),
        # Short 10x at 100: bar 1 spikes to 125 and triggers (equity 1000 + 100 * (100 - 125)
        # = -1500 <= 0.01 * 100 * 125 = 125). Liquidation price (100 + 10) / 1.01 = 108.91...
        # Adverse extreme: the high 125, plus 0.1% = 125.125; equity 1000 + 100 * (100 -
        # 125.125) = -1512.5.
        ("short", (100, 125, 100, 125), "adverse_extreme", 125.125, 1512.5, 0.0),
        # Liquidation price: 110 / 1.01 * 1.001 = 109.0198...; equity 1000 + 100 * (100 -
        # 109.0198...) = 98.0198... >= 0: fee 50.
        ("short", (100, 125, 100, 125), "liquidation_price", 110 / 1.01 * 1.001, 0.0, 50.0),
    ],
)
def test_latency_zero_fills_at_the_trigger_bar_extreme_unless_optimistic(
    side: str, crash_row: tuple[float, float, float, float], basis: str, price: float,
    bad_debt: float, fee: float,
) -> None:
    """latency_bars = 0 fills at the trigger bar's adverse extreme by default (domain.md §4,
    the conservative reading); ``closeout_basis="liquidation_price"`` is the optimistic engine
    that fills at the liquidation price although the bar gapped through it."""
    after = (crash_row[3],) * 4
    bars = flat_bars([(100, 100, 100, 100), crash_row, after, after])  # type: ignore[list-item]
    # the adverse extreme is the default: that case leaves closeout_basis unset
    chosen = {} if basis == "adverse_extreme" else {"closeout_basis": basis}
    config = LiquidationConfig(
        positions=(ExplicitPosition(side, 0, 10_000.0, 10.0),), latency_bars=0,
        insurance_fund_usd=5_000.0, **chosen, **HAND,  # type: ignore[arg-type]
    )
    assert config.closeout_basis == basis
    model = ConstantMargin(mm=0.01)
    result = simulate_liquidations(bars, model, config)
    ev = result.events
    assert ev.trigger_bar.tolist() == [1]
    assert ev.closeout_bar.tolist() == [1]  # no latency: settles at the trigger bar
    liq = 90 / 0.99 if side == "long" else 110 / 1.01
    assert ev.liquidation_price[0] == pytest.approx(liq, rel=1e-12)
    assert ev.closeout_price[0] == pytest.approx(price, rel=1e-12)
    assert ev.bad_debt_usd[0] == pytest.approx(bad_debt, abs=1e-9)
    assert ev.fee_usd[0] == pytest.approx(fee, abs=1e-9)
    m = result.metrics("all", None, None)
    assert m.bad_debt_usd == pytest.approx(bad_debt, abs=1e-9)
    assert m.bad_debt_positions == int(bad_debt > 0)
    assert m.fees_to_fund_usd == pytest.approx(fee, abs=1e-9)
    assert result.fund_bars.tolist() == [1]
    assert result.fund_usd.tolist() == pytest.approx([5_000.0 - bad_debt + fee])
    ref = reference.simulate(bars, model, config).positions[0]
    assert ref.closeout_price == pytest.approx(price, rel=1e-12)
    assert ref.bad_debt == pytest.approx(bad_debt, abs=1e-9)


@pytest.mark.parametrize(
    ("latency", "price", "bad_debt"),
    [
        # Long 10x at 100, MM 1%; bar 1's low 80 triggers it, bar 2 recovers (low 85), bar 3
        # falls to 75. The window is bars 1 .. 1 + latency, the trigger bar included:
        (0, 79.92, 1008.0),  # bar 1: 80 * 0.999; 1000 + 100 * (79.92 - 100) = -1008
        (1, 79.92, 1008.0),  # bars 1..2: min(80, 85) = 80, not bar 2's 85 alone
        (2, 74.925, 1507.5),  # bars 1..3: 75 * 0.999; 1000 + 100 * (74.925 - 100) = -1507.5
    ],
)
def test_closeout_window_includes_the_trigger_bar(
    latency: int, price: float, bad_debt: float
) -> None:
    """The close-out's worst price is taken over bars t .. t + latency: the same window for
    latency 0 (the trigger bar alone) and latency >= 1 (a later recovery does not help)."""
    bars = flat_bars([(100, 100, 100, 100), (100, 100, 80, 90), (90, 92, 85, 90),
                      (90, 90, 75, 78), (78, 78, 78, 78)])
    config = LiquidationConfig(
        positions=(ExplicitPosition("long", 0, 10_000.0, 10.0),), latency_bars=latency,
        **HAND,  # type: ignore[arg-type]
    )
    model = ConstantMargin(mm=0.01)
    ev = simulate_liquidations(bars, model, config).events
    assert ev.trigger_bar.tolist() == [1]
    assert ev.closeout_bar.tolist() == [1 + latency]
    assert ev.closeout_price[0] == pytest.approx(price, rel=1e-12)
    assert ev.bad_debt_usd[0] == pytest.approx(bad_debt, rel=1e-9)
    ref = reference.simulate(bars, model, config).positions[0]
    assert (ref.closeout_bar, ref.closeout_price) == (1 + latency, pytest.approx(price))
    assert ref.bad_debt == pytest.approx(bad_debt, rel=1e-9)


def test_closeout_basis_from_mapping_and_refusals() -> None:
    """The optimistic engine is chosen by name through ``from_mapping`` (the CLI's
    ``--liquidation``, a spec's and a request's ``liquidation``); an unknown basis, or the
    liquidation-price fill with a latency, is refused naming ``closeout_basis``."""
    chosen = LiquidationConfig.from_mapping(
        {"closeout_basis": "liquidation_price", "latency_bars": 0})
    assert chosen.closeout_basis == "liquidation_price"
    assert chosen.to_dict()["closeout_basis"] == "liquidation_price"
    assert LiquidationConfig.from_mapping({}).to_dict()["closeout_basis"] == "adverse_extreme"
    with pytest.raises(InvalidParameters, match="latency_bars = 0 \\(got 1\\)") as err:
        LiquidationConfig.from_mapping({"closeout_basis": "liquidation_price"})
    assert err.value.field == "closeout_basis"
    with pytest.raises(InvalidParameters, match="'adverse_extreme', 'liquidation_price'") as err:
        LiquidationConfig.from_mapping({"closeout_basis": "mid", "latency_bars": 0})
    assert err.value.field == "closeout_basis"


@pytest.mark.parametrize(("dip", "premature"), [(95.0, True), (89.9, False)])
def test_premature_liquidation_by_hand(dip: float, premature: bool) -> None:
    """A wick through the liquidation price that recovers is premature unless it went bust."""
    # Long 10x at 100 (bankruptcy 90, liquidation 90.909 at MM 1%). Bar 1 wicks to 90.5 and
    # closes at 95: triggered. Recovery window bars 2..4: lows >= 95 and the close of bar 4
    # (100) is above 90.909 -> premature. If bar 3's low touches 89.9 the bankruptcy price
    # was reached -> not premature.
    bars = flat_bars([(100, 100, 100, 100), (100, 100, 90.5, 95), (95, 98, 95, 98),
                      (98, 100, dip, 100), (100, 100, 100, 100), (100, 100, 100, 100)])
    config = LiquidationConfig(
        positions=(ExplicitPosition("long", 0, 10_000.0, 10.0),), latency_bars=0,
        recovery_bars=3, **HAND,  # type: ignore[arg-type]
    )
    result = simulate_liquidations(bars, ConstantMargin(mm=0.01), config)
    assert result.events.trigger_bar.tolist() == [1]
    assert bool(result.events.premature[0]) is premature
    m = result.metrics("all", None, None)
    assert m.premature_liquidations == int(premature)
    assert m.premature_share == float(premature)


@pytest.mark.parametrize(
    ("side", "trigger_row", "premature"),
    [
        # long 10x at 100: bankruptcy 90, liquidation 90 / 0.99 = 90.909
        ("long", (100, 100, 90.5, 95), True),  # wick stops above bankruptcy
        ("long", (100, 100, 90.0, 95), False),  # touches bankruptcy on the trigger bar
        ("long", (100, 100, 89.5, 95), False),  # runs through it on the trigger bar
        # short 10x at 100: bankruptcy 110, liquidation 110 / 1.01 = 108.911
        ("short", (100, 109.5, 100, 105), True),
        ("short", (100, 110.0, 100, 105), False),
        ("short", (100, 110.5, 100, 105), False),
    ],
)
def test_trigger_bar_through_bankruptcy_is_not_premature(
    side: str, trigger_row: tuple[float, float, float, float], premature: bool
) -> None:
    """The premature window starts at the trigger bar: a bar that ran through bankruptcy made
    the liquidation necessary even if it closed back (domain.md §4: bars t..t+R)."""
    # Bar 1 triggers (its extreme passes the liquidation price) and closes at 95 / 105; bars
    # 2..4 (R = 3) stay within 95..105 and bar 4 closes at 100, back on the safe side of the
    # liquidation price. So only the trigger bar can reach bankruptcy: by the old rule
    # (bars t+1..t+R) all six cases were premature; by the rule of bars t..t+R only those whose
    # trigger-bar extreme stops short of bankruptcy are.
    bars = flat_bars([(100, 100, 100, 100), trigger_row, (95, 105, 95, 98),
                      (98, 102, 97, 100), (100, 101, 99, 100), (100, 100, 100, 100)])
    config = LiquidationConfig(
        positions=(ExplicitPosition(side, 0, 10_000.0, 10.0),), latency_bars=0,
        recovery_bars=3, **HAND,  # type: ignore[arg-type]
    )
    model = ConstantMargin(mm=0.01)
    result = simulate_liquidations(bars, model, config)
    assert result.events.trigger_bar.tolist() == [1]
    liq = 90 / 0.99 if side == "long" else 110 / 1.01
    assert result.events.liquidation_price[0] == pytest.approx(liq, rel=1e-12)
    assert bool(result.events.premature[0]) is premature
    assert result.metrics("all", None, None).premature_liquidations == int(premature)
    ref = reference.simulate(bars, model, config)
    assert [p.trigger for p in ref.positions] == [1]
    assert ref.positions[0].premature is premature


def test_insurance_fund_exhaustion_by_hand() -> None:
    """Two 1008 USD bad debts exhaust a 1500 USD fund at the second close-out bar."""
    # Long 10x at bar 0 (close 100) -> bad debt 1008 settled at bar 2 (fund 492). Long 10x
    # at bar 3 (close 80, qty 125, collateral 1000); bar 4 falls to 64: close-out at
    # 64 * 0.999 = 63.936, equity 1000 + 125 * (63.936 - 80) = -1008 settled at bar 5:
    # fund -516, exhausted at bar 5's time.
    bars = flat_bars([(100, 100, 100, 100), (100, 100, 80, 80), (80, 80, 80, 80),
                      (80, 80, 80, 80), (80, 80, 64, 64), (64, 64, 64, 64), (64, 64, 64, 64),
                      (64, 64, 64, 64)])
    config = LiquidationConfig(
        positions=(ExplicitPosition("long", 0, 10_000.0, 10.0),
                   ExplicitPosition("long", 3, 10_000.0, 10.0)),
        insurance_fund_usd=1_500.0, latency_bars=1, **HAND,  # type: ignore[arg-type]
    )
    result = simulate_liquidations(bars, ConstantMargin(mm=0.01), config)
    ts = bars.timestamp_ms
    assert result.fund_bars.tolist() == [2, 5]
    assert result.fund_usd.tolist() == pytest.approx([492.0, -516.0])
    assert result.insurance_fund_min_usd == pytest.approx(-516.0)
    bar5 = "2020-09-13T12:31:40Z"
    assert int(ts[5]) == 1_600_000_300_000
    assert result.insurance_fund_exhausted_at == bar5
    whole = result.metrics("all", None, None)
    assert whole.insurance_fund_exhausted_at == bar5
    assert whole.bad_debt_usd == pytest.approx(2016.0)
    # before the second crash: never below zero
    early = result.metrics("early", None, int(ts[4]))
    assert early.insurance_fund_exhausted_at is None
    assert early.insurance_fund_min_usd == pytest.approx(492.0)
    # a window entered already exhausted reports when the fund went below zero
    late = result.metrics("late", int(ts[6]), None)
    assert late.insurance_fund_exhausted_at == bar5
    assert late.insurance_fund_min_usd == pytest.approx(-516.0)
    assert late.liquidations == 0
    assert late.positions == 0
    assert late.bad_debt_bps is None
    assert late.premature_share is None
    path = result.fund_path()
    assert [(p.time, p.fund_usd) for p in path] == [
        ("2020-09-13T12:26:40Z", 1500.0),
        ("2020-09-13T12:28:40Z", pytest.approx(492.0)),
        (bar5, pytest.approx(-516.0)),
    ]


# ---------------------------------------------------------------- cascade, path, errors


def test_cascade_only_adds_or_advances_liquidations() -> None:
    """Liquidation impact triggers more (and no later) liquidations than without cascade."""
    bars = make_bars(crash_path(400, seed=21, vol=0.004), depth=True, seed=21)
    model = EwmaMargin(warmup_bars=20, horizon_bars=5)
    base = LiquidationConfig(
        leverages=(3, 5, 8, 10, 15, 20, 30, 50), notionals_usd=(10_000, 100_000),
        entry_every_bars=5, holding_bars=200, population_scale=500.0,
    )
    plain = simulate_liquidations(bars, model, base).position_table().trigger_bar
    hit = plain >= 0
    counts = []
    for kappa in (0.001, 0.01, 0.05):
        config = dataclasses.replace(base, cascade=True, cascade_kappa=kappa)
        trig = simulate_liquidations(bars, model, config).position_table().trigger_bar
        # every position liquidated without cascade is liquidated with it, never later
        assert np.all(trig[hit] >= 0)
        assert np.all(trig[hit] <= plain[hit])
        counts.append(int(np.count_nonzero(trig >= 0)))
    assert min(counts) >= int(np.count_nonzero(hit))
    assert max(counts) > int(np.count_nonzero(hit))


def test_fund_path_keeps_its_ends_and_minimum() -> None:
    """A long fund path is thinned to max_points without losing its start, end or low."""
    bars = make_bars(crash_path(600, seed=4, vol=0.02), seed=4)
    config = LiquidationConfig(entry_every_bars=2, holding_bars=100, insurance_fund_usd=1e6)
    result = simulate_liquidations(bars, EwmaMargin(warmup_bars=20, horizon_bars=1), config)
    full = result.fund_path(max_points=10**9)
    assert len(full) == result.fund_bars.shape[0] + 1 > 50
    thin = result.fund_path(max_points=20)
    assert len(thin) <= 20
    assert thin[0] == full[0]
    assert thin[-1] == full[-1]
    assert min(p.fund_usd for p in thin) == result.insurance_fund_min_usd
    assert [p.time for p in thin] == sorted(p.time for p in thin)
    with pytest.raises(InvalidParameters):
        result.fund_path(max_points=1)


def test_metrics_are_json_ready() -> None:
    """Every window's metrics encode to JSON with all LiquidationMetrics fields."""
    bars = make_bars(crash_path(200), seed=1)
    result = simulate_liquidations(bars, EwmaMargin(warmup_bars=20), LiquidationConfig())
    data = msgspec.json.decode(msgspec.json.encode(result.metrics("all", None, None)))
    assert data["window"] == "all"
    assert data["positions"] == result.positions_opened > 0


def test_impact_without_liquidity_data_is_a_data_error() -> None:
    """Market impact needs depth or volume; bars with neither are rejected."""
    bars = make_bars(crash_path(100), volume=False)
    with pytest.raises(DataError, match="depth or volume"):
        simulate_liquidations(bars, EwmaMargin(warmup_bars=10), LiquidationConfig())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("leverages", ()),
        ("leverages", (10, 0)),
        ("leverages", (10, math.inf)),
        ("notionals_usd", (-1.0,)),
        ("notionals_usd", "1000"),
        ("sides", ("long", "up")),
        ("sides", ("long", "long")),
        ("sides", ()),
        ("entry_every_bars", 0),
        ("entry_every_bars", 1.5),
        ("holding_bars", 0),
        ("latency_bars", -1),
        ("closeout_basis", "bankruptcy_price"),
        ("closeout_basis", "liquidation_price"),  # with the default latency of 1 bar
        ("recovery_bars", 0),
        ("spread_rate", 1.0),
        ("impact_coef", -0.1),
        ("impact_exponent", 0.0),
        ("liquidation_fee_rate", 1.5),
        ("insurance_fund_usd", -1.0),
        ("insurance_fund_usd", math.nan),
        ("depth_fraction_of_adv", 0.0),
        ("adv_window_bars", 0),
        ("cascade", "yes"),
        ("cascade_kappa", -0.5),
        ("population_scale", 0.0),
        ("positions", (ExplicitPosition("long", None, 1e4, 10.0),)),
        ("positions", (ExplicitPosition("long", 3, 1e4, 10.0, entry_ms=START_MS),)),
        ("positions", (ExplicitPosition("flat", 3, 1e4, 10.0),)),
        ("positions", (ExplicitPosition("long", 3, 0.0, 10.0),)),
        ("positions", (ExplicitPosition("long", 3, 1e4, -2.0),)),
        ("positions", (ExplicitPosition("long", -1, 1e4, 2.0),)),
        ("positions", (ExplicitPosition("long", 1.5, 1e4, 2.0),)),  # type: ignore[arg-type]
    ],
)
def test_invalid_config_names_the_field(field: str, value: Any) -> None:
    """A bad setting raises InvalidParameters naming it, before any work is done."""
    config = LiquidationConfig(**{field: value})
    with pytest.raises(InvalidParameters) as err:
        config.validate()
    assert err.value.field == field
    with pytest.raises(InvalidParameters):
        simulate_liquidations(make_bars(crash_path(50)), EwmaMargin(warmup_bars=5), config)


def test_explicit_position_outside_the_series_is_rejected() -> None:
    """An entry past the last bar or before the first bar's time is an invalid position."""
    bars = make_bars(crash_path(50))
    for position in (ExplicitPosition("long", 50, 1e4, 2.0),
                     ExplicitPosition("long", None, 1e4, 2.0, entry_ms=START_MS - 1)):
        with pytest.raises(InvalidParameters) as err:
            simulate_liquidations(bars, EwmaMargin(warmup_bars=5),
                                  LiquidationConfig(positions=(position,)))
        assert err.value.field == "positions"


def test_default_grid_shape() -> None:
    """The default grid opens sides x notionals x leverages at every 60th bar with margin."""
    bars = make_bars(crash_path(1000, vol=0.002), seed=9)
    result = simulate_liquidations(bars, EwmaMargin(warmup_bars=100), LiquidationConfig())
    assert result.entry_bars.tolist() == list(range(120, 999, 60))
    assert result.positions_opened == len(result.entry_bars) * 2 * 5 * 12
    m = result.metrics("all", None, None)
    assert m.notional_opened_usd == pytest.approx(
        len(result.entry_bars) * 2 * 12 * (1_000 + 10_000 + 100_000 + 1_000_000 + 10_000_000)
    )


# ---------------------------------------------------------------- one insurance fund per venue


def _crash_at(bar: int, n: int = 8) -> list[tuple[float, float, float, float]]:
    """Flat at 100, one bar at ``bar`` falling to a low and close of 80, flat at 80 after."""
    flat, crash, after = (100, 100, 100, 100), (100, 100, 80, 80), (80, 80, 80, 80)
    return [flat] * bar + [crash] + [after] * (n - bar - 1)


def _long_10x(entry_bar: int) -> LiquidationConfig:
    return LiquidationConfig(
        positions=(ExplicitPosition("long", entry_bar, 10_000.0, 10.0),),
        insurance_fund_usd=1_500.0, latency_bars=1, **HAND,  # type: ignore[arg-type]
    )


def test_two_instruments_exhaust_a_shared_fund_neither_exhausts_alone() -> None:
    """Two 1008 USD bad debts on two instruments: each alone leaves a 1500 USD fund at 492,
    together they take the venue's one fund to -516 at the second close-out."""
    # Instrument A: long 10x at 100 (bar 0), crash bar 1, close-out bar 2 at 80 * 0.999:
    # equity 1000 + 100 * (79.92 - 100) = -1008 (as test_long_10x_single_crash_bar_bad_debt).
    # Instrument B: the same position one bar later, settling at bar 4 (4 minutes in).
    a_bars = flat_bars(_crash_at(1), instrument="A")
    b_bars = flat_bars(_crash_at(3), instrument="B")
    a = simulate_liquidations(a_bars, ConstantMargin(mm=0.01), _long_10x(0))
    b = simulate_liquidations(b_bars, ConstantMargin(mm=0.01), _long_10x(2))
    for alone in (a, b):
        assert alone.insurance_fund_min_usd == pytest.approx(492.0)
        assert alone.insurance_fund_exhausted_at is None
    fund = shared_insurance_fund([a, b])
    ts = a_bars.timestamp_ms
    assert fund.start_usd == 1_500.0
    assert fund.time_ms.tolist() == [ts[2], ts[4]]
    assert fund.level_usd.tolist() == pytest.approx([492.0, -516.0])
    assert fund.min_usd == pytest.approx(-516.0)
    bar4 = reference._iso(int(ts[4]))
    assert fund.exhausted_at == bar4 == "2020-09-13T12:30:40Z"
    assert [(p.time, p.fund_usd) for p in fund.path()] == [
        (reference._iso(int(ts[0])), 1500.0),
        (reference._iso(int(ts[2])), pytest.approx(492.0)),
        (bar4, pytest.approx(-516.0)),
    ]
    # Each instrument's window figures read the shared fund; its own bad debt stays its own.
    whole_a = a.metrics("all", None, None, fund)
    assert whole_a.bad_debt_usd == pytest.approx(1008.0)
    assert whole_a.insurance_fund_min_usd == pytest.approx(-516.0)
    assert whole_a.insurance_fund_exhausted_at == bar4
    early = a.metrics("early", None, int(ts[3]), fund)
    assert early.insurance_fund_min_usd == pytest.approx(492.0)
    assert early.insurance_fund_exhausted_at is None
    # the brute-force merge of the two reference runs gives the same ledger
    refs = [reference.simulate(a_bars, ConstantMargin(mm=0.01), _long_10x(0)),
            reference.simulate(b_bars, ConstantMargin(mm=0.01), _long_10x(2))]
    merged = reference.venue_fund(refs)
    assert [t for t, _ in merged] == fund.time_ms.tolist()
    assert [v for _, v in merged] == pytest.approx(fund.level_usd.tolist())


def test_close_outs_at_the_same_time_settle_together_in_either_order() -> None:
    """Close-outs of two instruments stamped with one time are one net settlement; the
    instruments' order does not change the path."""
    # A 10x long on A (bad debt 1008 at bar 2) and, on B, a 5x long through the same crash:
    # collateral 2000, equity at the low 2000 + 100 * (80 - 100) = 0 <= MM 80 triggers at bar
    # 1; close-out at 79.92: 2000 + 100 * (79.92 - 100) = -8, bad debt 8. Net at bar 2: -1016.
    a_bars = flat_bars(_crash_at(1), instrument="A")
    b_bars = flat_bars(_crash_at(1), instrument="B")
    a = simulate_liquidations(a_bars, ConstantMargin(mm=0.01), _long_10x(0))
    b_config = dataclasses.replace(
        _long_10x(0), positions=(ExplicitPosition("long", 0, 10_000.0, 5.0),)
    )
    b = simulate_liquidations(b_bars, ConstantMargin(mm=0.01), b_config)
    assert b.events.bad_debt_usd.tolist() == pytest.approx([8.0])
    ab = shared_insurance_fund([a, b])
    ba = shared_insurance_fund([b, a])
    assert ab.time_ms.tolist() == ba.time_ms.tolist() == [int(a_bars.timestamp_ms[2])]
    assert ab.level_usd.tolist() == pytest.approx([1500.0 - 1016.0])
    assert ab.level_usd.tolist() == pytest.approx(ba.level_usd.tolist(), abs=1e-9)


def test_shared_fund_of_one_instrument_is_its_own_fund() -> None:
    """With one instrument the venue's fund is that instrument's fund, level for level, as the
    brute-force reference computes it."""
    bars = make_bars(crash_path(300), funding=True, depth=True, seed=1)
    model = EwmaMargin(warmup_bars=20, horizon_bars=5, decay=0.9, floor_rate=0.002)
    config = LiquidationConfig(latency_bars=1, **GRID)  # type: ignore[arg-type]
    result = simulate_liquidations(bars, model, config)
    fund = shared_insurance_fund([result])
    assert fund.time_ms.tolist() == bars.timestamp_ms[result.fund_bars].tolist()
    assert fund.level_usd.tolist() == result.fund_usd.tolist()
    assert fund.path() == result.fund_path()
    assert fund.min_usd == result.insurance_fund_min_usd < 0
    assert fund.exhausted_at == result.insurance_fund_exhausted_at is not None
    for start, end in windows(bars):
        assert result.metrics("w", start, end, fund) == result.metrics("w", start, end)
    ref = reference.simulate(bars, model, config)
    ts = bars.timestamp_ms
    assert reference.venue_fund([ref]) == [
        (int(ts[b]), pytest.approx(v, abs=1e-6)) for b, v in ref.fund
    ]
    assert [t for t, _ in reference.venue_fund([ref])] == fund.time_ms.tolist()


def test_shared_fund_needs_one_start_level() -> None:
    """Instruments whose configs start the fund at different levels cannot share one."""
    bars = flat_bars(_crash_at(1))
    a = simulate_liquidations(bars, ConstantMargin(mm=0.01), _long_10x(0))
    b = simulate_liquidations(bars, ConstantMargin(mm=0.01),
                              dataclasses.replace(_long_10x(0), insurance_fund_usd=9.0))
    with pytest.raises(InvalidParameters) as err:
        shared_insurance_fund([a, b])
    assert err.value.field == "insurance_fund_usd"
    assert shared_insurance_fund([a, b], start_usd=100.0).start_usd == 100.0


STATIC_1PCT = {"base_mmr": 0.01, "tier_growth": 1.0, "bracket_caps_usd": []}


def test_backtest_reports_one_fund_for_all_instruments() -> None:
    """run_backtest: two instruments (one with a shorter history) draw on one fund, reported
    once, equal to the brute-force merge; each instrument reports its own contribution."""
    one = make_bars(crash_path(240, seed=31, vol=0.012), seed=31)
    three = dataclasses.replace(
        make_bars(crash_path(120, seed=32, vol=0.02), seed=32), instrument="THREE")
    start = 150_000_000.0
    config = LiquidationConfig(**{**GRID, "insurance_fund_usd": start})  # type: ignore[arg-type]
    report = run_backtest([one, three], "tiered", STATIC_1PCT, liquidation=config,
                          stress_windows=())
    model = TieredMargin(**STATIC_1PCT)  # type: ignore[arg-type]
    for bars in (one, three):  # a fund of its own would survive either instrument
        assert simulate_liquidations(bars, model, config).insurance_fund_min_usd > 0
    assert report.insurance_fund_exhausted_at is not None
    refs = [reference.simulate(b, model, config) for b in (one, three)]
    merged = reference.venue_fund(refs)
    assert len(merged) > 10
    # both instruments settle at some common minutes
    own_times = [{one.timestamp_ms[b] for b, _ in r.fund} for r in refs]
    assert own_times[0] & own_times[1]
    total = sum(p.notional for r in refs for p in r.positions) + 1.0
    path = report.insurance_fund_path
    assert path is not None
    assert path[0].time == reference._iso(START_MS)
    assert path[0].fund_usd == report.insurance_fund_start_usd == start
    assert [p.time for p in path[1:]] == [reference._iso(t) for t, _ in merged]
    for point, (_, level) in zip(path[1:], merged, strict=True):
        assert point.fund_usd == pytest.approx(level, abs=1e-9 * total)
    lowest = min([start] + [v for _, v in merged])
    assert report.insurance_fund_min_usd == pytest.approx(lowest, abs=1e-9 * total)
    first_negative = next((t for t, v in merged if v < 0), None)
    expected_at = None if first_negative is None else reference._iso(first_negative)
    assert report.insurance_fund_exhausted_at == expected_at
    for inst, ref in zip(report.instruments, refs, strict=True):
        assert inst.insurance_fund_path is None  # no fund per instrument any more
        assert inst.liquidation is not None
        got = msgspec.structs.asdict(inst.liquidation[0])
        want = reference.metrics(ref, None, None, merged)
        assert got["insurance_fund_min_usd"] == pytest.approx(
            want["insurance_fund_min_usd"], abs=1e-9 * total)
        assert got["insurance_fund_exhausted_at"] == want["insurance_fund_exhausted_at"]
        assert got["bad_debt_usd"] == pytest.approx(want["bad_debt_usd"], abs=1e-9 * total)
        contribution = inst.fund_contribution_path
        assert contribution is not None
        own = [p for p in ref.positions if p.trigger >= 0]
        net = sum((p.fee - p.bad_debt) * ref.scale for p in own)
        assert contribution[0].fund_usd == 0.0
        assert contribution[-1].fund_usd == pytest.approx(net, abs=1e-9 * total)
    # the two contributions add up to the fund's total move
    last = [inst.fund_contribution_path[-1].fund_usd  # type: ignore[index]
            for inst in report.instruments]
    assert sum(last) == pytest.approx(merged[-1][1] - start, abs=1e-9 * total)
    data = msgspec.json.decode(msgspec.json.encode(report))
    assert data["insurance_fund_min_usd"] == report.insurance_fund_min_usd


def test_backtest_of_one_instrument_reports_its_fund_as_before() -> None:
    """With one instrument the report's venue fund is the instrument's own fund path and its
    window figures are those of a simulation on its own."""
    bars = make_bars(crash_path(300, seed=6), seed=6)
    config = LiquidationConfig(**GRID)  # type: ignore[arg-type]
    report = run_backtest([bars], "tiered", STATIC_1PCT, liquidation=config, stress_windows=())
    alone = simulate_liquidations(bars, TieredMargin(**STATIC_1PCT), config)  # type: ignore[arg-type]
    assert report.insurance_fund_path == alone.fund_path()
    assert report.insurance_fund_min_usd == alone.insurance_fund_min_usd
    assert report.insurance_fund_exhausted_at == alone.insurance_fund_exhausted_at
    assert report.instruments[0].liquidation == [alone.metrics("all", None, None)]
    ref = reference.simulate(bars, TieredMargin(**STATIC_1PCT), config)  # type: ignore[arg-type]
    assert report.insurance_fund_min_usd == pytest.approx(
        reference.metrics(ref, None, None)["insurance_fund_min_usd"], abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fund_from_trigger_slots_is_the_per_bar_ledger(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fund summed from the trigger slots (sparse close-outs) and the per-bar ledger
    (dense ones) give the same bars, moves and levels to the bit, many close-outs sharing
    a bar, the last bars clamped together by the latency, with and without a cascade."""
    from calibration.liquidation import _engine

    bars = make_bars(crash_path(400, seed=seed), funding=True, depth=True, seed=seed)
    model = EwmaMargin(warmup_bars=20, horizon_bars=5, decay=0.9, floor_rate=0.002)
    config = LiquidationConfig(**{**GRID, "latency_bars": 3, "population_scale": 7.0,  # type: ignore[arg-type]
                                  "cascade": seed == 2})
    runs = []
    for bars_per_slot in (0, 10**9):  # 0: never sparse; 10**9: always
        monkeypatch.setattr(_engine, "SPARSE_FUND_BARS_PER_SLOT", bars_per_slot)
        runs.append(simulate_liquidations(bars, model, config))
    dense, sparse = runs
    assert dense.liquidations > 10
    assert len(np.unique(dense.fund_bars)) == len(dense.fund_bars)
    assert len(dense.fund_bars) < dense.liquidations  # close-outs share bars
    for name in ("fund_bars", "fund_usd", "fund_delta_usd"):
        assert getattr(dense, name).tobytes() == getattr(sparse, name).tobytes(), name
    assert dense.fund_bars.dtype == sparse.fund_bars.dtype
