"""The liquidation engine as a bottleneck (domain.md §10): the queue's figures and the
throughput–insolvency frontier (bad debt as a function of the engine's capacity)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibration._errors import InvalidParameters
from calibration.accounts._book import Account
from calibration.accounts._engine import AccountConfig, AccountResult, simulate_accounts
from calibration.accounts._market import Market
from calibration.models import MarginModel, PortfolioMarginModel

#: What a frontier's capacities limit: accounts (steps) per bar, or USD notional per bar.
FRONTIER_KINDS: tuple[str, ...] = ("accounts", "notional")


def _headline(result: AccountResult) -> tuple[Any, Any, Any, Any, Any]:
    """Trigger bar, wait bars, backlog per bar, bad debt, closed notional under the mode."""
    if result.mode == "isolated":
        return (result.twin_trigger_bar, result.twin_wait_bars, result.twin_backlog,
                result.twin_bad_debt_usd, result.twin_closed_usd)
    return (result.trigger_bar, result.wait_bars, result.backlog, result.bad_debt_usd,
            result.leg_closed_usd)


def queue_figures(result: AccountResult, unlimited: AccountResult | None = None
                  ) -> dict[str, Any]:
    """The queue of a run of the mechanics kernel, under its headline mode (``isolated``: the
    twins' engine):

    - ``peak_backlog`` (accounts waiting after a bar's service, count) and
      ``peak_backlog_bar`` (its first bar, -1 with no queue); ``backlog``: ``[bar, count]``
      for every bar with a non-empty queue;
    - ``wait_bars_histogram``: bars waited before the first close-out step → liquidated
      accounts (count); ``mean_wait_bars``, ``max_wait_bars`` over the liquidated;
    - ``bad_debt_usd``; with ``unlimited`` (the same run without a capacity limit),
      ``bad_debt_unlimited_usd`` and ``bad_debt_added_usd`` (the difference: what waiting
      cost the fund, negative if waiting happened to help).
    """
    if result.backlog.size == 0:
        raise InvalidParameters("queue figures need a run of the mechanics kernel",
                                field="mechanics_kernel")
    trig, wait, backlog, bad, _ = _headline(result)
    hit = trig >= 0
    waits = wait[hit]
    values, counts = np.unique(waits, return_counts=True)
    busy = np.flatnonzero(backlog > 0)
    out: dict[str, Any] = {
        "peak_backlog": int(backlog.max()) if backlog.size else 0,
        "peak_backlog_bar": int(np.argmax(backlog)) if busy.size else -1,
        "backlog": [[int(b), int(backlog[b])] for b in busy],
        "wait_bars_histogram": {str(int(v)): int(c) for v, c in zip(values, counts,
                                                                    strict=True)},
        "mean_wait_bars": float(waits.mean()) if waits.size else 0.0,
        "max_wait_bars": int(waits.max()) if waits.size else 0,
        "bad_debt_usd": float(bad.sum()),
    }
    if unlimited is not None:
        base = float(_headline(unlimited)[3].sum())
        out["bad_debt_unlimited_usd"] = base
        out["bad_debt_added_usd"] = out["bad_debt_usd"] - base
    return out


def _unlimited(config: AccountConfig) -> AccountConfig:
    return dataclasses.replace(config, max_liquidations_per_bar=None,
                               max_liquidation_notional_per_bar=None,
                               max_liquidations_per_block=None)


def capacity_frontier(
    market: Market,
    model: MarginModel | Mapping[str, MarginModel],
    accounts: Sequence[Account],
    config: AccountConfig | None = None,
    *,
    capacities: Sequence[float] = (1, 2, 5, 10, math.inf),
    kind: str = "accounts",
    portfolio: PortfolioMarginModel | None = None,
) -> list[dict[str, Any]]:
    """Replay ``accounts`` once per capacity, every other setting of ``config`` kept, and
    return one row per capacity (in ``capacities`` order; ``inf``: no limit):

    - ``capacity``: the limit (``max_liquidations_per_bar`` for ``kind="accounts"``,
      ``max_liquidation_notional_per_bar`` in USD for ``"notional"``), null for no limit;
      ``per_minute``: the same per minute of the market's clock (null for no limit);
    - ``bad_debt_usd``; ``bad_debt_added_usd`` against the run without a limit (USD);
    - ``liquidated_accounts`` (count), ``liquidated_notional_usd`` (units closed × fill price,
      USD), ``liquidation_steps`` (count);
    - ``peak_backlog`` (accounts, count), ``mean_wait_bars``, ``max_wait_bars``;
    - ``adl_volume_usd``: with ``config.adl``, the auto-deleveraged notional at bankruptcy
      prices (USD; 0 without ADL), ``adl_absorbed_usd`` the shortfall the counterparties took.

    Every row runs the mechanics kernel (the unlimited one too), under ``config.mode``'s
    headline. More capacity never adds bad debt when the close-out prices only worsen while
    accounts wait and the cascade is off (first-come order; tests prove it on monotone paths);
    otherwise it can (a rebound rewards waiting, a cascade punishes the volume of a fast
    engine), which the frontier then shows.
    """
    if kind not in FRONTIER_KINDS:
        raise InvalidParameters(f"kind must be one of {', '.join(FRONTIER_KINDS)}, got "
                                f"{kind!r}", field="kind")
    if not capacities:
        raise InvalidParameters("give at least one capacity", field="capacities")
    config = _unlimited(config or AccountConfig())
    base = simulate_accounts(market, model, accounts, config, mechanics_kernel=True,
                             portfolio=portfolio)
    base_bad = float(_headline(base)[3].sum())
    rows = []
    for c in capacities:
        if isinstance(c, bool) or not isinstance(c, int | float) or math.isnan(c) or c <= 0:
            raise InvalidParameters(f"capacities must be numbers > 0 (or inf), got {c!r}",
                                    field="capacities")
        limit: float | int | None
        if math.isinf(c):
            limit, r = None, base
        else:
            if kind == "accounts" and float(c) != int(c):
                raise InvalidParameters(f"an account capacity must be whole, got {c!r}",
                                        field="capacities")
            if kind == "accounts":
                limit = int(c)
                run = dataclasses.replace(config, max_liquidations_per_bar=limit)
            else:
                limit = float(c)
                run = dataclasses.replace(config, max_liquidation_notional_per_bar=limit)
            r = simulate_accounts(market, model, accounts, run, mechanics_kernel=True,
                                  portfolio=portfolio)
        trig, wait, backlog, bad, closed = _headline(r)
        waits = wait[trig >= 0]
        steps = int((r.twin_trigger_bar >= 0).sum()) if r.mode == "isolated" else int(
            r.steps.sum())
        rows.append({
            "capacity": limit,
            "per_minute": None if limit is None else limit * 60.0 / market.bar_seconds,
            "bad_debt_usd": float(bad.sum()),
            "bad_debt_added_usd": float(bad.sum()) - base_bad,
            "liquidated_accounts": int((trig >= 0).sum()),
            "liquidated_notional_usd": float(closed.sum()),
            "liquidation_steps": steps,
            "peak_backlog": int(backlog.max()) if backlog.size else 0,
            "mean_wait_bars": float(waits.mean()) if waits.size else 0.0,
            "max_wait_bars": int(waits.max()) if waits.size else 0,
            "adl_volume_usd": r.adl.adl_volume_usd if r.adl is not None else 0.0,
            "adl_absorbed_usd": r.adl.adl_absorbed_usd if r.adl is not None else 0.0,
        })
    return rows


def parse_capacities(text: str) -> list[float]:
    """``"1,2,5,10,inf"`` → capacities (``inf``: no limit); refused naming ``frontier``."""
    out: list[float] = []
    for part in text.split(","):
        token = part.strip().lower()
        try:
            value = math.inf if token in ("inf", "infinity", "none") else float(token)
        except ValueError:
            raise InvalidParameters(f"--frontier: {part.strip()!r} is not a number or inf",
                                    field="frontier") from None
        if math.isnan(value) or value <= 0:
            raise InvalidParameters(f"--frontier: capacities must be > 0, got {part.strip()}",
                                    field="frontier")
        out.append(value)
    return out
