"""``_kernels.coverage_stats`` (chunked, lane-summed) against its bar-by-bar loop, to the bit."""

from __future__ import annotations

from pathlib import Path

import numba as nb
import numpy as np
import pytest

from calibration import _kernels
from tests.reference_coverage import coverage_stats_loop

_loop = nb.njit(coverage_stats_loop)


def _same(margin: np.ndarray, long_loss: np.ndarray, short_loss: np.ndarray, start: int,
          stop: int, step: int, im_to_mm: float) -> None:
    got = _kernels.coverage_stats(margin, long_loss, short_loss, start, stop, step, im_to_mm)
    want = _loop(margin, long_loss, short_loss, start, stop, step, im_to_mm)
    assert got.shape == want.shape == (_kernels.SHARED_OFFSET + 4,)
    # Bit patterns: tells -0.0 from 0.0 and NaN payloads apart, as == would not.
    assert np.array_equal(got.view(np.int64), want.view(np.int64)), (got, want)


def _series(rng: np.random.Generator, n: int, rate: float, *, runs: bool = False,
            lo: float = 0.005, hi: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Margins in [lo, hi) and losses below them, breaching with probability ``rate`` (per
    bar, or per run start when ``runs``: runs of 1-40 bars)."""
    margin = lo + (hi - lo) * rng.random(n)
    long_loss = margin * rng.uniform(-1.0, 0.999, n)
    short_loss = margin * rng.uniform(-1.0, 0.999, n)
    for loss in (long_loss, short_loss):
        hit = rng.random(n) < rate
        if runs:
            for t in np.flatnonzero(hit):
                hit[t:t + int(rng.integers(1, 41))] = True
        loss[hit] = margin[hit] * rng.uniform(1.0001, 3.0, int(hit.sum()))
    return margin, long_loss, short_loss


SPANS = [(0, None), (3, None), (5, 1234), (17, 41), (0, 7), (9, 24), (100, 100), (50, 40),
         (1, 2), (16, 32)]


@pytest.mark.parametrize("rate", [0.0, 1e-4, 0.005, 0.02, 0.1, 0.5])
@pytest.mark.parametrize("runs", [False, True])
@pytest.mark.parametrize("step", [1, 2, 60])
def test_random_breaches(rate: float, runs: bool, step: int) -> None:
    rng = np.random.default_rng(int(rate * 1e4) + 7 * runs + step)
    n = 20_000
    margin, long_loss, short_loss = _series(rng, n, rate, runs=runs)
    for start, stop in SPANS:
        _same(margin, long_loss, short_loss, start, n if stop is None else stop, step, 2.0)


@pytest.mark.parametrize("step", [1, 2, 60])
def test_nan_warm_up_and_losses(step: int) -> None:
    rng = np.random.default_rng(11)
    n = 10_000
    margin, long_loss, short_loss = _series(rng, n, 0.01, runs=True)
    margin[:777] = np.nan  # warm-up
    long_loss[-60:] = np.nan  # no full horizon ahead
    short_loss[-60:] = np.nan
    long_loss[rng.integers(0, n, 40)] = np.nan  # gaps inside
    short_loss[rng.integers(0, n, 40)] = np.nan
    margin[rng.integers(777, n, 40)] = np.nan
    for start, stop in [(0, n), (0, n - 60), (776, n - 61), (790, 801), (5, 700), (0, 0)]:
        _same(margin, long_loss, short_loss, start, stop, step, 2.0)


@pytest.mark.parametrize("im_to_mm", [2.0, 1.5, 3.0, 1.0])
def test_capped_margins(im_to_mm: float) -> None:
    rng = np.random.default_rng(3)
    n = 8_000
    margin, long_loss, short_loss = _series(rng, n, 0.01)
    # Margins around and above 1 / im_to_mm (and above 1), in runs and alone.
    margin[1000:1300] = rng.uniform(0.2, 1.5, 300)
    margin[rng.integers(0, n, 50)] = 1.0 / im_to_mm
    margin[rng.integers(0, n, 50)] = rng.uniform(0.4, 2.0, 50)
    for step in (1, 2, 60):
        _same(margin, long_loss, short_loss, 0, n, step, im_to_mm)
        _same(margin, long_loss, short_loss, 1001, 1290, step, im_to_mm)


def test_edge_values() -> None:
    """Zero and -0.0 margins (first or later), negative margins, infinities, a start from
    the end (negative), stops beyond the chunks' grid."""
    rng = np.random.default_rng(5)
    n = 4_000
    margin, long_loss, short_loss = _series(rng, n, 0.01)
    margin[100:140] = 0.0
    margin[120] = -0.0
    margin[300:310] = -0.0
    margin[305] = 0.0
    margin[500:510] = -0.01
    long_loss[700:720] = -np.inf
    short_loss[710:730] = -np.inf
    long_loss[800] = np.inf
    margin[900] = np.inf
    margin[1000:1016] = 1e300
    long_loss[1000:1016] = 1e300
    short_loss[1000:1016] = -np.inf
    for start, stop in [(0, n), (100, 200), (300, 340), (120, 400), (0, 1200), (-50, n),
                        (-3000, 2000), (895, 1100)]:
        for step in (1, 2, 60):
            _same(margin, long_loss, short_loss, start, stop, step, 2.0)
            _same(margin, long_loss, short_loss, start, stop, step, 1e-300)


def test_signed_zeros_and_negative_margins_without_breach() -> None:
    """Chunks the lanes must leave to the loop though nothing breaches: a new minimum that
    is 0.0 then -0.0 (the loop keeps the first), and negative margins above their losses."""
    n = 200
    zeros = np.zeros(n)
    margin = np.full(n, 0.01)
    margin[33] = 0.0
    margin[34] = -0.0
    margin[66] = -0.0
    margin[64] = 0.0
    _same(margin, zeros, zeros, 0, n, 1, 2.0)
    _same(margin, zeros - 1.0, zeros - 1.0, 0, n, 1, 2.0)
    margin = np.full(n, 0.01)
    margin[40:120] = -0.01
    _same(margin, zeros - 1.0, zeros - 1.0, 0, n, 1, 2.0)


@pytest.mark.parametrize("seed", range(6))
def test_ties_and_binade_crossings(seed: int) -> None:
    """Dyadic margins, many exactly halfway between two multiples of the running sum's
    spacing (where rounding to even depends on the sum), and sums crossing many binades."""
    rng = np.random.default_rng(seed)
    n = 6_000
    zeros = np.zeros(n)
    # A huge first margin makes the sum's spacing 2**-12: margins of k * 2**-13 tie when k
    # is odd (im_to_mm tiny so that no IM is capped).
    margin = rng.integers(1, 2**8, n) * 2.0**-13
    margin[0] = 2.0**40
    _same(margin, zeros, zeros, 0, n, 1, 1e-15)
    margin[0] = 2.0**40 + 2.0**-12
    _same(margin, zeros, zeros, 0, n, 1, 1e-15)
    # Coarser and finer steps than the spacing, mixed.
    margin = rng.integers(1, 2**20, n) * 2.0 ** -int(rng.integers(10, 40))
    margin[:3] = 2.0 ** int(rng.integers(5, 30))
    _same(margin, zeros, zeros, 0, n, 1, 1e-15)
    # Growing margins: the sum crosses a binade every few chunks.
    margin = np.exp(np.linspace(-20, 20, n)) * (1 + 0.01 * rng.random(n))
    _same(margin, zeros, zeros, 0, n, 1, 1e-30)
    _same(margin, zeros, zeros, 0, n, 1, 2.0)
    # Tiny margins (sum below the range the lanes take), then normal ones.
    margin = np.r_[np.full(100, 1e-300), rng.uniform(1e-310, 1e-295, 100),
                   rng.uniform(0.01, 0.02, n - 200)]
    _same(margin, zeros, zeros, 0, n, 1, 2.0)


def test_many_short_spans() -> None:
    rng = np.random.default_rng(9)
    n = 3_000
    margin, long_loss, short_loss = _series(rng, n, 0.03, runs=True)
    margin[:20] = np.nan
    for _ in range(400):
        start = int(rng.integers(0, n))
        stop = start + int(rng.integers(0, 80))
        _same(margin, long_loss, short_loss, start, min(stop, n), int(rng.choice([1, 1, 2, 3])),
              2.0)


@pytest.mark.data
@pytest.mark.slow
def test_real_ewma_series(shared_data: Path) -> None:
    """A real 1.84M-bar series' EWMA margin and 60-bar losses, over the whole span and
    stress-window-sized pieces, overlapping and not."""
    from bench._data import tiled_instruments
    from calibration.models import EwmaMargin

    bars = tiled_instruments(shared_data, 1_840_000, 1)[0]
    model = EwmaMargin(decay=0.97, confidence=0.995, floor_rate=0.005, apc_buffer=0.5)
    rates = model.with_horizon(60).margin_rates(bars)
    long_loss, short_loss = bars.forward_losses(60)
    margin = rates.mm_rate
    start, stop = rates.first_valid_bar, len(bars) - 60
    for step in (1, 60):
        _same(margin, long_loss, short_loss, start, stop, step, rates.im_to_mm)
        _same(margin, long_loss, short_loss, 0, len(bars), step, 2.0)
    rng = np.random.default_rng(1)
    for _ in range(20):
        lo = int(rng.integers(start, stop))
        _same(margin, long_loss, short_loss, lo, min(stop, lo + int(rng.integers(1, 50_000))),
              1, 2.0)
