"""Margin mode per account (``Account.mode``): a mixed population is its modes' runs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from calibration import InvalidParameters, load_bars, make_model
from calibration.accounts import (
    Account,
    AccountConfig,
    Market,
    PopulationSpec,
    generate_population,
    load_accounts,
    run_account_backtest,
    simulate_accounts,
)
from calibration.accounts._engine import AccountResult
from calibration.models import make_portfolio_model
from tests.test_accounts import FLAT, FLAT_1PCT, GAP80, MIN, T0, series

LUNA_30M = [f"binance_spot_2020_2025/{s}USDT_30m.csv" for s in ("BTC", "ETH", "SOL")]
HIST = {"window_bars": 60, "warmup_bars": 100, "horizon_bars": 2, "confidence": 0.95}


def _hedge_market() -> Market:
    return Market.from_series([series("AUSDT", [FLAT] * 3 + [GAP80] * 3),
                               series("BUSDT", [FLAT] * 3 + [GAP80] * 3)])


def _hedge(ident: str, mode: str | None) -> Account:
    return Account(id=ident, entry_ms=T0 + 2 * MIN, collateral={"USDT": 2000.0},
                   positions={"AUSDT": 10_000.0, "BUSDT": -10_000.0}, mode=mode)


def test_hand_case_one_book_in_three_modes() -> None:
    """Long A / short B of 10,000 on 2,000 USDT, both gap −20%: in cross (1% per leg, MM 160)
    it survives; isolated, the long twin (1,000 USDT, −2,000) leaves 1,000 of bad debt; under
    Deribit's grid (MM 0.8 · 3,200 = 2,560 > 2,000) it triggers at bar 3 with equity 2,000.
    One population of the three: each row as its mode, the fund down by the 1,000 only."""
    market = _hedge_market()
    books = [_hedge("c", None), _hedge("i", "isolated"), _hedge("p", "portfolio")]
    result = simulate_accounts(market, make_model("tiered", FLAT_1PCT), books,
                               AccountConfig(holding_bars=3, latency_bars=0),
                               portfolio=make_portfolio_model("deribit_pme_2024"))
    assert result.mode == "mixed"
    assert result.modes() == ("cross", "isolated", "portfolio")
    assert result.trigger_bar.tolist() == [-1, -1, 3]
    assert result.closeout_equity_usd[2] == pytest.approx(2000.0)
    by_mode = result.summary_by_mode()
    assert by_mode["cross"]["liquidated_accounts"] == 0
    assert by_mode["cross"]["saved_by_cross"] == 1
    assert by_mode["isolated"]["liquidated_accounts"] == 1
    assert by_mode["isolated"]["bad_debt_usd"] == pytest.approx(1000.0)
    assert by_mode["portfolio"]["liquidated_accounts"] == 1
    assert by_mode["portfolio"]["bad_debt_usd"] == 0.0
    total = result.summary()
    assert total["accounts"] == 3
    assert total["liquidated_accounts"] == 2
    assert total["bad_debt_usd"] == pytest.approx(1000.0)
    assert [level for _, level in result.fund_path()] == pytest.approx([200e6 - 1000.0])


def test_mixed_mode_refusals_name_the_field() -> None:
    """A portfolio account without a portfolio model, a portfolio model with none, and a
    cascade or capacity across modes are refused naming the field."""
    market = _hedge_market()
    tiered = make_model("tiered", FLAT_1PCT)
    cfg = AccountConfig(holding_bars=3, latency_bars=0)
    with pytest.raises(InvalidParameters) as info:
        simulate_accounts(market, tiered, [_hedge("a", None), _hedge("p", "portfolio")], cfg)
    assert info.value.field == "portfolio_model"
    with pytest.raises(InvalidParameters) as info:
        simulate_accounts(market, tiered, [_hedge("a", None), _hedge("i", "isolated")], cfg,
                          portfolio=make_portfolio_model("deribit_pme_2024"))
    assert info.value.field == "portfolio_model"
    for extra in ({"cascade": True}, {"max_liquidations_per_bar": 1}):
        with pytest.raises(InvalidParameters) as info:
            simulate_accounts(market, tiered, [_hedge("a", None), _hedge("i", "isolated")],
                              dataclasses.replace(cfg, **extra))
        assert info.value.field == "accounts.mode"


def test_mode_in_json_and_csv() -> None:
    """``mode`` per record (JSON) or per row (CSV, every row of an account the same); a bad
    one is refused with its path."""
    text = json.dumps([{"id": "a", "entry": 0, "positions": {"X": 1}, "mode": "isolated"},
                       {"id": "b", "entry": 0, "positions": {"X": 1}}])
    assert [a.mode for a in load_accounts(text)] == ["isolated", None]
    csv_text = ("id,entry,kind,name,amount,mode\n"
                "a,0,position,X,1,portfolio\na,0,collateral,USDT,5,portfolio\n"
                "b,0,position,X,1,\n")
    assert [a.mode for a in load_accounts(csv_text)] == ["portfolio", None]
    with pytest.raises(InvalidParameters) as info:
        load_accounts(json.dumps([{"id": "a", "entry": 0, "positions": {"X": 1},
                                   "mode": "hybrid"}]))
    assert info.value.field == "accounts[0].mode"
    with pytest.raises(InvalidParameters) as info:
        load_accounts("id,entry,kind,name,amount,mode\na,0,position,X,1,cross\n"
                      "a,0,position,Y,1,isolated\n")
    assert info.value.field == "accounts[2].mode"


def test_population_mode_mix_is_seeded_and_keeps_the_books() -> None:
    """``modes`` draws each account's mode from its own seeded generator: the books are the
    same as without a mix, the draw repeats with the seed, and its shares follow the
    weights (1,000 accounts, 70/30: within 5 points)."""
    n = 1001
    ts = T0 + np.arange(n, dtype=np.int64) * MIN
    close = np.full((2, n), 100.0)
    kw = {"instruments": ("AUSDT", "BUSDT"), "timestamp_ms": ts, "close": close}
    base = PopulationSpec(seed=5, entry_every_bars=1, accounts_per_entry=1)
    mixed = dataclasses.replace(base, modes={"cross": 0.7, "isolated": 0.3})
    plain = generate_population(base, **kw)
    a = generate_population(mixed, **kw)
    b = generate_population(mixed, **kw)
    assert [dataclasses.replace(x, mode=None) for x in a] == plain
    assert [x.mode for x in a] == [x.mode for x in b]
    share = sum(x.mode == "isolated" for x in a) / len(a)
    assert abs(share - 0.3) < 0.05
    assert {x.mode for x in plain} == {None}
    with pytest.raises(InvalidParameters) as info:
        PopulationSpec.from_mapping({"modes": {"hybrid": 1.0}})
    assert info.value.field == "population.modes"


def _books(market: Market, seed: int, first: int) -> list[Account]:
    """Directional, hedged and basket books, stable, BTC and ETH collateral, modes cycling
    cross / isolated / portfolio / the run's."""
    rng = np.random.default_rng(seed)
    ts = market.timestamp_ms
    names = market.instruments
    modes = ("cross", "isolated", "portfolio", None)
    out = []
    for j in range(48):
        e = int(rng.integers(first, len(ts) - 20))
        gross = float(rng.uniform(1e3, 1e6))
        kind = j % 3
        if kind == 0:
            pos = {names[j % 3]: gross * (1 if rng.random() < 0.5 else -1)}
        elif kind == 1:
            pos = {names[0]: gross / 2, names[1 + j % 2]: -gross / 2}
        else:
            pos = {nm: gross / 3 for nm in names}
        value = gross / float(rng.uniform(1.5, 15))
        coll = {"USDT": value / 2, "BTC": value / 4 / float(market.bars[0].close[e]),
                "ETH": value / 4 / float(market.bars[1].close[e])}
        out.append(Account(id=f"r{j}", entry_ms=int(ts[e]) + 1, collateral=coll,
                           positions=pos, mode=modes[(j // 3) % 4]))
    return out


_ACCOUNT_FIELDS = ("entry_bar", "trigger_bar", "closeout_equity_usd", "bad_debt_usd",
                   "fee_usd", "closeout_bar", "steps", "queued_bar", "wait_bars")
_POSITION_FIELDS = ("position_instrument", "position_notional_usd", "twin_trigger_bar",
                    "twin_bad_debt_usd", "twin_fee_usd", "leg_pnl_usd", "twin_closeout_bar",
                    "leg_liquidated", "leg_closed_usd", "twin_closed_usd")


def _assert_partition(mixed: AccountResult, alone: dict[str, AccountResult]) -> None:
    """Every account (and its positions) of ``mixed`` equals its row in its mode's run, bit
    for bit; the per-mode summaries are those runs' summaries."""
    ids = [a.id for a in mixed.accounts]
    for mode, run in alone.items():
        for j_alone, acc in enumerate(run.accounts):
            j = ids.index(acc.id)
            assert mixed.modes()[j] == mode
            for name in _ACCOUNT_FIELDS:
                ours, theirs = getattr(mixed, name), getattr(run, name)
                if theirs.size:
                    np.testing.assert_array_equal(ours[j], theirs[j_alone], err_msg=name)
            mine = np.flatnonzero(mixed.position_account == j)
            them = np.flatnonzero(run.position_account == j_alone)
            for name in _POSITION_FIELDS:
                ours, theirs = getattr(mixed, name), getattr(run, name)
                if theirs.size:
                    np.testing.assert_array_equal(ours[mine], theirs[them], err_msg=name)
        assert mixed.summary_by_mode()[mode] == run.summary()
    assert sum(len(r.accounts) for r in alone.values()) == len(mixed.accounts)


@pytest.mark.data
@pytest.mark.parametrize("mechanics", [False, True])
def test_mixed_population_is_its_modes_run_alone_on_real_data(
        shared_data: Path, data_file: Callable[[str], str], mechanics: bool) -> None:
    """Real BTC/ETH/SOL 30-minute bars through LUNA, a population mixing the three modes
    (and accounts without one, in the run's mode): each account's figures and its twins' are
    those of a run of its mode's accounts alone, bit for bit, with the core and with funding
    off but fees, spread and the partial policy on (no cascade: that couples accounts, and a
    mixed population refuses it)."""
    for r in LUNA_30M:
        data_file(r)
    start, end = 1_651_363_200_000, 1_653_782_400_000  # 2022-05-01 .. 2022-05-29
    market = Market.from_series([load_bars(r, root=shared_data, start_ms=start, end_ms=end)
                                 for r in LUNA_30M])
    tiered = make_model("tiered", {"base_mmr": 0.01, "tier_growth": 1.0,
                                   "bracket_caps_usd": []})
    pm = make_portfolio_model("historical", HIST)
    books = _books(market, seed=3, first=pm.first_valid_bar(market.bar_seconds))
    cfg = AccountConfig(mode="isolated", holding_bars=96, latency_bars=1,
                        spread_rate=0.001, liquidation_fee_rate=0.005)
    if mechanics:
        cfg = dataclasses.replace(cfg, policy="partial", partial_fraction=0.5)
    mixed = simulate_accounts(market, tiered, books, cfg, portfolio=pm)
    alone = {}
    for mode in ("cross", "isolated", "portfolio"):
        mine = [dataclasses.replace(b, mode=None) for b in books if (b.mode or cfg.mode) == mode]
        if mine:
            alone[mode] = simulate_accounts(market, tiered, mine,
                                            dataclasses.replace(cfg, mode=mode),
                                            portfolio=pm if mode == "portfolio" else None)
    assert mixed.mode == "mixed"
    _assert_partition(mixed, alone)
    total = mixed.summary()
    for key in ("accounts", "liquidated_accounts", "bad_debt_usd"):
        assert total[key] == pytest.approx(sum(r.summary()[key] for r in alone.values()))
    assert total["liquidated_accounts"] > 0


def test_run_account_backtest_reports_accounts_by_mode() -> None:
    """The report's rows carry each account's mode, and ``accounts_by_mode`` the per-mode
    figures, summing to the overall ones."""
    market = _hedge_market()
    report, _ = run_account_backtest(
        market, "tiered", FLAT_1PCT, accounts=[_hedge("c", "cross"), _hedge("i", "isolated")],
        config=AccountConfig(holding_bars=3, latency_bars=0))
    assert [(r.id, r.mode, r.liquidated) for r in report.accounts] == [
        ("c", "cross", False), ("i", "isolated", True)]
    assert report.accounts_by_mode is not None
    assert set(report.accounts_by_mode) == {"cross", "isolated"}
    assert report.accounts_by_mode["isolated"].bad_debt_usd == pytest.approx(1000.0)
    assert report.summary[0].bad_debt_usd == pytest.approx(1000.0)
    assert report.summary[0].accounts == 2
