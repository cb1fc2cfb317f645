"""Fault injection on publishing: a Redis of the test's own is SIGKILLed mid-run.

Two API processes (``marginlab serve``) in Redis mode share a ``redis-server`` started for
the test (no persistence: a killed Redis comes back empty) and an audit trail (SQLite in the
state directory, or a PostgreSQL database of the test's own). A publish during the outage
must succeed once (or be safely retried), leave exactly one audit version, be served by both
processes from the audit trail, and once Redis is back the store must agree with the trail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.api_helpers import free_port, wait_for
from tests.test_storage import fresh_postgres_db

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REASON = "fault-injection publish"
#: Where RedisStore keeps an instrument's published parameters (namespace ``marginlab``).
STORE_KEY = "marginlab_published:{}"
#: Seconds between two updates: the retry comes sooner, so only idempotency lets it through.
MIN_INTERVAL_S = 3.0


class KillableRedis:
    """``redis-server --save '' --appendonly no`` on a free port: SIGKILL loses everything."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on PATH")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout_s=10, every_s=0.05, what=f"redis-server on {self.port}")

    def ping(self) -> bool:
        with redis.Redis.from_url(self.url, socket_connect_timeout=1) as client:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stored_version(self, instrument: str) -> int | None:
        with redis.Redis.from_url(self.url) as client:
            raw = client.get(STORE_KEY.format(instrument))
        return None if raw is None else int(json.loads(raw)["version"])


@pytest.fixture
def own_redis() -> Iterator[KillableRedis]:
    server = KillableRedis()
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """The audit trail: SQLite in the state directory (``None``), or PostgreSQL."""
    if request.param == "sqlite":
        yield None
        return
    with fresh_postgres_db() as url:
        yield url


@contextlib.contextmanager
def api_servers(root: Path, redis_url: str, audit_db: str | None,
                count: int) -> Iterator[list[httpx.Client]]:
    """``count`` API processes on one Redis and one audit trail; yields a client of each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARGINLAB_")}
    env.update(REDIS_URL=redis_url, MARGINLAB_DATA_ROOT=str(root),
               MARGINLAB_STATE_DIR=str(root / "state"),
               MARGINLAB_STORAGE=f"journal:{root / 'state' / 'studies.log'}",
               MARGINLAB_GUARDRAILS=json.dumps({"min_interval_s": MIN_INTERVAL_S}))
    if audit_db:
        env["MARGINLAB_AUDIT_DB"] = audit_db
    procs: list[subprocess.Popen[bytes]] = []
    clients: list[httpx.Client] = []
    logs: list[Any] = []
    try:
        for i in range(count):
            port = free_port()
            log = (root / f"api-{i}.log").open("wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT))
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
            clients.append(client)

            def up(c: httpx.Client = client) -> bool:
                try:
                    return c.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            try:
                wait_for(up, timeout_s=60, what=f"API {i}")
            except AssertionError as exc:
                log.flush()
                tail = (root / f"api-{i}.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"{exc}\n{tail}") from None
        yield clients
    finally:
        for client in clients:
            client.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def publish(client: httpx.Client, decay: float, key: str) -> httpx.Response:
    return client.post("/v1/recommendations/BTC", headers={"Idempotency-Key": key},
                       json={"model": "ewma", "reason": REASON,
                             "params": {"decay": decay, "horizon_bars": 4}})


def version_of(client: httpx.Client) -> int | None:
    response = client.get("/v1/recommendations/BTC")
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    return int(body["version"])


def test_publish_during_a_redis_outage(own_redis: KillableRedis, audit_db: str | None,
                                       tmp_path: Path) -> None:
    """Redis SIGKILLed: the publish succeeds (its retry too, same version), the trail has
    one new version, both processes answer it, and the restarted (empty) Redis is rebuilt
    to agree with the trail."""
    with api_servers(tmp_path, own_redis.url, audit_db, 2) as (a, b):
        first = publish(a, 0.97, "k-1")
        assert first.status_code == 201, first.text
        assert version_of(a) == 1
        assert version_of(b) == 1  # b now holds version 1 in memory

        own_redis.kill()
        time.sleep(MIN_INTERVAL_S)
        during = publish(a, 0.975, "k-2")
        assert during.status_code == 201, during.text  # committed to the audit trail
        retry = publish(a, 0.975, "k-2")  # a client unsure of the answer retries; within
        assert retry.status_code == 201, retry.text  # min_interval, but the same key
        assert retry.json() == during.json()
        assert retry.json()["version"] == 2
        history = a.get("/v1/recommendations/BTC/history").json()
        assert [h["version"] for h in history] == [2, 1]
        assert version_of(a) == 2
        # b missed the invalidation; its listener lost Redis, so it asks the audit trail
        assert wait_for(lambda: version_of(b) == 2, timeout_s=10, what="b to serve v2")
        assert a.get("/v1/recommendations/BTC").json()["params"] == {"decay": 0.975,
                                                                     "horizon_bars": 4}

        own_redis.start()  # empty: nothing was persisted
        wait_for(lambda: own_redis.stored_version("BTC") == 2, timeout_s=15,
                 what="the store to be rebuilt from the audit trail")
        for client in (a, b):
            got = client.get("/v1/recommendations/BTC")
            assert got.status_code == 200
            assert got.json()["version"] == 2
            assert client.get("/v1/recommendations/BTC", headers={
                "If-None-Match": got.headers["etag"]}).status_code == 304
        again = publish(b, 0.975, "k-2")
        assert again.status_code == 201
        assert again.json()["version"] == 2
        assert len(b.get("/v1/recommendations/BTC/history").json()) == 2
