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


#: The pool of real one-minute files the calibration benchmark tiles (LUNA 2022-05 is left
#: out: its collapse to ~0 repeated every few months would compound to prices of 1e-60).
#: The BTC-PERP file's volume is USD notional; it is turned into base units (÷ close).
CALIBRATION_FILES = (
    "binance_spot_1m_2021_05/BTCUSDT_1m_2021-04-20_2021-05-20.csv",
    "binance_spot_1m_2021_05/ETHUSDT_1m_2021-04-20_2021-05-20.csv",
    "binance_spot_btc_1m_2024_08/BTCUSDT_1m_2024-07-26_2024-08-25.csv",
    "perp_btc_1m_2022_01/BTC-PERP_1m_2021-12-31_2022-02-01.csv",
)
_USD_VOLUME = ("perp_btc_1m_2022_01/",)


def tiled_instruments(root: Path, n_bars: int, count: int) -> list[BarSeries]:
    """``count`` series of ``n_bars`` one-minute bars each, tiled from ``CALIBRATION_FILES``.

    The files, joined end to end (each rescaled to open at the previous one's last close), form
    one cyclic pool of ~174k real bars; series ``i`` walks that pool from offset
    ``i * len(pool) / count``, wrapping round as often as ``n_bars`` needs, each lap rescaled
    to continue from the previous close. So the series differ (they are at different places of
    the pool at any time) yet every bar's return (less the pool's tiny net drift), wick and
    volume is a real one. Timestamps are
    consecutive minutes from 2020-01-01 (the real gaps are closed up).
    """
    tiles = [load_bars(ref, root=root) for ref in CALIBRATION_FILES]
    # Per bar of the pool: close-relative open/high/low, close-to-close growth, volume.
    growth, o_rel, h_rel, l_rel, vol = [], [], [], [], []
    for ref, t in zip(CALIBRATION_FILES, tiles, strict=True):
        assert t.volume is not None
        prev = np.r_[t.open[0], t.close[:-1]]
        growth.append(t.close / prev)
        o_rel.append(t.open / t.close)
        h_rel.append(t.high / t.close)
        l_rel.append(t.low / t.close)
        vol.append(t.volume / t.close if ref.startswith(_USD_VOLUME) else t.volume)
    pool = {k: np.concatenate(v) for k, v in
            (("g", growth), ("o", o_rel), ("h", h_rel), ("l", l_rel), ("v", vol))}
    size = pool["g"].shape[0]
    # The pool's net drift (its last close over its first open) removed evenly, ~2e-6 per
    # bar, so five years of laps keep the price level and the traded USD of the real files.
    log_growth = np.log(pool["g"])
    log_growth -= log_growth.mean()
    ts = 1_577_836_800_000 + np.arange(n_bars, dtype=np.int64) * 60_000
    out = []
    for i in range(count):
        idx = (i * size // count + np.arange(n_bars)) % size
        close = 30_000.0 * np.exp(np.cumsum(log_growth[idx]))
        cols = {"open": close * pool["o"][idx], "high": close * pool["h"][idx],
                "low": close * pool["l"][idx], "close": close}
        volume = np.ascontiguousarray(pool["v"][idx])
        prices = (cols["open"], cols["high"], cols["low"], cols["close"])
        out.append(BarSeries(
            instrument=f"TILED{i + 1}", timestamp_ms=ts, open=cols["open"], high=cols["high"],
            low=cols["low"], close=close, volume=volume, bar_seconds=60,
            fingerprint=fingerprint(ts, prices, volume),
            source=f"tiled 1m files from offset {i}/{count} of the pool"))
    return out
