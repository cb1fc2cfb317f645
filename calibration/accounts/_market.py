"""A market: k instruments on one clock (domain.md §7)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from calibration._bars import BarSeries
from calibration._errors import DataError, InvalidParameters
from calibration.data import _subset, series_fingerprint

FloatMatrix = NDArray[np.float64]

#: Quote suffixes stripped to find an instrument's underlying asset (``BTCUSDT`` → ``BTC``).
_QUOTES = ("USDT", "USDC", "BUSD", "USD", "-PERP", "PERP", "_PERP", "-USD")


def underlying_of(instrument: str) -> str:
    """The base asset an instrument's price is in: ``BTCUSDT`` → ``BTC``, ``ETH-PERP`` →
    ``ETH``; an instrument without a known quote suffix is its own asset."""
    name = instrument.upper()
    for suffix in sorted(_QUOTES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)].rstrip("-_")
    return name


@dataclass(frozen=True, eq=False)
class Market:
    """k instruments aligned on the intersection of their bar times.

    A bar missing in any instrument is dropped from all of them and counted
    (``dropped_bars``), never filled. The fingerprint covers every series read (bars,
    funding, depth) of every instrument, in order.

    Attributes:
        bars: the aligned series, one per instrument, all of length ``n``.
        dropped_bars: instrument → bars of its own that the alignment dropped.
    """

    bars: tuple[BarSeries, ...]
    dropped_bars: dict[str, int]

    @classmethod
    def from_series(cls, series: Sequence[BarSeries]) -> Market:
        """Align ``series`` on their common bar times.

        Raises:
            InvalidParameters: no series, two with the same instrument name.
            DataError: different bar sizes, or fewer than two common bars.
        """
        if not series:
            raise InvalidParameters("a market needs at least one instrument", field="data")
        names = [s.instrument for s in series]
        if len(set(names)) != len(names):
            raise InvalidParameters(f"two series name the same instrument ({', '.join(names)})",
                                    field="data")
        sizes = sorted({s.bar_seconds for s in series})
        if len(sizes) > 1:
            raise DataError(f"instruments on different bar sizes {sizes} s; resample first")
        common = series[0].timestamp_ms
        for s in series[1:]:
            common = np.intersect1d(common, s.timestamp_ms, assume_unique=True)
        if common.shape[0] < 2:
            raise DataError(f"{', '.join(names)}: fewer than two common bar times")
        aligned = []
        dropped = {}
        for s in series:
            keep = np.isin(s.timestamp_ms, common, assume_unique=True)
            dropped[s.instrument] = int((~keep).sum())
            aligned.append(s if keep.all() else _subset(s, keep))
        return cls(bars=tuple(aligned), dropped_bars=dropped)

    @property
    def instruments(self) -> tuple[str, ...]:
        """The instruments' names, in order."""
        return tuple(b.instrument for b in self.bars)

    @property
    def timestamp_ms(self) -> NDArray[np.int64]:
        """Bar open times, epoch ms UTC, shape ``(n,)``."""
        return self.bars[0].timestamp_ms

    @property
    def bar_seconds(self) -> int:
        """The bar size, seconds."""
        return self.bars[0].bar_seconds

    def __len__(self) -> int:
        return len(self.bars[0])

    @property
    def fingerprint(self) -> str:
        """sha256 over every instrument's series (bars, funding, depth), in order."""
        digest = hashlib.sha256(b"marginlab-market-v1")
        for b in self.bars:
            digest.update(b.instrument.encode() + b"|" + series_fingerprint(b).encode())
        return digest.hexdigest()

    def matrix(self, column: str) -> FloatMatrix:
        """One price column of every instrument, shape ``(k, n)`` (``open``, ``high``,
        ``low``, ``close``)."""
        if column not in ("open", "high", "low", "close"):
            raise InvalidParameters(f"unknown price column {column!r}", field="column")
        return np.vstack([getattr(b, column) for b in self.bars])

    def underlyings(self) -> tuple[str, ...]:
        """Each instrument's underlying asset (``underlying_of``), in order."""
        return tuple(underlying_of(name) for name in self.instruments)

    def pricing_instrument(self, asset: str) -> int:
        """Index of the instrument that prices collateral in ``asset`` (the first one on
        that underlying).

        Raises:
            InvalidParameters: no instrument of the market is on ``asset``.
        """
        for i, u in enumerate(self.underlyings()):
            if u == asset.upper():
                return i
        raise InvalidParameters(
            f"collateral asset {asset!r} has no instrument in the market to price it "
            f"(instruments: {', '.join(self.instruments)})", field="collateral")


#: Assets counted at a price of 1 USD.
STABLE_ASSETS = frozenset({"USD", "USDT", "USDC", "BUSD", "DAI"})


def volume_depth_usd(bars: BarSeries, depth_fraction_of_adv: float,
                     adv_window_bars: int) -> NDArray[np.float64] | None:
    """Depth estimated from volume, USD per bar ``(n,)``: ``depth_fraction_of_adv`` × the
    trailing ``adv_window_bars`` mean traded USD per day; ``None`` without volume. What the
    engine and the haircut coverage backtest read where the bars have no fresh order-book
    snapshot."""
    from calibration.liquidation._kernels import trailing_mean

    traded = bars.traded_usd()
    if traded is None:
        return None
    return np.asarray(trailing_mean(np.ascontiguousarray(traded, dtype=np.float64),
                                    int(adv_window_bars),
                                    86_400.0 / bars.bar_seconds * float(depth_fraction_of_adv)),
                      dtype=np.float64)
