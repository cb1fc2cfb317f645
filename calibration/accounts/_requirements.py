"""What accounts must post now: the requirement under given (published) parameters.

The call a trading service makes (``POST /v1/margin``): for each position, its maintenance
and initial margin in USD at its current notional, under the instrument's margin model at
the latest bar with a margin; summed per account (cross margin).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from calibration._bars import BarSeries
from calibration._errors import InsufficientData, InvalidParameters
from calibration.coverage import iso_utc
from calibration.models import MarginModel, TieredMargin

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Requirement:
    """Per-position MM and IM (USD) and the bar whose rates were used.

    Attributes:
        mm_usd, im_usd: shape ``(P,)``, USD, for positions of ``|notional_usd|``.
        as_of: open time (ISO-8601 UTC) of the bar whose rates apply, ``None`` for a model
            whose rates do not change over time (tiers).
    """

    mm_usd: FloatArray
    im_usd: FloatArray
    as_of: str | None


def requirements_now(model: MarginModel, notional_usd: FloatArray,
                     bars: BarSeries | None = None) -> Requirement:
    """MM and IM in USD of positions of ``notional_usd`` (signed or not; shape ``(P,)``).

    Tiered models need no data (brackets ``[floor, cap)``, maintenance amounts, the
    per-bracket IM). Time-varying models (``ewma``, ``fhs``) take their rate at the last bar
    of ``bars`` that has one; the liquidity add-on is evaluated per position there.

    Raises:
        InvalidParameters: a time-varying model without bars, or a non-finite notional.
        InsufficientData: the bars end before the model's first margin.
    """
    n = np.abs(np.asarray(notional_usd, dtype=np.float64))
    if not np.isfinite(n).all():
        raise InvalidParameters("notional_usd must be finite", field="positions")
    if isinstance(model, TieredMargin):
        caps, mmr, deduction = model.brackets()
        k = np.searchsorted(caps[:-1], n, side="right")
        cap = model.max_rate_cap()
        floors = [1.0, *(float(c) for c in caps[:-1])]
        imr = np.minimum(np.array([model._bracket_rates(f)[1] for f in floors]), cap)
        mm = np.minimum(n * mmr[k] - deduction[k], cap * n)
        return Requirement(mm_usd=mm, im_usd=np.maximum(imr[k] * n, mm), as_of=None)
    if bars is None:
        raise InvalidParameters(f"{model.family} margins change with the market: name the "
                                "instrument's recent bars (data)", field="data")
    if not model.notional_dependent:
        rates = model.margin_rates(bars)
        valid = np.flatnonzero(~np.isnan(rates.mm_rate))
        if not valid.size:
            raise InsufficientData(f"{bars.instrument}: no bar with a margin yet")
        t = int(valid[-1])
        return Requirement(mm_usd=rates.mm_rate[t] * n, im_usd=rates.im_rate[t] * n,
                           as_of=iso_utc(int(bars.timestamp_ms[t])))
    mm = np.empty_like(n)
    im = np.empty_like(n)
    t = len(bars) - 1
    for p, value in enumerate(n):
        r = model.margin_rates(bars, notional_usd=max(float(value), 1e-9))
        mm[p] = r.mm_rate[t] * value
        im[p] = r.im_rate[t] * value
    return Requirement(mm_usd=mm, im_usd=im, as_of=iso_utc(int(bars.timestamp_ms[t])))
