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


def _walk_properties(node: object, where: str) -> list[str]:
    """Paths of every schema property (components, parameters, bodies) without a description."""
    bare: list[str] = []
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            if isinstance(prop, dict) and not prop.get("description"):
                bare.append(f"{where}.{name}")
        for key, value in node.items():
            bare += _walk_properties(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            bare += _walk_properties(value, f"{where}[{i}]")
    return bare


def test_every_field_and_parameter_is_described() -> None:
    """Every property of every schema and every parameter carries a description."""
    spec = json.loads(COMMITTED.read_text())
    assert _walk_properties(spec, "$") == []
    bare = [f"{method.upper()} {path} {p['name']}" for path, item in spec["paths"].items()
            for method, op in item.items() for p in op.get("parameters", [])
            if not p.get("description")]
    assert bare == []


def test_probes_are_open_and_the_stream_is_sse() -> None:
    """/, /healthz, /readyz, /metrics need no key; the events endpoint is text/event-stream;
    array-like FundPoint is documented as the pair it is sent as."""
    spec = json.loads(COMMITTED.read_text())
    assert spec["security"] == [{"apiKey": []}]
    for path in ("/", "/healthz", "/readyz", "/metrics"):
        assert spec["paths"][path]["get"]["security"] == [], path
    events = spec["paths"]["/v1/calibrations/{job_id}/events"]["get"]["responses"]["200"]
    assert list(events["content"]) == ["text/event-stream"]
    fund = spec["components"]["schemas"]["FundPoint"]
    assert fund["type"] == "array"
    assert len(fund["prefixItems"]) == fund["minItems"] == fund["maxItems"] == 2
