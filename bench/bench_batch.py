"""Benchmark: batches of EWMA parameter sets in one pass, and the cold first backtest.

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    python -m bench.bench_batch

One year of one-minute bars (525,600) does not exist in the shared data: the series is the
three real one-minute files (BTC and ETH April-May 2021, BTC July-August 2024) tiled end to
end by ``bench._data.tiled_minutes``. Measured in one run, best of ``REPEATS``:

* a numpy single pass over the closes (the memory floor) and the pandas formulation of one
  set's coverage backtest (``bench.bench_backtest.pandas_coverage``), ns/bar;
* ``evaluate_coverage_batch`` at 1, 8 and 64 sets (whole span only, overlapping, 1h
  horizon), ns/bar/set (wall and process CPU), beside ``coverage_backtest`` one set at a time;
* the first ``coverage_backtest`` on a fresh series (its parameter-free features not yet
  cached) against the second on the same series, and the same for ``run_backtest`` with the
  liquidation simulation;
* start-up: the whole ``marginlab backtest`` command (BTCUSDT 1m 2021-04-20..05-20, ewma,
  with the liquidation simulation, kernels cached), as a JSON report and as the summary
  table, and ``import calibration`` alone, each in a fresh process: best of
  ``STARTUP_REPEATS`` wall seconds and the process's CPU seconds (user + system), which
  load from other processes disturbs less than wall time.

``python -m bench.bench_batch --startup`` runs the start-up part alone.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from bench._data import tiled_minutes
from bench.bench_backtest import pandas_coverage
from calibration import CoverageConfig, coverage_backtest, make_model, run_backtest
from calibration.batch import evaluate_coverage_batch

N_BARS = 525_600
HORIZON = 60
REPEATS = 5
BATCH_SIZES = (1, 8, 64)
STARTUP_REPEATS = 7
STARTUP_DATA = "binance_spot_1m_2021_05/BTCUSDT_1m_2021-04-20_2021-05-20.csv"


def best_of(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Best wall time of ``repeats`` calls, seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_cpu_of(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Best process CPU time of ``repeats`` calls, seconds: less disturbed than wall time
    by other processes on a shared machine (the kernels run on one thread)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def param_sets(count: int, seed: int) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [{"decay": float(rng.uniform(0.97, 0.9995)),
             "confidence": float(rng.uniform(0.99, 0.999)),
             "horizon_bars": HORIZON, "warmup_bars": 1000} for _ in range(count)]


def best_process(cmd: list[str], env: dict[str, str],
                 repeats: int = STARTUP_REPEATS) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds (user + system) of ``repeats`` runs of ``cmd``
    in a fresh process each."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, check=True)
        wall = min(wall, time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = min(cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall, cpu


def startup_rows(root: Path) -> list[tuple[str, str]]:
    """Start-up of ``marginlab backtest`` and of ``import calibration`` (see the module's
    docstring); the first command run fills the kernel cache if it is empty."""
    exe = shutil.which("marginlab", path=str(Path(sys.executable).parent))
    script = [exe] if exe else [sys.executable, "-c",
                                "import sys; from service.cli import run; "
                                "sys.argv[0] = 'marginlab'; run()"]
    env = {**os.environ, "MARGINLAB_DATA_ROOT": str(root.resolve())}
    backtest = [*script, "backtest", "--data", STARTUP_DATA, "--model", "ewma"]
    subprocess.run([*backtest, "--json"], env=env, stdout=subprocess.DEVNULL, check=True)
    rows = []
    for name, cmd in (
        ("marginlab backtest --json", [*backtest, "--json"]),
        ("marginlab backtest (summary table)", backtest),
        ("python -c 'import calibration'", [sys.executable, "-c", "import calibration"]),
    ):
        wall, cpu = best_process(cmd, env)
        rows.append((f"start-up: {name}, s (wall / CPU)", f"{wall:.3f} / {cpu:.3f}"))
    rows.append(("load average (1 min) after the start-up runs",
                 f"{os.getloadavg()[0]:.2f}"))
    return rows


def startup_wall(rows: list[tuple[str, str]]) -> float:
    """The best wall seconds of ``marginlab backtest --json`` among ``rows``."""
    value = next(v for name, v in rows if "backtest --json" in name)
    return float(value.split(" / ")[0])


def main() -> int:
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data"))
    if not root.is_dir():
        print(f"no data at {root}; set MARGINLAB_SHARED_DATA", file=sys.stderr)
        return 2
    if "--startup" in sys.argv[1:]:
        rows = startup_rows(root)
        print("| measure | value |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
        ok = startup_wall(rows) < 1.0
        print(f"\ntarget: start-up < 1 s warm: {'met' if ok else 'NOT met'}")
        return 0
    bars = tiled_minutes(root, N_BARS)
    n = len(bars)
    config = CoverageConfig(horizon_bars=HORIZON)
    frame = pd.DataFrame({"close": bars.close, "high": bars.high, "low": bars.low})
    floor_s = best_of(lambda: np.add.reduce(bars.close))
    pandas_s = best_of(lambda: pandas_coverage(frame, 0.995, 0.99), 2)

    # Kernels loaded (or compiled) and the series' features cached before timing.
    evaluate_coverage_batch(bars, "ewma", param_sets(2, 0), config=config)
    one = make_model("ewma", param_sets(1, 1)[0])
    coverage_backtest(bars, one, config)
    single_s = best_of(lambda: coverage_backtest(bars, one, config))
    single_cpu_s = best_cpu_of(lambda: coverage_backtest(bars, one, config))
    batch_ns = {}
    batch_cpu_ns = {}
    for k in BATCH_SIZES:
        sets = param_sets(k, k)
        seconds = best_of(lambda sets=sets: evaluate_coverage_batch(  # type: ignore[misc]
            bars, "ewma", sets, config=config))
        batch_ns[k] = seconds / n / k * 1e9
        seconds = best_cpu_of(lambda sets=sets: evaluate_coverage_batch(  # type: ignore[misc]
            bars, "ewma", sets, config=config))
        batch_cpu_ns[k] = seconds / n / k * 1e9

    def fresh() -> object:
        return dataclasses.replace(bars, _cache={})

    cold_cov = warm_cov = cold_run = warm_run = float("inf")
    for _ in range(REPEATS):
        series = fresh()
        t0 = time.perf_counter()
        coverage_backtest(series, one, config)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        coverage_backtest(series, one, config)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        cold_cov, warm_cov = min(cold_cov, t1 - t0), min(warm_cov, t2 - t1)
        series = fresh()
        params = param_sets(1, 1)[0]
        t0 = time.perf_counter()
        run_backtest([series], "ewma", params)  # type: ignore[list-item]
        t1 = time.perf_counter()
        run_backtest([series], "ewma", params)  # type: ignore[list-item]
        t2 = time.perf_counter()
        cold_run, warm_run = min(cold_run, t1 - t0), min(warm_run, t2 - t1)

    rows = [
        ("bars (real 1m files tiled)", f"{n:,}"),
        ("numpy single pass (np.add.reduce), ns/bar", f"{floor_s / n * 1e9:.2f}"),
        ("pandas formulation, one parameter set, ns/bar", f"{pandas_s / n * 1e9:.1f}"),
        ("coverage_backtest, one set at a time (warm series), ns/bar/set",
         f"{single_s / n * 1e9:.2f}"),
        ("the same, CPU ns/bar/set", f"{single_cpu_s / n * 1e9:.2f}"),
    ]
    rows += [(f"evaluate_coverage_batch, {k} sets, ns/bar/set (wall / CPU)",
              f"{batch_ns[k]:.2f} / {batch_cpu_ns[k]:.2f}") for k in BATCH_SIZES]
    rows += [
        ("first coverage_backtest on a fresh series, ns/bar", f"{cold_cov / n * 1e9:.2f}"),
        ("second coverage_backtest on it (features cached), ns/bar", f"{warm_cov / n * 1e9:.2f}"),
        ("cold / warm, coverage", f"{cold_cov / warm_cov:.2f}x"),
        ("first run_backtest (coverage + liquidations) on a fresh series, s", f"{cold_run:.3f}"),
        ("second run_backtest on it, s", f"{warm_run:.3f}"),
        ("cold / warm, run_backtest", f"{cold_run / warm_run:.2f}x"),
        ("load average (1 min) after the batch runs", f"{os.getloadavg()[0]:.2f}"),
    ]
    rows += startup_rows(root)
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    ok_batch = batch_ns[64] <= 2.0
    ok_cold = cold_cov / warm_cov <= 1.5
    ok_start = startup_wall(rows) < 1.0
    print(f"\ntargets: <= 2 ns/bar/set at 64 sets: {'met' if ok_batch else 'NOT met'}; "
          f"cold <= 1.5x warm (coverage): {'met' if ok_cold else 'NOT met'}; "
          f"start-up < 1 s warm: {'met' if ok_start else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
