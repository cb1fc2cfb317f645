"""Benchmark: one calibration trial's CPU time on five instruments × five years of tiled
one-minute bars, for whichever ``calibration`` package comes first on ``sys.path`` — so two
checkouts can be compared on the same data, and their evaluations checked identical.

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    python bench/bench_trial_cpu.py [years]                          # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/bench_trial_cpu.py   # another one

The data are ``bench._data.tiled_instruments`` (loaded from this file's directory, so the
other checkout needs none of it); the spec is ``bench_calibrate_minutes``'s (ewma, default
space, liquidation on, trials see the first 70%). It is prepared through ``prepare`` with the
data loader replaced by the tiled series (an API every checkout has). 24 random parameter
sets (seed 7) are evaluated as trials (``evaluate``, pruning on) twice after a warm-up,
with freed memory kept for reuse as ``marginlab calibrate`` keeps it (this checkout's
``calibration._allocator``, for either checkout). Printed: the median CPU time
(``time.process_time``) of pruned and of complete trials, and a digest of the 24
evaluations' summaries (equal digests: identical results to the bit).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np


def _tiles() -> Any:
    spec = importlib.util.spec_from_file_location("bench_tiles",
                                                  Path(__file__).with_name("_data.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _retain_freed_memory() -> bool:
    """This checkout's ``calibration._allocator`` setting, as ``marginlab calibrate`` makes
    it — loaded from this file's repository so that an older checkout under test runs
    with the same allocator."""
    path = Path(__file__).resolve().parents[1] / "calibration" / "_allocator.py"
    spec = importlib.util.spec_from_file_location("bench_allocator", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return bool(module.retain_freed_memory())


def main() -> int:
    retained = _retain_freed_memory()
    import calibration
    import calibration.calibrate as cal
    import calibration.calibrate._prepare as prep
    from calibration.spec import decode_spec

    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data")).resolve()
    years = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    print(f"calibration from {calibration.__file__}; load average {os.getloadavg()[0]:.2f}; "
          f"freed memory retained: {retained}")
    series = _tiles().tiled_instruments(root, round(years * 525_600), 5)
    bars = {b.instrument: b for b in series}
    spec = decode_spec(msgspec.json.encode({
        "data": [{"instrument": name, "ref": f"tiled-1m/{name}"} for name in bars],
        "model": "ewma", "risk_appetite_bps": 5.0, "n_trials": 1000, "seed": 1}))
    prep.load_data_ref = lambda d, root, field: bars[d.instrument]  # type: ignore[assignment]
    prepared = prep.prepare(spec, root)
    rng = np.random.default_rng(7)
    sets = [{"decay": float(rng.uniform(0.9, 0.999)),
             "confidence": float(rng.uniform(0.99, 0.999)),
             "floor_rate": float(np.exp(rng.uniform(np.log(0.002), np.log(0.05)))),
             "apc_buffer": float(rng.uniform(0.25, 1.0))} for _ in range(24)]
    cal.evaluate(prepared, sets[0])
    cal.evaluate(prepared, sets[1], prune_hopeless=False)  # every kernel loaded
    digest = hashlib.sha256()
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(2):
        for p in sets:
            c0 = time.process_time()
            e = cal.evaluate(prepared, p)
            cpu[e.pruned is not None].append(time.process_time() - c0)
            if rep == 0:
                digest.update(e.summary_json().encode())
    n_in = sum(len(b) for b in prepared.in_sample)
    for pruned, xs in cpu.items():
        if xs:
            med = float(np.median(xs))
            print(f"{'pruned' if pruned else 'complete'} trials: {len(xs)} evaluations, median "
                  f"CPU {med * 1e3:.1f} ms, {med / n_in * 1e9:.1f} ns per in-sample bar")
    print(f"digest of the 24 evaluations' summaries: {digest.hexdigest()[:16]}; load average "
          f"{os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
