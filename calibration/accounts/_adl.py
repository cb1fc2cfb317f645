"""Auto-deleveraging (domain.md §10; venues.md §5 HL5, BY3, and E3 for the 2025-10-10 scale):
once the venue's one insurance fund cannot pay an account's bad debt, opposite-side accounts,
ranked by profit and leverage, absorb the shortfall at the bankrupt account's bankruptcy price.

The rule, over a replay's close-outs in bar order (a ledger on the replay's path):

- the fund starts at ``insurance_fund_usd``; at each close-out bar b it first receives that
  bar's liquidation fees, then pays the bar's bad debts in account order: of an account's bad
  debt ``D`` it pays ``min(max(F, 0), D)``; the rest ``S`` is the *shortfall*;
- the shortfall goes to the bankrupt account's closed legs pro rata to their close-out losses
  ``max(0, −PnL_i)`` (pro rata to fill notional when no leg lost: the collateral did):
  ``S_i``. Of leg i (``u_i`` units closed at the fill price ``p_i``) the ADL takes
  ``x_i = |u_i| · S / D`` units, the share the fund did not cover, at the *bankruptcy price*
  ``P_i = p_i ± S_i / x_i`` (+ for a long, − for a short: the price at which that share of
  the account ends at zero equity; with no fund, the whole position at ``equity = 0``);
- the counterparties of leg i are the accounts holding instrument i on the other side, open at
  bar b (entered before b, within their holding window) and not in liquidation (no close-out
  step at or before b), with a profit on that position at the previous mark (bar ``b − 1``'s
  close, HL5); they are ranked by ``score = PnL rate × leverage``: the position's unrealised
  PnL over its entry notional, times the account's gross notional over its equity, both at
  the previous mark (equity ≤ 0 or no profit: not ranked); ties in account order;
- in rank order each counterparty gives up to its remaining units on the instrument: an ADL
  fill of ``y`` units at ``P_i``, absorbing ``y · S_i / x_i`` USD of the shortfall; what no
  counterparty can take stays with the fund (which then goes below zero: *uncovered*).

The ledger feeds back into the replay (``_engine``: the walk is run again with the fills
until they reproduce themselves): from the bar after a fill the counterparty holds ``y``
units fewer and has the fill's PnL ``y · (P_i − entry close)`` in cash (no fee, no
slippage), so its later marks, margin test, close-out and bad debt are those of what it
still holds. Here, the ranking at a later bar reads the same: held units (entry units less
the account's earlier fills) and the earlier fills' PnL in equity; a bankrupt account that
was deleveraged before closes its held units. One unit is never deleveraged twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class AdlFill:
    """One ADL fill: ``account`` (index in the population) gives up ``units`` (signed, the
    units it held: > 0 a long closed) of instrument ``instrument`` (index) at bar ``bar`` at
    ``price_usd`` (the bankruptcy price of ``bankrupt``'s leg), absorbing ``absorbed_usd``;
    ``pnl_usd`` is the account's realised PnL on the fill, ``units × (price_usd − entry
    close)``, USD (credited to its cash from bar ``bar + 1``)."""

    account: int
    bankrupt: int
    bar: int
    instrument: int
    units: float
    price_usd: float
    absorbed_usd: float
    pnl_usd: float = 0.0

    @property
    def notional_usd(self) -> float:
        """``|units| × price_usd``, USD."""
        return abs(self.units) * self.price_usd


@dataclass(frozen=True)
class AdlLedger:
    """The ADL of one replay.

    Attributes:
        fills: every ADL fill, in bar then bankrupt-account then rank order.
        adl_volume_usd: Σ |units| × bankruptcy price over the fills, USD.
        adl_absorbed_usd: the shortfall the counterparties absorbed, USD.
        adl_uncovered_usd: the shortfall no counterparty could take (left in the fund), USD.
        fund_path: ``(bar, fund level after that bar)`` for every close-out bar, USD, with the
            absorbed shortfall not paid by the fund.
    """

    fills: tuple[AdlFill, ...]
    adl_volume_usd: float
    adl_absorbed_usd: float
    adl_uncovered_usd: float
    fund_path: tuple[tuple[int, float], ...]

    def absorbed_per_account(self, n_accounts: int) -> FloatArray:
        """USD absorbed by each account of the population, shape ``(A,)``."""
        out = np.zeros(n_accounts)
        for f in self.fills:
            out[f.account] += f.absorbed_usd
        return out

    def pnl_per_account(self, n_accounts: int) -> FloatArray:
        """Realised PnL of each account's ADL fills, USD, shape ``(A,)``."""
        out = np.zeros(n_accounts)
        for f in self.fills:
            out[f.account] += f.pnl_usd
        return out

    def volume_per_account(self, n_accounts: int) -> FloatArray:
        """ADL notional given up by each account, USD, shape ``(A,)``."""
        out = np.zeros(n_accounts)
        for f in self.fills:
            out[f.account] += f.notional_usd
        return out


def auto_deleverage(
    *,
    close: FloatArray,
    entry_bar: IntArray,
    units: FloatArray,
    usd: FloatArray,
    col_units: FloatArray,
    col_inst: IntArray,
    holding_bars: int,
    trigger_bar: IntArray,
    closeout_bar: IntArray,
    bad_debt_usd: FloatArray,
    fee_usd: FloatArray,
    leg_pnl_usd: FloatArray,
    leg_closed_usd: FloatArray,
    insurance_fund_usd: float,
) -> AdlLedger:
    """The ADL ledger of a replay (module docstring).

    Args:
        close: close prices, ``(k, n)``.
        entry_bar: each account's entry bar, ``(A,)``.
        units: signed units per account and instrument at entry, ``(A, k)``.
        usd: stable collateral, USD, ``(A,)``.
        col_units, col_inst: non-stable collateral units ``(A, C)`` and the instrument
            pricing each asset ``(C,)`` (valued at the previous mark's close).
        holding_bars: bars an account stays open at most.
        trigger_bar, closeout_bar: first close-out step and last fill bar (-1: none), ``(A,)``.
        bad_debt_usd, fee_usd: per account, USD, ``(A,)``.
        leg_pnl_usd, leg_closed_usd: per account and instrument, the close-out PnL and the
            closed units × fill price, USD, ``(A, k)``.
        insurance_fund_usd: the fund at the start, USD.
    """
    k = close.shape[0]
    n_acc = units.shape[0]
    avail = np.abs(units).copy()
    sign = np.sign(units)
    realised = np.zeros(n_acc)  # the accounts' ADL PnL so far, USD
    entry_close = close[:, entry_bar].T if n_acc else np.zeros((0, k))
    hit = closeout_bar >= 0
    moves: dict[int, list[int]] = {}
    for a in (int(v) for v in np.flatnonzero(hit)):
        moves.setdefault(int(closeout_bar[a]), []).append(a)
    fund = float(insurance_fund_usd)
    fills: list[AdlFill] = []
    absorbed_total = 0.0
    uncovered_total = 0.0
    path: list[tuple[int, float]] = []
    for b in sorted(moves):
        members = moves[b]
        fund += float(fee_usd[members].sum())
        scores: FloatArray | None = None
        for j in members:
            debt = float(bad_debt_usd[j])
            if debt <= 0.0:
                continue
            cover = min(max(fund, 0.0), debt)
            fund -= cover
            short = debt - cover
            if short <= 0.0:
                continue
            if scores is None:
                # Every fill of this bar's scores is at bar b: the ranking reads the fills
                # before b (they apply from the bar after theirs).
                scores = _scores(close, entry_close, entry_bar, sign * avail, usd + realised,
                                 col_units, col_inst, holding_bars, trigger_bar, b)
            held = sign[j] * avail[j]  # what the bankrupt account closed
            losses = np.maximum(0.0, -leg_pnl_usd[j])
            weights = losses if losses.sum() > 0.0 else leg_closed_usd[j]
            legs = np.flatnonzero((held != 0.0) & (weights > 0.0))
            if legs.size == 0:
                fund -= short
                uncovered_total += short
                continue
            total_w = float(weights[legs].sum())
            for i in (int(v) for v in legs):
                share_usd = short * float(weights[i]) / total_w
                x = abs(float(held[i])) * short / debt
                fill_price = float(leg_closed_usd[j, i]) / abs(float(held[i]))
                per_unit = share_usd / x
                price = fill_price + per_unit if held[i] > 0.0 else fill_price - per_unit
                left = x
                side = -np.sign(units[j, i])
                mine = np.flatnonzero((np.sign(units[:, i]) == side) & (avail[:, i] > 0.0)
                                      & (scores[:, i] > 0.0))
                mine = mine[mine != j]
                order = mine[np.argsort(-scores[mine, i], kind="stable")]
                for c in (int(v) for v in order):
                    if left <= 0.0:
                        break
                    y = min(float(avail[c, i]), left)
                    avail[c, i] -= y
                    left -= y
                    got = y * per_unit
                    absorbed_total += got
                    pnl = float(side) * y * (price - float(entry_close[c, i]))
                    realised[c] += pnl
                    fills.append(AdlFill(account=c, bankrupt=j, bar=b, instrument=i,
                                         units=float(side) * y, price_usd=price,
                                         absorbed_usd=got, pnl_usd=pnl))
                if left > 0.0:
                    rest = left * per_unit
                    fund -= rest
                    uncovered_total += rest
        path.append((b, fund))
    volume = float(sum(f.notional_usd for f in fills))
    return AdlLedger(fills=tuple(fills), adl_volume_usd=volume, adl_absorbed_usd=absorbed_total,
                     adl_uncovered_usd=uncovered_total, fund_path=tuple(path))


def _scores(close: FloatArray, entry_close: FloatArray, entry_bar: IntArray, units: FloatArray,
            usd: FloatArray, col_units: FloatArray, col_inst: IntArray, holding_bars: int,
            trigger_bar: IntArray, b: int) -> FloatArray:
    """``(A, k)``: PnL rate × leverage of every position at the close of bar ``b − 1`` (the
    previous mark), 0 where the account is not open and outside liquidation at bar b, or the
    position or the account's equity is not in profit. ``units``: the units held (after
    earlier ADL fills); ``usd``: cash, the earlier fills' PnL included."""
    prev = max(0, b - 1)
    mark = close[:, prev]
    upnl = units * (mark[None, :] - entry_close)
    equity = usd + upnl.sum(axis=1)
    if col_units.shape[1]:
        equity = equity + col_units @ close[col_inst, prev]
    gross = (np.abs(units) * mark[None, :]).sum(axis=1)
    entry_notional = np.abs(units) * entry_close
    open_ = ((entry_bar < b) & (b <= entry_bar + holding_bars)
             & ((trigger_bar < 0) | (trigger_bar > b)) & (equity > 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(entry_notional > 0.0, upnl / np.where(entry_notional > 0.0,
                                                               entry_notional, 1.0), 0.0)
        lev = np.where(equity > 0.0, gross / np.where(equity > 0.0, equity, 1.0), 0.0)
    score = rate * lev[:, None]
    score[~open_] = 0.0
    score[rate <= 0.0] = 0.0
    return score
