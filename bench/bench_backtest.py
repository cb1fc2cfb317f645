"""Benchmark: one EWMA coverage backtest and one liquidation simulation on 2.6M 1-minute bars.

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    python -m bench.bench_backtest

Measured in the same run, so the ratios hold on a noisy machine: a single numpy pass over the
float64 closes (the memory-bandwidth floor), the straightforward pandas formulation of the
same coverage backtest, and the engine. Each figure is the best of ``REPEATS`` runs.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from bench._data import tiled_minutes
from calibration import (
    CoverageConfig,
    EwmaMargin,
    LiquidationConfig,
    _kernels,
    coverage_backtest,
    simulate_liquidations,
)

N_BARS = 2_600_000
HORIZON = 60
REPEATS = 5
PARAM_SETS = [
    {"decay": d, "confidence": q, "horizon_bars": HORIZON, "warmup_bars": 1000}
    for d in (0.99, 0.995, 0.999) for q in (0.99, 0.995)
]


def best_of(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Best wall time of ``repeats`` calls, seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def pandas_coverage(frame: pd.DataFrame, decay: float, confidence: float) -> dict[str, float]:
    """The straightforward pandas formulation: ewm + rolling min/max, per parameter set."""
    r = np.log(frame["close"]).diff()
    var = (r * r).ewm(alpha=1 - decay, adjust=False).mean()
    scale = norm.ppf(confidence) * np.sqrt(HORIZON)
    m = np.maximum(0.005, scale * np.sqrt(var)) * 1.25
    fmin = frame["low"].rolling(HORIZON).min().shift(-HORIZON)
    fmax = frame["high"].rolling(HORIZON).max().shift(-HORIZON)
    long_loss = 1 - fmin / frame["close"]
    short_loss = fmax / frame["close"] - 1
    valid = long_loss.notna() & m.notna()
    out: dict[str, float] = {"mean_margin": float(m[valid].mean())}
    for name, loss in (("long", long_loss), ("short", short_loss)):
        breach = (loss > m) & valid
        out[f"{name}_breaches"] = float(breach.sum())
        out[f"{name}_max_uncovered"] = float((loss - m)[breach].max())
        prev = breach.shift(1, fill_value=False)
        out[f"{name}_n11"] = float((breach & prev).sum())
    out["peak_to_trough"] = float(m[valid].max() / m[valid].min())
    return out


def main() -> int:
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data"))
    if not root.is_dir():
        print(f"no data at {root}; set MARGINLAB_SHARED_DATA", file=sys.stderr)
        return 2
    bars = tiled_minutes(root, N_BARS)
    n = len(bars)
    frame = pd.DataFrame({"close": bars.close, "high": bars.high, "low": bars.low})

    floor_s = best_of(lambda: np.add.reduce(bars.close))
    # Parameter-free work (cached on the series after the first call): timed on the kernels.
    _kernels.forward_losses(bars.low, bars.high, bars.close, HORIZON)
    features_s = best_of(lambda: (
        _kernels.forward_losses(bars.low, bars.high, bars.close, HORIZON),
        np.log(bars.close[1:] / bars.close[:-1]) ** 2,
    ))

    models = [EwmaMargin(**p) for p in PARAM_SETS]  # type: ignore[arg-type]
    config = CoverageConfig()
    coverage_backtest(bars, models[0], config)  # compile / load the kernels
    engine_s = min(
        best_of(lambda m=m: coverage_backtest(bars, m, config)) for m in models  # type: ignore[misc]
    )
    engine_all_s = best_of(lambda: [coverage_backtest(bars, m, config) for m in models], 2)
    pandas_s = best_of(lambda: pandas_coverage(frame, 0.995, 0.99), 2)

    liq_config = LiquidationConfig()
    grid = len(liq_config.leverages) * len(liq_config.notionals_usd) * len(liq_config.sides)
    model = models[1]
    simulate_liquidations(bars, model, liq_config)
    liq_s = best_of(lambda: simulate_liquidations(bars, model, liq_config), 3)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    per_bar = engine_s / n * 1e9
    per_bar_all = engine_all_s / len(models) / n * 1e9
    rows = [
        ("bars", f"{n:,}"),
        ("numpy single pass (np.add.reduce), ns/bar", f"{floor_s / n * 1e9:.2f}"),
        ("parameter-free features once per dataset (losses over h, r²), ns/bar",
         f"{features_s / n * 1e9:.2f}"),
        ("pandas formulation, one parameter set, ns/bar", f"{pandas_s / n * 1e9:.1f}"),
        ("engine coverage backtest, best parameter set, ns/bar", f"{per_bar:.2f}"),
        (f"engine coverage backtest, mean over {len(models)} parameter sets, ns/bar",
         f"{per_bar_all:.2f}"),
        ("engine speed-up over pandas", f"{pandas_s / engine_s:.1f}x"),
        ("engine / numpy floor", f"{engine_s / floor_s:.1f}x"),
        (f"liquidation simulation, {grid}-point grid (both sides), "
         f"entry every {liq_config.entry_every_bars} bars, ns/bar", f"{liq_s / n * 1e9:.1f}"),
        ("peak resident memory, MB", f"{peak_mb:.0f}"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    ok = (per_bar_all <= 8 and pandas_s / engine_s >= 10 and liq_s / n * 1e9 <= 50
          and peak_mb <= 1024)
    print(f"\ntargets (<= 8 ns/bar/param set, >= 10x pandas, <= 50 ns/bar liquidation, "
          f"<= 1 GB): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
