"""Load benchmark: ``GET /v1/recommendations/{instrument}`` in embedded and Redis mode
against ``/healthz`` of the same app and a bare Litestar ``/ping``, in one run.

Run from the repository root with ``wrk`` installed (``apt-get install wrk``) and
``redis-server`` on PATH (a server of the benchmark's own is started on a free port; set
``BENCH_REDIS_URL`` to use another)::

    python -m bench.bench_api

Every app is served by granian (one worker, the same settings) on loopback in turn and
loaded by wrk with 64 connections. Each service publishes BTCUSDT through its own API first
(so the audit trail and the store hold it), then serves it from its per-process cache: in
Redis mode invalidated by pub/sub, in embedded mode checked with one ``stat`` per request.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

DURATION_S = 10
CONNECTIONS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout_s: float = 30) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def serve(target: str, port: int, env: dict[str, str], factory: bool) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--no-ws", "--log-level", "warning"]
    if factory:
        cmd.append("--factory")
    return subprocess.Popen([*cmd, target], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wrk(url: str) -> tuple[float, float]:
    """(requests per second, p99 latency in ms)."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{DURATION_S}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None
    value, unit = float(p99.group(1)), p99.group(2)
    return rps, value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def publish_btc(base: str) -> None:
    """Publish BTCUSDT through the API (audit trail and store)."""
    body = json.dumps({"model": "ewma", "reason": "benchmark parameters",
                       "params": {"decay": 0.975, "confidence": 0.995, "horizon_bars": 4}})
    req = urllib.request.Request(f"{base}/v1/recommendations/BTCUSDT", data=body.encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 201, resp.status


def own_redis() -> tuple[str, subprocess.Popen[bytes] | None]:
    """``BENCH_REDIS_URL``, or a ``redis-server`` of the benchmark's own."""
    if os.environ.get("BENCH_REDIS_URL"):
        return os.environ["BENCH_REDIS_URL"], None
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
            return f"redis://127.0.0.1:{port}/0", proc
        time.sleep(0.1)
    raise RuntimeError("redis-server did not start")


def main() -> int:
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    redis_url, redis_proc = own_redis()
    results: dict[str, tuple[float, float]] = {}
    try:
        modes = {"embedded": {}, "redis": {"REDIS_URL": redis_url}}
        port = free_port()
        proc = serve("bench._ping_app:app", port, dict(os.environ), False)
        try:
            url = f"http://127.0.0.1:{port}/ping"
            wait_up(url)
            wrk(url)  # warm-up round, discarded
            results["bare /ping"] = wrk(url)
        finally:
            proc.terminate()
            proc.wait()
        for mode, extra in modes.items():
            state_dir = tempfile.mkdtemp()
            env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
            env.update(MARGINLAB_STATE_DIR=state_dir,
                       MARGINLAB_STORAGE=f"journal:{state_dir}/studies.log",
                       MARGINLAB_RATE_LIMIT_PER_MINUTE="100000000", **extra)
            port = free_port()
            proc = serve("service.app:create_app", port, env, True)
            try:
                base = f"http://127.0.0.1:{port}"
                wait_up(base + "/healthz")
                publish_btc(base)
                for name, path in (("/healthz", "/healthz"),
                                   ("GET /v1/recommendations/BTCUSDT",
                                    "/v1/recommendations/BTCUSDT")):
                    wrk(base + path)  # warm-up round, discarded
                    results[f"{mode}: {name}"] = wrk(base + path)
            finally:
                proc.terminate()
                proc.wait()
                shutil.rmtree(state_dir, ignore_errors=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()
    print("| endpoint | req/s | p99 ms |\n|---|---|---|")
    for name, (rps, p99) in results.items():
        print(f"| {name} | {rps:,.0f} | {p99:.1f} |")
    ok = True
    for mode in ("embedded", "redis"):
        health, _ = results[f"{mode}: /healthz"]
        rec_rps, rec_p99 = results[f"{mode}: GET /v1/recommendations/BTCUSDT"]
        ratio = rec_rps / health
        ok &= ratio >= 0.5 and rec_p99 < 20
        print(f"{mode}: recommendations / healthz throughput {ratio:.2f}, p99 {rec_p99:.1f} ms")
    ping, _ = results["bare /ping"]
    print(f"targets (recommendations >= 0.50 of /healthz, p99 < 20 ms): "
          f"{'met' if ok else 'NOT met'}; /healthz / bare ping: "
          f"{results['embedded: /healthz'][0] / ping:.2f} (embedded), "
          f"{results['redis: /healthz'][0] / ping:.2f} (redis)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
