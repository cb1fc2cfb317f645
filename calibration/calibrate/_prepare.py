"""Load and split a spec's data once per process (``prepare``), shared by every trial."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np

from calibration._bars import BarSeries
from calibration._errors import (
    DataReferenceError,
    InsufficientData,
    InvalidParameters,
)
from calibration.calibrate._accounts import AccountSetup, is_account_key, prepare_accounts
from calibration.coverage import CoverageConfig, iso_utc
from calibration.data import (
    _subset,
    load_bars,
    load_book_depth,
    load_funding,
    repair_policy,
    with_depth,
    with_funding,
)
from calibration.horizon import Horizon, resolve_horizon
from calibration.liquidation import LiquidationConfig
from calibration.models import FAMILIES, make_model
from calibration.spec import (
    CalibrationSpec,
    DataRefSpec,
    ParamSpec,
    search_space,
    validate_spec,
)
from calibration.windows import DEFAULT_STRESS_WINDOWS, StressWindow


def _day_ms(day: str, field: str) -> int:
    try:
        d = date.fromisoformat(day)
    except ValueError:
        raise InvalidParameters(f"{field}: not an ISO date: {day!r}", field=field) from None
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)


def load_data_ref(ref: DataRefSpec, root: str | os.PathLike[str], field: str) -> BarSeries:
    """The bars one ``DataRefSpec`` names: day range applied, funding and depth attached.

    ``field`` (``data[0]``) prefixes the path in errors about the day range and repairs.
    """
    start = _day_ms(ref.start, f"{field}.start") if ref.start else None
    end = _day_ms(ref.end, f"{field}.end") + 86_400_000 if ref.end else None
    policy = repair_policy(ref.repair, field=f"{field}.repair")
    with _ref_field(f"{field}.ref"):
        bars = load_bars(ref.ref, root=root, instrument=ref.instrument, start_ms=start,
                         end_ms=end, timestamp_format=ref.timestamp_format,
                         timestamp_unit=ref.timestamp_unit, repair=policy)
    if ref.funding:
        with _ref_field(f"{field}.funding"):
            funding = load_funding(ref.funding, root=root)
        bars = with_funding(bars, funding)
    if ref.depth:
        with _ref_field(f"{field}.depth"):
            depth = load_book_depth(ref.depth, root=root)
        bars = with_depth(bars, depth)
    return bars


@contextlib.contextmanager
def _ref_field(field: str) -> Iterator[None]:
    """Name the request's path (``data[0].funding``) on a reference that names no file."""
    try:
        yield
    except DataReferenceError as exc:
        exc.field = field  # type: ignore[attr-defined]
        raise


def cut(bars: BarSeries, start_ms: int | None, end_ms: int | None) -> BarSeries:
    """The bars with ``start_ms <= timestamp < end_ms`` (a new series with its own
    fingerprint)."""
    # Timestamps are strictly increasing, so the kept bars are one range: views of the
    # full arrays, not copies (the in-sample split of five years of minutes is ~0.5 GB).
    ts = bars.timestamp_ms
    lo = 0 if start_ms is None else int(np.searchsorted(ts, start_ms, side="left"))
    hi = len(bars) if end_ms is None else int(np.searchsorted(ts, end_ms, side="left"))
    hi = max(lo, hi)
    return bars if (lo, hi) == (0, len(bars)) else _subset(bars, slice(lo, hi))


@dataclass(frozen=True)
class Prepared:
    """Data loaded and split once per process, shared by every trial.

    Attributes:
        spec: the validated spec.
        full: each instrument's bars over the whole requested span.
        in_sample: the same bars before ``in_sample_end_ms`` (what trials see).
        in_sample_end_ms: the in-sample / out-of-sample boundary, epoch ms UTC.
        stress_windows: the named windows of the spec (or domain.md's).
        folds: the out-of-sample segments, as windows ``oos_fold_1`` ...
        liquidation: the position population and close-out settings.
        fingerprints: instrument → content fingerprint of its full bars.
        horizon: the one close-out horizon of every trial (domain.md §2).
        space: the search space, with ``horizon_bars`` fixed to ``horizon`` for families
            that have one (what trials run with).
        accounts: the account population and settings (``calibrate._accounts``), or
            ``None`` when no metric or key needs accounts.
    """

    spec: CalibrationSpec
    full: tuple[BarSeries, ...]
    in_sample: tuple[BarSeries, ...]
    in_sample_end_ms: int
    stress_windows: tuple[StressWindow, ...]
    folds: tuple[StressWindow, ...]
    liquidation: LiquidationConfig
    fingerprints: dict[str, str]
    horizon: Horizon
    space: dict[str, ParamSpec]
    accounts: AccountSetup | None = None

    @property
    def coverage(self) -> CoverageConfig:
        """Coverage settings of every evaluation."""
        return CoverageConfig(horizon_bars=self.horizon.bars)


def _liquidation_config(spec: CalibrationSpec, bar_seconds: int) -> LiquidationConfig:
    """The spec's liquidation settings over defaults scaled to the bar size: a new cohort
    every day, held a week, latency one bar, recovery one day."""
    per_day = max(1, 86_400 // bar_seconds)
    base: dict[str, Any] = {
        "entry_every_bars": per_day, "holding_bars": 7 * per_day, "recovery_bars": per_day,
        "adv_window_bars": per_day,
    }
    return LiquidationConfig.from_mapping(spec.liquidation, defaults=base)


def prepare(spec: CalibrationSpec, root: str | os.PathLike[str]) -> Prepared:
    """Load, validate and split the spec's data; check what needs the data.

    Raises:
        DataError, InvalidParameters, InsufficientData: a reference, window or horizon that
            does not fit the data — before any trial runs.
    """
    validate_spec(spec)  # a spec built in Python has not been through decode_spec
    full = [load_data_ref(d, root, f"data[{i}]") for i, d in enumerate(spec.data)]
    return prepare_bars(spec, full, root=root)


def prepare_bars(spec: CalibrationSpec, full: Sequence[BarSeries], *,
                 root: str | os.PathLike[str] = ".") -> Prepared:
    """``prepare`` on bars already in memory, one series per ``spec.data`` entry in its order
    (each series' ``instrument`` as the entry names it); the entries' references are not read.
    ``root`` is where the other files a spec names (an account population's) are read from.

    Raises:
        InvalidParameters, InsufficientData: as ``prepare``; also a series count or an
            instrument name that does not match ``spec.data``.
    """
    validate_spec(spec)
    full = list(full)
    if len(full) != len(spec.data):
        raise InvalidParameters(f"{len(full)} bar series for {len(spec.data)} data entries",
                                field="data")
    for i, (d, b) in enumerate(zip(spec.data, full, strict=True)):
        if b.instrument != d.instrument:
            raise InvalidParameters(f"series {i} is {b.instrument!r}, the entry names "
                                    f"{d.instrument!r}", field=f"data[{i}].instrument")
    first = max(int(b.timestamp_ms[0]) for b in full)
    last = min(int(b.timestamp_ms[-1]) for b in full)
    if first >= last:
        raise InvalidParameters("the instruments' data do not overlap in time", field="data")
    wf = spec.walk_forward
    if wf.in_sample_end:
        split = _day_ms(wf.in_sample_end, "walk_forward.in_sample_end")
        if not first < split < last:
            raise InvalidParameters(
                f"in_sample_end {wf.in_sample_end} is outside the common data span "
                f"{iso_utc(first)} .. {iso_utc(last)}", field="walk_forward.in_sample_end")
    else:
        split = first + int((last - first) * wf.in_sample_fraction)
    if spec.stress_windows is None:
        windows = tuple(w for w in DEFAULT_STRESS_WINDOWS if w.start_ms <= last
                        and w.end_ms > first)
    else:
        windows = tuple(StressWindow.from_dates(w.name, w.start, w.end)
                        for w in spec.stress_windows)
        for i, w in enumerate(windows):
            if w.start_ms > last or w.end_ms <= first:
                raise InvalidParameters(
                    f"stress window {w.name!r} lies outside the data "
                    f"({iso_utc(first)} .. {iso_utc(last)})", field=f"stress_windows[{i}]")
    edges = np.linspace(split, last + 1, wf.folds + 1).astype(np.int64)
    folds = tuple(StressWindow(f"oos_fold_{k + 1}", int(edges[k]), int(edges[k + 1]))
                  for k in range(wf.folds))
    in_sample = tuple(cut(b, None, split) for b in full)
    sizes = [b.bar_seconds for b in full]
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            raise InvalidParameters(
                f"{full[i].instrument} has {size} s bars, {full[0].instrument} {sizes[0]} s: "
                "one close-out horizon needs one bar size", field=f"data[{i}].ref")
    space = search_space(spec)
    fixed = space.get("horizon_bars")
    close_out = resolve_horizon(
        {"horizon_bars": spec.horizon_bars, "horizon": spec.horizon,
         "search_space.horizon_bars": fixed.value if fixed is not None else None},
        sizes[0])
    if "horizon_bars" in FAMILIES[spec.model].param_names():
        space["horizon_bars"] = ParamSpec(value=close_out.bars, integer=True)
    liquidation = _liquidation_config(spec, full[0].bar_seconds)
    probe = make_model(spec.model, _fixed_or_low(spec)).with_horizon(close_out.bars)
    horizon = close_out.bars
    for b in in_sample:
        need = probe.first_valid_bar() + horizon + 1
        if len(b) <= need:
            raise InsufficientData(
                f"{b.instrument}: {len(b)} in-sample bars; the model's warm-up and horizon "
                f"need more than {need}")
    fingerprints = {b.instrument: b.fingerprint for b in full}
    accounts = prepare_accounts(spec, root, full, in_sample, liquidation, close_out.bars,
                                fingerprints)
    return Prepared(
        spec=spec, full=tuple(full), in_sample=in_sample, in_sample_end_ms=split,
        stress_windows=windows, folds=folds, liquidation=liquidation,
        fingerprints=fingerprints, horizon=close_out, space=space, accounts=accounts,
    )


def _fixed_or_low(spec: CalibrationSpec) -> dict[str, Any]:
    out = {}
    for name, p in search_space(spec).items():
        if is_account_key(name):
            continue
        value = p.value if p.value is not None else p.low
        out[name] = round(value) if p.integer and value is not None else value
    return out
