"""Publishing a calibration's account-level recommendation (issue 14 item 4).

The dotted keys of a recommendation map into the publishable kinds (the liquidation engine's
settings, the portfolio grid, one haircut schedule per asset), each checked by its kind's
guardrails against its own key's latest update and all written in one audit transaction:
a refusal anywhere names the field path and leaves every key as it was (checked on the
embedded file store and the SQLite audit trail of a real app). The expected sets are
written out here from the spec by hand (the engine's holding and latency from the spec's
30-minute bars: a week and one bar; a searched ratio above the band before it counts at
that band's ratio).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from calibration.calibrate import CalibrationResult
from calibration.spec import decode_spec
from service.app import create_app
from service.schemas import CalibrationJob
from service.settings import Settings

REASON = "monthly recalibration of the venue"
MODEL = {"decay": 0.95, "confidence": 0.99}
BAR_SECONDS = 1800


def _spec(engine: dict[str, Any]) -> dict[str, Any]:
    return {
        "data": [{"instrument": "BTCUSDT", "ref": "btc.csv"},
                 {"instrument": "ETHUSDT", "ref": "eth.csv"}],
        "model": "ewma",
        "search_space": {"engine.partial_fraction": {"low": 0.1, "high": 0.9},
                         "portfolio.price_range": {"low": 0.05, "high": 0.3},
                         "haircuts.BTC.ratios[1]": {"low": 0.5, "high": 1.0},
                         "haircuts.ETH.depth.impact_coef": {"low": 0.0, "high": 0.1}},
        "accounts": {"population": {"accounts_per_entry": 2}, "mode": "portfolio",
                     "engine": engine, "portfolio": {"points": 7},
                     "haircuts": {"BTC": {"caps_usd": [1e6], "ratios": [0.95, 0.9]},
                                  "ETH": {"depth": {"spread_rate": 0.001}}}},
    }


def _calibration(client: TestClient[Any], params: dict[str, Any], *,
                 engine: dict[str, Any] | None = None, eth_ratio: float = 0.9) -> str:
    """A finished calibration in the app's stores (job, spec and result, as a worker leaves
    them) recommending ``params``; ETH's depth-derived schedule is the evidence's."""
    spec = decode_spec(msgspec.json.encode(_spec(engine or {"policy": "partial"})))
    job_id = uuid.uuid4().hex
    key = uuid.uuid4().hex
    result = msgspec.convert({
        "study": "s", "storage": "memory", "model": "ewma", "spec_hash": "0" * 64, "seed": 0,
        "engine_version": "test", "data_fingerprints": {"BTCUSDT": "a" * 64,
                                                        "ETHUSDT": "b" * 64},
        "trials": {"complete": 1}, "sampler": "random", "pareto_front": [],
        "horizon_bars": 2, "horizon": "1h", "bar_seconds": BAR_SECONDS, "workers": 1,
        "reproducible": True, "reproducibility": "",
        "recommendation": {
            "trial": 0, "params": params, "feasible": True, "within_risk_appetite": True,
            "objectives": {}, "constraints": {}, "binding_constraints": [], "in_sample": {},
            "out_of_sample": {}, "change_vs_published": None, "explanation": "",
            "accounts": {"whole_span": {"haircuts": {
                "BTC": {"caps_usd": [1e6], "ratios": [0.95, 0.9]},
                "ETH": {"caps_usd": [], "ratios": [eth_ratio]}}}}},
    }, CalibrationResult)
    job = CalibrationJob(id=job_id, state="succeeded", cache_key=key, spec_hash="0" * 64,
                         study="s", model="ewma", instruments=["BTCUSDT", "ETHUSDT"],
                         n_trials=1, created_at="2026-01-01T00:00:00Z")
    state = client.app.state.service_state
    portal = client.blocking_portal
    portal.call(state.stores["results"].set, key, msgspec.json.encode(result))
    portal.call(state.stores["jobs"].set, f"{job_id}:spec", msgspec.json.encode(spec))
    portal.call(state.put, "jobs", job_id, job)
    return job_id


def _client(tmp_path: Path, guardrails: str = '{"min_interval_s": 0}') -> TestClient[Any]:
    return TestClient(create_app(Settings(state_dir=str(tmp_path / ".state"),
                                          data_root=str(tmp_path), guardrails_json=guardrails)))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient[Any]]:
    with _client(tmp_path) as c:
        yield c


def _publish(client: TestClient[Any], job_id: str, **extra: Any) -> Any:
    return client.post("/v1/recommendations/BTCUSDT",
                       json={"calibration_id": job_id, "reason": REASON, **extra})


def _params(key: str, client: TestClient[Any]) -> dict[str, Any]:
    got = client.get(f"/v1/recommendations/{key}")
    assert got.status_code == 200, got.text
    params: dict[str, Any] = got.json()["params"]
    return params


def _versions(client: TestClient[Any], keys: list[str]) -> list[int]:
    return [len(client.get(f"/v1/recommendations/{k}/history").json()) for k in keys]


KEYS = ["BTCUSDT", "BTCUSDT.engine", "BTCUSDT.portfolio", "BTCUSDT.haircuts.BTC",
        "ETH-HAIRCUTS"]


def test_every_set_of_a_recommendation_publishes_or_none(client: TestClient[Any]) -> None:
    """The model parameters publish under the instrument and each account-level set under
    its own key, in one update; a second recommendation moving the engine's partial
    fraction 0.4 → 0.55 (limit 0.1 per update) is refused naming engine.partial_fraction,
    and no key moves, the ones whose change was allowed included; within the limits all
    publish as version 2."""
    first = {**MODEL, "engine.partial_fraction": 0.4, "portfolio.price_range": 0.12,
             "haircuts.BTC.ratios[1]": 0.97, "haircuts.ETH.depth.impact_coef": 0.03}
    rename = {"publish_as": {"haircuts.ETH": "ETH-HAIRCUTS"}}
    r = _publish(client, _calibration(client, first), **rename)
    assert r.status_code == 201, r.text
    assert r.json()["published_with"] == {k: 1 for k in KEYS[1:]}
    assert _params("BTCUSDT", client) == MODEL
    engine = _params("BTCUSDT.engine", client)
    assert (engine["policy"], engine["partial_fraction"]) == ("partial", 0.4)
    # a week of 30-minute bars, one bar of latency (the spec's liquidation defaults)
    assert (engine["holding_bars"], engine["latency_bars"]) == (7 * 48, 1)
    grid = _params("BTCUSDT.portfolio", client)
    assert (grid["price_range"], grid["points"], grid["horizon_bars"]) == (0.12, 7, 2)
    # 0.97 above the first band's 0.95 counts at 0.95
    assert _params("BTCUSDT.haircuts.BTC", client) == {"caps_usd": [1e6],
                                                       "ratios": [0.95, 0.95]}
    assert _params("ETH-HAIRCUTS", client) == {"caps_usd": [], "ratios": [0.9]}

    too_far = {**first, "decay": 0.955, "engine.partial_fraction": 0.55,
               "portfolio.price_range": 0.13}
    refused = _publish(client, _calibration(client, too_far, eth_ratio=0.899), **rename)
    assert refused.status_code == 422, refused.text
    body = refused.json()
    assert body["field"] == "engine.partial_fraction"
    [v] = body["violations"]
    assert (v["key"], v["rule"]) == ("BTCUSDT.engine", "absolute")
    assert v["excess"] == pytest.approx(0.05)
    assert _versions(client, KEYS) == [1] * 5
    assert _params("BTCUSDT", client)["decay"] == 0.95
    assert _params("BTCUSDT.portfolio", client)["price_range"] == 0.12

    within = {**too_far, "engine.partial_fraction": 0.5}
    job = _calibration(client, within, eth_ratio=0.899)
    retry = {"Idempotency-Key": "update-2"}
    ok = client.post("/v1/recommendations/BTCUSDT", headers=retry, json={
        "calibration_id": job, "reason": REASON, **rename})
    assert ok.status_code == 201, ok.text
    assert ok.json()["version"] == 2
    assert _versions(client, KEYS) == [2] * 5
    # a retry gets the same answer, the other keys' versions included, and no new version
    again = client.post("/v1/recommendations/BTCUSDT", headers=retry, json={
        "calibration_id": job, "reason": REASON, **rename})
    assert again.json() == ok.json()
    assert ok.json()["published_with"] == {k: 2 for k in KEYS[1:]}
    assert _versions(client, KEYS) == [2] * 5
    assert _params("BTCUSDT.engine", client)["partial_fraction"] == 0.5
    assert _params("ETH-HAIRCUTS", client)["ratios"] == [0.899]

    unknown = _publish(client, _calibration(client, within), publish_as={"haircuts.SOL": "X"})
    assert (unknown.status_code, unknown.json()["field"]) == (422, "publish_as.haircuts.SOL")
    long_key = {"publish_as": {"engine": "E" * 65}}
    too_long = _publish(client, _calibration(client, within), **long_key)
    assert too_long.status_code == 400  # the body's schema: a key is at most 64 characters
    assert too_long.json()["field"].startswith("publish_as")
    explicit = client.post("/v1/recommendations/BTCUSDT", json={
        "model": "ewma", "params": MODEL, "reason": REASON, **rename})
    assert (explicit.status_code, explicit.json()["field"]) == (422, "publish_as")


def test_a_defi_preset_publishes_under_the_steward_caps(tmp_path: Path) -> None:
    """With an operator's looser limit on haircut ratios (1 point per update, no interval),
    a recommendation of a plain engine moves a band's ratio 0.5 points; the same move of an
    aave_v3 engine is refused by Aave's steward caps (venues.md §3: 0.25 points, 3 days
    apart), naming haircuts.BTC.ratios, and changes nothing. The preset is published with
    every set and may not be dropped or changed in an update, so an explicit update of the
    key stays under the caps."""
    loose = '{"min_interval_s": 0, "max_change": {"ratios": 0.01}}'
    with _client(tmp_path, loose) as client:
        first = {**MODEL, "engine.partial_fraction": 0.4, "portfolio.price_range": 0.12,
                 "haircuts.BTC.ratios[1]": 0.9, "haircuts.ETH.depth.impact_coef": 0.03}
        moved = {**first, "haircuts.BTC.ratios[1]": 0.895}
        for engine, prefix in (({"policy": "partial"}, "CEX"), ({"preset": "aave_v3"}, "DEFI")):
            keys = {p: f"{prefix}.{p}" for p in ("engine", "portfolio", "haircuts.BTC",
                                                 "haircuts.ETH")}
            job = _calibration(client, first, engine=engine)
            assert _publish(client, job, publish_as=keys).status_code == 201
            again = _publish(client, _calibration(client, moved, engine=engine),
                             publish_as=keys)
            if prefix == "CEX":
                assert again.status_code == 201, again.text
                continue
            assert again.status_code == 422, again.text
            found = {(v["guardrail"], v["parameter"]): v for v in again.json()["violations"]}
            ratio = found[("max_change", "haircuts.BTC.ratios")]
            assert ratio["limit"] == pytest.approx(0.0025)
            assert ratio["actual"] == pytest.approx(0.005)
            assert found[("min_interval", "engine")]["limit"] == 3 * 86_400
            assert _params("DEFI.haircuts.BTC", client)["ratios"] == [0.95, 0.9]
            assert _params("DEFI.engine", client)["preset"] == "aave_v3"
            assert _params("DEFI.haircuts.BTC", client)["preset"] == "aave_v3"
        # every DeFi set is refused (too soon); the model parameters of the request are not one
        assert {v["key"] for v in again.json()["violations"]} == {
            "DEFI.engine", "DEFI.portfolio", "DEFI.haircuts.BTC", "DEFI.haircuts.ETH"}
        dropped = client.post("/v1/recommendations/DEFI.engine", json={
            "model": "liquidation_engine", "reason": REASON,
            "params": {**_params("DEFI.engine", client), "preset": "hyperliquid"}})
        assert dropped.status_code == 422
        assert "preset" in {v["parameter"] for v in dropped.json()["violations"]}
        # an explicit schedule for the key stays under the caps: the preset is part of it
        explicit = client.post("/v1/recommendations/DEFI.haircuts.BTC", json={
            "model": "haircuts", "reason": REASON,
            "params": {"caps_usd": [1e6], "ratios": [0.95, 0.895], "preset": "aave_v3"}})
        assert explicit.status_code == 422
        assert {v["guardrail"] for v in explicit.json()["violations"]} == {
            "min_interval", "max_change"}


def test_an_update_published_together_is_one_transaction(tmp_path: Path) -> None:
    """When one set of an update cannot be written (its key's version was taken in the
    meantime), the audit trail keeps none of the update's rows."""
    from datetime import UTC, datetime

    from sqlalchemy.exc import IntegrityError

    from service.audit import AuditLog, UpdateRecord

    audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}")

    def row(key: str, version: int) -> UpdateRecord:
        return UpdateRecord(instrument=key, version=version, model="ewma",
                            previous_params=None, new_params=dict(MODEL),
                            calibration_id="c", data_fingerprints={}, actor="admin",
                            reason=REASON, rollback_of=None, created_at=datetime.now(UTC))

    audit.append(row("B.engine", 1))
    with pytest.raises(IntegrityError):
        audit.append(row("B", 1), idempotency_key="k", request_hash="h",
                     together=(row("B.portfolio", 1), row("B.engine", 1)))
    assert audit.latest("B") is None
    assert audit.latest("B.portfolio") is None
    assert audit.by_idempotency_key("k") is None
    assert len(audit.history("B.engine")) == 1
    audit.close()
