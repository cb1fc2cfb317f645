"""Calibration jobs: what a worker runs, and the queues that hand jobs to workers.

With ``REDIS_URL`` jobs go on an **rq** queue (``marginlab`` queue) and run in
``marginlab worker`` processes (``rq`` is chosen over saq/arq: it is synchronous like Optuna and
numpy, so a job is a plain function call; it works with redis-py 8, which saq's Redis extra
does not allow; arq is in maintenance-only mode). Each calibration is enqueued
``workers_per_job`` times: every copy joins the same Optuna study and the study's slot lock
keeps the trial count exact, so more workers finish sooner and a dead worker's share is
picked up by the others (its running trial is reaped and retried). A job whose workers all
died is re-enqueued by ``requeue_orphans``.

Without Redis (embedded mode) an in-process runner executes jobs one at a time in a thread;
numba kernels release the GIL, so the API stays responsive.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from calibration._errors import MarginlabError
from calibration.calibrate import create_or_load_study, prepare, run_worker, summarize
from calibration.spec import decode_spec
from calibration.storage import Coordination
from service.schemas import CalibrationJob
from service.settings import Settings
from service.state import State, run_sync

log = logging.getLogger("marginlab.service")

QUEUE_NAME = "marginlab"
#: Upper bound of one calibration job's run time.
JOB_TIMEOUT_S = 24 * 3600
#: How often a queue worker looks for jobs abandoned by dead workers.
CLEANUP_EVERY_S = 5.0
#: How often a queue worker renews the heartbeat of the job it runs (rq's default is 30 s),
#: and how long after a missed renewal the job counts as abandoned (rq hard-codes 60 s): a
#: killed worker's job is retried on another worker within about 20 s instead of 90 s.
JOB_MONITORING_INTERVAL_S = 5
HEARTBEAT_GRACE_S = 10
#: Pause before a queue worker that lost Redis starts consuming again.
RECONNECT_EVERY_S = 1.0


def now_iso() -> str:
    """The current time, ISO-8601 UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def execute_calibration(job_id: str, settings: Settings,
                        accessor: JobAccess | None = None) -> str:
    """Run (or join) one calibration job to the end; returns the job's final state.

    Reads the spec stored with the job, adds trials to its study until the count is
    reached, then stores the result under the job's cache key. Stops between trials when
    the job is cancelled.
    """
    access = accessor or JobAccess(settings)
    job = access.get(job_id)
    if job is None or job.state in ("succeeded", "cancelled", "failed"):
        return "missing" if job is None else job.state
    spec_raw = access.spec(job_id)
    try:
        spec = decode_spec(spec_raw)
        prepared = prepare(spec, settings.data_root)
        access.update(job_id, state="running", started_at=job.started_at or now_iso())
        with Coordination(settings.storage_url) as coordination:
            study = create_or_load_study(spec, prepared, coordination, job.study)
            deadline = (time.time() + spec.timeout_seconds) if spec.timeout_seconds else None
            run_worker(study, prepared, coordination, n_trials=spec.n_trials,
                       deadline=deadline, should_stop=lambda: access.cancelled(job_id))
            if access.cancelled(job_id):
                return "cancelled"
            result = summarize(study, prepared, settings.storage_url)
        access.save_result(job.cache_key, msgspec.json.encode(result), settings.result_ttl_s,
                           list(prepared.fingerprints.values()))
        access.update(job_id, state="succeeded", finished_at=now_iso())
        return "succeeded"
    except MarginlabError as exc:
        access.update(job_id, state="failed", finished_at=now_iso(), error=str(exc))
        return "failed"


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

    def update(self, job_id: str, **changes: Any) -> None:
        async def op(state: State) -> None:
            job = await state.get("jobs", job_id, CalibrationJob)
            if job is None or job.state in ("succeeded", "cancelled"):
                return
            await state.put("jobs", job_id, msgspec.structs.replace(job, **changes))

        self._run(op)

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
    return execute_calibration(job_id, Settings.from_env())


class LocalRunner:
    """Embedded mode: runs queued jobs one at a time in a background thread."""

    def __init__(self, settings: Settings, access: JobAccess) -> None:
        self.settings = settings
        self.access = access
        self._queue: list[str] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="marginlab-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()

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
            with contextlib.suppress(Exception):  # a failed job is recorded, the loop goes on
                try:
                    execute_calibration(job_id, self.settings, self.access)
                except Exception as exc:
                    self.access.update(job_id, state="failed", finished_at=now_iso(),
                                       error=f"internal error: {type(exc).__name__}")
                    raise


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
        from rq import Retry

        for i in range(max(1, self.settings.workers_per_job)):
            # A finite timeout keeps the started-job registry entry expiring when its worker
            # dies; rq then retries the job (Retry) on a live worker, which rejoins the study.
            self.queue.enqueue(rq_execute, job_id, job_id=f"{job_id}-{i}",
                               job_timeout=JOB_TIMEOUT_S, result_ttl=86_400,
                               failure_ttl=86_400, retry=Retry(max=3))

    def ping(self) -> bool:
        return bool(self.redis.ping())


def run_queue_worker(settings: Settings, *, burst: bool = False) -> None:
    """``marginlab worker`` without ``--study``: consume the rq queue."""
    import redis
    from rq import Worker

    if settings.redis_url is None:
        raise MarginlabError("a queue worker needs REDIS_URL (embedded mode runs jobs in the "
                             "API process)")
    url = settings.redis_url
    connection = redis.Redis.from_url(url)

    class QueueWorker(Worker):
        """rq's worker with a short heartbeat TTL, remembering a requested stop."""

        stop_requested = False

        def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
            return int(self.job_monitoring_interval) + HEARTBEAT_GRACE_S

        def request_stop(self, signum: Any, frame: Any) -> None:
            self.stop_requested = True
            super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    stop = threading.Event()

    def cleanup() -> None:
        # rq only sweeps abandoned jobs every maintenance interval (10 min); sweep often so
        # a dead worker's job is retried within seconds.
        from rq.registry import StartedJobRegistry

        registry = StartedJobRegistry(QUEUE_NAME, connection=redis.Redis.from_url(url))
        while not stop.wait(CLEANUP_EVERY_S):
            with contextlib.suppress(Exception):
                registry.cleanup()

    sweeper = threading.Thread(target=cleanup, name="rq-cleanup", daemon=True)
    sweeper.start()
    try:
        while True:
            worker: QueueWorker | None = None
            lost: Exception | None = None
            try:
                worker = QueueWorker([QUEUE_NAME], connection=connection,
                                     job_monitoring_interval=JOB_MONITORING_INTERVAL_S)
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
