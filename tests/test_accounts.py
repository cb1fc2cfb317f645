"""The account engine (domain.md §7): hand cases, the brute-force loop, the isolated path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from calibration import InvalidParameters, load_bars, make_model
from calibration._bars import BarSeries
from calibration.accounts import (
    Account,
    AccountConfig,
    Market,
    PopulationSpec,
    generate_population,
    load_accounts,
    simulate_accounts,
    underlying_of,
)
from calibration.liquidation import ExplicitPosition, LiquidationConfig, simulate_liquidations
from calibration.models import TieredMargin
from tests import reference_accounts as ref
from tests import reference_models as ref_models

T0 = 1_600_000_000_000
MIN = 60_000
FLAT_1PCT = {"base_mmr": 0.01, "tier_growth": 1.0, "bracket_caps_usd": []}


def series(name: str, rows: list[tuple[float, float, float, float]]) -> BarSeries:
    """Hand-made bars ``(open, high, low, close)`` on a 1-minute clock."""
    o, h, lo, c = (np.array(col, dtype=np.float64) for col in zip(*rows, strict=True))
    ts = T0 + np.arange(len(rows), dtype=np.int64) * MIN
    return BarSeries(instrument=name, timestamp_ms=ts, open=o, high=h, low=lo, close=c,
                     volume=None, bar_seconds=60, fingerprint=name, source="hand")


FLAT = (100.0, 100.0, 100.0, 100.0)
GAP80 = (80.0, 80.0, 80.0, 80.0)


def test_hedged_account_survives_a_drop_that_liquidates_its_isolated_legs() -> None:
    """Long A / short B, 10x on gross, both gap 20% down: the account's equity is unchanged
    (2000 USD > MM 160), the long twin (1000 USD of collateral, IM pro rata) loses 2000 and
    leaves 1000 of bad debt; cross saves the account."""
    market = Market.from_series([series("AUSDT", [FLAT] * 3 + [GAP80] * 3),
                                 series("BUSDT", [FLAT] * 3 + [GAP80] * 3)])
    account = Account(id="hedge", entry_ms=T0 + 2 * MIN, collateral={"USDT": 2000.0},
                      positions={"AUSDT": 10_000.0, "BUSDT": -10_000.0})
    result = simulate_accounts(market, TieredMargin(**FLAT_1PCT), [account],
                               AccountConfig(holding_bars=3, latency_bars=0))
    assert result.trigger_bar.tolist() == [-1]
    assert result.twin_trigger_bar.tolist() == [3, -1]
    assert result.twin_bad_debt_usd.tolist() == pytest.approx([1000.0, 0.0])
    s = result.summary()
    assert (s["saved_by_cross"], s["bad_debt_cross_usd"]) == (1, 0.0)
    assert s["bad_debt_isolated_usd"] == pytest.approx(1000.0)


def test_loss_in_one_leg_liquidates_a_healthy_leg() -> None:
    """Long A and long B (2000 USD on 20,000 gross): A gaps to 80 (−2000), B dips to 99: the
    account triggers at bar 3 (equity 0 ≤ MM), and leg B, whose twin never triggers, is closed
    with it at a 100 USD loss; cross bad debt 100 (2000 − 2000 − 100), isolated: A's twin
    1000 USD short of its 2000 loss."""
    dip = (100.0, 100.0, 99.0, 99.5)
    market = Market.from_series([series("AUSDT", [FLAT] * 3 + [GAP80] * 3),
                                 series("BUSDT", [FLAT] * 3 + [dip] * 3)])
    account = Account(id="basket", entry_ms=T0 + 2 * MIN, collateral={"USDT": 2000.0},
                      positions={"AUSDT": 10_000.0, "BUSDT": 10_000.0})
    result = simulate_accounts(market, TieredMargin(**FLAT_1PCT), [account],
                               AccountConfig(holding_bars=3, latency_bars=0))
    assert result.trigger_bar.tolist() == [3]
    assert result.bad_debt_usd.tolist() == pytest.approx([100.0])
    assert result.twin_trigger_bar.tolist() == [3, -1]
    s = result.summary()
    assert s["healthy_leg_liquidations"] == 1
    assert s["hedge_break_loss_usd"] == pytest.approx(100.0)
    assert s["bad_debt_isolated_usd"] == pytest.approx(1000.0)


def test_collateral_that_falls_with_the_book() -> None:
    """BTC collateral behind a long BTC position: both fall, the account is net long BTC and
    valued at the low; a 10% gap takes 0.02 BTC (2000 USD at 100) to 1800 and the 10,000 long
    loses 1000: equity 800 > MM 90, no trigger; a 25% gap: 1500 − 2500 < 0, bad debt 1000."""
    for gap, trigger, bad in ((90.0, -1, 0.0), (75.0, 3, 1000.0)):
        market = Market.from_series([series("BTCUSDT", [FLAT] * 3 + [(gap,) * 4] * 3)])
        account = Account(id="wrong-way", entry_ms=T0 + 2 * MIN, collateral={"BTC": 20.0},
                          positions={"BTCUSDT": 10_000.0})
        result = simulate_accounts(market, TieredMargin(**FLAT_1PCT), [account],
                                   AccountConfig(holding_bars=3, latency_bars=0))
        assert result.trigger_bar.tolist() == [trigger]
        assert result.bad_debt_usd.tolist() == pytest.approx([bad])


def test_underlying_names() -> None:
    """Instruments map to their base asset."""
    assert [underlying_of(n) for n in ("BTCUSDT", "ETH-PERP", "SOLUSDC", "XYZ")] == [
        "BTC", "ETH", "SOL", "XYZ"]


def test_accounts_from_json_and_csv_agree() -> None:
    """The two account formats read the same books; bad input names the record."""
    records = [{"id": "a", "entry": "2020-09-13T12:00:00Z", "collateral": {"USDT": 1000},
                "positions": {"BTCUSDT": 5000, "ETHUSDT": -5000}}]
    from_json = load_accounts(json.dumps(records))
    csv_text = ("id,entry,kind,name,amount\n"
                "a,2020-09-13T12:00:00Z,collateral,USDT,1000\n"
                "a,2020-09-13T12:00:00Z,position,BTCUSDT,5000\n"
                "a,2020-09-13T12:00:00Z,position,ETHUSDT,-5000\n")
    assert load_accounts(csv_text) == from_json
    with pytest.raises(InvalidParameters) as info:
        load_accounts(json.dumps([{"id": "a", "entry": "soon", "positions": {"X": 1}}]))
    assert info.value.field == "accounts[0].entry"


def _mm_function(market: Market, model_name: str, params: dict) -> Callable[[str, float, int],
                                                                             float]:
    """MM in USD per instrument from an independent reference (tiered: the bracket-slice sum;
    ewma: the model's rate series times the notional)."""
    if model_name == "tiered":
        caps = list(params.get("bracket_caps_usd", []))
        mmrs = ref_models.tier_mmrs(len(caps) + 1, base_mmr=params["base_mmr"],
                                    tier_growth=params["tier_growth"], im_to_mm=2.0)

        def tiered(inst: str, notional: float, t: int) -> float:
            return min(ref_models.tiered_maintenance_usd(notional, caps, mmrs), notional)

        return tiered
    rates = {b.instrument: make_model(model_name, params).margin_rates(b).mm_rate.tolist()
             for b in market.bars}

    def rate(inst: str, notional: float, t: int) -> float:
        return rates[inst][t] * notional

    return rate


def _check_against_reference(market: Market, model_name: str, params: dict,
                             accounts: list[Account], latency: int, holding: int) -> None:
    model = make_model(model_name, params)
    result = simulate_accounts(market, model, accounts,
                               AccountConfig(holding_bars=holding, latency_bars=latency))
    prices = {b.instrument: {"low": b.low.tolist(), "high": b.high.tolist(),
                             "close": b.close.tolist()} for b in market.bars}
    asset_of = {i: underlying_of(i) for i in market.instruments}
    by_asset = {underlying_of(i): i for i in reversed(market.instruments)}
    mm = _mm_function(market, model_name, params)
    ts = market.timestamp_ms.tolist()
    p = 0
    for j, acc in enumerate(result.accounts):
        e = max(i for i, t in enumerate(ts) if t <= acc.entry_ms)
        units = {name: notional / prices[name]["close"][e]
                 for name, notional in acc.positions.items()}
        usd = sum(v for a, v in acc.collateral.items() if a.upper() in ("USDT", "USD", "USDC"))
        coll = {by_asset[a.upper()]: v for a, v in acc.collateral.items()
                if a.upper() not in ("USDT", "USD", "USDC")}
        out = ref.replay(prices, asset_of, mm, ref.RefAccount(e, units, usd, coll),
                         holding_bars=holding, latency_bars=latency)
        assert result.trigger_bar[j] == (-1 if out.trigger is None else out.trigger), acc.id
        if out.closeout_equity is not None:
            assert result.closeout_equity_usd[j] == pytest.approx(out.closeout_equity,
                                                                   rel=1e-9, abs=1e-6)
        # Each position's twin: the position alone with its IM share of the collateral.
        legs = [(inst, units[inst]) for inst in market.instruments if inst in units]
        ims = []
        for inst, q in legs:
            gross = abs(q) * prices[inst]["close"][e]
            ims.append(model.margin_rates(market.bars[market.instruments.index(inst)],
                                          notional_usd=gross).im_rate[e] * gross)
        for (inst, q), im in zip(legs, ims, strict=True):
            share = im / sum(ims)
            twin = ref.replay(prices, asset_of, mm, ref.RefAccount(
                e, {inst: q}, usd * share, {k: v * share for k, v in coll.items()}),
                holding_bars=holding, latency_bars=latency)
            assert result.twin_trigger_bar[p] == (-1 if twin.trigger is None else twin.trigger)
            assert result.twin_bad_debt_usd[p] == pytest.approx(twin.bad_debt, rel=1e-9,
                                                                abs=1e-6)
            p += 1
    assert p == result.twin_trigger_bar.shape[0]
    # Not a vacuous comparison: the crash liquidates some accounts and spares others.
    assert 0 < int((result.trigger_bar >= 0).sum()) < len(result.accounts)


LUNA_30M = [f"binance_spot_2020_2025/{s}USDT_30m.csv" for s in ("BTC", "ETH", "SOL")]


def _luna_market(root: Path) -> Market:
    start, end = 1_651_363_200_000, 1_653_782_400_000  # 2022-05-01 .. 2022-05-29
    return Market.from_series([load_bars(r, root=root, start_ms=start, end_ms=end)
                               for r in LUNA_30M])


def _books(market: Market, seed: int) -> list[Account]:
    """Hedged, directional and basket books with stable, BTC and ETH collateral."""
    rng = np.random.default_rng(seed)
    ts = market.timestamp_ms
    names = market.instruments
    out = []
    for j in range(60):
        e = int(rng.integers(0, len(ts) - 20))
        kind = j % 3
        gross = float(rng.uniform(1e3, 1e6))
        if kind == 0:
            pos = {names[j % 3]: gross * (1 if rng.random() < 0.5 else -1)}
        elif kind == 1:
            pos = {names[0]: gross / 2, names[1 + j % 2]: -gross / 2}
        else:
            pos = {n: gross / 3 for n in names}
        value = gross / float(rng.uniform(2, 30))
        close_btc = float(market.bars[0].close[e])
        close_eth = float(market.bars[1].close[e])
        coll = {"USDT": value / 2, "BTC": value / 4 / close_btc, "ETH": value / 4 / close_eth}
        out.append(Account(id=f"r{j}", entry_ms=int(ts[e]) + 1, collateral=coll,
                           positions=pos))
    return out


@pytest.mark.data
@pytest.mark.parametrize("latency", [0, 1])
@pytest.mark.parametrize(("model_name", "params"), [
    ("tiered", {"base_mmr": 0.02, "tier_growth": 1.5, "bracket_caps_usd": [50_000, 250_000]}),
    ("ewma", {"decay": 0.97, "warmup_bars": 100, "horizon_bars": 2}),
])
def test_core_matches_brute_force_on_real_btc_eth_sol(
        shared_data: Path, data_file: Callable[[str], str], latency: int, model_name: str,
        params: dict) -> None:
    """Real aligned BTC/ETH/SOL 30-minute bars through the LUNA crash: every account's trigger
    and close-out equity, and every isolated twin, equal the plain loop."""
    for r in LUNA_30M:
        data_file(r)
    market = _luna_market(shared_data)
    books = _books(market, seed=latency + 7)
    if model_name == "ewma":  # keep entries after the warm-up
        books = [a for a in books if a.entry_ms > int(market.timestamp_ms[120])]
    _check_against_reference(market, model_name, params, books, latency, holding=96)


@pytest.mark.data
def test_isolated_accounts_equal_the_isolated_engine(
        shared_data: Path, data_file: Callable[[str], str]) -> None:
    """One USD-collateralised position per account (collateral N / L) and no fees or slippage:
    the account engine's triggers and bad debt equal §4's isolated replay, position by
    position, on real BTC 30-minute bars of 2022-05."""
    data_file(LUNA_30M[0])
    start, end = 1_651_363_200_000, 1_653_782_400_000
    bars = load_bars(LUNA_30M[0], root=shared_data, start_ms=start, end_ms=end)
    model = make_model("tiered", {"base_mmr": 0.01, "tier_growth": 2.0,
                                  "bracket_caps_usd": [50_000, 250_000, 1_000_000]})
    rng = np.random.default_rng(3)
    explicit = []
    accounts = []
    for j in range(200):
        e = int(rng.integers(0, len(bars) - 10))
        side = "long" if j % 2 else "short"
        notional = float(rng.choice([5_000.0, 80_000.0, 400_000.0]))
        leverage = float(rng.choice([5.0, 10.0, 20.0, 40.0]))
        explicit.append(ExplicitPosition(side=side, entry_bar=e, notional_usd=notional,
                                         leverage=leverage))
    config = LiquidationConfig(positions=tuple(explicit), holding_bars=96, latency_bars=1,
                               spread_rate=0.0, impact_coef=0.0, liquidation_fee_rate=0.0)
    table = simulate_liquidations(bars, model, config).position_table()
    for j, p in enumerate(explicit):
        accounts.append(Account(
            id=f"p{j}", entry_ms=int(bars.timestamp_ms[p.entry_bar]),
            collateral={"USDT": float(table.collateral_usd[j])},
            positions={"BTCUSDT": p.notional_usd * (1 if p.side == "long" else -1)}))
    result = simulate_accounts(Market.from_series([bars]), model, accounts,
                               AccountConfig(holding_bars=96, latency_bars=1))
    assert table.opened.all()
    np.testing.assert_array_equal(result.trigger_bar, table.trigger_bar)
    np.testing.assert_allclose(result.bad_debt_usd, table.bad_debt_usd, rtol=1e-9, atol=1e-6)
    assert (result.trigger_bar >= 0).sum() > 20  # the crash liquidates many of them
    assert result.bad_debt_usd.sum() > 0


def test_population_is_seeded_and_documented_kinds() -> None:
    """The same spec gives the same accounts; hedged books are long one, short another."""
    close = np.full((2, 200), 100.0)
    ts = T0 + np.arange(200, dtype=np.int64) * MIN
    spec = PopulationSpec(seed=5, entry_every_bars=20, accounts_per_entry=4,
                          book_weights={"hedged": 1.0}, collateral_weights={"USDT": 1.0})
    a = generate_population(spec, instruments=("AUSDT", "BUSDT"), timestamp_ms=ts, close=close)
    b = generate_population(spec, instruments=("AUSDT", "BUSDT"), timestamp_ms=ts, close=close)
    assert a == b
    assert len(a) == 40
    for acc in a:
        values = sorted(acc.positions.values())
        assert values[0] == pytest.approx(-values[1])
    with pytest.raises(InvalidParameters) as info:
        PopulationSpec.from_mapping({"seed": -1})
    assert info.value.field == "population.seed"


def test_cli_accounts_backtest_json(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """marginlab accounts backtest --accounts FILE --json: the accounts summary (public
    fields) equals the library's hand case, and every account has its row; bad input exits 2
    naming the field."""
    import pandas as pd

    from calibration.cli import main

    for name, rows in (("AUSDT", [FLAT] * 3 + [GAP80] * 3), ("BUSDT", [FLAT] * 3 + [GAP80] * 3)):
        b = series(name, rows)
        pd.DataFrame({"timestamp_ms": b.timestamp_ms, "open": b.open, "high": b.high,
                      "low": b.low, "close": b.close}).to_csv(tmp_path / f"{name}.csv",
                                                               index=False)
    (tmp_path / "accounts.json").write_text(json.dumps([
        {"id": "hedge", "entry": T0 + 2 * MIN, "collateral": {"USDT": 2000},
         "positions": {"AUSDT": 10_000, "BUSDT": -10_000}}]))
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    args = ["accounts", "backtest", "--data", "AUSDT=AUSDT.csv", "--data", "BUSDT=BUSDT.csv",
            "--accounts", "accounts.json", "--model", "tiered", "--params",
            json.dumps(FLAT_1PCT), "--liquidation", '{"holding_bars": 3, "latency_bars": 0}',
            "--no-stress-windows", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    overall = report["summary"][0]
    assert overall["window"] == "all"
    assert {k: overall[k] for k in ("accounts", "liquidated_accounts", "liquidated_positions",
                                    "bad_debt_usd", "healthy_leg_liquidations",
                                    "saved_by_cross")} == {
        "accounts": 1, "liquidated_accounts": 0, "liquidated_positions": 0,
        "bad_debt_usd": 0.0, "healthy_leg_liquidations": 0, "saved_by_cross": 1}
    assert report["accounts"] == [{"id": "hedge", "liquidated": False, "trigger_time": None,
                                   "bad_debt_usd": 0.0, "mode": "cross"}]
    assert main([*args[:-1], "--mode", "isolated", "--json"]) == 0
    isolated = json.loads(capsys.readouterr().out)
    assert isolated["summary"][0]["bad_debt_usd"] == pytest.approx(1000.0)
    assert isolated["accounts"][0]["liquidated"] is True
    bad = [*args[:-1], "--liquidation", '{"holding_bars": 0}']
    assert main(bad) == 2
    assert "liquidation.holding_bars" in capsys.readouterr().err


def test_binance_btc_haircut_worked_example() -> None:
    """6,000 BTC at 20,000 = 120M: 100M at 100% and 20M at 97.5% = 119.5M (venues.md §7)."""
    from calibration.accounts._haircuts import BINANCE_BTC

    assert BINANCE_BTC.value_usd(6_000 * 20_000) == pytest.approx(119_500_000.0)
    assert BINANCE_BTC.value_usd(100e6) == pytest.approx(100e6)
    # 160M: 100 + 20·0.975 + 30·0.95 + 10·0.90 (hand sum)
    assert BINANCE_BTC.value_usd(160e6) == pytest.approx(100e6 + 19.5e6 + 28.5e6 + 9e6)


def test_kraken_flat_haircut() -> None:
    """Kraken: 0.5 BTC at 35,000 with a 3% haircut counts 16,975 (venues.md §7)."""
    from calibration.accounts._haircuts import flat

    assert flat(0.97).value_usd(0.5 * 35_000) == pytest.approx(16_975.0)


def test_liquidity_adjusted_haircuts_fall_with_size() -> None:
    """Ratios from depth: ``1 − (spread + c (V/D)^β + z σ √h)`` at each band's top, by hand,
    never rising with size."""
    from calibration.accounts._haircuts import liquidity_adjusted

    s = liquidity_adjusted(depth_usd=1e6, sigma_per_bar=0.01, liquidation_bars=4,
                           caps_usd=[1e5, 1e6])
    z = 2.3263478740408408
    expected = [1 - (0.0005 + 0.01 * (v / 1e6) ** 0.5 + z * 0.01 * 2) for v in (1e5, 1e6, 2e6)]
    assert s.ratios == pytest.approx(tuple(expected))
    assert list(s.ratios) == sorted(s.ratios, reverse=True)
    with pytest.raises(InvalidParameters):
        liquidity_adjusted(depth_usd=0, sigma_per_bar=0.01, liquidation_bars=4, caps_usd=[1])


def test_haircut_and_upnl_weight_move_the_trigger() -> None:
    """20 BTC of collateral (2,000 USD at 100) behind a 10,000 long; a 10% gap: at full value
    equity 1,800 − 1,000 = 800 > MM 90, no trigger; at a flat 50% haircut 900 − 1,000 < 90:
    triggered, and the close-out sells the BTC at market (no bad debt). A long that gains
    1,000 with 150 USD against a 2% MM (220): counted in full it holds, at weight 0 it is
    liquidated."""
    market = Market.from_series([series("BTCUSDT", [FLAT] * 3 + [(90.0,) * 4] * 3)])
    account = Account(id="h", entry_ms=T0 + 2 * MIN, collateral={"BTC": 20.0},
                      positions={"BTCUSDT": 10_000.0})
    model = TieredMargin(**FLAT_1PCT)
    full = simulate_accounts(market, model, [account], AccountConfig(holding_bars=3,
                                                                      latency_bars=0))
    cut = simulate_accounts(market, model, [account], AccountConfig.from_mapping(
        {"holding_bars": 3, "latency_bars": 0, "haircuts": {"BTC": 0.5}}))
    assert full.trigger_bar.tolist() == [-1]
    assert cut.trigger_bar.tolist() == [3]
    assert cut.closeout_equity_usd.tolist() == pytest.approx([800.0])
    up = Market.from_series([series("AUSDT", [FLAT] * 3 + [(110.0,) * 4] * 3)])
    gainer = Account(id="g", entry_ms=T0 + 2 * MIN, collateral={"USDT": 150.0},
                     positions={"AUSDT": 10_000.0})
    two_pct = TieredMargin(base_mmr=0.02, tier_growth=1.0, bracket_caps_usd=[])
    counted = simulate_accounts(up, two_pct, [gainer], AccountConfig(holding_bars=3))
    ignored = simulate_accounts(up, two_pct, [gainer], AccountConfig(holding_bars=3,
                                                                      upnl_weight=0.0))
    assert counted.trigger_bar.tolist() == [-1]
    assert ignored.trigger_bar.tolist() == [3]


def test_requirements_now_tiered_and_ewma() -> None:
    """Binance 2021 tiers: 100,000 USD → MM 450 (0.5% − 50), IM 1,000 (1%); 50,000 at the cap
    → MM 200, IM 500 (the upper bracket); an EWMA model takes its last bar's rates."""
    from calibration.accounts import requirements_now
    from calibration.models import (
        BINANCE_BTCUSDT_2021_CAPS_USD,
        BINANCE_BTCUSDT_2021_IMR,
        BINANCE_BTCUSDT_2021_MMR,
    )

    tiers = TieredMargin(mmr_schedule=BINANCE_BTCUSDT_2021_MMR,
                         imr_schedule=BINANCE_BTCUSDT_2021_IMR,
                         bracket_caps_usd=BINANCE_BTCUSDT_2021_CAPS_USD)
    req = requirements_now(tiers, np.array([100_000.0, -50_000.0, 10_000.0]))
    assert req.mm_usd.tolist() == pytest.approx([450.0, 200.0, 40.0])
    assert req.im_usd.tolist() == pytest.approx([1_000.0, 500.0, 80.0])
    assert req.as_of is None
    rng = np.random.default_rng(0)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 300)))
    b = series("BTCUSDT", [(c, c * 1.01, c * 0.99, c) for c in close])
    ewma = make_model("ewma", {"warmup_bars": 50, "horizon_bars": 4})
    rates = ewma.margin_rates(b)
    got = requirements_now(ewma, np.array([20_000.0]), b)
    assert got.mm_usd[0] == pytest.approx(rates.mm_rate[-1] * 20_000)
    assert got.im_usd[0] == pytest.approx(rates.im_rate[-1] * 20_000)
    with pytest.raises(InvalidParameters) as info:
        requirements_now(ewma, np.array([1.0]))
    assert info.value.field == "data"


@pytest.mark.data
def test_account_book_replays_as_its_accounts(shared_data: Path,
                                              data_file: Callable[[str], str]) -> None:
    """An ``AccountBook`` (the accounts as arrays, built once) replays bit for bit as its
    accounts do, whole and split by index (as forked processes take their halves)."""
    import dataclasses

    from calibration.accounts import AccountBook

    for r in LUNA_30M:
        data_file(r)
    market = _luna_market(shared_data)
    books = _books(market, seed=21)
    model = make_model("tiered", {"base_mmr": 0.02, "tier_growth": 1.5,
                                  "bracket_caps_usd": [50_000, 250_000]})
    cfg = AccountConfig(holding_bars=96, latency_bars=1, spread_rate=0.001)
    arrays = AccountBook.from_accounts(books, market.instruments)
    assert len(arrays) == len(books)
    assert list(arrays) == books
    for run_cfg in (cfg, dataclasses.replace(cfg, policy="partial")):
        for rows in (list(range(len(books))), list(range(1, len(books), 2))):
            plain = simulate_accounts(market, model, [books[i] for i in rows], run_cfg)
            fast = simulate_accounts(market, model, arrays.take(rows), run_cfg)
            assert [a.id for a in fast.accounts] == [a.id for a in plain.accounts]
            for name in ("trigger_bar", "closeout_equity_usd", "bad_debt_usd", "fee_usd",
                         "twin_trigger_bar", "twin_bad_debt_usd", "leg_pnl_usd",
                         "position_account", "position_notional_usd"):
                np.testing.assert_array_equal(getattr(fast, name), getattr(plain, name),
                                              err_msg=name)
            assert fast.summary() == plain.summary()
    with pytest.raises(InvalidParameters) as info:
        AccountBook.from_accounts([Account(id="x", entry_ms=0, collateral={},
                                           positions={"NOPE": 1.0})], market.instruments)
    assert info.value.field == "accounts.positions"
