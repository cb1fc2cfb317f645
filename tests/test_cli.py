"""The ``marginlab backtest`` command: summary, JSON report, and one-line errors (exit 2)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# --- Output a person can read: 80 columns, units, no warnings, Pareto cut, progress best ---

BTC_1M = "binance_spot_1m_2021_05/BTCUSDT_1m_2021-04-20_2021-05-20.csv"
BTC_30M = "binance_spot_2020_2025/BTCUSDT_30m.csv"


def _cli(args: list[str], root: Path, *,
         columns: str | None = "80") -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with stdout piped (not a TTY) and warnings as errors."""
    env = {"MARGINLAB_DATA_ROOT": str(root), "PATH": "/usr/bin:/bin"}
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "calibration.cli", *args], env=env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False,
    )


def _assert_readable(result: subprocess.CompletedProcess[str], width: int = 80) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr
    too_long = [line for line in result.stdout.splitlines() if len(line) > width]
    assert too_long == []
    assert "…" not in result.stdout


def _cells(text: str) -> set[str]:
    """Every whitespace-separated token of a rendered table (numbers among them)."""
    return set(text.split())


@pytest.mark.data
def test_backtest_summary_fits_80_columns_on_real_data(shared_data: Path,
                                                      data_file: Callable[[str], str]) -> None:
    """BTC 1m May 2021: at COLUMNS=80 no line is wider than 80, no cell is cut ('…'), no
    warning reaches stderr, and every breach count and rate of the JSON is shown whole."""
    ref = data_file(BTC_1M)
    args = ["backtest", "--data", f"BTC={ref}", "--model", "ewma", "--params",
            '{"decay": 0.995, "horizon_bars": 60, "warmup_bars": 1000}',
            "--stress-window", "may_2021_crash=2021-05-19",
            "--stress-window", "first_day_in_warm_up=2021-04-20"]
    text = _cli(args, shared_data)
    _assert_readable(text)
    raw = _cli([*args, "--json"], shared_data)
    assert raw.returncode == 0, raw.stderr[-2000:]
    report = msgspec.json.decode(raw.stdout.encode(), type=BacktestReport)
    cells = _cells(text.stdout)
    for m in report.instruments[0].coverage:
        for side in (m.long, m.short):
            assert f"{side.observations:,}" in cells
            assert f"{side.breaches:,}" in cells
            if side.breach_rate is not None:
                assert f"{100 * side.breach_rate:.2f}" in cells
    for lm in report.instruments[0].liquidation or []:
        assert f"{lm.liquidations:,}" in cells
        assert f"{lm.premature_liquidations:,}" in cells
    # The warm-up window has no observation: shown as such, not as a number or a warning.
    warm = next(m for m in report.instruments[0].coverage if m.window == "first_day_in_warm_up")
    assert warm.long.observations == 0
    assert "breach\nrate %" not in text.stdout  # headers are rendered, not leaked markup
    assert "rate %" in text.stdout
    assert "bad debt bps" in text.stdout


def test_piped_output_is_not_forced_to_160_columns(root: Path) -> None:
    """Piped with no terminal and no COLUMNS the summary is 80 wide; COLUMNS=120 widens it."""
    ref = _write_bars(root)
    args = ["backtest", "--data", ref, "--model", "ewma", "--params", EWMA,
            "--liquidation", SMALL_LIQ]
    narrow = _cli(args, root, columns=None)
    _assert_readable(narrow)
    # The first line (model and parameters) is 111 characters: wrapped at 80 and at 120.
    first = "ewma (decay=0.97, confidence=0.99, horizon_bars=10, floor_rate=0.005, "
    assert narrow.stdout.splitlines()[0].rstrip() == first.rstrip()
    wide = _cli(args, root, columns="120")
    _assert_readable(wide, width=120)
    assert wide.stdout.splitlines()[0].rstrip().endswith("im_to_mm=2.0,")
    assert 80 < len(wide.stdout.splitlines()[0]) <= 120


def _worst_case_report(report: BacktestReport) -> BacktestReport:
    """``report`` with the widest figures a real run produces: the longest default window
    name, millions of observations, 1e10 USD of bad debt, an exhausted (negative) fund."""
    inst = report.instruments[0]
    side = msgspec.structs.replace(
        inst.coverage[0].long, observations=2_628_000, breaches=1_234_567, breach_rate=0.4698,
        kupiec_pvalue=6.19e-195, christoffersen_pvalue=6.94e-185,
        traffic_light="insufficient", mean_margin_rate=1.9876, max_uncovered_loss=0.99)  # type: ignore[arg-type]
    none_side = msgspec.structs.replace(side, traffic_light=None)
    cov = msgspec.structs.replace(inst.coverage[0], window="black_thursday_2020", long=side,
                                  short=none_side, peak_to_trough=12345.6)
    assert inst.liquidation is not None
    liq = msgspec.structs.replace(
        inst.liquidation[0], window="black_thursday_2020", positions=12_345_678,
        liquidations=9_876_543, premature_liquidations=8_765_432, premature_share=0.8875,
        bad_debt_usd=19_730_188_004.0, bad_debt_bps=141.13,
        worst_position_bad_debt_usd=59_595_945.0, insurance_fund_min_usd=-19_199_726_632.0,
        insurance_fund_exhausted_at="2021-04-21T22:28:00Z")
    inst = msgspec.structs.replace(inst, coverage=[cov, *inst.coverage],
                                   liquidation=[liq, *inst.liquidation])
    return msgspec.structs.replace(report, instruments=[inst])


def test_summary_worst_case_figures_fit_80_columns(root: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The widest figures (and the `insufficient` and missing traffic lights) fit 80
    columns whole: every number is printed in full, nothing is cut."""
    from rich.console import Console

    from calibration._summary import print_summary

    ref = _write_bars(root)
    code, out, err = _run(["backtest", "--data", ref, "--model", "ewma", "--params", EWMA,
                           "--liquidation", SMALL_LIQ, "--json"], capsys)
    assert code == 0, err
    report = _worst_case_report(msgspec.json.decode(out.encode(), type=BacktestReport))
    console = Console(width=80, record=True, file=io.StringIO())
    print_summary(report, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    cells = _cells(text)
    for number in ("2,628,000", "1,234,567", "46.98", "6.19e-195", "6.94e-185", "198.76",
                   "99.00", "12345.6", "12,345,678", "9,876,543", "8,765,432", "88.8",
                   "19,730,188,004", "141.13", "59,595,945", "-19,199,726,632"):
        assert number in cells, number
    assert "insufficient" in cells
    assert "black_thursday_2020" in cells
    assert "2021-04-21T22:28:00Z" in text


def _point(trial: int, cost: float, bps: float) -> Any:
    from calibration.calibrate import ParetoPoint

    return ParetoPoint(trial=trial, params={"decay": 0.9 + trial / 1000, "warmup_bars": 100},
                       capital_cost=cost, insolvency_bps=bps)


def _result_with_front(n: int, recommended: int) -> Any:
    from calibration.calibrate import CalibrationResult, Recommendation

    front = [_point(100 + k, 0.01 * (k + 1), 10.0 - k * 0.1) for k in range(n)]
    rec = Recommendation(
        trial=front[recommended].trial, params=front[recommended].params, feasible=True,
        within_risk_appetite=True,
        objectives={"capital_cost": front[recommended].capital_cost,
                    "insolvency_bps": front[recommended].insolvency_bps},
        constraints={}, binding_constraints=[], in_sample={}, out_of_sample={},
        change_vs_published=None, explanation="cheapest feasible Pareto point")
    return CalibrationResult(
        study="s", storage="memory", model="ewma", spec_hash="0" * 64, seed=1,
        engine_version="test", data_fingerprints={}, trials={"complete": n},
        sampler="TPESampler", recommendation=rec, pareto_front=front, horizon_bars=2,
        horizon="1h", bar_seconds=1800, workers=1, reproducible=True,
        reproducibility="one worker, a fixed trial count and a seed")


def _calibration_text(result: Any) -> str:
    from rich.console import Console

    from calibration._summary import print_calibration

    console = Console(width=80, record=True, file=io.StringIO())
    print_calibration(result, console)
    return console.export_text()


def _pareto_rows(text: str) -> list[tuple[int, str]]:
    """(rank, trial cell) of each Pareto table row."""
    body = text[text.index("Pareto front"):]
    rows = []
    for line in body.splitlines():
        cells = line.split()
        if len(cells) >= 4 and cells[0].isdigit() and cells[1].rstrip("*").isdigit():
            rows.append((int(cells[0]), cells[1]))
    return rows


def test_pareto_table_says_when_it_is_cut_and_shows_the_recommendation() -> None:
    """37 points, the recommendation 25th: the title says 10 of 37 are shown, and the
    recommended trial is there (marked), after the 10 cheapest."""
    text = _calibration_text(_result_with_front(37, recommended=24))
    assert "showing 10 of 37 Pareto trials" in " ".join(text.split())
    assert "the recommendation (rank 25)" in " ".join(text.split())
    rows = _pareto_rows(text)
    assert rows == [*((k, str(99 + k)) for k in range(1, 11)), (25, "124*")]
    assert max(len(line) for line in text.splitlines()) <= 80


def test_pareto_table_recommendation_among_the_first_rows() -> None:
    """Recommended 3rd of 37: ten rows, the third marked; 5 points: all shown, no cut."""
    text = _calibration_text(_result_with_front(37, recommended=2))
    rows = _pareto_rows(text)
    assert [r for r, _ in rows] == list(range(1, 11))
    assert rows[2] == (3, "102*")
    assert "showing 10 of 37 Pareto trials" in " ".join(text.split())
    small = _calibration_text(_result_with_front(5, recommended=4))
    assert "all 5 Pareto trials" in " ".join(small.split())
    assert "showing" not in small
    assert [r for r, _ in _pareto_rows(small)] == [1, 2, 3, 4, 5]


def test_calibration_summary_states_units() -> None:
    """capital_cost, a fraction in the JSON (0.07), is printed as 7.000 "% of notional"."""
    result = _result_with_front(8, recommended=6)
    lines = _calibration_text(result).splitlines()
    text = " ".join(" ".join(lines).split())
    assert result.recommendation.objectives["capital_cost"] == pytest.approx(0.07)
    assert "capital cost (mean IM): 7.000% of notional" in text
    assert "insolvency: 9.400 bps" in text
    assert "rates are fractions of notional" in text
    # The Pareto table's two-line headers: "mean IM" over "% of notional", then "bps".
    head = next(i for i, line in enumerate(lines) if "mean IM" in line and "cost" not in line)
    assert "insolvency" in lines[head]
    assert "% of notional" in lines[head + 1]
    assert "bps" in lines[head + 1]
    assert "7.000" in _cells(" ".join(lines[head:]))


def _pareto_by_hand(trials: list[Any], appetite: float) -> tuple[int, int]:
    """(the cheapest feasible non-dominated trial, the cheapest of those within
    ``appetite``), by a double loop over the finished trials."""
    feasible = [t for t in trials if t.state.name == "COMPLETE"
                and all(v <= 0 for v in t.constraints.values())]

    def dominated(t: Any) -> bool:
        return any(all(a <= b for a, b in zip(o.values, t.values, strict=True))
                   and o.values != t.values for o in feasible)

    front = sorted((t for t in feasible if not dominated(t)),
                   key=lambda t: (t.values[0], t.values[1]))
    within = [t for t in front if t.values[1] <= appetite]
    return front[0].number, within[0].number


def test_progress_best_applies_the_risk_appetite(root: Path) -> None:
    """The progress bar's last "best" is the recommendation: with an appetite that the
    cheapest Pareto point exceeds, both name the cheapest point within it (found here by a
    double loop over the trials), not the cheapest feasible trial."""
    from calibration.calibrate import (
        best_feasible,
        create_or_load_study,
        prepare,
        run_worker,
        summarize,
    )
    from calibration.cli import progress_best_text
    from calibration.spec import decode_spec
    from calibration.storage import Coordination

    ref = _write_bars(root, n=1500)
    space = {"warmup_bars": {"value": 100}, "horizon_bars": {"value": 10},
             "decay": {"low": 0.9, "high": 0.999},
             "floor_rate": {"low": 0.001, "high": 0.05, "log": True}}

    def run(appetite: float | None) -> tuple[list[Any], list[Any], Any, Any]:
        spec = decode_spec(_spec(ref, search_space=space, n_trials=24,
                                 risk_appetite_bps=appetite))
        prepared = prepare(spec, root)
        seen: list[Any] = []
        with Coordination("memory") as coordination:
            study = create_or_load_study(spec, prepared, coordination)
            run_worker(study, prepared, coordination, n_trials=spec.n_trials,
                       on_trial=lambda done, total, best: seen.append(best))
            result = summarize(study, prepared, "memory")
            assert best_feasible(study) == best_feasible(study, appetite)  # the study's
            return seen, study.get_trials(), result, study

    _, trials, free, _ = run(None)
    insolvency = sorted(p.insolvency_bps for p in free.pareto_front)
    assert len(set(insolvency)) >= 3, insolvency
    # Between the two highest insolvencies: the cheapest point (the highest) is outside.
    appetite = (insolvency[-1] + insolvency[-2]) / 2
    seen, trials, result, _ = run(appetite)
    cheapest, within = _pareto_by_hand(trials, appetite)
    assert cheapest != within
    assert result.recommendation.trial == within
    assert seen[-1]["trial"] == within
    assert seen[-1]["within_risk_appetite"] is True
    text = progress_best_text(seen[-1])
    assert f"trial {within}," in text
    assert "% of notional" in text
    assert "bps" in text


def test_progress_best_text_without_a_point_within_appetite() -> None:
    """Outside the appetite the progress line says so; before any feasible trial, none."""
    from calibration.cli import progress_best_text

    outside = progress_best_text({"trial": 4, "capital_cost": 0.0523, "insolvency_bps": 12.5,
                                  "within_risk_appetite": False})
    assert outside == ("best (none within appetite): trial 4, IM 5.23% of notional, "
                       "12.50 bps")
    assert progress_best_text(None) == "best: no feasible trial yet"


@pytest.mark.data
def test_calibrate_summary_and_report_on_real_data(shared_data: Path, tmp_path: Path,
                                                   data_file: Callable[[str], str]) -> None:
    """BTC 30m 2022 through the CLI at COLUMNS=80: no warning (the report's charts of
    warm-up bars once warned "Mean of empty slice"), no line over 80, nothing cut, and the
    recommended trial is in the Pareto table, marked."""
    ref = data_file(BTC_30M)
    spec = {
        "data": [{"instrument": "BTCUSDT", "ref": ref, "start": "2022-01-01",
                  "end": "2022-12-31"}],
        "model": "ewma",
        "search_space": {"decay": {"low": 0.9, "high": 0.999},
                         "floor_rate": {"low": 0.002, "high": 0.05, "log": True},
                         "horizon_bars": {"value": 2}, "warmup_bars": {"value": 500}},
        "risk_appetite_bps": 0.5,
        "walk_forward": {"in_sample_end": "2022-09-01", "folds": 2},
        "stress_windows": [{"name": "luna_ust_2022", "start": "2022-05-09",
                            "end": "2022-05-13"},
                           {"name": "ftx_2022", "start": "2022-11-08", "end": "2022-11-10"}],
        "n_trials": 40, "seed": 3,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    storage = str(tmp_path / "study.journal")
    report = tmp_path / "report.html"
    args = ["calibrate", "--spec", str(tmp_path / "spec.json"), "--storage", storage]
    text = _cli([*args, "--report", str(report)], shared_data)
    _assert_readable(text)
    assert report.stat().st_size > 10_000
    # The study is finished: a second run resumes it and prints the same result as JSON.
    raw = _cli([*args, "--json"], shared_data)
    assert raw.returncode == 0, raw.stderr[-2000:]
    result = json.loads(raw.stdout)
    rec = result["recommendation"]["trial"]
    assert f"{rec}*" in _cells(text.stdout)
    n = len(result["pareto_front"])
    flat = " ".join(text.stdout.split())
    if n > 10:
        assert f"showing 10 of {n} Pareto trials" in flat
    else:
        assert f"all {n} Pareto trials" in flat
    cost = result["recommendation"]["objectives"]["capital_cost"]
    assert f"{100 * cost:.3f}% of notional" in flat


#: Packages the backtest command has no use for: the optimiser, the service's web stack and
#: queue, HTTP clients (``data fetch``), the terminal UI (stderr is not a terminal here).
NOT_ON_THE_BACKTEST_PATH = ("optuna", "litestar", "granian", "redis", "rq", "sqlalchemy",
                            "urllib.request", "http.client", "ssl", "rich", "matplotlib",
                            "scipy.stats", "scipy.optimize")


def test_backtest_imports_no_heavy_module(root: Path) -> None:
    """``marginlab backtest --json`` in its own process imports none of the packages it does
    not use (each one is start-up time: Optuna alone was ~0.2 s); the engine's own (numpy,
    pandas, numba) it does, which shows the check sees the process's imports."""
    ref = _write_bars(root)
    code = (
        "import sys\n"
        "from service.cli import main\n"
        f"code = main(['backtest', '--data', {ref!r}, '--model', 'ewma', '--params', "
        f"{EWMA!r}, '--liquidation', {SMALL_LIQ!r}, '--json'])\n"
        "sys.stdout.flush()\n"
        "print('\\nMODULES', ' '.join(sorted(sys.modules)))\n"
        "raise SystemExit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    report, _, modules_line = result.stdout.rpartition("\nMODULES ")
    assert json.loads(report)["instruments"]
    modules = set(modules_line.split())
    assert {"numpy", "pandas", "numba", "calibration.coverage"} <= modules
    loaded = sorted(m for m in modules
                    if any(m == bad or m.startswith(bad + ".") for bad in NOT_ON_THE_BACKTEST_PATH))
    assert loaded == []
