"""Replaying a book's rows on several threads (``simulate_accounts(..., workers=N)``).

Without the mechanics (the §7 core, cross, isolated or portfolio) every account's replay reads
only the market and its own row, and writes only its own row of the outputs: the rows can be
replayed in any order, on any thread, and give the same numbers bit for bit. The kernels are
compiled ``nogil``, so threads run them on two cores at once over the one copy of the market
and the book, writing into one preallocated result array each (slices are views): no fork, no
copy-on-write, no per-worker result to merge.

The rows are cut into contiguous blocks, in the book's order (a generated population is in
entry order, so a block's accounts read neighbouring bars of the market), many more blocks than
threads, taken by whichever thread is free first: a block of volatile months whose accounts
trigger early costs less than a calm one, and a fixed split by count leaves one thread idle
while the other finishes (a split by estimated work, tried with processes, lost the entry-time
order and was slower).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import pairwise
from typing import Any, TypeVar

from calibration._errors import InvalidParameters
from calibration.accounts._kernel import BookArrays

# Blocks per thread and pass: enough that the last block's wait is short against a pass, few
# enough that the dispatch (tens of µs of Python per call, with the GIL) stays negligible.
BLOCKS_PER_WORKER = 16
MIN_BLOCK_ROWS = 512

T = TypeVar("T")


def check_workers(workers: object) -> int:
    """``workers`` as a whole number in [1, 64], else ``InvalidParameters`` naming it."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise InvalidParameters(f"workers must be a whole number in [1, 64], got {workers!r}",
                                field="workers")
    return workers


def row_blocks(n_rows: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` row ranges covering ``0 .. n_rows``, in order."""
    if workers <= 1 or n_rows <= MIN_BLOCK_ROWS:
        return [(0, n_rows)]
    count = max(1, min(workers * BLOCKS_PER_WORKER, n_rows // MIN_BLOCK_ROWS))
    edges = [n_rows * b // count for b in range(count + 1)]
    return [(lo, hi) for lo, hi in pairwise(edges) if hi > lo]


def book_rows(book: BookArrays, lo: int, hi: int) -> BookArrays:
    """Rows ``lo .. hi`` of ``book`` as views (the per-asset columns shared)."""
    return book._replace(entry=book.entry[lo:hi], units=book.units[lo:hi],
                         usd=book.usd[lo:hi], col_units=book.col_units[lo:hi])


class RowRunner:
    """Runs ``fn(lo, hi)`` over row blocks: inline with one worker (one call over every row,
    exactly the one-thread replay), else on a pool of ``workers`` threads. Use as a context
    manager; ``wait`` re-raises the first failure."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self._futures: list[Future[None]] = []

    def submit(self, n_rows: int, fn: Callable[[int, int], None]) -> None:
        """Replay rows ``0 .. n_rows`` by ``fn`` (now with one worker, else queued)."""
        if self._pool is None:
            fn(0, n_rows)
            return
        for lo, hi in row_blocks(n_rows, self.workers):
            self._futures.append(self._pool.submit(fn, lo, hi))

    def call(self, fn: Callable[..., T], *args: Any) -> Callable[[], T]:
        """``fn(*args)``, now with one worker, else on the pool; returns what gives its
        value (waiting for it)."""
        if self._pool is None:
            value = fn(*args)
            return lambda: value
        future = self._pool.submit(fn, *args)
        self._futures.append(future)  # type: ignore[arg-type]
        return future.result

    def wait(self) -> None:
        """Block until every submitted block is done."""
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()

    def __enter__(self) -> RowRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            if exc[0] is not None:
                for f in self._futures:
                    f.cancel()
            self._pool.shutdown(wait=True)
