"""Data references, loading, validation, gaps, fingerprints, alignment and resampling.

A *data reference* is a path relative to a data root (the CLI's ``MARGINLAB_DATA_ROOT``).
Files are CSV, Parquet or Feather with ``timestamp_ms`` or ``timestamp`` (ISO-8601 UTC or
epoch seconds/milliseconds) and ``open, high, low, close[, volume]`` — the
``../shared/data`` layout and the plain ``timestamp,open,high,low,close[,volume]`` alike.
Validation follows domain.md §1: bad rows are refused with the row (1-based data row) and
column at fault; gaps are reported, never filled.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from calibration._bars import BarSeries, FloatArray, Gap, IntArray
from calibration._errors import DataError, DataReferenceError, DataValidationError

PRICE_COLUMNS = ("open", "high", "low", "close")
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".feather": "feather"}


def resolve_ref(ref: str, root: str | os.PathLike[str]) -> Path:
    """The file a data reference names under ``root``.

    Raises:
        DataReferenceError: the reference is empty or absolute, contains ``..``, resolves
            (through symlinks) outside the root, or names no file.
    """
    if not ref or not ref.strip():
        raise DataReferenceError("empty data reference")
    pure = Path(ref)
    if pure.is_absolute() or ref.startswith(("/", "\\")):
        raise DataReferenceError(f"data reference {ref!r} must be relative to the data root")
    if ".." in pure.parts:
        raise DataReferenceError(f"data reference {ref!r} must not contain '..'")
    root_path = Path(root).resolve()
    path = (root_path / pure).resolve()
    if not path.is_relative_to(root_path):
        raise DataReferenceError(f"data reference {ref!r} leads outside the data root")
    if not path.is_file():
        raise DataReferenceError(f"no data file {ref!r} under the data root {str(root_path)!r}")
    return path


def _read_table(path: Path, ref: str) -> pd.DataFrame:
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None and path.name.lower().endswith(".csv.gz"):
        kind = "csv"
    if kind is None:
        raise DataError(f"{ref!r}: unsupported file type (use .csv, .parquet or .feather)")
    try:
        if kind == "csv":
            return pd.read_csv(path)
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_feather(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{ref!r}: cannot read as {kind}: {exc}".splitlines()[0]) from exc


_TIMESTAMP_COLUMNS = ("timestamp_ms", "timestamp", "date", "time", "datetime", "open_time")


def _timestamp_column(frame: pd.DataFrame, ref: str) -> str:
    """The column the bar times are read from (``timestamp_ms`` wins over ``timestamp``)."""
    columns = {c.lower(): c for c in frame.columns}
    for name in _TIMESTAMP_COLUMNS:
        if name in columns:
            return str(columns[name])
    raise DataValidationError(f"{ref}: no timestamp column (timestamp_ms or timestamp)")


def _timestamps_ms(frame: pd.DataFrame, ref: str) -> IntArray:
    column = _timestamp_column(frame, ref)
    raw = frame[column]
    if column.lower() == "timestamp_ms":
        numbers = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(numbers))
        if bad.size:
            raise DataValidationError(
                f"{ref}: timestamp is not a number", row=int(bad[0]) + 1, column=column
            )
        return pd.to_numeric(raw).to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(raw):
        values = raw.to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise DataValidationError(
                f"{ref}: timestamp is not a number", row=int(bad[0]) + 1, column=column
            )
        # Epoch seconds vs milliseconds: any date after 2001 is > 1e12 in ms, < 1e11 in s.
        scale = 1.0 if np.nanmax(np.abs(values), initial=0.0) > 1e11 else 1000.0
        return np.round(values * scale).astype(np.int64)
    parsed = pd.to_datetime(raw, utc=True, errors="coerce", format="mixed")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if bad.size:
        raise DataValidationError(
            f"{ref}: unreadable timestamp {raw.iloc[int(bad[0])]!r}",
            row=int(bad[0]) + 1,
            column=column,
        )
    # Drop the (UTC) zone in pandas before leaving it: numpy has no tz-aware datetimes and
    # warns when handed one.
    ns = parsed.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").astype(np.int64)
    return ns // 1_000_000


def _float_column(frame: pd.DataFrame, name: str, ref: str) -> FloatArray:
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        raw = frame[name].iloc[row]
        raise DataValidationError(f"{ref}: {name} is {raw!r}, not a finite number",
                                  row=row + 1, column=name)
    return values


def infer_bar_seconds(timestamp_ms: IntArray) -> int:
    """The bar frequency in seconds: the most common step between bars."""
    if timestamp_ms.shape[0] < 2:
        raise DataError("need at least two bars to infer the bar frequency")
    steps, counts = np.unique(np.diff(timestamp_ms), return_counts=True)
    return int(steps[np.argmax(counts)] // 1000)


def find_gaps(timestamp_ms: IntArray, bar_seconds: int) -> tuple[Gap, ...]:
    """Holes in a strictly increasing timestamp series against ``bar_seconds``."""
    step = bar_seconds * 1000
    diffs = np.diff(timestamp_ms)
    rows = np.flatnonzero(diffs > step)
    return tuple(
        Gap(
            after_row=int(r),
            start_ms=int(timestamp_ms[r] + step),
            missing_bars=int(-(-diffs[r] // step) - 1),
        )
        for r in rows
    )


def find_suspect_prints(bars: BarSeries, max_wick_rate: float = 0.5) -> IntArray:
    """Rows whose wick reaches more than ``max_wick_rate`` beyond the bar's body.

    ``high > max(open, close) * (1 + max_wick_rate)`` or
    ``low < min(open, close) / (1 + max_wick_rate)``: a price that traded once and was gone
    within the same bar, like the ETH perpetual's 323.00 high on 2020-03-13 (spot high
    139.68). Reported, never removed: a real crash wick and a bad tick look alike, and
    which one it was is the data owner's call.
    """
    body_hi = np.maximum(bars.open, bars.close)
    body_lo = np.minimum(bars.open, bars.close)
    factor = 1.0 + max_wick_rate
    rows: IntArray = np.flatnonzero((bars.high > body_hi * factor) | (bars.low < body_lo / factor))
    return rows


def fingerprint(
    timestamp_ms: IntArray,
    prices: Sequence[FloatArray],
    volume: FloatArray | None = None,
) -> str:
    """sha256 of the normalised bars: int64 ms timestamps, float64 OHLC(V), little-endian."""
    digest = hashlib.sha256(b"marginlab-bars-v1")
    digest.update(np.ascontiguousarray(timestamp_ms, dtype="<i8").tobytes())
    for column in (*prices, *(() if volume is None else (volume,))):
        digest.update(np.ascontiguousarray(column, dtype="<f8").tobytes())
    return digest.hexdigest()


def bars_from_frame(
    frame: pd.DataFrame,
    *,
    instrument: str,
    source: str = "<frame>",
    bar_seconds: int | None = None,
) -> BarSeries:
    """Validate a frame of bars and build a ``BarSeries`` (domain.md §1).

    Raises:
        DataValidationError: a missing column, a non-finite or non-positive price, high < low,
            open/close outside [low, high], negative volume, or timestamps that are not strictly
            increasing; the message names the 1-based data row and the column.
    """
    frame = frame.rename(columns={c: c.lower() for c in frame.columns})
    for name in PRICE_COLUMNS:
        if name not in frame.columns:
            raise DataValidationError(f"{source}: missing column {name!r}", column=name)
    if len(frame) < 2:
        raise DataValidationError(f"{source}: needs at least two bars, has {len(frame)}")
    ts = _timestamps_ms(frame, source)
    o, h, lo, c = (_float_column(frame, name, source) for name in PRICE_COLUMNS)
    for name, values in zip(PRICE_COLUMNS, (o, h, lo, c), strict=True):
        bad = np.flatnonzero(values <= 0)
        if bad.size:
            raise DataValidationError(f"{source}: {name} must be > 0, is {values[bad[0]]!r}",
                                      row=int(bad[0]) + 1, column=name)
    bad = np.flatnonzero(h < lo)
    if bad.size:
        r = int(bad[0])
        raise DataValidationError(f"{source}: high {h[r]!r} < low {lo[r]!r}", row=r + 1,
                                  column="high")
    for name, values in (("open", o), ("close", c)):
        bad = np.flatnonzero((values < lo) | (values > h))
        if bad.size:
            r = int(bad[0])
            raise DataValidationError(
                f"{source}: {name} {values[r]!r} outside [low {lo[r]!r}, high {h[r]!r}]",
                row=r + 1, column=name,
            )
    steps = np.diff(ts)
    bad = np.flatnonzero(steps <= 0)
    if bad.size:
        r = int(bad[0]) + 1
        what = "duplicate" if steps[r - 1] == 0 else "out-of-order (not increasing)"
        raise DataValidationError(f"{source}: {what} timestamp", row=r + 1,
                                  column=_timestamp_column(frame, source))
    volume = None
    if "volume" in frame.columns:
        volume = _float_column(frame, "volume", source)
        bad = np.flatnonzero(volume < 0)
        if bad.size:
            raise DataValidationError(f"{source}: negative volume", row=int(bad[0]) + 1,
                                      column="volume")
    freq = bar_seconds or infer_bar_seconds(ts)
    if freq <= 0:
        raise DataValidationError(f"{source}: cannot infer a bar frequency", column="timestamp")
    return BarSeries(
        instrument=instrument,
        timestamp_ms=ts,
        open=o,
        high=h,
        low=lo,
        close=c,
        volume=volume,
        bar_seconds=freq,
        fingerprint=fingerprint(ts, (o, h, lo, c), volume),
        source=source,
        gaps=find_gaps(ts, freq),
    )


def instrument_from_ref(ref: str) -> str:
    """A default instrument name from a file name: ``BTCUSDT_1m_2021.csv`` → ``BTCUSDT``."""
    stem = Path(ref).name.split(".")[0]
    return stem.replace("-", "_").split("_")[0].upper() or stem


def load_bars(
    ref: str,
    *,
    root: str | os.PathLike[str],
    instrument: str | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> BarSeries:
    """Load, validate and fingerprint the bars a reference names.

    Args:
        ref: path relative to ``root``.
        root: the data root.
        instrument: the name to report; default from the file name.
        start_ms, end_ms: keep bars with ``start_ms <= timestamp < end_ms`` (epoch ms UTC),
            applied before validation so a known bad tail (LUNA after the halt) can be cut.
    """
    path = resolve_ref(ref, root)
    frame = _read_table(path, ref)
    if start_ms is not None or end_ms is not None:
        ts = _timestamps_ms(frame.rename(columns={c: c.lower() for c in frame.columns}), ref)
        keep = np.ones(ts.shape[0], dtype=bool)
        if start_ms is not None:
            keep &= ts >= start_ms
        if end_ms is not None:
            keep &= ts < end_ms
        frame = frame.loc[keep].reset_index(drop=True)
    return bars_from_frame(frame, instrument=instrument or instrument_from_ref(ref), source=ref)


def load_funding(ref: str, *, root: str | os.PathLike[str]) -> pd.DataFrame:
    """Funding settlements as a frame ``timestamp_ms, funding_rate`` (decimal per settlement).

    Columns: ``funding_rate`` (decimal) or ``funding_rate_pct`` (percent, divided by 100).
    """
    path = resolve_ref(ref, root)
    frame = _read_table(path, ref)
    frame = frame.rename(columns={c: c.lower() for c in frame.columns})
    ts = _timestamps_ms(frame, ref)
    if "funding_rate" in frame.columns:
        rate = _float_column(frame, "funding_rate", ref)
    elif "funding_rate_pct" in frame.columns:
        rate = _float_column(frame, "funding_rate_pct", ref) / 100.0
    else:
        raise DataValidationError(f"{ref}: no funding_rate or funding_rate_pct column")
    return pd.DataFrame({"timestamp_ms": ts, "funding_rate": rate})


def with_funding(bars: BarSeries, funding: pd.DataFrame) -> BarSeries:
    """``bars`` with each settlement's rate on the bar whose interval contains it."""
    step = bars.bar_seconds * 1000
    ts = funding["timestamp_ms"].to_numpy(dtype=np.int64)
    rate = funding["funding_rate"].to_numpy(dtype=np.float64)
    idx = np.searchsorted(bars.timestamp_ms, ts, side="right") - 1
    inside = (idx >= 0) & (ts < bars.timestamp_ms[np.maximum(idx, 0)] + step)
    per_bar = np.zeros(len(bars))
    np.add.at(per_bar, idx[inside], rate[inside])
    return replace(bars, funding_rate=per_bar, _cache={})


def load_book_depth(
    ref: str, *, root: str | os.PathLike[str], band_pct: float = 1.0
) -> pd.DataFrame:
    """Binance ``bookDepth`` snapshots as ``timestamp_ms, bid_depth_usd, ask_depth_usd``.

    The depth of a side is the notional within ``band_pct`` percent of the mid price
    (``percentage = -band_pct`` for bids, ``+band_pct`` for asks).
    """
    path = resolve_ref(ref, root)
    frame = _read_table(path, ref)
    frame = frame.rename(columns={c: c.lower() for c in frame.columns})
    for name in ("timestamp", "percentage", "notional"):
        if name not in frame.columns:
            raise DataValidationError(f"{ref}: missing column {name!r}", column=name)
    frame = frame.assign(timestamp_ms=_timestamps_ms(frame, ref))
    bids = frame[frame["percentage"] == -band_pct].set_index("timestamp_ms")["notional"]
    asks = frame[frame["percentage"] == band_pct].set_index("timestamp_ms")["notional"]
    out = pd.concat({"bid_depth_usd": bids, "ask_depth_usd": asks}, axis=1).dropna()
    if out.empty:
        raise DataValidationError(f"{ref}: no snapshot has the ±{band_pct}% bands")
    return out.sort_index().reset_index()


def with_depth(bars: BarSeries, depth: pd.DataFrame) -> BarSeries:
    """``bars`` with the latest depth snapshot taken at or before each bar's open.

    Bars before the first snapshot get NaN (unknown: consumers fall back to volume).
    """
    ts = depth["timestamp_ms"].to_numpy(dtype=np.int64)
    idx = np.searchsorted(ts, bars.timestamp_ms, side="right") - 1
    known = idx >= 0
    out = {}
    for name in ("bid_depth_usd", "ask_depth_usd"):
        values = depth[name].to_numpy(dtype=np.float64)
        column = np.full(len(bars), np.nan)
        column[known] = values[idx[known]]
        out[name] = column
    return replace(bars, bid_depth_usd=out["bid_depth_usd"], ask_depth_usd=out["ask_depth_usd"],
                   _cache={})


def _subset(bars: BarSeries, keep: np.ndarray) -> BarSeries:
    def pick(a: FloatArray | None) -> FloatArray | None:
        return None if a is None else a[keep]

    ts = bars.timestamp_ms[keep]
    o, h, lo, c = bars.open[keep], bars.high[keep], bars.low[keep], bars.close[keep]
    volume = pick(bars.volume)
    return replace(
        bars, timestamp_ms=ts, open=o, high=h, low=lo, close=c, volume=volume,
        funding_rate=pick(bars.funding_rate), bid_depth_usd=pick(bars.bid_depth_usd),
        ask_depth_usd=pick(bars.ask_depth_usd),
        fingerprint=fingerprint(ts, (o, h, lo, c), volume),
        gaps=find_gaps(ts, bars.bar_seconds), _cache={},
    )


def align(series: Sequence[BarSeries]) -> list[BarSeries]:
    """The series restricted to the timestamps they all share (inner join on time).

    Raises:
        DataError: the series have different bar frequencies or share fewer than two bars.
    """
    if not series:
        return []
    freqs = {s.bar_seconds for s in series}
    if len(freqs) > 1:
        raise DataError(
            f"cannot align bars of different frequencies {sorted(freqs)} s; resample first"
        )
    common = series[0].timestamp_ms
    for s in series[1:]:
        common = np.intersect1d(common, s.timestamp_ms, assume_unique=True)
    if common.shape[0] < 2:
        names = ", ".join(s.instrument for s in series)
        raise DataError(f"{names}: fewer than two common timestamps")
    return [s if s.timestamp_ms.shape == common.shape and np.array_equal(s.timestamp_ms, common)
            else _subset(s, np.isin(s.timestamp_ms, common)) for s in series]


def resample(bars: BarSeries, bar_seconds: int) -> BarSeries:
    """Bars aggregated to a coarser frequency aligned on the UTC epoch.

    open = first, high = max, low = min, close = last, volume and funding = sum, depth = first
    (known at the coarse bar's open). Coarse bars with no fine bar are gaps, not filled.

    Raises:
        DataError: ``bar_seconds`` is not a multiple of the series' frequency.
    """
    if bar_seconds <= 0 or bar_seconds % bars.bar_seconds:
        raise DataError(
            f"cannot resample {bars.bar_seconds}s bars to {bar_seconds}s: "
            "the new bar must be a whole multiple of the old one"
        )
    if bar_seconds == bars.bar_seconds:
        return bars
    step = bar_seconds * 1000
    bucket = bars.timestamp_ms // step
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = np.r_[starts[1:], len(bars)]
    ts = bucket[starts] * step
    o = bars.open[starts]
    c = bars.close[ends - 1]
    h = np.maximum.reduceat(bars.high, starts)
    lo = np.minimum.reduceat(bars.low, starts)
    volume = None if bars.volume is None else np.add.reduceat(bars.volume, starts)
    funding = None if bars.funding_rate is None else np.add.reduceat(bars.funding_rate, starts)
    bid = None if bars.bid_depth_usd is None else bars.bid_depth_usd[starts]
    ask = None if bars.ask_depth_usd is None else bars.ask_depth_usd[starts]
    return BarSeries(
        instrument=bars.instrument, timestamp_ms=ts, open=o, high=h, low=lo, close=c,
        volume=volume, funding_rate=funding, bid_depth_usd=bid, ask_depth_usd=ask,
        bar_seconds=bar_seconds, fingerprint=fingerprint(ts, (o, h, lo, c), volume),
        source=f"{bars.source}@{bar_seconds}s", gaps=find_gaps(ts, bar_seconds),
    )


def parse_duration_seconds(text: str) -> int:
    """``"1m"`` → 60, ``"4h"`` → 14400, ``"1d"`` → 86400, ``"90s"`` → 90."""
    units = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)]
            if number.isdigit() and int(number) > 0:
                return int(number) * units[unit]
    raise DataError(f"not a duration: {text!r} (use e.g. 90s, 5m, 4h, 1d)")
