"""Volatility-scaled margin from an EWMA variance (RiskMetrics style)."""

from __future__ import annotations

import math
from typing import ClassVar

from scipy.special import ndtri  # the standard normal quantile, without scipy.stats

from calibration import _kernels
from calibration._bars import BarSeries
from calibration.models._base import FloatArray, MarginModel, MarginRates, Rule


class EwmaMargin(MarginModel):
    """``m_t = max(floor_rate, z_q * sigma_t * sqrt(horizon_bars)) * (1 + apc_buffer)``.

    ``sigma_t`` is the EWMA volatility of one-bar log returns known at the close of bar t
    (domain.md §2), ``z_q`` the standard normal quantile at ``confidence``. ``m_t`` is the
    maintenance margin rate: what must still cover the loss while a liquidated position is
    closed out over ``horizon_bars``; the IM rate is ``im_to_mm * m_t``.

    Args:
        decay: EWMA decay λ in (0, 1); higher means longer memory.
        confidence: one-sided coverage level q in (0.5, 1), e.g. 0.99.
        horizon_bars: close-out horizon (margin period of risk) in bars, ≥ 1; ``None``: the
            default duration (``horizon.DEFAULT_HORIZON``, 1h) in bars of the series.
        floor_rate: lowest MM rate, fraction of notional.
        apc_buffer: anti-procyclicality buffer as a fraction (EMIR art. 28(1)(a): ≥ 0.25).
        warmup_bars: one-bar returns (bars) used to seed the variance; no margin before
            this bar.
        im_to_mm: IM rate / MM rate (Binance tiers: 2).
        max_rate: cap on the MM and IM rates, fraction of notional (domain.md §2).
    """

    family = "ewma"
    rules: ClassVar[dict[str, Rule]] = {
        "decay": Rule(low=0.0, high=1.0, low_open=True, high_open=True),
        "confidence": Rule(low=0.5, high=1.0, low_open=True, high_open=True),
        "horizon_bars": Rule(low=1, high=10**7, integer=True, optional=True),
        "floor_rate": Rule(low=0.0, high=1.0, high_open=True),
        "max_rate": Rule(low=0.0, high=1.0, low_open=True),
        "apc_buffer": Rule(low=0.0, high=10.0),
        "warmup_bars": Rule(low=2, integer=True),
        "im_to_mm": Rule(low=1.0),
    }

    def __init__(
        self,
        *,
        decay: float = 0.97,
        confidence: float = 0.99,
        horizon_bars: int | None = None,
        floor_rate: float = 0.005,
        apc_buffer: float = 0.25,
        warmup_bars: int = 500,
        im_to_mm: float = 2.0,
        max_rate: float = 1.0,
    ) -> None:
        self.decay = decay
        self.confidence = confidence
        self.horizon_bars = horizon_bars
        self.floor_rate = floor_rate
        self.apc_buffer = apc_buffer
        self.warmup_bars = warmup_bars
        self.im_to_mm = im_to_mm
        self.max_rate = max_rate

    def first_valid_bar(self) -> int:
        return int(self.warmup_bars)

    def variance(self, bars: BarSeries) -> FloatArray:
        """EWMA variance of one-bar log returns per bar, shape ``(n,)``, NaN in warm-up."""
        result: FloatArray = _kernels.ewma_variance(
            bars.log_returns(), bars.squared_returns(), float(self.decay), int(self.warmup_bars)
        )
        return result

    def _mm_rate(self, bars: BarSeries, notional_usd: float) -> FloatArray:
        result: FloatArray = _kernels.ewma_rate(
            bars.log_returns(), bars.squared_returns(), float(self.decay),
            int(self.warmup_bars), self._scale(), float(self.floor_rate),
            1.0 + float(self.apc_buffer),
        )
        return result

    def _scale(self) -> float:
        return float(ndtri(self.confidence)) * math.sqrt(self.horizon_set())

    def _capped_rates(self, bars: BarSeries, notional_usd: float) -> MarginRates:
        # One kernel for the rates, their cap and the IM sum of the capital cost
        # (``_kernels.ewma_margin``): the same bits as the generic passes, read once.
        cap = self.max_rate_cap()
        im_to_mm = self._im_to_mm(notional_usd)
        mm, capped, n_capped, im_sum, im_count = _kernels.ewma_margin(
            bars.log_returns(), bars.squared_returns(), float(self.decay),
            int(self.warmup_bars), self._scale(), float(self.floor_rate),
            1.0 + float(self.apc_buffer), float(cap), float(im_to_mm),
        )
        return MarginRates(mm_rate=mm, im_to_mm=im_to_mm, first_valid_bar=self.first_valid_bar(),
                           max_rate=cap, capped=capped if n_capped else None,
                           im_total=(float(im_sum), int(im_count)))
