"""Evidence per volatility regime (domain.md §11; issue 14 item 3): the classification and
the per-regime coverage against loops written here, and on real BTC bars the regimes adding
up to the engine's own totals, the constraint agreeing with the traffic lights."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from calibration.calibrate import calibrate, evaluate, prepare
from calibration.calibrate._regimes import (
    classify,
    regime_coverage,
    side_losses,
    trailing_volatility,
)
from calibration.spec import CalibrationSpec, decode_spec
from tests.conftest import walk_frame

BTC = "binance_spot_2020_2025/BTCUSDT_30m.csv"
PARAMS = {"decay": 0.95, "floor_rate": 0.012, "confidence": 0.99, "apc_buffer": 0.5,
          "warmup_bars": 300, "horizon_bars": 2}


def test_trailing_volatility_and_terciles_by_hand() -> None:
    """Volatility at bar t is the population standard deviation of the w log returns ending
    at t (a loop with ``statistics.pstdev``); terciles split the defined bars in three."""
    close = np.array([100.0, 101.0, 99.0, 102.0, 98.0, 103.0, 103.5, 97.0, 100.0])
    w = 3
    vol = trailing_volatility(close, w)
    for t in range(len(close)):
        if t < w:
            assert math.isnan(vol[t])
        else:
            returns = [math.log(close[i] / close[i - 1]) for i in range(t - w + 1, t + 1)]
            assert vol[t] == pytest.approx(statistics.pstdev(returns))
    labels = classify(np.array([np.nan, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert labels.tolist() == [-1, 0, 0, 1, 1, 2, 2]


def test_trailing_volatility_on_a_month_of_minutes_equals_the_window_by_window_std(
        shared_data: Path) -> None:
    """On real one-minute closes with a one-day window, the sliding kernel gives numpy's
    window-by-window population std (each window materialised) to 1e-10 (4e-15 away from the
    flat end), and the same terciles; flat stretches (no return) give exactly 0."""
    from calibration.data import load_bars

    bars = load_bars("binance_spot_btc_1m_2024_08/BTCUSDT_1m_2024-07-26_2024-08-25.csv",
                     root=shared_data)
    close = np.r_[bars.close[:20_000], np.full(3000, bars.close[19_999])]
    w = 1440
    vol = trailing_volatility(close, w)
    reference = np.full(close.shape[0], np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(np.diff(np.log(close)), w)
    reference[w:] = windows.std(axis=1)
    assert np.array_equal(np.isnan(vol), np.isnan(reference))
    assert np.allclose(vol, reference, rtol=1e-10, atol=1e-18, equal_nan=True)
    assert np.array_equal(classify(vol), classify(reference))
    assert (vol[-(3000 - w):] == 0.0).all()


def test_regime_coverage_counts_by_hand() -> None:
    """Per regime and side: the observations with a margin and a full horizon, and the
    breaches (loss above margin), counted in a loop over the bars."""
    bars = walk_frame(400, seed=4)
    from calibration.data import bars_from_frame

    series = bars_from_frame(bars, instrument="SYN")
    h = 3
    long, short = side_losses(series, h)
    rng = np.random.default_rng(1)
    margin = rng.uniform(0.002, 0.02, len(series))
    margin[:20] = np.nan
    labels = classify(trailing_volatility(series.close, 24))
    out = regime_coverage(labels, margin, (long, short), 0.01)
    low, high, close = series.low, series.high, series.close
    for code, name in enumerate(("calm", "normal", "turbulent")):
        for side in ("long", "short"):
            n = x = 0
            for t in range(len(close) - h):
                if labels[t] != code or math.isnan(margin[t]):
                    continue
                if side == "long":
                    loss = 1 - min(low[t + 1:t + h + 1]) / close[t]
                else:
                    loss = max(high[t + 1:t + h + 1]) / close[t] - 1
                n += 1
                x += loss > margin[t]
            assert out[name][side]["observations"] == n
            assert out[name][side]["breaches"] == x


def _spec(**overrides: Any) -> CalibrationSpec:
    raw: dict[str, Any] = {
        "data": [{"instrument": "BTCUSDT", "ref": BTC, "start": "2022-09-01",
                  "end": "2022-12-31"}],
        "model": "ewma",
        "search_space": {"decay": {"low": 0.93, "high": 0.99},
                         "floor_rate": {"low": 0.012, "high": 0.034, "log": True},
                         "confidence": {"value": 0.99}, "apc_buffer": {"value": 0.5},
                         "horizon_bars": {"value": 2}, "warmup_bars": {"value": 300}},
        "constraints": {"kupiec_alpha": None, "no_red_in_stress_windows": False,
                        "max_premature_share": None, "no_red_light_in_any_regime": True},
        "walk_forward": {"in_sample_end": "2022-12-01", "folds": 1},
        "stress_windows": [{"name": "ftx_2022", "start": "2022-11-08", "end": "2022-11-10"}],
        "n_trials": 12,
        "seed": 2,
    }
    raw.update(overrides)
    return decode_spec(msgspec.json.encode(raw))


@pytest.fixture(scope="module")
def root(shared_data: Path, data_file: Callable[[str], str]) -> Path:
    """The data root, once the BTC file is known to be there."""
    data_file(BTC)
    return shared_data


def test_regimes_add_up_to_the_engines_totals(root: Path) -> None:
    """On real BTC bars the regimes' observations plus the unclassified bars' are the
    coverage engine's, and their liquidations the simulation's."""
    prepared = prepare(_spec(), root)
    full = evaluate(prepared, PARAMS, full=True)
    evidence = full.regimes["BTCUSDT"]
    head = full.coverage["BTCUSDT"][0]
    bars = prepared.full[0]
    labels = classify(trailing_volatility(bars.close, evidence["window_bars"]))
    from calibration.models import make_model

    margin = make_model("ewma", PARAMS).with_horizon(2).margin_rates(bars).mm_rate
    long, _ = side_losses(bars, 2)
    unclassified = int(((labels < 0) & np.isfinite(margin) & np.isfinite(long)).sum())
    observed = sum(r["long"]["observations"] for r in evidence["regimes"].values())
    assert observed + unclassified == head.long.observations
    breaches = sum(r["long"]["breaches"] for r in evidence["regimes"].values())
    outside = (labels < 0) & np.isfinite(margin) & np.isfinite(long)
    assert breaches + int((long[outside] > margin[outside]).sum()) == head.long.breaches
    liquidations = sum(r["liquidations"] for r in evidence["regimes"].values())
    assert liquidations <= full.liquidation["BTCUSDT"][0].liquidations
    assert liquidations > 0
    corr = evidence["volatility_margin_call_correlation"]
    assert corr is not None
    assert -1.0 <= corr <= 1.0
    # The trial's constraint is positive exactly when an in-sample regime shows red.
    trial = evaluate(prepared, PARAMS)
    in_sample_bars = prepared.in_sample[0]
    in_margin = make_model("ewma", PARAMS).with_horizon(2).margin_rates(in_sample_bars).mm_rate
    mine = regime_coverage(
        classify(trailing_volatility(in_sample_bars.close, evidence["window_bars"])),
        in_margin, side_losses(in_sample_bars, 2), head.long.expected_breach_rate)
    red = any(r[side]["traffic_light"] == "red" for r in mine.values()
              for side in ("long", "short"))
    assert (trial.constraints["red_light_in_regime"] > 0) == red


def test_every_recommendation_carries_its_regimes(root: Path) -> None:
    """A calibration with ``no_red_light_in_any_regime`` lists the constraint and the
    recommendation's evidence per regime."""
    result = calibrate(_spec(), root=root)
    rec = result.recommendation
    assert rec is not None
    assert "red_light_in_regime" in rec.constraints
    regimes = rec.regimes["BTCUSDT"]["regimes"]
    assert set(regimes) == {"calm", "normal", "turbulent"}
    # Terciles: the three regimes hold a third of the classified bars each (± ties).
    sizes = [r["bars"] for r in regimes.values()]
    assert max(sizes) - min(sizes) <= 2
