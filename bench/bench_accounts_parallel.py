"""Benchmark: the account replay on two workers against one (``simulate_accounts(workers=)``).

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    python -m bench.bench_accounts_parallel [N_ACCOUNTS [REPEATS]]

The market and population of ``bench.bench_accounts`` (BTC, ETH, SOL, XRP, BNB 30-minute
bars 2020-09 .. 2025-09; 100,000 accounts, cross mode, held a week, every position's
isolated twin too). The accounts are turned into arrays once (``AccountBook``), then the
same call is timed with ``workers=1`` and ``workers=2`` (two threads running the ``nogil``
kernels over contiguous blocks of rows into one result; ``calibration.accounts._split``),
alternating, best of ``REPEATS`` each (and the median of the ``REPEATS`` ratios of a
two-worker call to the one-worker call just before it), after checking that both give the
same result bit for bit. The call from the plain account list (arrays built inside the
call, serially) is shown too.

Load-independent evidence for a shared machine (wall time there measures the wait for a
core): each call's process CPU and minor page faults, and from the least-disturbed of
``CPU_REPEATS`` more instrumented calls per setting the main thread's CPU (outside the tasks:
the serial part, set-up before the first block, the barrier between the passes, the result)
and each pool thread's CPU in the tasks (a block's set-up, replay, positions and twins; with
N workers the calling thread takes blocks beside N - 1 pool threads). ``critical path`` =
the busiest thread's CPU: what N free cores would take at best.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from bench.bench_accounts import setup
from calibration.accounts import AccountBook, AccountResult, _split, simulate_accounts

REPEATS = 5
CPU_REPEATS = 3
WORKERS = 2
TARGET = 0.55


def _same_bits(a: AccountResult, b: AccountResult) -> bool:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
        elif x != y:
            return False
    return True


def _cpu_split(call: Callable[[], object]) -> tuple[float, float, list[float]]:
    """One call's main-thread CPU (all of it, and the part inside the tasks: with N
    workers the caller takes blocks too) and each pool thread's CPU in the tasks, s."""
    per_thread: dict[int, float] = {}
    lock = threading.Lock()
    plain_each = _split.RowRunner.each

    def each(self: _split.RowRunner, count: int, fn: Callable[[int], None]) -> None:
        def timed(b: int) -> None:
            c0 = time.thread_time()
            fn(b)
            with lock:
                tid = threading.get_ident()
                per_thread[tid] = per_thread.get(tid, 0.0) + time.thread_time() - c0
        plain_each(self, count, timed)

    _split.RowRunner.each = each  # type: ignore[method-assign]
    try:
        m0 = time.thread_time()
        call()
        main = time.thread_time() - m0
    finally:
        _split.RowRunner.each = plain_each  # type: ignore[method-assign]
    main_tid = threading.get_ident()
    return main, per_thread.get(main_tid, 0.0), [v for t, v in per_thread.items()
                                                 if t != main_tid]


def main() -> None:
    n_accounts = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else REPEATS
    market, accounts, model, config = setup(n_accounts)  # kernels compiled
    book = AccountBook.from_accounts(accounts, market.instruments)
    one_r = simulate_accounts(market, model, book, config)
    two_r = simulate_accounts(market, model, book, config, workers=WORKERS)
    identical = _same_bits(one_r, two_r)
    del one_r, two_r

    wall = {1: float("inf"), WORKERS: float("inf")}
    cpu = {1: float("inf"), WORKERS: float("inf")}
    faults = {1: 0, WORKERS: 0}
    pair_ratios = []
    for _ in range(repeats):
        last = {}
        for w in (1, WORKERS):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            simulate_accounts(market, model, book, config, workers=w)
            elapsed, used = time.perf_counter() - t0, time.process_time() - c0
            if elapsed < wall[w]:
                wall[w] = elapsed
                faults[w] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            cpu[w] = min(cpu[w], used)
            last[w] = elapsed
        pair_ratios.append(last[WORKERS] / last[1])
    listed = {}
    for w in (1, WORKERS):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            simulate_accounts(market, model, accounts, config, workers=w)
            best = min(best, time.perf_counter() - t0)
        listed[w] = best
    split = {}
    for w in (1, WORKERS):  # the least-disturbed of CPU_REPEATS instrumented calls
        runs = [_cpu_split(lambda w=w: simulate_accounts(market, model, book, config,
                                                         workers=w))  # type: ignore[misc]
                for _ in range(CPU_REPEATS)]
        split[w] = min(runs, key=lambda r: max([r[0], *r[2]]))
    crit = {w: max([m, *p]) for w, (m, _, p) in split.items()}

    ratio = wall[WORKERS] / wall[1]
    print(f"market: {len(market.instruments)} instruments x {len(market):,} bars of 30m; "
          f"{len(book):,} accounts")
    print(f"workers={WORKERS} result identical to workers=1, bit for bit: {identical}")
    print(f"one worker, the book: {wall[1]:.3f} s wall, {cpu[1]:.3f} s CPU, "
          f"{faults[1]:,} minor page faults")
    print(f"{WORKERS} workers, the book: {wall[WORKERS]:.3f} s wall, {cpu[WORKERS]:.3f} s CPU "
          f"(both threads), {faults[WORKERS]:,} minor page faults")
    print(f"wall ratio: {ratio:.3f} (target <= {TARGET}): "
          f"{'met' if ratio <= TARGET else 'NOT met'}")
    q = np.quantile(pair_ratios, [0.0, 0.25, 0.5, 0.75, 1.0])
    print(f"ratio of each pair ({repeats}, a two-worker call over the one-worker call just "
          f"before it): median {q[2]:.3f}, quartiles {q[1]:.3f} .. {q[3]:.3f}, "
          f"range {q[0]:.3f} .. {q[4]:.3f}; {sum(r <= TARGET for r in pair_ratios)} of "
          f"{repeats} <= {TARGET}")
    for w, (m, mk, p) in split.items():
        print(f"workers={w}: main thread {m:.3f} s CPU ({m - mk:.3f} outside the tasks)"
              + "".join(f", pool thread {v:.3f} s" for v in p)
              + f"; critical path (busiest thread) {crit[w]:.3f} s")
    # CPU time does not count the wait for a core: on a machine shared with other work this
    # is the ratio two free cores would give.
    print(f"critical-path CPU ratio: {crit[WORKERS] / crit[1]:.3f}")
    print(f"from the account list (arrays built in the call): one worker {listed[1]:.3f} s, "
          f"{WORKERS} workers {listed[WORKERS]:.3f} s (ratio {listed[WORKERS] / listed[1]:.3f})")
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
