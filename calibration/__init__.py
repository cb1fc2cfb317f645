"""marginlab's domain library: load market data, compute margins, backtest them.

Pure and synchronous: no web framework, no Redis, no environment variables (the CLI in
``calibration.cli`` is the one door to the environment).
"""

from calibration._bars import BarSeries, Gap, Repair
from calibration._errors import (
    DataError,
    DataReferenceError,
    DataValidationError,
    InsufficientData,
    InvalidParameters,
    MarginlabError,
)
from calibration._version import ENGINE_VERSION
from calibration.backtest import run_backtest
from calibration.coverage import CoverageConfig, coverage_backtest
from calibration.data import align, load_bars, resample
from calibration.liquidation import (
    InsuranceFund,
    LiquidationConfig,
    shared_insurance_fund,
    simulate_liquidations,
)
from calibration.models import (
    FAMILIES,
    EwmaMargin,
    FhsMargin,
    LiquidityAddon,
    MarginModel,
    MarginRates,
    TieredMargin,
    make_model,
)
from calibration.report import BacktestReport
from calibration.windows import DEFAULT_STRESS_WINDOWS, StressWindow

__all__ = [
    "DEFAULT_STRESS_WINDOWS",
    "ENGINE_VERSION",
    "FAMILIES",
    "BacktestReport",
    "BarSeries",
    "CoverageConfig",
    "DataError",
    "DataReferenceError",
    "DataValidationError",
    "EwmaMargin",
    "FhsMargin",
    "Gap",
    "InsufficientData",
    "InsuranceFund",
    "InvalidParameters",
    "LiquidationConfig",
    "LiquidityAddon",
    "MarginModel",
    "MarginRates",
    "MarginlabError",
    "Repair",
    "StressWindow",
    "TieredMargin",
    "align",
    "coverage_backtest",
    "load_bars",
    "make_model",
    "resample",
    "run_backtest",
    "shared_insurance_fund",
    "simulate_liquidations",
]
