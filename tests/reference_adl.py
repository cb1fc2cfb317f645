"""Brute-force ADL with feedback (domain.md §10, venues.md HL5), written apart from the
engine: one instrument, USD collateral, flat MM rate, close-all liquidation, plain Python.

Unlike the engine (which walks, builds the ledger and walks again until the fills repeat),
this applies the ADL *inside* the walk: at every bar, first the bar's margin tests and
fills, then the fund and the ADL of the accounts closed out at that bar, whose fills the
counterparties hold from the next bar on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Acct:
    """One account: ``units`` signed at the close of bar ``entry``, ``cash`` USD."""

    entry: int
    units: float
    cash: float
    trigger: int = -1
    closeout_bar: int = -1
    closeout_equity: float | None = None
    bad_debt: float = 0.0
    fee: float = 0.0
    fill_price: float = 0.0  # the close-out's fill price
    fills: list[tuple[int, float, float]] = field(default_factory=list)  # (bar, units, price)


def replay_adl(low: Sequence[float], high: Sequence[float], close: Sequence[float],
               accounts: Sequence[Acct], *, mm_rate: float, holding_bars: int,
               latency_bars: int, fee_rate: float, fund_usd: float
               ) -> tuple[list[tuple[int, int, int, float, float]], float]:
    """Walk ``accounts`` (mutated) through the bars; return every ADL fill ``(bar, account,
    bankrupt, units, price)`` and the fund at the end."""
    n = len(close)
    fills: list[tuple[int, int, int, float, float]] = []
    fund = fund_usd
    pending: list[tuple[int, int]] = []  # (account, end bar) of close-outs under way
    for t in range(n):
        closed_now: list[int] = []
        for a, acc in enumerate(accounts):
            if acc.trigger >= 0 or not (acc.entry < t <= acc.entry + holding_bars):
                continue
            c0 = close[acc.entry]
            p = low[t] if acc.units >= 0 else high[t]
            equity = acc.cash + acc.units * (p - c0)
            if equity <= mm_rate * abs(acc.units) * p:
                acc.trigger = t
                pending.append((a, min(t + latency_bars, n - 1)))
        for a, end in list(pending):
            if end != t:
                continue
            pending.remove((a, end))
            acc = accounts[a]
            long = acc.units >= 0
            prices = [low[s] if long else high[s] for s in range(acc.trigger, end + 1)]
            fill = min(prices) if long else max(prices)
            equity = acc.cash + acc.units * (fill - close[acc.entry])
            fee = min(fee_rate * abs(acc.units) * fill, equity) if equity > 0 else 0.0
            acc.fee = fee
            acc.closeout_equity = equity - fee
            acc.bad_debt = max(0.0, -(equity - fee))
            acc.closeout_bar = t
            acc.fill_price = fill
            closed_now.append(a)
        closed_now.sort()
        # The fund and the ADL of this bar's close-outs, in account order.
        fund += sum(accounts[a].fee for a in closed_now)
        prev = max(0, t - 1)
        scores: dict[int, float] = {}
        for c, acc in enumerate(accounts):
            open_ = (acc.entry < t <= acc.entry + holding_bars
                     and (acc.trigger < 0 or acc.trigger > t))
            if not open_ or acc.units == 0:
                continue
            c0 = close[acc.entry]
            upnl = acc.units * (close[prev] - c0)
            equity = acc.cash + upnl
            if upnl <= 0 or equity <= 0:
                continue
            scores[c] = upnl / (abs(acc.units) * c0) * (abs(acc.units) * close[prev] / equity)
        taken: dict[int, float] = {}  # units given up this bar (they apply from t + 1)
        for j in closed_now:
            bank = accounts[j]
            debt = bank.bad_debt
            if debt <= 0:
                continue
            cover = min(max(fund, 0.0), debt)
            fund -= cover
            short = debt - cover
            if short <= 0:
                continue
            x = abs(bank.units) * short / debt
            per_unit = short / x
            price = bank.fill_price + per_unit if bank.units > 0 else bank.fill_price - per_unit
            ranked = sorted((c for c in scores
                             if c != j and (accounts[c].units > 0) != (bank.units > 0)),
                            key=lambda c: (-scores[c], c))
            left = x
            for c in ranked:
                have = abs(accounts[c].units) - taken.get(c, 0.0)
                if left <= 0 or have <= 0:
                    continue
                y = min(have, left)
                left -= y
                taken[c] = taken.get(c, 0.0) + y
                signed = y if accounts[c].units > 0 else -y
                fills.append((t, c, j, signed, price))
                accounts[c].fills.append((t, signed, price))
            if left > 0:
                fund -= left * per_unit
        for c, y in taken.items():
            # Several bankrupts' fills of this bar to one account: all apply from t + 1.
            acc = accounts[c]
            acc.cash += sum(u * (p - close[acc.entry]) for b, u, p in acc.fills if b == t)
            signed = y if acc.units > 0 else -y
            acc.units = 0.0 if abs(signed) >= abs(acc.units) else acc.units - signed
    return fills, fund
