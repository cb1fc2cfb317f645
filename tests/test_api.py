"""The REST API in embedded mode (no Redis): every endpoint's answers and errors.

Each test builds the app with ``create_app(Settings(...))`` on a temporary data root and talks
to it through Litestar's ``TestClient``; calibrations run in the in-process runner on small
synthetic bar files, so the whole module takes seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from service.app import create_app
from service.recommendations import publish
from service.schemas import PublishedParameters
from service.settings import Settings
from service.state import State
from tests.api_helpers import FINAL, bars_csv, calibration_spec, key_config, wait_for

Client = TestClient[Litestar]
CSV = {"content-type": "text/csv"}
READER, OPERATOR, ADMIN = "reader-key-1", "operator-key-1", "admin-key-1"
#: Enough bars for the EWMA warm-up, few enough for ~25 trials a second.
N_BARS = 3000


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., Client]]:
    """Build apps on ``tmp_path`` (data root; own state directory each) and close them."""
    with contextlib.ExitStack() as stack:
        made = 0

        def make(**overrides: Any) -> Client:
            nonlocal made
            made += 1
            settings = Settings(state_dir=str(tmp_path / f"state-{made}"),
                                data_root=str(tmp_path), **overrides)
            return stack.enter_context(TestClient(create_app(settings)))

        yield make


@pytest.fixture
def client(make_client: Callable[..., Client]) -> Client:
    """An open (no API keys) app with the default limits."""
    return make_client()


def upload(client: Client, body: bytes, instrument: str = "SYN",
           headers: dict[str, str] | None = None) -> httpx.Response:
    """POST a bar file to ``/v1/datasets``."""
    return client.post(f"/v1/datasets?instrument={instrument}", content=body,
                       headers={**CSV, **(headers or {})})


def uploaded(client: Client, body: bytes | None = None, instrument: str = "SYN") -> dict[str, Any]:
    """Upload a bar file that must be accepted; its dataset description."""
    response = upload(client, bars_csv(N_BARS) if body is None else body, instrument)
    assert response.status_code == 201, response.text
    info: dict[str, Any] = response.json()
    return info


def assert_problem(response: httpx.Response, status: int,
                   field: str | None = None) -> dict[str, Any]:
    """An RFC 9457 problem with ``status`` (and ``field``), without a stack trace."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    if field is not None:
        assert body.get("field") == field, body
    return body


def wait_job(client: Client, job_id: str, states: tuple[str, ...] = FINAL,
             timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll a calibration until its state is one of ``states``."""

    def probe() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/calibrations/{job_id}").json()
        return body if body["state"] in states else None

    return wait_for(probe, timeout_s=timeout_s, what=f"calibration {job_id} in {states}")


def service_state(client: Client) -> State:
    """The app's state stores (to publish and to look at the result index)."""
    state: State = client.app.state.service_state
    return state


# --- datasets ---------------------------------------------------------------------------------


def test_upload_reports_metadata_fingerprint_and_gaps(client: Client) -> None:
    """An upload answers 201 with rows, span, bar size, fingerprint and the gaps it found."""
    info = uploaded(client, bars_csv(500, drop_rows=(100, 101, 102)))
    assert info["instrument"] == "SYN"
    assert info["rows"] == 497
    assert info["bar_seconds"] == 1800
    assert info["start"] == "2023-01-01T00:00:00Z"
    assert len(info["fingerprint"]) == 64
    # The id: sha256 of instrument, format and fingerprint (computed here independently).
    expected = hashlib.sha256(f"SYN\ncsv\n{info['fingerprint']}".encode()).hexdigest()[:16]
    assert info["id"] == expected
    assert info["ref"] == f"uploads/SYN-{info['id']}.csv"
    assert (info["format"], info["version"], info["latest"]) == ("csv", 1, True)
    assert info["gaps"] == [{"after_row": 99, "start_ms": info["gaps"][0]["start_ms"],
                             "missing_bars": 3}]
    assert info["missing_bars"] == 3


def test_datasets_list_and_get(client: Client) -> None:
    """GET /v1/datasets lists every dataset by instrument; /{id} describes one."""
    btc = uploaded(client, bars_csv(300, seed=1), "BTC")
    eth = uploaded(client, bars_csv(300, seed=2), "ETH")
    listed = client.get("/v1/datasets")
    assert listed.status_code == 200
    assert [d["id"] for d in listed.json()] == [btc["id"], eth["id"]]
    one = client.get(f"/v1/datasets/{eth['id']}")
    assert one.status_code == 200
    assert one.json() == eth


def test_same_bars_as_other_instruments_and_formats_are_distinct_versions(
        client: Client, tmp_path: Path) -> None:
    """The same bars uploaded as three instruments give three datasets (each its own id,
    instrument and file); as Parquet they are a new version of the instrument (nothing
    re-pointed: the CSV version's record and file stay); the same CSV again adds nothing."""
    import io

    import pandas as pd

    body = bars_csv(300, seed=4)
    first = {name: uploaded(client, body, name) for name in ("BAD", "B.2", "C_3")}
    assert len({d["id"] for d in first.values()}) == 3
    assert len({d["fingerprint"] for d in first.values()}) == 1
    assert {d["instrument"] for d in first.values()} == {"BAD", "B.2", "C_3"}
    for name, info in first.items():
        assert info["ref"] == f"uploads/{name}-{info['id']}.csv"
        assert (tmp_path / info["ref"]).is_file()

    parquet = io.BytesIO()
    pd.read_csv(io.BytesIO(body)).to_parquet(parquet, index=False)
    response = client.post("/v1/datasets?instrument=BAD&format=parquet",
                           content=parquet.getvalue(),
                           headers={"content-type": "application/vnd.apache.parquet"})
    assert response.status_code == 201, response.text
    as_parquet = response.json()
    assert as_parquet["fingerprint"] == first["BAD"]["fingerprint"]
    assert as_parquet["id"] != first["BAD"]["id"]
    assert (as_parquet["format"], as_parquet["version"], as_parquet["latest"]) == (
        "parquet", 2, True)
    again = uploaded(client, body, "BAD")
    assert (again["id"], again["version"], again["latest"]) == (first["BAD"]["id"], 1, False)
    assert again["uploaded_at"] == first["BAD"]["uploaded_at"]

    listed = client.get("/v1/datasets").json()
    assert [(d["instrument"], d["version"], d["format"]) for d in listed] == [
        ("B.2", 1, "csv"), ("BAD", 1, "csv"), ("BAD", 2, "parquet"), ("C_3", 1, "csv")]
    assert client.get(f"/v1/datasets/{first['BAD']['id']}").json()["latest"] is False
    for d in listed:
        assert (tmp_path / d["ref"]).is_file()
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == sorted(
        Path(d["ref"]).name for d in listed)


def test_unknown_dataset_is_404_problem(client: Client) -> None:
    """An unknown dataset id is a 404 problem."""
    assert_problem(client.get("/v1/datasets/0123456789abcdef"), 404)


def test_upload_above_limit_is_413_and_leaves_no_file(make_client: Callable[..., Client],
                                                      tmp_path: Path) -> None:
    """A body above MARGINLAB_MAX_UPLOAD_BYTES is refused (413), sized or streamed."""
    client = make_client(max_upload_bytes=20_000)
    body = bars_csv(1000)
    assert len(body) > 20_000
    assert_problem(upload(client, body), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        for start in range(0, len(body), 4096):
            yield body[start:start + 4096]

    assert_problem(client.post("/v1/datasets?instrument=SYN", content=chunks(), headers=CSV),
                   413)
    assert list((tmp_path / "uploads").glob("*")) == []
    assert client.get("/v1/datasets").json() == []


def test_upload_with_a_bad_row_names_row_and_column(client: Client, tmp_path: Path) -> None:
    """A row breaking the bar rules is a 422 naming the column (field) and the row."""
    lines = bars_csv(50).decode().splitlines()
    cells = lines[7].split(",")
    cells[2] = "0.5"  # high below low on data row 7
    lines[7] = ",".join(cells)
    body = assert_problem(upload(client, "\n".join(lines).encode()), 422, field="high")
    assert body["row"] == 7
    assert list((tmp_path / "uploads").glob("*")) == []


@pytest.mark.parametrize(
    ("query", "body", "status", "field"),
    [
        ("instrument=a%2Fb", b"x", 400, "instrument"),
        ("instrument=..", b"x", 400, "instrument"),
        ("instrument=-", b"x", 400, "instrument"),
        ("instrument=.hidden", b"x", 400, "instrument"),
        ("instrument=SYN&format=xlsx", b"x", 400, "format"),
        ("instrument=SYN", b"", 422, "body"),
        ("instrument=SYN", b"timestamp_ms,open\n1,2\n", 422, "high"),
    ],
    ids=["instrument-pattern", "instrument-dotdot", "instrument-dash", "instrument-dot",
         "format", "empty", "missing-column"],
)
def test_upload_errors_name_the_field(client: Client, query: str, body: bytes, status: int,
                                      field: str) -> None:
    """Bad upload parameters and bodies are problems naming the field at fault."""
    assert_problem(client.post(f"/v1/datasets?{query}", content=body, headers=CSV), status,
                   field=field)


# --- backtests --------------------------------------------------------------------------------


def backtest_body(ref: str, **extra: Any) -> dict[str, Any]:
    """A small synchronous EWMA backtest request."""
    return {"data": [{"instrument": "SYN", "ref": ref}], "model": "ewma",
            "params": {"decay": 0.97, "horizon_bars": 4, "warmup_bars": 100},
            "stress_windows": [], **extra}


def test_backtest_answers_a_report(client: Client) -> None:
    """POST /v1/backtests answers the coverage and liquidation report at once."""
    ref = uploaded(client, bars_csv(1000))["ref"]
    response = client.post("/v1/backtests", json=backtest_body(ref))
    assert response.status_code == 200, response.text
    report = response.json()
    [instrument] = report["instruments"]
    assert instrument["coverage"][0]["long"]["observations"] > 0


def test_backtest_above_sync_limit_points_to_calibrations(
        make_client: Callable[..., Client]) -> None:
    """Above MARGINLAB_MAX_SYNC_BARS a backtest is a 413 pointing to /v1/calibrations."""
    client = make_client(max_sync_bars=500)
    ref = uploaded(client, bars_csv(501))["ref"]
    body = assert_problem(client.post("/v1/backtests", json=backtest_body(ref)), 413,
                          field="data")
    assert "/v1/calibrations" in body["detail"]
    small = uploaded(client, bars_csv(500), "SMALL")["ref"]
    assert client.post("/v1/backtests", json=backtest_body(small)).status_code == 200


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"model": "garch"}, 422, "model"),
        ({"params": {"nope": 1}}, 422, "params.nope"),
        ({"params": {"decay": 5}}, 422, "params.decay"),
        ({"bogus": 1}, 400, "bogus"),
        ({"horizon_bars": "four"}, 400, "horizon_bars"),
        ({"data": [{"instrument": "SYN", "ref": "../outside.csv"}]}, 422, "data[0].ref"),
        ({"data": [{"instrument": "SYN", "ref": "/etc/passwd"}]}, 422, "data[0].ref"),
        ({"data": [{"instrument": "SYN", "ref": "uploads/none.csv"}]}, 422, "data[0].ref"),
        ({"data": [{"instrument": "SYN", "ref": "x.csv", "colour": 1}]}, 400, "data[0].colour"),
        ({"liquidation": {"closeout_basis": "liquidation_price"}}, 422,
         "liquidation.closeout_basis"),
    ],
    ids=["model", "unknown-param", "param-range", "unknown-field", "wrong-type",
         "ref-dotdot", "ref-absolute", "ref-missing", "unknown-nested-field",
         "optimistic-closeout-with-latency"],
)
def test_backtest_errors_name_the_field(client: Client, change: dict[str, Any], status: int,
                                        field: str) -> None:
    """Bad backtest requests are problems naming the field at fault."""
    ref = uploaded(client, bars_csv(300))["ref"]
    assert_problem(client.post("/v1/backtests", json={**backtest_body(ref), **change}), status,
                   field=field)


def test_microsecond_upload_is_422_naming_the_cell(client: Client, tmp_path: Path) -> None:
    """A µs epoch under timestamp_ms is a 422 with its row and column, not a 500."""
    lines = bars_csv(300).decode().splitlines()
    first = lines[1].split(",")
    lines[1] = ",".join([first[0] + "000", *first[1:]])
    body = assert_problem(upload(client, ("\n".join(lines) + "\n").encode()), 422,
                          field="timestamp_ms")
    assert body["row"] == 1
    assert str(tmp_path) not in body["detail"]


def test_backtest_repair_is_a_field_of_the_data_reference(client: Client,
                                                          tmp_path: Path) -> None:
    """data[i].repair opts in to named repairs; strict is the default; unknown names are 400."""
    lines = bars_csv(300).decode().splitlines()
    cells = lines[5].split(",")  # timestamp_ms,open,high,low,close,volume
    cells[1] = f"{float(cells[2]) * 1.01:.6f}"  # open above high
    lines[5] = ",".join(cells)
    (tmp_path / "defect.csv").write_text("\n".join(lines) + "\n")
    body = assert_problem(client.post("/v1/backtests", json=backtest_body("defect.csv")), 422,
                          field="open")
    assert body["row"] == 5
    repaired = backtest_body("defect.csv")
    repaired["data"][0]["repair"] = ["ohlc-range"]
    assert client.post("/v1/backtests", json=repaired).status_code == 200
    repaired["data"][0]["repair"] = ["fill"]
    assert_problem(client.post("/v1/backtests", json=repaired), 400, field="data[0].repair[0]")


def test_body_that_is_not_json_is_400_about_the_body(client: Client) -> None:
    """A body that does not parse as JSON is a 400 problem with field ``body``."""
    response = client.post("/v1/backtests", content=b'{"data": [',
                           headers={"content-type": "application/json"})
    assert_problem(response, 400, field="body")


def test_unexpected_errors_are_bare_500_problems(client: Client,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception is a 500 problem that says nothing of the stack or message."""

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals /srv/app.py")

    ref = uploaded(client, bars_csv(300))["ref"]
    monkeypatch.setattr("service.backtests.run_backtest", explode)
    body = assert_problem(client.post("/v1/backtests", json=backtest_body(ref)), 500)
    assert "secret" not in json.dumps(body)


def test_unknown_route_and_method_are_problems(client: Client) -> None:
    """Routing errors (404, 405) are problems too."""
    assert_problem(client.get("/v2/nothing"), 404)
    assert_problem(client.put("/v1/datasets"), 405)


# --- calibrations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"model": "garch"}, 422, "model"),
        ({"search_space": {"nope": {"value": 1}}}, 422, "search_space.nope"),
        ({"search_space": {"decay": {"low": 0.99, "high": 0.9}}}, 422, "search_space.decay"),
        ({"n_trials": 11}, 413, "n_trials"),
        ({"surprise": True}, 400, "surprise"),
        ({"seed": "one"}, 400, "seed"),
        ({"data": [{"instrument": "SYN", "ref": "../../etc/passwd"}]}, 422, "data[0].ref"),
        ({"walk_forward": {"in_sample_end": "2030-01-01"}}, 422, "walk_forward.in_sample_end"),
    ],
    ids=["model", "unknown-param", "inverted-range", "too-many-trials", "unknown-field",
         "wrong-type", "ref-outside-root", "split-outside-data"],
)
def test_calibration_errors_name_the_field(make_client: Callable[..., Client],
                                           change: dict[str, Any], status: int,
                                           field: str) -> None:
    """Bad calibration specs are refused before anything runs, naming the field."""
    client = make_client(max_trials=10)
    ref = uploaded(client, bars_csv(600))["ref"]
    spec = {**calibration_spec(ref), **change}
    assert_problem(client.post("/v1/calibrations", json=spec), status, field=field)


def test_unknown_calibration_is_404_everywhere(client: Client) -> None:
    """Status, events, result and cancel of an unknown calibration are 404 problems."""
    for method, suffix in (("GET", ""), ("GET", "/events"), ("GET", "/result"),
                           ("DELETE", "")):
        assert_problem(client.request(method, f"/v1/calibrations/nope{suffix}"), 404)


def test_calibration_runs_and_identical_request_is_cached(client: Client) -> None:
    """Submit → 202 with status URL → succeeded with progress → result → identical POST is
    answered from the cache (200, ``cached: true``)."""
    dataset = uploaded(client)
    spec = calibration_spec(dataset["ref"], n_trials=8)
    submitted = client.post("/v1/calibrations", json=spec)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["state"] == "queued"
    assert not job["cached"]
    assert job["status_url"] == f"/v1/calibrations/{job['id']}"
    assert job["result_url"] == f"/v1/calibrations/{job['id']}/result"

    done = wait_job(client, job["id"])
    assert done["state"] == "succeeded", done
    progress = done["progress"]
    assert progress["trials_done"] == progress["trials_total"] == 8
    assert progress["running"] == 0
    assert "best_feasible" in progress
    assert "eta_seconds" in progress

    result = client.get(job["result_url"])
    assert result.status_code == 200
    body = result.json()
    assert body["trials"]["complete"] + body["trials"]["pruned"] == 8
    assert body["data_fingerprints"] == {"SYN": dataset["fingerprint"]}
    assert body["pareto_front"]
    assert body["recommendation"] is not None
    assert body["recommendation"]["params"]["horizon_bars"] == 4

    started = time.monotonic()
    again = client.post("/v1/calibrations", json=spec)
    assert time.monotonic() - started < 2.0
    assert again.status_code == 200
    assert again.json()["cached"] is True
    assert again.json()["id"] == job["id"]
    assert again.json()["state"] == "succeeded"
    assert client.get(again.json()["result_url"]).json() == body


def test_identical_request_joins_and_cancel_stops_the_job(client: Client) -> None:
    """An identical request joins the running job; DELETE cancels it: state ``cancelled``,
    no more trials, no result, and the runner goes on to the next job."""
    ref = uploaded(client)["ref"]
    spec = calibration_spec(ref, n_trials=4000, seed=7)
    job = client.post("/v1/calibrations", json=spec).json()
    running = wait_for(
        lambda: (lambda s: s if s["state"] == "running" and s["progress"]
                 and s["progress"]["trials_done"] >= 2 else None)(
            client.get(job["status_url"]).json()),
        timeout_s=60, what="trials")
    assert running["progress"]["trials_total"] == 4000
    assert running["progress"]["eta_seconds"] > 0

    joined = client.post("/v1/calibrations", json=spec)
    assert joined.status_code == 202
    assert joined.json()["id"] == job["id"]
    assert joined.json()["joined"] is True

    cancelled = client.delete(job["status_url"])
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["finished_at"]

    def settled() -> dict[str, Any] | None:
        # No trial running, twice half a second apart, with the same count.
        before = client.get(job["status_url"]).json()["progress"]
        time.sleep(0.5)
        status: dict[str, Any] = client.get(job["status_url"]).json()
        after = status["progress"]
        return status if before["running"] == after["running"] == 0 and (
            before["trials_done"] == after["trials_done"]) else None

    stopped = wait_for(settled, timeout_s=10, what="the running trial to end")
    time.sleep(1.0)
    later = client.get(job["status_url"]).json()
    assert later["state"] == "cancelled"
    assert later["progress"]["trials_done"] == stopped["progress"]["trials_done"] < 4000
    assert client.delete(job["status_url"]).json()["state"] == "cancelled"
    assert "cancelled" in assert_problem(client.get(job["result_url"]), 404)["detail"]

    after = client.post("/v1/calibrations", json=calibration_spec(ref, n_trials=2, seed=8))
    assert wait_job(client, after.json()["id"])["state"] == "succeeded"


def test_events_stream_progress_until_the_job_ends(client: Client) -> None:
    """GET /events is an SSE stream of JSON job states that ends with the job."""
    ref = uploaded(client)["ref"]
    job = client.post("/v1/calibrations", json=calibration_spec(ref, n_trials=30, seed=3)).json()
    events: list[dict[str, Any]] = []
    with client.stream("GET", f"/v1/calibrations/{job['id']}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        kinds = set()
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kinds.add(line.partition(":")[2].strip())
            elif line.startswith("data:"):
                events.append(json.loads(line.partition(":")[2]))
    assert kinds == {"progress"}
    assert events
    assert all(e["id"] == job["id"] for e in events)
    assert events[-1]["state"] == "succeeded"
    assert events[-1]["progress"]["trials_done"] == 30
    assert all(e["state"] not in FINAL for e in events[:-1])


def test_replacing_a_dataset_invalidates_its_cached_results(client: Client) -> None:
    """Uploading new data for an instrument drops the results computed on the old data."""
    state = service_state(client)
    old = uploaded(client, bars_csv(N_BARS, seed=0))
    spec = calibration_spec(old["ref"], n_trials=3)
    job = client.post("/v1/calibrations", json=spec).json()
    assert wait_job(client, job["id"])["state"] == "succeeded"
    index_key = f"fp:{old['fingerprint']}"
    assert client.blocking_portal.call(state.get, "index", index_key, list[str]) == [
        job["cache_key"]]
    assert client.post("/v1/calibrations", json=spec).json()["cached"] is True

    same = uploaded(client, bars_csv(N_BARS, seed=0))  # the same content replaces nothing
    assert same["id"] == old["id"]
    assert client.post("/v1/calibrations", json=spec).json()["cached"] is True

    new = uploaded(client, bars_csv(N_BARS, seed=1))
    assert new["id"] != old["id"]
    assert [(d["id"], d["version"], d["latest"]) for d in client.get("/v1/datasets").json()] \
        == [(old["id"], 1, False), (new["id"], 2, True)]
    assert client.blocking_portal.call(state.get, "index", index_key, list[str]) is None
    assert_problem(client.get(job["result_url"]), 404)

    rerun = client.post("/v1/calibrations", json=spec)
    assert rerun.status_code == 202
    assert rerun.json()["cached"] is False
    assert rerun.json()["id"] != job["id"]
    fresh = client.post("/v1/calibrations", json=calibration_spec(new["ref"], n_trials=3))
    assert fresh.status_code == 202
    assert fresh.json()["cache_key"] not in (job["cache_key"], rerun.json()["cache_key"])
    for submitted in (rerun, fresh):
        assert wait_job(client, submitted.json()["id"])["state"] == "succeeded"


# --- recommendations, health ------------------------------------------------------------------


def test_recommendations_etag_and_304(client: Client) -> None:
    """Published parameters: 404 before publishing, then 200 with an ETag, 304 on
    If-None-Match, and a new ETag (no stale copy) once new parameters are published."""
    assert_problem(client.get("/v1/recommendations/SYN"), 404)
    state = service_state(client)
    first = PublishedParameters(instrument="SYN", model="ewma", params={"decay": 0.97},
                                version=1, published_at="2026-01-01T00:00:00Z")
    client.blocking_portal.call(publish, state, first, None)
    response = client.get("/v1/recommendations/SYN")
    assert response.status_code == 200
    assert response.json()["params"] == {"decay": 0.97}
    assert response.json()["version"] == 1
    etag = response.headers["etag"]
    assert etag.startswith('"')
    assert etag.endswith('"')

    unchanged = client.get("/v1/recommendations/SYN", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    assert unchanged.headers["etag"] == etag

    second = PublishedParameters(instrument="SYN", model="ewma", params={"decay": 0.98},
                                 version=2, published_at="2026-01-02T00:00:00Z")
    client.blocking_portal.call(publish, state, second, None)
    changed = client.get("/v1/recommendations/SYN", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["version"] == 2
    assert changed.headers["etag"] != etag


def test_health_readiness_and_metrics(client: Client) -> None:
    """/healthz and /readyz answer 200 (every dependency ok); /metrics is Prometheus text."""
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready",
                            "checks": {"store": "ok", "study_storage": "ok", "queue": "ok"}}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "marginlab_http_requests_total" in metrics.text


# --- auth and rate limits ---------------------------------------------------------------------


@pytest.fixture
def keyed(make_client: Callable[..., Client]) -> Client:
    """An app with a reader, an operator and an admin key."""
    return make_client(api_keys=key_config(reader=READER, operator=OPERATOR, admin=ADMIN))


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for ``key``."""
    return {"Authorization": f"Bearer {key}"}


def test_missing_or_unknown_key_is_401(keyed: Client) -> None:
    """With keys configured, no key or an unknown one is a 401 problem; probes stay open."""
    assert_problem(keyed.get("/v1/datasets"), 401)
    assert_problem(keyed.get("/v1/datasets", headers=bearer("not-a-key")), 401)
    assert_problem(keyed.post("/v1/calibrations", json={}), 401)
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200


def test_roles_gate_what_a_key_may_do(keyed: Client) -> None:
    """Readers read and backtest; uploading and calibrating need operator; admin may all."""
    assert_problem(upload(keyed, bars_csv(300), headers=bearer(READER)), 403)
    response = upload(keyed, bars_csv(N_BARS), headers=bearer(OPERATOR))
    assert response.status_code == 201
    ref = response.json()["ref"]
    assert keyed.get("/v1/datasets", headers={"X-API-Key": READER}).status_code == 200
    assert keyed.post("/v1/backtests", json=backtest_body(ref),
                      headers=bearer(READER)).status_code == 200

    spec = calibration_spec(ref, n_trials=2)
    body = assert_problem(keyed.post("/v1/calibrations", json=spec, headers=bearer(READER)), 403)
    assert "operator" in body["detail"]
    submitted = keyed.post("/v1/calibrations", json=spec, headers=bearer(OPERATOR))
    assert submitted.status_code == 202
    status_url = submitted.json()["status_url"]
    assert keyed.get(status_url, headers=bearer(READER)).status_code == 200
    assert_problem(keyed.delete(status_url, headers=bearer(READER)), 403)
    assert keyed.post("/v1/calibrations", json=spec, headers=bearer(ADMIN)).status_code in (
        200, 202)

    def finished() -> bool:
        return keyed.get(status_url, headers=bearer(ADMIN)).json()["state"] in FINAL

    wait_for(finished, timeout_s=60, what="the calibration")
    assert keyed.get(submitted.json()["result_url"], headers=bearer(READER)).status_code == 200


def test_rate_limit_is_per_key(make_client: Callable[..., Client]) -> None:
    """Above the per-minute limit a key gets 429 problems; other keys and probes do not."""
    client = make_client(rate_limit_per_minute=3,
                         api_keys=key_config(reader=READER, operator=OPERATOR))
    for _ in range(3):
        assert client.get("/v1/datasets", headers=bearer(READER)).status_code == 200
    limited = client.get("/v1/datasets", headers=bearer(READER))
    assert_problem(limited, 429)
    assert client.get("/v1/datasets", headers=bearer(OPERATOR)).status_code == 200
    for _ in range(5):
        assert client.get("/healthz").status_code == 200


# --- jobs that die ----------------------------------------------------------------------------


def test_job_dying_outside_marginlab_error_fails_with_a_reason_and_is_not_joined(
        make_client: Callable[..., Client], monkeypatch: pytest.MonkeyPatch) -> None:
    """An error of no MarginlabError type inside a job (what ``seed: 2**64`` raised inside
    Optuna) ends it ``failed`` with a reason naming the error's type but not its message;
    an identical request then starts a new job, which runs to the end. (Jobs in a thread of
    this process, so that the patch reaches them.)"""
    import service.jobs

    client = make_client(embedded_runner="thread")

    real = service.jobs.run_calibration
    calls: list[int] = []

    def overflow_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OverflowError("Python int too large to convert to C long /srv/secret")
        return real(*args, **kwargs)

    monkeypatch.setattr(service.jobs, "run_calibration", overflow_once)
    ref = uploaded(client)["ref"]
    spec = calibration_spec(ref, n_trials=3, seed=21)
    first = client.post("/v1/calibrations", json=spec).json()
    failed = wait_job(client, first["id"])
    assert failed["state"] == "failed"
    assert "OverflowError" in failed["error"]
    assert "submit the request again" in failed["error"]
    assert "/srv/secret" not in failed["error"]
    assert failed["finished_at"]
    assert "failed" in assert_problem(client.get(first["result_url"]), 404)["detail"]

    again = client.post("/v1/calibrations", json=spec)
    assert again.status_code == 202
    assert again.json()["id"] != first["id"]
    assert again.json()["joined"] is False
    assert wait_job(client, again.json()["id"])["state"] == "succeeded"
    assert client.get(f"/v1/calibrations/{first['id']}").json()["state"] == "failed"


def test_queue_jobs_leave_lost_connections_to_rq_and_fail_on_anything_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``execute_calibration`` as rq runs it (``retry_transient``): a lost connection is raised
    for rq to retry, the job still active; any other error ends it failed with a reason and
    drops it from the active set and its dedup entry."""
    import asyncio

    import msgspec

    import service.jobs
    from service.jobs import JobAccess, execute_calibration
    from service.schemas import CalibrationJob
    from service.state import make_root_store

    (tmp_path / "bars.csv").write_bytes(bars_csv(N_BARS))
    settings = Settings(state_dir=str(tmp_path / "state"), data_root=str(tmp_path))
    state = State(make_root_store(settings))
    spec = calibration_spec("bars.csv", n_trials=2)

    async def seed(job_id: str) -> None:
        job = CalibrationJob(id=job_id, state="queued", cache_key=f"key-{job_id}",
                             spec_hash="h", study=f"study-{job_id}", model="ewma",
                             instruments=["SYN"], n_trials=2, created_at="2026-01-01T00:00:00Z")
        await state.stores["jobs"].set(f"{job_id}:spec", msgspec.json.encode(spec))
        await state.put("jobs", job_id, job)
        await state.put("dedup", job.cache_key, job_id)
        await state.add_active(job_id)

    def boom(exc: BaseException) -> Callable[..., int]:
        def run(*args: Any, **kwargs: Any) -> int:
            raise exc
        return run

    access = JobAccess(settings)
    asyncio.run(seed("lost"))
    monkeypatch.setattr(service.jobs, "run_calibration", boom(ConnectionError("reset by peer")))
    with pytest.raises(ConnectionError):
        execute_calibration("lost", settings, access, retry_transient=True)
    assert access.get("lost").state == "running"  # type: ignore[union-attr]
    assert "lost" in asyncio.run(state.active_ids())
    # Embedded mode has no queue to retry: the same error fails the job there.
    assert execute_calibration("lost", settings, access) == "failed"
    assert "ConnectionError" in access.get("lost").error  # type: ignore[union-attr,operator]

    asyncio.run(seed("broken"))
    monkeypatch.setattr(service.jobs, "run_calibration", boom(ZeroDivisionError("x")))
    assert execute_calibration("broken", settings, access, retry_transient=True) == "failed"
    job = access.get("broken")
    assert job is not None
    assert job.state == "failed"
    assert "ZeroDivisionError" in (job.error or "")
    assert asyncio.run(state.active_ids()) == []
    assert asyncio.run(state.get("dedup", "key-broken", str)) is None
    assert asyncio.run(state.get("dedup", "key-lost", str)) is None


def test_a_queue_job_stops_at_its_time_limit_between_trials_without_rqs_signal(
        tmp_path: Path) -> None:
    """rq raises its time limit once, from a signal, wherever the job is; a library that
    swallows it (asyncio logs a "fatal write error" for an exception inside a socket write)
    would let the job run on. ``execute_calibration`` checks the limit between trials too:
    here no signal comes at all, and the job still ends failed at the limit, naming it, with
    its finished trials kept."""
    import asyncio
    import time

    import msgspec

    from service.jobs import JobAccess, execute_calibration
    from service.schemas import CalibrationJob
    from service.state import make_root_store

    (tmp_path / "bars.csv").write_bytes(bars_csv(N_BARS))
    settings = Settings(state_dir=str(tmp_path / "state"), data_root=str(tmp_path),
                        job_timeout_s=1)
    state = State(make_root_store(settings))
    spec = calibration_spec("bars.csv", n_trials=100_000)

    async def seed(job_id: str) -> None:
        job = CalibrationJob(id=job_id, state="queued", cache_key=f"key-{job_id}",
                             spec_hash="h", study=f"study-{job_id}", model="ewma",
                             instruments=["SYN"], n_trials=100_000,
                             created_at="2026-01-01T00:00:00Z")
        await state.stores["jobs"].set(f"{job_id}:spec", msgspec.json.encode(spec))
        await state.put("jobs", job_id, job)
        await state.put("dedup", job.cache_key, job_id)
        await state.add_active(job_id)

    access = JobAccess(settings)
    asyncio.run(seed("long"))
    started = time.monotonic()
    assert execute_calibration("long", settings, access, retry_transient=True,
                               time_limit_s=settings.job_timeout_s) == "failed"
    assert time.monotonic() - started < 30
    job = access.get("long")
    assert job is not None
    assert job.state == "failed"
    assert "time limit of 1 s" in (job.error or "")
    assert job.progress is not None
    assert 0 < job.progress.trials_done < 100_000
