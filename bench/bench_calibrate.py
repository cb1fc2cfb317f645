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
  journal-file storage in a temporary directory, three times (the median is reported, each
  run against its own trials' ``evaluate()`` time);
- the same whole calibration with two workers (``calibrate(..., workers=2)``: this process
  and one forked helper), three times, interleaved with the one-worker runs; median against
  median;
- the same comparison end to end, including each process's start-up, best of two on a fresh
  journal file each: the CLI as a user runs it (``marginlab calibrate --workers N``: one
  process imports, loads the data and creates the study, then forks its helpers), and
  ``marginlab worker`` processes started together on a study created beforehand (each
  imports and loads the data itself).

Targets: whole calibration ≤ 1.3 × (trials × one trial's backtests); two workers ≤ 0.6 × the
wall time of one (the whole calibration, as above).
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
import calibration.calibrate._evaluate as evaluation
from calibration.parallel import can_fork
from calibration.spec import CalibrationSpec, decode_spec
from calibration.storage import Coordination

N_TRIALS = int(os.environ.get("BENCH_TRIALS", "300"))
REPEATS = 3
WORKER_REPEATS = 2
#: A longer CLI calibration, once per worker count: the start-up is a fixed cost.
LONG_TRIALS = 3 * N_TRIALS
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


def trial_span(storage: Path, study_name: str) -> float:
    """Seconds from the study's first trial start to its last trial end: the run without
    the processes' start-up (imports, data load) and the summary."""
    with Coordination(f"journal:{storage}") as coordination:
        study = optuna.load_study(study_name=study_name, storage=coordination.storage)
        trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    return (max(ends) - min(starts)).total_seconds()


def run_workers(spec: CalibrationSpec, prepared: cal.Prepared, storage: Path, workers: int,
                root: Path) -> tuple[float, dict[str, int], float]:
    """Create the study here, then start ``workers`` ``marginlab worker`` processes at once;
    wall time until the last exits, the study's trial states, and its ``trial_span``."""
    url = f"journal:{storage}"
    with Coordination(url) as coordination:
        study = cal.create_or_load_study(spec, prepared, coordination)
        env = {**os.environ, "MARGINLAB_DATA_ROOT": str(root)}
        t0 = time.perf_counter()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "calibration.cli", "worker", "--study", study.study_name,
             "--storage", url, "--worker-index", str(i), "--quiet"], env=env)
            for i in range(1, workers + 1)]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - t0
        assert codes == [0] * workers, codes
        states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    span = trial_span(storage, study.study_name)
    return wall, {s: states.count(s) for s in sorted(set(states))}, span


def storage_ms_per_trial(backend: Callable[[str], Any], path: Path) -> float:
    """ms per trial of the journal file alone: NSGA-II, ask, four parameters, the violation
    constraint, a 38 KB metrics attribute and tell, with an instant objective."""
    from optuna.storages import JournalStorage

    study = optuna.create_study(storage=JournalStorage(backend(str(path))),
                                directions=["minimize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(seed=1))
    metrics = "x" * 38_000
    t0 = time.perf_counter()
    for _ in range(N_TRIALS):
        trial = study.ask()
        xs = [trial.suggest_float(f"x{j}", 0.0, 1.0) for j in range(4)]
        trial.set_constraint(cal.VIOLATION_KEY, 0.0)
        trial.set_user_attr(cal.METRICS_ATTR, metrics)
        study.tell(trial, [sum(xs), xs[0]])
    return (time.perf_counter() - t0) / N_TRIALS * 1e3


def import_time() -> float:
    """Best of three: a fresh interpreter importing ``calibration.calibrate`` (what every
    worker process pays before it loads data), seconds."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import calibration.calibrate"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data")).resolve()
    if not root.is_dir():
        print(f"no data at {root}; set MARGINLAB_SHARED_DATA", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_before = os.getloadavg()[0]
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

    runs: list[tuple[float, Timed, float]] = []  # (whole, evaluations, journal MB)
    two_inproc: list[float] = []
    two_mixes: list[tuple[int, int]] = []  # (complete, pruned) of each two-worker run
    helpers_fork = can_fork()
    cli: dict[int, list[float]] = {1: [], 2: []}
    procs: dict[int, list[float]] = {1: [], 2: []}
    spans: dict[int, list[float]] = {1: [], 2: []}
    worker_spans: dict[int, list[float]] = {1: [], 2: []}
    mixes: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cal-") as tmp:
        tmpdir = Path(tmp)
        for r in range(REPEATS):
            journal = tmpdir / f"inproc{r}.log"
            timed = Timed(evaluation.evaluate)
            evaluation.evaluate = timed  # where the workers look it up
            try:
                t0 = time.perf_counter()
                result = cal.calibrate(spec, root=root, storage=f"journal:{journal}",
                                       prepared=prepared)
                whole_s = time.perf_counter() - t0
            finally:
                evaluation.evaluate = timed.fn
            runs.append((whole_s, timed, journal.stat().st_size / 1e6))
            journal = tmpdir / f"inproc{r}-2.log"
            t0 = time.perf_counter()
            two = cal.calibrate(spec, root=root, storage=f"journal:{journal}",
                                prepared=prepared, workers=2)
            two_inproc.append(time.perf_counter() - t0)
            mixes["calibrate(workers=2)"] = two.trials
            two_mixes.append((two.trials["complete"], two.trials["pruned"]))

        spec_path = tmpdir / "spec.json"
        spec_path.write_bytes(msgspec.json.encode(spec_dict(N_TRIALS)))
        for r in range(WORKER_REPEATS):
            for workers in (1, 2):
                journal = tmpdir / f"cli{workers}-{r}.log"
                wall, out = run_cli(spec_path, journal, workers, root)
                cli[workers].append(wall)
                spans[workers].append(trial_span(journal, out["study"]))
                mixes[f"CLI --workers {workers}"] = out["trials"]
                wall, states, span = run_workers(spec, prepared, tmpdir / f"w{workers}-{r}.log",
                                                 workers, root)
                procs[workers].append(wall)
                worker_spans[workers].append(span)
                mixes[f"{workers} x marginlab worker"] = states
        from optuna.storages.journal import JournalFileBackend

        from calibration.storage import TrialCommitFileBackend

        optuna_file_ms = storage_ms_per_trial(JournalFileBackend, tmpdir / "optuna-file.log")
        ours_file_ms = storage_ms_per_trial(TrialCommitFileBackend, tmpdir / "ours-file.log")
        long_cli: dict[int, float] = {}
        long_path = tmpdir / "spec-long.json"
        long_path.write_bytes(msgspec.json.encode(spec_dict(LONG_TRIALS)))
        for workers in (1, 2):
            long_cli[workers], _ = run_cli(long_path, tmpdir / f"long{workers}.log", workers,
                                           root)
    startup_s = import_time()
    load_after = os.getloadavg()[0]

    ratios = sorted((whole / sum(dt for dt, _ in t.trials), i)
                    for i, (whole, t, _) in enumerate(runs))
    mid_ratio, median = ratios[len(ratios) // 2]
    whole_s, timed, journal_mb = runs[median]
    evals = [dt for dt, _ in timed.trials]
    pruned = sum(p for _, p in timed.trials)
    eval_sum = sum(evals)
    other = sum(timed.other)
    rec = result.recommendation
    # The two-worker runs' trial mix differs (the helper samples with its own seed, and
    # pruned trials skip the liquidation simulation): scale each by its evaluation work,
    # priced at the one-worker run's mean evaluate() of complete and of pruned trials.
    mean_complete = statistics.mean(dt for dt, p in timed.trials if not p)
    mean_pruned = statistics.mean(dt for dt, p in timed.trials if p) if pruned else 0.0
    one_work = eval_sum
    one_whole = statistics.median(w for w, _, _ in runs)
    adjusted = statistics.median(
        two / ((c * mean_complete + p * mean_pruned) / one_work) / one_whole
        for two, (c, p) in zip(two_inproc, two_mixes, strict=True))
    rows = [
        ("bars per trial (5 coins, in-sample)", f"{bars:,}"),
        ("prepare (load 5 CSVs, split), s", f"{prepare_s:.2f}"),
        ("one trial's backtests (coverage + liquidation, not pruned), median, ms",
         f"{one_s * 1e3:.1f}"),
        (f"trial mix: complete / pruned of {len(evals)}", f"{len(evals) - pruned} / {pruned}"),
        ("mean evaluate() over the trial mix, ms", f"{eval_sum / len(evals) * 1e3:.1f}"),
        (f"whole calibration in-process (journal file), median of {REPEATS}, s",
         f"{whole_s:.2f}"),
        ("  of which trial evaluations, s", f"{eval_sum:.2f}"),
        ("  of which the recommendation's evidence (2 evaluations), s", f"{other:.2f}"),
        ("  sampler + storage + orchestration, ms per trial",
         f"{(whole_s - eval_sum - other) / len(evals) * 1e3:.1f}"),
        ("whole / (trials × one trial's backtests)", f"{whole_s / (N_TRIALS * one_s):.2f}"),
        ("whole / (sum of the trial mix's evaluate()), median", f"{mid_ratio:.2f}"),
        ("whole / (sum of the trial mix's evaluate()), best / worst",
         f"{ratios[0][0]:.2f} / {ratios[-1][0]:.2f}"),
        ("journal file size, MB", f"{journal_mb:.1f}"),
        ("journal file alone, ms per trial: Optuna's JournalFileBackend / marginlab's "
         "(flock, one fsync per finished trial)", f"{optuna_file_ms:.2f} / {ours_file_ms:.2f}"),
        (f"whole calibration, one worker, median of {REPEATS}, s", f"{one_whole:.2f}"),
        (f"whole calibration, two workers (calibrate(workers=2), helper "
         f"{'forked' if helpers_fork else 'a subprocess'}), median of {REPEATS}, s",
         f"{statistics.median(two_inproc):.2f}"),
        ("  **two / one**", f"**{statistics.median(two_inproc) / one_whole:.2f}**"),
        ("  two / one, each two-worker run scaled to the one-worker trial mix",
         f"{adjusted:.2f}"),
        (f"CLI calibrate --workers 1, best of {WORKER_REPEATS}, s", f"{min(cli[1]):.2f}"),
        (f"CLI calibrate --workers 2, best of {WORKER_REPEATS}, s", f"{min(cli[2]):.2f}"),
        ("  two / one", f"{min(cli[2]) / min(cli[1]):.2f}"),
        (f"1 x marginlab worker (study created beforehand), best of {WORKER_REPEATS}, s",
         f"{min(procs[1]):.2f}"),
        (f"2 x marginlab worker started together, best of {WORKER_REPEATS}, s",
         f"{min(procs[2]):.2f}"),
        ("  two / one", f"{min(procs[2]) / min(procs[1]):.2f}"),
        ("  first trial start to last trial end, 1 / 2 workers, best, s",
         f"{min(worker_spans[1]):.2f} / {min(worker_spans[2]):.2f}"),
        ("  two / one, trials only (no start-up)",
         f"{min(worker_spans[2]) / min(worker_spans[1]):.2f}"),
        ("CLI runs, first trial start to last trial end, 1 / 2 workers, best, s",
         f"{min(spans[1]):.2f} / {min(spans[2]):.2f}"),
        (f"CLI calibrate --workers 1 / 2 at {LONG_TRIALS} trials, s",
         f"{long_cli[1]:.2f} / {long_cli[2]:.2f}"),
        ("  two / one", f"{long_cli[2] / long_cli[1]:.2f}"),
        ("fresh interpreter + import calibration.calibrate, s", f"{startup_s:.2f}"),
        ("load average (1 min) before / after", f"{load_before:.2f} / {load_after:.2f}"),
        ("sampler", result.sampler),
        ("recommendation (last in-process run)",
         "none" if rec is None else
         f"trial {rec.trial}, feasible={rec.feasible}, IM "
         f"{100 * rec.objectives['capital_cost']:.2f}%, "
         f"{rec.objectives['insolvency_bps']:.3f} bps; front {len(result.pareto_front)}"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print()
    for what, mix in mixes.items():
        print(f"trial states, {what}: {mix}")
    ok_whole = whole_s <= 1.3 * N_TRIALS * one_s
    ok_mix = mid_ratio <= 1.3
    ok_two = statistics.median(two_inproc) <= 0.6 * one_whole and adjusted <= 0.6
    ok_cli = min(cli[2]) <= 0.6 * min(cli[1])
    ok_procs = min(procs[2]) <= 0.6 * min(procs[1])

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"\ntargets: whole <= 1.3 x trials x one trial: {met(ok_whole)}; "
          f"whole <= 1.3 x the trial mix's evaluations: {met(ok_mix)}; "
          f"2 workers <= 0.6 x 1 (whole calibration): {met(ok_two)}; "
          f"end to end with start-up: CLI {met(ok_cli)}, worker processes {met(ok_procs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
