"""Progress readers against a running calibration (issue 11), on a real embedded server.

Run from the repository root::

    python -m bench.bench_progress [--mode embedded|redis]

1. A calibration of ``N_TRIALS`` trials, once alone and once with 30 Server-Sent-Events
   clients and 30 status pollers (every 0.2 s); meanwhile ``/healthz`` is probed every 20 ms.
   Reports the calibration's wall time and the ``/healthz`` p50/p99 of each run.
2. Status read time (median of 200 sequential reads) of a finished 20-trial calibration whose
   study journal has been padded to 1 MB and to 50 MB (status never reads the journal).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.bench_api import free_port, wait_up
from tests.api_helpers import bars_csv, calibration_spec

N_TRIALS = 300
N_BARS = 1500
READERS = 30
#: Nice value of the reader processes (see ``read_crowd``).
CROWD_NICE = 5
FINAL = ("succeeded", "failed", "cancelled")


def start(root: Path, mode: str) -> tuple[list[subprocess.Popen[bytes]], str]:
    """The service on ``root``: one embedded server, or (``redis``) a Redis server of its
    own without persistence, the API and one ``marginlab worker`` (one copy per job)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "MARGINLAB_API_KEYS", "MARGINLAB_STORAGE")}
    env.update(MARGINLAB_DATA_ROOT=str(root), MARGINLAB_STATE_DIR=str(root / "state"),
               MARGINLAB_RATE_LIMIT_PER_MINUTE="0", MARGINLAB_WORKERS_PER_JOB="1")
    procs: list[subprocess.Popen[bytes]] = []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if mode == "redis":
        redis_port = free_port()
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--save",
                                       "", "--appendonly", "no"], **quiet))
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        time.sleep(0.5)
        procs.append(subprocess.Popen([sys.executable, "-m", "service.cli", "worker"],
                                      env=env, **quiet))
    port = free_port()
    procs.append(subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port",
                                   str(port)], env=env, **quiet))
    base = f"http://127.0.0.1:{port}"
    wait_up(base + "/healthz")
    return procs, base


def read_crowd(base: str, job_ids: Any) -> None:
    """``READERS`` event-stream clients and ``READERS`` status pollers of the job whose id
    arrives on ``job_ids``, to its end."""
    # Clients are other machines in a deployment: here they share the server's two cores,
    # so they yield them to the server when both want one (their request rate is reported).
    os.nice(CROWD_NICE)
    job_id = job_ids.get()
    counts = {"status_reads": 0, "events": 0}

    def sse() -> None:
        with httpx.Client(base_url=base, timeout=300) as c, \
                c.stream("GET", f"/v1/calibrations/{job_id}/events") as s:
            for line in s.iter_lines():
                counts["events"] += line.startswith("data:")

    def poll() -> None:
        with httpx.Client(base_url=base, timeout=300) as c:
            while c.get(f"/v1/calibrations/{job_id}").json()["state"] not in FINAL:
                counts["status_reads"] += 1
                time.sleep(0.2)

    threads = [threading.Thread(target=sse) for _ in range(READERS)]
    threads += [threading.Thread(target=poll) for _ in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job_ids.put({"cpu_s": round(time.process_time(), 2), **counts})


def run(base: str, seed: int, readers: bool, n_trials: int = N_TRIALS) -> dict[str, Any]:
    http = httpx.Client(base_url=base, timeout=120)
    ref = http.post("/v1/datasets?instrument=SYN", content=bars_csv(N_BARS, seed=seed),
                    headers={"content-type": "text/csv"}).json()["ref"]
    stop = threading.Event()
    health: list[float] = []

    def probe() -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                c.get("/healthz")
                health.append(time.perf_counter() - t0)
                stop.wait(0.02)

    crowd = None
    if readers:
        # In a process of their own: sixty client threads in this one would hold the GIL
        # the probe's timing needs, and measure the client instead of the server. Started
        # (imports done) before the job, which it learns through a queue.
        ctx = multiprocessing.get_context("spawn")
        job_ids = ctx.Queue()
        crowd = ctx.Process(target=read_crowd, args=(base, job_ids))
        crowd.start()
        time.sleep(3.0)
    prober = threading.Thread(target=probe)
    prober.start()
    t0 = time.perf_counter()
    job = http.post("/v1/calibrations",
                    json=calibration_spec(ref, n_trials=n_trials, seed=seed)).json()
    if crowd is not None:
        job_ids.put(job["id"])
    while (status := http.get(f"/v1/calibrations/{job['id']}").json())["state"] not in FINAL:
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    crowd_cpu = None
    if crowd is not None:
        crowd.join(timeout=300)
        crowd_cpu = job_ids.get(timeout=10)
    stop.set()
    prober.join()
    qs = statistics.quantiles(health, n=100)
    return {"clients": 2 * READERS if readers else 0, "state": status["state"],
            "trials_done": status["progress"]["trials_done"], "wall_s": round(wall, 2),
            "healthz_p50_ms": round(qs[49] * 1000, 2), "healthz_p99_ms": round(qs[98] * 1000, 2),
            "readers": crowd_cpu,
            "job": job}


def status_read_ms(base: str, job: dict[str, Any], root: Path, size_mb: int
                   ) -> dict[str, Any]:
    journal = root / "state" / "studies" / f"{job['study']}.log"
    if journal.stat().st_size > size_mb * 1_000_000:
        raise SystemExit(f"the journal is already above {size_mb} MB")
    pad = b'{"op_code": 99, "padding": "' + b"x" * 200 + b'"}\n'
    with journal.open("ab") as f:
        while f.tell() < size_mb * 1_000_000:
            f.write(pad * 1000)
    with httpx.Client(base_url=base, timeout=30) as c:
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            assert c.get(f"/v1/calibrations/{job['id']}").status_code == 200
            times.append(time.perf_counter() - t0)
    return {"journal_bytes": journal.stat().st_size,
            "median_ms": round(statistics.median(times) * 1000, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("embedded", "redis"), default="embedded")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        procs, base = start(root, args.mode)
        try:
            alone = run(base, 51, readers=False)
            crowded = run(base, 52, readers=True)
            small = run(base, 53, readers=False, n_trials=20)["job"]
            sizes = {f"{mb}MB": status_read_ms(base, small, root, mb) for mb in (1, 50)}
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(timeout=30)
    for r in (alone, crowded):
        r.pop("job")
    report = {"mode": args.mode, "load_average_1min": round(os.getloadavg()[0], 2),
              "without_readers": alone, "with_readers": crowded,
              "wall_ratio": round(crowded["wall_s"] / alone["wall_s"], 3),
              "status_read": sizes}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
