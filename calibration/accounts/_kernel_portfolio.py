"""The account replay under a portfolio requirement (domain.md §8), compiled with numba.

The same §7 rules as ``_kernel.replay`` (equity at every asset's adverse extreme for the
account, the trigger ``equity <= MM``, the close-out over the latency), with the requirement
``MM_t = mm_factor * IM_t`` of the account's scenario losses instead of the sum of
per-instrument rates. The scenario losses are evaluated at the same adverse-extreme prices:
exposure ``x_i = q_i p_i + c_i p_i`` with ``c_i`` the collateral units instrument i prices.
The requirement depends on the account's units, so it is computed here, per account and bar,
never stored as an (accounts × bars) matrix.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from calibration.accounts._kernel import (
    _JIT,
    BookArrays,
    CollateralRules,
    FloatArray,
    IntArray,
    MarketArrays,
    _haircut_usd,
    close_out,
    net_exposure,
)
from calibration.models._portfolio_kernel import ScenarioArrays, im_usd


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def replay_portfolio(
    m: MarketArrays, book: BookArrays, rules: CollateralRules, sc: ScenarioArrays,
    n_assets: int, holding_bars: int, latency_bars: int,
    spread_rate: float, fee_rate: float,
    trigger: IntArray, closeout_equity: FloatArray, leg_pnl: FloatArray, fee: FloatArray,
) -> None:  # pragma: no cover - jit
    """Fill ``trigger`` (bar or -1), ``closeout_equity`` (USD, after slippage and fee),
    ``leg_pnl`` (USD per instrument at the close-out prices) and ``fee`` per account, as
    ``_kernel.replay`` does, with the portfolio MM."""
    k, n = m.close.shape
    n_acc = book.entry.shape[0]
    n_col = book.col_inst.shape[0]
    net = np.zeros(n_assets)
    x = np.zeros(k)
    buf = np.zeros(3 * sc.n_factors + max(sc.window, 1))
    for j in range(n_acc):
        e = book.entry[j]
        net_exposure(m, book, j, net)
        last = min(e + holding_bars, n - 1)
        hit = -1
        for t in range(e + 1, last + 1):
            eq = book.usd[j]
            upnl = 0.0
            for i in range(k):
                x[i] = 0.0
            for i in range(k):
                q = book.units[j, i]
                if q == 0.0:
                    continue
                p = m.low[i, t] if net[m.inst_asset[i]] >= 0.0 else m.high[i, t]
                upnl += q * (p - m.close[i, e])
                x[i] += q * p
            eq += upnl if upnl <= 0.0 else rules.upnl_weight * upnl
            for c in range(n_col):
                u = book.col_units[j, c]
                if u == 0.0:
                    continue
                ci = book.col_inst[c]
                p = m.low[ci, t] if net[book.col_asset[c]] >= 0.0 else m.high[ci, t]
                eq += _haircut_usd(rules, c, u * p)
                x[ci] += u * p
            mm = sc.mm_factor * im_usd(sc, x, t, buf)
            if eq <= mm:
                hit = t
                break
        trigger[j] = hit
        close_out(m, book, j, hit, latency_bars, spread_rate, fee_rate, net,
                  closeout_equity, leg_pnl, fee)
