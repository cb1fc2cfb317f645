"""numba kernels of the liquidation simulation (domain.md §4); see ``calibration.liquidation``.

The plain-Python reference every kernel is tested against is ``tests/reference_liquidation.py``.

Trigger test in "x-space". For a long opened at the close ``C_e`` of bar ``e`` with leverage
``L`` (collateral per unit of quantity ``off = C_e / L``) and cumulative funding ``D`` (price
units), the trigger condition "equity at the low <= MM at the low" is

    low_t * (1 - mm_t) - D_t  <=  C_e - off - D_e

and for a short, "equity at the high <= MM at the high" is

    D_t - high_t * (1 + mm_t)  <=  D_e - C_e - off.

The left side ``x_t`` does not depend on the position, the right side (the threshold) does not
depend on t, so one reverse sweep over ``x`` answers the first-passage question for every
position that shares an MM-rate series.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numpy.typing import NDArray

from calibration._kernels import _JIT

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _x_value(
    price: float, mm: float, funding_cum: float, is_long: bool
) -> float:  # pragma: no cover - jit
    """The position-independent side of the trigger test at one bar; NaN (no margin) → +inf."""
    if is_long:
        x = price * (1.0 - mm) - funding_cum
    else:
        x = funding_cum - price * (1.0 + mm)
    if math.isnan(x):
        return np.inf
    return x


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def first_passage(
    price: FloatArray,
    mm: FloatArray,
    funding_cum: FloatArray,
    is_long: bool,
    entries: IntArray,
    thresholds: FloatArray,
    holding: int,
) -> IntArray:  # pragma: no cover - jit
    """First bar ``t`` in ``(e, e + holding]`` with ``x_t <= threshold``, for every query.

    Args:
        price: the adverse extreme per bar (low for longs, high for shorts), shape ``(n,)``.
        mm: MM rate per bar, shape ``(n,)``.
        funding_cum: cumulative funding in price units, shape ``(n,)``.
        entries: entry bar of each query row, ascending (repeats allowed), shape ``(R,)``.
        thresholds: threshold of each query in x-space, shape ``(R, K)``.
        holding: bars a position stays open at most.

    Returns:
        Trigger bar per query, shape ``(R, K)``, -1 where there is none.

    A reverse sweep keeps the prefix minima of ``x`` after the current bar on a stack (nearest
    on top, values strictly decreasing towards the bottom). The first ``t > e`` with
    ``x_t <= B`` is a prefix minimum, and the nearest one with value ``<= B``: a binary search.
    O(n) pushes and pops per series plus O(log n) per query.
    """
    n = price.shape[0]
    rows = thresholds.shape[0]
    k = thresholds.shape[1]
    trig = np.full((rows, k), -1, dtype=np.int64)
    st_idx = np.empty(n, dtype=np.int64)
    st_val = np.empty(n, dtype=np.float64)
    top = 0
    t = n - 1
    for r in range(rows - 1, -1, -1):
        e = entries[r]
        while t > e:
            x = _x_value(price[t], mm[t], funding_cum[t], is_long)
            while top > 0 and st_val[top - 1] >= x:
                top -= 1
            st_idx[top] = t
            st_val[top] = x
            top += 1
            t -= 1
        limit = e + holding
        for c in range(k):
            b = thresholds[r, c]
            lo = 0
            hi = top
            while lo < hi:
                mid = (lo + hi) >> 1
                if st_val[mid] <= b:
                    lo = mid + 1
                else:
                    hi = mid
            if lo > 0:
                hit = st_idx[lo - 1]
                if hit <= limit:
                    trig[r, c] = hit
    return trig


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def window_extreme(
    x: FloatArray, offset: int, width: int, is_min: bool
) -> FloatArray:  # pragma: no cover - jit
    """``out[t]`` = min (or max) of ``x[t+offset .. t+offset+width-1]`` cut at the last bar.

    ``+inf`` (min) / ``-inf`` (max) where the window starts after the last bar. van Herk /
    Gil-Werman blocks of ``width`` bars: one comparison per output whatever the width.
    """
    n = x.shape[0]
    sign = 1.0 if is_min else -1.0
    out = np.empty(n)
    prefix = np.empty(n)
    suffix = np.empty(n)
    for i in range(n):
        v = sign * x[i]
        if i % width == 0 or v < prefix[i - 1]:
            prefix[i] = v
        else:
            prefix[i] = prefix[i - 1]
    for i in range(n - 1, -1, -1):
        v = sign * x[i]
        if i == n - 1 or (i + 1) % width == 0 or v < suffix[i + 1]:
            suffix[i] = v
        else:
            suffix[i] = suffix[i + 1]
    for t in range(n):
        s = t + offset
        if s > n - 1:
            out[t] = sign * np.inf
            continue
        end = min(s + width - 1, n - 1)
        if s // width == end // width:
            out[t] = sign * suffix[s]
        else:
            out[t] = sign * min(suffix[s], prefix[end])
    return out


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def cascade(
    price: FloatArray,
    mm: FloatArray,
    funding_cum: FloatArray,
    depth: FloatArray,
    is_long: bool,
    kappa: float,
    holding: int,
    series_start: IntArray,
    entries: IntArray,
    thresholds: FloatArray,
    weight: FloatArray,
    trig: IntArray,
) -> FloatArray:  # pragma: no cover - jit
    """Liquidation cascade of one side, solved exactly in one forward pass over the bars.

    ``Q_s`` (USD, ``weight`` summed over the queries triggering at bar ``s``) moves the
    adverse extreme of bar ``s+1``: ``low * max(0, 1 - kappa Q_s / depth_s)`` for longs,
    ``high * (1 + min(1, kappa Q_s / depth_s))`` for shorts. Bar ``s+1`` depends on triggers
    at ``s`` only, so walking forward, ``Q_s`` is final when bar ``s`` is reached (triggers can
    only move earlier, and only to bars after the one being processed); each moved extreme is
    tested against every position open at that bar that has not triggered yet.

    Args:
        price: the adverse extreme per bar without cascade, shape ``(n,)``.
        mm: MM rate per series and bar, shape ``(M, n)``.
        depth: depth (USD) per bar on this side, shape ``(n,)``.
        series_start: rows of series ``m`` are ``series_start[m] : series_start[m+1]``, each
            block ascending by entry bar.
        entries, thresholds, weight: per query row, shapes ``(R,)``, ``(R, K)``, ``(R,)``;
            ``weight`` is the USD notional liquidated when one query of the row triggers.
        trig: trigger bars without cascade, shape ``(R, K)``; updated in place.

    Returns:
        The adverse extreme per bar with the cascade's impact, shape ``(n,)``.
    """
    n = price.shape[0]
    n_series = series_start.shape[0] - 1
    k = thresholds.shape[1]
    adj = price.copy()
    q = np.zeros(n)
    cnt = np.zeros(n, dtype=np.int64)
    rows = thresholds.shape[0]
    for r in range(rows):
        for c in range(k):
            t = trig[r, c]
            if t >= 0:
                q[t] += weight[r]
                cnt[t] += 1
    for s in range(n - 1):
        if cnt[s] == 0:
            continue
        u = s + 1
        d = depth[s]
        move = kappa * q[s] / d if d > 0.0 else (np.inf if q[s] > 0.0 else 0.0)
        if is_long:
            adj[u] = price[u] * max(0.0, 1.0 - move)
        else:
            adj[u] = price[u] * (1.0 + min(1.0, move))
        lo_entry = u - holding
        for m in range(n_series):
            a = series_start[m]
            b = series_start[m + 1]
            if a == b:
                continue
            x = _x_value(adj[u], mm[m, u], funding_cum[u], is_long)
            # rows with lo_entry <= entry < u
            lo = a
            hi = b
            while lo < hi:
                mid = (lo + hi) >> 1
                if entries[mid] < lo_entry:
                    lo = mid + 1
                else:
                    hi = mid
            for r in range(lo, b):
                if entries[r] >= u:
                    break
                for c in range(k):
                    cur = trig[r, c]
                    if (cur < 0 or cur > u) and x <= thresholds[r, c]:
                        trig[r, c] = u
                        q[u] += weight[r]
                        cnt[u] += 1
                        if cur >= 0:
                            cnt[cur] -= 1
                            if cnt[cur] == 0:
                                q[cur] = 0.0
                            else:
                                q[cur] -= weight[r]
    return adj


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def outcomes(
    is_long: bool,
    entries: IntArray,
    close: FloatArray,
    price: FloatArray,
    mm: FloatArray,
    funding_cum: FloatArray,
    depth: FloatArray,
    worst: FloatArray,
    recovery_extreme: FloatArray,
    leverage: FloatArray,
    trig: IntArray,
    notional: FloatArray,
    pos_base: IntArray,
    col_stride: int,
    notional_stride: int,
    latency: int,
    recovery: int,
    spread: float,
    impact_coef: float,
    impact_exponent: float,
    out_position: IntArray,
    out_trigger: IntArray,
    out_entry: IntArray,
    out_notional: FloatArray,
    out_leverage: FloatArray,
    out_liq_price: FloatArray,
    out_close_price: FloatArray,
    out_equity: FloatArray,
    out_premature: BoolArray,
    start: int,
) -> int:  # pragma: no cover - jit
    """Close-out of every triggered query of one side and MM series; returns the next slot.

    Args:
        price: adverse extreme per bar (with cascade impact if any), shape ``(n,)``.
        worst: close-out reference price per bar for latency >= 1 (min low / max high over
            ``t .. t+latency``), shape ``(n,)``; unused for latency 0.
        recovery_extreme: min low / max high over ``t+1 .. t+recovery`` (±inf if empty).
        leverage: effective leverage per query, shape ``(R, K)``.
        trig: trigger bar per query, shape ``(R, K)``.
        notional: notionals (USD) of the positions behind each row, shape ``(R, J)``; query
            ``(r, c)`` stands for ``J`` positions, one per notional.
        pos_base, col_stride, notional_stride: position index of ``(r, c, j)`` is
            ``pos_base[r] + c * col_stride + j * notional_stride``.

    Events are written to the ``out_*`` arrays from slot ``start`` in row, column, notional
    order.
    """
    n = close.shape[0]
    rows = trig.shape[0]
    k = trig.shape[1]
    jn = notional.shape[1]
    i = start
    for r in range(rows):
        e = entries[r]
        ce = close[e]
        fe = funding_cum[e]
        for c in range(k):
            t = trig[r, c]
            if t < 0:
                continue
            lev = leverage[r, c]
            off = ce / lev
            dd = funding_cum[t] - fe
            m = mm[t]
            end = min(t + recovery, n - 1)
            if is_long:
                bankrupt = ce - off + dd
                liq = bankrupt / (1.0 - m) if m < 1.0 else price[t]
                premature = recovery_extreme[t] > bankrupt and close[end] > liq
            else:
                bankrupt = ce + off + dd
                liq = bankrupt / (1.0 + m)
                premature = recovery_extreme[t] < bankrupt and close[end] < liq
            base = liq if latency == 0 else worst[t]
            d = depth[t]
            for j in range(jn):
                notional_usd = notional[r, j]
                slip = spread
                if impact_coef > 0.0:
                    if d > 0.0:
                        slip += impact_coef * (notional_usd / d) ** impact_exponent
                    else:
                        slip = np.inf
                slip = min(slip, 1.0)
                qty = notional_usd / ce
                collateral = notional_usd / lev
                if is_long:
                    pc = base * (1.0 - slip)
                    equity = collateral + qty * (pc - ce) - qty * dd
                else:
                    pc = base * (1.0 + slip)
                    equity = collateral + qty * (ce - pc) + qty * dd
                out_position[i] = pos_base[r] + c * col_stride + j * notional_stride
                out_trigger[i] = t
                out_entry[i] = e
                out_notional[i] = notional_usd
                out_leverage[i] = lev
                out_liq_price[i] = liq
                out_close_price[i] = pc
                out_equity[i] = equity
                out_premature[i] = premature
                i += 1
    return i
