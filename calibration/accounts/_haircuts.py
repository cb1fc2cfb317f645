"""Collateral haircuts (domain.md §9): what a collateral holding counts for as margin.

Every schedule is a piecewise-linear function of the holding's USD value ``V`` with bands
``[floor_b, cap_b)``: the value inside band b counts at ``ratio_b`` and the bands add up
(Binance: 6,000 BTC at 20,000 = 120M → 100M × 1 + 20M × 0.975 = 119.5M). A flat haircut is
one band; a liquidity-adjusted schedule derives the bands' ratios from the asset's depth or
ADV (``liquidity_adjusted``), so tiers follow from the depth curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtri

from calibration._errors import InvalidParameters

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class HaircutSchedule:
    """Collateral value ratios by USD band.

    Attributes:
        caps_usd: upper bound of each band but the last, USD, increasing (the last band is
            open-ended); ``()`` for a flat ratio.
        ratios: the value ratio of each band (``len(caps_usd) + 1``), fractions in [0, 1]
            (1 = full value; Kraken's 3% haircut is 0.97).
    """

    caps_usd: tuple[float, ...]
    ratios: tuple[float, ...]

    def validate(self, field: str = "haircuts") -> None:
        """Refuse bands that do not increase or ratios outside [0, 1], naming the field."""
        if len(self.ratios) != len(self.caps_usd) + 1:
            raise InvalidParameters(f"{field}: needs one ratio per band "
                                    f"({len(self.caps_usd) + 1}), got {len(self.ratios)}",
                                    field=f"{field}.ratios")
        for i, cap in enumerate(self.caps_usd):
            if not (math.isfinite(cap) and cap > 0):
                raise InvalidParameters(f"{field}: caps_usd[{i}] must be positive",
                                        field=f"{field}.caps_usd[{i}]")
        if any(b <= a for a, b in pairwise(self.caps_usd)):
            raise InvalidParameters(f"{field}: caps_usd must increase",
                                    field=f"{field}.caps_usd")
        for i, r in enumerate(self.ratios):
            if not (math.isfinite(r) and 0.0 <= r <= 1.0):
                raise InvalidParameters(f"{field}: ratios[{i}] must be in [0, 1]",
                                        field=f"{field}.ratios[{i}]")

    def bands(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """``(caps, slope, offset)`` with ``value(V) = slope_b * V + offset_b`` in band b
        (``caps[-1] = inf``); offsets keep the value continuous at every cap."""
        caps = np.array([*map(float, self.caps_usd), np.inf])
        slope = np.array(list(map(float, self.ratios)))
        offset = np.zeros_like(slope)
        for b in range(1, slope.shape[0]):
            offset[b] = offset[b - 1] + caps[b - 1] * (slope[b - 1] - slope[b])
        return caps, slope, offset

    def value_usd(self, holding_usd: float) -> float:
        """What a holding of ``holding_usd`` counts for, USD (0 for a non-positive one)."""
        if holding_usd <= 0:
            return 0.0
        caps, slope, offset = self.bands()
        b = int(np.searchsorted(caps, holding_usd, side="right"))
        return float(slope[b] * holding_usd + offset[b])


def flat(ratio: float) -> HaircutSchedule:
    """One ratio for any size (Kraken: BTC 0.97)."""
    schedule = HaircutSchedule((), (float(ratio),))
    schedule.validate()
    return schedule


def tiered(caps_usd: Sequence[float], ratios: Sequence[float]) -> HaircutSchedule:
    """Bands with their own ratios (Binance, Bybit, OKX)."""
    schedule = HaircutSchedule(tuple(map(float, caps_usd)), tuple(map(float, ratios)))
    schedule.validate()
    return schedule


#: Binance cross-margin BTC collateral ratios by USD value (venues.md §3, BN1).
BINANCE_BTC = tiered((100e6, 120e6, 150e6, 180e6, 200e6), (1.0, 0.975, 0.95, 0.90, 0.85, 0.0))


def liquidity_adjusted(
    *, depth_usd: float, sigma_per_bar: float, liquidation_bars: int, caps_usd: Sequence[float],
    spread_rate: float = 0.0005, impact_coef: float = 0.01, impact_exponent: float = 0.5,
    confidence: float = 0.99,
) -> HaircutSchedule:
    """Ratios from the cost of selling the holding: ``1 − (spread + impact · (V / depth)^β +
    z_q σ √h_liq)`` at each band's upper value (its worst point), floored at 0.

    Args:
        depth_usd: the asset's order-book depth (or a fraction of its ADV), USD.
        sigma_per_bar: the asset's volatility of one-bar log returns.
        liquidation_bars: bars to sell the holding, ``h_liq``.
        caps_usd: the bands' upper values, USD; the last band is priced at twice the last cap.
        spread_rate, impact_coef, impact_exponent: the slippage of §4.
        confidence: q of the price move while selling.
    """
    if not (depth_usd > 0 and sigma_per_bar >= 0 and liquidation_bars >= 1):
        raise InvalidParameters("liquidity-adjusted haircuts need depth_usd > 0, "
                                "sigma_per_bar >= 0 and liquidation_bars >= 1",
                                field="haircuts")
    move = float(ndtri(confidence)) * sigma_per_bar * math.sqrt(liquidation_bars)
    points = [*caps_usd, 2 * caps_usd[-1]] if caps_usd else [depth_usd]
    ratios = [max(0.0, 1.0 - (spread_rate + impact_coef * (v / depth_usd) ** impact_exponent
                             + move)) for v in points]
    # A larger holding never counts at a higher ratio.
    ratios = list(np.minimum.accumulate(ratios))
    return tiered(caps_usd, ratios)
