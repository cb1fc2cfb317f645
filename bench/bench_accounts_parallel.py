"""Benchmark: two processes each replaying half the accounts against one replaying all.

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    python -m bench.bench_accounts_parallel [N_ACCOUNTS]

The market and population of ``bench.bench_accounts`` (BTC, ETH, SOL, XRP, BNB 30-minute
bars 2020-09 .. 2025-09; 100,000 accounts, cross mode, held a week, every position's
isolated twin too). The data are loaded, the kernels compiled and the accounts turned into
arrays (``AccountBook``, split by index: even / odd, so both halves span the five years
alike) before the fork, as ``calibration.parallel`` does for calibration workers, so each
child only replays its half's arrays and never walks the accounts' Python objects (whose
reference counts would copy their pages into it). Wall time from the fork to the last
child's exit, against one process replaying the whole book; best of ``REPEATS``. The one
process replaying the plain account list (arrays built inside the call) is shown too.
Each child also reports the wall and CPU time of its replay, and its minor page faults: on a
machine whose cores are busy with other work the wall ratio measures the contention, the CPU
ratio the split. Peak RSS of the parent and of the largest child.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import numpy as np

from bench.bench_accounts import setup
from calibration.accounts import AccountBook, simulate_accounts

REPEATS = 3
WORKERS = 2


def main() -> None:
    n_accounts = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    market, accounts, model, config = setup(n_accounts)  # compiled before the fork
    n = len(market)
    book = AccountBook.from_accounts(accounts, market.instruments)
    halves = [book.take(np.arange(w, len(book), WORKERS)) for w in range(WORKERS)]

    one = one_list = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        simulate_accounts(market, model, book, config)
        one = min(one, time.perf_counter() - t0)
        t0 = time.perf_counter()
        simulate_accounts(market, model, accounts, config)
        one_list = min(one_list, time.perf_counter() - t0)

    two = float("inf")
    inside: list[tuple[float, float, int]] = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        pids = []
        pipes = []
        for half in halves:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: replay its half, leave without the parent's cleanup
                code = 0
                try:
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    c0, w0 = time.process_time(), time.perf_counter()
                    simulate_accounts(market, model, half, config)
                    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                    os.write(write, f"{time.perf_counter() - w0} {time.process_time() - c0} "
                             f"{faults}".encode())
                except BaseException:
                    code = 1
                os._exit(code)
            os.close(write)
            pids.append(pid)
            pipes.append(read)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        elapsed = time.perf_counter() - t0
        reports = []
        for read in pipes:
            wall_s, cpu_s, faults = os.read(read, 100).decode().split()
            os.close(read)
            reports.append((float(wall_s), float(cpu_s), int(faults)))
        if elapsed < two:
            two, inside = elapsed, reports
    c0 = time.process_time()
    simulate_accounts(market, model, book, config)
    one_cpu = time.process_time() - c0

    parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"market: {len(market.instruments)} instruments x {n:,} bars of 30m; "
          f"{len(accounts):,} accounts (halves {', '.join(f'{len(h):,}' for h in halves)})")
    print(f"one process, all accounts (the book's arrays): {one:.3f} s; from the account "
          f"list (arrays built in the call): {one_list:.3f} s")
    print(f"{WORKERS} processes, half each (fork to last exit): {two:.3f} s")
    print(f"ratio: {two / one:.3f} (target <= 0.55): {'met' if two / one <= 0.55 else 'NOT met'}")
    print("inside each child (replay only): " + "; ".join(
        f"wall {w:.3f} s, CPU {c:.3f} s, {f:,} minor page faults" for w, c, f in inside)
        + f"; one process CPU for all: {one_cpu:.3f} s")
    # CPU time does not count the time a process waits for a core: on a machine shared with
    # other work this is the ratio two free cores would give (fork and page faults included).
    print(f"largest child CPU / one process CPU: {max(c for _, c, _ in inside) / one_cpu:.3f}")
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"peak RSS: parent {parent_mb:,.0f} MB, largest child {child_mb:,.0f} MB")


if __name__ == "__main__":
    main()
