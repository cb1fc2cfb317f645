"""numba kernels evaluating K EWMA parameter sets over one pass of the bars.

Each kernel reproduces, operation for operation, what ``_kernels.ewma_rate`` (through
``MarginModel.margin_rates``' cap), ``_kernels.coverage_stats`` and
``_kernels.max_increase_ratio`` compute for one set, so the results are bit-for-bit those of
``coverage_backtest``: every floating-point sum adds the same terms in the same order;
counts, minima and maxima, exact however they are grouped, may be grouped otherwise (per
chunk, per block). The sets run side by side: bar t outer, set k inner, with every per-set
quantity in arrays of length K, so the K variance recursions are independent chains the CPU
overlaps (one set alone is bound by the latency of its recursion) and the compares and sums
of the breach statistics run in vector lanes across sets.
"""

from __future__ import annotations

import math
from typing import Any

import numba as nb
import numpy as np
from numpy.typing import NDArray

from calibration._kernels import (
    SHARED_OFFSET,
    _exact_increase,
    _exact_increase_from_blocks,
    _seed_variance,
)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

_JIT: dict[str, Any] = {"nogil": True, "cache": True}

#: Per-set parameter columns of ``params`` (shape ``(K, 7)``).
PARAM_COLUMNS = ("decay", "warmup_bars", "scale", "floor_rate", "multiplier", "max_rate",
                 "im_to_mm")
#: ``tested``: 0 tests the MM rate, 1 the IM rate.
TEST_MM, TEST_IM = 0, 1


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _tested_rate(var: float, floor: float, scale: float, mult: float, cap: float,
                 im_to_mm: float, tested: int) -> tuple[float, bool]:  # pragma: no cover
    """The tested rate from the variance, and whether the MM rate was capped."""
    raw = max(floor, scale * math.sqrt(var)) * mult
    capped = raw > cap
    m = cap if capped else raw
    if tested == TEST_IM:
        a = m * im_to_mm
        b = m if m > cap else cap
        m = a if a < b else b
    return m, capped


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _chunk_stats(
    rates: FloatArray, c0: int, long_loss: FloatArray,
    short_loss: FloatArray, a: int, b: int, step: int, f: FloatArray, g: IntArray, k: int,
    cap_from: float, im_to_mm: float, block_max: FloatArray, j: int,
) -> None:  # pragma: no cover - jit
    """``coverage_stats``' loop over observations ``a, a + step, ... < b`` of one set, its
    accumulators carried in ``f[:, k]`` and ``g[:, k]`` from chunk to chunk (the additions in
    the same order, so the sums are the same to the bit); ``rates[t - c0, k]`` is bar t's
    rate."""
    nobs = f[0, k]
    sum_m = f[1, k]
    min_m = f[2, k]
    max_m = f[3, k]
    im_excess = f[4, k]
    l_x, l_su, l_mu, l_sl = f[5, k], f[6, k], f[7, k], f[8, k]
    s_x, s_su, s_mu, s_sl = f[9, k], f[10, k], f[11, k], f[12, k]
    l_01, l_10, l_11 = g[0, k], g[1, k], g[2, k]
    s_01, s_10, s_11 = g[3, k], g[4, k], g[5, k]
    prev_long, prev_short = g[6, k], g[7, k]
    first_bl, first_bs = g[8, k], g[9, k]
    top = block_max[j]
    for i in range(a - c0, b - c0, step):
        t = i + c0
        m = rates[i, k]
        xl = long_loss[t]
        xs = short_loss[t]
        if math.isnan(m + xl + xs):
            continue
        if m > top:
            top = m
        nobs += 1.0
        sum_m += m
        if m < min_m:
            min_m = m
        if m > max_m:
            max_m = m
        if m > cap_from:
            im_excess += m * im_to_mm - max(m, 1.0)
        bl = 1 if xl > m else 0
        bs = 1 if xs > m else 0
        if bl:
            ul = xl - m
            l_x += 1.0
            l_su += ul
            l_sl += xl
            if ul > l_mu:
                l_mu = ul
        if bs:
            us = xs - m
            s_x += 1.0
            s_su += us
            s_sl += xs
            if us > s_mu:
                s_mu = us
        if bl | bs | prev_long | prev_short:
            l_11 += prev_long & bl
            l_01 += (1 - prev_long) & bl
            l_10 += prev_long & (1 - bl)
            s_11 += prev_short & bs
            s_01 += (1 - prev_short) & bs
            s_10 += prev_short & (1 - bs)
            if nobs == 1.0:
                first_bl = bl
                first_bs = bs
        prev_long = bl
        prev_short = bs
    f[0, k], f[1, k], f[2, k], f[3, k], f[4, k] = nobs, sum_m, min_m, max_m, im_excess
    f[5, k], f[6, k], f[7, k], f[8, k] = l_x, l_su, l_mu, l_sl
    f[9, k], f[10, k], f[11, k], f[12, k] = s_x, s_su, s_mu, s_sl
    g[0, k], g[1, k], g[2, k] = l_01, l_10, l_11
    g[3, k], g[4, k], g[5, k] = s_01, s_10, s_11
    g[6, k], g[7, k], g[8, k], g[9, k] = prev_long, prev_short, first_bl, first_bs
    block_max[j] = top


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _dense_chunk_stats(
    rates: FloatArray, c0: int, c1: int, long_loss: FloatArray, short_loss: FloatArray,
    f: FloatArray, g: IntArray, cap_from: FloatArray, im_to_mm: FloatArray,
    block_max: FloatArray, r: int, j: int, flags: NDArray[np.uint8], scratch: FloatArray,
    counts: IntArray,
) -> None:  # pragma: no cover - jit
    """``_chunk_stats`` of every set at once for a span observing every bar of
    ``[c0, c1)``, none NaN (the caller checks): the same accumulators ``f`` (13, K) and
    ``g`` (11, K), to the bit.

    Bar-major with the sets innermost, so the compares and sums run in vector lanes
    across sets: a first pass adds each set's rate to its sums (each set's additions in
    bar order, as one at a time), keeps the chunk's smallest and largest rate per set and
    stores each (bar, set)'s breach flags (bit 0 long, bit 1 short); breaches are rare, so
    a second pass visits only bars with a flag. The Christoffersen counts follow from per-
    chunk counts: with X breaches, C consecutive breach pairs (the previous observation's
    flag carried in ``g``), the previous flag p entering and the last flag b leaving,
    ``n11 += C``, ``n01 += X - C``, ``n10 += p + X - b - C``, as the scalar loop counts
    them. ``scratch`` (2, K) and ``counts`` (4, K) are work space.
    """
    k_sets = f.shape[1]
    size = c1 - c0
    sum_m = f[1]
    im_excess = f[4]
    low = scratch[0]
    high = scratch[1]
    low[:] = np.inf
    high[:] = -np.inf
    for i in range(size):
        xl = long_loss[c0 + i]
        xs = short_loss[c0 + i]
        for k in range(k_sets):
            m = rates[i, k]
            sum_m[k] += m
            lo_k = low[k]
            low[k] = m if m < lo_k else lo_k
            hi_k = high[k]
            high[k] = m if m > hi_k else hi_k
            e = im_excess[k]
            im_excess[k] = e + (m * im_to_mm[k] - (m if m > 1.0 else 1.0)) \
                if m > cap_from[k] else e
            flags[i, k] = np.uint8((xl > m) | ((xs > m) << 1))
    counts[:, :] = 0
    for i in range(size):
        seen = np.uint8(0)
        for k in range(k_sets):
            seen |= flags[i, k]
        if seen == 0:
            continue
        xl = long_loss[c0 + i]
        xs = short_loss[c0 + i]
        for k in range(k_sets):
            flag = flags[i, k]
            if flag == 0:
                continue
            prev = flags[i - 1, k] if i > 0 else g[6, k] | (g[7, k] << 1)
            m = rates[i, k]
            if flag & 1:
                ul = xl - m
                f[5, k] += 1.0
                f[6, k] += ul
                f[8, k] += xl
                if ul > f[7, k]:
                    f[7, k] = ul
                counts[0, k] += 1
                counts[1, k] += prev & 1
            if flag & 2:
                us = xs - m
                f[9, k] += 1.0
                f[10, k] += us
                f[12, k] += xs
                if us > f[11, k]:
                    f[11, k] = us
                counts[2, k] += 1
                counts[3, k] += prev >> 1
    top = block_max[:, r, j]
    for k in range(k_sets):
        first = flags[0, k]
        last = flags[size - 1, k]
        if f[0, k] == 0.0:
            g[8, k] = first & 1
            g[9, k] = first >> 1
        for side in range(2):
            x, c = counts[2 * side, k], counts[2 * side + 1, k]
            p = g[6 + side, k]
            b = (last >> side) & 1
            g[3 * side, k] += x - c
            g[3 * side + 1, k] += p + x - b - c
            g[3 * side + 2, k] += c
            g[6 + side, k] = b
        f[0, k] += size
        if low[k] < f[2, k]:
            f[2, k] = low[k]
        if high[k] > f[3, k]:
            f[3, k] = high[k]
        if high[k] > top[k]:
            top[k] = high[k]


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def ewma_coverage_batch(
    returns: FloatArray,
    squared_returns: FloatArray,
    long_loss: FloatArray,
    short_loss: FloatArray,
    params: FloatArray,
    spans: IntArray,
    tested: int,
    im_per_tested: FloatArray,
    block: int,
) -> tuple[FloatArray, IntArray, FloatArray, FloatArray, FloatArray]:  # pragma: no cover
    """Coverage counts of K EWMA parameter sets over R observation spans in one pass.

    Args:
        returns, squared_returns: one-bar log returns and their squares, shape ``(n,)``.
        long_loss, short_loss: forward losses over the sets' common horizon, ``(n,)``.
        params: per set ``PARAM_COLUMNS``, shape ``(K, 7)``.
        spans: observation grids ``(lo, hi, step)`` per set and span, shape ``(K, R, 3)``.
        tested: ``TEST_MM`` or ``TEST_IM``.
        im_per_tested: per set, IM / tested rate for the ``sum_im`` field, shape ``(K,)``.
        block: block size (bars) of the procyclicality bounds, as ``max_increase_ratio``.

    Returns:
        ``stats`` (K, R, SHARED_OFFSET + 4) in ``coverage_stats``' layout; ``capped`` (K, R)
        capped observation bars; ``block_min`` (K, B) smallest tested rate per block of
        ``block`` bars (NaN ignored, +inf when none); ``block_max`` (K, R, B) largest tested
        rate over each span's observations per block (-inf when none); ``block_var`` (K, B)
        the variance entering each block (for ``ewma_increase_batch``).
    """
    n = returns.shape[0]
    k_sets = params.shape[0]
    r_spans = spans.shape[1]
    n_blocks = (n + block - 1) // block
    decay = params[:, 0].copy()
    warm = params[:, 1].astype(np.int64)
    scale = params[:, 2].copy()
    floor = params[:, 3].copy()
    mult = params[:, 4].copy()
    cap = params[:, 5].copy()
    im_to_mm = params[:, 6].copy()
    one_minus = 1.0 - decay
    cap_from = 1.0 / im_per_tested
    var = np.zeros(k_sets)
    seed = np.zeros(k_sets)
    for k in range(k_sets):
        seed[k] = _seed_variance(returns, warm[k])
    # Accumulators per (span, field, set), named in coverage_stats' order:
    # f: nobs sum_m min_m max_m im_excess l_x l_su l_mu l_sl s_x s_su s_mu s_sl
    f = np.zeros((r_spans, 13, k_sets))
    f[:, 2] = np.inf
    f[:, 3] = -np.inf
    # g: l_01 l_10 l_11 s_01 s_10 s_11 prev_l prev_s first_bl first_bs capped
    g = np.zeros((r_spans, 11, k_sets), dtype=np.int64)
    block_min = np.full((k_sets, n_blocks), np.inf)
    block_max = np.full((k_sets, r_spans, n_blocks), -np.inf)
    block_var = np.zeros((k_sets, n_blocks))
    t_first = n
    t_last = 0
    last_warm = 0
    for k in range(k_sets):
        t_first = min(t_first, warm[k])
        last_warm = max(last_warm, warm[k])
        for r in range(r_spans):
            t_last = max(t_last, spans[k, r, 1])
    # Chunks of `chunk` bars (a divisor of `block`): first every set's rates over the chunk,
    # the K recursions side by side; then the breach statistics of every span: across sets
    # (``_dense_chunk_stats``) where the chunk lies inside every set's span and holds no
    # NaN, else per set with coverage_stats' own loop (``_chunk_stats``: warm-up edges,
    # stress-window edges, non-overlapping grids).
    chunk = 256 if block % 256 == 0 else block
    # Bar-major, sets contiguous (the recursions and the dense statistics run across sets);
    # rows padded by one so that walking one set's column (``_chunk_stats``) does not land
    # on a few L1 sets.
    rates = np.empty((chunk, k_sets + 1))
    # One byte a (bar, set): with int64 flags the chunk's flags were as large as its rates
    # (133 KB each at 64 sets) and both spilled out of L1.
    capped_now = np.zeros((chunk, k_sets + 1), dtype=np.uint8)
    flags = np.zeros((chunk, k_sets), dtype=np.uint8)
    scratch = np.empty((2, k_sets))
    counts = np.zeros((4, k_sets), dtype=np.int64)
    lowest = np.empty(k_sets)
    any_capped = np.zeros(k_sets, dtype=np.bool_)
    # Spans observing every bar (step 1) take the dense path where a whole chunk lies
    # inside every set's span; the per-set loop serves the edges and sparse grids.
    span_lo = np.zeros(r_spans, dtype=np.int64)
    span_hi = np.full(r_spans, n, dtype=np.int64)
    dense = np.zeros(r_spans, dtype=np.bool_)
    for r in range(r_spans):
        dense[r] = True
        for k in range(k_sets):
            span_lo[r] = max(span_lo[r], spans[k, r, 0])
            span_hi[r] = min(span_hi[r], spans[k, r, 1])
            dense[r] &= spans[k, r, 2] == 1
    for c0 in range((t_first // chunk) * chunk, t_last, chunk):
        c1 = min(c0 + chunk, t_last)
        j = c0 // block
        any_capped[:] = False
        if c0 % block == 0:
            for k in range(k_sets):
                block_var[k, j] = var[k]
        t_from = max(c0, t_first)
        for t in range(t_from, c1):
            i = t - c0
            r2 = squared_returns[t]
            if t > last_warm:
                # Every set is past its warm-up: no branch, the sets side by side.
                for k in range(k_sets):
                    v = decay[k] * var[k] + one_minus[k] * r2
                    var[k] = v
                    sd = scale[k] * math.sqrt(v)
                    raw = (sd if sd > floor[k] else floor[k]) * mult[k]
                    c = raw > cap[k]
                    m = cap[k] if c else raw
                    if tested == TEST_IM:
                        a_im = m * im_to_mm[k]
                        b_im = m if m > cap[k] else cap[k]
                        m = a_im if a_im < b_im else b_im
                    rates[i, k] = m
                    capped_now[i, k] = c
            else:
                for k in range(k_sets):
                    if t > warm[k]:
                        v = decay[k] * var[k] + one_minus[k] * r2
                    elif t == warm[k]:
                        v = seed[k]
                    else:
                        rates[i, k] = np.nan
                        capped_now[i, k] = 0
                        continue
                    var[k] = v
                    m, c = _tested_rate(v, floor[k], scale[k], mult[k], cap[k], im_to_mm[k],
                                        tested)
                    rates[i, k] = m
                    capped_now[i, k] = c
            for k in range(k_sets):
                any_capped[k] |= capped_now[i, k] != 0
        # The block minima (NaN compares false), and whether the chunk holds a NaN.
        for k in range(k_sets):
            lowest[k] = block_min[k, j]
        has_nan = False
        for t in range(t_from, c1):
            nan_row = math.isnan(long_loss[t] + short_loss[t])
            for k in range(k_sets):
                m = rates[t - c0, k]
                lo_k = lowest[k]
                lowest[k] = m if m < lo_k else lo_k
                nan_row |= m != m
            has_nan |= nan_row
        for k in range(k_sets):
            block_min[k, j] = lowest[k]
        for r in range(r_spans):
            for k in range(k_sets):
                if any_capped[k]:
                    lo, hi, step = spans[k, r, 0], spans[k, r, 1], spans[k, r, 2]
                    a = max(c0, lo)
                    b = min(c1, hi)
                    if step > 1 and (a - lo) % step:
                        a += step - (a - lo) % step
                    # Capped bars are counted on the grid whatever their losses.
                    for i in range(a - c0, b - c0, step):
                        g[r, 10, k] += capped_now[i, k]
            if dense[r] and not has_nan and span_lo[r] <= c0 and c1 <= span_hi[r]:
                _dense_chunk_stats(rates, c0, c1, long_loss, short_loss, f[r], g[r],
                                   cap_from, im_per_tested, block_max, r, j, flags,
                                   scratch, counts)
                continue
            for k in range(k_sets):
                lo, hi, step = spans[k, r, 0], spans[k, r, 1], spans[k, r, 2]
                a = max(c0, lo)
                b = min(c1, hi)
                if step > 1 and (a - lo) % step:
                    a += step - (a - lo) % step
                if a >= b:
                    continue
                _chunk_stats(rates, c0, long_loss, short_loss, a, b, step,
                             f[r], g[r], k, cap_from[k], im_per_tested[k], block_max[k, r], j)
    stats = np.zeros((k_sets, r_spans, SHARED_OFFSET + 4))
    for k in range(k_sets):
        for r in range(r_spans):
            n_obs = f[r, 0, k]
            pairs = max(n_obs - 1.0, 0.0)
            l_01 = g[r, 0, k] - g[r, 8, k]
            s_01 = g[r, 3, k] - g[r, 9, k]
            l_10, l_11 = g[r, 1, k], g[r, 2, k]
            s_10, s_11 = g[r, 4, k], g[r, 5, k]
            side_l = (n_obs, f[r, 5, k], f[r, 6, k], f[r, 7, k], f[r, 8, k],
                      pairs - l_01 - l_10 - l_11, float(l_01), float(l_10), float(l_11))
            side_s = (n_obs, f[r, 9, k], f[r, 10, k], f[r, 11, k], f[r, 12, k],
                      pairs - s_01 - s_10 - s_11, float(s_01), float(s_10), float(s_11))
            for q in range(9):
                stats[k, r, q] = side_l[q]
                stats[k, r, 9 + q] = side_s[q]
            stats[k, r, SHARED_OFFSET] = f[r, 1, k]
            stats[k, r, SHARED_OFFSET + 1] = f[r, 2, k]
            stats[k, r, SHARED_OFFSET + 2] = f[r, 3, k]
            stats[k, r, SHARED_OFFSET + 3] = f[r, 1, k] * im_per_tested[k] - f[r, 4, k]
    capped_count = g[:, 10].T.copy()
    return stats, capped_count, block_min, block_max, block_var


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _regenerate(
    returns: FloatArray, squared_returns: FloatArray, row: FloatArray, tested: int,
    block_var: FloatArray, block: int, a: int, b: int, out: FloatArray,
) -> None:  # pragma: no cover - jit
    """The tested rates of one set (``row``: its ``PARAM_COLUMNS``) at bars ``[a, b)`` into
    ``out[a:b]``, restarting the recursion from the variance saved at ``a``'s block."""
    decay = row[0]
    warm = np.int64(row[1])
    one_minus = 1.0 - decay
    t0 = (a // block) * block
    var = block_var[a // block]
    for t in range(t0, b):
        if t > warm:
            var = decay * var + one_minus * squared_returns[t]
        elif t == warm:
            var = _seed_variance(returns, warm)
        else:
            if t >= a:
                out[t] = np.nan
            continue
        if t >= a:
            out[t] = _tested_rate(var, row[3], row[2], row[4], row[5], row[6], tested)[0]


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def ewma_increase_batch(
    returns: FloatArray,
    squared_returns: FloatArray,
    long_loss: FloatArray,
    params: FloatArray,
    spans: IntArray,
    tested: int,
    block_min: FloatArray,
    block_max: FloatArray,
    block_var: FloatArray,
    block: int,
    trail: int,
) -> FloatArray:  # pragma: no cover - jit
    """``max_increase_ratio`` of every set and span, shape ``(K, R)``, from the block bounds
    of ``ewma_coverage_batch``: blocks are evaluated exactly (the rates regenerated from the
    saved variance) in decreasing order of their bound until no bound can beat the best.
    With a trail of at least two blocks only the blocks at a window's two ends are
    regenerated (``_exact_increase_from_blocks``), not the whole trail; in block 0, where
    windows start at bar 0, the block itself (regenerated as the head block) is scanned."""
    n = returns.shape[0]
    k_sets = params.shape[0]
    r_spans = spans.shape[1]
    n_blocks = block_min.shape[1]
    reach = (trail - 1 + block - 1) // block
    out = np.zeros((k_sets, r_spans))
    buf = np.empty(n)
    for k in range(k_sets):
        for r in range(r_spans):
            lo, hi, step = spans[k, r, 0], spans[k, r, 1], spans[k, r, 2]
            if hi <= lo:
                continue
            bound = np.zeros(n_blocks)
            for j in range(lo // block, (hi - 1) // block + 1):
                low = np.inf
                for q in range(max(0, j - reach), j + 1):
                    if block_min[k, q] < low:
                        low = block_min[k, q]
                if block_max[k, r, j] > 0.0 and low < np.inf:
                    bound[j] = block_max[k, r, j] / low
            order = np.argsort(-bound)
            best = 0.0
            for i in range(n_blocks):
                j = order[i]
                if bound[j] <= best:
                    break
                b_lo = max(j * block, lo)
                b_hi = min(j * block + block, hi)
                first = max(b_lo - trail + 1, 0)
                if trail >= 2 * block:
                    # Only the head blocks and block j bar by bar; the blocks between by
                    # their minima.
                    h0 = (first // block) * block
                    h1 = (max(b_hi - trail, 0) // block + 1) * block
                    _regenerate(returns, squared_returns, params[k], tested, block_var[k],
                                block, h0, h1, buf)
                    _regenerate(returns, squared_returns, params[k], tested, block_var[k],
                                block, j * block, b_hi, buf)
                    ratio = _exact_increase_from_blocks(buf, long_loss, block_min[k], 0, b_lo,
                                                        b_hi, lo, step, trail, block)
                else:
                    _regenerate(returns, squared_returns, params[k], tested, block_var[k],
                                block, first, b_hi, buf)
                    ratio = _exact_increase(buf, long_loss, b_lo, b_hi, lo, step, trail)
                if ratio > best:
                    best = ratio
            out[k, r] = best
    return out
