"""Fuzzing the loader: any CSV or Parquet input loads or is refused as a data error.

Every input, from random bytes to nearly-valid bar tables with hostile cells (huge integers,
NaN, text, day-first dates, epochs in every unit, duplicated or missing headers, a title line,
``;`` delimiters, ragged rows), either loads into bars that keep domain.md §1's invariants or
raises the library's ``DataError``. A ``DataValidationError`` names its row and/or column;
no message carries a numpy repr or the server's path. Any other exception fails the test.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibration import BarSeries, DataError, DataValidationError
from calibration.data import bars_from_frame, load_bars

#: FUZZ_EXAMPLES=3000 runs a longer hunt (about 80 s); the default keeps the module under 10 s.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

T0_MS = 1_609_459_200_000  # 2021-01-01T00:00:00Z


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    """One data root for every example of the module (the file is rewritten each time)."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def check(load: Callable[[], BarSeries], root: Path) -> None:
    """``load()`` gives valid bars or a DataError that says where; nothing else escapes."""
    refused: DataError | None = None
    try:
        bars = load()
    except DataError as exc:  # anything else propagates and fails the test
        refused = exc
    if isinstance(refused, DataValidationError):
        assert refused.row is not None or refused.column is not None, str(refused)
        assert refused.row is None or refused.row >= 1
    if refused is not None:  # plain DataError: a whole-file fault (empty, not Parquet, ...)
        assert_plain(str(refused), root)
        return
    n = len(bars)
    assert n >= 2
    assert np.all(np.diff(bars.timestamp_ms) > 0)
    assert bars.timestamp_ms[0] >= 0
    assert bars.timestamp_ms[-1] <= pd.Timestamp.max.value // 10**6
    for column in (bars.open, bars.high, bars.low, bars.close):
        assert column.shape == (n,)
        assert np.all(np.isfinite(column))
        assert np.all(column > 0)
    assert np.all(bars.low <= np.minimum(bars.open, bars.close))
    assert np.all(np.maximum(bars.open, bars.close) <= bars.high)
    assert bars.bar_seconds > 0
    assert len(bars.fingerprint) == 64


def assert_plain(message: str, root: Path) -> None:
    """No numpy repr and no server path in a message."""
    assert "np.float64" not in message
    assert "np.int64" not in message
    assert str(root) not in message


# -- cells, headers and layouts -----------------------------------------------------------

HUGE_INTS = st.sampled_from([2**63 - 1, 2**63, -(2**63), 10**20, 10**30, -1, 0])
PER_MS = {"s": (1, 1000), "ms": (1, 1), "us": (1000, 1), "ns": (10**6, 1)}
EPOCHS = st.tuples(st.sampled_from(sorted(PER_MS)), st.integers(0, 10**6)).map(
    lambda u: str((T0_MS + u[1] * 60_000) * PER_MS[u[0]][0] // PER_MS[u[0]][1]))
CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=0.5, max_value=2.0).map(lambda x: f"{x:.4f}"),
    st.integers(-10**6, 10**6).map(str),
    HUGE_INTS.map(str),
    EPOCHS,
    st.sampled_from(["", "nan", "NaN", "inf", "-inf", "null", "abc", "1,5", "01/10/2020",
                     "2021-01-01", "2021-01-01T00:00:00Z", "2021-01-01 00:00:00 UTC",
                     "99999-01-01", "2021-13-45", "0x10", "1e400", "\u00e9", '"', "'"]),
    st.text(max_size=8),
)
NAMES = st.sampled_from(["timestamp_ms", "timestamp", "open_time", "unix", "date", "open",
                         "high", "low", "close", "price", "volume", "Close", " OPEN ", "symbol",
                         "", "x", "timestamp"])
SEPARATORS = st.sampled_from([",", ";", "\t", "|"])


@st.composite
def csv_tables(draw: st.DrawFn) -> str:
    """A bar-like CSV text: a header from known and unknown names, hostile rows."""
    sep = draw(SEPARATORS)
    header = draw(st.lists(NAMES, min_size=1, max_size=8))
    lines = []
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["https://www.CryptoDataDownload.com",
                                           "Exported, hourly"])))
    if draw(st.booleans()):
        lines.append(sep.join(header))
    for _ in range(draw(st.integers(0, 8))):
        width = len(header) + draw(st.sampled_from([0, 0, 0, -1, 1]))
        lines.append(sep.join(draw(st.lists(CELLS, min_size=max(width, 0),
                                            max_size=max(width, 0)))))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n"]))


@st.composite
def near_valid_tables(draw: st.DrawFn) -> str:
    """A valid OHLCV file with a few cells replaced: most of these load or fail on one cell."""
    n = draw(st.integers(2, 12))
    unit = draw(st.sampled_from(["s", "ms", "us", "ns", "iso"]))
    rows = []
    price = 100.0
    for i in range(n):
        ms = T0_MS + i * 60_000
        stamp = {"s": str(ms // 1000), "ms": str(ms), "us": str(ms * 1000),
                 "ns": str(ms * 10**6),
                 "iso": pd.Timestamp(ms, unit="ms", tz="UTC").isoformat()}[unit]
        rows.append([stamp, f"{price:.2f}", f"{price + 1:.2f}", f"{price - 1:.2f}",
                     f"{price + 0.5:.2f}", "10"])
        price += 0.5
    for _ in range(draw(st.integers(0, 3))):
        r = draw(st.integers(0, n - 1))
        c = draw(st.integers(0, 5))
        rows[r][c] = draw(CELLS)
    if draw(st.booleans()):
        rows.reverse()
    if draw(st.booleans()):
        r = draw(st.integers(0, n - 1))
        rows.insert(r, list(rows[r]))
    sep = draw(SEPARATORS)
    header = ["timestamp", "open", "high", "low", "close", "volume"]
    return "\n".join(sep.join(r) for r in [header, *rows]) + "\n"


@FUZZ
@given(raw=st.binary(max_size=400))
def test_random_bytes_as_csv(root: Path, raw: bytes) -> None:
    """Arbitrary bytes in a .csv file load or raise DataError."""
    (root / "x.csv").write_bytes(raw)
    check(lambda: load_bars("x.csv", root=root), root)


@FUZZ
@given(text=csv_tables())
def test_random_tables_as_csv(root: Path, text: str) -> None:
    """Random headers, delimiters, title lines and hostile cells load or raise DataError."""
    (root / "x.csv").write_text(text, encoding="utf-8", errors="surrogatepass")
    check(lambda: load_bars("x.csv", root=root), root)


@FUZZ
@given(text=near_valid_tables(), repair=st.sampled_from([(), ("ohlc-range", "duplicates")]))
def test_nearly_valid_tables_as_csv(root: Path, text: str, repair: tuple[str, ...]) -> None:
    """Valid bar files with a few bad cells, reversed or duplicated rows, strict or repaired."""
    (root / "x.csv").write_text(text)
    check(lambda: load_bars("x.csv", root=root, repair=repair), root)


# -- Parquet and frames -------------------------------------------------------------------

COLUMN_VALUES = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=8),
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=0, max_size=8),
    st.lists(st.integers(0, 10**6).map(lambda k: T0_MS + k * 60_000), min_size=0, max_size=8),
    st.lists(st.text(max_size=6), min_size=0, max_size=8),
    st.lists(st.booleans(), min_size=0, max_size=8),
    st.lists(st.datetimes(), min_size=0, max_size=8),
    st.lists(st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3),
                       st.floats(allow_nan=True)), min_size=0, max_size=8),
)


@st.composite
def frames(draw: st.DrawFn) -> pd.DataFrame:
    """A frame of random columns (any dtype Parquet stores) under random bar-ish names."""
    n = draw(st.integers(0, 8))
    names = draw(st.lists(NAMES, min_size=1, max_size=7, unique=True))
    core = draw(st.sampled_from([[], ["timestamp", "close"],
                                 ["timestamp", "open", "high", "low", "close"]]))
    data = {}
    for name in dict.fromkeys([*core, *names]):
        if name in core and name != "timestamp" and draw(st.booleans()):
            # Mostly sane prices, so that frames get past the column checks to the cells.
            values = draw(st.lists(st.floats(90, 110), min_size=n, max_size=n))
        else:
            values = draw(COLUMN_VALUES)
        values = (values * (n // max(len(values), 1) + 1))[:n] if values else [None] * n
        data[name] = values
    frame = pd.DataFrame(data)
    if draw(st.booleans()) and "timestamp" in frame.columns and n:
        frame["timestamp"] = pd.to_datetime(T0_MS + np.arange(n) * 60_000, unit="ms",
                                            utc=draw(st.booleans()))
    return frame


def _parquet(frame: pd.DataFrame, path: Path) -> bool:
    """Write ``frame`` as Parquet; False when pyarrow cannot store these mixed objects."""
    import pyarrow as pa

    try:
        frame.to_parquet(path)
    except (pa.ArrowException, TypeError, ValueError):
        return False
    return True


@FUZZ
@given(frame=frames())
def test_random_frames_as_parquet(root: Path, frame: pd.DataFrame) -> None:
    """Parquet files of random columns and dtypes load or raise DataError."""
    if _parquet(frame, root / "x.parquet"):
        check(lambda: load_bars("x.parquet", root=root), root)


@FUZZ
@given(frame=frames())
def test_random_frames_directly(root: Path, frame: pd.DataFrame) -> None:
    """bars_from_frame on the same frames (object columns included) is just as strict."""
    check(lambda: bars_from_frame(frame, instrument="X", source="fuzz"), root)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_as_parquet(root: Path, raw: bytes) -> None:
    """Arbitrary bytes (with or without the PAR1 magic) in a .parquet file raise DataError."""
    body = b"PAR1" + raw + b"PAR1" if raw[:1] == b"\x00" else raw
    (root / "x.parquet").write_bytes(body)
    check(lambda: load_bars("x.parquet", root=root), root)


def test_fuzz_check_refuses_other_exceptions(root: Path) -> None:
    """The checker itself lets a non-DataError through (so the fuzz tests can fail)."""

    def boom() -> BarSeries:
        raise KeyError("close")

    with pytest.raises(KeyError):
        check(boom, root)
