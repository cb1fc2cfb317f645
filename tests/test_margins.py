"""One margin series per model and instrument: computed once, shared by every consumer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest

from calibration import (
    CoverageConfig,
    InvalidParameters,
    LiquidationConfig,
    _kernels,
    coverage_backtest,
    run_backtest,
    simulate_liquidations,
)
from calibration.margins import MarginSeries, capital_cost, mean_im_rate
from calibration.models import EwmaMargin, MarginModel, MarginRates, TieredMargin, make_model
from calibration.windows import DEFAULT_STRESS_WINDOWS
from tests.conftest import make_bars, random_walk

LIQUIDATION = LiquidationConfig(leverages=(5.0, 20.0), notionals_usd=(1_000, 100_000),
                                entry_every_bars=97)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts ``margin_rates`` calls per instrument, wrapping the real method."""
    counter: Counter[str] = Counter()
    real = MarginModel.margin_rates

    def counting(self, bars, *, notional_usd=10_000.0):  # type: ignore[no-untyped-def]
        counter[bars.instrument] += 1
        return real(self, bars, notional_usd=notional_usd)

    monkeypatch.setattr(MarginModel, "margin_rates", counting)
    return counter


def _two_instruments() -> list:  # type: ignore[type-arg]
    return [make_bars(random_walk(3000, seed=s), seed=s, instrument=name)
            for s, name in ((1, "AAA"), (2, "BBB"))]


def test_backtest_computes_the_margin_once_per_instrument(calls: Counter[str]) -> None:
    """run_backtest (coverage + liquidations) calls the EWMA margin model once per instrument."""
    run_backtest(_two_instruments(), "ewma", {"warmup_bars": 200, "horizon_bars": 10},
                 liquidation=LIQUIDATION)
    assert calls == {"AAA": 1, "BBB": 1}


def test_notional_dependent_model_once_per_notional(calls: Counter[str]) -> None:
    """A tiered model is evaluated once per distinct notional: the coverage notional (10k)
    and the grid's two, not once per consumer."""
    run_backtest(_two_instruments(), "tiered", {}, liquidation=LIQUIDATION)
    assert calls == {"AAA": 3, "BBB": 3}


def test_one_evaluation_through_the_library_calls_the_model_once(calls: Counter[str]) -> None:
    """Coverage, liquidations and capital cost of one trial share one series per instrument,
    and give exactly what each computes on its own."""
    datasets = _two_instruments()
    model = EwmaMargin(warmup_bars=200, horizon_bars=10)
    config = CoverageConfig(horizon_bars=10)
    margins = [MarginSeries(model, b) for b in datasets]
    shared = [
        (coverage_backtest(b, model, config, DEFAULT_STRESS_WINDOWS, margins=m),
         simulate_liquidations(b, model, LIQUIDATION, margins=m).metrics("all", None, None))
        for b, m in zip(datasets, margins, strict=True)
    ]
    cost = capital_cost(margins, LIQUIDATION.notionals_usd)
    assert calls == {"AAA": 1, "BBB": 1}
    alone = [
        (coverage_backtest(b, model, config, DEFAULT_STRESS_WINDOWS),
         simulate_liquidations(b, model, LIQUIDATION).metrics("all", None, None))
        for b in datasets
    ]
    assert msgspec.json.encode(shared) == msgspec.json.encode(alone)
    # The capital cost by hand: the mean IM rate (2 x MM) over the bars with a margin.
    by_hand = np.mean([np.mean(2.0 * model.margin_rates(b).mm_rate[200:]) for b in datasets])
    assert cost == pytest.approx(by_hand, rel=1e-12)


def test_capital_cost_weights_each_notional_by_hand() -> None:
    """Two brackets, IM 2% and 5%: sizes 1k and 100k weigh (1k * 2% + 100k * 5%) / 101k."""
    model = TieredMargin(mmr_schedule=(0.01, 0.02), imr_schedule=(0.02, 0.05),
                         bracket_caps_usd=(50_000,))
    bars = make_bars(random_walk(500, seed=3))
    cost = capital_cost([MarginSeries(model, bars)], (1_000, 100_000))
    assert cost == pytest.approx((1_000 * 0.02 + 100_000 * 0.05) / 101_000, rel=1e-12)


def test_a_series_of_another_model_is_refused() -> None:
    """Handing the coverage test the margins of other parameters names the argument."""
    bars = make_bars(random_walk(1000, seed=4))
    margins = MarginSeries(make_model("ewma", {"decay": 0.9, "warmup_bars": 100}), bars)
    other = make_model("ewma", {"decay": 0.95, "warmup_bars": 100})
    with pytest.raises(InvalidParameters) as info:
        coverage_backtest(bars, other, CoverageConfig(horizon_bars=5), margins=margins)
    assert info.value.field == "margins"


@pytest.mark.parametrize("n_bars", [1, 7, 8, 129, 300, 4_097, 250_003])
def test_mean_im_rate_is_numpys_nanmean_of_the_stored_im_series_to_the_bit(n_bars: int) -> None:
    """The one-pass mean of the IM rates (never stored) equals ``np.nanmean`` of the stored
    ``im_rate`` after the warm-up exactly: NaN bars skipped, rates above ``max_rate`` and IM
    capped, every length around numpy's pairwise blocks (8, 128, halves)."""
    rng = np.random.default_rng(n_bars)
    first = n_bars // 5
    mm = np.abs(rng.standard_normal(n_bars)) * 0.05
    mm[:first] = np.nan
    if n_bars > 20:
        mm[rng.integers(first, n_bars, 3)] = np.nan
        mm[rng.integers(first, n_bars, 3)] = 1.4  # above the cap
    for im_to_mm, max_rate in ((2.0, 1.0), (2.7, 0.08)):
        rates = MarginRates(mm_rate=mm, im_to_mm=im_to_mm, first_valid_bar=first,
                            max_rate=max_rate)
        expected = float(np.nanmean(rates.im_rate[first:]))
        assert mean_im_rate(rates) == expected


@pytest.mark.parametrize("n_bars", [2, 8, 9, 128, 129, 136, 137, 257, 4_097, 250_003])
@pytest.mark.parametrize("cap", [1.0, 0.02, "floor"])
def test_ewma_margin_in_one_pass_is_the_rates_their_cap_and_the_im_sum_to_the_bit(
        n_bars: int, cap: float | str) -> None:
    """``_kernels.ewma_margin`` (the EWMA's rates, cap and IM sum in one pass) against the
    passes it replaces, on every length around numpy's pairwise leaves (8, 128, halves
    split at multiples of 8) after the warm-up: the same MM bits, the same cap mask and
    capped count, and the IM sum and count of ``im_rate_sum`` and of numpy's own
    ``np.nansum`` of the stored IM series. A cap equal to the floor (rates at the cap
    exactly are not capped), a cap most bars exceed, and a NaN return (the variance is NaN
    from there and the rate is the floor's, as in ``ewma_rate``)."""
    rng = np.random.default_rng(n_bars)
    warmup = 50
    n = warmup + n_bars
    returns = rng.standard_t(3, n) * 0.004
    if n_bars > 200:
        returns[n - n_bars // 3] = np.nan
    squared = returns * returns
    scale, floor, mult = 2.326 * np.sqrt(60.0), 0.005, 1.25
    cap_rate = floor * mult if cap == "floor" else float(cap)
    raw = _kernels.ewma_rate(returns, squared, 0.97, warmup, scale, floor, mult)
    mm, capped, n_capped, im_sum, im_count = _kernels.ewma_margin(
        returns, squared, 0.97, warmup, scale, floor, mult, cap_rate, 2.0)
    want_mm, want_capped = _kernels.cap_rates(raw, cap_rate)
    assert np.array_equal(mm, want_mm, equal_nan=True)
    assert np.array_equal(capped, want_capped)
    assert n_capped == int(np.count_nonzero(raw > cap_rate))
    assert (im_sum, im_count) == _kernels.im_rate_sum(want_mm, warmup, 2.0, cap_rate)
    rates = MarginRates(mm_rate=want_mm, im_to_mm=2.0, first_valid_bar=warmup, max_rate=cap_rate)
    assert im_sum == float(np.nansum(rates.im_rate[warmup:]))
    assert im_count == int(np.count_nonzero(~np.isnan(want_mm[warmup:])))
    if cap == 0.02 and n_bars > 200:
        assert 0 < n_capped < n_bars


@pytest.mark.parametrize("max_rate", [1.0, 0.03])
def test_ewma_rates_are_those_of_the_generic_passes(max_rate: float) -> None:
    """``EwmaMargin.margin_rates`` (one fused kernel) returns what the interface's generic
    passes return for it (``MarginModel._capped_rates``): the MM bits, no mask when no bar
    is capped, the same mask otherwise, and a mean IM rate equal to ``np.nanmean`` of the
    stored IM series."""
    bars = make_bars(random_walk(20_000, seed=3, crash_at=12_000, crash=-0.05))
    model = EwmaMargin(decay=0.95, warmup_bars=300, horizon_bars=30, max_rate=max_rate)
    fused = model.margin_rates(bars)
    generic = MarginModel._capped_rates(model, bars, 10_000.0)
    assert np.array_equal(fused.mm_rate, generic.mm_rate, equal_nan=True)
    assert (fused.capped is None) == (generic.capped is None) == (max_rate == 1.0)
    if generic.capped is not None:
        assert fused.capped is not None
        assert np.array_equal(fused.capped, generic.capped)
    assert fused.im_total is not None
    assert generic.im_total is None
    assert mean_im_rate(fused) == mean_im_rate(generic) == float(
        np.nanmean(generic.im_rate[300:]))


def test_capital_cost_of_an_ewma_on_real_minutes_is_the_stored_series_mean(
        shared_data: Path) -> None:
    """On a month of real BTC minutes, the capital cost over five notionals (one series: the
    EWMA ignores size) is the notional-weighted ``np.nanmean`` of the stored IM series, to
    the bit."""
    from calibration.data import load_bars

    bars = load_bars("binance_spot_btc_1m_2024_08/BTCUSDT_1m_2024-07-26_2024-08-25.csv",
                     root=shared_data)
    model = EwmaMargin(decay=0.97, horizon_bars=60, warmup_bars=1000, floor_rate=0.004)
    notionals = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
    rates = model.margin_rates(bars)
    mean = float(np.nanmean(rates.im_rate[rates.first_valid_bar:]))
    weights = np.asarray(notionals, dtype=np.float64) / sum(notionals)
    assert capital_cost([MarginSeries(model, bars)], notionals) == float(
        np.mean([float(np.dot(weights, [mean] * 5))]))


def test_capping_in_one_pass_is_numpys_minimum_and_mask() -> None:
    """``cap_rates`` (the capped path of ``margin_rates``) gives ``np.minimum(raw, cap)`` and
    ``raw > cap`` to the bit: NaN stays NaN and is not capped, a rate at the cap is kept."""
    from calibration import _kernels

    rng = np.random.default_rng(3)
    raw = rng.uniform(0.0, 1.5, 1_000)
    raw[:40] = np.nan
    raw[500] = 1.0
    raw[501] = np.inf
    mm, capped = _kernels.cap_rates(raw, 1.0)
    with np.errstate(invalid="ignore"):
        assert capped.tolist() == (raw > 1.0).tolist()
    assert mm.tobytes() == np.minimum(raw, 1.0).tobytes()
    assert mm[500] == 1.0
    assert mm[501] == 1.0
    assert np.isnan(mm[:40]).all()
