"""One run sequence: the library, ``marginlab calibrate`` and the API give the same result.

Issue 14 item 5. The three doors call ``calibration.calibrate.run_calibration``; for the same
spec on the same bars (one worker, a seed, a trial count) they must agree on the
recommendation and the Pareto front, bit for bit once through JSON.
"""

from __future__ import annotations

import json
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


def _comparable(result: dict[str, Any]) -> dict[str, Any]:
    """What must agree: the recommendation, the front and what identifies the inputs."""
    return {key: result[key] for key in ("recommendation", "pareto_front", "spec_hash",
                                         "data_fingerprints", "seed", "trials", "horizon_bars",
                                         "reproducible")}


def test_library_cli_and_api_give_the_same_result(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Same spec, same bars: the library's calibrate, the CLI's --json and the API's result
    name the same recommended trial with the same evidence and the same Pareto front."""
    settings = Settings(state_dir=str(tmp_path / "state"), data_root=str(tmp_path))
    with TestClient(create_app(settings)) as client:
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
