"""The procyclicality kernels as they were before the block-minimum rewrite (commit 8dc041a),
copied verbatim and compiled, so the new ones can be checked against them to the bit at
real sizes: ``max_increase_ratio`` (one pass over margin and loss for the block bounds,
every candidate block rescanned with its whole trail by ``exact_increase``) and the batch
kernel's ``exact_increase_from_blocks``."""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


@nb.njit  # type: ignore[untyped-decorator]
def exact_increase(
    margin: FloatArray, loss: FloatArray, lo: int, hi: int, start: int, step: int, trail: int
) -> float:  # pragma: no cover - jit
    first = max(lo - trail + 1, 0)
    size = hi - first
    prefix = np.empty(size)
    suffix = np.empty(size)
    for i in range(size):
        v = margin[first + i]
        v = np.inf if math.isnan(v) else v
        if i % trail == 0 or v < prefix[i - 1]:
            prefix[i] = v
        else:
            prefix[i] = prefix[i - 1]
    for i in range(size - 1, -1, -1):
        v = margin[first + i]
        v = np.inf if math.isnan(v) else v
        if i == size - 1 or (i + 1) % trail == 0 or v < suffix[i + 1]:
            suffix[i] = v
        else:
            suffix[i] = suffix[i + 1]
    best = 0.0
    t0 = lo
    if t0 < start:
        t0 = start
    rem = (t0 - start) % step
    if rem:
        t0 += step - rem
    for t in range(t0, hi, step):
        if math.isnan(loss[t]) or math.isnan(margin[t]):
            continue
        i = t - first
        j = i - trail + 1
        low = prefix[i]
        if j >= 0 and suffix[j] < low:
            low = suffix[j]
        ratio = margin[t] / low
        if ratio > best:
            best = ratio
    return best


@nb.njit  # type: ignore[untyped-decorator]
def max_increase_ratio(
    margin: FloatArray, loss: FloatArray, start: int, stop: int, step: int, trail: int,
    block: int,
) -> float:  # pragma: no cover - jit
    if stop <= start:
        return 0.0
    lo_bar = max(start - trail + 1, 0)
    first_block = lo_bar // block
    last_block = (stop - 1) // block
    nblocks = last_block - first_block + 1
    bmin = np.full(nblocks, np.inf)
    bmax = np.full(nblocks, -np.inf)
    j = 0
    count = 0
    mn = np.inf
    mx = -np.inf
    for t in range(first_block * block, stop):
        v = margin[t]
        if v < mn:
            mn = v
        if t >= start and v > mx and not math.isnan(loss[t]):
            mx = v
        count += 1
        if count == block:
            bmin[j] = mn
            bmax[j] = mx
            j += 1
            count = 0
            mn = np.inf
            mx = -np.inf
    if count:
        bmin[j] = mn
        bmax[j] = mx
    reach = (trail - 1 + block - 1) // block
    bound = np.zeros(nblocks)
    for j in range(nblocks):
        low = np.inf
        for k in range(max(0, j - reach), j + 1):
            if bmin[k] < low:
                low = bmin[k]
        if bmax[j] > 0.0 and low < np.inf:
            bound[j] = bmax[j] / low
    order = np.argsort(-bound)
    best = 0.0
    for r in range(nblocks):
        j = order[r]
        if bound[j] <= best:
            break
        lo = (first_block + j) * block
        hi = min(lo + block, stop)
        ratio = exact_increase(margin, loss, max(lo, start), hi, start, step, trail)
        if ratio > best:
            best = ratio
    return best


@nb.njit  # type: ignore[untyped-decorator]
def exact_increase_from_blocks(
    margin: FloatArray, loss: FloatArray, block_min: FloatArray, lo: int, hi: int,
    start: int, step: int, trail: int, block: int,
) -> float:  # pragma: no cover - jit
    j = lo // block
    j0 = j * block
    first = max(lo - trail + 1, 0)
    q0 = first // block
    q1 = max(hi - trail, 0) // block
    h0 = q0 * block
    size = (q1 + 1) * block - h0
    suffix = np.empty(size)
    for i in range(size - 1, -1, -1):
        v = margin[h0 + i]
        v = np.inf if math.isnan(v) else v
        if (i + 1) % block == 0 or v < suffix[i + 1]:
            suffix[i] = v
        else:
            suffix[i] = suffix[i + 1]
    mid0 = np.inf
    for q in range(q0 + 1, j):
        if block_min[q] < mid0:
            mid0 = block_min[q]
    mid1 = np.inf
    for q in range(q1 + 1, j):
        if block_min[q] < mid1:
            mid1 = block_min[q]
    t0 = lo
    if t0 < start:
        t0 = start
    rem = (t0 - start) % step
    if rem:
        t0 += step - rem
    best = 0.0
    run = np.inf
    for t in range(j0, hi):
        v = margin[t]
        v = np.inf if math.isnan(v) else v
        if v < run:
            run = v
        if t < t0 or (t - t0) % step:
            continue
        if math.isnan(loss[t]) or math.isnan(margin[t]):
            continue
        w = max(t - trail + 1, 0)
        low = suffix[w - h0]
        mid = mid0 if w // block == q0 else mid1
        if mid < low:
            low = mid
        if run < low:
            low = run
        ratio = margin[t] / low
        if ratio > best:
            best = ratio
    return best
