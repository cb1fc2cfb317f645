"""The one run sequence of a calibration, used by the library, the CLI and the service."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Literal

import optuna

from calibration._errors import InvalidParameters
from calibration.calibrate._prepare import Prepared, prepare
from calibration.calibrate._recommend import CalibrationResult, summarize
from calibration.calibrate._study import (
    StudyMismatch,
    check_numerics,
    create_or_load_study,
    load_study,
)
from calibration.calibrate._workers import TrialCallback, run_worker
from calibration.spec import CalibrationSpec
from calibration.storage import Coordination


def check_workers(workers: int, storage: str) -> None:
    """Refuse a worker count the storage cannot serve, before any data is read.

    Raises:
        InvalidParameters: fewer than one worker, or several on the in-memory storage.
    """
    if workers < 1:
        raise InvalidParameters("workers must be at least 1", field="workers")
    if workers > 1 and storage == "memory":
        raise InvalidParameters("more than one worker needs a shared storage (a journal file, "
                                "redis:// or postgresql://), not memory", field="storage")


#: Called once with the study before its first trial; returns the per-trial callback, if any.
StudyWatcher = Callable[[optuna.Study], TrialCallback | None]


def run_calibration(
    spec: CalibrationSpec,
    *,
    root: str | os.PathLike[str],
    storage: str = "memory",
    study: str | None = None,
    prepared: Prepared | None = None,
    workers: int = 1,
    watch: StudyWatcher | None = None,
    should_stop: Callable[[], bool] | None = None,
    allow_other_numerics: bool = False,
) -> CalibrationResult | None:
    """The one run sequence of a calibration (library, ``marginlab calibrate``, service jobs):
    prepare the data, create or load the study, run this process and ``workers - 1`` helper
    processes (``calibration.parallel``) until the study has its trials or its time budget is
    spent, then read the front and the recommendation. Other workers may join the study too.

    Args:
        spec: what to calibrate.
        root: the data root the spec's references are relative to.
        storage: the study storage URL (``memory`` only with one worker).
        study: the study name (default: derived from the spec).
        prepared: the spec's data, if already prepared (``prepare``).
        workers: worker processes, this one included.
        watch: called with the study before the first trial; what it returns is called
            after each of this process's trials (``TrialCallback``). Returning ``None``
            saves the per-trial scan of the study a callback needs.
        should_stop: polled between trials; once it says so this process starts no more
            trials, and the run returns ``None`` instead of a result.
        allow_other_numerics: resume a study created under other numeric libraries' versions
            (``check_numerics``; its result then says ``reproducible: false``).

    Returns:
        The result, or ``None`` when ``should_stop`` stopped the run.

    Raises:
        MarginlabError subclasses for bad input, before any trial runs.
    """
    from calibration.parallel import start_helpers, wait_helpers

    check_workers(workers, storage)
    prepared = prepared or prepare(spec, root)
    with Coordination(storage) as coordination:
        opt_study = create_or_load_study(spec, prepared, coordination, study,
                                         allow_other_numerics=allow_other_numerics)
        on_trial = watch(opt_study) if watch is not None else None
        deadline = time.time() + spec.timeout_seconds if spec.timeout_seconds else None
        # One trial of a batch at a time (the results are the same for any claim). Claims of
        # a worker's share, their coverage in one pass of the batch kernel, were slower on
        # the benchmark since the one-set coverage kernel runs in vector lanes:
        # 1000 trials of batches of 24 took 175.2 s / 119.9 s with one / two workers against
        # 165.8 s / 76.1 s claiming one at a time (bench/RESULTS.md, 2026-12-03).
        claim = 1
        helpers = start_helpers(workers - 1, storage_url=storage,
                                study_name=opt_study.study_name, prepared=prepared,
                                root=root, deadline=deadline, claim_trials=claim)
        try:
            run_worker(opt_study, prepared, coordination, n_trials=spec.n_trials,
                       deadline=deadline, on_trial=on_trial, should_stop=should_stop,
                       claim_trials=claim)
        finally:
            wait_helpers(helpers)  # a failed helper is logged (warning) there
        if should_stop is not None and should_stop():
            return None
        return summarize(opt_study, prepared, storage)


def calibrate(
    spec: CalibrationSpec,
    *,
    root: str | os.PathLike[str],
    storage: str = "memory",
    study: str | None = None,
    on_trial: TrialCallback | None = None,
    prepared: Prepared | None = None,
    workers: int = 1,
    allow_other_numerics: bool = False,
) -> CalibrationResult:
    """Run a whole calibration (``run_calibration`` without a stop signal).

    Args:
        spec: what to calibrate.
        root: the data root the spec's references are relative to.
        storage: the study storage URL (``memory`` only with one worker).
        study: the study name (default: derived from the spec).
        on_trial: called after each of this process's trials.
        prepared: the spec's data, if already prepared (``prepare``).
        workers: worker processes, this one included.
        allow_other_numerics: as ``run_calibration``'s.

    Raises:
        MarginlabError subclasses for bad input, before any trial runs.
    """
    result = run_calibration(spec, root=root, storage=storage, study=study, prepared=prepared,
                             workers=workers, allow_other_numerics=allow_other_numerics,
                             watch=None if on_trial is None else (lambda _study: on_trial))
    assert result is not None  # only a stop signal ends a run without a result
    return result


def join_calibration(
    name: str,
    *,
    storage: str,
    root: str | os.PathLike[str],
    worker: int = 1,
    prepared: Prepared | None = None,
    deadline: float | Literal["spec"] | None = "spec",
    claim_trials: int = 1,
    allow_other_numerics: bool = False,
) -> int:
    """Join an existing study as worker ``worker`` and add trials until it has its count
    (``marginlab worker --study``, and the helpers of ``run_calibration``); returns how many
    trials this worker ran.

    Args:
        name: the study name.
        storage: the study storage URL.
        root: the data root the study's spec references are relative to.
        worker: the worker index, which offsets the sampler's seed.
        prepared: the study's data, already prepared (a forked helper's); default: loaded
            under ``root`` and checked against the study's fingerprints.
        deadline: epoch seconds after which no trial starts; ``"spec"``: the spec's time
            budget on this worker's clock (as for the service's jobs).
        claim_trials: with ``batch_size``, queued trials claimed and evaluated together
            (``run_worker``).
        allow_other_numerics: join although this process's numeric libraries differ from
            those the study was created under (``check_numerics``).

    Raises:
        StudyMismatch: the data under ``root`` differ from the data the study was created
            with, or the numeric libraries do (without ``allow_other_numerics``).
    """
    with Coordination(storage) as coordination:
        opt_study, spec = load_study(name, coordination, worker=worker)
        check_numerics(opt_study, allow_other_numerics=allow_other_numerics)
        if prepared is None:
            prepared = prepare(spec, root)
            if opt_study.user_attrs.get("fingerprints") != prepared.fingerprints:
                raise StudyMismatch(
                    f"the data under {str(root)!r} differ from the data study {name!r} was "
                    "created with (fingerprints do not match)")
        if deadline == "spec":
            deadline = time.time() + spec.timeout_seconds if spec.timeout_seconds else None
        return run_worker(opt_study, prepared, coordination, n_trials=spec.n_trials,
                          deadline=deadline, claim_trials=claim_trials)
