"""The account replay with venue mechanics (funding, depth impact, a shared cascade and the
liquidation policies), compiled with numba.

The rules are ``calibration.accounts._engine``'s module docstring ("Mechanics"); this module
only runs them. Unlike ``_kernel.replay`` (account after account), it walks the bars in time
order over every account at once: with a cascade, the liquidations of bar s move bar s+1 of
every account, so no account can be replayed ahead of the others.
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np
from numpy.typing import NDArray

from calibration.accounts._kernel import (
    _JIT,
    BookArrays,
    CollateralRules,
    FloatArray,
    IntArray,
    MarketArrays,
    _haircut_usd,
    _mm_usd,
)
from calibration.models._portfolio_kernel import ScenarioArrays, im_usd

NDArrayBool = NDArray[np.bool_]

#: Policy codes of ``Mechanics.policy``, in ``POLICIES`` order.
POLICIES: tuple[str, ...] = ("close_all", "largest_requirement_first", "partial",
                             "hedge_preserving")

#: Queue orders of ``Mechanics.queue_order`` (domain.md §10), in this order.
QUEUE_ORDERS: tuple[str, ...] = ("most_undercollateralised", "first_come")


class Mechanics(NamedTuple):
    """Per-instrument series and the settings of the mechanics.

    ``funding_cum[i, t] = Σ_{s<=t} funding_rate[i, s] * close[i, s]`` (price units; zeros
    when funding is off); ``bid_depth``/``ask_depth`` USD per bar (what long / short
    close-outs trade against, and what the cascade divides by).
    """

    funding_cum: FloatArray  # (k, n)
    bid_depth: FloatArray  # (k, n)
    ask_depth: FloatArray  # (k, n)
    spread_rate: float
    impact_coef: float
    impact_exponent: float
    fee_rate: float
    cascade: bool
    cascade_kappa: float
    policy: int
    partial_fraction: float
    partial_steps: int
    cooldown_bars: int
    max_accounts_per_bar: int  # close-out steps started per bar at most; -1: no limit
    max_notional_per_bar: float  # USD; inf: no limit
    queue_order: int  # index in QUEUE_ORDERS
    # Portfolio mode (domain.md §8): MM = mm_factor · IM of the scenarios; else unused.
    portfolio: bool
    scenarios: ScenarioArrays
    backstop_threshold: float  # vault takes over below this fraction of MM; 0: off
    partial_min_notional_usd: float  # partial: an account at or below this closes whole
    partial_full_ratio: float  # partial: equity / MM at or below this closes whole; -inf: off
    partial_min_leftover_usd: float  # partial: a step leaving less open closes whole
    blocks_per_bar: int  # blocks in one bar (the per-block limit's multiplier)
    keeper_bonus_rate: float  # keepers' bonus on the step's notional; -1: no keepers
    keeper_gas_usd: FloatArray  # (n,) a keeper's gas cost of one liquidation per bar, USD
    keeper_latency_bars: int  # bars an account waits liquidatable before a keeper acts
    oracle: bool  # the trigger test reads oracle_price instead of the bar's extremes
    oracle_price: FloatArray  # (k, n) the oracle's price (the close when it updated)


class MechOutputs(NamedTuple):
    """Per account (A) and per account × instrument (A, k)."""

    trigger: IntArray  # (A,) first trigger bar, -1 if none
    closeout_bar: IntArray  # (A,) last close-out step's fill bar, -1 if none
    closeout_equity: FloatArray  # (A,) equity after the last step (NaN if none)
    bad_debt: FloatArray  # (A,) only for accounts the engine closed completely
    fee: FloatArray  # (A,)
    steps: IntArray  # (A,) close-out steps taken
    finished: IntArray  # (A,) 1 when the engine closed every position
    leg_pnl: FloatArray  # (A, k) realised PnL of the closed units (fill, slippage, funding)
    leg_closed_usd: FloatArray  # (A, k) closed units × fill price, USD
    queued_bar: IntArray  # (A,) first bar the account asked for a step, -1 if never
    wait_bars: IntArray  # (A,) bars it waited in the queue before its first step
    backlog: IntArray  # (n,) accounts left waiting after each bar's service
    started: IntArray  # (n,) close-out steps started in each bar
    started_usd: FloatArray  # (n,) their notional at the bar's marks, USD
    backstop: IntArray  # (A,) 1 when the backstop vault took the account over
    backstop_pnl: FloatArray  # (A,) the vault's PnL on it (its close-out equity), USD
    keeper_declined: IntArray  # (A,) bars a keeper declined the account's step
    keeper_bonus: FloatArray  # (A,) bonus the account paid the keepers, USD


class Reductions(NamedTuple):
    """ADL fills fed back into the walk (``calibration.accounts._adl``), ``(R,)`` each, in bar
    order: account ``account`` gives up ``units`` (signed, the units it held) of instrument
    ``instrument`` at ``price`` (USD) filled at bar ``bar``; from bar ``bar + 1`` it holds
    ``units`` fewer and its cash has the fill's PnL ``units · (price − entry close)`` less
    the funding those units owed to ``bar``."""

    bar: IntArray
    account: IntArray
    instrument: IntArray
    units: FloatArray
    price: FloatArray


def no_reductions() -> Reductions:
    """No ADL fill to feed back (the walk as without ADL)."""
    return Reductions(bar=np.zeros(0, dtype=np.int64), account=np.zeros(0, dtype=np.int64),
                      instrument=np.zeros(0, dtype=np.int64), units=np.zeros(0),
                      price=np.zeros(0))


def no_scenarios() -> ScenarioArrays:
    """The ``Mechanics.scenarios`` of a run without a portfolio requirement (never read)."""
    empty2 = np.zeros((0, 0))
    return ScenarioArrays(
        kind=0, factor_of=np.zeros(0, dtype=np.int64), n_factors=0, scan_range=empty2,
        credit=np.zeros(0), span=False, ext_move=np.zeros(0), ext_weight=np.zeros(0),
        min_delta_rate=0.0, hedged_delta_rate=0.0, z=empty2, sigma=empty2, window=0, tail=1,
        use_es=True, mm_factor=0.0, first_valid=0)


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _work_buffer(sc: ScenarioArrays) -> FloatArray:  # pragma: no cover - jit
    """``_portfolio_kernel.work_buffer`` inside the jit: im_usd's scratch space."""
    return np.zeros(3 * sc.n_factors + max(sc.window, 1))


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _portfolio_mm(
    m: MarketArrays, book: BookArrays, sc: ScenarioArrays, low: FloatArray, high: FloatArray,
    j: int, t: int, left: FloatArray, net: FloatArray,
) -> float:  # pragma: no cover - jit
    """``mm_factor · IM_t`` of account j holding ``left`` units (shape (k,)) and its
    collateral, both at bar t's marks (the exposures of ``_kernel_portfolio``, in its
    order of operations)."""
    k = left.shape[0]
    x = np.zeros(k)
    for i in range(k):
        if left[i] != 0.0:
            x[i] += left[i] * _mark(low, high, i, t, net[m.inst_asset[i]] >= 0.0)
    for c in range(book.col_inst.shape[0]):
        u = book.col_units[j, c]
        if u == 0.0:
            continue
        ci = book.col_inst[c]
        x[ci] += u * _mark(low, high, ci, t, net[book.col_asset[c]] >= 0.0)
    return float(sc.mm_factor * im_usd(sc, x, t, _work_buffer(sc)))


def empty_mech_outputs(n_accounts: int, k: int, n_bars: int = 0) -> MechOutputs:
    """Output arrays for ``replay_mech`` (``n_bars``: the market's length)."""
    return MechOutputs(
        trigger=np.full(n_accounts, -1, dtype=np.int64),
        closeout_bar=np.full(n_accounts, -1, dtype=np.int64),
        closeout_equity=np.full(n_accounts, np.nan), bad_debt=np.zeros(n_accounts),
        fee=np.zeros(n_accounts), steps=np.zeros(n_accounts, dtype=np.int64),
        finished=np.zeros(n_accounts, dtype=np.int64), leg_pnl=np.zeros((n_accounts, k)),
        leg_closed_usd=np.zeros((n_accounts, k)),
        queued_bar=np.full(n_accounts, -1, dtype=np.int64),
        wait_bars=np.zeros(n_accounts, dtype=np.int64),
        backlog=np.zeros(n_bars, dtype=np.int64), started=np.zeros(n_bars, dtype=np.int64),
        started_usd=np.zeros(n_bars), backstop=np.zeros(n_accounts, dtype=np.int64),
        backstop_pnl=np.zeros(n_accounts),
        keeper_declined=np.zeros(n_accounts, dtype=np.int64),
        keeper_bonus=np.zeros(n_accounts))


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _slip(mech: Mechanics, i: int, closed_units: float, entry_close: float,
          t: int) -> float:  # pragma: no cover - jit
    """Slippage rate of closing ``closed_units`` of instrument i at bar t (§4's formula on
    the closed units' entry notional), capped at 1."""
    s = mech.spread_rate
    if mech.impact_coef > 0.0:
        d = mech.bid_depth[i, t] if closed_units > 0.0 else mech.ask_depth[i, t]
        if d > 0.0:
            s += mech.impact_coef * (abs(closed_units) * entry_close / d) ** mech.impact_exponent
        else:
            s = 1.0
    return min(1.0, s)


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _mark(low: FloatArray, high: FloatArray, i: int, t: int,
          long_asset: bool) -> float:  # pragma: no cover - jit
    return float(low[i, t] if long_asset else high[i, t])


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _estimate(
    m: MarketArrays, book: BookArrays, rules: CollateralRules, mech: Mechanics,
    low: FloatArray, high: FloatArray, j: int, t: int, cash: float, rem: FloatArray,
    delta: FloatArray, anchor: IntArray, net: FloatArray,
) -> tuple[float, float]:  # pragma: no cover - jit
    """Equity and MM at bar t's marks after closing ``delta`` of ``rem`` at those marks (less
    slippage and the fee): the trigger test when ``delta`` is zero."""
    k = rem.shape[0]
    e = book.entry[j]
    eq = cash
    upnl = 0.0
    mm = 0.0
    realised = 0.0
    funding = 0.0
    for i in range(k):
        q = rem[i]
        if q == 0.0:
            continue
        p = _mark(low, high, i, t, net[m.inst_asset[i]] >= 0.0)
        c0 = m.close[i, e]
        d = delta[i]
        left = q - d
        if d != 0.0:
            realised += d * (p - c0) - (_slip(mech, i, d, c0, t) + mech.fee_rate) * abs(d) * p
        if left != 0.0:
            upnl += left * (p - c0)
            mm += _mm_usd(m, i, abs(left) * p, t)
        funding += q * (mech.funding_cum[i, t] - mech.funding_cum[i, anchor[i]])
    eq += upnl if upnl <= 0.0 else rules.upnl_weight * upnl
    eq += realised
    eq -= funding
    for c in range(book.col_inst.shape[0]):
        u = book.col_units[j, c]
        if u == 0.0:
            continue
        ci = book.col_inst[c]
        p = _mark(low, high, ci, t, net[book.col_asset[c]] >= 0.0)
        eq += _haircut_usd(rules, c, u * p)
    if mech.portfolio:
        mm = _portfolio_mm(m, book, mech.scenarios, low, high, j, t, rem - delta, net)
    return eq, mm


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _plan(
    m: MarketArrays, book: BookArrays, rules: CollateralRules, mech: Mechanics,
    low: FloatArray, high: FloatArray, j: int, t: int, cash: float, rem: FloatArray,
    anchor: IntArray, net: FloatArray, steps_done: int, last_bar: bool, delta: FloatArray,
) -> None:  # pragma: no cover - jit
    """Fill ``delta`` (units to close per instrument) for a step at bar t under the policy."""
    k = rem.shape[0]
    for i in range(k):
        delta[i] = 0.0
    if mech.policy == 0 or last_bar:
        for i in range(k):
            delta[i] = rem[i]
        return
    if mech.policy == 1:
        # Largest MM first (ties: lower instrument index), until restored; in portfolio
        # mode a position's MM is its own scenario requirement (the position alone).
        mms = np.full(k, -1.0)
        alone = np.zeros(k)
        for i in range(k):
            if rem[i] != 0.0:
                p = _mark(low, high, i, t, net[m.inst_asset[i]] >= 0.0)
                if mech.portfolio:
                    alone[i] = rem[i] * p
                    mms[i] = mech.scenarios.mm_factor * im_usd(
                        mech.scenarios, alone, t, _work_buffer(mech.scenarios))
                    alone[i] = 0.0
                else:
                    mms[i] = _mm_usd(m, i, abs(rem[i]) * p, t)
        for _ in range(k):
            best = -1
            for i in range(k):
                if mms[i] >= 0.0 and (best < 0 or mms[i] > mms[best]):
                    best = i
            if best < 0:
                return
            mms[best] = -1.0
            delta[best] = rem[best]
            eq, mm = _estimate(m, book, rules, mech, low, high, j, t, cash, rem, delta,
                               anchor, net)
            if eq > mm:
                return
        return
    if mech.policy == 2:
        final = steps_done + 1 >= mech.partial_steps
        if not final and mech.partial_min_notional_usd > 0.0:
            usd = 0.0
            for i in range(k):
                if rem[i] != 0.0:
                    usd += abs(rem[i]) * _mark(low, high, i, t, net[m.inst_asset[i]] >= 0.0)
            final = usd <= mech.partial_min_notional_usd
        if not final and mech.partial_full_ratio > -np.inf:
            eq, mm = _estimate(m, book, rules, mech, low, high, j, t, cash, rem, delta,
                               anchor, net)
            final = eq <= mech.partial_full_ratio * mm
        if not final and mech.partial_min_leftover_usd > 0.0:
            left = 0.0
            for i in range(k):
                if rem[i] != 0.0:
                    q = rem[i] - book.units[j, i] * mech.partial_fraction
                    left += abs(q) * _mark(low, high, i, t, net[m.inst_asset[i]] >= 0.0)
            final = left < mech.partial_min_leftover_usd
        for i in range(k):
            if rem[i] != 0.0:
                delta[i] = rem[i] if final else book.units[j, i] * mech.partial_fraction
        return
    # hedge_preserving: the residual per asset (collateral units + position units) first.
    n_assets = net.shape[0]
    same = np.zeros(n_assets)
    for i in range(k):
        a = m.inst_asset[i]
        if rem[i] != 0.0 and net[a] != 0.0 and (rem[i] > 0.0) == (net[a] > 0.0):
            same[a] += abs(rem[i])
    for i in range(k):
        a = m.inst_asset[i]
        if same[a] > 0.0 and rem[i] != 0.0 and (rem[i] > 0.0) == (net[a] > 0.0):
            frac = abs(net[a]) / same[a]
            delta[i] = rem[i] if frac >= 1.0 else rem[i] * frac
    eq, mm = _estimate(m, book, rules, mech, low, high, j, t, cash, rem, delta, anchor, net)
    if eq <= mm:
        for i in range(k):
            delta[i] = rem[i]


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def replay_mech(
    m: MarketArrays, book: BookArrays, rules: CollateralRules, mech: Mechanics,
    n_assets: int, holding_bars: int, latency_bars: int, out: MechOutputs,
    first_ask: IntArray, red: Reductions,
) -> None:  # pragma: no cover - jit
    """Fill ``out`` for every account of ``book`` (see ``_engine``'s "Mechanics" and
    "Capacity").

    ``red``: ADL fills applied at the start of the bar after theirs (before that bar's
    fills and tests), to an account open, outside liquidation and never stepped (what the
    ADL's counterparties are; a fill that does not fit, as an iterate of ``_engine``'s fixed
    point may hold, is skipped). An account with a fill ahead is not dropped as "nothing
    more can happen to it" before that fill.

    ``first_ask`` (``(A,)``, or empty to walk every account from its entry): each account's
    first bar with equity <= MM (-1: none), as the core kernel finds it. Accounts then join
    the walk only at that bar: valid when nothing before an account's first close-out step
    depends on other accounts or on the capacity (no cascade) and the core's test is the
    mechanics' (no funding).
    """
    k, n = m.close.shape
    n_acc = book.entry.shape[0]
    n_col = book.col_inst.shape[0]
    low = m.low.copy()
    high = m.high.copy()
    q_long = np.zeros((k, n))
    q_short = np.zeros((k, n))
    rem = book.units.copy()
    cash = book.usd.copy()
    anchor = np.empty((n_acc, k), dtype=np.int64)
    net = np.zeros((n_acc, n_assets))
    next_test = np.empty(n_acc, dtype=np.int64)
    in_liq = np.zeros(n_acc, dtype=np.bool_)
    queued = np.zeros(n_acc, dtype=np.bool_)
    queued_since = np.full(n_acc, -1, dtype=np.int64)
    done = np.zeros(n_acc, dtype=np.bool_)
    pend_bar = np.full(n_acc, -1, dtype=np.int64)
    pend_end = np.full(n_acc, -1, dtype=np.int64)
    pend_delta = np.zeros((n_acc, k))
    pend_net = np.zeros((n_acc, n_assets))
    pend_final = np.zeros(n_acc, dtype=np.bool_)
    join = book.entry.copy()
    fast = first_ask.shape[0] == n_acc
    # ADL fills: ``next_red[j]`` the bar of account j's next fill not yet applied (n + 1:
    # none), ``red_after[r]`` the bar of the same account's fill after r.
    r_bar, r_acc, r_inst, r_units, r_price = red.bar, red.account, red.instrument, red.units, \
        red.price
    n_red = r_bar.shape[0]
    next_red = np.full(n_acc, n + 1, dtype=np.int64)
    red_after = np.empty(n_red, dtype=np.int64)
    for r in range(n_red - 1, -1, -1):
        red_after[r] = next_red[r_acc[r]]
        next_red[r_acc[r]] = r_bar[r]
    r_next = 0
    if fast:
        for j in range(n_acc):
            join[j] = first_ask[j] - 1 if first_ask[j] >= 0 else n
    for j in range(n_acc):
        e = book.entry[j]
        next_test[j] = join[j] + 1
        for i in range(k):
            anchor[j, i] = e
            net[j, m.inst_asset[i]] += rem[j, i]
        for c in range(n_col):
            net[j, book.col_asset[c]] += book.col_units[j, c]
    order = np.argsort(join, kind="mergesort")
    active = np.empty(n_acc, dtype=np.int64)
    cand = np.empty(n_acc, dtype=np.int64)
    cand_key = np.empty(n_acc)
    rank = np.empty(n_acc, dtype=np.int64)
    n_active = 0
    nxt = 0
    delta = np.zeros(k)
    gap = max(1, latency_bars)
    if mech.policy == 2:
        gap = max(gap, mech.cooldown_bars)
    limited = mech.max_accounts_per_bar >= 0 or mech.max_notional_per_bar < np.inf
    # The fast test's arrays as locals (``_eq_mm``: no reference counting in the loop).
    f_low, f_high, f_close, f_asset = m.low, m.high, m.close, m.inst_asset
    f_scale, f_caps, f_slope, f_offset, f_cap = m.mm_scale, m.caps, m.mm_slope, m.mm_offset, \
        m.cap_rate
    f_entry, f_col, f_col_inst, f_col_asset = book.entry, book.col_units, book.col_inst, \
        book.col_asset
    f_hc_caps, f_hc_slope, f_hc_offset = rules.hc_caps, rules.hc_slope, rules.hc_offset
    f_upnl_w = rules.upnl_weight
    o_queued_bar, o_trigger, o_wait, o_backlog = out.queued_bar, out.trigger, out.wait_bars, \
        out.backlog
    o_declined, o_started, o_started_usd, o_steps = out.keeper_declined, out.started, \
        out.started_usd, out.steps
    for t in range(n):
        if mech.cascade and t > 0:
            for i in range(k):
                ql = q_long[i, t - 1]
                if ql > 0.0:
                    d = mech.bid_depth[i, t - 1]
                    move = mech.cascade_kappa * ql / d if d > 0.0 else np.inf
                    low[i, t] = m.low[i, t] * max(0.0, 1.0 - move)
                qs = q_short[i, t - 1]
                if qs > 0.0:
                    d = mech.ask_depth[i, t - 1]
                    move = mech.cascade_kappa * qs / d if d > 0.0 else np.inf
                    high[i, t] = m.high[i, t] * (1.0 + min(1.0, move))
        while r_next < n_red and r_bar[r_next] < t:
            # An ADL fill of bar t - 1: the counterparty holds fewer units from bar t on.
            r = r_next
            r_next += 1
            j = r_acc[r]
            next_red[j] = red_after[r]
            i = r_inst[r]
            y = r_units[r]
            q = rem[j, i]
            if (done[j] or pend_bar[j] >= 0 or in_liq[j] or o_steps[j] > 0 or q == 0.0
                    or (q > 0.0) != (y > 0.0)):
                continue
            if abs(y) >= abs(q):
                y = q
            b = r_bar[r]
            cash[j] += y * (r_price[r] - m.close[i, book.entry[j]]) - y * (
                mech.funding_cum[i, b] - mech.funding_cum[i, anchor[j, i]])
            rem[j, i] = 0.0 if y == q else q - y
            net[j, m.inst_asset[i]] -= y
        while nxt < n_acc and join[order[nxt]] < t:
            active[n_active] = order[nxt]
            n_active += 1
            nxt += 1
        last_bar = t == n - 1
        # Pass 1: settle the fills due, test, and collect the accounts asking for a step.
        n_cand = 0
        keep = 0
        for a_idx in range(n_active):
            j = active[a_idx]
            e = f_entry[j]
            if pend_bar[j] >= 0 and pend_end[j] == t:
                _settle(m, book, mech, low, high, j, t, rem, cash, anchor, pend_bar, pend_delta,
                        pend_net, pend_final, out, n_col)
                if pend_final[j]:
                    done[j] = True
            if done[j]:
                continue
            if pend_bar[j] >= 0:
                active[keep] = j
                keep += 1
                continue
            if not (in_liq[j] or queued[j] or t <= e + holding_bars):
                continue
            forced = in_liq[j] and last_bar
            if t < next_test[j] and not forced:
                active[keep] = j
                keep += 1
                continue
            active[keep] = j
            keep += 1
            key = -np.inf
            if not forced:
                if fast:
                    # ``_next_fail``'s test, written out: a call per waiting account and bar
                    # would reference-count each of its array arguments (twice); same order
                    # of operations, so the same bits.
                    eq = cash[j]
                    upnl = 0.0
                    mm = 0.0
                    for i in range(k):
                        q = rem[j, i]
                        if q == 0.0:
                            continue
                        p = f_low[i, t] if net[j, f_asset[i]] >= 0.0 else f_high[i, t]
                        upnl += q * (p - f_close[i, e])
                        notional = abs(q) * p
                        b = 0
                        while notional >= f_caps[i, b]:
                            b += 1
                        value = f_scale[i, t] * (notional * f_slope[i, b] - f_offset[i, b])
                        mm += min(value, f_cap[i] * notional)
                    eq += upnl if upnl <= 0.0 else f_upnl_w * upnl
                    for c in range(n_col):
                        u = f_col[j, c]
                        if u == 0.0:
                            continue
                        ci = f_col_inst[c]
                        p = f_low[ci, t] if net[j, f_col_asset[c]] >= 0.0 else f_high[ci, t]
                        value = u * p
                        if value > 0.0:
                            b = 0
                            while value >= f_hc_caps[c, b]:
                                b += 1
                            value = f_hc_slope[c, b] * value + f_hc_offset[c, b]
                        eq += value
                else:
                    for i in range(k):
                        delta[i] = 0.0
                    if mech.oracle:
                        eq, mm = _estimate(m, book, rules, mech, mech.oracle_price,
                                           mech.oracle_price, j, t, cash[j], rem[j], delta,
                                           anchor[j], net[j])
                    else:
                        eq, mm = _estimate(m, book, rules, mech, low, high, j, t, cash[j],
                                           rem[j], delta, anchor[j], net[j])
                if eq > mm:
                    # Recovered (possibly while waiting): it leaves the queue.
                    in_liq[j] = False
                    queued[j] = False
                    queued_since[j] = -1
                    if fast:
                        # Its marks no longer depend on anyone: jump to its next trigger.
                        # (up to its next ADL fill, after which its position changes)
                        end = min(e + holding_bars, n - 1)
                        nf = _next_fail(f_low, f_high, f_close, f_asset, f_scale, f_caps,
                                        f_slope, f_offset, f_cap, f_entry, f_col, f_col_inst,
                                        f_col_asset, f_hc_caps, f_hc_slope, f_hc_offset,
                                        f_upnl_w, j, t + 1, min(end, next_red[j]),
                                        cash[j], rem, net)
                        if nf >= 0:
                            next_test[j] = nf
                        elif next_red[j] < end:
                            next_test[j] = next_red[j] + 1
                        else:
                            next_test[j] = n + 1
                            keep -= 1  # nothing more can happen to it
                    continue
                if mm > 0.0:
                    key = eq / mm
            if o_queued_bar[j] < 0:
                o_queued_bar[j] = t
            if queued_since[j] < 0:
                queued_since[j] = t
            if mech.queue_order == 1:
                key = float(queued_since[j])
            cand[n_cand] = j
            cand_key[n_cand] = key
            n_cand += 1
        n_active = keep
        if n_cand == 0:
            continue
        # Pass 2: serve the queue up to the bar's capacity (unlimited at the data's end).
        if limited and not last_bar:
            _queue_order(book.entry, cand, cand_key, n_cand, n_acc, rank)
        else:
            for c in range(n_cand):
                rank[c] = c
        n_started = 0
        usd = 0.0
        for r in range(n_cand):
            j = cand[rank[r]]
            if limited and not last_bar and (
                    (mech.max_accounts_per_bar >= 0 and n_started >= mech.max_accounts_per_bar)
                    or usd >= mech.max_notional_per_bar):
                queued[j] = True
                if o_trigger[j] < 0:
                    o_wait[j] += 1
                o_backlog[t] += 1
                continue
            if mech.keeper_bonus_rate >= 0.0 and not last_bar and not _keeper_acts(
                    m, book, rules, mech, low, high, j, t, cash[j], rem[j], anchor[j],
                    net[j], o_steps[j], queued_since[j], delta):
                # No keeper liquidates it this bar: it waits, as if the engine were full.
                queued[j] = True
                if queued_since[j] < 0:
                    queued_since[j] = t
                o_declined[j] += 1
                if o_trigger[j] < 0:
                    o_wait[j] += 1
                o_backlog[t] += 1
                continue
            queued[j] = False
            queued_since[j] = -1
            n_started += 1
            usd += _start_step(m, book, rules, mech, low, high, j, t, n, latency_bars, gap,
                               cash, rem, anchor, net, in_liq, next_test, done, pend_bar,
                               pend_end, pend_delta, pend_net, pend_final, q_long, q_short,
                               delta, out, n_col)
        o_started[t] = n_started
        o_started_usd[t] = usd


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _keeper_acts(
    m: MarketArrays, book: BookArrays, rules: CollateralRules, mech: Mechanics,
    low: FloatArray, high: FloatArray, j: int, t: int, cash: float, rem: FloatArray,
    anchor: IntArray, net: FloatArray, steps_done: int, since: int, delta: FloatArray,
) -> bool:  # pragma: no cover - jit
    """Whether a keeper takes account j's step at bar t: the account has been liquidatable
    ``keeper_latency_bars`` bars, and the bonus on the step's notional at the marks less the
    slippage of its fill and the bar's gas cost is positive."""
    if since >= 0 and t - since < mech.keeper_latency_bars:
        return False
    _plan(m, book, rules, mech, low, high, j, t, cash, rem, anchor, net, steps_done, False,
          delta)
    profit = -mech.keeper_gas_usd[t]
    for i in range(rem.shape[0]):
        d = delta[i]
        if d == 0.0:
            continue
        p = _mark(low, high, i, t, net[m.inst_asset[i]] >= 0.0)
        profit += (mech.keeper_bonus_rate - _slip(mech, i, d, m.close[i, book.entry[j]], t)) \
            * abs(d) * p
    return bool(profit > 0.0)


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _queue_order(entry: IntArray, cand: IntArray, key: FloatArray, n_cand: int, n_acc: int,
                 rank: IntArray) -> None:  # pragma: no cover - jit
    """``rank[:n_cand]``: the candidates by key, ties in (entry bar, account index) order,
    however the accounts joined the walk (insertion sort for the usual short queue)."""
    if n_cand > 48:
        tie = np.empty(n_cand, dtype=np.int64)
        for c in range(n_cand):
            tie[c] = entry[cand[c]] * n_acc + cand[c]
        by_tie = np.argsort(tie, kind="mergesort")
        by_key = np.argsort(key[:n_cand][by_tie], kind="mergesort")
        for c in range(n_cand):
            rank[c] = by_tie[by_key[c]]
        return
    for c in range(n_cand):
        x = c
        kx = key[x]
        tx = entry[cand[x]] * n_acc + cand[x]
        pos = c
        while pos > 0:
            y = rank[pos - 1]
            ky = key[y]
            if ky < kx or (ky == kx and entry[cand[y]] * n_acc + cand[y] < tx):
                break
            rank[pos] = y
            pos -= 1
        rank[pos] = x


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _next_fail(
    low: FloatArray, high: FloatArray, close: FloatArray, inst_asset: IntArray,
    mm_scale: FloatArray, caps: FloatArray, mm_slope: FloatArray, mm_offset: FloatArray,
    cap_rate: FloatArray, entry: IntArray, col_units: FloatArray, col_inst: IntArray,
    col_asset: IntArray, hc_caps: FloatArray, hc_slope: FloatArray, hc_offset: FloatArray,
    upnl_weight: float, j: int, t0: int, t1: int, cash: float, rem: FloatArray,
    net: FloatArray,
) -> int:  # pragma: no cover - jit
    """The first bar in t0..t1 where account j (no step pending, no funding, no cascade) has
    equity <= MM at the bar's marks, -1 if none (``rem``, ``net``: every account's rows).

    The test is ``_estimate``'s with nothing closed and no funding, in the same order of
    operations (so the same bits; the bracket and band searches are ``_mm_usd``'s and
    ``_haircut_usd``'s), on plain arrays hoisted out of their NamedTuples once per walk and
    written out rather than called: numba reference-counts an array read out of a tuple in a
    loop, and every array argument of a call, an atomic increment and decrement each, which
    was most of the queue's cost. ``replay_mech`` has the same test written out for the
    waiting accounts."""
    e = entry[j]
    for t in range(t0, t1 + 1):
        eq = cash
        upnl = 0.0
        mm = 0.0
        for i in range(rem.shape[1]):
            q = rem[j, i]
            if q == 0.0:
                continue
            p = low[i, t] if net[j, inst_asset[i]] >= 0.0 else high[i, t]
            upnl += q * (p - close[i, e])
            notional = abs(q) * p
            b = 0
            while notional >= caps[i, b]:
                b += 1
            value = mm_scale[i, t] * (notional * mm_slope[i, b] - mm_offset[i, b])
            mm += min(value, cap_rate[i] * notional)
        eq += upnl if upnl <= 0.0 else upnl_weight * upnl
        for c in range(col_inst.shape[0]):
            u = col_units[j, c]
            if u == 0.0:
                continue
            ci = col_inst[c]
            p = low[ci, t] if net[j, col_asset[c]] >= 0.0 else high[ci, t]
            value = u * p
            if value > 0.0:
                b = 0
                while value >= hc_caps[c, b]:
                    b += 1
                value = hc_slope[c, b] * value + hc_offset[c, b]
            eq += value
        if eq <= mm:
            return t
    return -1


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _start_step(
    m: MarketArrays, book: BookArrays, rules: CollateralRules, mech: Mechanics,
    low: FloatArray, high: FloatArray, j: int, t: int, n: int, latency_bars: int, gap: int,
    cash: FloatArray, rem: FloatArray, anchor: IntArray, net: FloatArray,
    in_liq: NDArrayBool, next_test: IntArray, done: NDArrayBool, pend_bar: IntArray,
    pend_end: IntArray, pend_delta: FloatArray, pend_net: FloatArray, pend_final: NDArrayBool,
    q_long: FloatArray, q_short: FloatArray, delta: FloatArray, out: MechOutputs, n_col: int,
) -> float:  # pragma: no cover - jit
    """Start account j's close-out step at bar t (plan, cascade volume, pending fill) and
    return its notional at bar t's marks, USD."""
    k = rem.shape[1]
    inst_asset, close = m.inst_asset, m.close  # locals: no reference count per loop read
    n_assets = net.shape[1]
    e = book.entry[j]
    last_bar = t == n - 1
    if out.trigger[j] < 0:
        out.trigger[j] = t
    taken = False
    if mech.backstop_threshold > 0.0:
        for i in range(k):
            delta[i] = 0.0
        eq0, mm0 = _estimate(m, book, rules, mech, low, high, j, t, cash[j], rem[j], delta,
                             anchor[j], net[j])
        taken = eq0 < mech.backstop_threshold * mm0
    if taken:
        # The vault takes every position and the collateral (venues.md HL1).
        out.backstop[j] = 1
        for i in range(k):
            delta[i] = rem[j, i]
    elif mech.policy == 0 or last_bar:
        # ``_plan``'s first case, without the call (each call reference-counts every array
        # of its NamedTuple arguments: most of a close-out's cost in the queue's walk).
        for i in range(k):
            delta[i] = rem[j, i]
    else:
        _plan(m, book, rules, mech, low, high, j, t, cash[j], rem[j], anchor[j], net[j],
              out.steps[j], last_bar, delta)
    final = True
    usd = 0.0
    for i in range(k):
        d = delta[i]
        if rem[j, i] != 0.0 and d != rem[j, i]:
            final = False
        if d == 0.0:
            continue
        usd += abs(d) * _mark(low, high, i, t, net[j, inst_asset[i]] >= 0.0)
        c0 = close[i, e]
        if d > 0.0:
            q_long[i, t] += d * c0
        else:
            q_short[i, t] -= d * c0
    out.steps[j] += 1
    for i in range(k):
        pend_delta[j, i] = delta[i]
    for a in range(n_assets):
        pend_net[j, a] = net[j, a]
    pend_bar[j] = t
    pend_end[j] = min(t + latency_bars, n - 1)
    pend_final[j] = final
    if not final:
        eq, mm = _estimate(m, book, rules, mech, low, high, j, t, cash[j], rem[j],
                           delta, anchor[j], net[j])
        in_liq[j] = eq <= mm
    next_test[j] = t + gap
    # The account's exposure after the step decides its later adverse sides.
    for i in range(k):
        if delta[i] != 0.0:
            net[j, inst_asset[i]] -= delta[i]
    if pend_end[j] == t:
        _settle(m, book, mech, low, high, j, t, rem, cash, anchor, pend_bar, pend_delta,
                pend_net, pend_final, out, n_col)
        if final:
            done[j] = True
    return usd


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _settle(
    m: MarketArrays, book: BookArrays, mech: Mechanics, low: FloatArray, high: FloatArray,
    j: int, end: int, rem: FloatArray, cash: FloatArray, anchor: IntArray, pend_bar: IntArray,
    delta: FloatArray, net: FloatArray, pend_final: FloatArray, out: MechOutputs, n_col: int,
) -> None:  # pragma: no cover - jit
    """Fill a pending step of account j: the closed units at the worst price of bars
    ``t .. end`` for the account's side at the step, less slippage; funding to t; the
    collateral sold with the last position; the fee capped at the equity after the step.
    ``rem``, ``anchor``, ``delta`` (the pending units), ``net`` (the exposure at the step):
    every account's rows, read at row j (a row view per call is a reference count)."""
    # Arrays read in the loops as locals (numba reference-counts each read out of a tuple).
    inst_asset, close, funding_cum = m.inst_asset, m.close, mech.funding_cum
    leg_pnl, leg_closed = out.leg_pnl, out.leg_closed_usd
    col_units, col_inst, col_asset = book.col_units, book.col_inst, book.col_asset
    t = pend_bar[j]
    k = rem.shape[1]
    e = book.entry[j]
    c = cash[j]
    gross = 0.0
    for i in range(k):
        d = delta[j, i]
        if d == 0.0:
            continue
        long_asset = net[j, inst_asset[i]] >= 0.0
        p = _mark(low, high, i, t, long_asset)
        for s in range(t + 1, end + 1):
            p = min(p, low[i, s]) if long_asset else max(p, high[i, s])
        c0 = close[i, e]
        fund = d * (funding_cum[i, t] - funding_cum[i, anchor[j, i]])
        # Without impact the slippage is the spread (``_slip`` without its call).
        slip = min(1.0, mech.spread_rate) if mech.impact_coef <= 0.0 else _slip(mech, i, d,
                                                                                c0, t)
        pnl = d * (p - c0) - slip * abs(d) * p
        if fund != 0.0:
            pnl -= fund
            # funding of the units left open is settled too, so they restart from bar t
            left_fund = (rem[j, i] - d) * (funding_cum[i, t] - funding_cum[i, anchor[j, i]])
            c -= left_fund
        anchor[j, i] = t
        leg_pnl[j, i] += pnl
        leg_closed[j, i] += abs(d) * p
        gross += abs(d) * p
        c += pnl
        rem[j, i] = 0.0 if d == rem[j, i] else rem[j, i] - d
    if pend_final[j]:
        for cc in range(n_col):
            u = col_units[j, cc]
            if u == 0.0:
                continue
            ci = col_inst[cc]
            long_asset = net[j, col_asset[cc]] >= 0.0
            p = _mark(low, high, ci, t, long_asset)
            for s in range(t + 1, end + 1):
                p = min(p, low[ci, s]) if long_asset else max(p, high[ci, s])
            c += u * p
        eq = c
        out.finished[j] = 1
    else:
        # Equity after the step: what is left open at the step's marks, collateral at market.
        eq = c
        for i in range(k):
            q = rem[j, i]
            if q == 0.0:
                continue
            p = _mark(low, high, i, t, net[j, inst_asset[i]] >= 0.0)
            eq += q * (p - close[i, e])
        for cc in range(n_col):
            u = col_units[j, cc]
            if u != 0.0:
                eq += u * _mark(low, high, col_inst[cc], t,
                                net[j, col_asset[cc]] >= 0.0)
    paid = min(mech.fee_rate * gross, eq) if eq > 0.0 else 0.0
    if mech.keeper_bonus_rate > 0.0 and out.backstop[j] == 0 and eq - paid > 0.0:
        # The keeper's bonus comes out of what is left after the fund's fee.
        bonus = min(mech.keeper_bonus_rate * gross, eq - paid)
        out.keeper_bonus[j] += bonus
        eq -= bonus
        c -= bonus
    if out.backstop[j] == 1:
        # The vault holds the book: its close-out is the vault's PnL, the account ends at 0,
        # no fee and no bad debt for the fund.
        out.backstop_pnl[j] = eq
        cash[j] = 0.0
        out.closeout_equity[j] = 0.0
        out.closeout_bar[j] = end
        pend_bar[j] = -1
        return
    out.fee[j] += paid
    c -= paid
    cash[j] = c
    out.closeout_equity[j] = eq - paid
    out.closeout_bar[j] = end
    if pend_final[j]:
        out.bad_debt[j] = max(0.0, -(eq - paid))
    pend_bar[j] = -1
