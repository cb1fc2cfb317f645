"""Replaying a book's rows on several threads (``simulate_accounts(..., workers=N)``).

Without the mechanics (the §7 core, cross, isolated or portfolio) every account's replay reads
only the market and its own row, and writes only its own row of the outputs: the rows can be
replayed in any order, on any thread, and give the same numbers bit for bit. The kernels are
compiled ``nogil``, so threads run them on two cores at once over the one copy of the market
and the book, writing into one preallocated result array each (slices are views): no fork, no
copy-on-write, no per-worker result to merge.

The rows are cut into contiguous blocks, in the book's order (a generated population is in
entry order, so a block's accounts read neighbouring bars of the market), taken by whichever
thread is free first from one queue: a block of volatile months whose accounts trigger early
costs less than a calm one, and a fixed split by count leaves one thread idle while the other
finishes (a split by estimated work, tried with processes, lost the entry-time order and was
slower). The blocks shrink as the rows run out (guided: each is ``1 / (GUIDE * workers)`` of
the rows left, at least ``MIN_BLOCK_ROWS``): the first ones are large (few calls), the last
ones small, so the threads finish a pass within a small block of each other.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from calibration._errors import InvalidParameters
from calibration.accounts._kernel import BookArrays

# Guided blocks: each 1 / (GUIDE * workers) of the rows left, at least MIN_BLOCK_ROWS (about
# 40 blocks a pass for 100,000 rows on two threads; the last ones ~1 ms of kernel, so the
# thread that finishes first waits at most about that long; the dispatch, ~20 µs of Python a
# block with the GIL, stays negligible).
GUIDE = 4
MIN_BLOCK_ROWS = 256

T = TypeVar("T")


def check_workers(workers: object) -> int:
    """``workers`` as a whole number in [1, 64], else ``InvalidParameters`` naming it."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise InvalidParameters(f"workers must be a whole number in [1, 64], got {workers!r}",
                                field="workers")
    return workers


def row_blocks(n_rows: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` row ranges covering ``0 .. n_rows``, in order, shrinking."""
    if workers <= 1 or n_rows <= MIN_BLOCK_ROWS:
        return [(0, n_rows)]
    blocks: list[tuple[int, int]] = []
    lo = 0
    while lo < n_rows:
        size = max(MIN_BLOCK_ROWS, -(-(n_rows - lo) // (GUIDE * workers)))
        hi = min(n_rows, lo + size)
        if n_rows - hi < MIN_BLOCK_ROWS // 2:  # no sliver at the end
            hi = n_rows
        blocks.append((lo, hi))
        lo = hi
    return blocks


def book_rows(book: BookArrays, lo: int, hi: int) -> BookArrays:
    """Rows ``lo .. hi`` of ``book`` as views (the per-asset columns shared)."""
    return book._replace(entry=book.entry[lo:hi], units=book.units[lo:hi],
                         usd=book.usd[lo:hi], col_units=book.col_units[lo:hi])


class RowRunner:
    """Runs tasks over row blocks: inline with one worker (one block of every row: exactly
    the one-thread replay), else from one queue (in order) by ``workers - 1`` threads of its
    own and the calling thread, which takes tasks too once it waits (so ``workers`` threads
    run, no more). ``wait`` is a barrier: every task queued so far is done after it. Use as a
    context manager; ``wait`` re-raises the first failure (later tasks are then skipped)."""

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

    def blocks(self, n_rows: int) -> list[tuple[int, int]]:
        """``row_blocks(n_rows, workers)``: one block with one worker."""
        return row_blocks(n_rows, self.workers)

    def each(self, count: int, fn: Callable[[int], None]) -> None:
        """``fn(b)`` for ``b`` in ``0 .. count`` (now, in order, with one worker, else queued
        in order)."""
        for b in range(count):
            if self.workers == 1:
                fn(b)
            else:
                self._put(partial(fn, b))

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
