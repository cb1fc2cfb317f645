"""numba kernels evaluating K EWMA parameter sets over one pass of the bars.

Each kernel reproduces, operation for operation, what ``_kernels.ewma_rate`` (through
``MarginModel.margin_rates``' cap), ``_kernels.coverage_stats`` and
``_kernels.max_increase_ratio`` compute for one set, so the results are bit-for-bit those of
``coverage_backtest``. The sets run side by side: bar t outer, set k inner, with every
per-set quantity in arrays of length K, so the K variance recursions are independent chains
the CPU overlaps (one set alone is bound by the latency of its recursion).
"""

from __future__ import annotations

import math
from typing import Any

import numba as nb
import numpy as np
from numpy.typing import NDArray

from calibration._kernels import SHARED_OFFSET, _exact_increase, _seed_variance

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
    # Accumulators per (set, span), named as in coverage_stats.
    nobs = np.zeros((k_sets, r_spans))
    sum_m = np.zeros((k_sets, r_spans))
    min_m = np.full((k_sets, r_spans), np.inf)
    max_m = np.full((k_sets, r_spans), -np.inf)
    im_excess = np.zeros((k_sets, r_spans))
    acc = np.zeros((k_sets, r_spans, 8))  # l_x l_su l_mu l_sl s_x s_su s_mu s_sl
    trans = np.zeros((k_sets, r_spans, 10), dtype=np.int64)
    # trans: l_01 l_10 l_11 s_01 s_10 s_11 prev_l prev_s first_bl first_bs
    capped_count = np.zeros((k_sets, r_spans), dtype=np.int64)
    block_min = np.full((k_sets, n_blocks), np.inf)
    block_max = np.full((k_sets, r_spans, n_blocks), -np.inf)
    block_var = np.zeros((k_sets, n_blocks))
    t_first = n
    t_last = 0
    for k in range(k_sets):
        t_first = min(t_first, warm[k])
        for r in range(r_spans):
            t_last = max(t_last, spans[k, r, 1])
    span_lo = np.empty(r_spans, dtype=np.int64)
    span_hi = np.empty(r_spans, dtype=np.int64)
    for r in range(r_spans):
        span_lo[r] = n
        span_hi[r] = 0
        for k in range(k_sets):
            if spans[k, r, 1] > spans[k, r, 0]:
                span_lo[r] = min(span_lo[r], spans[k, r, 0])
                span_hi[r] = max(span_hi[r], spans[k, r, 1])
    m_now = np.empty(k_sets)
    capped_now = np.zeros(k_sets, dtype=np.bool_)
    for t in range(t_first, t_last):
        j = t // block
        if t % block == 0:
            for k in range(k_sets):
                block_var[k, j] = var[k]
        r2 = squared_returns[t]
        for k in range(k_sets):
            if t > warm[k]:
                v = decay[k] * var[k] + one_minus[k] * r2
            elif t == warm[k]:
                v = seed[k]
            else:
                m_now[k] = np.nan
                capped_now[k] = False
                continue
            var[k] = v
            m, c = _tested_rate(v, floor[k], scale[k], mult[k], cap[k], im_to_mm[k], tested)
            m_now[k] = m
            capped_now[k] = c
            if m < block_min[k, j]:
                block_min[k, j] = m
        xl = long_loss[t]
        xs = short_loss[t]
        for r in range(r_spans):
            if t < span_lo[r] or t >= span_hi[r]:
                continue
            for k in range(k_sets):
                lo = spans[k, r, 0]
                if t < lo or t >= spans[k, r, 1]:
                    continue
                step = spans[k, r, 2]
                if step > 1 and (t - lo) % step:
                    continue
                if capped_now[k]:
                    capped_count[k, r] += 1
                m = m_now[k]
                if math.isnan(m + xl + xs):
                    continue
                if m > block_max[k, r, j]:
                    block_max[k, r, j] = m
                nobs[k, r] += 1.0
                sum_m[k, r] += m
                if m < min_m[k, r]:
                    min_m[k, r] = m
                if m > max_m[k, r]:
                    max_m[k, r] = m
                if m > cap_from[k]:
                    im_excess[k, r] += m * im_per_tested[k] - max(m, 1.0)
                bl = 1 if xl > m else 0
                bs = 1 if xs > m else 0
                if bl:
                    ul = xl - m
                    acc[k, r, 0] += 1.0
                    acc[k, r, 1] += ul
                    acc[k, r, 3] += xl
                    if ul > acc[k, r, 2]:
                        acc[k, r, 2] = ul
                if bs:
                    us = xs - m
                    acc[k, r, 4] += 1.0
                    acc[k, r, 5] += us
                    acc[k, r, 7] += xs
                    if us > acc[k, r, 6]:
                        acc[k, r, 6] = us
                prev_l = trans[k, r, 6]
                prev_s = trans[k, r, 7]
                if bl | bs | prev_l | prev_s:
                    trans[k, r, 2] += prev_l & bl
                    trans[k, r, 0] += (1 - prev_l) & bl
                    trans[k, r, 1] += prev_l & (1 - bl)
                    trans[k, r, 5] += prev_s & bs
                    trans[k, r, 3] += (1 - prev_s) & bs
                    trans[k, r, 4] += prev_s & (1 - bs)
                    if nobs[k, r] == 1.0:
                        trans[k, r, 8] = bl
                        trans[k, r, 9] = bs
                trans[k, r, 6] = bl
                trans[k, r, 7] = bs
    stats = np.zeros((k_sets, r_spans, SHARED_OFFSET + 4))
    for k in range(k_sets):
        for r in range(r_spans):
            n_obs = nobs[k, r]
            pairs = max(n_obs - 1.0, 0.0)
            l_01 = trans[k, r, 0] - trans[k, r, 8]
            s_01 = trans[k, r, 3] - trans[k, r, 9]
            l_10, l_11 = trans[k, r, 1], trans[k, r, 2]
            s_10, s_11 = trans[k, r, 4], trans[k, r, 5]
            a = acc[k, r]
            side_l = (n_obs, a[0], a[1], a[2], a[3], pairs - l_01 - l_10 - l_11,
                      float(l_01), float(l_10), float(l_11))
            side_s = (n_obs, a[4], a[5], a[6], a[7], pairs - s_01 - s_10 - s_11,
                      float(s_01), float(s_10), float(s_11))
            for f in range(9):
                stats[k, r, f] = side_l[f]
                stats[k, r, 9 + f] = side_s[f]
            stats[k, r, SHARED_OFFSET] = sum_m[k, r]
            stats[k, r, SHARED_OFFSET + 1] = min_m[k, r]
            stats[k, r, SHARED_OFFSET + 2] = max_m[k, r]
            stats[k, r, SHARED_OFFSET + 3] = sum_m[k, r] * im_per_tested[k] - im_excess[k, r]
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
    saved variance) in decreasing order of their bound until no bound can beat the best."""
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
                _regenerate(returns, squared_returns, params[k], tested, block_var[k], block,
                            first, b_hi, buf)
                ratio = _exact_increase(buf, long_loss, b_lo, b_hi, lo, step, trail)
                if ratio > best:
                    best = ratio
            out[k, r] = best
    return out
