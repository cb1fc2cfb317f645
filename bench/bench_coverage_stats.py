"""Micro-benchmark: ``_kernels.coverage_stats`` against its former bar-by-bar loop
(``tests.reference_coverage.coverage_stats_loop``, compiled here), interleaved in one
process, best of N, on a real series: 5 years of tiled one-minute bars (the first of
``bench._data.tiled_instruments``), its EWMA margin (decay 0.97, 99.5%, floor 0.5%, APC 50%)
over a 60-bar horizon and the 60-bar losses.

Run from the repository root (needs ../shared/data)::

    python bench/bench_coverage_stats.py [rounds]

Prints ns per bar of each kernel on the whole span (step 1 and 60) and on an 8,000-bar
span (cache resident, repeated), and checks the outputs equal to the bit.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numba as nb
import numpy as np

from bench._data import tiled_instruments
from calibration import _kernels
from calibration.models import EwmaMargin
from tests.reference_coverage import coverage_stats_loop


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", Path(__file__).parents[2] / "shared"
                               / "data"))
    bars = tiled_instruments(root, 5 * 525_600, 5)[0]
    model = EwmaMargin(decay=0.97, confidence=0.995, floor_rate=0.005, apc_buffer=0.5)
    rates = model.with_horizon(60).margin_rates(bars)
    margin = rates.mm_rate
    long_loss, short_loss = bars.forward_losses(60)
    start, stop = rates.first_valid_bar, len(bars) - 60
    kernels = {"old": nb.njit(nogil=True)(coverage_stats_loop), "new": _kernels.coverage_stats}
    cases = {"all, step 1": (start, stop, 1, 1), "all, step 60": (start, stop, 60, 1),
             "8000 bars x 1000": (start + 1_000_000, start + 1_008_000, 1, 1000)}
    for name, (lo, hi, step, reps) in cases.items():
        args = (margin, long_loss, short_loss, lo, hi, step, 2.0)
        want = kernels["old"](*args)
        got = kernels["new"](*args)
        assert np.array_equal(got.view(np.int64), want.view(np.int64))
        best = dict.fromkeys(kernels, np.inf)
        for _ in range(rounds):
            for key, kernel in kernels.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    kernel(*args)
                best[key] = min(best[key], (time.perf_counter() - t0) / reps)
        bars_seen = len(range(lo, hi, step))
        print(f"{name}: {bars_seen} observation bars; old {best['old'] / bars_seen * 1e9:.3f}"
              f" ns/bar, new {best['new'] / bars_seen * 1e9:.3f} ns/bar, "
              f"{best['old'] / best['new']:.2f}x; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
