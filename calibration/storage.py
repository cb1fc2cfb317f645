"""Where studies live, and what lets several workers share one safely.

``open_storage(url)`` maps a URL to an Optuna storage:

- a file path, ``journal:PATH`` or ``file:PATH`` → ``JournalStorage(TrialCommitFileBackend)``,
  Optuna's journal file with a kernel lock and one fsync per finished trial (the default:
  ~1.8 ms per trial here, against ~4 ms for Optuna's own file backend and 30–50 ms for
  SQLite);
- ``redis://...`` → ``JournalStorage(RecoveringRedisBackend(url))`` (Optuna's Redis journal);
- ``postgresql://...`` (or ``sqlite:///...``) → ``RDBStorage`` with Optuna's heartbeat;
- ``memory`` → ``InMemoryStorage`` (one process only).

Two things Optuna leaves to the caller, per backend (``Coordination``):

- **trial slots**: a lock around "count the trials, then ask for one", so N workers never
  start more than the requested number (file lock; Redis lock; PostgreSQL advisory lock);
- **liveness**: a worker killed mid-trial must not leave it RUNNING forever. RDB storages
  use Optuna's heartbeat (``record_heartbeat``/``fail_stale_trials``); the journal backends
  get heartbeats of their own (a touched file per trial; a Redis key with a TTL), and
  ``reap_stale_trials`` fails the stale ones and enqueues their parameters again.

Journals recover on open (``recover_journal_tail``): a last record cut short (a power cut
mid-append leaves an unterminated line in the file) is removed and logged before anything
is appended, so the next append cannot be glued to the torn half and make every later read
fail. ``readable`` replays the storage, which is what ``/readyz`` checks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, InMemoryStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import FrozenTrial, TrialState

from calibration._defaults import DEFAULT_STORAGE as _DEFAULT_STORAGE
from calibration._errors import InvalidParameters, MarginlabError

log = logging.getLogger("marginlab.storage")


class StorageUnavailable(MarginlabError, ConnectionError):
    """The study storage cannot be reached or opened."""


#: Seconds between heartbeats of a running trial, and silence after which it is stale.
HEARTBEAT_INTERVAL_S = 2.0
STALE_AFTER_S = 10.0
#: How often a trial whose worker died is retried with the same parameters.
MAX_RETRY = 3

DEFAULT_STORAGE = _DEFAULT_STORAGE


def _kind(url: str) -> tuple[str, str]:
    if url == "memory":
        return "memory", ""
    for prefix in ("journal:", "file:"):
        if url.startswith(prefix):
            return "file", url[len(prefix) :].removeprefix("//")
    if url.startswith(("redis://", "rediss://", "unix://")):
        return "redis", url
    if url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        return "postgresql", url
    if url.startswith("sqlite:///"):
        return "sqlite", url
    if "://" in url:
        raise InvalidParameters(
            f"unsupported storage {url!r}: use a journal file path, redis://, postgresql:// "
            "or sqlite:///", field="storage",
        )
    return "file", url


def _rdb_url(url: str) -> str:
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


#: Journal operations that only fill in a RUNNING trial (see ``TrialCommitFileBackend``).
_IN_TRIAL_OPS = frozenset({
    JournalOperation.SET_TRIAL_PARAM, JournalOperation.SET_TRIAL_INTERMEDIATE_VALUE,
    JournalOperation.SET_TRIAL_USER_ATTR, JournalOperation.SET_TRIAL_SYSTEM_ATTR,
})


def _needs_fsync(log: dict[str, Any]) -> bool:
    op = log["op_code"]
    if op == JournalOperation.CREATE_TRIAL:
        # ``ask()`` creates a RUNNING trial without a state; an enqueued (WAITING) or added
        # trial carries its state and is a decision of its own.
        return bool(log.get("state", TrialState.RUNNING) != TrialState.RUNNING)
    return op not in _IN_TRIAL_OPS


class TrialCommitFileBackend(JournalFileBackend):
    """Optuna's journal file (same format, same reader) with two changes to appending.

    - **One fsync per finished trial**, not per write. A trial makes ~9 appends (creation,
      one per parameter, the sampler's attribute, constraint, metrics, state); Optuna fsyncs
      each, ~0.3 ms apiece here, which was most of the storage's cost per trial. Writes
      that only fill in a RUNNING trial go to the page cache; the next state change (the
      trial's outcome), study-level write or enqueued trial is fsynced, and an fsync makes
      everything written to the file before it durable. So after a power loss the journal
      holds every finished trial; what can be lost is the part of a trial still running,
      which the reaper would have failed and retried anyway. A killed *process* loses
      nothing: its writes are in the page cache.
    - **flock(2) instead of Optuna's symlink lock**: a waiting worker sleeps in the kernel
      until the holder releases, where the symlink lock polls with a backoff from 1 ms up to
      1 s, and a holder killed mid-append
      releases at once instead of after the symlink lock's 30 s grace period. Every writer of
      the file must therefore go through this backend (all of marginlab's do); readers such as
      optuna-dashboard need no lock. The lock file is opened per append, so a forked process
      never shares the parent's lock.
    """

    def __init__(self, file_path: str) -> None:
        super().__init__(file_path)
        self._lock_file_path = file_path + ".flock"
        self.recovered_bytes = 0
        with self._locked():
            self.recovered_bytes = self._cut_torn_tail()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_fd = os.open(self._lock_file_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock_fd)  # closing releases the lock

    def _cut_torn_tail(self) -> int:
        """Under the append lock: cut an unterminated last record; returns the bytes cut.

        Every append ends with a newline and holds the lock, so a file not ending with one
        was left by a writer that died mid-write (SIGKILL in ``write``) or by a power cut
        that kept only part of the last pages. The torn record never finished (an fsynced
        record is whole), and Optuna's reader already skips it, so cutting it loses nothing
        a reader saw.
        """
        with open(self._file_path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            # Scan back in blocks for the last newline: records are a few hundred bytes.
            end = size
            keep = 0
            while end > 0:
                start = max(0, end - 65_536)
                f.seek(start)
                block = f.read(end - start)
                at = block.rfind(b"\n")
                if at >= 0:
                    keep = start + at + 1
                    break
                end = start
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        cut = size - keep
        log.warning("journal %s: cut a torn last record (%d bytes at offset %d, no final "
                    "newline) left by an interrupted write", self._file_path, cut, keep)
        return cut

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
        durable = any(_needs_fsync(log) for log in logs)
        with self._locked():
            # A writer of another process may have died mid-append since the open.
            self._cut_torn_tail()
            with open(self._file_path, "ab") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())


#: Cut the last record of a Redis journal if it is still the last one and still unreadable
#: (KEYS[1] the counter, KEYS[2] the record; ARGV[1] the counter's value, ARGV[2] the
#: record's value as read, empty for a missing one). One script: no append can slip between
#: the check and the cut.
_CUT_REDIS_TAIL = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
local value = redis.call('get', KEYS[2])
if (value or '') ~= ARGV[2] then return 0 end
redis.call('del', KEYS[2])
redis.call('decr', KEYS[1])
return 1
"""


class RecoveringRedisBackend(JournalRedisBackend):
    """Optuna's Redis journal (same keys, same reader), with its tail checked on open.

    Records are separate keys ``:log:N`` under a counter ``:log_number``; Optuna writes the
    counter and the record in one Lua script, so a killed writer cannot leave half a record
    and a Redis killed mid-write replays whole scripts (AOF) or nothing (RDB snapshot). What
    can still exist is a last record that is missing (counter ahead of the records: the
    non-atomic cluster-mode writer, a partial restore; Optuna's reader then waits for it
    forever) or not JSON (a partial restore, a hand edit; Optuna's reader skips it while it
    is last and raises on every read once anything is appended after it). Either is cut on
    open and logged, as the file journal's torn line is.
    """

    def __init__(self, url: str, use_cluster: bool = False, prefix: str = "") -> None:
        super().__init__(url, use_cluster, prefix)
        self.recovered_records = self._cut_unreadable_tail()

    def _cut_unreadable_tail(self) -> int:
        counter = f"{self._prefix}:log_number"
        cut = 0
        while True:
            raw = self._redis.get(counter)
            if raw is None or int(raw) < 0:
                return cut
            last = int(raw)
            key = self._key_log_id(last)
            value = self._redis.get(key)
            if value is not None:
                try:
                    json.loads(value)
                    return cut
                except ValueError:
                    pass
            if not self._redis.eval(_CUT_REDIS_TAIL, 2, counter, key, raw,
                                    value if value is not None else b""):
                continue  # appended meanwhile: look at the new tail
            cut += 1
            log.warning("Redis journal: cut unreadable last record %d (%s)", last,
                        "missing" if value is None else f"{len(value)} bytes, not JSON")


def retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a stale trial's parameters again (at most ``MAX_RETRY`` times).

    Like Optuna's ``RetryHeartbeatStaleTrialCallback``, but the retry inherits neither the
    dead trial's constraint values nor its metrics: a worker killed after recording them
    would otherwise leave values the retry cannot overwrite (Optuna ignores a second
    ``set_constraint`` of the same key).
    """
    history = [*trial.user_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return
    study.enqueue_trial(trial.params, user_attrs={"retry_history": history},
                        skip_if_exists=False)


class Heartbeat(ABC):
    """Liveness of running trials for storages without Optuna's own heartbeat."""

    __slots__ = ()

    @abstractmethod
    def beat(self, trial_id: int) -> None:
        """Record that the trial's worker is alive now."""

    @abstractmethod
    def last_beat(self, trial_id: int) -> float | None:
        """Epoch seconds of the trial's last beat, or ``None`` if it never beat."""

    def forget(self, trial_id: int) -> None:  # noqa: B027 - optional hook
        """Drop the trial's record once it finished."""


class _FileHeartbeat(Heartbeat):
    __slots__ = ("_dir",)

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def beat(self, trial_id: int) -> None:
        path = self._dir / str(trial_id)
        path.touch()
        os.utime(path)

    def last_beat(self, trial_id: int) -> float | None:
        try:
            return (self._dir / str(trial_id)).stat().st_mtime
        except FileNotFoundError:
            return None

    def forget(self, trial_id: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._dir / str(trial_id)).unlink()


class _RedisHeartbeat(Heartbeat):
    __slots__ = ("_client", "_prefix")

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    def beat(self, trial_id: int) -> None:
        self._client.set(f"{self._prefix}{trial_id}", repr(time.time()), ex=86_400)

    def last_beat(self, trial_id: int) -> float | None:
        value = self._client.get(f"{self._prefix}{trial_id}")
        return None if value is None else float(value)

    def forget(self, trial_id: int) -> None:
        self._client.delete(f"{self._prefix}{trial_id}")


class _MemoryHeartbeat(Heartbeat):
    __slots__ = ("_beats",)

    def __init__(self) -> None:
        self._beats: dict[int, float] = {}

    def beat(self, trial_id: int) -> None:
        self._beats[trial_id] = time.time()

    def last_beat(self, trial_id: int) -> float | None:
        return self._beats.get(trial_id)


class Coordination:
    """Storage plus the slot lock and heartbeat that go with it (see the module docstring).

    Attributes:
        url: the storage URL as given.
        kind: ``file``, ``redis``, ``postgresql``, ``sqlite`` or ``memory``.
        storage: the Optuna storage.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.kind, target = _kind(url)
        self._thread_lock = threading.Lock()
        self._redis: Any = None
        self._lock_path: Path | None = None
        self._heartbeat: Heartbeat | None = None
        # One beater thread per Coordination beats every trial inside ``heartbeat()``:
        # a thread started and joined per trial cost 0.2–1 ms on a busy 2-core machine.
        self._beating: set[int] = set()
        self._beating_lock = threading.Lock()
        self._beater: threading.Thread | None = None
        self._beater_stop = threading.Event()
        try:
            self.storage = self._open(target)
        except MarginlabError:
            raise
        except ValueError as exc:  # a journal record Optuna cannot decode (not a torn tail)
            raise StorageUnavailable(f"storage {url!r} is not readable: {exc}") from exc
        except Exception as exc:  # driver errors differ per backend
            raise StorageUnavailable(f"cannot open storage {url!r}: {exc}") from exc

    def _open(self, target: str) -> BaseStorage:
        if self.kind == "memory":
            self._heartbeat = _MemoryHeartbeat()
            return InMemoryStorage()
        if self.kind == "file":
            path = Path(target).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_path = path.with_name(path.name + ".slots.lock")
            self._heartbeat = _FileHeartbeat(path.with_name(path.name + ".heartbeats"))
            return JournalStorage(TrialCommitFileBackend(str(path)))
        if self.kind == "redis":
            import redis

            # A host that drops packets must fail in seconds, not the OS's TCP timeout.
            if "socket_connect_timeout" not in target:
                target += ("&" if "?" in target else "?") + "socket_connect_timeout=5"
            self._redis = redis.Redis.from_url(target)
            self._redis.ping()
            self._heartbeat = _RedisHeartbeat(self._redis, "marginlab:heartbeat:")
            with warnings.catch_warnings():
                # Experimental since Optuna 3.1; a warning here would fail the open under -W error.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return JournalStorage(RecoveringRedisBackend(target))
        url = _rdb_url(target)
        if self.kind == "sqlite":
            self._lock_path = Path(url.removeprefix("sqlite:///") + ".slots.lock")
        with warnings.catch_warnings():
            # The heartbeat is marked experimental; it is the documented way to reap trials.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=int(HEARTBEAT_INTERVAL_S) or 1,
                grace_period=int(STALE_AFTER_S),
                heartbeat_stale_trial_callback=retry_stale_trial,
                engine_kwargs=({"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}}
                               if self.kind == "postgresql" else None),
            )

    def readable(self) -> None:
        """Replay every study of the storage (raises if a record cannot be read)."""
        self.storage.get_all_studies()

    def close(self) -> None:
        """Release connections (database pools, Redis clients) and stop the beater."""
        self._beater_stop.set()
        if self._beater is not None:
            self._beater.join()
            self._beater = None
        if isinstance(self.storage, RDBStorage):
            self.storage.remove_session()
            self.storage.engine.dispose()
        if self._redis is not None:
            self._redis.close()

    def __enter__(self) -> Coordination:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def slot_lock(self, study_name: str) -> Iterator[None]:
        """Mutual exclusion across workers (processes and machines) for one study."""
        with self._thread_lock:
            if self._lock_path is not None:
                with open(self._lock_path, "a+") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    try:
                        yield
                    finally:
                        fcntl.flock(handle, fcntl.LOCK_UN)
            elif self.kind == "redis":
                with self._redis.lock(f"marginlab:slots:{study_name}", timeout=60,
                                      blocking_timeout=120):
                    yield
            elif self.kind == "postgresql":
                key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big",
                                     signed=True)
                assert isinstance(self.storage, RDBStorage)
                with self.storage.engine.connect() as conn:
                    from sqlalchemy import text

                    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                    try:
                        yield
                    finally:
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            else:
                yield

    @property
    def native_heartbeat(self) -> bool:
        """Whether Optuna's own heartbeat covers this storage (RDB)."""
        return isinstance(self.storage, RDBStorage)

    def beat(self, trial_id: int) -> None:
        """Record that a running trial's worker is alive."""
        if isinstance(self.storage, RDBStorage):
            self.storage.record_heartbeat(trial_id)
        elif self._heartbeat is not None:
            self._heartbeat.beat(trial_id)

    def finished(self, trial_id: int) -> None:
        """Forget a finished trial's heartbeat."""
        if self._heartbeat is not None:
            self._heartbeat.forget(trial_id)

    @contextlib.contextmanager
    def heartbeat(self, trial_id: int) -> Iterator[None]:
        """Beat now and every ``HEARTBEAT_INTERVAL_S`` while the block runs; forget after."""
        self.beat(trial_id)
        with self._beating_lock:
            self._beating.add(trial_id)
            if self._beater is None:
                self._beater_stop.clear()
                self._beater = threading.Thread(target=self._beat_loop,
                                                name="marginlab-heartbeat", daemon=True)
                self._beater.start()
        try:
            yield
        finally:
            with self._beating_lock:  # no beat for the trial once it is forgotten
                self._beating.discard(trial_id)
                self.finished(trial_id)

    def _beat_loop(self) -> None:
        while not self._beater_stop.wait(HEARTBEAT_INTERVAL_S):
            with self._beating_lock:
                for trial_id in list(self._beating):
                    with contextlib.suppress(Exception):  # a missed beat is retried next time
                        self.beat(trial_id)

    def _beat_orphans(self, running: list[optuna.trial.FrozenTrial]) -> None:
        """RDB: beat once for each RUNNING trial that started over ``STALE_AFTER_S`` ago and
        never beat (its worker died between ``ask`` and the first beat). Optuna's check
        skips trials without a heartbeat, so such a trial would stay RUNNING forever; with
        this beat it goes stale after the grace period like any other."""
        assert isinstance(self.storage, RDBStorage)
        cutoff = time.time() - STALE_AFTER_S
        old = [t._trial_id for t in running
               if t.datetime_start is not None and t.datetime_start.timestamp() < cutoff]
        if not old:
            return
        from sqlalchemy import bindparam, text

        query = text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids")
        with self.storage.engine.connect() as conn:
            beaten = {row[0] for row in conn.execute(
                query.bindparams(bindparam("ids", expanding=True)), {"ids": old})}
        for trial_id in old:
            if trial_id not in beaten:
                self.storage.record_heartbeat(trial_id)

    def reap_stale_trials(self, study: optuna.Study) -> list[int]:
        """Fail RUNNING trials whose worker stopped beating and enqueue their params again.

        Call under ``slot_lock`` so two reapers never retry the same trial. Returns the
        numbers of the trials failed.
        """
        if isinstance(self.storage, RDBStorage):
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            before = {t.number for t in running}
            self._beat_orphans(running)
            with warnings.catch_warnings():
                # Experimental (a warning on every call) yet the documented way to reap.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            after = {t.number for t in study.get_trials(deepcopy=False,
                                                         states=(TrialState.RUNNING,))}
            return sorted(before - after)
        assert self._heartbeat is not None
        now = time.time()
        reaped = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            last = self._heartbeat.last_beat(trial._trial_id)
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            if (last if last is not None else started) > now - STALE_AFTER_S:
                continue
            try:
                self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # finished meanwhile
            self._heartbeat.forget(trial._trial_id)
            reaped.append(trial.number)
            retry_stale_trial(study, trial)
        return reaped
