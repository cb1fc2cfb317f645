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
def trailing_min(x: FloatArray, window: int) -> FloatArray:  # pragma: no cover - jit
    """``out[t] = min(x[t-window+1 .. t])`` over the bars that exist (shorter at the start)."""
    n = x.shape[0]
    out = np.empty(n)
    if n == 0:
        return out
    fwd = _sliding_min_forward(x, window)
    running = np.inf
    for t in range(min(window - 1, n)):
        running = min(running, x[t])
        out[t] = running
    for t in range(window - 1, n):
        out[t] = fwd[t - window + 1]
    return out


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


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def vol_scaled_rate(
    variance: FloatArray, scale: float, floor_rate: float, multiplier: float
) -> FloatArray:  # pragma: no cover - jit
    """``max(floor_rate, scale * sqrt(variance)) * multiplier`` per bar; NaN stays NaN."""
    n = variance.shape[0]
    out = np.empty(n)
    for t in range(n):
        v = variance[t]
        if math.isnan(v):
            out[t] = np.nan
        else:
            out[t] = max(floor_rate, scale * math.sqrt(v)) * multiplier
    return out


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def coverage_counts(
    margin: FloatArray, loss: FloatArray, start: int, stop: int, step: int
) -> FloatArray:  # pragma: no cover - jit
    """Breach statistics of one side over observation bars ``start, start+step, ... < stop``.

    Bars where margin or loss is NaN are not observations. Returns a float64 array:
    ``[observations, breaches, sum_uncovered, max_uncovered, sum_loss_in_breach,
    n00, n01, n10, n11, sum_margin, min_margin, max_margin]`` where ``nij`` count transitions
    from state i to state j of the breach sequence (Christoffersen).
    """
    out = np.zeros(12)
    out[10] = np.inf
    out[11] = -np.inf
    prev = -1
    for t in range(start, stop, step):
        m = margin[t]
        x = loss[t]
        if math.isnan(m) or math.isnan(x):
            continue
        out[0] += 1.0
        out[9] += m
        if m < out[10]:
            out[10] = m
        if m > out[11]:
            out[11] = m
        b = 1 if x > m else 0
        if b == 1:
            u = x - m
            out[1] += 1.0
            out[2] += u
            if u > out[3]:
                out[3] = u
            out[4] += x
        if prev >= 0:
            out[5 + 2 * prev + b] += 1.0
        prev = b
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
        sig = math.sqrt(variance[s - horizon])
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
