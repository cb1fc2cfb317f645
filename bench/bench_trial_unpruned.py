"""CPU time and minor page faults per unpruned trial on the issue's calibration data.

Thirty seeded random ``ewma`` sets, each evaluated with ``prune_hopeless=False`` so that the
liquidation replay and the capital cost always run, after three warm-up evaluations; five
instruments x five years of tiled one-minute bars (``bench._data.tiled_instruments``). To
compare two commits, run it from each checkout one after the other::

    MARGINLAB_SHARED_DATA=../shared/data PYTHONPATH=. python bench/bench_trial_unpruned.py new
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import msgspec
import numpy as np

import calibration.calibrate as cal
from bench._data import tiled_instruments
from bench.bench_calibrate_minutes import BARS_PER_YEAR, spec_dict
from calibration.spec import decode_spec

N_SETS = 30


def main(label: str) -> None:
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data")).resolve()
    bars = tiled_instruments(root, round(5 * BARS_PER_YEAR), 5)
    spec = decode_spec(msgspec.json.encode(spec_dict(5, 100, None)))
    prepared = cal.prepare_bars(spec, bars, root=root)
    rng = np.random.default_rng(3)
    sets = [{"decay": float(rng.uniform(0.9, 0.995)), "confidence": 0.995,
             "floor_rate": float(rng.uniform(0.005, 0.03)), "apc_buffer": 0.5}
            for _ in range(N_SETS)]
    for params in sets[:3]:
        cal.evaluate(prepared, params, prune_hopeless=False)
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu_0 = time.process_time()
    for params in sets:
        cal.evaluate(prepared, params, prune_hopeless=False)
    cpu_s = time.process_time() - cpu_0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before.ru_minflt
    print(f"{label}: CPU per unpruned trial {cpu_s / N_SETS * 1000:.1f} ms, "
          f"minor page faults per trial {faults / N_SETS:.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this checkout")
