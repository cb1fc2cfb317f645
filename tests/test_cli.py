"""The ``marginlab backtest`` command: summary, JSON report, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pandas as pd
import pytest

from calibration.cli import main
from calibration.report import BacktestReport
from tests.conftest import random_walk

SMALL_LIQ = '{"leverages": [5, 20, 50], "notionals_usd": [10000], "entry_every_bars": 20}'


def _write_bars(root: Path, name: str = "bars.csv", n: int = 600, **edits: object) -> str:
    close = random_walk(n, seed=11, crash_at=n // 2)
    frame = pd.DataFrame({
        "timestamp": pd.date_range("2024-08-01", periods=n, freq="1min", tz="UTC").strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "open": np.r_[close[0], close[:-1]],
        "close": close,
    })
    frame["high"] = frame[["open", "close"]].max(axis=1) * 1.001
    frame["low"] = frame[["open", "close"]].min(axis=1) * 0.999
    frame["volume"] = 50.0
    for key, value in edits.items():
        row, col = key.split("__")
        if isinstance(value, str):
            frame[col] = frame[col].astype(object)
        frame.loc[int(row.removeprefix("r")), col] = value
    frame.to_csv(root / name, index=False)
    return name


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    return tmp_path


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


EWMA = '{"decay": 0.97, "horizon_bars": 10, "warmup_bars": 100}'


def test_json_report(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints a BacktestReport with fingerprints, per-side metrics and liquidations."""
    ref = _write_bars(root)
    code, out, err = _run(["backtest", "--data", f"BTC={ref}", "--model", "ewma", "--params",
                           EWMA, "--liquidation", SMALL_LIQ, "--json"], capsys)
    assert code == 0, err
    report = msgspec.json.decode(out.encode(), type=BacktestReport)
    assert report.model == "ewma"
    assert report.params["decay"] == 0.97
    assert report.horizon_bars == 10
    assert report.datasets[0].instrument == "BTC"
    assert len(report.datasets[0].fingerprint) == 64
    overall = report.instruments[0].coverage[0]
    assert overall.window == "all"
    assert overall.long.observations == 600 - 100 - 10
    raw = json.loads(out)
    side = raw["instruments"][0]["coverage"][0]["long"]
    for field in ("observations", "breaches", "breach_rate", "kupiec_lr", "kupiec_pvalue",
                  "christoffersen_lr", "conditional_coverage_lr", "traffic_light",
                  "mean_margin_rate", "max_uncovered_loss"):
        assert field in side
    assert report.instruments[0].liquidation is not None
    assert report.instruments[0].liquidation[0].positions > 0


def test_summary_table(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json a readable summary names the instrument, the windows and the lights."""
    ref = _write_bars(root)
    code, out, _ = _run(["backtest", "--data", ref, "--model", "tiered", "--params",
                         '{"base_mmr": 0.01}', "--horizon", "15m", "--liquidation", SMALL_LIQ],
                        capsys)
    assert code == 0
    assert "BARS" in out
    assert "coverage" in out
    assert "liquidations" in out
    assert "close-out horizon 15m (15 bars of 1m)" in out


def test_non_overlapping_and_im(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--non-overlapping observes every horizon-th bar; --margin im tests the IM."""
    ref = _write_bars(root)
    code, out, _ = _run(["backtest", "--data", ref, "--model", "ewma", "--params", EWMA,
                         "--non-overlapping", "--margin", "im", "--no-liquidation", "--json"],
                        capsys)
    assert code == 0
    report = msgspec.json.decode(out.encode(), type=BacktestReport)
    assert report.overlapping is False
    assert report.margin_tested == "im"
    assert report.instruments[0].coverage[0].long.observations == len(range(100, 590, 10))


@pytest.mark.parametrize(
    ("setup", "args", "needle"),
    [
        ({"r5__close": "abc"}, [], "row 6"),
        ({"r5__close": float("nan")}, [], "close"),
        ({"r7__low": 0.0}, [], "low must be > 0"),
        ({"r9__timestamp": "2024-08-01T00:00:00Z"}, [], "timestamp"),
        ({}, ["--model", "garch"], "unknown model 'garch'"),
        ({}, ["--params", '{"lambda": 0.9}'], "unknown parameter 'lambda'"),
        ({}, ["--params", '{"decay": 1.5}'], "decay must be < 1.0"),
        ({}, ["--params", "{decay: 0.9"], "params is not valid JSON"),
        ({}, ["--horizon", "5000"], "two different close-out horizons"),
        ({}, ["--params", '{"decay": 0.97, "warmup_bars": 100}', "--horizon", "5000"],
         "horizon of 5000 bars is longer"),
        ({}, ["--liquidation", '{"leverage": 3}'], "unknown liquidation setting"),
        ({}, ["--liquidation", '{"closeout_basis": "mid", "latency_bars": 0}'],
         "closeout_basis must be one of 'adverse_extreme', 'liquidation_price'"),
        ({}, ["--liquidation", '{"closeout_basis": "liquidation_price"}'],
         "needs latency_bars = 0 (got 1)"),
    ],
)
def test_bad_input_is_one_line_exit_2(root: Path, capsys: pytest.CaptureFixture[str],
                                      setup: dict[str, object], args: list[str],
                                      needle: str) -> None:
    """Bad data, models, parameters or horizons end with exit 2 and one line naming the fault."""
    ref = _write_bars(root, **setup)
    base = ["backtest", "--data", ref, "--model", "ewma", "--params", EWMA]
    for i in range(0, len(args), 2):
        flag = args[i]
        if flag in base:
            base[base.index(flag) + 1] = args[i + 1]
        else:
            base += args[i : i + 2]
    code, out, err = _run(base, capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("error: ")
    assert needle in err


@pytest.mark.parametrize("ref", ["../outside.csv", "/etc/passwd", "link.csv", "missing.csv"])
def test_references_outside_the_root_are_refused(
    root: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
    ref: str,
) -> None:
    """Paths escaping the data root (.., absolute, symlink out) or missing files: exit 2."""
    outside = tmp_path_factory.mktemp("outside")
    _write_bars(outside, "real.csv")
    (root / "link.csv").symlink_to(outside / "real.csv")
    code, _, err = _run(["backtest", "--data", ref, "--model", "ewma"], capsys)
    assert code == 2
    assert err.startswith("error: ")
    assert err.count("\n") == 1


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A missing required flag is a one-line error with exit code 2, not a usage dump."""
    with pytest.raises(SystemExit) as info:
        main(["backtest", "--model", "ewma"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--data" in err


@pytest.mark.data
def test_console_script_on_real_data(shared_data: Path, data_file: Callable[[str], str]) -> None:
    """The installed ``marginlab`` script runs the README's backtest on the real 1m bars."""
    ref = data_file("binance_spot_1m_2021_05/BTCUSDT_1m_2021-04-20_2021-05-20.csv")
    exe = shutil.which("marginlab", path=str(Path(sys.executable).parent)) or shutil.which(
        "marginlab")
    cmd = [exe] if exe else [sys.executable, "-m", "calibration.cli"]
    result = subprocess.run(
        [*cmd, "backtest", "--data", ref, "--model", "ewma", "--params",
         '{"decay": 0.995, "horizon_bars": 60, "warmup_bars": 1000}', "--json"],
        env={"MARGINLAB_DATA_ROOT": str(shared_data), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = msgspec.json.decode(result.stdout.encode(), type=BacktestReport)
    windows = [m.window for m in report.instruments[0].coverage]
    assert windows == ["all", "may_2021_crash"]
    assert report.datasets[0].gaps == 1


def test_explicit_positions(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--liquidation positions replace the grid; entries by ISO time or by bar."""
    ref = _write_bars(root)
    positions = (
        '{"positions": [{"side": "long", "entry": "2024-08-01T03:00:00Z", '
        '"notional_usd": 50000, "leverage": 25}, '
        '{"side": "short", "entry_bar": 150, "notional_usd": 1000, "leverage": 3}]}'
    )
    code, out, err = _run(["backtest", "--data", ref, "--model", "ewma", "--params", EWMA,
                           "--liquidation", positions, "--json"], capsys)
    assert code == 0, err
    report = msgspec.json.decode(out.encode(), type=BacktestReport)
    overall = report.instruments[0].liquidation[0]  # type: ignore[index]
    assert overall.positions == 2
    assert overall.notional_opened_usd == 51_000.0


def test_closeout_basis_through_liquidation_flag(root: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--liquidation picks the optimistic close-out by name; the report records the basis
    (the conservative adverse extreme when none is given)."""
    ref = _write_bars(root)
    recorded = []
    for extra in ('', ', "closeout_basis": "liquidation_price"'):
        liq = '{"latency_bars": 0, "entry_every_bars": 20' + extra + "}"
        code, out, err = _run(["backtest", "--data", ref, "--model", "ewma", "--params", EWMA,
                               "--liquidation", liq, "--json"], capsys)
        assert code == 0, err
        report = msgspec.json.decode(out.encode(), type=BacktestReport)
        assert report.liquidation_config is not None
        assert report.liquidation_config["latency_bars"] == 0
        recorded.append(report.liquidation_config["closeout_basis"])
    assert recorded == ["adverse_extreme", "liquidation_price"]


def test_explicit_position_errors_name_the_entry(root: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed explicit position is a one-line error naming positions[i]."""
    ref = _write_bars(root)
    code, _, err = _run(["backtest", "--data", ref, "--model", "ewma", "--liquidation",
                         '{"positions": [{"side": "long", "leverage": 2}]}'], capsys)
    assert code == 2
    assert "positions[0]" in err


def _spec(ref: str, **extra: object) -> str:
    spec = {
        "data": [{"instrument": "BTC", "ref": ref}],
        "model": "ewma",
        "search_space": {"warmup_bars": {"value": 100}, "horizon_bars": {"value": 10}},
        "stress_windows": [{"name": "crash", "start": "2024-08-01"}],
        "liquidation": {"leverages": [5, 20], "notionals_usd": [10000],
                        "entry_every_bars": 30, "holding_bars": 120},
        "n_trials": 6,
        "seed": 3,
    }
    spec.update(extra)
    return json.dumps(spec)


def test_calibrate_json(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """calibrate --json prints recommendation (params, feasible) and pareto_front."""
    ref = _write_bars(root, n=1500)
    (root / "spec.json").write_text(_spec(ref))
    code, out, err = _run(["calibrate", "--spec", str(root / "spec.json"), "--storage",
                           "memory", "--json", "--quiet"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"recommendation", "pareto_front", "spec_hash", "data_fingerprints"}
    assert sum(result["trials"][s] for s in ("complete", "pruned")) == 6
    rec = result["recommendation"]
    assert {"params", "feasible", "objectives", "constraints"} <= set(rec)
    assert rec["params"]["horizon_bars"] == 10


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"search_space": {"lam": {"low": 0.1, "high": 0.2}}}, "unknown parameter 'lam'"),
        ({"search_space": {"decay": {"low": 0.99, "high": 0.9}}}, "inverted range"),
        ({"n_trials": None}, "give n_trials, timeout_seconds or both"),
        ({"stress_windows": [{"name": "x", "start": "2030-01-01"}]}, "outside the data"),
        ({"colour": "red"}, "unknown field"),
    ],
)
def test_calibrate_bad_spec_is_one_line(root: Path, capsys: pytest.CaptureFixture[str],
                                        extra: dict[str, object], needle: str) -> None:
    """A bad spec ends with exit 2 and one line, before any trial runs."""
    ref = _write_bars(root, n=1500)
    (root / "spec.json").write_text(_spec(ref, **extra))
    code, out, err = _run(["calibrate", "--spec", str(root / "spec.json"), "--storage",
                           "memory", "--quiet"], capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert needle in err


def test_calibrate_workers_need_shared_storage(root: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--workers 2 with in-memory storage is refused (workers could not share it)."""
    ref = _write_bars(root, n=1500)
    (root / "spec.json").write_text(_spec(ref))
    code, _, err = _run(["calibrate", "--spec", str(root / "spec.json"), "--storage", "memory",
                         "--workers", "2"], capsys)
    assert code == 2
    assert "shared storage" in err
