"""One run sequence: the library, ``marginlab calibrate`` and the API give the same result.

Issue 14 item 5. The three doors call ``calibration.calibrate.run_calibration``; for the same
spec on the same bars (one worker, a seed, a trial count) they must agree on the
recommendation and the Pareto front, bit for bit once through JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from calibration.calibrate import calibrate
from calibration.cli import main
from calibration.spec import decode_spec
from service.app import create_app
from service.settings import Settings
from tests.api_helpers import bars_csv, calibration_spec, wait_for

N_BARS = 3000
#: Bars of the account-level test's two series (its accounts open at bars 300..1060).
ACCOUNT_BARS = 1500


def _comparable(result: dict[str, Any]) -> dict[str, Any]:
    """What must agree: the recommendation, the front and what identifies the inputs."""
    return {key: result[key] for key in ("recommendation", "pareto_front", "spec_hash",
                                         "data_fingerprints", "seed", "trials", "horizon_bars",
                                         "reproducible")}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient[Any], Path]]:
    """One API (and its embedded worker) for the module's tests, and its data root: started
    once, since its start-up is most of each test's time."""
    root = tmp_path_factory.mktemp("one_run")
    settings = Settings(state_dir=str(root / "state"), data_root=str(root))
    with TestClient(create_app(settings)) as client:
        yield client, root


def test_library_cli_and_api_give_the_same_result(served: tuple[TestClient[Any], Path],
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Same spec, same bars: the library's calibrate, the CLI's --json and the API's result
    name the same recommended trial with the same evidence and the same Pareto front."""
    client, tmp_path = served
    uploaded = client.post("/v1/datasets?instrument=SYN", content=bars_csv(N_BARS),
                           headers={"content-type": "text/csv"})
    assert uploaded.status_code == 201, uploaded.text
    spec_json = calibration_spec(uploaded.json()["ref"], n_trials=8, seed=3)
    job = client.post("/v1/calibrations", json=spec_json).json()

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/calibrations/{job['id']}").json()
        return body if body["state"] in ("succeeded", "failed", "cancelled") else None

    assert wait_for(finished, timeout_s=120, what="the API's calibration")["state"] == \
        "succeeded"
    from_api = client.get(job["result_url"]).json()

    spec = decode_spec(json.dumps(spec_json))
    from_library = msgspec.to_builtins(calibrate(spec, root=tmp_path, storage="memory"))

    (tmp_path / "spec.json").write_text(json.dumps(spec_json))
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    capsys.readouterr()
    code = main(["calibrate", "--spec", str(tmp_path / "spec.json"), "--storage", "memory",
                 "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    from_cli = json.loads(out)

    library = _comparable(json.loads(msgspec.json.encode(from_library)))
    assert library["recommendation"] is not None
    assert len(library["pareto_front"]) >= 1
    assert _comparable(from_cli) == library
    assert _comparable(from_api) == library


def _account_spec(btc: str, eth: str) -> dict[str, Any]:
    """An account-level calibration on two uploaded series: the engine's liquidation fee,
    the portfolio grid's scan range and a BTC haircut band searched, on accounts from a file
    under the data root, with both coverage backtests as constraints."""
    return {
        "data": [{"instrument": "BTCUSDT", "ref": btc}, {"instrument": "ETHUSDT", "ref": eth}],
        "model": "ewma",
        "search_space": {"warmup_bars": {"value": 200}, "horizon_bars": {"value": 4},
                         "decay": {"value": 0.95}, "floor_rate": {"value": 0.02},
                         "engine.liquidation_fee_rate": {"low": 0.0, "high": 0.01},
                         "portfolio.price_range": {"low": 0.02, "high": 0.2},
                         "haircuts.BTC.ratios[1]": {"low": 0.5, "high": 0.95}},
        "accounts": {"file": "accounts.json", "mode": "portfolio",
                     "portfolio": {"warmup_bars": 200},
                     "haircuts": {"BTC": {"caps_usd": [1e5], "ratios": [0.95, 0.9]}}},
        "objectives": {"minimize": ["portfolio_capital_cost", "account_bad_debt_bps",
                                    "collateral_held_back"]},
        "constraints": {"kupiec_alpha": None, "no_red_in_stress_windows": False,
                        "max_premature_share": None,
                        "max": {"haircut_coverage": 0, "portfolio_coverage": 0}},
        "stress_windows": [], "walk_forward": {"folds": 1}, "n_trials": 4, "seed": 2,
    }


def _accounts_file(start_ms: int, bar_ms: int) -> str:
    """Twenty accounts, a pair trade or a BTC-collateralised long, one every 40 bars."""
    records = []
    for k in range(20):
        entry = start_ms + (300 + 40 * k) * bar_ms
        positions = ({"BTCUSDT": 40_000.0, "ETHUSDT": -40_000.0} if k % 2
                     else {"ETHUSDT": 30_000.0})
        records.append({"id": f"acct{k}", "entry": entry,
                        "collateral": {"USDT": 2_000.0, "BTC": 20.0}, "positions": positions})
    return json.dumps(records)


def test_an_account_level_spec_gives_the_same_result_through_every_door(
        served: tuple[TestClient[Any], Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same account-level spec (accounts from a file) through the library, the CLI and
    ``POST /v1/calibrations``: the same recommendation, front and fingerprints (the accounts
    file's among them); a bad account-level key is a 422 problem naming its path."""
    from tests.api_helpers import START_MS

    client, tmp_path = served
    (tmp_path / "accounts.json").write_text(_accounts_file(START_MS, 1_800_000))
    refs = []
    for name, seed in (("BTCUSDT", 1), ("ETHUSDT", 2)):
        uploaded = client.post(f"/v1/datasets?instrument={name}",
                               content=bars_csv(ACCOUNT_BARS, seed=seed),
                               headers={"content-type": "text/csv"})
        assert uploaded.status_code == 201, uploaded.text
        refs.append(uploaded.json()["ref"])
    spec_json = _account_spec(*refs)
    bad = json.loads(json.dumps(spec_json))
    bad["search_space"]["engine.nope"] = {"low": 0, "high": 1}
    refused = client.post("/v1/calibrations", json=bad)
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["field"] == "search_space.engine.nope"
    job = client.post("/v1/calibrations", json=spec_json).json()

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/calibrations/{job['id']}").json()
        return body if body["state"] in ("succeeded", "failed", "cancelled") else None

    state = wait_for(finished, timeout_s=120, what="the API's calibration")
    assert state["state"] == "succeeded", state
    from_api = client.get(job["result_url"]).json()

    spec = decode_spec(json.dumps(spec_json))
    from_library = json.loads(msgspec.json.encode(calibrate(spec, root=tmp_path)))
    (tmp_path / "account_spec.json").write_text(json.dumps(spec_json))
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    capsys.readouterr()
    code = main(["calibrate", "--spec", str(tmp_path / "account_spec.json"), "--storage",
                 "memory", "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    library = _comparable(from_library)
    assert "accounts:accounts.json" in library["data_fingerprints"]
    rec = library["recommendation"]
    assert rec is not None
    assert {"haircut_coverage", "portfolio_coverage"} <= set(rec["constraints"])
    assert rec["in_sample"]["accounts"]["replay"][0]["accounts"] > 0
    assert _comparable(json.loads(out)) == library
    assert _comparable(from_api) == library
