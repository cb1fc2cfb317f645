"""Benchmark data: real one-minute files tiled into a long continuous series.

The real files are read from ``../shared/data`` (never copied). Each tile keeps the real
bars' returns and wick ratios; it is rescaled to start at the previous tile's last close so
the path is continuous. Timestamps are consecutive minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration import BarSeries
from calibration.data import fingerprint, load_bars

ONE_MINUTE_FILES = (
    "binance_spot_1m_2021_05/BTCUSDT_1m_2021-04-20_2021-05-20.csv",
    "binance_spot_1m_2021_05/ETHUSDT_1m_2021-04-20_2021-05-20.csv",
    "binance_spot_btc_1m_2024_08/BTCUSDT_1m_2024-07-26_2024-08-25.csv",
)


def tiled_minutes(root: Path, n_bars: int) -> BarSeries:
    """``n_bars`` one-minute bars stitched from the real one-minute files."""
    tiles = [load_bars(ref, root=root) for ref in ONE_MINUTE_FILES]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("open", "high", "low", "close", "volume")}
    have = 0
    level = tiles[0].close[0]
    i = 0
    while have < n_bars:
        t = tiles[i % len(tiles)]
        scale = level / t.open[0]
        take = min(len(t), n_bars - have)
        for k in ("open", "high", "low", "close"):
            parts[k].append(getattr(t, k)[:take] * scale)
        assert t.volume is not None
        parts["volume"].append(t.volume[:take])
        level = t.close[take - 1] * scale
        have += take
        i += 1
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    ts = 1_577_836_800_000 + np.arange(n_bars, dtype=np.int64) * 60_000
    prices = (cols["open"], cols["high"], cols["low"], cols["close"])
    return BarSeries(
        instrument="TILED", timestamp_ms=ts, open=cols["open"], high=cols["high"],
        low=cols["low"], close=cols["close"], volume=cols["volume"], bar_seconds=60,
        fingerprint=fingerprint(ts, prices, cols["volume"]), source="tiled 1m files",
    )
