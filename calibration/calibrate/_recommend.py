"""Reading a study: its Pareto front, the recommendation and the result's record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import optuna
from optuna.trial import FrozenTrial, TrialState

from calibration._version import ENGINE_VERSION
from calibration.calibrate import _evaluate
from calibration.calibrate._evaluate import OBJECTIVE_NAMES, trial_metrics
from calibration.calibrate._objectives import METRICS, appetite_objective, objective_names
from calibration.calibrate._prepare import Prepared
from calibration.calibrate._study import _params_of
from calibration.spec import CalibrationSpec, spec_hash


def recommended_trial(front: Sequence[FrozenTrial], risk_appetite_bps: float | None, *,
                      objectives: Sequence[str] = OBJECTIVE_NAMES,
                      appetite_on: str | None = "insolvency_bps",
                      ) -> tuple[FrozenTrial | None, bool]:
    """The recommendation among feasible Pareto trials (domain.md §5; issue 14), and whether
    it is within the risk appetite.

    The cheapest trial (the first objective, ties by the others in order) whose
    ``appetite_on`` objective is within ``risk_appetite_bps`` (in that objective's units;
    any trial when either is ``None``); when none is, the one with the least of that
    objective (ties by the others). ``(None, False)`` for an empty front. ``summarize`` and
    the progress displays both choose by this, so "best so far" is what the result would
    recommend. ``objectives`` are the trials' values' names, in order.
    """
    metrics = [METRICS[n] for n in objectives]

    def rank(t: FrozenTrial) -> tuple[float, ...]:
        return tuple(m.oriented(v) for m, v in zip(metrics, t.values, strict=True))

    ordered = sorted(front, key=rank)
    if not ordered:
        return None, False
    if risk_appetite_bps is None or appetite_on is None or appetite_on not in objectives:
        return ordered[0], True
    at = list(objectives).index(appetite_on)
    limit = metrics[at].oriented(risk_appetite_bps)
    for t in ordered:
        if rank(t)[at] <= limit:
            return t, True
    return min(ordered, key=lambda t: rank(t)[at]), False


def _objective_record(names: Sequence[str], values: Sequence[float]) -> dict[str, Any]:
    """``objectives`` by name, and the default two by their own keys when present (what
    progress displays and older readers look up)."""
    named = dict(zip(names, (float(v) for v in values), strict=True))
    record: dict[str, Any] = {k: named[k] for k in OBJECTIVE_NAMES if k in named}
    record["objectives"] = named
    return record


def best_feasible(study: optuna.Study,
                  risk_appetite_bps: float | Literal["study"] | None = "study",
                  ) -> dict[str, Any] | None:
    """What the recommendation would be if the study stopped now (for progress displays):
    ``{"trial", "capital_cost", "insolvency_bps", "objectives", "within_risk_appetite"}``
    (the first two when they are objectives), or ``None`` while no trial is feasible.

    ``risk_appetite_bps`` defaults to the appetite of the spec stored on the study.
    """
    stored = study.user_attrs.get("spec") or {}
    if isinstance(risk_appetite_bps, str):  # "study"
        risk_appetite_bps = stored.get("risk_appetite_bps")
    names = tuple(study.metric_names or OBJECTIVE_NAMES)
    appetite_on = (stored.get("objectives") or {}).get("appetite_on") or "insolvency_bps"
    best, within = recommended_trial(study.best_trials, risk_appetite_bps, objectives=names,
                                     appetite_on=appetite_on)
    if best is None or best.values is None:
        return None
    return {"trial": best.number, **_objective_record(names, best.values),
            "within_risk_appetite": within}


class ParetoPoint(msgspec.Struct, frozen=True, kw_only=True):
    """A feasible non-dominated trial.

    Attributes:
        trial: Optuna trial number.
        params: the trial's parameters, each in its own units.
        capital_cost: notional-weighted mean IM rate (fraction of notional); null when
            it is not an objective.
        insolvency_bps: the insolvency objective (bps of notional); null when it is not an
            objective.
        objectives: every objective by name, each in its metric's units.
    """

    trial: int
    params: dict[str, Any]
    capital_cost: float | None
    insolvency_bps: float | None
    objectives: dict[str, float] = {}


class Recommendation(msgspec.Struct, frozen=True, kw_only=True):
    """The recommended parameters and the evidence behind them.

    ``feasible`` says whether every constraint holds; ``within_risk_appetite`` whether the
    insolvency is within the spec's appetite. When nothing is feasible this is the closest
    trial (smallest total violation) and ``binding_constraints`` are the violated ones.
    ``capital_cost`` in ``objectives`` is the notional-weighted mean IM rate as a fraction
    of notional (0.05 = 5%, 20x leverage); ``insolvency_bps`` is in basis points of notional.
    ``notes`` are what an operator must read before acting (e.g. leverage below 2x).

    Attributes:
        trial: Optuna trial number.
        params: the recommended parameters, each in its own units.
        feasible: every constraint holds.
        within_risk_appetite: insolvency within ``risk_appetite_bps``.
        objectives: ``capital_cost`` (fraction of notional) and ``insolvency_bps`` (bps).
        constraints: each constraint's value (feasible when <= 0, in its own units).
        binding_constraints: constraints at or over their bound.
        in_sample: coverage and liquidation evidence on the in-sample span.
        out_of_sample: the same per out-of-sample fold.
        change_vs_published: per parameter ``published``, ``recommended`` and ``change``
            (parameter units); null without published parameters.
        explanation: one sentence on why this trial.
        notes: warnings an operator must read.
        regimes: instrument → evidence per volatility regime over the whole span
            (domain.md §11): per ``calm``/``normal``/``turbulent`` tercile of trailing
            one-day volatility its bars, coverage per side (observations, breaches,
            breach rate, traffic light), liquidations triggered and their bad debt (USD),
            and the correlation between volatility and margin calls (liquidation triggers
            per bar).
        accounts: with an accounts section, the account-level evidence of the whole span
            (``whole_span``: the replay's figures, every haircut and portfolio coverage row,
            overall, per stress window and per fold, and the parameters in force) and per
            out-of-sample fold (``out_of_sample``); the in-sample evidence is
            ``in_sample["accounts"]``.
    """

    trial: int
    params: dict[str, Any]
    feasible: bool
    within_risk_appetite: bool
    objectives: dict[str, float]
    constraints: dict[str, float]
    binding_constraints: list[str]
    in_sample: dict[str, Any]
    out_of_sample: dict[str, Any]
    change_vs_published: dict[str, dict[str, float]] | None
    explanation: str
    notes: list[str] = []
    regimes: dict[str, Any] = {}
    accounts: dict[str, Any] = {}


class CalibrationResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a calibration returns (the CLI's ``--json`` and the API's result).

    ``horizon_bars`` is the close-out horizon every trial sized its margin for and tested
    over, in bars of ``bar_seconds``; ``horizon`` is the duration it spans. ``workers`` is
    how many worker processes ran the study's trials. ``reproducible`` says whether the
    record alone (spec, data fingerprints, seed, engine) reproduces the result: with a trial
    count rather than a time budget, no failed (retried) trial, and either one worker or
    ``batch_size`` (reproducible batches) — without batches several workers interleave their
    trials in an order no record fixes;
    ``reproducibility`` says why (not).

    Attributes:
        study: Optuna study name.
        storage: the study storage, credentials and server paths redacted by the service.
        model: margin model family.
        spec_hash: sha256 of the canonical spec (hex).
        seed: sampler seed.
        engine_version: marginlab engine version.
        data_fingerprints: instrument → sha256 of its bars (hex).
        trials: trial counts by state (``complete``, ``pruned``, ``fail``, ...).
        sampler: the Optuna sampler used.
        recommendation: the recommended trial (null: no trial finished).
        pareto_front: feasible non-dominated trials.
        horizon_bars: close-out horizon (bars).
        horizon: close-out horizon as a duration (``1h``).
        bar_seconds: bar size (s).
        workers: worker processes that ran trials (count).
        reproducible: the record alone reproduces the result.
        reproducibility: why it does (not).
    """

    study: str
    storage: str
    model: str
    spec_hash: str
    seed: int
    engine_version: str
    data_fingerprints: dict[str, str]
    trials: dict[str, int]
    sampler: str
    recommendation: Recommendation | None
    pareto_front: list[ParetoPoint]
    horizon_bars: int
    horizon: str
    bar_seconds: int
    workers: int
    reproducible: bool
    reproducibility: str


#: A constraint within this of its bound (in its own units) is reported as binding.
BINDING_TOLERANCE = 0.05


def summarize(study: optuna.Study, prepared: Prepared, storage_url: str) -> CalibrationResult:
    """Pareto front and recommendation of a finished (or stopped) study."""
    spec = prepared.spec
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    names = objective_names(spec)
    appetite_on = appetite_objective(spec)
    chosen, within = recommended_trial(study.best_trials, spec.risk_appetite_bps,
                                       objectives=names, appetite_on=appetite_on)
    metrics = [METRICS[n] for n in names]
    front = sorted(study.best_trials, key=lambda t: tuple(
        m.oriented(v) for m, v in zip(metrics, t.values, strict=True)))
    space = prepared.space
    pareto = []
    for t in front:
        named = dict(zip(names, (float(v) for v in t.values), strict=True))
        pareto.append(ParetoPoint(trial=t.number, params=_params_of(t, space),
                                  capital_cost=named.get("capital_cost"),
                                  insolvency_bps=named.get("insolvency_bps"),
                                  objectives=named))
    appetite = spec.risk_appetite_bps
    explanation = ""
    cheapest = "cheapest" if names[0] == "capital_cost" else f"least {names[0]}"
    if chosen is not None and within:
        bound = ""
        if appetite is not None and appetite_on is not None:
            bound = (" with insolvency" if appetite_on == "insolvency_bps"
                     else f" with {appetite_on}") + f" ≤ {appetite:g}"
            bound += " bps" if appetite_on == "insolvency_bps" else ""
        explanation = f"{cheapest} feasible Pareto point" + bound
    elif chosen is not None:
        least = "insolvency" if appetite_on == "insolvency_bps" else appetite_on
        unit = " bps" if appetite_on == "insolvency_bps" else ""
        explanation = (f"no feasible point is within the risk appetite of {appetite:g}{unit}; "
                       f"this is the feasible point with the least {least}")
    else:
        scored = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                  and t.constraints]
        if scored:
            chosen = min(scored, key=lambda t: sum(max(0.0, v) for v in t.constraints.values()))
            explanation = ("no trial satisfies every constraint; this is the closest trial "
                           "(smallest total violation)")
    recommendation = None
    if chosen is not None:
        recommendation = _recommend(chosen, prepared, explanation)
    workers, reproducible, why = _reproducibility(trials, spec)
    return CalibrationResult(
        study=study.study_name, storage=storage_url, model=spec.model,
        spec_hash=spec_hash(spec), seed=spec.seed, engine_version=ENGINE_VERSION,
        data_fingerprints=prepared.fingerprints, trials=counts,
        sampler=type(study.sampler).__name__, recommendation=recommendation,
        pareto_front=pareto, horizon_bars=prepared.horizon.bars,
        horizon=prepared.horizon.duration, bar_seconds=prepared.horizon.bar_seconds,
        workers=workers, reproducible=reproducible, reproducibility=why,
    )


def _reproducibility(trials: Sequence[FrozenTrial], spec: CalibrationSpec
                     ) -> tuple[int, bool, str]:
    """``(workers, reproducible, why)`` of a study from its trials' recorded workers."""
    seen = set()
    numerics = set()
    for t in trials:
        metrics = trial_metrics(t)
        if metrics is not None and "worker" in metrics:
            seen.add(metrics["worker"])
        if metrics is not None and "numerics" in metrics:
            numerics.add(metrics["numerics"])
    workers = len(seen)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    if len(numerics) > 1:
        # Machines (or upgrades) with other numeric libraries: the same set can score
        # differently in its last bits, and so steer the sampler elsewhere.
        return workers, False, (f"trials ran under {len(numerics)} different numeric library "
                                "versions (" + "; ".join(sorted(numerics)) + "): the same "
                                "parameters need not give the same numbers on each")
    under = f" (under {next(iter(numerics))})" if numerics else ""
    if spec.batch_size is not None and spec.timeout_seconds is None and not failed:
        return workers, True, (f"reproducible batches of {spec.batch_size}: each proposed from "
                               "the earlier batches only, so any number of workers gives the "
                               f"same trials, front and recommendation{under}")
    if workers > 1:
        return workers, False, (f"{workers} workers ran the trials: their order, and so what "
                                "the sampler proposed, depends on timing")
    if spec.timeout_seconds is not None:
        return workers, False, ("a time budget stops the study: how many trials run depends "
                                "on the machine")
    if failed:
        return workers, False, f"{failed} trial(s) failed and were retried"
    return workers, True, ("one worker, a fixed trial count and a seed: a re-run gives the "
                           f"same{under}")


def _recommend(trial: FrozenTrial, prepared: Prepared, explanation: str) -> Recommendation:
    spec = prepared.spec
    params = _params_of(trial, prepared.space)
    in_sample_eval = _evaluate.evaluate(prepared, params, prune_hopeless=False, evidence=True)
    full_eval = _evaluate.evaluate(prepared, params, full=True)
    constraints = in_sample_eval.constraints
    feasible = in_sample_eval.feasible
    if feasible:
        binding = [k for k, v in constraints.items() if v > -BINDING_TOLERANCE]
    else:
        binding = [k for k, v in constraints.items() if v > 0]
    names = in_sample_eval.names
    objectives = dict(zip(names, in_sample_eval.objectives, strict=True))
    capital = objectives.get("capital_cost")
    appetite = spec.risk_appetite_bps
    appetite_on = appetite_objective(spec)
    fold_names = [f.name for f in prepared.folds]
    oos: dict[str, Any] = {}
    for inst, metrics in full_eval.coverage.items():
        liq = {m.window: m for m in full_eval.liquidation.get(inst, [])}
        for m in metrics:
            if m.window in fold_names:
                oos.setdefault(m.window, {})[inst] = msgspec.to_builtins(
                    {"coverage": m, "liquidation": liq.get(m.window)})
    accounts: dict[str, Any] = {}
    if full_eval.accounts:
        # The account-level evidence of each fold: the rows of the whole-span evaluation
        # whose window is the fold (accounts entered in it, observations meeting it).
        accounts = {"whole_span": full_eval.accounts, "out_of_sample": {
            fold: {part: [r for r in rows if r["window"] == fold]
                   for part, rows in full_eval.accounts.items()
                   if part in ("replay", "haircut_coverage", "portfolio_coverage")}
            for fold in fold_names}}
    change = None
    if spec.published is not None:
        change = {}
        for name, old in spec.published.params.items():
            new = params.get(name, old)
            if isinstance(old, int | float) and isinstance(new, int | float):
                change[name] = {"published": float(old), "recommended": float(new),
                                "change": float(new) - float(old)}
    notes = []
    if capital is not None and capital > 0.5:
        notes.append(f"implies leverage below 2x: mean IM {capital:.1%} of notional "
                     f"(at most {1 / capital:.2f}x)")
    capped = sum(m.capped_bars for ms in in_sample_eval.coverage.values() for m in ms[:1])
    if capped:
        notes.append(f"{capped} in-sample observation bars had their margin capped at "
                     "max_rate")
    return Recommendation(
        trial=trial.number, params=params, feasible=feasible, notes=notes,
        within_risk_appetite=(appetite is None or appetite_on is None or METRICS[
            appetite_on].oriented(objectives[appetite_on]) <= METRICS[appetite_on].oriented(
                appetite)),
        objectives=objectives,
        constraints=constraints, binding_constraints=binding,
        in_sample=in_sample_eval.summary(), out_of_sample=oos,
        change_vs_published=change, explanation=explanation, regimes=full_eval.regimes,
        accounts=accounts,
    )
