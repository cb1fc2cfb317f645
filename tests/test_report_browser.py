"""The calibration report: served by the running service and opened in headless Chromium,
and its normalised bad-debt chart and NaN-safe downsampling against hand values."""

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

import numpy as np
import pytest

from calibration.html_report import _bucket, _light_cell, _liquidation_chart, bad_debt_bps_of_opened
from calibration.report import LiquidationMetrics
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
    # The bad-debt chart is normalised, and its axis says so (labels are SVG text).
    chart = html[html.index('class="chart bad-debt"'):]
    chart = chart[: chart.index("</svg>")]
    assert "bad debt (bps of notional opened)" in chart
    # One line each for what premature and every coverage column mean.
    for needle in ("<b>premature</b>: a liquidation whose bankruptcy price is not reached in "
                   "bars t..t+R (the trigger bar t included",
                   "<b>obs.</b>: observations", "<b>breaches</b>:", "<b>breach rate</b>:",
                   "<b>Kupiec p</b>:", "<b>indep. p</b>:",
                   "insufficient: a window too short for any verdict"):
        assert needle in html, needle
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "calibration-report.png"
    subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1300,3200",
         "--hide-scrollbars", f"--screenshot={shot}", finished_report],
        capture_output=True, timeout=120, check=True,
    )
    assert shot.stat().st_size > 20_000


def _liquidation(window: str, opened_usd: float, bad_debt_usd: float) -> LiquidationMetrics:
    return LiquidationMetrics(
        window=window, start=None, end=None, positions=10, notional_opened_usd=opened_usd,
        liquidations=3, liquidated_notional_usd=0.0, premature_liquidations=1,
        premature_share=1 / 3, bad_debt_usd=bad_debt_usd, bad_debt_bps=None,
        bad_debt_positions=1, worst_position_bad_debt_usd=bad_debt_usd, fees_to_fund_usd=0.0,
        insurance_fund_min_usd=0.0, insurance_fund_exhausted_at=None)


def test_bad_debt_is_normalised_by_the_notional_opened() -> None:
    """Bad debt in bps of notional opened, by hand: 1,234.50 USD on 2,000,000 USD opened is
    6.1725 bps; a 1-day window (50 USD on 100,000) and an 18-month fold (5,000 USD on
    10,000,000) both 5 bps, though their USD differ 100-fold; nothing opened: no value."""
    assert bad_debt_bps_of_opened(_liquidation("x", 2_000_000.0, 1_234.5)) == pytest.approx(
        6.1725, rel=1e-12)
    day = bad_debt_bps_of_opened(_liquidation("crash_day", 100_000.0, 50.0))
    fold = bad_debt_bps_of_opened(_liquidation("oos_fold_1", 10_000_000.0, 5_000.0))
    assert day == pytest.approx(5.0, rel=1e-12)
    assert fold == pytest.approx(5.0, rel=1e-12)
    assert bad_debt_bps_of_opened(_liquidation("empty", 0.0, 0.0)) is None


def test_bad_debt_chart_plots_the_normalised_values() -> None:
    """The chart's bar heights are the bps values (SVG text kept: the axis label is there)."""
    svg = _liquidation_chart([_liquidation("crash_day", 100_000.0, 50.0),
                              _liquidation("oos_fold_1", 10_000_000.0, 20_000.0),
                              _liquidation("empty", 0.0, 0.0)], "BTC")
    assert "bad debt (bps of notional opened)" in svg
    assert "no position" in svg
    assert "20,000 USD" in svg


def test_bucket_ignores_nan_without_warnings() -> None:
    """Blocks of NaN (warm-up, no horizon left) are NaN, others their max or mean of the
    finite values, by hand; pytest turns any warning ("Mean of empty slice") into a failure."""
    values = np.array([np.nan, np.nan, 1.0, 3.0, np.nan, 5.0, 7.0])
    np.testing.assert_array_equal(_bucket(values, 2, "max"), [np.nan, 3.0, 5.0])
    np.testing.assert_array_equal(_bucket(values, 2, "mean"), [np.nan, 2.0, 5.0])


@pytest.mark.parametrize(("light", "colour"), [("insufficient", "#9e9e9e"), (None, "#eeeeee"),
                                               ("red", "#c62828")])
def test_traffic_light_cells(light: str | None, colour: str) -> None:
    """`insufficient` is a grey cell with its name; a missing light is a dash."""
    cell = _light_cell(light)
    assert f"background:{colour}" in cell
    assert (light or "–") in cell
