"""Crash episodes in the real data: static 1% MM fails, EWMA at 99% / 99.5% fails less.

Every figure asserted here is recomputed by the brute-force loops in tests/reference_*.py,
never copied from the engine's own output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from calibration import CoverageConfig, coverage_backtest, load_bars, make_model
from calibration.windows import StressWindow
from tests.reference_coverage import brute_force_side, window_span

pytestmark = pytest.mark.data


def _ms(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)


@dataclass(frozen=True)
class Episode:
    name: str
    ref: str
    window: StressWindow
    bar_minutes: int
    start: str | None = None
    end: str | None = None

    @property
    def horizon_bars(self) -> int:
        """One hour of bars: the close-out horizon used throughout."""
        return 60 // self.bar_minutes

    def ewma_params(self, confidence: float) -> dict[str, float]:
        """EWMA with a ~2.3 h half-life whatever the bar size."""
        return {
            "decay": 0.995**self.bar_minutes,
            "confidence": confidence,
            "horizon_bars": self.horizon_bars,
            "warmup_bars": 1000,
            "floor_rate": 0.005,
            "apc_buffer": 0.25,
        }


W = StressWindow.from_dates
EPISODES = [
    Episode("btc_2021_05_19", "binance_spot_1m_2021_05/BTCUSDT_1m_2021-04-20_2021-05-20.csv",
            W("may_2021_crash", "2021-05-19"), 1),
    Episode("eth_2021_05_19", "binance_spot_1m_2021_05/ETHUSDT_1m_2021-04-20_2021-05-20.csv",
            W("may_2021_crash", "2021-05-19"), 1),
    Episode("btc_2022_05_luna", "binance_spot_5m_2022H1/BTCUSDT_5m.csv",
            W("luna_ust_2022", "2022-05-09", "2022-05-13"), 5, "2022-03-15", "2022-06-01"),
    Episode("eth_2022_05_luna", "binance_spot_5m_2022H1/ETHUSDT_5m.csv",
            W("luna_ust_2022", "2022-05-09", "2022-05-13"), 5, "2022-03-15", "2022-06-01"),
    Episode("btc_2024_08_05", "binance_spot_btc_1m_2024_08/BTCUSDT_1m_2024-07-26_2024-08-25.csv",
            W("yen_carry_2024", "2024-08-05"), 1),
    Episode("eth_2024_08_05", "binance_usdm_perp_2023_2025/ETHUSDT_perp_15m.csv",
            W("yen_carry_2024", "2024-08-05"), 15, "2024-06-01", "2024-09-01"),
    Episode("btc_2025_10_10", "binance_usdm_perp_5m_2025_10/BTCUSDT_perp_5m.csv",
            W("oct_2025_cascade", "2025-10-10"), 5),
    Episode("eth_2025_10_10", "binance_usdm_perp_5m_2025_10/ETHUSDT_perp_5m.csv",
            W("oct_2025_cascade", "2025-10-10"), 5),
]

STATIC_1PCT = {"base_mmr": 0.01, "tier_growth": 1.0, "bracket_caps_usd": []}


def _load(root: Path, episode: Episode):  # type: ignore[no-untyped-def]
    return load_bars(
        episode.ref, root=root,
        start_ms=_ms(episode.start) if episode.start else None,
        end_ms=_ms(episode.end) if episode.end else None,
    )


def _window_breaches_by_brute_force(bars, model, episode: Episode) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(long, short) breaches in the stress window, recounted by a plain loop."""
    rates = model.margin_rates(bars)
    lo, hi = window_span(bars.timestamp_ms, bars.bar_seconds * 1000, episode.horizon_bars,
                         episode.window.start_ms, episode.window.end_ms)
    lo = max(lo, rates.first_valid_bar)
    hi = min(hi, len(bars) - episode.horizon_bars)
    args = (list(bars.low), list(bars.high), list(bars.close), list(rates.mm_rate),
            episode.horizon_bars)
    long_ = brute_force_side(*args, "long", lo, hi, 1)
    short = brute_force_side(*args, "short", lo, hi, 1)
    return long_.breaches, short.breaches


@pytest.mark.parametrize("episode", EPISODES, ids=lambda e: e.name)
def test_crash_coverage(episode: Episode, shared_data: Path,
                        data_file: Callable[[str], str]) -> None:
    """On the crash day a static 1% MM is breached; EWMA at 99% and 99.5% is breached less."""
    data_file(episode.ref)
    bars = _load(shared_data, episode)
    config = CoverageConfig(horizon_bars=episode.horizon_bars)
    static = make_model("tiered", STATIC_1PCT)
    static_window = coverage_backtest(bars, static, config, [episode.window])[1]
    static_counts = _window_breaches_by_brute_force(bars, static, episode)
    assert (static_window.long.breaches, static_window.short.breaches) == static_counts
    assert sum(static_counts) > 0
    # The crash breaches the static margin far more often than 1% of the time.
    assert static_window.long.traffic_light == "red" or static_window.short.traffic_light == "red"
    for confidence in (0.99, 0.995):
        ewma = make_model("ewma", episode.ewma_params(confidence))
        window = coverage_backtest(bars, ewma, config, [episode.window])[1]
        counts = _window_breaches_by_brute_force(bars, ewma, episode)
        assert (window.long.breaches, window.short.breaches) == counts
        assert sum(counts) < sum(static_counts)


def _liq_config(episode: Episode):  # type: ignore[no-untyped-def]
    from calibration import LiquidationConfig

    per_hour = 60 // episode.bar_minutes
    return LiquidationConfig(
        leverages=(5, 10, 20, 50), notionals_usd=(100_000,), entry_every_bars=per_hour,
        holding_bars=24 * per_hour, latency_bars=1, recovery_bars=per_hour,
        adv_window_bars=24 * per_hour, insurance_fund_usd=100_000.0,
    )


def _crash_cut(episode: Episode) -> tuple[int, int]:
    """Enough bars before the window for the warm-up, and a day after it."""
    bar_ms = episode.bar_minutes * 60_000
    return episode.window.start_ms - 1100 * bar_ms, episode.window.end_ms + 86_400_000


@pytest.mark.slow
@pytest.mark.parametrize("episode", EPISODES, ids=lambda e: e.name)
def test_crash_bad_debt(episode: Episode, shared_data: Path,
                        data_file: Callable[[str], str]) -> None:
    """A static 1% MM leaves bad debt on the crash day; EWMA at 99% / 99.5% leaves less."""
    from calibration import simulate_liquidations
    from tests import reference_liquidation as reference

    data_file(episode.ref)
    start_ms, end_ms = _crash_cut(episode)
    bars = load_bars(episode.ref, root=shared_data, start_ms=start_ms, end_ms=end_ms)
    config = _liq_config(episode)
    w = episode.window

    def bad_debt(family: str, params: dict[str, object]) -> float:
        model = make_model(family, params)
        engine = simulate_liquidations(bars, model, config).metrics(w.name, w.start_ms, w.end_ms)
        brute = reference.metrics(reference.simulate(bars, model, config), w.start_ms, w.end_ms)
        assert engine.liquidations == brute["liquidations"]
        assert engine.premature_liquidations == brute["premature_liquidations"]
        assert engine.bad_debt_usd == pytest.approx(brute["bad_debt_usd"], rel=1e-9, abs=1e-6)
        assert engine.insurance_fund_min_usd == pytest.approx(brute["insurance_fund_min_usd"],
                                                              rel=1e-9, abs=1e-6)
        return engine.bad_debt_usd

    static = bad_debt("tiered", STATIC_1PCT)
    assert static > 0
    for confidence in (0.99, 0.995):
        assert bad_debt("ewma", episode.ewma_params(confidence)) < static


def _premature_by_window_start(bars, ref, recovery: int, first_bar_offset: int) -> int:  # type: ignore[no-untyped-def]
    """Premature liquidations of a brute-force run recounted by a plain loop whose look-ahead
    starts ``first_bar_offset`` bars after the trigger (0: the rule of domain.md §4)."""
    low, high, close = list(bars.low), list(bars.high), list(bars.close)
    n = len(close)
    count = 0
    for p in ref.positions:
        if p.trigger < 0:
            continue
        e, t = p.entry, p.trigger
        # bankruptcy price: equity zero, funding-free (the perp file is read without funding)
        step = close[e] / p.leverage
        bankrupt = close[e] - step if p.side == "long" else close[e] + step
        end = min(t + recovery, n - 1)
        tol = 1e-9 * close[e]
        reached = False
        for u in range(t + first_bar_offset, end + 1):
            if p.side == "long" and low[u] <= bankrupt + tol:
                reached = True
            if p.side == "short" and high[u] >= bankrupt - tol:
                reached = True
        back = close[end] > p.liq_price if p.side == "long" else close[end] < p.liq_price
        count += int(not reached and back)
    return count


PREMATURE_EPISODES = [
    next(e for e in EPISODES if e.name == "eth_2025_10_10"),
    Episode("btc_perp_15m_2024_07_08", "binance_usdm_perp_2023_2025/BTCUSDT_perp_15m.csv",
            W("yen_carry_2024", "2024-08-05"), 15, "2024-07-01", "2024-09-01"),
]


@pytest.mark.parametrize("episode", PREMATURE_EPISODES, ids=lambda e: e.name)
def test_premature_counts_the_trigger_bar(
    episode: Episode, shared_data: Path, data_file: Callable[[str], str]
) -> None:
    """ETH perp 5m around 2025-10-10, BTC perp 15m 2024-07/08: the engine's premature count
    (bars t..t+R, trigger bar included) equals a brute-force loop's, and the trigger bar
    changes real counts."""
    from calibration import simulate_liquidations
    from tests import reference_liquidation as reference

    data_file(episode.ref)
    bars = _load(shared_data, episode)
    assert bars.funding_rate is None  # the loop above prices bankruptcy without funding
    config = _liq_config(episode)
    model = make_model("tiered", {})
    w = episode.window
    result = simulate_liquidations(bars, model, config)
    ref = reference.simulate(bars, model, config)
    for start, end in ((None, None), (w.start_ms, w.end_ms)):
        engine = result.metrics("w", start, end)
        brute = reference.metrics(ref, start, end)
        assert engine.liquidations == brute["liquidations"] > 0
        assert engine.premature_liquidations == brute["premature_liquidations"]
    whole = result.metrics("all", None, None)
    new_rule = _premature_by_window_start(bars, ref, config.recovery_bars, 0)
    old_rule = _premature_by_window_start(bars, ref, config.recovery_bars, 1)
    assert whole.premature_liquidations == new_rule
    # Liquidations whose trigger bar ran through bankruptcy and then recovered: premature by
    # the former rule (bars t+1..t+R), necessary by domain.md §4.
    assert old_rule > new_rule


COINBASE_DAILY = "coinbase_btcusd_daily_2011_2025/BTCUSD_1d.csv"


def test_coinbase_daily_black_thursday_breach_counts_in_its_window(
        shared_data: Path, data_file: Callable[[str], str]) -> None:
    """Coinbase daily: the 41.5% fall from the 2020-03-11 close to the 03-12 low is the
    observation of 03-11, and it counts (breached) in the 2020-03-12..13 window."""
    import pandas as pd

    data_file(COINBASE_DAILY)
    bars = load_bars(COINBASE_DAILY, root=shared_data)
    window = StressWindow.from_dates("black_thursday_2020", "2020-03-12", "2020-03-13")
    flat_5pct = make_model("tiered", {"base_mmr": 0.05, "tier_growth": 1.0,
                                      "bracket_caps_usd": []})
    crash = coverage_backtest(bars, flat_5pct, CoverageConfig(horizon="1d"), [window])[1]
    raw = pd.read_csv(shared_data / COINBASE_DAILY).set_index("timestamp")
    fall = 1 - raw.loc["2020-03-12T00:00:00Z", "low"] / raw.loc["2020-03-11T00:00:00Z", "close"]
    assert fall == pytest.approx(0.415, abs=5e-4)
    assert crash.long.breaches >= 1
    assert crash.long.max_uncovered_loss == pytest.approx(fall - 0.05, rel=1e-12)
    lo, hi = window_span(bars.timestamp_ms, 86_400_000, 1, window.start_ms, window.end_ms)
    rates = flat_5pct.margin_rates(bars)
    ref = brute_force_side(list(bars.low), list(bars.high), list(bars.close),
                           list(rates.mm_rate), 1, "long", lo, hi, 1)
    assert (crash.long.observations, crash.long.breaches) == (ref.observations, ref.breaches)
    assert crash.long.traffic_light == "insufficient"  # 2 daily observations prove nothing


def test_fhs_on_coinbase_daily_is_bounded_and_lets_go(
        shared_data: Path, data_file: Callable[[str], str]) -> None:
    """FHS on 14 years of daily bars: no rate above max_rate, and the one-year stressed
    look-back lets the 2011–2013 crashes go, where a ten-year one still carries them."""
    import numpy as np
    import pandas as pd

    data_file(COINBASE_DAILY)
    bars = load_bars(COINBASE_DAILY, root=shared_data)
    params = {"window_bars": 250, "warmup_bars": 50, "stress_weight": 0.5, "horizon_bars": 2}
    one_year = make_model("fhs", params).margin_rates(bars)
    ten_years = make_model("fhs", {**params, "stress_lookback_bars": 3650}).margin_rates(bars)
    assert np.nanmax(one_year.mm_rate) <= 1.0
    assert np.nanmax(one_year.im_rate) <= 1.0
    capped = make_model("fhs", {**params, "max_rate": 0.3}).margin_rates(bars)
    assert np.nanmax(capped.mm_rate) <= 0.3
    assert capped.capped_bars == int(np.sum(one_year.mm_rate > 0.3))
    years = pd.to_datetime(bars.timestamp_ms, unit="ms").year
    in_2019 = np.asarray(years == 2019)
    assert np.nanmean(one_year.mm_rate[in_2019]) < 0.7 * np.nanmean(ten_years.mm_rate[in_2019])


def test_latency_zero_fills_at_the_trigger_bar_extreme(
    shared_data: Path, data_file: Callable[[str], str]
) -> None:
    """ETH perp 5m around 2025-10-10 with latency_bars = 0: by default every close-out fills at
    its trigger bar's adverse extreme (domain.md §4), as the brute-force loop computes it; the
    optimistic fill at the liquidation price, a named option, hides bad debt the crash left."""
    import dataclasses

    from calibration import simulate_liquidations
    from tests import reference_liquidation as reference

    episode = next(e for e in EPISODES if e.name == "eth_2025_10_10")
    data_file(episode.ref)
    bars = _load(shared_data, episode)
    model = make_model("tiered", {})
    w = episode.window
    low, high = list(bars.low), list(bars.high)
    bad_debt: dict[str, float] = {}
    for basis in ("adverse_extreme", "liquidation_price"):
        config = dataclasses.replace(_liq_config(episode), latency_bars=0, closeout_basis=basis)
        result = simulate_liquidations(bars, model, config)
        ref = reference.simulate(bars, model, config)
        for start, end in ((None, None), (w.start_ms, w.end_ms)):
            engine = result.metrics("w", start, end)
            brute = reference.metrics(ref, start, end)
            assert engine.liquidations == brute["liquidations"] > 0
            assert engine.bad_debt_positions == brute["bad_debt_positions"]
            for key in ("bad_debt_usd", "worst_position_bad_debt_usd", "fees_to_fund_usd",
                        "insurance_fund_min_usd"):
                assert getattr(engine, key) == pytest.approx(brute[key], rel=1e-9, abs=1e-6)
        bad_debt[basis] = result.metrics("w", w.start_ms, w.end_ms).bad_debt_usd
        if basis == "adverse_extreme":
            # slippage is at least the spread, so no fill is better than extreme -/+ spread
            spread = config.spread_rate
            for p in ref.positions:
                if p.trigger < 0:
                    continue
                if p.side == "long":
                    assert p.closeout_price <= low[p.trigger] * (1 - spread)
                else:
                    assert p.closeout_price >= high[p.trigger] * (1 + spread)
    assert bad_debt["adverse_extreme"] > bad_debt["liquidation_price"]
