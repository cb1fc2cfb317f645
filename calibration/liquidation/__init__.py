"""Liquidation and insolvency simulation, exchange style: who pays when margin fails? (§4)

A population of positions is replayed through the bars of one instrument under a margin model:

Positions
    Grid (default): at the close of bars ``0, k, 2k, ...`` (``k = entry_every_bars``) one
    position per side × notional × leverage opens, but only at bars with a margin (``e >=
    first_valid_bar``, finite MM and IM rates for every notional) and with a bar after them
    (``e + 1 < n``). Alternatively the caller gives the positions (``config.positions``);
    those whose entry bar has no margin or no next bar are not opened (``PositionTable.opened``).
    A position of notional ``N`` and requested leverage ``l`` opens at the close ``C_e``:
    leverage ``L = min(l, 1 / IM_e)`` (``IM_e`` the IM rate at ``e`` for that notional),
    collateral ``N / L``, quantity ``qty = N / C_e``.

Equity and funding
    ``D_t = cumsum(funding_rate * close)`` (price units; 0 without funding data), settled per bar
    on the current notional: long equity at price ``P`` and bar ``t`` is ``collateral +
    qty (P - C_e) - qty (D_t - D_e)``, short ``collateral + qty (C_e - P) + qty (D_t - D_e)``.

Trigger
    The first bar ``t`` in ``(e, e + holding_bars]`` (and before the end of the data) where the
    equity at the bar's adverse extreme (low for longs, high for shorts) is ``<= mm_t * qty *
    extreme``. A position that does not trigger is closed without event. Rewritten, the test
    compares a series that does not depend on the position with a threshold that does not
    depend on t (see ``calibration.liquidation._kernels``): one O(n) pass per MM series and
    side builds a two-level block-minimum index, and each entry bar's positions are found with
    one walk of about ``holding_bars / 64`` steps. Positions that differ only in notional share
    the trigger when the model is not notional-dependent.

Liquidation and bankruptcy prices
    The liquidation price is the price at which equity equals MM at the trigger bar:
    long ``(C_e - C_e/L + D_t - D_e) / (1 - mm_t)`` (the bar's low when ``mm_t >= 1``, where no
    such price exists), short ``(C_e + C_e/L + D_t - D_e) / (1 + mm_t)``. The bankruptcy price
    (equity 0) is the numerator alone. Both use the funding up to the trigger bar.

Close-out
    After a latency of ``L = latency_bars`` bars, at the worst price of bars ``t .. t+L`` (min
    low for longs, max high for shorts; cut at the last bar), the trigger bar included: the
    engine takes the position over during bar ``t`` and cannot fill better than the worst price
    it meets from there to the close-out. ``L = 0`` is the one-bar window, the trigger bar's
    adverse extreme: the conservative reading of domain.md §4 (a bar that gaps through the
    liquidation price fills at its low / high, not at the liquidation price). Filling at the
    liquidation price is an optimistic engine, the named option ``closeout_basis =
    "liquidation_price"``, never the default; it has no window, so it needs ``L = 0``.
    Then slippage ``spread_rate + impact_coef * (N / depth_t) ** impact_exponent`` against the
    position (long sells at ``P (1 - slip)``, short buys at ``P (1 + slip)``), capped at 100%.
    ``depth_t`` is the bid (longs) / ask (shorts) depth at the trigger bar when the series has
    both, else ``depth_fraction_of_adv * ADV_t`` with ``ADV_t`` the mean traded USD per day over
    the last ``adv_window_bars`` bars up to ``t`` (fewer at the start). Zero depth means the
    capped slippage. The impact term uses the position's own notional (not scaled by
    ``population_scale``). Close-out equity = collateral + PnL at the close-out price, funding
    to the trigger bar.

Insurance fund and bad debt
    Close-out equity < 0: bad debt ``-equity`` is drawn from the fund, no fee. Otherwise the
    fund receives ``min(liquidation_fee_rate * N, equity)``; the trader keeps the rest. The fund
    starts at ``insurance_fund_usd`` and moves at each close-out bar ``min(t + L, n - 1)``; all
    close-outs of one bar settle together (net). Its path is the level after each bar with a
    close-out, stamped with the bar's open time (as every bar in marginlab). It is exhausted
    the first time it is below 0 (where exchanges turn to auto-deleveraging).

    One fund per venue (domain.md §4): ``shared_insurance_fund`` merges the close-outs of every
    instrument of a backtest into one ledger (``InsuranceFund``) in time order, starting once
    from ``insurance_fund_usd``. Close-outs stamped with the same time settle together (net),
    whatever their instrument, so the order among them cannot change the path; their sum is
    taken in the order the instruments were given, then in the engine's order, so the result
    is the same bit for bit on every run. With bars of different sizes the stamp is still the
    close-out bar's open time: a 15-minute bar's close-outs settle at its open, before a
    5-minute bar opening 5 minutes later. ``LiquidationResult.fund`` is the ledger of one
    instrument alone (what the venue's fund would be if it listed that instrument only); with
    one instrument the two are the same.

Premature liquidations
    The bankruptcy price is not reached (by the low / high of bars ``t .. t+R``, ``R =
    recovery_bars``, cut at the last bar) and the close of bar ``min(t + R, n - 1)`` is strictly
    back on the safe side of the liquidation price (above it for longs, below for shorts). The
    trigger bar ``t`` is part of the window: a bar whose extreme ran through bankruptcy made
    the liquidation necessary even when it closed back above it (domain.md §4).

Cascade (``cascade=True``)
    The USD notional (× ``population_scale``) of the long positions that trigger in bar ``s``,
    ``Q_s``, pushes the low of bar ``s+1`` to ``low * max(0, 1 - cascade_kappa * Q_s /
    depth_s)``; short liquidations push the next high to ``high * (1 + min(1, kappa Q_s /
    depth_s))`` (the move is capped at 100% both ways), with ``depth_s`` the bid / ask depth or
    the ADV-based depth as for slippage. Liquidated notional is counted at the trigger bar (the
    liquidation engine takes the position over then). The moved extremes are used for every
    later step (triggers, close-out, premature test). Because a bar only depends on the
    liquidations of the bar before, the fixed point of "liquidations ⇒ impact ⇒ liquidations"
    is unique and is found exactly in one forward pass (equivalent to iterating the whole
    simulation until nothing changes, with no iteration cap); it can only add or advance
    liquidations compared with no cascade.

Scaling
    Every grid (or explicit) position stands for ``population_scale`` identical positions: USD
    totals (notional opened and liquidated, bad debt, fees, the fund's moves, cascade ``Q``) are
    multiplied by it; counts and the worst single position's bad debt are not.

Per window (``LiquidationResult.metrics``), positions count where they open, liquidations,
bad debt and fees where they trigger, by bar open time in ``[start_ms, end_ms)``.
"""

from calibration.liquidation._config import (
    CLOSEOUT_BASES,
    MAX_BARS,
    MAX_EXPLICIT_POSITIONS,
    MAX_GRID_POSITIONS,
    MAX_GRID_VALUES,
    SIDES,
    ExplicitPosition,
    LiquidationConfig,
)
from calibration.liquidation._engine import simulate_liquidations
from calibration.liquidation._fund import InsuranceFund, shared_insurance_fund
from calibration.liquidation._results import LiquidationEvents, LiquidationResult, PositionTable

__all__ = [
    "CLOSEOUT_BASES",
    "MAX_BARS",
    "MAX_EXPLICIT_POSITIONS",
    "MAX_GRID_POSITIONS",
    "MAX_GRID_VALUES",
    "SIDES",
    "ExplicitPosition",
    "InsuranceFund",
    "LiquidationConfig",
    "LiquidationEvents",
    "LiquidationResult",
    "PositionTable",
    "shared_insurance_fund",
    "simulate_liquidations",
]
