"""numba kernels for the hot loops; each has a plain reference in tests/reference.py.

Kernels take and return float64 arrays of shape ``(n,)`` (one value per bar) unless stated.
They are compiled once per machine (``cache=True``) since every CLI run and every worker
process would otherwise pay ~0.65 s of compilation per kernel.
"""

from __future__ import annotations

import math
from typing import Any

import numba as nb
import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

_JIT: dict[str, Any] = {"nogil": True, "cache": True}


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _forward_losses(
    low: FloatArray, high: FloatArray, close: FloatArray, horizon: int
) -> FloatArray:  # pragma: no cover - jit
    """``1 - min(low[t+1..t+h]) / close[t]`` (row 0) and ``max(high[t+1..t+h]) / close[t] - 1``
    (row 1), shape ``(2, n)``, NaN for the last ``h`` bars.

    van Herk / Gil-Werman over blocks of ``h`` bars: for a window starting at s in block j,
    the minimum is min(suffix minimum of block j from s, prefix minimum of block j+1 up to
    s+h-1), so each bar costs two comparisons whatever h. The suffix minima live in a
    block-sized buffer and the prefix minimum in a register. The output is written once:
    every bar with a full horizon is set by the loop, so only the last ``h`` are filled with
    NaN (a NaN pre-fill of the whole output, then a copy into one array, cost as much as
    the loop on a fresh series: first-touch page faults on two extra n-sized arrays).
    """
    n = close.shape[0]
    out = np.empty((2, n))
    long_loss = out[0]
    short_loss = out[1]
    w = horizon
    if w <= 0 or w >= n:
        out[:, :] = np.nan
        return out
    for t in range(n - w, n):
        long_loss[t] = np.nan
        short_loss[t] = np.nan
    lo_buf = np.empty(w)
    hi_buf = np.empty(w)
    # Windows start at s = t + 1 for t = 0 .. n - w - 1, i.e. s = 1 .. n - w.
    for j0 in range(1, n - w + 1, w):
        e = min(j0 + w, n)
        run_lo = np.inf
        run_hi = -np.inf
        for i in range(e - 1, j0 - 1, -1):
            v = low[i]
            run_lo = v if v < run_lo else run_lo
            lo_buf[i - j0] = run_lo
            v = high[i]
            run_hi = v if v > run_hi else run_hi
            hi_buf[i - j0] = run_hi
        # The window starting at the block's first bar is the block itself.
        if j0 + w - 1 < n:
            long_loss[j0 - 1] = 1.0 - lo_buf[0] / close[j0 - 1]
            short_loss[j0 - 1] = hi_buf[0] / close[j0 - 1] - 1.0
        run_lo = np.inf
        run_hi = -np.inf
        for s in range(j0 + 1, e):
            i = s + w - 1
            if i >= n:
                break
            v = low[i]
            run_lo = v if v < run_lo else run_lo
            v = high[i]
            run_hi = v if v > run_hi else run_hi
            a = lo_buf[s - j0]
            b = hi_buf[s - j0]
            long_loss[s - 1] = 1.0 - (a if a < run_lo else run_lo) / close[s - 1]
            short_loss[s - 1] = (b if b > run_hi else run_hi) / close[s - 1] - 1.0
    return out


def forward_losses_pair(
    low: FloatArray, high: FloatArray, close: FloatArray, horizon_bars: int
) -> FloatArray:
    """Long (row 0) and short (row 1) losses over the next ``horizon_bars`` bars, fractions
    of notional, shape ``(2, n)``; NaN for the last ``horizon_bars`` bars."""
    result: FloatArray = _forward_losses(low, high, close, horizon_bars)
    return result


def forward_losses(
    low: FloatArray, high: FloatArray, close: FloatArray, horizon_bars: int
) -> tuple[FloatArray, FloatArray]:
    """Long and short losses over the next ``horizon_bars`` bars (fractions of notional)."""
    pair = forward_losses_pair(low, high, close, horizon_bars)
    return pair[0], pair[1]


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _seed_variance(returns: FloatArray, warmup_bars: int) -> float:  # pragma: no cover - jit
    """Sample variance (ddof=1) of ``returns[1 .. warmup_bars]``: the EWMA's seed."""
    mean = 0.0
    for t in range(1, warmup_bars + 1):
        mean += returns[t]
    mean /= warmup_bars
    ss = 0.0
    for t in range(1, warmup_bars + 1):
        d = returns[t] - mean
        ss += d * d
    result: float = ss / (warmup_bars - 1)
    return result


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def ewma_variance(
    returns: FloatArray, squared_returns: FloatArray, decay: float, warmup_bars: int
) -> FloatArray:  # pragma: no cover - jit
    """EWMA variance per bar (domain.md §2), NaN before the end of the warm-up.

    ``returns[t] = ln(C_t / C_{t-1})`` and ``squared_returns[t] = returns[t]**2`` (element 0
    of both unused). The variance at bar ``warmup_bars`` is the sample variance (ddof=1) of
    ``r_1 .. r_warmup``; after it ``var_t = decay * var_{t-1} + (1 - decay) * r_t**2``. Only
    bars up to ``t`` enter ``var_t``.
    """
    n = returns.shape[0]
    out = np.full(n, np.nan)
    if warmup_bars < 2 or warmup_bars >= n:
        return out
    var = _seed_variance(returns, warmup_bars)
    out[warmup_bars] = var
    one_minus = 1.0 - decay
    for t in range(warmup_bars + 1, n):
        var = decay * var + one_minus * squared_returns[t]
        out[t] = var
    return out


#: Layout of ``coverage_stats`` output: per side (offset 0 long, 9 short) then shared values.
SIDE_FIELDS = ("observations", "breaches", "sum_uncovered", "max_uncovered",
               "sum_loss_in_breach", "n00", "n01", "n10", "n11")
SHARED_OFFSET = 2 * len(SIDE_FIELDS)
SHARED_FIELDS = ("sum_margin", "min_margin", "max_margin", "sum_im")


#: Bars per chunk of ``coverage_stats``' fast path (a multiple of 8, the min/max tree's width).
_CHUNK = 16


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _lesser(a: float, b: float) -> float:  # pragma: no cover - jit
    return b if b < a else a


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _greater(a: float, b: float) -> float:  # pragma: no cover - jit
    return b if b > a else a


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _min8(x: FloatArray, t: int) -> float:  # pragma: no cover - jit
    """Smallest of ``x[t : t + 8]`` (no NaN), as a tree: independent compares, not a chain."""
    res: float = _lesser(_lesser(_lesser(x[t], x[t + 4]), _lesser(x[t + 2], x[t + 6])),
                         _lesser(_lesser(x[t + 1], x[t + 5]), _lesser(x[t + 3], x[t + 7])))
    return res


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _max8(x: FloatArray, t: int) -> float:  # pragma: no cover - jit
    """Largest of ``x[t : t + 8]`` (no NaN), as a tree."""
    res: float = _greater(_greater(_greater(x[t], x[t + 4]), _greater(x[t + 2], x[t + 6])),
                          _greater(_greater(x[t + 1], x[t + 5]),
                                   _greater(x[t + 3], x[t + 7])))
    return res


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def coverage_stats(
    margin: FloatArray,
    long_loss: FloatArray,
    short_loss: FloatArray,
    start: int,
    stop: int,
    step: int,
    im_to_mm: float,
) -> FloatArray:  # pragma: no cover - jit
    """Breach statistics of both sides in one pass over observation bars.

    Observations are bars ``start, start+step, ... < stop`` where margin and both losses are
    not NaN. For each side the output holds ``SIDE_FIELDS`` (``nij`` count transitions from
    breach state i to j between consecutive observations, Christoffersen), then
    ``SHARED_FIELDS``; ``sum_im`` adds ``min(margin * im_to_mm, max(margin, 1))``, the IM
    with its 100% cap. Scalars, not ``out[...]``, are updated in the loop (array stores would
    chain through memory), and min/max are plain comparisons (numba's ``min``/``max`` carry
    NaN handling that costs more than the rest of the loop).

    With ``step == 1`` the bars go by chunks of ``_CHUNK``. A chunk without NaN, breach,
    capped margin or margin <= 0, after an observation without breach, only adds to the
    count and the margin sum (and to min/max when it holds a new extreme): that is checked
    and summed in vector lanes, and any other chunk runs the bar-by-bar loop. The margin sum
    stays the one bar by bar in observation order, to the bit, without its chain of
    dependent additions: while the running sum s stays in one binade [2^e, 2^(e+1)), whose
    spacing is g = 2^(e-52), each rounded addition s + m lands on s + r with r the multiple
    of g nearest to m (``(s + m) - s``, exact), unless m is halfway between two multiples
    (then rounding to even depends on s: such chunks, and those that would leave the
    binade, take the loop). The r are multiples of g, so their total (an integer count of
    g) is exact in any order, and the chunk's sum is s plus that total.
    """
    nobs = 0
    sum_m = 0.0
    min_m = np.inf
    max_m = -np.inf
    l_x = l_su = l_mu = l_sl = 0.0
    s_x = s_su = s_mu = s_sl = 0.0
    l_01 = l_10 = l_11 = s_01 = s_10 = s_11 = 0
    prev_long = prev_short = 0
    first_bl = first_bs = 0
    cap_from = 1.0 / im_to_mm  # margins above this have their IM capped
    im_excess = 0.0
    # The running sum's binade [lower, upper), its spacing and half of it; upper = 0 until
    # the sum is positive (then no chunk passes: |d| < 0 never holds).
    lower = np.inf
    upper = 0.0
    spacing = inv_spacing = half = 0.0
    chunked = step == 1
    t = start
    while t < stop:
        # A negative start indexes from the end, as the loop does: left to the loop.
        if chunked and t >= 0 and t + _CHUNK <= stop and (prev_long | prev_short) == 0:
            s = sum_m
            if not lower <= s < upper:
                if 1e-290 < s < 1e290:  # spacing and its inverse stay normal and finite
                    _, e = math.frexp(s)  # s = f * 2^e with 0.5 <= f < 1
                    upper = math.ldexp(1.0, e)
                    lower = 0.5 * upper
                    spacing = math.ldexp(1.0, e - 53)
                    inv_spacing = math.ldexp(1.0, 53 - e)
                    half = 0.5 * spacing
                else:
                    lower = np.inf
                    upper = spacing = inv_spacing = half = 0.0
            quiet = True
            inside = True
            units = np.int64(0)
            for i in range(_CHUNK):
                m = margin[t + i]
                xl = long_loss[t + i]
                xs = short_loss[t + i]
                r = (s + m) - s
                d = m - r  # exact: |d| <= spacing / 2
                # No test of m + xl + xs for NaN: with xl, xs <= m < upper it is not.
                quiet &= (xl <= m) & (xs <= m) & (m <= cap_from) & (m > 0.0) & (abs(d) < half)
                inside &= (m >= min_m) & (m <= max_m)
                # Clipped to [0, upper] so that the conversion is defined whatever the bar.
                r = r if r > 0.0 else 0.0
                r = r if r < upper else upper
                units += np.int64(r * inv_spacing)
            if quiet:
                # Exact when below upper (units < 2^53); at or above it, the loop.
                total = s + float(units) * spacing
                if total < upper:
                    sum_m = total
                    nobs += _CHUNK
                    if not inside:  # margins are > 0 here: no -0.0 to tell from 0.0
                        lo = _min8(margin, t)
                        hi = _max8(margin, t)
                        for j in range(t + 8, t + _CHUNK, 8):
                            lo = _lesser(lo, _min8(margin, j))
                            hi = _greater(hi, _max8(margin, j))
                        min_m = _lesser(min_m, lo)
                        max_m = _greater(max_m, hi)
                    t += _CHUNK
                    continue
        end = min(t + _CHUNK, stop) if chunked else stop
        for u in range(t, end, step):
            m = margin[u]
            xl = long_loss[u]
            xs = short_loss[u]
            if math.isnan(m + xl + xs):  # one test for three NaN checks (values are finite)
                continue
            nobs += 1
            sum_m += m
            if m < min_m:
                min_m = m
            if m > max_m:
                max_m = m
            if m > cap_from:
                im_excess += m * im_to_mm - max(m, 1.0)
            bl = 1 if xl > m else 0
            bs = 1 if xs > m else 0
            # Breaches are rare: branches predict well and skip the arithmetic.
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
                if nobs == 1:  # the first observation has no predecessor
                    first_bl = bl
                    first_bs = bs
            prev_long = bl
            prev_short = bs
        t = end
    l_01 -= first_bl
    s_01 -= first_bs
    n = float(nobs)
    pairs = max(n - 1.0, 0.0)
    out = np.zeros(SHARED_OFFSET + 4)
    side_l = (n, l_x, l_su, l_mu, l_sl, pairs - l_01 - l_10 - l_11,
              float(l_01), float(l_10), float(l_11))
    side_s = (n, s_x, s_su, s_mu, s_sl, pairs - s_01 - s_10 - s_11,
              float(s_01), float(s_10), float(s_11))
    for k in range(9):
        out[k] = side_l[k]
        out[9 + k] = side_s[k]
    out[SHARED_OFFSET] = sum_m
    out[SHARED_OFFSET + 1] = min_m
    out[SHARED_OFFSET + 2] = max_m
    out[SHARED_OFFSET + 3] = sum_m * im_to_mm - im_excess
    return out


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _block_bounds(bmin: FloatArray, bmax: FloatArray, trail: int,
                  block: int) -> FloatArray:  # pragma: no cover - jit
    """Per block, an upper bound of its windows' increase ratio: its largest margin over the
    smallest margin of every block a window ending in it can reach (0 where it has none)."""
    nblocks = bmin.shape[0]
    # Smallest margin any window ending in block j can see: blocks j-reach .. j.
    reach = (trail - 1 + block - 1) // block
    bound = np.zeros(nblocks)
    for j in range(nblocks):
        low = np.inf
        for k in range(max(0, j - reach), j + 1):
            if bmin[k] < low:
                low = bmin[k]
        if bmax[j] > 0.0 and low < np.inf:
            bound[j] = bmax[j] / low
    return bound


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _exact_increase(
    margin: FloatArray, loss: FloatArray, lo: int, hi: int, start: int, step: int, trail: int
) -> float:  # pragma: no cover - jit
    """Largest ``margin[t] / min(margin[t-trail+1 .. t])`` over observations t in [lo, hi)."""
    first = max(lo - trail + 1, 0)
    size = hi - first
    # van Herk / Gil-Werman over [first, hi) with blocks of `trail` counted from `first`.
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


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _exact_increase_from_blocks(
    margin: FloatArray, loss: FloatArray, block_min: FloatArray, block_base: int, lo: int,
    hi: int, start: int, step: int, trail: int, block: int,
) -> float:  # pragma: no cover - jit
    """``_exact_increase`` over observations in ``[lo, hi)``, one block of ``block`` bars,
    for ``trail >= 2 * block``: the window ``[t - trail + 1, t]`` of a bar in block j is the
    tail of a head block q < j, the whole blocks q+1 .. j-1 (their minima
    ``block_min[q - block_base]``, NaN ignored as +inf) and block j up to t. ``margin`` need
    hold the head blocks (those of ``lo - trail + 1`` and ``hi - trail``) and block j only.
    The minimum is the same value whichever way it is grouped (but for the sign of a zero),
    so the ratios are those of ``_exact_increase`` to the bit. In block 0 the windows start
    at bar 0, inside block j itself: there is no head block, and ``_exact_increase`` (over
    bars ``[0, hi)``) serves."""
    j = lo // block
    j0 = j * block
    first = max(lo - trail + 1, 0)
    q0 = first // block
    q1 = max(hi - trail, 0) // block
    if q1 >= j:
        return float(_exact_increase(margin, loss, lo, hi, start, step, trail))
    h0 = q0 * block
    # Suffix minima of each head block (NaN compares false: +inf), restarting at block ends.
    suffix = np.empty((q1 + 1) * block - h0)
    for q in range(q1 - q0 + 1):
        low = np.inf
        for i in range((q + 1) * block - 1, q * block - 1, -1):
            v = margin[h0 + i]
            if v < low:
                low = v
            suffix[i] = low
    # Minima of the whole blocks between each head block and block j.
    mid0 = np.inf
    for q in range(q0 + 1, j):
        if block_min[q - block_base] < mid0:
            mid0 = block_min[q - block_base]
    mid1 = np.inf
    for q in range(q1 + 1, j):
        if block_min[q - block_base] < mid1:
            mid1 = block_min[q - block_base]
    head_end = h0 + block
    t0 = lo
    if t0 < start:
        t0 = start
    rem = (t0 - start) % step
    if rem:
        t0 += step - rem
    best = 0.0
    run = np.inf  # minimum of block j up to t
    for u in range(j0, min(t0, hi)):
        v = margin[u]
        if v < run:
            run = v
    if step == 1:
        # Every bar observed: the same compares as below, as selects (no branches).
        for t in range(t0, hi):
            v = margin[t]
            run = v if v < run else run
            w = max(t - trail + 1, 0)
            low = suffix[w - h0]
            mid = mid0 if w < head_end else mid1
            low = mid if mid < low else low
            low = run if run < low else low
            # Divides where the loop below does (a zero minimum raises ZeroDivisionError).
            ratio = v / low if loss[t] == loss[t] and v == v else 0.0
            best = ratio if ratio > best else best
        return best
    u = t0
    for t in range(t0, hi, step):
        while u <= t:
            v = margin[u]
            if v < run:
                run = v
            u += 1
        if math.isnan(loss[t]) or math.isnan(margin[t]):
            continue
        w = max(t - trail + 1, 0)
        low = suffix[w - h0]
        mid = mid0 if w < head_end else mid1
        if mid < low:
            low = mid
        if run < low:
            low = run
        ratio = margin[t] / low
        if ratio > best:
            best = ratio
    return best


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _block_extrema(x: FloatArray, a: int, b: int) -> tuple[float, float]:  # pragma: no cover
    """Smallest and largest of ``x[a:b]``, NaN ignored (``(inf, -inf)`` when none)."""
    y = x[a:b]  # indices from 0: no negative-index wrap-around in the loop
    n = y.size
    n4 = n - n % 4
    # Four independent chains per extremum: one chain is bound by the compare's latency.
    l0 = l1 = l2 = l3 = np.inf
    h0 = h1 = h2 = h3 = -np.inf
    for i in range(0, n4, 4):
        v = y[i]
        l0 = v if v < l0 else l0  # NaN compares false: never enters
        h0 = v if v > h0 else h0
        v = y[i + 1]
        l1 = v if v < l1 else l1
        h1 = v if v > h1 else h1
        v = y[i + 2]
        l2 = v if v < l2 else l2
        h2 = v if v > h2 else h2
        v = y[i + 3]
        l3 = v if v < l3 else l3
        h3 = v if v > h3 else h3
    for i in range(n4, n):
        v = y[i]
        l0 = v if v < l0 else l0
        h0 = v if v > h0 else h0
    l0 = l1 if l1 < l0 else l0
    l2 = l3 if l3 < l2 else l2
    h0 = h1 if h1 > h0 else h0
    h2 = h3 if h3 > h2 else h2
    return (l2 if l2 < l0 else l0), (h2 if h2 > h0 else h0)


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _max_increase_ratio_any_sign(
    margin: FloatArray, loss: FloatArray, start: int, stop: int, step: int, trail: int,
    block: int,
) -> float:  # pragma: no cover - jit
    """``max_increase_ratio`` as first written, for series with a margin <= 0: there the
    block bounds are not upper bounds, the result depends on the order the blocks are
    evaluated in, and only this very formulation gives the same one."""
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
        if v < mn:  # NaN compares false: warm-up bars never enter
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
    bound = _block_bounds(bmin, bmax, trail, block)
    order = np.argsort(-bound)
    best = 0.0
    for r in range(nblocks):
        j = order[r]
        if bound[j] <= best:
            break
        lo = (first_block + j) * block
        hi = min(lo + block, stop)
        ratio = _exact_increase(margin, loss, max(lo, start), hi, start, step, trail)
        if ratio > best:
            best = ratio
    return best


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def max_increase_ratio(
    margin: FloatArray,
    loss: FloatArray,
    start: int,
    stop: int,
    step: int,
    trail: int,
    block: int,
) -> float:  # pragma: no cover - jit
    """Largest ``margin[t] / min(margin[t-trail+1 .. t])`` over observations (procyclicality).

    Observations are ``t = start, start+step, ... < stop`` where neither ``margin[t]`` nor
    ``loss[t]`` is NaN; NaN margins (warm-up) count as +inf in the minimum. Exact, but most
    of the series is never looked at bar by bar: per block of ``block`` bars the ratio is
    bounded above by the block's largest margin over the smallest margin of every block a
    window can reach; blocks are then evaluated exactly (van Herk / Gil-Werman) in
    decreasing order of that bound until the bound cannot beat the best ratio found.
    Returns 0 without observations.
    """
    if stop <= start:
        return 0.0
    lo_bar = max(start - trail + 1, 0)
    first_block = lo_bar // block
    last_block = (stop - 1) // block
    nblocks = last_block - first_block + 1
    bmin = np.empty(nblocks)
    bmax = np.empty(nblocks)
    # The bound need only be an upper bound: with positive margins the result is the
    # largest exact ratio of any block, whichever blocks the pruning evaluates. So the
    # block maximum takes every bar from `start` on, NaN losses too, and the pass reads
    # the margins only (it is bound by memory bandwidth).
    for j in range(nblocks):
        b0 = (first_block + j) * block
        b1 = min(b0 + block, stop)
        a = min(max(b0, start), b1)
        mn, mx = _block_extrema(margin, a, b1)
        if a > b0:
            before = _block_extrema(margin, b0, a)[0]
            mn = before if before < mn else mn
        bmin[j] = mn
        bmax[j] = mx
    for j in range(nblocks):
        if not bmin[j] > 0.0:  # NaN never enters a minimum; +inf (no margin) is > 0
            return float(_max_increase_ratio_any_sign(margin, loss, start, stop, step, trail,
                                                      block))
    bound = _block_bounds(bmin, bmax, trail, block)
    order = np.argsort(-bound)
    best = 0.0
    for r in range(nblocks):
        j = order[r]
        if bound[j] <= best:
            break
        lo = max((first_block + j) * block, start)
        hi = min((first_block + j + 1) * block, stop)
        if trail >= 2 * block:
            # Margins are positive: every window minimum is one nonzero value, however
            # grouped, so the blocks strictly inside a window enter by their minima.
            ratio = _exact_increase_from_blocks(margin, loss, bmin, first_block, lo, hi,
                                                start, step, trail, block)
        else:
            ratio = _exact_increase(margin, loss, lo, hi, start, step, trail)
        if ratio > best:
            best = ratio
    return best


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def ewma_rate(
    returns: FloatArray,
    squared_returns: FloatArray,
    decay: float,
    warmup_bars: int,
    scale: float,
    floor_rate: float,
    multiplier: float,
) -> FloatArray:  # pragma: no cover - jit
    """``max(floor_rate, scale * sigma_t) * multiplier`` with sigma from ``ewma_variance``.

    One pass: the square root is off the recursion's dependency chain, so fusing it costs
    little, and the variance series is never stored.
    """
    n = returns.shape[0]
    if warmup_bars < 2 or warmup_bars >= n:
        return np.full(n, np.nan)
    # Written once: NaN over the warm-up only (a full NaN pre-fill is one more pass).
    out = np.empty(n)
    out[:warmup_bars] = np.nan
    var = _seed_variance(returns, warmup_bars)
    out[warmup_bars] = max(floor_rate, scale * math.sqrt(var)) * multiplier
    one_minus = 1.0 - decay
    for t in range(warmup_bars + 1, n):
        var = decay * var + one_minus * squared_returns[t]
        out[t] = max(floor_rate, scale * math.sqrt(var)) * multiplier
    return out


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def ewma_margin(
    returns: FloatArray,
    squared_returns: FloatArray,
    decay: float,
    warmup_bars: int,
    scale: float,
    floor_rate: float,
    multiplier: float,
    cap: float,
    im_to_mm: float,
) -> tuple[FloatArray, BoolArray, int, float, int]:  # pragma: no cover - jit
    """``ewma_rate`` capped at ``cap`` and the IM rates' sum, in one pass over the bars.

    Returns ``(mm, capped, n_capped, im_sum, im_count)``: ``mm`` is
    ``np.minimum(ewma_rate(...), cap)`` and ``capped`` its ``> cap`` mask (``cap_rates``),
    ``n_capped`` the bars capped; ``im_sum, im_count`` are what
    ``im_rate_sum(mm, warmup_bars, im_to_mm, cap)`` returns, numpy's pairwise sum to the bit.

    Why one pass: a trial reads each five-year series of minute bars (14.7 MB) once for
    the rates, once more to look for a rate above the cap, once to cap it, and once for
    the capital cost's IM sum; the last three came to more than half of the recursion's own
    time. Here the bars are produced leaf by leaf of the pairwise sum's tree (at most 128
    bars, still in L1 when summed) and the tree is walked with an explicit stack, so the
    leaves and the order of every addition are numpy's. Needs ``2 <= warmup_bars < n``.
    """
    n = returns.shape[0]
    mm = np.empty(n)
    capped = np.empty(n, dtype=np.bool_)
    mm[:warmup_bars] = np.nan
    capped[:warmup_bars] = False
    var = _seed_variance(returns, warmup_bars)
    one_minus = 1.0 - decay
    n_capped = 0
    count = 0
    # The pairwise tree over mm[warmup_bars:]: a node is (first bar, length, left done?),
    # its left child's sum kept while the right one is built. Halving from any int64 length
    # reaches a leaf within 64 levels.
    depth = 64
    node_lo = np.empty(depth, np.int64)
    node_n = np.empty(depth, np.int64)
    node_right = np.zeros(depth, np.bool_)
    node_left_sum = np.empty(depth)
    top = 0
    node_lo[0] = warmup_bars
    node_n[0] = n - warmup_bars
    total = 0.0
    while top >= 0:
        lo = node_lo[top]
        size = node_n[top]
        if size > _PAIRWISE_LEAF:  # descend into the left half
            top += 1
            node_lo[top] = lo
            node_n[top] = _pairwise_half(size)
            node_right[top] = False
            continue
        for t in range(lo, lo + size):
            if t > warmup_bars:
                var = decay * var + one_minus * squared_returns[t]
            raw = max(floor_rate, scale * math.sqrt(var)) * multiplier
            above = raw > cap
            capped[t] = above
            value = cap if above else raw
            mm[t] = value
            n_capped += above
            count += value == value
        s = _im_leaf_sum(mm, lo, size, im_to_mm, cap)
        top -= 1
        # Hand the sum up: a left child's waits for its sibling, a right child's completes
        # its parent, which is handed up in turn.
        while top >= 0:
            if not node_right[top]:
                node_left_sum[top] = s
                node_right[top] = True
                half = _pairwise_half(node_n[top])
                node_lo[top + 1] = node_lo[top] + half
                node_n[top + 1] = node_n[top] - half
                node_right[top + 1] = False
                top += 1
                break
            s = node_left_sum[top] + s
            top -= 1
        if top < 0:
            total = s
    return mm, capped, n_capped, total, count


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def fhs_rate(
    close: FloatArray,
    variance: FloatArray,
    horizon: int,
    window: int,
    tail_count: int,
    use_es: bool,
    first_sample: int,
) -> FloatArray:  # pragma: no cover - jit
    """Filtered historical simulation margin per bar, before floor and stress weighting.

    Samples are the standardised h-bar log returns ``z_s = ln(C_s / C_{s-h}) / sigma_{s-h}``
    for ``s`` in the last ``window`` bars up to ``t`` (``s >= first_sample``). At bar t each is
    rescaled by ``sigma_t``; the long loss of a sample is ``1 - exp(sigma_t z)``, the short loss
    ``exp(sigma_t z) - 1``. The rate is the larger of the two sides' ES (mean of the
    ``tail_count`` worst losses) or VaR (the ``tail_count``-th worst). NaN until the window is
    full. A sorted copy of the window is kept, so each bar costs one insert and one delete.
    """
    n = close.shape[0]
    out = np.full(n, np.nan)
    z = np.full(n, np.nan)
    win = np.empty(window)
    count = 0
    for s in range(first_sample, n):
        # A flat warm-up gives zero variance; a tiny floor keeps z finite (and conservative).
        sig = math.sqrt(max(variance[s - horizon], 1e-20))
        z[s] = math.log(close[s] / close[s - horizon]) / sig
        if count == window:
            old = z[s - window]
            i = np.searchsorted(win[:count], old)
            win[i:count - 1] = win[i + 1:count].copy()
            count -= 1
        v = z[s]
        j = np.searchsorted(win[:count], v)
        win[j + 1:count + 1] = win[j:count].copy()
        win[j] = v
        count += 1
        if count < window:
            continue
        sig_t = math.sqrt(variance[s])
        if use_es:
            long_sum = 0.0
            short_sum = 0.0
            for k in range(tail_count):
                long_sum += 1.0 - math.exp(sig_t * win[k])
                short_sum += math.exp(sig_t * win[window - 1 - k]) - 1.0
            long_risk = long_sum / tail_count
            short_risk = short_sum / tail_count
        else:
            long_risk = 1.0 - math.exp(sig_t * win[tail_count - 1])
            short_risk = math.exp(sig_t * win[window - tail_count]) - 1.0
        out[s] = max(long_risk, short_risk)
    return out


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _mean_m2(returns: FloatArray, lo: int, hi: int) -> tuple[float, float]:  # pragma: no cover
    """Two-pass mean and sum of squared deviations of ``returns[lo:hi]``."""
    mean = 0.0
    for i in range(lo, hi):
        mean += returns[i]
    mean /= hi - lo
    m2 = 0.0
    for i in range(lo, hi):
        d = returns[i] - mean
        m2 += d * d
    return mean, m2


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def trailing_std(returns: FloatArray, window: int) -> FloatArray:  # pragma: no cover - jit
    """Population standard deviation of ``returns[t - window : t]`` at every ``t`` in
    ``[window, n]``, shape ``(n + 1,)`` for ``returns`` of shape ``(n,)``; NaN below ``window``.

    O(n): each block of ``window`` outputs starts from a fresh two-pass mean and sum of squared
    deviations, then slides (Welford's update for one value in, one out), so rounding cannot
    build up beyond one window; a window far calmer than its block's first is summed afresh.
    Agrees with the window-by-window two-pass std to ~1e-15 relative on real returns. Returns
    must be finite (log returns of positive closes).
    """
    n = returns.shape[0]
    out = np.full(n + 1, np.nan)
    w = window
    for b in range(w, n + 1, w):
        mean, m2 = _mean_m2(returns, b - w, b)
        out[b] = math.sqrt(m2 / w)
        # The sliding sum's rounding is of the order of the block's starting m2: a window
        # whose m2 fell far below it (a market going flat) is summed afresh instead.
        fresh_below = 1e-4 * m2
        for t in range(b + 1, min(b + w, n + 1)):
            x_in = returns[t - 1]
            x_out = returns[t - 1 - w]
            step = x_in - x_out
            new_mean = mean + step / w
            m2 += step * (x_in - new_mean + x_out - mean)
            mean = new_mean
            if m2 < fresh_below:
                mean, m2 = _mean_m2(returns, t - w, t)
            out[t] = math.sqrt(m2 / w)
    return out


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _im_value(mm: float, im_to_mm: float, max_rate: float) -> float:  # pragma: no cover
    """``MarginRates.im_rate`` at one bar: ``min(mm * im_to_mm, max(mm, max_rate))``; 0 for a
    NaN ``mm`` (as ``np.nanmean`` replaces it before summing)."""
    # Selects, no early return: the summing loops stay branch-free.
    a = mm * im_to_mm
    b = mm if mm > max_rate else max_rate
    im = a if a < b else b
    return 0.0 if mm != mm else im


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _im_leaf_sum(mm: FloatArray, lo: int, n: int, im_to_mm: float,
                 max_rate: float) -> float:  # pragma: no cover - jit
    """A leaf of numpy's pairwise summation (``n <= 128`` values): eight accumulators over
    the multiples of 8, combined as a tree, then the rest one by one; fewer than 8 values
    one by one. Of the IM rates of ``mm[lo : lo + n]``."""
    if n < 8:
        res: float = 0.0
        for i in range(lo, lo + n):
            res += _im_value(mm[i], im_to_mm, max_rate)
        return res
    r0 = _im_value(mm[lo], im_to_mm, max_rate)
    r1 = _im_value(mm[lo + 1], im_to_mm, max_rate)
    r2 = _im_value(mm[lo + 2], im_to_mm, max_rate)
    r3 = _im_value(mm[lo + 3], im_to_mm, max_rate)
    r4 = _im_value(mm[lo + 4], im_to_mm, max_rate)
    r5 = _im_value(mm[lo + 5], im_to_mm, max_rate)
    r6 = _im_value(mm[lo + 6], im_to_mm, max_rate)
    r7 = _im_value(mm[lo + 7], im_to_mm, max_rate)
    i = 8
    stop = n - n % 8
    while i < stop:
        j = lo + i
        r0 += _im_value(mm[j], im_to_mm, max_rate)
        r1 += _im_value(mm[j + 1], im_to_mm, max_rate)
        r2 += _im_value(mm[j + 2], im_to_mm, max_rate)
        r3 += _im_value(mm[j + 3], im_to_mm, max_rate)
        r4 += _im_value(mm[j + 4], im_to_mm, max_rate)
        r5 += _im_value(mm[j + 5], im_to_mm, max_rate)
        r6 += _im_value(mm[j + 6], im_to_mm, max_rate)
        r7 += _im_value(mm[j + 7], im_to_mm, max_rate)
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += _im_value(mm[lo + i], im_to_mm, max_rate)
        i += 1
    return res


#: Leaf size of numpy's pairwise summation (``PW_BLOCKSIZE``).
_PAIRWISE_LEAF = 128


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _pairwise_half(n: int) -> int:  # pragma: no cover - jit
    """Where numpy's pairwise summation splits ``n`` values: half, down to a multiple of 8."""
    half: int = n // 2
    return half - half % 8


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _im_pairwise_sum(mm: FloatArray, lo: int, n: int, im_to_mm: float,
                     max_rate: float) -> float:  # pragma: no cover - jit
    """numpy's pairwise summation (``np.add.reduce`` on a contiguous float64 array: eight
    accumulators over blocks of at most 128, halves split at a multiple of 8) of the IM
    rates of ``mm[lo : lo + n]``, so the sum is numpy's to the bit."""
    if n <= _PAIRWISE_LEAF:
        leaf: float = _im_leaf_sum(mm, lo, n, im_to_mm, max_rate)
        return leaf
    half = _pairwise_half(n)
    total: float = (_im_pairwise_sum(mm, lo, half, im_to_mm, max_rate)
                    + _im_pairwise_sum(mm, lo + half, n - half, im_to_mm, max_rate))
    return total


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def im_rate_sum(mm: FloatArray, first: int, im_to_mm: float,
                max_rate: float) -> tuple[float, int]:  # pragma: no cover - jit
    """Sum and count of the defined IM rates of ``mm[first:]`` without storing them: the sum
    ``np.nansum(im_rate[first:])`` gives, bit for bit, and the bars with an MM rate."""
    n = mm.shape[0] - first
    # An integer count over a slice: LLVM vectorises it (a float count is one serial chain
    # of additions, 2.5 times slower on 1.8M bars).
    tail = mm[first:]
    count = np.int64(0)
    for i in range(n):
        m = tail[i]
        count += np.int64(m == m)
    return _im_pairwise_sum(mm, first, n, im_to_mm, max_rate), int(count)


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def cap_rates(raw: FloatArray, cap: float) -> tuple[FloatArray, BoolArray]:  # pragma: no cover
    """``(np.minimum(raw, cap), raw > cap)`` in one pass (NaN stays NaN and is not capped)."""
    n = raw.shape[0]
    mm = np.empty(n)
    capped = np.empty(n, dtype=np.bool_)
    for i in range(n):
        r = raw[i]
        above = r > cap
        capped[i] = above
        mm[i] = cap if above else r
    return mm, capped


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def any_above(x: FloatArray, bound: float) -> bool:  # pragma: no cover - jit
    """Whether any element of ``x`` is above ``bound`` (NaN is not), without a mask array."""
    for i in range(x.shape[0]):  # noqa: SIM110 - a generator does not compile in nopython
        if x[i] > bound:
            return True
    return False
