"""The venue's insurance fund: one ledger of net settlements per close-out time (the rules are
``calibration.liquidation``'s "Insurance fund and bad debt")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from calibration._errors import InvalidParameters
from calibration.report import FundPoint

if TYPE_CHECKING:
    from calibration.liquidation._results import LiquidationResult

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso(ms: int) -> str:
    """Epoch milliseconds → ``YYYY-MM-DDTHH:MM:SSZ`` (UTC)."""
    return (_EPOCH + timedelta(milliseconds=int(ms))).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, eq=False)
class InsuranceFund:
    """A venue's insurance fund through time: a start level, then one net settlement per
    close-out time (``calibration.liquidation``, "Insurance fund and bad debt").

    Attributes:
        start_usd: the level before any close-out, USD.
        start_ms: open time of the first bar of any instrument (epoch ms UTC): where the path
            starts.
        time_ms: times with at least one close-out (close-out bar open times, epoch ms UTC),
            strictly ascending, shape ``(F,)``.
        delta_usd: net move of the fund at each time (fees in minus bad debt out, USD, ×
            ``population_scale``), shape ``(F,)``.
        level_usd: level after the settlement at each time, USD, shape ``(F,)``.
    """

    start_usd: float
    start_ms: int | None
    time_ms: IntArray
    delta_usd: FloatArray
    level_usd: FloatArray

    @cached_property
    def _neg_since(self) -> IntArray:
        """Per settlement, the index of the settlement that began the current run below zero
        (meaningful where the level is negative)."""
        neg = self.level_usd < 0.0
        run_start = neg & ~np.r_[False, neg[:-1]]
        result: IntArray = np.maximum.accumulate(
            np.where(run_start, np.arange(neg.shape[0]), 0)
        ).astype(np.int64)
        return result

    @property
    def min_usd(self) -> float:
        """Lowest level over the whole path (the start level if never lower), USD."""
        if self.level_usd.size == 0:
            return float(self.start_usd)
        return min(float(self.start_usd), float(self.level_usd.min()))

    @property
    def exhausted_at(self) -> str | None:
        """When the fund first went below zero (ISO-8601 UTC), or ``None``."""
        neg = np.flatnonzero(self.level_usd < 0.0)
        return None if neg.size == 0 else _iso(int(self.time_ms[neg[0]]))

    def window(self, start_ms: int | None, end_ms: int | None) -> tuple[float, str | None]:
        """``(minimum, exhausted_at)`` over the window ``[start_ms, end_ms)`` (``None``:
        open-ended).

        The minimum is over the level entering the window and every level after a settlement
        in it. ``exhausted_at`` is the first settlement in the window that leaves the fund below
        zero, or, if the fund enters the window already below zero, the time it went below
        zero (before the window); ``None`` if it is never below zero in the window.
        """
        t = self.time_ms
        f0 = 0 if start_ms is None else int(np.searchsorted(t, start_ms, "left"))
        f1 = t.shape[0] if end_ms is None else int(np.searchsorted(t, end_ms, "left"))
        f1 = max(f0, f1)
        entering = float(self.level_usd[f0 - 1]) if f0 > 0 else float(self.start_usd)
        inside = self.level_usd[f0:f1]
        lowest = min(entering, float(inside.min())) if inside.size else entering
        exhausted: str | None = None
        if entering < 0.0:
            exhausted = _iso(int(t[self._neg_since[f0 - 1]]))
        else:
            neg = np.flatnonzero(inside < 0.0)
            if neg.size:
                exhausted = _iso(int(t[f0 + neg[0]]))
        return lowest, exhausted

    def path(self, max_points: int = 500) -> list[FundPoint]:
        """The fund through time: its start level at ``start_ms``, then the level after each
        settlement.

        With more than ``max_points`` points, the first and last are kept and the others are
        split into ``max_points - 2`` consecutive groups, each represented by its lowest point,
        so the minimum (and every drawdown's trough at that resolution) is never lost.
        """
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
            raise InvalidParameters(f"max_points must be an integer >= 2, got {max_points!r}",
                                    field="max_points")
        if self.start_ms is None:
            return []
        times = np.concatenate([[int(self.start_ms)], self.time_ms]).astype(np.int64)
        levels = np.concatenate([[float(self.start_usd)], self.level_usd])
        count = levels.shape[0]
        if count > max_points:
            groups = max_points - 2
            inner = np.arange(1, count - 1)
            bounds = np.linspace(0, inner.shape[0], groups + 1).astype(np.int64)
            keep = [0]
            for g in range(groups):
                a, b = int(bounds[g]), int(bounds[g + 1])
                if b > a:
                    keep.append(int(inner[a + int(np.argmin(levels[inner[a:b]]))]))
            keep.append(count - 1)
            idx = np.asarray(keep, dtype=np.int64)
            times, levels = times[idx], levels[idx]
        return [FundPoint(_iso(int(t)), float(v)) for t, v in zip(times, levels, strict=True)]


def shared_insurance_fund(
    results: Sequence[LiquidationResult], start_usd: float | None = None
) -> InsuranceFund:
    """One insurance fund for the venue: every instrument's close-outs on one ledger.

    Args:
        results: the simulations of the venue's instruments, in a fixed order (it fixes the
            summation order of close-outs settling at the same time).
        start_usd: the fund's start level, USD; by default the ``insurance_fund_usd`` every
            result's config shares.

    Raises:
        InvalidParameters: ``start_usd`` omitted and the results' configs disagree on
            ``insurance_fund_usd``, or no results and no ``start_usd``.
    """
    if start_usd is None:
        starts = {float(r.config.insurance_fund_usd) for r in results}
        if len(starts) != 1:
            raise InvalidParameters(
                "one insurance fund per venue needs one start level; the instruments' "
                f"insurance_fund_usd values are {sorted(starts)}",
                field="insurance_fund_usd",
            )
        start_usd = starts.pop()
    if not results:
        return InsuranceFund(float(start_usd), None, np.zeros(0, dtype=np.int64), np.zeros(0),
                             np.zeros(0))
    times = np.concatenate([r.fund.time_ms for r in results]).astype(np.int64)
    deltas = np.concatenate([r.fund.delta_usd for r in results])
    which = np.concatenate([np.full(r.fund.time_ms.shape[0], i, dtype=np.int64)
                            for i, r in enumerate(results)])
    order = np.lexsort((which, times))  # by time, then instrument order: a fixed sum order
    times, deltas = times[order], deltas[order]
    first = np.flatnonzero(np.r_[True, times[1:] != times[:-1]]) if times.size else np.zeros(
        0, dtype=np.int64)
    merged_delta = np.add.reduceat(deltas, first) if times.size else np.zeros(0)
    level = np.cumsum(np.r_[float(start_usd), merged_delta])[1:]
    starts_ms = [int(r.timestamp_ms[0]) for r in results if r.timestamp_ms.size]
    return InsuranceFund(
        start_usd=float(start_usd), start_ms=min(starts_ms) if starts_ms else None,
        time_ms=np.ascontiguousarray(times[first]), delta_usd=merged_delta, level_usd=level,
    )
