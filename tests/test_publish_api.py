"""Publishing over HTTP: guardrails enforced server-side, an append-only audit trail, rollback."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from service.app import create_app
from service.settings import Settings

REASON = "initial listing parameters"


def _client(tmp_path: Path, **extra: Any) -> TestClient[Any]:
    settings = Settings(state_dir=str(tmp_path / ".state"), data_root=str(tmp_path),
                        guardrails_json='{"min_interval_s": 0}', **extra)
    return TestClient(create_app(settings))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient[Any]]:
    with _client(tmp_path) as c:
        yield c


def _publish(c: TestClient[Any], **body: Any) -> Any:
    return c.post("/v1/recommendations/BTC", json={"model": "ewma", "reason": REASON, **body})


def test_publish_then_read_with_etag(client: TestClient[Any]) -> None:
    """A first publish is version 1; GET serves it with an ETag and 304 when unchanged."""
    r = _publish(client, params={"decay": 0.97, "confidence": 0.99})
    assert r.status_code == 201
    assert r.json()["version"] == 1
    got = client.get("/v1/recommendations/BTC")
    assert got.json()["params"] == {"decay": 0.97, "confidence": 0.99}
    assert client.get("/v1/recommendations/BTC",
                      headers={"if-none-match": got.headers["etag"]}).status_code == 304


def test_guardrail_refusal_names_the_excess_and_changes_nothing(client: TestClient[Any]) -> None:
    """decay 0.97 → 0.99 (limit 0.01) is refused with the figures; version 1 stays in force."""
    _publish(client, params={"decay": 0.97, "confidence": 0.99})
    r = _publish(client, params={"decay": 0.99, "confidence": 0.99})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["field"] == "decay"
    [v] = body["violations"]
    assert v["guardrail"] == "max_change"
    assert v["limit"] == pytest.approx(0.01)
    assert v["excess"] == pytest.approx(0.01)
    assert client.get("/v1/recommendations/BTC").json()["params"]["decay"] == 0.97
    assert len(client.get("/v1/recommendations/BTC/history").json()) == 1


def test_min_interval_and_reason_are_enforced(tmp_path: Path) -> None:
    """With a 1-day minimum, a second update the same day is refused; so is a missing reason."""
    settings = Settings(state_dir=str(tmp_path / ".state"), data_root=str(tmp_path))
    with TestClient(create_app(settings)) as c:
        assert _publish(c, params={"decay": 0.97}).status_code == 201
        r = _publish(c, params={"decay": 0.971})
        assert r.status_code == 422
        assert r.json()["violations"][0]["guardrail"] == "min_interval"
        r = c.post("/v1/recommendations/ETH", json={"model": "ewma", "reason": "",
                                                    "params": {"decay": 0.97}})
        assert r.json()["violations"][0]["guardrail"] == "reason"


def test_history_and_rollback(client: TestClient[Any]) -> None:
    """Rollback to version 1 is a new, audited update (version 3, rollback_of 1)."""
    _publish(client, params={"decay": 0.97})
    _publish(client, params={"decay": 0.975})
    r = client.post("/v1/recommendations/BTC",
                    json={"rollback_to_version": 1, "reason": "rollback after review"})
    assert r.status_code == 201
    assert r.json()["version"] == 3
    assert r.json()["params"] == {"decay": 0.97}
    history = client.get("/v1/recommendations/BTC/history").json()
    assert [(h["version"], h["rollback_of"]) for h in history] == [(3, 1), (2, None), (1, None)]
    assert history[0]["previous_params"] == {"decay": 0.975}
    assert {"actor", "reason", "created_at", "calibration_id", "data_fingerprints"} <= set(
        history[0])


def test_only_admins_publish(tmp_path: Path) -> None:
    """An operator key is refused (403); an admin key publishes and is named in the audit."""
    from service.auth import hash_key

    keys = {hash_key("op-key"): {"name": "ops", "role": "operator"},
            hash_key("admin-key"): {"name": "risk-lead", "role": "admin"}}
    with _client(tmp_path, api_keys=json.dumps(keys)) as c:
        body = {"model": "ewma", "reason": REASON, "params": {"decay": 0.97}}
        assert c.post("/v1/recommendations/BTC", json=body,
                      headers={"authorization": "Bearer op-key"}).status_code == 403
        assert c.post("/v1/recommendations/BTC", json=body,
                      headers={"authorization": "Bearer admin-key"}).status_code == 201
        history = c.get("/v1/recommendations/BTC/history",
                        headers={"authorization": "Bearer op-key"}).json()
        assert history[0]["actor"] == "risk-lead"


def test_audit_survives_a_restart(tmp_path: Path) -> None:
    """The audit trail is durable: a new app on the same state dir serves the published value."""
    with _client(tmp_path) as c:
        _publish(c, params={"decay": 0.97})
    (tmp_path / ".state" / "store").rename(tmp_path / ".state" / "store-lost")
    with _client(tmp_path) as c:
        assert c.get("/v1/recommendations/BTC").json()["params"] == {"decay": 0.97}


def test_bad_publish_requests(client: TestClient[Any]) -> None:
    """Unknown parameters, two sources at once, unknown calibration: 422 with the field."""
    r = _publish(client, params={"lambda": 0.9})
    assert (r.status_code, r.json()["field"]) == (422, "lambda")
    r = _publish(client, params={"decay": 0.9}, calibration_id="x")
    assert (r.status_code, r.json()["field"]) == (422, "calibration_id")
    r = client.post("/v1/recommendations/BTC", json={"calibration_id": "nope",
                                                     "reason": REASON})
    assert (r.status_code, r.json()["field"]) == (422, "calibration_id")


@pytest.mark.integration
def test_audit_on_postgresql(tmp_path: Path) -> None:
    """With a PostgreSQL audit database, publish and history work and rows persist there."""
    import psycopg

    name = f"marginlab_audit_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres",
                         autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        with _client(tmp_path, audit_db=url) as c:
            assert _publish(c, params={"decay": 0.97}).status_code == 201
            assert _publish(c, params={"decay": 0.98}).status_code == 201
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT version FROM marginlab_published_updates "
                                "ORDER BY version").fetchall()
        assert [r[0] for r in rows] == [1, 2]
    finally:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres",
                             autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- guardrails on effective parameters ------------------------------------------------------


def test_omitting_parameters_is_refused_naming_them(client: TestClient[Any]) -> None:
    """The issue's case: after decay 0.90 / floor 0.05, {horizon_bars: 60} alone would move
    both to their defaults: 422 naming a dropped parameter, nothing published."""
    assert _publish(client, params={"decay": 0.90, "floor_rate": 0.05,
                                    "horizon_bars": 60}).status_code == 201
    r = _publish(client, params={"horizon_bars": 60})
    assert r.status_code == 422
    body = r.json()
    assert body["field"] == "decay"
    kinds = {(v["guardrail"], v["parameter"]) for v in body["violations"]}
    assert {("dropped", "decay"), ("dropped", "floor_rate"), ("max_change", "decay"),
            ("max_change", "floor_rate")} == kinds
    assert len(client.get("/v1/recommendations/BTC/history").json()) == 1


def test_horizon_is_guarded(client: TestClient[Any]) -> None:
    """horizon_bars 4 → 5 (+25%) is published; 5 → 8 (+60%) is refused as relative."""
    assert _publish(client, params={"decay": 0.97, "horizon_bars": 4}).status_code == 201
    assert _publish(client, params={"decay": 0.97, "horizon_bars": 5}).status_code == 201
    r = _publish(client, params={"decay": 0.97, "horizon_bars": 8})
    assert r.status_code == 422
    [v] = r.json()["violations"]
    assert (v["parameter"], v["rule"]) == ("horizon_bars", "relative")
    assert v["actual"] == pytest.approx(3 / 5)


# --- one durable step: idempotency and the audit trail as the truth -------------------------


def test_idempotency_key_makes_retries_safe(tmp_path: Path) -> None:
    """Same key and body: the same version, one audit row, even inside min_interval; the
    same key with another body is refused (422 naming the header)."""
    settings = Settings(state_dir=str(tmp_path / ".state"), data_root=str(tmp_path))
    with TestClient(create_app(settings)) as c:  # a day between updates
        key = {"Idempotency-Key": "publish-btc-0001"}
        first = c.post("/v1/recommendations/BTC", headers=key,
                       json={"model": "ewma", "reason": REASON, "params": {"decay": 0.97}})
        again = c.post("/v1/recommendations/BTC", headers=key,
                       json={"model": "ewma", "reason": REASON, "params": {"decay": 0.97}})
        assert (first.status_code, again.status_code) == (201, 201)
        assert again.json() == first.json()
        assert len(c.get("/v1/recommendations/BTC/history").json()) == 1
        other = c.post("/v1/recommendations/BTC", headers=key,
                       json={"model": "ewma", "reason": REASON, "params": {"decay": 0.975}})
        assert other.status_code == 422
        assert other.json()["field"] == "Idempotency-Key"
        assert len(c.get("/v1/recommendations/BTC/history").json()) == 1


def test_publish_with_the_store_down_succeeds_and_reads_answer_from_the_audit(
        client: TestClient[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit row commits, the store write fails: 201 all the same, GET answers the new
    version from the audit trail while the store is down, and the next read repairs it."""
    from service.state import StateFileStore as FileStore

    assert _publish(client, params={"decay": 0.97}).status_code == 201
    assert client.get("/v1/recommendations/BTC").json()["version"] == 1
    real_get, real_set = FileStore.get, FileStore.set

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("store down")

    monkeypatch.setattr(FileStore, "set", down)
    monkeypatch.setattr(FileStore, "get", down)
    r = _publish(client, params={"decay": 0.975})
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2
    assert client.get("/v1/recommendations/BTC").json()["version"] == 2
    monkeypatch.setattr(FileStore, "set", real_set)
    monkeypatch.setattr(FileStore, "get", real_get)
    assert client.get("/v1/recommendations/BTC").json()["params"] == {"decay": 0.975}
    stored = client.blocking_portal.call(
        client.app.state.service_state.stores["published"].get, "BTC")
    assert stored is not None
    assert json.loads(stored)["version"] == 2
    assert [h["version"] for h in client.get("/v1/recommendations/BTC/history").json()] == [2, 1]


def test_a_store_behind_the_audit_is_rebuilt_at_start(tmp_path: Path) -> None:
    """A store left at version 1 while the audit has version 2 (a crash between the two) is
    rebuilt from the audit trail when the service starts."""
    with _client(tmp_path) as c:
        _publish(c, params={"decay": 0.97})
        stale = c.blocking_portal.call(c.app.state.service_state.stores["published"].get, "BTC")
        _publish(c, params={"decay": 0.975})
        c.blocking_portal.call(c.app.state.service_state.stores["published"].set, "BTC", stale)
    with _client(tmp_path) as c:
        raw = c.blocking_portal.call(c.app.state.service_state.stores["published"].get, "BTC")
        assert json.loads(raw)["version"] == 2


def test_embedded_reads_are_cached_and_see_other_processes_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded mode serves repeated GETs from memory (no store read), and a publish by
    another app on the same state directory shows at once (the store file changed)."""
    from service.state import StateFileStore as FileStore

    reads = 0
    real_get = FileStore.get

    async def counting(self: FileStore, key: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(FileStore, "get", counting)
    with _client(tmp_path) as a, _client(tmp_path) as b:
        assert _publish(a, params={"decay": 0.97}).status_code == 201
        assert a.get("/v1/recommendations/BTC").json()["version"] == 1
        before = reads
        for _ in range(5):
            assert a.get("/v1/recommendations/BTC").json()["version"] == 1
        assert reads == before
        assert _publish(b, params={"decay": 0.975}).status_code == 201
        assert a.get("/v1/recommendations/BTC").json()["version"] == 2


def test_haircut_schedules_and_engine_settings_publish_through_the_guardrails(
        client: TestClient[Any]) -> None:
    """A collateral haircut schedule and the liquidation engine's settings publish, audit
    and roll back like model parameters, under the same guardrails: a band's ratio moves at
    most 0.25 percentage points per update (Aave's steward cap on LTV, venues.md §3), the
    engine's capacity at most 50%, its policy not at all; malformed ones are refused naming
    the field, and /v1/margin refuses to read a key that holds no margin model."""
    def post(key: str, model: str, params: dict[str, Any]) -> Any:
        return client.post(f"/v1/recommendations/{key}",
                           json={"model": model, "reason": REASON, "params": params})

    schedule = {"caps_usd": [1_000_000, 5_000_000], "ratios": [0.95, 0.9, 0.8]}
    assert post("BTC-HAIRCUTS", "haircuts", schedule).status_code == 201
    # 0.9 -> 0.8975 is 0.25 points: allowed (the boundary); 0.8 -> 0.79 is 1 point: refused
    ok = post("BTC-HAIRCUTS", "haircuts", {**schedule, "ratios": [0.95, 0.8975, 0.8]})
    assert ok.status_code == 201, ok.text
    assert ok.json()["version"] == 2
    far = post("BTC-HAIRCUTS", "haircuts", {**schedule, "ratios": [0.95, 0.8975, 0.79]})
    assert far.status_code == 422
    violation = far.json()["violations"][0]
    assert violation["parameter"] == "ratios"
    assert violation["rule"] == "elementwise_absolute"
    assert violation["actual"] == pytest.approx(0.01)
    assert violation["excess"] == pytest.approx(0.0075)
    assert client.get("/v1/recommendations/BTC-HAIRCUTS").json()["params"]["ratios"] == \
        [0.95, 0.8975, 0.8]
    bad = post("ETH-HAIRCUTS", "haircuts", {"caps_usd": [5, 1], "ratios": [1, 0.9, 0.8]})
    assert bad.status_code == 422
    assert "caps_usd" in bad.json()["field"]

    engine = {"max_liquidations_per_bar": 20, "partial_fraction": 0.2, "policy": "partial"}
    assert post("ENGINE", "liquidation_engine", engine).status_code == 201
    faster = post("ENGINE", "liquidation_engine", {**engine, "max_liquidations_per_bar": 30})
    assert faster.status_code == 201, faster.text
    doubled = post("ENGINE", "liquidation_engine", {**engine, "max_liquidations_per_bar": 60})
    assert doubled.status_code == 422
    assert doubled.json()["violations"][0]["parameter"] == "max_liquidations_per_bar"
    switched = post("ENGINE", "liquidation_engine", {**engine, "max_liquidations_per_bar": 30,
                                                     "policy": "close_all"})
    assert switched.status_code == 422
    assert switched.json()["violations"][0]["parameter"] == "policy"
    nested = post("ENGINE2", "liquidation_engine", {"haircuts": {"BTC": 0.9}})
    assert nested.status_code == 422
    assert nested.json()["field"] == "params.haircuts"
    unknown = post("ENGINE2", "liquidation_engine", {"capacity": 3})
    assert unknown.status_code == 422
    assert unknown.json()["field"] == "liquidation.capacity"

    margin = client.post("/v1/margin", json={"accounts": [
        {"id": "a", "positions": {"ENGINE": 5000}, "equity_usd": 1000}]})
    assert margin.status_code == 422
    assert "not as a margin model" in margin.json()["detail"]


def test_portfolio_grid_publishes_through_the_guardrails(client: TestClient[Any]) -> None:
    """A scenario grid publishes like model parameters: its scan range moves at most 2
    points per update (0.15 -> 0.17 allowed, the boundary; 0.17 -> 0.20 refused, 1 point too
    far), the number of
    grid points may not change, and a parameter the grid does not have is refused."""
    def post(params: dict[str, Any]) -> Any:
        return client.post("/v1/recommendations/PM-GRID", json={
            "model": "portfolio_grid", "reason": REASON, "params": params})

    grid = {"price_range": 0.15, "points": 9, "offset_credit_cap": 0.5,
            "extended_moves": [0.3], "extended_weights": [0.3]}
    assert post(grid).status_code == 201
    ok = post({**grid, "price_range": 0.17})
    assert ok.status_code == 201, ok.text
    far = post({**grid, "price_range": 0.20})
    assert far.status_code == 422
    v = far.json()["violations"][0]
    assert (v["parameter"], v["rule"]) == ("price_range", "absolute")
    assert v["actual"] == pytest.approx(0.03)  # from the published 0.17
    assert v["excess"] == pytest.approx(0.01)
    points = post({**grid, "price_range": 0.17, "points": 11})
    assert points.status_code == 422
    assert points.json()["violations"][0]["parameter"] == "points"
    unknown = client.post("/v1/recommendations/PM-GRID2", json={
        "model": "portfolio_grid", "reason": REASON, "params": {"scan": 0.1}})
    assert unknown.status_code == 422
    assert unknown.json()["field"] == "scan"
