"""Cross against isolated through the 2025-10-10 cascade on real Binance USD-M BTC and ETH
5-minute perps: every account, every isolated twin and the report's summary figures (bad
debt cross and isolated, healthy legs, hedge-break loss, saved by cross), overall and in the
``oct_2025_cascade`` window, against the brute-force loop (tests/reference_accounts.py),
the figures recounted here from its outcomes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from calibration import load_bars, make_model
from calibration.accounts import Account, AccountConfig, Market, run_account_backtest
from calibration.accounts import underlying_of as engine_underlying_of
from calibration.windows import DEFAULT_STRESS_WINDOWS
from tests import reference_accounts as ref
from tests.test_accounts import _mm_function

PERP_5M = [f"binance_usdm_perp_5m_2025_10/{s}USDT_perp_5m.csv" for s in ("BTC", "ETH")]
START_MS, END_MS = 1_759_708_800_000, 1_760_400_000_000  # 2025-10-06 .. 2025-10-14
CASCADE_MS = (1_760_054_400_000, 1_760_140_800_000)  # 2025-10-10 (UTC day)
HOLDING = 288  # one day of 5-minute bars
STABLE = ("USDT", "USD", "USDC")


def _market(root: Path) -> Market:
    return Market.from_series([load_bars(r, root=root, start_ms=START_MS, end_ms=END_MS)
                               for r in PERP_5M])


def _books(market: Market, seed: int) -> list[Account]:
    """Pairs both ways (long BTC / short ETH and the reverse), directional and two-leg
    basket books, 3x–25x on gross, half of them opened in the 36 hours before the cascade's
    low; collateral USDT, BTC and ETH (which fall with a long book)."""
    rng = np.random.default_rng(seed)
    ts = market.timestamp_ms
    btc, eth = market.instruments
    near = np.flatnonzero((ts >= CASCADE_MS[0] - 86_400_000) & (ts < CASCADE_MS[0] + 79_200_000))
    out = []
    for j in range(120):
        e = int(rng.choice(near)) if j % 2 else int(rng.integers(0, len(ts) - 30))
        gross = float(rng.uniform(5e3, 2e6))
        kind = j % 4
        side = 1.0 if rng.random() < 0.5 else -1.0
        if kind == 0:
            pos = {btc: gross / 2 * side, eth: -gross / 2 * side}
        elif kind == 1:
            pos = {(btc, eth)[j % 3 % 2]: gross * side}
        elif kind == 2:
            pos = {btc: gross / 2 * side, eth: gross / 2 * side}
        else:  # an uneven pair: the residual is directional
            pos = {btc: 0.7 * gross * side, eth: -0.3 * gross * side}
        value = gross / float(rng.uniform(3, 25))
        mix = rng.dirichlet([1.0, 1.0, 1.0])
        coll = {"USDT": value * mix[0],
                "BTC": value * mix[1] / float(market.bars[0].close[e]),
                "ETH": value * mix[2] / float(market.bars[1].close[e])}
        out.append(Account(id=f"o{j}", entry_ms=int(ts[e]) + 1, collateral=coll,
                           positions=pos))
    return out


def _reference_figures(market: Market, model_name: str, params: dict,
                       accounts: list[Account], latency: int
                       ) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """The plain loop on every account and every twin, and the summary figures recounted from
    its outcomes (per window: all, oct_2025_cascade)."""
    model = make_model(model_name, params)
    prices = {b.instrument: {"low": b.low.tolist(), "high": b.high.tolist(),
                             "close": b.close.tolist()} for b in market.bars}
    asset_of = {i: engine_underlying_of(i) for i in market.instruments}
    by_asset = {asset_of[i]: i for i in market.instruments}
    mm = _mm_function(market, model_name, params)
    ts = market.timestamp_ms.tolist()
    outcomes = []
    for acc in accounts:
        e = max(i for i, t in enumerate(ts) if t <= acc.entry_ms)
        units = {name: v / prices[name]["close"][e] for name, v in acc.positions.items()}
        usd = sum(v for a, v in acc.collateral.items() if a.upper() in STABLE)
        coll = {by_asset[a.upper()]: v for a, v in acc.collateral.items()
                if a.upper() not in STABLE}
        out = ref.replay(prices, asset_of, mm, ref.RefAccount(e, units, usd, coll),
                         holding_bars=HOLDING, latency_bars=latency)
        legs = [inst for inst in market.instruments if inst in units]
        ims = []
        for inst in legs:
            gross = abs(units[inst]) * prices[inst]["close"][e]
            bars = market.bars[market.instruments.index(inst)]
            ims.append(model.margin_rates(bars, notional_usd=gross).im_rate[e] * gross)
        twins = []
        for inst, im in zip(legs, ims, strict=True):
            share = im / sum(ims)
            twins.append(ref.replay(prices, asset_of, mm, ref.RefAccount(
                e, {inst: units[inst]}, usd * share, {k: v * share for k, v in coll.items()}),
                holding_bars=HOLDING, latency_bars=latency))
        outcomes.append({"entry_ms": ts[e], "account": out, "legs": legs, "twins": twins})
    figures = {}
    for name, lo, hi in (("all", -np.inf, np.inf), ("oct_2025_cascade", *CASCADE_MS)):
        f = {"accounts": 0, "liquidated_accounts": 0, "bad_debt_cross_usd": 0.0,
             "bad_debt_isolated_usd": 0.0, "healthy_leg_liquidations": 0,
             "hedge_break_loss_usd": 0.0, "saved_by_cross": 0}
        for o in outcomes:
            if not lo <= o["entry_ms"] < hi:
                continue
            acc_out: ref.RefOutcome = o["account"]
            f["accounts"] += 1
            f["bad_debt_cross_usd"] += acc_out.bad_debt
            f["bad_debt_isolated_usd"] += sum(t.bad_debt for t in o["twins"])
            if acc_out.trigger is None:
                f["saved_by_cross"] += any(t.trigger is not None for t in o["twins"])
                continue
            f["liquidated_accounts"] += 1
            for inst, twin in zip(o["legs"], o["twins"], strict=True):
                if twin.trigger is None or twin.trigger > acc_out.trigger:
                    f["healthy_leg_liquidations"] += 1
                    f["hedge_break_loss_usd"] += max(0.0, -acc_out.leg_pnl[inst])
        figures[name] = f
    return outcomes, figures


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("latency", [0, 1])
@pytest.mark.parametrize(("model_name", "params"), [
    ("tiered", {"base_mmr": 0.004, "tier_growth": 1.6,
                "bracket_caps_usd": [250_000, 1_000_000]}),
    ("ewma", {"decay": 0.97, "warmup_bars": 100, "horizon_bars": 3}),
])
def test_cross_vs_isolated_through_2025_10_10_matches_brute_force(
        shared_data: Path, data_file: Callable[[str], str], latency: int, model_name: str,
        params: dict) -> None:
    """Every account's trigger and bad debt, every twin's, and the summary per window equal
    the plain loop's; the cascade shows contagion both ways (healthy legs closed, accounts
    saved by cross) and cross and isolated bad debt differ."""
    for r in PERP_5M:
        data_file(r)
    market = _market(shared_data)
    accounts = _books(market, seed=11 + latency)
    if model_name == "ewma":  # entries after the model's warm-up
        accounts = [a for a in accounts if a.entry_ms > int(market.timestamp_ms[120])]
    report, result = run_account_backtest(
        market, model_name, params, accounts=accounts,
        config=AccountConfig(holding_bars=HOLDING, latency_bars=latency),
        stress_windows=DEFAULT_STRESS_WINDOWS)
    assert result.skipped == {}
    outcomes, figures = _reference_figures(market, model_name, params, accounts, latency)
    p = 0
    for j, o in enumerate(outcomes):
        trig = o["account"].trigger
        assert result.trigger_bar[j] == (-1 if trig is None else trig), accounts[j].id
        assert result.bad_debt_usd[j] == pytest.approx(o["account"].bad_debt, rel=1e-9,
                                                       abs=1e-6)
        for twin in o["twins"]:
            assert result.twin_trigger_bar[p] == (-1 if twin.trigger is None
                                                  else twin.trigger)
            assert result.twin_bad_debt_usd[p] == pytest.approx(twin.bad_debt, rel=1e-9,
                                                                abs=1e-6)
            p += 1
    assert p == result.twin_trigger_bar.shape[0]
    by_window = {f.window: f for f in report.summary}
    assert set(by_window) == {"all", "oct_2025_cascade"}
    for name, expected in figures.items():
        got = by_window[name]
        for key, value in expected.items():
            assert getattr(got, key) == pytest.approx(value, rel=1e-9, abs=1e-6), (name, key)
        assert got.bad_debt_usd == pytest.approx(expected["bad_debt_cross_usd"], rel=1e-9,
                                                 abs=1e-6)
    # Not vacuous: the cascade liquidates, breaks hedges and is survived by pooled accounts.
    cascade = figures["oct_2025_cascade"]
    assert 0 < cascade["liquidated_accounts"] < cascade["accounts"]
    assert cascade["healthy_leg_liquidations"] > 0
    assert cascade["saved_by_cross"] > 0
    assert cascade["bad_debt_isolated_usd"] != pytest.approx(cascade["bad_debt_cross_usd"])
