"""Backtest one parameter set: its objectives, constraints and evidence (``evaluate``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from optuna.trial import FrozenTrial

from calibration._bars import BarSeries
from calibration._errors import MarginlabError
from calibration.batch import BATCH_FAMILIES, coverage_of_models
from calibration.calibrate._accounts import AccountEvaluation, split_params
from calibration.calibrate._objectives import (
    DEFAULT_OBJECTIVES,
    METRICS,
    Backtested,
    metric_bounds,
    objective_names,
)
from calibration.calibrate._prepare import Prepared
from calibration.calibrate._regimes import regime_evidence, worst_red_margin
from calibration.coverage import coverage_backtest
from calibration.liquidation import shared_insurance_fund, simulate_liquidations
from calibration.margins import MarginSeries
from calibration.models import EwmaMargin, MarginModel, make_model
from calibration.publishing import guardrail_constraint
from calibration.report import CoverageMetrics, LiquidationMetrics
from calibration.stats import binomial_cdf

#: The default objectives (a spec names others in ``objectives.minimize``).
OBJECTIVE_NAMES = DEFAULT_OBJECTIVES
#: Traffic-light red threshold of the Basel binomial CDF.
_RED = 0.9999


@dataclass(frozen=True)
class Evaluation:
    """One parameter set backtested.

    Attributes:
        objectives: the spec's objectives' values, in ``names``' order (each in its
            metric's units; ``(capital_cost, insolvency_bps)`` by default).
        constraints: name → value, feasible when ≤ 0.
        coverage: instrument → coverage metrics (whole span first, then windows).
        liquidation: instrument → liquidation metrics (same order).
        pruned: why the liquidation simulation was skipped, if it was.
        names: the objectives' names (``objective_names(spec)``).
        regimes: instrument → evidence per volatility regime (``regime_evidence``), on
            full evaluations only.
        accounts: the account-level evidence (``AccountEvaluation.evidence``: the replay's
            figures, haircut and portfolio coverage rows, whole span and each window), on
            evaluations asked for evidence only.
    """

    objectives: tuple[float, ...]
    constraints: dict[str, float]
    coverage: dict[str, list[CoverageMetrics]]
    liquidation: dict[str, list[LiquidationMetrics]]
    pruned: str | None = None
    names: tuple[str, ...] = OBJECTIVE_NAMES
    regimes: dict[str, Any] = field(default_factory=dict)
    accounts: dict[str, Any] = field(default_factory=dict)

    def objective(self, name: str) -> float:
        """One objective's value by name (``capital_cost``)."""
        return self.objectives[self.names.index(name)]

    @property
    def feasible(self) -> bool:
        """All constraints ≤ 0."""
        return all(v <= 0 for v in self.constraints.values())

    def summary(self) -> dict[str, Any]:
        """JSON-ready metrics (stored on the trial, shown in results)."""
        summary: dict[str, Any] = msgspec.to_builtins({
            "objectives": dict(zip(self.names, self.objectives, strict=True)),
            "constraints": self.constraints,
            "coverage": self.coverage,
            "liquidation": self.liquidation,
            "pruned": self.pruned,
        })
        if self.accounts:  # only with an accounts section: older summaries unchanged
            summary["accounts"] = msgspec.to_builtins(self.accounts)
        return summary

    def summary_json(self) -> str:
        """``summary()`` as compact JSON text (how it is stored on a trial)."""
        return msgspec.json.encode(self.summary()).decode()


#: The one constraint stored on a trial (see ``violation``).
VIOLATION_KEY = "violation"


def violation(constraints: Mapping[str, float]) -> float:
    """The constraints as one value with the same feasibility and the same measure of
    infeasibility: the sum of the violated ones (> 0), which is what NSGA-II and TPE rank
    infeasible trials by, or else the largest (≤ 0).

    A trial stores this one value with ``trial.set_constraint`` rather than one constraint
    per rule: each is a storage write (a journal append with fsync, ~0.3–1.5 ms here), and
    the named values are in the trial's metrics (``trial_metrics(t)["constraints"]``).
    """
    worst = max(constraints.values())
    if worst <= 0:
        return float(worst)
    return float(sum(v for v in constraints.values() if v > 0))


#: Trial user attribute holding ``Evaluation.summary_json()``. Text, not a nested dict:
#: Optuna deep-copies a trial on ``tell`` and on every copying read, and a 30–40 KB nested
#: summary (five instruments × windows) cost ~3 ms a copy; a string is copied by reference.
METRICS_ATTR = "metrics_json"


def trial_metrics(trial: FrozenTrial) -> dict[str, Any] | None:
    """A trial's stored evaluation summary (``Evaluation.summary()``), or ``None``."""
    raw = trial.user_attrs.get(METRICS_ATTR)
    if raw is None:
        legacy: dict[str, Any] | None = trial.user_attrs.get("metrics")
        return legacy
    decoded: dict[str, Any] = msgspec.json.decode(raw)
    return decoded


def evaluate(
    prepared: Prepared,
    params: Mapping[str, Any],
    *,
    full: bool = False,
    prune_hopeless: bool = True,
    evidence: bool | None = None,
    coverage: Mapping[str, list[CoverageMetrics]] | None = None,
) -> Evaluation:
    """Backtest one parameter set: objectives, constraints and metrics.

    Args:
        prepared: the data and settings.
        params: the model's public hyperparameters.
        full: evaluate on the whole span with the out-of-sample folds as extra windows (for
            the recommendation) instead of the in-sample bars only (for trials).
        prune_hopeless: skip the liquidation simulation when the coverage test is red over
            the whole in-sample span (the margin misses far more than allowed everywhere).
            Not with an accounts section: an account-level search may keep the model fixed.
        evidence: add the account-level evidence (``Evaluation.accounts``); default: on
            full evaluations.
        coverage: this set's coverage metrics on the bars it is evaluated on, already
            computed (``batch_coverage``: several trials' in one pass); default: computed
            here. The margin series are then computed only if something reads them (the
            liquidation replay of a trial that is not pruned, the capital cost).
    """
    spec = prepared.spec
    _, account_params = split_params(params)
    model = _model_of(prepared, params)
    bars_list = prepared.full if full else prepared.in_sample
    windows = prepared.stress_windows + (prepared.folds if full else ())
    accounts = None
    if prepared.accounts is not None:
        accounts = AccountEvaluation(prepared.accounts, model, bars_list, account_params,
                                     prepared.liquidation, prepared.horizon.bars, windows)
    # One margin series per instrument for every consumer: coverage, liquidations, capital
    # cost and the regime evidence read the same rates, computed once.
    margins = {b.instrument: MarginSeries(model, b) for b in bars_list}
    if coverage is None:
        coverage = {b.instrument: coverage_backtest(b, model, prepared.coverage, windows,
                                                    margins=margins[b.instrument])
                    for b in bars_list}
    else:
        coverage = dict(coverage)
    constraints: dict[str, float] = {}
    c = spec.constraints
    overall = [(m[0].long, m[0].short) for m in coverage.values()]
    sides = [s for pair in overall for s in pair]
    if c.kupiec_alpha is not None:
        # One-sided test of "too many breaches" at its nominal size (domain.md §3); a side
        # with fewer breaches than expected has a p-value above 0.5 and cannot fail.
        worst = -1.0
        for s in sides:
            if s.kupiec_pvalue_one_sided is not None:
                worst = max(worst, c.kupiec_alpha - s.kupiec_pvalue_one_sided)
        constraints["kupiec"] = worst
    if c.no_red_in_stress_windows and prepared.stress_windows:
        stress_names = {w.name for w in prepared.stress_windows}
        worst = -_RED
        for metrics in coverage.values():
            for m in metrics:
                if m.window not in stress_names:
                    continue
                for s in (m.long, m.short):
                    if s.observations:
                        f = binomial_cdf(s.breaches, s.observations, s.expected_breach_rate)
                        worst = max(worst, f - _RED)
        # Scaled so that "one breach too many" is of order one.
        constraints["traffic_light_red"] = worst * 1e4
    if c.no_red_light_in_any_regime:
        # Coverage only: the trial's regime evidence without the liquidation replay.
        worst = -1.0
        for b in bars_list:
            regime = _regimes_of(prepared, margins[b.instrument], b, coverage[b.instrument])
            worst = max(worst, worst_red_margin(regime))
        constraints["red_light_in_regime"] = worst * 1e4
    bounds = metric_bounds(spec)
    partial = Backtested(prepared, model, bars_list, coverage, {}, margins, accounts)
    for name, bound in bounds.items():
        if not METRICS[name].needs_liquidation:
            metric = METRICS[name]
            constraints[name] = metric.oriented(metric.compute(partial)) - metric.oriented(bound)
    if spec.published is not None and spec.published.max_change:
        # Publishing's own rule on effective parameters (the trial's horizon included), so
        # a recommendation inside this constraint is inside the publish guardrails too.
        published, _ = split_params(spec.published.params)
        model_steps, account_steps = split_params(spec.published.max_change)
        worst = -1.0
        if model_steps:
            worst = guardrail_constraint(spec.model, published, model.get_params(),
                                         model_steps, bar_seconds=prepared.horizon.bar_seconds)
        if account_steps and accounts is not None:
            # each account-level key under its kind's publishing rule, from the value in
            # force to the trial's (the schedule's ratio after its running minimum)
            worst = max(worst, accounts.guardrail(spec, spec.published.params, account_steps))
        constraints["guardrail"] = worst
    names = objective_names(spec)
    hopeless = (prune_hopeless and not full and spec.accounts is None
                and any(s.traffic_light == "red" for s in sides))
    liquidation: dict[str, list[LiquidationMetrics]] = {}
    account_evidence: dict[str, Any] = {}
    want_evidence = full if evidence is None else evidence
    if accounts is not None and spec.accounts is not None and want_evidence:
        account_evidence = accounts.evidence()
    if hopeless:
        for name in bounds:
            if METRICS[name].needs_liquidation:
                constraints[name] = 1.0
        return Evaluation(tuple(math.inf for _ in names), constraints, coverage, liquidation,
                          pruned="coverage red over the whole in-sample span",
                          names=names)
    if spec.accounts is not None and not want_evidence and not any(
            METRICS[n].needs_liquidation for n in (*names, *bounds)):
        # A trial of an account-level calibration that reads no position figure: no
        # position replay (the recommendation's evidence still has it).
        done = Backtested(prepared, model, bars_list, coverage, {}, margins, accounts)
        return Evaluation(tuple(METRICS[n].compute(done) for n in names), constraints,
                          coverage, {}, names=names, accounts=account_evidence)
    results = [simulate_liquidations(b, model, prepared.liquidation,
                                     margins=margins[b.instrument]) for b in bars_list]
    # The instruments of a spec share the venue's one insurance fund (domain.md §4).
    fund = shared_insurance_fund(results)
    for b, result in zip(bars_list, results, strict=True):
        ts = b.timestamp_ms
        liq_metrics = [result.metrics("all", None, None, fund)]
        liq_metrics += [result.metrics(w.name, w.start_ms, w.end_ms, fund) for w in windows
                        if w.start_ms <= int(ts[-1]) and w.end_ms > int(ts[0])]
        liquidation[b.instrument] = liq_metrics
    regimes: dict[str, Any] = {}
    if full:
        for b, result in zip(bars_list, results, strict=True):
            table = result.position_table()
            regimes[b.instrument] = _regimes_of(prepared, margins[b.instrument], b,
                                                coverage[b.instrument], table.trigger_bar,
                                                table.bad_debt_usd)
    done = Backtested(prepared, model, bars_list, coverage, liquidation, margins, accounts)
    for name, bound in bounds.items():
        if METRICS[name].needs_liquidation:
            metric = METRICS[name]
            constraints[name] = metric.oriented(metric.compute(done)) - metric.oriented(bound)
    objectives = tuple(METRICS[name].compute(done) for name in names)
    return Evaluation(objectives, constraints, coverage, liquidation, names=names,
                      regimes=regimes, accounts=account_evidence)


def _model_of(prepared: Prepared, params: Mapping[str, Any]) -> MarginModel:
    """The margin model of a trial's parameters, at the calibration's horizon."""
    model_params, _ = split_params(params)
    return make_model(prepared.spec.model, model_params).with_horizon(prepared.horizon.bars)


def batch_coverage(prepared: Prepared, param_sets: Sequence[Mapping[str, Any]]
                   ) -> list[dict[str, list[CoverageMetrics]] | None]:
    """The in-sample coverage of several trials' parameter sets in one pass over each
    series (``calibration.batch``), for ``evaluate(prepared, params, coverage=...)``.

    Returns one entry per set, in order: instrument → ``coverage_backtest`` metrics (whole
    span, then stress windows), bit for bit what ``evaluate`` computes itself; ``None`` for
    a set left to ``evaluate``: a family without a batch kernel, a model the kernel does not
    run (the liquidity add-on: its margin series is needed per notional anyway), fewer than
    two batchable sets, or any set the batch refuses (bad parameters, too few bars), so that
    each such set fails in its own trial with its own error, as it would one at a time.
    """
    out: list[dict[str, list[CoverageMetrics]] | None] = [None] * len(param_sets)
    if prepared.spec.model not in BATCH_FAMILIES:
        return out
    try:
        models = [_model_of(prepared, p) for p in param_sets]
    except MarginlabError:
        return out
    members = [i for i, m in enumerate(models) if type(m) is EwmaMargin]
    if len(members) < 2:
        return out
    try:
        per_bars = [coverage_of_models(b, [models[i] for i in members],
                                       config=prepared.coverage,
                                       stress_windows=prepared.stress_windows)
                    for b in prepared.in_sample]
    except MarginlabError:
        return out
    for k, i in enumerate(members):
        out[i] = {b.instrument: metrics[k]
                  for b, metrics in zip(prepared.in_sample, per_bars, strict=True)}
    return out


def _regimes_of(prepared: Prepared, margins: MarginSeries, bars: BarSeries,
                coverage: Sequence[CoverageMetrics], trigger_bar: Any = None,
                bad_debt_usd: Any = None) -> dict[str, Any]:
    """``regime_evidence`` of one instrument: the tested (maintenance) margin, the coverage
    test's expected breach rate, a one-day volatility window."""
    rates = margins.rates()
    return regime_evidence(bars, rates.mm_rate, prepared.horizon.bars,
                           coverage[0].long.expected_breach_rate,
                           prepared.liquidation.adv_window_bars, trigger_bar, bad_debt_usd)
