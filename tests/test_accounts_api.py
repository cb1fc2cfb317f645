"""``POST /v1/margin`` and ``POST /v1/account-backtests`` over HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from litestar.testing import TestClient

from service.app import create_app
from service.settings import Settings
from tests.api_helpers import bars_csv

BINANCE_2021 = {
    "mmr_schedule": [0.004, 0.005, 0.01, 0.025, 0.05, 0.10, 0.125, 0.15, 0.25, 0.50],
    "imr_schedule": [0.008, 0.01, 0.02, 0.05, 0.10, 0.20, 0.25, 0.333, 0.50, 1.0],
    "bracket_caps_usd": [50_000, 250_000, 1_000_000, 10_000_000, 20_000_000, 50_000_000,
                         100_000_000, 200_000_000, 300_000_000, 500_000_000],
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient[Any]]:
    settings = Settings(state_dir=str(tmp_path / ".state"), data_root=str(tmp_path),
                        guardrails_json='{"min_interval_s": 0}')
    with TestClient(create_app(settings)) as c:
        yield c


def _publish(c: TestClient[Any], instrument: str, model: str, params: dict) -> None:
    r = c.post(f"/v1/recommendations/{instrument}",
               json={"model": model, "params": params, "reason": "test listing"})
    assert r.status_code == 201, r.text


def test_margin_now_under_published_tiers(client: TestClient[Any]) -> None:
    """Binance 2021 tiers published for BTCUSDT: 100,000 long → MM 450, IM 1,000; with a
    second position of −50,000 (MM 200, IM 500) the account needs 650 / 1,500, and equity
    of 600 is liquidatable (ratio 600/650)."""
    _publish(client, "BTCUSDT", "tiered", BINANCE_2021)
    r = client.post("/v1/margin", json={"accounts": [
        {"id": "a", "positions": {"BTCUSDT": 100_000}},
        {"id": "b", "positions": {"BTCUSDT": -50_000}, "equity_usd": 600}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accounts"][0]["mm_usd"] == pytest.approx(450.0)
    assert body["accounts"][0]["im_usd"] == pytest.approx(1000.0)
    b = body["accounts"][1]
    assert (b["mm_usd"], b["im_usd"]) == (pytest.approx(200.0), pytest.approx(500.0))
    assert b["liquidatable"] is False
    assert b["margin_ratio"] == pytest.approx(3.0)
    assert body["parameters"]["BTCUSDT"]["version"] == 1


def test_margin_for_a_vol_model_needs_data(client: TestClient[Any], tmp_path: Path) -> None:
    """A published EWMA model needs the instrument's recent bars; with them the requirement
    is the last bar's rate times the notional; an unpublished instrument is a 404."""
    _publish(client, "SYN", "ewma", {"decay": 0.97, "warmup_bars": 50, "horizon_bars": 2})
    r = client.post("/v1/margin", json={"accounts": [{"id": "a", "positions": {"SYN": 1e4}}]})
    assert r.status_code == 422
    assert r.json()["field"] == "data"
    (tmp_path / "syn.csv").write_bytes(bars_csv(400))
    r = client.post("/v1/margin", json={
        "accounts": [{"id": "a", "positions": {"SYN": 1e4}}],
        "data": [{"instrument": "SYN", "ref": "syn.csv"}]})
    assert r.status_code == 200, r.text
    from calibration import load_bars, make_model

    bars = load_bars("syn.csv", root=tmp_path, instrument="SYN")
    rates = make_model("ewma", {"decay": 0.97, "warmup_bars": 50, "horizon_bars": 2}
                       ).margin_rates(bars)
    assert r.json()["accounts"][0]["mm_usd"] == pytest.approx(rates.mm_rate[-1] * 1e4)
    missing = client.post("/v1/margin", json={"accounts": [{"id": "a",
                                                            "positions": {"ETH": 1.0}}]})
    assert missing.status_code == 404


def test_account_backtest_over_http(client: TestClient[Any], tmp_path: Path) -> None:
    """A small account backtest answers the same figures as the library; bad settings are a
    problem+json naming the field."""
    (tmp_path / "a.csv").write_bytes(bars_csv(600, seed=1))
    (tmp_path / "b.csv").write_bytes(bars_csv(600, seed=2))
    body = {"data": [{"instrument": "AUSDT", "ref": "a.csv"},
                     {"instrument": "BUSDT", "ref": "b.csv"}],
            "model": "tiered", "params": {"base_mmr": 0.02, "tier_growth": 1.0,
                                          "bracket_caps_usd": []},
            "population": {"seed": 3, "entry_every_bars": 24, "accounts_per_entry": 5,
                           "leverage": [10, 40]},
            "liquidation": {"holding_bars": 48}, "stress_windows": []}
    r = client.post("/v1/account-backtests", json=body)
    assert r.status_code == 200, r.text
    report = r.json()
    overall = report["summary"][0]
    assert overall["accounts"] == len(report["accounts"]) > 0
    assert overall["liquidated_accounts"] == sum(a["liquidated"] for a in report["accounts"])
    assert overall["bad_debt_usd"] == pytest.approx(sum(a["bad_debt_usd"]
                                                        for a in report["accounts"]))
    bad = client.post("/v1/account-backtests",
                      json={**body, "liquidation": {"latency_bars": -1}})
    assert bad.status_code in (400, 422)
    assert bad.headers["content-type"].startswith("application/problem+json")
    assert bad.json()["field"] == "liquidation.latency_bars"
    assert json.loads(bad.text)["status"] == bad.status_code
    assert np.isfinite(overall["notional_opened_usd"])


def test_margin_batch_sums_each_accounts_positions(client: TestClient[Any]) -> None:
    """A batch of accounts of 0 to 3 positions over two published tier tables: each
    position's MM is the bracket-slice sum (tests/reference_models.py), each account's the
    sum of its own positions', in request order."""
    from tests.reference_models import tiered_maintenance_usd

    _publish(client, "BTCUSDT", "tiered", BINANCE_2021)
    eth = {**BINANCE_2021, "mmr_schedule": [2 * r for r in BINANCE_2021["mmr_schedule"][:-1]]
           + [1.0], "imr_schedule": [1.0] * 10}
    _publish(client, "ETHUSDT", "tiered", eth)
    rng = np.random.default_rng(4)
    accounts = []
    for j in range(60):
        names = ["BTCUSDT", "ETHUSDT"][: j % 3]
        accounts.append({"id": f"a{j}", "positions": {
            n: float(rng.choice([-1, 1]) * 10 ** rng.uniform(2, 8)) for n in names}})
    r = client.post("/v1/margin", json={"accounts": accounts})
    assert r.status_code == 200, r.text
    got = r.json()["accounts"]
    schedules = {"BTCUSDT": BINANCE_2021["mmr_schedule"], "ETHUSDT": eth["mmr_schedule"]}
    caps = BINANCE_2021["bracket_caps_usd"][:-1]
    for sent, answer in zip(accounts, got, strict=True):
        assert answer["id"] == sent["id"]
        expected = {n: tiered_maintenance_usd(abs(v), caps, schedules[n])
                    for n, v in sent["positions"].items()}
        assert [p["instrument"] for p in answer["positions"]] == list(sent["positions"])
        for p in answer["positions"]:
            assert p["mm_usd"] == pytest.approx(expected[p["instrument"]], rel=1e-12)
        assert answer["mm_usd"] == pytest.approx(sum(expected.values()), rel=1e-12)
        assert answer["im_usd"] == pytest.approx(sum(p["im_usd"] for p in answer["positions"]),
                                                 rel=1e-12)


def test_account_backtest_above_the_sync_limit_is_a_job(tmp_path: Path) -> None:
    """Above MARGINLAB_MAX_SYNC_BARS the request is a job: 202 with its id, Location and
    status URL, queued → succeeded with the report the synchronous path gives for the same
    body; a run that fails on the data ends failed with the reason; bad input is still
    refused before any job (422 naming the field); an unknown id is a 404."""
    import time

    (tmp_path / "a.csv").write_bytes(bars_csv(600, seed=1))
    (tmp_path / "b.csv").write_bytes(bars_csv(600, seed=2))
    body: dict[str, Any] = {
        "data": [{"instrument": "AUSDT", "ref": "a.csv"}, {"instrument": "BUSDT", "ref": "b.csv"}],
        "model": "tiered", "params": {"base_mmr": 0.02, "tier_growth": 1.0,
                                      "bracket_caps_usd": []},
        "population": {"seed": 3, "entry_every_bars": 24, "accounts_per_entry": 5,
                       "leverage": [10, 40]},
        "liquidation": {"holding_bars": 48}, "stress_windows": []}

    def settings(max_sync_bars: int) -> Settings:
        return Settings(state_dir=str(tmp_path / ".state"), data_root=str(tmp_path),
                        max_sync_bars=max_sync_bars)

    with TestClient(create_app(settings(10_000))) as c:
        direct = c.post("/v1/account-backtests", json=body)
    assert direct.status_code == 200, direct.text
    with TestClient(create_app(settings(1_000))) as c:  # 1,200 bars: a job
        r = c.post("/v1/account-backtests", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["state"] == "queued"
        assert job["report"] is None
        assert r.headers["location"] == job["status_url"] == f"/v1/account-backtests/{job['id']}"

        def final(url: str) -> dict[str, Any]:
            for _ in range(200):
                status: dict[str, Any] = c.get(url).json()
                if status["state"] in ("succeeded", "failed"):
                    return status
                time.sleep(0.05)
            raise AssertionError(f"{url} did not end")

        done = final(job["status_url"])
        assert done["state"] == "succeeded", done
        assert done["started_at"]
        assert done["finished_at"]
        mine, theirs = done["report"], direct.json()
        assert mine["summary"] == theirs["summary"]
        assert mine["accounts"] == theirs["accounts"]
        # Its only account opens before the data: accepted, then failed with the reason.
        early = {k: v for k, v in body.items() if k != "population"}
        warm = c.post("/v1/account-backtests", json={**early, "accounts": [
            {"id": "early", "entry": "2000-01-01T00:00:00Z", "collateral": {"USDT": 100},
             "positions": {"AUSDT": 1000}}]})
        assert warm.status_code == 202, warm.text
        failed = final(warm.json()["status_url"])
        assert failed["state"] == "failed"
        assert "no account could open" in failed["error"]
        bad = c.post("/v1/account-backtests", json={**body, "liquidation": {"holding_bars": 0}})
        assert bad.status_code == 422
        assert bad.json()["field"] == "liquidation.holding_bars"
        assert c.get("/v1/account-backtests/" + "0" * 32).status_code == 404


def test_account_backtest_modes_per_account_over_http(client: TestClient[Any],
                                                       tmp_path: Path) -> None:
    """Accounts naming their own mode over HTTP: each row says its mode, ``accounts_by_mode``
    gives the per-mode figures summing to the overall ones, and a bad mode is a
    problem+json naming its path."""
    (tmp_path / "a.csv").write_bytes(bars_csv(600, seed=1))
    (tmp_path / "b.csv").write_bytes(bars_csv(600, seed=2))
    from tests.api_helpers import START_MS

    accounts = [{"id": f"x{j}", "entry": START_MS + (50 + 10 * j) * 1_800_000,
                 "collateral": {"USDT": 500}, "positions": {"AUSDT": 10_000, "BUSDT": -8_000},
                 **({"mode": "isolated"} if j % 2 else {})} for j in range(20)]
    body = {"data": [{"instrument": "AUSDT", "ref": "a.csv"},
                     {"instrument": "BUSDT", "ref": "b.csv"}],
            "model": "tiered", "params": {"base_mmr": 0.02, "tier_growth": 1.0,
                                          "bracket_caps_usd": []},
            "accounts": accounts, "liquidation": {"holding_bars": 200}, "stress_windows": []}
    r = client.post("/v1/account-backtests", json=body)
    assert r.status_code == 200, r.text
    report = r.json()
    assert [a["mode"] for a in report["accounts"]] == ["cross", "isolated"] * 10
    by_mode = report["accounts_by_mode"]
    assert set(by_mode) == {"cross", "isolated"}
    assert by_mode["cross"]["liquidated_accounts"] > 0
    assert by_mode["isolated"]["liquidated_accounts"] > 0
    for key in ("accounts", "liquidated_accounts", "bad_debt_usd"):
        assert report["summary"][0][key] == pytest.approx(
            by_mode["cross"][key] + by_mode["isolated"][key])
    bad = client.post("/v1/account-backtests", json={**body, "accounts": [
        {**accounts[0], "mode": "hybrid"}]})
    assert bad.status_code in (400, 422)
    assert bad.json()["field"] == "accounts[0].mode"
