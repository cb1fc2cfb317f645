"""Haircut-tier calibration (domain.md §9) on real BTC and ETH bars through 2025-10-10."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from calibration import load_bars
from calibration.accounts import calibrate_haircut_tiers, haircut_coverage
from calibration.accounts._haircut_calibration import green_limit
from calibration.accounts._haircuts import BINANCE_BTC
from calibration.data import load_book_depth, with_depth
from calibration.stats import traffic_light
from calibration.windows import StressWindow


def test_green_limit_matches_the_basel_zones() -> None:
    """domain.md §3: n=250, p=1% is green for 0-4 breaches; n=500 / 1000 at 1% yellow from
    9 / 15; and the limit agrees with the traffic light around it."""
    assert green_limit(250, 0.01) == 4
    assert green_limit(500, 0.01) == 8
    assert green_limit(1000, 0.01) == 14
    for n in (50, 250, 1234, 11_111):
        x = green_limit(n, 0.01)
        assert traffic_light(n, x, 0.01) == "green"
        assert traffic_light(n, x + 1, 0.01) != "green"
    assert green_limit(0, 0.01) == -1


@pytest.mark.parametrize("instrument", ["BTCUSDT", "ETHUSDT"])
def test_tiers_on_october_2025_are_monotone_and_pass_their_coverage_test(
        instrument: str, data_file: Callable[[str], str], shared_data: Path) -> None:
    """Binance USD-M 5-minute bars of October 2025 (BTC with its 2025-10-10 order-book depth;
    ETH on 1% of traded volume), Binance's BTC band caps, a one-hour sale with impact: the
    recommended ratios never rise with the holding, every holding's coverage test over the
    whole sample is green (recomputed here with ``haircut_coverage``), the search is
    reproducible from its seed, and the Binance preset is evaluated beside it."""
    bars = load_bars(data_file(f"binance_usdm_perp_5m_2025_10/{instrument}_perp_5m.csv"),
                     root=shared_data)
    if instrument == "BTCUSDT":
        bars = with_depth(bars, load_book_depth(data_file(
            "btc_2025_10_10_crash_microstructure/BTCUSDT-bookDepth-2025-10-10.csv"),
            root=shared_data))
    caps = (100e6, 120e6, 150e6, 180e6, 200e6)
    settings = {"impact_coef": 0.1, "spread_rate": 0.0005}
    crash = [StressWindow.from_dates("oct_2025_cascade", "2025-10-10")]
    result = calibrate_haircut_tiers(bars, caps_usd=caps, liquidation_bars=12, n_trials=40,
                                     seed=1, coverage_settings=settings,
                                     stress_windows=crash, presets={"binance_btc": BINANCE_BTC})
    assert result.schedule is not None
    assert result.feasible_trials > 0
    ratios = result.schedule.ratios
    assert all(b <= a for a, b in itertools.pairwise(ratios))
    assert 0 <= ratios[-1] <= ratios[0] <= 1
    again = haircut_coverage(bars, result.schedule, holdings_usd=result.holdings_usd,
                             liquidation_bars=12, stress_windows=crash, **settings)
    assert again == result.coverage
    for row in (r for r in again if r.window == "all"):
        assert row.traffic_light == "green", row
        assert row.breaches <= green_limit(row.observations, 0.01)
    assert result.held_back_usd == pytest.approx(
        sum(v - result.schedule.value_usd(v) for v in result.holdings_usd))
    held, rows = result.presets["binance_btc"]
    assert held == pytest.approx(sum(v - BINANCE_BTC.value_usd(v)
                                     for v in result.holdings_usd))
    assert {r.window for r in rows} == {"all", "oct_2025_cascade"}
    repeat = calibrate_haircut_tiers(bars, caps_usd=caps, liquidation_bars=12, n_trials=40,
                                     seed=1, coverage_settings=settings, stress_windows=crash)
    assert repeat.schedule == result.schedule
