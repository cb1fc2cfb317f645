"""Account-level calibration from a spec (issue 14 item 2).

Each account-level metric of a trial is checked against the account engine, the haircut
coverage backtest and the portfolio coverage backtest called here directly with the
parameters written out by hand (and the collateral held back, a depth-derived flat haircut and
the green-light limit by hand formulas); bad keys are refused naming the field path; a spec
without the section keeps the hash the engine before it computed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import optuna
import pytest
from scipy.stats import norm

from calibration._errors import InvalidParameters
from calibration.accounts import (
    AccountConfig,
    Market,
    PopulationSpec,
    generate_population,
    haircut_coverage,
    portfolio_coverage,
    simulate_accounts,
)
from calibration.accounts._haircuts import tiered
from calibration.accounts._portfolio_coverage import PortfolioBook
from calibration.calibrate import calibrate, evaluate, prepare, run_calibration
from calibration.models import GridPortfolioMargin, make_model
from calibration.spec import decode_spec, spec_hash
from calibration.stats import binomial_cdf
from calibration.windows import StressWindow

BTC = "binance_spot_2020_2025/BTCUSDT_30m.csv"
ETH = "binance_spot_2020_2025/ETHUSDT_30m.csv"
MODEL = {"decay": {"value": 0.95}, "floor_rate": {"value": 0.016},
         "confidence": {"value": 0.99}, "apc_buffer": {"value": 0.5},
         "horizon_bars": {"value": 2}, "warmup_bars": {"value": 300}}
MODEL_PARAMS = {k: v["value"] for k, v in MODEL.items()}
NO_RULES = {"kupiec_alpha": None, "no_red_in_stress_windows": False,
            "max_premature_share": None}


def raw_spec(**overrides: Any) -> dict[str, Any]:
    """Two months of BTC and ETH 30m bars (FTX inside), the EWMA model fixed, a small
    population with half its collateral in BTC, portfolio mode."""
    raw: dict[str, Any] = {
        "data": [{"instrument": "BTCUSDT", "ref": BTC, "start": "2022-10-01",
                  "end": "2022-11-30"},
                 {"instrument": "ETHUSDT", "ref": ETH, "start": "2022-10-01",
                  "end": "2022-11-30"}],
        "model": "ewma",
        "search_space": dict(MODEL),
        "accounts": {
            "population": {"accounts_per_entry": 3,
                           "collateral_weights": {"USDT": 0.5, "BTC": 0.5}},
            "mode": "portfolio", "engine": {"policy": "partial"},
            "portfolio": {"warmup_bars": 300, "extended_moves": [0.3],
                          "extended_weights": [0.2]},
            "haircuts": {"BTC": {"caps_usd": [1e6], "ratios": [0.95, 0.9]}},
        },
        "objectives": {"minimize": ["portfolio_capital_cost", "account_bad_debt_bps",
                                    "collateral_held_back"]},
        "constraints": {**NO_RULES, "max": {"haircut_coverage": 0, "portfolio_coverage": 0}},
        "walk_forward": {"in_sample_end": "2022-11-15", "folds": 1},
        "stress_windows": [{"name": "ftx_2022", "start": "2022-11-08", "end": "2022-11-10"}],
        "n_trials": 4,
        "seed": 5,
    }
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def root(shared_data: Path, data_file: Callable[[str], str]) -> Path:
    """The data root, once the BTC and ETH files are known to be there."""
    data_file(BTC)
    data_file(ETH)
    return shared_data


def _green_limit(n: int, p: float) -> int:
    """The most breaches with a green light (binomial CDF < 0.95), by counting up."""
    x = -1
    while binomial_cdf(x + 1, n, p) < 0.95:
        x += 1
    return x


def test_account_metrics_are_the_engines_and_backtests_figures(root: Path) -> None:
    """One trial's account metrics equal the engine's replay and the two coverage
    backtests called directly with the trial's parameters, and the collateral held back is
    the hand formula over the two reference holdings (1M and 2M USD)."""
    spec = decode_spec(json.dumps(raw_spec()))
    prepared = prepare(spec, root)
    params = {**MODEL_PARAMS, "engine.partial_fraction": 0.4,
              "portfolio.price_range": 0.12, "portfolio.offset_credit_cap": 0.3,
              "portfolio.extended_weights[0]": 0.5, "haircuts.BTC.ratios[1]": 0.8}
    result = evaluate(prepared, params)
    bars = prepared.in_sample
    market = Market.from_series(bars)
    model = make_model("ewma", MODEL_PARAMS).with_horizon(2)
    schedule = tiered([1e6], [0.95, 0.8])
    grid = GridPortfolioMargin(warmup_bars=300, price_range=0.12, offset_credit_cap=0.3,
                               extended_moves=(0.3,), extended_weights=(0.5,), horizon_bars=2)
    accounts = generate_population(
        PopulationSpec(seed=5, entry_every_bars=48, accounts_per_entry=3,
                       collateral_weights={"USDT": 0.5, "BTC": 0.5}),
        instruments=market.instruments, timestamp_ms=market.timestamp_ms,
        close=market.matrix("close"), first_bar=model.first_valid_bar())
    config = AccountConfig(mode="portfolio", holding_bars=7 * 48, latency_bars=1,
                           policy="partial", partial_fraction=0.4,
                           haircuts={"BTC": schedule})
    direct = simulate_accounts(market, model, accounts, config, portfolio=grid).summary()
    assert result.objective("account_bad_debt_bps") == pytest.approx(
        direct["bad_debt_usd"] / direct["notional_opened_usd"] * 1e4)

    rows = haircut_coverage(bars[0], schedule, holdings_usd=[1e6, 2e6], liquidation_bars=2,
                            adv_window_bars=48,
                            stress_windows=[StressWindow.from_dates("ftx_2022", "2022-11-08",
                                                                    "2022-11-10")])
    excess = max(r.breaches - _green_limit(r.observations, 0.01) for r in rows
                 if r.window == "all")
    assert result.constraints["haircut_coverage"] == excess

    books = [PortfolioBook("long_BTCUSDT_short_ETHUSDT", {"BTCUSDT": 1e6, "ETHUSDT": -1e6}),
             PortfolioBook("basket_2", {"BTCUSDT": 5e5, "ETHUSDT": 5e5})]
    covs = [portfolio_coverage(market, grid, b, horizon_bars=2) for b in books]
    assert result.constraints["portfolio_coverage"] == max(
        c.breaches - _green_limit(c.observations, 0.01) for c in covs)
    # Gross notional: 2M for the pair, 1M for the basket.
    assert result.objective("portfolio_capital_cost") == pytest.approx(
        (covs[0].mean_requirement_usd / 2e6 + covs[1].mean_requirement_usd / 1e6) / 2)

    # 1M at 0.95; 2M: 1M at 0.95 and 1M at 0.8.
    held = (1e6 - 0.95e6) + (2e6 - 0.95e6 - 0.8e6)
    assert result.objective("collateral_held_back") == pytest.approx(held / 3e6)


def test_searched_ratios_are_made_non_increasing_and_depth_tiers_follow_the_formula(
        root: Path) -> None:
    """A searched ratio above the band before it counts at that band's ratio (a larger
    holding never counts more) and a searched bracket replaces the fixed one; a flat tier
    derived from depth is 1 − (spread + impact + z_q σ √h) with the searched impact, since
    its one point is the depth itself (V / depth = 1)."""
    raw = raw_spec(objectives={"minimize": ["collateral_held_back"]},
                   constraints={**NO_RULES, "max": {"haircut_coverage": 1e9}})
    raw["accounts"]["mode"] = "cross"
    del raw["accounts"]["portfolio"]
    raw["accounts"]["haircuts"] = {
        "BTC": {"caps_usd": [1e6], "ratios": [0.9, 0.9]},
        "ETH": {"depth": {"spread_rate": 0.001, "impact_coef": 0.02, "confidence": 0.99}}}
    prepared = prepare(decode_spec(json.dumps(raw)), root)
    params = {**MODEL_PARAMS, "haircuts.BTC.ratios[1]": 0.97,
              "haircuts.BTC.caps_usd[0]": 2.5e6, "haircuts.ETH.depth.impact_coef": 0.03}
    out = evaluate(prepared, params, evidence=True).accounts
    assert out["haircuts"]["BTC"] == {"caps_usd": [2.5e6], "ratios": [0.9, 0.9]}
    eth = prepared.in_sample[1]
    sigma = float(np.std(np.diff(np.log(eth.close))))
    # h_liq = the close-out horizon, 2 bars.
    expected = 1 - (0.001 + 0.03 + float(norm.ppf(0.99)) * sigma * math.sqrt(2))
    assert out["haircuts"]["ETH"]["ratios"] == [pytest.approx(expected)]
    assert out["haircuts"]["ETH"]["caps_usd"] == []


def test_a_capacity_search_recommends_the_trial_with_the_least_bad_debt(root: Path) -> None:
    """Searching the engine's capacity alone (cross mode, no haircuts): every trial's bad
    debt is the engine's for that capacity, called directly; the recommendation is the least
    of them, with the evidence of the whole span, the stress window and the fold."""
    raw = raw_spec(objectives={"minimize": ["account_bad_debt_bps"]},
                   constraints=NO_RULES, n_trials=5, sampler="random")
    raw["accounts"] = {"population": {"accounts_per_entry": 4, "leverage": [10, 50]},
                       "engine": {"max_liquidations_per_bar": 1}}
    raw["search_space"]["engine.max_liquidations_per_bar"] = {"low": 1, "high": 3,
                                                              "integer": True}
    spec = decode_spec(json.dumps(raw))
    studies: list[optuna.Study] = []
    result = run_calibration(spec, root=root, watch=lambda s: studies.append(s) or None)
    assert result is not None
    prepared = prepare(spec, root)
    market = Market.from_series(prepared.in_sample)
    model = make_model("ewma", MODEL_PARAMS).with_horizon(2)
    accounts = generate_population(
        PopulationSpec(seed=5, entry_every_bars=48, accounts_per_entry=4, leverage=(10, 50)),
        instruments=market.instruments, timestamp_ms=market.timestamp_ms,
        close=market.matrix("close"), first_bar=model.first_valid_bar())
    by_capacity = {}
    for capacity in (1, 2, 3):
        s = simulate_accounts(market, model, accounts, AccountConfig(
            holding_bars=336, latency_bars=1, max_liquidations_per_bar=capacity)).summary()
        by_capacity[capacity] = s["bad_debt_usd"] / s["notional_opened_usd"] * 1e4
    tried = {t.params["engine.max_liquidations_per_bar"]: t.values[0]
             for t in studies[0].trials}
    for capacity, value in tried.items():
        assert value == pytest.approx(by_capacity[capacity])
    rec = result.recommendation
    assert rec is not None
    assert rec.feasible
    chosen = rec.params["engine.max_liquidations_per_bar"]
    assert chosen in tried
    assert rec.objectives["account_bad_debt_bps"] == pytest.approx(by_capacity[chosen])
    assert rec.objectives["account_bad_debt_bps"] == pytest.approx(
        min(by_capacity[c] for c in tried))
    # Trials skip the position replay no metric reads; the evidence keeps it.
    assert rec.in_sample["liquidation"]["BTCUSDT"][0]["positions"] > 0
    windows = [row["window"] for row in rec.in_sample["accounts"]["replay"]]
    assert windows == ["all", "ftx_2022"]
    fold = rec.accounts["out_of_sample"]["oos_fold_1"]["replay"]
    assert [row["window"] for row in fold] == ["oos_fold_1"]
    assert fold[0]["accounts"] > 0


def test_infeasible_haircuts_name_the_binding_constraint(root: Path) -> None:
    """A ratio near 1 cannot cover a sale that pays a spread whenever the price dips:
    nothing is feasible, the recommendation names haircut_coverage, and its breaches are
    those counted here by brute force (the worst low of the next two bars, less the 5 bps
    spread, below the ratio)."""
    raw = raw_spec(objectives={"minimize": ["collateral_held_back"]},
                   constraints={**NO_RULES, "max": {"haircut_coverage": 0}}, n_trials=2)
    raw["accounts"] = {"population": {"accounts_per_entry": 1},
                       "haircuts": {"BTC": {"caps_usd": [], "ratios": [1.0]}}}
    raw["search_space"]["haircuts.BTC.ratios[0]"] = {"low": 0.999, "high": 1.0}
    spec = decode_spec(json.dumps(raw))
    result = calibrate(spec, root=root)
    rec = result.recommendation
    assert rec is not None
    assert not rec.feasible
    assert rec.binding_constraints == ["haircut_coverage"]
    ratio = rec.params["haircuts.BTC.ratios[0]"]
    btc = prepare(spec, root).in_sample[0]
    breaches = sum(
        1 for t in range(len(btc) - 2)
        if min(btc.low[t + 1], btc.low[t + 2]) / btc.close[t] * (1 - 0.0005) < ratio)
    row = next(r for r in rec.in_sample["accounts"]["haircut_coverage"] if r["window"] == "all")
    assert row["breaches"] == breaches
    assert rec.constraints["haircut_coverage"] == breaches - _green_limit(len(btc) - 2, 0.01)
    assert rec.constraints["haircut_coverage"] > 0


BASE = {"data": [{"instrument": "BTCUSDT", "ref": "b.csv"},
                 {"instrument": "ETHUSDT", "ref": "e.csv"}], "model": "ewma"}
SECTION = {"population": {}, "haircuts": {"BTC": {"caps_usd": [1e6, 2e6],
                                                  "ratios": [1, 0.9, 0.8]}}}


@pytest.mark.parametrize(("patch", "field"), [
    ({"search_space": {"engine.partial_fraction": {"low": 0.1, "high": 0.5}}},
     "search_space.engine.partial_fraction"),
    ({"accounts": SECTION, "search_space": {"engine.nope": {"low": 0.1, "high": 0.5}}},
     "search_space.engine.nope"),
    ({"accounts": SECTION, "search_space": {"engine.partial_fraction": {"low": 0, "high": 1}}},
     "search_space.engine.partial_fraction"),
    ({"accounts": SECTION,
      "search_space": {"engine.max_liquidations_per_bar": {"low": 1, "high": 5}}},
     "search_space.engine.max_liquidations_per_bar"),
    ({"accounts": SECTION, "search_space": {"portfolio.price_range": {"low": 0.1, "high": 0.2}}},
     "search_space.portfolio.price_range"),
    ({"accounts": {**SECTION, "mode": "portfolio"},
      "search_space": {"portfolio.extended_weights[0]": {"low": 0.1, "high": 0.2}}},
     "search_space.portfolio.extended_weights[0]"),
    ({"accounts": SECTION, "search_space": {"haircuts.ETH.ratios[0]": {"low": 0.5, "high": 1}}},
     "search_space.haircuts.ETH.ratios[0]"),
    ({"accounts": SECTION, "search_space": {"haircuts.BTC.ratios[3]": {"low": 0.5, "high": 1}}},
     "search_space.haircuts.BTC.ratios[3]"),
    ({"accounts": SECTION,
      "search_space": {"haircuts.BTC.caps_usd[0]": {"low": 5e5, "high": 3e6}}},
     "accounts.haircuts.BTC.caps_usd[1]"),
    ({"accounts": SECTION,
      "search_space": {"haircuts.BTC.depth.impact_coef": {"low": 0, "high": 1}}},
     "search_space.haircuts.BTC.depth.impact_coef"),
    ({"accounts": SECTION, "search_space": {"engine": {"low": 0, "high": 1}}},
     "search_space.engine"),
    ({"accounts": {**SECTION, "engine": {"partial_fraction": 2}}},
     "accounts.engine.partial_fraction"),
    ({"accounts": {**SECTION, "engine": {"mode": "isolated"}}}, "accounts.engine.mode"),
    ({"accounts": {**SECTION, "population": {"accounts_per_entry": 0}}},
     "accounts.population.accounts_per_entry"),
    ({"accounts": {**SECTION, "population": {"colour": 1}}}, "accounts.population.colour"),
    ({"accounts": {**SECTION, "file": "accounts.json"}}, "accounts.file"),
    ({"accounts": {"haircuts": {"BTC": {"caps_usd": [1e6]}}}}, "accounts.haircuts.BTC.ratios"),
    ({"accounts": {"haircuts": {"BTC": {"caps_usd": [2e6, 1e6], "ratios": [1, 1, 1]}}}},
     "accounts.haircuts.BTC.caps_usd[1]"),
    ({"accounts": {"haircuts": {"BTC": {"depth": {"confidence": 2}}}}},
     "accounts.haircuts.BTC.depth.confidence"),
    ({"accounts": {"mode": "portfolio", "portfolio": {"nope": 1}}}, "accounts.portfolio.nope"),
    ({"accounts": {"mode": "portfolio", "portfolio": {"horizon_bars": 4}}},
     "accounts.portfolio.horizon_bars"),
    ({"accounts": {"mode": "portfolio"},
      "search_space": {"portfolio.horizon_bars": {"value": 4}}},
     "search_space.portfolio.horizon_bars"),
    ({"accounts": {"mode": "portfolio", "portfolio_model": "spam"}},
     "accounts.portfolio_model"),
    ({"accounts": {"mode": "isolated"}}, "accounts.mode"),
    ({"accounts": {"colour": 1}}, "accounts.colour"),
    ({"constraints": {"max": {"haircut_coverage": 0}}}, "constraints.max.haircut_coverage"),
    ({"accounts": {}, "objectives": {"minimize": ["portfolio_capital_cost"]}},
     "objectives.minimize[0]"),
    ({"objectives": {"minimize": ["account_bad_debt_bps"]}}, "objectives.minimize[0]"),
    ({"accounts": SECTION, "published": {"params": {"engine.nope": 1}}},
     "published.params.engine.nope"),
    ({"accounts": SECTION,
      "published": {"params": {}, "max_change": {"engine.partial_fraction": 0.1}}},
     "published.max_change.engine.partial_fraction"),
    ({"published": {"params": {"haircuts.BTC.ratios[0]": 0.9}}},
     "published.params.haircuts.BTC.ratios[0]"),
])
def test_bad_account_settings_are_refused_naming_the_field(patch: dict[str, Any],
                                                           field: str) -> None:
    """Unknown or out-of-range account-level keys and section fields are refused before
    any data is read, the error naming the full path."""
    with pytest.raises(InvalidParameters) as caught:
        decode_spec(json.dumps({**BASE, **patch}))
    assert caught.value.field == field, str(caught.value)


def test_a_population_too_large_is_refused_naming_the_field(root: Path) -> None:
    """Two months of 30m bars with an entry every bar and 50 accounts each are ~140,000
    accounts, above the run's bound of 100,000: refused before any trial, naming the
    field."""
    raw = raw_spec()
    raw["accounts"]["population"] = {"entry_every_bars": 1, "accounts_per_entry": 50}
    with pytest.raises(InvalidParameters) as caught:
        prepare(decode_spec(json.dumps(raw)), root)
    assert caught.value.field == "accounts.population.accounts_per_entry"


def test_a_spec_without_accounts_keeps_its_hash() -> None:
    """This spec's hash as the engine before the accounts section (commit bcae0c6)
    computed it."""
    raw = {"data": [{"instrument": "BTCUSDT", "ref": "b.csv", "start": "2022-10-01"},
                    {"instrument": "ETHUSDT", "ref": "e.csv"}],
           "model": "ewma", "search_space": {"decay": {"low": 0.9, "high": 0.99}},
           "objectives": {"minimize": ["capital_cost", "contagion"]},
           "constraints": {"max": {"liquidations_at_risk": 0.2}},
           "walk_forward": {"folds": 3}, "n_trials": 20, "seed": 4}
    assert spec_hash(decode_spec(json.dumps(raw))) == (
        "53b614918b278749d79c4e7a88e8b8c41fced9b7a658ba89c192704d491acd28")
    with_section = msgspec.json.encode({**raw, "accounts": {}})
    assert spec_hash(decode_spec(with_section)) != spec_hash(decode_spec(json.dumps(raw)))


def _cross_spec(**overrides: Any) -> dict[str, Any]:
    """Cross mode, the BTC haircut and the engine's partial fraction searched, bad debt
    and collateral held back as objectives (no portfolio model)."""
    raw = raw_spec(objectives={"minimize": ["account_bad_debt_bps", "collateral_held_back"]},
                   constraints={**NO_RULES, "max": {"haircut_coverage": 1e9}}, **overrides)
    raw["accounts"]["mode"] = "cross"
    del raw["accounts"]["portfolio"]
    raw["search_space"]["engine.partial_fraction"] = {"low": 0.1, "high": 0.9}
    raw["search_space"]["haircuts.BTC.ratios[1]"] = {"low": 0.5, "high": 1.0}
    return raw


def test_account_level_guardrails_constrain_the_search(root: Path) -> None:
    """Published account-level values and their max changes make the guardrail constraint
    (as for model parameters): from partial fraction 0.3 with 0.05 allowed, 0.4 is 0.05 too
    far, scaled (0.1 − 0.05) / 0.05 = 1; the BTC band's ratio 0.9 → 0.97 counts as 0.95
    (the band before), 0.05 of 0.1 allowed: −0.5; the worst of the two is the constraint.
    0.33 is inside (−0.4)."""
    published = {"params": {"engine.partial_fraction": 0.3, "haircuts.BTC.ratios[1]": 0.9},
                 "max_change": {"engine.partial_fraction": 0.05,
                                "haircuts.BTC.ratios[1]": 0.1}}
    prepared = prepare(decode_spec(json.dumps(_cross_spec(published=published))), root)
    far = evaluate(prepared, {**MODEL_PARAMS, "engine.partial_fraction": 0.4,
                              "haircuts.BTC.ratios[1]": 0.97})
    assert far.constraints["guardrail"] == pytest.approx(1.0)
    near = evaluate(prepared, {**MODEL_PARAMS, "engine.partial_fraction": 0.33,
                               "haircuts.BTC.ratios[1]": 0.97})
    assert near.constraints["guardrail"] == pytest.approx(-0.4)

    # a search (the published values its first trial) recommends only what may be published
    spec = decode_spec(json.dumps(_cross_spec(published=published, n_trials=4,
                                              sampler="random")))
    rec = calibrate(spec, root=root).recommendation
    assert rec is not None
    assert rec.feasible
    assert abs(rec.params["engine.partial_fraction"] - 0.3) <= 0.05 + 1e-9
    assert min(0.95, rec.params["haircuts.BTC.ratios[1]"]) - 0.9 <= 0.1 + 1e-9


def test_the_population_is_drawn_once_per_span(root: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials on one prepared run draw the generated population once and reuse it; each
    trial's figures are those of a run prepared afresh for it alone."""
    import calibration.accounts as accounts_pkg

    spec = decode_spec(json.dumps(_cross_spec()))
    draws = []
    real = accounts_pkg.generate_population

    def counted(*args: Any, **kwargs: Any) -> Any:
        draws.append(kwargs.get("first_bar"))
        return real(*args, **kwargs)

    monkeypatch.setattr(accounts_pkg, "generate_population", counted)
    trials = [{**MODEL_PARAMS, "engine.partial_fraction": f, "haircuts.BTC.ratios[1]": r}
              for f, r in ((0.2, 0.8), (0.6, 0.9), (0.9, 0.6))]
    prepared = prepare(spec, root)
    shared = [evaluate(prepared, t) for t in trials]
    assert len(draws) == 1
    for trial, result in zip(trials, shared, strict=True):
        alone = evaluate(prepare(spec, root), trial)
        assert result.objectives == alone.objectives
        assert result.constraints == alone.constraints
    assert len(draws) == 1 + len(trials)
