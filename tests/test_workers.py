"""Scale-out: ``marginlab worker`` processes sharing one study on each shared storage.

For the journal file, the Redis journal and PostgreSQL (the services on this machine), two
worker processes fill a study to exactly ``n_trials`` finished trials; a worker SIGKILLed in
the middle of a trial leaves that trial FAIL, its parameters are retried, and the study still
ends with exactly ``n_trials`` finished trials. ``marginlab calibrate --workers 2`` and
``calibrate(workers=2)`` do the same from one command: the helper is a fork of the calling
process (checked on every storage, and SIGKILLed mid-study), or a ``marginlab worker``
subprocess while other threads run.

The data are synthetic: a seeded random walk of 1.5M 30-minute bars stored as Parquet, so
that a trial takes ~50-150 ms here (the kernels do 20k bars in ~2 ms, and a CSV this size
would take seconds to load in every worker).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from calibration.calibrate import Prepared, create_or_load_study, prepare
from calibration.spec import CalibrationSpec, decode_spec, search_space
from calibration.storage import HEARTBEAT_INTERVAL_S, STALE_AFTER_S, Coordination
from tests.conftest import walk_frame
from tests.test_storage import claimed_redis_db, clear_redis_db, fresh_postgres_db

pytestmark = pytest.mark.integration

N_TRIALS = 16
N_BARS = 1_500_000
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with the bars (Parquet) and the calibration spec."""
    root = tmp_path_factory.mktemp("workers-data")
    walk_frame(N_BARS, seed=20240801).to_parquet(root / "bars.parquet", index=False)
    spec = {
        "data": [{"instrument": "SYN", "ref": "bars.parquet"}],
        "model": "ewma",
        "search_space": {"decay": {"low": 0.9, "high": 0.99},
                         "confidence": {"low": 0.99, "high": 0.999},
                         "floor_rate": {"low": 0.005, "high": 0.05, "log": True},
                         "apc_buffer": {"value": 0.5}, "horizon_bars": {"value": 4},
                         "warmup_bars": {"value": 200}},
        "stress_windows": [],
        "liquidation": {"leverages": [5, 20], "notionals_usd": [10000]},
        "n_trials": N_TRIALS,
        "seed": 11,
    }
    (root / "spec.json").write_text(json.dumps(spec))
    return root


@pytest.fixture(scope="session")
def spec(data_root: Path) -> CalibrationSpec:
    """The calibration spec of every study here."""
    return decode_spec((data_root / "spec.json").read_bytes())


@pytest.fixture(scope="session")
def prepared(spec: CalibrationSpec, data_root: Path) -> Prepared:
    """The spec's data, loaded once for the studies created in this process."""
    return prepare(spec, data_root)


@pytest.fixture(scope="session")
def redis_db() -> Iterator[str]:
    """A Redis database claimed for this session (flushed afterwards)."""
    with claimed_redis_db() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[str]:
    """A PostgreSQL database created for this session (dropped afterwards)."""
    with fresh_postgres_db() as url:
        yield url


@pytest.fixture(params=["file", "redis", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A shared storage of each kind, empty for this test."""
    if request.param == "file":
        return f"journal:{tmp_path / 'studies.log'}"
    if request.param == "redis":
        value: str = request.getfixturevalue("redis_db")
        clear_redis_db(value)
        return value
    pg: str = request.getfixturevalue("postgres_db")
    return pg


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes started by a test; any still alive at teardown is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------- helpers


def _env(root: Path) -> dict[str, str]:
    # Any warning in a worker is an error: the workers' output stays clean.
    return {**os.environ, "MARGINLAB_DATA_ROOT": str(root), "PYTHONWARNINGS": "error"}


def _start_worker(procs: list[subprocess.Popen[str]], root: Path, url: str, name: str,
                  index: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "calibration.cli", "worker", "--study", name, "--storage", url,
         "--worker-index", str(index)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(root),
    )
    procs.append(proc)
    return proc


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for a worker; its exit code and stderr."""
    try:
        _, err = proc.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"worker did not finish within {WORKER_TIMEOUT_S} s: {err}")
    return proc.returncode, err


def _ran(err: str) -> int:
    found = re.search(r"worker finished: ran (\d+) trials", err)
    assert found is not None, err
    return int(found.group(1))


def _retry_marks(trial: FrozenTrial) -> list[int]:
    """The trial numbers a retry descends from (ours for journals, Optuna's for RDB)."""
    history: list[int] = (trial.user_attrs.get("retry_history")
                          or trial.system_attrs.get("retry_history") or [])
    return history


def _assert_study_exact(trials: list[FrozenTrial], n_trials: int) -> None:
    """Exactly n_trials finished, nothing left running or waiting, trial numbers unique
    and dense, and every FAIL retried with its params until a retry finished."""
    assert [t.number for t in trials] == list(range(len(trials)))
    states = [t.state for t in trials]
    assert sum(s in FINISHED for s in states) == n_trials, states
    assert not {TrialState.RUNNING, TrialState.WAITING} & set(states), states
    for failed in (t for t in trials if t.state == TrialState.FAIL):
        retries = [t for t in trials if failed.number in _retry_marks(t)]
        assert retries, f"trial {failed.number} failed and was not retried"
        assert all(t.number > failed.number and t.params == failed.params
                   for t in retries), (failed, retries)
        assert any(t.state in FINISHED for t in retries), [t.state for t in retries]


def _new_study(spec: CalibrationSpec, prepared: Prepared, url: str) -> str:
    name = f"workers-{uuid.uuid4().hex[:10]}"
    with Coordination(url) as coordination:
        study = create_or_load_study(spec, prepared, coordination, name)
        assert study.get_trials() == []
    return name


def _trials(url: str, name: str) -> list[FrozenTrial]:
    with Coordination(url) as coordination:
        return optuna.load_study(study_name=name, storage=coordination.storage).get_trials()


# --------------------------------------------------------------------------- two workers


@pytest.mark.slow
def test_two_workers_share_a_study_exactly(url: str, data_root: Path, spec: CalibrationSpec,
                                           prepared: Prepared,
                                           procs: list[subprocess.Popen[str]]) -> None:
    """Two worker processes fill one study to exactly n_trials, each running some of them."""
    name = _new_study(spec, prepared, url)
    workers, _ = _start_both_in_a_trial(procs, (data_root, data_root), url, name)
    results = [_finish(w) for w in workers]
    assert [code for code, _ in results] == [0, 0], results
    ran = [_ran(err) for _, err in results]
    assert all(r >= 1 for r in ran), ran
    trials = _trials(url, name)
    _assert_study_exact(trials, N_TRIALS)
    assert sum(ran) == len(trials)  # every trial was run by one of the two workers


def _start_both_in_a_trial(procs: list[subprocess.Popen[str]], roots: tuple[Path, Path],
                           url: str, name: str) -> tuple[list[subprocess.Popen[str]], set[int]]:
    """Start two workers (on these data roots) such that each runs a trial; the workers
    and the trials the first was frozen in.

    A trial here can be quicker than a worker's start-up (3-4 s idle, far more on a loaded
    machine with cold caches), so the first worker could finish the study before the
    second has loaded its data. The first is frozen (SIGSTOP) inside a trial until the
    second has started one of its own, each time for at most a few seconds less than
    STALE_AFTER_S, so nobody reaps the frozen worker's trial; if the second is still not
    in a trial, the first is thawed until it is inside its next trial (which beats afresh)
    and frozen again.
    """
    first = _start_worker(procs, roots[0], url, name, 1)
    second: subprocess.Popen[str] | None = None
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    held: set[int] = set()
    with Coordination(url) as coordination:
        study = optuna.load_study(study_name=name, storage=coordination.storage)

        def running() -> set[int]:
            return {t.number for t in study.get_trials(states=(TrialState.RUNNING,))}

        while True:
            # Freeze the first inside a trial it has not been frozen in before.
            while True:
                assert time.monotonic() < deadline, "the first worker never started a trial"
                assert first.poll() is None, first.communicate()
                if not running() - held:
                    time.sleep(0.005)
                    continue
                _signal([first], signal.SIGSTOP)
                if fresh := running() - held:  # still inside that trial once frozen
                    break
                _signal([first], signal.SIGCONT)
            held |= fresh
            frozen_at = time.monotonic()
            if second is None:
                second = _start_worker(procs, roots[1], url, name, 2)
            # Thawed by the time its trial could be reaped, whether or not the second has
            # started one.
            while (not running() - held and second.poll() is None
                   and time.monotonic() - frozen_at < STALE_AFTER_S - 2 * HEARTBEAT_INTERVAL_S):
                time.sleep(0.005)
            # While the first is frozen, a trial outside ``held`` is the second's.
            started = bool(running() - held) or second.poll() is not None
            _signal([first], signal.SIGCONT)
            if started:
                # In a trial, or ended: the end assertions say which worker ran nothing.
                return [first, second], held


@pytest.mark.slow
def test_workers_on_separate_machines_share_one_postgresql_study(
        postgres_db: str, data_root: Path, spec: CalibrationSpec, prepared: Prepared,
        procs: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    """How a calibration spreads over machines: each machine has its own copy of the data
    under its own data root and runs ``marginlab worker --study NAME --storage URL`` against
    one PostgreSQL study. Two such workers (separate data roots) fill it to exactly
    ``n_trials``; a third whose data differ from the study's (a changed file under the same
    name) is refused before running a trial, naming the mismatch."""
    name = _new_study(spec, prepared, postgres_db)
    roots = []
    for machine in ("machine-a", "machine-b"):
        root = tmp_path / machine
        root.mkdir()
        shutil.copy(data_root / "bars.parquet", root / "bars.parquet")
        roots.append(root)
    workers, _ = _start_both_in_a_trial(procs, (roots[0], roots[1]), postgres_db, name)
    results = [_finish(w) for w in workers]
    assert [code for code, _ in results] == [0, 0], results
    ran = [_ran(err) for _, err in results]
    trials = _trials(postgres_db, name)
    _assert_study_exact(trials, N_TRIALS)
    assert sum(ran) == len(trials)
    assert all(r >= 1 for r in ran), ran

    changed = tmp_path / "machine-c"
    changed.mkdir()
    frame = walk_frame(N_BARS, seed=20240801)
    frame.loc[frame.index[-1], ["open", "high", "low", "close"]] *= 1.01
    frame.to_parquet(changed / "bars.parquet", index=False)
    code, err = _finish(_start_worker(procs, changed, postgres_db, name, 3))
    assert code != 0
    assert "differ from the data study" in err
    assert len(_trials(postgres_db, name)) == len(trials)


# --------------------------------------------------------------------------- SIGKILL


def _stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def _signal(procs: list[subprocess.Popen[str]], sig: signal.Signals) -> None:
    for proc in procs:
        os.kill(proc.pid, sig)
    if sig == signal.SIGSTOP:
        deadline = time.monotonic() + 5
        while not all(_stopped(p.pid) for p in procs):
            assert time.monotonic() < deadline, "SIGSTOP did not take effect"
            time.sleep(0.001)


def _locks_free(url: str, name: str) -> bool:
    """No lock a killed holder would leave behind for long: the journal file's own lock
    (30 s grace) and the Redis slot lock (60 s expiry). Flock and PostgreSQL advisory locks
    die with their process."""
    if url.startswith("journal:"):
        return not os.path.lexists(url.removeprefix("journal:") + ".lock")
    if url.startswith("redis://"):
        import redis

        client = redis.Redis.from_url(url)
        try:
            return not client.exists(f"marginlab:slots:{name}")
        finally:
            client.close()
    return True


def _have_beaten(coordination: Coordination, trials: list[FrozenTrial]) -> bool:
    """RDB: every trial has a heartbeat row (one that never beat is reaped only after
    twice STALE_AFTER_S, which would just make the test slower)."""
    storage = coordination.storage
    if not isinstance(storage, RDBStorage):
        return True
    table = sqlalchemy.Table("trial_heartbeats", sqlalchemy.MetaData(),
                             autoload_with=storage.engine)
    ids = [t._trial_id for t in trials]
    with storage.engine.connect() as conn:
        found = conn.execute(sqlalchemy.select(sqlalchemy.func.count())
                             .where(table.c.trial_id.in_(ids))).scalar()
    return found == len(ids)


def _kill_mid_trial(victim: subprocess.Popen[str], other: subprocess.Popen[str], url: str,
                    name: str, n_params: int,
                    excluded: set[int]) -> tuple[FrozenTrial, float]:
    """SIGKILL ``victim`` while it runs a trial not in ``excluded`` (trials frozen before,
    whose last beat may be older); return that trial and when (monotonic) the victim was
    frozen (its last beat was at most one heartbeat interval before).

    Both workers are frozen (SIGSTOP) at a moment both run a trial whose parameters are all
    chosen (so it is inside the backtest), holding no lock that outlives its holder;
    ``other`` is resumed until its trial finishes, so the trial still RUNNING is the
    victim's. Otherwise both resume and the attempt is repeated.
    """
    deadline = time.monotonic() + 90
    with Coordination(url) as coordination:
        study = optuna.load_study(study_name=name, storage=coordination.storage)

        def running() -> list[FrozenTrial]:
            return study.get_trials(states=(TrialState.RUNNING,))

        while time.monotonic() < deadline:
            assert victim.poll() is None, "the victim ended early"
            assert other.poll() is None, "the survivor ended early"
            if len(running()) < 2:
                time.sleep(0.005)
                continue
            _signal([victim, other], signal.SIGSTOP)
            stopped_at = time.monotonic()
            frozen = running()
            # Both past choosing their parameters (so the victim is inside the backtest).
            if (len(frozen) == 2 and all(len(t.params) == n_params for t in frozen)
                    and not {t.number for t in frozen} & excluded
                    and _locks_free(url, name) and _have_beaten(coordination, frozen)):
                _signal([other], signal.SIGCONT)
                numbers = {t.number for t in frozen}
                until = time.monotonic() + 30
                while len(still := numbers & {t.number for t in running()}) == 2:
                    assert time.monotonic() < until, "the resumed worker made no progress"
                    time.sleep(0.005)
                # The victim is still frozen: the trial left RUNNING is its own.
                assert len(still) == 1
                os.kill(victim.pid, signal.SIGKILL)
                victim.communicate()
                return next(t for t in frozen if t.number in still), stopped_at
            _signal([victim, other], signal.SIGCONT)
            time.sleep(0.02)
    pytest.fail("never caught both workers in a trial")


@pytest.mark.slow
def test_sigkilled_worker_trial_is_failed_and_retried(
        url: str, data_root: Path, spec: CalibrationSpec, prepared: Prepared,
        procs: list[subprocess.Popen[str]]) -> None:
    """A worker SIGKILLed mid-trial: its trial FAILs, is retried, and n_trials still finish."""
    # Twice the trials: catching both workers inside a trial can take several attempts, each
    # spending trials, and the victim must not finish the study first (it did, once, with
    # N_TRIALS and workers that no longer page-fault their arrays in).
    spec = msgspec.structs.replace(spec, n_trials=2 * N_TRIALS)
    name = _new_study(spec, prepared, url)
    # Both in a trial first: otherwise one can run the whole study before the other starts.
    (victim, survivor), held = _start_both_in_a_trial(procs, (data_root, data_root), url, name)
    searched = [k for k, p in search_space(spec).items() if p.value is None]
    killed, stopped_at = _kill_mid_trial(victim, survivor, url, name, len(searched), held)
    replacement = _start_worker(procs, data_root, url, name, 3)
    results = [_finish(survivor), _finish(replacement)]
    assert victim.returncode == -signal.SIGKILL
    assert [code for code, _ in results] == [0, 0], results
    # The dead trial was reaped (and the study finished) only once its heartbeat was stale.
    assert time.monotonic() - stopped_at >= STALE_AFTER_S - HEARTBEAT_INTERVAL_S
    trials = _trials(url, name)
    _assert_study_exact(trials, spec.n_trials)
    assert trials[killed.number].state == TrialState.FAIL
    assert set(killed.params) == set(searched)
    assert trials[killed.number].params == killed.params
    retries = [t for t in trials if killed.number in _retry_marks(t)]
    assert len(retries) == 1
    assert retries[0].state in FINISHED
    assert retries[0].params == killed.params
    assert sum(t.state == TrialState.FAIL for t in trials) == 1


# --------------------------------------------------------------------------- calibrate


@pytest.mark.slow
def test_calibrate_with_two_workers_json(data_root: Path, tmp_path: Path) -> None:
    """calibrate --workers 2 --json finishes n_trials, with recommendation and Pareto front."""
    journal = f"journal:{tmp_path / 'cal.log'}"
    proc = subprocess.run(
        [sys.executable, "-m", "calibration.cli", "calibrate", "--spec",
         str(data_root / "spec.json"), "--storage", journal, "--workers", "2", "--json",
         "--quiet"],
        capture_output=True, text=True, env=_env(data_root), timeout=WORKER_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    counts = result["trials"]
    assert counts["complete"] + counts["pruned"] == N_TRIALS
    assert counts["running"] == counts["waiting"] == 0
    rec = result["recommendation"]
    assert {"params", "feasible"} <= set(rec)
    assert set(rec["params"]) >= {"decay", "confidence", "floor_rate"}
    assert isinstance(rec["feasible"], bool)
    assert isinstance(result["pareto_front"], list)
    assert result["pareto_front"], "the synthetic data have feasible trials"
    _assert_study_exact(_trials(journal, result["study"]), N_TRIALS)



# --------------------------------------------------------------------------- calibrate(workers=N)


#: Run in a fresh interpreter (the test process has other tests' threads, and a process
#: with threads uses subprocess helpers): calibrate(workers=2) with every evaluate()
#: logging its process id. A forked helper inherits the patch; a fresh process would not.
FORK_SCRIPT = """
import json, os, sys
from pathlib import Path
import calibration.calibrate as cal
import calibration.calibrate._evaluate as evaluation
from calibration.parallel import can_fork
from calibration.spec import decode_spec

root, url, name, pids = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
real = evaluation.evaluate
def logged(*args, **kwargs):
    with pids.open("a") as handle:
        handle.write(f"{os.getpid()}\\n")
    return real(*args, **kwargs)
evaluation.evaluate = logged  # where workers look it up
assert can_fork()
print(os.getpid(), flush=True)
spec = decode_spec((root / "spec.json").read_bytes())
result = cal.calibrate(spec, root=root, storage=url, study=name, workers=2)
print(json.dumps({"pid": os.getpid(), "trials": result.trials, "workers": result.workers,
                  "reproducible": result.reproducible}))
"""


@pytest.mark.slow
def test_calibrate_with_two_workers_forks_a_helper(url: str, data_root: Path,
                                                   tmp_path: Path) -> None:
    """calibrate(workers=2) on each shared storage: a forked helper (its own connections)
    and the calling process fill the study to exactly n_trials, both running trials."""
    pids = tmp_path / "pids"
    name = f"fork-{uuid.uuid4().hex[:10]}"
    proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(data_root), url, name,
                           str(pids)], capture_output=True, text=True, env=_env(data_root),
                          timeout=WORKER_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    trials = _trials(url, name)
    _assert_study_exact(trials, N_TRIALS)
    assert out["trials"]["complete"] + out["trials"]["pruned"] == N_TRIALS
    ran_in = pids.read_text().split()
    assert str(out["pid"]) in ran_in
    assert len(set(ran_in)) == 2, "the helper ran no trial"
    # The result records both workers and says a re-run need not reproduce it.
    assert out["workers"] == 2
    assert out["reproducible"] is False
    # Trials plus the recommendation's evidence (evaluated in the calling process).
    assert len(ran_in) >= len(trials)


@pytest.mark.slow
def test_sigkilled_forked_helper_leaves_the_study_exact(data_root: Path,
                                                        tmp_path: Path) -> None:
    """SIGKILL the forked helper once it runs trials: the calling process reaps its trial,
    runs the rest, logs the helper's exit and returns a study with exactly n_trials."""
    url = f"journal:{tmp_path / 'studies.log'}"
    pids = tmp_path / "pids"
    name = f"fork-kill-{uuid.uuid4().hex[:10]}"
    proc = subprocess.Popen([sys.executable, "-c", FORK_SCRIPT, str(data_root), url, name,
                             str(pids)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(data_root))
    try:
        assert proc.stdout is not None
        parent = proc.stdout.readline().strip()
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        helper = None
        while helper is None and time.monotonic() < deadline:
            seen = set(pids.read_text().split()) if pids.exists() else set()
            helper = next(iter(seen - {parent}), None)
            time.sleep(0.01)
        assert helper is not None, "the helper never ran a trial"
        os.kill(int(helper), signal.SIGKILL)
        out, err = proc.communicate(timeout=WORKER_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "helper worker 1 (fork) exited with code -9" in err
    result = json.loads(out.splitlines()[-1])
    assert result["trials"]["complete"] + result["trials"]["pruned"] == N_TRIALS
    trials = _trials(url, name)
    _assert_study_exact(trials, N_TRIALS)
    # Killed in evaluate() (where a worker spends nearly all its time): that trial was
    # failed by the reaper and retried with its parameters (checked just above).
    assert any(t.state == TrialState.FAIL for t in trials), [t.state for t in trials]


@pytest.mark.slow
def test_helpers_are_worker_subprocesses_while_threads_run(data_root: Path,
                                                           spec: CalibrationSpec,
                                                           prepared: Prepared,
                                                           tmp_path: Path) -> None:
    """With another thread running (a fork would copy it mid-flight) the helper is a
    ``marginlab worker`` subprocess; the study still ends exact."""
    from calibration.calibrate import load_study, run_worker
    from calibration.parallel import can_fork, start_helpers, wait_helpers

    url = f"journal:{tmp_path / 'studies.log'}"
    name = _new_study(spec, prepared, url)
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, name="busy", daemon=True)
    busy.start()
    try:
        assert not can_fork()
        helpers = start_helpers(1, storage_url=url, study_name=name, prepared=prepared,
                                root=data_root)
        assert [h.how for h in helpers] == ["subprocess"]
        with Coordination(url) as coordination:
            study, _ = load_study(name, coordination)
            run_worker(study, prepared, coordination, n_trials=N_TRIALS)
        assert wait_helpers(helpers) == [0]
    finally:
        stop.set()
        busy.join()
    _assert_study_exact(_trials(url, name), N_TRIALS)


@pytest.mark.slow
def test_worker_stops_at_the_time_budget(data_root: Path, prepared: Prepared, tmp_path: Path,
                                         procs: list[subprocess.Popen[str]]) -> None:
    """A study with a time budget and no trial count: ``marginlab worker`` runs trials
    until the budget is spent on its own clock, then exits."""
    raw = json.loads((data_root / "spec.json").read_text())
    del raw["n_trials"]
    raw["timeout_seconds"] = 2
    timed_spec = decode_spec(json.dumps(raw).encode())
    url = f"journal:{tmp_path / 'studies.log'}"
    name = _new_study(timed_spec, prepared, url)
    started = time.monotonic()
    code, err = _finish(_start_worker(procs, data_root, url, name, 1))
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert _ran(err) >= 1
    assert elapsed < WORKER_TIMEOUT_S / 2, elapsed
    trials = _trials(url, name)
    assert all(t.state in FINISHED for t in trials), [t.state for t in trials]
