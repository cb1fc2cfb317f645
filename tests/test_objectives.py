"""Objectives and constraints from one registry (issue 14 item 1).

The metrics are read back against figures computed here from the evaluation's own evidence
(and, for contagion, from the account engine called directly); the recommendation rule is
checked on hand-built trials; and a three-objective calibration on real Binance BTC bars is
checked against an exhaustive grid of the same space: every feasible grid point is dominated
by, or equal within tolerance to, a point of the calibration's Pareto front.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from calibration._errors import InvalidParameters
from calibration.calibrate import (
    METRICS,
    Metric,
    calibrate,
    evaluate,
    metric_bounds,
    objective_names,
    prepare,
    recommended_trial,
    register,
)
from calibration.spec import CalibrationSpec, decode_spec, spec_hash

BTC = "binance_spot_2020_2025/BTCUSDT_30m.csv"
ETH = "binance_spot_2020_2025/ETHUSDT_30m.csv"
THREE = ["capital_cost", "insolvency_bps", "liquidations_at_risk"]
#: The searched space (two parameters) and its exhaustive grid.
DECAYS = [0.93, 0.95, 0.97, 0.99]
FLOORS = [0.012, 0.017, 0.024, 0.034]
#: A grid point counts as covered by a front point no worse than it on every objective by
#: more than this share of that objective's spread over the grid.
SPREAD_TOL = 0.05


def btc_spec(**overrides: Any) -> CalibrationSpec:
    """Q4 2022 BTC 30m bars (FTX inside), EWMA over decay and floor_rate, no rule
    constraints unless overridden."""
    raw: dict[str, Any] = {
        "data": [{"instrument": "BTCUSDT", "ref": BTC, "start": "2022-09-01",
                  "end": "2022-12-31"}],
        "model": "ewma",
        "search_space": {
            "decay": {"low": DECAYS[0], "high": DECAYS[-1]},
            "floor_rate": {"low": FLOORS[0], "high": FLOORS[-1], "log": True},
            "confidence": {"value": 0.99}, "apc_buffer": {"value": 0.5},
            "horizon_bars": {"value": 2}, "warmup_bars": {"value": 300},
        },
        "constraints": {"kupiec_alpha": None, "no_red_in_stress_windows": False,
                        "max_premature_share": None},
        "walk_forward": {"in_sample_end": "2022-12-01", "folds": 1},
        "stress_windows": [{"name": "ftx_2022", "start": "2022-11-08", "end": "2022-11-10"}],
        "n_trials": 500,
        "seed": 5,
    }
    raw.update(overrides)
    return decode_spec(msgspec.json.encode(raw))


@pytest.fixture(scope="module")
def root(shared_data: Path, data_file: Callable[[str], str]) -> Path:
    """The data root, once the BTC and ETH files are known to be there."""
    data_file(BTC)
    data_file(ETH)
    return shared_data


def test_default_objectives_are_todays() -> None:
    """A spec naming no objectives minimises capital cost and insolvency, bounds the premature
    share at 60 %, and keeps the hash it had before the registry existed."""
    spec = decode_spec(json.dumps({"data": [{"instrument": "A", "ref": "x.csv"}],
                                   "model": "ewma"}))
    assert objective_names(spec) == ("capital_cost", "insolvency_bps")
    assert metric_bounds(spec) == {"premature_share": 0.6}
    # This spec's hash as the engine before the registry (commit 16ebb09) computed it.
    assert spec_hash(spec) == (
        "0d368edc428523682b271a83924d8ec27aa92f368c63bd403cceb14859f35d9b")


@pytest.mark.parametrize(("patch", "field"), [
    ({"objectives": {"minimize": ["capital_cost", "nope"]}}, "objectives.minimize[1]"),
    ({"objectives": {"minimize": ["capital_cost", "capital_cost"]}}, "objectives.minimize"),
    ({"objectives": {"minimize": ["capital_cost", "contagion"]}}, "objectives.minimize[1]"),
    ({"constraints": {"max": {"contagion": 3}}}, "constraints.max.contagion"),
    ({"constraints": {"max": {"unknown": 3}}}, "constraints.max.unknown"),
    ({"constraints": {"max_premature_share": 0.5, "max": {"premature_share": 0.4}}},
     "constraints.max.premature_share"),
    ({"objectives": {"appetite_on": "procyclicality"}}, "objectives.appetite_on"),
    ({"objectives": {"minimize": ["capital_cost", "procyclicality"]},
      "risk_appetite_bps": 5}, "risk_appetite_bps"),
])
def test_bad_metric_names_are_refused_naming_the_field(patch: dict[str, Any],
                                                       field: str) -> None:
    """Unknown, repeated or unavailable metrics (contagion on one instrument), a bound given
    twice and an appetite on no objective are refused before any data is read."""
    raw = {"data": [{"instrument": "A", "ref": "a.csv"}], "model": "ewma", **patch}
    with pytest.raises(InvalidParameters) as caught:
        decode_spec(json.dumps(raw))
    assert caught.value.field == field
    if "contagion" in json.dumps(patch):
        assert "two instruments" in str(caught.value)


def test_metrics_read_the_evaluations_own_evidence(root: Path) -> None:
    """Each registered metric equals the figure computed here from the evaluation's
    coverage and liquidation records (sums over instruments written out by hand)."""
    spec = btc_spec(objectives={"minimize": ["capital_cost", "insolvency_bps",
                                             "liquidations_at_risk", "premature_share",
                                             "procyclicality"]})
    prepared = prepare(spec, root)
    params = {"decay": 0.95, "floor_rate": 0.016, "confidence": 0.99, "apc_buffer": 0.5,
              "warmup_bars": 300, "horizon_bars": 2}
    result = evaluate(prepared, params)
    head = result.liquidation["BTCUSDT"][0]
    assert head.window == "all"
    assert result.objective("insolvency_bps") == pytest.approx(
        head.bad_debt_usd / head.notional_opened_usd * 1e4)
    assert result.objective("liquidations_at_risk") == pytest.approx(
        head.liquidations / head.positions)
    assert result.objective("premature_share") == pytest.approx(
        head.premature_liquidations / head.liquidations)
    assert result.objective("procyclicality") == pytest.approx(
        result.coverage["BTCUSDT"][0].max_increase_ratio)
    # Capital: the mean IM rate over the bars with a margin, for a notional-free model.
    from calibration.models import make_model

    model = make_model("ewma", params).with_horizon(2)
    rates = model.margin_rates(prepared.in_sample[0])
    assert result.objective("capital_cost") == pytest.approx(
        float(np.nanmean(rates.im_rate[rates.first_valid_bar:])))
    assert 0 < result.objective("liquidations_at_risk") < 1


def test_contagion_is_the_account_engines_healthy_leg_count(root: Path) -> None:
    """On BTC and ETH, ``contagion`` is the cross-margin engine's healthy-leg liquidations
    for the seeded population, called here directly."""
    from calibration.accounts import (
        AccountConfig,
        Market,
        PopulationSpec,
        generate_population,
        simulate_accounts,
    )
    from calibration.models import make_model

    data = [{"instrument": "BTCUSDT", "ref": BTC, "start": "2022-10-01", "end": "2022-12-31"},
            {"instrument": "ETHUSDT", "ref": ETH, "start": "2022-10-01", "end": "2022-12-31"}]
    spec = btc_spec(data=data, objectives={"minimize": ["capital_cost", "contagion"]})
    prepared = prepare(spec, root)
    params = {"decay": 0.95, "floor_rate": 0.016, "confidence": 0.99, "apc_buffer": 0.5,
              "warmup_bars": 300, "horizon_bars": 2}
    result = evaluate(prepared, params)
    model = make_model("ewma", params).with_horizon(2)
    market = Market.from_series(prepared.in_sample)
    accounts = generate_population(
        PopulationSpec(seed=spec.seed, entry_every_bars=48), instruments=market.instruments,
        timestamp_ms=market.timestamp_ms, close=market.matrix("close"),
        first_bar=model.first_valid_bar())
    direct = simulate_accounts(market, model, accounts,
                               AccountConfig(mode="cross", holding_bars=7 * 48,
                                             latency_bars=1))
    assert result.objective("contagion") == direct.summary()["healthy_leg_liquidations"]


def _trial(number: int, values: list[float]) -> optuna.trial.FrozenTrial:
    trial = create_trial(values=values, params={"x": 0.5},
                         distributions={"x": FloatDistribution(0, 1)}, state=TrialState.COMPLETE)
    trial.number = number
    return trial


def test_recommendation_rule_over_three_objectives() -> None:
    """Cheapest on the first objective within the appetite on the named one, ties by the
    others in order; with none within, the least of the appetite's objective."""
    names = ("capital_cost", "insolvency_bps", "liquidations_at_risk")
    front = [_trial(0, [0.02, 9.0, 0.1]), _trial(1, [0.03, 4.0, 0.3]),
             _trial(2, [0.03, 4.0, 0.2]), _trial(3, [0.05, 1.0, 0.05])]
    # Within 5 bps: trials 1 and 2 tie on cost and insolvency; the third objective decides.
    chosen, within = recommended_trial(front, 5.0, objectives=names)
    assert (chosen.number if chosen else None, within) == (2, True)
    # No appetite: the cheapest of all.
    chosen, within = recommended_trial(front, None, objectives=names)
    assert (chosen.number if chosen else None, within) == (0, True)
    # Appetite on the third objective, in its units (fraction of positions).
    chosen, within = recommended_trial(front, 0.15, objectives=names,
                                       appetite_on="liquidations_at_risk")
    assert (chosen.number if chosen else None, within) == (0, True)
    # Nothing within 0.5 bps: the least insolvency.
    chosen, within = recommended_trial(front, 0.5, objectives=names)
    assert (chosen.number if chosen else None, within) == (3, False)


@pytest.fixture
def scratch_metric() -> Iterator[str]:
    """A metric registered for one test (and removed after it)."""
    def peak_im(b: Any) -> float:
        return max(float(np.nanmax(b.model.margin_rates(bars).im_rate)) for bars in b.bars)

    register(Metric("peak_im_rate", "fraction of notional", "minimize",
                    "the largest IM rate of the span", peak_im, needs_liquidation=False))
    yield "peak_im_rate"
    del METRICS["peak_im_rate"]


def test_a_new_metric_is_one_registration(root: Path, scratch_metric: str) -> None:
    """A metric registered once is accepted as an objective and as a constraint, and its
    constraint value is its value minus the bound."""
    spec = btc_spec(objectives={"minimize": ["capital_cost", scratch_metric]},
                    constraints={"kupiec_alpha": None, "no_red_in_stress_windows": False,
                                 "max_premature_share": None, "max": {scratch_metric: 0.2}})
    prepared = prepare(spec, root)
    params = {"decay": 0.95, "floor_rate": 0.016, "confidence": 0.99, "apc_buffer": 0.5,
              "warmup_bars": 300, "horizon_bars": 2}
    result = evaluate(prepared, params)
    assert result.names == ("capital_cost", scratch_metric)
    assert result.constraints[scratch_metric] == pytest.approx(
        result.objective(scratch_metric) - 0.2)


def _dominated_within(point: tuple[float, ...], front: list[tuple[float, ...]],
                      slack: tuple[float, ...]) -> bool:
    return any(all(f <= p + s for f, p, s in zip(fp, point, slack, strict=True))
               for fp in front)


@pytest.mark.slow
def test_three_objective_front_covers_an_exhaustive_grid(root: Path) -> None:
    """Capital, insolvency and liquidations at risk on real BTC bars, bounded liquidations:
    every feasible point of a 4 × 4 grid over the same space is dominated by (or equal
    within 5 % of the grid's spread) a Pareto point, and the recommendation is the cheapest
    front point within the appetite, naming the constraints that bind."""
    appetite = 0.5
    bound = 0.45
    spec = btc_spec(objectives={"minimize": THREE},
                    constraints={"kupiec_alpha": None, "no_red_in_stress_windows": False,
                                 "max_premature_share": None,
                                 "max": {"liquidations_at_risk": bound}},
                    risk_appetite_bps=appetite)
    prepared = prepare(spec, root)
    result = calibrate(spec, root=root, prepared=prepared)
    front = [tuple(p.objectives[n] for n in THREE) for p in result.pareto_front]
    assert front
    assert all(len(set(p.objectives)) == 3 for p in result.pareto_front)
    fixed = {"confidence": 0.99, "apc_buffer": 0.5, "warmup_bars": 300, "horizon_bars": 2}
    grid = [evaluate(prepared, {"decay": decay, "floor_rate": floor, **fixed})
            for decay, floor in itertools.product(DECAYS, FLOORS)]
    values = np.array([[e.objective(n) for n in THREE] for e in grid if not e.pruned])
    slack = tuple(SPREAD_TOL * (values.max(axis=0) - values.min(axis=0)))
    feasible = [tuple(e.objective(n) for n in THREE) for e in grid
                if not e.pruned and e.feasible]
    assert len(feasible) >= 6, "too few feasible grid points to say anything"
    for point in feasible:
        assert _dominated_within(point, front, slack), (point, slack)
    rec = result.recommendation
    assert rec is not None
    assert rec.feasible
    assert rec.objectives["liquidations_at_risk"] <= bound
    within = [p for p in front if p[1] <= appetite]
    assert within, "no front point within the appetite"
    cheapest = min(within)
    assert rec.objectives["capital_cost"] == pytest.approx(cheapest[0])
    assert rec.within_risk_appetite
    binding = [k for k, v in rec.constraints.items() if v > -0.05]
    assert rec.binding_constraints == binding


def test_pareto_table_shows_the_specs_own_objectives_with_their_units() -> None:
    """A front of other objectives than the two defaults is shown under their names and
    units (fractions as %), not as empty capital-cost / insolvency columns."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from calibration._summary import _pareto_table
    from calibration.calibrate._recommend import ParetoPoint

    point = ParetoPoint(trial=3, params={"x": 1.0}, capital_cost=None, insolvency_bps=None,
                        objectives={"portfolio_capital_cost": 0.0216486,
                                    "account_bad_debt_bps": 9.7129})
    result = SimpleNamespace(pareto_front=[point], recommendation=SimpleNamespace(trial=3))
    table, _ = _pareto_table(result)  # type: ignore[arg-type]
    out = io.StringIO()
    table.print(Console(file=out, width=80))
    text = out.getvalue()
    assert "portfolio" in text
    assert "% of gross" in text
    assert "bps of" in text
    assert "mean IM" not in text
    row = next(line for line in text.splitlines() if "3*" in line)
    assert row.split()[2:4] == ["2.165", "9.713"]
