"""Contract of ``calibration.storage.Coordination`` over every backend.

One suite, parametrized over memory, a journal file, SQLite, the Redis journal and
PostgreSQL (the last two are the real services on this machine, ``integration``): open and
close, studies and trials, the slot lock across threads and processes, heartbeats, the reaper
of stale trials, and the errors for unreachable or unsupported storages.

Redis: the suite claims an empty database number (10..15) for the session and flushes only
that one. PostgreSQL: a fresh database is created for the session and dropped afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.storages import InMemoryStorage, JournalStorage, RDBStorage
from optuna.trial import TrialState

from calibration import storage as storage_module
from calibration._errors import InvalidParameters
from calibration.calibrate import (
    StudyMismatch,
    create_or_load_study,
    load_study,
    prepare,
    run_worker,
)
from calibration.spec import decode_spec
from calibration.storage import Coordination, StorageUnavailable
from tests.conftest import walk_frame

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
POSTGRES_DSN = "host=127.0.0.1 port=5432 user=postgres connect_timeout=5"
#: Redis database numbers the tests may claim (an empty one, marked by ``CLAIM_KEY``).
REDIS_DBS = range(10, 16)
CLAIM_KEY = "marginlab-tests:claim"


# --------------------------------------------------------------------------- services


@contextlib.contextmanager
def claimed_redis_db() -> Iterator[str]:
    """Claim an empty Redis database for this process (a marker key set with NX), yield its
    URL, and flush that database (only it) afterwards."""
    import redis

    for db in REDIS_DBS:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=5)
        try:
            try:
                if client.dbsize() != 0:
                    continue
            except redis.ConnectionError:
                pytest.skip(f"Redis at {REDIS_HOST}:{REDIS_PORT} is unreachable")
            if not client.set(CLAIM_KEY, f"pid {os.getpid()}", nx=True, ex=3600):
                continue
            try:
                yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
            finally:
                client.flushdb()
            return
        finally:
            client.close()
    pytest.fail(f"no empty Redis database among {list(REDIS_DBS)} to run the tests in")


def clear_redis_db(url: str) -> None:
    """Delete every key of the claimed database but the claim itself."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = [k for k in client.scan_iter(count=1000) if k != CLAIM_KEY.encode()]
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextlib.contextmanager
def fresh_postgres_db() -> Iterator[str]:
    """Create a database of its own on the local PostgreSQL, yield its URL, drop it after."""
    import psycopg

    name = f"marginlab_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(POSTGRES_DSN + " dbname=postgres", autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is unreachable: {exc}")
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis database claimed for this session."""
    with claimed_redis_db() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The PostgreSQL database created for this session."""
    with fresh_postgres_db() as url:
        yield url


KINDS = [
    "memory",
    "file",
    "sqlite",
    pytest.param("redis", marks=pytest.mark.integration),
    pytest.param("postgresql", marks=pytest.mark.integration),
]
SHARED_KINDS = KINDS[1:]


@pytest.fixture
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A storage URL of the parametrized kind, empty for this test."""
    kind = request.param
    if kind == "memory":
        return "memory"
    if kind == "file":
        return f"journal:{tmp_path / 'studies.log'}"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    if kind == "redis":
        value: str = request.getfixturevalue("redis_url")
        clear_redis_db(value)
        return value
    assert kind == "postgresql"
    pg: str = request.getfixturevalue("postgres_url")
    return pg


def _kind_of(url: str) -> str:
    if url == "memory":
        return "memory"
    for prefix, kind in (("journal:", "file"), ("sqlite:", "sqlite"), ("redis:", "redis"),
                         ("postgresql:", "postgresql")):
        if url.startswith(prefix):
            return kind
    raise AssertionError(url)


def _name() -> str:
    return f"contract-{uuid.uuid4().hex[:10]}"


def _study(coordination: Coordination, name: str | None = None) -> optuna.Study:
    return optuna.create_study(storage=coordination.storage, study_name=name or _name(),
                               directions=["minimize", "minimize"], load_if_exists=True)


def _ask(study: optuna.Study) -> optuna.Trial:
    """study.ask() without Optuna's warning that RDB heartbeats are meant for optimize()."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed", UserWarning)
        return study.ask()


def _running_trial(study: optuna.Study) -> optuna.Trial:
    """Ask a trial and suggest two parameters (what a worker does before evaluating)."""
    trial = _ask(study)
    trial.suggest_float("x", 0.0, 1.0)
    trial.suggest_int("n", 1, 9)
    return trial


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------- open / close


@pytest.mark.parametrize("url", KINDS, indirect=True)
def test_open_maps_url_to_storage_and_closes(url: str) -> None:
    """Each URL opens the right Optuna storage, and close() releases it (twice is harmless)."""
    kind = _kind_of(url)
    expected = {"memory": InMemoryStorage, "file": JournalStorage, "redis": JournalStorage,
                "sqlite": RDBStorage, "postgresql": RDBStorage}[kind]
    with Coordination(url) as coordination:
        assert coordination.kind == kind
        assert coordination.url == url
        assert isinstance(coordination.storage, expected)
        assert coordination.native_heartbeat is (kind in ("sqlite", "postgresql"))
        _study(coordination)
    if isinstance(coordination.storage, RDBStorage):
        assert coordination.storage.engine.pool.checkedout() == 0
    coordination.close()


@pytest.mark.parametrize(
    ("spelling", "relative"),
    [
        ("{root}/bare.log", "bare.log"),
        ("file:{root}/f.log", "f.log"),
        ("journal:{root}/sub/j.log", "sub/j.log"),
        ("journal://{root}/j2.log", "j2.log"),
    ],
)
def test_file_url_spellings_open_a_journal(tmp_path: Path, spelling: str,
                                           relative: str) -> None:
    """A bare path, file:PATH, journal:PATH and journal://PATH open a journal at that path."""
    url = spelling.format(root=tmp_path)
    with Coordination(url) as coordination:
        assert coordination.kind == "file"
        assert isinstance(coordination.storage, JournalStorage)
        study = _study(coordination, "s")
        study.tell(_ask(study), [1.0, 2.0])
    journal = tmp_path / relative
    assert journal.is_file()
    assert journal.stat().st_size > 0


@pytest.mark.integration
def test_postgres_alias_opens_rdb(postgres_url: str) -> None:
    """postgres:// is accepted as an alias of postgresql:// (psycopg 3 driver)."""
    alias = "postgres://" + postgres_url.removeprefix("postgresql://")
    with Coordination(alias) as coordination:
        assert coordination.kind == "postgresql"
        assert isinstance(coordination.storage, RDBStorage)
        assert coordination.storage.engine.dialect.driver == "psycopg"


# --------------------------------------------------------------------------- studies


@pytest.mark.parametrize("url", KINDS, indirect=True)
def test_study_trials_persist_and_are_shared(url: str) -> None:
    """Trials told through one Coordination are seen, with values, through a second one."""
    name = _name()
    with Coordination(url) as first:
        study = _study(first, name)
        for i in range(3):
            with first.slot_lock(name):
                trial = _running_trial(study)
            with first.heartbeat(trial._trial_id):
                study.tell(trial, [float(i), 10.0 - i])
        if url == "memory":
            seen = optuna.load_study(study_name=name, storage=first.storage).get_trials()
        else:
            with Coordination(url) as second:
                seen = optuna.load_study(study_name=name, storage=second.storage).get_trials()
    assert [t.state for t in seen] == [TrialState.COMPLETE] * 3
    assert [t.values for t in seen] == [[0.0, 10.0], [1.0, 9.0], [2.0, 8.0]]
    assert all(set(t.params) == {"x", "n"} for t in seen)


def _write_small_data(root: Path) -> Path:
    """20k 30-minute bars of a seeded normal random walk and a small ewma spec."""
    walk_frame(20_000, seed=7).to_csv(root / "bars.csv", index=False)
    spec = {
        "data": [{"instrument": "SYN", "ref": "bars.csv"}],
        "model": "ewma",
        "search_space": {"decay": {"low": 0.9, "high": 0.99},
                         "confidence": {"low": 0.99, "high": 0.999},
                         "floor_rate": {"value": 0.01}, "apc_buffer": {"value": 0.5},
                         "horizon_bars": {"value": 4}, "warmup_bars": {"value": 200}},
        "stress_windows": [],
        "liquidation": {"leverages": [5, 20], "notionals_usd": [10000]},
        "n_trials": 4,
        "seed": 2,
    }
    path = root / "spec.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("url", KINDS, indirect=True)
def test_calibration_study_runs_and_resumes(url: str, tmp_path: Path) -> None:
    """run_worker fills a study to n_trials; a re-run adds none; another spec is refused."""
    spec = decode_spec(_write_small_data(tmp_path).read_bytes())
    prepared = prepare(spec, tmp_path)
    name = _name()
    with Coordination(url) as coordination:
        study = create_or_load_study(spec, prepared, coordination, name)
        assert run_worker(study, prepared, coordination, n_trials=spec.n_trials) == 4
        again = create_or_load_study(spec, prepared, coordination, name)
        assert run_worker(again, prepared, coordination, n_trials=spec.n_trials) == 0
        loaded, loaded_spec = load_study(name, coordination)
        assert loaded_spec == spec
        states = [t.state for t in loaded.get_trials()]
        other = decode_spec(json.dumps({**json.loads(tmp_path.joinpath("spec.json").read_text()),
                                        "seed": 3}))
        with pytest.raises(StudyMismatch):
            create_or_load_study(other, prepared, coordination, name)
        with pytest.raises(InvalidParameters):
            load_study("no-such-study", coordination)
    assert len(states) == 4
    assert all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)


# --------------------------------------------------------------------------- slot lock


def _count_under_lock(coordination: Coordination, name: str, counter: list[int],
                      inside: list[int], peak: list[int], n: int) -> None:
    for _ in range(n):
        with coordination.slot_lock(name):
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            value = counter[0]
            time.sleep(0.001)
            counter[0] = value + 1
            inside[0] -= 1


@pytest.mark.parametrize("url", KINDS, indirect=True)
def test_slot_lock_excludes_threads_sharing_a_coordination(url: str) -> None:
    """Threads sharing one Coordination never hold the slot lock together (no lost update)."""
    counter, inside, peak = [0], [0], [0]
    n = 8 if url.startswith("redis") else 20
    with Coordination(url) as coordination:
        threads = [threading.Thread(target=_count_under_lock,
                                    args=(coordination, "s", counter, inside, peak, n))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert counter[0] == 4 * n
    assert peak[0] == 1


@pytest.mark.parametrize("url", SHARED_KINDS, indirect=True)
def test_slot_lock_excludes_threads_with_own_coordinations(url: str) -> None:
    """Threads each with their own Coordination (as separate workers) exclude each other."""
    counter, inside, peak = [0], [0], [0]
    n = 8 if url.startswith("redis") else 20
    with Coordination(url):  # creates the schema once (RDB) before the threads race
        pass

    def work() -> None:
        with Coordination(url) as own:
            _count_under_lock(own, "s", counter, inside, peak, n)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter[0] == 3 * n
    assert peak[0] == 1


_LOCK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from calibration.storage import Coordination
    url, counter, log, ready, go, n = sys.argv[1:7]
    with Coordination(url) as coordination:
        Path(ready).touch()
        deadline = time.time() + 60
        while not os.path.exists(go):
            if time.time() > deadline:
                raise SystemExit("no go signal")
            time.sleep(0.005)
        for _ in range(int(n)):
            with coordination.slot_lock("shared-counter"):
                start = time.time()
                value = int(Path(counter).read_text())
                time.sleep(0.002)
                Path(counter).write_text(str(value + 1))
                end = time.time()
            with open(log, "a") as handle:
                handle.write(f"{os.getpid()} {start!r} {end!r}\\n")
            time.sleep(0.02)
""")


@pytest.mark.parametrize("url", SHARED_KINDS, indirect=True)
def test_slot_lock_excludes_processes(url: str, tmp_path: Path) -> None:
    """Two processes counting under the slot lock lose no update and never overlap."""
    n = 15
    counter = tmp_path / "counter"
    counter.write_text("0")
    log = tmp_path / "log"
    go = tmp_path / "go"
    with Coordination(url):  # creates the schema once (RDB) before the processes race
        pass
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOCK_SCRIPT, url, str(counter), str(log),
                          str(tmp_path / f"ready{i}"), str(go), str(n)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        deadline = time.time() + 60
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.time() < deadline, "the lock processes did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert int(counter.read_text()) == 2 * n
    rows = sorted((float(s), float(e), pid) for pid, s, e in
                  (line.split() for line in log.read_text().splitlines()))
    assert len(rows) == 2 * n
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(rows))
    switches = sum(a[2] != b[2] for a, b in itertools.pairwise(rows))
    assert switches >= 1


# --------------------------------------------------------------------------- heartbeats


def _last_beat(coordination: Coordination, trial_id: int) -> float | None:
    """When the trial last beat (epoch seconds, or the database's clock for RDB)."""
    storage = coordination.storage
    if isinstance(storage, RDBStorage):
        table = sqlalchemy.Table("trial_heartbeats", sqlalchemy.MetaData(),
                                 autoload_with=storage.engine)
        with storage.engine.connect() as conn:
            value = conn.execute(sqlalchemy.select(table.c.heartbeat)
                                 .where(table.c.trial_id == trial_id)).scalar()
        return None if value is None else value.timestamp()
    heartbeat = coordination._heartbeat
    assert heartbeat is not None
    return heartbeat.last_beat(trial_id)


@pytest.mark.parametrize("url", KINDS, indirect=True)
def test_heartbeat_beats_while_the_block_runs(url: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """beat() records a beat; heartbeat() beats while its block runs, then forgets it."""
    monkeypatch.setattr(storage_module, "HEARTBEAT_INTERVAL_S", 0.05)
    with Coordination(url) as coordination:
        study = _study(coordination)
        trial = _running_trial(study)
        tid = trial._trial_id
        assert _last_beat(coordination, tid) is None
        coordination.beat(tid)
        first = _last_beat(coordination, tid)
        assert first is not None
        if coordination.kind != "sqlite":  # SQLite's CURRENT_TIMESTAMP has 1 s resolution
            assert abs(first - time.time()) < 5
        beats: list[float | None] = []
        with coordination.heartbeat(tid):
            for _ in range(3):
                time.sleep(0.3 if coordination.kind != "sqlite" else 1.1)
                beats.append(_last_beat(coordination, tid))
        assert all(b is not None for b in beats)
        assert beats[-1] > first  # type: ignore[operator]
        after = _last_beat(coordination, tid)
        if coordination.kind in ("file", "redis"):
            assert after is None
        study.tell(trial, [1.0, 1.0])


def _retry_marks(trial: optuna.trial.FrozenTrial) -> list[int]:
    """The trial numbers a retry descends from (ours for journals, Optuna's for RDB)."""
    history: list[int] = (trial.user_attrs.get("retry_history")
                          or trial.system_attrs.get("retry_history") or [])
    return history


def _queued_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A WAITING trial's parameters: enqueued as fixed params (journals) or set (RDB)."""
    params: dict[str, Any] = trial.params or trial.system_attrs.get("fixed_params", {})
    return params


@pytest.mark.parametrize("url", KINDS, indirect=True)
def test_reap_fails_stale_trials_and_retries_their_params(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials that stopped (or never started) beating are failed and retried, up to MAX_RETRY."""
    monkeypatch.setattr(storage_module, "STALE_AFTER_S", 1.0)
    monkeypatch.setattr(storage_module, "HEARTBEAT_INTERVAL_S", 1.0)
    monkeypatch.setattr(storage_module, "MAX_RETRY", 1)
    kind = _kind_of(url)
    # RDB heartbeats use the database clock (SQLite: whole seconds).
    wait = 2.2 if kind == "sqlite" else 1.3
    name = _name()
    with Coordination(url) as coordination:
        rdb = coordination.native_heartbeat
        study = _study(coordination, name)
        dead = _running_trial(study)
        coordination.beat(dead._trial_id)
        alive = _running_trial(study)
        coordination.beat(alive._trial_id)
        done = _running_trial(study)
        study.tell(done, [1.0, 2.0])
        never = _running_trial(study)  # its worker died before the first beat
        with coordination.slot_lock(name):
            assert coordination.reap_stale_trials(study) == []
        time.sleep(wait)
        coordination.beat(alive._trial_id)
        with coordination.slot_lock(name):
            reaped = coordination.reap_stale_trials(study)
        # Journals judge a trial that never beat by its start; RDB beats it once for it.
        first = [dead.number] if rdb else [dead.number, never.number]
        assert reaped == first
        with coordination.slot_lock(name):
            assert coordination.reap_stale_trials(study) == []  # nothing twice
        trials = study.get_trials()
        by_number = {t.number: t for t in trials}
        assert by_number[dead.number].state == TrialState.FAIL
        assert by_number[alive.number].state == TrialState.RUNNING
        assert by_number[done.number].state == TrialState.COMPLETE
        assert by_number[never.number].state == (TrialState.RUNNING if rdb
                                                 else TrialState.FAIL)
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        assert [_retry_marks(t) for t in waiting] == [[n] for n in first]
        assert _queued_params(waiting[0]) == by_number[dead.number].params

        # The retry is asked like any trial and gets the dead trial's parameters.
        with coordination.slot_lock(name):
            retry = _ask(study)
        assert retry.number == waiting[0].number
        assert retry.suggest_float("x", 0.0, 1.0) == by_number[dead.number].params["x"]
        assert retry.suggest_int("n", 1, 9) == by_number[dead.number].params["n"]
        coordination.beat(retry._trial_id)
        time.sleep(wait)
        coordination.beat(alive._trial_id)
        with coordination.slot_lock(name):
            reaped = coordination.reap_stale_trials(study)
        assert reaped == ([never.number, retry.number] if rdb else [retry.number])
        trials = study.get_trials()
        assert trials[retry.number].state == TrialState.FAIL
        assert trials[never.number].state == TrialState.FAIL
        assert trials[alive.number].state == TrialState.RUNNING
        # MAX_RETRY = 1: the retry of a retry is not enqueued; the never-beaten one is.
        waiting_after = [t for t in trials if t.state == TrialState.WAITING]
        assert [_retry_marks(t) for t in waiting_after] == [[never.number]]
        assert _queued_params(waiting_after[0]) == trials[never.number].params
        study.tell(alive, [0.5, 0.5])


# --------------------------------------------------------------------------- errors


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "make_url",
    [
        lambda: f"redis://127.0.0.1:{_closed_port()}/0",
        lambda: f"postgresql://postgres@127.0.0.1:{_closed_port()}/marginlab",
        lambda: "postgresql://postgres@no-such-host.invalid:5432/marginlab",
    ],
    ids=["redis-closed-port", "postgres-closed-port", "postgres-bad-host"],
)
def test_unreachable_storage_raises_quickly(make_url: Any) -> None:
    """An unreachable Redis or PostgreSQL raises StorageUnavailable within seconds."""
    url = make_url()
    start = time.monotonic()
    with pytest.raises(StorageUnavailable, match="cannot open storage") as info:
        Coordination(url)
    assert time.monotonic() - start < 5
    assert isinstance(info.value, ConnectionError)


@pytest.mark.parametrize("url", ["mysql://root@127.0.0.1/db", "http://example.com/studies",
                                 "s3://bucket/studies.log"])
def test_unsupported_url_is_invalid_parameters(url: str) -> None:
    """A URL scheme marginlab does not support is refused as InvalidParameters(storage)."""
    with pytest.raises(InvalidParameters, match="unsupported storage") as info:
        Coordination(url)
    assert info.value.field == "storage"


@pytest.mark.integration
def test_missing_postgres_database_is_unavailable(postgres_url: str) -> None:
    """A PostgreSQL URL naming a database that does not exist raises StorageUnavailable."""
    url = postgres_url.rsplit("/", 1)[0] + f"/missing_{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageUnavailable):
        Coordination(url)



# --------------------------------------------------------------------------- journal file


def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every fsync of the journal file backend (and still do it)."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_journal_file_fsyncs_once_per_finished_trial(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial's creation, parameters and attributes go to the page cache; its outcome is
    fsynced (which makes them durable too), as is any study-level write or enqueued trial."""
    with Coordination(f"journal:{tmp_path / 'j.log'}") as coordination:
        study = _study(coordination)
        calls = _fsyncs(monkeypatch)
        trial = _running_trial(study)  # create + 2 params
        trial.set_user_attr("metrics_json", "{}")
        trial.set_constraint("violation", 0.0)
        assert calls == []
        study.tell(trial, [1.0, 2.0])
        assert len(calls) == 1
        study.enqueue_trial({"x": 0.5, "n": 3})
        assert len(calls) == 2
        study.set_user_attr("note", "study-level")
        assert len(calls) == 3
        retry = _ask(study)  # pops the WAITING trial: a state change
        assert len(calls) == 4
        study.tell(retry, state=TrialState.FAIL)
        assert len(calls) == 5


def test_journal_file_reads_back_with_optunas_own_backend(tmp_path: Path) -> None:
    """Same file format: Optuna's JournalFileBackend (optuna-dashboard, scripts) reads it."""
    path = tmp_path / "j.log"
    with Coordination(f"journal:{path}") as coordination:
        study = _study(coordination, "readable")
        for value in (0.25, 0.75):
            trial = _ask(study)
            x = trial.suggest_float("x", 0.0, 1.0)
            study.tell(trial, [value, x])
        written = [(t.params, t.values, t.state) for t in study.get_trials()]
    plain = JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    read = optuna.load_study(study_name="readable", storage=plain).get_trials()
    assert [(t.params, t.values, t.state) for t in read] == written
    assert len(written) == 2


def test_journal_file_lock_of_a_killed_writer_is_released(tmp_path: Path) -> None:
    """The append lock is flock(2): a writer SIGKILLed while holding it releases it at once
    (Optuna's symlink lock would stay until its 30 s grace period)."""
    path = tmp_path / "j.log"
    with Coordination(f"journal:{path}") as coordination:
        study = _study(coordination)
        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import fcntl, os, sys, time
                fd = os.open({str(path) + ".flock"!r}, os.O_RDWR | os.O_CREAT)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("locked", flush=True)
                time.sleep(600)
            """)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "locked"
            done = threading.Event()

            def append() -> None:
                study.set_user_attr("after", 1)
                done.set()

            writer = threading.Thread(target=append, daemon=True)
            writer.start()
            assert not done.wait(0.5), "the append must wait while another process holds it"
            holder.kill()
            assert done.wait(10.0), "the lock of a killed holder was not released"
        finally:
            holder.kill()
            holder.communicate()
        assert study.user_attrs["after"] == 1


# --------------------------------------------------------------------------- torn journals

#: (journal, how its last record is torn): a file's last line cut short; a Redis record's
#: value cut short, or the record counter ahead of a record never written.
TORN = [
    pytest.param("file", "half", id="file-half"),
    pytest.param("redis", "half", id="redis-half", marks=pytest.mark.integration),
    pytest.param("redis", "missing", id="redis-missing", marks=pytest.mark.integration),
]


def _redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def _tear_last_record(url: str, how: str) -> None:
    """Leave the journal's last record as an interrupted write would.

    File: cut in the middle of the last line (a power cut keeps part of the last pages).
    Redis: the last record's value cut in half (``half``), or the counter ahead of a
    record never written (``missing``).
    """
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        data = path.read_bytes()
        last_start = data.rstrip(b"\n").rfind(b"\n") + 1
        last_len = len(data) - last_start
        with path.open("r+b") as f:
            f.truncate(last_start + last_len // 2)
        assert not path.read_bytes().endswith(b"\n")
        return
    client = _redis_client(url)
    try:
        last = int(client.get(":log_number"))
        if how == "half":
            value = client.get(f":log:{last}")
            client.set(f":log:{last}", value[: len(value) // 2])
        else:
            client.incr(":log_number")
    finally:
        client.close()


@pytest.mark.parametrize(("url", "how"), TORN, indirect=["url"])
def test_torn_last_record_is_cut_on_open_and_appends_stay_readable(
        url: str, how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A journal whose last record is torn opens with that record cut (and logged); the
    study's trials are all there, a new calibration appends, and every later open reads
    everything (on main the first append was glued to the torn half and every read failed)."""
    spec = decode_spec(_write_small_data(tmp_path).read_bytes())
    prepared = prepare(spec, tmp_path)
    name = _name()
    with Coordination(url) as coordination:
        study = create_or_load_study(spec, prepared, coordination, name)
        run_worker(study, prepared, coordination, n_trials=spec.n_trials)
        before = [(t.number, t.state, t.values) for t in study.get_trials()]
        # The record to tear: a study-level write after the last trial finished.
        study.set_user_attr("torn", "never complete")
    _tear_last_record(url, how)

    with caplog.at_level("WARNING", logger="marginlab.storage"), Coordination(url) as reopened:
        reopened.readable()
        loaded = optuna.load_study(study_name=name, storage=reopened.storage)
        assert [(t.number, t.state, t.values) for t in loaded.get_trials()] == before
        # A half record is cut; a missing one after a whole record leaves that record.
        assert ("torn" in loaded.user_attrs) is (how == "missing")
        other = decode_spec(json.dumps({**json.loads((tmp_path / "spec.json").read_text()),
                                        "seed": 5}))
        fresh = create_or_load_study(other, prepare(other, tmp_path), reopened, _name())
        assert run_worker(fresh, prepared, reopened, n_trials=other.n_trials) == 4
    assert any("cut" in r.getMessage() for r in caplog.records)

    with Coordination(url) as again:
        again.readable()
        names = optuna.study.get_all_study_names(storage=again.storage)
        assert name in names
        assert fresh.study_name in names
        assert len(optuna.load_study(study_name=fresh.study_name,
                                     storage=again.storage).get_trials()) == 4
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        # Optuna's own reader agrees: every line is whole JSON.
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b""
        assert all(json.loads(line) for line in lines[:-1])


def test_torn_tail_left_by_a_killed_writer_is_cut_before_the_next_append(
        tmp_path: Path) -> None:
    """A writer of another process dying mid-append (after the open of this one) leaves a
    torn tail too: the next append through an already open backend cuts it first."""
    path = tmp_path / "j.log"
    with Coordination(f"journal:{path}") as coordination:
        study = _study(coordination, "kept")
        study.set_user_attr("a", 1)
        with path.open("ab") as f:
            f.write(b'{"op_code":5,"worker_id":"dead","study_id":0,"user_a')
        study.set_user_attr("b", 2)
    with Coordination(f"journal:{path}") as reopened:
        attrs = optuna.load_study(study_name="kept", storage=reopened.storage).user_attrs
    assert attrs == {"a": 1, "b": 2}


def test_journal_unreadable_in_the_middle_is_not_readable(tmp_path: Path) -> None:
    """``readable`` replays the journal: a broken record before the last one (not a torn
    tail, which open repairs) raises, so ``/readyz`` can say so."""
    path = tmp_path / "j.log"
    with Coordination(f"journal:{path}") as coordination:
        study = _study(coordination, "kept")
        study.set_user_attr("a", 1)
    lines = path.read_bytes().split(b"\n")
    lines.insert(1, b'{"op_code": 5, "worker')
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(StorageUnavailable, match="not readable"):
        Coordination(f"journal:{path}")
