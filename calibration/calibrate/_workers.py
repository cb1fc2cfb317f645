"""A worker: adds trials to a study until it has its count (any number at once)."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import msgspec
import optuna
from optuna.trial import TrialState

from calibration._errors import MarginlabError
from calibration._version import numeric_libraries
from calibration.calibrate import _evaluate
from calibration.calibrate._evaluate import METRICS_ATTR, VIOLATION_KEY, violation
from calibration.calibrate._prepare import Prepared
from calibration.calibrate._recommend import best_feasible
from calibration.calibrate._study import _suggest, propose_batch
from calibration.storage import Coordination, retry_stale_trial

log = logging.getLogger("marginlab.calibrate")


def _finished(study: optuna.Study) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               for t in study.get_trials(deepcopy=False))


#: Called after each trial this worker finishes: ``(finished, total_or_None, best)``.
TrialCallback = Callable[[int, int | None, dict[str, Any] | None], None]


def run_worker(
    study: optuna.Study,
    prepared: Prepared,
    coordination: Coordination,
    *,
    n_trials: int | None,
    deadline: float | None = None,
    on_trial: TrialCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_s: float = 0.2,
    claim_trials: int = 1,
) -> int:
    """Add trials to ``study`` until ``n_trials`` are finished (COMPLETE or PRUNED) or the
    deadline passes; returns how many this worker ran.

    Several workers may run this on one study at once: asking for a trial happens under the
    storage's slot lock and counts WAITING and RUNNING trials, so the total never exceeds
    ``n_trials``. A RUNNING trial whose worker stopped beating is failed and its parameters
    enqueued again (``Coordination.reap_stale_trials``); a worker with nothing to ask waits
    for such retries until every trial is finished.

    ``claim_trials``: with ``batch_size``, how many of the batch's queued trials this worker
    claims at most at once (fewer towards the batch's end when it is below ``batch_size``:
    ``_claim_size``) (under the same lock, so no two workers claim one trial). Their coverage
    is computed together in one pass over each series (``batch_coverage``, the EWMA batch
    kernel), then each trial is evaluated, told and reported on its own as when claimed
    alone: the same values and attributes bit for bit. 1 (the default, and what
    ``run_calibration`` uses: measured faster) is one trial at a time.
    """
    return _run_trials(study, prepared, coordination, n_trials=n_trials, deadline=deadline,
                       on_trial=on_trial, should_stop=should_stop, poll_s=poll_s,
                       claim_trials=claim_trials)


def _run_trials(
    study: optuna.Study,
    prepared: Prepared,
    coordination: Coordination,
    *,
    n_trials: int | None,
    deadline: float | None,
    on_trial: TrialCallback | None,
    should_stop: Callable[[], bool] | None,
    poll_s: float,
    claim_trials: int = 1,
) -> int:
    space = prepared.space
    worker = f"{socket.gethostname()}:{os.getpid()}"
    ran = 0
    # Waiting for other workers' last trials: start short (they usually end within one
    # trial's time, and this worker's exit, then the summary, wait on it) and back off to
    # ``poll_s`` (each poll counts the study's trials in the storage).
    wait_s = min(0.01, poll_s)
    last_reap = -math.inf
    while True:
        if should_stop is not None and should_stop():
            return ran
        claimed: list[optuna.Trial] = []
        trial = None
        at_barrier = False
        try:
            with coordination.slot_lock(study.study_name):
                if time.monotonic() - last_reap >= _REAP_EVERY_S:
                    coordination.reap_stale_trials(study)
                    last_reap = time.monotonic()
                trials = study.get_trials(deepcopy=False)
                waiting = any(t.state == TrialState.WAITING for t in trials)
                active = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                         TrialState.WAITING) for t in trials)
                expired = deadline is not None and time.time() >= deadline
                room = n_trials is None or active < n_trials
                queued = sum(t.state == TrialState.WAITING for t in trials)
                batch = prepared.spec.batch_size
                if batch is not None and not waiting and room and not expired:
                    # Reproducible batches: the next batch is proposed only once every trial
                    # of the earlier ones has finished; until then this worker waits.
                    if any(t.state == TrialState.RUNNING for t in trials):
                        room = False
                        at_barrier = True
                    else:
                        size = batch if n_trials is None else min(batch, n_trials - active)
                        for proposal in propose_batch(study, prepared.spec, space, size):
                            study.enqueue_trial(**proposal)
                        waiting = True
                        queued = size
                if waiting or (room and not expired):
                    with warnings.catch_warnings():
                        # RDB storages: Optuna warns that its heartbeat is meant for optimize();
                        # here the trial beats through ``coordination.heartbeat`` instead.
                        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed",
                                                UserWarning)
                        trial = study.ask()
                        claimed.append(trial)
                        if batch is not None and waiting:
                            # More of the batch's queued trials, in their order. Every ask
                            # happens under this lock, so the count read above still holds.
                            for _ in range(_claim_size(claim_trials, queued, batch) - 1):
                                claimed.append(study.ask())
        except BaseException:
            # Stopped between asking for trials and the claim's own guard below (a job's
            # time limit arrives as an exception anywhere): the trials asked for so far
            # would stay RUNNING until reaped; fail and queue them again now.
            if claimed:
                _fail_claim(study, coordination, claimed, keep_failed=None)
            raise
        if trial is None:
            if expired:
                return ran
            if at_barrier:
                # At a batch's barrier, not at the study's end: never leave here, even when
                # the other workers' last trials end before the next read (this worker then
                # proposes the next batch; leaving, as it once did, left the rest of the
                # calibration to the other workers). They end within one trial's time, so
                # poll often: backing off to ``poll_s`` left this worker asleep up to 0.2 s
                # past most barriers (1.5 s of a 24-s two-worker run of 400 trials). A poll
                # is one lock and a read of the new records.
                time.sleep(min(_BARRIER_POLL_S, poll_s))
                continue
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                return ran
            time.sleep(wait_s)
            wait_s = min(2 * wait_s, poll_s)
            continue
        beats = [ExitStack() for _ in claimed]
        current: optuna.Trial | None = None
        try:
            for t, beat in zip(claimed, beats, strict=True):
                beat.enter_context(coordination.heartbeat(t._trial_id))
            chosen = [_suggest(t, space) for t in claimed]
            # One trial: nothing to batch (and the one-set kernels are faster alone).
            coverages = (_evaluate.batch_coverage(prepared, chosen) if len(claimed) > 1
                         else [None])
            for t, params, coverage, beat in zip(claimed, chosen, coverages, beats,
                                                 strict=True):
                current = t
                _run_one(study, t, prepared, params, coverage, worker)
                current = None
                beat.close()  # no beat for a finished trial
                ran += 1
                if on_trial is not None:
                    on_trial(_finished(study), n_trials,
                             best_feasible(study, prepared.spec.risk_appetite_bps))
        except BaseException as exc:
            # Whatever stops this worker mid-trial (an error, a job time limit raised
            # into it, a KeyboardInterrupt) leaves no trial of its claim RUNNING behind it.
            # Each is failed and its parameters queued again, as for a dead worker's, so a
            # resumed calibration runs the same sets, except the one whose own parameters
            # raised a marginlab error (running it again would raise again).
            own_fault = current if isinstance(exc, MarginlabError) else None
            _fail_claim(study, coordination, claimed, keep_failed=own_fault)
            raise
        finally:
            for beat in beats:
                beat.close()


#: Seconds between a worker's reaps of stale trials. A trial is stale only after
#: ``STALE_AFTER_S`` (10 s) without a beat, so a reap at every claim found nothing nearly
#: every time; on PostgreSQL a reap (two reads of the running trials and Optuna's
#: ``fail_stale_trials``) took 24 ms, a fifth of a worker's time there.
_REAP_EVERY_S = 1.0
#: Seconds between polls of a worker waiting at a batch's barrier.
_BARRIER_POLL_S = 0.02


def _claim_size(claim_trials: int, queued: int, batch_size: int) -> int:
    """How many of ``queued`` trials of a batch to claim now, at most ``claim_trials``.

    Shared by several workers (``claim_trials`` below ``batch_size``), the batch is handed
    out in shrinking claims (guided scheduling): each takes its share of half of what is
    queued, so the claims at the batch's end are small and the workers reach the batch's
    barrier together instead of one waiting on the other's last several trials (a pruned
    trial takes a fraction of a full one). Never fewer than two while two are queued: the
    coverage of a claim is computed in one pass, which pays from two sets. Alone, a worker
    claims the whole batch. Which worker runs which trial does not change any value.
    """
    if claim_trials >= batch_size:
        return min(claim_trials, queued)
    workers = math.ceil(batch_size / claim_trials)
    guided = math.ceil(queued / (2 * workers))
    return max(1, min(claim_trials, queued, max(2, guided)))


def _run_one(study: optuna.Study, trial: optuna.Trial, prepared: Prepared,
             params: dict[str, Any], coverage: dict[str, Any] | None, worker: str) -> None:
    """Evaluate one claimed trial (its coverage given, or computed here) and tell it."""
    result = _evaluate.evaluate(prepared, params, coverage=coverage)
    if result.constraints:
        trial.set_constraint(VIOLATION_KEY, violation(result.constraints))
    # One attribute for the evidence: every storage write is a journal append (with
    # fsync); the full parameter set is trial.params plus the spec's fixed values. The
    # worker's identity rides in the same write: the result counts the workers that ran
    # trials, which changes what a seed reproduces (§5).
    summary = result.summary()
    summary["worker"] = worker
    summary["numerics"] = numeric_libraries()  # cached: read once per process
    trial.set_user_attr(METRICS_ATTR, msgspec.json.encode(summary).decode())
    if result.pruned:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, list(result.objectives))


def _fail_claim(study: optuna.Study, coordination: Coordination,
                claimed: list[optuna.Trial], keep_failed: optuna.Trial | None) -> None:
    """Fail the claimed trials still RUNNING and retry their parameters (``keep_failed``:
    failed only), under the study's lock so that a reaper never retries one of them too
    (best effort: the storage may be why the worker stops)."""
    try:
        with coordination.slot_lock(study.study_name):
            for t in claimed:
                if _fail_if_running(study, t) and t is not keep_failed:
                    retry_stale_trial(study, study._storage.get_trial(t._trial_id))
    except Exception as exc:  # the original error is what the caller raises
        log.warning("could not retry the claimed trials after an interruption: %s", exc)


def _fail_if_running(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Mark ``trial`` FAIL unless it already finished (best effort: the storage may be the
    reason the worker stops)."""
    try:
        state = study._storage.get_trial(trial._trial_id).state
        if state == TrialState.RUNNING:
            study.tell(trial, state=TrialState.FAIL)
            return True
    except Exception as exc:  # the original error is what the caller raises
        log.warning("could not fail trial %s after an interruption: %s", trial.number, exc)
    return False
