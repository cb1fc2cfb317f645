"""Margin model families behind one interface, and the registry that builds them by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from calibration._errors import InvalidParameters
from calibration.models._base import DEFAULT_NOTIONAL_USD, MarginModel, MarginRates, Rule
from calibration.models._ewma import EwmaMargin
from calibration.models._fhs import FhsMargin
from calibration.models._liquidity import ADDON_PARAMS, LiquidityAddon
from calibration.models._portfolio import (
    PORTFOLIO_FAMILIES,
    PORTFOLIO_PRESETS,
    GridPortfolioMargin,
    HistoricalPortfolioMargin,
    PortfolioMarginModel,
    PortfolioRequirement,
    make_portfolio_model,
)
from calibration.models._tiered import (
    BINANCE_BTCUSDT_2021_CAPS_USD,
    BINANCE_BTCUSDT_2021_IMR,
    BINANCE_BTCUSDT_2021_MMR,
    TieredMargin,
)

__all__ = [
    "BINANCE_BTCUSDT_2021_CAPS_USD",
    "BINANCE_BTCUSDT_2021_IMR",
    "BINANCE_BTCUSDT_2021_MMR",
    "DEFAULT_NOTIONAL_USD",
    "FAMILIES",
    "PORTFOLIO_FAMILIES",
    "PORTFOLIO_PRESETS",
    "EwmaMargin",
    "FhsMargin",
    "GridPortfolioMargin",
    "HistoricalPortfolioMargin",
    "LiquidityAddon",
    "MarginModel",
    "MarginRates",
    "PortfolioMarginModel",
    "PortfolioRequirement",
    "Rule",
    "TieredMargin",
    "make_model",
    "make_portfolio_model",
]

#: Model families by public name.
FAMILIES: dict[str, type[MarginModel]] = {
    "tiered": TieredMargin,
    "ewma": EwmaMargin,
    "fhs": FhsMargin,
}


def make_model(family: str, params: Mapping[str, Any] | None = None) -> MarginModel:
    """Build and validate a model from its family name and public parameters.

    Liquidity add-on parameters (``addon_coef``, ``addon_exponent``, ``adv_window_bars``) may
    be given with any family; the model is then wrapped in ``LiquidityAddon``.

    Raises:
        InvalidParameters: unknown family or parameter, or a value out of range; ``field``
            names the parameter at fault.
    """
    if family not in FAMILIES:
        raise InvalidParameters(
            f"unknown model {family!r}; choose one of {', '.join(sorted(FAMILIES))}",
            field="model",
        )
    cls = FAMILIES[family]
    params = dict(params or {})
    addon = {k: params.pop(k) for k in ADDON_PARAMS if k in params}
    allowed = cls.param_names()
    for key in params:
        if key not in allowed:
            raise InvalidParameters(
                f"unknown parameter {key!r} for model {family!r}; "
                f"known: {', '.join(allowed + list(ADDON_PARAMS))}",
                field=key,
            )
    model: MarginModel = cls(**params)
    if addon:
        model = LiquidityAddon(base=model, **addon)
    model.validate()
    return model
