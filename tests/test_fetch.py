"""``calibration.fetch`` and ``marginlab data fetch`` against a local mirror of data.binance.vision.

A real HTTP server (``http.server`` in a thread on 127.0.0.1) serves a temporary directory laid
out like the archive: zips holding one CSV of the same name, with ``.CHECKSUM`` siblings. Bars
come from the real 1-minute BTC file in ../shared/data (read at test time) or are synthetic.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import threading
import time
import urllib.error
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from calibration._errors import DataValidationError, InvalidParameters
from calibration.cli import main
from calibration.data import fingerprint, load_bars, load_funding
from calibration.fetch import (
    BINANCE_BASE_URL,
    ArchiveClient,
    FetchError,
    fetch_binance,
    funding_archives,
    kline_archives,
)
from tests.conftest import make_bars, random_walk

REAL = "binance_spot_btc_1m_2024_08/BTCUSDT_1m_2024-07-26_2024-08-25.csv"
FUTURES_HEADER = ("open_time,open,high,low,close,volume,close_time,quote_volume,count,"
                  "taker_buy_volume,taker_buy_quote_volume,ignore")
FUNDING_HEADER = "calc_time,funding_interval_hours,last_funding_rate"


def _ms(day: str) -> int:
    d = date.fromisoformat(day)
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)


def _kline_lines(frame: pd.DataFrame, step_ms: int, *, micros: bool = False) -> list[str]:
    """Binance kline rows (12 columns) for a frame of ``timestamp_ms, open..close, volume``."""
    scale = 1000 if micros else 1
    ts = frame["timestamp_ms"].to_numpy(dtype=np.int64)
    o, h, lo, c, v = (frame[k].to_numpy(dtype=np.float64)
                      for k in ("open", "high", "low", "close", "volume"))
    lines = []
    for i in range(ts.shape[0]):
        t = int(ts[i])
        quote = v[i] * c[i]
        lines.append(
            f"{t * scale},{o[i]:.8f},{h[i]:.8f},{lo[i]:.8f},{c[i]:.8f},{v[i]:.8f},"
            f"{(t + step_ms) * scale - 1},{quote:.8f},{100 + i},{v[i] / 2:.8f},{quote / 2:.8f},0"
        )
    return lines


def _synthetic(start_day: str, n: int, step_s: int, seed: int = 0) -> pd.DataFrame:
    """``n`` consistent bars from ``start_day``, prices to the cent (as Binance quotes them)."""
    bars = make_bars(random_walk(n, seed=seed) * 600, seed=seed, bar_seconds=step_s,
                     start_ms=_ms(start_day))
    assert bars.volume is not None
    return pd.DataFrame({
        "timestamp_ms": bars.timestamp_ms,
        **{name: np.round(getattr(bars, name), 2) for name in ("open", "high", "low", "close")},
        "volume": np.round(bars.volume, 3),
    })


def _expected_fingerprint(lines: list[str]) -> str:
    """The fingerprint of kline rows, parsed independently of calibration.fetch."""
    frame = pd.read_csv(io.StringIO("\n".join(lines)), header=None)
    ts = frame[0].to_numpy(dtype=np.int64)
    ts = np.where(ts > 10**14, ts // 1000, ts)
    prices = [frame[i].to_numpy(dtype=np.float64) for i in (1, 2, 3, 4)]
    return fingerprint(ts, prices, frame[5].to_numpy(dtype=np.float64))


class Mirror:
    """A directory laid out like data.binance.vision, served over HTTP with fault injection."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = ""
        self.requests: list[str] = []
        # URL path (under /data/) → faults to answer with first: an HTTP status or "slow".
        self.faults: dict[str, list[int | str]] = {}

    def put(self, path: str, text: str, *, checksum: bool | str = True) -> None:
        """Write ``path`` (a .zip under /data/) holding ``text`` as the same-named CSV."""
        target = self.root / "data" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(target.name.removesuffix(".zip") + ".csv", text)
        self.put_raw(path, buffer.getvalue(), checksum=checksum)

    def put_raw(self, path: str, data: bytes, *, checksum: bool | str = True) -> None:
        """Write raw bytes at ``path`` and, unless ``checksum`` is False, a .CHECKSUM file."""
        target = self.root / "data" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if checksum is not False:
            digest = checksum if isinstance(checksum, str) else hashlib.sha256(data).hexdigest()
            (target.parent / f"{target.name}.CHECKSUM").write_text(f"{digest}  {target.name}\n")

    def put_klines(self, path: str, lines: list[str], *, header: bool = False,
                   checksum: bool | str = True) -> None:
        """A kline archive with ``lines`` (and the futures header row when ``header``)."""
        self.put(path, "\n".join(([FUTURES_HEADER] if header else []) + lines) + "\n",
                 checksum=checksum)

    def client(self, **overrides: Any) -> ArchiveClient:
        """A client for this mirror that retries without waiting."""
        fields: dict[str, Any] = {"base_url": self.url, "timeout_seconds": 2.0, "retries": 2,
                                  "backoff_seconds": 0.0}
        return ArchiveClient(**{**fields, **overrides})


class _Handler(SimpleHTTPRequestHandler):
    mirror: Mirror

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.mirror.requests.append(path)
        faults = self.mirror.faults.get(path.removeprefix("/data/"))
        if faults:
            fault = faults.pop(0)
            if fault == "slow":
                time.sleep(0.6)  # longer than the client's timeout; then hang up
                return
            self.send_error(int(fault))
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and hung up is part of the test


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    """A local data.binance.vision on a free port, torn down after the test."""
    site = Mirror(tmp_path / "site")
    (site.root / "data").mkdir(parents=True)
    handler = type("Handler", (_Handler,), {"mirror": site})
    server = _Server(("127.0.0.1", 0),
                     functools.partial(handler, directory=str(site.root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    site.url = f"http://127.0.0.1:{server.server_address[1]}/data/"
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


def _daily_path(market: str, symbol: str, interval: str, day: str) -> str:
    base = "spot" if market == "spot" else "futures/um"
    return f"{base}/daily/klines/{symbol}/{interval}/{symbol}-{interval}-{day}.zip"


def _monthly_path(market: str, symbol: str, interval: str, month: str) -> str:
    base = "spot" if market == "spot" else "futures/um"
    return f"{base}/monthly/klines/{symbol}/{interval}/{symbol}-{interval}-{month}.zip"


def _by_day(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    days = pd.to_datetime(frame["timestamp_ms"], unit="ms", utc=True).dt.strftime("%Y-%m-%d")
    return {str(day): part for day, part in frame.groupby(days)}


# --- planning -------------------------------------------------------------------------------


def test_plan_monthly_for_whole_months_daily_for_the_rest() -> None:
    """Whole months get one monthly archive; the partial months at either end get daily ones."""
    plan = kline_archives("BTCUSDT", "um", "1h", date(2024, 6, 29), date(2024, 8, 2))
    assert [a.path for a in plan] == [
        "futures/um/daily/klines/BTCUSDT/1h/BTCUSDT-1h-2024-06-29.zip",
        "futures/um/daily/klines/BTCUSDT/1h/BTCUSDT-1h-2024-06-30.zip",
        "futures/um/monthly/klines/BTCUSDT/1h/BTCUSDT-1h-2024-07.zip",
        "futures/um/daily/klines/BTCUSDT/1h/BTCUSDT-1h-2024-08-01.zip",
        "futures/um/daily/klines/BTCUSDT/1h/BTCUSDT-1h-2024-08-02.zip",
    ]
    assert plan[2].monthly
    assert (plan[2].first_day, plan[2].last_day) == (date(2024, 7, 1), date(2024, 7, 31))
    assert [a.path for a in kline_archives("ETHUSDT", "spot", "1d", date(2024, 2, 1),
                                           date(2024, 2, 29))] == [
        "spot/monthly/klines/ETHUSDT/1d/ETHUSDT-1d-2024-02.zip"]


def test_plan_funding_is_monthly() -> None:
    """Funding rates come from the USD-M monthly fundingRate archives of every touched month."""
    assert [a.path for a in funding_archives("BTCUSDT", date(2024, 7, 30), date(2024, 8, 2))] == [
        "futures/um/monthly/fundingRate/BTCUSDT/BTCUSDT-fundingRate-2024-07.zip",
        "futures/um/monthly/fundingRate/BTCUSDT/BTCUSDT-fundingRate-2024-08.zip",
    ]


def test_default_base_url_and_injected_opener(data_root: Path) -> None:
    """Without a base URL the client asks data.binance.vision, through the injected opener."""
    day = _synthetic("2024-08-04", 24, 3600)
    lines = _kline_lines(day, 3_600_000)
    path = _daily_path("spot", "BTCUSDT", "1h", "2024-08-04")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("BTCUSDT-1h-2024-08-04.csv", "\n".join(lines) + "\n")
    served = {BINANCE_BASE_URL + path: buffer.getvalue()}
    asked: list[tuple[str, float]] = []

    def opener(url: str, timeout_seconds: float) -> bytes:
        asked.append((url, timeout_seconds))
        if url not in served:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]
        return served[url]

    report = fetch_binance("btcusdt", interval="1h", start=date(2024, 8, 4),
                           end=date(2024, 8, 4), root=data_root,
                           client=ArchiveClient(opener=opener, timeout_seconds=7.0))
    assert asked == [
        ("https://data.binance.vision/data/spot/daily/klines/BTCUSDT/1h/"
         "BTCUSDT-1h-2024-08-04.zip", 7.0),
        ("https://data.binance.vision/data/spot/daily/klines/BTCUSDT/1h/"
         "BTCUSDT-1h-2024-08-04.zip.CHECKSUM", 7.0),
    ]
    assert report.rows == 24
    assert report.unverified == ("BTCUSDT-1h-2024-08-04.zip",)


# --- fetching from the mirror ---------------------------------------------------------------


@pytest.mark.data
def test_round_trip_matches_the_source_fingerprint(
    mirror: Mirror, data_root: Path, shared_data: Path, data_file: Callable[[str], str]
) -> None:
    """Real bars served as daily archives come back with the source file's fingerprint."""
    source = pd.read_csv(shared_data / data_file(REAL))
    start, end = _ms("2024-08-04"), _ms("2024-08-07")
    window = source[(source["timestamp_ms"] >= start) & (source["timestamp_ms"] < end)]
    for day, part in _by_day(window).items():
        mirror.put_klines(_daily_path("spot", "BTCUSDT", "1m", day), _kline_lines(part, 60_000))
    report = fetch_binance("BTCUSDT", interval="1m", start=date(2024, 8, 4),
                           end=date(2024, 8, 6), root=data_root, client=mirror.client())
    assert report.bars_ref == "binance/spot/BTCUSDT_1m_2024-08-04_2024-08-06.csv"
    assert report.rows == 3 * 1440
    assert report.gaps == ()
    assert report.missing == ()
    assert report.unverified == ()
    fetched = load_bars(report.bars_ref, root=data_root)
    original = load_bars(REAL, root=shared_data, start_ms=start, end_ms=end)
    assert fetched.fingerprint == original.fingerprint == report.fingerprint
    assert fetched.instrument == "BTCUSDT"
    header = (data_root / report.bars_ref).read_text().splitlines()[:2]
    assert header[0] == ("timestamp_ms,timestamp,open,high,low,close,volume,quote_volume,"
                         "trade_count")
    assert header[1].startswith("1722729600000,2024-08-04T00:00:00Z,")
    assert float(fetched.low.min()) == 49000.0  # the 2024-08-05 crash low


def test_monthly_and_daily_mix_with_header_rows(mirror: Mirror, data_root: Path) -> None:
    """A USD-M fetch joins a monthly archive and daily ones (futures files with a header)."""
    july = _synthetic("2024-07-01", 31 * 24, 3600, seed=1)
    august = _synthetic("2024-08-01", 2 * 24, 3600, seed=2)
    days = _by_day(august)
    june = _synthetic("2024-06-30", 24, 3600, seed=3)
    mirror.put_klines(_daily_path("um", "BTCUSDT", "1h", "2024-06-30"),
                      _kline_lines(june, 3_600_000), header=True)
    july_lines = _kline_lines(july, 3_600_000)
    mirror.put_klines(_monthly_path("um", "BTCUSDT", "1h", "2024-07"), july_lines, header=True)
    aug_lines = []
    for day, part in days.items():
        lines = _kline_lines(part, 3_600_000)
        aug_lines += lines
        mirror.put_klines(_daily_path("um", "BTCUSDT", "1h", day), lines, header=True)
    report = fetch_binance("BTCUSDT", market="um", interval="1h", start=date(2024, 6, 30),
                           end=date(2024, 8, 2), root=data_root, client=mirror.client())
    assert report.archives == ("BTCUSDT-1h-2024-06-30.zip", "BTCUSDT-1h-2024-07.zip",
                               "BTCUSDT-1h-2024-08-01.zip", "BTCUSDT-1h-2024-08-02.zip")
    assert report.rows == 24 + 31 * 24 + 48
    assert report.gaps == ()
    assert report.bars_ref == "binance/um/BTCUSDT_1h_2024-06-30_2024-08-02.csv"
    bars = load_bars(report.bars_ref, root=data_root)
    assert bars.fingerprint == report.fingerprint == _expected_fingerprint(
        _kline_lines(june, 3_600_000) + july_lines + aug_lines)
    assert bars.bar_seconds == 3600
    written = pd.read_csv(data_root / report.bars_ref)
    assert written["trade_count"].dtype == np.int64
    assert np.allclose(written["quote_volume"], written["volume"] * written["close"], rtol=1e-9)


def test_milliseconds_and_microseconds(mirror: Mirror, data_root: Path) -> None:
    """Spot archives switch to µs open times on 2025-01-01; both come out as epoch ms."""
    december = _synthetic("2024-12-01", 31 * 24, 3600, seed=4)
    january = _synthetic("2025-01-01", 2 * 24, 3600, seed=5)
    dec_lines = _kline_lines(december, 3_600_000)
    mirror.put_klines(_monthly_path("spot", "ETHUSDT", "1h", "2024-12"), dec_lines)
    jan_lines = []
    for day, part in _by_day(january).items():
        lines = _kline_lines(part, 3_600_000, micros=True)
        assert len(lines[0].split(",")[0]) == 16
        jan_lines += lines
        mirror.put_klines(_daily_path("spot", "ETHUSDT", "1h", day), lines)
    report = fetch_binance("ETHUSDT", interval="1h", start=date(2024, 12, 1),
                           end=date(2025, 1, 2), root=data_root, client=mirror.client())
    bars = load_bars(report.bars_ref, root=data_root)
    assert report.rows == 33 * 24
    assert report.gaps == ()
    assert bars.timestamp_ms[0] == _ms("2024-12-01")
    assert bars.timestamp_ms[-1] == _ms("2025-01-02") + 23 * 3_600_000
    assert np.all(np.diff(bars.timestamp_ms) == 3_600_000)
    assert bars.fingerprint == _expected_fingerprint(dec_lines + jan_lines)


def test_funding_rates(mirror: Mirror, data_root: Path) -> None:
    """--funding writes the settlements inside the range as timestamp_ms, timestamp, rate."""
    for day, part in _by_day(_synthetic("2024-07-31", 48, 3600, seed=6)).items():
        mirror.put_klines(_daily_path("um", "BTCUSDT", "1h", day), _kline_lines(part, 3_600_000),
                          header=True)
    for month, first in (("2024-07", "2024-07-01"), ("2024-08", "2024-08-01")):
        # calc_time lands a few ms after the settlement, as in the real files.
        rows = [f"{_ms(first) + i * 28_800_000 + 3},8,{0.0001 * (i % 5 - 1):.8f}"
                for i in range(93)]
        mirror.put(f"futures/um/monthly/fundingRate/BTCUSDT/BTCUSDT-fundingRate-{month}.zip",
                   "\n".join([FUNDING_HEADER, *rows]) + "\n")
    report = fetch_binance("BTCUSDT", market="um", funding=True, interval="1h",
                           start=date(2024, 7, 31), end=date(2024, 8, 1), root=data_root,
                           client=mirror.client())
    assert report.funding_ref == "binance/um/BTCUSDT_1h_2024-07-31_2024-08-01_funding.csv"
    assert report.funding_rows == 6
    written = pd.read_csv(data_root / report.funding_ref)
    assert list(written.columns) == ["timestamp_ms", "timestamp", "funding_rate"]
    assert written["timestamp"].iloc[0] == "2024-07-31T00:00:00Z"
    funding = load_funding(report.funding_ref, root=data_root)
    assert funding["timestamp_ms"].iloc[0] == _ms("2024-07-31") + 3
    assert funding["timestamp_ms"].iloc[-1] == _ms("2024-08-01") + 16 * 3_600_000 + 3
    assert np.allclose(funding["funding_rate"], [-0.0001, 0.0, 0.0001] * 2)


def test_missing_funding_month_is_reported(mirror: Mirror, data_root: Path) -> None:
    """Funding "where available": an unpublished month is listed as missing, not an error."""
    for day, part in _by_day(_synthetic("2024-08-01", 48, 3600)).items():
        mirror.put_klines(_daily_path("um", "BTCUSDT", "1h", day), _kline_lines(part, 3_600_000))
    report = fetch_binance("BTCUSDT", market="um", funding=True, interval="1h",
                           start=date(2024, 8, 1), end=date(2024, 8, 2), root=data_root,
                           client=mirror.client())
    assert report.funding_ref is None
    assert report.funding_rows == 0
    assert report.missing == (
        "futures/um/monthly/fundingRate/BTCUSDT/BTCUSDT-fundingRate-2024-08.zip",)


def test_missing_month_falls_back_to_daily(mirror: Mirror, data_root: Path) -> None:
    """An unpublished monthly archive is replaced by its daily ones; absent days are reported."""
    frame = _synthetic("2024-07-01", 31 * 24, 3600, seed=7)
    for day, part in _by_day(frame).items():
        if day != "2024-07-15":
            mirror.put_klines(_daily_path("spot", "BTCUSDT", "1h", day),
                              _kline_lines(part, 3_600_000))
    report = fetch_binance("BTCUSDT", interval="1h", start=date(2024, 7, 1),
                           end=date(2024, 7, 31), root=data_root, client=mirror.client())
    assert mirror.requests[0] == "/data/" + _monthly_path("spot", "BTCUSDT", "1h", "2024-07")
    assert report.missing == (_daily_path("spot", "BTCUSDT", "1h", "2024-07-15"),)
    assert len(report.archives) == 30
    assert report.rows == 30 * 24
    assert len(report.gaps) == 1
    assert report.gaps[0].start_ms == _ms("2024-07-15")
    assert report.gaps[0].missing_bars == 24
    assert load_bars(report.bars_ref, root=data_root).gaps == report.gaps


def test_nothing_found_for_the_whole_range(mirror: Mirror, data_root: Path) -> None:
    """A 404 for every archive (a wrong symbol) is a FetchError and writes nothing."""
    with pytest.raises(FetchError, match=r"no 1m kline archive of NOSUCHUSDT .*all 3 missing"):
        fetch_binance("NOSUCHUSDT", interval="1m", start=date(2024, 8, 1),
                      end=date(2024, 8, 3), root=data_root, client=mirror.client())
    assert list(data_root.iterdir()) == []


def test_checksum_mismatch(mirror: Mirror, data_root: Path) -> None:
    """A zip whose sha256 differs from its .CHECKSUM is refused and nothing is written."""
    part = _synthetic("2024-08-01", 24, 3600)
    mirror.put_klines(_daily_path("spot", "BTCUSDT", "1h", "2024-08-01"),
                      _kline_lines(part, 3_600_000), checksum="0" * 64)
    with pytest.raises(FetchError, match=r"BTCUSDT-1h-2024-08-01\.zip: checksum mismatch"):
        fetch_binance("BTCUSDT", interval="1h", start=date(2024, 8, 1), end=date(2024, 8, 1),
                      root=data_root, client=mirror.client())
    assert list(data_root.iterdir()) == []


def test_unverified_without_checksum_file(mirror: Mirror, data_root: Path) -> None:
    """An archive without a .CHECKSUM sibling is used and listed as unverified."""
    part = _synthetic("2024-08-01", 24, 3600)
    mirror.put_klines(_daily_path("spot", "BTCUSDT", "1h", "2024-08-01"),
                      _kline_lines(part, 3_600_000), checksum=False)
    report = fetch_binance("BTCUSDT", interval="1h", start=date(2024, 8, 1),
                           end=date(2024, 8, 1), root=data_root, client=mirror.client())
    assert report.unverified == ("BTCUSDT-1h-2024-08-01.zip",)
    assert report.rows == 24


def test_bad_zip(mirror: Mirror, data_root: Path) -> None:
    """Bytes that are not a zip (even with a matching checksum) are a FetchError."""
    mirror.put_raw(_daily_path("spot", "BTCUSDT", "1h", "2024-08-01"), b"<html>oops</html>")
    with pytest.raises(FetchError, match=r"BTCUSDT-1h-2024-08-01\.zip: not a valid zip"):
        fetch_binance("BTCUSDT", interval="1h", start=date(2024, 8, 1), end=date(2024, 8, 1),
                      root=data_root, client=mirror.client())


def test_server_error_is_retried(mirror: Mirror, data_root: Path) -> None:
    """A 500 and a timeout are retried, and the fetch then succeeds."""
    path = _daily_path("spot", "BTCUSDT", "1h", "2024-08-01")
    mirror.put_klines(path, _kline_lines(_synthetic("2024-08-01", 24, 3600), 3_600_000))
    mirror.faults[path] = [500, "slow"]
    report = fetch_binance("BTCUSDT", interval="1h", start=date(2024, 8, 1),
                           end=date(2024, 8, 1), root=data_root,
                           client=mirror.client(timeout_seconds=0.3))
    assert mirror.requests.count("/data/" + path) == 3
    assert report.rows == 24


def test_persistent_server_error_gives_up(mirror: Mirror, data_root: Path) -> None:
    """After the last retry a 503 becomes a FetchError naming the URL and the attempts."""
    path = _daily_path("spot", "BTCUSDT", "1h", "2024-08-01")
    mirror.put_klines(path, _kline_lines(_synthetic("2024-08-01", 24, 3600), 3_600_000))
    mirror.faults[path] = [503, 503, 503]
    with pytest.raises(FetchError, match=r"HTTP 503 .*gave up after 3 attempts"):
        fetch_binance("BTCUSDT", interval="1h", start=date(2024, 8, 1), end=date(2024, 8, 1),
                      root=data_root, client=mirror.client())
    assert mirror.requests.count("/data/" + path) == 3


def test_forbidden_is_not_retried(mirror: Mirror, data_root: Path) -> None:
    """A 4xx other than 404 fails at once: retrying cannot help."""
    path = _daily_path("spot", "BTCUSDT", "1h", "2024-08-01")
    mirror.faults[path] = [403]
    with pytest.raises(FetchError, match="HTTP 403"):
        fetch_binance("BTCUSDT", interval="1h", start=date(2024, 8, 1), end=date(2024, 8, 1),
                      root=data_root, client=mirror.client())
    assert mirror.requests == ["/data/" + path]


def test_bad_row_is_refused_naming_the_archive(mirror: Mirror, data_root: Path) -> None:
    """A bar with high < low is refused with its archive and row there; nothing is written."""
    part = _synthetic("2024-08-02", 24, 3600)
    good = _synthetic("2024-08-01", 24, 3600)
    lines = _kline_lines(part, 3_600_000)
    fields = lines[4].split(",")
    fields[2] = f"{float(fields[3]) * 0.99:.8f}"  # high below low
    lines[4] = ",".join(fields)
    mirror.put_klines(_daily_path("um", "BTCUSDT", "1h", "2024-08-01"),
                      _kline_lines(good, 3_600_000), header=True)
    mirror.put_klines(_daily_path("um", "BTCUSDT", "1h", "2024-08-02"), lines, header=True)
    with pytest.raises(DataValidationError,
                       match=r"BTCUSDT-1h-2024-08-02\.zip: high .* < low .*\(row 5, "):
        fetch_binance("BTCUSDT", market="um", interval="1h", start=date(2024, 8, 1),
                      end=date(2024, 8, 2), root=data_root, client=mirror.client())
    assert not (data_root / "binance").exists() or not any((data_root / "binance").rglob("*"))


def test_duplicates_dropped_and_gaps_reported(mirror: Mirror, data_root: Path) -> None:
    """Repeated bars are kept once; a hole inside a day is reported as a gap, not filled."""
    lines = _kline_lines(_synthetic("2024-08-01", 24, 3600), 3_600_000)
    served = lines[:3] + lines[2:10] + lines[13:]  # row 2 twice, hours 10-12 absent
    mirror.put_klines(_daily_path("spot", "BTCUSDT", "1h", "2024-08-01"), served)
    report = fetch_binance("BTCUSDT", interval="1h", start=date(2024, 8, 1),
                           end=date(2024, 8, 1), root=data_root, client=mirror.client())
    assert report.rows == 21
    assert [(g.start_ms, g.missing_bars) for g in report.gaps] == [
        (_ms("2024-08-01") + 10 * 3_600_000, 3)]


def test_conflicting_duplicates_are_refused(mirror: Mirror, data_root: Path) -> None:
    """The same open time with different prices is refused: which copy is right is unknown."""
    lines = _kline_lines(_synthetic("2024-08-01", 24, 3600), 3_600_000)
    fields = lines[5].split(",")
    fields[5] = "999.00000000"  # a different volume
    mirror.put_klines(_daily_path("spot", "BTCUSDT", "1h", "2024-08-01"),
                      [*lines, ",".join(fields)])
    with pytest.raises(DataValidationError, match=r"2024-08-01T05:00:00Z differ between .*"
                                                  r"row 6 and .*row 25"):
        fetch_binance("BTCUSDT", interval="1h", start=date(2024, 8, 1), end=date(2024, 8, 1),
                      root=data_root, client=mirror.client())


def test_written_atomically(mirror: Mirror, data_root: Path) -> None:
    """A re-fetch replaces the file by rename and leaves no temporary file behind."""
    path = _daily_path("spot", "BTCUSDT", "1h", "2024-08-01")
    mirror.put_klines(path, _kline_lines(_synthetic("2024-08-01", 24, 3600), 3_600_000))
    for _ in range(2):
        report = fetch_binance("BTCUSDT", interval="1h", start=date(2024, 8, 1),
                               end=date(2024, 8, 1), root=data_root, client=mirror.client())
    assert sorted(p.name for p in (data_root / "binance" / "spot").iterdir()) == [
        "BTCUSDT_1h_2024-08-01_2024-08-01.csv"]
    assert load_bars(report.bars_ref, root=data_root).fingerprint == report.fingerprint


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"symbol": "BTC/USDT"}, "symbol"),
        ({"interval": "7m"}, "interval"),
        ({"market": "cm"}, "market"),
        ({"start": date(2024, 8, 3)}, "start"),
        ({"funding": True}, "funding"),
    ],
)
def test_invalid_parameters(kwargs: dict[str, Any], field: str, data_root: Path) -> None:
    """A bad symbol, interval, market, reversed range or spot funding fails before any I/O."""
    def opener(url: str, timeout_seconds: float) -> bytes:
        raise AssertionError("no request expected")

    call: dict[str, Any] = {"symbol": "BTCUSDT", "interval": "1m", "start": date(2024, 8, 1),
                            "end": date(2024, 8, 2), "market": "spot", **kwargs}
    with pytest.raises(InvalidParameters) as info:
        fetch_binance(call.pop("symbol"), root=data_root,
                      client=ArchiveClient(opener=opener), **call)
    assert info.value.field == field


def test_client_refuses_a_non_http_base_url() -> None:
    """The base URL must be http(s): the archive is never read from elsewhere by accident."""
    with pytest.raises(InvalidParameters, match="http"):
        ArchiveClient(base_url="file:///etc/")


# --- the command line -----------------------------------------------------------------------


def test_cli_fetch(mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    """`marginlab data fetch binance` writes under MARGINLAB_DATA_ROOT and prints a summary."""
    root = tmp_path / "root"
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(root))
    for day, part in _by_day(_synthetic("2024-08-01", 48 * 12, 300)).items():
        mirror.put_klines(_daily_path("um", "SOLUSDT", "5m", day), _kline_lines(part, 300_000),
                          header=True)
    args = ["data", "fetch", "binance", "SOLUSDT", "--interval", "5m", "--market", "um",
            "--start", "2024-08-01", "--end", "2024-08-03", "--base-url", mirror.url]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "SOLUSDT um 5m 2024-08-01..2024-08-03: 576 bars" in out
    assert "binance/um/SOLUSDT_5m_2024-08-01_2024-08-03.csv" in out
    assert "missing:     1" in out
    assert "SOLUSDT-5m-2024-08-03.zip" in out
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    bars = load_bars(report["bars_ref"], root=root)
    assert report["fingerprint"] == bars.fingerprint
    assert report["rows"] == 576
    assert report["gaps"] == []
    assert report["missing"] == [_daily_path("um", "SOLUSDT", "5m", "2024-08-03")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--start", "2024-08-32"], "--start must be an ISO date"),
        (["--start", "2024-08-05"], "start 2024-08-05 is after end 2024-08-03"),
        (["--interval", "7m"], "argument --interval: invalid choice"),
        (["--funding"], "funding rates exist for the um"),
        (["--base-url", "ftp://example.org/"], "base URL must be an http(s) URL"),
        (["--market", "cm"], "argument --market: invalid choice"),
    ],
)
def test_cli_bad_input(extra: list[str], message: str, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    """Bad input exits 2 with one `error:` line on stderr and writes nothing."""
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    args = ["data", "fetch", "binance", "BTCUSDT", "--interval", "1m", "--start", "2024-08-01",
            "--end", "2024-08-03", "--base-url", "http://127.0.0.1:9/data/", *extra]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_exchange(capsys: pytest.CaptureFixture[str]) -> None:
    """Only binance is known; another exchange is a one-line usage error (exit 2)."""
    with pytest.raises(SystemExit) as info:
        main(["data", "fetch", "kraken", "XBTUSD", "--interval", "1m", "--start", "2024-08-01",
              "--end", "2024-08-02"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument exchange: invalid choice")
    assert err.count("\n") == 1
