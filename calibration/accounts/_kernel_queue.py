"""The mechanics walk when only the engine's capacity is on (issue 13), compiled with numba.

``replay_queue`` is ``_kernel_mech.replay_mech`` specialised to the case the capacity
frontier and the benchmark run: the fast start (each account joins at its core trigger bar),
``close_all``, no funding, no cascade, no market impact (the slippage is the spread), no
backstop, no keepers, no oracle, no portfolio requirement and no ADL fills fed back. Then a
close-out is one step closing everything at once, so an account is in one of four states:
not yet asking, waiting in the queue, with its step pending (until its fill bar), or done.

Same order of operations as ``replay_mech`` (so the same bits; ``_engine._run_mech`` picks
this kernel and a test compares both walks output for output), but every array is a local
hoisted once out of its NamedTuple, and the step and its fill are written out or called with
a few plain arrays: numba reference-counts every array read out of a tuple in a loop and
every array argument of a call (an atomic increment and decrement each), which made the
general walk's close-outs cost more than the queue itself. The served accounts of a bar are
picked one at a time (the smallest key first) while the capacity lasts, instead of sorting
the whole queue every bar: only the served prefix of the order matters, every account past
the capacity waits alike.
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
)
from calibration.accounts._kernel_mech import (
    Mechanics,
    MechOutputs,
    _next_fail,
    _queue_order,
)

#: Up to this many close-out starts per bar the served accounts are picked one at a time
#: (each pick a pass over the queue); above it, or with only a notional limit, the queue is
#: sorted (``_queue_order``).
_PICK_MAX = 4


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def _fill(
    low: FloatArray, high: FloatArray, close: FloatArray, inst_asset: IntArray,
    col_units: FloatArray, col_inst: IntArray, col_asset: IntArray, spread_rate: float,
    fee_rate: float, j: int, e: int, t: int, end: int, rem: FloatArray, net: FloatArray,
    cash: FloatArray, leg_pnl: FloatArray, leg_closed: FloatArray, fee: FloatArray,
    closeout_equity: FloatArray, closeout_bar: IntArray, bad_debt: FloatArray,
    finished: IntArray,
) -> None:  # pragma: no cover - jit
    """Account j's whole close-out started at bar t, filled at the worst price of bars
    t..end for its side (``_kernel_mech._settle`` of a final step without funding, impact,
    keepers or backstop, in its order of operations)."""
    c = cash[j]
    gross = 0.0
    slip = min(1.0, spread_rate)
    for i in range(rem.shape[1]):
        d = rem[j, i]
        if d == 0.0:
            continue
        long_asset = net[j, inst_asset[i]] >= 0.0
        p = low[i, t] if long_asset else high[i, t]
        for s in range(t + 1, end + 1):
            p = min(p, low[i, s]) if long_asset else max(p, high[i, s])
        c0 = close[i, e]
        pnl = d * (p - c0) - slip * abs(d) * p
        leg_pnl[j, i] += pnl
        leg_closed[j, i] += abs(d) * p
        gross += abs(d) * p
        c += pnl
        rem[j, i] = 0.0
    for cc in range(col_inst.shape[0]):
        u = col_units[j, cc]
        if u == 0.0:
            continue
        ci = col_inst[cc]
        long_asset = net[j, col_asset[cc]] >= 0.0
        p = low[ci, t] if long_asset else high[ci, t]
        for s in range(t + 1, end + 1):
            p = min(p, low[ci, s]) if long_asset else max(p, high[ci, s])
        c += u * p
    eq = c
    finished[j] = 1
    paid = min(fee_rate * gross, eq) if eq > 0.0 else 0.0
    fee[j] += paid
    c -= paid
    cash[j] = c
    closeout_equity[j] = eq - paid
    closeout_bar[j] = end
    bad_debt[j] = max(0.0, -(eq - paid))


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def replay_queue(
    m: MarketArrays, book: BookArrays, rules: CollateralRules, mech: Mechanics,
    n_assets: int, holding_bars: int, latency_bars: int, out: MechOutputs,
    first_ask: IntArray,
) -> None:  # pragma: no cover - jit
    """Fill ``out`` as ``replay_mech(m, book, rules, mech, n_assets, holding_bars,
    latency_bars, out, first_ask, no_reductions())`` does, for the settings of the module
    docstring (``first_ask``: every account's core trigger bar, -1: none)."""
    # Every array as a local, once (no reference count per read in the loops).
    low, high, close, inst_asset = m.low, m.high, m.close, m.inst_asset
    scale, caps, slope, offset, cap_rate = m.mm_scale, m.caps, m.mm_slope, m.mm_offset, \
        m.cap_rate
    entry, col_units, col_inst, col_asset = book.entry, book.col_units, book.col_inst, \
        book.col_asset
    hc_caps, hc_slope, hc_offset = rules.hc_caps, rules.hc_slope, rules.hc_offset
    upnl_w = rules.upnl_weight
    spread_rate, fee_rate = mech.spread_rate, mech.fee_rate
    max_acc, max_usd = mech.max_accounts_per_bar, mech.max_notional_per_bar
    first_come = mech.queue_order == 1
    o_trigger, o_bar, o_eq, o_bad, o_fee = out.trigger, out.closeout_bar, \
        out.closeout_equity, out.bad_debt, out.fee
    o_steps, o_finished, o_pnl, o_closed = out.steps, out.finished, out.leg_pnl, \
        out.leg_closed_usd
    o_queued_bar, o_wait, o_backlog, o_started, o_started_usd = out.queued_bar, \
        out.wait_bars, out.backlog, out.started, out.started_usd
    k, n = close.shape
    n_acc = entry.shape[0]
    n_col = col_inst.shape[0]
    rem = book.units.copy()
    cash = book.usd.copy()
    net = np.zeros((n_acc, n_assets))
    next_test = np.empty(n_acc, dtype=np.int64)
    queued = np.zeros(n_acc, dtype=np.bool_)
    queued_since = np.full(n_acc, -1, dtype=np.int64)
    done = np.zeros(n_acc, dtype=np.bool_)
    pend_bar = np.full(n_acc, -1, dtype=np.int64)
    pend_end = np.full(n_acc, -1, dtype=np.int64)
    join = np.empty(n_acc, dtype=np.int64)
    for j in range(n_acc):
        join[j] = first_ask[j] - 1 if first_ask[j] >= 0 else n
        next_test[j] = join[j] + 1
        for i in range(k):
            net[j, inst_asset[i]] += rem[j, i]
        for c in range(n_col):
            net[j, col_asset[c]] += col_units[j, c]
    order = np.argsort(join, kind="mergesort")
    active = np.empty(n_acc, dtype=np.int64)
    cand = np.empty(n_acc, dtype=np.int64)
    cand_key = np.empty(n_acc)
    rank = np.empty(n_acc, dtype=np.int64)
    n_active = 0
    nxt = 0
    gap = max(1, latency_bars)
    limited = max_acc >= 0 or max_usd < np.inf
    pick = 0 <= max_acc <= _PICK_MAX
    for t in range(n):
        while nxt < n_acc and join[order[nxt]] < t:
            active[n_active] = order[nxt]
            n_active += 1
            nxt += 1
        last_bar = t == n - 1
        # Pass 1: fill the steps due, test, and collect the accounts asking for a step.
        n_cand = 0
        keep = 0
        for a_idx in range(n_active):
            j = active[a_idx]
            if done[j]:  # filled in the bar of its step (latency 0)
                continue
            e = entry[j]
            if pend_bar[j] >= 0:
                if pend_end[j] == t:
                    _fill(low, high, close, inst_asset, col_units, col_inst, col_asset,
                          spread_rate, fee_rate, j, e, pend_bar[j], t, rem, net, cash, o_pnl,
                          o_closed, o_fee, o_eq, o_bar, o_bad, o_finished)
                    pend_bar[j] = -1
                    done[j] = True
                    continue
                active[keep] = j
                keep += 1
                continue
            if not (queued[j] or t <= e + holding_bars):
                continue
            active[keep] = j
            keep += 1
            if t < next_test[j]:
                continue
            # ``replay_mech``'s written-out test (the same order of operations).
            eq = cash[j]
            upnl = 0.0
            mm = 0.0
            for i in range(k):
                q = rem[j, i]
                if q == 0.0:
                    continue
                p = low[i, t] if net[j, inst_asset[i]] >= 0.0 else high[i, t]
                upnl += q * (p - close[i, e])
                notional = abs(q) * p
                b = 0
                while notional >= caps[i, b]:
                    b += 1
                value = scale[i, t] * (notional * slope[i, b] - offset[i, b])
                mm += min(value, cap_rate[i] * notional)
            eq += upnl if upnl <= 0.0 else upnl_w * upnl
            for c in range(n_col):
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
            if eq > mm:
                # Recovered (possibly while waiting): it leaves the queue and jumps to its
                # next trigger.
                queued[j] = False
                queued_since[j] = -1
                end = min(e + holding_bars, n - 1)
                nf = _next_fail(low, high, close, inst_asset, scale, caps, slope, offset,
                                cap_rate, entry, col_units, col_inst, col_asset, hc_caps,
                                hc_slope, hc_offset, upnl_w, j, t + 1, min(end, n + 1),
                                cash[j], rem, net)
                if nf >= 0:
                    next_test[j] = nf
                else:
                    next_test[j] = n + 1
                    keep -= 1  # nothing more can happen to it
                continue
            key = -np.inf
            if mm > 0.0:
                key = eq / mm
            if o_queued_bar[j] < 0:
                o_queued_bar[j] = t
            if queued_since[j] < 0:
                queued_since[j] = t
            if first_come:
                key = float(queued_since[j])
            cand[n_cand] = j
            cand_key[n_cand] = key
            n_cand += 1
        n_active = keep
        if n_cand == 0:
            continue
        # Pass 2: serve the queue up to the bar's capacity (unlimited at the data's end).
        bounded = limited and not last_bar
        if bounded and not pick:
            _queue_order(entry, cand, cand_key, n_cand, n_acc, rank)
        else:
            for c in range(n_cand):
                rank[c] = c
        n_started = 0
        usd = 0.0
        for r in range(n_cand):
            if bounded and ((max_acc >= 0 and n_started >= max_acc) or usd >= max_usd):
                # Past the capacity every account waits alike, whatever its place.
                for r2 in range(r, n_cand):
                    j = cand[rank[r2]]
                    queued[j] = True
                    if o_trigger[j] < 0:
                        o_wait[j] += 1
                o_backlog[t] += n_cand - r
                break
            if bounded and pick:
                # The smallest (key, entry, index) of the rest to the front.
                best = r
                kb = cand_key[rank[r]]
                tb = entry[cand[rank[r]]] * n_acc + cand[rank[r]]
                for r2 in range(r + 1, n_cand):
                    x = rank[r2]
                    kx = cand_key[x]
                    if kx < kb or (kx == kb and entry[cand[x]] * n_acc + cand[x] < tb):
                        best = r2
                        kb = kx
                        tb = entry[cand[x]] * n_acc + cand[x]
                x = rank[best]
                rank[best] = rank[r]
                rank[r] = x
            j = cand[rank[r]]
            e = entry[j]
            queued[j] = False
            queued_since[j] = -1
            n_started += 1
            # The step: every remaining unit, its notional at bar t's marks.
            if o_trigger[j] < 0:
                o_trigger[j] = t
            step_usd = 0.0
            for i in range(k):
                d = rem[j, i]
                if d == 0.0:
                    continue
                step_usd += abs(d) * (low[i, t] if net[j, inst_asset[i]] >= 0.0
                                      else high[i, t])
            usd += step_usd
            o_steps[j] += 1
            pend_bar[j] = t
            pend_end[j] = min(t + latency_bars, n - 1)
            next_test[j] = t + gap
            if pend_end[j] == t:
                _fill(low, high, close, inst_asset, col_units, col_inst, col_asset,
                      spread_rate, fee_rate, j, e, t, t, rem, net, cash, o_pnl, o_closed,
                      o_fee, o_eq, o_bar, o_bad, o_finished)
                pend_bar[j] = -1
                done[j] = True
        o_started[t] = n_started
        o_started_usd[t] = usd
