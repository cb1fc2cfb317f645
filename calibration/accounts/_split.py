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

import queue
import threading
from collections.abc import Callable
from functools import partial
from itertools import pairwise
from typing import Any, TypeVar

from calibration._errors import InvalidParameters
from calibration.accounts._kernel import BookArrays

# Blocks per thread and pass: enough that the last block (~1/64 of a pass) keeps the other
# thread waiting only briefly, few enough that the dispatch (~6 µs of Python per kernel call,
# with the GIL, measured) stays negligible.
BLOCKS_PER_WORKER = 32
MIN_BLOCK_ROWS = 256

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
    exactly the one-thread replay), else from one queue by ``workers - 1`` threads of its own
    and the calling thread, which takes blocks too once it waits (so ``workers`` threads run,
    no more: the caller builds the twins while the pool replays the accounts, then helps).
    Use as a context manager; ``wait`` re-raises the first failure (later blocks are then
    skipped)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._done = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._drain, name=f"marginlab-replay-{i}",
                                          daemon=True) for i in range(workers - 1)]
        for t in self._threads:
            t.start()

    def _run(self, task: Callable[[], None]) -> None:
        try:
            if self._error is None:
                task()
        except BaseException as exc:  # handed to the waiting caller
            with self._done:
                self._error = self._error or exc
        finally:
            with self._done:
                self._pending -= 1
                if self._pending == 0:
                    self._done.notify_all()

    def _drain(self) -> None:
        while (task := self._tasks.get()) is not None:
            self._run(task)

    def _put(self, task: Callable[[], None]) -> None:
        with self._done:
            self._pending += 1
        self._tasks.put(task)

    def submit(self, n_rows: int, fn: Callable[[int, int], None]) -> None:
        """Replay rows ``0 .. n_rows`` by ``fn`` (now with one worker, else queued)."""
        if self.workers == 1:
            fn(0, n_rows)
            return
        for lo, hi in row_blocks(n_rows, self.workers):
            self._put(partial(fn, lo, hi))

    def call(self, fn: Callable[..., T], *args: Any) -> Callable[[], T]:
        """``fn(*args)``, now with one worker, else queued; returns what gives its value
        (waiting for every queued task)."""
        if self.workers == 1:
            value = fn(*args)
            return lambda: value
        box: list[T] = []
        self._put(lambda: box.append(fn(*args)))

        def value_of() -> T:
            self.wait()
            return box[0]

        return value_of

    def wait(self) -> None:
        """Take queued blocks on this thread until none is left, then wait for the rest."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            assert task is not None  # the stop marks are queued on exit only
            self._run(task)
        with self._done:
            while self._pending:
                self._done.wait()
            if self._error is not None:
                raise self._error

    def __enter__(self) -> RowRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self._error = self._error or RuntimeError("the replay was abandoned")
        for _ in self._threads:
            self._tasks.put(None)
        for t in self._threads:
            t.join()
