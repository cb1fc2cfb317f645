"""The account replay kernel (domain.md §7 core), compiled with numba.

Inputs are typed, not a positional splat: ``MarketArrays`` (prices and per-instrument margin
schedules) and ``BookArrays`` (accounts as dense arrays). See ``calibration.accounts._engine``
for the rules; this module only runs them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numba as nb
import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

_JIT: dict[str, Any] = {"cache": True, "nogil": True}


class MarketArrays(NamedTuple):
    """Prices and margin schedules of k instruments over n bars.

    ``MM_i(N, t) = min(mm_scale[i, t] * (N * mm_slope[i, b] - mm_offset[i, b]),
    cap_rate[i] * N)`` with ``b`` the bracket of ``N`` (``caps[i, b-1] <= N < caps[i, b]``,
    ``caps`` padded with ``inf``). A time-varying rate model has one bracket of slope 1 and
    its rate series as ``mm_scale``; a tiered model has ``mm_scale = 1`` and its brackets.
    """

    low: FloatArray  # (k, n)
    high: FloatArray  # (k, n)
    close: FloatArray  # (k, n)
    mm_scale: FloatArray  # (k, n)
    caps: FloatArray  # (k, B)
    mm_slope: FloatArray  # (k, B)
    mm_offset: FloatArray  # (k, B)
    cap_rate: FloatArray  # (k,)
    inst_asset: IntArray  # (k,) asset id of each instrument's underlying


class BookArrays(NamedTuple):
    """A accounts over k instruments and m non-stable collateral assets.

    ``units[j, i]`` signed units of instrument i (0: no position), opened at the close of
    ``entry[j]``; ``usd[j]`` stable collateral (USD); ``col_units[j, c]`` units of collateral
    asset c, priced by instrument ``col_inst[c]`` whose asset id is ``col_asset[c]``.
    """

    entry: IntArray  # (A,)
    units: FloatArray  # (A, k)
    usd: FloatArray  # (A,)
    col_units: FloatArray  # (A, m)
    col_inst: IntArray  # (m,)
    col_asset: IntArray  # (m,)


class CollateralRules(NamedTuple):
    """How collateral counts towards the trigger (domain.md §9): holding c's USD value ``V``
    counts ``hc_slope[c, b] * V + hc_offset[c, b]`` in its band b (``hc_caps`` padded with
    inf); a positive total uPnL counts at ``upnl_weight`` (Mango: weight 1 let an inflated
    mark be borrowed against). The close-out itself is at market value."""

    hc_caps: FloatArray  # (m, B)
    hc_slope: FloatArray  # (m, B)
    hc_offset: FloatArray  # (m, B)
    upnl_weight: float


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _haircut_usd(r: CollateralRules, c: int, value: float) -> float:  # pragma: no cover
    if value <= 0.0:
        return value
    b = 0
    while value >= r.hc_caps[c, b]:
        b += 1
    return float(r.hc_slope[c, b] * value + r.hc_offset[c, b])


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _mm_usd(m: MarketArrays, i: int, notional: float, t: int) -> float:  # pragma: no cover
    b = 0
    while notional >= m.caps[i, b]:
        b += 1
    value = m.mm_scale[i, t] * (notional * m.mm_slope[i, b] - m.mm_offset[i, b])
    return float(min(value, m.cap_rate[i] * notional))


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def net_exposure(m: MarketArrays, book: BookArrays, j: int,
                 net: FloatArray) -> None:  # pragma: no cover - jit
    """Account ``j``'s net units per asset (collateral plus positions) into ``net``: the
    side (>= 0 long) decides which extreme of each bar is adverse for it."""
    net[:] = 0.0
    for c in range(book.col_inst.shape[0]):
        net[book.col_asset[c]] += book.col_units[j, c]
    for i in range(m.close.shape[0]):
        net[m.inst_asset[i]] += book.units[j, i]


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def close_out(
    m: MarketArrays, book: BookArrays, j: int, hit: int, latency_bars: int,
    spread_rate: float, fee_rate: float, net: FloatArray,
    closeout_equity: FloatArray, leg_pnl: FloatArray, fee: FloatArray,
) -> None:  # pragma: no cover - jit
    """Account ``j``'s close-out after a trigger at ``hit`` (-1: none): every position and
    the collateral at the worst price of bars hit..hit+L for its side, less the spread, then
    the fee; fills ``closeout_equity`` (NaN without a trigger), ``leg_pnl`` and ``fee``."""
    k, n = m.close.shape
    if hit < 0:
        closeout_equity[j] = np.nan
        fee[j] = 0.0
        for i in range(k):
            leg_pnl[j, i] = 0.0
        return
    e = book.entry[j]
    end = min(hit + latency_bars, n - 1)
    eq = book.usd[j]
    gross = 0.0
    for i in range(k):
        q = book.units[j, i]
        if q == 0.0:
            leg_pnl[j, i] = 0.0
            continue
        long_asset = net[m.inst_asset[i]] >= 0.0
        p = m.low[i, hit] if long_asset else m.high[i, hit]
        for s in range(hit + 1, end + 1):
            p = min(p, m.low[i, s]) if long_asset else max(p, m.high[i, s])
        pnl = q * (p - m.close[i, e]) - spread_rate * abs(q) * p
        leg_pnl[j, i] = pnl
        gross += abs(q) * p
        eq += pnl
    for c in range(book.col_inst.shape[0]):
        u = book.col_units[j, c]
        if u == 0.0:
            continue
        ci = book.col_inst[c]
        long_asset = net[book.col_asset[c]] >= 0.0
        p = m.low[ci, hit] if long_asset else m.high[ci, hit]
        for s in range(hit + 1, end + 1):
            p = min(p, m.low[ci, s]) if long_asset else max(p, m.high[ci, s])
        eq += u * p
    paid = min(fee_rate * gross, eq) if eq > 0.0 else 0.0
    fee[j] = paid
    closeout_equity[j] = eq - paid


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def replay(
    m: MarketArrays, book: BookArrays, rules: CollateralRules, n_assets: int,
    holding_bars: int, latency_bars: int,
    spread_rate: float, fee_rate: float,
    trigger: IntArray, closeout_equity: FloatArray, leg_pnl: FloatArray, fee: FloatArray,
) -> None:  # pragma: no cover - jit
    """Fill ``trigger`` (bar or -1), ``closeout_equity`` (USD, after slippage and fee),
    ``leg_pnl`` (USD per instrument at the close-out prices) and ``fee`` per account."""
    k, n = m.close.shape
    n_acc = book.entry.shape[0]
    n_col = book.col_inst.shape[0]
    net = np.zeros(n_assets)
    for j in range(n_acc):
        e = book.entry[j]
        net_exposure(m, book, j, net)
        last = min(e + holding_bars, n - 1)
        hit = -1
        for t in range(e + 1, last + 1):
            eq = book.usd[j]
            upnl = 0.0
            mm = 0.0
            for i in range(k):
                q = book.units[j, i]
                if q == 0.0:
                    continue
                p = m.low[i, t] if net[m.inst_asset[i]] >= 0.0 else m.high[i, t]
                upnl += q * (p - m.close[i, e])
                mm += _mm_usd(m, i, abs(q) * p, t)
            eq += upnl if upnl <= 0.0 else rules.upnl_weight * upnl
            for c in range(n_col):
                u = book.col_units[j, c]
                if u == 0.0:
                    continue
                ci = book.col_inst[c]
                p = m.low[ci, t] if net[book.col_asset[c]] >= 0.0 else m.high[ci, t]
                eq += _haircut_usd(rules, c, u * p)
            if eq <= mm:
                hit = t
                break
        trigger[j] = hit
        close_out(m, book, j, hit, latency_bars, spread_rate, fee_rate, net,
                  closeout_equity, leg_pnl, fee)


def empty_outputs(n_accounts: int, k: int) -> tuple[IntArray, FloatArray, FloatArray,
                                                    FloatArray]:
    """Output arrays for ``replay``: trigger, closeout_equity, leg_pnl, fee."""
    return (np.full(n_accounts, -1, dtype=np.int64), np.full(n_accounts, np.nan),
            np.zeros((n_accounts, k)), np.zeros(n_accounts))
