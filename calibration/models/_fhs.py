"""Filtered historical simulation: past h-bar losses rescaled to today's volatility."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from calibration import _kernels
from calibration._bars import BarSeries
from calibration._errors import InvalidParameters
from calibration.models._base import FloatArray, MarginModel, Rule


class FhsMargin(MarginModel):
    """ES (or VaR) at ``confidence`` of h-bar losses over the last ``window_bars`` bars.

    Each past h-bar log return ``R_s = ln(C_s / C_{s-h})`` is standardised by the EWMA
    volatility known when it started, ``sigma_{s-h}``, and rescaled by today's ``sigma_t``
    (Barone-Adesi et al. 1999). The rate is the larger of the long and short sides' expected
    shortfall (mean of the ``ceil(window_bars * (1 - confidence))`` worst simple losses), or
    their VaR with ``measure="var"``. Anti-procyclicality (EMIR art. 28(1)(b)): the rate is
    ``(1 - stress_weight) * current + stress_weight * stressed`` where ``stressed`` is the
    highest current rate over the last ``stress_lookback_bars`` bars up to t (a look-back
    stressed estimate, no look-ahead; bounded, so one crash does not pin the margin for
    ever). Then ``max(floor_rate, ·)``, capped at ``max_rate``. This is the MM rate; IM is
    ``im_to_mm`` times it.

    Args:
        window_bars: look-back window of h-bar samples, bars.
        confidence: coverage level q in (0.5, 1).
        decay: EWMA decay λ of the filtering volatility.
        horizon_bars: close-out horizon h, bars; ``None``: the default duration (1h) in bars
            of the series.
        stress_weight: weight of the stressed estimate in [0, 1] (EMIR: ≥ 0.25).
        floor_rate: lowest MM rate, fraction of notional.
        warmup_bars: one-bar returns (bars) used to seed the EWMA variance.
        measure: ``"es"`` (expected shortfall) or ``"var"``.
        im_to_mm: IM rate / MM rate.
        max_rate: cap on the MM and IM rates, fraction of notional (domain.md §2).
        stress_lookback_bars: look-back of the stressed estimate, bars; ``None``: one year
            of the series' bars. At most ten years (EMIR RTS 153/2013 art. 28).
    """

    family = "fhs"
    rules: ClassVar[dict[str, Rule]] = {
        "window_bars": Rule(low=10, integer=True),
        "confidence": Rule(low=0.5, high=1.0, low_open=True, high_open=True),
        "decay": Rule(low=0.0, high=1.0, low_open=True, high_open=True),
        "horizon_bars": Rule(low=1, high=10**7, integer=True, optional=True),
        "stress_weight": Rule(low=0.0, high=1.0),
        "floor_rate": Rule(low=0.0, high=1.0, high_open=True),
        "max_rate": Rule(low=0.0, high=1.0, low_open=True),
        "stress_lookback_bars": Rule(low=1, integer=True, optional=True),
        "warmup_bars": Rule(low=2, integer=True),
        "im_to_mm": Rule(low=1.0),
    }

    def __init__(
        self,
        *,
        window_bars: int = 2000,
        confidence: float = 0.99,
        decay: float = 0.97,
        horizon_bars: int | None = None,
        stress_weight: float = 0.25,
        floor_rate: float = 0.005,
        warmup_bars: int = 500,
        measure: str = "es",
        im_to_mm: float = 2.0,
        max_rate: float = 1.0,
        stress_lookback_bars: int | None = None,
    ) -> None:
        self.window_bars = window_bars
        self.confidence = confidence
        self.decay = decay
        self.horizon_bars = horizon_bars
        self.stress_weight = stress_weight
        self.floor_rate = floor_rate
        self.warmup_bars = warmup_bars
        self.measure = measure
        self.im_to_mm = im_to_mm
        self.max_rate = max_rate
        self.stress_lookback_bars = stress_lookback_bars

    def validate(self) -> None:
        super().validate()
        if self.measure not in ("es", "var"):
            raise InvalidParameters(
                f"measure must be 'es' or 'var', got {self.measure!r}", field="measure"
            )

    def first_valid_bar(self) -> int:
        return int(self.warmup_bars) + self.horizon_set() + int(self.window_bars) - 1

    def lookback_bars(self, bar_seconds: int) -> int:
        """The stressed look-back in bars on bars of ``bar_seconds``.

        Raises:
            InvalidParameters: longer than ten years of such bars.
        """
        ten_years = max(1, 10 * 365 * 86_400 // bar_seconds)
        if self.stress_lookback_bars is None:
            return max(1, 365 * 86_400 // bar_seconds)
        if int(self.stress_lookback_bars) > ten_years:
            raise InvalidParameters(
                f"stress_lookback_bars must be at most ten years ({ten_years} bars of "
                f"{bar_seconds} s), got {self.stress_lookback_bars}",
                field="stress_lookback_bars")
        return int(self.stress_lookback_bars)

    def tail_count(self) -> int:
        """How many of the window's samples form the tail (at least one)."""
        return max(1, math.ceil(int(self.window_bars) * (1.0 - float(self.confidence)) - 1e-9))

    def _mm_rate(self, bars: BarSeries, notional_usd: float) -> FloatArray:
        h = self.horizon_set()
        variance = _kernels.ewma_variance(
            bars.log_returns(), bars.squared_returns(), float(self.decay), int(self.warmup_bars)
        )
        current = _kernels.fhs_rate(
            bars.close, variance, h, int(self.window_bars), self.tail_count(),
            self.measure == "es", int(self.warmup_bars) + h,
        )
        valid = ~np.isnan(current)
        stressed = np.full_like(current, np.nan)
        stressed[valid] = trailing_max(current[valid], self.lookback_bars(bars.bar_seconds))
        w = float(self.stress_weight)
        blended = (1.0 - w) * current + w * stressed
        result: FloatArray = np.where(valid, np.maximum(float(self.floor_rate), blended), np.nan)
        return result


def trailing_max(values: FloatArray, window_bars: int) -> FloatArray:
    """``max(values[max(0, i - window_bars + 1) .. i])`` per i, shape ``(n,)``, in O(n).

    Van Herk / Gil-Werman: within blocks of ``window_bars`` take prefix and suffix maxima;
    a window spans at most two adjacent blocks, so its maximum is the suffix maximum of its
    first block's part and the prefix maximum of its last block's part.
    """
    n = values.shape[0]
    w = int(window_bars)
    if w >= n:
        out: FloatArray = np.maximum.accumulate(values)
        return out
    pad = (-n) % w
    blocks = np.concatenate([values, np.full(pad, -np.inf)]).reshape(-1, w)
    prefix = np.maximum.accumulate(blocks, axis=1).ravel()[:n]
    suffix = np.maximum.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].ravel()[:n]
    result = np.empty(n)
    result[: w - 1] = np.maximum.accumulate(values[: w - 1])
    i = np.arange(w - 1, n)
    result[w - 1 :] = np.maximum(suffix[i - w + 1], prefix[i])
    return result
