"""Liquidity add-on: extra margin for positions large against the market's depth."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from calibration._bars import BarSeries
from calibration._errors import DataError
from calibration.models._base import FloatArray, MarginModel, Rule

#: Parameters that belong to the add-on rather than to the model it wraps.
ADDON_PARAMS = ("addon_coef", "addon_exponent", "adv_window_bars")


class LiquidityAddon(MarginModel):
    """``base`` model's rate plus ``addon_coef * (N / D_t) ** addon_exponent``.

    ``N`` is the position's notional (USD) and ``D_t`` the liquidity known at bar t: the
    order-book depth on the thinner side when the series has depth, else the average daily
    traded notional (ADV, USD/day) over the last ``adv_window_bars`` bars up to t. The add-on
    is added to the MM rate; the IM rate is the base model's ``im_to_mm`` times the total.
    The MM rate is capped at the base model's ``max_rate`` (1: 100% of notional).

    Args:
        base: the model whose rate the add-on tops up.
        addon_coef: c ≥ 0, fraction of notional at ``N = D``.
        addon_exponent: β > 0 (square-root impact: 0.5).
        adv_window_bars: look-back of the ADV, bars.
    """

    family = "liquidity"
    notional_dependent = True
    rules: ClassVar[dict[str, Rule]] = {
        "addon_coef": Rule(low=0.0),
        "addon_exponent": Rule(low=0.0, high=3.0, low_open=True),
        "adv_window_bars": Rule(low=1, integer=True),
    }

    def __init__(
        self,
        *,
        base: MarginModel,
        addon_coef: float = 0.1,
        addon_exponent: float = 0.5,
        adv_window_bars: int = 1440,
    ) -> None:
        self.base = base
        self.addon_coef = addon_coef
        self.addon_exponent = addon_exponent
        self.adv_window_bars = adv_window_bars

    @property
    def family_name(self) -> str:
        return self.base.family

    def get_params(self) -> dict[str, Any]:
        """The base model's hyperparameters and the add-on's, flat."""
        params = self.base.get_params()
        params.update(
            addon_coef=self.addon_coef,
            addon_exponent=self.addon_exponent,
            adv_window_bars=self.adv_window_bars,
        )
        return params

    def validate(self) -> None:
        self.base.validate()
        super().validate()

    @property
    def horizon(self) -> int | None:
        return self.base.horizon

    @property
    def coverage_level(self) -> float | None:
        return self.base.coverage_level

    def first_valid_bar(self) -> int:
        return self.base.first_valid_bar()

    def with_horizon(self, horizon_bars: int) -> MarginModel:
        return LiquidityAddon(base=self.base.with_horizon(horizon_bars),
                              addon_coef=self.addon_coef, addon_exponent=self.addon_exponent,
                              adv_window_bars=self.adv_window_bars)

    def _bound(self, bar_seconds: int) -> MarginModel:
        base = self.base._bound(bar_seconds)
        if base is self.base:
            return self
        return LiquidityAddon(base=base, addon_coef=self.addon_coef,
                              addon_exponent=self.addon_exponent,
                              adv_window_bars=self.adv_window_bars)

    def max_rate_cap(self) -> float:
        return self.base.max_rate_cap()

    def liquidity_usd(self, bars: BarSeries) -> FloatArray:
        """``D_t`` per bar in USD, shape ``(n,)``.

        Bars without a depth snapshot yet (NaN depth, see ``data.with_depth``) fall back to
        the ADV when the series has volume.
        """
        traded = bars.traded_usd()
        if bars.bid_depth_usd is not None and bars.ask_depth_usd is not None:
            depth: FloatArray = np.minimum(bars.bid_depth_usd, bars.ask_depth_usd)
            unknown = np.isnan(depth)
            if traded is None or not unknown.any():
                return depth
            result: FloatArray = np.where(unknown, self._adv_usd(bars, traded), depth)
            return result
        if traded is None:
            raise DataError(
                f"the liquidity add-on needs volume or order-book depth; "
                f"{bars.instrument!r} has neither"
            )
        return self._adv_usd(bars, traded)

    def _adv_usd(self, bars: BarSeries, traded: FloatArray) -> FloatArray:
        """Average daily traded notional (USD/day) over the last ``adv_window_bars`` bars."""
        w = int(self.adv_window_bars)
        csum = np.concatenate([[0.0], np.cumsum(traded)])
        idx = np.arange(len(bars))
        start = np.maximum(idx + 1 - w, 0)
        mean_per_bar = (csum[idx + 1] - csum[start]) / (idx + 1 - start)
        adv: FloatArray = mean_per_bar * (86_400.0 / bars.bar_seconds)
        return adv

    def _addon(self, bars: BarSeries, notional_usd: float) -> FloatArray:
        if float(self.addon_coef) == 0.0:  # 0 * inf (no liquidity) would be NaN
            return np.zeros(len(bars))
        liquidity = self.liquidity_usd(bars)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(liquidity > 0, notional_usd / liquidity, np.inf)
        result: FloatArray = float(self.addon_coef) * ratio ** float(self.addon_exponent)
        return result

    def _mm_rate(self, bars: BarSeries, notional_usd: float) -> FloatArray:
        # The base model's own cap applies once, to the total, in ``margin_rates``.
        base = self.base._bound(bars.bar_seconds)._mm_rate(bars, notional_usd)
        result: FloatArray = base + self._addon(bars, notional_usd)
        return result

    def _im_to_mm(self, notional_usd: float) -> float:
        return self.base._im_to_mm(notional_usd)
