"""The bar series every backtest runs on, and the parameter-free features cached on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from calibration import _kernels

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Gap:
    """A hole in a bar series against its bar frequency.

    Attributes:
        after_row: 0-based row of the last bar before the hole.
        start_ms: open time (epoch ms, UTC) of the first missing bar.
        missing_bars: how many bars are missing.
    """

    after_row: int
    start_ms: int
    missing_bars: int


@dataclass(frozen=True, slots=True)
class Repair:
    """One change an opt-in repair policy made to the data as read (domain.md §1).

    Attributes:
        row: 1-based data row of the file (header excluded) that was changed or dropped.
        timestamp_ms: that row's bar open time, epoch ms UTC.
        defect: the policy that fixed it: ``ohlc-range`` or ``duplicates``.
        column: the column changed (``open`` or ``close``), ``None`` for a dropped row.
        before, after: the value read and the value used (``None`` for a dropped row).
        change: the change in words, e.g. ``open 105.0 -> 104.0 (high)``.
    """

    row: int
    timestamp_ms: int
    defect: str
    column: str | None
    before: float | None
    after: float | None
    change: str


@dataclass(frozen=True, eq=False)
class BarSeries:
    """Validated OHLCV bars of one instrument, oldest first.

    All arrays have shape ``(n,)``. Prices are in quote currency (USD for USDT pairs).

    Attributes:
        instrument: the instrument's name (``BTCUSDT``).
        timestamp_ms: bar open times, epoch milliseconds UTC, strictly increasing.
        open, high, low, close: prices, > 0, ``low <= open, close <= high``.
        volume: traded base-asset units per bar, or ``None``.
        funding_rate: funding rate settled at each bar as a fraction of notional (positive: longs
            pay shorts), 0 where no settlement falls in the bar; ``None`` without funding data.
        bid_depth_usd, ask_depth_usd: order-book depth (USD) on each side known at the bar's open,
            or ``None`` without depth data.
        bar_seconds: the bar frequency in seconds.
        fingerprint: content hash of the normalised bars (hex sha256).
        source: the data reference the bars came from.
        gaps: holes against ``bar_seconds``, reported, never filled.
        close_only: the source had closes only (price snapshots): open, high and low equal
            the close, so losses and liquidations use closes (domain.md §1, §3).
        newest_first: the file listed bars newest first; they were reversed on loading.
        repair_policy: the opt-in repairs allowed when loading (sorted names), part of the
            fingerprint; ``()`` for strict loading.
        repairs: every change those repairs made, in file row order.
        depth_stale: per bar, whether the last depth snapshot was older than the staleness
            allowed (depth then NaN), shape ``(n,)``; ``None`` without depth data.
    """

    instrument: str
    timestamp_ms: IntArray
    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    bar_seconds: int
    fingerprint: str
    volume: FloatArray | None = None
    funding_rate: FloatArray | None = None
    bid_depth_usd: FloatArray | None = None
    ask_depth_usd: FloatArray | None = None
    source: str = ""
    gaps: tuple[Gap, ...] = ()
    close_only: bool = False
    newest_first: bool = False
    repair_policy: tuple[str, ...] = ()
    repairs: tuple[Repair, ...] = ()
    depth_stale: BoolArray | None = None
    _cache: dict[Any, FloatArray] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.close.shape[0])

    @property
    def depth_stale_bars(self) -> int:
        """Bars whose depth snapshot was too old to use (0 without depth data)."""
        return 0 if self.depth_stale is None else int(np.count_nonzero(self.depth_stale))

    # Parameter-free features, computed once per series and shared by every parameter set.

    def log_returns(self) -> FloatArray:
        """Close-to-close log returns, shape ``(n,)``; element 0 is NaN (no previous close)."""
        key = "log_returns"
        if key not in self._cache:
            r = np.empty(len(self), dtype=np.float64)
            r[0] = np.nan
            # In place: a temporary ratio array would be one more n-sized first touch.
            np.divide(self.close[1:], self.close[:-1], out=r[1:])
            np.log(r[1:], out=r[1:])
            self._cache[key] = r
        return self._cache[key]

    def squared_returns(self) -> FloatArray:
        """Squared log returns, shape ``(n,)``; element 0 is NaN."""
        key = "squared_returns"
        if key not in self._cache:
            r = self.log_returns()
            self._cache[key] = r * r
        return self._cache[key]

    def forward_losses(self, horizon_bars: int) -> tuple[FloatArray, FloatArray]:
        """Worst long and short losses over the next ``horizon_bars`` bars (domain.md §3).

        ``long[t] = 1 - min(low[t+1..t+h]) / close[t]`` and
        ``short[t] = max(high[t+1..t+h]) / close[t] - 1``; NaN for the last ``h`` bars, which
        have no full horizon ahead. Fractions of notional, shape ``(n,)`` each.
        """
        key = ("forward_losses", horizon_bars)
        if key not in self._cache:
            # One (2, n) array written once by the kernel, cached per horizon.
            self._cache[key] = _kernels.forward_losses_pair(
                self.low, self.high, self.close, horizon_bars
            )
        pair = self._cache[key]
        return pair[0], pair[1]

    def traded_usd(self) -> FloatArray | None:
        """Traded notional per bar in USD (``volume * close``), or ``None`` without volume."""
        if self.volume is None:
            return None
        key = "traded_usd"
        if key not in self._cache:
            self._cache[key] = self.volume * self.close
        return self._cache[key]
