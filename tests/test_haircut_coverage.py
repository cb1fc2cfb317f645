"""Haircut coverage backtest (domain.md §9): hand cases, and real BTC bars with Binance's
order-book depth through 2025-10-10 against a plain loop written here."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from calibration import BarSeries, load_bars
from calibration._errors import InvalidParameters
from calibration.accounts import haircut_coverage
from calibration.accounts._haircuts import BINANCE_BTC, flat, tiered
from calibration.data import load_book_depth, with_depth
from calibration.stats import kupiec_lr, traffic_light
from calibration.windows import StressWindow

T0 = 1_600_000_000_000
MIN = 60_000


def _bars(lows: list[float], closes: list[float], volume: float | None = None) -> BarSeries:
    c = np.array(closes, dtype=np.float64)
    lo = np.array(lows, dtype=np.float64)
    return BarSeries(instrument="BTCUSDT", timestamp_ms=T0 + np.arange(len(c)) * MIN,
                     open=c.copy(), high=np.maximum(c, lo), low=lo, close=c,
                     volume=None if volume is None else np.full(len(c), volume),
                     bar_seconds=60, fingerprint="hand", source="hand")


def test_flat_haircut_by_hand() -> None:
    """Closes 100, lows dip to 95 at bar 2, 88 at bar 4; h = 2, a flat 0.9 ratio, spread
    0.5%. Observation t sells at min(low over t+1..t+2) / C_t: t=0 → 0.95·0.995 = 0.945
    (covers 0.9), t=1 → 0.95 (covers), t=2 → 0.88·0.995 = 0.8756 (breach, shortfall 0.0244
    of 1M = 24,400 USD), t=3 → 0.8756 (breach). Four observations, two breaches."""
    bars = _bars([100, 100, 95, 100, 88, 100], [100] * 6)
    rows = haircut_coverage(bars, flat(0.9), holdings_usd=[1_000_000], liquidation_bars=2,
                            spread_rate=0.005)
    (row,) = rows
    assert row.observations == 4
    assert row.breaches == 2
    assert row.breach_rate == 0.5
    assert row.haircut_value_usd == pytest.approx(900_000)
    assert row.max_shortfall_usd == pytest.approx(900_000 - 1_000_000 * 0.88 * 0.995)
    assert row.worst_at == "2020-09-13T12:28:40Z"  # bar 2 (T0 + 2 minutes)
    assert row.kupiec_lr == pytest.approx(kupiec_lr(4, 2, 0.01))
    assert row.traffic_light == traffic_light(4, 2, 0.01)
    step = haircut_coverage(bars, flat(0.9), holdings_usd=[1_000_000], liquidation_bars=2,
                            spread_rate=0.005, overlapping=False)
    assert (step[0].observations, step[0].breaches) == (2, 1)  # t = 0, 2


def test_tiered_value_and_impact_by_hand() -> None:
    """The Binance BTC schedule counts 120M at 100M·1 + 20M·0.975 = 119.5M (the §9 worked
    example); with a 1% fall and impact 0.1·√(120M / 1.2B) = 3.16% the sale fetches
    120M·0.99·(1 − 0.0316) = 115.04M: a breach of 4.46M; the next observation sells at 100,
    116.2M, a breach too. Depth from volume: 1,000,000 units × 100 traded per 1-minute bar ×
    1,440 bars a day × 1/120 = 1.2B."""
    bars = _bars([100, 99, 100], [100, 100, 100], volume=1_000_000)
    (row,) = haircut_coverage(bars, BINANCE_BTC, holdings_usd=[120e6], liquidation_bars=1,
                              spread_rate=0.0, impact_coef=0.1, depth_fraction_of_adv=1 / 120,
                              adv_window_bars=1)
    assert row.haircut_value_usd == pytest.approx(119.5e6)
    realised = 120e6 * 0.99 * (1 - 0.1 * math.sqrt(0.1))
    assert row.observations == 2
    assert row.breaches == 2
    assert row.max_shortfall_usd == pytest.approx(119.5e6 - realised)


def test_bad_input_is_refused_naming_the_field() -> None:
    bars = _bars([100] * 4, [100] * 4)
    for kwargs, field in (({"holdings_usd": []}, "holdings_usd"),
                          ({"holdings_usd": [-1]}, "holdings_usd"),
                          ({"holdings_usd": [1], "liquidation_bars": 0}, "liquidation_bars"),
                          ({"holdings_usd": [1], "impact_coef": 0.1}, "impact_coef")):
        with pytest.raises(InvalidParameters) as err:
            haircut_coverage(bars, flat(0.9), **{"liquidation_bars": 1, **kwargs})
        assert err.value.field == field


def _loop(bars: BarSeries, caps: list[float], ratios: list[float], holding: float, h: int,
          spread: float, coef: float, depth: list[float]) -> tuple[int, int, float]:
    """Plain Python: observations, breaches and the largest shortfall."""
    def value(v: float) -> float:
        total, lower = 0.0, 0.0
        for cap, ratio in zip([*caps, math.inf], ratios, strict=True):
            if v > lower:
                total += (min(v, cap) - lower) * ratio
            lower = cap
        return total

    obs = hits = 0
    worst = 0.0
    for t in range(len(bars) - h):
        lowest = min(float(bars.low[t + j]) for j in range(1, h + 1))
        slip = min(1.0, spread + coef * math.sqrt(holding / depth[t]))
        sold = holding * lowest / float(bars.close[t]) * (1 - slip)
        obs += 1
        if sold < value(holding):
            hits += 1
            worst = max(worst, value(holding) - sold)
    return obs, hits, worst


def test_real_btc_with_binance_depth_through_2025_10_10(
        data_file: Callable[[str], str], shared_data: Path) -> None:
    """Binance USD-M BTC 5-minute bars of 2025-10-10 with its bookDepth bands (the ±1% bid
    band), a tiered schedule, holdings 10M / 100M, a one-hour sale with impact: the engine's
    counts and worst shortfall equal a plain loop's, and the crash evening breaches where the
    quiet morning does not."""
    ref = data_file("binance_usdm_perp_5m_2025_10/BTCUSDT_perp_5m.csv")
    depth_ref = data_file("btc_2025_10_10_crash_microstructure/BTCUSDT-bookDepth-2025-10-10.csv")
    start = 1_760_054_400_000  # 2025-10-10T00:00Z
    bars = load_bars(ref, root=shared_data, start_ms=start, end_ms=start + 86_400_000)
    bars = with_depth(bars, load_book_depth(depth_ref, root=shared_data))
    schedule = tiered((20e6, 50e6), (0.98, 0.95, 0.9))
    evening = StressWindow.from_dates("oct_2025_cascade", "2025-10-10")
    rows = haircut_coverage(bars, schedule, holdings_usd=[10e6, 100e6], liquidation_bars=12,
                            spread_rate=0.0005, impact_coef=0.1, stress_windows=[evening])
    traded = np.asarray(bars.volume) * np.asarray(bars.close)
    adv = [float(np.mean(traded[max(0, t - 287):t + 1])) * 288 * 0.01 for t in range(len(bars))]
    book = np.asarray(bars.bid_depth_usd)
    depth = [adv[t] if math.isnan(book[t]) else float(book[t]) for t in range(len(bars))]
    for row in (r for r in rows if r.window == "all"):
        obs, hits, worst = _loop(bars, [20e6, 50e6], [0.98, 0.95, 0.9], row.holding_usd, 12,
                                 0.0005, 0.1, depth)
        assert (row.observations, row.breaches) == (obs, hits)
        assert row.max_shortfall_usd == pytest.approx(worst, rel=1e-9)
    big = next(r for r in rows if r.window == "all" and r.holding_usd == 100e6)
    assert big.breaches > 0
    assert big.worst_at is not None
    assert big.worst_at.startswith("2025-10-10T2")  # the crash came after 20:00 UTC
