"""Loading, validating, fingerprinting and reshaping bar data (domain.md §1).

Every file is written to ``tmp_path``: these tests never read ``../shared/data``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibration import (
    BarSeries,
    DataError,
    DataReferenceError,
    DataValidationError,
    Gap,
    MarginlabError,
)
from calibration.data import (
    align,
    bars_from_frame,
    find_gaps,
    instrument_from_ref,
    load_bars,
    load_book_depth,
    load_funding,
    parse_duration_seconds,
    resample,
    resolve_ref,
    with_depth,
    with_funding,
)

T0_MS = 1_609_459_200_000  # 2021-01-01T00:00:00Z
MIN_MS = 60_000
HOUR_MS = 3_600_000

#: Six consistent one-minute bars: (open, high, low, close, volume).
OHLCV = [
    (100.0, 101.0, 99.0, 100.5, 10.0),
    (100.5, 102.0, 100.0, 101.5, 12.5),
    (101.5, 101.5, 98.5, 99.0, 30.0),
    (99.0, 100.0, 97.25, 98.0, 7.0),
    (98.0, 99.5, 97.5, 99.25, 0.0),
    (99.25, 100.0, 99.0, 99.75, 4.5),
]
TIMESTAMPS_MS = [T0_MS + i * MIN_MS for i in range(len(OHLCV))]


def iso(ms: int) -> str:
    """``2021-01-01T00:00:00Z`` for an epoch-ms instant."""
    return pd.Timestamp(ms, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt(x: float) -> str:
    """A price as the exchange files write it."""
    return repr(float(x))


def shared_rows(
    rows: Sequence[Sequence[float]] = OHLCV, timestamps: Sequence[int] = TIMESTAMPS_MS
) -> list[list[str]]:
    """Rows of the ``../shared/data`` layout as text cells, header first."""
    out = [["timestamp_ms", "timestamp", "open", "high", "low", "close", "volume"]]
    for ms, row in zip(timestamps, rows, strict=True):
        out.append([str(ms), iso(ms), *map(fmt, row)])
    return out


def plain_rows(stamp: str = "iso", volume: bool = True) -> list[list[str]]:
    """Rows of the plain ``timestamp,open,high,low,close[,volume]`` layout."""
    header = ["timestamp", "open", "high", "low", "close", *(["volume"] if volume else [])]
    out = [header]
    for ms, row in zip(TIMESTAMPS_MS, OHLCV, strict=True):
        cell = {"iso": iso(ms), "s": str(ms // 1000), "ms": str(ms)}[stamp]
        out.append([cell, *map(fmt, row[: len(header) - 1])])
    return out


def write_csv(root: Path, name: str, rows: list[list[str]]) -> str:
    """Write rows as CSV under ``root`` and return the reference."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return name


def bars_of(timestamps: Sequence[int], closes: Sequence[float], *,
            volume: Sequence[float] | None = None, name: str = "TEST") -> BarSeries:
    """Validated bars whose open/high/low are derived from consecutive closes."""
    close = np.asarray(closes, dtype=np.float64)
    open_ = np.r_[close[0], close[:-1]]
    frame = pd.DataFrame({
        "timestamp_ms": np.asarray(timestamps, dtype=np.int64),
        "open": open_, "high": np.maximum(open_, close) + 0.5,
        "low": np.minimum(open_, close) - 0.5, "close": close,
    })
    if volume is not None:
        frame["volume"] = np.asarray(volume, dtype=np.float64)
    return bars_from_frame(frame, instrument=name)


def expected_columns() -> dict[str, np.ndarray]:
    """The OHLCV columns of ``OHLCV`` as arrays."""
    cols = np.array(OHLCV).T
    return dict(zip(("open", "high", "low", "close", "volume"), cols, strict=True))


# ---------------------------------------------------------------------------------------------
# Loading: layouts and formats


def test_loads_shared_layout(tmp_path: Path) -> None:
    """The ../shared/data layout loads with exact timestamps, prices, volume and metadata."""
    ref = write_csv(tmp_path, "BTCUSDT_1m_2021.csv", shared_rows())
    bars = load_bars(ref, root=tmp_path)
    assert bars.instrument == "BTCUSDT"
    assert bars.source == ref
    assert bars.bar_seconds == 60
    assert bars.gaps == ()
    np.testing.assert_array_equal(bars.timestamp_ms, TIMESTAMPS_MS)
    assert bars.timestamp_ms.dtype == np.int64
    for name, values in expected_columns().items():
        np.testing.assert_array_equal(getattr(bars, name), values)
    assert len(bars.fingerprint) == 64


@pytest.mark.parametrize("stamp", ["iso", "s", "ms"])
def test_plain_layout_matches_shared_layout(tmp_path: Path, stamp: str) -> None:
    """Plain files with ISO, epoch-second or epoch-ms timestamps give the same bars."""
    shared = load_bars(write_csv(tmp_path, "a.csv", shared_rows()), root=tmp_path)
    plain = load_bars(write_csv(tmp_path, "b.csv", plain_rows(stamp)), root=tmp_path)
    np.testing.assert_array_equal(plain.timestamp_ms, shared.timestamp_ms)
    assert plain.fingerprint == shared.fingerprint


def test_plain_layout_without_volume(tmp_path: Path) -> None:
    """A file with no volume column loads with volume None and a volume-free fingerprint."""
    bars = load_bars(write_csv(tmp_path, "x.csv", plain_rows(volume=False)), root=tmp_path)
    assert bars.volume is None
    np.testing.assert_array_equal(bars.close, expected_columns()["close"])
    with_volume = load_bars(write_csv(tmp_path, "y.csv", plain_rows()), root=tmp_path)
    assert bars.fingerprint != with_volume.fingerprint


def test_iso_timestamps_with_offsets_are_converted_to_utc(tmp_path: Path) -> None:
    """ISO timestamps with a UTC offset or a space separator land on the same UTC instants."""
    rows = plain_rows()
    rows[1][0] = "2021-01-01T02:00:00+02:00"
    rows[2][0] = "2021-01-01 00:01:00"
    bars = load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    np.testing.assert_array_equal(bars.timestamp_ms, TIMESTAMPS_MS)


def test_column_names_are_case_insensitive(tmp_path: Path) -> None:
    """Capitalised headers (Timestamp, Open, ...) are read like lower-case ones."""
    rows = plain_rows()
    rows[0] = [c.capitalize() for c in rows[0]]
    bars = load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    np.testing.assert_array_equal(bars.high, expected_columns()["high"])


def test_parquet_loads_like_csv(tmp_path: Path) -> None:
    """A Parquet file of the same bars gives the same arrays and the same fingerprint."""
    csv = load_bars(write_csv(tmp_path, "BTCUSDT.csv", shared_rows()), root=tmp_path)
    frame = pd.DataFrame(expected_columns()).assign(timestamp_ms=TIMESTAMPS_MS)
    frame.to_parquet(tmp_path / "BTCUSDT.parquet")
    parquet = load_bars("BTCUSDT.parquet", root=tmp_path)
    np.testing.assert_array_equal(parquet.timestamp_ms, csv.timestamp_ms)
    for name in ("open", "high", "low", "close", "volume"):
        np.testing.assert_array_equal(getattr(parquet, name), getattr(csv, name))
    assert parquet.fingerprint == csv.fingerprint


def test_parquet_with_datetime_column_loads(tmp_path: Path) -> None:
    """A Parquet ``timestamp`` column of tz-aware datetimes loads as epoch ms."""
    frame = pd.DataFrame(expected_columns()).assign(
        timestamp=pd.to_datetime(TIMESTAMPS_MS, unit="ms", utc=True)
    )
    frame.to_parquet(tmp_path / "x.parquet")
    bars = load_bars("x.parquet", root=tmp_path)
    np.testing.assert_array_equal(bars.timestamp_ms, TIMESTAMPS_MS)


def test_unsupported_file_type_is_a_data_error(tmp_path: Path) -> None:
    """A file that is neither CSV, Parquet nor Feather is refused with DataError."""
    (tmp_path / "x.txt").write_text("timestamp,open,high,low,close\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_bars("x.txt", root=tmp_path)


def test_start_and_end_cut_before_validation(tmp_path: Path) -> None:
    """start_ms/end_ms keep start <= t < end, so a bad tail outside the range can be cut off."""
    rows = shared_rows()
    rows[6][5] = "-1.0"  # a bad close in the last bar
    ref = write_csv(tmp_path, "x.csv", rows)
    with pytest.raises(DataValidationError):
        load_bars(ref, root=tmp_path)
    bars = load_bars(ref, root=tmp_path, start_ms=TIMESTAMPS_MS[1], end_ms=TIMESTAMPS_MS[5])
    np.testing.assert_array_equal(bars.timestamp_ms, TIMESTAMPS_MS[1:5])


def test_instrument_from_file_name() -> None:
    """The default instrument is the upper-cased first token of the file name."""
    assert instrument_from_ref("binance/BTCUSDT_1m_2021.csv") == "BTCUSDT"
    assert instrument_from_ref("eth-usdt.parquet") == "ETH"


# ---------------------------------------------------------------------------------------------
# References


def test_absolute_reference_is_refused(tmp_path: Path) -> None:
    """An absolute path, even to a file inside the root, is refused."""
    ref = write_csv(tmp_path, "x.csv", shared_rows())
    with pytest.raises(DataReferenceError, match="relative"):
        load_bars(str(tmp_path / ref), root=tmp_path)


@pytest.mark.parametrize("ref", ["../x.csv", "sub/../x.csv", "sub/../../x.csv"])
def test_dotdot_reference_is_refused(tmp_path: Path, ref: str) -> None:
    """A reference containing '..' is refused, even when it would stay inside the root."""
    root = tmp_path / "root"
    write_csv(root, "x.csv", shared_rows())
    write_csv(root, "sub/y.csv", shared_rows())
    write_csv(tmp_path, "x.csv", shared_rows())
    with pytest.raises(DataReferenceError, match=r"\.\."):
        load_bars(ref, root=root)


def test_symlink_leading_outside_the_root_is_refused(tmp_path: Path) -> None:
    """A symlink under the root that points outside it is refused."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / write_csv(tmp_path, "secret.csv", shared_rows())
    os.symlink(outside, root / "link.csv")
    with pytest.raises(DataReferenceError, match="outside"):
        load_bars("link.csv", root=root)


def test_symlink_inside_the_root_is_followed(tmp_path: Path) -> None:
    """A symlink that stays inside the root is a valid reference."""
    write_csv(tmp_path, "real.csv", shared_rows())
    os.symlink(tmp_path / "real.csv", tmp_path / "alias.csv")
    assert resolve_ref("alias.csv", tmp_path) == (tmp_path / "real.csv").resolve()


@pytest.mark.parametrize("ref", ["missing.csv", "", "   ", "sub"])
def test_missing_reference_is_refused(tmp_path: Path, ref: str) -> None:
    """An empty reference, or one naming no file (or a directory), is refused."""
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataReferenceError) as info:
        load_bars(ref, root=tmp_path)
    assert isinstance(info.value, DataError)
    assert isinstance(info.value, MarginlabError)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------
# Validation: each failure names the 1-based data row and the column at fault


def _set(row: int, column: str, value: str) -> tuple[int, str, str]:
    return row, column, value


SHARED_HEADER = shared_rows()[0]

VALIDATION_CASES = [
    pytest.param(_set(3, "close", "abc"), 3, "close", id="unparseable-close"),
    pytest.param(_set(2, "open", "100.5.1"), 2, "open", id="malformed-number-open"),
    pytest.param(_set(4, "high", ""), 4, "high", id="empty-high"),
    pytest.param(_set(5, "low", "nan"), 5, "low", id="nan-low"),
    pytest.param(_set(2, "close", "inf"), 2, "close", id="inf-close"),
    pytest.param(_set(6, "open", "-inf"), 6, "open", id="minus-inf-open"),
    pytest.param(_set(1, "volume", "NaN"), 1, "volume", id="nan-volume-first-row"),
    pytest.param(_set(3, "low", "0"), 3, "low", id="zero-low"),
    pytest.param(_set(4, "open", "-99.0"), 4, "open", id="negative-open"),
    pytest.param(_set(2, "high", "99.5"), 2, "high", id="high-below-low"),
    pytest.param(_set(3, "open", "105.0"), 3, "open", id="open-above-high"),
    pytest.param(_set(5, "close", "50.0"), 5, "close", id="close-below-low"),
    pytest.param(_set(6, "volume", "-1.0"), 6, "volume", id="negative-volume"),
    pytest.param(_set(4, "timestamp_ms", str(TIMESTAMPS_MS[2])), 4, "timestamp_ms",
                 id="duplicate-timestamp"),
    pytest.param(_set(5, "timestamp_ms", str(TIMESTAMPS_MS[2] + 1)), 5, "timestamp_ms",
                 id="unsorted-timestamp"),
    pytest.param(_set(2, "timestamp_ms", "2021-01-01"), 2, "timestamp_ms",
                 id="non-numeric-timestamp-ms"),
]


@pytest.mark.parametrize(("edit", "row", "column"), VALIDATION_CASES)
def test_validation_names_row_and_column(
    tmp_path: Path, edit: tuple[int, str, str], row: int, column: str
) -> None:
    """A bad cell raises DataValidationError with its 1-based data row and its column."""
    rows = shared_rows()
    at, name, value = edit
    rows[at][SHARED_HEADER.index(name)] = value
    with pytest.raises(DataValidationError) as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert (info.value.row, info.value.column) == (row, column)
    assert f"row {row}" in str(info.value)


@pytest.mark.parametrize(
    ("stamps", "row", "what"),
    [
        pytest.param({3: TIMESTAMPS_MS[1]}, 3, "duplicate", id="duplicate"),
        pytest.param({2: TIMESTAMPS_MS[3], 3: TIMESTAMPS_MS[2]}, 3, "out-of-order",
                     id="swapped"),
    ],
)
def test_plain_layout_timestamp_order(
    tmp_path: Path, stamps: dict[int, int], row: int, what: str
) -> None:
    """Duplicate or decreasing ISO timestamps name the row and the 'timestamp' column."""
    rows = plain_rows()
    for at, ms in stamps.items():
        rows[at][0] = iso(ms)
    with pytest.raises(DataValidationError, match=what) as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert (info.value.row, info.value.column) == (row, "timestamp")


def test_unreadable_iso_timestamp(tmp_path: Path) -> None:
    """A timestamp that is not a date names its row and the 'timestamp' column."""
    rows = plain_rows()
    rows[4][0] = "yesterday"
    with pytest.raises(DataValidationError) as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert (info.value.row, info.value.column) == (4, "timestamp")


def test_truncated_row_names_first_missing_column(tmp_path: Path) -> None:
    """A row cut short has its first missing price reported (row, column)."""
    rows = shared_rows()
    rows[5] = rows[5][:4]  # timestamp_ms, timestamp, open, high
    with pytest.raises(DataValidationError) as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert (info.value.row, info.value.column) == (5, "low")


@pytest.mark.parametrize("at", [1, 3])
def test_row_with_extra_fields_names_its_row(tmp_path: Path, at: int) -> None:
    """A CSV row with more fields than the header is refused with its row, never shifted."""
    rows = shared_rows()
    rows[at] = [*rows[at], "surplus"]
    with pytest.raises(DataValidationError, match="8 fields where the header has 7") as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert info.value.row == at


@pytest.mark.parametrize("column", ["open", "high", "low", "close"])
def test_missing_column(tmp_path: Path, column: str) -> None:
    """A missing price column is named, with no row."""
    rows = shared_rows()
    drop = rows[0].index(column)
    rows = [r[:drop] + r[drop + 1:] for r in rows]
    with pytest.raises(DataValidationError) as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert (info.value.row, info.value.column) == (None, column)


def test_missing_timestamp_column(tmp_path: Path) -> None:
    """A file with no timestamp column is refused."""
    rows = [r[2:] for r in shared_rows()]
    with pytest.raises(DataValidationError, match="no timestamp column"):
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)


def test_parquet_validation_names_row_and_column(tmp_path: Path) -> None:
    """Validation is the same for Parquet: a NaN close names its row and column."""
    frame = pd.DataFrame(expected_columns()).assign(timestamp_ms=TIMESTAMPS_MS)
    frame.loc[3, "close"] = np.nan
    frame.to_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataValidationError) as info:
        load_bars("x.parquet", root=tmp_path)
    assert (info.value.row, info.value.column) == (4, "close")


def test_single_bar_is_refused() -> None:
    """One bar is not a series (no frequency, no return)."""
    frame = pd.DataFrame({"timestamp_ms": [T0_MS], "open": [1.0], "high": [1.0],
                          "low": [1.0], "close": [1.0]})
    with pytest.raises(DataValidationError, match="at least two bars"):
        bars_from_frame(frame, instrument="X")


# ---------------------------------------------------------------------------------------------
# Gaps: reported, never filled


def test_gaps_are_reported_not_filled(tmp_path: Path) -> None:
    """Missing bars are reported as exact Gaps and the series keeps its length."""
    minutes = [0, 1, 2, 5, 6, 7, 8, 12, 13]
    stamps = [T0_MS + m * MIN_MS for m in minutes]
    rows = shared_rows([OHLCV[0]] * len(stamps), stamps)
    bars = load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert len(bars) == len(minutes)
    np.testing.assert_array_equal(bars.timestamp_ms, stamps)
    assert bars.bar_seconds == 60
    assert bars.gaps == (
        Gap(after_row=2, start_ms=T0_MS + 3 * MIN_MS, missing_bars=2),
        Gap(after_row=6, start_ms=T0_MS + 9 * MIN_MS, missing_bars=3),
    )


def test_off_grid_step_counts_whole_missing_bars() -> None:
    """A step of 2.5 bars reports two missing bars starting one bar after the last."""
    stamps = np.array([0, 60_000, 210_000, 270_000], dtype=np.int64)
    assert find_gaps(stamps, 60) == (Gap(after_row=1, start_ms=120_000, missing_bars=2),)


# ---------------------------------------------------------------------------------------------
# Fingerprints


def test_fingerprint_ignores_file_name_and_format(tmp_path: Path) -> None:
    """The same bars under another name, layout or format have the same fingerprint."""
    a = load_bars(write_csv(tmp_path, "BTCUSDT.csv", shared_rows()), root=tmp_path)
    b = load_bars(write_csv(tmp_path, "sub/OTHER_1m.csv", plain_rows("s")), root=tmp_path)
    pd.DataFrame(expected_columns()).assign(timestamp_ms=TIMESTAMPS_MS).to_parquet(
        tmp_path / "c.parquet"
    )
    c = load_bars("c.parquet", root=tmp_path)
    assert a.fingerprint == b.fingerprint == c.fingerprint


@pytest.mark.parametrize(("row", "column", "value"), [
    (3, "close", "99.00000000000001"),
    (1, "high", "101.5"),
    (6, "volume", "4.25"),
    (6, "timestamp_ms", str(TIMESTAMPS_MS[5] + 1)),
])
def test_fingerprint_changes_with_content(
    tmp_path: Path, row: int, column: str, value: str
) -> None:
    """Changing one price (even by one ulp), one volume or one timestamp changes the fingerprint."""
    base = load_bars(write_csv(tmp_path, "a.csv", shared_rows()), root=tmp_path)
    rows = shared_rows()
    rows[row][SHARED_HEADER.index(column)] = value
    if column == "timestamp_ms":
        rows[row][1] = iso(int(value))
    changed = load_bars(write_csv(tmp_path, "b.csv", rows), root=tmp_path)
    assert changed.fingerprint != base.fingerprint


# ---------------------------------------------------------------------------------------------
# Resample


def test_resample_matches_hand_aggregation() -> None:
    """5-minute bars from 1-minute bars: first open, max high, min low, last close, sum volume.

    The 1-minute bars start at 00:02 (a partial first bucket) and miss 00:10–00:14 entirely,
    so the coarse series has a partial first bar and a reported gap.
    """
    minutes = [2, 3, 4, 5, 6, 7, 8, 9, 15, 16]
    close = [10.0, 11.0, 12.0, 13.0, 9.0, 10.0, 11.0, 12.0, 14.0, 15.0]
    volume = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    fine = bars_of([T0_MS + m * MIN_MS for m in minutes], close, volume=volume)
    # open = previous close, high = max(open, close) + 0.5, low = min(open, close) - 0.5
    coarse = resample(fine, 300)
    np.testing.assert_array_equal(coarse.timestamp_ms,
                                  [T0_MS, T0_MS + 5 * MIN_MS, T0_MS + 15 * MIN_MS])
    np.testing.assert_array_equal(coarse.open, [10.0, 12.0, 12.0])
    np.testing.assert_array_equal(coarse.high, [12.5, 13.5, 15.5])
    np.testing.assert_array_equal(coarse.low, [9.5, 8.5, 11.5])
    np.testing.assert_array_equal(coarse.close, [12.0, 12.0, 15.0])
    assert coarse.volume is not None
    np.testing.assert_array_equal(coarse.volume, [6.0, 30.0, 19.0])
    assert coarse.bar_seconds == 300
    assert coarse.gaps == (Gap(after_row=1, start_ms=T0_MS + 10 * MIN_MS, missing_bars=1),)
    assert coarse.fingerprint != fine.fingerprint


def test_resample_sums_funding_and_keeps_first_depth() -> None:
    """Resampling sums funding within a coarse bar and keeps the depth known at its open."""
    fine = bars_of([T0_MS + m * MIN_MS for m in range(4)], [10.0, 11.0, 12.0, 13.0])
    funding = pd.DataFrame({"timestamp_ms": [T0_MS, T0_MS + 1 * MIN_MS, T0_MS + 3 * MIN_MS],
                            "funding_rate": [0.001, 0.002, 0.004]})
    depth = pd.DataFrame({"timestamp_ms": [T0_MS, T0_MS + 2 * MIN_MS],
                          "bid_depth_usd": [1e6, 2e6], "ask_depth_usd": [3e6, 4e6]})
    coarse = resample(with_depth(with_funding(fine, funding), depth), 120)
    assert coarse.funding_rate is not None
    assert coarse.bid_depth_usd is not None
    assert coarse.ask_depth_usd is not None
    np.testing.assert_allclose(coarse.funding_rate, [0.003, 0.004], rtol=1e-15)
    np.testing.assert_array_equal(coarse.bid_depth_usd, [1e6, 2e6])
    np.testing.assert_array_equal(coarse.ask_depth_usd, [3e6, 4e6])


def test_resample_refuses_non_multiple_and_keeps_same_frequency() -> None:
    """A target that is not a whole multiple is refused; the same frequency is a no-op."""
    fine = bars_of([T0_MS + m * MIN_MS for m in range(4)], [10.0, 11.0, 12.0, 13.0])
    with pytest.raises(DataError, match="multiple"):
        resample(fine, 90)
    with pytest.raises(DataError):
        resample(fine, 0)
    assert resample(fine, 60) is fine


# ---------------------------------------------------------------------------------------------
# Align


def test_align_is_an_inner_join_on_time() -> None:
    """Aligned series keep exactly the shared timestamps, with each bar's own values."""
    a = bars_of([T0_MS + m * MIN_MS for m in range(6)], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                volume=[1, 2, 3, 4, 5, 6], name="A")
    b_minutes = [2, 3, 5, 6, 7]
    b = bars_of([T0_MS + m * MIN_MS for m in b_minutes], [20.0, 30.0, 50.0, 60.0, 70.0],
                name="B")
    out_a, out_b = align([a, b])
    common = [T0_MS + m * MIN_MS for m in (2, 3, 5)]
    np.testing.assert_array_equal(out_a.timestamp_ms, common)
    np.testing.assert_array_equal(out_b.timestamp_ms, common)
    np.testing.assert_array_equal(out_a.close, [3.0, 4.0, 6.0])
    np.testing.assert_array_equal(out_a.open, a.open[[2, 3, 5]])
    assert out_a.volume is not None
    np.testing.assert_array_equal(out_a.volume, [3.0, 4.0, 6.0])
    np.testing.assert_array_equal(out_b.close, [20.0, 30.0, 50.0])
    assert out_b.volume is None
    assert out_a.gaps == (Gap(after_row=1, start_ms=T0_MS + 4 * MIN_MS, missing_bars=1),)
    assert out_a.fingerprint != a.fingerprint
    assert (out_a.instrument, out_b.instrument) == ("A", "B")


def test_align_leaves_a_series_already_on_the_common_grid_untouched() -> None:
    """A series whose timestamps are the common ones is returned as it is."""
    stamps = [T0_MS + m * MIN_MS for m in range(3)]
    a = bars_of(stamps, [1.0, 2.0, 3.0])
    b = bars_of([*stamps, T0_MS + 3 * MIN_MS], [1.0, 2.0, 3.0, 4.0])
    out_a, out_b = align([a, b])
    assert out_a is a
    assert len(out_b) == 3


def test_align_refuses_mixed_frequencies_and_no_overlap() -> None:
    """Different bar frequencies, or fewer than two shared bars, raise DataError."""
    one_min = bars_of([T0_MS + m * MIN_MS for m in range(3)], [1.0, 2.0, 3.0])
    five_min = bars_of([T0_MS + m * 5 * MIN_MS for m in range(3)], [1.0, 2.0, 3.0])
    later = bars_of([T0_MS + (m + 2) * MIN_MS for m in range(3)], [1.0, 2.0, 3.0])
    with pytest.raises(DataError, match="frequencies"):
        align([one_min, five_min])
    with pytest.raises(DataError, match="fewer than two"):
        align([one_min, later])
    assert align([]) == []


# ---------------------------------------------------------------------------------------------
# Funding and depth


def test_funding_lands_on_the_bar_that_contains_it(tmp_path: Path) -> None:
    """Each settlement goes to the hourly bar whose [open, open + 1h) contains it; others drop."""
    bars = bars_of([T0_MS + h * HOUR_MS for h in range(24)], np.linspace(100, 110, 24))
    stamps = [T0_MS - HOUR_MS, T0_MS, T0_MS + 8 * HOUR_MS, T0_MS + 16 * HOUR_MS + 30 * MIN_MS,
              T0_MS + 16 * HOUR_MS + 59 * MIN_MS, T0_MS + 24 * HOUR_MS]
    rows = [["timestamp", "funding_rate"]] + [
        [iso(ms), rate] for ms, rate in zip(
            stamps, ["0.5", "0.0001", "-0.0002", "0.0003", "0.0004", "0.5"], strict=True)
    ]
    funding = load_funding(write_csv(tmp_path, "funding.csv", rows), root=tmp_path)
    np.testing.assert_array_equal(funding["timestamp_ms"], stamps)
    out = with_funding(bars, funding)
    expected = np.zeros(24)
    expected[0] = 0.0001
    expected[8] = -0.0002
    expected[16] = 0.0003 + 0.0004
    assert out.funding_rate is not None
    np.testing.assert_allclose(out.funding_rate, expected, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(out.close, bars.close)


def test_funding_percent_column_is_scaled(tmp_path: Path) -> None:
    """A funding_rate_pct column is read as percent: 0.01 becomes 0.0001."""
    rows = [["timestamp_ms", "funding_rate_pct"], [str(T0_MS), "0.01"],
            [str(T0_MS + 8 * HOUR_MS), "-0.0375"]]
    funding = load_funding(write_csv(tmp_path, "f.csv", rows), root=tmp_path)
    np.testing.assert_allclose(funding["funding_rate"], [0.0001, -0.000375], rtol=1e-15)


def test_funding_without_rate_column_is_refused(tmp_path: Path) -> None:
    """A funding file with neither funding_rate nor funding_rate_pct is refused."""
    rows = [["timestamp_ms", "funding_mean"], [str(T0_MS), "0.01"]]
    with pytest.raises(DataValidationError, match="funding_rate"):
        load_funding(write_csv(tmp_path, "f.csv", rows), root=tmp_path)


def test_depth_is_as_of_backward(tmp_path: Path) -> None:
    """Each bar gets the last snapshot at or before its open; NaN before the first snapshot."""
    rows = [["timestamp", "percentage", "depth", "notional"]]
    snapshots = [
        ("2021-01-01 00:01:30", 1.0e6, 1.5e6),
        ("2021-01-01 00:03:00", 2.0e6, 2.5e6),
        ("2021-01-01 00:03:30", 3.0e6, 3.5e6),
    ]
    for stamp, bid, ask in snapshots:
        rows += [[stamp, "-5", "1", "9e9"], [stamp, "-1", "1", repr(bid)],
                 [stamp, "1", "1", repr(ask)], [stamp, "5", "1", "9e9"]]
    depth = load_book_depth(write_csv(tmp_path, "BTCUSDT-bookDepth.csv", rows), root=tmp_path)
    np.testing.assert_array_equal(depth["timestamp_ms"],
                                  [T0_MS + 90_000, T0_MS + 180_000, T0_MS + 210_000])
    bars = bars_of([T0_MS + m * MIN_MS for m in range(5)], [1.0, 2.0, 3.0, 4.0, 5.0])
    out = with_depth(bars, depth)
    assert out.bid_depth_usd is not None
    assert out.ask_depth_usd is not None
    np.testing.assert_array_equal(out.bid_depth_usd, [np.nan, np.nan, 1.0e6, 2.0e6, 3.0e6])
    np.testing.assert_array_equal(out.ask_depth_usd, [np.nan, np.nan, 1.5e6, 2.5e6, 3.5e6])
    np.testing.assert_array_equal(out.close, bars.close)


def test_depth_file_without_the_band_is_refused(tmp_path: Path) -> None:
    """A depth file with no ±1% rows is refused."""
    rows = [["timestamp", "percentage", "notional"], ["2021-01-01 00:00:00", "-5", "1e9"],
            ["2021-01-01 00:00:00", "5", "1e9"]]
    with pytest.raises(DataValidationError, match="bands"):
        load_book_depth(write_csv(tmp_path, "d.csv", rows), root=tmp_path)


# ---------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("1m", 60), ("5min", 300), ("4h", 14_400), ("1d", 86_400),
     ("1w", 604_800), (" 15M ", 900)],
)
def test_parse_duration_seconds(text: str, seconds: int) -> None:
    """Durations with s/m/min/h/d/w units parse to whole seconds."""
    assert parse_duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "0m", "-5m", "1.5h", "10x", "h4", "5 m m"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    """Empty, zero, negative, fractional or unit-less durations raise DataError."""
    with pytest.raises(DataError, match="not a duration"):
        parse_duration_seconds(text)


def test_suspect_prints_are_flagged_not_removed(tmp_path: Path) -> None:
    """A one-bar spike far beyond the body is reported as a suspect print and kept."""
    from calibration.data import find_suspect_prints

    frame = pd.DataFrame({
        "timestamp": pd.date_range("2020-03-10", periods=6, freq="1D", tz="UTC"),
        "open": [100.0, 101, 102, 103, 104, 105],
        "high": [101.0, 102, 250, 104, 105, 106],
        "low": [99.0, 100, 101, 60, 103, 104],
        "close": [101.0, 102, 103, 104, 105, 106],
    })
    frame.to_csv(tmp_path / "spike.csv", index=False)
    bars = load_bars("spike.csv", root=tmp_path)
    assert find_suspect_prints(bars).tolist() == [2, 3]
    assert len(bars) == 6


@pytest.mark.data
def test_eth_perp_bad_print_is_flagged(shared_data: Path, data_file) -> None:  # type: ignore[no-untyped-def]
    """The ETH perpetual's 323.00 high on 2020-03-13 (spot high 139.68) is flagged."""
    from calibration.data import find_suspect_prints

    ref = data_file("binance_usdm_perp_2019_2020/ETHUSDT_perp_1d.csv")
    bars = load_bars(ref, root=shared_data)
    rows = find_suspect_prints(bars)
    days = pd.to_datetime(bars.timestamp_ms[rows], unit="ms").strftime("%Y-%m-%d").tolist()
    assert "2020-03-13" in days


# ---------------------------------------------------------------------------------------------
# Timestamps: epoch units by magnitude or given, ISO-8601, named formats (domain.md §1)

#: 2021-01-01T00:00:00Z in each epoch unit, written out by hand.
EPOCH_2021 = {"s": 1_609_459_200, "ms": 1_609_459_200_000, "us": 1_609_459_200_000_000,
              "ns": 1_609_459_200_000_000_000}
UNIT_PER_MINUTE = {"s": 60, "ms": 60_000, "us": 60_000_000, "ns": 60_000_000_000}


def epoch_rows(unit: str, column: str = "timestamp") -> list[list[str]]:
    """The OHLCV bars with integer epoch timestamps in ``unit``."""
    out = [[column, "open", "high", "low", "close", "volume"]]
    for i, row in enumerate(OHLCV):
        out.append([str(EPOCH_2021[unit] + i * UNIT_PER_MINUTE[unit]), *map(fmt, row)])
    return out


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_epoch_unit_is_told_by_magnitude(tmp_path: Path, unit: str) -> None:
    """Epoch s, ms, µs and ns timestamps give the same bar times (Binance spot: µs)."""
    bars = load_bars(write_csv(tmp_path, "x.csv", epoch_rows(unit)), root=tmp_path)
    assert bars.timestamp_ms.tolist() == TIMESTAMPS_MS
    assert bars.bar_seconds == 60


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_epoch_unit_can_be_given(tmp_path: Path, unit: str) -> None:
    """timestamp_unit reads small epochs magnitude cannot place (1970-01-02 in each unit)."""
    day = {"s": 86_400, "ms": 86_400_000, "us": 86_400_000_000, "ns": 86_400_000_000_000}[unit]
    rows = [["timestamp", "close"], [str(day), "1.0"], [str(day * 2), "2.0"]]
    ref = write_csv(tmp_path, "x.csv", rows)
    with pytest.raises(DataValidationError, match="timestamp_unit") as info:
        load_bars(ref, root=tmp_path)
    assert (info.value.row, info.value.column) == (1, "timestamp")
    bars = load_bars(ref, root=tmp_path, timestamp_unit=unit)  # type: ignore[arg-type]
    assert bars.timestamp_ms.tolist() == [86_400_000, 172_800_000]


def test_concatenated_ms_and_us_files_load(tmp_path: Path) -> None:
    """Binance's 2024 (ms) and 2025 (µs) kline files concatenated read each row's own unit."""
    rows = epoch_rows("ms")
    for i in (4, 5, 6):
        rows[i][0] = str(EPOCH_2021["us"] + (i - 1) * UNIT_PER_MINUTE["us"])
    bars = load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert bars.timestamp_ms.tolist() == TIMESTAMPS_MS


@pytest.mark.parametrize(
    ("column", "cell", "unit"),
    [
        pytest.param("timestamp_ms", str(EPOCH_2021["us"]), None, id="us-in-timestamp_ms"),
        pytest.param("timestamp", "99999999999999999999", None, id="beyond-int64"),
        pytest.param("timestamp", "1e300", None, id="huge-float"),
        pytest.param("timestamp", "-1609459200", None, id="negative"),
        pytest.param("timestamp", "20200110", None, id="compact-date-is-no-epoch"),
        pytest.param("timestamp", str(EPOCH_2021["us"]), "ms", id="us-read-as-ms"),
        pytest.param("timestamp", "2.5e17", None, id="between-us-and-ns"),
    ],
)
def test_out_of_range_epoch_is_a_bad_cell(tmp_path: Path, column: str, cell: str,
                                          unit: str | None) -> None:
    """An epoch no unit places in 1970..2262 is refused with its row and column, no traceback."""
    rows = epoch_rows("ms", column)
    rows[3][0] = cell
    with pytest.raises(DataValidationError) as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path,
                  timestamp_unit=unit)  # type: ignore[arg-type]
    assert (info.value.row, info.value.column) == (3, column)
    assert "timestamp_unit" in str(info.value)


def test_us_file_through_the_cli_is_one_line_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI answers a µs value under timestamp_ms with exit 2 and the cell, not a traceback."""
    from calibration.cli import main

    rows = epoch_rows("ms", "timestamp_ms")
    rows[2][0] = str(EPOCH_2021["us"])
    write_csv(tmp_path, "x.csv", rows)
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    assert main(["backtest", "--data", "x.csv", "--model", "ewma"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: x.csv: timestamp 1609459200000000 as ms is outside")
    assert "row 2" in err
    assert str(tmp_path) not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("cell", ["01/10/2020", "1/10/2020 00:00", "01.10.2020", "01-10-2020"])
def test_day_month_dates_are_refused_as_ambiguous(tmp_path: Path, cell: str) -> None:
    """A dd/mm or mm/dd date is refused with a pointer to timestamp_format."""
    rows = [["date", "close"], [cell, "1.0"], ["2020-10-02", "2.0"]]
    with pytest.raises(DataValidationError, match=r"ambiguous.*timestamp_format") as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert (info.value.row, info.value.column) == (1, "date")


@pytest.mark.parametrize(("timestamp_format", "first", "second"), [
    ("%d/%m/%Y", (2020, 10, 1), (2020, 10, 2)),
    ("%m/%d/%Y", (2020, 1, 10), (2020, 2, 10)),
])
def test_named_format_reads_day_month_dates(
        tmp_path: Path, timestamp_format: str, first: tuple[int, int, int],
        second: tuple[int, int, int]) -> None:
    """With timestamp_format the same cells are read day-first or month-first as named."""
    from datetime import UTC, datetime

    rows = [["date", "close"], ["01/10/2020", "1.0"], ["02/10/2020", "2.0"]]
    ref = write_csv(tmp_path, "x.csv", rows)
    bars = load_bars(ref, root=tmp_path, timestamp_format=timestamp_format)
    expected = [int(datetime(*d, tzinfo=UTC).timestamp()) * 1000 for d in (first, second)]
    assert bars.timestamp_ms.tolist() == expected


def test_cells_not_matching_the_named_format_are_refused(tmp_path: Path) -> None:
    """A cell the named format does not read names its row and the format."""
    rows = [["date", "close"], ["01/10/2020", "1.0"], ["2020-10-02", "2.0"]]
    with pytest.raises(DataValidationError, match="does not match timestamp_format") as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path,
                  timestamp_format="%d/%m/%Y")
    assert (info.value.row, info.value.column) == (2, "date")


def test_invalid_format_is_an_invalid_parameter(tmp_path: Path) -> None:
    """A strftime format pandas cannot use is refused naming timestamp_format."""
    from calibration import InvalidParameters

    rows = [["date", "close"], ["01/10/2020", "1.0"], ["02/10/2020", "2.0"]]
    with pytest.raises(InvalidParameters) as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path, timestamp_format="%Q")
    assert info.value.field == "timestamp_format"


@pytest.mark.parametrize("cell", ["2021-01-01T02:00:00+02:00", "2021-01-01 00:00:00 UTC",
                                  "2021-01-01T00:00:00.000Z", "2021-01-01"])
def test_iso_forms_are_always_accepted(tmp_path: Path, cell: str) -> None:
    """ISO-8601 with an offset or Z, CoinGecko's ' UTC' suffix and bare dates need no format."""
    rows = [["timestamp", "close"], [cell, "1.0"], ["2021-01-02T00:00:00Z", "2.0"]]
    bars = load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert bars.timestamp_ms.tolist() == [T0_MS, T0_MS + 86_400_000]


# ---------------------------------------------------------------------------------------------
# Close-only series (CoinGecko style)


def test_close_only_series_loads_with_closes_as_extremes(tmp_path: Path) -> None:
    """timestamp + price is a close-only series: open = high = low = close, and says so."""
    closes = [100.0, 90.0, 99.0, 110.0]
    rows = [["timestamp_ms", "price", "market_cap"]]
    rows += [[str(T0_MS + i * 86_400_000), fmt(c), "1e9"] for i, c in enumerate(closes)]
    bars = load_bars(write_csv(tmp_path, "BTC_USD_daily.csv", rows), root=tmp_path)
    assert bars.close_only
    for column in (bars.open, bars.high, bars.low, bars.close):
        assert column.tolist() == closes
    assert bars.volume is None
    assert bars.bar_seconds == 86_400
    long_loss, short_loss = bars.forward_losses(1)
    # Losses from closes alone: 1 - 90/100 = 0.1 long after bar 0, 110/99 - 1 short after bar 2.
    assert long_loss[0] == pytest.approx(0.1)
    assert short_loss[2] == pytest.approx(110 / 99 - 1)


def test_close_only_fingerprint_differs_from_flat_ohlc(tmp_path: Path) -> None:
    """A close-only series never shares a fingerprint with OHLC bars that happen to be flat."""
    rows = [["timestamp_ms", "close"], [str(T0_MS), "1.0"], [str(T0_MS + MIN_MS), "2.0"]]
    close_only = load_bars(write_csv(tmp_path, "a.csv", rows), root=tmp_path)
    flat = [["timestamp_ms", "open", "high", "low", "close"],
            [str(T0_MS), "1.0", "1.0", "1.0", "1.0"], [str(T0_MS + MIN_MS), "2.0", "2.0", "2.0",
                                                       "2.0"]]
    ohlc = load_bars(write_csv(tmp_path, "b.csv", flat), root=tmp_path)
    assert not ohlc.close_only
    assert close_only.fingerprint != ohlc.fingerprint


def test_partial_ohlc_is_not_close_only(tmp_path: Path) -> None:
    """open and close without high/low is refused naming the first missing column."""
    rows = [["timestamp_ms", "open", "close"], [str(T0_MS), "1.0", "1.0"],
            [str(T0_MS + MIN_MS), "1.0", "2.0"]]
    with pytest.raises(DataValidationError, match="close-only") as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert info.value.column == "high"


@pytest.mark.data
def test_coingecko_close_only_file_backtests(shared_data: Path, data_file) -> None:  # type: ignore[no-untyped-def]
    """The real CoinGecko BTC file loads close-only, with PROVENANCE's 15,742 on 2022-11-10,
    and a coverage + liquidation backtest runs on it."""
    from calibration import LiquidationConfig
    from calibration.backtest import run_backtest

    ref = data_file("coingecko_daily_2013_2026/BTC_USD_daily.csv")
    bars = load_bars(ref, root=shared_data)
    assert bars.close_only
    assert bars.bar_seconds == 86_400
    lines = (shared_data / ref).read_text().splitlines()
    assert len(bars) == len(lines) - 1
    day = np.flatnonzero(bars.timestamp_ms == 1_668_038_400_000)  # 2022-11-10
    assert round(float(bars.close[day[0]])) == 15_742
    # No volume in the file: impact needs depth or volume, so it is switched off explicitly.
    report = run_backtest([bars], "ewma", {"horizon_bars": 2, "warmup_bars": 100},
                          liquidation=LiquidationConfig.from_mapping({"impact_coef": 0}))
    [instrument] = report.instruments
    whole = instrument.coverage[0]
    assert whole.long.observations == len(bars) - 100 - 2
    # The losses tested are close-to-close: 1 - min(next two closes) / close, by brute force.
    long_loss, _ = bars.forward_losses(2)
    c = bars.close.tolist()
    brute = [1 - min(c[t + 1], c[t + 2]) / c[t] for t in range(len(c) - 2)]
    np.testing.assert_allclose(long_loss[:-2], brute, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Vendor layouts: headerless Binance klines, title lines, ';', newest first


def kline_lines(unit: str) -> list[str]:
    """The OHLCV bars as a headerless Binance kline file (12 columns)."""
    out = []
    for i, (o, h, lo, c, v) in enumerate(OHLCV):
        start = EPOCH_2021[unit] + i * UNIT_PER_MINUTE[unit]
        end = start + UNIT_PER_MINUTE[unit] - 1
        out.append(",".join(map(str, [start, o, h, lo, c, v, end, v * c, 7, v / 2, v * c / 2,
                                      0])))
    return out


@pytest.mark.parametrize("unit", ["ms", "us"])
def test_headerless_binance_klines_load(tmp_path: Path, unit: str) -> None:
    """data.binance.vision kline CSVs (no header; ms, or µs since 2025) load as the bars."""
    (tmp_path / "BTCUSDT-1m-2025-01.csv").write_text("\n".join(kline_lines(unit)) + "\n")
    bars = load_bars("BTCUSDT-1m-2025-01.csv", root=tmp_path)
    reference = load_bars(write_csv(tmp_path, "ref.csv", shared_rows()), root=tmp_path)
    assert bars.timestamp_ms.tolist() == TIMESTAMPS_MS
    assert bars.fingerprint == reference.fingerprint
    assert bars.instrument == "BTCUSDT"


def test_numbers_without_a_header_say_what_to_add(tmp_path: Path) -> None:
    """A headerless file that is not 12-column klines is refused: add a header line."""
    (tmp_path / "x.csv").write_text("\n".join(",".join(r) for r in shared_rows()[1:]) + "\n")
    rows = epoch_rows("ms")[1:]
    (tmp_path / "y.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    with pytest.raises(DataValidationError, match="add a header line") as info:
        load_bars("y.csv", root=tmp_path)
    assert info.value.row == 1


#: Four real Bitstamp BTC/USD hours of 2020-03-12 (../shared/data/bitstamp_1h_2018_2023, from
#: a CryptoDataDownload export), as CryptoDataDownload writes them: URL title line, unix
#: seconds, symbol column, "Volume BTC", newest first.
CDD_HOURS = [
    (1584018000, "2020-03-12 13:00:00", 6025.42, 6066.78, 5713.68, 5966.77, 6279.54),
    (1584014400, "2020-03-12 12:00:00", 6030.94, 6289.03, 5850.0, 6025.42, 4687.66),
    (1584010800, "2020-03-12 11:00:00", 6334.44, 6426.27, 5720.54, 6030.94, 8925.23),
    (1584007200, "2020-03-12 10:00:00", 7342.49, 7360.0, 5965.24, 6334.44, 6856.3),
]


def cdd_text(sep: str = ",") -> str:
    """A CryptoDataDownload hourly export of ``CDD_HOURS``."""
    lines = ["https://www.CryptoDataDownload.com",
             sep.join(["unix", "date", "symbol", "open", "high", "low", "close", "Volume BTC",
                       "Volume USD"])]
    for unix, date, o, h, lo, c, v in CDD_HOURS:
        lines.append(sep.join(map(str, [unix, date, "BTC/USD", o, h, lo, c, v, v * c])))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_cryptodatadownload_export_loads_oldest_first(tmp_path: Path, sep: str) -> None:
    """The URL title line is skipped, ',', ';' or tab split, and newest-first rows reversed."""
    (tmp_path / "Bitstamp_BTCUSD_1h.csv").write_text(cdd_text(sep))
    bars = load_bars("Bitstamp_BTCUSD_1h.csv", root=tmp_path)
    oldest_first = CDD_HOURS[::-1]
    assert bars.newest_first
    assert bars.timestamp_ms.tolist() == [h[0] * 1000 for h in oldest_first]
    assert bars.open.tolist() == [h[2] for h in oldest_first]
    assert bars.low.tolist() == [h[4] for h in oldest_first]
    assert bars.close.tolist() == [h[5] for h in oldest_first]
    assert bars.bar_seconds == 3600
    assert bars.gaps == ()


def test_newest_first_errors_name_the_file_row(tmp_path: Path) -> None:
    """Rows in errors stay the file's rows after reversing: the 2nd data row is row 2."""
    text = cdd_text().replace("6289.03", "5000.0")  # 12:00 high below its low
    (tmp_path / "x.csv").write_text(text)
    with pytest.raises(DataValidationError, match=r"high 5000\.0 < low 5850\.0") as info:
        load_bars("x.csv", root=tmp_path)
    assert (info.value.row, info.value.column) == (2, "high")


def test_neither_increasing_nor_decreasing_is_refused(tmp_path: Path) -> None:
    """Only a strictly decreasing file is reversed; a mixed order is refused with its row."""
    lines = cdd_text().splitlines()
    lines[3], lines[4] = lines[4], lines[3]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError, match="strictly decreasing") as info:
        load_bars("x.csv", root=tmp_path)
    assert info.value.column == "unix"


def test_decimal_commas_are_named(tmp_path: Path) -> None:
    """';' files with decimal commas are split on ';' and the first comma number is named."""
    rows = [["timestamp", "open", "high", "low", "close"],
            ["2021-01-01", "1", "2", "1", "2"], ["2021-01-02", "2", "3", "1,5", "2"]]
    (tmp_path / "x.csv").write_text("\n".join(";".join(r) for r in rows) + "\n")
    with pytest.raises(DataValidationError, match="decimal comma") as info:
        load_bars("x.csv", root=tmp_path)
    assert (info.value.row, info.value.column) == (2, "low")


@pytest.mark.data
def test_real_bitstamp_hours_as_cryptodatadownload_export(shared_data: Path, data_file) -> None:  # type: ignore[no-untyped-def]
    """A year of the real Bitstamp hourly file rewritten in CDD layout loads to the same bars."""
    import tempfile

    ref = data_file("bitstamp_1h_2018_2023/BTCUSD_1h.csv")
    start, end = 1_577_836_800_000, 1_609_459_200_000  # 2020
    original = load_bars(ref, root=shared_data, start_ms=start, end_ms=end)
    frame = pd.read_csv(shared_data / ref)
    frame = frame[(frame.timestamp_ms >= start) & (frame.timestamp_ms < end)].iloc[::-1]
    export = pd.DataFrame({
        "unix": frame.timestamp_ms // 1000,
        "date": pd.to_datetime(frame.timestamp_ms, unit="ms").dt.strftime("%Y-%m-%d %H:%M:%S"),
        "symbol": "BTC/USD", "open": frame.open, "high": frame.high, "low": frame.low,
        "close": frame.close, "Volume BTC": frame.volume, "Volume USD": frame.quote_volume,
    })
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "Bitstamp_BTCUSD_1h.csv"
        path.write_text("https://www.CryptoDataDownload.com\n" + export.to_csv(index=False))
        bars = load_bars(path.name, root=tmp)
    assert bars.newest_first
    assert len(bars) == len(original)
    np.testing.assert_array_equal(bars.timestamp_ms, original.timestamp_ms)
    for name in ("open", "high", "low", "close"):
        np.testing.assert_array_equal(getattr(bars, name), getattr(original, name))
    assert bars.gaps == original.gaps


# ---------------------------------------------------------------------------------------------
# Opt-in repairs (domain.md §1): named defects only, every row listed, part of the fingerprint


def defect_rows() -> list[list[str]]:
    """The shared layout with an open above its high (row 2) and a close below its low (row 5)."""
    rows = shared_rows()
    rows[2][SHARED_HEADER.index("open")] = "103.0"  # high 102.0
    rows[5][SHARED_HEADER.index("close")] = "97.0"  # low 97.5
    return rows


def test_ohlc_range_repair_clamps_and_lists_each_row(tmp_path: Path) -> None:
    """ohlc-range clamps open/close into [low, high]; each change is listed; strict refuses."""
    from calibration import Repair

    ref = write_csv(tmp_path, "x.csv", defect_rows())
    with pytest.raises(DataValidationError, match="repair 'ohlc-range'") as info:
        load_bars(ref, root=tmp_path)
    assert (info.value.row, info.value.column) == (2, "open")
    bars = load_bars(ref, root=tmp_path, repair=["ohlc-range"])
    assert bars.open[1] == 102.0
    assert bars.close[4] == 97.5
    expected = list(expected_columns()["open"])
    expected[1] = 102.0
    assert bars.open.tolist() == expected
    assert bars.repairs == (
        Repair(row=2, timestamp_ms=TIMESTAMPS_MS[1], defect="ohlc-range", column="open",
               before=103.0, after=102.0, change="open 103.0 -> 102.0 (high)"),
        Repair(row=5, timestamp_ms=TIMESTAMPS_MS[4], defect="ohlc-range", column="close",
               before=97.0, after=97.5, change="close 97.0 -> 97.5 (low)"),
    )
    assert bars.repair_policy == ("ohlc-range",)


def test_repair_policy_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    """Repaired bars fingerprint as the clamped arrays plus the policy, never as strict data."""
    from calibration.data import fingerprint

    repaired = load_bars(write_csv(tmp_path, "x.csv", defect_rows()), root=tmp_path,
                         repair="ohlc-range")
    clean = write_csv(tmp_path, "clean.csv", shared_rows())
    strict = load_bars(clean, root=tmp_path)
    cols = expected_columns()
    prices = tuple(cols[n].copy() for n in ("open", "high", "low", "close"))
    prices[0][1] = 102.0  # the clamped open equals the high
    prices[3][4] = 97.5  # the clamped close equals the low
    ts = np.array(TIMESTAMPS_MS, dtype=np.int64)
    assert repaired.fingerprint == fingerprint(ts, prices, cols["volume"],
                                               repair_policy=("ohlc-range",))
    assert repaired.fingerprint != fingerprint(ts, prices, cols["volume"])
    # The same clean file under a policy is a different input than under strict loading.
    both = load_bars(clean, root=tmp_path, repair=["ohlc-range", "duplicates"])
    assert both.repairs == ()
    assert both.fingerprint != strict.fingerprint
    assert both.fingerprint == load_bars(clean, root=tmp_path,
                                         repair="duplicates,ohlc-range").fingerprint


def test_exact_duplicate_rows_are_dropped_and_listed(tmp_path: Path) -> None:
    """duplicates drops a row equal to an earlier one and says which; strict refuses it."""
    rows = shared_rows()
    rows.insert(4, list(rows[3]))  # data row 4 repeats data row 3
    ref = write_csv(tmp_path, "x.csv", rows)
    with pytest.raises(DataValidationError, match="duplicate timestamp") as info:
        load_bars(ref, root=tmp_path)
    assert info.value.row == 4
    bars = load_bars(ref, root=tmp_path, repair=["duplicates"])
    strict = load_bars(write_csv(tmp_path, "clean.csv", shared_rows()), root=tmp_path)
    np.testing.assert_array_equal(bars.timestamp_ms, strict.timestamp_ms)
    np.testing.assert_array_equal(bars.close, strict.close)
    [repair] = bars.repairs
    assert (repair.row, repair.timestamp_ms, repair.defect) == (4, TIMESTAMPS_MS[2], "duplicates")
    assert repair.change == "dropped: same as row 3"
    assert repair.column is None


def test_duplicate_timestamp_with_other_values_stays_an_error(tmp_path: Path) -> None:
    """Two rows at one time with different prices are not repaired: which one is right?"""
    rows = shared_rows()
    rows.insert(4, list(rows[3]))
    rows[4][SHARED_HEADER.index("close")] = "98.75"
    with pytest.raises(DataValidationError, match="duplicate timestamp") as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path, repair=["duplicates"])
    assert (info.value.row, info.value.column) == (4, "timestamp_ms")


@pytest.mark.parametrize("repair", [["gaps"], "ohlc-range,fill", [3]])
def test_unknown_repair_is_refused_naming_the_field(tmp_path: Path, repair: object) -> None:
    """Only named defects can be repaired; anything else is refused before reading."""
    from calibration import InvalidParameters

    with pytest.raises(InvalidParameters, match="repair") as info:
        load_bars("never-read.csv", root=tmp_path, repair=repair)  # type: ignore[arg-type]
    assert info.value.field == "repair"


def test_repair_through_a_spec_data_reference(tmp_path: Path) -> None:
    """A spec's data reference carries repair; unknown names name data[i].repair."""
    from calibration import InvalidParameters
    from calibration.calibrate import load_data_ref
    from calibration.spec import DataRefSpec, decode_spec

    write_csv(tmp_path, "x.csv", defect_rows())
    ref = DataRefSpec(instrument="X", ref="x.csv", repair=["ohlc-range"])
    assert len(load_data_ref(ref, tmp_path, "data[0]").repairs) == 2
    bad = DataRefSpec(instrument="X", ref="x.csv", repair=["fill"])  # type: ignore[list-item]
    with pytest.raises(InvalidParameters) as info:
        load_data_ref(bad, tmp_path, "data[0]")
    assert info.value.field == "data[0].repair"
    with pytest.raises(InvalidParameters) as info:
        decode_spec('{"data": [{"instrument": "X", "ref": "x.csv", "repair": ["fill"]}], '
                    '"model": "ewma"}')
    assert info.value.field is not None
    assert info.value.field.startswith("data[0].repair")


def test_cli_repair_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    """--repair ohlc-range,duplicates loads what strict loading refuses; unknown names exit 2."""
    from calibration.cli import _data_notes, _load_datasets, build_parser, main

    rows = defect_rows()
    rows.insert(4, list(rows[3]))
    write_csv(tmp_path, "x.csv", rows)
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(tmp_path))
    assert main(["backtest", "--data", "x.csv", "--model", "ewma"]) == 2
    assert "repair 'duplicates'" in capsys.readouterr().err
    assert main(["backtest", "--data", "x.csv", "--model", "ewma", "--repair", "fill"]) == 2
    assert "unknown repair 'fill'" in capsys.readouterr().err
    args = build_parser().parse_args(["backtest", "--data", "x.csv", "--model", "ewma",
                                      "--repair", "ohlc-range,duplicates"])
    [bars] = _load_datasets(args, str(tmp_path))
    assert [(r.row, r.defect) for r in bars.repairs] == [(2, "ohlc-range"), (4, "duplicates"),
                                                          (6, "ohlc-range")]
    # The CLI lists every repaired row before the report (stderr).
    assert _data_notes([bars]) == [
        "repaired: X row 2 (2021-01-01T00:01:00Z) ohlc-range: open 103.0 -> 102.0 (high)",
        "repaired: X row 4 (2021-01-01T00:02:00Z) duplicates: dropped: same as row 3",
        "repaired: X row 6 (2021-01-01T00:04:00Z) ohlc-range: close 97.0 -> 97.5 (low)",
    ]


# ---------------------------------------------------------------------------------------------
# Depth staleness


def depth_frame(snapshot_minutes: Sequence[float]) -> pd.DataFrame:
    """Depth snapshots at the given minutes after T0, bid = 1e6 × (i + 1), ask = 2 × bid."""
    ts = [T0_MS + int(m * MIN_MS) for m in snapshot_minutes]
    bid = [1e6 * (i + 1) for i in range(len(ts))]
    return pd.DataFrame({"timestamp_ms": ts, "bid_depth_usd": bid,
                         "ask_depth_usd": [2 * b for b in bid]})


def test_depth_older_than_the_staleness_is_missing(tmp_path: Path) -> None:
    """A snapshot stands for the book at most max_staleness_seconds; older bars get NaN."""
    bars = bars_of([T0_MS + m * MIN_MS for m in range(8)], [float(m + 1) for m in range(8)])
    out = with_depth(bars, depth_frame([1.5, 3.0]), max_staleness_seconds=120)
    # Bar opens 0..7 min; last snapshot 1.5 (bars 2, 3 less than 2 min old) then 3.0 (bars 3..5,
    # age 0..2 min inclusive); bars 6, 7 are 3 and 4 minutes after it.
    assert out.bid_depth_usd is not None
    np.testing.assert_array_equal(out.bid_depth_usd,
                                  [np.nan, np.nan, 1e6, 2e6, 2e6, 2e6, np.nan, np.nan])
    assert out.depth_stale is not None
    assert out.depth_stale.tolist() == [False] * 6 + [True, True]
    assert out.depth_stale_bars == 2


def test_default_depth_staleness_is_five_minutes() -> None:
    """By default a snapshot 300 s old is used and one 301 s old is not."""
    from calibration.data import DEFAULT_DEPTH_STALENESS_SECONDS

    assert DEFAULT_DEPTH_STALENESS_SECONDS == 300
    bars = bars_of([T0_MS + 300_000, T0_MS + 301_000], [1.0, 2.0])
    out = with_depth(bars, depth_frame([0.0]))
    assert out.bid_depth_usd is not None
    assert out.bid_depth_usd[0] == 1e6
    assert np.isnan(out.bid_depth_usd[1])
    assert out.depth_stale_bars == 1


def test_depth_staleness_survives_resample_and_cut() -> None:
    """Resampling keeps the staleness of each coarse bar's first fine bar; cuts keep theirs."""
    from calibration.calibrate import cut

    bars = bars_of([T0_MS + m * MIN_MS for m in range(10)], [float(m + 1) for m in range(10)])
    out = with_depth(bars, depth_frame([0.0]), max_staleness_seconds=180)
    assert out.depth_stale is not None
    assert out.depth_stale.tolist() == [False] * 4 + [True] * 6
    assert resample(out, 300).depth_stale_bars == 1  # coarse bars open at 0 and 5 min
    assert cut(out, T0_MS + 3 * MIN_MS, T0_MS + 6 * MIN_MS).depth_stale_bars == 2


def test_negative_staleness_is_refused() -> None:
    """A negative or NaN staleness is refused naming max_staleness_seconds; inf is no limit."""
    from calibration import InvalidParameters

    bars = bars_of([T0_MS, T0_MS + MIN_MS], [1.0, 2.0])
    assert with_depth(bars, depth_frame([-1e6]), max_staleness_seconds=float("inf")
                      ).depth_stale_bars == 0
    for value in (-1.0, float("nan")):
        with pytest.raises(InvalidParameters) as info:
            with_depth(bars, depth_frame([0.0]), max_staleness_seconds=value)
        assert info.value.field == "max_staleness_seconds"


@pytest.mark.data
def test_real_depth_is_not_carried_past_its_day(shared_data: Path, data_file) -> None:  # type: ignore[no-untyped-def]
    """Binance's 2025-10-10 bookDepth covers that day's 5m bars only, not the 17 days after."""
    bars = load_bars(data_file("binance_usdm_perp_5m_2025_10/BTCUSDT_perp_5m.csv"),
                     root=shared_data)
    depth = load_book_depth(
        data_file("btc_2025_10_10_crash_microstructure/BTCUSDT-bookDepth-2025-10-10.csv"),
        root=shared_data)
    out = with_depth(bars, depth)
    snaps = depth["timestamp_ms"].tolist()
    fresh = stale = 0
    for t in bars.timestamp_ms.tolist():  # brute force: the last snapshot at or before t
        before = [s for s in snaps if s <= t]
        if before:
            if t - before[-1] <= 300_000:
                fresh += 1
            else:
                stale += 1
    assert out.bid_depth_usd is not None
    # 24 h of 5m bars: 00:05 on the 10th (the first snapshot is 00:00:07) to 00:00 on the
    # 11th (the last, 23:59:30, is 30 s old then).
    assert np.count_nonzero(np.isfinite(out.bid_depth_usd)) == fresh == 288
    assert out.depth_stale_bars == stale > 4000
    known = bars.timestamp_ms[np.isfinite(out.bid_depth_usd)]
    assert pd.Timestamp(int(known[0]), unit="ms") == pd.Timestamp("2025-10-10 00:05")
    assert pd.Timestamp(int(known[-1]), unit="ms") == pd.Timestamp("2025-10-11 00:00")


# ---------------------------------------------------------------------------------------------
# Messages: plain numbers, no server paths


@pytest.mark.parametrize(("edit", "row", "column"), VALIDATION_CASES)
def test_messages_carry_plain_numbers(tmp_path: Path, edit: tuple[int, str, str], row: int,
                                      column: str) -> None:
    """No numpy repr (np.float64(...)) and no server path reaches a message."""
    rows = shared_rows()
    at, name, value = edit
    rows[at][SHARED_HEADER.index(name)] = value
    with pytest.raises(DataValidationError) as info:
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)
    assert "np." not in str(info.value)
    assert "float64" not in str(info.value)
    assert str(tmp_path) not in str(info.value)


def test_high_below_low_message_shows_the_numbers(tmp_path: Path) -> None:
    """The numbers at fault appear as written: high 99.5 < low 100.0."""
    rows = shared_rows()
    rows[2][SHARED_HEADER.index("high")] = "99.5"
    with pytest.raises(DataValidationError, match=r"high 99\.5 < low 100\.0"):
        load_bars(write_csv(tmp_path, "x.csv", rows), root=tmp_path)


@pytest.mark.parametrize(("name", "body"), [("missing.csv", None), ("bad.parquet", b"PAR1xx")])
def test_file_errors_show_the_reference_not_the_server_path(
        tmp_path: Path, name: str, body: bytes | None) -> None:
    """A missing or unreadable file is named by the reference as given."""
    root = tmp_path / "srv" / "data"
    root.mkdir(parents=True)
    if body is not None:
        (root / name).write_bytes(body)
    with pytest.raises(DataError) as info:
        load_bars(name, root=root)
    assert name in str(info.value)
    assert str(tmp_path) not in str(info.value)
    assert "/srv/" not in str(info.value)


def test_frame_with_its_time_as_index_loads(tmp_path: Path) -> None:
    """A frame (or Parquet file) whose DatetimeIndex is named timestamp keeps its times."""
    cols = expected_columns()
    index = pd.DatetimeIndex(pd.to_datetime(TIMESTAMPS_MS, unit="ms", utc=True),
                             name="timestamp")
    frame = pd.DataFrame({k: cols[k] for k in ("open", "high", "low", "close")}, index=index)
    frame.to_parquet(tmp_path / "x.parquet")
    for bars in (bars_from_frame(frame, instrument="X"), load_bars("x.parquet", root=tmp_path)):
        assert bars.timestamp_ms.tolist() == TIMESTAMPS_MS
        assert bars.close.tolist() == list(cols["close"])


def test_backtest_report_lists_repairs_and_close_only(tmp_path: Path) -> None:
    """The report's dataset block carries the repair policy, each repaired row and the
    close-only flag, so the numbers can be traced to what was changed."""
    from calibration import run_backtest

    rows = ["timestamp_ms,open,high,low,close"]
    for i in range(300):
        price = 100 + (i % 7)
        open_ = price + 10 if i == 5 else price  # open above high: an ohlc-range defect
        rows.append(f"{1_600_000_000_000 + i * 60_000},{open_},{price + 1},{price - 1},{price}")
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    bars = load_bars("x.csv", root=tmp_path, repair=["ohlc-range"])
    report = run_backtest([bars], "tiered", {}, liquidation=None, stress_windows=())
    info = report.datasets[0]
    assert info.repair_policy == ["ohlc-range"]
    assert [r.row for r in info.repairs] == [6]
    assert info.repairs[0].defect == "ohlc-range"
    assert info.close_only is False
    (tmp_path / "c.csv").write_text("timestamp_ms,close\n" + "\n".join(
        f"{1_600_000_000_000 + i * 60_000},{100 + i % 5}" for i in range(300)) + "\n")
    closes = run_backtest([load_bars("c.csv", root=tmp_path)], "tiered", {}, liquidation=None,
                          stress_windows=())
    assert closes.datasets[0].close_only is True


def test_funding_and_depth_are_part_of_the_fingerprint() -> None:
    """Two funding series (or depth snapshots) on the same bars give different fingerprints,
    and a cut or resample keeps them in (domain.md §1: every input series read)."""
    import pandas as pd

    from calibration.calibrate import cut
    from calibration.data import resample, with_depth, with_funding

    close = 100 + np.sin(np.arange(600) / 10)
    bars = bars_from_frame(pd.DataFrame({
        "timestamp_ms": T0_MS + np.arange(600, dtype=np.int64) * 60_000,
        "open": close, "high": close + 1, "low": close - 1, "close": close}), instrument="T")
    funding = pd.DataFrame({"timestamp_ms": [T0_MS + 60_000 * 10], "funding_rate": [0.0001]})
    other = funding.assign(funding_rate=[0.0002])
    a, b = with_funding(bars, funding), with_funding(bars, other)
    assert len({bars.fingerprint, a.fingerprint, b.fingerprint}) == 3
    half = T0_MS + 300 * 60_000
    assert cut(a, None, half).fingerprint != cut(b, None, half).fingerprint
    assert resample(a, 300).fingerprint != resample(b, 300).fingerprint
    depth = pd.DataFrame({"timestamp_ms": [T0_MS], "bid_depth_usd": [1e6], "ask_depth_usd": [2e6]})
    assert with_depth(bars, depth).fingerprint != bars.fingerprint
