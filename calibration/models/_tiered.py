"""Exchange-style notional brackets (Binance "maintenance amount", Hyperliquid tiers)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any, ClassVar

import numpy as np

from calibration._bars import BarSeries
from calibration._errors import InvalidParameters
from calibration.models._base import FloatArray, MarginModel, Rule

#: Binance BTCUSDT USD-M bracket caps (2021), USD; the last bracket is open-ended.
BINANCE_BTCUSDT_2021_CAPS_USD: tuple[float, ...] = (
    50_000, 250_000, 1_000_000, 10_000_000, 20_000_000, 50_000_000,
    100_000_000, 200_000_000, 300_000_000, 500_000_000,
)
#: Binance BTCUSDT USD-M maintenance margin rates per bracket (2021), fractions.
BINANCE_BTCUSDT_2021_MMR: tuple[float, ...] = (
    0.004, 0.005, 0.01, 0.025, 0.05, 0.10, 0.125, 0.15, 0.25, 0.50,
)

#: Binance BTCUSDT USD-M initial margin rates per bracket (2021), fractions (domain.md §2):
#: 1 / max leverage, 125x .. 1x. Not always ``2 * mmr`` (100M–200M: 15% / 33.3%).
BINANCE_BTCUSDT_2021_IMR: tuple[float, ...] = (
    0.008, 0.01, 0.02, 0.05, 0.10, 0.20, 0.25, 0.333, 0.50, 1.0,
)


class TieredMargin(MarginModel):
    """Maintenance margin by notional bracket, continuous in notional.

    Brackets are ``[floor, cap)`` (domain.md §2): a position of notional ``N`` is in bracket
    ``k`` when ``cap_{k-1} <= N < cap_k``, so a notional exactly at a cap is in the upper
    bracket, as Binance publishes them. In bracket ``k``:
    ``MM(N) = N * mmr_k - deduction_k`` with ``deduction_0 = 0`` and
    ``deduction_k = deduction_{k-1} + cap_{k-1} * (mmr_k - mmr_{k-1})``, so ``MM`` is continuous
    at every cap (Binance publishes ``deduction_k`` as the "maintenance amount"). The MM *rate*
    is ``MM(N) / N``; the IM rate is ``imr_k`` from ``imr_schedule`` when given (published
    tables need not be ``mmr × im_to_mm``: Binance's 100M–200M bracket is 15% / 33.3%), else
    ``mmr_k * im_to_mm``. Rates do not change over time.

    Args:
        base_mmr: MMR of the first bracket, fraction of notional.
        tier_growth: ratio between the MMRs of consecutive brackets, ``mmr_k = base_mmr *
            tier_growth**k`` (capped so that IM never exceeds 100%).
        bracket_caps_usd: upper notional of each bracket but the last, USD, increasing
            (exclusive: a notional equal to a cap is in the next bracket). A notional above
            the last cap is in the open-ended last bracket.
        im_to_mm: IM rate / MM rate per bracket (Binance: 2).
        mmr_schedule: explicit MMR per bracket, fractions of notional (one more than caps, or
            as many: the last rate then also applies above the last cap), overriding
            ``base_mmr`` and ``tier_growth``, to reproduce a published table exactly.
        imr_schedule: explicit IM rate per bracket, fractions of notional (same lengths as
            ``mmr_schedule``; each at least that bracket's MMR), overriding ``im_to_mm``.
        max_rate: cap on the MM and IM rates, fraction of notional (domain.md §2).
    """

    family = "tiered"
    notional_dependent = True
    rules: ClassVar[dict[str, Rule]] = {
        "base_mmr": Rule(low=0.0, high=1.0, low_open=True),
        "tier_growth": Rule(low=1.0),
        "im_to_mm": Rule(low=1.0),
        "max_rate": Rule(low=0.0, high=1.0, low_open=True),
    }

    def __init__(
        self,
        *,
        base_mmr: float = 0.004,
        tier_growth: float = 2.0,
        bracket_caps_usd: Sequence[float] = BINANCE_BTCUSDT_2021_CAPS_USD,
        im_to_mm: float = 2.0,
        mmr_schedule: Sequence[float] | None = None,
        imr_schedule: Sequence[float] | None = None,
        max_rate: float = 1.0,
    ) -> None:
        self.base_mmr = base_mmr
        self.tier_growth = tier_growth
        self.bracket_caps_usd = bracket_caps_usd
        self.im_to_mm = im_to_mm
        self.mmr_schedule = mmr_schedule
        self.imr_schedule = imr_schedule
        self.max_rate = max_rate

    def validate(self) -> None:
        super().validate()
        caps = _as_list(self.bracket_caps_usd, "bracket_caps_usd")
        for i, cap in enumerate(caps):
            Rule(low=0.0, low_open=True).check(f"bracket_caps_usd[{i}]", cap)
        if any(b <= a for a, b in pairwise(caps)):
            raise InvalidParameters(
                "bracket_caps_usd must be strictly increasing", field="bracket_caps_usd"
            )
        if self.mmr_schedule is not None:
            mmr = _as_list(self.mmr_schedule, "mmr_schedule")
            if len(mmr) not in (len(caps), len(caps) + 1) or not mmr:
                raise InvalidParameters(
                    f"mmr_schedule needs {len(caps) + 1} rates (one per bracket), got {len(mmr)}",
                    field="mmr_schedule",
                )
            for i, rate in enumerate(mmr):
                Rule(low=0.0, high=1.0, low_open=True).check(f"mmr_schedule[{i}]", rate)
            if any(b < a for a, b in pairwise(mmr)):
                raise InvalidParameters(
                    "mmr_schedule must not decrease with notional", field="mmr_schedule"
                )
        if self.imr_schedule is not None:
            imr = _as_list(self.imr_schedule, "imr_schedule")
            if len(imr) not in (len(caps), len(caps) + 1):
                raise InvalidParameters(
                    f"imr_schedule needs {len(caps) + 1} rates (one per bracket), got {len(imr)}",
                    field="imr_schedule",
                )
            for i, rate in enumerate(imr):
                Rule(low=0.0, high=1.0, low_open=True).check(f"imr_schedule[{i}]", rate)
            _, mmr_k, _ = self.brackets()
            imr_k = self._imr(len(caps) + 1)
            for i in range(len(imr_k)):
                if imr_k[i] < mmr_k[i] - 1e-12:
                    raise InvalidParameters(
                        f"imr_schedule[{min(i, len(imr) - 1)}] = {float(imr_k[i])} is below "
                        f"the bracket's MMR {float(mmr_k[i])}",
                        field=f"imr_schedule[{min(i, len(imr) - 1)}]")

    def brackets(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """``(caps_usd, mmr, deduction_usd)`` per bracket; ``caps_usd[-1]`` is ``inf``."""
        caps = np.array([*map(float, self.bracket_caps_usd), np.inf])
        k = caps.shape[0]
        if self.mmr_schedule is not None:
            mmr = np.array(list(map(float, self.mmr_schedule)), dtype=np.float64)
            if mmr.shape[0] == k - 1:  # no rate for the open-ended bracket: repeat the last
                mmr = np.append(mmr, mmr[-1])
        else:
            mmr = self.base_mmr * float(self.tier_growth) ** np.arange(k, dtype=np.float64)
            mmr = np.minimum(mmr, 1.0 / float(self.im_to_mm))
        deduction = np.zeros(k)
        for i in range(1, k):
            deduction[i] = deduction[i - 1] + caps[i - 1] * (mmr[i] - mmr[i - 1])
        return caps, mmr, deduction

    def _imr(self, k: int) -> FloatArray:
        """The IM rate of each of ``k`` brackets from ``imr_schedule`` (last one repeated)."""
        imr = np.array(list(map(float, self.imr_schedule or ())), dtype=np.float64)
        return imr if imr.shape[0] == k else np.append(imr, imr[-1])

    def bracket_of(self, notional_usd: float) -> int:
        """Index of the bracket ``[cap_{k-1}, cap_k)`` holding ``notional_usd``."""
        caps = np.asarray(self.bracket_caps_usd, dtype=np.float64)
        return int(np.searchsorted(caps, notional_usd, side="right"))

    def maintenance_usd(self, notional_usd: float) -> float:
        """Maintenance margin in USD for a position of ``notional_usd``."""
        _, mmr, deduction = self.brackets()
        k = self.bracket_of(notional_usd)
        return float(notional_usd * mmr[k] - deduction[k])

    def _bracket_rates(self, notional_usd: float) -> tuple[float, float]:
        caps, mmr, deduction = self.brackets()
        k = self.bracket_of(notional_usd)
        mm_rate = (notional_usd * mmr[k] - deduction[k]) / notional_usd
        if self.imr_schedule is not None:
            return float(mm_rate), float(self._imr(caps.shape[0])[k])
        return float(mm_rate), float(mmr[k] * self.im_to_mm)

    def _mm_rate(self, bars: BarSeries, notional_usd: float) -> FloatArray:
        mm_rate, _ = self._bracket_rates(notional_usd)
        return np.full(len(bars), mm_rate)

    def _im_to_mm(self, notional_usd: float) -> float:
        # IM is the bracket's mmr_k * im_to_mm while MM is (N mmr_k - deduction_k) / N.
        mm_rate, im_rate = self._bracket_rates(notional_usd)
        return im_rate / mm_rate


def _as_list(value: object, name: str) -> list[Any]:
    """``value`` as a list, or ``InvalidParameters`` when it is not a sequence of numbers."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidParameters(f"{name} must be a sequence of numbers, got {value!r}",
                                field=name)
    return list(value)
