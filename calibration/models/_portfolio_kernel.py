"""Portfolio requirements per bar, compiled with numba (domain.md §8).

Both scenario families reduce to one typed input, ``ScenarioArrays``, so the account engine's
portfolio replay and the models' own requirement series call the same ``im_usd``. See
``calibration.models._portfolio`` for the definitions; this module only evaluates them.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numba as nb
import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

_JIT: dict[str, Any] = {"cache": True, "nogil": True}

GRID = 0
HISTORICAL = 1


class ScenarioArrays(NamedTuple):
    """A portfolio model bound to a market of k instruments over n bars.

    Grid (``kind == GRID``): instrument i belongs to risk factor ``factor_of[i]`` (its
    underlying asset); factor f moves by ``m * scan_range[f, t]`` for the grid points m in
    [-1, 1]; ``credit[t]`` is the offset credit on dispersion scenarios; ``span`` selects the
    together/singles/pairs set instead of the full product; extended moves ``ext_move`` (simple
    returns) count at ``ext_weight``; ``min_delta_rate`` / ``hedged_delta_rate`` the Paradex
    MinDelta floor. Historical (``kind == HISTORICAL``): ``z[i, s]`` the standardised h-bar
    log return of instrument i ending at bar s, ``sigma[i, t]`` the EWMA volatility at t,
    ``window`` scenarios, the ``tail`` worst of them for ES (``use_es``) or VaR.
    Unused arrays of the other family are empty.
    """

    kind: int
    factor_of: IntArray  # (k,)
    n_factors: int
    scan_range: FloatArray  # (F, n)
    credit: FloatArray  # (n,)
    span: bool
    ext_move: FloatArray  # (X,)
    ext_weight: FloatArray  # (X,)
    min_delta_rate: float
    hedged_delta_rate: float
    z: FloatArray  # (k, n)
    sigma: FloatArray  # (k, n)
    window: int
    tail: int
    use_es: bool
    mm_factor: float
    first_valid: int


def work_buffer(sc: ScenarioArrays) -> FloatArray:
    """Scratch space for ``im_usd``: three per factor, one per historical scenario."""
    return np.zeros(3 * sc.n_factors + max(sc.window, 1))


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def im_usd(sc: ScenarioArrays, x: FloatArray, t: int,
           buf: FloatArray) -> float:  # pragma: no cover - jit
    """The portfolio IM at bar t, USD, of per-instrument USD exposures ``x`` (shape (k,):
    positions plus the collateral each instrument prices); NaN before ``first_valid``."""
    if t < sc.first_valid:
        return np.nan
    k = x.shape[0]
    if sc.kind == GRID:
        nf = sc.n_factors
        for f in range(3 * nf):
            buf[f] = 0.0
        for i in range(k):
            f = sc.factor_of[i]
            buf[f] += x[i]
            if x[i] > 0.0:
                buf[nf + f] += x[i]
            else:
                buf[2 * nf + f] -= x[i]
        together = 0.0
        product = 0.0
        single = 0.0
        for f in range(nf):
            a = buf[f] * sc.scan_range[f, t]
            together += a
            product += abs(a)
            single = max(single, abs(a))
        if sc.span:
            disp = max(abs(together), single)
            for f in range(nf):
                for g in range(f + 1, nf):
                    disp = max(disp, abs(buf[f] * sc.scan_range[f, t]
                                         - buf[g] * sc.scan_range[g, t]))
        else:
            disp = product
        im = max(0.0, abs(together), (1.0 - sc.credit[t]) * disp)
        for e in range(sc.ext_move.shape[0]):
            move = sc.ext_move[e]
            w = sc.ext_weight[e]
            tot = 0.0
            for f in range(nf):
                loss = -buf[f] * move
                tot += loss
                im = max(im, w * loss)
            im = max(im, w * tot)
        if sc.min_delta_rate > 0.0 or sc.hedged_delta_rate > 0.0:
            delta = 0.0
            for f in range(nf):
                lng = buf[nf + f]
                sht = buf[2 * nf + f]
                delta += sc.min_delta_rate * abs(lng - sht) + sc.hedged_delta_rate * min(lng, sht)
            im = max(im, delta)
        grid_im: float = im
        return grid_im
    w_n = sc.window
    losses = buf[3 * sc.n_factors: 3 * sc.n_factors + w_n]
    for j in range(w_n):
        s = t - j
        loss = 0.0
        for i in range(k):
            if x[i] != 0.0:
                loss -= x[i] * (math.exp(sc.z[i, s] * sc.sigma[i, t]) - 1.0)
        losses[j] = loss
    losses.sort()
    if sc.use_es:
        total = 0.0
        for j in range(w_n - sc.tail, w_n):
            total += losses[j]
        risk = total / sc.tail
    else:
        risk = losses[w_n - sc.tail]
    result: float = max(0.0, risk)
    return result


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def im_series(sc: ScenarioArrays, exposure: FloatArray) -> FloatArray:  # pragma: no cover
    """``im_usd`` at every bar of USD exposures ``exposure`` (k, n); shape (n,)."""
    k, n = exposure.shape
    out = np.full(n, np.nan)
    buf = np.zeros(3 * sc.n_factors + max(sc.window, 1))
    x = np.zeros(k)
    for t in range(max(sc.first_valid, 0), n):
        for i in range(k):
            x[i] = exposure[i, t]
        out[t] = im_usd(sc, x, t, buf)
    return out


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def standardised_returns(close: FloatArray, variance: FloatArray, horizon: int,
                         first_sample: int) -> FloatArray:  # pragma: no cover - jit
    """``z[s] = ln(C_s / C_{s-h}) / sigma_{s-h}`` for ``s >= first_sample`` (NaN before), as
    in the ``fhs`` family."""
    n = close.shape[0]
    z = np.full(n, np.nan)
    for s in range(first_sample, n):
        sig = math.sqrt(max(variance[s - horizon], 1e-20))
        z[s] = math.log(close[s] / close[s - horizon]) / sig
    return z


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def historical_envelope(z: FloatArray, sigma: FloatArray, window: int,
                        first_valid: int) -> tuple[FloatArray, FloatArray]:  # pragma: no cover
    """Per instrument and bar, the lowest and highest simple return of the window's
    rescaled scenarios, shapes (k, n) (NaN before ``first_valid``)."""
    k, n = z.shape
    lo = np.full((k, n), np.nan)
    hi = np.full((k, n), np.nan)
    for i in range(k):
        for t in range(first_valid, n):
            a = np.inf
            b = -np.inf
            for j in range(window):
                v = z[i, t - j]
                a = min(a, v)
                b = max(b, v)
            lo[i, t] = math.exp(a * sigma[i, t]) - 1.0
            hi[i, t] = math.exp(b * sigma[i, t]) - 1.0
    return lo, hi


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def ewma_min_correlation(returns: FloatArray, decay: float,
                         warmup_bars: int) -> FloatArray:  # pragma: no cover - jit
    """The lowest pairwise EWMA correlation of one-bar log returns (F, n) per bar, shape
    (n,), NaN before ``warmup_bars``. Covariances are seeded, like the variance (domain.md
    §2), with the sample covariance (ddof=1) of returns 1..warmup_bars."""
    nf, n = returns.shape
    out = np.full(n, np.nan)
    if warmup_bars < 2 or warmup_bars >= n:
        return out
    cov = np.zeros((nf, nf))
    mean = np.zeros(nf)
    for f in range(nf):
        for t in range(1, warmup_bars + 1):
            mean[f] += returns[f, t]
        mean[f] /= warmup_bars
    for f in range(nf):
        for g in range(nf):
            ss = 0.0
            for t in range(1, warmup_bars + 1):
                ss += (returns[f, t] - mean[f]) * (returns[g, t] - mean[g])
            cov[f, g] = ss / (warmup_bars - 1)
    for t in range(warmup_bars, n):
        if t > warmup_bars:
            for f in range(nf):
                for g in range(nf):
                    cov[f, g] = decay * cov[f, g] + (1.0 - decay) * returns[f, t] * returns[g, t]
        low = 1.0
        for f in range(nf):
            for g in range(f + 1, nf):
                den = math.sqrt(max(cov[f, f] * cov[g, g], 1e-300))
                low = min(low, cov[f, g] / den)
        out[t] = low
    return out
