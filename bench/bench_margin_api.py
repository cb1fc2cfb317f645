"""Load benchmark: ``POST /v1/margin`` in batches against a real server.

Run from the repository root::

    python -m bench.bench_margin_api [ACCOUNTS_PER_REQUEST ...]

The service (embedded mode) is served by granian (one worker, as ``bench.bench_api``) on
loopback; five instruments are published through the API with Binance's 2021 USD-M tier
table, then ``CLIENTS`` keep-alive clients (threads, each its own connection) post the same
pre-encoded batch of accounts with five positions each (random signed notionals from 100 USD
to 10M USD) for ``DURATION_S`` seconds. Figures per batch size: requests, accounts and
account-instrument requirements per second, and the p50 / p99 request latency. The clients
run on the same 2-core machine as the server, so the figures are a floor.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

from bench.bench_api import free_port, serve, wait_up

DURATION_S = 8.0
CLIENTS = 4
INSTRUMENTS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT")
BINANCE_2021 = {
    "mmr_schedule": [0.004, 0.005, 0.01, 0.025, 0.05, 0.10, 0.125, 0.15, 0.25, 0.50],
    "imr_schedule": [0.008, 0.01, 0.02, 0.05, 0.10, 0.20, 0.25, 0.333, 0.50, 1.0],
    "bracket_caps_usd": [50_000, 250_000, 1_000_000, 10_000_000, 20_000_000, 50_000_000,
                         100_000_000, 200_000_000, 300_000_000, 500_000_000],
}


def _publish(base: str) -> None:
    for name in INSTRUMENTS:
        body = json.dumps({"model": "tiered", "params": BINANCE_2021,
                           "reason": "benchmark parameters"}).encode()
        req = urllib.request.Request(f"{base}/v1/recommendations/{name}", data=body,
                                     headers={"content-type": "application/json"},
                                     method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 201, resp.status


def _batch(n_accounts: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    notional = rng.choice([-1.0, 1.0], size=(n_accounts, len(INSTRUMENTS))) * 10 ** rng.uniform(
        2, 7, size=(n_accounts, len(INSTRUMENTS)))
    return json.dumps({"accounts": [
        {"id": f"acct-{j}", "equity_usd": float(np.abs(notional[j]).sum() / 10),
         "positions": dict(zip(INSTRUMENTS, notional[j].tolist(), strict=True))}
        for j in range(n_accounts)]}).encode()


def _load(port: int, body: bytes, n_accounts: int) -> dict[str, float]:
    latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
    stop = time.perf_counter() + DURATION_S
    errors: list[str] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"content-type": "application/json"}
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/margin", body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            if resp.status != 200:
                errors.append(f"{resp.status}: {payload[:200]!r}")
                return
            latencies[k].append(time.perf_counter() - t0)
        conn.close()

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    if errors:
        raise RuntimeError(errors[0])
    lat = np.array([x for xs in latencies for x in xs])
    requests = lat.shape[0] / wall
    return {"requests_s": requests, "accounts_s": requests * n_accounts,
            "requirements_s": requests * n_accounts * len(INSTRUMENTS),
            "p50_ms": float(np.percentile(lat, 50) * 1000),
            "p99_ms": float(np.percentile(lat, 99) * 1000), "requests": float(lat.shape[0])}


def _rss_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of a process, MB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _server_pids(root_pid: int) -> list[int]:
    """The server process and its children (granian runs its worker as a child)."""
    out = [root_pid]
    try:
        with open(f"/proc/{root_pid}/task/{root_pid}/children") as f:
            out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def main() -> int:
    sizes = [int(a) for a in sys.argv[1:]] or [100, 1_000, 10_000]
    state_dir = tempfile.mkdtemp()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(MARGINLAB_STATE_DIR=state_dir, MARGINLAB_STORAGE=f"journal:{state_dir}/s.log",
               MARGINLAB_RATE_LIMIT_PER_MINUTE="100000000",
               MARGINLAB_GUARDRAILS='{"min_interval_s": 0}')
    port = free_port()
    proc = serve("service.app:create_app", port, env, True)
    rows = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(base + "/healthz")
        _publish(base)
        for size in sizes:
            body = _batch(size, seed=size)
            _load(port, body, size)  # warm-up round, discarded
            rows.append((size, len(body), _load(port, body, size)))
        peak = max(_rss_mb(p) for p in _server_pids(proc.pid))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"granian 1 worker, {CLIENTS} keep-alive clients, {DURATION_S:.0f} s per size, "
          f"{len(INSTRUMENTS)} positions per account (tiered, Binance 2021 table)")
    print("| accounts per request | body KB | requests/s | accounts/s | "
          "requirements/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|")
    for size, nbytes, r in rows:
        print(f"| {size:,} | {nbytes / 1024:,.0f} | {r['requests_s']:,.1f} | "
              f"{r['accounts_s']:,.0f} | {r['requirements_s']:,.0f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} |")
    best = max(r["requirements_s"] for _, _, r in rows)
    print(f"best: {best:,.0f} account-instrument requirements/s (target >= 50,000): "
          f"{'met' if best >= 50_000 else 'NOT met'}")
    print(f"server peak RSS: {peak:,.0f} MB; client peak RSS: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
