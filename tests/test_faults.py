"""Fault injection: the service's durable state survives killed processes and torn writes.

Real processes throughout: ``marginlab serve`` (embedded mode, or Redis mode with
``marginlab worker`` processes), a ``redis-server`` of the test's own on a free port (no
persistence; stopped afterwards) where Redis is needed, and SIGKILL where a machine would
fail. Each test ends with nothing lost and no job left running:

- a journal (file, Redis) torn mid-record while the service is down: after a restart every
  study reads, ``/readyz`` is ready and a new calibration succeeds;
- the embedded service SIGKILLed mid-calibration: the restart resumes the job, which ends
  with every trial and none RUNNING;
- a queue worker (or only its work horse, as the OOM killer would) SIGKILLed with no retries
  left, and a job past rq's time limit: the job ends ``failed`` with a reason, and an
  identical request starts afresh and succeeds;
- the service SIGKILLed mid-upload: no ``.part`` file after the restart, the listing intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import optuna
import pytest
import redis
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import TrialState

from calibration.storage import Coordination
from tests.api_helpers import FINAL, bars_csv, calibration_spec, free_port, wait_for
from tests.test_api_integration import Deployment, RedisServer, children, kill_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CSV = {"content-type": "text/csv"}
#: Bars per synthetic dataset: a trial takes tens of milliseconds.
N_BARS = 3000


class EmbeddedService:
    """``marginlab serve`` in embedded mode on one data root, started again at will."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("REDIS_URL", "MARGINLAB_API_KEYS", "MARGINLAB_API_KEYS_FILE",
                                 "MARGINLAB_STORAGE")}
        self.env.update(MARGINLAB_DATA_ROOT=str(root), MARGINLAB_STATE_DIR=str(root / "state"),
                        **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.http = httpx.Client(timeout=30)
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        port = free_port()
        self.log = (self.root / f"serve-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=self.env, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited\n{self.tail()}")
            try:
                return self.http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout_s=60, every_s=0.2, what="the service")

    def kill(self) -> None:
        """SIGKILL the server and its worker processes (granian's): no shutdown code runs."""
        assert self.proc is not None
        kill_tree(self.proc.pid)
        self.proc.wait(timeout=10)
        self._closed()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._closed()

    def _closed(self) -> None:
        self.http.close()
        if self.log is not None:
            self.log.close()
            self.log = None

    def tail(self, lines: int = 20) -> str:
        out = []
        for path in sorted(self.root.glob("serve-*.log")):
            out.append(f"--- {path.name}\n" + "\n".join(
                path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # --- HTTP conveniences

    def upload(self, body: bytes, instrument: str = "SYN") -> dict[str, Any]:
        response = self.http.post(f"/v1/datasets?instrument={instrument}", content=body,
                                  headers=CSV)
        assert response.status_code == 201, response.text
        info: dict[str, Any] = response.json()
        return info

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post("/v1/calibrations", json=spec)
        assert response.status_code == 202, response.text
        job: dict[str, Any] = response.json()
        return job

    def status(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/calibrations/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


def wait_final(app: EmbeddedService | Deployment, job_id: str, timeout_s: float
               ) -> dict[str, Any]:
    """Poll a job until it ends."""
    return wait_for(lambda: (lambda s: s if s["state"] in FINAL else None)(app.status(job_id)),
                    timeout_s=timeout_s, every_s=0.3, what=f"job {job_id} to end")


def wait_trials(app: EmbeddedService | Deployment, job_id: str, at_least: int) -> None:
    def probe() -> bool:
        status = app.status(job_id)
        assert status["state"] not in FINAL, status
        return (status["progress"] or {}).get("trials_done", 0) >= at_least

    wait_for(probe, timeout_s=60, every_s=0.1, what=f"{at_least} trials of job {job_id}")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[EmbeddedService]:
    app = EmbeddedService(tmp_path)
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server --save '' --appendonly no`` of this test's own, on a free port."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop(save=False)


# --- torn journals ------------------------------------------------------------------------------


def _tear_file(path: Path) -> dict[str, Any]:
    """Cut the journal file in the middle of its last record; returns that record."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    record: dict[str, Any] = json.loads(data[start:])
    with path.open("r+b") as f:
        f.truncate(start + (len(data) - start) // 2)
    return record


def _tear_redis(url: str) -> dict[str, Any]:
    """Cut the Redis journal's last record value in half; returns that record."""
    with redis.Redis.from_url(url) as client:
        last = int(client.get(":log_number"))
        value = client.get(f":log:{last}")
        client.set(f":log:{last}", value[: len(value) // 2])
    record: dict[str, Any] = json.loads(value)
    return record


@pytest.mark.parametrize("journal", ["file", "redis"])
def test_torn_journal_then_restart_every_study_reads_and_calibrations_run(
        journal: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Tear the study journal's last record while the service is down: after the restart
    ``/readyz`` is ready, the earlier calibration's status and result read, and a new
    calibration succeeds (on main its first append was glued to the torn half and every
    read after it failed)."""
    env = {}
    if journal == "redis":
        server: RedisServer = request.getfixturevalue("own_redis")
        env["MARGINLAB_STORAGE"] = server.url
    app = EmbeddedService(tmp_path, **env)
    try:
        app.start()
        ref = app.upload(bars_csv(N_BARS, seed=31))["ref"]
        first = app.submit(calibration_spec(ref, n_trials=6, seed=31))
        assert wait_final(app, first["id"], 60)["state"] == "succeeded"
        result = app.http.get(first["result_url"]).json()
        app.stop()

        # Embedded mode keeps a journal per study: tear the first calibration's own.
        own_journal = tmp_path / "state" / "studies" / f"{first['study']}.log"
        torn = (_tear_file(own_journal) if journal == "file"
                else _tear_redis(env["MARGINLAB_STORAGE"]))
        app.start()
        ready = app.http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["study_storage"] == "ok"
        status = app.status(first["id"])
        assert status["state"] == "succeeded"
        # The job record keeps what the job did (status never replays the journal) ...
        assert status["progress"]["trials_done"] == 6
        assert app.http.get(first["result_url"]).json() == result
        # ... and the study reads again: the torn record never happened, so if it finished a
        # trial, that trial is unfinished.
        finished_torn = (torn["op_code"] == JournalOperation.SET_TRIAL_STATE_VALUES
                         and torn.get("state") in (1, 2))
        storage = (f"journal:{own_journal}" if journal == "file"
                   else env["MARGINLAB_STORAGE"])
        with Coordination(storage) as coordination:
            study = optuna.load_study(study_name=first["study"], storage=coordination.storage)
            done = [t for t in study.get_trials(deepcopy=False)
                    if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(done) == 6 - int(finished_torn)

        second = app.submit(calibration_spec(ref, n_trials=6, seed=32))
        done = wait_final(app, second["id"], 60)
        assert done["state"] == "succeeded", (done, app.tail())
        assert done["progress"]["trials_done"] == 6
        assert app.http.get("/readyz").status_code == 200
        if journal == "file":
            # The second study has a journal of its own: the torn one never touched it.
            assert (tmp_path / "state" / "studies" / f"{second['study']}.log").exists()
    finally:
        app.stop()
    if journal == "redis":
        assert "cut" in app.tail(200)
    if journal == "file":
        lines = own_journal.read_bytes().split(b"\n")
        assert lines[-1] == b""
        assert all(json.loads(line) for line in lines[:-1])


# --- the embedded service killed mid-calibration -------------------------------------------------


def test_embedded_service_sigkilled_mid_calibration_resumes_on_restart(
        service: EmbeddedService) -> None:
    """SIGKILL the embedded service while its calibration runs: after the restart the job
    is running again, the trial the kill interrupted is failed and retried, and the job
    ends succeeded with exactly ``n_trials`` finished trials and none RUNNING."""
    n_trials = 300
    service.start()
    ref = service.upload(bars_csv(N_BARS, seed=33))["ref"]
    job = service.submit(calibration_spec(ref, n_trials=n_trials, seed=33))
    wait_trials(service, job["id"], 5)
    service.kill()

    service.start()
    assert service.status(job["id"])["state"] in ("queued", "running")
    done = wait_final(service, job["id"], 180)
    assert done["state"] == "succeeded", (done, service.tail())
    assert done["progress"]["trials_done"] == n_trials
    assert done["progress"]["running"] == 0
    assert done["progress"]["failed"] <= 1  # at most the trial the kill interrupted
    result = service.http.get(job["result_url"]).json()
    assert result["trials"]["complete"] + result["trials"]["pruned"] == n_trials
    assert "resuming calibration" in service.tail(200)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _calibration_processes(pid: int) -> list[int]:
    """The embedded calibration processes (``service.embedded_worker``) under ``pid``."""
    out = []
    for child in _descendants(pid):
        with contextlib.suppress(OSError):
            if b"service.embedded_worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
    return out


def test_embedded_calibration_runs_in_its_own_process_whose_death_fails_only_its_job(
        service: EmbeddedService) -> None:
    """Embedded calibrations run in a child process of the API, not in its threads: SIGKILL
    that process mid-calibration (as the OOM killer picks the biggest process) and the API
    stays up, the job ends ``failed`` naming the dead process, and an identical request
    runs on a fresh calibration process, resuming the finished trials, to ``n_trials``. A
    server SIGKILLed leaves no calibration process behind."""
    n_trials = 200
    service.start()
    assert service.proc is not None
    ref = service.upload(bars_csv(N_BARS, seed=35))["ref"]
    spec = calibration_spec(ref, n_trials=n_trials, seed=35)
    job = service.submit(spec)
    wait_trials(service, job["id"], 5)
    workers = _calibration_processes(service.proc.pid)
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)

    failed = wait_final(service, job["id"], 60)
    assert failed["state"] == "failed"
    assert "calibration process died (killed by signal 9" in failed["error"]
    assert "submit the request again" in failed["error"]
    assert service.http.get("/healthz").status_code == 200

    again = service.submit(spec)
    assert again["id"] != job["id"]
    done = wait_final(service, again["id"], 180)
    assert done["state"] == "succeeded", (done, service.tail())
    assert done["progress"]["trials_done"] == n_trials
    assert done["progress"]["running"] == 0
    fresh = _calibration_processes(service.proc.pid)
    assert len(fresh) == 1
    assert fresh != workers

    service.kill()
    wait_for(lambda: all(not Path(f"/proc/{pid}").exists() for pid in fresh),
             timeout_s=10, every_s=0.1, what="the orphaned calibration process to exit")


# --- Redis mode: dead workers, rq's time limit ---------------------------------------------------


@pytest.mark.parametrize("victim", ["worker", "work-horse"])
def test_sigkilled_worker_with_no_retries_left_fails_the_job_and_a_resubmit_succeeds(
        victim: str, own_redis: RedisServer, tmp_path: Path) -> None:
    """SIGKILL the worker running a job (or only its work horse, as the OOM killer picks
    the biggest process) with no rq retries left: the job ends ``failed`` with a reason
    naming the dead worker, its study keeps no RUNNING trial, and the identical request
    starts a new job that a new worker runs to the end."""
    # Killed after 3 trials: the 97 left take a worker over a second, far longer than the
    # kill follows the progress read, so the job cannot end first.
    n_trials = 100
    app = Deployment(tmp_path, own_redis.url, f"journal:{tmp_path / 'studies.log'}",
                     MARGINLAB_JOB_RETRIES="0", MARGINLAB_WORKERS_PER_JOB="1")
    try:
        app.start_api()
        worker = app.start_worker("worker-1")
        ref = app.upload(bars_csv(N_BARS, seed=34))["ref"]
        spec = calibration_spec(ref, n_trials=n_trials, seed=34)
        job = app.http.post("/v1/calibrations", json=spec).json()
        wait_trials(app, job["id"], 3)
        if victim == "worker":
            kill_tree(worker.pid)
            worker.wait(timeout=10)
        else:
            horses = children(worker.pid)
            assert len(horses) == 1
            os.kill(horses[0], signal.SIGKILL)

        failed = wait_final(app, job["id"], 90)
        assert failed["state"] == "failed", failed
        assert "worker process running it died" in failed["error"]
        assert failed["progress"]["running"] == 0
        assert failed["progress"]["trials_done"] < n_trials

        again = app.http.post("/v1/calibrations", json=spec)
        assert again.status_code == 202, again.text
        assert again.json()["id"] != job["id"]
        assert again.json()["joined"] is False
        if victim == "worker":
            app.start_worker("worker-2")
        done = app.wait_job(again.json()["id"], timeout_s=120)
        assert done["state"] == "succeeded", done
        assert done["progress"]["trials_done"] == n_trials
        assert done["progress"]["running"] == 0
        assert app.status(job["id"])["state"] == "failed"
    finally:
        app.close()


def test_job_past_rqs_time_limit_fails_naming_the_limit(own_redis: RedisServer,
                                                        tmp_path: Path) -> None:
    """A job that outlives ``MARGINLAB_JOB_TIMEOUT_S`` ends ``failed`` saying so (rq kills
    it; on main the job stayed ``running``), and the worker goes on to the next job."""
    app = Deployment(tmp_path, own_redis.url, f"journal:{tmp_path / 'studies.log'}",
                     # long enough for a cold worker's first trial on a slow machine
                     MARGINLAB_JOB_TIMEOUT_S="6", MARGINLAB_WORKERS_PER_JOB="1")
    try:
        app.start_api()
        app.start_worker("worker-1")
        ref = app.upload(bars_csv(N_BARS, seed=35))["ref"]
        job = app.http.post("/v1/calibrations",
                            json=calibration_spec(ref, n_trials=4000, seed=35)).json()
        failed = wait_final(app, job["id"], 60)
        assert failed["state"] == "failed", failed
        assert "time limit of 6 s" in failed["error"]
        assert 0 < failed["progress"]["trials_done"] < 4000
        assert failed["progress"]["running"] == 0

        small = app.http.post("/v1/calibrations",
                              json=calibration_spec(ref, n_trials=3, seed=36)).json()
        assert app.wait_job(small["id"], timeout_s=60)["state"] == "succeeded"
    finally:
        app.close()


# --- Redis restarted without persistence --------------------------------------------------------


@pytest.fixture(params=["journal", "postgresql"])
def study_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The deployment's study storage: a journal file (job records in the audit SQLite
    database) or a PostgreSQL database of the test's own (job records in its
    ``marginlab_state`` table)."""
    if request.param == "journal":
        yield f"journal:{tmp_path / 'studies.log'}"
        return
    from tests.test_storage import fresh_postgres_db

    with fresh_postgres_db() as url:
        yield url


def test_redis_restarted_without_persistence_mid_calibration_loses_no_job(
        own_redis: RedisServer, tmp_path: Path, study_storage: str) -> None:
    """Restart the deployment's Redis (no persistence: every key and queue entry is gone)
    mid-calibration: the job's id answers throughout (its record is durable in the SQL
    table, Redis only caches it), the reconciler queues it again, it ends ``succeeded``
    with exactly ``n_trials`` trials in its study and none RUNNING, and the identical
    request afterwards is answered from the result (on main: 404, the study stopped).
    With PostgreSQL study storage the records live in that database."""
    # Enough trials that the restart (after 5) lands mid-calibration; PostgreSQL trials cost
    # about twice a journal's, so fewer of them span the restart as long.
    n_trials = 100 if study_storage.startswith("postgresql") else 200
    app = Deployment(tmp_path, own_redis.url, study_storage,
                     MARGINLAB_WORKERS_PER_JOB="1")
    answers: list[int] = []
    stop = threading.Event()
    try:
        app.start_api()
        app.start_worker("worker-1")
        ref = app.upload(bars_csv(N_BARS, seed=37))["ref"]
        spec = calibration_spec(ref, n_trials=n_trials, seed=37)
        job = app.http.post("/v1/calibrations", json=spec).json()
        wait_trials(app, job["id"], 5)

        def poll() -> None:
            with httpx.Client(base_url=str(app.http.base_url), timeout=30) as http:
                while not stop.is_set():
                    answers.append(http.get(f"/v1/calibrations/{job['id']}").status_code)
                    stop.wait(0.1)

        poller = threading.Thread(target=poll)
        poller.start()
        own_redis.stop(save=False)
        own_redis.start()
        with redis.Redis.from_url(own_redis.url) as client:  # the queue entry did not survive
            assert not client.exists(f"rq:job:{job['id']}-0")

        done = app.wait(lambda: (lambda s: s if s["state"] in FINAL else None)(
            app.status(job["id"])), timeout_s=180, what="the job to end")
        stop.set()
        poller.join()
        assert done["state"] == "succeeded", (done, app.tail())
        assert done["progress"]["trials_done"] == n_trials
        assert done["progress"]["running"] == 0
        with Coordination(study_storage) as coordination:
            study = optuna.load_study(study_name=job["study"], storage=coordination.storage)
            trials = study.get_trials(deepcopy=False)
        assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) \
            == n_trials
        if study_storage.startswith("postgresql"):  # the records are in that database
            import psycopg

            with psycopg.connect(study_storage) as conn:
                rows = conn.execute("SELECT namespace FROM marginlab_state WHERE key = %s",
                                    (job["id"],)).fetchall()
            assert ("jobs",) in rows
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        # Its id answered throughout: the record came from the SQL table while Redis was
        # down or empty.
        assert answers
        assert set(answers) == {200}, sorted(set(answers))
        # Either the reconciler queued it again ("queued again" in the log), or the work
        # horse that had it in hand finished it (the queue entry was gone, not the running
        # job): both end with the exact count above, which is the contract.

        listed = app.http.get("/v1/calibrations").json()  # the listing survived too
        assert [item["id"] for item in listed["items"]] == [job["id"]]

        again = app.http.post("/v1/calibrations", json=spec)
        assert again.status_code == 200, again.text
        assert again.json()["cached"] is True
        assert again.json()["id"] == job["id"]
        assert app.http.get(job["result_url"]).status_code == 200
    finally:
        stop.set()
        app.close()


# --- uploads ----------------------------------------------------------------------------------


def test_sigkill_mid_upload_leaves_no_part_file_after_restart(service: EmbeddedService,
                                                              tmp_path: Path) -> None:
    """SIGKILL the service while an upload streams in: the ``.part`` file it leaves is swept
    at the restart, the datasets uploaded before are listed as they were (their files in
    place), and the same upload then succeeds."""
    service.start()
    kept = service.upload(bars_csv(N_BARS, seed=37), "KEPT")
    body = bars_csv(20_000, seed=38)
    uploads = tmp_path / "uploads"
    sent_half = threading.Event()
    release = threading.Event()

    def slow_body() -> Iterator[bytes]:
        half = len(body) // 2
        yield body[:half]
        sent_half.set()
        release.wait(30)  # the server dies meanwhile
        yield body[half:]

    def post() -> None:
        with contextlib.suppress(httpx.HTTPError):
            service.http.post("/v1/datasets?instrument=CUT", content=slow_body(),
                              headers=CSV)

    sender = threading.Thread(target=post, daemon=True)
    sender.start()
    assert sent_half.wait(10)
    parts = wait_for(lambda: [p for p in uploads.iterdir() if ".part" in p.name],
                     timeout_s=10, every_s=0.05, what="the upload's .part file")
    service.kill()
    release.set()
    sender.join(10)
    assert all(p.exists() for p in parts)  # what a killed process leaves

    service.start()
    assert [p.name for p in uploads.iterdir() if ".part" in p.name] == []
    listed = service.http.get("/v1/datasets").json()
    assert [d["id"] for d in listed] == [kept["id"]]
    assert sorted(p.name for p in uploads.iterdir()) == [Path(kept["ref"]).name]
    again = service.upload(body, "CUT")
    assert [d["instrument"] for d in service.http.get("/v1/datasets").json()] == ["CUT",
                                                                                  "KEPT"]
    assert (tmp_path / again["ref"]).is_file()
