"""``max_increase_ratio`` and ``_exact_increase_from_blocks`` against their formulation before
the block-minimum rewrite (``tests/reference_increase.py``), to the bit."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import _kernels
from tests import reference_increase as ref


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _series(rng: np.random.Generator, n: int, warmup: int, nan_losses: int,
            special: bool) -> tuple[np.ndarray, np.ndarray]:
    """A positive margin path (NaN warm-up) and its loss (NaN at the tail and here and there):
    a random walk, i.i.d. draws from a few levels (ties, jumps both ways) or a falling path
    (every window's minimum at its end); ``special`` mixes in zeros of both signs, negatives,
    repeated values and infinities."""
    kind = rng.integers(0, 3)
    if kind == 0:
        margin = np.exp(np.cumsum(rng.normal(0.0, 0.05, n))) * 0.01
    elif kind == 1:
        margin = rng.choice([0.5, 1.0, 1.5, 4.0], n) * rng.choice([1.0, 1.25], n)
    else:
        margin = np.exp(-np.cumsum(rng.exponential(0.05, n)) + rng.normal(0.0, 0.01, n))
    if special:
        picks = rng.integers(0, n, max(n // 20, 1))
        margin[picks] = rng.choice([0.0, -0.0, -0.01, np.inf, margin[0]], picks.size)
    margin[:warmup] = np.nan
    loss = rng.normal(0.0, 0.01, n)
    loss[rng.integers(0, n, nan_losses)] = np.nan
    loss[-3:] = np.nan
    return margin, loss


def _check(margin: np.ndarray, loss: np.ndarray, start: int, stop: int, step: int, trail: int,
           block: int) -> None:
    try:
        want = ref.max_increase_ratio(margin, loss, start, stop, step, trail, block)
    except ZeroDivisionError:  # a zero margin: numba's float division raises, as Python's
        with pytest.raises(ZeroDivisionError):
            _kernels.max_increase_ratio(margin, loss, start, stop, step, trail, block)
        return
    got = _kernels.max_increase_ratio(margin, loss, start, stop, step, trail, block)
    assert _bits(got) == _bits(want), (start, stop, step, trail, block, got, want)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    warmup=st.integers(0, 60),
    nan_losses=st.integers(0, 5),
    special=st.booleans(),
    block=st.sampled_from([1, 2, 3, 8, 16]),
    trail=st.integers(1, 60),
    step=st.integers(1, 7),
    start_offset=st.integers(0, 40),
)
def test_matches_previous_formulation(seed: int, n: int, warmup: int, nan_losses: int,
                                      special: bool, block: int, trail: int, step: int,
                                      start_offset: int) -> None:
    """Small blocks and trails (both the whole-trail and the block-minimum exact phase),
    steps 1 and above, starts off the block grid, NaN warm-ups and NaN losses inside and at
    the tail; and, with ``special``, margins <= 0 and infinities."""
    rng = np.random.default_rng(seed)
    warmup = min(warmup, n)
    margin, loss = _series(rng, n, warmup, nan_losses, special)
    start = min(warmup + start_offset, n)
    for stop in (n, max(start, n - 3), max(start, n - int(rng.integers(0, 30)))):
        _check(margin, loss, start, stop, step, trail, block)


@pytest.mark.parametrize("special", [False, True])
def test_matches_previous_formulation_block_8(special: bool) -> None:
    """Block 8, trails 5 .. 50, on longer series where many blocks are evaluated."""
    rng = np.random.default_rng(11 + special)
    for _ in range(40):
        n = int(rng.integers(200, 3000))
        warmup = int(rng.integers(0, 80))
        margin, loss = _series(rng, n, warmup, int(rng.integers(0, 20)), special)
        start = warmup + int(rng.integers(0, 13))
        for trail in (5, 15, 16, 17, 31, 50):
            for step in (1, 2, 5):
                _check(margin, loss, start, n, step, trail, 8)


@pytest.mark.parametrize(("step", "start_offset"), [(1, 0), (1, 1234), (7, 3), (60, 17)])
def test_matches_previous_formulation_real_sizes(step: int, start_offset: int) -> None:
    """The calibration's sizes: block 4096 bars, a trail of 30 days of minute bars, a
    volatility-clustered path long enough for many candidate blocks."""
    rng = np.random.default_rng(step + start_offset)
    n = 400_000
    vol = np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))
    margin = 0.005 + 0.02 * vol * (1 + np.abs(rng.normal(0.0, 1.0, n)))
    margin[:500] = np.nan
    loss = rng.normal(0.0, 0.01, n)
    loss[rng.integers(0, n, 50)] = np.nan
    loss[-60:] = np.nan
    _check(margin, loss, 500 + start_offset, n - 60, step, 43_201, 4096)
    # A window (a stress period) in the middle: start and stop off the block grid.
    _check(margin, loss, 150_001 + start_offset, 260_003, step, 43_201, 4096)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    blocks=st.integers(3, 12),
    block=st.sampled_from([1, 2, 4, 8]),
    extra=st.integers(0, 20),
    step=st.integers(1, 5),
    start_offset=st.integers(0, 9),
    zeros=st.booleans(),
)
def test_exact_increase_from_blocks_matches_previous(seed: int, blocks: int, block: int,
                                                     extra: int, step: int, start_offset: int,
                                                     zeros: bool) -> None:
    """The single-block exact phase, every block of a series, against the batch kernel's
    former one; with ``zeros``, zero margins of both signs (the tie-breaks must agree)."""
    rng = np.random.default_rng(seed)
    n = blocks * block
    trail = 2 * block + min(extra, n)
    margin = rng.choice([0.5, 1.0, 2.0, 3.0, np.nan], n)
    if zeros:
        margin[rng.integers(0, n, max(n // 4, 1))] = 0.0
        margin[rng.integers(0, n, max(n // 4, 1))] = -0.0
    loss = rng.choice([0.0, 1.0, np.nan], n, p=[0.45, 0.45, 0.1])
    block_min = np.array([_first_min(margin[q * block: q * block + block])
                          for q in range(blocks)])
    start = min(start_offset, n - 1)
    # Block 0 has no head block (see test_exact_increase_from_blocks_in_block_0).
    for j in range(max(start // block, 1), blocks):
        lo = max(j * block, start)
        hi = min(j * block + block, n)
        try:
            want = ref.exact_increase_from_blocks(margin, loss, block_min, lo, hi, start, step,
                                                  trail, block)
        except ZeroDivisionError:
            with pytest.raises(ZeroDivisionError):
                _kernels._exact_increase_from_blocks(margin, loss, block_min, 0, lo, hi, start,
                                                     step, trail, block)
            continue
        got = _kernels._exact_increase_from_blocks(margin, loss, block_min, 0, lo, hi, start,
                                                   step, trail, block)
        assert _bits(got) == _bits(want), (j, got, want)
        # Indexed from another first block, the same ratio.
        got = _kernels._exact_increase_from_blocks(margin, loss, block_min[1:], 1, lo, hi,
                                                   start, step, trail, block)
        assert _bits(got) == _bits(want), (j, got, want)


def test_exact_increase_from_blocks_in_block_0() -> None:
    """In block 0 a window starts at bar 0, inside the block: a smaller margin later in the
    block is outside the windows of the bars before it. (The batch kernel's former exact
    phase took the whole block's minimum there: 2.0 instead of 1.0 here.)"""
    block, trail = 8, 20
    margin = np.full(40, 2.0)
    margin[7] = 1.0
    loss = np.zeros(40)
    block_min = np.array([margin[q * block: q * block + block].min() for q in range(5)])
    assert ref.exact_increase_from_blocks(margin, loss, block_min, 0, 8, 0, 1, trail,
                                          block) == 2.0
    for step in (1, 3):
        for start in (0, 2):
            want = ref.exact_increase(margin, loss, start, 8, start, step, trail)
            assert want == 1.0
            got = _kernels._exact_increase_from_blocks(margin, loss, block_min, 0, start, 8,
                                                       start, step, trail, block)
            assert _bits(got) == _bits(want)


def _first_min(x: np.ndarray) -> float:
    """The first of the smallest values (NaN ignored), as a sequential strict-< scan."""
    low = np.inf
    for v in x:
        if v < low:
            low = float(v)
    return low
