"""Compile (and cache) the numba kernels by running tiny backtests on synthetic bars.

``python -m calibration._warmup`` runs once at ``docker build`` so that the image ships the
compiled kernels in ``NUMBA_CACHE_DIR``: the first backtest of a container then loads them
instead of spending seconds compiling. The bars are a seeded random walk built here (no
data files, no network); every family, the liquidation simulation and the batch kernel run.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from calibration._bars import BarSeries
from calibration.backtest import run_backtest
from calibration.batch import evaluate_coverage_batch
from calibration.coverage import CoverageConfig
from calibration.data import fingerprint

#: Bars of the synthetic series: past every family's default warm-up.
WARMUP_BARS = 6_000


def synthetic_bars(n: int = WARMUP_BARS, seed: int = 0) -> BarSeries:
    """``n`` one-minute bars of a seeded random walk with volume, shape ``(n,)`` each."""
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.standard_normal(n) * 0.002))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) * (1.0 + rng.exponential(0.001, n))
    low = np.minimum(open_, close) * (1.0 - rng.exponential(0.001, n))
    volume = rng.uniform(10.0, 100.0, n)
    ts = 1_600_000_000_000 + np.arange(n, dtype=np.int64) * 60_000
    return BarSeries(
        instrument="WARMUP", timestamp_ms=ts, open=open_, high=high, low=low, close=close,
        volume=volume, bar_seconds=60,
        fingerprint=fingerprint(ts, (open_, high, low, close), volume), source="synthetic",
    )


def warm_up() -> float:
    """Run every kernel once; returns the seconds it took (compiling, or loading the cache)."""
    t0 = time.perf_counter()
    # The account kernels first: the test suite runs this beside its first tests, which
    # compile the single-instrument kernels themselves (tests/conftest.py).
    _warm_up_accounts()
    bars = synthetic_bars()
    for family, params in (("ewma", {"warmup_bars": 500}), ("fhs", {}), ("tiered", {})):
        run_backtest([bars], family, params)
    evaluate_coverage_batch(bars, "ewma", [{"decay": 0.97}, {"decay": 0.99}],
                            config=CoverageConfig(horizon_bars=60))
    return time.perf_counter() - t0


def _warm_up_accounts() -> None:
    """The account engine's kernels: the default cross walk, the queue's walk and the
    mechanics walk with a capacity limit, on two synthetic instruments and a few accounts. The
    mechanics kernel alone takes tens of seconds to compile."""
    from calibration.accounts import Account, AccountConfig, Market, simulate_accounts
    from calibration.models import make_model

    series = [dataclasses.replace(synthetic_bars(2_000, seed=k), instrument=name)
              for k, name in enumerate(("AUSDT", "BUSDT"))]
    market = Market.from_series(series)
    start_ms = int(series[0].timestamp_ms[600])
    accounts = [Account(id=f"a{k}", entry_ms=start_ms + 60_000 * k,
                        collateral={"USDT": 400.0 + 50.0 * k},
                        positions={"AUSDT": 10_000.0, "BUSDT": -5_000.0 * (k % 2)})
                for k in range(6)]
    model = make_model("ewma", {"warmup_bars": 500})
    simulate_accounts(market, model, accounts, AccountConfig(holding_bars=200))
    # Portfolio mode (the grid's kernels) with partial close-outs (the mechanics walk in
    # portfolio mode), as account calibrations with a portfolio section run it.
    from calibration.models import GridPortfolioMargin

    grid = GridPortfolioMargin(warmup_bars=300, extended_moves=(0.3,), extended_weights=(0.5,))
    simulate_accounts(market, model, accounts,
                      AccountConfig(mode="portfolio", holding_bars=200, policy="partial"),
                      portfolio=grid)
    # Only the capacity on: the queue's own walk (``_kernel_queue``); with partial steps the
    # general mechanics walk (``_kernel_mech``), which every other switch runs.
    for policy in ("close_all", "partial"):
        simulate_accounts(market, model, accounts,
                          AccountConfig(holding_bars=200, max_liquidations_per_bar=1,
                                        policy=policy),
                          mechanics_kernel=True)


if __name__ == "__main__":  # pragma: no cover - the image build runs it
    print(f"numba kernels ready in {warm_up():.1f} s")
