"""Accounts, not positions: collateral pooled across instruments (domain.md §7).

The flow: ``Market`` (k instruments on one clock) → ``Account`` books (explicit, or a seeded
``PopulationSpec``) → ``simulate_accounts`` (cross, portfolio or isolated replay, isolated twins,
contagion) → ``AccountResult`` figures and ``run_account_backtest``'s report.
"""

from calibration.accounts._adl import AdlFill, AdlLedger
from calibration.accounts._arrays import AccountBook
from calibration.accounts._book import (
    MARGIN_MODES,
    Account,
    PopulationSpec,
    accounts_from_records,
    generate_population,
    load_accounts,
)
from calibration.accounts._capacity import (
    FRONTIER_KINDS,
    capacity_frontier,
    parse_capacities,
    queue_figures,
)
from calibration.accounts._engine import (
    AccountConfig,
    AccountResult,
    simulate_accounts,
    windows_summary,
)
from calibration.accounts._grid_calibration import (
    FoldCoverage,
    GridCalibration,
    calibrate_portfolio_grid,
)
from calibration.accounts._haircut_calibration import (
    HaircutTierCalibration,
    calibrate_haircut_tiers,
)
from calibration.accounts._haircut_coverage import HaircutCoverage, haircut_coverage
from calibration.accounts._kernel_mech import POLICIES, QUEUE_ORDERS
from calibration.accounts._market import STABLE_ASSETS, Market, underlying_of
from calibration.accounts._policies import compare_policies, least_loss
from calibration.accounts._portfolio_coverage import (
    BreachAttribution,
    PortfolioBook,
    PortfolioCoverage,
    basket_book,
    carry_book,
    long_short_book,
    portfolio_coverage,
)
from calibration.accounts._report import (
    AccountBacktestReport,
    AccountFigures,
    AccountRow,
    run_account_backtest,
)
from calibration.accounts._requirements import Requirement, requirements_now
from calibration.accounts._venue_presets import VENUE_PRESETS


def render_account_report(report: AccountBacktestReport, result: AccountResult) -> str:
    """The account backtest's HTML page (see ``calibration.accounts._html``); imported on
    call, since matplotlib is only needed for the page."""
    from calibration.accounts._html import render_account_report as render

    return render(report, result)


__all__ = [
    "FRONTIER_KINDS",
    "MARGIN_MODES",
    "POLICIES",
    "QUEUE_ORDERS",
    "REPLAYS",
    "STABLE_ASSETS",
    "VENUE_PRESETS",
    "Account",
    "AccountBacktestReport",
    "AccountBook",
    "AccountConfig",
    "AccountFigures",
    "AccountResult",
    "AccountRow",
    "AdlFill",
    "AdlLedger",
    "BreachAttribution",
    "FoldCoverage",
    "GridCalibration",
    "HaircutCoverage",
    "HaircutTierCalibration",
    "Market",
    "PopulationSpec",
    "PortfolioBook",
    "PortfolioCoverage",
    "Replay",
    "Requirement",
    "accounts_from_records",
    "basket_book",
    "calibrate_haircut_tiers",
    "calibrate_portfolio_grid",
    "capacity_frontier",
    "carry_book",
    "compare_policies",
    "generate_population",
    "haircut_coverage",
    "least_loss",
    "load_accounts",
    "long_short_book",
    "parse_capacities",
    "portfolio_coverage",
    "queue_figures",
    "render_account_report",
    "replay",
    "requirements_now",
    "run_account_backtest",
    "simulate_accounts",
    "underlying_of",
    "windows_summary",
]
