"""Benchmark: ``_kernels.max_increase_ratio`` (the procyclicality statistic) of this checkout
against another version of ``calibration/_kernels.py``, interleaved in one process.

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    git show 8dc041a:calibration/_kernels.py > /tmp/old_kernels.py
    python -m bench.bench_max_increase /tmp/old_kernels.py [repeats]

The series are ``bench._data.tiled_instruments`` (five instruments x five years of one-minute
bars), each instrument's EWMA MM rate (decay 0.97, confidence 0.995, floor 0.005, APC buffer
0.5, 60-bar horizon) and long forward loss, as ``coverage_backtest`` passes them: observations
from the first valid bar, every bar, a 30-day trail (43,201 bars), blocks of 4,096 bars.
Measured over the whole span and over the calibration's in-sample 70% (1.84M bars): the best
of ``repeats`` rounds of the five instruments, the old and the new kernel alternating within
each round; the results must be equal to the bit.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._data import tiled_instruments
from calibration import _kernels
from calibration.models import EwmaMargin

TRAIL = 43_201
BLOCK = 4096
HORIZON = 60


def load_kernels(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("old_kernels", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: numba's cache of its kernels names the module to reload.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    old = load_kernels(Path(sys.argv[1]))
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data"))
    model = EwmaMargin(decay=0.97, confidence=0.995, floor_rate=0.005,
                       apc_buffer=0.5).with_horizon(HORIZON)
    series = []
    for bars in tiled_instruments(root, 5 * 525_600, 5):
        rates = model.margin_rates(bars)
        series.append((rates.mm_rate, bars.forward_losses(HORIZON)[0], rates.first_valid_bar))
    n = len(series[0][0])
    for name, stop in (("whole span", n - HORIZON), ("in-sample 70%", int(0.7 * n))):
        args = [(m, loss, start, stop, 1, TRAIL, BLOCK) for m, loss, start in series]
        for a in args:
            want = old.max_increase_ratio(*a)
            got = _kernels.max_increase_ratio(*a)
            assert np.float64(got).tobytes() == np.float64(want).tobytes(), (got, want)
        best = {"old": float("inf"), "new": float("inf")}
        for _ in range(repeats):
            for key, fn in (("old", old.max_increase_ratio), ("new", _kernels.max_increase_ratio)):
                t0 = time.perf_counter()
                for a in args:
                    fn(*a)
                best[key] = min(best[key], time.perf_counter() - t0)
        bars_total = 5 * (stop - series[0][2])
        print(f"{name}: 5 x {stop - series[0][2]:,} bars, best of {repeats}: "
              f"old {best['old'] * 1e3:.2f} ms ({best['old'] / bars_total * 1e9:.2f} ns/bar), "
              f"new {best['new'] * 1e3:.2f} ms ({best['new'] / bars_total * 1e9:.2f} ns/bar), "
              f"x{best['old'] / best['new']:.2f}; results equal to the bit")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
