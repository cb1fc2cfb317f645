"""The committed OpenAPI document is the app's, and documents what clients rely on."""

from __future__ import annotations

import json
from pathlib import Path

from service.openapi import render

COMMITTED = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


def test_committed_spec_matches_the_app() -> None:
    """openapi/openapi.json equals the app's schema (regenerate: python -m service.openapi)."""
    assert COMMITTED.read_text() == render(), (
        "openapi/openapi.json is stale: run `python -m service.openapi > openapi/openapi.json`"
    )


def test_every_operation_has_an_example() -> None:
    """Each endpoint shows an example request, parameter or response."""
    spec = json.loads(COMMITTED.read_text())
    missing = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method == "metrics" or path == "/metrics":
                continue
            text = json.dumps(op)
            if '"examples"' not in text and '"example"' not in text:
                missing.append(f"{method.upper()} {path}")
    assert missing == []


def test_public_paths_are_versioned() -> None:
    """Every API path but the operational ones lives under /v1."""
    spec = json.loads(COMMITTED.read_text())
    paths = set(spec["paths"])
    assert {"/healthz", "/readyz", "/metrics"} <= paths
    assert all(p.startswith("/v1/") for p in paths - {"/", "/healthz", "/readyz", "/metrics"})
