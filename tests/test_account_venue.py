"""Venue mechanics of the liquidation engine (domain.md §10, venues.md): auto-deleveraging,
the backstop vault, partial liquidation, close factors and dust, per-block limits, presets,
keepers and oracles; each by hand."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from calibration.accounts import Account, AccountConfig, Market, simulate_accounts
from calibration.models import TieredMargin
from tests.test_account_mechanics import _bars
from tests.test_accounts import FLAT_1PCT, MIN, T0

ONE_PCT = TieredMargin(**FLAT_1PCT)
pytestmark = pytest.mark.filterwarnings("error")

# --- auto-deleveraging: four accounts by hand ----------------------------------------------
#
# Instrument A closes 110, 105, 100 (bars 0..2), then gaps to 80 (bars 3, 4); every bar flat.
# X: long 10,000 USD at bar 2 (100 units at 100), 500 USDT. Bar 3: equity 500 − 2,000 =
#    −1,500 <= MM: closed at 80 (latency 0), leg PnL −2,000, bad debt D = 1,500.
# Fund 500: it pays 500; shortfall S = 1,000. ADL takes x = 100 × 1,000 / 1,500 = 66.67
#    units at the bankruptcy price 80 + 1,000 / 66.67 = 95 (15 USD per unit).
# Counterparties (shorts, ranked at bar 2's close, 100):
#    B short 3,300 at bar 0 (−30 units at 110), 1,000 USDT: uPnL 300, rate 300/3,300 =
#      0.0909; equity 1,300, gross 3,000, leverage 2.308; score 0.2098.
#    C short 2,100 at bar 1 (−20 units at 105), 100 USDT: uPnL 100, rate 0.0476; equity 200,
#      gross 2,000, leverage 10; score 0.4762 -> first.
#    D short 1,000 at bar 2 (−10 units at 100): no profit at the previous mark: not ranked.
# Fills: C 20 units (absorbs 300), B 30 units (450); 16.67 units (250) left uncovered:
#    the fund ends at −250 (−1,000 without ADL). ADL volume 50 × 95 = 4,750.

ADL_ROWS = [(110.0,) * 4, (105.0,) * 4, (100.0,) * 4, (80.0,) * 4, (80.0,) * 4]


def _adl_market() -> Market:
    return Market.from_series([_bars("AUSDT", ADL_ROWS)])


def _adl_accounts() -> list[Account]:
    return [
        Account(id="X", entry_ms=T0 + 2 * MIN, collateral={"USDT": 500.0},
                positions={"AUSDT": 10_000.0}),
        Account(id="B", entry_ms=T0, collateral={"USDT": 1_000.0},
                positions={"AUSDT": -3_300.0}),
        Account(id="C", entry_ms=T0 + MIN, collateral={"USDT": 100.0},
                positions={"AUSDT": -2_100.0}),
        Account(id="D", entry_ms=T0 + 2 * MIN, collateral={"USDT": 1_000.0},
                positions={"AUSDT": -1_000.0}),
    ]


def _adl_run(**cfg: object):  # type: ignore[no-untyped-def]
    base = {"holding_bars": 4, "latency_bars": 0, "insurance_fund_usd": 500.0}
    return simulate_accounts(_adl_market(), ONE_PCT, _adl_accounts(),
                             AccountConfig(**{**base, **cfg}))  # type: ignore[arg-type]


def test_adl_four_accounts_by_hand() -> None:
    """The shortfall beyond the fund goes to the opposite side by PnL rate × leverage."""
    r = _adl_run(adl=True)
    assert r.bad_debt_usd.tolist() == pytest.approx([1_500.0, 0.0, 0.0, 0.0])
    ledger = r.adl
    assert ledger is not None
    got = [(r.accounts[f.account].id, r.accounts[f.bankrupt].id, f.bar, f.units, f.price_usd,
            f.absorbed_usd) for f in ledger.fills]
    assert got == [("C", "X", 3, pytest.approx(-20.0), pytest.approx(95.0),
                    pytest.approx(300.0)),
                   ("B", "X", 3, pytest.approx(-30.0), pytest.approx(95.0),
                    pytest.approx(450.0))]
    assert ledger.adl_volume_usd == pytest.approx(4_750.0)
    assert ledger.adl_absorbed_usd == pytest.approx(750.0)
    assert ledger.adl_uncovered_usd == pytest.approx(250.0)
    assert r.fund_path() == [(3, pytest.approx(-250.0))]
    assert ledger.absorbed_per_account(4).tolist() == pytest.approx([0.0, 450.0, 300.0, 0.0])


# --- ADL feeds back: the four accounts over later bars, by hand ---------------------------
#
# The same accounts, holding 10 bars, fund 1,050; A then closes 80 (bar 4), 150 (bar 5),
# 170 (bar 6). Bar 3: X's bad debt 1,500, the fund pays 1,050, shortfall S = 450: ADL takes
# x = 100 × 450 / 1,500 = 30 units at 95 (15 USD per unit): C its 20 (absorbs 300), B 10 of
# its 30 (150); the fund ends at 0.
# From bar 4: C holds nothing, cash 100 + (−20)(95 − 105) = 300; B short 20 at 110, cash
#    1,000 + (−10)(95 − 110) = 1,150; D unchanged (short 10 at 100, 1,000).
# Bar 5 (150): C equity 300 > MM 0 (without feedback: 100 − 20 × 45 = −800, liquidated);
#    B 1,150 − 20 × 40 = 350 > MM 30 (without: 1,000 − 30 × 40 = −200 <= 45, liquidated
#    with bad debt 200); D 1,000 − 500 = 500 > 15.
# Bar 6 (170): B 1,150 − 20 × 60 = −50 <= MM 34: closed at 170, bad debt 50, the fund (0)
#    pays nothing and no long is left to deleverage: uncovered 50, the fund ends at −50.
#    D 1,000 − 700 = 300 > 17.

ADL_LATER_ROWS = [*ADL_ROWS, (150.0,) * 4, (170.0,) * 4]


def _later(fast_start: bool):  # type: ignore[no-untyped-def]
    return simulate_accounts(
        Market.from_series([_bars("AUSDT", ADL_LATER_ROWS)]), ONE_PCT, _adl_accounts(),
        AccountConfig(holding_bars=10, latency_bars=0, insurance_fund_usd=1_050.0, adl=True),
        fast_start=fast_start)


@pytest.mark.parametrize("fast_start", [True, False])
def test_adl_fills_feed_back_into_the_later_bars_by_hand(fast_start: bool) -> None:
    """A deleveraged account's later margin test and close-out follow what it still holds."""
    r = _later(fast_start)
    ledger = r.adl
    assert ledger is not None
    got = [(r.accounts[f.account].id, r.accounts[f.bankrupt].id, f.bar, f.units, f.price_usd,
            f.pnl_usd) for f in ledger.fills]
    assert got == [("C", "X", 3, pytest.approx(-20.0), pytest.approx(95.0),
                    pytest.approx(200.0)),
                   ("B", "X", 3, pytest.approx(-10.0), pytest.approx(95.0),
                    pytest.approx(150.0))]
    # C (flat from bar 4) never triggers; B triggers at bar 6 on its 20 units, not at bar 5.
    assert r.trigger_bar.tolist() == [3, 6, -1, -1]
    assert r.closeout_equity_usd[1] == pytest.approx(-50.0)
    assert r.bad_debt_usd.tolist() == pytest.approx([1_500.0, 50.0, 0.0, 0.0])
    assert ledger.adl_uncovered_usd == pytest.approx(50.0)
    assert r.fund_path() == [(3, pytest.approx(0.0, abs=1e-9)), (6, pytest.approx(-50.0))]
    assert ledger.pnl_per_account(4).tolist() == pytest.approx([0.0, 150.0, 200.0, 0.0])


def test_adl_feedback_in_isolated_mode_follows_the_twins() -> None:
    """Isolated mode deleverages the twins (one position each here: the accounts)."""
    r = simulate_accounts(
        Market.from_series([_bars("AUSDT", ADL_LATER_ROWS)]), ONE_PCT, _adl_accounts(),
        AccountConfig(mode="isolated", holding_bars=10, latency_bars=0,
                      insurance_fund_usd=1_050.0, adl=True))
    assert r.adl is not None
    assert [f.units for f in r.adl.fills] == pytest.approx([-20.0, -10.0])
    assert r.twin_trigger_bar.tolist() == [3, 6, -1, -1]
    assert r.twin_bad_debt_usd.tolist() == pytest.approx([1_500.0, 50.0, 0.0, 0.0])


def _random_adl_case(seed: int) -> tuple[list[tuple[float, ...]], list[Account]]:
    """A crash then a rally (each bar's high and low around its close) and 16 accounts:
    small longs at 4..30x (the crash's bankrupts), large shorts at 2..8x (its winners, the
    rally's losers), entering over the first bars."""
    rng = np.random.default_rng(seed)
    closes = [100.0, 101.0, 102.0, 103.0, 104.0, 90.0, 72.0, 70.0, 85.0, 105.0, 125.0,
              130.0, 110.0, 95.0, 96.0, 97.0]
    rows = []
    for c in closes:
        c = c * float(rng.uniform(0.98, 1.02))
        rows.append((c, c * float(rng.uniform(1.0, 1.03)), c * float(rng.uniform(0.97, 1.0)), c))
    accounts = []
    for a in range(16):
        short = a % 3 == 0
        notional = float(rng.uniform(5_000.0, 20_000.0) if short else rng.uniform(1_000.0,
                                                                                5_000.0))
        leverage = float(rng.uniform(2.0, 8.0) if short else rng.uniform(4.0, 30.0))
        accounts.append(Account(
            id=f"a{a}", entry_ms=T0 + int(rng.integers(0, 5)) * MIN,
            collateral={"USDT": notional / leverage},
            positions={"AUSDT": -notional if short else notional}))
    return rows, accounts


@pytest.mark.parametrize(("seed", "latency_bars"), [(6, 0), (6, 1), (8, 0), (2, 1)])
def test_adl_feedback_matches_a_brute_force_walk(seed: int, latency_bars: int) -> None:
    """The engine's fixed point against ``tests/reference_adl.py``'s in-walk ADL."""
    from tests.reference_adl import Acct, replay_adl

    rows, accounts = _random_adl_case(seed)
    cfg = AccountConfig(holding_bars=12, latency_bars=latency_bars, insurance_fund_usd=200.0,
                        liquidation_fee_rate=0.005, adl=True)
    r = simulate_accounts(Market.from_series([_bars("AUSDT", rows)]), ONE_PCT, accounts, cfg)
    close = [x[3] for x in rows]
    ref = [Acct(entry=int(e), units=float(u), cash=float(a.collateral["USDT"]))
           for e, u, a in zip(r.entry_bar, r.position_notional_usd / np.array(
               [close[int(e)] for e in r.entry_bar]), r.accounts, strict=True)]
    fills, fund = replay_adl([x[2] for x in rows], [x[1] for x in rows], close, ref,
                             mm_rate=0.01, holding_bars=12, latency_bars=latency_bars,
                             fee_rate=0.005, fund_usd=200.0)
    assert r.adl is not None
    assert len(fills) >= 2  # the case exercises ADL
    # some deleveraged account keeps a reduced position (tested on it later)
    assert any(ref[c].units != 0.0 for _, c, *_ in fills)
    assert [(f.bar, f.account, f.bankrupt) for f in r.adl.fills] == [x[:3] for x in fills]
    assert [f.units for f in r.adl.fills] == pytest.approx([x[3] for x in fills])
    assert [f.price_usd for f in r.adl.fills] == pytest.approx([x[4] for x in fills])
    assert r.trigger_bar.tolist() == [a.trigger for a in ref]
    assert r.bad_debt_usd.tolist() == pytest.approx([a.bad_debt for a in ref])
    assert r.fund_path()[-1][1] == pytest.approx(fund)


def test_adl_off_leaves_the_fund_to_pay() -> None:
    """Without ADL the fund pays the whole bad debt; a fund large enough needs no ADL."""
    off = _adl_run()
    assert off.adl is None
    assert off.fund_path() == [(3, pytest.approx(-1_000.0))]
    rich = _adl_run(adl=True, insurance_fund_usd=2_000.0)
    assert rich.adl is not None
    assert rich.adl.fills == ()
    assert rich.fund_path() == [(3, pytest.approx(500.0))]


def test_adl_volume_in_the_frontier_and_the_report() -> None:
    """The frontier rows carry the ADL volume; the report names who absorbed what."""
    from calibration.accounts import capacity_frontier, run_account_backtest

    cfg = AccountConfig(holding_bars=4, latency_bars=0, insurance_fund_usd=500.0, adl=True)
    rows = capacity_frontier(_adl_market(), ONE_PCT, _adl_accounts(), cfg,
                             capacities=(1, float("inf")))
    # One bankrupt account: capacity 1 serves it in the same bar, so the same ADL.
    assert [r["adl_volume_usd"] for r in rows] == pytest.approx([4_750.0, 4_750.0])
    report, _ = run_account_backtest(
        _adl_market(), "tiered", FLAT_1PCT, accounts=_adl_accounts(), config=cfg)
    assert report.adl is not None
    assert report.adl["per_account"] == pytest.approx({"C": 300.0, "B": 450.0})
    assert [f["account"] for f in report.adl["fills"]] == ["C", "B"]
    # C short 20 from 105 and B short 30 from 110, both bought back at 95
    assert [f["pnl_usd"] for f in report.adl["fills"]] == pytest.approx([200.0, 450.0])
    assert report.insurance_fund_min_usd == pytest.approx(-250.0)


# --- the backstop vault by hand ------------------------------------------------------------
#
# A at 100 until bar 2, low 95 at bar 3. Three accounts long 10,000 USD (100 units) at bar 2's
# close, 1% MM, latency 0, liquidation fee 0.5%. At bar 3 (MM 95):
#   X 400 USDT: equity −100 (< 2/3 × 95 = 63.33): the vault takes it; its PnL −100.
#   Y 550 USDT: equity 50 (< 63.33): taken; vault PnL +50.
#   Z 580 USDT: equity 80: closed by the engine at 95, fee min(0.5% × 9,500, 80) = 47.5,
#     close-out equity 32.5.
# Vault PnL −50; no bad debt for the fund (without the vault: X's 100).

BACKSTOP_ROWS = [(100.0,) * 4] * 3 + [(100.0, 100.0, 95.0, 95.0)] * 3


def _three() -> tuple[Market, list[Account]]:
    market = Market.from_series([_bars("AUSDT", BACKSTOP_ROWS)])
    accounts = [Account(id=a, entry_ms=T0 + 2 * MIN, collateral={"USDT": c},
                        positions={"AUSDT": 10_000.0})
                for a, c in (("X", 400.0), ("Y", 550.0), ("Z", 580.0))]
    return market, accounts


def test_backstop_vault_takes_over_below_two_thirds_of_mm() -> None:
    """Accounts below the threshold go to the vault with their margin; the rest close."""
    market, accounts = _three()
    cfg = AccountConfig(holding_bars=2, latency_bars=0, liquidation_fee_rate=0.005,
                        backstop_threshold=2 / 3)
    r = simulate_accounts(market, ONE_PCT, accounts, cfg)
    assert r.backstop_taken.tolist() == [True, True, False]
    assert r.backstop_pnl_usd.tolist() == pytest.approx([-100.0, 50.0, 0.0])
    assert r.bad_debt_usd.tolist() == pytest.approx([0.0, 0.0, 0.0])
    assert r.fee_usd.tolist() == pytest.approx([0.0, 0.0, 47.5])
    assert r.closeout_equity_usd.tolist() == pytest.approx([0.0, 0.0, 32.5])
    assert r.backstop_path() == [(3, pytest.approx(-50.0))]
    off = simulate_accounts(market, ONE_PCT, accounts,
                            AccountConfig(holding_bars=2, latency_bars=0,
                                          liquidation_fee_rate=0.005))
    assert off.bad_debt_usd.tolist() == pytest.approx([100.0, 0.0, 0.0])


def test_partial_closes_whole_at_or_below_the_notional_threshold() -> None:
    """``partial`` with 20% steps on X (100 units, 95 from bar 3 on): threshold 0, 20 units at
    bars 3 and 4, the rest (60) at bar 5, the data's last; 9,000: one step of 20 (9,500 open
    > 9,000), then 80 × 95 = 7,600 <= 9,000 closes whole: two steps; 9,500: one step."""
    market, accounts = _three()
    base = {"holding_bars": 2, "latency_bars": 0, "policy": "partial",
            "partial_fraction": 0.2}
    above = simulate_accounts(market, ONE_PCT, accounts[:1],
                              AccountConfig(**base, partial_min_notional_usd=9_000.0))
    assert above.steps.tolist() == [2]
    assert above.leg_closed_usd.tolist() == pytest.approx([1_900.0 + 7_600.0])
    always = simulate_accounts(market, ONE_PCT, accounts[:1], AccountConfig(**base))
    assert always.steps.tolist() == [3]
    whole = simulate_accounts(market, ONE_PCT, accounts[:1],
                              AccountConfig(**base, partial_min_notional_usd=9_500.0))
    assert whole.steps.tolist() == [1]
    assert whole.leg_closed_usd.tolist() == pytest.approx([9_500.0])
    assert whole.bad_debt_usd.tolist() == pytest.approx([100.0])


def test_aave_close_factor_full_ratio_and_leftover_by_hand() -> None:
    """Close factor 50% (``partial``): X (equity/MM −1.05 <= 0.5) closes whole; Y (50/95 =
    0.53) closes 50 units at 95, leaving cash 300 and 50 units: equity 50 > MM 47.5, restored,
    so it stops there (4,750 closed); with a 5,000 USD minimum leftover (4,750 would be left)
    Y closes whole."""
    market, accounts = _three()
    base = {"holding_bars": 2, "latency_bars": 0, "policy": "partial", "partial_fraction": 0.5,
            "partial_full_ratio": 0.5}
    r = simulate_accounts(market, ONE_PCT, accounts[:2], AccountConfig(**base))
    assert r.steps.tolist() == [1, 1]
    assert r.leg_closed_usd.tolist() == pytest.approx([9_500.0, 4_750.0])
    assert r.bad_debt_usd.tolist() == pytest.approx([100.0, 0.0])
    dust = simulate_accounts(market, ONE_PCT, accounts[1:2],
                             AccountConfig(**base, partial_min_leftover_usd=5_000.0))
    assert dust.leg_closed_usd.tolist() == pytest.approx([9_500.0])


def test_per_block_limit_by_hand() -> None:
    """dYdX-style 1 liquidation per block with 30 s blocks on 1-minute bars: 2 per bar. The
    capacity test's three accounts (X −1.05, Y 0.53, Z 0.84 at bar 3): X and Y at 95 (−100,
    +50), Z waits to bar 4 at 90 (580 − 1,000 = −420): bad debt 520."""
    from tests.test_account_capacity import _three_accounts, _three_market

    cfg = AccountConfig(holding_bars=2, latency_bars=0, max_liquidations_per_block=1,
                        block_seconds=30.0)
    assert cfg.capacity_limited
    r = simulate_accounts(_three_market(), ONE_PCT, _three_accounts(), cfg)
    assert r.trigger_bar.tolist() == [3, 3, 4]
    assert r.bad_debt_usd.tolist() == pytest.approx([100.0, 0.0, 420.0])
    tighter = simulate_accounts(_three_market(), ONE_PCT, _three_accounts(),
                                dataclasses.replace(cfg, max_liquidations_per_bar=1))
    assert tighter.trigger_bar.tolist() == [3, 4, 5]


def test_new_fields_are_validated_naming_the_field() -> None:
    """Out-of-range venue settings are refused with ``liquidation.<name>``."""
    from calibration import InvalidParameters

    for name, value in (("backstop_threshold", 1.5), ("partial_min_notional_usd", -1.0),
                        ("partial_full_ratio", float("nan")), ("block_seconds", 0.0),
                        ("max_liquidations_per_block", 0), ("adl", 1),
                        ("partial_min_leftover_usd", float("inf"))):
        with pytest.raises(InvalidParameters) as err:
            AccountConfig.from_mapping({name: value})
        assert err.value.field == f"liquidation.{name}"


# --- presets ------------------------------------------------------------------------------

def test_presets_apply_their_fields_and_explicit_keys_override() -> None:
    """``preset`` expands to the venue's fields (venues.md numbers); explicit keys win."""
    from calibration import InvalidParameters
    from calibration.accounts import VENUE_PRESETS

    assert set(VENUE_PRESETS) == {"binance", "hyperliquid", "dydx_v4", "aave_v3"}
    hl = AccountConfig.from_mapping({"preset": "hyperliquid"})
    assert (hl.policy, hl.partial_fraction, hl.partial_min_notional_usd) == (
        "partial", 0.2, 100_000.0)
    assert hl.backstop_threshold == pytest.approx(2 / 3)
    assert hl.adl
    dy = AccountConfig.from_mapping({"preset": "dydx_v4", "max_liquidations_per_block": 10})
    assert (dy.max_liquidations_per_block, dy.liquidation_fee_rate) == (10, 0.005)
    aave = AccountConfig.from_mapping({"preset": "aave_v3"})
    assert (aave.partial_fraction, aave.partial_full_ratio, aave.partial_min_notional_usd,
            aave.partial_min_leftover_usd) == (0.5, 0.95, 2_000.0, 1_000.0)
    assert all(source.startswith("venues.md") for _, source in VENUE_PRESETS.values())
    with pytest.raises(InvalidParameters) as err:
        AccountConfig.from_mapping({"preset": "ftx"})
    assert err.value.field == "liquidation.preset"


_ALL_OFF = {"policy": "close_all", "adl": False, "backstop_threshold": None,
            "max_liquidations_per_block": None, "max_liquidations_per_bar": None,
            "max_liquidation_notional_per_bar": None, "liquidation_fee_rate": 0.0,
            "partial_min_notional_usd": 0.0, "partial_full_ratio": None,
            "partial_min_leftover_usd": 0.0}


@pytest.mark.parametrize("preset", ["binance", "hyperliquid", "dydx_v4", "aave_v3"])
def test_every_preset_with_its_switches_off_is_the_account_engine_bit_for_bit(
        preset: str) -> None:
    """Infinite capacity and every switch off: the mechanics kernel under any preset gives
    the core engine's arrays exactly."""
    from tests.test_account_capacity import _three_accounts, _three_market

    base = {"holding_bars": 2, "latency_bars": 1}
    for market, accounts in ((_three_market(), _three_accounts()),
                             (_adl_market(), _adl_accounts())):
        cfg = AccountConfig.from_mapping({"preset": preset, **_ALL_OFF, **base})
        got = simulate_accounts(market, ONE_PCT, accounts, cfg, mechanics_kernel=True)
        core = simulate_accounts(market, ONE_PCT, accounts, AccountConfig(**base))
        for name in ("trigger_bar", "closeout_equity_usd", "bad_debt_usd", "fee_usd",
                     "leg_pnl_usd", "twin_trigger_bar", "twin_bad_debt_usd"):
            np.testing.assert_array_equal(getattr(got, name), getattr(core, name),
                                          err_msg=name)


# --- keepers and oracles by hand ------------------------------------------------------------
#
# The capacity test's market: A at 100 to bar 2, lows 95 (bar 3), 90 (bar 4), 85 (bars 5..7),
# closes the same. Long accounts opened at bar 2 (1% MM, latency 0, spread 0.2%):
#   S: 1,000 USD (10 units), 40 USDT. Bar 3: equity −10 <= MM 9.5. A keeper with a 5% bonus
#      and 60 USD gas earns (0.05 − 0.002) × 950 − 60 = −14.4: it declines (bars 4..6 too:
#      the bonus only shrinks with the price); the data's last bar (7) closes it at 85:
#      40 + 10 × (85 − 100) − 0.002 × 850 = −111.7 bad debt (−11.9 at bar 3 without gas).
#   Y: 10,000 USD (100 units), 550 USDT. Bar 3: equity 50 <= 95; the keeper earns 0.048 ×
#      9,500 − 60 = 396: it liquidates at 95: 550 − 500 − 19 = 31 left, all of it the
#      keeper's bonus (min(5% × 9,500, 31)): close-out equity 0.


def _keeper_accounts() -> list[Account]:
    return [Account(id="S", entry_ms=T0 + 2 * MIN, collateral={"USDT": 40.0},
                    positions={"AUSDT": 1_000.0}),
            Account(id="Y", entry_ms=T0 + 2 * MIN, collateral={"USDT": 550.0},
                    positions={"AUSDT": 10_000.0})]


def _keeper_run(**cfg: object):  # type: ignore[no-untyped-def]
    from tests.test_account_capacity import _three_market

    base = {"holding_bars": 2, "latency_bars": 0, "spread_rate": 0.002}
    return simulate_accounts(_three_market(), ONE_PCT, _keeper_accounts(),
                             AccountConfig(**{**base, **cfg}))  # type: ignore[arg-type]


def test_a_keeper_declines_an_unprofitable_liquidation() -> None:
    """bonus − slippage − gas <= 0: no keeper acts, the account waits and loses more."""
    r = _keeper_run(keeper_bonus_rate=0.05, keeper_gas_usd=60.0)
    assert r.trigger_bar.tolist() == [7, 3]
    assert r.keeper_declined.tolist() == [4, 0]
    assert r.bad_debt_usd.tolist() == pytest.approx([111.7, 0.0])
    assert r.keeper_bonus_usd.tolist() == pytest.approx([0.0, 31.0])
    assert r.closeout_equity_usd.tolist() == pytest.approx([-111.7, 0.0])
    free = _keeper_run(keeper_bonus_rate=0.05, keeper_gas_usd=0.0)
    assert free.trigger_bar.tolist() == [3, 3]
    assert free.bad_debt_usd.tolist() == pytest.approx([11.9, 0.0])


def test_gas_spike_window_and_keeper_latency() -> None:
    """Gas 1 USD × 60 inside the window (the market's day, 2020-09-13): S declined as at 60
    USD (bad debt 111.7); the window on another day leaves gas at 1, and S closes at bar 3
    (0.048 × 950 − 1 > 0; bad debt 11.9). A keeper latency of one bar moves Y's close-out to
    bar 4 at 90: 550 − 1,000 − 0.002 × 9,000 = −468."""
    gas = {"keeper_bonus_rate": 0.05, "keeper_gas_usd": 1.0, "gas_multiplier": 60.0}
    spike = _keeper_run(**gas, gas_window="spike=2020-09-13")
    assert spike.bad_debt_usd.tolist() == pytest.approx([111.7, 0.0])
    calm = _keeper_run(**gas, gas_window="spike=2020-09-14")
    assert calm.trigger_bar.tolist() == [3, 3]
    assert calm.bad_debt_usd.tolist() == pytest.approx([11.9, 0.0])
    late = _keeper_run(keeper_bonus_rate=0.05, keeper_latency_bars=1)
    assert late.trigger_bar.tolist() == [4, 4]
    assert late.bad_debt_usd.tolist()[1] == pytest.approx(468.0)


def test_the_margin_check_sees_the_oracle() -> None:
    """Heartbeat 2 bars: the check reads 100 at bars 3 and 4 (published at bar 2), so Y is
    never liquidated in its holding window; a 5% deviation publishes 95 at bar 3, so bar 4's
    check (equity 50 <= 95) triggers and the fill is the market's 90: bad debt 450 + 18."""
    lag = _keeper_run(oracle_heartbeat_bars=2)
    assert lag.trigger_bar.tolist()[1] == -1
    dev = _keeper_run(oracle_heartbeat_bars=2, oracle_deviation_rate=0.05)
    assert dev.trigger_bar.tolist()[1] == 4
    assert dev.bad_debt_usd.tolist()[1] == pytest.approx(468.0)


# --- Black Thursday in kind (2020-03-12, hourly ETH) -----------------------------------------
# The population and scenarios: calibration.accounts._replays (its module docstring).


def test_black_thursday_mechanism_in_kind(shared_data) -> None:  # type: ignore[no-untyped-def]
    """Hourly ETH through 2020-03-12: the engine (and keepers at normal gas, with an OSM-like
    one-hour oracle) closes every vault before it is underwater; with gas ×100 on the 12th,
    keepers decline the small vaults (bonus 13% − slippage on their notional below the gas),
    which wait into the 13th and close underwater: bad debt only there (Maker's zero bids,
    venues.md M1)."""
    from calibration.accounts._replays import (
        BT_BASE,
        BT_KEEPERS,
        BT_MM_PARAMS,
        BT_SPIKE_END_MS,
        black_thursday_market,
        black_thursday_vaults,
    )

    market = black_thursday_market(shared_data)
    vaults = black_thursday_vaults()
    mm = TieredMargin(**BT_MM_PARAMS)  # type: ignore[arg-type]
    engine = simulate_accounts(market, mm, vaults, BT_BASE)
    calm = simulate_accounts(market, mm, vaults,
                             dataclasses.replace(BT_KEEPERS, gas_window=None))
    spike = simulate_accounts(market, mm, vaults, BT_KEEPERS)
    assert engine.bad_debt_usd.sum() == 0.0
    assert calm.bad_debt_usd.sum() == 0.0
    assert calm.keeper_declined.sum() == 0
    assert spike.bad_debt_usd.sum() > 0.0
    ts = market.timestamp_ms
    low = market.matrix("low")[0]
    bankrupt = np.flatnonzero(spike.bad_debt_usd > 0)
    assert (spike.keeper_declined[bankrupt] > 0).all()
    assert (ts[spike.trigger_bar[bankrupt]] >= BT_SPIKE_END_MS).all()
    # The keeper's rule by hand at each declined vault's first ask inside the spike:
    # (0.13 − 0.002) × units × low − 2 × 100 <= 0.
    units = np.array([v.positions["ETHUSDT"] for v in vaults]) / market.matrix("close")[
        0, spike.entry_bar]
    asked = spike.queued_bar
    in_spike = (spike.keeper_declined > 0) & (ts[asked] < BT_SPIKE_END_MS)
    assert in_spike.any()
    assert ((0.128 * units[in_spike] * low[asked[in_spike]] - 200.0) <= 0.0).all()


def test_frontier_over_http(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``frontier`` in POST /v1/account-backtests adds the rows (the unlimited row's bad debt
    is the plain run's); a bad capacity is problem+json naming ``frontier[i]``."""
    from litestar.testing import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.api_helpers import bars_csv

    (tmp_path / "a.csv").write_bytes(bars_csv(600, seed=1))
    body = {"data": [{"instrument": "AUSDT", "ref": "a.csv"}],
            "model": "tiered", "params": {"base_mmr": 0.02, "tier_growth": 1.0,
                                          "bracket_caps_usd": []},
            "population": {"seed": 3, "entry_every_bars": 4, "accounts_per_entry": 30,
                           "leverage": [20, 60]},
            "stress_windows": [], "liquidation": {"holding_bars": 48, "adl": True}}
    settings_ = Settings(state_dir=str(tmp_path / ".state"), data_root=str(tmp_path),
                         guardrails_json='{"min_interval_s": 0}')
    with TestClient(create_app(settings_)) as c:
        ok = c.post("/v1/account-backtests", json={**body, "frontier": [1, None]})
        bad = c.post("/v1/account-backtests", json={**body, "frontier": [1, 0]})
        frac = c.post("/v1/account-backtests", json={**body, "frontier": [1.5]})
        huge = c.post("/v1/account-backtests", json={**body, "frontier": [1e12]})
    assert ok.status_code == 200, ok.text
    rows = ok.json()["frontier"]
    assert [r["capacity"] for r in rows] == [1, None]
    assert rows[1]["bad_debt_usd"] == pytest.approx(ok.json()["summary"][0]["bad_debt_usd"])
    assert all("adl_volume_usd" in r for r in rows)
    for resp, where in ((bad, "frontier[1]"), (frac, "frontier[0]"), (huge, "frontier[0]")):
        assert resp.status_code in (400, 422)
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.json()["field"] == where


def test_frontier_chart_in_the_html_report() -> None:
    """The HTML report draws the frontier when the report has one, one tick per capacity."""
    from calibration.accounts import render_account_report, run_account_backtest

    cfg = AccountConfig(holding_bars=4, latency_bars=0, insurance_fund_usd=500.0, adl=True)
    report, result = run_account_backtest(
        _adl_market(), "tiered", FLAT_1PCT, accounts=_adl_accounts(), config=cfg,
        frontier=[1, 2, float("inf")])
    page = render_account_report(report, result)
    assert "id='chart-frontier'" in page
    assert "no limit" in page
    plain, plain_result = run_account_backtest(
        _adl_market(), "tiered", FLAT_1PCT, accounts=_adl_accounts(), config=cfg)
    assert "chart-frontier" not in render_account_report(plain, plain_result)


def test_cli_replay_prints_the_event(shared_data, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``marginlab accounts replay 2020-03-12 --json``: three scenarios, bad debt only with
    the gas spike (the mechanism test above pins why)."""
    from calibration.cli import main

    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(shared_data))
    assert main(["accounts", "replay", "2020-03-12", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["scenario"] for r in rows] == [
        "engine alone", "keepers, normal gas, 1h oracle",
        "keepers, gas x100 on 03-12, 1h oracle"]
    assert [r["bad_debt_usd"] > 0 for r in rows] == [False, False, True]
    assert rows[2]["keeper_declines"] > 0


def test_replay_2025_10_10_with_depth_bands(shared_data) -> None:  # type: ignore[no-untyped-def]
    """The 2025-10-10 replay: the depth the impact divides by is the ±1% book band where a
    fresh snapshot exists and the ADV estimate elsewhere (never NaN, which would read as zero
    depth: 100% slippage); the hyperliquid preset moves the loss from the fund to the vault;
    one liquidation per 300 s block queues accounts and, the fund exhausted, deleverages."""
    from calibration.accounts._engine import _mechanics
    from calibration.accounts._replays import oct10_market, replay_event

    market = oct10_market(shared_data)
    band = np.asarray(market.bars[0].bid_depth_usd, dtype=np.float64)
    assert np.isnan(band[0])  # the bar opens at 00:00:00, the first snapshot is at 00:00:07
    mech = _mechanics(market, AccountConfig(impact_coef=0.01))
    assert np.isfinite(mech.bid_depth).all()
    fresh = ~np.isnan(band)
    np.testing.assert_array_equal(mech.bid_depth[0][fresh], band[fresh])
    engine, hl, dydx = replay_event("2025-10-10", shared_data)
    assert engine["bad_debt_usd"] > 1_000_000.0  # more than the fund
    assert hl["backstop_pnl_usd"] < 0.0
    assert hl["bad_debt_usd"] < engine["bad_debt_usd"]
    assert dydx["peak_backlog"] > 0
    assert dydx["adl_volume_usd"] > 0.0


def test_replay_luna_2022_05(shared_data, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``marginlab accounts replay luna-2022-05``: the same books under the engine, the
    hyperliquid preset (the vault, not the fund, carries the collapse) and aave_v3 (no ADL, no
    vault: the fund's bad debt stays)."""
    from calibration.cli import main

    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(shared_data))
    assert main(["accounts", "replay", "luna-2022-05", "--json"]) == 0
    engine, hl, aave = json.loads(capsys.readouterr().out)
    assert engine["bad_debt_usd"] > 0.0
    assert hl["backstop_pnl_usd"] < 0.0
    assert hl["bad_debt_usd"] < engine["bad_debt_usd"]
    assert aave["adl_volume_usd"] == 0.0
    assert aave["backstop_pnl_usd"] == 0.0


def test_cli_prints_adl_and_backstop(tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The text report names the ADL volume and the vault's PnL (the four-account case with
    the hyperliquid preset's switches: X is taken by the vault, so no ADL is needed)."""
    import pandas as pd

    from calibration.cli import main

    for b in _adl_market().bars:
        pd.DataFrame({"timestamp_ms": b.timestamp_ms, "open": b.open, "high": b.high,
                      "low": b.low, "close": b.close}).to_csv(tmp_path / "AUSDT.csv",
                                                               index=False)
    (tmp_path / "accounts.json").write_text(json.dumps([
        {"id": a.id, "entry": a.entry_ms, "collateral": a.collateral,
         "positions": a.positions} for a in _adl_accounts()]))
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    args = ["accounts", "backtest", "--data", "AUSDT=AUSDT.csv", "--accounts", "accounts.json",
            "--model", "tiered", "--params", json.dumps(FLAT_1PCT), "--no-stress-windows",
            "--liquidation", json.dumps({"holding_bars": 4, "latency_bars": 0,
                                         "insurance_fund_usd": 500.0, "adl": True})]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "auto-deleveraging: 2 fills" in out
    assert main([*args[:-1], json.dumps({"preset": "hyperliquid", "holding_bars": 4,
                                         "latency_bars": 0, "insurance_fund_usd": 500.0})]) == 0
    out = capsys.readouterr().out
    assert "backstop vault: 1 accounts taken over, PnL -1,500" in out
