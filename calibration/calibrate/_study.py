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
from calibration._version import ENGINE_VERSION, numeric_libraries
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


def make_sampler(spec: CalibrationSpec, *, worker: int = 0,
                 population_size: int = 24) -> optuna.samplers.BaseSampler:
    """The sampler for a spec; ``worker`` offsets the seed so parallel workers differ;
    ``population_size``: NSGA-II's (a batch's size with ``batch_size``).

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
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    return optuna.samplers.RandomSampler(seed=seed)


#: Seed step between batches (a prime, so batch seeds never repeat a worker's offset).
BATCH_SEED_STEP = 104_729

#: User attribute of a trial proposed by a batched NSGA-II: the generation its set was
#: bred for (NSGA-II's own generation key lives in system attributes, which the study's
#: sampler sets by its own count when a worker asks for the enqueued trial).
BATCH_GENERATION_ATTR = "batch_generation"


def batch_sampler_name(spec: CalibrationSpec) -> str:
    """The sampler that proposes a spec's batches: ``auto`` as ``make_sampler`` resolves it
    (TPE up to 150 trials, NSGA-II above, its generation being one batch), TPE for batches
    of one (a population of one cannot breed)."""
    if spec.sampler != "auto":
        return spec.sampler
    if (spec.n_trials or 10_000) <= 150 or (spec.batch_size or 2) < 2:
        return "tpe"
    return "nsga2"


def propose_batch(study: optuna.Study, spec: CalibrationSpec,
                  space: Mapping[str, ParamSpec], size: int) -> list[dict[str, Any]]:
    """The next ``size`` parameter sets of a reproducible calibration (``batch_size``), as
    ``enqueue_trial`` keyword arguments (``params``, and ``user_attrs`` for NSGA-II).

    Called when no trial of the study is running or waiting, so the finished trials are
    exactly those of the earlier batches. A fresh sampler, seeded from the spec's seed and
    the number of trials so far, proposes the sets one after another on an in-memory copy of
    those trials, so the proposal depends on nothing but the earlier batches' results: the
    same for any number of workers, any machine, any storage. TPE's constant liar keeps the
    sets of one batch apart. NSGA-II (``auto`` above 150 trials) breeds with a population of
    ``batch_size``: each trial carries the generation it was bred for
    (``BATCH_GENERATION_ATTR``), the copies get it back as NSGA-II's own generation key, and
    a batch is the next generation once the last one has ``batch_size`` complete trials
    (pruned trials do not count, as in NSGA-II's own runs), so its parents are selected by
    NSGA-II's elitist rule from those generations.
    """
    # The finished trials in the order their sets were first proposed: a retry (of a
    # trial whose worker died or was interrupted) takes its original's place, and failed
    # attempts are left out, so an interrupted and resumed calibration proposes what an
    # uninterrupted one does (without failures this is every trial, in number order).
    trials = study.get_trials(deepcopy=False)
    finished = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)),
                      key=_proposal_order)
    name = batch_sampler_name(spec)
    seeded = msgspec.structs.replace(
        spec, seed=(spec.seed + BATCH_SEED_STEP * len(finished)) % (2**32), sampler=name)
    sampler = make_sampler(seeded, population_size=max(spec.batch_size or size, 2))
    generation_key = None
    if isinstance(sampler, optuna.samplers.NSGAIISampler):
        generation_key = sampler._get_generation_key()
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the scratch study is not news
    try:
        scratch = optuna.create_study(directions=study.directions, sampler=sampler)
    finally:
        optuna.logging.set_verbosity(level)
    scratch.add_trials([_scratch_copy(t, trials, generation_key) for t in finished])
    out = []
    for _ in range(size):
        proposal = scratch.ask()
        _suggest(proposal, space)
        item: dict[str, Any] = {"params": dict(proposal.params)}
        if generation_key is not None:
            bred = scratch._storage.get_trial_system_attrs(proposal._trial_id)
            item["user_attrs"] = {BATCH_GENERATION_ATTR: int(bred.get(generation_key, 0))}
        out.append(item)
    return out


def _scratch_copy(trial: FrozenTrial, trials: list[FrozenTrial],
                  generation_key: str | None) -> FrozenTrial:
    """A finished trial as the batch sampler reads it: parameters, values, state and
    constraints, without the 30-40 KB metrics a copy would carry for nothing; for NSGA-II
    the generation its set was bred for, as NSGA-II's key (a retry's is its original's)."""
    system = {k: v for k, v in trial.system_attrs.items()
              if generation_key is None or not k.startswith(generation_key.split(":")[0])}
    if generation_key is not None:
        original = trials[_proposal_order(trial)]
        bred = original.user_attrs.get(BATCH_GENERATION_ATTR)
        if bred is not None:
            system[generation_key] = int(bred)
    return _ScratchTrial(
        number=-1, trial_id=-1, state=trial.state, value=None,
        values=trial.values if trial.state == TrialState.COMPLETE else None,
        datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
        params=dict(trial.params), distributions=dict(trial.distributions), user_attrs={},
        system_attrs=system, intermediate_values={})


class _ScratchTrial(FrozenTrial):
    """A finished trial copied for a batch proposal's scratch study, made for it alone, so
    the in-memory storage may keep it rather than deep-copy it (``add_trials``): that copy
    and ``create_trial``'s checks were three quarters of a proposal (75 of 98 ms at 960
    trials), which every worker waits on at a batch's barrier. Its dicts are its own; the
    distributions and values in them are not changed by a sampler."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _ScratchTrial:
        return self


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


def check_numerics(study: optuna.Study, *, allow_other_numerics: bool = False) -> None:
    """Refuse to add trials to ``study`` under other numeric libraries than it was created
    with (``numeric_libraries``), unless ``allow_other_numerics``.

    Two sets of versions may round a trial differently in its last bits, so a study run
    under both is no longer the same for 1, 2 or N workers; its result would say
    ``reproducible: false``. Refusing makes the mismatch an error at the start instead of a
    flag at the end. Studies created before the versions were recorded are not checked.

    Raises:
        StudyMismatch: the versions differ and ``allow_other_numerics`` is false.
    """
    recorded = study.user_attrs.get("numerics")
    here = numeric_libraries()
    if recorded is None or recorded == here or allow_other_numerics:
        return
    raise StudyMismatch(
        f"study {study.study_name!r} was created under {recorded}; this process has {here}. "
        "Trials computed here may differ in their last bits and the study would no longer "
        "be reproducible: run this worker with the same versions, or allow it "
        "(--allow-other-numerics, allow_other_numerics=True; the result then says "
        "reproducible: false)")


def create_or_load_study(
    spec: CalibrationSpec, prepared: Prepared, coordination: Coordination,
    name: str | None = None, *, allow_other_numerics: bool = False,
) -> optuna.Study:
    """Create the study (metric names, spec, fingerprints and the numeric libraries'
    versions as attributes, the published parameters enqueued as the first trial), or load
    it if it exists for the same inputs.

    Raises:
        StudyMismatch: a study of that name exists for another spec or other data, or was
            created under other numeric libraries (``check_numerics``).
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
            check_numerics(study, allow_other_numerics=allow_other_numerics)
            return study
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objective_names(spec)))
        study.set_user_attr("spec", msgspec.to_builtins(spec))
        study.set_user_attr("spec_hash", digest)
        study.set_user_attr("fingerprints", prepared.fingerprints)
        study.set_user_attr("engine_version", ENGINE_VERSION)
        study.set_user_attr("numerics", numeric_libraries())
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
