"""Portfolio margin (domain.md §8): the model contract, published grids on hand-computed
books, the historical model and the engine's portfolio mode against plain loops, and the
portfolio coverage backtest on real data."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import InvalidParameters, load_bars, make_model
from calibration._bars import BarSeries
from calibration.accounts import (
    Account,
    AccountConfig,
    Market,
    PortfolioBook,
    basket_book,
    carry_book,
    long_short_book,
    portfolio_coverage,
    simulate_accounts,
    underlying_of,
)
from calibration.models import (
    PORTFOLIO_FAMILIES,
    PortfolioMarginModel,
    make_portfolio_model,
)
from calibration.stats import kupiec_lr, traffic_light
from tests import reference_accounts as ref
from tests import reference_models as ref_models
from tests import reference_portfolio as ref_pf

T0 = 1_600_000_000_000
MIN = 60_000


def walk(name: str, n: int, seed: int, vol: float = 0.01, price0: float = 100.0,
         shocks: np.ndarray | None = None) -> BarSeries:
    """A random walk of one-minute bars, OHLC consistent (``shocks``: common returns)."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, vol, n) if shocks is None else shocks
    close = price0 * np.exp(np.cumsum(r))
    open_ = np.r_[price0, close[:-1]]
    up, down = np.abs(rng.normal(0.0, vol / 2, (2, n)))
    return BarSeries(instrument=name, timestamp_ms=T0 + np.arange(n, dtype=np.int64) * MIN,
                     open=open_, high=np.maximum(open_, close) * np.exp(up),
                     low=np.minimum(open_, close) * np.exp(-down), close=close, volume=None,
                     bar_seconds=60, fingerprint=f"{name}{seed}", source="walk")


def flat(name: str, price: float, n: int = 5) -> BarSeries:
    p = np.full(n, float(price))
    return BarSeries(instrument=name, timestamp_ms=T0 + np.arange(n, dtype=np.int64) * MIN,
                     open=p, high=p, low=p, close=p, volume=None, bar_seconds=60,
                     fingerprint=name, source="hand")


# ---------------------------------------------------------------------------------------------
# The contract, one case per family

CASES: dict[str, dict[str, Any]] = {
    "grid": {"vol_scaled": True, "warmup_bars": 30, "horizon_bars": 3, "offset_credit_cap": 0.5,
             "extended_moves": (-0.5, 1.0), "extended_weights": (0.3, 0.1), "joint": "span"},
    "historical": {"window_bars": 40, "warmup_bars": 30, "horizon_bars": 3, "confidence": 0.95},
}
BAD: dict[str, list[tuple[str, Any]]] = {
    "grid": [("price_range", 0.0), ("points", 1), ("confidence", 1.0), ("joint", "all"),
             ("offset_credit_cap", 1.5), ("mm_factor", 0.0), ("warmup_bars", 1),
             ("extended_weights", (0.5,)), ("vol_scaled", "yes")],
    "historical": [("window_bars", 5), ("confidence", 0.4), ("decay", 1.0),
                   ("measure", "mean"), ("mm_factor", 2.0), ("horizon_bars", 0)],
}


def three_walks(n: int = 150, seed: int = 0) -> Market:
    return Market.from_series([walk("BTCUSDT", n, seed), walk("ETHUSDT", n, seed + 1),
                               walk("SOLUSDT", n, seed + 2)])


@pytest.mark.parametrize("family", sorted(CASES))
def test_hyperparameters_are_keyword_only_and_stored(family: str) -> None:
    """Every hyperparameter is keyword-only, stored as passed, and the model builds by name."""
    cls = PORTFOLIO_FAMILIES[family]
    params = inspect.signature(cls.__init__).parameters
    assert all(p.kind is p.KEYWORD_ONLY for name, p in params.items() if name != "self")
    with pytest.raises(TypeError):
        cls(0.1)  # type: ignore[misc]
    model = make_portfolio_model(family, CASES[family])
    assert {k: model.get_params()[k] for k in CASES[family]} == CASES[family]
    assert isinstance(model, PortfolioMarginModel)
    assert model.family == family


@pytest.mark.parametrize("family", sorted(CASES))
def test_parameter_validation_names_the_field(family: str) -> None:
    """A value out of range, and an unknown parameter, are refused naming the field."""
    for name, value in BAD[family]:
        with pytest.raises(InvalidParameters) as info:
            make_portfolio_model(family, {**CASES[family], name: value})
        assert info.value.field == name, name
    with pytest.raises(InvalidParameters) as info:
        make_portfolio_model(family, {"nope": 1})
    assert info.value.field == "nope"
    with pytest.raises(InvalidParameters) as info:
        make_portfolio_model("span2", {})
    assert info.value.field == "portfolio_model"


@pytest.mark.parametrize("family", sorted(CASES))
def test_requirement_shape_and_warm_up(family: str) -> None:
    """IM and MM per bar in USD, shape (n,), NaN before the warm-up, MM = mm_factor * IM."""
    market = three_walks()
    model = make_portfolio_model(family, CASES[family])
    req = model.requirement(market, {"BTCUSDT": 3.0, "ETHUSDT": -2.0}, {"SOL": 1.0})
    first = model.first_valid_bar(market.bar_seconds)
    assert req.first_valid_bar == first > 0
    assert req.im_usd.shape == (len(market),)
    assert np.isnan(req.im_usd[:first]).all()
    assert np.isfinite(req.im_usd[first:]).all()
    assert (req.im_usd[first:] > 0).all()
    np.testing.assert_allclose(req.mm_usd, model.mm_factor * req.im_usd)


def _redraw_after(series: BarSeries, t: int, seed: int) -> BarSeries:
    rng = np.random.default_rng(seed)
    n = len(series)
    scale = np.r_[np.ones(t + 1), np.exp(np.cumsum(rng.normal(0, 0.05, n - t - 1)))]
    return BarSeries(instrument=series.instrument, timestamp_ms=series.timestamp_ms,
                     open=series.open * scale, high=series.high * scale,
                     low=series.low * scale, close=series.close * scale, volume=None,
                     bar_seconds=60, fingerprint="redrawn", source="walk")


@settings(max_examples=15, deadline=None)
@given(t=st.integers(min_value=0, max_value=140), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("family", sorted(CASES))
def test_no_look_ahead(family: str, t: int, seed: int) -> None:
    """Changing every bar after t (of every instrument) leaves the requirement up to t."""
    market = three_walks()
    model = make_portfolio_model(family, CASES[family])
    units, coll = {"BTCUSDT": 3.0, "ETHUSDT": -2.0, "SOLUSDT": 1.0}, {"BTC": 0.5}
    before = model.requirement(market, units, coll).im_usd
    changed = Market.from_series([_redraw_after(b, t, seed + i)
                                  for i, b in enumerate(market.bars)])
    after = model.requirement(changed, units, coll).im_usd
    np.testing.assert_array_equal(before[: t + 1], after[: t + 1])
    lo, hi = model.scenario_envelope(market)
    lo2, hi2 = model.scenario_envelope(changed)
    np.testing.assert_array_equal(lo[:, : t + 1], lo2[:, : t + 1])
    np.testing.assert_array_equal(hi[:, : t + 1], hi2[:, : t + 1])


# ---------------------------------------------------------------------------------------------
# Published grids on hand-computed books


def test_paradex_grid_on_a_hand_computed_book() -> None:
    """Paradex (venues.md §1) on long 1 BTC at 60,000 / short 10 ETH at 3,000: the worst
    standard scenario is BTC −16% with ETH +16%: 9,600 + 4,800 = 14,400; every extended move
    at its published weight loses at most 0.66 · 0.24 · 60,000 = 9,504; MinDelta 2% · 90,000
    = 1,800; IM 14,400, MMR 50%: 7,200. The same from the enumerated 9 × 9 grid."""
    market = Market.from_series([flat("BTCUSDT", 60_000), flat("ETHUSDT", 3_000)])
    model = make_portfolio_model("paradex")
    req = model.requirement(market, {"BTCUSDT": 1.0, "ETHUSDT": -10.0})
    assert req.im_usd.tolist() == pytest.approx([14_400.0] * 5)
    assert req.mm_usd.tolist() == pytest.approx([7_200.0] * 5)
    extended = list(zip(model.extended_moves, model.extended_weights, strict=True))
    brute = ref_pf.grid_im({"BTCUSDT": 60_000.0, "ETHUSDT": -30_000.0},
                           {"BTCUSDT": "BTC", "ETHUSDT": "ETH"}, {"BTC": 0.16, "ETH": 0.16},
                           points=9, extended=extended, min_delta_rate=0.02,
                           hedged_delta_rate=0.01)
    assert brute == pytest.approx(14_400.0)
    # The extended table alone (hand): BTC −66% at 24% is the largest.
    only_ext = ref_pf.grid_im({"BTCUSDT": 60_000.0, "ETHUSDT": -30_000.0},
                              {"BTCUSDT": "BTC", "ETHUSDT": "ETH"}, {"BTC": 0.0, "ETH": 0.0},
                              points=9, extended=extended)
    assert only_ext == pytest.approx(0.66 * 0.24 * 60_000)


def test_paradex_min_delta_on_a_carry_book() -> None:
    """Long 100,000 of BTC spot, short 100,000 of a BTC perpetual: one factor, net delta 0,
    so no scenario loses; MinDelta = 1% of the hedged delta 100,000 = 1,000 (venues.md §1)."""
    market = Market.from_series([flat("BTCUSDT", 50_000), flat("BTC-PERP", 50_000)])
    req = make_portfolio_model("paradex").requirement(market, {"BTCUSDT": 2.0,
                                                               "BTC-PERP": -2.0})
    assert req.im_usd.tolist() == pytest.approx([1_000.0] * 5)
    assert req.mm_usd.tolist() == pytest.approx([500.0] * 5)


def test_deribit_pme_grid_with_wrong_way_collateral() -> None:
    """Deribit PME 2024 (±16%, 9 points, mm_factor 0.8): long 2 BTC at 50,000 on 1 BTC of
    collateral and 10,000 USDT: BTC −16% loses 0.16 · 150,000 = 24,000 (the collateral falls
    with the book; USDT carries no risk); MM 19,200."""
    market = Market.from_series([flat("BTCUSDT", 50_000)])
    req = make_portfolio_model("deribit_pme_2024").requirement(
        market, {"BTCUSDT": 2.0}, {"BTC": 1.0, "USDT": 10_000.0})
    assert req.im_usd.tolist() == pytest.approx([24_000.0] * 5)
    assert req.mm_usd.tolist() == pytest.approx([19_200.0] * 5)


@pytest.mark.parametrize("joint", ["product", "span"])
def test_grid_equals_the_enumerated_scenarios(joint: str) -> None:
    """Five factors, mixed book with collateral, vol-scaled ranges and a correlation-bounded
    credit: the model equals the plain enumeration of the product (7^5 = 16,807 scenarios)
    or the span set at every bar after the warm-up."""
    n = 90
    rng = np.random.default_rng(4)
    common = rng.normal(0, 0.01, n)
    names = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT"]
    market = Market.from_series([walk(nm, n, i, shocks=common + rng.normal(0, 0.004, n))
                                 for i, nm in enumerate(names)])
    params = {"vol_scaled": True, "points": 7, "warmup_bars": 40, "horizon_bars": 4,
              "offset_credit_cap": 0.6, "joint": joint, "min_price_range": 0.01,
              "extended_moves": (-0.4, 0.8), "extended_weights": (0.3, 0.1)}
    model = make_portfolio_model("grid", params)
    units = {"BTCUSDT": 2.0, "ETHUSDT": -3.0, "SOLUSDT": 1.5, "XRPUSDT": -0.5, "BNBUSDT": 1.0}
    coll = {"ETH": 1.0}
    req = model.requirement(market, units, coll)
    sigma = {nm: [math.sqrt(v) for v in ref_models.ewma_variance(b.close.tolist(), 0.97, 40)]
             for nm, b in zip(names, market.bars, strict=True)}
    z = 2.3263478740408408 * 2.0  # z_0.99 · √4
    credit = model.offset_credit(market)
    factor = {nm: underlying_of(nm) for nm in names}
    for t in range(40, n, 7):
        close = {nm: float(b.close[t]) for nm, b in zip(names, market.bars, strict=True)}
        exposure = {nm: units[nm] * close[nm] for nm in names}
        exposure["ETHUSDT"] += coll["ETH"] * close["ETHUSDT"]
        ranges = {factor[nm]: max(0.01, z * sigma[nm][t]) for nm in names}
        want = ref_pf.grid_im(exposure, factor, ranges, points=7, joint=joint,
                              credit=float(credit[t]), extended=[(-0.4, 0.3), (0.8, 0.1)])
        assert req.im_usd[t] == pytest.approx(want, rel=1e-12), t
    # The credit is bounded by the factors' correlation and by the cap.
    valid = credit[40:]
    assert (valid > 0).all()
    assert (valid <= 0.6).all()


def test_offset_credit_is_the_correlation_bound() -> None:
    """Two instruments with the same returns (correlation 1): long A / short B of 10,000 each
    at a 40% cap: the together moves lose nothing, A −16% with B +16% loses 3,200, counted
    at 60%: IM 1,920; without a cap, 3,200."""
    n = 60
    shocks = np.random.default_rng(1).normal(0, 0.01, n)
    a, b = walk("AUSDT", n, 1, shocks=shocks), walk("BUSDT", n, 2, shocks=shocks)
    market = Market.from_series([a, b])
    units = {"AUSDT": 10_000 / a.close[-1], "BUSDT": -10_000 / b.close[-1]}
    capped = make_portfolio_model("grid", {"offset_credit_cap": 0.4, "warmup_bars": 20})
    assert capped.requirement(market, units).im_usd[-1] == pytest.approx(0.6 * 3_200.0)
    plain = make_portfolio_model("grid", {})
    assert plain.requirement(market, units).im_usd[-1] == pytest.approx(3_200.0)


# ---------------------------------------------------------------------------------------------
# Historical against the brute force


@pytest.mark.parametrize("measure", ["es", "var"])
def test_historical_equals_the_brute_force(measure: str) -> None:
    """ES and VaR of the joint rescaled scenarios equal a plain sort at every valid bar."""
    market = three_walks(n=160, seed=3)
    params = {"window_bars": 50, "warmup_bars": 30, "horizon_bars": 4, "confidence": 0.9,
              "measure": measure}
    model = make_portfolio_model("historical", params)
    units, coll = {"BTCUSDT": 2.0, "ETHUSDT": -1.0, "SOLUSDT": 0.5}, {"SOL": 1.5}
    req = model.requirement(market, units, coll)
    brute = ref_pf.Historical({b.instrument: b.close.tolist() for b in market.bars},
                              window=50, confidence=0.9, decay=0.97, horizon=4, warmup=30,
                              measure=measure)
    for t in range(len(market)):
        close = {b.instrument: float(b.close[t]) for b in market.bars}
        exposure = {i: q * close[i] for i, q in units.items()}
        exposure["SOLUSDT"] += 1.5 * close["SOLUSDT"]
        want = brute.im(exposure, t)
        if math.isnan(want):
            assert math.isnan(req.im_usd[t])
        else:
            assert req.im_usd[t] == pytest.approx(want, rel=1e-10), t
    assert brute.first == req.first_valid_bar


# ---------------------------------------------------------------------------------------------
# The engine's portfolio mode


def test_portfolio_mode_hand_case() -> None:
    """Long A / short B of 10,000 each on 2,000 USDT, both gap −20%: under Deribit's grid
    (MM = 0.8 · 3,200 = 2,560 > 2,000) the account triggers at its first bar; with a
    per-instrument 1% cross requirement (200) it never does; the isolated twins are the same
    in both runs."""
    rows = [(100.0,) * 4] * 3 + [(80.0,) * 4] * 3
    market = Market.from_series([
        BarSeries(instrument=nm, timestamp_ms=T0 + np.arange(6, dtype=np.int64) * MIN,
                  open=np.array([r[0] for r in rows]), high=np.array([r[1] for r in rows]),
                  low=np.array([r[2] for r in rows]), close=np.array([r[3] for r in rows]),
                  volume=None, bar_seconds=60, fingerprint=nm, source="hand")
        for nm in ("AUSDT", "BUSDT")])
    account = Account(id="hedge", entry_ms=T0 + 2 * MIN, collateral={"USDT": 2000.0},
                      positions={"AUSDT": 10_000.0, "BUSDT": -10_000.0})
    tiered = make_model("tiered", {"base_mmr": 0.01, "tier_growth": 1.0,
                                   "bracket_caps_usd": []})
    cross = simulate_accounts(market, tiered, [account], AccountConfig(holding_bars=3,
                                                                       latency_bars=0))
    pm = simulate_accounts(market, tiered, [account],
                           AccountConfig(mode="portfolio", holding_bars=3, latency_bars=0),
                           portfolio=make_portfolio_model("deribit_pme_2024"))
    assert cross.trigger_bar.tolist() == [-1]
    assert pm.trigger_bar.tolist() == [3]
    assert pm.closeout_equity_usd.tolist() == pytest.approx([2000.0])
    np.testing.assert_array_equal(pm.twin_trigger_bar, cross.twin_trigger_bar)
    assert pm.summary()["liquidated_accounts"] == 1
    with pytest.raises(InvalidParameters) as info:
        simulate_accounts(market, tiered, [account], AccountConfig(mode="portfolio"))
    assert info.value.field == "portfolio_model"


LUNA_30M = [f"binance_spot_2020_2025/{s}USDT_30m.csv" for s in ("BTC", "ETH", "SOL")]


def _luna_market(root: Path) -> Market:
    start, end = 1_651_363_200_000, 1_653_782_400_000  # 2022-05-01 .. 2022-05-29
    return Market.from_series([load_bars(r, root=root, start_ms=start, end_ms=end)
                               for r in LUNA_30M])


def _books(market: Market, seed: int, first: int) -> list[Account]:
    """Hedged, directional and basket books with stable, BTC and ETH collateral."""
    rng = np.random.default_rng(seed)
    ts = market.timestamp_ms
    names = market.instruments
    out = []
    for j in range(45):
        e = int(rng.integers(first, len(ts) - 20))
        kind = j % 3
        gross = float(rng.uniform(1e3, 1e6))
        if kind == 0:
            pos = {names[j % 3]: gross * (1 if rng.random() < 0.5 else -1)}
        elif kind == 1:
            pos = {names[0]: gross / 2, names[1 + j % 2]: -gross / 2}
        else:
            pos = {nm: gross / 3 for nm in names}
        value = gross / float(rng.uniform(1.5, 12))
        coll = {"USDT": value / 2, "BTC": value / 4 / float(market.bars[0].close[e]),
                "ETH": value / 4 / float(market.bars[1].close[e])}
        out.append(Account(id=f"r{j}", entry_ms=int(ts[e]) + 1, collateral=coll,
                           positions=pos))
    return out


PM_CASES = [
    ("grid", {"vol_scaled": True, "warmup_bars": 100, "horizon_bars": 2, "points": 5,
              "min_price_range": 0.02, "extended_moves": [-0.3], "extended_weights": [0.5]}),
    ("historical", {"window_bars": 60, "warmup_bars": 100, "horizon_bars": 2,
                    "confidence": 0.95}),
]


@pytest.mark.data
@pytest.mark.parametrize("latency", [0, 1])
@pytest.mark.parametrize(("family", "params"), PM_CASES)
def test_portfolio_mode_matches_the_plain_loop_on_real_data(
        shared_data: Path, data_file: Callable[[str], str], latency: int, family: str,
        params: dict[str, Any]) -> None:
    """Real aligned BTC/ETH/SOL 30-minute bars through LUNA: every account's trigger and
    close-out equity under the portfolio requirement equal the plain loop, whose requirement
    is the plain enumeration (grid) or sort (historical) at the adverse-extreme exposures."""
    for r in LUNA_30M:
        data_file(r)
    market = _luna_market(shared_data)
    model = make_portfolio_model(family, params)
    tiered = make_model("tiered", {"base_mmr": 0.01, "tier_growth": 1.0,
                                   "bracket_caps_usd": []})
    first = model.first_valid_bar(market.bar_seconds)
    books = _books(market, seed=11 + latency, first=first)
    result = simulate_accounts(market, tiered, books,
                               AccountConfig(mode="portfolio", holding_bars=96,
                                             latency_bars=latency), portfolio=model)
    prices = {b.instrument: {"low": b.low.tolist(), "high": b.high.tolist(),
                             "close": b.close.tolist()} for b in market.bars}
    asset_of = {i: underlying_of(i) for i in market.instruments}
    by_asset = {underlying_of(i): i for i in reversed(market.instruments)}
    if family == "grid":
        sigma = {b.instrument: [math.sqrt(v) for v in ref_models.ewma_variance(
            b.close.tolist(), 0.97, 100)] for b in market.bars}
        z = 2.3263478740408408 * math.sqrt(2)

        def portfolio_mm(exposure: dict[str, float], t: int) -> float:
            ranges = {asset_of[i]: max(0.02, z * sigma[i][t]) for i in market.instruments}
            return 0.8 * ref_pf.grid_im(exposure, asset_of, ranges, points=5,
                                        extended=[(-0.3, 0.5)])
    else:
        hist = ref_pf.Historical({b.instrument: b.close.tolist() for b in market.bars},
                                 window=60, confidence=0.95, decay=0.97, horizon=2,
                                 warmup=100)

        def portfolio_mm(exposure: dict[str, float], t: int) -> float:
            return 0.8 * hist.im(exposure, t)

    ts = market.timestamp_ms.tolist()
    for j, acc in enumerate(result.accounts):
        e = max(i for i, t in enumerate(ts) if t <= acc.entry_ms)
        units = {nm: v / prices[nm]["close"][e] for nm, v in acc.positions.items()}
        usd = sum(v for a, v in acc.collateral.items() if a == "USDT")
        coll = {by_asset[a]: v for a, v in acc.collateral.items() if a != "USDT"}
        out = ref.replay(prices, asset_of, lambda i, x, t: 0.0,
                         ref.RefAccount(e, units, usd, coll), holding_bars=96,
                         latency_bars=latency, portfolio_mm=portfolio_mm)
        assert result.trigger_bar[j] == (-1 if out.trigger is None else out.trigger), acc.id
        if out.closeout_equity is not None:
            assert result.closeout_equity_usd[j] == pytest.approx(out.closeout_equity,
                                                                   rel=1e-9, abs=1e-6)
    hit = int((result.trigger_bar >= 0).sum())
    assert 0 < hit < len(result.accounts)
    # Triggered accounts include ones after their first bar (not only under-funded at entry).
    assert (result.trigger_bar[result.trigger_bar >= 0] > result.entry_bar[
        result.trigger_bar >= 0] + 1).any()


def test_cli_portfolio_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """marginlab accounts backtest --mode portfolio --portfolio-model deribit_pme_2024: the
    hand case above through the CLI; without --portfolio-model it exits 2 naming the field."""
    import pandas as pd

    from calibration.cli import main

    rows = [(100.0,) * 4] * 3 + [(80.0,) * 4] * 3
    for name in ("AUSDT", "BUSDT"):
        pd.DataFrame({"timestamp_ms": T0 + np.arange(6) * MIN,
                      "open": [r[0] for r in rows], "high": [r[1] for r in rows],
                      "low": [r[2] for r in rows], "close": [r[3] for r in rows]}
                     ).to_csv(tmp_path / f"{name}.csv", index=False)
    (tmp_path / "accounts.json").write_text(json.dumps([
        {"id": "hedge", "entry": T0 + 2 * MIN, "collateral": {"USDT": 2000},
         "positions": {"AUSDT": 10_000, "BUSDT": -10_000}}]))
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    args = ["accounts", "backtest", "--data", "AUSDT=AUSDT.csv", "--data", "BUSDT=BUSDT.csv",
            "--accounts", "accounts.json", "--model", "tiered", "--params",
            json.dumps({"base_mmr": 0.01, "tier_growth": 1.0, "bracket_caps_usd": []}),
            "--liquidation", '{"holding_bars": 3, "latency_bars": 0}', "--no-stress-windows",
            "--mode", "portfolio"]
    assert main([*args, "--portfolio-model", "deribit_pme_2024", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "portfolio"
    assert report["portfolio_model"] == "deribit_pme_2024"
    assert report["portfolio_params"]["price_range"] == 0.16
    assert report["accounts"][0]["liquidated"] is True
    assert report["summary"][0]["liquidated_accounts"] == 1
    assert main([*args, "--json"]) == 2
    assert "--portfolio-model" in capsys.readouterr().err
    assert main([*args, "--portfolio-model", "grid", "--portfolio-params",
                 '{"points": 1}', "--json"]) == 2
    assert "points" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Portfolio coverage backtest


def _check_coverage(cov: Any, market: Market, model: PortfolioMarginModel,
                    exposure: dict[str, float]) -> None:
    """Observations, losses, breaches and attribution recomputed by a plain loop."""
    close = {b.instrument: b.close.tolist() for b in market.bars}
    h = cov.horizon_bars
    lo, hi = model.with_horizon(h).scenario_envelope(market)
    req = cov.requirement_usd
    breaches = 0
    attributed = []
    for j, t in enumerate(cov.observation_bars.tolist()):
        moves = {i: close[i][t + h] / close[i][t] - 1.0 for i in exposure}
        loss = -sum(x * moves[i] for i, x in exposure.items())
        assert cov.loss_usd[j] == pytest.approx(loss, rel=1e-9, abs=1e-6)
        if loss > req[j]:
            breaches += 1
            names = market.instruments
            attributed.append(sorted(
                (i, "down" if moves[i] < lo[names.index(i), t] else "up")
                for i in exposure if exposure[i] != 0.0
                and not lo[names.index(i), t] <= moves[i] <= hi[names.index(i), t]))
    assert cov.breaches == breaches
    assert [sorted((u[0], u[1]) for u in a.unspanned) for a in cov.attribution] == attributed
    assert cov.kupiec_lr == pytest.approx(kupiec_lr(cov.observations, breaches,
                                                    1 - cov.confidence))
    assert cov.traffic_light == traffic_light(cov.observations, breaches, 1 - cov.confidence)


@pytest.mark.data
def test_portfolio_coverage_reference_books(shared_data: Path,
                                            data_file: Callable[[str], str]) -> None:
    """§3 on real 30-minute bars of 2022 (LUNA, FTX): long BTC / short ETH and an
    equal-weight 5-coin basket under the historical model (ES 99%) and a vol-scaled grid; the
    statistics, breaches and attribution equal a plain recomputation; ES 99% over a 4-hour
    horizon holds the breach rate under 3%; the grid's basket breaches are each attributed
    to a coin's fall beyond its range."""
    coins = ("BTC", "ETH", "SOL", "XRP", "BNB")
    refs = [data_file(f"binance_spot_2020_2025/{c}USDT_30m.csv") for c in coins]
    start, end = 1_640_995_200_000, 1_672_531_200_000  # 2022
    market = Market.from_series([load_bars(r, root=shared_data, start_ms=start, end_ms=end)
                                 for r in refs])
    hist = make_portfolio_model("historical", {"window_bars": 1000, "warmup_bars": 500,
                                               "horizon_bars": 8, "confidence": 0.99})
    books = [long_short_book("BTCUSDT", "ETHUSDT"), basket_book(market.instruments)]
    for book in books:
        cov = portfolio_coverage(market, hist, book, step_bars=8)
        exposure = {i: float(v) for i, v in book.notional_usd.items()}
        _check_coverage(cov, market, hist, exposure)
        assert cov.observations > 1000
        assert cov.breaches > 0, book.name
        assert cov.breach_rate < 0.03, book.name
    grid = make_portfolio_model("grid", {"vol_scaled": True, "warmup_bars": 500,
                                         "horizon_bars": 8})
    cov = portfolio_coverage(market, grid, books[1], step_bars=8)
    _check_coverage(cov, market, grid, {i: float(v) for i, v in books[1].notional_usd.items()})
    # A long basket's product-grid IM is Σ x_i R_i: it can lose more only if some coin fell
    # beyond its range, so every breach is attributed, and to a fall.
    assert cov.breaches > 0
    assert all(a.kind == "unspanned" for a in cov.attribution)
    assert all(u[1] == "down" for a in cov.attribution for u in a.unspanned)


@pytest.mark.data
def test_portfolio_coverage_carry_book(shared_data: Path,
                                       data_file: Callable[[str], str]) -> None:
    """Long Binance BTC spot / short the USD-M BTC perpetual (1-hour bars, 2020-08..12) on
    BTC collateral: the grid sees one factor (the basis is not a scenario) and charges the
    collateral only; the historical model's joint scenarios see the basis. Both against the
    plain recomputation; the wrong-way collateral is what the requirement covers."""
    spot_ref = data_file("binance_spot_1h_2017_2021/BTCUSDT_1h.csv")
    perp_ref = data_file("binance_usdm_perp_2019_2020/BTCUSDT_perp_1h.csv")
    start, end = 1_596_326_400_000, 1_609_286_400_000  # 2020-08-02 .. 2020-12-30
    spot = load_bars(spot_ref, root=shared_data, instrument="BTCUSDT", start_ms=start,
                     end_ms=end)
    perp = load_bars(perp_ref, root=shared_data, instrument="BTC-PERP", start_ms=start,
                     end_ms=end)
    market = Market.from_series([spot, perp])
    assert len(market) > 3000
    book = carry_book("BTCUSDT", "BTC-PERP", 1e6, collateral_asset="BTC",
                      collateral_usd=2e5)
    exposure = {"BTCUSDT": 1e6 + 2e5, "BTC-PERP": -1e6}
    grid = make_portfolio_model("deribit_pme_2024")
    cov_grid = portfolio_coverage(market, grid, book, horizon_bars=4)
    assert cov_grid.requirement_usd == pytest.approx(np.full(cov_grid.observations,
                                                             0.16 * 2e5))
    _check_coverage(cov_grid, market, grid.with_horizon(4), exposure)
    hist = make_portfolio_model("historical", {"window_bars": 500, "warmup_bars": 200,
                                               "horizon_bars": 4, "confidence": 0.99})
    cov = portfolio_coverage(market, hist, book, step_bars=4)
    _check_coverage(cov, market, hist, exposure)
    assert cov.observations > 500
    assert cov.breach_rate < 0.05


@pytest.mark.data
def test_carry_loses_the_basis_move_and_its_btc_collateral_falls_with_the_book(
        shared_data: Path, data_file: Callable[[str], str]) -> None:
    """The carry reference book (long Binance BTC spot / short the USD-M BTC perpetual, 1e6
    each, 1-hour bars 2020-08..12) on 2e5 USD of BTC collateral: each h-bar loss is, by hand,
    ``-(1e6 (r_spot - r_perp) + 2e5 r_spot)``: the basis move on the legs plus the collateral's
    outright move. Without collateral the loss is the basis move alone, a small fraction of
    the outright book's (long spot 1e6); with it, the book loses with BTC (the wrong-way
    collateral), and the historical model's requirement, whose joint scenarios revalue
    collateral with the legs, covers it."""
    spot_ref = data_file("binance_spot_1h_2017_2021/BTCUSDT_1h.csv")
    perp_ref = data_file("binance_usdm_perp_2019_2020/BTCUSDT_perp_1h.csv")
    start, end = 1_596_326_400_000, 1_609_286_400_000  # 2020-08-02 .. 2020-12-30
    market = Market.from_series([
        load_bars(spot_ref, root=shared_data, instrument="BTCUSDT", start_ms=start,
                  end_ms=end),
        load_bars(perp_ref, root=shared_data, instrument="BTC-PERP", start_ms=start,
                  end_ms=end)])
    h = 4
    hist = make_portfolio_model("historical", {"window_bars": 500, "warmup_bars": 200,
                                               "horizon_bars": h, "confidence": 0.99})
    carry = carry_book("BTCUSDT", "BTC-PERP", 1e6, collateral_asset="BTC",
                       collateral_usd=2e5)
    bare = PortfolioBook(name="carry_bare", notional_usd=carry.notional_usd)
    outright = PortfolioBook(name="long_spot", notional_usd={"BTCUSDT": 1e6})
    covs = {b.name: portfolio_coverage(market, hist, b, step_bars=h)
            for b in (carry, bare, outright)}
    spot = market.bars[0].close.tolist()
    perp = market.bars[1].close.tolist()
    bars = covs[carry.name].observation_bars.tolist()
    r_spot = [spot[t + h] / spot[t] - 1.0 for t in bars]
    r_perp = [perp[t + h] / perp[t] - 1.0 for t in bars]
    by_hand = [-(1e6 * (rs - rp) + 2e5 * rs) for rs, rp in zip(r_spot, r_perp, strict=True)]
    assert covs[carry.name].loss_usd.tolist() == pytest.approx(by_hand, rel=1e-9, abs=1e-6)
    basis = [-1e6 * (rs - rp) for rs, rp in zip(r_spot, r_perp, strict=True)]
    assert covs[bare.name].loss_usd.tolist() == pytest.approx(basis, rel=1e-9, abs=1e-6)
    assert covs[outright.name].loss_usd.tolist() == pytest.approx(
        [-1e6 * rs for rs in r_spot], rel=1e-9, abs=1e-6)
    # The legs' loss is the basis move: about a tenth of the outright move here (0.10).
    assert np.std(covs[bare.name].loss_usd) < 0.15 * np.std(covs[outright.name].loss_usd)
    # The collateral falls with BTC: the collateralised carry loses when BTC falls (its
    # collateral's move is about twice the basis noise here: correlation 0.89).
    assert np.corrcoef(covs[carry.name].loss_usd, covs[outright.name].loss_usd)[0, 1] > 0.8
    worst = int(np.argmin(r_spot))
    assert r_spot[worst] < -0.03
    assert covs[carry.name].loss_usd[worst] > 0.8 * 2e5 * -r_spot[worst]
    # The requirement sees the collateral: larger with it than without, and it covers.
    assert (covs[carry.name].requirement_usd > covs[bare.name].requirement_usd).all()
    assert covs[carry.name].breach_rate < 0.05
