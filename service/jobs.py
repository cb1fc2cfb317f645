"""Calibration jobs: what a worker runs, and the queues that hand jobs to workers.

With ``REDIS_URL`` jobs go on an **rq** queue (``marginlab`` queue) and run in
``marginlab worker`` processes (``rq`` is chosen over saq/arq: it is synchronous like Optuna and
numpy, so a job is a plain function call; it works with redis-py 8, which saq's Redis extra
does not allow; arq is in maintenance-only mode). Each calibration is enqueued
``workers_per_job`` times: every copy joins the same Optuna study and the study's slot lock
keeps the trial count exact, so more workers finish sooner and a dead worker's share is
picked up by the others (its running trial is reaped and retried). A job whose workers all
died is re-enqueued by ``requeue_orphans``.

Without Redis (embedded mode) ``LocalRunner`` executes jobs one at a time in a child process
of the API (``service.embedded_worker``), through the same file-backed job records a queue
worker uses through Redis: readers of progress never compete with a running study for the
API process's GIL.

Every job ends ``succeeded``, ``failed`` (with a reason a user can act on) or ``cancelled``:

- an error inside the job is caught whatever its type: a ``MarginlabError`` fails the job with
  its message; anything else fails it as an internal error (type named, details in the server
  log); rq's time limit fails it naming the limit. A lost connection to Redis or the study
  storage is left to rq, which retries the job;
- a job whose queue copies are all dead (worker SIGKILLed or OOM-killed more often than rq
  retries, retries used up) is failed by ``reconcile_jobs``, which the API process and every
  queue worker run every ``MARGINLAB_JOB_HEARTBEAT_S``; it also fails the study's trials left
  RUNNING;
- embedded mode resumes, at start, every job that was queued or running when the process
  stopped (``resume_active``): it rejoins its study, whose interrupted trial the reaper
  fails and retries.

A failed or cancelled job's dedup entry is dropped: an identical request then starts a new
job (which rejoins the study's finished trials) rather than joining or reporting a dead one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any, Literal

import msgspec

from calibration._errors import MarginlabError
from calibration.calibrate import best_feasible, prepare, run_calibration
from calibration.spec import decode_spec
from calibration.storage import Coordination
from service.schemas import CalibrationJob, Progress
from service.settings import Settings
from service.state import State, run_sync

#: Job states after which nothing runs.
FINAL = ("succeeded", "failed", "cancelled")

log = logging.getLogger("marginlab.service")

QUEUE_NAME = "marginlab"
#: Most queue copies of one job looked at (``workers_per_job`` of any process).
MAX_COPIES = 64
#: Liveness (``Settings.job_heartbeat_s``, h = 5 s by default): a queue worker renews the
#: heartbeat of the job it runs every h (rq's default is 30 s) and the job counts as
#: abandoned 2h after a missed renewal (rq hard-codes 60 s), so a killed worker's job is
#: retried on another worker within about 4h (20 s) instead of 90 s; the worker looks for
#: abandoned jobs every h.
#: Pause before a queue worker that lost Redis starts consuming again.
RECONNECT_EVERY_S = 1.0


#: Least time between two progress writes of one worker (the last one is always written).
PROGRESS_EVERY_S = 0.5
#: Times a job whose queue entries vanished (Redis restarted without persistence, flushed)
#: is queued again before it is failed.
MAX_REQUEUES = 5


def now_iso() -> str:
    """The current time, ISO-8601 UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def study_progress(study: Any, n_trials: int | None, risk_appetite_bps: Any = "study", *,
                   best: dict[str, Any] | Literal[False] | None = False,
                   with_eta: bool = True) -> Progress:
    """The job's progress from its study, as a worker (or the reconciler) sees it.

    Trials done are COMPLETE or PRUNED ones; ``best_feasible`` chooses the best as
    ``calibration.calibrate.best_feasible`` does (``best``, when given, is that value already
    computed). ETA, seconds: trials left times the mean trial duration, over the trials
    running now (at least one).
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    running = sum(t.state == TrialState.RUNNING for t in trials)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    eta = None
    durations = [t.duration.total_seconds() for t in done if t.duration is not None]
    if with_eta and n_trials and durations:
        remaining = max(0, n_trials - len(done))
        eta = remaining * (sum(durations) / len(durations)) / max(1, running)
    chosen = best_feasible(study, risk_appetite_bps) if best is False else best
    return Progress(trials_done=len(done), trials_total=n_trials, running=running,
                    failed=failed, best_feasible=chosen, eta_seconds=eta,
                    updated_at=now_iso())


class ProgressWriter:
    """``run_worker``'s ``on_trial``: keeps the job's progress in its record for readers.

    Writes at most every ``PROGRESS_EVERY_S`` per worker, so thirty trials a second cost
    two small writes; ``final`` writes whatever the study says when the worker stops.
    Readers (status, events) read this record only, never the study's journal.
    """

    def __init__(self, access: JobAccess, job_id: str, study: Any, n_trials: int | None,
                 risk_appetite_bps: float | None) -> None:
        self.access = access
        self.job_id = job_id
        self.study = study
        self.n_trials = n_trials
        self.risk_appetite_bps = risk_appetite_bps
        self._last = 0.0
        self.latest: Progress | None = None

    def __call__(self, finished: int, total: int | None, best: dict[str, Any] | None) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        try:
            self.latest = study_progress(self.study, self.n_trials, best=best)
            self.access.set_progress(self.job_id, self.latest)
        except Exception as exc:  # progress is best effort; the job goes on
            _reraise_time_limit(exc)

    def final(self) -> Progress | None:
        """The study's progress now, without ETA (the worker stopped); also written."""
        try:
            self.latest = study_progress(self.study, self.n_trials, self.risk_appetite_bps,
                                         with_eta=False)
        except Exception as exc:  # the storage may be why the worker stops
            _reraise_time_limit(exc)
            return self.latest
        try:
            self.access.set_progress(self.job_id, self.latest)
        except Exception as exc:
            _reraise_time_limit(exc)
        return self.latest


def _reraise_time_limit(exc: BaseException) -> None:
    """Raise rq's time limit again: it arrives as an exception inside whatever the job was
    doing, and swallowed by a best-effort write it would let the job run on past its limit
    (the flake of ``test_job_past_rqs_time_limit_fails_naming_the_limit``)."""
    from rq.timeouts import JobTimeoutException

    if isinstance(exc, JobTimeoutException):
        raise exc


def _transient(exc: BaseException) -> bool:
    """A lost connection (Redis, the study storage): worth retrying the job on a worker."""
    import redis

    if isinstance(exc.__cause__, ValueError):  # e.g. a journal that cannot be decoded
        return False
    return isinstance(exc, ConnectionError | TimeoutError | redis.exceptions.ConnectionError
                      | redis.exceptions.TimeoutError)


def unexpected_error(job_id: str, exc: BaseException) -> str:
    """The reason stored for a job stopped by an error outside ``MarginlabError``.

    Names the error's type only: its message may carry server paths or URLs.
    """
    return (f"internal error ({type(exc).__name__}) while running the calibration; submit "
            f"the request again to retry it, and report it if it repeats (server log: job "
            f"{job_id})")


def execute_calibration(job_id: str, settings: Settings,
                        accessor: JobAccess | None = None, *,
                        retry_transient: bool = False,
                        time_limit_s: float | None = None) -> str:
    """Run (or join) one calibration job to the end; returns the job's final state.

    Reads the spec stored with the job, adds trials to its study until the count is
    reached, then stores the result under the job's cache key. Stops between trials when
    the job is cancelled. Any error ends the job ``failed`` with a reason, except a lost
    connection with ``retry_transient`` (rq), which is raised for the queue to retry.
    ``time_limit_s`` (rq's job timeout) is also checked between trials: rq raises its time
    limit once, from a signal, inside whatever runs then, and where that is a library's
    own ``except BaseException`` (asyncio's socket writes log it as a "fatal write error"
    and go on) the job would otherwise run on past its limit.
    """
    from rq.timeouts import JobTimeoutException

    limit_at = None if time_limit_s is None else time.monotonic() + time_limit_s

    def should_stop() -> bool:
        if limit_at is not None and time.monotonic() >= limit_at:
            raise JobTimeoutException(f"past the job time limit of {time_limit_s} s")
        return access.cancelled(job_id)

    access = accessor or JobAccess(settings)
    job = access.get(job_id)
    if job is None or job.state in FINAL:
        return "missing" if job is None else job.state
    writer: ProgressWriter | None = None

    def final() -> Progress | None:
        return None if writer is None else writer.final()

    try:
        spec = decode_spec(access.spec(job_id))
        prepared = prepare(spec, settings.data_root)
        access.update(job_id, state="running", started_at=job.started_at or now_iso())
        storage_url = settings.study_storage_url(job.study)

        def watch(study: Any) -> ProgressWriter:
            nonlocal writer
            writer = ProgressWriter(access, job_id, study, spec.n_trials,
                                    spec.risk_appetite_bps)
            return writer

        result = run_calibration(spec, root=settings.data_root, storage=storage_url,
                                 study=job.study, prepared=prepared, watch=watch,
                                 should_stop=should_stop)
        progress = final()
        if result is None:
            return "cancelled"
        access.save_result(job.cache_key, msgspec.json.encode(result), settings.result_ttl_s,
                           list(prepared.fingerprints.values()))
        access.update(job_id, state="succeeded", finished_at=now_iso(), progress=progress)
        return "succeeded"
    except JobTimeoutException:
        access.fail(job_id, f"stopped at the job time limit of {settings.job_timeout_s} s; "
                    "ask for fewer trials or set timeout_seconds below the limit (trials "
                    "finished so far are kept: an identical request resumes them)",
                    progress=final())
        return "failed"
    except MarginlabError as exc:
        if retry_transient and _transient(exc):
            raise
        access.fail(job_id, str(exc), progress=final())
        return "failed"
    except Exception as exc:
        if retry_transient and _transient(exc):
            raise
        log.exception("calibration %s stopped on an unexpected error", job_id)
        access.fail(job_id, unexpected_error(job_id, exc), progress=final())
        return "failed"


async def active_jobs(state: State) -> list[CalibrationJob]:
    """Jobs remembered as active that have not ended, oldest first; forgets ended ones."""
    found = []
    for job_id in await state.active_ids():
        job = await state.get("jobs", job_id, CalibrationJob)
        if job is None or job.state in FINAL:
            await state.drop_active(job_id)
        else:
            found.append(job)
    return found


class JobAccess:
    """Synchronous access to job state for code running outside the event loop."""

    def __init__(self, settings: Settings,
                 runner: Callable[[Callable[[State], Any]], Any] | None = None) -> None:
        self.settings = settings
        self._run = runner or (lambda op: run_sync(settings, op))

    def get(self, job_id: str) -> CalibrationJob | None:
        async def op(state: State) -> CalibrationJob | None:
            return await state.get("jobs", job_id, CalibrationJob)

        result: CalibrationJob | None = self._run(op)
        return result

    def spec(self, job_id: str) -> bytes:
        async def op(state: State) -> bytes:
            raw = await state.stores["jobs"].get(f"{job_id}:spec")
            return raw or b""

        result: bytes = self._run(op)
        return result

    def update(self, job_id: str, **changes: Any) -> bool:
        """Change a job that has not ended; returns whether it was changed.

        A job that ends leaves the active set, and a failed one its dedup entry (an
        identical request must start afresh, not join or report the dead job).
        """
        async def op(state: State) -> bool:
            job = await state.get("jobs", job_id, CalibrationJob)
            if job is None or job.state in FINAL:
                return False
            await state.put("jobs", job_id, msgspec.structs.replace(job, **changes))
            if changes.get("state") in FINAL:
                await state.drop_active(job_id)
            if changes.get("state") in ("failed", "cancelled") and \
                    await state.get("dedup", job.cache_key, str) == job_id:
                await state.delete("dedup", job.cache_key)
            return True

        changed: bool = self._run(op)
        return changed

    def set_progress(self, job_id: str, progress: Progress) -> None:
        """Store a running job's progress next to its record (``progress`` namespace): a
        write of its own, so it never races a change of the record (a cancel)."""
        async def op(state: State) -> None:
            await state.put("progress", job_id, progress, expires_in=30 * 86_400)

        self._run(op)

    def bump_requeues(self, job_id: str) -> int:
        """Count one more re-queue of a job whose queue entries vanished; returns the count."""
        async def op(state: State) -> int:
            key = f"{job_id}:requeues"
            count = int(await state.stores["jobs"].get(key) or b"0") + 1
            await state.stores["jobs"].set(key, str(count).encode())
            return count

        result: int = self._run(op)
        return result

    def fail(self, job_id: str, reason: str, progress: Progress | None = None) -> bool:
        """End a job that has not ended as ``failed`` with ``reason`` (and its last
        progress, when known)."""
        changes: dict[str, Any] = {"progress": progress} if progress is not None else {}
        if self.update(job_id, state="failed", finished_at=now_iso(), error=reason,
                       **changes):
            log.warning("calibration %s failed: %s", job_id, reason)
            return True
        return False

    def active(self) -> list[CalibrationJob]:
        """Jobs remembered as active that have not ended (ended ones are forgotten)."""
        result: list[CalibrationJob] = self._run(active_jobs)
        return result

    def cancelled(self, job_id: str) -> bool:
        job = self.get(job_id)
        return job is None or job.state == "cancelled"

    def save_result(self, cache_key: str, payload: bytes, ttl_s: int,
                    fingerprints: list[str]) -> None:
        async def op(state: State) -> None:
            await state.stores["results"].set(cache_key, payload, expires_in=ttl_s)
            for fp in fingerprints:
                # Index results by the data they used, for invalidation on replacement.
                key = f"fp:{fp}"
                raw = await state.stores["index"].get(key)
                keys = set(msgspec.json.decode(raw) if raw else [])
                keys.add(cache_key)
                await state.stores["index"].set(key, msgspec.json.encode(sorted(keys)))

        self._run(op)


def rq_execute(job_id: str) -> str:
    """The rq task: settings from the worker's environment."""
    settings = Settings.from_env()
    return execute_calibration(job_id, settings, retry_transient=True,
                               time_limit_s=settings.job_timeout_s)


class LocalRunner:
    """Embedded mode: runs queued jobs one at a time, in a child process by default.

    With ``embedded_runner="process"`` a long-lived child (``service.embedded_worker``,
    started with the first job) runs each calibration, so the API process only serves
    requests: a study's Python work (the sampler, journal appends) never holds the API's
    GIL. A child that dies mid-job (killed, out of memory) fails that job with a reason and
    is started afresh for the next one; a stop of the service stops the child, and the job
    it was running stays active and is resumed at the next start. ``"thread"`` runs jobs
    in a thread of this process instead.
    """

    def __init__(self, settings: Settings, access: JobAccess) -> None:
        self.settings = settings
        self.access = access
        self._queue: list[str] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="marginlab-jobs", daemon=True)
        self._child: subprocess.Popen[bytes] | None = None
        self._replies: IO[str] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
            child = self._child
        if child is None:
            return
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._thread.join(timeout=5)  # it reads the child's replies: let it see the end
        for pipe in (child.stdin, self._replies):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def submit(self, job_id: str) -> None:
        with self._wake:
            self._queue.append(job_id)
            self._wake.notify_all()

    def ping(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                job_id = self._queue.pop(0)
            try:
                if self.settings.embedded_runner == "thread":
                    execute_calibration(job_id, self.settings, self.access)
                else:
                    self._run_in_child(job_id)
            except Exception as exc:  # the job could not even record its failure
                log.exception("calibration %s: runner error", job_id)
                with contextlib.suppress(Exception):  # the loop goes on in any case
                    self.access.fail(job_id, unexpected_error(job_id, exc))

    def _ensure_child(self) -> tuple[subprocess.Popen[bytes], IO[str]]:
        if self._child is not None and self._replies is not None \
                and self._child.poll() is None:
            return self._child, self._replies
        for pipe in (None if self._child is None else self._child.stdin, self._replies):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        read_fd, write_fd = os.pipe()
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "service.embedded_worker", str(write_fd)],
                stdin=subprocess.PIPE, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        assert child.stdin is not None
        child.stdin.write(json.dumps(dataclasses.asdict(self.settings)).encode() + b"\n")
        child.stdin.flush()
        with self._wake:
            self._child, self._replies = child, os.fdopen(read_fd, "r")
        if self._stop:  # stopped while it started
            child.terminate()
        return child, self._replies

    def _run_in_child(self, job_id: str) -> None:
        child, replies = self._ensure_child()
        assert child.stdin is not None
        try:
            child.stdin.write(job_id.encode() + b"\n")
            child.stdin.flush()
        except OSError:  # died since: read its end below
            pass
        answer = replies.readline()
        if answer.strip():
            return  # the child recorded the job's end itself
        code = child.wait()
        if self._stop:
            return  # the service stops: the job stays active and resumes at the next start
        cause = (f"killed by signal {-code}" if code < 0 else f"exit status {code}")
        self.access.fail(job_id, f"the calibration process died ({cause}; e.g. out of "
                         "memory or killed); submit the request again to resume from the "
                         "trials finished so far")

    async def resume_active(self, state: State) -> list[str]:
        """Queue again every job that was queued or running when the service stopped
        (call before ``start``); returns their ids. Each rejoins its study: finished trials
        are kept, and the trial the stop interrupted is failed and retried by the reaper
        once its heartbeat is stale."""
        resumed = [job.id for job in await active_jobs(state)]
        for job_id in resumed:
            log.warning("resuming calibration %s, interrupted by a restart", job_id)
            self.submit(job_id)
        return resumed


def enqueue(queue: Any, settings: Settings, job_id: str, round_: int = 0) -> None:
    """Put ``workers_per_job`` copies of a job on the rq queue; a re-queue (``round_`` 1, 2,
    ...) numbers its copies after the earlier ones, so a copy of an earlier round that is
    still running never shares an rq id with a new one."""
    from rq import Retry

    per_round = max(1, settings.workers_per_job)
    for i in range(round_ * per_round, (round_ + 1) * per_round):
        # A finite timeout keeps the started-job registry entry expiring when its worker
        # dies; rq then retries the job (Retry) on a live worker, which rejoins the study.
        queue.enqueue(rq_execute, job_id, job_id=f"{job_id}-{i}",
                      job_timeout=settings.job_timeout_s, result_ttl=86_400,
                      failure_ttl=86_400,
                      retry=Retry(max=settings.job_retries) if settings.job_retries > 0
                      else None)


class RqRunner:
    """Redis mode: jobs on the ``marginlab`` rq queue."""

    def __init__(self, settings: Settings) -> None:
        import redis
        from rq import Queue

        assert settings.redis_url is not None
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                          socket_timeout=5)
        self.queue = Queue(QUEUE_NAME, connection=self.redis)

    def start(self) -> None:
        return None

    def stop(self) -> None:
        self.redis.close()

    def submit(self, job_id: str) -> None:
        enqueue(self.queue, self.settings, job_id)

    def ping(self) -> bool:
        return bool(self.redis.ping())


def _dead_reason(copies: list[Any], settings: Settings) -> str:
    """Why every queue copy of a job is dead, from rq's record of their last failures."""
    texts = []
    for copy in copies:
        with contextlib.suppress(Exception):
            result = copy.latest_result()
            texts.append("" if result is None else (result.exc_string or ""))
    joined = "\n".join(texts)
    tries = f"{settings.job_retries + 1} time(s) per worker copy"
    if "AbandonedJobError" in joined or "Work-horse terminated unexpectedly" in joined:
        return (f"the worker process running it died ({tries}; killed, e.g. out of memory "
                "or SIGKILL); submit the request again to resume from the trials finished "
                "so far, with more memory or fewer instruments per calibration")
    if "JobTimeoutException" in joined:
        return (f"stopped at the job time limit of {settings.job_timeout_s} s; ask for fewer "
                "trials or set timeout_seconds below the limit")
    if "ConnectionError" in joined or "TimeoutError" in joined:
        return (f"lost its connection to Redis or the study storage ({tries}); check "
                "/readyz and submit the request again")
    from rq.job import JobStatus

    if copies and all(c.get_status(refresh=False) in (JobStatus.STOPPED, JobStatus.CANCELED)
                      for c in copies):
        return "stopped on the queue by an operator; submit the request again to run it"
    if not copies:
        return (f"its queue entries vanished {MAX_REQUEUES + 1} times (Redis restarted "
                "without persistence, or flushed) and it was queued again each time; submit "
                "the request again to resume from the trials finished so far")
    return ("internal error while running the calibration; submit the request again to "
            "retry it, and report it if it repeats")


def _reap_study(settings: Settings, job: CalibrationJob) -> tuple[int, Progress | None]:
    """Fail the study's stale RUNNING trials (retrying their parameters); returns how many
    RUNNING trials remain (a trial still beating, or not yet stale) and the study's
    progress after the reaping (``None`` for a study never created)."""
    import optuna
    from optuna.trial import TrialState

    with Coordination(settings.study_storage_url(job.study)) as coordination:
        if job.study not in optuna.study.get_all_study_names(storage=coordination.storage):
            return 0, None
        study = optuna.load_study(study_name=job.study, storage=coordination.storage)
        with coordination.slot_lock(job.study):
            coordination.reap_stale_trials(study)
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        return running, study_progress(study, job.n_trials, with_eta=False)


def reconcile_jobs(settings: Settings, connection: Any,
                   access: JobAccess | None = None) -> list[str]:
    """Redis mode: fail every active job whose queue copies are all dead; returns their ids.

    First lets rq hand abandoned copies (worker gone, heartbeat expired) to a retry or to
    its failed registry. A dead job is failed once its study has no RUNNING trial left
    (they are reaped when stale, ``STALE_AFTER_S``): nothing of it is running afterwards.
    """
    from rq.job import Job, JobStatus
    from rq.registry import StartedJobRegistry

    alive = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED,
             JobStatus.CREATED, JobStatus.RATE_LIMITED, JobStatus.READY_TO_ENQUEUE}
    access = access or JobAccess(settings)
    StartedJobRegistry(QUEUE_NAME, connection=connection).cleanup()
    failed = []
    for job in access.active():
        ids = [f"{job.id}-{i}" for i in range(MAX_COPIES)]
        copies = [c for c in Job.fetch_many(ids, connection=connection) if c is not None]
        if any(c.get_status(refresh=False) in alive for c in copies):
            continue
        if not copies and _requeue(settings, connection, access, job):
            continue
        running, progress = _reap_study(settings, job)
        if running:
            continue  # its last trial is not stale yet: fail the job once it is reaped
        if access.fail(job.id, _dead_reason(copies, settings), progress=progress):
            failed.append(job.id)
    return failed


def _requeue(settings: Settings, connection: Any, access: JobAccess,
             job: CalibrationJob) -> bool:
    """A job active in its durable record whose queue entries are all gone (Redis restarted
    without persistence, or flushed): queue it again, at most ``MAX_REQUEUES`` times;
    returns whether it was. Its copies rejoin the study, whose slot lock keeps the trial
    count exact even if a worker of the old copies is still running."""
    from rq import Queue

    count = access.bump_requeues(job.id)
    if count > MAX_REQUEUES or (count + 1) * max(1, settings.workers_per_job) > MAX_COPIES:
        return False
    log.warning("calibration %s: its queue entries vanished (Redis restarted without "
                "persistence?); queued again (%d of %d)", job.id, count, MAX_REQUEUES)
    enqueue(Queue(QUEUE_NAME, connection=connection), settings, job.id, count)
    return True


def run_queue_worker(settings: Settings, *, burst: bool = False) -> None:
    """``marginlab worker`` without ``--study``: consume the rq queue."""
    import redis
    from rq import Worker

    if settings.redis_url is None:
        raise MarginlabError("a queue worker needs REDIS_URL (embedded mode runs jobs in the "
                             "API process)")
    url = settings.redis_url
    connection = redis.Redis.from_url(url)
    # A stuck worker or work horse (which inherits this) says where it is: SIGUSR1 writes
    # every thread's stack to stderr, the worker's log; rq itself does not use SIGUSR1.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if settings.retain_freed_memory:
        from calibration._allocator import retain_freed_memory

        retain_freed_memory()  # work horses inherit it

    class QueueWorker(Worker):
        """rq's worker with a short heartbeat TTL, remembering a requested stop."""

        stop_requested = False

        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            return int(self.job_monitoring_interval) + 2 * settings.job_heartbeat_s

        def request_stop(self, signum: Any, frame: Any) -> None:
            self.stop_requested = True
            super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

        def fork_work_horse(self, job: Any, queue: Any) -> None:
            # Never fork while the sweeper is inside a sweep: a fork copies whatever lock
            # another thread holds at that instant (in a client library, the allocator, a
            # resolver) held forever in the work horse. The sweep right after a dead
            # worker's job was handed back is exactly when rq forks its retry.
            with sweep_lock:
                super().fork_work_horse(job, queue)

    stop = threading.Event()
    sweep_lock = threading.Lock()

    def cleanup() -> None:
        # rq only sweeps abandoned jobs every maintenance interval (10 min); sweep often so
        # a dead worker's job is retried within seconds.
        from rq.registry import StartedJobRegistry

        sweeper_connection = redis.Redis.from_url(url)
        registry = StartedJobRegistry(QUEUE_NAME, connection=sweeper_connection)
        while not stop.wait(settings.job_heartbeat_s):
            with sweep_lock:
                with contextlib.suppress(Exception):
                    registry.cleanup()
                try:
                    reconcile_jobs(settings, sweeper_connection)
                except Exception as exc:  # Redis away: the next sweep tries again
                    log.warning("reconciling jobs failed (%s)", type(exc).__name__)

    sweeper = threading.Thread(target=cleanup, name="rq-cleanup", daemon=True)
    sweeper.start()
    try:
        while True:
            worker: QueueWorker | None = None
            lost: Exception | None = None
            try:
                worker = QueueWorker([QUEUE_NAME], connection=connection,
                                     job_monitoring_interval=settings.job_heartbeat_s)
                worker.work(burst=burst, with_scheduler=False)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                if burst:
                    raise
                lost = exc
                if worker is not None and worker.pubsub_thread is not None:
                    worker.pubsub_thread.stop()  # rq's teardown could not: do not leak it
            if burst or (worker is not None and worker.stop_requested):
                return
            # rq leaves its loop on any error (Redis gone while a job ended): consume again
            # once Redis is back rather than letting the process die.
            log.warning("queue worker stopped (%s); starting again",
                        lost or "rq left its loop")
            time.sleep(RECONNECT_EVERY_S)
    finally:
        stop.set()
