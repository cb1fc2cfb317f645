"""Batches of parameter sets in one pass: the same metrics as one set at a time, bit for bit."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from calibration import (
    CoverageConfig,
    InsufficientData,
    InvalidParameters,
    coverage_backtest,
    load_bars,
    make_model,
)
from calibration._bars import BarSeries
from calibration.batch import evaluate_coverage_batch
from calibration.windows import DEFAULT_STRESS_WINDOWS
from tests.conftest import make_bars, random_walk
from tests.reference_coverage import brute_force_side
from tests.reference_models import ewma_rate

CRASH_1M = "binance_spot_1m_2021_05/BTCUSDT_1m_2021-04-20_2021-05-20.csv"


def _random_sets(count: int, seed: int) -> list[dict[str, Any]]:
    """EWMA sets drawn over the whole admissible box, caps and IM ratios included."""
    rng = np.random.default_rng(seed)
    return [{
        "decay": float(rng.uniform(0.8, 0.9999)),
        "confidence": float(rng.uniform(0.9, 0.9999)),
        "warmup_bars": int(rng.integers(2, 5000)),
        "floor_rate": float(rng.choice([0.0, rng.uniform(0.0, 0.03)])),
        "apc_buffer": float(rng.uniform(0.0, 1.0)),
        "max_rate": float(rng.choice([1.0, rng.uniform(0.01, 0.05)])),
        "im_to_mm": float(rng.uniform(1.0, 4.0)),
    } for _ in range(count)]


def _one_at_a_time(bars: BarSeries, sets: list[dict[str, Any]], config: CoverageConfig,
                   family: str = "ewma") -> list[bytes]:
    return [msgspec.json.encode(coverage_backtest(bars, make_model(family, s), config,
                                                  DEFAULT_STRESS_WINDOWS)) for s in sets]


@pytest.fixture
def crash_bars(shared_data: Path, data_file: Callable[[str], str]) -> BarSeries:
    """A month of real Binance 1-minute BTCUSDT bars around the 2021-05-19 crash."""
    return load_bars(data_file(CRASH_1M), root=shared_data)


@pytest.mark.data
@pytest.mark.parametrize("margin", ["mm", "im"])
@pytest.mark.parametrize("overlapping", [True, False])
@pytest.mark.parametrize("procyclicality_days", [2.0, 7.0])
def test_random_sets_on_real_data_equal_one_at_a_time(
    crash_bars: BarSeries, margin: str, overlapping: bool, procyclicality_days: float,
) -> None:
    """32 random EWMA sets in one batch give byte-identical metrics (every window, the
    procyclicality search over several blocks) to 32 separate coverage backtests. Every
    bar observed (overlapping) takes the dense statistics across sets; a 7-day window
    (10,081 bars, at least two 4,096-bar blocks) takes the search that reads the blocks
    between a window's ends by their minima, a 2-day one the bar-by-bar search."""
    sets = _random_sets(32, seed=(margin == "im") * 2 + overlapping)
    config = CoverageConfig(horizon_bars=60, margin=margin,  # type: ignore[arg-type]
                            overlapping=overlapping,
                            procyclicality_days=procyclicality_days)
    batch = evaluate_coverage_batch(crash_bars, "ewma", sets, config=config,
                                    stress_windows=DEFAULT_STRESS_WINDOWS)
    assert [len(m) for m in batch] == [2] * len(sets)  # the whole month and 2021-05-19
    assert [msgspec.json.encode(m) for m in batch] == _one_at_a_time(crash_bars, sets, config)


@pytest.mark.data
def test_batch_against_brute_force_loops(crash_bars: BarSeries) -> None:
    """On 5,000 real bars the batch's counts, sums and largest increase equal plain Python
    loops over the reference EWMA rate (no engine code)."""
    n = 5000
    bars = dataclasses.replace(
        crash_bars, timestamp_ms=crash_bars.timestamp_ms[:n], open=crash_bars.open[:n],
        high=crash_bars.high[:n], low=crash_bars.low[:n], close=crash_bars.close[:n],
        volume=None, gaps=(), _cache={})
    sets = [{"decay": 0.97, "confidence": 0.99, "warmup_bars": 300, "floor_rate": 0.001},
            {"decay": 0.995, "confidence": 0.995, "warmup_bars": 1200, "floor_rate": 0.0}]
    horizon = 30
    config = CoverageConfig(horizon_bars=horizon, procyclicality_days=0.5)
    batch = evaluate_coverage_batch(bars, "ewma", sets, config=config)
    low, high, close = (list(map(float, a)) for a in (bars.low, bars.high, bars.close))
    for params, metrics in zip(sets, batch, strict=True):
        m = ewma_rate(close, horizon_bars=horizon, apc_buffer=0.25, **params)  # type: ignore[arg-type]
        first = int(params["warmup_bars"])
        stop = n - horizon
        for side, got in (("long", metrics[0].long), ("short", metrics[0].short)):
            ref = brute_force_side(low, high, close, m, horizon, side, first, stop, 1)
            assert got.observations == ref.observations == stop - first
            assert got.breaches == ref.breaches
            assert got.max_uncovered_loss == pytest.approx(ref.max_uncovered, rel=1e-9)
            assert got.transitions == ref.transitions
        trail = 12 * 60 + 1
        best = max(m[t] / min(v for v in m[max(0, t - trail + 1): t + 1] if not math.isnan(v))
                   for t in range(first, stop))
        assert metrics[0].max_increase_ratio == pytest.approx(best, rel=1e-9)


def test_batch_increase_in_block_0_with_a_long_trail() -> None:
    """A 30-day trail (two blocks and more: the block-minimum exact phase) on a series whose
    largest margins come early in the first block and the smallest later in it: a window
    starts at bar 0 and must not see the block's later bars (the batch once took the whole
    block's minimum there, 44.6 instead of 1.61)."""
    rng = np.random.default_rng(3)
    n = 20_000
    vol = np.where(np.arange(n) < 2500, 0.01, 0.0003)
    bars = make_bars(100 * np.exp(np.cumsum(rng.normal(0.0, 1.0, n) * vol)))
    config = CoverageConfig(horizon_bars=60)
    sets = [{"decay": 0.97}, {"decay": 0.99}]
    batch = evaluate_coverage_batch(bars, "ewma", sets, config=config)
    for params, metrics in zip(sets, batch, strict=True):
        one = coverage_backtest(bars, make_model("ewma", params), config)
        assert metrics[0].max_increase_ratio == one[0].max_increase_ratio
        assert one[0].max_increase_ratio is not None
        assert one[0].max_increase_ratio < 2.0


def test_other_families_and_horizons_keep_their_order() -> None:
    """Tiered sets (one at a time) and EWMA sets of two horizons (two batches) come back in
    the order given, each equal to its own coverage backtest."""
    bars = make_bars(random_walk(6000, seed=5, crash_at=4000), seed=5)
    sets = [{"decay": 0.97, "horizon_bars": 10, "warmup_bars": 100},
            {"decay": 0.99, "horizon_bars": 20, "warmup_bars": 400},
            {"decay": 0.95, "horizon_bars": 10, "warmup_bars": 50, "max_rate": 0.01}]
    batch = evaluate_coverage_batch(bars, "ewma", sets)
    for params, metrics in zip(sets, batch, strict=True):
        alone = coverage_backtest(bars, make_model("ewma", params), CoverageConfig())
        assert msgspec.json.encode(metrics) == msgspec.json.encode(alone)
    tiered = [{"base_mmr": 0.004}, {"base_mmr": 0.02}]
    config = CoverageConfig(horizon_bars=15)
    got = [msgspec.json.encode(m)
           for m in evaluate_coverage_batch(bars, "tiered", tiered, config=config)]
    assert got == _one_at_a_time(bars, tiered, config, family="tiered")


def test_bad_sets_are_refused_naming_the_field() -> None:
    """An out-of-range hyperparameter in any set is refused with its name; a warm-up past
    the data is InsufficientData, as for one set."""
    bars = make_bars(random_walk(500, seed=6))
    with pytest.raises(InvalidParameters) as info:
        evaluate_coverage_batch(bars, "ewma", [{"decay": 0.9}, {"decay": 1.5}],
                                config=CoverageConfig(horizon_bars=5))
    assert info.value.field == "decay"
    with pytest.raises(InvalidParameters) as info:
        evaluate_coverage_batch(bars, "ewma", [{"decay": 0.9}],
                                config=CoverageConfig(horizon_bars=5, notional_usd=-1.0))
    assert info.value.field == "notional_usd"
    with pytest.raises(InsufficientData):
        evaluate_coverage_batch(bars, "ewma", [{"warmup_bars": 499}],
                                config=CoverageConfig(horizon_bars=5))


def test_image_warm_up_bars_are_valid_ohlc_and_run_every_family() -> None:
    """The build-time warm-up's synthetic bars are consistent OHLC past every default
    warm-up, and the warm-up (every family, liquidations, the batch kernel) completes."""
    from calibration._warmup import WARMUP_BARS, synthetic_bars, warm_up

    bars = synthetic_bars()
    assert len(bars) == WARMUP_BARS
    assert (bars.low > 0).all()
    assert (bars.low <= np.minimum(bars.open, bars.close)).all()
    assert (bars.high >= np.maximum(bars.open, bars.close)).all()
    assert warm_up() > 0.0
