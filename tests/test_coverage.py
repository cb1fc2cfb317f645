"""The coverage backtest engine against a brute-force loop over bars."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import CoverageConfig, InsufficientData, InvalidParameters, coverage_backtest
from calibration._bars import BarSeries
from calibration.models import EwmaMargin, TieredMargin, make_model
from calibration.windows import StressWindow
from tests.conftest import make_bars, random_walk
from tests.reference_coverage import brute_force_side, window_span


def _kupiec(n: int, x: int, p: float) -> float:
    def ll(q: float) -> float:
        return (n - x) * (math.log(1 - q) if n - x else 0.0) + (x * math.log(q) if x else 0.0)

    return -2 * ll(p) + 2 * (ll(x / n) if 0 < x < n else 0.0)


def _check_against_brute_force(bars, model, config, windows=()) -> None:  # type: ignore[no-untyped-def]
    report = coverage_backtest(bars, model, config, windows)
    horizon, level = config.resolve(model, bars.bar_seconds)
    rates = model.margin_rates(bars, notional_usd=config.notional_usd)
    margin = list(rates.mm_rate if config.margin == "mm" else rates.im_rate)
    low, high, close = list(bars.low), list(bars.high), list(bars.close)
    step = 1 if config.overlapping else horizon
    n = len(bars)
    spans = [(rates.first_valid_bar, n - horizon)]
    for w in windows:
        lo, hi = window_span(bars.timestamp_ms, bars.bar_seconds * 1000, horizon,
                             w.start_ms, w.end_ms)
        first = max(lo, rates.first_valid_bar)
        if step > 1:
            first = rates.first_valid_bar + math.ceil((first - rates.first_valid_bar) / step) * step
        spans.append((first, min(hi, n - horizon)))
    assert len(report) == len(spans)
    for metrics, (first, stop) in zip(report, spans, strict=True):
        for side_name in ("long", "short"):
            ref = brute_force_side(low, high, close, margin, horizon, side_name, first, stop, step)
            side = getattr(metrics, side_name)
            assert side.observations == ref.observations
            assert side.breaches == ref.breaches
            assert side.transitions == ref.transitions
            assert side.max_uncovered_loss == pytest.approx(ref.max_uncovered, abs=1e-12)
            if ref.observations:
                p = 1 - level
                assert side.kupiec_lr == pytest.approx(_kupiec(ref.observations, ref.breaches, p),
                                                       rel=1e-9, abs=1e-9)
                assert side.mean_margin_rate == pytest.approx(ref.sum_margin / ref.observations)
            if ref.breaches:
                assert side.mean_uncovered_loss == pytest.approx(ref.sum_uncovered / ref.breaches)
                assert side.expected_shortfall == pytest.approx(
                    ref.sum_loss_in_breach / ref.breaches)
            else:
                assert side.expected_shortfall is None


WINDOWS = (
    StressWindow("crash", 1_600_000_000_000 + 700 * 60_000, 1_600_000_000_000 + 900 * 60_000),
    StressWindow("early", 1_600_000_000_000, 1_600_000_000_000 + 50 * 60_000),
)


@pytest.mark.parametrize("overlapping", [True, False])
@pytest.mark.parametrize("margin", ["mm", "im"])
def test_ewma_matches_brute_force(overlapping: bool, margin: str) -> None:
    """EWMA coverage figures equal a plain loop, overlapping or not, MM or IM, per window."""
    bars = make_bars(random_walk(1500, seed=3, crash_at=800), seed=3)
    model = EwmaMargin(decay=0.94, horizon_bars=10, warmup_bars=100, floor_rate=0.001,
                       apc_buffer=0.0)
    config = CoverageConfig(overlapping=overlapping, margin=margin)  # type: ignore[arg-type]
    _check_against_brute_force(bars, model, config, WINDOWS)


def test_tiered_matches_brute_force() -> None:
    """A static 1% MM gives the breach counts of a plain loop."""
    bars = make_bars(random_walk(1200, seed=5, vol=0.004, crash_at=600), seed=5)
    model = make_model("tiered", {"base_mmr": 0.01, "tier_growth": 1.0, "bracket_caps_usd": []})
    _check_against_brute_force(bars, model, CoverageConfig(horizon_bars=15), WINDOWS)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    horizon=st.integers(1, 30),
    decay=st.floats(0.8, 0.999),
    overlapping=st.booleans(),
)
def test_random_paths_match_brute_force(seed: int, horizon: int, decay: float,
                                        overlapping: bool) -> None:
    """On random paths every coverage count equals the brute-force loop."""
    bars = make_bars(random_walk(400, seed=seed, vol=0.003), seed=seed)
    model = EwmaMargin(decay=decay, horizon_bars=horizon, warmup_bars=30, floor_rate=0.0,
                       apc_buffer=0.1)
    _check_against_brute_force(bars, model, CoverageConfig(overlapping=overlapping))


def test_procyclicality_against_hand_loop() -> None:
    """Peak-to-trough and the largest D-day increase equal a direct computation."""
    bars = make_bars(random_walk(3000, seed=9, crash_at=2000), seed=9, bar_seconds=3600)
    model = EwmaMargin(decay=0.97, horizon_bars=4, warmup_bars=50, floor_rate=0.0)
    config = CoverageConfig(procyclicality_days=5)
    metrics = coverage_backtest(bars, model, config)[0]
    m = model.margin_rates(bars).mm_rate
    obs = range(50, len(bars) - 4)
    vals = [m[t] for t in obs]
    assert metrics.peak_to_trough == pytest.approx(max(vals) / min(vals))
    window = 5 * 24
    best = max(m[t] / min(m[max(50, t - window) : t + 1]) for t in obs)
    assert metrics.max_increase_ratio == pytest.approx(best)
    assert metrics.max_leverage == pytest.approx(1 / metrics.mean_im_rate)


def test_horizon_longer_than_data_is_refused() -> None:
    """A horizon at least as long as the data is an InsufficientData error."""
    bars = make_bars(random_walk(100))
    model = make_model("tiered", {})
    with pytest.raises(InsufficientData, match="horizon"):
        coverage_backtest(bars, model, CoverageConfig(horizon_bars=100))


def test_warmup_leaves_no_observation() -> None:
    """A warm-up that eats the whole series is an InsufficientData error."""
    bars = make_bars(random_walk(120))
    with pytest.raises(InsufficientData):
        coverage_backtest(bars, EwmaMargin(warmup_bars=110, horizon_bars=20))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (CoverageConfig(horizon_bars=0), "horizon_bars"),
        (CoverageConfig(horizon="0h"), "horizon"),
        (CoverageConfig(coverage_level=1.5), "coverage_level"),
        (CoverageConfig(margin="vm"), "margin"),  # type: ignore[arg-type]
    ],
)
def test_bad_config_names_the_field(config: CoverageConfig, field: str) -> None:
    """Out-of-range settings raise InvalidParameters naming the setting."""
    with pytest.raises(InvalidParameters) as info:
        coverage_backtest(make_bars(random_walk(200)), TieredMargin(), config)
    assert info.value.field == field


def test_stress_window_outside_data_is_not_reported() -> None:
    """Windows that do not overlap the series are left out, not reported empty."""
    bars = make_bars(random_walk(300))
    far = StressWindow.from_dates("future", "2099-01-01")
    report = coverage_backtest(bars, TieredMargin(), CoverageConfig(horizon_bars=5), [far])
    assert [m.window for m in report] == ["all"]


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=300),
    warmup=st.integers(0, 40),
    trail=st.integers(1, 120),
    block=st.integers(1, 64),
    step=st.integers(1, 7),
    start_offset=st.integers(0, 30),
)
def test_max_increase_ratio_matches_brute_force(data: list[float], warmup: int, trail: int,
                                               block: int, step: int,
                                               start_offset: int) -> None:
    """The block-pruned procyclicality search equals a direct max over windows."""
    from calibration import _kernels

    margin = np.array([np.nan] * warmup + data)
    loss = np.zeros_like(margin)
    loss[-1] = np.nan  # a bar without a full horizon is not an observation
    start = min(warmup + start_offset, len(margin))
    stop = len(margin)
    expected = 0.0
    for t in range(start, stop, step):
        if np.isnan(loss[t]):
            continue
        window = [v for v in margin[max(0, t - trail + 1) : t + 1] if not np.isnan(v)]
        expected = max(expected, margin[t] / min(window))
    got = _kernels.max_increase_ratio(margin, loss, start, stop, step, trail, block)
    assert got == pytest.approx(expected, rel=1e-12)


def test_window_membership_by_loss_interval() -> None:
    """A daily crash-day loss is the observation of the day before and counts in the crash
    window: margin bar 03-11, loss interval 03-12 (hand-built daily bars)."""
    day_ms = 86_400_000
    start = 1_583_712_000_000  # 2020-03-09T00:00Z
    close = np.full(30, 100.0)
    low = close * 0.999
    high = close * 1.001
    low[3] = 58.5  # 2020-03-12: a 41.5% fall below the 03-11 close
    ts = start + np.arange(30, dtype=np.int64) * day_ms
    bars = BarSeries(instrument="BTC", timestamp_ms=ts, open=close.copy(), high=high, low=low,
                     close=close, volume=None, bar_seconds=86_400, fingerprint="hand",
                     source="hand")
    model = TieredMargin(base_mmr=0.05, tier_growth=1.0)
    window = StressWindow.from_dates("black_thursday_2020", "2020-03-12", "2020-03-13")
    report = coverage_backtest(bars, model, CoverageConfig(horizon_bars=1), [window])
    crash = report[1]
    # Observations 03-11 (loss 03-12) and 03-12 (loss 03-13); the 03-13 one loses on 03-14.
    assert crash.long.observations == 2
    assert crash.long.breaches == 1
    assert crash.long.max_uncovered_loss == pytest.approx(0.415 - 0.05)
