"""schemathesis against a real server, from the committed OpenAPI document: no 5xx, and
every response matches the documented status codes, content types and schemas.

Three runs over every endpoint: positive data (valid requests), negative data (requests
outside the schema must be refused with a 4xx, never a 5xx), and stateful sequences that
follow the document's links (upload → dataset, submit → status, events, result, report,
cancel). Together about a minute on the CI machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import random_walk

SPEC = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
schema = schemathesis.openapi.from_path(str(SPEC))
negative = schemathesis.openapi.from_path(str(SPEC))
# The server runs open (no keys): a missing key is not a fault there (keys: tests/test_api.py).
negative.config.generation.update(modes=[GenerationMode.NEGATIVE],
                                  with_security_parameters=False)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
NEGATIVE_CHECKS = [not_a_server_error, negative_data_rejection, content_type_conformance,
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
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
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


@pytest.mark.slow
@negative.parametrize()
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_refuses_what_its_spec_excludes(case: schemathesis.Case, base_url: str) -> None:
    """Requests outside the schema (wrong types, out-of-range values, bad strings) are
    refused with a documented 4xx problem, never a 5xx."""
    case.call_and_validate(base_url=base_url, checks=NEGATIVE_CHECKS, timeout=60)


@pytest.mark.slow
def test_api_sequences_follow_the_links(base_url: str) -> None:
    """Stateful: sequences of calls chained through the document's links (a created
    dataset or calibration is then read, streamed, cancelled) never get a 5xx or a response
    outside the schema."""
    stateful = schemathesis.openapi.from_path(str(SPEC))
    stateful.config.update(base_url=base_url)
    machine = stateful.as_state_machine()
    assert machine.bundles, "the document has no links to follow"

    class Workflow(machine):  # type: ignore[misc,valid-type]
        def validate_response(self, response: Any, case: schemathesis.Case,
                              **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    Workflow.TestCase.settings = settings(
        max_examples=20, stateful_step_count=6, deadline=None,
        suppress_health_check=list(HealthCheck))
    Workflow.TestCase().runTest()
