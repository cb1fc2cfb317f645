"""The calibration report, served by the running service, opened in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import running_service, write_bars_csv

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("MARGINLAB_REQUIRE_BROWSER"):
            pytest.fail("chromium is missing and MARGINLAB_REQUIRE_BROWSER is set")
        pytest.skip("chromium is not installed (apt-get install chromium); "
                    "set MARGINLAB_REQUIRE_BROWSER=1 to fail instead")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, body: object | None = None) -> dict[str, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        result: dict[str, object] = json.loads(resp.read())
        return result


@pytest.fixture(scope="module")
def finished_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the report of a finished calibration on a running service."""
    root = tmp_path_factory.mktemp("report")
    write_bars_csv(root / "BTC.csv", 6000, seed=12, crash_at=4500, crash=-0.15)
    with running_service(root) as base:
        spec = {"data": [{"instrument": "BTCUSDT", "ref": "BTC.csv"}], "model": "ewma",
                "search_space": {"horizon_bars": {"value": 4}, "warmup_bars": {"value": 300}},
                "stress_windows": [{"name": "crash", "start": "2022-04-05",
                                    "end": "2022-04-06"}],
                "liquidation": {"leverages": [5, 20], "notionals_usd": [10000]},
                "n_trials": 8, "seed": 2}
        job = _call(base + "/v1/calibrations", spec)
        status = job
        for _ in range(240):
            status = _call(f"{base}/v1/calibrations/{job['id']}")
            if status["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        assert status["state"] == "succeeded", status
        yield f"{base}/v1/calibrations/{job['id']}/report"


@pytest.mark.slow
def test_report_renders_in_chromium(finished_report: str, tmp_path: Path) -> None:
    """Chromium loads the report with no console error, every chart drawn, and a screenshot."""
    exe = _chromium()
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
         "--v=0", "--dump-dom", finished_report],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert console == []
    html = dom.stdout
    assert "Calibration report" in html
    charts = html.count("<svg")
    assert charts >= 3  # Pareto front, margin vs loss, bad debt per window
    assert html.count("<path") > 50  # the charts have drawn content, not empty frames
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "calibration-report.png"
    subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1300,3200",
         "--hide-scrollbars", f"--screenshot={shot}", finished_report],
        capture_output=True, timeout=120, check=True,
    )
    assert shot.stat().st_size > 20_000
