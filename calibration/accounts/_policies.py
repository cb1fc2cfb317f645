"""Which liquidation policy loses least: one row per policy for the same accounts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calibration.accounts._book import Account
from calibration.accounts._engine import AccountConfig, simulate_accounts
from calibration.accounts._kernel_mech import POLICIES
from calibration.accounts._market import Market
from calibration.models import MarginModel, PortfolioMarginModel


def compare_policies(
    market: Market,
    model: MarginModel | Mapping[str, MarginModel],
    accounts: Sequence[Account],
    config: AccountConfig | None = None,
    *,
    policies: Sequence[str] = POLICIES,
    portfolio: PortfolioMarginModel | None = None,
) -> list[dict[str, Any]]:
    """Replay ``accounts`` once per liquidation policy, every other setting of ``config``
    kept, and return one row per policy (in ``policies`` order):

    - ``policy``; ``liquidated_accounts`` (accounts with a close-out step, count);
      ``liquidation_steps`` (close-out steps, count); ``liquidated_positions`` (positions
      the engine closed any part of, count);
    - ``liquidated_notional_usd``: units closed × fill price, summed, USD;
    - ``bad_debt_usd``, ``fee_usd``: to and from the venue's fund, USD;
    - ``healthy_leg_liquidations``, ``hedge_break_loss_usd``: contagion (domain.md §7).

    Figures are under ``config.mode``'s headline (``isolated``: the twins). Every policy runs
    the mechanics kernel, ``close_all`` included, so the rows are comparable.
    """
    config = config or AccountConfig()
    rows = []
    for policy in policies:
        cfg = dataclasses.replace(config, policy=policy)
        r = simulate_accounts(market, model, accounts, cfg, mechanics_kernel=True,
                              portfolio=portfolio)
        s = r.summary()
        if cfg.mode == "isolated":
            notional = float(r.twin_closed_usd.sum())
            fee = float(r.twin_fee_usd.sum())
            steps = int((r.twin_trigger_bar >= 0).sum())
        else:
            notional = float(r.leg_closed_usd.sum())
            fee = float(r.fee_usd.sum())
            steps = int(r.steps.sum())
        rows.append({
            "policy": policy,
            "liquidated_accounts": s["liquidated_accounts"],
            "liquidation_steps": steps,
            "liquidated_positions": s["liquidated_positions"],
            "liquidated_notional_usd": notional,
            "bad_debt_usd": s["bad_debt_usd"],
            "fee_usd": fee,
            "healthy_leg_liquidations": s["healthy_leg_liquidations"],
            "hedge_break_loss_usd": s["hedge_break_loss_usd"],
        })
    return rows


def least_loss(rows: Sequence[Mapping[str, Any]]) -> str:
    """The policy with the least bad debt (ties: less liquidated notional, then order)."""
    order = np.lexsort((np.arange(len(rows)),
                        [r["liquidated_notional_usd"] for r in rows],
                        [r["bad_debt_usd"] for r in rows]))
    return str(rows[int(order[0])]["policy"])
