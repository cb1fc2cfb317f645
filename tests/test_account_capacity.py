"""The liquidation engine's capacity (domain.md §10): the queue by hand and against the plain
loop, unlimited capacity = the account engine bit for bit, and the throughput–insolvency
frontier (monotone where the theory says so, and on 2025-10-10)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import InvalidParameters, make_model
from calibration.accounts import (
    Account,
    AccountConfig,
    Market,
    capacity_frontier,
    parse_capacities,
    queue_figures,
    simulate_accounts,
    underlying_of,
)
from calibration.models import TieredMargin
from tests import reference_accounts as ref
from tests.test_account_mechanics import (
    LUNA_TIERS,
    PERP_5M,
    PERP_TIERS,
    _bars,
    _check_mech,
    _luna_market_data,
    _perp_books,
)
from tests.test_accounts import FLAT, FLAT_1PCT, LUNA_30M, MIN, T0, _books

ONE_PCT = TieredMargin(**FLAT_1PCT)
pytestmark = pytest.mark.filterwarnings("error")

# --- three accounts triggering in one bar --------------------------------------------------
#
# One instrument A at 100 until bar 2; its lows are 95 (bar 3), 90 (bar 4), 85 (bars 5..7).
# Three accounts open at bar 2's close long 10,000 USD (100 units), 1% MM, latency 0:
#   X 400 USDT: bar 3 equity 400 − 500 = −100, MM 95, equity/MM −1.05
#   Y 550 USDT: bar 3 equity 50, MM 95, ratio 0.53; bar 4 equity −450; bar 5 −950
#   Z 580 USDT: bar 3 equity 80, ratio 0.84;        bar 4 equity −420; bar 5 −920
# Unlimited: all three close at 95 (bar 3): bad debt X 100, Y 0, Z 0 = 100.
# Capacity 1, most undercollateralised first: bar 3 serves X (−100), Y and Z wait; bar 4 Y
#   (ratio −450/90 = −5.0) before Z (−420/90 = −4.67) at 90: −450; bar 5 Z at 85: −920.
#   Bad debt 1,470; added by waiting 1,370; waits 0, 1, 2 bars; backlog 2 after bar 3, 1
#   after bar 4. Z waits past its holding window (bars 3..4) and is still served.
# Capacity 1, first come (entry order Z, Y, X on ties): Z at 95 (+80), Y at 90 (−450), X at
#   85 (400 − 1,500 = −1,100): 1,550.
# Notional cap 10,000 USD per bar: X's step (9,500 at bar 3's mark) leaves the bar's started
#   notional below the cap, so Y starts too (at 95: +50); Z at bar 4: −420. Total 520.

THREE = [FLAT] * 3 + [(100, 100, 95, 95), (95, 95, 90, 90)] + [(90, 90, 85, 85)] * 3


def _three_market() -> Market:
    return Market.from_series([_bars("AUSDT", THREE)])


def _three_accounts(order: str = "XYZ") -> list[Account]:
    cash = {"X": 400.0, "Y": 550.0, "Z": 580.0}
    return [Account(id=a, entry_ms=T0 + 2 * MIN, collateral={"USDT": cash[a]},
                    positions={"AUSDT": 10_000.0}) for a in order]


def _run(market: Market, accounts: list[Account], **cfg: object):  # type: ignore[no-untyped-def]
    base = {"holding_bars": 2, "latency_bars": 0}
    return simulate_accounts(market, ONE_PCT, accounts,
                             AccountConfig(**{**base, **cfg}),  # type: ignore[arg-type]
                             mechanics_kernel=True)


def _reference(market: Market, accounts: list[Account], backlog: list[int],
               **extra: object) -> list[ref.MechOutcome]:
    prices = {b.instrument: {"low": b.low.tolist(), "high": b.high.tolist(),
                             "close": b.close.tolist()} for b in market.bars}
    books = [ref.RefAccount(2, {"AUSDT": a.positions["AUSDT"] / 100.0},
                            a.collateral["USDT"], {}) for a in accounts]
    settings_ = ref.MechSettings(holding_bars=2, latency_bars=0, **extra)  # type: ignore[arg-type]
    return ref.replay_mech(prices, market.instruments, {"AUSDT": "A"},
                           lambda inst, notional, t: 0.01 * notional, books, settings_,
                           backlog=backlog)


def test_three_accounts_one_bar_capacity_one_by_hand() -> None:
    market = _three_market()
    unlimited = _run(market, _three_accounts())
    assert unlimited.trigger_bar.tolist() == [3, 3, 3]
    assert unlimited.closeout_equity_usd.tolist() == pytest.approx([-100.0, 50.0, 80.0])
    r = _run(market, _three_accounts(), max_liquidations_per_bar=1)
    assert r.queued_bar.tolist() == [3, 3, 3]
    assert r.trigger_bar.tolist() == [3, 4, 5]
    assert r.closeout_bar.tolist() == [3, 4, 5]
    assert r.wait_bars.tolist() == [0, 1, 2]
    # fill prices: 100 units at 95, 90, 85
    assert r.leg_closed_usd.tolist() == pytest.approx([9_500.0, 9_000.0, 8_500.0])
    assert r.bad_debt_usd.tolist() == pytest.approx([100.0, 450.0, 920.0])
    assert r.backlog.tolist() == [0, 0, 0, 2, 1, 0, 0, 0]
    assert r.started.tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    q = queue_figures(r, unlimited)
    assert (q["peak_backlog"], q["peak_backlog_bar"], q["backlog"]) == (2, 3, [[3, 2], [4, 1]])
    assert q["wait_bars_histogram"] == {"0": 1, "1": 1, "2": 1}
    assert (q["mean_wait_bars"], q["max_wait_bars"]) == (1.0, 2)
    assert q["bad_debt_added_usd"] == pytest.approx(1_370.0)
    # the plain loop, extended with the queue, agrees account by account and bar by bar
    backlog: list[int] = []
    outs = _reference(market, _three_accounts(), backlog, max_per_bar=1)
    assert [o.trigger for o in outs] == [3, 4, 5]
    assert [o.wait_bars for o in outs] == [0, 1, 2]
    assert [o.bad_debt for o in outs] == pytest.approx(r.bad_debt_usd.tolist(), rel=1e-12)
    assert backlog == r.backlog.tolist()


def test_queue_order_and_notional_cap_by_hand() -> None:
    market = _three_market()
    fifo = _run(market, _three_accounts("ZYX"), max_liquidations_per_bar=1,
                queue_order="first_come")
    assert fifo.trigger_bar.tolist() == [3, 4, 5]
    assert fifo.closeout_equity_usd.tolist() == pytest.approx([80.0, -450.0, -1_100.0])
    worst = _run(market, _three_accounts("ZYX"), max_liquidations_per_bar=1)
    assert worst.trigger_bar.tolist() == [5, 4, 3]  # Z, Y, X: X first, then Y
    assert float(worst.bad_debt_usd.sum()) == pytest.approx(1_470.0)
    capped = _run(market, _three_accounts(), max_liquidation_notional_per_bar=10_000.0)
    assert capped.trigger_bar.tolist() == [3, 3, 4]
    assert capped.started_usd.tolist()[3:5] == pytest.approx([19_000.0, 9_000.0])
    assert capped.bad_debt_usd.tolist() == pytest.approx([100.0, 0.0, 420.0])
    for accounts, extra, got in (
            (_three_accounts("ZYX"), {"max_per_bar": 1, "queue_order": "first_come"}, fifo),
            (_three_accounts(), {"max_usd_per_bar": 10_000.0}, capped)):
        backlog: list[int] = []
        outs = _reference(market, accounts, backlog, **extra)
        assert [o.trigger for o in outs] == got.trigger_bar.tolist()
        assert [o.closeout_equity for o in outs] == pytest.approx(
            got.closeout_equity_usd.tolist(), rel=1e-12)
        assert backlog == got.backlog.tolist()


def test_an_account_that_recovers_while_waiting_leaves_the_queue() -> None:
    """Bar 3 low 95 then back to 99 at bar 4: Y (550 USDT) waits behind X at bar 3; at bar 4
    its equity 550 − 100 = 450 > MM 99, so it leaves the queue and is never liquidated."""
    rows = [FLAT] * 3 + [(100, 100, 95, 95)] + [(99, 99, 99, 99)] * 3
    market = Market.from_series([_bars("AUSDT", rows)])
    r = _run(market, _three_accounts("XY"), max_liquidations_per_bar=1)
    assert r.trigger_bar.tolist() == [3, -1]
    assert r.queued_bar.tolist() == [3, 3]
    assert r.backlog.tolist()[3:5] == [1, 0]
    assert r.bad_debt_usd.tolist() == pytest.approx([100.0, 0.0])


def test_capacity_settings_are_validated_naming_the_field() -> None:
    for raw, field in (({"max_liquidations_per_bar": 0}, "max_liquidations_per_bar"),
                       ({"max_liquidations_per_bar": 1.5}, "max_liquidations_per_bar"),
                       ({"max_liquidation_notional_per_bar": -1},
                        "max_liquidation_notional_per_bar"),
                       ({"queue_order": "random"}, "queue_order")):
        with pytest.raises(InvalidParameters) as info:
            AccountConfig.from_mapping(raw)
        assert info.value.field == f"liquidation.{field}"
    assert AccountConfig.from_mapping({"mode": "portfolio",
                                       "max_liquidations_per_bar": 3}).capacity_limited
    with pytest.raises(InvalidParameters) as info:
        parse_capacities("1,x")
    assert info.value.field == "frontier"
    assert parse_capacities("1, 2,inf") == [1.0, 2.0, math.inf]


# --- unlimited capacity is the account engine ---------------------------------------------

@pytest.mark.data
def test_unlimited_capacity_is_the_account_engine_bit_for_bit(
        shared_data: Path, data_file: Callable[[str], str]) -> None:
    """Capacity never binding (no limit, or one larger than the population, through the
    queue's sorting path) with every switch off gives the core kernel's figures exactly."""
    for r in LUNA_30M:
        data_file(r)
    market = _luna_market_data(shared_data)
    books = _books(market, seed=11)
    model = make_model("tiered", LUNA_TIERS)
    for latency in (0, 1):
        cfg = AccountConfig(holding_bars=96, latency_bars=latency, spread_rate=0.001,
                            liquidation_fee_rate=0.005)
        core = simulate_accounts(market, model, books, cfg)
        for extra in ({"max_liquidation_notional_per_bar": math.inf},
                      {"max_liquidations_per_bar": 10**9},
                      {"max_liquidations_per_bar": 10**9, "queue_order": "first_come"}):
            run = dataclasses.replace(cfg, **extra)  # type: ignore[arg-type]
            mech = simulate_accounts(market, model, books, run, mechanics_kernel=True)
            for name in ("trigger_bar", "closeout_equity_usd", "bad_debt_usd", "fee_usd",
                         "twin_trigger_bar", "twin_bad_debt_usd", "leg_pnl_usd"):
                np.testing.assert_array_equal(getattr(mech, name), getattr(core, name), name)
            assert not mech.backlog.any()
            np.testing.assert_array_equal(mech.queued_bar, core.trigger_bar)
        assert (core.trigger_bar >= 0).sum() > 5


@pytest.mark.data
@pytest.mark.parametrize("order", ["most_undercollateralised", "first_come"])
def test_binding_capacity_matches_the_plain_loop_with_cascade(
        shared_data: Path, data_file: Callable[[str], str], order: str) -> None:
    """LUNA 2022-05 with spread, impact, fees, partial steps and the shared cascade, at a
    capacity of 2 steps per bar: every account equals the plain loop's queue."""
    for r in LUNA_30M:
        data_file(r)
    market = _luna_market_data(shared_data)
    books = _books(market, seed=4)
    cfg = AccountConfig(holding_bars=96, latency_bars=1, spread_rate=0.0005,
                        impact_coef=0.01, liquidation_fee_rate=0.005, cascade=True,
                        cascade_kappa=50.0, adv_window_bars=48, policy="partial",
                        partial_fraction=0.5, cooldown_bars=2, max_liquidations_per_bar=2,
                        queue_order=order)
    outs = _check_mech(market, books, cfg, LUNA_TIERS, funding=False)
    assert max(o.wait_bars for o in outs) > 0


@pytest.mark.data
@pytest.mark.parametrize("policy", ["close_all", "partial"])
def test_fast_start_equals_the_full_walk_at_a_binding_capacity(
        shared_data: Path, data_file: Callable[[str], str], policy: str) -> None:
    """Without cascade or funding the walk may start at each account's core trigger bar:
    every output equals the walk from the entries exactly, twins and queue included."""
    for r in LUNA_30M:
        data_file(r)
    market = _luna_market_data(shared_data)
    books = _books(market, seed=7)
    model = make_model("tiered", LUNA_TIERS)
    for order in ("most_undercollateralised", "first_come"):
        cfg = AccountConfig(holding_bars=96, latency_bars=1, spread_rate=0.0005,
                            impact_coef=0.01, liquidation_fee_rate=0.005, adv_window_bars=48,
                            policy=policy, partial_fraction=0.5, max_liquidations_per_bar=1,
                            queue_order=order)
        fast = simulate_accounts(market, model, books, cfg)
        full = simulate_accounts(market, model, books, cfg, fast_start=False)
        for name in ("trigger_bar", "closeout_bar", "closeout_equity_usd", "bad_debt_usd",
                     "fee_usd", "leg_pnl_usd", "leg_closed_usd", "steps", "queued_bar",
                     "wait_bars", "backlog", "started", "started_usd", "twin_trigger_bar",
                     "twin_bad_debt_usd", "twin_wait_bars", "twin_backlog"):
            np.testing.assert_array_equal(getattr(fast, name), getattr(full, name), name)
        assert fast.backlog.max() > 0


@pytest.mark.data
def test_the_queue_only_walk_equals_the_mechanics_walk_bit_for_bit(
        shared_data: Path, data_file: Callable[[str], str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With only the capacity on (close_all, no impact, funding, cascade, backstop, keepers),
    the specialised walk (``_kernel_queue.replay_queue``) gives every output of the general
    mechanics walk exactly: both queue orders, a count and a notional limit (picked one at a
    time and sorted), latency 0 and 1, collateral with haircuts, twins included."""
    from calibration.accounts import _engine

    for r in LUNA_30M:
        data_file(r)
    market = _luna_market_data(shared_data)
    books = _books(market, seed=7)
    model = make_model("tiered", LUNA_TIERS)
    calls: list[int] = []
    lean = _engine.replay_queue

    def counted(*args: object) -> None:
        calls.append(1)
        lean(*args)

    monkeypatch.setattr(_engine, "replay_queue", counted)
    waited = 0
    for latency, order, limit in itertools.product(
            (0, 1), ("most_undercollateralised", "first_come"),
            ({"max_liquidations_per_bar": 1}, {"max_liquidations_per_bar": 3},
             {"max_liquidations_per_bar": 9},
             {"max_liquidation_notional_per_bar": 200_000.0},
             {"max_liquidations_per_bar": 2, "max_liquidation_notional_per_bar": 100_000.0})):
        cfg = AccountConfig(holding_bars=96, latency_bars=latency, spread_rate=0.0005,
                            liquidation_fee_rate=0.005, queue_order=order,
                            **limit)  # type: ignore[arg-type]
        n_calls = len(calls)
        fast = simulate_accounts(market, model, books, cfg)
        assert len(calls) == n_calls + 2  # the accounts' walk and the twins'
        monkeypatch.setattr(_engine, "_LEAN_QUEUE", False)
        general = simulate_accounts(market, model, books, cfg)
        monkeypatch.setattr(_engine, "_LEAN_QUEUE", True)
        assert len(calls) == n_calls + 2
        for f in dataclasses.fields(fast):
            a, b = getattr(fast, f.name), getattr(general, f.name)
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b, f.name)
        waited += int(fast.backlog.max() > 0)
    assert waited >= 10


# --- the frontier ---------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(drops=st.lists(st.floats(0.0, 0.03), min_size=12, max_size=12),
       cash=st.lists(st.floats(50.0, 1_500.0), min_size=2, max_size=12),
       latency=st.sampled_from([0, 1]))
def test_frontier_is_monotone_on_paths_that_only_worsen(
        drops: list[float], cash: list[float], latency: int) -> None:
    """Long-only books on a path whose lows only fall, no cascade, first-come: an account's
    bad debt only grows with its service bar, and first-come service is no later with more
    capacity, so bad debt is non-increasing in capacity (and liquidated accounts equal)."""
    price = [100.0]
    for d in drops:
        price.append(price[-1] * (1 - d))
    rows = [FLAT] * 2 + [(p, p, p, p) for p in price[1:]] + [(price[-1],) * 4] * 2
    market = Market.from_series([_bars("AUSDT", rows)])
    accounts = [Account(id=f"a{j}", entry_ms=T0 + MIN, collateral={"USDT": c},
                        positions={"AUSDT": 10_000.0}) for j, c in enumerate(cash)]
    cfg = AccountConfig(holding_bars=len(rows), latency_bars=latency, queue_order="first_come")
    rows_ = capacity_frontier(market, ONE_PCT, accounts, cfg, capacities=(1, 2, 3, 5, math.inf))
    bad = [r["bad_debt_usd"] for r in rows_]
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(bad)), bad
    assert rows_[-1]["bad_debt_added_usd"] == 0.0


PERP_START, PERP_END = 1_760_054_400_000, 1_760_227_200_000  # 2025-10-10 .. 10-12 UTC


def _perp_day(root: Path) -> Market:
    from calibration import load_bars

    return Market.from_series([load_bars(r, root=root, start_ms=PERP_START, end_ms=PERP_END)
                               for r in PERP_5M])


def _worsening(market: Market) -> Market:
    """The same bars with every low the running minimum and every high the running maximum
    (closes clipped inside): the path's adverse envelope, on which prices only worsen."""
    out = []
    for b in market.bars:
        low = np.minimum.accumulate(b.low)
        high = np.maximum.accumulate(b.high)
        out.append(dataclasses.replace(b, low=low, high=high, open=np.clip(b.open, low, high),
                                       close=np.clip(b.close, low, high), _cache={}))
    return Market.from_series(out)


@pytest.mark.data
@pytest.mark.parametrize("seed", [1, 3, 5])
def test_frontier_on_2025_10_10_is_monotone_where_prices_only_worsen(
        shared_data: Path, data_file: Callable[[str], str], seed: int) -> None:
    """BTC/ETH perpetuals, 5-minute, 2025-10-10..11, long, short and cross-asset books: on
    the day's adverse envelope (the condition), first-come, no cascade, the frontier over 1..inf
    liquidations per bar is monotone and the lowest capacity queues. On the day itself it is
    not (the V after the 21:15 UTC wick rewards waiting), and with a cascade a slow engine
    moves the price less: both shown, so the condition is not vacuous."""
    for r in PERP_5M:
        data_file(r)
    day = _perp_day(shared_data)
    model = make_model("tiered", PERP_TIERS)
    caps = (1, 2, 3, 5, 10, 20, math.inf)
    cfg = AccountConfig(holding_bars=288, latency_bars=1, spread_rate=0.0005,
                        queue_order="first_come")
    env = _worsening(day)
    rows = capacity_frontier(env, model, _perp_books(env, seed=seed), cfg, capacities=caps)
    bad = [r["bad_debt_usd"] for r in rows]
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(bad)), bad
    assert rows[0]["peak_backlog"] > 0
    assert rows[0]["max_wait_bars"] > 0
    assert bad[0] > bad[-1]
    assert rows[-1]["capacity"] is None
    assert rows[-1]["bad_debt_added_usd"] == 0.0
    assert rows[0]["per_minute"] == pytest.approx(0.2)
    if seed == 3:
        books = _perp_books(day, seed=seed)
        real = [r["bad_debt_usd"] for r in capacity_frontier(day, model, books, cfg,
                                                             capacities=caps)]
        assert any(a < b for a, b in itertools.pairwise(real)), real
        moved = capacity_frontier(day, model, books, dataclasses.replace(
            cfg, cascade=True, cascade_kappa=2.0), capacities=(1, math.inf))
        assert moved[0]["bad_debt_usd"] < moved[1]["bad_debt_usd"]


def test_cli_frontier_in_the_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``--frontier 1,2,inf`` on the three-account case: bad debt 1,470 / 520 / 100 (capacity
    2: X and Y at 95, −100 and +50, Z at 90, −420), and the queue of the run's own capacity
    (1 per bar) in the report."""
    from calibration.cli import main

    for b in _three_market().bars:
        pd.DataFrame({"timestamp_ms": b.timestamp_ms, "open": b.open, "high": b.high,
                      "low": b.low, "close": b.close}).to_csv(tmp_path / f"{b.instrument}.csv",
                                                               index=False)
    (tmp_path / "accounts.json").write_text(json.dumps([
        {"id": a.id, "entry": T0 + 2 * MIN, "collateral": a.collateral,
         "positions": a.positions} for a in _three_accounts()]))
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    args = ["accounts", "backtest", "--data", "AUSDT=AUSDT.csv", "--accounts", "accounts.json",
            "--model", "tiered", "--params", json.dumps(FLAT_1PCT), "--liquidation",
            '{"holding_bars": 2, "latency_bars": 0, "max_liquidations_per_bar": 1}',
            "--no-stress-windows", "--frontier", "1,2,inf", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    frontier = report["frontier"]
    assert [r["capacity"] for r in frontier] == [1, 2, None]
    # capacity 2: X and Y at 95 (−100, +50), Z at 90 (−420)
    assert [r["bad_debt_usd"] for r in frontier] == pytest.approx([1_470.0, 520.0, 100.0])
    assert report["queue"]["bad_debt_added_usd"] == pytest.approx(1_370.0)
    assert report["queue"]["peak_backlog"] == 2
    assert report["queue"]["backlog"] == [["2020-09-13T12:29:40Z", 2],
                                          ["2020-09-13T12:30:40Z", 1]]
    assert report["queue"]["peak_backlog_at"] == "2020-09-13T12:29:40Z"
    assert report["summary"][0]["bad_debt_usd"] == pytest.approx(1_470.0)
    assert main(args[:-1]) == 0
    text = capsys.readouterr().out
    assert "throughput-insolvency frontier" in text
    assert "1,470" in text
    assert "liquidation queue: peak backlog 2" in " ".join(text.split())
    assert "1,370" in text


def test_isolated_twins_queue_in_their_own_engine() -> None:
    """In isolated mode the frontier reads the twins: one position per account here, so the
    twins' queue is the accounts' (same bad debt, waits)."""
    market = _three_market()
    rows = capacity_frontier(market, ONE_PCT, _three_accounts(),
                             AccountConfig(mode="isolated", holding_bars=2, latency_bars=0),
                             capacities=(1, math.inf))
    assert [r["bad_debt_usd"] for r in rows] == pytest.approx([1_470.0, 100.0])
    assert rows[0]["max_wait_bars"] == 2
    assert underlying_of("AUSDT") == "A"


def test_capacity_over_http(tmp_path: Path) -> None:
    """``POST /v1/account-backtests`` takes the capacity in ``liquidation``: the report's
    ``queue`` adds exactly the bad debt of the limited run over the unlimited one (two
    requests), there is no queue without a limit, and a bad order names its field."""
    from litestar.testing import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.api_helpers import bars_csv

    (tmp_path / "a.csv").write_bytes(bars_csv(600, seed=1))
    (tmp_path / "b.csv").write_bytes(bars_csv(600, seed=2))
    body = {"data": [{"instrument": "AUSDT", "ref": "a.csv"},
                     {"instrument": "BUSDT", "ref": "b.csv"}],
            "model": "tiered", "params": {"base_mmr": 0.02, "tier_growth": 1.0,
                                          "bracket_caps_usd": []},
            "population": {"seed": 3, "entry_every_bars": 4, "accounts_per_entry": 30,
                           "leverage": [20, 60]},
            "stress_windows": []}
    settings_ = Settings(state_dir=str(tmp_path / ".state"), data_root=str(tmp_path),
                         guardrails_json='{"min_interval_s": 0}')
    with TestClient(create_app(settings_)) as c:
        limited = c.post("/v1/account-backtests", json={
            **body, "liquidation": {"holding_bars": 48, "max_liquidations_per_bar": 1}})
        free = c.post("/v1/account-backtests", json={
            **body, "liquidation": {"holding_bars": 48}})
        bad = c.post("/v1/account-backtests", json={
            **body, "liquidation": {"queue_order": "lifo"}})
    assert limited.status_code == free.status_code == 200, limited.text
    q = limited.json()["queue"]
    assert free.json()["queue"] is None
    assert q["peak_backlog"] > 0
    added = (limited.json()["summary"][0]["bad_debt_usd"]
             - free.json()["summary"][0]["bad_debt_usd"])
    assert q["bad_debt_added_usd"] == pytest.approx(added, abs=1e-6)
    assert bad.status_code in (400, 422)
    assert bad.json()["field"] == "liquidation.queue_order"


def test_notional_frontier_by_hand() -> None:
    """USD per bar on the three-account case. 5,000: every step is larger (9,500, 9,000,
    8,500 at its bar's marks) and the first of a bar always starts, so one a bar: 1,470.
    10,000: X and Y at bar 3 (9,500 < 10,000 when Y starts), Z at bar 4: 520. 20,000: all
    three at bar 3 (19,000 < 20,000 when Z starts): 100."""
    rows = capacity_frontier(_three_market(), ONE_PCT, _three_accounts(),
                             AccountConfig(holding_bars=2, latency_bars=0),
                             capacities=(5_000.0, 10_000.0, 20_000.0, math.inf),
                             kind="notional")
    assert [r["capacity"] for r in rows] == [5_000.0, 10_000.0, 20_000.0, None]
    assert [r["bad_debt_usd"] for r in rows] == pytest.approx([1_470.0, 520.0, 100.0, 100.0])
    assert rows[0]["per_minute"] == pytest.approx(5_000.0)  # one-minute bars
    with pytest.raises(InvalidParameters) as info:
        capacity_frontier(_three_market(), ONE_PCT, _three_accounts(), kind="gas")
    assert info.value.field == "kind"
    with pytest.raises(InvalidParameters) as info:
        capacity_frontier(_three_market(), ONE_PCT, _three_accounts(), capacities=(1.5,))
    assert info.value.field == "capacities"


def test_frontier_over_http_and_in_the_html_report(tmp_path: Path) -> None:
    """``frontier`` in ``POST /v1/account-backtests``: on the three-account case the rows are
    the hand-computed 1,470 / 520 / 100 USD of ``test_cli_frontier_in_the_json_report``
    (capacities 1, 2, no limit), the report says what the capacities limit, the HTML
    report draws the frontier and tabulates it, and a capacity of 0 is refused naming
    its place."""
    from litestar.testing import TestClient

    from calibration.accounts import render_account_report, run_account_backtest
    from service.app import create_app
    from service.settings import Settings

    for b in _three_market().bars:
        pd.DataFrame({"timestamp_ms": b.timestamp_ms, "open": b.open, "high": b.high,
                      "low": b.low, "close": b.close}).to_csv(tmp_path / f"{b.instrument}.csv",
                                                               index=False)
    body = {"data": [{"instrument": "AUSDT", "ref": "AUSDT.csv"}],
            "model": "tiered", "params": FLAT_1PCT,
            "accounts": [{"id": a.id, "entry": T0 + 2 * MIN, "collateral": a.collateral,
                          "positions": a.positions} for a in _three_accounts()],
            "liquidation": {"holding_bars": 2, "latency_bars": 0},
            "stress_windows": [], "frontier": [1, 2, None]}
    settings_ = Settings(state_dir=str(tmp_path / ".state"), data_root=str(tmp_path))
    with TestClient(create_app(settings_)) as c:
        ok = c.post("/v1/account-backtests", json=body)
        zero = c.post("/v1/account-backtests", json={**body, "frontier": [1, 0]})
        kind = c.post("/v1/account-backtests", json={**body, "frontier_kind": "positions"})
    assert ok.status_code == 200, ok.text
    report = ok.json()
    assert [r["capacity"] for r in report["frontier"]] == [1, 2, None]
    assert [r["bad_debt_usd"] for r in report["frontier"]] == pytest.approx(
        [1_470.0, 520.0, 100.0])
    assert report["frontier_kind"] == "accounts"
    assert zero.status_code == 422
    assert zero.json()["field"] == "frontier[1]"
    assert kind.status_code == 400
    assert kind.json()["field"] == "frontier_kind"

    market = _three_market()
    lib, result = run_account_backtest(
        market, "tiered", FLAT_1PCT, accounts=_three_accounts(),
        config=AccountConfig(holding_bars=2, latency_bars=0), stress_windows=(),
        frontier=[1, 2, math.inf])
    assert [r["bad_debt_usd"] for r in lib.frontier or []] == pytest.approx(
        [r["bad_debt_usd"] for r in report["frontier"]])
    page = render_account_report(lib, result)
    assert "id='chart-frontier'" in page
    assert "Throughput–insolvency frontier" in page
    table = page[page.index("<table id='frontier'>"):]
    for shown in ("1,470", "520", "no limit"):
        assert shown in table
