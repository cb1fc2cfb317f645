"""The API in Redis mode against the real services on this machine, end to end.

The API runs as a real HTTP server (``marginlab serve``) and calibrations run in separate
``marginlab worker`` processes (rq queue workers); studies live in a PostgreSQL database
created for this module and dropped afterwards. Two tests use the shared Redis at
127.0.0.1:6379 (an empty database number claimed for the module and flushed afterwards);
the Redis-restart test starts a ``redis-server`` of its own on a free port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import pytest
import redis

from tests.api_helpers import FINAL, bars_csv, calibration_spec, free_port, wait_for
from tests.test_storage import claimed_redis_db, clear_redis_db, fresh_postgres_db

pytestmark = [pytest.mark.integration, pytest.mark.slow]
T = TypeVar("T")

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
CSV = {"content-type": "text/csv"}
#: Bars per synthetic dataset: a trial takes tens of milliseconds.
N_BARS = 3000
#: How long the restart test keeps Redis down.
OUTAGE_S = 4.0


# --- services ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_redis_url() -> Iterator[str]:
    """An empty database of the shared Redis, claimed (marker key, NX) and flushed after."""
    with claimed_redis_db() as url:
        yield url



@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this module's own for the studies, dropped afterwards."""
    with fresh_postgres_db() as url:
        yield url


class RedisServer:
    """A ``redis-server`` of the test's own on a free port; stop and start it at will.

    No periodic snapshots; ``stop`` saves the data first (``SHUTDOWN SAVE``), so a restart
    finds it again, as a production Redis with persistence would.
    """

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on PATH")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout_s=10, every_s=0.05, what=f"redis-server on {self.port}")

    def ping(self) -> bool:
        with redis.Redis.from_url(self.url, socket_connect_timeout=1) as client:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

    def stop(self, *, save: bool = True) -> None:
        if self.proc is None:
            return
        with redis.Redis.from_url(self.url) as client, contextlib.suppress(redis.RedisError):
            client.shutdown(save=save, nosave=not save)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A running ``redis-server`` of this test's own."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop(save=False)


# --- the deployment: an API server and queue workers -------------------------------------------


class Deployment:
    """``marginlab serve`` and ``marginlab worker`` processes sharing one environment."""

    def __init__(self, root: Path, redis_url: str, storage_url: str, **env: str) -> None:
        self.root = root
        self.redis_url = redis_url
        # A 2 s liveness period (default 5 s, see service.settings) notices a SIGKILLed
        # process as it does by default, in 2/5 of the wait; the environment may override it.
        self.env = {"MARGINLAB_JOB_HEARTBEAT_S": "2", **os.environ,
                    "REDIS_URL": redis_url, "MARGINLAB_STORAGE": storage_url,
                    "MARGINLAB_DATA_ROOT": str(root), "MARGINLAB_STATE_DIR": str(root / "state"),
                    **env}
        self.env.pop("MARGINLAB_API_KEYS", None)
        self.env.pop("MARGINLAB_API_KEYS_FILE", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[tuple[Path, IO[bytes]]] = []
        self.port = free_port()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def move_api(self) -> None:
        """Serve the next ``start_api`` on a new port (another API process of the same
        deployment, as a second machine would be), without waiting for the old one's."""
        self.http.close()
        self.port = free_port()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        path = self.root / f"{name}.log"
        log = path.open("wb")
        self.logs.append((path, log))
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=self.env,
                                cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_api(self) -> None:
        """Start the HTTP server and wait until it answers. A restart on the port of a
        server just SIGKILLed first waits for the port to close (its worker process dies a
        moment after the main one, and the kernel keeps a dead listener's connections for up
        to a minute): ``serve`` refuses a port that cannot be bound."""
        self.wait(lambda: _port_free(self.port), timeout_s=75,
                  what=f"port {self.port} to close")
        self._spawn("api", "serve", "--port", str(self.port))

        def up() -> bool:
            try:
                return self.http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        self.wait(up, timeout_s=30, what="the API")

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        """Start a queue worker and wait until it has registered with rq."""
        proc = self._spawn(name, "worker")
        self.wait(lambda: self.rq_worker_name(proc.pid), timeout_s=30, what=f"worker {name}")
        return proc

    def wait(self, probe: Callable[[], T | None], *, timeout_s: float, what: str) -> T:
        """``wait_for`` whose failure shows the processes' logs."""
        try:
            return wait_for(probe, timeout_s=timeout_s, every_s=0.3, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail(stacks=True)}") from None

    def rq_worker_name(self, pid: int) -> str | None:
        """The rq name of the live worker with this process id."""
        from rq import Worker

        with redis.Redis.from_url(self.redis_url) as connection:
            for worker in Worker.all(connection=connection):
                if worker.pid == pid:
                    return str(worker.name)
        return None

    def rq_job_worker(self, rq_job_id: str) -> str | None:
        """The rq worker that last ran an rq job."""
        from rq.job import Job

        with redis.Redis.from_url(self.redis_url) as connection:
            name = Job.fetch(rq_job_id, connection=connection).worker_name
            return None if name is None else str(name)

    def tail(self, lines: int = 15, *, stacks: bool = False) -> str:
        """The last lines of every process log (for failure messages); ``stacks``: first
        ask each live queue worker and its work horse for every thread's stack (SIGUSR1),
        which lands in its log."""
        if stacks:
            workers = [p.pid for (path, _), p in zip(self.logs, self.procs, strict=True)
                       if not path.name.startswith("api") and p.poll() is None]
            for pid in workers + [c for w in workers for c in children(w)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
            time.sleep(1.0)
            lines = 120
        out = []
        for path, log in self.logs:
            log.flush()
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def close(self) -> None:
        self.http.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait()
        for _, log in self.logs:
            log.close()

    # --- HTTP conveniences

    def upload(self, body: bytes, instrument: str = "SYN") -> dict[str, Any]:
        response = self.http.post(f"/v1/datasets?instrument={instrument}", content=body,
                                  headers=CSV)
        assert response.status_code == 201, response.text
        info: dict[str, Any] = response.json()
        return info

    def status(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/calibrations/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_job(self, job_id: str, *, timeout_s: float, done_at_least: int | None = None,
                 states: tuple[str, ...] = FINAL) -> dict[str, Any]:
        """Poll until the job is in ``states`` (or has ``done_at_least`` trials done)."""

        last: list[dict[str, Any]] = []

        def probe() -> dict[str, Any] | None:
            status = self.status(job_id)
            last[:] = [status]
            if done_at_least is not None:
                done = (status["progress"] or {}).get("trials_done", 0)
                return status if status["state"] == "running" and done >= done_at_least else None
            return status if status["state"] in states else None

        try:
            return self.wait(probe, timeout_s=timeout_s, what=f"job {job_id}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- last status\n{last}") from None


def _port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (a plain bind, as ``serve`` checks)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its children (an rq worker and its work horse)."""
    for child in children(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def deploy(tmp_path: Path, postgres_url: str) -> Iterator[Any]:
    """Start deployments on a Redis URL (closed, and their Redis data cleared, afterwards)."""
    made: list[Deployment] = []

    def make(redis_url: str, **env: str) -> Deployment:
        if redis_url.startswith(f"redis://{REDIS_HOST}:{REDIS_PORT}/"):
            clear_redis_db(redis_url)
        deployment = Deployment(tmp_path, redis_url, postgres_url, **env)
        made.append(deployment)
        return deployment

    try:
        yield make
    finally:
        for deployment in made:
            deployment.close()
            if deployment.redis_url.startswith(f"redis://{REDIS_HOST}:{REDIS_PORT}/"):
                clear_redis_db(deployment.redis_url)


def assert_unavailable(response: httpx.Response) -> None:
    """A 503 problem (not a 500, no stack trace)."""
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 503
    assert "Traceback" not in response.text


# --- tests ------------------------------------------------------------------------------------


def test_worker_process_runs_the_job_and_identical_request_is_cached(
        deploy: Any, shared_redis_url: str) -> None:
    """A calibration submitted over HTTP runs in a separate worker process, its result is
    read back, and the identical request is then answered from the cache."""
    app: Deployment = deploy(shared_redis_url)
    app.start_api()
    worker = app.start_worker("worker-1")
    dataset = app.upload(bars_csv(N_BARS, seed=11))
    spec = calibration_spec(dataset["ref"], n_trials=10, seed=11)

    submitted = app.http.post("/v1/calibrations", json=spec)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    done = app.wait_job(job["id"], timeout_s=60)
    assert done["state"] == "succeeded", done
    assert done["progress"]["trials_done"] == 10
    assert app.rq_job_worker(f"{job['id']}-0") == app.rq_worker_name(worker.pid)

    result = app.http.get(job["result_url"])
    assert result.status_code == 200
    assert result.json()["trials"]["complete"] + result.json()["trials"]["pruned"] == 10
    assert result.json()["data_fingerprints"] == {"SYN": dataset["fingerprint"]}
    assert result.json()["pareto_front"]

    started = time.monotonic()
    again = app.http.post("/v1/calibrations", json=spec)
    elapsed = time.monotonic() - started
    assert again.status_code == 200
    assert again.json()["cached"] is True
    assert again.json()["id"] == job["id"]
    assert elapsed < 2.0
    assert app.http.get(again.json()["result_url"]).json() == result.json()


def test_sigusr1_makes_a_queue_worker_write_its_threads_stacks(deploy: Any,
                                                                shared_redis_url: str) -> None:
    """An operator (or a failing test) asks a stuck worker where it is: SIGUSR1 writes every
    thread's stack to its log, and the worker goes on consuming."""
    app: Deployment = deploy(shared_redis_url)
    worker = app.start_worker("worker-1")
    os.kill(worker.pid, signal.SIGUSR1)
    log = app.root / "worker-1.log"
    app.wait(lambda: "Current thread" in log.read_text(errors="replace"), timeout_s=10,
             what="the stack dump")
    text = log.read_text(errors="replace")
    assert text.count("hread 0x") >= 2  # every thread: the main one and rq's and ours
    assert worker.poll() is None
    assert app.rq_worker_name(worker.pid) is not None


def test_killed_workers_job_completes_on_another_worker(deploy: Any,
                                                        shared_redis_url: str) -> None:
    """SIGKILL the worker (and work horse) running a job: rq hands the abandoned job to a new
    worker, which rejoins the study and finishes every trial."""
    # One queue job per calibration: only rq's retry of the abandoned job can finish it.
    app: Deployment = deploy(shared_redis_url, MARGINLAB_WORKERS_PER_JOB="1")
    app.start_api()
    first = app.start_worker("worker-1")
    first_name = app.rq_worker_name(first.pid)
    ref = app.upload(bars_csv(N_BARS, seed=12))["ref"]
    job = app.http.post("/v1/calibrations", json=calibration_spec(ref, n_trials=30,
                                                                  seed=12)).json()
    running = app.wait_job(job["id"], timeout_s=60, done_at_least=3)
    assert app.rq_job_worker(f"{job['id']}-0") == first_name

    kill_tree(first.pid)
    first.wait(timeout=10)
    at_kill = app.status(job["id"])
    assert at_kill["state"] == "running"
    assert running["progress"]["trials_done"] <= at_kill["progress"]["trials_done"] < 30

    second = app.start_worker("worker-2")
    done = app.wait_job(job["id"], timeout_s=90)
    assert done["state"] == "succeeded", done
    assert done["progress"]["trials_done"] == 30
    assert app.rq_job_worker(f"{job['id']}-0") == app.rq_worker_name(second.pid)
    result = app.http.get(job["result_url"]).json()
    assert result["trials"]["complete"] + result["trials"]["pruned"] == 30


def test_redis_restart_mid_job_is_503_then_recovers(own_redis: RedisServer, deploy: Any) -> None:
    """With Redis down the API answers 503 problems for queue operations, while a job's
    status still answers from its durable record (the SQL table Redis only caches); once
    redis-server is back on the same port it answers again (no API restart) and the job
    still finishes."""
    app: Deployment = deploy(own_redis.url)
    app.start_api()
    app.start_worker("worker-1")
    ref = app.upload(bars_csv(N_BARS, seed=13))["ref"]
    spec = calibration_spec(ref, n_trials=40, seed=13)
    job = app.http.post("/v1/calibrations", json=spec).json()
    app.wait_job(job["id"], timeout_s=60, done_at_least=2)

    own_redis.stop()
    other = calibration_spec(ref, n_trials=5, seed=14)
    down_until = time.monotonic() + OUTAGE_S  # long enough for the worker to notice
    while time.monotonic() < down_until:
        assert_unavailable(app.http.post("/v1/calibrations", json=other))
        status = app.http.get(f"/v1/calibrations/{job['id']}")
        assert status.status_code == 200, status.text
        assert status.json()["id"] == job["id"]
        assert status.json()["state"] in ("queued", "running", "succeeded")
        # The result comes from the durable table too: 404 until the job has saved one (it
        # may finish during the outage: the worker writes SQL, not Redis), never a 5xx.
        assert app.http.get(f"/v1/calibrations/{job['id']}/result").status_code in (200, 404)
        assert_unavailable(app.http.get("/readyz"))
        assert app.http.get("/healthz").status_code == 200
        time.sleep(0.5)

    own_redis.start()
    back = wait_for(lambda: app.http.get(f"/v1/calibrations/{job['id']}").status_code == 200,
                    timeout_s=15, what="the API to reach Redis again")
    assert back
    assert app.http.get("/readyz").status_code == 200
    submitted = app.http.post("/v1/calibrations", json=other)
    assert submitted.status_code == 202, submitted.text

    for job_id, trials in ((job["id"], 40), (submitted.json()["id"], 5)):
        done = app.wait_job(job_id, timeout_s=90)
        assert done["state"] == "succeeded", done
        assert done["progress"]["trials_done"] == trials
