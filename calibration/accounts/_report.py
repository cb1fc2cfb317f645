"""One call that runs an account backtest, and its JSON report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from calibration._version import ENGINE_VERSION
from calibration.accounts._book import Account, PopulationSpec, generate_population
from calibration.accounts._capacity import capacity_frontier, queue_figures
from calibration.accounts._engine import AccountConfig, AccountResult, simulate_accounts
from calibration.accounts._market import Market
from calibration.coverage import iso_utc
from calibration.horizon import resolve_horizon
from calibration.models import MarginModel, PortfolioMarginModel, make_model, make_portfolio_model
from calibration.windows import StressWindow


class AccountFigures(msgspec.Struct, frozen=True, kw_only=True):
    """Account figures over one window (accounts counted in the window where they open).

    Attributes:
        window: ``all`` or the stress window's name.
        start, end: the window's bounds (UTC ISO 8601), null for ``all``.
        accounts: accounts opened in the window (count).
        positions: their positions (count).
        notional_opened_usd: their gross notional at entry, USD.
        liquidated_accounts: accounts liquidated under the run's mode (count).
        liquidated_positions: positions closed by those liquidations (count).
        bad_debt_usd: bad debt under the run's mode, USD.
        bad_debt_cross_usd: bad debt with collateral pooled per account, USD.
        bad_debt_isolated_usd: bad debt of the isolated twins (each position alone with its
            entry-IM share of the account's collateral), USD.
        healthy_leg_liquidations: positions closed with their account whose twin never
            triggered or triggered later (count).
        hedge_break_loss_usd: those legs' close-out losses, ``max(0, −PnL)``, USD.
        saved_by_cross: accounts never liquidated although one of their twins was (count).
    """

    window: str
    start: str | None = None
    end: str | None = None
    accounts: int
    positions: int
    notional_opened_usd: float
    liquidated_accounts: int
    liquidated_positions: int
    bad_debt_usd: float
    bad_debt_cross_usd: float
    bad_debt_isolated_usd: float
    healthy_leg_liquidations: int
    hedge_break_loss_usd: float
    saved_by_cross: int


class AccountRow(msgspec.Struct, frozen=True, kw_only=True):
    """One account's outcome.

    Attributes:
        id: the account's identifier.
        liquidated: whether it was liquidated under its mode.
        trigger_time: open time (UTC ISO 8601) of its trigger bar; null if never liquidated
            (isolated mode: its first twin's).
        bad_debt_usd: its bad debt under its mode, USD.
        mode: its margin mode (its own, else the run's).
    """

    id: str
    liquidated: bool
    trigger_time: str | None
    bad_debt_usd: float
    mode: str = "cross"


class AccountBacktestReport(msgspec.Struct, frozen=True, kw_only=True):
    """An account backtest: the figures overall and per stress window, and every account.

    Prices are evaluated at each asset's adverse extreme for the account (low when net long,
    high when net short): OHLC does not say whether the extremes of different instruments
    coincide, so this is the conservative reading.

    Attributes:
        engine_version: version of the engine's numbers.
        mode: ``cross``, ``isolated`` or ``portfolio``: the run's, for accounts that name
            none.
        model: the margin model family of every instrument (in ``portfolio`` mode it sizes
            the isolated twins).
        params: its parameters, defaults filled in (rates as fractions of notional).
        instruments: the market's instruments.
        market_fingerprint: sha256 over every series read (hex).
        dropped_bars: instrument → its bars dropped to align the market (count).
        bar_seconds: the bar size (s).
        horizon_bars: the close-out horizon the models were sized for (bars).
        horizon: the same as a duration (``1h``).
        liquidation: the replay settings (holding and latency in bars, rates as fractions,
            the fund in USD, haircut schedules, the weight of unrealised profit).
        adverse_extremes: how prices are read within a bar (the conservative reading).
        summary: the account figures overall, then per stress window.
        accounts_by_mode: margin mode → the overall figures of its accounts (each mode
            present; they sum to ``summary[0]``).
        accounts: every opened account's outcome.
        skipped: account id → why it was not opened.
        insurance_fund_min_usd: the venue fund's lowest level, USD.
        insurance_fund_exhausted_at: when it first went below zero (UTC ISO 8601), or null.
        portfolio_model: in ``portfolio`` mode, the scenario model of the requirement.
        portfolio_params: its parameters.
        queue: with a capacity limit (domain.md §10), the engine's queue
            (``calibration.accounts.queue_figures``; ``backlog`` as ``[bar open time (UTC ISO
            8601), accounts waiting]``, ``peak_backlog_at`` the time of the peak; the wait
            distribution in bars; bad debt added by waiting against the same run without a
            limit, USD).
        frontier: when asked, the throughput–insolvency frontier: one row per capacity
            (``calibration.accounts.capacity_frontier``).
        frontier_kind: what the frontier's capacities limit: ``accounts`` (close-outs
            started per bar) or ``notional`` (USD of close-outs started per bar).
        adl: with ``liquidation.adl``, the auto-deleveraging once the fund is exhausted
            (``calibration.accounts._adl``): ``adl_volume_usd`` (Σ units × bankruptcy price),
            ``adl_absorbed_usd``, ``adl_uncovered_usd`` (USD), ``per_account`` (id →
            absorbed USD, for every account that absorbed) and ``fills`` (``account``,
            ``bankrupt`` ids, ``time`` UTC ISO 8601, ``instrument``, ``units`` given up,
            signed, ``price_usd`` the bankruptcy price, ``absorbed_usd``, ``pnl_usd`` the
            account's realised PnL on the fill, units × (price − entry close), which the
            replay credits to it from the next bar on).
        backstop: with ``liquidation.backstop_threshold``, the backstop vault: ``accounts``
            taken over (count), ``backstop_pnl_usd`` (its total PnL on them, USD) and
            ``path`` (``[time UTC ISO 8601, cumulative PnL USD]`` per close-out bar).
    """

    engine_version: str
    mode: str
    model: str
    params: dict[str, Any]
    instruments: list[str]
    market_fingerprint: str
    dropped_bars: dict[str, int]
    bar_seconds: int
    horizon_bars: int
    horizon: str
    liquidation: dict[str, Any]
    adverse_extremes: str
    summary: list[AccountFigures]
    accounts: list[AccountRow]
    skipped: dict[str, str]
    insurance_fund_min_usd: float
    insurance_fund_exhausted_at: str | None
    portfolio_model: str | None = None
    portfolio_params: dict[str, Any] | None = None
    accounts_by_mode: dict[str, AccountFigures] | None = None
    queue: dict[str, Any] | None = None
    frontier: list[dict[str, Any]] | None = None
    frontier_kind: str | None = None
    adl: dict[str, Any] | None = None
    backstop: dict[str, Any] | None = None


def run_account_backtest(
    market: Market,
    model: str,
    params: Mapping[str, Any] | None = None,
    *,
    accounts: Sequence[Account] | None = None,
    population: PopulationSpec | None = None,
    config: AccountConfig | None = None,
    stress_windows: Sequence[StressWindow] = (),
    portfolio_model: str | None = None,
    portfolio_params: Mapping[str, Any] | None = None,
    frontier: Sequence[float] | None = None,
    frontier_kind: str = "accounts",
    workers: int = 1,
) -> tuple[AccountBacktestReport, AccountResult]:
    """Replay explicit ``accounts`` or a generated ``population`` through ``market`` under one
    margin model for every instrument, and report.

    In ``portfolio`` mode the accounts' requirement is ``portfolio_model`` (a family,
    ``grid`` / ``historical``, or a preset, ``deribit_pme_2024`` / ``paradex``) with
    ``portfolio_params``; its close-out horizon is the backtest's one horizon (unset: the
    margin model's; a different one is refused).

    With a capacity limit in ``config`` the report has the ``queue``; ``frontier`` (capacities,
    ``inf`` for none; ``frontier_kind`` ``accounts`` or ``notional``) adds the frontier rows.

    ``workers``: threads for the replay (``simulate_accounts``): the same report for any.

    Raises:
        InvalidParameters, InsufficientData: see ``simulate_accounts``.
    """
    from calibration._errors import InvalidParameters

    if (accounts is None) == (population is None):
        raise InvalidParameters("give either accounts or a population", field="accounts")
    config = config or AccountConfig()
    margin: MarginModel = make_model(model, params)
    horizon = resolve_horizon({"params.horizon_bars": margin.horizon}, market.bar_seconds)
    margin = margin.with_horizon(horizon.bars)
    portfolio: PortfolioMarginModel | None = None
    wants_portfolio = config.mode == "portfolio" or (
        accounts is not None and any(a.mode == "portfolio" for a in accounts)) or (
        population is not None and population.modes is not None
        and population.modes.get("portfolio", 0) > 0)
    if wants_portfolio:
        if portfolio_model is None:
            raise InvalidParameters("portfolio mode needs a portfolio model (grid, historical "
                                    "or a preset)", field="portfolio_model")
        portfolio = make_portfolio_model(portfolio_model, portfolio_params)
        if portfolio.horizon not in (None, horizon.bars):
            raise InvalidParameters(
                f"the portfolio model's horizon_bars ({portfolio.horizon}) differs from the "
                f"backtest's close-out horizon ({horizon.bars} bars): one horizon sizes both",
                field="portfolio_params.horizon_bars")
        portfolio = portfolio.with_horizon(horizon.bars)
    elif portfolio_model is not None or portfolio_params is not None:
        raise InvalidParameters("a portfolio model is used only by accounts in portfolio "
                                "mode",
                                field="portfolio_model")
    if population is not None:
        first = _first_margin_bar(market, margin)
        if portfolio is not None:
            first = max(first, portfolio.first_valid_bar(market.bar_seconds))
        accounts = generate_population(population, instruments=market.instruments,
                                       timestamp_ms=market.timestamp_ms,
                                       close=market.matrix("close"), first_bar=first)
    assert accounts is not None
    result = simulate_accounts(market, margin, accounts, config, portfolio=portfolio,
                               workers=workers)
    queue = None
    if config.capacity_limited:
        import dataclasses

        unlimited = simulate_accounts(
            market, margin, accounts,
            dataclasses.replace(config, max_liquidations_per_bar=None,
                                max_liquidation_notional_per_bar=None,
                                max_liquidations_per_block=None),
            mechanics_kernel=True, portfolio=portfolio, workers=workers)
        queue = queue_figures(result, unlimited)
        # Bars are the library's unit; the report speaks times.
        ts_ = market.timestamp_ms
        queue["backlog"] = [[iso_utc(int(ts_[b])), c] for b, c in queue["backlog"]]
        queue["peak_backlog_at"] = (iso_utc(int(ts_[queue["peak_backlog_bar"]]))
                                    if queue["peak_backlog_bar"] >= 0 else None)
    frontier_rows = (capacity_frontier(market, margin, accounts, config,
                                       capacities=frontier, kind=frontier_kind,
                                       portfolio=portfolio)
                     if frontier is not None else None)
    ts = market.timestamp_ms
    rows = []
    modes = result.modes()
    for j, acc in enumerate(result.accounts):
        if modes[j] != "isolated":
            hit = int(result.trigger_bar[j])
            bad = float(result.bad_debt_usd[j])
        else:
            mine = result.position_account == j
            twins = result.twin_trigger_bar[mine]
            hits = twins[twins >= 0]
            hit = int(hits.min()) if hits.size else -1
            bad = float(result.twin_bad_debt_usd[mine].sum())
        rows.append(AccountRow(id=acc.id, liquidated=hit >= 0,
                               trigger_time=iso_utc(int(ts[hit])) if hit >= 0 else None,
                               bad_debt_usd=bad, mode=modes[j]))
    summary = [AccountFigures(window="all", **result.summary())]
    for w in stress_windows:
        if w.start_ms <= int(ts[-1]) and w.end_ms > int(ts[0]):
            summary.append(AccountFigures(window=w.name, start=iso_utc(w.start_ms),
                                          end=iso_utc(w.end_ms),
                                          **result.summary(w.start_ms, w.end_ms)))
    path = result.fund_path()
    levels = [config.insurance_fund_usd] + [level for _, level in path]
    exhausted = next((iso_utc(int(ts[b])) for b, level in path if level < 0), None)
    report = AccountBacktestReport(
        engine_version=ENGINE_VERSION, mode=config.mode, model=model,
        params={k: list(v) if isinstance(v, tuple) else v
                for k, v in margin.get_params().items()},
        instruments=list(market.instruments), market_fingerprint=market.fingerprint,
        dropped_bars=dict(market.dropped_bars), bar_seconds=market.bar_seconds,
        horizon_bars=horizon.bars, horizon=horizon.duration,
        liquidation=msgspec.to_builtins(config.__dict__),
        adverse_extremes=("every asset at its adverse extreme for the account in the same "
                          "bar (low net long, high net short): conservative, since OHLC does "
                          "not say whether the extremes coincide"),
        summary=summary, accounts=rows, skipped=result.skipped,
        insurance_fund_min_usd=float(min(levels)), insurance_fund_exhausted_at=exhausted,
        portfolio_model=portfolio_model if portfolio is not None else None,
        portfolio_params=({k: list(v) if isinstance(v, tuple) else v
                           for k, v in portfolio.get_params().items()}
                          if portfolio is not None else None),
        queue=queue, frontier=frontier_rows,
        frontier_kind=frontier_kind if frontier_rows is not None else None,
        adl=_adl_figures(result),
        backstop=_backstop_figures(result) if config.backstop_threshold is not None else None,
        accounts_by_mode={m: AccountFigures(window="all", **f)
                          for m, f in result.summary_by_mode().items()},
    )
    return report, result


def _backstop_figures(result: AccountResult) -> dict[str, Any]:
    """The report's ``backstop`` block."""
    isolated = result.mode == "isolated"
    taken = result.twin_backstop_taken if isolated else result.backstop_taken
    pnl = result.twin_backstop_pnl_usd if isolated else result.backstop_pnl_usd
    ts = result.timestamp_ms
    return {"accounts": int(taken.sum()), "backstop_pnl_usd": float(pnl[taken].sum()),
            "path": [[iso_utc(int(ts[b])), v] for b, v in result.backstop_path()]}


def _adl_figures(result: AccountResult) -> dict[str, Any] | None:
    """The report's ``adl`` block (ids and times instead of indices and bars)."""
    ledger = result.adl
    if ledger is None:
        return None
    if result.mode == "isolated":
        ids = [result.accounts[int(a)].id for a in result.position_account]
    else:
        ids = [a.id for a in result.accounts]
    ts = result.timestamp_ms
    per: dict[str, float] = {}
    for f in ledger.fills:
        per[ids[f.account]] = per.get(ids[f.account], 0.0) + f.absorbed_usd
    return {
        "adl_volume_usd": ledger.adl_volume_usd,
        "adl_absorbed_usd": ledger.adl_absorbed_usd,
        "adl_uncovered_usd": ledger.adl_uncovered_usd,
        "adl_fills": len(ledger.fills),
        "per_account": per,
        "fills": [{"account": ids[f.account], "bankrupt": ids[f.bankrupt],
                   "time": iso_utc(int(ts[f.bar])), "instrument": result.instruments[f.instrument],
                   "units": f.units, "price_usd": f.price_usd, "absorbed_usd": f.absorbed_usd,
                   "pnl_usd": f.pnl_usd}
                  for f in ledger.fills],
    }


def _first_margin_bar(market: Market, model: MarginModel) -> int:
    """The first bar every instrument has a margin at (after the model's warm-up)."""
    first = 0
    for bars in market.bars:
        rates = model.margin_rates(bars)
        first = max(first, rates.first_valid_bar)
    return first
