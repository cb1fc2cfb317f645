"""One margin series per model and instrument, computed once and shared by every consumer.

A trial (or a backtest) needs the same margin rates three times on each instrument: the
coverage test, the liquidation simulation and the capital cost. ``MarginSeries`` computes
``model.margin_rates`` once per distinct notional the model can depend on (once in all for
families whose rate does not depend on the position size) and hands the same
``MarginRates`` to each of them::

    margins = MarginSeries(model, bars)
    coverage_backtest(bars, model, config, windows, margins=margins)
    simulate_liquidations(bars, model, liquidation, margins=margins)
    capital_cost([margins], liquidation.notionals_usd)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from calibration import _kernels
from calibration._bars import BarSeries
from calibration._errors import InvalidParameters
from calibration.models import DEFAULT_NOTIONAL_USD, MarginModel, MarginRates

__all__ = ["MarginSeries", "capital_cost", "mean_im_rate"]


class MarginSeries:
    """The margin rates of one model on one instrument, computed on first use per notional.

    The rates of a model that is not ``notional_dependent`` are the same at every notional
    (the family ignores the size), so they are computed once and returned for any notional;
    a notional-dependent model (tiers, the liquidity add-on) gets one series per distinct
    notional asked for. Every consumer therefore sees the very arrays the others saw.

    Args:
        model: the margin model, with its horizon set as the consumers will use it.
        bars: the instrument's bars.

    Attributes:
        model: as passed.
        bars: as passed.
    """

    __slots__ = ("_by_notional", "bars", "model")

    def __init__(self, model: MarginModel, bars: BarSeries) -> None:
        self.model = model
        self.bars = bars
        self._by_notional: dict[float | None, MarginRates] = {}

    def rates(self, notional_usd: float = DEFAULT_NOTIONAL_USD) -> MarginRates:
        """The model's rates for a position of ``notional_usd`` (USD), computed once.

        Raises:
            InvalidParameters, InsufficientData: as ``MarginModel.margin_rates``.
        """
        key = float(notional_usd) if self.model.notional_dependent else None
        found = self._by_notional.get(key)
        if found is None:
            if key is None:
                # Validated as if computed at this notional, so a bad value is refused alike.
                found = self.model.margin_rates(self.bars, notional_usd=float(notional_usd))
            else:
                found = self.model.margin_rates(self.bars, notional_usd=key)
            self._by_notional[key] = found
        return found

    def matches(self, bars: BarSeries, model: MarginModel) -> bool:
        """Whether this series is that of ``model`` (same hyperparameters) on ``bars``."""
        return (
            bars is self.bars
            and type(model) is type(self.model)
            and model.get_params() == self.model.get_params()
        )

    def check(self, bars: BarSeries, model: MarginModel, field: str = "margins") -> None:
        """Refuse a series computed for another model or other bars.

        Raises:
            InvalidParameters: it does not match (``field`` names the argument).
        """
        if not self.matches(bars, model):
            raise InvalidParameters(
                f"the margin series was computed for {self.model!r} on "
                f"{self.bars.instrument!r}, not for {model!r} on {bars.instrument!r}",
                field=field)


def capital_cost(margins: Sequence[MarginSeries], notionals_usd: Sequence[float]) -> float:
    """Notional-weighted mean IM rate over the bars with a margin, averaged over
    instruments (fraction of notional): the calibration's capital objective.

    Args:
        margins: one series per instrument.
        notionals_usd: the position sizes (USD) weighting each size's mean IM rate.
    """
    weights = np.asarray(notionals_usd, dtype=np.float64)
    weights = weights / weights.sum()
    per_instrument = []
    for series in margins:
        rates = [series.rates(float(n)) for n in notionals_usd]
        # A size-independent model hands back one series for every notional: its mean is
        # computed once (it was five full passes, a third of a trial on minute bars).
        by_series: dict[int, float] = {}
        for r in rates:
            if id(r) not in by_series:
                by_series[id(r)] = mean_im_rate(r)
        means = [by_series[id(r)] for r in rates]
        per_instrument.append(float(np.dot(weights, means)))
    return float(np.mean(per_instrument))


def mean_im_rate(rates: MarginRates) -> float:
    """``np.nanmean(rates.im_rate[rates.first_valid_bar:])`` to the bit (numpy's pairwise
    sum, over the count of bars with a margin), in one pass over the MM rates without
    storing the IM series; NaN when no bar has a margin.
    """
    if rates.im_total is not None:  # summed with the rates (``EwmaMargin``), the same bits
        total, count = rates.im_total
        return float(total) / count if count else math.nan
    total, count = _kernels.im_rate_sum(np.ascontiguousarray(rates.mm_rate, dtype=np.float64),
                                        int(rates.first_valid_bar), float(rates.im_to_mm),
                                        float(rates.max_rate))
    return float(total) / count if count else math.nan
