"""Two calibration results side by side, against the published parameters replayed over
the same history (issue 14 item 6): ``marginlab compare A B`` and
``GET /v1/calibrations/{a}/compare/{b}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from calibration.calibrate import _evaluate
from calibration.calibrate._objectives import METRICS, appetite_objective
from calibration.calibrate._prepare import Prepared
from calibration.calibrate._recommend import CalibrationResult, Recommendation


class ComparedSide(msgspec.Struct, frozen=True, kw_only=True):
    """What identifies one of the two results.

    Attributes:
        study: Optuna study name.
        model: margin model family.
        spec_hash: sha256 of the canonical spec (hex).
        data_fingerprints: instrument → sha256 of its bars (hex).
        trial: the recommended trial (null: nothing to recommend).
        feasible: the recommendation satisfies every constraint.
        within_risk_appetite: the recommendation is within its spec's appetite.
        pareto_points: points on the result's Pareto front (count).
    """

    study: str
    model: str
    spec_hash: str
    data_fingerprints: dict[str, str]
    trial: int | None
    feasible: bool
    within_risk_appetite: bool
    pareto_points: int


class PublishedReplay(msgspec.Struct, frozen=True, kw_only=True):
    """The published parameters backtested over the same history as the results.

    Attributes:
        params: the parameters replayed (published values over the spec's fixed ones).
        objectives: in-sample objectives, each in its metric's units.
        constraints: in-sample constraint values (feasible when <= 0, own units).
        feasible: every constraint holds.
        windows: window → instrument → evidence (as ``Comparison.windows``' sides).
    """

    params: dict[str, Any]
    objectives: dict[str, float]
    constraints: dict[str, float]
    feasible: bool
    windows: dict[str, dict[str, dict[str, Any]]]


class Comparison(msgspec.Struct, frozen=True, kw_only=True):
    """Two results side by side, and which to adopt against the published parameters.

    Attributes:
        a: the first result.
        b: the second result.
        same_data: both results ran on the same bars (equal fingerprints).
        params: parameter → ``{"a", "b", "published"}`` (each in its own units; null where
            that side has none).
        objectives: objective → ``{"a", "b", "published"}`` (in-sample, the metric's units).
        windows: window (stress window, ``oos_fold_k``) → instrument → ``{"a", "b",
            "published"}`` evidence: breach rates per side (fraction), traffic lights,
            bad debt (bps of notional opened) and liquidations (count).
        published: the published parameters replayed (null: none to replay).
        recommended: ``a``, ``b`` or ``published``: the cheapest feasible candidate within
            the appetite (the calibration's rule over the three); null: none feasible.
        explanation: why, in one sentence.
    """

    a: ComparedSide
    b: ComparedSide
    same_data: bool
    params: dict[str, dict[str, Any]]
    objectives: dict[str, dict[str, float | None]]
    windows: dict[str, dict[str, dict[str, Any]]]
    published: PublishedReplay | None
    recommended: Literal["a", "b", "published"] | None
    explanation: str


def _side(result: CalibrationResult) -> ComparedSide:
    rec = result.recommendation
    return ComparedSide(
        study=result.study, model=result.model, spec_hash=result.spec_hash,
        data_fingerprints=result.data_fingerprints, trial=None if rec is None else rec.trial,
        feasible=rec is not None and rec.feasible,
        within_risk_appetite=rec is not None and rec.within_risk_appetite,
        pareto_points=len(result.pareto_front))


def _evidence(coverage: Mapping[str, Any], liquidation: Mapping[str, Any] | None
              ) -> dict[str, Any]:
    """One window's figures of one instrument from a coverage and a liquidation record
    (``CoverageMetrics`` / ``LiquidationMetrics`` as builtins)."""
    long, short = coverage["long"], coverage["short"]
    return {
        "breach_rate_long": long.get("breach_rate"), "breach_rate_short": short.get("breach_rate"),
        "traffic_light_long": long.get("traffic_light"),
        "traffic_light_short": short.get("traffic_light"),
        "bad_debt_bps": None if liquidation is None else liquidation.get("bad_debt_bps"),
        "liquidations": None if liquidation is None else liquidation.get("liquidations"),
    }


def _windows_of(in_sample: Mapping[str, Any], out_of_sample: Mapping[str, Any]
                ) -> dict[str, dict[str, dict[str, Any]]]:
    """window → instrument → evidence, from a recommendation's in-sample summary (its
    stress windows; ``all`` is the in-sample span) and out-of-sample folds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    liquidation = in_sample.get("liquidation") or {}
    for inst, metrics in (in_sample.get("coverage") or {}).items():
        liq = {m["window"]: m for m in liquidation.get(inst, [])}
        for m in metrics:
            name = "in_sample" if m["window"] == "all" else m["window"]
            out.setdefault(name, {})[inst] = _evidence(m, liq.get(m["window"]))
    for fold, per_inst in out_of_sample.items():
        for inst, record in per_inst.items():
            out.setdefault(fold, {})[inst] = _evidence(record["coverage"], record["liquidation"])
    return out


def replay_published(prepared: Prepared, published: Mapping[str, Any]) -> PublishedReplay:
    """Backtest ``published`` over the prepared history: in-sample objectives and
    constraints (as a trial), and the whole span's windows and folds (as a recommendation).

    The spec's fixed parameters (its search space's ``value`` entries) fill what
    ``published`` does not name; the close-out horizon is the spec's.
    """
    params = {name: p.value for name, p in prepared.space.items() if p.value is not None}
    params.update(published)
    in_sample = _evaluate.evaluate(prepared, params, prune_hopeless=False)
    full = _evaluate.evaluate(prepared, params, full=True)
    fold_names = {f.name for f in prepared.folds}
    oos: dict[str, Any] = {}
    for inst, metrics in full.coverage.items():
        liq = {m.window: m for m in full.liquidation.get(inst, [])}
        for m in metrics:
            if m.window in fold_names:
                oos.setdefault(m.window, {})[inst] = msgspec.to_builtins(
                    {"coverage": m, "liquidation": liq.get(m.window)})
    return PublishedReplay(
        params=params, objectives=dict(zip(in_sample.names, in_sample.objectives, strict=True)),
        constraints=in_sample.constraints, feasible=in_sample.feasible,
        windows=_windows_of(in_sample.summary(), oos))


def _choose(candidates: Sequence[tuple[str, Mapping[str, float], bool]],
            names: Sequence[str], appetite: float | None, appetite_on: str | None
            ) -> tuple[str | None, str]:
    """The calibration's rule over a handful of candidates ``(label, objectives,
    feasible)``: the cheapest feasible (first objective, ties by the others) within the
    appetite, else the feasible one with the least of the appetite's objective."""
    def oriented(name: str, value: float) -> float:
        metric = METRICS.get(name)
        return value if metric is None else metric.oriented(value)

    def rank(objectives: Mapping[str, float]) -> tuple[float, ...]:
        return tuple(oriented(n, objectives[n]) for n in names)

    feasible = sorted((c for c in candidates if c[2] and all(n in c[1] for n in names)),
                      key=lambda c: rank(c[1]))
    if not feasible:
        return None, "none of a, b and the published parameters satisfies every constraint"
    if appetite is None or appetite_on is None or appetite_on not in names:
        return feasible[0][0], f"the cheapest feasible candidate on {names[0]}"
    limit = oriented(appetite_on, appetite)
    for label, objectives, _ in feasible:
        if oriented(appetite_on, objectives[appetite_on]) <= limit:
            return label, (f"the cheapest feasible candidate on {names[0]} with "
                           f"{appetite_on} within the appetite of {appetite:g}")
    label = min(feasible, key=lambda c: oriented(appetite_on, c[1][appetite_on]))[0]
    return label, (f"no feasible candidate is within the appetite of {appetite:g}; this one "
                   f"has the least {appetite_on}")


def compare_results(a: CalibrationResult, b: CalibrationResult, *,
                    prepared: Prepared | None = None,
                    published: Mapping[str, Any] | None = None) -> Comparison:
    """``a`` and ``b`` side by side; with ``prepared`` (the history to replay over: ``a``'s
    spec's, as a rule) the published parameters replayed too, and a choice among the three.

    Args:
        a, b: two calibration results.
        prepared: the spec and data to replay the published parameters over.
        published: the parameters in force; default: ``prepared.spec.published.params``.
    """
    if published is None and prepared is not None and prepared.spec.published is not None:
        published = prepared.spec.published.params
    replay = None
    if prepared is not None and published:
        replay = replay_published(prepared, published)
    recs: dict[str, Recommendation | None] = {"a": a.recommendation, "b": b.recommendation}
    params: dict[str, dict[str, Any]] = {}
    objectives: dict[str, dict[str, float | None]] = {}
    names: list[str] = []
    for label, rec in recs.items():
        if rec is None:
            continue
        for name, value in rec.params.items():
            params.setdefault(name, {"a": None, "b": None, "published": None})[label] = value
        for name, value in rec.objectives.items():
            if name not in names:
                names.append(name)
            objectives.setdefault(name, {"a": None, "b": None, "published": None})[label] = value
    windows: dict[str, dict[str, dict[str, Any]]] = {}
    sources = {label: _windows_of(rec.in_sample, rec.out_of_sample)
               for label, rec in recs.items() if rec is not None}
    if replay is not None:
        sources["published"] = replay.windows
        for name, value in replay.params.items():
            params.setdefault(name, {"a": None, "b": None, "published": None})["published"] = value
        for name, value in replay.objectives.items():
            objectives.setdefault(name, {"a": None, "b": None, "published": None})[
                "published"] = value
    for label, per_window in sources.items():
        for window, per_inst in per_window.items():
            for inst, evidence in per_inst.items():
                windows.setdefault(window, {}).setdefault(inst, {})[label] = evidence
    candidates: list[tuple[str, Mapping[str, float], bool]] = [
        (label, rec.objectives, rec.feasible) for label, rec in recs.items() if rec is not None]
    if replay is not None:
        candidates.append(("published", replay.objectives, replay.feasible))
    appetite = appetite_on = None
    if prepared is not None:
        appetite = prepared.spec.risk_appetite_bps
        appetite_on = appetite_objective(prepared.spec)
    chosen, why = (_choose(candidates, names, appetite, appetite_on) if names
                   else (None, "neither result has a recommendation"))
    if replay is None:
        why += " (no published parameters replayed)"
    if a.data_fingerprints != b.data_fingerprints:
        why += "; the two results ran on different data"
    recommended: Literal["a", "b", "published"] | None = None
    if chosen == "a":
        recommended = "a"
    elif chosen == "b":
        recommended = "b"
    elif chosen == "published":
        recommended = "published"
    return Comparison(
        a=_side(a), b=_side(b), same_data=a.data_fingerprints == b.data_fingerprints,
        params=params, objectives=objectives, windows=windows, published=replay,
        recommended=recommended, explanation=why)


__all__ = ["ComparedSide", "Comparison", "PublishedReplay", "compare_results",
           "replay_published"]
