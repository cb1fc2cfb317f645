"""Benchmark: one calibration spread over "machines" — separate ``marginlab worker`` processes,
each with its own copy of the data under its own data root, on one PostgreSQL study (issue 15,
item 5: what a user does to spread a calibration over machines, measured).

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA, and the local
PostgreSQL; ``MARGINLAB_BENCH_POSTGRES`` is its libpq DSN, default
``host=127.0.0.1 port=5432 user=postgres``)::

    python -m bench.bench_scale_out                          # the issue's calibration
    python -m bench.bench_scale_out --years 0.5 --trials 200  # a quick run

The data and the spec are ``bench_calibrate_minutes``'s (five instruments × five years of
real one-minute bars tiled, ``ewma`` with the liquidation simulation, 1,000 trials), with
reproducible batches (``--batch-size``, default 24) so that every machine count must give the
same calibration. The tiled series are written as Parquet files to one data root per machine
(copies). For each machine count: a fresh PostgreSQL database; the study created here (as the
first ``marginlab calibrate`` would); then that many ``marginlab worker --study NAME --storage
URL`` processes started together, each under its own ``MARGINLAB_DATA_ROOT`` (its fingerprints
are checked against the study's). The time measured is from their start to the last one's
exit: each loads and prepares its own data, then they share the trials. Printed: wall seconds,
when the first trial started and the last one ended (seconds after the launch: the start-up
is each worker's import, data load and preparation), the trials each worker ran, the
recommendation (from ``summarize``, outside the timed span) and the ratio of two machines to
one. On one 2-core machine the "machines" share its cores
and memory bandwidth, so this measures the storage and coordination cost of spreading out,
not a second machine's hardware.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import optuna
import pandas as pd

import calibration.calibrate as cal
from bench._data import tiled_instruments
from bench.bench_calibrate_minutes import BARS_PER_YEAR, spec_dict
from calibration.calibrate._evaluate import trial_metrics
from calibration.calibrate._study import create_or_load_study
from calibration.spec import decode_spec
from calibration.storage import Coordination

POSTGRES_DSN = os.environ.get("MARGINLAB_BENCH_POSTGRES",
                              "host=127.0.0.1 port=5432 user=postgres")


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A database of its own on the PostgreSQL server, dropped after; yields its URL."""
    import psycopg

    name = f"marginlab_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    params = dict(item.split("=", 1) for item in POSTGRES_DSN.split())
    with psycopg.connect(POSTGRES_DSN + " dbname=postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            user, host = params.get("user", "postgres"), params.get("host", "127.0.0.1")
            yield f"postgresql://{user}@{host}:{params.get('port', '5432')}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_roots(tmp: Path, series: list[Any], machines: int) -> list[Path]:
    """One data root per machine, each with every instrument as ``TILEDi.parquet``."""
    first = tmp / "machine-1"
    first.mkdir()
    for bars in series:
        pd.DataFrame({"timestamp_ms": bars.timestamp_ms, "open": bars.open, "high": bars.high,
                      "low": bars.low, "close": bars.close, "volume": bars.volume}
                     ).to_parquet(first / f"{bars.instrument}.parquet", index=False)
    roots = [first]
    for m in range(2, machines + 1):
        root = tmp / f"machine-{m}"
        shutil.copytree(first, root)
        roots.append(root)
    return roots


def run_machines(spec_json: bytes, roots: list[Path], machines: int) -> dict[str, Any]:
    """The study created on a fresh database, then ``machines`` workers started together;
    their wall time, trials per worker and the result's recommendation."""
    spec = decode_spec(spec_json)
    prepared = cal.prepare(spec, roots[0])
    with fresh_database() as url:
        with Coordination(url) as coordination:
            name = create_or_load_study(spec, prepared, coordination, None).study_name
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        launched = datetime.datetime.now()  # Optuna's trial times are naive local times
        t0 = time.perf_counter()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "calibration.cli", "worker", "--study", name,
             "--storage", url, "--quiet"],
            env={**env, "MARGINLAB_DATA_ROOT": str(root)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for root in roots[:machines]]
        errors = [p.communicate()[1] for p in procs]
        wall = time.perf_counter() - t0
        codes = [p.returncode for p in procs]
        if any(codes):
            raise SystemExit(f"a worker failed ({codes}): {errors}")
        with Coordination(url) as coordination:
            study = optuna.load_study(study_name=name, storage=coordination.storage)
            trials = study.get_trials(deepcopy=False)
            per_worker = collections.Counter(
                (trial_metrics(t) or {}).get("worker", "?") for t in trials
                if t.state.is_finished())
            states = collections.Counter(t.state.name.lower() for t in trials)
            starts = [t.datetime_start for t in trials if t.datetime_start is not None]
            ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
            result = cal.summarize(study, prepared, url)
    return {"wall": wall, "per_worker": sorted(per_worker.values(), reverse=True),
            "states": dict(states), "rec": result.recommendation,
            "first_start": (min(starts) - launched).total_seconds(),
            "last_end": (max(ends) - launched).total_seconds()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--years", type=float, default=5.0)
    parser.add_argument("--instruments", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--machines", default="1,2", help="machine counts, comma-separated")
    args = parser.parse_args(argv)
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data")).resolve()
    if not root.is_dir():
        print(f"no data at {root}; set MARGINLAB_SHARED_DATA", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    counts = [int(m) for m in args.machines.split(",")]
    n_bars = round(args.years * BARS_PER_YEAR)
    series = tiled_instruments(root, n_bars, args.instruments)
    spec = spec_dict(args.instruments, args.trials, args.batch_size)
    spec["data"] = [{"instrument": b.instrument, "ref": f"{b.instrument}.parquet"}
                    for b in series]
    spec_json = msgspec.json.encode(spec)
    load_before = os.getloadavg()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        roots = write_roots(Path(tmp), series, max(counts))
        del series
        for machines in counts:
            runs[machines] = run_machines(spec_json, roots, machines)
    print(f"data: {args.instruments} instruments x {n_bars:,} one-minute bars, one Parquet copy "
          f"per machine; {args.trials} trials, batch_size {args.batch_size}; PostgreSQL study "
          f"storage; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print("\n| machines | wall s (start to last exit) | first trial started, s | last trial "
          "ended, s | trials per worker | states | recommendation |\n"
          "|---|---|---|---|---|---|---|")
    for machines, run in runs.items():
        rec = run["rec"]
        shown = ("none" if rec is None else
                 f"trial {rec.trial}, IM {100 * rec.objectives['capital_cost']:.2f}%, "
                 f"{rec.objectives['insolvency_bps']:.3f} bps")
        print(f"| {machines} | {run['wall']:.1f} | {run['first_start']:.1f} | "
              f"{run['last_end']:.1f} | {run['per_worker']} | {run['states']} | {shown} |")
    if 1 in runs and 2 in runs:
        print(f"\ntwo machines / one, wall: {runs[2]['wall'] / runs[1]['wall']:.2f}")
        same = runs[1]["rec"] == runs[2]["rec"]
        print(f"the same recommendation on one and two machines: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
