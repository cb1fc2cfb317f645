"""Benchmark: one series' liquidation replay (``simulate_liquidations``, as a calibration trial
runs it) of this checkout against the ``calibration/liquidation`` package of another commit,
interleaved in one process.

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    python -m bench.bench_liquidation_replay 10ccc85 [repeats [old|new]]

The old package is written from ``git show <commit>:calibration/liquidation/*.py`` to a
directory under the temporary directory, renamed ``liquidation_<commit>`` (its imports of
``calibration.liquidation`` rewritten), and imported beside this checkout's. The series is
``bench_calibrate_minutes --liquidation-split``'s: the first in-sample series of the issue's
calibration (1.84M one-minute bars, the calibration's liquidation defaults), an EWMA set
(decay 0.97, confidence 0.995, floor 0.01, APC buffer 0.5) with its margins computed
beforehand. Every output (aggregates, fund path, the position table, the metrics) is checked
equal to the bit for three EWMA sets first; then the best and the median of ``repeats``
replays of each, old and new alternating (which goes first swapped every round).

Which package's kernels are loaded first in the process matters: the same code measured
17–90% faster when its package was loaded first (two copies of one commit, 6.6 against 8.6 ms
and 7.1 against 9.1 with the order swapped; it follows the order the kernels were loaded in,
not which replay filled the series' caches; where the machine code lands is the likely
cause, not established). So without ``old|new`` the comparison runs in two processes, once
with each first, and their ratios' geometric mean is printed.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

import calibration.calibrate as cal
from bench._data import tiled_instruments
from bench.bench_calibrate_minutes import BARS_PER_YEAR, spec_dict
from calibration.liquidation import simulate_liquidations
from calibration.margins import MarginSeries
from calibration.models import make_model
from calibration.spec import decode_spec

SETS = (
    {"decay": 0.97, "confidence": 0.995, "floor_rate": 0.01, "apc_buffer": 0.5},
    {"decay": 0.99, "confidence": 0.995, "floor_rate": 0.03, "apc_buffer": 0.5},
    {"decay": 0.97, "confidence": 0.99, "floor_rate": 0.003, "apc_buffer": 0.25},
)


def old_package(commit: str) -> Any:
    """``calibration.liquidation`` at ``commit``, importable as ``liquidation_<commit>``."""
    name = f"liquidation_{commit}"
    root = Path(tempfile.gettempdir()) / "bench_liquidation_replay"
    package = root / name
    package.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{commit}:calibration/liquidation/"],
        check=True, capture_output=True, text=True).stdout.split()
    for file in files:
        if not file.endswith(".py"):
            continue
        text = subprocess.run(["git", "show", f"{commit}:calibration/liquidation/{file}"],
                              check=True, capture_output=True, text=True).stdout
        target = package / file
        text = text.replace("calibration.liquidation", name)
        if not target.exists() or target.read_text() != text:  # keeps numba's cache valid
            target.write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


def _same(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return bool(a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes())


def differences(old: Any, new: Any) -> list[str]:
    """Outputs of two ``LiquidationResult`` that differ in any bit."""
    bad = [f for f in ("positions_opened", "liquidations") if getattr(old, f) != getattr(new, f)]
    bad += [f for f in ("entry_bars", "entry_positions", "entry_notional_usd", "fund_bars",
                        "fund_usd", "fund_delta_usd")
            if not _same(getattr(old, f), getattr(new, f))]
    bad += [f"agg.{f.name}" for f in dataclasses.fields(old._agg)
            if not _same(getattr(old._agg, f.name), getattr(new._agg, f.name))]
    table_old, table_new = old.position_table(), new.position_table()
    bad += [f"table.{f.name}" for f in dataclasses.fields(table_old)
            if not _same(getattr(table_old, f.name), getattr(table_new, f.name))]
    if repr(old.metrics("all", None, None)) != repr(new.metrics("all", None, None)):
        bad.append("metrics")
    return bad


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    if len(sys.argv) < 4:  # both orders, each in its own process
        ratios = []
        for first in ("old", "new"):
            out = subprocess.run([sys.executable, "-m", "bench.bench_liquidation_replay",
                                  sys.argv[1], str(repeats), first],
                                 check=True, capture_output=True, text=True).stdout
            print(out, end="")
            ratios.append([float(v) for v in out.split("new / old: best ")[1]
                           .replace(", median", "").split()])
        best, median = (float(np.sqrt(a * b)) for a, b in zip(*ratios, strict=True))
        print(f"\nnew / old, geometric mean of the two orders: best {best:.2f}, "
              f"median {median:.2f}")
        return 0
    first = sys.argv[3]
    old = old_package(sys.argv[1])
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data")).resolve()
    series = tiled_instruments(root, round(5 * BARS_PER_YEAR), 1)
    spec = decode_spec(msgspec.json.encode(spec_dict(1, 1000, None)))
    prepared = cal.prepare_bars(spec, series, root=root)
    bars, config = prepared.in_sample[0], prepared.liquidation

    def replay(params: dict[str, float]) -> tuple[Any, MarginSeries]:
        model = make_model("ewma", {**params, "horizon_bars": prepared.horizon.bars})
        margins = MarginSeries(model, bars)
        margins.rates()
        return model, margins

    print(f"\n{first} replayed first")
    for params in SETS:
        model, margins = replay(params)
        if first == "old":
            before = old.simulate_liquidations(bars, model, config, margins=margins)
            after = simulate_liquidations(bars, model, config, margins=margins)
        else:
            after = simulate_liquidations(bars, model, config, margins=margins)
            before = old.simulate_liquidations(bars, model, config, margins=margins)
        bad = differences(before, after)
        print(f"{params}: {after.positions_opened:,} positions, {after.liquidations:,} "
              f"liquidated; identical: {not bad}{'' if not bad else ' ' + ', '.join(bad)}")
        if bad:
            return 1
    model, margins = replay(SETS[0])
    runs: dict[str, Callable[..., Any]] = {"old": old.simulate_liquidations,
                                           "new": simulate_liquidations}
    spent: dict[str, list[float]] = {name: [] for name in runs}
    # Each round swaps which goes first: what one replay leaves behind (freed arrays, the
    # caches' contents) was seen to move the next one's time by ~1 ms either way.
    for round_ in range(repeats):
        for name, fn in sorted(runs.items(), reverse=bool(round_ % 2)):
            t0 = time.perf_counter()
            fn(bars, model, config, margins=margins)
            spent[name].append(time.perf_counter() - t0)
    print(f"replay of {bars.instrument} ({len(bars):,} bars), {repeats} rounds alternating; "
          f"load average {os.getloadavg()[0]:.2f}")
    for name, times in spent.items():
        print(f"  {name} ({sys.argv[1] if name == 'old' else 'this checkout'}): best "
              f"{min(times) * 1e3:.2f} ms, median {float(np.median(times)) * 1e3:.2f} ms")
    print(f"  new / old: best {min(spent['new']) / min(spent['old']):.2f}, median "
          f"{float(np.median(spent['new'])) / float(np.median(spent['old'])):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
