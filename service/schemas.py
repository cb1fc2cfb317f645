"""Wire types of the API (msgspec Structs); the domain's own Structs are reused as they are."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from calibration.spec import DataRefSpec, StressWindowSpec

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class DatasetInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An uploaded dataset: where it lives, what it is, what validation found.

    ``id`` is unique per (instrument, content fingerprint, format); ``version`` counts the
    instrument's datasets from 1 in upload order, ``latest`` marks its newest.
    """

    id: str
    instrument: str
    ref: str
    fingerprint: str
    rows: int
    start: str
    end: str
    bar_seconds: int
    gaps: list[dict[str, Any]]
    missing_bars: int
    suspect_prints: list[str]
    uploaded_at: str
    size_bytes: int
    format: str = "csv"
    version: int = 1
    latest: bool = True


class BacktestRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A synchronous backtest: data references, model, parameters and settings.

    The close-out horizon is one quantity (it sizes the margin and is the coverage test's
    loss window): ``horizon_bars`` in bars, ``horizon`` as a duration (``1h``, ``2d``), or
    ``params.horizon_bars``; set it once (or alike everywhere); default 1h.
    """

    data: list[DataRefSpec]
    model: str
    params: dict[str, Any] = {}
    horizon_bars: int | None = None
    horizon: str | None = None
    coverage_level: float | None = None
    overlapping: bool = True
    margin: Literal["mm", "im"] = "mm"
    notional_usd: float = 10_000.0
    liquidation: dict[str, Any] | None = {}
    stress_windows: list[StressWindowSpec] | None = None


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """Progress read from the study itself."""

    trials_done: int
    trials_total: int | None
    running: int
    failed: int
    best_feasible: dict[str, Any] | None
    eta_seconds: float | None


class CalibrationJob(msgspec.Struct, frozen=True, kw_only=True):
    """A calibration job and its state."""

    id: str
    state: JobState
    cache_key: str
    spec_hash: str
    study: str
    model: str
    instruments: list[str]
    n_trials: int | None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    cached: bool = False
    joined: bool = False
    status_url: str = ""
    result_url: str = ""
    progress: Progress | None = None


class PublishedParameters(msgspec.Struct, frozen=True, kw_only=True):
    """The parameters in force for an instrument (what other services poll)."""

    instrument: str
    model: str
    params: dict[str, Any]
    version: int
    published_at: str
    calibration_id: str | None = None
    data_fingerprints: dict[str, str] = {}
