"""Binance's public kline archives (data.binance.vision) → validated bars files.

For a symbol, market (``spot`` or ``um`` = USD-M futures), bar interval and inclusive day range,
:func:`fetch_binance` downloads the monthly archives of the whole months and the daily archives
of the rest (a missing monthly archive — the current month is published only when it ends —
falls back to its daily ones), verifies each zip against its ``.CHECKSUM`` sibling, parses the
kline CSVs (with or without a header row, ``open_time`` in epoch ms or — spot from 2025-01-01 —
µs), concatenates and de-duplicates them, validates the bars with
:func:`calibration.data.bars_from_frame` (bad rows refused, gaps reported, never filled) and
writes, atomically, under the data root::

    binance/{market}/{SYMBOL}_{interval}_{start}_{end}.csv           bars, ../shared/data layout
    binance/{market}/{SYMBOL}_{interval}_{start}_{end}_funding.csv   um funding (on request)

The transport is injectable (:class:`ArchiveClient`: base URL and an ``opener`` callable), so
tests serve a local mirror. Errors::

    MarginlabError
    ├── FetchError (OSError)        no archive for the whole range, a checksum mismatch, a bad
    │                               zip or CSV, an HTTP error other than 404, retries exhausted
    ├── DataValidationError         a bad row in an archive (archive, row and column named)
    └── InvalidParameters           unknown interval or market, bad symbol, start after end
"""

from __future__ import annotations

import calendar
import hashlib
import io
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from http.client import HTTPException
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calibration._bars import BarSeries, Gap
from calibration._defaults import BINANCE_BASE_URL, INTERVALS
from calibration._errors import DataError, DataValidationError, InvalidParameters, MarginlabError
from calibration._version import ENGINE_VERSION
from calibration.data import bars_from_frame

__all__ = [
    "BARS_COLUMNS",
    "BINANCE_BASE_URL",
    "FUNDING_COLUMNS",
    "INTERVALS",
    "MARKETS",
    "Archive",
    "ArchiveClient",
    "FetchError",
    "FetchReport",
    "Opener",
    "fetch_binance",
    "funding_archives",
    "kline_archives",
    "parse_funding",
    "parse_klines",
    "urllib_opener",
]

#: Market → its directory in the archive.
MARKETS: dict[str, str] = {"spot": "spot", "um": "futures/um"}
KLINE_COLUMNS = (
    "open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume",
    "count", "taker_buy_volume", "taker_buy_quote_volume", "ignore",
)
BARS_COLUMNS = (
    "timestamp_ms", "timestamp", "open", "high", "low", "close", "volume", "quote_volume",
    "trade_count",
)
FUNDING_COLUMNS = ("timestamp_ms", "timestamp", "funding_rate")

_DAY_MS = 86_400_000
# Epoch µs exceed this from 1973 on, epoch ms only after the year 5000.
_MICROS_FROM = 10**14
_SYMBOL = re.compile(r"[A-Z0-9]{2,30}(?:_[0-9]{6})?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RETRY_STATUSES = frozenset({429})


class FetchError(MarginlabError, OSError):
    """Archives that could not be downloaded or used: nothing found for the whole range, a
    checksum mismatch, a corrupt zip or CSV, an HTTP error other than 404, or retries exhausted
    on 5xx/timeouts."""


#: ``opener(url, timeout_seconds) -> body``. Raises ``urllib.error.HTTPError`` for an HTTP error
#: status (404 = no such archive) and ``OSError`` (``URLError``, ``TimeoutError``) for a
#: transport failure.
Opener = Callable[[str, float], bytes]


def urllib_opener(url: str, timeout_seconds: float) -> bytes:
    """GET ``url`` with the standard library; the default :data:`Opener`."""
    request = urllib.request.Request(url, headers={"User-Agent": f"marginlab/{ENGINE_VERSION}"})
    with urllib.request.urlopen(request, timeout=timeout_seconds) as response:
        body: bytes = response.read()
    return body


@dataclass(frozen=True, kw_only=True)
class ArchiveClient:
    """Where archives are fetched from and how hard to try.

    Attributes:
        base_url: the archive root (``.../data/``), http or https.
        opener: the transport (default :func:`urllib_opener`).
        timeout_seconds: per request.
        retries: extra attempts after a 5xx, 429, timeout or connection failure.
        backoff_seconds: wait before the first retry, doubled before each further one.
    """

    base_url: str = BINANCE_BASE_URL
    opener: Opener | None = None
    timeout_seconds: float = 30.0
    retries: int = 3
    backoff_seconds: float = 1.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidParameters(
                f"base URL must be an http(s) URL, got {self.base_url!r}", field="base_url")
        if not self.timeout_seconds > 0:
            raise InvalidParameters("timeout_seconds must be > 0", field="timeout_seconds")
        if self.retries < 0:
            raise InvalidParameters("retries must be >= 0", field="retries")
        if not self.backoff_seconds >= 0:
            raise InvalidParameters("backoff_seconds must be >= 0", field="backoff_seconds")

    def url(self, path: str) -> str:
        """The URL of an archive path (relative to the base URL)."""
        return self.base_url.rstrip("/") + "/" + path

    def get(self, path: str) -> bytes | None:
        """The body at ``path``, or ``None`` when the server answers 404.

        Raises:
            FetchError: another 4xx, or a 5xx/429/timeout/connection failure on every attempt.
        """
        opener = self.opener or urllib_opener
        url = self.url(path)
        problem = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            try:
                return opener(url, self.timeout_seconds)
            except urllib.error.HTTPError as exc:
                exc.close()  # it holds the response's socket
                if exc.code == 404:
                    return None
                if exc.code < 500 and exc.code not in _RETRY_STATUSES:
                    raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
                problem = f"HTTP {exc.code} {exc.reason}"
            except urllib.error.URLError as exc:
                problem = str(exc.reason)
            except (OSError, HTTPException) as exc:  # timeouts, resets, truncated bodies
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise FetchError(f"{url}: {problem} (gave up after {self.retries + 1} attempts)")


@dataclass(frozen=True)
class Archive:
    """One zip of the archive.

    Attributes:
        path: relative to the base URL (``spot/daily/klines/BTCUSDT/1m/BTCUSDT-1m-2024-08-04.zip``).
        first_day, last_day: the days it covers (inclusive).
    """

    path: str
    first_day: date
    last_day: date

    @property
    def name(self) -> str:
        """The file name (``BTCUSDT-1m-2024-08-04.zip``)."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def monthly(self) -> bool:
        """Whether this is a monthly archive."""
        return "/monthly/" in self.path


def _month_last(day: date) -> date:
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


def _months(start: date, end: date) -> list[date]:
    """First days of the months that [start, end] touches."""
    out = []
    month = start.replace(day=1)
    while month <= end:
        out.append(month)
        month = _month_last(month) + timedelta(days=1)
    return out


def _daily(symbol: str, market: str, interval: str, first: date, last: date) -> list[Archive]:
    base = f"{MARKETS[market]}/daily/klines/{symbol}/{interval}/{symbol}-{interval}"
    days = (last - first).days + 1
    return [
        Archive(f"{base}-{d.isoformat()}.zip", d, d)
        for d in (first + timedelta(days=i) for i in range(days))
    ]


def kline_archives(symbol: str, market: str, interval: str, start: date, end: date
                   ) -> list[Archive]:
    """The archives covering [start, end]: monthly for whole months, daily for the rest."""
    out: list[Archive] = []
    for month in _months(start, end):
        first, last = max(start, month), min(end, _month_last(month))
        if first == month and last == _month_last(month):
            path = (f"{MARKETS[market]}/monthly/klines/{symbol}/{interval}/"
                    f"{symbol}-{interval}-{month:%Y-%m}.zip")
            out.append(Archive(path, first, last))
        else:
            out.extend(_daily(symbol, market, interval, first, last))
    return out


def funding_archives(symbol: str, start: date, end: date) -> list[Archive]:
    """The USD-M monthly funding-rate archives of the months [start, end] touches."""
    return [
        Archive(f"futures/um/monthly/fundingRate/{symbol}/{symbol}-fundingRate-{m:%Y-%m}.zip",
                m, _month_last(m))
        for m in _months(start, end)
    ]


def _has_header(raw: bytes) -> bool:
    return not raw.lstrip()[:1].isdigit()


def _read_csv(raw: bytes, name: str, names: Sequence[str], header: bool) -> pd.DataFrame:
    try:
        return pd.read_csv(io.BytesIO(raw), header=None, names=list(names),
                           skiprows=1 if header else 0)
    except pd.errors.EmptyDataError:
        return pd.DataFrame({c: pd.Series(dtype=np.float64) for c in names})
    except (ValueError, pd.errors.ParserError) as exc:
        raise FetchError(f"{name}: not a CSV in Binance's format: {exc}".splitlines()[0]
                         ) from None


def _epoch_ms(raw: pd.Series[Any], name: str, column: str) -> np.ndarray:
    """Epoch ms from a column of epoch ms or µs (spot archives from 2025-01-01 use µs)."""
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        raise DataValidationError(f"{name}: {column} is {raw.iloc[row]!r}, not an epoch time",
                                  row=row + 1, column=column)
    stamps = values.astype(np.int64)
    return np.where(stamps >= _MICROS_FROM, stamps // 1000, stamps)


def parse_klines(raw: bytes, name: str) -> pd.DataFrame:
    """A kline CSV as ``timestamp_ms, open, high, low, close, volume, quote_volume,
    trade_count`` (prices unvalidated: :func:`bars_from_frame` does that).

    Accepts files with and without the header row, ``open_time`` in epoch ms or µs.
    """
    frame = _read_csv(raw, name, KLINE_COLUMNS, _has_header(raw))
    return pd.DataFrame({
        "timestamp_ms": _epoch_ms(frame["open_time"], name, "open_time"),
        "open": frame["open"], "high": frame["high"], "low": frame["low"],
        "close": frame["close"], "volume": frame["volume"],
        "quote_volume": frame["quote_volume"], "trade_count": frame["count"],
    })


def parse_funding(raw: bytes, name: str) -> pd.DataFrame:
    """A funding-rate CSV (``calc_time, funding_interval_hours, last_funding_rate``) as
    ``timestamp_ms, funding_rate`` (decimal per settlement).

    Raises:
        DataValidationError: a time or rate that is not a finite number.
    """
    columns: tuple[str, ...] = ("calc_time", "funding_interval_hours", "last_funding_rate")
    header = _has_header(raw)
    if header:
        first = raw.lstrip().split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        columns = tuple(c.strip().lower() for c in first.split(","))
        for needed in ("calc_time", "last_funding_rate"):
            if needed not in columns:
                raise FetchError(f"{name}: no {needed!r} column in the header {first!r}")
    frame = _read_csv(raw, name, columns, header)
    rate = pd.to_numeric(frame["last_funding_rate"], errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(rate))
    if bad.size:
        row = int(bad[0])
        raise DataValidationError(
            f"{name}: last_funding_rate is {frame['last_funding_rate'].iloc[row]!r}, "
            "not a finite number", row=row + 1, column="last_funding_rate")
    return pd.DataFrame({"timestamp_ms": _epoch_ms(frame["calc_time"], name, "calc_time"),
                         "funding_rate": rate})


@dataclass(frozen=True)
class FetchReport:
    """What :func:`fetch_binance` wrote.

    Attributes:
        symbol, market, interval, start, end: the request (days inclusive, UTC).
        bars_ref: the bars file, relative to the data root.
        rows: bars written.
        fingerprint: the bars' fingerprint (what ``load_bars(bars_ref)`` reports).
        first_ms, last_ms: open times of the first and last bar (epoch ms UTC).
        gaps: holes between the first and the last bar, reported, not filled.
        archives: the archives used, by file name.
        missing: archive paths the server does not have (404) and nothing replaced.
        unverified: archives used without a ``.CHECKSUM`` to verify them against.
        funding_ref: the funding file relative to the data root, if one was written.
        funding_rows: settlements written.
    """

    symbol: str
    market: str
    interval: str
    start: date
    end: date
    bars_ref: str
    rows: int
    fingerprint: str
    first_ms: int
    last_ms: int
    gaps: tuple[Gap, ...]
    archives: tuple[str, ...]
    missing: tuple[str, ...]
    unverified: tuple[str, ...]
    funding_ref: str | None = None
    funding_rows: int = 0

    @property
    def missing_bars(self) -> int:
        """Bars missing in the gaps."""
        return sum(g.missing_bars for g in self.gaps)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (dates ISO, gaps as objects)."""
        return {
            "symbol": self.symbol, "market": self.market, "interval": self.interval,
            "start": self.start.isoformat(), "end": self.end.isoformat(),
            "bars_ref": self.bars_ref, "rows": self.rows, "fingerprint": self.fingerprint,
            "first_ms": self.first_ms, "last_ms": self.last_ms,
            "gaps": [{"after_row": g.after_row, "start_ms": g.start_ms,
                      "missing_bars": g.missing_bars} for g in self.gaps],
            "missing_bars": self.missing_bars, "archives": list(self.archives),
            "missing": list(self.missing), "unverified": list(self.unverified),
            "funding_ref": self.funding_ref, "funding_rows": self.funding_rows,
        }


Progress = Callable[[int, int, str], None]


class _Downloader:
    """Downloads, verifies and unzips archives, remembering what was missing or unverified."""

    def __init__(self, client: ArchiveClient, progress: Progress | None) -> None:
        self.client = client
        self.progress = progress
        self.missing: list[str] = []
        self.unverified: list[str] = []
        self.used: list[str] = []
        self.done = 0
        self.total = 0

    def csv(self, archive: Archive) -> bytes | None:
        """The CSV inside ``archive``, or ``None`` (recorded as missing) on a 404."""
        data = self.client.get(archive.path)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, archive.name)
        if data is None:
            self.missing.append(archive.path)
            return None
        checksum = self.client.get(archive.path + ".CHECKSUM")
        if checksum is None:
            self.unverified.append(archive.name)
        else:
            fields = checksum.decode("ascii", "replace").split()
            expected = fields[0].lower() if fields else ""
            if not _SHA256.fullmatch(expected):
                raise FetchError(f"{archive.name}.CHECKSUM: no sha256 in {checksum[:80]!r}")
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise FetchError(f"{archive.name}: checksum mismatch (sha256 {actual}, "
                                 f".CHECKSUM says {expected}); the download is corrupt")
        self.used.append(archive.name)
        return _unzip(data, archive.name)


def _unzip(data: bytes, name: str) -> bytes:
    member = name.removesuffix(".zip") + ".csv"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
            if member not in names:
                if len(names) != 1:
                    raise FetchError(f"{name}: expected {member} inside, found {names}")
                member = names[0]
            return zf.read(member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise FetchError(f"{name}: not a valid zip archive ({exc})") from None


def _iso(ms: np.ndarray) -> pd.Index[str]:
    return pd.to_datetime(ms, unit="ms", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ")


def _day_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def _combine(parts: list[tuple[str, pd.DataFrame]], start_ms: int, end_ms: int,
             what: str) -> pd.DataFrame:
    """Concatenate archives' rows, keep [start_ms, end_ms), sort by time, drop repeats.

    Each row keeps ``_archive`` and ``_row`` (1-based data row in its archive) so a bad row can
    be named where it came from. A time that repeats with different values is refused: which
    copy is right cannot be told.
    """
    frames = [f.assign(_archive=name, _row=np.arange(1, len(f) + 1)) for name, f in parts]
    frame = pd.concat(frames, ignore_index=True)
    frame = frame[(frame["timestamp_ms"] >= start_ms) & (frame["timestamp_ms"] < end_ms)]
    frame = frame.sort_values("timestamp_ms", kind="mergesort").reset_index(drop=True)
    values = [c for c in frame.columns if not c.startswith("_")]
    repeated = frame.duplicated("timestamp_ms")
    conflicting = repeated & ~frame.duplicated(values)
    if conflicting.any():
        r = int(np.flatnonzero(conflicting.to_numpy())[0])
        stamp = int(frame["timestamp_ms"].iloc[r])
        first = int(np.flatnonzero(frame["timestamp_ms"].to_numpy() == stamp)[0])
        where = [f"{frame['_archive'].iloc[i]} row {frame['_row'].iloc[i]}" for i in (first, r)]
        raise DataValidationError(
            f"{what}: the {what} at {_iso(np.array([stamp]))[0]} differ between {where[0]} "
            f"and {where[1]}", column="timestamp_ms")
    return frame[~repeated].reset_index(drop=True)


def _write_atomic(path: Path, frame: pd.DataFrame,
                  check: Callable[[Path], None] | None = None) -> None:
    """Write ``frame`` as CSV to a temporary file next to ``path``, ``check`` it, and rename it
    into place: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            frame.to_csv(handle, index=False)
        if check is not None:
            check(tmp)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _bars(parts: list[tuple[str, pd.DataFrame]], start: date, end: date, symbol: str,
          bar_seconds: int, ref: str) -> tuple[pd.DataFrame, BarSeries]:
    frame = _combine(parts, _day_ms(start), _day_ms(end) + _DAY_MS, "bars")
    out = frame.assign(timestamp=_iso(frame["timestamp_ms"].to_numpy()))[list(BARS_COLUMNS)]
    try:
        bars = bars_from_frame(out, instrument=symbol, source=ref, bar_seconds=bar_seconds)
    except DataValidationError as exc:
        if exc.row is None:
            raise
        origin = frame.iloc[exc.row - 1]
        # Name the archive row at fault, not the row of the file that was never written.
        text = str(exc).removeprefix(f"{ref}: ").rsplit(" (row ", 1)[0]
        raise DataValidationError(f"{origin['_archive']}: {text}", row=int(origin["_row"]),
                                  column=exc.column) from None
    return out, bars


def fetch_binance(
    symbol: str,
    *,
    interval: str,
    start: date,
    end: date,
    root: str | os.PathLike[str],
    market: str = "spot",
    funding: bool = False,
    client: ArchiveClient | None = None,
    progress: Progress | None = None,
) -> FetchReport:
    """Download Binance's kline archives for ``[start, end]`` into a bars file under ``root``.

    Args:
        symbol: the Binance symbol (``BTCUSDT``; case-insensitive).
        interval: bar interval, a key of :data:`INTERVALS` (``1m``, ``5m``, ``1h``, ``1d``...).
        start, end: first and last day (UTC, inclusive).
        root: the data root; files go to ``binance/{market}/``.
        market: ``spot`` or ``um`` (USD-M futures).
        funding: also fetch the funding rates (``um`` only) into ``..._funding.csv``.
        client: where from and how (default: data.binance.vision, 3 retries).
        progress: called ``(done, total, archive name)`` after each archive.

    Raises:
        InvalidParameters: a bad symbol, interval, market or range; funding for spot.
        FetchError: no kline archive for the whole range, or a download that failed or was
            corrupt (see :class:`FetchError`).
        DataValidationError: a bad row in an archive (naming the archive, row and column).
    """
    symbol = symbol.strip().upper()
    if not _SYMBOL.fullmatch(symbol):
        raise InvalidParameters(f"not a Binance symbol: {symbol!r} (e.g. BTCUSDT)",
                                field="symbol")
    if interval not in INTERVALS:
        raise InvalidParameters(
            f"unknown interval {interval!r} (use one of {', '.join(INTERVALS)})",
            field="interval")
    if market not in MARKETS:
        raise InvalidParameters(f"unknown market {market!r} (use spot or um)", field="market")
    if start > end:
        raise InvalidParameters(f"start {start} is after end {end}", field="start")
    if funding and market != "um":
        raise InvalidParameters("funding rates exist for the um (USD-M futures) market only",
                                field="funding")
    client = client or ArchiveClient()
    stem = f"binance/{market}/{symbol}_{interval}_{start.isoformat()}_{end.isoformat()}"
    bars_ref = f"{stem}.csv"
    plan = kline_archives(symbol, market, interval, start, end)
    fund_plan = funding_archives(symbol, start, end) if funding else []
    down = _Downloader(client, progress)
    down.total = len(plan) + len(fund_plan)

    parts: list[tuple[str, pd.DataFrame]] = []
    queue = list(plan)
    while queue:
        archive = queue.pop(0)
        raw = down.csv(archive)
        if raw is not None:
            parts.append((archive.name, parse_klines(raw, archive.name)))
        elif archive.monthly:
            # Not published (yet): the month's daily archives may be.
            down.missing.pop()
            daily = _daily(symbol, market, interval, archive.first_day, archive.last_day)
            down.total += len(daily)
            queue[:0] = daily
    if not parts:
        raise FetchError(
            f"no {interval} kline archive of {symbol} ({market}) for {start}..{end} under "
            f"{client.base_url} (all {len(down.missing)} missing): check the symbol, market "
            "and dates")
    out, bars = _bars(parts, start, end, symbol, INTERVALS[interval], bars_ref)

    fund_parts: list[tuple[str, pd.DataFrame]] = []
    for archive in fund_plan:
        raw = down.csv(archive)
        if raw is not None:
            fund_parts.append((archive.name, parse_funding(raw, archive.name)))
    fund_out: pd.DataFrame | None = None
    if fund_parts:
        rates = _combine(fund_parts, _day_ms(start), _day_ms(end) + _DAY_MS, "funding rates")
        if len(rates):
            fund_out = rates.assign(timestamp=_iso(rates["timestamp_ms"].to_numpy()))[
                list(FUNDING_COLUMNS)]

    def same_bars(path: Path) -> None:
        # What lands on disk must be what was validated: read it back before renaming.
        written = bars_from_frame(pd.read_csv(path), instrument=symbol, source=bars_ref,
                                  bar_seconds=INTERVALS[interval])
        if written.fingerprint != bars.fingerprint:  # pragma: no cover - float round trip
            raise DataError(f"{bars_ref}: the written bars differ from the downloaded ones")

    root_path = Path(root)
    _write_atomic(root_path / bars_ref, out, same_bars)
    funding_ref = None
    if fund_out is not None:
        funding_ref = f"{stem}_funding.csv"
        _write_atomic(root_path / funding_ref, fund_out)
    return FetchReport(
        symbol=symbol, market=market, interval=interval, start=start, end=end,
        bars_ref=bars_ref, rows=len(bars), fingerprint=bars.fingerprint,
        first_ms=int(bars.timestamp_ms[0]), last_ms=int(bars.timestamp_ms[-1]), gaps=bars.gaps,
        archives=tuple(down.used), missing=tuple(down.missing),
        unverified=tuple(down.unverified), funding_ref=funding_ref,
        funding_rows=0 if fund_out is None else len(fund_out),
    )
