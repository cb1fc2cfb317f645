"""Benchmark: a 300-trial ``ewma`` calibration on five years of 30-minute bars, five coins.

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    python -m bench.bench_calibrate

Data: ``binance_spot_2020_2025/{BTC,ETH,SOL,XRP,BNB}USDT_30m.csv`` (2020-09-20 .. 2025-09-19,
87,602 bars each), the liquidation simulation on, default stress windows and walk-forward
split. Measured in the same run, so the ratios hold on a noisy machine:

- one trial's backtests alone: ``evaluate()`` of one parameter set that is not pruned
  (coverage backtest + liquidation simulation of the five coins), median over a few sets;
- the mean ``evaluate()`` time over the trial mix the calibration actually ran (pruned trials
  skip the liquidation simulation, so this is the like-with-like reference);
- the whole calibration in this process (``calibrate()`` with the data already prepared:
  study creation, 300 trials, summary and the recommendation's evidence) on the default
  journal-file storage in a temporary directory;
- the CLI, ``marginlab calibrate --workers 1`` and ``--workers 2`` (each process imports,
  loads the data and joins the study), wall time on a fresh journal file each.

Targets: whole calibration ≤ 1.3 × (trials × one trial's backtests); two workers ≤ 0.6 × the
wall time of one.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import optuna

import calibration.calibrate as cal
from calibration.spec import decode_spec

N_TRIALS = int(os.environ.get("BENCH_TRIALS", "300"))
COINS = ("BTC", "ETH", "SOL", "XRP", "BNB")
#: Parameter sets that survive the coverage pre-check (backtest + liquidation simulation).
FULL_SETS = [
    {"decay": d, "confidence": 0.99, "floor_rate": f, "apc_buffer": 1.0}
    for d in (0.95, 0.97, 0.99) for f in (0.005, 0.02)
]


def spec_dict(n_trials: int) -> dict[str, Any]:
    """The benchmark's calibration spec (data references relative to the data root)."""
    return {
        "data": [{"instrument": f"{c}USDT", "ref": f"binance_spot_2020_2025/{c}USDT_30m.csv"}
                 for c in COINS],
        "model": "ewma",
        "search_space": {"horizon_bars": {"value": 2}},
        "risk_appetite_bps": 5.0,
        "n_trials": n_trials,
        "seed": 1,
    }


class Timed:
    """``calibration.calibrate.evaluate`` wrapped to record each call's wall time."""

    def __init__(self, fn: Callable[..., cal.Evaluation]) -> None:
        self.fn = fn
        self.trials: list[tuple[float, bool]] = []
        self.other: list[float] = []

    def __call__(self, prepared: cal.Prepared, params: Mapping[str, Any],
                 **kwargs: Any) -> cal.Evaluation:
        t0 = time.perf_counter()
        result = self.fn(prepared, params, **kwargs)
        dt = time.perf_counter() - t0
        if kwargs:  # the recommendation's evidence (full span / no pruning)
            self.other.append(dt)
        else:
            self.trials.append((dt, result.pruned is not None))
        return result


def run_cli(spec_path: Path, storage: Path, workers: int, root: Path) -> tuple[float, Any]:
    """Wall time and JSON result of ``marginlab calibrate`` with ``workers`` processes."""
    env = {**os.environ, "MARGINLAB_DATA_ROOT": str(root)}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "calibration.cli", "calibrate", "--spec", str(spec_path),
         "--storage", f"journal:{storage}", "--workers", str(workers), "--quiet", "--json"],
        env=env, capture_output=True, check=True,
    )
    return time.perf_counter() - t0, json.loads(out.stdout)


def main() -> int:
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data")).resolve()
    if not root.is_dir():
        print(f"no data at {root}; set MARGINLAB_SHARED_DATA", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = decode_spec(msgspec.json.encode(spec_dict(N_TRIALS)))
    t0 = time.perf_counter()
    prepared = cal.prepare(spec, root)
    prepare_s = time.perf_counter() - t0
    bars = sum(len(b) for b in prepared.in_sample)

    fixed = {"horizon_bars": 2}
    for p in FULL_SETS:  # warm: kernels compiled / loaded, parameter-free caches filled
        cal.evaluate(prepared, {**p, **fixed})
    one_trial = []
    for _ in range(3):
        for p in FULL_SETS:
            t0 = time.perf_counter()
            e = cal.evaluate(prepared, {**p, **fixed})
            one_trial.append(time.perf_counter() - t0)
            assert e.pruned is None, p
    one_s = statistics.median(one_trial)

    with tempfile.TemporaryDirectory(prefix="bench-cal-") as tmp:
        tmpdir = Path(tmp)
        timed = Timed(cal.evaluate)
        cal.evaluate = timed  # type: ignore[assignment]
        try:
            t0 = time.perf_counter()
            result = cal.calibrate(spec, root=root, storage=f"journal:{tmpdir / 'inproc.log'}",
                                   prepared=prepared)
            whole_s = time.perf_counter() - t0
        finally:
            cal.evaluate = timed.fn  # type: ignore[assignment]
        journal_mb = (tmpdir / "inproc.log").stat().st_size / 1e6

        spec_path = tmpdir / "spec.json"
        spec_path.write_bytes(msgspec.json.encode(spec_dict(N_TRIALS)))
        cli = {}
        for workers in (1, 2):
            cli[workers] = run_cli(spec_path, tmpdir / f"cli{workers}.log", workers, root)

    evals = [dt for dt, _ in timed.trials]
    pruned = sum(p for _, p in timed.trials)
    eval_sum = sum(evals)
    mix_mean = eval_sum / len(evals)
    rec = result.recommendation
    rows = [
        ("bars per trial (5 coins, in-sample)", f"{bars:,}"),
        ("prepare (load 5 CSVs, split), s", f"{prepare_s:.2f}"),
        ("one trial's backtests (coverage + liquidation, not pruned), median, ms",
         f"{one_s * 1e3:.1f}"),
        (f"trial mix: complete / pruned of {len(evals)}",
         f"{len(evals) - pruned} / {pruned}"),
        ("mean evaluate() over the trial mix, ms", f"{mix_mean * 1e3:.1f}"),
        ("whole calibration in-process (journal file), s", f"{whole_s:.2f}"),
        ("  of which trial evaluations, s", f"{eval_sum:.2f}"),
        ("  of which the recommendation's evidence (2 evaluations), s",
         f"{sum(timed.other):.2f}"),
        ("  sampler + storage + orchestration, ms per trial",
         f"{(whole_s - eval_sum - sum(timed.other)) / len(evals) * 1e3:.1f}"),
        ("whole / (trials × one trial's backtests)", f"{whole_s / (N_TRIALS * one_s):.2f}"),
        ("whole / (sum of the trial mix's evaluate())", f"{whole_s / eval_sum:.2f}"),
        ("journal file size, MB", f"{journal_mb:.1f}"),
        ("CLI --workers 1 wall time, s", f"{cli[1][0]:.2f}"),
        ("CLI --workers 2 wall time, s", f"{cli[2][0]:.2f}"),
        ("two workers / one", f"{cli[2][0] / cli[1][0]:.2f}"),
        ("sampler", result.sampler),
        ("recommendation (in-process run)",
         "none" if rec is None else
         f"trial {rec.trial}, feasible={rec.feasible}, IM "
         f"{100 * rec.objectives['capital_cost']:.2f}%, "
         f"{rec.objectives['insolvency_bps']:.3f} bps; front {len(result.pareto_front)}"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    for workers in (1, 2):
        trials = cli[workers][1]["trials"]
        print(f"\nCLI --workers {workers}: trials {trials}")
    ok_whole = whole_s <= 1.3 * N_TRIALS * one_s
    ok_mix = whole_s <= 1.3 * eval_sum
    ok_workers = cli[2][0] <= 0.6 * cli[1][0]
    print(f"\ntargets: whole <= 1.3 x trials x one trial: {'met' if ok_whole else 'NOT met'}; "
          f"whole <= 1.3 x the trial mix's evaluations: {'met' if ok_mix else 'NOT met'}; "
          f"2 workers <= 0.6 x 1: {'met' if ok_workers else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
