"""The position population laid out for the kernels: the grid (or the explicit positions) as
query rows per side and MM series (``_Group``), and the layout that maps them back to one row per
position (``PositionTable``'s order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from calibration._bars import BarSeries
from calibration._errors import InvalidParameters
from calibration.liquidation import _kernels as _lk
from calibration.liquidation._config import ExplicitPosition, LiquidationConfig
from calibration.models import MarginRates

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]
Int8Array = NDArray[np.int8]


@dataclass(frozen=True, eq=False)
class _GridLayout:
    """Grid positions: index ``((k * S + s) * J + j) * K + c`` for entry ``k``, side ``s``,
    notional ``j`` and leverage ``c``; ``leverage[m]`` is the effective leverage per entry and
    requested leverage of MM series ``m``."""

    sides: tuple[int, ...]
    notionals: FloatArray
    entry_bars: IntArray
    leverage: tuple[FloatArray, ...]
    series_of_notional: IntArray

    def base(self) -> tuple[Int8Array, IntArray, FloatArray, FloatArray, BoolArray]:
        s_n, j_n = len(self.sides), self.notionals.shape[0]
        k_n = self.leverage[0].shape[1] if self.leverage else 0
        e_n = self.entry_bars.shape[0]
        shape = (e_n, s_n, j_n, k_n)
        kk, ss, jj, cc = (a.ravel() for a in np.indices(shape, dtype=np.int64))
        side = np.asarray(self.sides, dtype=np.int8)[ss]
        entry = self.entry_bars[kk]
        notional = self.notionals[jj]
        stacked = np.stack(self.leverage) if self.leverage else np.zeros((1, e_n, k_n))
        leverage = stacked[self.series_of_notional[jj], kk, cc]
        return side, entry, notional, leverage, np.ones(side.shape[0], dtype=bool)


@dataclass(frozen=True, eq=False)
class _ExplicitLayout:
    side: Int8Array
    entry_bar: IntArray
    notional: FloatArray
    leverage: FloatArray
    opened: BoolArray

    def base(self) -> tuple[Int8Array, IntArray, FloatArray, FloatArray, BoolArray]:
        return self.side, self.entry_bar, self.notional, self.leverage, self.opened


@dataclass(eq=False)
class _Group:
    """Query rows of one side and one MM series (rows ascending by entry bar)."""

    series: int
    entries: IntArray
    leverage: FloatArray  # (R, K) effective
    notional: FloatArray  # (R, J)
    pos_base: IntArray
    col_stride: int
    notional_stride: int
    order: IntArray  # column visiting order: leverage descending
    trig: IntArray | None = None
    notional_pow: FloatArray = field(init=False)

    def query_rows(self) -> _lk.QueryRows:
        """The kernels' view of the rows (after first passage: ``trig`` is set)."""
        assert self.trig is not None
        return _lk.QueryRows(self.entries, self.leverage, self.trig)

    def position_rows(self) -> _lk.PositionRows:
        """The positions behind the rows (after ``notional_pow`` is set)."""
        return _lk.PositionRows(self.notional, self.notional_pow, self.pos_base,
                                int(self.col_stride), int(self.notional_stride))



def _effective_leverage(requested: FloatArray, im_at_entry: FloatArray) -> FloatArray:
    """``min(requested, 1 / IM)`` per entry (rows) and requested leverage (columns)."""
    with np.errstate(divide="ignore"):
        cap = np.where(im_at_entry > 0, 1.0 / im_at_entry, np.inf)
    return np.ascontiguousarray(np.minimum(requested[None, :], cap[:, None]))

class _ImAt:
    """One series' IM rates read at the bars asked for (``MarginRates.im_at``): the
    population needs them at entry bars only, so the full IM series is never stored."""

    __slots__ = ("rates",)

    def __init__(self, rates: MarginRates) -> None:
        self.rates = rates

    def __getitem__(self, index: Any) -> Any:
        return self.rates.im_at(index)


def _valid_at(bars_idx: IntArray, mm: list[FloatArray], im: Sequence[_ImAt]) -> BoolArray:
    ok = np.ones(bars_idx.shape[0], dtype=bool)
    for m, i in zip(mm, im, strict=True):
        ok &= np.isfinite(m[bars_idx]) & np.isfinite(i[bars_idx])
    return ok


def _grid_groups(
    n: int, config: LiquidationConfig, notionals: FloatArray, series_of: IntArray,
    mm: list[FloatArray], im: Sequence[_ImAt], first_valid: int, side_signs: tuple[int, ...],
    close: FloatArray, funding_cum: FloatArray, groups: dict[int, list[_Group]], scale: float,
    dependent: bool,
) -> tuple[_GridLayout, IntArray, IntArray, FloatArray]:
    step = int(config.entry_every_bars)
    candidates = np.arange(0, max(n - 1, 0), step, dtype=np.int64)
    candidates = candidates[candidates >= first_valid]
    entries = candidates[_valid_at(candidates, mm, im)]
    e_n = entries.shape[0]
    s_n, j_n = len(side_signs), notionals.shape[0]
    requested = np.asarray([float(v) for v in config.leverages])
    k_n = requested.shape[0]
    leverage = tuple(_effective_leverage(requested, im_m[entries]) for im_m in im)
    per_entry = s_n * j_n * k_n
    layout = _GridLayout(
        sides=side_signs, notionals=notionals, entry_bars=entries, leverage=leverage,
        series_of_notional=series_of,
    )
    if e_n == 0:
        return layout, entries, np.zeros(0, dtype=np.int64), np.zeros(0)
    entry_positions = np.full(e_n, per_entry, dtype=np.int64)
    entry_notional = np.full(e_n, s_n * k_n * float(notionals.sum()) * scale)
    k_idx = np.arange(e_n, dtype=np.int64)
    order = np.argsort(-requested, kind="stable").astype(np.int64)
    for s, sign in enumerate(side_signs):
        base = (k_idx * s_n + s) * j_n * k_n
        if dependent:
            for j in range(j_n):
                m = int(series_of[j])
                groups[sign].append(_Group(
                    series=m, entries=entries, leverage=leverage[m],
                    notional=np.full((e_n, 1), notionals[j]),
                    pos_base=np.ascontiguousarray(base + j * k_n), col_stride=1,
                    notional_stride=0, order=order,
                ))
        else:
            groups[sign].append(_Group(
                series=0, entries=entries, leverage=leverage[0],
                notional=np.ascontiguousarray(np.broadcast_to(notionals, (e_n, j_n))),
                pos_base=np.ascontiguousarray(base), col_stride=1, notional_stride=k_n,
                order=order,
            ))
    return layout, entries, entry_positions, entry_notional


def _explicit_groups(
    bars: BarSeries, positions: tuple[ExplicitPosition, ...], notionals: FloatArray,
    series_of: IntArray, mm: list[FloatArray], im: Sequence[_ImAt], first_valid: int,
    close: FloatArray, funding_cum: FloatArray, groups: dict[int, list[_Group]], scale: float,
) -> tuple[_ExplicitLayout, IntArray, IntArray, FloatArray]:
    n = len(bars)
    p_n = len(positions)
    entry = np.empty(p_n, dtype=np.int64)
    for i, p in enumerate(positions):
        if p.entry_bar is not None:
            if p.entry_bar >= n:
                raise InvalidParameters(
                    f"positions[{i}].entry_bar {p.entry_bar} is past the last bar ({n - 1})",
                    field="positions",
                )
            entry[i] = int(p.entry_bar)
        else:
            assert p.entry_ms is not None
            e = int(np.searchsorted(bars.timestamp_ms, int(p.entry_ms), "right")) - 1
            if e < 0:
                raise InvalidParameters(
                    f"positions[{i}].entry_ms {p.entry_ms} is before the first bar",
                    field="positions",
                )
            entry[i] = e
    side = np.asarray([1 if p.side == "long" else -1 for p in positions], dtype=np.int8)
    requested = np.asarray([float(p.leverage) for p in positions])
    leverage = np.full(p_n, np.nan)
    opened = (entry >= first_valid) & (entry + 1 < n)
    for row in np.flatnonzero(opened):
        m = int(series_of[row])
        e = int(entry[row])
        im_e = float(im[m][e])
        if not (math.isfinite(mm[m][e]) and math.isfinite(im_e)):
            opened[row] = False
            continue
        leverage[row] = min(requested[row], 1.0 / im_e) if im_e > 0 else requested[row]
    layout = _ExplicitLayout(side=side, entry_bar=entry, notional=notionals, leverage=leverage,
                             opened=opened)
    idx = np.flatnonzero(opened)
    for sign in (1, -1):
        for m in range(len(mm)):
            sel = idx[(side[idx] == sign) & (series_of[idx] == m)]
            if sel.size == 0:
                continue
            sel = sel[np.argsort(entry[sel], kind="stable")]
            ent = np.ascontiguousarray(entry[sel])
            lev = np.ascontiguousarray(leverage[sel][:, None])
            groups[sign].append(_Group(
                series=m, entries=ent, leverage=lev,
                notional=np.ascontiguousarray(notionals[sel][:, None]),
                pos_base=np.ascontiguousarray(sel.astype(np.int64)), col_stride=0,
                notional_stride=0, order=np.zeros(1, dtype=np.int64),
            ))
    entry_bars, inverse = np.unique(entry[idx], return_inverse=True)
    entry_positions = np.bincount(inverse, minlength=entry_bars.shape[0]).astype(np.int64)
    entry_notional = np.asarray(
        np.bincount(inverse, weights=notionals[idx] * scale, minlength=entry_bars.shape[0]),
        dtype=np.float64,
    )
    return layout, entry_bars.astype(np.int64), entry_positions, entry_notional
