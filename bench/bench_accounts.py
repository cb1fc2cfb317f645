"""Benchmark: the account engine, cross mode, on five years of 30-minute bars.

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    python -m bench.bench_accounts [N_ACCOUNTS]

BTC, ETH, SOL, XRP and BNB 30-minute bars (2020-09 .. 2025-09, real Binance spot) aligned
into one market; a seeded population (default 100,000 accounts, a cohort every 48 bars,
books directional / hedged / basket, held a week = 336 bars) replayed in cross mode with a
tiered model. Figures: wall time of the replay itself (``simulate_accounts``, which also
replays every position's isolated twin), per held account-instrument-bar (the bars each
account's positions stay open, twins included, summed), per account, and peak RSS.
Best of ``REPEATS`` after one warm-up run (numba compilation excluded).

The liquidation engine's capacity (domain.md §10): the same replay through the time-ordered
mechanics kernel without a limit, then with ``CAPACITY`` close-out steps per bar (binding:
the peak backlog is printed), and the queue's cost against both, in wall and in CPU time
(the default kernel re-timed beside them, so the three share the machine's load).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from calibration import load_bars, make_model
from calibration.accounts import (
    AccountConfig,
    Market,
    PopulationSpec,
    generate_population,
    simulate_accounts,
)

SYMBOLS = ("BTC", "ETH", "SOL", "XRP", "BNB")
REPEATS = 3
HOLDING_BARS = 336
CAPACITY = 1


def _held_bars(result, n: int) -> int:  # type: ignore[no-untyped-def]
    """Account-instrument-bars the replay walked: each position for the bars its account (and
    its twin) stayed open."""
    entry = result.entry_bar[result.position_account]
    end = np.minimum(entry + HOLDING_BARS, n - 1)
    acc_end = np.where(result.trigger_bar[result.position_account] >= 0,
                       result.trigger_bar[result.position_account], end)
    twin_end = np.where(result.twin_trigger_bar >= 0, result.twin_trigger_bar, end)
    return int((acc_end - entry).sum() + (twin_end - entry).sum())


def setup(n_accounts: int):  # type: ignore[no-untyped-def]
    """The benchmark's market, population (about ``n_accounts``), model and settings, with
    the kernels compiled (shared by the one- and two-process benchmarks)."""
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data"))
    market = Market.from_series([load_bars(f"binance_spot_2020_2025/{s}USDT_30m.csv",
                                           root=root) for s in SYMBOLS])
    entries = max(1, (len(market) - 1) // 48)
    spec = PopulationSpec(seed=1, entry_every_bars=48,
                          accounts_per_entry=max(1, round(n_accounts / entries)))
    accounts = generate_population(spec, instruments=market.instruments,
                                   timestamp_ms=market.timestamp_ms, close=market.matrix("close"))
    model = make_model("tiered", {"base_mmr": 0.01, "tier_growth": 2.0})
    config = AccountConfig(holding_bars=HOLDING_BARS, latency_bars=1)
    simulate_accounts(market, model, accounts[:100], config)  # compile
    return market, accounts, model, config


def main() -> None:
    n_accounts = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    market, accounts, model, config = setup(n_accounts)
    n = len(market)
    best = float("inf")
    result = None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        result = simulate_accounts(market, model, accounts, config)
        best = min(best, time.perf_counter() - t0)
    assert result is not None
    held = _held_bars(result, n)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"market: {len(market.instruments)} instruments x {n:,} bars of 30m")
    print(f"accounts: {len(result.accounts):,}, positions {result.position_account.shape[0]:,}")
    print(f"replay (cross + isolated twins): {best:.3f} s")
    print(f"held account-instrument-bars: {held:,} -> {best / held * 1e9:.2f} ns each")
    print(f"per account: {best / len(result.accounts) * 1e6:.2f} us")
    print(f"peak RSS: {rss_mb:,.0f} MB")
    _bench_capacity(market, model, accounts, config, best)


def _timed(market, model, accounts, config, mechanics_kernel=True):  # type: ignore[no-untyped-def]
    """Best wall and best CPU (process) time of ``REPEATS`` replays, and the last result: on
    a shared machine the CPU time is the load-independent figure."""
    best = float("inf")
    best_cpu = float("inf")
    result = None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        c0 = time.process_time()
        result = simulate_accounts(market, model, accounts, config,
                                   mechanics_kernel=mechanics_kernel)
        best_cpu = min(best_cpu, time.process_time() - c0)
        best = min(best, time.perf_counter() - t0)
    return best, best_cpu, result


def _bench_capacity(market, model, accounts, config, core_s: float) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    capped = dataclasses.replace(config, max_liquidations_per_bar=CAPACITY)
    simulate_accounts(market, model, accounts[:100], capped, mechanics_kernel=True)  # compile
    again_s, core_cpu, _ = _timed(market, model, accounts, config, mechanics_kernel=False)
    core_s = min(core_s, again_s)
    free_s, free_cpu, free = _timed(market, model, accounts, config)
    cap_s, cap_cpu, cap = _timed(market, model, accounts, capped)
    print(f"default kernel again: {again_s:.3f} s (CPU {core_cpu:.3f} s)")
    print(f"mechanics kernel, no limit: {free_s:.3f} s (CPU {free_cpu:.3f} s)")
    print(f"mechanics kernel, {CAPACITY} per bar: {cap_s:.3f} s (CPU {cap_cpu:.3f} s; peak backlog "
          f"{int(cap.backlog.max()):,} accounts, {int((cap.wait_bars > 0).sum()):,} waited; "
          f"bad debt {cap.bad_debt_usd.sum():,.0f} vs {free.bad_debt_usd.sum():,.0f} USD)")
    print(f"queue cost: {cap_s / free_s - 1:+.1%} vs the mechanics kernel, "
          f"{cap_s / core_s - 1:+.1%} vs the account engine's default kernel (wall); CPU "
          f"{cap_cpu / free_cpu - 1:+.1%} and {cap_cpu / core_cpu - 1:+.1%}")


if __name__ == "__main__":
    main()
