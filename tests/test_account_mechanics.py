"""Account mechanics (domain.md §4, §7, §10): funding, impact per instrument, a shared cascade
and the liquidation policies; hand cases, the brute-force loop on real data, §4 equivalence."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibration import InvalidParameters, load_bars, make_model
from calibration._bars import BarSeries
from calibration.accounts import (
    POLICIES,
    Account,
    AccountConfig,
    Market,
    compare_policies,
    least_loss,
    simulate_accounts,
    underlying_of,
)
from calibration.data import load_funding, with_funding
from calibration.liquidation import ExplicitPosition, LiquidationConfig, simulate_liquidations
from calibration.models import PortfolioMarginModel, TieredMargin, make_portfolio_model
from tests import reference_accounts as ref
from tests import reference_models as ref_models
from tests import reference_portfolio as ref_pf
from tests.test_accounts import FLAT, FLAT_1PCT, LUNA_30M, MIN, T0, _books, series

ONE_PCT = TieredMargin(**FLAT_1PCT)


def _bars(name: str, rows: list[tuple[float, ...]], **extra: object) -> BarSeries:
    b = series(name, [tuple(float(x) for x in r) for r in rows])  # type: ignore[misc]
    return dataclasses.replace(b, **extra, _cache={}) if extra else b  # type: ignore[arg-type]


def _run(market: Market, accounts: list[Account], **cfg: object):  # type: ignore[no-untyped-def]
    base = {"holding_bars": 4, "latency_bars": 0}
    return simulate_accounts(market, ONE_PCT, accounts,
                             AccountConfig(**{**base, **cfg}))  # type: ignore[arg-type]


# --- hand cases -------------------------------------------------------------------------

def _two_leg_market() -> Market:
    """A gaps to 90 at bar 3; B stays at 100 until it gaps to 50 at bar 5."""
    a = [FLAT] * 3 + [(90,) * 4] * 4
    b = [FLAT] * 5 + [(50,) * 4] * 2
    return Market.from_series([_bars("AUSDT", a), _bars("BUSDT", b)])


TWO_LEG = Account(id="x", entry_ms=T0 + 2 * MIN, collateral={"USDT": 1050.0},
                  positions={"AUSDT": 10_000.0, "BUSDT": 1_000.0})


def test_policies_by_hand_on_a_two_leg_book() -> None:
    """1,050 USD behind long A 10,000 and long B 1,000, 1% MM. Bar 3: A −1,000, equity 50 ≤
    MM 100. close_all: everything at bar 3, equity 50. largest_requirement_first: A first
    (MM 90), then 50 > B's MM 10: restored, B kept; B gaps to 50 at bar 5: 50 − 500 = −450,
    bad debt 450. partial (½, cooldown 1): bar 3 half of each, estimate 50 = MM 50, not
    restored; bar 4 the rest: equity 50. hedge_preserving: A and B are different assets, all
    residual: as close_all."""
    market = _two_leg_market()
    got = {p: _run(market, [TWO_LEG], policy=p, partial_fraction=0.5) for p in POLICIES}
    for p, r in got.items():
        assert r.trigger_bar.tolist() == [3], p
    assert got["close_all"].closeout_equity_usd.tolist() == pytest.approx([50.0])
    lrf = got["largest_requirement_first"]
    assert (lrf.bad_debt_usd.tolist(), lrf.steps.tolist(), lrf.closeout_bar.tolist()) == (
        pytest.approx([450.0]), [2], [5])
    assert lrf.leg_closed_usd.tolist() == pytest.approx([9_000.0, 500.0])
    part = got["partial"]
    assert (part.steps.tolist(), part.closeout_bar.tolist()) == ([2], [4])
    assert part.closeout_equity_usd.tolist() == pytest.approx([50.0])
    assert part.leg_closed_usd.tolist() == pytest.approx([9_000.0, 1_000.0])
    hedge = got["hedge_preserving"]
    assert hedge.closeout_equity_usd.tolist() == pytest.approx([50.0])
    assert hedge.leg_closed_usd.tolist() == pytest.approx([9_000.0, 1_000.0])
    rows = compare_policies(market, ONE_PCT, [TWO_LEG], AccountConfig(
        holding_bars=4, latency_bars=0, partial_fraction=0.5))
    assert [r["bad_debt_usd"] for r in rows] == pytest.approx([0.0, 450.0, 0.0, 0.0])
    assert [r["liquidated_notional_usd"] for r in rows] == pytest.approx(
        [10_000.0, 9_500.0, 10_000.0, 10_000.0])
    assert least_loss(rows) == "close_all"


def test_hedge_preserving_unwinds_only_the_residual() -> None:
    """Two instruments on BTC: long 10,000 and short 6,000, 540 USD. Both gap to 90: −1,000 +
    600, equity 140 ≤ MM 90 + 54. The residual is 40 units long: 40 of the long's 100 units
    close (−400 at 90), and 140 > MM 54 + 54 of the 60/60 pair left: restored. A later fall to
    50 leaves the hedged pair's equity at 140 > MM 60: no further step, no bad debt, while the
    pair is kept (3,600 USD closed, against 14,400 under close_all)."""
    rows_ = [FLAT] * 3 + [(90,) * 4] * 2 + [(50,) * 4] * 2
    market = Market.from_series([_bars("BTCUSDT", rows_), _bars("BTC-PERP", rows_)])
    acc = Account(id="pair", entry_ms=T0 + 2 * MIN, collateral={"USDT": 540.0},
                  positions={"BTCUSDT": 10_000.0, "BTC-PERP": -6_000.0})
    hedge = _run(market, [acc], policy="hedge_preserving")
    assert hedge.trigger_bar.tolist() == [3]
    assert hedge.steps.tolist() == [1]
    assert hedge.leg_closed_usd.tolist() == pytest.approx([3_600.0, 0.0])
    assert hedge.closeout_equity_usd.tolist() == pytest.approx([140.0])
    assert hedge.bad_debt_usd.tolist() == [0.0]
    assert hedge.leg_liquidated.tolist() == [True, False]
    closed = _run(market, [acc], policy="close_all", funding=True)  # no funding data: core
    assert closed.leg_closed_usd.tolist() == pytest.approx([9_000.0, 5_400.0])


def test_funding_settles_on_the_current_notional() -> None:
    """A long of 100 units at 100 with 125 USD; funding 0.001 per bar from bar 3 on a close of
    100 costs 10 USD a bar: equity 115, 105, then 95 ≤ MM 100 at bar 5. Without the switch
    (or without funding data) it never triggers."""
    rate = np.array([0, 0, 0, 0.001, 0.001, 0.001, 0.0])
    market = Market.from_series([_bars("AUSDT", [FLAT] * 7, funding_rate=rate)])
    acc = Account(id="f", entry_ms=T0 + 2 * MIN, collateral={"USDT": 125.0},
                  positions={"AUSDT": 10_000.0})
    on = _run(market, [acc], funding=True)
    assert on.trigger_bar.tolist() == [5]
    assert on.closeout_equity_usd.tolist() == pytest.approx([95.0])
    assert on.leg_pnl_usd.tolist() == pytest.approx([-30.0])
    assert _run(market, [acc]).trigger_bar.tolist() == [-1]
    short = Account(id="s", entry_ms=T0 + 2 * MIN, collateral={"USDT": 101.0},
                    positions={"AUSDT": -10_000.0})
    assert _run(market, [short], funding=True).trigger_bar.tolist() == [-1]  # shorts receive


def test_impact_per_instrument_from_depth() -> None:
    """Long 10,000 at 100 closed at 80 against 40,000 of bid depth: slippage 0.01·√¼ = 0.5%
    of 8,000 = 40; equity 1,000 − 2,000 − 40 = −1,040. A short on B with 10,000 of ask depth
    pays its own instrument's 0.01·√1 = 1% of its close-out notional."""
    depth = np.full(6, 40_000.0)
    thin = np.full(6, 10_000.0)
    a = _bars("AUSDT", [FLAT] * 3 + [(80,) * 4] * 3, bid_depth_usd=depth, ask_depth_usd=depth)
    b = _bars("BUSDT", [FLAT] * 3 + [(120,) * 4] * 3, bid_depth_usd=thin, ask_depth_usd=thin)
    market = Market.from_series([a, b])
    acc = Account(id="i", entry_ms=T0 + 2 * MIN, collateral={"USDT": 1_000.0},
                  positions={"AUSDT": 10_000.0})
    r = _run(market, [acc], impact_coef=0.01)
    assert r.bad_debt_usd.tolist() == pytest.approx([1_040.0])
    s = Account(id="s", entry_ms=T0 + 2 * MIN, collateral={"USDT": 1_000.0},
                positions={"BUSDT": -10_000.0})
    r = _run(market, [s], impact_coef=0.01)
    assert r.bad_debt_usd.tolist() == pytest.approx([1_000.0 + 0.01 * 12_000.0])


def test_cascade_is_shared_across_instruments_and_accounts() -> None:
    """κ = 1, depth 100,000. Bar 3 (A's low 95) liquidates account 1 (long A 10,000, 550
    USD): bar 4's low of A moves 10% to 90, which liquidates account 2 (A 5,000 + B 5,000,
    590 USD: 590 − 500 = 90 ≤ 95); its 5,000 of B moves B's bar 5 low to 95, which liquidates
    account 3 (long B 10,000, 540 USD: 40 ≤ 95). Without the cascade only account 1 is."""
    depth = np.full(7, 100_000.0)
    a = _bars("AUSDT", [FLAT] * 3 + [(100, 100, 95, 100)] + [FLAT] * 3, bid_depth_usd=depth,
              ask_depth_usd=depth)
    b = _bars("BUSDT", [FLAT] * 7, bid_depth_usd=depth, ask_depth_usd=depth)
    market = Market.from_series([a, b])
    e = T0 + 2 * MIN
    books = [Account(id="1", entry_ms=e, collateral={"USDT": 550.0},
                     positions={"AUSDT": 10_000.0}),
             Account(id="2", entry_ms=e, collateral={"USDT": 590.0},
                     positions={"AUSDT": 5_000.0, "BUSDT": 5_000.0}),
             Account(id="3", entry_ms=e, collateral={"USDT": 540.0},
                     positions={"BUSDT": 10_000.0})]
    on = _run(market, books, cascade=True, cascade_kappa=1.0)
    assert on.trigger_bar.tolist() == [3, 4, 5]
    assert on.closeout_equity_usd.tolist() == pytest.approx([50.0, 90.0, 40.0])
    assert _run(market, books).trigger_bar.tolist() == [3, -1, -1]


def test_default_settings_are_the_core_bit_for_bit(shared_data: Path,
                                                   data_file: Callable[[str], str]) -> None:
    """The mechanics kernel with the core settings (close_all, no funding, impact or cascade)
    gives the core kernel's figures exactly on real BTC/ETH/SOL data, twins included."""
    for r in LUNA_30M:
        data_file(r)
    market = _luna_market_data(shared_data)
    books = _books(market, seed=11)
    model = make_model("tiered", {"base_mmr": 0.02, "tier_growth": 1.5,
                                  "bracket_caps_usd": [50_000, 250_000]})
    for latency in (0, 1):
        cfg = AccountConfig(holding_bars=96, latency_bars=latency, spread_rate=0.001,
                            liquidation_fee_rate=0.005)
        core = simulate_accounts(market, model, books, cfg)
        mech = simulate_accounts(market, model, books, cfg, mechanics_kernel=True)
        for name in ("trigger_bar", "closeout_equity_usd", "bad_debt_usd", "fee_usd",
                     "twin_trigger_bar", "twin_bad_debt_usd", "leg_pnl_usd"):
            np.testing.assert_array_equal(getattr(mech, name), getattr(core, name), name)
        hit = core.trigger_bar >= 0  # the core leaves the close-out bar unset without one
        np.testing.assert_array_equal(mech.closeout_bar[hit], core.closeout_bar[hit])
        assert (core.trigger_bar >= 0).sum() > 5


pytestmark = pytest.mark.filterwarnings("error")


def _luna_market_data(root: Path) -> Market:
    start, end = 1_651_363_200_000, 1_653_782_400_000
    return Market.from_series([load_bars(r, root=root, start_ms=start, end_ms=end)
                               for r in LUNA_30M])


PERP_5M = ("binance_usdm_perp_5m_2025_10/BTCUSDT_perp_5m.csv",
           "binance_usdm_perp_5m_2025_10/ETHUSDT_perp_5m.csv")
FUNDING_8H = ("binance_usdm_perp_5m_2025_10/BTCUSDT_funding_8h.csv",
              "binance_usdm_perp_5m_2025_10/ETHUSDT_funding_8h.csv")


def _perp_market(root: Path) -> Market:
    """BTC and ETH USD-M perpetuals, 5-minute, 2025-10-08..10-13, with 8h funding."""
    start, end = 1_759_881_600_000, 1_760_313_600_000
    series_ = []
    for bars_ref, funding_ref in zip(PERP_5M, FUNDING_8H, strict=True):
        bars = load_bars(bars_ref, root=root, start_ms=start, end_ms=end)
        series_.append(with_funding(bars, load_funding(funding_ref, root=root)))
    return Market.from_series(series_)


def _perp_books(market: Market, seed: int) -> list[Account]:
    """Directional, cross-asset pairs, same-asset-free baskets, stable and BTC collateral,
    10x-60x, some opened right before the 10-10 crash."""
    rng = np.random.default_rng(seed)
    ts = market.timestamp_ms
    names = market.instruments
    out = []
    crash = int(np.searchsorted(ts, 1_760_115_600_000))  # 2025-10-10 17:00Z
    for j in range(80):
        e = int(rng.integers(crash - 200, crash)) if j % 2 else int(rng.integers(0, len(ts) - 30))
        gross = float(rng.uniform(5e3, 5e6))
        kind = j % 4
        if kind == 0:
            pos = {names[j % 2]: gross * (1 if rng.random() < 0.6 else -1)}
        elif kind == 1:
            pos = {names[0]: gross / 2, names[1]: -gross / 2}
        elif kind == 2:
            pos = {names[0]: -gross / 2, names[1]: gross / 2}
        else:
            pos = {names[0]: gross * 0.6, names[1]: gross * 0.4}
        value = gross / float(rng.uniform(10, 60))
        coll = {"USDT": value * 0.7, "BTC": value * 0.3 / float(market.bars[0].close[e])}
        out.append(Account(id=f"p{j}", entry_ms=int(ts[e]) + 1, collateral=coll,
                           positions=pos))
    return out


def _adv_depth(bars: BarSeries, window: int, fraction: float) -> list[float]:
    """ADV-based depth by pandas, apart from the engine's running sums."""
    traded = pd.Series(bars.volume * bars.close)
    mean = traded.rolling(window, min_periods=1).mean().to_numpy()
    return (mean * 86_400.0 / bars.bar_seconds * fraction).tolist()


def _check_mech(market: Market, accounts: list[Account], cfg: AccountConfig, params: dict,
                funding: bool, *, portfolio: PortfolioMarginModel | None = None,
                portfolio_mm: Callable[[dict[str, float], int], float] | None = None,
                ) -> list[ref.MechOutcome]:
    model = make_model("tiered", params)
    result = simulate_accounts(market, model, accounts, cfg, mechanics_kernel=True,
                               portfolio=portfolio)
    prices = {b.instrument: {"low": b.low.tolist(), "high": b.high.tolist(),
                             "close": b.close.tolist()} for b in market.bars}
    caps = list(params["bracket_caps_usd"])
    mmrs = ref_models.tier_mmrs(len(caps) + 1, base_mmr=params["base_mmr"],
                                tier_growth=params["tier_growth"], im_to_mm=2.0)

    def mm(inst: str, notional: float, t: int) -> float:
        return min(ref_models.tiered_maintenance_usd(notional, caps, mmrs), notional)

    fcum = None
    if funding:
        fcum = {}
        for b in market.bars:
            acc_ = 0.0
            col = []
            for r_, c_ in zip(b.funding_rate.tolist(), b.close.tolist(), strict=True):
                acc_ += r_ * c_
                col.append(acc_)
            fcum[b.instrument] = col
    depth = {b.instrument: _adv_depth(b, cfg.adv_window_bars, cfg.depth_fraction_of_adv)
             for b in market.bars}
    ts = market.timestamp_ms.tolist()
    by_asset = {underlying_of(i): i for i in reversed(market.instruments)}
    books = []
    for acc in result.accounts:
        e = max(i for i, t in enumerate(ts) if t <= acc.entry_ms)
        units = {n: v / prices[n]["close"][e] for n, v in acc.positions.items()}
        usd = sum(v for a, v in acc.collateral.items() if a.upper() == "USDT")
        coll = {by_asset[a]: v for a, v in acc.collateral.items() if a.upper() != "USDT"}
        books.append(ref.RefAccount(e, units, usd, coll))
    settings = ref.MechSettings(
        holding_bars=cfg.holding_bars, latency_bars=cfg.latency_bars, policy=cfg.policy,
        spread_rate=cfg.spread_rate, impact_coef=cfg.impact_coef,
        impact_exponent=cfg.impact_exponent, fee_rate=cfg.liquidation_fee_rate,
        cascade=cfg.cascade, kappa=cfg.cascade_kappa, partial_fraction=cfg.partial_fraction,
        cooldown_bars=cfg.cooldown_bars, max_per_bar=cfg.max_liquidations_per_bar,
        max_usd_per_bar=cfg.max_liquidation_notional_per_bar, queue_order=cfg.queue_order)
    outs = ref.replay_mech(prices, market.instruments, {i: underlying_of(i)
                                                         for i in market.instruments},
                           mm, books, settings, funding_cum=fcum, bid_depth=depth,
                           ask_depth=depth, portfolio_mm=portfolio_mm)
    names = market.instruments
    for j, out in enumerate(outs):
        assert result.trigger_bar[j] == (-1 if out.trigger is None else out.trigger), j
        assert result.steps[j] == out.steps, j
        assert result.queued_bar[j] == (-1 if out.queued is None else out.queued), j
        assert result.wait_bars[j] == out.wait_bars, j
        assert result.closeout_bar[j] == (-1 if out.closeout_bar is None
                                          else out.closeout_bar), j
        if out.closeout_equity is not None:
            assert result.closeout_equity_usd[j] == pytest.approx(out.closeout_equity,
                                                                   rel=1e-9, abs=1e-6), j
        assert result.bad_debt_usd[j] == pytest.approx(out.bad_debt, rel=1e-9, abs=1e-6)
        assert result.fee_usd[j] == pytest.approx(out.fee, rel=1e-9, abs=1e-6)
        mine = np.flatnonzero(result.position_account == j)
        for p in mine:
            inst = names[int(result.position_instrument[p])]
            assert result.leg_closed_usd[p] == pytest.approx(out.leg_closed_usd[inst],
                                                             rel=1e-9, abs=1e-6)
            assert result.leg_pnl_usd[p] == pytest.approx(out.leg_pnl[inst], rel=1e-9,
                                                          abs=1e-6)
    hit = int((result.trigger_bar >= 0).sum())
    assert 0 < hit < len(result.accounts)
    return outs


LUNA_TIERS = {"base_mmr": 0.02, "tier_growth": 1.5, "bracket_caps_usd": [50_000, 250_000]}


@pytest.mark.data
@pytest.mark.parametrize("latency", [0, 1])
@pytest.mark.parametrize("policy", POLICIES)
def test_mechanics_match_brute_force_through_luna(
        shared_data: Path, data_file: Callable[[str], str], latency: int, policy: str) -> None:
    """Real BTC/ETH/SOL 30-minute bars through 2022-05: every policy with spread, ADV impact,
    fees and the shared cascade, every account's trigger, steps, close-out, fee and legs equal
    the plain loop, and the cascade changes the outcome (it is not vacuous)."""
    for r in LUNA_30M:
        data_file(r)
    market = _luna_market_data(shared_data)
    books = _books(market, seed=latency + 3)
    cfg = AccountConfig(holding_bars=96, latency_bars=latency, spread_rate=0.0005,
                        impact_coef=0.01, liquidation_fee_rate=0.005, cascade=True,
                        cascade_kappa=50.0, adv_window_bars=48, policy=policy,
                        partial_fraction=0.4, cooldown_bars=2)
    _check_mech(market, books, cfg, LUNA_TIERS, funding=False)
    plain = simulate_accounts(market, make_model("tiered", LUNA_TIERS), books,
                              dataclasses.replace(cfg, cascade=False))
    moved = simulate_accounts(market, make_model("tiered", LUNA_TIERS), books, cfg)
    assert not np.array_equal(plain.closeout_equity_usd, moved.closeout_equity_usd,
                              equal_nan=True)


PERP_TIERS = {"base_mmr": 0.004, "tier_growth": 1.5,
              "bracket_caps_usd": [250_000, 1_000_000, 5_000_000]}


@pytest.mark.data
@pytest.mark.parametrize("policy", POLICIES)
def test_mechanics_match_brute_force_on_2025_10_10_perps_with_funding(
        shared_data: Path, data_file: Callable[[str], str], policy: str) -> None:
    """BTC and ETH USD-M perpetuals, 5-minute, through 2025-10-10, with their 8h funding:
    funding, impact, fees and the cascade under every policy equal the plain loop."""
    for r in (*PERP_5M, *FUNDING_8H):
        data_file(r)
    market = _perp_market(shared_data)
    assert all(np.count_nonzero(b.funding_rate) > 5 for b in market.bars)
    books = _perp_books(market, seed=5)
    cfg = AccountConfig(holding_bars=288, latency_bars=1, spread_rate=0.0005,
                        impact_coef=0.01, liquidation_fee_rate=0.005, cascade=True,
                        cascade_kappa=2.0, funding=True, policy=policy, cooldown_bars=3)
    _check_mech(market, books, cfg, PERP_TIERS, funding=True)


@pytest.mark.data
def test_isolated_accounts_equal_section_4_with_funding_impact_and_cascade(
        shared_data: Path, data_file: Callable[[str], str]) -> None:
    """One USD-collateralised position per account on the BTC perpetual with its funding,
    ADV impact, spread and a cascade: triggers and bad debt equal §4's isolated replay,
    position by position (fees off: §4 charges them on entry notional; one flat MM rate:
    §4 scales its entry bracket's MM with the price, the account engine re-reads the bracket
    at the current notional, which differs only by a bracket's deduction)."""
    for r in (PERP_5M[0], FUNDING_8H[0]):
        data_file(r)
    start, end = 1_759_881_600_000, 1_760_313_600_000
    bars = with_funding(load_bars(PERP_5M[0], root=shared_data, start_ms=start, end_ms=end),
                        load_funding(FUNDING_8H[0], root=shared_data))
    model = make_model("tiered", {"base_mmr": 0.004, "tier_growth": 1.0,
                                  "bracket_caps_usd": []})
    rng = np.random.default_rng(9)
    explicit = []
    for j in range(300):
        e = int(rng.integers(0, len(bars) - 10))
        explicit.append(ExplicitPosition(
            side="long" if j % 3 else "short", entry_bar=e,
            notional_usd=float(rng.choice([5_000.0, 80_000.0, 400_000.0])),
            leverage=float(rng.choice([10.0, 25.0, 50.0, 100.0]))))
    liq = LiquidationConfig(positions=tuple(explicit), holding_bars=288, latency_bars=1,
                            spread_rate=0.0005, impact_coef=0.01, liquidation_fee_rate=0.0,
                            cascade=True, cascade_kappa=2.0, adv_window_bars=288)
    table = simulate_liquidations(bars, model, liq).position_table()
    accounts = [Account(id=f"p{j}", entry_ms=int(bars.timestamp_ms[p.entry_bar]),
                        collateral={"USDT": float(table.collateral_usd[j])},
                        positions={"BTCUSDT": p.notional_usd * (1 if p.side == "long" else -1)})
                for j, p in enumerate(explicit)]
    cfg = AccountConfig(holding_bars=288, latency_bars=1, spread_rate=0.0005, impact_coef=0.01,
                        cascade=True, cascade_kappa=2.0, adv_window_bars=288, funding=True)
    result = simulate_accounts(Market.from_series([bars]), model, accounts, cfg)
    assert table.opened.all()
    np.testing.assert_array_equal(result.trigger_bar, table.trigger_bar)
    np.testing.assert_allclose(result.bad_debt_usd, table.bad_debt_usd, rtol=1e-9, atol=1e-6)
    assert (result.trigger_bar >= 0).sum() > 30
    no_cascade = simulate_accounts(Market.from_series([bars]), model, accounts,
                                   dataclasses.replace(cfg, cascade=False))
    assert (no_cascade.trigger_bar != result.trigger_bar).any()


def test_settings_are_validated_naming_the_field() -> None:
    """Unknown policies and fractions out of range are refused; mechanics in portfolio mode
    are accepted."""
    for raw, field in (({"policy": "fastest"}, "liquidation.policy"),
                       ({"partial_fraction": 0}, "liquidation.partial_fraction"),
                       ({"cooldown_bars": 0}, "liquidation.cooldown_bars"),
                       ({"funding": 1}, "liquidation.funding"),
                       ({"impact_coef": -1}, "liquidation.impact_coef")):
        with pytest.raises(InvalidParameters) as info:
            AccountConfig.from_mapping(raw)
        assert info.value.field == field
    assert AccountConfig.from_mapping({"mode": "portfolio", "cascade": True}).cascade


def test_cli_policy_and_compare_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``--policy`` runs one policy; ``--compare-policies --json`` prints the hand case's
    rows (bad debt 0 / 450 / 0 / 0) and the policy that loses least."""
    from calibration.cli import main

    for b in _two_leg_market().bars:
        pd.DataFrame({"timestamp_ms": b.timestamp_ms, "open": b.open, "high": b.high,
                      "low": b.low, "close": b.close}).to_csv(tmp_path / f"{b.instrument}.csv",
                                                               index=False)
    (tmp_path / "accounts.json").write_text(json.dumps([
        {"id": "x", "entry": T0 + 2 * MIN, "collateral": {"USDT": 1050},
         "positions": {"AUSDT": 10_000, "BUSDT": 1_000}}]))
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    args = ["accounts", "backtest", "--data", "AUSDT=AUSDT.csv", "--data", "BUSDT=BUSDT.csv",
            "--accounts", "accounts.json", "--model", "tiered", "--params",
            json.dumps(FLAT_1PCT), "--liquidation",
            '{"holding_bars": 4, "latency_bars": 0, "partial_fraction": 0.5}',
            "--no-stress-windows"]
    assert main([*args, "--policy", "largest_requirement_first", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"][0]["bad_debt_usd"] == pytest.approx(450.0)
    assert report["liquidation"]["policy"] == "largest_requirement_first"
    assert main([*args, "--compare-policies", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in table["policies"]] == list(POLICIES)
    assert [r["bad_debt_usd"] for r in table["policies"]] == pytest.approx([0, 450, 0, 0])
    assert table["least_loss"] == "close_all"
    assert main([*args, "--compare-policies"]) == 0
    assert "least bad debt: close_all" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Mechanics under a portfolio requirement (domain.md §8 with §4/§10's mechanics)

PM_HIST = {"window_bars": 60, "warmup_bars": 100, "horizon_bars": 2, "confidence": 0.95}


@pytest.mark.data
@pytest.mark.parametrize(("policy", "capacity"), [(p, None) for p in POLICIES]
                         + [("close_all", 1), ("partial", 2)])
def test_portfolio_mechanics_match_brute_force_through_luna(
        shared_data: Path, data_file: Callable[[str], str], policy: str,
        capacity: int | None) -> None:
    """Real BTC/ETH/SOL 30-minute bars through 2022-05 in portfolio mode (historical ES over
    60 joint scenarios): every policy with spread, ADV impact, fees and the shared cascade
    (and a capacity of 1 or 2 close-outs a bar) equals the plain loop whose requirement is
    the plain sort of the scenario losses of what the account still holds; the cascade is
    not vacuous there either."""
    for r in LUNA_30M:
        data_file(r)
    market = _luna_market_data(shared_data)
    model = make_portfolio_model("historical", PM_HIST)
    books = _books(market, seed=9)
    hist = ref_pf.Historical({b.instrument: b.close.tolist() for b in market.bars},
                             window=60, confidence=0.95, decay=0.97, horizon=2, warmup=100)
    cfg = AccountConfig(mode="portfolio", holding_bars=96, latency_bars=1,
                        spread_rate=0.0005, impact_coef=0.01, liquidation_fee_rate=0.005,
                        cascade=True, cascade_kappa=50.0, adv_window_bars=48, policy=policy,
                        partial_fraction=0.4, cooldown_bars=2,
                        max_liquidations_per_bar=capacity)
    outs = _check_mech(market, books, cfg, LUNA_TIERS, funding=False, portfolio=model,
                       portfolio_mm=lambda x, t: 0.8 * hist.im(x, t))
    if capacity is not None:
        assert any(o.wait_bars > 0 for o in outs)  # the queue binds
    tiered = make_model("tiered", LUNA_TIERS)
    plain = simulate_accounts(market, tiered, books, dataclasses.replace(cfg, cascade=False),
                              portfolio=model)
    moved = simulate_accounts(market, tiered, books, cfg, portfolio=model)
    assert not np.array_equal(plain.closeout_equity_usd, moved.closeout_equity_usd,
                              equal_nan=True)


@pytest.mark.data
@pytest.mark.parametrize("policy", ["close_all", "largest_requirement_first", "partial"])
def test_portfolio_mechanics_with_funding_on_2025_10_10_perps(
        shared_data: Path, data_file: Callable[[str], str], policy: str) -> None:
    """BTC and ETH USD-M perpetuals, 5-minute, through 2025-10-10, with 8h funding, in
    portfolio mode under a volatility-scaled grid (5 points a factor, an extended −30% move at
    half weight): funding, impact, fees and the cascade equal the plain loop whose requirement
    is the enumerated grid."""
    import math

    for r in (*PERP_5M, *FUNDING_8H):
        data_file(r)
    market = _perp_market(shared_data)
    params = {"vol_scaled": True, "warmup_bars": 100, "horizon_bars": 2, "points": 5,
              "min_price_range": 0.02, "extended_moves": [-0.3], "extended_weights": [0.5]}
    model = make_portfolio_model("grid", params)
    asset_of = {i: underlying_of(i) for i in market.instruments}
    sigma = {b.instrument: [math.sqrt(v) for v in ref_models.ewma_variance(
        b.close.tolist(), 0.97, 100)] for b in market.bars}
    z = 2.3263478740408408 * math.sqrt(2)

    def portfolio_mm(exposure: dict[str, float], t: int) -> float:
        ranges = {asset_of[i]: max(0.02, z * sigma[i][t]) for i in market.instruments}
        return 0.8 * ref_pf.grid_im(exposure, asset_of, ranges, points=5,
                                    extended=[(-0.3, 0.5)])

    books = _perp_books(market, seed=5)
    cfg = AccountConfig(mode="portfolio", holding_bars=288, latency_bars=1,
                        spread_rate=0.0005, impact_coef=0.01, liquidation_fee_rate=0.005,
                        cascade=True, cascade_kappa=2.0, funding=True, policy=policy,
                        cooldown_bars=3)
    _check_mech(market, books, cfg, PERP_TIERS, funding=True, portfolio=model,
                portfolio_mm=portfolio_mm)


@pytest.mark.data
def test_portfolio_default_settings_through_the_mechanics_kernel_are_the_core(
        shared_data: Path, data_file: Callable[[str], str]) -> None:
    """Portfolio mode with spread and fees only: the mechanics kernel gives the portfolio
    core kernel's triggers, close-out equity, fees and legs bit for bit."""
    for r in LUNA_30M:
        data_file(r)
    market = _luna_market_data(shared_data)
    model = make_portfolio_model("historical", PM_HIST)
    books = _books(market, seed=4)
    tiered = make_model("tiered", LUNA_TIERS)
    for latency in (0, 1):
        cfg = AccountConfig(mode="portfolio", holding_bars=96, latency_bars=latency,
                            spread_rate=0.0005, liquidation_fee_rate=0.005)
        core = simulate_accounts(market, tiered, books, cfg, portfolio=model)
        mech = simulate_accounts(market, tiered, books, cfg, portfolio=model,
                                 mechanics_kernel=True)
        for name in ("trigger_bar", "closeout_equity_usd", "bad_debt_usd", "fee_usd",
                     "leg_pnl_usd", "twin_trigger_bar", "twin_bad_debt_usd"):
            np.testing.assert_array_equal(getattr(mech, name), getattr(core, name),
                                          err_msg=name)
        hit = core.trigger_bar >= 0  # the core leaves no close-out bar for the others
        np.testing.assert_array_equal(mech.closeout_bar[hit], core.closeout_bar[hit])
        assert hit.any()
