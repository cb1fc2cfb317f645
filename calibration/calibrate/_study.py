"""The Optuna study of a spec: sampler, name, creation or loading, and how a trial's
parameters are suggested and read back."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import msgspec
import optuna
from optuna.trial import FrozenTrial, TrialState

from calibration._errors import InvalidParameters, MarginlabError
from calibration._version import ENGINE_VERSION
from calibration.calibrate._objectives import METRICS, objective_names
from calibration.calibrate._prepare import Prepared
from calibration.spec import (
    CalibrationSpec,
    ParamSpec,
    search_space,
    spec_hash,
)
from calibration.storage import Coordination


class StudyMismatch(MarginlabError, ValueError):
    """A worker's data or spec differs from the study it was asked to join."""


def make_sampler(spec: CalibrationSpec, *, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler for a spec; ``worker`` offsets the seed so parallel workers differ.

    ``auto`` picks multivariate TPE for budgets up to 150 trials: it needs the fewest
    trials to find a good front, and its own cost (~3–10 ms a trial below 150 trials here)
    is small next to a backtest. Above that NSGA-II: TPE's cost grows with the history
    (~30 ms a trial by trial 1000 on these machines, more than a whole 30-minute-bar
    backtest) while NSGA-II stays near 1 ms, and its generations parallelise over workers
    without a constant liar. GP is not offered: it needs torch, which marginlab does not
    install. Random is there as a baseline.
    """
    seed = spec.seed + 7919 * worker
    choice = spec.sampler
    if choice == "auto":
        choice = "tpe" if (spec.n_trials or 10_000) <= 150 else "nsga2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if choice == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                              constant_liar=True, n_startup_trials=10)
        if choice == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=24)
    return optuna.samplers.RandomSampler(seed=seed)


#: Seed step between batches (a prime, so batch seeds never repeat a worker's offset).
BATCH_SEED_STEP = 104_729


def propose_batch(study: optuna.Study, spec: CalibrationSpec,
                  space: Mapping[str, ParamSpec], size: int) -> list[dict[str, Any]]:
    """The next ``size`` parameter sets of a reproducible calibration (``batch_size``).

    Called when no trial of the study is running or waiting, so the finished trials are
    exactly those of the earlier batches. A fresh sampler, seeded from the spec's seed and
    the number of trials so far, proposes the sets one after another on an in-memory copy of
    those trials (TPE's constant liar keeps the sets of one batch apart), so the proposal
    depends on nothing but the earlier batches' results: the same for any number of
    workers, any machine, any storage. ``auto`` is TPE here.
    """
    # The finished trials in the order their sets were first proposed: a retry (of a
    # trial whose worker died or was interrupted) takes its original's place, and failed
    # attempts are left out, so an interrupted and resumed calibration proposes what an
    # uninterrupted one does (without failures this is every trial, in number order).
    finished = sorted((t for t in study.get_trials(deepcopy=False)
                       if t.state in (TrialState.COMPLETE, TrialState.PRUNED)),
                      key=_proposal_order)
    seeded = msgspec.structs.replace(
        spec, seed=(spec.seed + BATCH_SEED_STEP * len(finished)) % (2**32),
        sampler="tpe" if spec.sampler == "auto" else spec.sampler)
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the scratch study is not news
    try:
        scratch = optuna.create_study(directions=study.directions,
                                      sampler=make_sampler(seeded))
    finally:
        optuna.logging.set_verbosity(level)
    scratch.add_trials(finished)
    out = []
    for _ in range(size):
        proposal = scratch.ask()
        _suggest(proposal, space)
        out.append(dict(proposal.params))
    return out


def _proposal_order(trial: FrozenTrial) -> int:
    """The number of the trial whose parameters ``trial`` runs: its own, or for a retry the
    first attempt's (``retry_history``: ours on journals, Optuna's on RDB storages)."""
    history = (trial.user_attrs.get("retry_history")
               or trial.system_attrs.get("retry_history") or [])
    return int(history[0]) if history else trial.number


def _suggest(trial: optuna.Trial, space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    with warnings.catch_warnings():
        # The published parameters are enqueued as they are, even where they lie outside
        # the searched range: that trial is the baseline, and Optuna runs it with the
        # published values (warning that they are out of range, which here is the point).
        warnings.filterwarnings("ignore", r"Fixed parameter .* is out of range",
                                UserWarning)
        for name, p in space.items():
            if p.value is not None:
                params[name] = p.value
            elif p.integer:
                assert p.low is not None
                assert p.high is not None
                params[name] = trial.suggest_int(name, round(p.low), round(p.high),
                                                 log=p.log)
            else:
                assert p.low is not None
                assert p.high is not None
                params[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
    return params


def study_name(spec: CalibrationSpec) -> str:
    """The default study name: model and spec hash, so a re-run resumes the same study."""
    return f"marginlab-{spec.model}-{spec_hash(spec)[:16]}"


def create_or_load_study(
    spec: CalibrationSpec, prepared: Prepared, coordination: Coordination,
    name: str | None = None,
) -> optuna.Study:
    """Create the study (metric names, spec and fingerprints as attributes, the published
    parameters enqueued as the first trial), or load it if it exists for the same inputs.

    Raises:
        StudyMismatch: a study of that name exists for another spec or other data.
    """
    name = name or study_name(spec)
    digest = spec_hash(spec)
    with coordination.slot_lock(name):
        study = optuna.create_study(
            storage=coordination.storage, study_name=name, load_if_exists=True,
            directions=[METRICS[n].direction for n in objective_names(spec)],
            sampler=make_sampler(spec),
        )
        attrs = study.user_attrs
        if "spec_hash" in attrs:
            if attrs["spec_hash"] != digest:
                raise StudyMismatch(f"study {name!r} exists for another spec")
            if attrs["fingerprints"] != prepared.fingerprints:
                raise StudyMismatch(f"study {name!r} exists for other data")
            return study
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objective_names(spec)))
        study.set_user_attr("spec", msgspec.to_builtins(spec))
        study.set_user_attr("spec_hash", digest)
        study.set_user_attr("fingerprints", prepared.fingerprints)
        study.set_user_attr("engine_version", ENGINE_VERSION)
        if spec.published is not None:
            space = search_space(spec)
            warm = {k: v for k, v in spec.published.params.items()
                    if k in space and space[k].value is None}
            if warm:
                study.enqueue_trial(warm, user_attrs={"published": True})
    return study


def load_study(name: str, coordination: Coordination, *, worker: int = 1) -> tuple[
        optuna.Study, CalibrationSpec]:
    """Open an existing study and its spec (for ``marginlab worker``)."""
    try:
        summaries = optuna.study.get_all_study_names(storage=coordination.storage)
    except Exception as exc:
        raise MarginlabError(f"cannot list studies in {coordination.url!r}: {exc}") from exc
    if name not in summaries:
        raise InvalidParameters(f"no study {name!r} in {coordination.url!r}", field="study")
    probe = optuna.load_study(study_name=name, storage=coordination.storage)
    spec = msgspec.convert(probe.user_attrs["spec"], CalibrationSpec)
    study = optuna.load_study(study_name=name, storage=coordination.storage,
                              sampler=make_sampler(spec, worker=worker))
    return study, spec


def _params_of(trial: FrozenTrial, space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """The model parameters a trial ran with: its suggested values and the space's fixed
    ones, in the space's order (as ``_suggest`` built them)."""
    # Studies written before the params were derived stored them as an attribute.
    stored: dict[str, Any] | None = trial.user_attrs.get("params")
    if stored is not None:
        return dict(stored)
    return {name: p.value if p.value is not None else trial.params[name]
            for name, p in space.items()}
