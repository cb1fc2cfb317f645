"""Load benchmark: ``GET /v1/recommendations/{instrument}`` against a bare Litestar ``/ping``.

Run from the repository root with Redis on 127.0.0.1:6379 and ``wrk`` installed
(``apt-get install wrk``)::

    python -m bench.bench_api

Both apps are served by granian (one worker, the same settings) on loopback in turn, and
loaded by wrk with 64 connections; the service runs in Redis mode (database 14 of the local
Redis) so the published-parameters cache and its pub/sub invalidation are the real ones.
"""

from __future__ import annotations

import asyncio
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
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


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


async def publish_btc() -> None:
    from service.recommendations import publish
    from service.schemas import PublishedParameters
    from service.settings import Settings
    from service.state import State, make_root_store

    state = State(make_root_store(Settings(redis_url=REDIS_URL)))
    try:
        await publish(state, PublishedParameters(
            instrument="BTCUSDT", model="ewma",
            params={"decay": 0.975, "confidence": 0.995, "horizon_bars": 4},
            version=1, published_at="2026-11-24T00:00:00Z"), None)
    finally:
        await state.close()


def main() -> int:
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    asyncio.run(publish_btc())
    state_dir = tempfile.mkdtemp()
    env = {**os.environ, "REDIS_URL": REDIS_URL, "MARGINLAB_STATE_DIR": state_dir,
           "MARGINLAB_STORAGE": f"journal:{state_dir}/studies.log",
           "MARGINLAB_RATE_LIMIT_PER_MINUTE": "100000000"}
    results = {}
    for name, target, factory, path in (
        ("bare /ping", "bench._ping_app:app", False, "/ping"),
        ("GET /v1/recommendations/BTCUSDT", "service.app:create_app", True,
         "/v1/recommendations/BTCUSDT"),
    ):
        port = free_port()
        proc = serve(target, port, env, factory)
        try:
            url = f"http://127.0.0.1:{port}{path}"
            wait_up(url)
            wrk(url)  # warm-up round, discarded
            results[name] = wrk(url)
        finally:
            proc.terminate()
            proc.wait()
    ping_rps, _ping_p99 = results["bare /ping"]
    rec_rps, rec_p99 = results["GET /v1/recommendations/BTCUSDT"]
    print("| endpoint | req/s | p99 ms |\n|---|---|---|")
    for name, (rps, p99) in results.items():
        print(f"| {name} | {rps:,.0f} | {p99:.1f} |")
    ratio = rec_rps / ping_rps
    ok = ratio >= 0.5 and rec_p99 < 20
    print(f"\nrecommendations / ping throughput: {ratio:.2f} (target >= 0.50); p99 "
          f"{rec_p99:.1f} ms (target < 20): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
