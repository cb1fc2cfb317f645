"""Accounts of mixed margin modes in one population (``Account.mode``).

Each mode's accounts are replayed as a run of that mode alone (``simulate_accounts`` with
``AccountConfig.mode`` set to it), and the results merged back in the accounts' order. An
account's figures are therefore exactly those of a run of that account alone in its mode:
in the §7 core (and with funding, impact and the policies) accounts do not interact, and the
venue's one insurance fund only adds their bad debt and fees (``AccountResult.fund_path``
over the merged accounts, each under its own mode).

What does couple accounts is the shared cascade (a close-out's volume moves the next bar for
every account) and the engine's capacity (accounts wait in one queue). A joint cascade or
queue across modes would need the modes in one kernel walk; until then a mixed population
with ``cascade`` or a capacity limit is refused rather than run with a cascade or queue split
by mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from calibration._errors import InsufficientData, InvalidParameters
from calibration.accounts._book import MARGIN_MODES, Account
from calibration.accounts._market import Market
from calibration.models import MarginModel, PortfolioMarginModel

if TYPE_CHECKING:
    from calibration.accounts._engine import AccountConfig, AccountResult

#: Per-account (A,) result arrays; the per-position (P,) ones follow the positions; the
#: per-bar (n,) ones are summed.
_PER_ACCOUNT = ("entry_bar", "trigger_bar", "closeout_equity_usd", "bad_debt_usd", "fee_usd",
                "closeout_bar", "steps", "queued_bar", "wait_bars")
_PER_POSITION = ("position_instrument", "position_notional_usd", "twin_trigger_bar",
                 "twin_bad_debt_usd", "twin_fee_usd", "leg_pnl_usd", "twin_closeout_bar",
                 "leg_liquidated", "leg_closed_usd", "twin_closed_usd", "twin_queued_bar",
                 "twin_wait_bars")
_PER_BAR = ("backlog", "started", "started_usd", "twin_backlog")


def simulate_mixed(market: Market, model: MarginModel | Mapping[str, MarginModel],
                   accounts: Sequence[Account], config: AccountConfig, *,
                   portfolio: PortfolioMarginModel | None, mechanics_kernel: bool,
                   fast_start: bool, workers: int = 1) -> AccountResult:
    """``simulate_accounts`` for accounts whose ``mode`` (None: ``config.mode``) differs
    (module docstring). ``portfolio`` is required when some account is in portfolio mode,
    and refused otherwise.

    Raises:
        InvalidParameters: a cascade or capacity limit with mixed modes; a portfolio model
            missing or unused.
        InsufficientData: no account of any mode could open.
    """
    from calibration.accounts._engine import AccountResult, simulate_accounts

    groups: dict[str, list[int]] = {}
    for j, acc in enumerate(accounts):
        groups.setdefault(acc.mode or config.mode, []).append(j)
    if ("portfolio" in groups) != (portfolio is not None):
        raise InvalidParameters("accounts in portfolio mode need a portfolio margin model, "
                                "and only they take one", field="portfolio_model")
    if len(groups) > 1 and (config.cascade or config.capacity_limited):
        raise InvalidParameters(
            "a shared cascade or a capacity limit couples accounts across margin modes, "
            "which a mixed-mode population does not replay yet: give every account one mode, "
            "or turn cascade and the capacity limits off", field="accounts.mode")
    parts: list[tuple[list[int], AccountResult]] = []
    skipped: dict[str, str] = {}
    for mode in MARGIN_MODES:
        if mode not in groups:
            continue
        idx = groups[mode]
        sub = [accounts[j] for j in idx]
        try:
            result = simulate_accounts(
                market, model, sub, dataclasses.replace(config, mode=mode),
                portfolio=portfolio if mode == "portfolio" else None,
                mechanics_kernel=mechanics_kernel, fast_start=fast_start, workers=workers)
        except InsufficientData as exc:
            why = str(exc).removeprefix("no account could open: ")
            skipped.update({a.id: why for a in sub})
            continue
        skipped.update(result.skipped)
        position = {id(a): j for j, a in zip(idx, sub, strict=True)}
        parts.append(([position[id(a)] for a in result.accounts], result))
    if not parts:
        raise InsufficientData("no account could open: " + "; ".join(sorted(set(
            skipped.values()))))
    if len(parts) == 1 and len(groups) == 1:
        return parts[0][1]
    # Accounts in input order; positions by (account, instrument), as one run lists them.
    acc_global = np.concatenate([np.asarray(g, dtype=np.int64) for g, _ in parts])
    acc_order = np.argsort(acc_global, kind="stable")
    offsets = np.cumsum([0] + [len(g) for g, _ in parts])
    pos_acc = np.concatenate([r.position_account + offsets[p]
                              for p, (_, r) in enumerate(parts)])
    new_index = np.empty(acc_order.shape[0], dtype=np.int64)
    new_index[acc_order] = np.arange(acc_order.shape[0])
    pos_acc = new_index[pos_acc]
    pos_inst = np.concatenate([r.position_instrument for _, r in parts])
    pos_order = np.lexsort((pos_inst, pos_acc))
    first = parts[0][1]
    fields: dict[str, Any] = {}
    for names, order in ((_PER_ACCOUNT, acc_order), (_PER_POSITION, pos_order)):
        for name in names:
            values = [getattr(r, name) for _, r in parts]
            # Arrays a run without mechanics leaves empty stay empty.
            fields[name] = (values[0] if all(v.size == 0 for v in values)
                            else np.concatenate(values)[order])
    for name in _PER_BAR:
        values = [getattr(r, name) for _, r in parts]
        fields[name] = (values[0] if all(v.size == 0 for v in values)
                        else np.sum(values, axis=0))
    accs = [a for g, r in parts for a in r.accounts]
    modes = [m for _, r in parts for m in (r.mode,) * len(r.accounts)]
    return AccountResult(
        accounts=tuple(accs[int(o)] for o in acc_order), skipped=skipped,
        position_account=pos_acc[pos_order], mode="mixed", timestamp_ms=first.timestamp_ms,
        instruments=first.instruments, insurance_fund_usd=first.insurance_fund_usd,
        policy=first.policy, account_mode=tuple(modes[int(o)] for o in acc_order), **fields)
