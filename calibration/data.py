"""Data references, loading, validation, gaps, fingerprints, alignment and resampling.

A *data reference* is a path relative to a data root (the CLI's ``MARGINLAB_DATA_ROOT``).
Files are CSV, Parquet or Feather with a timestamp (``timestamp_ms``, or ``timestamp``
as ISO-8601 or epoch s/ms/µs/ns told apart by magnitude) and ``open, high, low, close
[, volume]`` or a close (``price``) only — the ``../shared/data`` layout, the plain
``timestamp,open,high,low,close[,volume]``, Binance's headerless klines and vendor exports
with a title line, ``;`` delimiters or newest-first rows alike.
Validation follows domain.md §1: bad rows are refused with the row (1-based data row,
header excluded) and column at fault; gaps are reported, never filled; nothing is repaired
unless a repair policy names the defect, and every repair is listed.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from calibration._bars import BarSeries, FloatArray, Gap, IntArray, Repair
from calibration._errors import (
    DataError,
    DataReferenceError,
    DataValidationError,
    InvalidParameters,
)
from calibration.horizon import parse_duration

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
        raise DataReferenceError(f"data reference {_short(ref)} must be relative to the data "
                                 "root")
    if ".." in pure.parts:
        raise DataReferenceError(f"data reference {_short(ref)} must not contain '..'")
    if "\x00" in ref:
        raise DataReferenceError("a data reference cannot contain a NUL character")
    root_path = Path(root).resolve()
    try:
        path = (root_path / pure).resolve()
        if not path.is_relative_to(root_path):
            raise DataReferenceError(f"data reference {_short(ref)} leads outside the data root")
        found = path.is_file()
    except OSError:  # a name too long for the file system, a loop: no file by that name
        found = False
    if not found:
        # The root is the server's own path: name only the reference the caller gave.
        raise DataReferenceError(f"no data file {_short(ref)} under the data root")
    return path


def _short(ref: str) -> str:
    """A reference as the caller gave it, cut to 80 characters for messages."""
    return repr(ref if len(ref) <= 80 else ref[:80] + "...")


def _plain(value: object) -> str:
    """A number or cell as a person reads it: ``100.5``, ``1735689600000000``, ``'abc'``."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return repr(float(value))
    text = str(value)
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _without_path(message: str, path: Path, ref: str) -> str:
    """A reader's message with the server's path replaced by the reference as given."""
    for form in {str(path), str(path.resolve()), path.as_posix()}:
        message = message.replace(form, ref)
    return message.splitlines()[0] if message else message


#: Column names of Binance's headerless kline files (data.binance.vision), in file order.
BINANCE_KLINE_COLUMNS = (
    "open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume",
    "trade_count", "taker_buy_base", "taker_buy_quote", "ignore",
)
_DELIMITERS = (",", ";", "\t", "|")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
#: Names that make a line a header: the time columns and the prices and volume.
_KNOWN_COLUMNS = frozenset({
    "open", "high", "low", "close", "price", "volume", "timestamp_ms", "timestamp",
    "open_time", "unix", "unix_timestamp", "unix timestamp", "datetime", "date", "time",
    "snapped_at",
})


def _fields(line: str, sep: str) -> list[str]:
    try:
        return next(csv.reader([line], delimiter=sep), [])
    except csv.Error:
        return line.split(sep)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _csv_layout(text: str, ref: str) -> tuple[str, int, bool]:
    """How a CSV text is laid out: ``(delimiter, raw line index of the header, has header)``.

    The header is the first of the first three non-blank lines that names a column marginlab
    reads (``timestamp``, ``close``, ...): lines above it are a vendor's title
    (CryptoDataDownload exports start with their URL). Among delimiters the one whose header
    comes first wins, then the one giving more fields, so ``;`` files with decimal commas
    are read by ``;``. Without such a line, a first line of 12 numbers is Binance's
    headerless klines; other numbers-only first lines are refused.
    """
    lines = _LINE_BREAK.split(text, maxsplit=64)[:64]
    candidates = [(i, line) for i, line in enumerate(lines) if line.strip()][:3]
    if not candidates:
        raise DataError(f"{ref}: empty file (expected a header such as "
                        "timestamp,open,high,low,close and at least two rows)")
    best: tuple[int, int, int, str] | None = None
    for order, sep in enumerate(_DELIMITERS):
        for p, (_, line) in enumerate(candidates):
            names = {c.strip().lower() for c in _fields(line, sep)}
            if len(names) >= 2 and names & _KNOWN_COLUMNS:
                key = (p, -len(names), order, sep)
                best = key if best is None or key < best else best
                break
    if best is not None:
        p, _, _, sep = best
        return sep, candidates[p][0], True
    first_index, first = candidates[0]
    sep = max(_DELIMITERS, key=lambda d: (len(_fields(first, d)), -_DELIMITERS.index(d)))
    cells = [c.strip() for c in _fields(first, sep)]
    if len(cells) < 2:
        raise DataError(f"{ref}: one column only; expected columns such as "
                        "timestamp,open,high,low,close separated by , ; tab or |")
    if all(_is_number(c) for c in cells):
        if len(cells) == len(BINANCE_KLINE_COLUMNS):
            return sep, first_index, False
        raise DataValidationError(
            f"{ref}: the first line holds numbers, not column names; add a header line such "
            "as timestamp,open,high,low,close,volume (12-column Binance klines need none)",
            row=1,
        )
    return sep, first_index, True


def _csv_fault(text: str, sep: str, header_index: int, has_header: bool, ncols: int,
               ref: str, exc: Exception) -> DataError:
    """The error for a CSV pandas could not tokenise, located to its data row."""
    body = _LINE_BREAK.split(text)[header_index + int(has_header):]
    reader = csv.reader(body, delimiter=sep, strict=True)
    row = 0
    try:
        for record in reader:
            if not record or not any(cell.strip() for cell in record):
                continue
            row += 1
            if len(record) > ncols:
                return DataValidationError(
                    f"{ref}: {len(record)} fields where the header has {ncols}", row=row,
                    column=None)
    except csv.Error as err:
        return DataValidationError(f"{ref}: unreadable CSV ({err})", row=row + 1)
    return DataError(f"{ref}: cannot read as csv: {str(exc).splitlines()[0] if str(exc) else exc}")


def _read_csv(path: Path, ref: str) -> pd.DataFrame:
    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{ref}: cannot read as gzip: {exc}") from exc
    # Bytes that are not UTF-8 become U+FFFD: in a column that is read the cell is then refused
    # with its row and column, in any other column it does no harm.
    text = raw.decode("utf-8-sig", errors="replace")
    sep, header_index, has_header = _csv_layout(text, ref)
    names = None if has_header else list(BINANCE_KLINE_COLUMNS)
    try:
        with warnings.catch_warnings():
            # A data row longer than the header is a ParserWarning with index_col=False
            # (pandas would otherwise shift every column under an implicit index).
            warnings.simplefilter("error", pd.errors.ParserWarning)
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            frame = pd.read_csv(io.StringIO(text), sep=sep, skiprows=header_index,
                                header=0 if has_header else None, names=names,
                                index_col=False, low_memory=False)
    except Exception as exc:  # pandas' tokenizer errors are many types; all mean a bad file
        ncols = len(_fields(_LINE_BREAK.split(text)[header_index], sep))
        raise _csv_fault(text, sep, header_index, has_header, ncols, ref, exc) from exc
    return frame


def _read_table(path: Path, ref: str) -> pd.DataFrame:
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None and path.name.lower().endswith(".csv.gz"):
        kind = "csv"
    if kind is None:
        raise DataError(f"{ref!r}: unsupported file type (use .csv, .parquet or .feather)")
    if kind == "csv":
        return _read_csv(path, ref)
    try:
        return pd.read_parquet(path) if kind == "parquet" else pd.read_feather(path)
    except Exception as exc:  # pyarrow raises its own types (ArrowInvalid, ...) on bad files
        raise DataError(f"{ref}: cannot read as {kind}: "
                        f"{_without_path(str(exc), path, ref)}") from exc


def _index_as_column(frame: pd.DataFrame) -> pd.DataFrame:
    """A named index (a frame saved with its time as the index) back as a column."""
    names = [n for n in frame.index.names if n is not None]
    if not names or any(str(n) in {str(c) for c in frame.columns} for n in names):
        return frame.reset_index(drop=True)
    return frame.reset_index()


_TIMESTAMP_COLUMNS = (
    "timestamp_ms", "timestamp", "open_time", "unix", "unix_timestamp", "unix timestamp",
    "datetime", "date", "time", "snapped_at",
)
#: The last instant pandas (and so every report) can represent: 2262-04-11, epoch ms.
MAX_TIMESTAMP_MS = int(pd.Timestamp.max.value // 1_000_000)
TimestampUnit = Literal["s", "ms", "us", "ns"]
_UNIT_TO_MS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
_UNIT_INT = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}
# Epoch values tell their unit by magnitude for instants from 1980-01-01 to 2262-04-11: the
# four bands do not overlap (and 20200110, a compact date, falls in none of them).
_EPOCH_1980_S = 315_532_800
_UNIT_BANDS = tuple(
    (unit, _EPOCH_1980_S / (per_ms / 1000.0), MAX_TIMESTAMP_MS / per_ms)
    for unit, per_ms in _UNIT_TO_MS.items()
)
_DECIMAL_COMMA = re.compile(r"^\s*[-+]?\d+,\d+\s*$")
_DAY_MONTH = re.compile(r"^\s*\d{1,2}[/.\-]\d{1,2}[/.\-]\d{2,4}")


def _timestamp_column(frame: pd.DataFrame, ref: str) -> str:
    """The column the bar times are read from (``timestamp_ms`` wins over ``timestamp``)."""
    columns = {str(c).lower(): str(c) for c in frame.columns}
    for name in _TIMESTAMP_COLUMNS:
        if name in columns:
            return columns[name]
    raise DataValidationError(f"{ref}: no timestamp column (timestamp_ms or timestamp)",
                              column="timestamp")


def _numbers(raw: pd.Series) -> FloatArray:
    """The cells as float64, NaN where a cell is not a number."""
    try:
        with np.errstate(all="ignore"):
            out = pd.to_numeric(raw, errors="coerce")
        return np.asarray(pd.Series(out).to_numpy(dtype=np.float64, na_value=np.nan))
    except Exception:  # object cells pandas cannot coerce at all (lists, bytes, ...)
        return np.array([_one_number(x) for x in raw], dtype=np.float64)


def _one_number(cell: object) -> float:
    if isinstance(cell, bool | np.bool_):
        return float("nan")
    try:
        return float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return float("nan")


def _not_numbers(raw: pd.Series) -> str | None:
    """What a column holds when it is not numbers by type (datetimes, booleans, ...)."""
    if pd.api.types.is_bool_dtype(raw):
        return "true/false"
    if pd.api.types.is_datetime64_any_dtype(raw):
        return "date-time"
    if pd.api.types.is_timedelta64_dtype(raw):
        return "duration"
    return None


def _timestamps_ms(
    frame: pd.DataFrame,
    ref: str,
    *,
    rows: IntArray | None = None,
    timestamp_format: str | None = None,
    timestamp_unit: TimestampUnit | None = None,
) -> IntArray:
    """Bar times as epoch ms UTC from the frame's timestamp column (domain.md §1).

    Epoch numbers in s, ms, µs or ns are told apart by magnitude (``timestamp_ms`` is ms),
    unless ``timestamp_unit`` says; text is ISO-8601 (a missing offset is UTC) unless
    ``timestamp_format`` (``strftime`` codes, e.g. ``%d/%m/%Y``) names another format.
    ``rows`` are the 1-based data rows of the frame's rows, for errors.

    Raises:
        DataValidationError: a cell that is no time, an ambiguous day/month date, or an
            instant outside 1970-01-01..2262-04-11; the row and column are named.
    """
    column = _timestamp_column(frame, ref)
    raw = frame[column]
    if rows is None:
        rows = np.arange(1, len(raw) + 1, dtype=np.int64)
    if timestamp_unit is not None and timestamp_unit not in _UNIT_TO_MS:
        raise InvalidParameters(f"timestamp_unit {timestamp_unit!r} is not s, ms, us or ns",
                                field="timestamp_unit")
    if timestamp_format is not None:
        ms, bad = _formatted_ms(raw, timestamp_format)
        reason = f"does not match timestamp_format {timestamp_format!r}"
    elif pd.api.types.is_datetime64_any_dtype(raw):
        ms, bad = _datetimes_ms(raw)
        reason = "is not a time"
    elif (kind := _not_numbers(raw)) is not None:
        raise DataValidationError(f"{ref}: {column} holds {kind} values, not times",
                                  row=int(rows[0]) if len(rows) else None, column=column)
    else:
        numbers = _numbers(raw)
        numeric = pd.api.types.is_numeric_dtype(raw) or (
            np.count_nonzero(np.isfinite(numbers)) * 2 > len(numbers))
        if numeric or timestamp_unit is not None:
            unit = timestamp_unit or ("ms" if column.lower() == "timestamp_ms" else None)
            return _epoch_ms(raw, numbers, unit, ref, column, rows)
        ms, bad = _iso_ms(raw)
        reason = ""
    if bad.size:
        r = int(bad[0])
        cell = raw.iloc[r]
        if not reason:
            reason = ("is ambiguous (day or month first?): name the format, e.g. "
                      "timestamp_format='%d/%m/%Y'" if _DAY_MONTH.match(str(cell)) else
                      "is not ISO-8601 (2021-01-01T00:00:00Z) or an epoch number: "
                      "name its format with timestamp_format")
        raise DataValidationError(f"{ref}: timestamp {_plain(cell)} {reason}",
                                  row=int(rows[r]), column=column)
    _check_range(ms.astype(np.float64), raw, ref, column, rows, "")
    return ms


def _check_range(ms_float: FloatArray, raw: pd.Series, ref: str, column: str,
                 rows: IntArray, unit: str) -> None:
    with np.errstate(invalid="ignore"):
        out = np.flatnonzero(~((ms_float >= 0) & (ms_float <= MAX_TIMESTAMP_MS)))
    if out.size:
        r = int(out[0])
        as_unit = f" as {unit}" if unit else ""
        raise DataValidationError(
            f"{ref}: timestamp {_plain(raw.iloc[r])}{as_unit} is outside 1970-01-01.."
            "2262-04-11 (is timestamp_unit right?)", row=int(rows[r]), column=column)


def _epoch_ms(raw: pd.Series, numbers: FloatArray, unit: TimestampUnit | None, ref: str,
              column: str, rows: IntArray) -> IntArray:
    bad = np.flatnonzero(~np.isfinite(numbers))
    if bad.size:
        r = int(bad[0])
        raise DataValidationError(f"{ref}: timestamp {_plain(raw.iloc[r])} is not a number",
                                  row=int(rows[r]), column=column)
    if unit is None:
        per_ms = np.full(numbers.shape, np.nan)
        for name, low, high in _UNIT_BANDS:
            per_ms[(numbers >= low) & (numbers <= high)] = _UNIT_TO_MS[name]
        bad = np.flatnonzero(np.isnan(per_ms))
        if bad.size:
            r = int(bad[0])
            raise DataValidationError(
                f"{ref}: timestamp {_plain(raw.iloc[r])} is no epoch time in s, ms, us or ns "
                "between 1980 and 2262: give timestamp_unit, or timestamp_format for a "
                "compact date such as 20200110", row=int(rows[r]), column=column)
    else:
        per_ms = np.full(numbers.shape, _UNIT_TO_MS[unit])
    with np.errstate(all="ignore"):
        ms_float = numbers * per_ms
    _check_range(ms_float, raw, ref, column, rows, unit or "")
    if pd.api.types.is_integer_dtype(raw) and not pd.api.types.is_unsigned_integer_dtype(raw):
        # Integers stay exact (ns and µs epochs do not fit a float64 mantissa).
        ints = raw.to_numpy(dtype=np.int64)
        ms: IntArray = np.empty_like(ints)
        for name, (times, per) in _UNIT_INT.items():
            sel = per_ms == _UNIT_TO_MS[name]
            ms[sel] = ints[sel] * times // per
        return ms
    rounded: IntArray = np.floor(ms_float + 0.5).astype(np.int64)
    return rounded


def _iso_ms(raw: pd.Series) -> tuple[IntArray, IntArray]:
    text = raw.astype(str).str.strip().str.replace(r"(?i)\s*(utc|gmt)$", "+00:00", regex=True)
    try:
        parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        parsed = pd.Series([_one_iso(t) for t in text], dtype="datetime64[ns, UTC]")
    return _datetimes_ms(parsed)


def _one_iso(text: str) -> object:
    try:
        return pd.to_datetime(text, utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        return pd.NaT


def _formatted_ms(raw: pd.Series, timestamp_format: str) -> tuple[IntArray, IntArray]:
    text = raw.astype(str).str.strip()
    try:
        parsed = pd.to_datetime(text, utc=True, errors="coerce", format=timestamp_format)
    except (ValueError, TypeError) as exc:
        raise InvalidParameters(f"timestamp_format {timestamp_format!r}: {exc}",
                                field="timestamp_format") from None
    return _datetimes_ms(parsed)


def _datetimes_ms(parsed: pd.Series) -> tuple[IntArray, IntArray]:
    """Epoch ms of a datetime column (naive means UTC) and the rows that are NaT."""
    series = pd.Series(parsed)
    if getattr(series.dt, "tz", None) is not None:
        series = series.dt.tz_convert("UTC").dt.tz_localize(None)
    bad = np.flatnonzero(series.isna().to_numpy())
    # Via datetime64[ms], not [ns]: a coarser column holding year 3000 must not wrap around.
    ms = series.to_numpy(dtype="datetime64[ms]").astype(np.int64)
    return np.asarray(ms, dtype=np.int64), bad


def _float_column(frame: pd.DataFrame, name: str, ref: str,
                  rows: IntArray | None = None) -> FloatArray:
    raw = frame[name]
    if rows is None:
        rows = np.arange(1, len(raw) + 1, dtype=np.int64)
    kind = _not_numbers(raw)
    if kind is not None:
        raise DataValidationError(f"{ref}: {name} holds {kind} values, not numbers",
                                  row=int(rows[0]) if len(rows) else None, column=name)
    values = _numbers(raw)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        r = int(bad[0])
        cell = raw.iloc[r]
        hint = (" (a decimal comma? write the number with a point)"
                if isinstance(cell, str) and _DECIMAL_COMMA.match(cell) else "")
        raise DataValidationError(f"{ref}: {name} is {_plain(cell)}, not a finite number{hint}",
                                  row=int(rows[r]), column=name)
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
    *,
    close_only: bool = False,
    repair_policy: Sequence[str] = (),
    extra: Mapping[str, FloatArray | None] | None = None,
) -> str:
    """sha256 of the normalised bars: int64 ms timestamps, float64 OHLC(V), little-endian.

    A close-only series and a repair policy are part of it (domain.md §1): repaired data
    never shares a fingerprint with strictly loaded data. ``extra`` adds the other series a
    backtest reads on the same bars (``funding``, ``bid_depth``, ``ask_depth``: per-bar arrays),
    so a changed funding or depth file never shares a fingerprint with the old one. Strict
    OHLC bars without extras keep the digest they always had (flags hashed only when set).
    """
    digest = hashlib.sha256(b"marginlab-bars-v1")
    digest.update(np.ascontiguousarray(timestamp_ms, dtype="<i8").tobytes())
    for column in (*prices, *(() if volume is None else (volume,))):
        digest.update(np.ascontiguousarray(column, dtype="<f8").tobytes())
    if close_only:
        digest.update(b"|close-only")
    if repair_policy:
        digest.update(("|repair=" + ",".join(sorted(repair_policy))).encode())
    for name, column in sorted((extra or {}).items()):
        if column is not None:
            digest.update(f"|{name}".encode())
            digest.update(np.ascontiguousarray(column, dtype="<f8").tobytes())
    return digest.hexdigest()


def series_fingerprint(bars: BarSeries) -> str:
    """The fingerprint of everything ``bars`` carries: bars, funding and depth."""
    return fingerprint(
        bars.timestamp_ms, (bars.open, bars.high, bars.low, bars.close), bars.volume,
        close_only=bars.close_only, repair_policy=bars.repair_policy,
        extra={"funding": bars.funding_rate, "bid_depth": bars.bid_depth_usd,
               "ask_depth": bars.ask_depth_usd})


#: Defects an opt-in repair policy may fix (domain.md §1); anything else stays an error.
REPAIR_DEFECTS = ("duplicates", "ohlc-range")


def repair_policy(names: str | Sequence[str] | None, *, field: str = "repair") -> tuple[str, ...]:
    """The repair policy as sorted unique names; ``"a,b"`` and ``["a", "b"]`` alike.

    ``ohlc-range``: an open or close outside [low, high] is clamped into it.
    ``duplicates``: a row equal to an earlier one in every column read is dropped (a
    timestamp repeated with other values stays an error).

    Raises:
        InvalidParameters: an unknown name; ``field`` names where it came from.
    """
    if names is None:
        return ()
    items = names.split(",") if isinstance(names, str) else list(names)
    out = set()
    for item in items:
        if not isinstance(item, str):
            raise InvalidParameters(f"{field}: {_plain(item)} is not a repair name",
                                    field=field)
        name = item.strip().lower()
        if not name:
            continue
        if name not in REPAIR_DEFECTS:
            raise InvalidParameters(
                f"{field}: unknown repair {item.strip()!r} (known: {', '.join(REPAIR_DEFECTS)})",
                field=field)
        out.add(name)
    return tuple(sorted(out))




def _normalised_columns(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Lower-case, stripped column names; ``price`` read as ``close`` where there is none."""
    if not isinstance(frame.index, pd.RangeIndex):
        frame = _index_as_column(frame)
    names = pd.Index([str(c).strip().lower() for c in frame.columns])
    twice = names[names.duplicated()]
    for name in twice:
        if name in _KNOWN_COLUMNS:
            raise DataValidationError(
                f"{source}: two columns are named {name!r} (ignoring case and spaces)",
                column=name)
    frame = frame.set_axis(names, axis=1).loc[:, ~names.duplicated()]
    if "close" not in frame.columns and "price" in frame.columns:
        frame = frame.rename(columns={"price": "close"})
    return frame


def _build(
    frame: pd.DataFrame,
    *,
    instrument: str,
    source: str,
    bar_seconds: int | None,
    timestamp_format: str | None,
    timestamp_unit: TimestampUnit | None,
    repair: tuple[str, ...],
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> BarSeries:
    frame = _normalised_columns(frame, source)
    close_only = not any(name in frame.columns for name in ("open", "high", "low"))
    needed = ("close",) if close_only else PRICE_COLUMNS
    absent = next((name for name in needed if name not in frame.columns), None)
    if absent == "close":
        raise DataValidationError(f"{source}: missing column 'close' (or 'price')",
                                  column="close")
    if absent is not None:
        raise DataValidationError(
            f"{source}: missing column {absent!r} (a close-only series has timestamp and "
            "close only)", column=absent)
    ts_column = _timestamp_column(frame, source)
    rows = np.arange(1, len(frame) + 1, dtype=np.int64)
    ts = _timestamps_ms(frame, source, rows=rows, timestamp_format=timestamp_format,
                        timestamp_unit=timestamp_unit)
    if start_ms is not None or end_ms is not None:
        keep = np.ones(ts.shape[0], dtype=bool)
        if start_ms is not None:
            keep &= ts >= start_ms
        if end_ms is not None:
            keep &= ts < end_ms
        frame, ts, rows = frame.loc[keep], ts[keep], rows[keep]
    if len(frame) < 2:
        raise DataValidationError(
            f"{source}: needs at least two bars, has {len(frame)}", column=ts_column)
    if close_only:
        o = h = lo = c = _float_column(frame, "close", source, rows)
    else:
        o, h, lo, c = (_float_column(frame, name, source, rows) for name in PRICE_COLUMNS)
    volume = _float_column(frame, "volume", source, rows) if "volume" in frame.columns else None
    for name, values in zip(PRICE_COLUMNS, (o, h, lo, c), strict=True):
        bad = np.flatnonzero(values <= 0)
        if bad.size:
            r = int(bad[0])
            raise DataValidationError(f"{source}: {name} must be > 0, is {_plain(values[r])}",
                                      row=int(rows[r]), column=name)
    if volume is not None:
        bad = np.flatnonzero(volume < 0)
        if bad.size:
            r = int(bad[0])
            raise DataValidationError(f"{source}: volume must be >= 0, is {_plain(volume[r])}",
                                      row=int(rows[r]), column="volume")
    repairs: list[Repair] = []
    columns = [ts, o, h, lo, c] + ([] if volume is None else [volume])
    if "duplicates" in repair:
        keep, dropped = _exact_duplicates(columns, rows)
        repairs += dropped
        ts, o, h, lo, c, rows = ts[keep], o[keep], h[keep], lo[keep], c[keep], rows[keep]
        volume = None if volume is None else volume[keep]
    steps = np.diff(ts)
    newest_first = bool(steps.size) and bool(np.all(steps < 0))
    if newest_first:
        # Strictly decreasing is unambiguous: the vendor wrote newest first (CryptoDataDownload).
        ts, o, h, lo, c, rows = ts[::-1], o[::-1], h[::-1], lo[::-1], c[::-1], rows[::-1]
        volume = None if volume is None else volume[::-1]
        steps = np.diff(ts)
    bad = np.flatnonzero(steps <= 0)
    if bad.size:
        r = int(bad[0]) + 1
        what = ("duplicate timestamp (repair 'duplicates' drops only rows equal in every "
                "column)" if steps[r - 1] == 0 else "out-of-order (not increasing) timestamp; a "
                "newest-first file loads when it is strictly decreasing throughout")
        raise DataValidationError(f"{source}: {what}", row=int(rows[r]), column=ts_column)
    bad = np.flatnonzero(h < lo)
    if bad.size:
        r = int(bad[0])
        raise DataValidationError(f"{source}: high {_plain(h[r])} < low {_plain(lo[r])}",
                                  row=int(rows[r]), column="high")
    fixed = {}
    for name, values in (("open", o), ("close", c)):
        bad = np.flatnonzero((values < lo) | (values > h))
        if bad.size and "ohlc-range" not in repair:
            r = int(bad[0])
            raise DataValidationError(
                f"{source}: {name} {_plain(values[r])} outside [low {_plain(lo[r])}, high "
                f"{_plain(h[r])}] (repair 'ohlc-range' clamps it)", row=int(rows[r]),
                column=name)
        clamped = np.clip(values, lo, h)
        for i in bad:
            side = "high" if values[i] > h[i] else "low"
            repairs.append(Repair(
                row=int(rows[i]), timestamp_ms=int(ts[i]), defect="ohlc-range", column=name,
                before=float(values[i]), after=float(clamped[i]),
                change=f"{name} {_plain(values[i])} -> {_plain(clamped[i])} ({side})"))
        fixed[name] = clamped if bad.size else values
    o, c = fixed["open"], fixed["close"]
    freq = bar_seconds or infer_bar_seconds(ts)
    if freq <= 0:
        raise DataValidationError(
            f"{source}: bars less than a second apart; cannot infer a bar frequency",
            column=ts_column)
    return BarSeries(
        instrument=instrument,
        timestamp_ms=ts,
        open=o,
        high=h,
        low=lo,
        close=c,
        volume=volume,
        bar_seconds=freq,
        fingerprint=fingerprint(ts, (o, h, lo, c), volume, close_only=close_only,
                                repair_policy=repair),
        source=source,
        gaps=find_gaps(ts, freq),
        close_only=close_only,
        newest_first=newest_first,
        repair_policy=repair,
        repairs=tuple(sorted(repairs, key=lambda x: (x.row, x.column or ""))),
    )


def _exact_duplicates(columns: list[np.ndarray], rows: IntArray) -> tuple[np.ndarray,
                                                                           list[Repair]]:
    """Rows equal to an earlier row in every column read: (rows to keep, their repairs)."""
    table = pd.DataFrame({str(i): col for i, col in enumerate(columns)})
    dup = table.duplicated(keep="first").to_numpy()
    if not dup.any():
        return ~dup, []
    group = table.groupby(list(table.columns), sort=False).ngroup().to_numpy()
    first_of: dict[int, int] = {}
    for i, g in enumerate(group):
        first_of.setdefault(int(g), i)
    ts = columns[0]
    dropped = [
        Repair(row=int(rows[i]), timestamp_ms=int(ts[i]), defect="duplicates", column=None,
               before=None, after=None,
               change=f"dropped: same as row {int(rows[first_of[int(group[i])]])}")
        for i in np.flatnonzero(dup)
    ]
    return ~dup, dropped


def bars_from_frame(
    frame: pd.DataFrame,
    *,
    instrument: str,
    source: str = "<frame>",
    bar_seconds: int | None = None,
    timestamp_format: str | None = None,
    timestamp_unit: TimestampUnit | None = None,
    repair: str | Sequence[str] | None = (),
) -> BarSeries:
    """Validate a frame of bars and build a ``BarSeries`` (domain.md §1).

    Columns (any case): a timestamp (``timestamp_ms``, ``timestamp``, ``open_time``,
    ``unix``, ``date``, ...), ``open, high, low, close`` (or ``price``) and optional
    ``volume``. Without open/high/low the series is close-only (``close_only``): open, high
    and low are the close. Bars listed strictly newest first are reversed
    (``newest_first``).

    Args:
        frame: one row per bar.
        instrument: the name to report.
        source: the reference to name in errors (never a server path).
        bar_seconds: the bar frequency; default the most common step.
        timestamp_format: ``strftime`` format of text timestamps that are not ISO-8601
            (e.g. ``%d/%m/%Y`` for ``01/10/2020`` as 1 October); ambiguous dates are
            refused without it.
        timestamp_unit: ``s``, ``ms``, ``us`` or ``ns`` for epoch numbers; default told by
            magnitude (for instants from 1980), ``ms`` for a ``timestamp_ms`` column.
        repair: opt-in repairs (:data:`REPAIR_DEFECTS`); each change is listed in
            ``repairs`` and the policy enters the fingerprint.

    Raises:
        DataValidationError: a missing column, a non-finite or non-positive price, high < low,
            open/close outside [low, high] (unless repaired), negative volume, timestamps that
            are unreadable, out of range or not strictly increasing; the message names the
            1-based data row and the column.
        InvalidParameters: an unknown repair name, timestamp unit or an invalid format.
    """
    return _build(frame, instrument=instrument, source=source, bar_seconds=bar_seconds,
                  timestamp_format=timestamp_format, timestamp_unit=timestamp_unit,
                  repair=repair_policy(repair))


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
    timestamp_format: str | None = None,
    timestamp_unit: TimestampUnit | None = None,
    repair: str | Sequence[str] | None = (),
) -> BarSeries:
    """Load, validate and fingerprint the bars a reference names.

    CSV files may use ``,`` ``;`` tab or ``|``, carry a vendor's title line above the
    header, or be Binance's headerless 12-column klines; Parquet and Feather load as they
    are. Everything else is as :func:`bars_from_frame`.

    Args:
        ref: path relative to ``root``.
        root: the data root.
        instrument: the name to report; default from the file name.
        start_ms, end_ms: keep bars with ``start_ms <= timestamp < end_ms`` (epoch ms UTC),
            applied before validation so a known bad tail (LUNA after the halt) can be cut.
        timestamp_format, timestamp_unit, repair: as :func:`bars_from_frame`.
    """
    policy = repair_policy(repair)
    path = resolve_ref(ref, root)
    frame = _read_table(path, ref)
    return _build(frame, instrument=instrument or instrument_from_ref(ref), source=ref,
                  bar_seconds=None, timestamp_format=timestamp_format,
                  timestamp_unit=timestamp_unit, repair=policy, start_ms=start_ms,
                  end_ms=end_ms)


def load_funding(ref: str, *, root: str | os.PathLike[str]) -> pd.DataFrame:
    """Funding settlements as a frame ``timestamp_ms, funding_rate`` (decimal per settlement).

    Columns: ``funding_rate`` (decimal) or ``funding_rate_pct`` (percent, divided by 100).
    """
    path = resolve_ref(ref, root)
    frame = _normalised_columns(_read_table(path, ref), ref)
    ts = _timestamps_ms(frame, ref)
    if "funding_rate" in frame.columns:
        rate = _float_column(frame, "funding_rate", ref)
    elif "funding_rate_pct" in frame.columns:
        rate = _float_column(frame, "funding_rate_pct", ref) / 100.0
    else:
        raise DataValidationError(f"{ref}: no funding_rate or funding_rate_pct column",
                                  column="funding_rate")
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
    out = replace(bars, funding_rate=per_bar, _cache={})
    return replace(out, fingerprint=series_fingerprint(out))


def load_book_depth(
    ref: str, *, root: str | os.PathLike[str], band_pct: float = 1.0
) -> pd.DataFrame:
    """Binance ``bookDepth`` snapshots as ``timestamp_ms, bid_depth_usd, ask_depth_usd``.

    The depth of a side is the notional within ``band_pct`` percent of the mid price
    (``percentage = -band_pct`` for bids, ``+band_pct`` for asks). How long a snapshot
    stays usable is :func:`with_depth`'s ``max_staleness_seconds``.
    """
    path = resolve_ref(ref, root)
    frame = _normalised_columns(_read_table(path, ref), ref)
    for name in ("timestamp", "percentage", "notional"):
        if name not in frame.columns:
            raise DataValidationError(f"{ref}: missing column {name!r}", column=name)
    frame = frame.assign(timestamp_ms=_timestamps_ms(frame, ref),
                         percentage=_numbers(frame["percentage"]),
                         notional=_float_column(frame, "notional", ref))
    bids = frame[frame["percentage"] == -band_pct].groupby("timestamp_ms")["notional"].last()
    asks = frame[frame["percentage"] == band_pct].groupby("timestamp_ms")["notional"].last()
    out = pd.concat({"bid_depth_usd": bids, "ask_depth_usd": asks}, axis=1).dropna()
    if out.empty:
        raise DataValidationError(f"{ref}: no snapshot has the ±{band_pct:g}% bands",
                                  column="percentage")
    return out.sort_index().reset_index()


#: How old a depth snapshot may be and still stand for the book at a bar's open: Binance
#: publishes bookDepth about every 30 s, so 5 minutes tolerates ten missed snapshots (a
#: short outage of the feed), while a book older than that is not the one a liquidation
#: would meet in a fast market (the 2025-10-10 crash moved BTC 7% within 20 minutes).
DEFAULT_DEPTH_STALENESS_SECONDS = 300


def with_depth(
    bars: BarSeries,
    depth: pd.DataFrame,
    *,
    max_staleness_seconds: float = DEFAULT_DEPTH_STALENESS_SECONDS,
) -> BarSeries:
    """``bars`` with the latest depth snapshot taken at or before each bar's open.

    A snapshot is carried forward at most ``max_staleness_seconds`` (domain.md §1): a bar
    whose latest snapshot is older gets NaN depth and is counted in ``depth_stale_bars``;
    bars before the first snapshot get NaN too. Consumers fall back to volume (ADV) on NaN.

    Raises:
        InvalidParameters: a negative or non-finite ``max_staleness_seconds``.
    """
    if not max_staleness_seconds >= 0:  # NaN fails too; inf carries snapshots forever
        raise InvalidParameters(
            f"max_staleness_seconds must be >= 0, is {_plain(max_staleness_seconds)}",
            field="max_staleness_seconds")
    ts = depth["timestamp_ms"].to_numpy(dtype=np.int64)
    order = np.argsort(ts, kind="stable")
    ts = ts[order]
    idx = np.searchsorted(ts, bars.timestamp_ms, side="right") - 1
    known = idx >= 0
    age_ms = np.where(known, bars.timestamp_ms - ts[np.maximum(idx, 0)], 0)
    fresh = known & (age_ms <= max_staleness_seconds * 1000.0)
    out = {}
    for name in ("bid_depth_usd", "ask_depth_usd"):
        values = depth[name].to_numpy(dtype=np.float64)[order]
        column = np.full(len(bars), np.nan)
        column[fresh] = values[idx[fresh]]
        out[name] = column
    result = replace(bars, bid_depth_usd=out["bid_depth_usd"],
                     ask_depth_usd=out["ask_depth_usd"], depth_stale=known & ~fresh, _cache={})
    return replace(result, fingerprint=series_fingerprint(result))


def _subset(bars: BarSeries, keep: np.ndarray | slice) -> BarSeries:
    def pick(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[keep]

    ts = bars.timestamp_ms[keep]
    o, h, lo, c = bars.open[keep], bars.high[keep], bars.low[keep], bars.close[keep]
    volume = pick(bars.volume)
    kept = set(ts.tolist()) if bars.repairs else set()
    return replace(
        bars, timestamp_ms=ts, open=o, high=h, low=lo, close=c, volume=volume,
        funding_rate=pick(bars.funding_rate), bid_depth_usd=pick(bars.bid_depth_usd),
        ask_depth_usd=pick(bars.ask_depth_usd), depth_stale=pick(bars.depth_stale),
        fingerprint=fingerprint(ts, (o, h, lo, c), volume, close_only=bars.close_only,
                                repair_policy=bars.repair_policy,
                                extra={"funding": pick(bars.funding_rate),
                                       "bid_depth": pick(bars.bid_depth_usd),
                                       "ask_depth": pick(bars.ask_depth_usd)}),
        gaps=find_gaps(ts, bars.bar_seconds),
        repairs=tuple(r for r in bars.repairs if r.timestamp_ms in kept), _cache={},
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
    stale = None if bars.depth_stale is None else bars.depth_stale[starts]
    return BarSeries(
        instrument=bars.instrument, timestamp_ms=ts, open=o, high=h, low=lo, close=c,
        volume=volume, funding_rate=funding, bid_depth_usd=bid, ask_depth_usd=ask,
        bar_seconds=bar_seconds,
        fingerprint=fingerprint(ts, (o, h, lo, c), volume, close_only=bars.close_only,
                                repair_policy=bars.repair_policy,
                                extra={"funding": funding, "bid_depth": bid, "ask_depth": ask}),
        source=f"{bars.source}@{bar_seconds}s", gaps=find_gaps(ts, bar_seconds),
        close_only=bars.close_only, newest_first=bars.newest_first,
        repair_policy=bars.repair_policy, repairs=bars.repairs, depth_stale=stale,
    )


def parse_duration_seconds(text: str) -> int:
    """``"1m"`` → 60, ``"4h"`` → 14400, ``"1d"`` → 86400, ``"90s"`` → 90 (as
    ``horizon.parse_duration``, raising the data error the CLI's data options expect)."""

    try:
        return parse_duration(text)
    except InvalidParameters:
        raise DataError(f"not a duration: {text!r} (use e.g. 90s, 5m, 4h, 1d)") from None
