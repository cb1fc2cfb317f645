"""Benchmark: issue 15's calibration — 1,000 ``ewma`` trials with the liquidation simulation on
five instruments × five years of one-minute bars, with one and with two workers, in one run.

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    python -m bench.bench_calibrate_minutes                       # the issue's size
    python -m bench.bench_calibrate_minutes --trials 60 --years 0.5   # a quick run
    python -m bench.bench_calibrate_minutes --batch-size 24       # reproducible batches
    python -m bench.bench_calibrate_minutes --years 1 --coverage-batch 12  # batch kernel?
    python -m bench.bench_calibrate_minutes --years 1 --trial-batch 12    # trials claimed together
    python -m bench.bench_calibrate_minutes --liquidation-split   # the replay's kernels

Data: five years of one-minute bars do not exist in the shared data. The four real
one-minute files of ``bench._data.CALIBRATION_FILES`` (Binance spot BTC and ETH 2021-04/05,
BTC 2024-07/08, a BTC perpetual 2021-12/2022-02: ~174k bars) are joined into one pool and
each instrument walks it from its own offset (``bench._data.tiled_instruments``), about 15 laps
for five years, every lap rescaled to continue from the previous close. Every bar's return,
wick and volume is a real one.

The spec: ``ewma`` over the default search space (decay, confidence, floor, APC buffer), the
default one-hour horizon (60 bars), liquidation simulation with the calibration's defaults (the
120-point grid, a cohort a day held a week), the default stress windows and walk-forward
split (trials see the first 70%), ``risk_appetite_bps`` 5, seed 1, the ``auto`` sampler
(NSGA-II above 150 trials; with ``--batch-size`` each batch is one NSGA-II generation),
on a journal file in a temporary directory. The data is prepared once and each run starts
warm (kernels loaded, the parameter-free features of the in-sample bars cached) —
``calibrate(prepared=...)``; with two workers the helper is forked after that, as
``marginlab calibrate --workers 2`` forks its.

Printed: wall and CPU time per worker count and their ratio; per trial (one-worker run; for
two workers this process's trials) the exclusive time in the margin series, the coverage
statistics, the liquidation simulation, the capital cost, the rest of ``evaluate`` and the
sampler + storage + orchestration; minor page faults; peak RSS of this process and of the
helper; with ``--batch-size``, the time workers sat idle at batch ends. Like ``marginlab
calibrate``, it keeps freed memory for reuse (``calibration._allocator``); ``--malloc-defaults``
leaves glibc's malloc alone.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import optuna
from optuna.trial import TrialState

import calibration.calibrate as cal
import calibration.calibrate._evaluate as evaluation
import calibration.calibrate._objectives as objectives
import calibration.margins as margins_mod
from bench._data import CALIBRATION_FILES, tiled_instruments
from calibration._allocator import retain_freed_memory
from calibration.calibrate._evaluate import trial_metrics
from calibration.liquidation._results import LiquidationResult
from calibration.spec import decode_spec
from calibration.storage import Coordination

BARS_PER_YEAR = 525_600


class Profile:
    """Exclusive wall time per labelled function (nested labelled calls are subtracted)."""

    def __init__(self) -> None:
        self.total: collections.Counter[str] = collections.Counter()
        self._stack: list[list[float]] = []
        self.muted = False
        self.full = 0.0

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.muted:
                return fn(*args, **kwargs)
            if kwargs.get("full"):  # the recommendation's evidence, not a trial
                self.muted = True
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.muted = False
                    self.full += time.perf_counter() - t0
            frame = [0.0]  # time spent in nested labelled calls
            self._stack.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._stack.pop()
                self.total[label] += dt - frame[0]
                if self._stack:
                    self._stack[-1][0] += dt
        return timed

    def reset(self) -> None:
        self.total.clear()
        self.full = 0.0


@contextmanager
def profiled(profile: Profile) -> Iterator[None]:
    """Wrap the functions of one trial's evaluation where ``evaluate`` looks them up."""
    patches: list[tuple[Any, str, Any]] = [
        (evaluation, "evaluate", "evaluate (rest)"),
        (evaluation, "coverage_backtest", "coverage statistics"),
        # a claimed chunk's coverage in one pass (batch_size): counted with the statistics
        (evaluation, "coverage_of_models", "coverage statistics"),
        (evaluation, "simulate_liquidations", "liquidation simulation"),
        (evaluation, "shared_insurance_fund", "liquidation simulation"),
        (LiquidationResult, "metrics", "liquidation simulation"),
        (objectives, "margin_capital_cost", "capital cost"),
        (margins_mod.MarginSeries, "rates", "margin series"),
    ]
    saved = []
    for owner, name, label in patches:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, profile.wrap(label, original))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def spec_dict(n_instruments: int, n_trials: int, batch_size: int | None) -> dict[str, Any]:
    return {
        "data": [{"instrument": f"TILED{i + 1}", "ref": f"tiled-1m/TILED{i + 1}"}
                 for i in range(n_instruments)],
        "model": "ewma",
        "risk_appetite_bps": 5.0,
        "n_trials": n_trials,
        "seed": 1,
        **({"batch_size": batch_size} if batch_size else {}),
    }


def idle_at_batch_ends(storage: str, study_name: str, batch: int
                       ) -> tuple[float, float, float]:
    """Seconds workers sat idle waiting for a batch's last trial (summed over workers and
    batches), seconds from each batch's last trial end to the next batch's first start (the
    proposal under the lock: every worker waits), and the span from first trial start to
    last trial end."""
    with Coordination(storage) as coordination:
        study = optuna.load_study(study_name=study_name, storage=coordination.storage)
        trials = [t for t in study.get_trials(deepcopy=False)
                  if t.datetime_start is not None and t.datetime_complete is not None]
    trials.sort(key=lambda t: t.number)
    first = min(t.datetime_start for t in trials)  # type: ignore[type-var]
    last = max(t.datetime_complete for t in trials)  # type: ignore[type-var]
    idle = gaps = 0.0
    for b in range(0, len(trials), batch):
        group = trials[b:b + batch]
        end = max(t.datetime_complete for t in group)  # type: ignore[type-var]
        following = trials[b + batch:b + 2 * batch]
        if following:
            start = min(t.datetime_start for t in following)  # type: ignore[type-var]
            gaps += max(0.0, (start - end).total_seconds())
        per_worker: dict[str, Any] = {}
        for t in group:
            metrics = trial_metrics(t) or {}
            w = str(metrics.get("worker"))
            done = t.datetime_complete
            if w not in per_worker or done > per_worker[w]:  # type: ignore[operator]
                per_worker[w] = done
        idle += sum((end - done).total_seconds() for done in per_worker.values())
    return idle, gaps, (last - first).total_seconds()  # type: ignore[operator]


def coverage_batch_comparison(prepared: cal.Prepared, k_sets: int) -> None:
    """Would ``evaluate_coverage_batch`` pay inside a trial? ``k_sets`` random sets' coverage on
    every in-sample series with the stress windows: one at a time as ``evaluate`` runs it
    (``MarginSeries`` + ``coverage_backtest``) against the batch kernel; checked identical,
    then CPU time of each, twice, interleaved."""
    from calibration.batch import evaluate_coverage_batch
    from calibration.coverage import coverage_backtest
    from calibration.margins import MarginSeries
    from calibration.models import make_model

    rng = np.random.default_rng(0)
    sets = [{"decay": float(rng.uniform(0.9, 0.999)),
             "confidence": float(rng.uniform(0.99, 0.999)),
             "floor_rate": float(np.exp(rng.uniform(np.log(0.002), np.log(0.05)))),
             "apc_buffer": float(rng.uniform(0.25, 1.0)),
             "horizon_bars": prepared.horizon.bars} for _ in range(k_sets)]
    config, windows = prepared.coverage, prepared.stress_windows

    def one_at_a_time() -> list[Any]:
        out = []
        for p in sets:
            model = make_model("ewma", p)
            out.append([coverage_backtest(b, model, config, windows,
                                          margins=MarginSeries(model, b))
                        for b in prepared.in_sample])
        return out

    def batched() -> list[Any]:
        per = [evaluate_coverage_batch(b, "ewma", sets, config=config, stress_windows=windows)
               for b in prepared.in_sample]
        return [[per[i][k] for i in range(len(per))] for k in range(k_sets)]

    same = msgspec.json.encode(one_at_a_time()) == msgspec.json.encode(batched())
    n = sum(len(b) for b in prepared.in_sample)
    print(f"\ncoverage of {k_sets} sets on {n:,} in-sample bars with {len(windows)} stress "
          f"windows; batch results identical to one at a time: {same}")
    for name, fn in (("one at a time", one_at_a_time), ("batch kernel", batched)) * 2:
        c0 = time.process_time()
        fn()
        dt = time.process_time() - c0
        print(f"  {name}: {dt:.3f} s CPU, {dt / n / k_sets * 1e9:.2f} ns/bar/set")


def trial_batch_comparison(prepared: cal.Prepared, k_sets: int) -> None:
    """What a worker claiming ``k_sets`` trials of a batch pays: ``evaluate`` of each set alone
    against ``batch_coverage`` of the sets then ``evaluate(coverage=...)`` of each (pruning,
    liquidation, capital cost as in a trial); summaries checked identical, then CPU time of
    each, twice, interleaved."""
    rng = np.random.default_rng(0)
    sets = [{"decay": float(rng.uniform(0.9, 0.999)),
             "confidence": float(rng.uniform(0.99, 0.999)),
             "floor_rate": float(np.exp(rng.uniform(np.log(0.002), np.log(0.05)))),
             "apc_buffer": float(rng.uniform(0.25, 1.0))} for _ in range(k_sets)]

    def one_at_a_time() -> list[str]:
        return [evaluation.evaluate(prepared, p).summary_json() for p in sets]

    def claimed_together() -> list[str]:
        coverages = evaluation.batch_coverage(prepared, sets)
        return [evaluation.evaluate(prepared, p, coverage=c).summary_json()
                for p, c in zip(sets, coverages, strict=True)]

    alone = one_at_a_time()
    same = alone == claimed_together()
    pruned = sum('"pruned":null' not in s for s in alone)
    n = sum(len(b) for b in prepared.in_sample)
    print(f"\n{k_sets} trials' evaluations ({pruned} pruned) on {n:,} in-sample bars; "
          f"claimed together identical to one at a time: {same}")
    for name, fn in (("one at a time", one_at_a_time),
                     ("claimed together", claimed_together)) * 2:
        c0 = time.process_time()
        fn()
        dt = time.process_time() - c0
        print(f"  {name}: {dt:.3f} s CPU, {dt / k_sets * 1e3:.1f} ms per trial")


def liquidation_split(prepared: cal.Prepared, repeats: int = 10) -> None:
    """Where the liquidation replay of one complete trial goes: its kernels' wall time on the
    first in-sample series (one EWMA set, margins computed beforehand), mean of ``repeats``."""
    import calibration.liquidation._engine as engine
    from calibration.liquidation import _kernels as lk
    from calibration.liquidation import simulate_liquidations
    from calibration.margins import MarginSeries
    from calibration.models import make_model

    bars = prepared.in_sample[0]
    model = make_model("ewma", {"decay": 0.97, "confidence": 0.995, "floor_rate": 0.01,
                                "apc_buffer": 0.5, "horizon_bars": prepared.horizon.bars})
    margins = MarginSeries(model, bars)
    margins.rates()
    simulate_liquidations(bars, model, prepared.liquidation, margins=margins)
    spent: collections.Counter[str] = collections.Counter()
    names = ("x_block_bounds", "block_minima", "first_passage", "outcomes", "fund_levels",
             "fund_from_slots")

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[name] += time.perf_counter() - t0
        return call

    for name in names:
        setattr(engine._lk, name, timed(name, getattr(lk, name)))
    try:
        t0 = time.perf_counter()
        for _ in range(repeats):
            result = simulate_liquidations(bars, model, prepared.liquidation, margins=margins)
        total = (time.perf_counter() - t0) / repeats
    finally:
        for name in names:
            setattr(engine._lk, name, getattr(lk, name))
    print(f"\nliquidation replay of {bars.instrument} ({len(bars):,} in-sample bars, "
          f"{result.positions_opened:,} positions, {result.liquidations:,} liquidated): "
          f"{total * 1e3:.1f} ms, {total / len(bars) * 1e9:.1f} ns/bar")
    for name in names:
        share = spent[name] / repeats
        print(f"  {name}: {share * 1e3:.2f} ms ({share / total:.0%})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--years", type=float, default=5.0)
    parser.add_argument("--instruments", type=int, default=5)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--coverage-batch", type=int, default=None, metavar="K",
                        help="only compare K sets' coverage one at a time and batched")
    parser.add_argument("--trial-batch", type=int, default=None, metavar="K",
                        help="only compare K trials' evaluations alone and claimed together")
    parser.add_argument("--liquidation-split", action="store_true",
                        help="only time the liquidation replay's kernels on one series")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="leave glibc's malloc at its defaults (marginlab calibrate "
                             "keeps freed memory unless MARGINLAB_RETAIN_FREED_MEMORY=0)")
    args = parser.parse_args(argv)
    # As ``marginlab calibrate`` does before it prepares the data (forked helpers inherit it).
    retained = False if args.malloc_defaults else retain_freed_memory()
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data")).resolve()
    if not root.is_dir():
        print(f"no data at {root}; set MARGINLAB_SHARED_DATA", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    counts = [int(w) for w in args.workers.split(",")]
    load_before = os.getloadavg()
    n_bars = round(args.years * BARS_PER_YEAR)
    t0 = time.perf_counter()
    bars = tiled_instruments(root, n_bars, args.instruments)
    spec = decode_spec(msgspec.json.encode(spec_dict(args.instruments, args.trials,
                                                     args.batch_size)))
    prepared = cal.prepare_bars(spec, bars, root=root)
    del bars
    prepare_s = time.perf_counter() - t0
    if args.coverage_batch:
        coverage_batch_comparison(prepared, args.coverage_batch)
        return 0
    if args.liquidation_split:
        liquidation_split(prepared)
        return 0
    if args.trial_batch:
        trial_batch_comparison(prepared, args.trial_batch)
        return 0
    in_sample = sum(len(b) for b in prepared.in_sample)
    t0 = time.perf_counter()
    warm = cal.evaluate(prepared, {"decay": 0.97, "confidence": 0.995, "floor_rate": 0.01,
                                   "apc_buffer": 0.5})
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Not pruned: the liquidation and capital-cost kernels are loaded too.
    cal.evaluate(prepared, {"decay": 0.98, "confidence": 0.995, "floor_rate": 0.01,
                            "apc_buffer": 0.5}, prune_hopeless=False)
    second_s = time.perf_counter() - t0

    runs: dict[int, dict[str, Any]] = {}
    profile = Profile()
    with tempfile.TemporaryDirectory(prefix="bench-calmin-") as tmp:
        for workers in counts:
            storage = f"journal:{Path(tmp) / f'w{workers}.log'}"
            profile.reset()
            self_0 = resource.getrusage(resource.RUSAGE_SELF)
            kids_0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall_0 = time.perf_counter()
            with profiled(profile):
                result = cal.calibrate(spec, root=root, storage=storage, prepared=prepared,
                                       workers=workers)
            wall = time.perf_counter() - wall_0
            self_1 = resource.getrusage(resource.RUSAGE_SELF)
            kids_1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((self_0, self_1),
                                                                 (kids_0, kids_1))
                      for f in ("ru_utime", "ru_stime"))
            with Coordination(storage) as coordination:
                study = optuna.load_study(study_name=result.study, storage=coordination.storage)
                mine = [t for t in study.get_trials(deepcopy=False)
                        if (trial_metrics(t) or {}).get("worker", "").endswith(f":{os.getpid()}")]
                states = collections.Counter(t.state.name.lower()
                                             for t in study.get_trials(deepcopy=False))
            faults = ((self_1.ru_minflt - self_0.ru_minflt)
                      + (kids_1.ru_minflt - kids_0.ru_minflt))
            run: dict[str, Any] = {"wall": wall, "cpu": cpu, "profile": dict(profile.total),
                                   "faults": faults,
                                   "full": profile.full,
                                   "mine": len(mine), "states": dict(states),
                                   "pruned_mine": sum(t.state == TrialState.PRUNED
                                                      for t in mine),
                                   "rec": result.recommendation, "sampler": result.sampler}
            if args.batch_size:
                run["idle"], run["gaps"], run["span"] = idle_at_batch_ends(
                    storage, result.study, args.batch_size)
            runs[workers] = run
    load_after = os.getloadavg()
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    print(f"data: {args.instruments} instruments x {n_bars:,} one-minute bars "
          f"({args.years:g} years) tiled from {', '.join(CALIBRATION_FILES)} under {root}")
    print(f"trials see {in_sample:,} in-sample bars ({in_sample // args.instruments:,} per "
          f"instrument); spec: ewma, horizon {prepared.horizon.bars} bars, liquidation grid "
          f"{len(prepared.liquidation.leverages)} x {len(prepared.liquidation.notionals_usd)} "
          f"x 2, a cohort every {prepared.liquidation.entry_every_bars} bars held "
          f"{prepared.liquidation.holding_bars}; batch_size {args.batch_size}")
    print(f"CPUs: {os.cpu_count()}; load average before {load_before[0]:.2f} "
          f"{load_before[1]:.2f} {load_before[2]:.2f}, after {load_after[0]:.2f} "
          f"{load_after[1]:.2f} {load_after[2]:.2f}")
    print("malloc: " + ("freed memory kept for reuse (calibration._allocator, as marginlab "
                        "calibrate)" if retained else "glibc's defaults"))
    print("\n| measure | value |\n|---|---|")
    print(f"| tile + prepare, s | {prepare_s:.2f} |")
    print(f"| first evaluate() (features cached, kernels loaded), s | {warm_s:.3f} "
          f"(pruned: {warm.pruned is not None}) |")
    print(f"| second evaluate() (not pruned), s | {second_s:.3f} |")
    for workers, run in runs.items():
        print(f"| {args.trials} trials, {workers} worker(s): wall s / CPU s | "
              f"{run['wall']:.1f} / {run['cpu']:.1f} |")
        print(f"|   trial states | {run['states']} |")
        print(f"|   minor page faults (this process and its helpers) | {run['faults']:,} |")
        mine = max(run["mine"], 1)
        parts = dict(run["profile"])
        evaluate_total = sum(parts.values())
        # Everything a trial costs outside evaluate(): ask, tell, storage, waiting; and the
        # summary's reads (its two full evaluations are shown apart).
        parts["sampler + storage + orchestration"] = (run["wall"] - evaluate_total
                                                      - run["full"])
        per = ", ".join(f"{k} {v / mine * 1e3:.1f}" for k, v in sorted(
            parts.items(), key=lambda kv: -kv[1]))
        print(f"|   per trial of this process ({run['mine']} trials, {run['pruned_mine']} "
              f"pruned), ms | {per} |")
        print(f"|   the recommendation's evidence (full-span evaluations), s | "
              f"{run['full']:.2f} |")
        if "idle" in run:
            print(f"|   batch barrier: workers idle before a batch's last trial ends "
                  f"(summed), s / between batches (proposal), s / trial span, s | "
                  f"{run['idle']:.1f} / {run['gaps']:.1f} / {run['span']:.1f} |")
        rec = run["rec"]
        print("|   recommendation | " + ("none" if rec is None else
              f"trial {rec.trial}, IM {100 * rec.objectives['capital_cost']:.2f}%, "
              f"{rec.objectives['insolvency_bps']:.3f} bps") + f" ({run['sampler']}) |")
    if 1 in runs and 2 in runs:
        ratio = runs[2]["wall"] / runs[1]["wall"]
        print(f"| **two / one workers, wall** | **{ratio:.2f}** |")
    print(f"| peak RSS, this process / the helper (largest child), MB | {rss_self:.0f} / "
          f"{rss_kids:.0f} |")
    if 2 in runs:
        ok_60 = runs[2]["wall"] < 60
        print(f"\ntargets: {args.trials} trials on 2 workers < 60 s: "
              f"{'met' if ok_60 else 'NOT met'} ({runs[2]['wall']:.1f} s)"
              + (f"; two / one <= 0.55: {'met' if ratio <= 0.55 else 'NOT met'} ({ratio:.2f})"
                 if 1 in runs else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
