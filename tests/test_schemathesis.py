"""schemathesis against a real server, from the committed OpenAPI document: no 5xx, and
every response matches the documented status codes, content types and schemas."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import random_walk

SPEC = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
schema = schemathesis.openapi.from_path(str(SPEC))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service (embedded mode) served by granian on a free loopback port."""
    root = tmp_path_factory.mktemp("schemathesis")
    close = random_walk(2000, seed=4)
    lines = ["timestamp,open,high,low,close,volume"]
    for i, c in enumerate(close):
        o = close[i - 1] if i else c
        lines.append(f"{1_600_000_000 + 60 * i},{o},{max(o, c) * 1.001},{min(o, c) * 0.999},"
                     f"{c},10")
    (root / "BTC.csv").write_text("\n".join(lines) + "\n")
    port = _free_port()
    env = {**os.environ, "MARGINLAB_DATA_ROOT": str(root),
           "MARGINLAB_STATE_DIR": str(root / ".state"), "MARGINLAB_MAX_TRIALS": "5",
           "MARGINLAB_RATE_LIMIT_PER_MINUTE": "1000000"}
    env.pop("REDIS_URL", None)
    env.pop("MARGINLAB_API_KEYS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "calibration.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the service did not start") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_spec(case: schemathesis.Case, base_url: str) -> None:
    """Generated requests never get a 5xx or a response outside the documented schema."""
    case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=60)
