"""Inputs that used to cost the server: no client input is a 5xx, everything is validated before
a job is accepted, decoding is bounded, and nothing secret comes back (issue 10, items 6-10)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibration.calibrate import calibrate, prepare
from calibration.html_report import render_calibration_report
from calibration.spec import (
    CalibrationSpec,
    DataRefSpec,
    ParamSpec,
    StressWindowSpec,
    WalkForwardSpec,
)
from service.errors import redact
from service.ratelimit import RateLimit
from service.schemas import CalibrationJob
from tests.api_helpers import bars_csv, calibration_spec, key_config
from tests.serving import running_service
from tests.test_api import (
    N_BARS,
    Client,
    assert_problem,
    backtest_body,
    service_state,
    upload,
    uploaded,
    wait_job,
)

pytest_plugins = ["tests.test_api"]


def _listed(client: Client, **query: Any) -> dict[str, Any]:
    response = client.get("/v1/calibrations", params=query)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --- item 6: no client input is a 5xx --------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"instrument": "SYN", "ref": "a\x00b.csv"}, "data[0].ref"),
        ({"instrument": "SYN", "ref": "a" * 5000}, "data[0].ref"),
        ({"instrument": "S" * 65, "ref": "x.csv"}, "data[0].instrument"),
        ({"instrument": "$x^$", "ref": "x.csv"}, "data[0].instrument"),
        ({"instrument": "SYN", "ref": "x.csv", "end": "10000-01-01"}, "data[0].end"),
        ({"instrument": "SYN", "ref": "x.csv", "funding": "f\x00.csv"}, "data[0].funding"),
    ],
    ids=["nul-ref", "5000-char-ref", "65-char-instrument", "mathtext-instrument",
         "year-10000", "nul-funding"],
)
def test_bad_strings_are_400_with_their_full_path(client: Client, data: dict[str, Any],
                                                  field: str) -> None:
    """Each class of string that made a 500 is refused at the boundary, naming its path."""
    for path, body in (("/v1/backtests", backtest_body("x.csv")),
                       ("/v1/calibrations", calibration_spec("x.csv"))):
        assert_problem(client.post(path, json={**body, "data": [data]}), 400, field=field)


def test_a_long_component_that_passes_the_schema_is_a_422_not_a_500(client: Client) -> None:
    """A 300-character file name fits the 1024-character bound but no file system (ENAMETOOLONG):
    the reference names no file, 422."""
    body = assert_problem(client.post("/v1/backtests", json=backtest_body("a" * 300 + ".csv")),
                          422, field="data[0].ref")
    assert len(body["detail"]) < 200


def test_json_nested_1000_deep_is_a_400_about_the_body(client: Client) -> None:
    """A body nested 1000 deep (where Litestar's untyped decode recursed out) is a 400."""
    deep = "[" * 1000 + "]" * 1000
    for raw in (f'{{"params": {{"x": {deep}}}}}', deep):
        response = client.post("/v1/backtests", content=raw.encode(),
                               headers={"content-type": "application/json"})
        assert_problem(response, 400, field="body" if raw == deep else None)


def test_stress_window_ending_on_the_last_day_of_year_9999_is_refused(client: Client) -> None:
    """The day after 9999-12-31 has no datetime: a 422 naming the window, not a 500."""
    ref = uploaded(client, bars_csv(300))["ref"]
    window = {"name": "last", "start": "9999-12-30", "end": "9999-12-31"}
    assert_problem(client.post("/v1/backtests", json=backtest_body(ref, stress_windows=[window])),
                   422, field="stress_windows")


def test_instrument_path_parameters_are_bounded(client: Client) -> None:
    """A 65-character instrument never reaches the audit trail's 64-character column."""
    long = "B" * 65
    assert_problem(client.get(f"/v1/recommendations/{long}"), 400, field="instrument")
    assert_problem(client.post(f"/v1/recommendations/{long}",
                               json={"reason": "a long enough reason", "model": "ewma",
                                     "params": {"decay": 0.97}}), 400, field="instrument")
    assert_problem(upload(client, bars_csv(100), instrument=long), 400, field="instrument")
    assert_problem(upload(client, bars_csv(100), instrument=".."), 400, field="instrument")


def test_dollar_window_names_draw_literally_in_the_report(tmp_path: Path) -> None:
    """A library caller's window named like mathtext renders as text (it raised before)."""
    (tmp_path / "syn.csv").write_bytes(bars_csv(N_BARS))
    name = "$x^$"  # an invalid mathtext expression
    # Built in Python, as a library caller does: the API's identifier patterns do not apply.
    spec = CalibrationSpec(
        data=[DataRefSpec(instrument="A$B", ref="syn.csv")], model="ewma",
        search_space={"warmup_bars": ParamSpec(value=200), "horizon_bars": ParamSpec(value=4)},
        stress_windows=[StressWindowSpec(name=name, start="2023-01-20", end="2023-01-21")],
        walk_forward=WalkForwardSpec(folds=1), n_trials=2, seed=1,
        liquidation={"leverages": [10], "notionals_usd": [10_000]})
    result = calibrate(spec, root=tmp_path)
    page = render_calibration_report(result, prepare(spec, tmp_path))
    assert name in page
    assert "A$B" in page


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["data", "model", "params", "seed", "n_trials", "instrument", "ref",
                         "liquidation", "walk_forward", "folds", "horizon_bars", "name",
                         "start", "end", "stress_windows", "proxies"]) | st.text(max_size=8),
        inner, max_size=6),
    max_leaves=25))
def test_request_decoders_answer_4xx_to_any_json(client: Client, body: Any) -> None:
    """Hypothesis: any JSON document to any body endpoint is a 2xx or a 4xx problem."""
    for path in ("/v1/backtests", "/v1/calibrations", "/v1/listings"):
        response = client.post(path, content=json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
        assert response.status_code < 500, (path, body, response.text)


# --- item 7: validated before a job is accepted -----------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"seed": 2**32}, 400, "seed"),
        ({"seed": -1}, 400, "seed"),
        ({"seed": 2**64}, 400, "seed"),
        ({"horizon_bars": 0}, 400, "horizon_bars"),
        ({"horizon": "0h"}, 422, "horizon"),
        ({"walk_forward": {"folds": 10**6}}, 400, "walk_forward.folds"),
        ({"liquidation": {"leverages": [1001]}}, 422, "liquidation.leverages"),
        ({"liquidation": {"holding_bars": 2**63}}, 422, "liquidation.holding_bars"),
        ({"liquidation": {"notionals_usd": [1e300]}}, 422, "liquidation.notionals_usd"),
        ({"n_trials": None, "timeout_seconds": 1e12}, 422, "n_trials"),
        ({"n_trials": "5"}, 400, "n_trials"),
        ({"constraints": {"no_red_in_stress_windows": 0}}, 400,
         "constraints.no_red_in_stress_windows"),
        ({"stress_windows": [{"name": "$a$", "start": "2023-01-02"}]}, 400,
         "stress_windows[0].name"),
    ],
    ids=["seed-2^32", "seed-negative", "seed-2^64", "horizon-0", "horizon-0h", "folds-1e6",
         "leverage-1001", "holding-2^63", "notional-1e300", "trials-null", "trials-string",
         "bool-as-0", "dollar-window"],
)
def test_refused_before_anything_is_queued(client: Client, change: dict[str, Any],
                                           status: int, field: str) -> None:
    """Each bad setting is refused naming its full path, and no job exists afterwards."""
    ref = uploaded(client, bars_csv(600))["ref"]
    assert_problem(client.post("/v1/calibrations", json={**calibration_spec(ref), **change}),
                   status, field=field)
    assert _listed(client)["total"] == 0


def test_boundary_values_are_accepted(client: Client) -> None:
    """The largest seed numpy takes (2**32 - 1) and 50 folds are fine."""
    ref = uploaded(client)["ref"]
    spec = calibration_spec(ref, seed=2**32 - 1, n_trials=2, walk_forward={"folds": 50})
    submitted = client.post("/v1/calibrations", json=spec)
    assert submitted.status_code == 202, submitted.text
    assert wait_job(client, submitted.json()["id"])["state"] in ("succeeded", "failed")


def test_a_missing_funding_file_names_its_path(client: Client) -> None:
    """A bad funding reference is refused as ``data[0].funding``, not ``ref``."""
    ref = uploaded(client, bars_csv(600))["ref"]
    spec = calibration_spec(ref)
    spec["data"][0]["funding"] = "uploads/nofunding.csv"
    assert_problem(client.post("/v1/calibrations", json=spec), 422, field="data[0].funding")


# --- item 8: amplification --------------------------------------------------------------------


def test_parquet_rows_are_bounded_from_the_footer_before_decoding(
        make_client: Callable[..., Client], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Parquet upload of more rows than MARGINLAB_MAX_FILE_ROWS is a 413 read from its
    metadata: the decoder is never called."""
    client = make_client(max_file_rows=1000)
    frame = pd.read_csv(pd.io.common.BytesIO(bars_csv(1001)))
    frame.to_parquet(tmp_path / "big.parquet")
    raw = (tmp_path / "big.parquet").read_bytes()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded a file above the row limit")

    monkeypatch.setattr("calibration.data.pd.read_parquet", refuse)
    response = client.post("/v1/datasets?instrument=BIG&format=parquet", content=raw,
                           headers={"content-type": "application/vnd.apache.parquet"})
    body = assert_problem(response, 413, field="body")
    assert "1001 rows" in body["detail"]
    assert_problem(client.post("/v1/backtests", json=backtest_body("big.parquet")), 413,
                   field="data[0].ref")


def test_the_bar_budget_stops_before_the_next_file(make_client: Callable[..., Client],
                                                   tmp_path: Path) -> None:
    """Over MARGINLAB_MAX_SYNC_BARS after the first file, the second is never read: its
    defect (which would be a 422) is not what the client hears."""
    client = make_client(max_sync_bars=500)
    first = uploaded(client, bars_csv(600))["ref"]
    (tmp_path / "broken.csv").write_text("timestamp_ms,open,high,low,close,volume\n1,x,1,1,1,1\n")
    body = backtest_body(first)
    body["data"].append({"instrument": "TWO", "ref": "broken.csv"})
    assert_problem(client.post("/v1/backtests", json=body), 413, field="data")


def test_made_up_keys_count_against_the_address(make_client: Callable[..., Client]) -> None:
    """A fresh invalid X-API-Key per request is limited like no key (keyed and open mode)."""
    for keys in (key_config(reader="reader-key"), None):
        client = make_client(rate_limit_per_minute=3, api_keys=keys)
        codes = [client.get("/v1/datasets", headers={"X-API-Key": f"made-up-{i}"}).status_code
                 for i in range(5)]
        assert codes[3:] == [429, 429], (keys, codes)


def test_rate_limit_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most ``max_identities`` counters are kept; the least recently seen goes first."""
    monkeypatch.setattr("service.ratelimit.rate_limit_identity",
                        lambda request: request.scope["path"])
    limiter = RateLimit(per_minute=10, max_identities=2)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    async def run() -> None:
        for path in ("/a", "/b", "/a", "/c"):
            await limiter.handle({"type": "http", "path": path, "headers": []}, None, None,
                                 app)

    asyncio.run(run())
    assert list(limiter._counts) == ["/a", "/c"]


# --- item 9: what a reader learns -------------------------------------------------------------


def test_a_secret_cell_and_the_data_root_never_come_back(client: Client, tmp_path: Path) -> None:
    """A CSV whose bad cell is a secret: 422 with row and column, neither the cell nor the
    server's data root in the answer."""
    secret = "AWS_SECRET_KEY=wJalrXUtnFEMI"
    (tmp_path / "env.csv").write_text(
        f"timestamp,open,high,low,close,volume\n1600000000,{secret},2,0.5,1,1\n"
        "1600000060,1,2,0.5,1,1\n")
    (tmp_path / "ts.csv").write_text(
        f"timestamp,open,high,low,close,volume\n{secret},1,2,0.5,1,1\n"
        "1600000060,1,2,0.5,1,1\n")
    for ref, column in (("env.csv", "open"), ("ts.csv", "timestamp")):
        response = client.post("/v1/backtests", json=backtest_body(ref))
        body = assert_problem(response, 422, field=column)
        assert body["row"] == 1
        assert "wJalrXUtnFEMI" not in response.text
        assert str(tmp_path) not in response.text
        assert ref in body["detail"]  # the reference as the client gave it


def test_storage_urls_and_paths_are_redacted() -> None:
    """Credentials in URLs and the server's paths are replaced, the rest kept."""
    text = ("journal:/srv/state/studies.log; postgresql+psycopg://ml:hunter2@db:5432/x; "
            "redis://:pw@cache:6379/0; https://example.org/x")
    assert redact(text, state_dir="/srv/state") == (
        "journal:<state dir>/studies.log; postgresql+psycopg://***@db:5432/x; "
        "redis://***@cache:6379/0; https://example.org/x")


def test_result_and_job_errors_carry_no_secret(client: Client, tmp_path: Path) -> None:
    """GET /result shows the storage without the state directory's path; a job error
    echoing a storage URL loses its password, in the status and the listing."""
    ref = uploaded(client)["ref"]
    job = client.post("/v1/calibrations", json=calibration_spec(ref, n_trials=2)).json()
    assert wait_job(client, job["id"])["state"] == "succeeded"
    result = client.get(job["result_url"])
    assert result.status_code == 200
    assert str(tmp_path) not in result.text
    # A journal of the study's own under the state directory (one file per study).
    assert result.json()["storage"] == f"journal:<state dir>/studies/{job['study']}.log"

    state = service_state(client)
    failed = CalibrationJob(
        id="f" * 32, state="failed", cache_key="k", spec_hash="h", study="s", model="ewma",
        instruments=["SYN"], n_trials=2, created_at="2026-01-01T00:00:00Z",
        error="storage postgresql://ml:hunter2@db/x unreachable")
    client.blocking_portal.call(state.put, "jobs", failed.id, failed)
    status = client.get(f"/v1/calibrations/{failed.id}")
    assert status.status_code == 200
    assert "hunter2" not in status.text
    assert status.json()["error"] == "storage postgresql://***@db/x unreachable"


# --- item 10: the document matches the service ------------------------------------------------


def test_calibrations_are_listed_with_filters_and_pages(client: Client) -> None:
    """GET /v1/calibrations: newest first, filtered by state and instrument, paged."""
    first = uploaded(client, bars_csv(N_BARS, seed=1), "AAA")["ref"]
    second = uploaded(client, bars_csv(N_BARS, seed=2), "BBB")["ref"]
    a = client.post("/v1/calibrations",
                    json=calibration_spec(first, instrument="AAA", n_trials=2)).json()
    b = client.post("/v1/calibrations",
                    json=calibration_spec(second, instrument="BBB", n_trials=2)).json()
    for job in (a, b):
        wait_job(client, job["id"])
    listed = _listed(client)
    assert [j["id"] for j in listed["items"]] == [b["id"], a["id"]]
    assert listed["total"] == 2
    assert listed["next_offset"] is None
    assert [j["id"] for j in _listed(client, instrument="AAA")["items"]] == [a["id"]]
    assert _listed(client, state="succeeded")["total"] == 2
    assert _listed(client, state="running")["total"] == 0
    page = _listed(client, limit=1)
    assert [j["id"] for j in page["items"]] == [b["id"]]
    assert page["next_offset"] == 1
    assert [j["id"] for j in _listed(client, limit=1, offset=1)["items"]] == [a["id"]]
    assert _listed(client, created_after="2999-01-01T00:00:00Z")["total"] == 0
    assert _listed(client, created_before="2000-01-01")["total"] == 0
    assert_problem(client.get("/v1/calibrations", params={"limit": 0}), 400, field="limit")


def test_index_points_to_the_docs(client: Client) -> None:
    """GET / links the documentation, which is served there."""
    index = client.get("/")
    assert index.status_code == 200
    assert client.get(index.json()["openapi"]).status_code == 200
    assert client.get(index.json()["docs"]).status_code == 200


def test_served_insurance_fund_path_matches_the_documented_arrays(client: Client) -> None:
    """The backtest sends the fund path as ``[time, fund_usd]`` pairs; the schema says so."""
    ref = uploaded(client, bars_csv(1000))["ref"]
    report = client.post("/v1/backtests", json=backtest_body(
        ref, liquidation={"leverages": [50, 100], "notionals_usd": [10_000]})).json()
    path = report["insurance_fund_path"]
    assert path
    assert all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
               and isinstance(p[1], int | float) for p in path)
    spec = client.get("/schema/openapi.json").json()
    fund = spec["components"]["schemas"]["FundPoint"]
    assert fund["type"] == "array"
    assert [s["type"] for s in fund["prefixItems"]] == ["string", "number"]
    assert fund["minItems"] == fund["maxItems"] == 2


@pytest.mark.slow
def test_a_second_serve_on_a_served_port_exits_2(tmp_path: Path) -> None:
    """``marginlab serve`` on a port another one serves refuses to start, exit 2."""
    with running_service(tmp_path) as base:
        port = base.rsplit(":", 1)[1]
        second = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--port", port],
            capture_output=True, text=True, timeout=60, check=False,
            env={"MARGINLAB_DATA_ROOT": str(tmp_path),
                 "MARGINLAB_STATE_DIR": str(tmp_path / ".other"), "PATH": ""})
        assert second.returncode == 2, second.stderr
        assert f"cannot serve on 127.0.0.1:{port}" in second.stderr
        assert httpx.get(base + "/healthz").status_code == 200
