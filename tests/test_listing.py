"""New listings: proxies rescaled by the vol ratio, the most conservative ES, a novelty buffer."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from calibration import (
    CoverageConfig,
    InvalidParameters,
    LiquidationConfig,
    coverage_backtest,
    load_bars,
    make_model,
    resample,
    simulate_liquidations,
)
from calibration.calibrate import cut
from calibration.listing import ListingConfig, recommend_listing
from tests.conftest import make_bars, random_walk


def _ms(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)


def _es(returns: np.ndarray, q: float) -> float:
    """ES of both sides by a plain sort (independent of the engine's helper)."""
    k = max(1, math.ceil(len(returns) * (1 - q) - 1e-9))
    s = sorted(returns)
    long_es = sum(1 - math.exp(x) for x in s[:k]) / k
    short_es = sum(math.exp(x) - 1 for x in s[-k:]) / k
    return max(long_es, short_es)


def test_proxy_only_listing_by_hand() -> None:
    """With no own history: base = proxy ES of h-bar losses, times 1 + novelty_buffer."""
    proxy = make_bars(random_walk(3000, seed=2, vol=0.01), instrument="P")
    config = ListingConfig(horizon_bars=3, novelty_buffer=0.5, floor_rate=0.0)
    rec = recommend_listing("NEW", None, [proxy], config)
    logc = np.log(proxy.close)
    expected = _es(logc[3:] - logc[:-3], 0.99)
    assert rec.base_rate == pytest.approx(expected, rel=1e-12)
    assert rec.novelty_factor == pytest.approx(1.5)
    assert rec.tiers[0].mmr == pytest.approx(expected * 1.5)
    assert rec.tiers[0].max_leverage == pytest.approx(1 / (2 * expected * 1.5))
    assert rec.proxies[0].vol_ratio == 1.0


def test_vol_ratio_rescales_the_proxy() -> None:
    """An own series twice as volatile as the proxy doubles the proxy's h-bar returns."""
    rng = np.random.default_rng(5)
    r = rng.normal(0, 0.005, 2000)
    proxy = make_bars(100 * np.exp(np.cumsum(r)), instrument="P")
    own_close = 50 * np.exp(np.cumsum(2 * r[-300:]))
    own = make_bars(own_close, start_ms=int(proxy.timestamp_ms[-300]), instrument="O")
    rec = recommend_listing("O", own, [proxy], ListingConfig(horizon_bars=2, min_own_bars=10_000))
    # The proxy's first overlapping return reaches back before the overlap: not exactly 2.
    assert rec.proxies[0].vol_ratio == pytest.approx(2.0, rel=0.02)
    assert rec.proxies[0].overlap_bars == 300


def test_novelty_buffer_decays_with_own_history() -> None:
    """The buffer halves after novelty_halflife_days of own history."""
    proxy = make_bars(random_walk(3000, seed=1), bar_seconds=1800, instrument="P")
    own = make_bars(random_walk(1440, seed=3), bar_seconds=60, instrument="O")  # one day
    proxy60 = make_bars(random_walk(3000, seed=1), bar_seconds=60, instrument="P")
    rec = recommend_listing("O", own, [proxy60],
                            ListingConfig(novelty_buffer=0.4, novelty_halflife_days=1.0))
    assert rec.own_days == pytest.approx(1.0)
    assert rec.novelty_factor == pytest.approx(1.2)
    with pytest.raises(InvalidParameters) as info:
        recommend_listing("O", own, [proxy])  # 60 s own bars against 30-minute proxy bars
    assert info.value.field == "proxies"


def test_no_proxy_is_refused() -> None:
    """A listing without proxies is an InvalidParameters on 'proxies'."""
    with pytest.raises(InvalidParameters) as info:
        recommend_listing("X", None, [])
    assert info.value.field == "proxies"


@pytest.mark.data
def test_sol_with_30_days_and_luna_as_a_new_listing(
    shared_data: Path, data_file: Callable[[str], str]
) -> None:
    """SOL (30 days own history) and LUNA (a week before 2022-05-08) list above BTC; LUNA's
    recommended tiers still fail through the LUNA crash, and the backtest shows where."""
    refs = {name: data_file(f"binance_spot_2020_2025/{name}USDT_30m.csv")
            for name in ("BTC", "ETH", "SOL")}
    luna_ref = data_file("binance_spot_luna_1m_2022_05/LUNAUSDT_1m_2022-05.csv")
    bars = {n: load_bars(r, root=shared_data, instrument=n) for n, r in refs.items()}
    # SOL: 30 days of own history up to 2024-08-01, BTC and ETH as proxies.
    sol_end = _ms("2024-08-01")
    sol_own = cut(bars["SOL"], sol_end - 30 * 86_400_000, sol_end)
    proxies = [cut(bars["BTC"], None, sol_end), cut(bars["ETH"], None, sol_end)]
    sol = recommend_listing("SOL", sol_own, proxies)
    assert sol.own_days == pytest.approx(30.0, abs=0.1)
    assert all(p.vol_ratio > 1 for p in sol.proxies)  # SOL moved more than BTC and ETH
    # BTC's own rate, with its whole history and no novelty buffer, is the yardstick.
    end = _ms("2022-05-08")
    btc = recommend_listing("BTC", cut(bars["BTC"], None, end), [cut(bars["ETH"], None, end)],
                            ListingConfig(novelty_buffer=0.0))
    assert sol.tiers[0].mmr > 1.5 * btc.tiers[0].mmr
    # LUNA, relaunched later: cut at the halt; 30-minute bars like the proxies.
    luna = resample(load_bars(luna_ref, root=shared_data, instrument="LUNA",
                              end_ms=_ms("2022-05-13")), 1800)
    rec = recommend_listing("LUNA", cut(luna, None, end),
                            [cut(bars["BTC"], None, end), cut(bars["ETH"], None, end)])
    assert rec.tiers[0].mmr > 2 * btc.tiers[0].mmr  # well above BTC's
    assert rec.novelty_factor > 1.4  # a week of history: most of the buffer remains
    # Backtest the recommendation through the crash: where would it have failed?
    model = make_model("tiered", rec.params)
    crash = cut(luna, end, None)
    cov = coverage_backtest(crash, model, CoverageConfig(horizon_bars=4, notional_usd=10_000))
    assert cov[0].long.breaches > 0
    assert cov[0].long.max_uncovered_loss > 0.5  # LUNA fell through any margin
    liq = simulate_liquidations(crash, model, LiquidationConfig(
        leverages=(2, 3), notionals_usd=(10_000,), entry_every_bars=12, holding_bars=96,
        adv_window_bars=48))
    days = {}
    for day in ("2022-05-09", "2022-05-10", "2022-05-11", "2022-05-12"):
        m = liq.metrics(day, _ms(day), _ms(day) + 86_400_000)
        days[day] = m.bad_debt_usd
    assert sum(days.values()) > 0
    assert max(days, key=lambda d: days[d]) in ("2022-05-10", "2022-05-11", "2022-05-12")


def test_listing_states_its_horizon_and_refuses_two() -> None:
    """A listing takes its ES over one horizon: 1h is 2 bars of 30 minutes, stated in the
    result; 1h and 4 bars at once are refused, the second named."""
    proxy = make_bars(random_walk(3000, seed=8), bar_seconds=1800, instrument="BTC")
    result = recommend_listing("NEW", None, [proxy], ListingConfig(horizon="1h"))
    assert (result.horizon_bars, result.horizon) == (2, "1h")
    same = recommend_listing("NEW", None, [proxy], ListingConfig(horizon_bars=2))
    assert same.base_rate == result.base_rate
    with pytest.raises(InvalidParameters) as info:
        recommend_listing("NEW", None, [proxy], ListingConfig(horizon_bars=4, horizon="1h"))
    assert info.value.field == "horizon"
