"""One close-out horizon: it sizes the margin and is the test's loss window (domain.md §2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import CoverageConfig, InvalidParameters, coverage_backtest, run_backtest
from calibration.data import resample
from calibration.horizon import DEFAULT_HORIZON, Horizon, format_duration, resolve_horizon, to_bars
from calibration.models import EwmaMargin, FhsMargin, TieredMargin, make_model
from calibration.models._fhs import trailing_max
from tests.conftest import make_bars


@pytest.mark.parametrize(
    ("value", "bar_seconds", "bars"),
    [("1h", 60, 60), ("1h", 1800, 2), ("45m", 1800, 2), ("1h", 86_400, 1), ("2d", 86_400, 2),
     ("60", 1800, 60), (60, 1800, 60), ("90s", 60, 2), ("1w", 3600, 168), ("15min", 300, 3)],
)
def test_to_bars(value: object, bar_seconds: int, bars: int) -> None:
    """Bars stay bars; a duration is rounded up to whole bars (never shorter than asked)."""
    assert to_bars(value, bar_seconds, "horizon") == bars


@pytest.mark.parametrize("value", ["0h", "abc", "1.5h", -1, 0, 1.5, True, "", "1y", 10**8])
def test_bad_horizon_is_refused_with_its_field(value: object) -> None:
    """A malformed horizon is refused naming the setting."""
    with pytest.raises(InvalidParameters) as info:
        to_bars(value, 60, "data.horizon")
    assert info.value.field == "data.horizon"


def test_format_duration() -> None:
    """Seconds as the largest exact unit."""
    assert [format_duration(s) for s in (3600, 5400, 172_800, 604_800, 90, 1800)] == [
        "1h", "90m", "2d", "1w", "90s", "30m"]


def test_two_different_horizons_are_refused() -> None:
    """params' 60 bars and a 1h duration on 30-minute bars (2 bars) differ: refused, the second
    setting named; the same horizon set twice is fine."""
    with pytest.raises(InvalidParameters) as info:
        resolve_horizon({"params.horizon_bars": 60, "horizon": "1h"}, 1800)
    assert info.value.field == "horizon"
    assert "60 bars of 30m" in str(info.value)
    assert "2 bars of 30m = 1h" in str(info.value)
    same = resolve_horizon({"params.horizon_bars": 2, "horizon": "1h"}, 1800)
    assert same == Horizon(2, 1800, "params.horizon_bars")


def test_default_is_a_duration() -> None:
    """Unset everywhere, the horizon is one hour whatever the bar size."""
    assert DEFAULT_HORIZON == "1h"
    assert [resolve_horizon({}, s).bars for s in (60, 300, 1800, 3600)] == [60, 12, 2, 1]
    assert resolve_horizon({}, 1800).duration == "1h"


def test_coverage_horizon_sizes_the_margin() -> None:
    """A horizon set only on the test also sizes the model's margin: the 30-minute defect of
    issue 9 (test over 2 bars, margin for 60) cannot happen."""
    bars = make_bars(np.exp(np.cumsum(np.random.default_rng(1).normal(0, 0.004, 3000))) * 100,
                     bar_seconds=1800)
    model = EwmaMargin(warmup_bars=200, apc_buffer=0.0, floor_rate=0.0)
    via_test = coverage_backtest(bars, model, CoverageConfig(horizon="1h"))[0]
    explicit = coverage_backtest(bars, EwmaMargin(warmup_bars=200, apc_buffer=0.0,
                                                  floor_rate=0.0, horizon_bars=2),
                                 CoverageConfig(horizon_bars=2))[0]
    assert via_test == explicit
    sixty = EwmaMargin(warmup_bars=200, apc_buffer=0.0, floor_rate=0.0, horizon_bars=60)
    with pytest.raises(InvalidParameters) as info:
        coverage_backtest(bars, sixty, CoverageConfig(horizon="1h"))
    assert info.value.field == "horizon"


def test_model_default_horizon_follows_the_bar_size() -> None:
    """An EWMA model without a horizon margins for one hour: √2 times a one-bar margin on
    30-minute bars, √60 times on 1-minute bars (hand scaling of z·σ·√h)."""
    closes = np.exp(np.cumsum(np.random.default_rng(2).normal(0, 0.003, 2000))) * 100
    for bar_seconds, bars_per_hour in ((60, 60), (1800, 2)):
        bars = make_bars(closes, bar_seconds=bar_seconds)
        free = EwmaMargin(warmup_bars=100, apc_buffer=0.0, floor_rate=0.0).margin_rates(bars)
        one = EwmaMargin(warmup_bars=100, apc_buffer=0.0, floor_rate=0.0,
                         horizon_bars=1).margin_rates(bars)
        np.testing.assert_allclose(free.mm_rate[100:], one.mm_rate[100:]
                                   * math.sqrt(bars_per_hour), rtol=1e-12)


def test_backtest_report_states_the_horizon() -> None:
    """The report gives the horizon in bars and as a duration, and the model's parameters
    carry the same bars."""
    bars = make_bars(np.exp(np.cumsum(np.random.default_rng(3).normal(0, 0.004, 1500))) * 100,
                     bar_seconds=1800)
    report = run_backtest([bars], "ewma", {"warmup_bars": 100}, liquidation=None,
                          coverage=CoverageConfig(horizon="1h"), stress_windows=())
    assert (report.horizon_bars, report.horizon, report.horizon_seconds, report.bar_seconds) == (
        2, "1h", 3600, 1800)
    assert report.params["horizon_bars"] == 2


def test_backtest_refuses_mixed_bar_sizes() -> None:
    """One horizon needs one bar size."""
    a = make_bars(np.full(600, 100.0), bar_seconds=60)
    b = make_bars(np.full(600, 100.0), bar_seconds=300, instrument="B")
    with pytest.raises(InvalidParameters) as info:
        run_backtest([a, b], "tiered", {}, liquidation=None, stress_windows=())
    assert info.value.field == "data"


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31), sigma_day=st.floats(0.02, 0.06))
def test_same_duration_on_1m_30m_daily_bars_agrees(seed: int, sigma_day: float) -> None:
    """The same one-day horizon on 1-minute, 30-minute and daily bars of one Gaussian random
    walk gives mean EWMA margins that agree with z·σ_bar·√(bars per day) = z·σ_day, with the
    same memory in time on every grid (30 days): within 6% on 1-minute and 30-minute bars,
    15% on daily bars (~700 daily returns: their own sampling error is ~3%)."""
    days = 800
    per_day = 1440
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, sigma_day / math.sqrt(per_day), days * per_day)
    minute = make_bars(100.0 * np.exp(np.cumsum(r)), bar_seconds=60, volume=False)
    means = []
    for bar_seconds in (60, 1800, 86_400):
        bars = minute if bar_seconds == 60 else resample(minute, bar_seconds)
        bars_per_day = 86_400 // bar_seconds
        model = make_model("ewma", {
            "decay": 1 - 1 / (30 * bars_per_day), "warmup_bars": 30 * bars_per_day,
            "apc_buffer": 0.0, "floor_rate": 0.0, "confidence": 0.99})
        config = CoverageConfig(horizon="1d")
        assert config.horizon_for(model, bar_seconds).bars == bars_per_day
        rates = model.with_horizon(bars_per_day).margin_rates(bars)
        after_warmup = rates.mm_rate[60 * bars_per_day:]
        means.append(float(np.mean(after_warmup)))
    expected = 2.3263478740408408 * sigma_day
    assert means[0] == pytest.approx(expected, rel=0.06)
    assert means[1] == pytest.approx(means[0], rel=0.06)
    assert means[2] == pytest.approx(means[0], rel=0.15)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), vol=st.floats(0.01, 0.4),
       max_rate=st.sampled_from([1.0, 0.5, 0.1]),
       family=st.sampled_from(["ewma", "fhs", "tiered", "ewma+addon"]))
def test_no_rate_above_max_rate(seed: int, vol: float, max_rate: float, family: str) -> None:
    """Whatever the volatility, no MM or IM rate exceeds max_rate, and the capped bars are
    exactly those where the uncapped model is above it."""
    rng = np.random.default_rng(seed)
    bars = make_bars(100 * np.exp(np.cumsum(rng.normal(0, vol, 400))), bar_seconds=3600)
    params: dict[str, object] = {"max_rate": max_rate}
    if family == "fhs":
        params |= {"window_bars": 30, "warmup_bars": 20, "horizon_bars": 24,
                   "stress_weight": 0.5}
    elif family == "tiered":
        params |= {"base_mmr": 0.2, "tier_growth": 3.0, "bracket_caps_usd": [1e3, 5e3]}
    else:
        params |= {"warmup_bars": 20, "horizon_bars": 24, "apc_buffer": 1.0}
        if family == "ewma+addon":
            params |= {"addon_coef": 2.0}
    name = family.split("+")[0]
    model = make_model(name, params)
    rates = model.margin_rates(bars, notional_usd=8e3)
    assert np.nanmax(rates.mm_rate) <= max_rate
    assert np.nanmax(rates.im_rate) <= max_rate
    uncapped = make_model(name, {**params, "max_rate": 1.0})
    raw = uncapped._bound(3600)._mm_rate(bars, 8e3)
    with np.errstate(invalid="ignore"):
        assert rates.capped_bars == int(np.sum(raw > max_rate))


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60),
       window=st.integers(1, 70))
def test_trailing_max_matches_a_loop(values: list[float], window: int) -> None:
    """The O(n) trailing maximum equals max over each window, taken one by one."""
    a = np.asarray(values)
    expected = [max(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
    np.testing.assert_array_equal(trailing_max(a, window), expected)


def test_fhs_stressed_lookback_is_bounded() -> None:
    """A crash raises the stressed term for stress_lookback_bars bars, then it lets go
    (an all-time maximum would pin the margin for ever)."""
    rng = np.random.default_rng(5)
    r = rng.normal(0, 0.002, 3000)
    r[1000] = -0.3
    bars = make_bars(100 * np.exp(np.cumsum(r)), bar_seconds=3600)
    base = {"window_bars": 200, "warmup_bars": 50, "horizon_bars": 4, "stress_weight": 1.0,
            "floor_rate": 0.0}
    bounded = FhsMargin(**base, stress_lookback_bars=500).margin_rates(bars).mm_rate
    forever = FhsMargin(**base, stress_lookback_bars=2900).margin_rates(bars).mm_rate
    assert bounded[1100] == forever[1100]  # inside both look-backs
    assert bounded[2500] < 0.5 * forever[2500]  # the crash left the window 500 bars after
    # the peak of the crash sample (bar ~1000..1200) plus 500 bars


def test_fhs_lookback_at_most_ten_years() -> None:
    """A look-back longer than ten years of the series' bars is refused, the field named."""
    bars = make_bars(np.full(600, 100.0), bar_seconds=86_400)
    model = FhsMargin(window_bars=20, warmup_bars=20, horizon_bars=1,
                      stress_lookback_bars=3651 + 10)
    with pytest.raises(InvalidParameters) as info:
        model.margin_rates(bars)
    assert info.value.field == "stress_lookback_bars"


def test_cli_horizon_on_30_minute_bars(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """marginlab backtest --horizon 1h on 30-minute bars tests and margins over 2 bars; with
    params' horizon_bars 60 as well it is refused, naming both."""
    from calibration.cli import main

    bars = make_bars(np.exp(np.cumsum(np.random.default_rng(4).normal(0, 0.004, 1200))) * 100,
                     bar_seconds=1800)
    frame_path = tmp_path / "BTC_30m.csv"
    import pandas as pd

    pd.DataFrame({"timestamp_ms": bars.timestamp_ms, "open": bars.open, "high": bars.high,
                  "low": bars.low, "close": bars.close}).to_csv(frame_path, index=False)
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    args = ["backtest", "--data", "BTC_30m.csv", "--model", "ewma", "--params",
            '{"warmup_bars": 100}', "--horizon", "1h", "--no-liquidation", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["horizon_bars"] == 2
    assert report["horizon"] == "1h"
    assert report["params"]["horizon_bars"] == 2
    args[6] = '{"warmup_bars": 100, "horizon_bars": 60}'
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "params.horizon_bars is 60 bars of 30m" in err
    assert "horizon is 2 bars" in err


def test_tiered_has_no_horizon_but_the_test_does() -> None:
    """A family without a horizon is tested over the request's horizon."""
    bars = make_bars(np.full(500, 100.0), bar_seconds=300)
    cov = coverage_backtest(bars, TieredMargin(), CoverageConfig())
    assert cov[0].long.observations == 500 - 12
