"""numba kernels for the hot loops; each has a plain reference in tests/reference.py.

Kernels take and return float64 arrays of shape ``(n,)`` (one value per bar) unless stated.
They are compiled once per machine (``cache=True``) since every CLI run and every worker
process would otherwise pay ~0.65 s of compilation per kernel.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

_JIT = {"nogil": True, "cache": True}


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _sliding_min_forward(x: FloatArray, window: int) -> FloatArray:  # pragma: no cover - jit
    """``out[s] = min(x[s .. s+window-1])``; NaN where the window runs past the end.

    van Herk / Gil-Werman: a prefix minimum inside each block of ``window`` bars and a suffix
    minimum inside each block, so every output is one comparison whatever the window.
    """
    n = x.shape[0]
    out = np.full(n, np.nan)
    if window <= 0 or window > n:
        return out
    prefix = np.empty(n)
    suffix = np.empty(n)
    for i in range(n):
        if i % window == 0:
            prefix[i] = x[i]
        else:
            prefix[i] = min(prefix[i - 1], x[i])
    for i in range(n - 1, -1, -1):
        if i == n - 1 or (i + 1) % window == 0:
            suffix[i] = x[i]
        else:
            suffix[i] = min(suffix[i + 1], x[i])
    for s in range(n - window + 1):
        out[s] = min(suffix[s], prefix[s + window - 1])
    return out


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _forward_losses(
    low: FloatArray, high: FloatArray, close: FloatArray, horizon: int
) -> tuple[FloatArray, FloatArray]:  # pragma: no cover - jit
    n = close.shape[0]
    min_low = _sliding_min_forward(low, horizon)
    max_high = -_sliding_min_forward(-high, horizon)
    long_loss = np.full(n, np.nan)
    short_loss = np.full(n, np.nan)
    for t in range(n - horizon):
        long_loss[t] = 1.0 - min_low[t + 1] / close[t]
        short_loss[t] = max_high[t + 1] / close[t] - 1.0
    return long_loss, short_loss


def forward_losses(
    low: FloatArray, high: FloatArray, close: FloatArray, horizon_bars: int
) -> tuple[FloatArray, FloatArray]:
    """Long and short losses over the next ``horizon_bars`` bars (fractions of notional)."""
    result: tuple[FloatArray, FloatArray] = _forward_losses(low, high, close, horizon_bars)
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
    mean = 0.0
    for t in range(1, warmup_bars + 1):
        mean += returns[t]
    mean /= warmup_bars
    ss = 0.0
    for t in range(1, warmup_bars + 1):
        d = returns[t] - mean
        ss += d * d
    var = ss / (warmup_bars - 1)
    out[warmup_bars] = var
    one_minus = 1.0 - decay
    for t in range(warmup_bars + 1, n):
        var = decay * var + one_minus * squared_returns[t]
        out[t] = var
    return out


#: Layout of ``coverage_pass`` output: per side (offset 0 long, 9 short) then shared values.
SIDE_FIELDS = ("observations", "breaches", "sum_uncovered", "max_uncovered",
               "sum_loss_in_breach", "n00", "n01", "n10", "n11")
SHARED_OFFSET = 2 * len(SIDE_FIELDS)
SHARED_FIELDS = ("sum_margin", "min_margin", "max_margin", "max_increase_ratio")


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def coverage_pass(
    margin: FloatArray,
    long_loss: FloatArray,
    short_loss: FloatArray,
    start: int,
    stop: int,
    step: int,
    trail: int,
) -> FloatArray:  # pragma: no cover - jit
    """Breach statistics of both sides and the procyclicality figures in one pass.

    Observations are bars ``start, start+step, ... < stop`` where margin and losses are not
    NaN. For each side the output holds ``SIDE_FIELDS`` (``nij`` count transitions from breach
    state i to j, Christoffersen); then ``SHARED_FIELDS``, where ``max_increase_ratio`` is the
    largest ``margin[t] / min(margin[t-trail+1 .. t])`` over observations (NaN margins, i.e.
    warm-up, count as +inf in that minimum). The trailing minimum is van Herk / Gil-Werman
    with blocks of ``trail`` bars: the previous block's suffix minima, rebuilt at each block
    start, and the current block's prefix minimum, so the cost does not depend on ``trail``.
    """
    out = np.zeros(SHARED_OFFSET + 4)
    out[SHARED_OFFSET + 1] = np.inf
    out[SHARED_OFFSET + 2] = -np.inf
    if stop <= start:
        return out
    first = start - trail + 1
    if first < 0:
        first = 0
    block0 = (first // trail) * trail
    # suf[k] = min(margin[B-trail+k .. B-1]) for the block before the current block start B,
    # rebuilt at each block start from bars still in cache: O(1) per bar, O(trail) memory.
    suf = np.empty(trail)
    # Scalars, not out[...], inside the loop: array stores would chain through memory.
    prefix = np.inf
    prev_long = 0  # no observation before the first: it cannot count as a transition
    prev_short = 0
    l_01 = l_10 = l_11 = s_01 = s_10 = s_11 = 0
    first_bl = first_bs = 0
    next_obs = start
    max_ratio = 0.0
    nobs = 0.0
    sum_m = 0.0
    min_m = np.inf
    max_m = -np.inf
    l_x = l_su = l_mu = l_sl = 0.0
    s_x = s_su = s_mu = s_sl = 0.0
    l_tr = np.zeros(4)
    s_tr = np.zeros(4)
    # A counter instead of t % trail: an integer division per bar costs more than the rest.
    in_block = 0
    for t in range(block0, stop):
        m = margin[t]
        mi = np.inf if math.isnan(m) else m
        if in_block == 0:
            prefix = mi
            if t > block0:
                running = np.inf
                for k in range(trail - 1, -1, -1):
                    v = margin[t - trail + k]
                    if not math.isnan(v) and v < running:
                        running = v
                    suf[k] = running
        elif mi < prefix:
            prefix = mi
        i = in_block
        in_block += 1
        if in_block == trail:
            in_block = 0
        if t != next_obs:
            continue
        next_obs += step
        xl = long_loss[t]
        xs = short_loss[t]
        if math.isnan(m) or math.isnan(xl) or math.isnan(xs):
            continue
        trailing = prefix
        if t - i > block0 and i + 1 < trail and suf[i + 1] < trailing:
            trailing = suf[i + 1]
        # Compare by multiplying: a division per bar would dominate the loop.
        if m > max_ratio * trailing:
            max_ratio = m / trailing
        nobs += 1.0
        sum_m += m
        # Plain comparisons: numba's min()/max() carry NaN handling that costs ~2 ns a bar.
        if m < min_m:
            min_m = m
        if m > max_m:
            max_m = m
        # Branch-free: breaches are rare but unpredictable, and a mispredicted branch costs
        # more than always doing the arithmetic.
        bl = 1 if xl > m else 0
        bs = 1 if xs > m else 0
        ul = xl - m
        us = xs - m
        l_x += bl
        s_x += bs
        l_su += ul * bl
        s_su += us * bs
        l_sl += xl * bl
        s_sl += xs * bs
        if ul > l_mu:
            l_mu = ul
        if us > s_mu:
            s_mu = us
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
    # The first observation has no predecessor: undo the 0 -> x it was counted as.
    l_01 -= first_bl
    s_01 -= first_bs
    l_tr[1] = l_01
    l_tr[2] = l_10
    l_tr[3] = l_11
    s_tr[1] = s_01
    s_tr[2] = s_10
    s_tr[3] = s_11
    # Transitions 0 -> 0 are all the others; counting them in the loop would be a store each bar.
    pairs = max(nobs - 1.0, 0.0)
    l_tr[0] = pairs - l_tr[1] - l_tr[2] - l_tr[3]
    s_tr[0] = pairs - s_tr[1] - s_tr[2] - s_tr[3]
    side_l = (nobs, l_x, l_su, l_mu, l_sl)
    side_s = (nobs, s_x, s_su, s_mu, s_sl)
    for k in range(5):
        out[k] = side_l[k]
        out[9 + k] = side_s[k]
    for k in range(4):
        out[5 + k] = l_tr[k]
        out[14 + k] = s_tr[k]
    out[SHARED_OFFSET] = sum_m
    out[SHARED_OFFSET + 1] = min_m
    out[SHARED_OFFSET + 2] = max_m
    out[SHARED_OFFSET + 3] = max_ratio
    return out


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
    out = np.full(n, np.nan)
    if warmup_bars < 2 or warmup_bars >= n:
        return out
    mean = 0.0
    for t in range(1, warmup_bars + 1):
        mean += returns[t]
    mean /= warmup_bars
    ss = 0.0
    for t in range(1, warmup_bars + 1):
        d = returns[t] - mean
        ss += d * d
    var = ss / (warmup_bars - 1)
    out[warmup_bars] = max(floor_rate, scale * math.sqrt(var)) * multiplier
    one_minus = 1.0 - decay
    for t in range(warmup_bars + 1, n):
        var = decay * var + one_minus * squared_returns[t]
        out[t] = max(floor_rate, scale * math.sqrt(var)) * multiplier
    return out


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
