"""Wire types of the API (msgspec Structs); the domain's own Structs are reused as they are."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Request
from litestar.exceptions import ClientException, ValidationException
from litestar.utils.empty import value_or_default

from calibration.spec import (
    MAX_HORIZON_BARS,
    MAX_INSTRUMENTS,
    MAX_WINDOWS,
    DataRefSpec,
    Instrument,
    ParamName,
    Short,
    StressWindowSpec,
    error_path,
)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


IsoTime = Annotated[str, msgspec.Meta(description="UTC instant, ISO 8601")]
_M = msgspec.Meta


class DatasetInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An uploaded dataset: where it lives, what it is, what validation found."""

    id: Annotated[str, _M(description="dataset id: 16 hex digits of sha256 over "
                                      "(instrument, format, fingerprint)")]
    instrument: Annotated[str, _M(description="instrument name")]
    ref: Annotated[str, _M(description="data reference relative to the data root")]
    fingerprint: Annotated[str, _M(description="sha256 of the validated bars (hex)")]
    rows: Annotated[int, _M(description="bars in the file (count)")]
    start: Annotated[str, _M(description="open time of the first bar, UTC ISO 8601")]
    end: Annotated[str, _M(description="open time of the last bar, UTC ISO 8601")]
    bar_seconds: Annotated[int, _M(description="bar size (s)")]
    gaps: Annotated[list[dict[str, Any]], _M(
        description="missing stretches: `after_row` (1-based row), `start_ms` (epoch ms "
                    "UTC), `missing_bars` (count)")]
    missing_bars: Annotated[int, _M(description="bars missing in all gaps (count)")]
    suspect_prints: Annotated[list[str], _M(
        description="open times (UTC ISO 8601) of bars whose wick looks like a bad print")]
    uploaded_at: IsoTime
    size_bytes: Annotated[int, _M(description="size of the uploaded file (bytes)")]
    format: Annotated[str, _M(description="file format: csv or parquet")] = "csv"
    version: Annotated[int, _M(description="version of this instrument's data, 1 = first "
                                           "upload (count)")] = 1
    latest: Annotated[bool, _M(description="whether this is the instrument's latest "
                                           "version")] = True


class BacktestRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A synchronous backtest: data references, model, parameters and settings.

    The close-out horizon is one quantity (it sizes the margin and is the coverage test's
    loss window): ``horizon_bars`` in bars, ``horizon`` as a duration (``1h``, ``2d``), or
    ``params.horizon_bars``; set it once (or alike everywhere); default 1h.
    """

    data: Annotated[list[DataRefSpec], _M(
        min_length=1, max_length=MAX_INSTRUMENTS, description="one entry per instrument")]
    model: Annotated[str, _M(
        max_length=32, description="margin model family (`tiered`, `ewma`, `fhs`)")]
    params: Annotated[dict[ParamName, Any], _M(
        max_length=64, description="the model's parameters, each in its own units "
                                   "(domain.md §2); unset ones take the defaults")] = {}
    horizon_bars: Annotated[int, _M(
        ge=1, le=MAX_HORIZON_BARS, description="close-out horizon (bars)")] | None = None
    horizon: Annotated[Short, _M(
        description="close-out horizon as a duration (`1h`, `2d`)")] | None = None
    coverage_level: Annotated[float, _M(
        gt=0, lt=1, description="VaR level of the coverage tests (probability); default the "
                                "model's confidence")] | None = None
    overlapping: Annotated[bool, _M(
        description="observe every bar (true) or every horizon-th bar (false)")] = True
    margin: Annotated[Literal["mm", "im"], _M(
        description="the margin the coverage test measures (maintenance or initial)")] = "mm"
    notional_usd: Annotated[float, _M(
        gt=0, le=1e12, description="notional of the coverage table's USD figures (USD)")] = (
        10_000.0)
    liquidation: Annotated[dict[ParamName, Any], _M(
        max_length=64, description="LiquidationConfig fields (position grid, close-out); "
                                   "null: no simulation")] | None = {}
    stress_windows: Annotated[list[StressWindowSpec], _M(
        max_length=MAX_WINDOWS,
        description="named windows; null: domain.md's crash episodes")] | None = None


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """Progress of a calibration, kept in its job record by the workers as trials finish
    (at most every 0.5 s per worker, and once when a worker stops): reading it never reads
    the study."""

    trials_done: Annotated[int, _M(description="trials complete or pruned (count)")]
    trials_total: Annotated[int | None, _M(description="trials asked for (count)")]
    running: Annotated[int, _M(description="trials running now (count)")]
    failed: Annotated[int, _M(description="trials that failed (count)")]
    best_feasible: Annotated[dict[str, Any] | None, _M(
        description="the best feasible trial so far: parameters and objectives")]
    eta_seconds: Annotated[float | None, _M(description="time to the last trial (s)")]
    updated_at: Annotated[str | None, _M(
        description="when a worker last wrote these numbers, UTC ISO 8601")] = None


class CalibrationJob(msgspec.Struct, frozen=True, kw_only=True):
    """A calibration job and its state."""

    id: Annotated[str, _M(description="calibration id (32 hex digits)")]
    state: Annotated[JobState, _M(description="queued, running, succeeded, failed, cancelled")]
    cache_key: Annotated[str, _M(
        description="sha256 of spec, data fingerprints and engine version (hex)")]
    spec_hash: Annotated[str, _M(description="sha256 of the canonical spec (hex)")]
    study: Annotated[str, _M(description="Optuna study name")]
    model: Annotated[str, _M(description="margin model family")]
    instruments: Annotated[list[str], _M(description="instruments, in the spec's order")]
    n_trials: Annotated[int | None, _M(description="trials asked for (count)")]
    created_at: IsoTime
    started_at: Annotated[str | None, _M(
        description="when a worker started it, UTC ISO 8601")] = None
    finished_at: Annotated[str | None, _M(description="when it ended, UTC ISO 8601")] = None
    error: Annotated[str | None, _M(description="why it failed, for a person to act on")] = None
    cached: Annotated[bool, _M(description="answered from the result cache")] = False
    joined: Annotated[bool, _M(description="joined an identical queued or running job")] = False
    status_url: Annotated[str, _M(description="path of this job's state")] = ""
    result_url: Annotated[str, _M(description="path of this job's result")] = ""
    progress: Annotated[Progress | None, _M(
        description="progress kept in the job record by its workers")] = None


class CalibrationPage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of calibrations, newest first."""

    items: Annotated[list[CalibrationJob], _M(description="this page's calibrations")]
    total: Annotated[int, _M(description="calibrations matching the filters (count)")]
    limit: Annotated[int, _M(description="page size asked for (count)")]
    offset: Annotated[int, _M(description="calibrations before this page (count)")]
    next_offset: Annotated[int | None, _M(
        description="offset of the next page; null on the last")]


class PublishedParameters(msgspec.Struct, frozen=True, kw_only=True):
    """The parameters in force for an instrument (what other services poll)."""

    instrument: Annotated[str, _M(description="instrument name")]
    model: Annotated[str, _M(description="margin model family")]
    params: Annotated[dict[str, Any], _M(
        description="the published parameters, each in its own units")]
    version: Annotated[int, _M(description="audit version of this update (1, 2, ...)")]
    published_at: IsoTime
    calibration_id: Annotated[str | None, _M(
        description="the calibration it came from, if any")] = None
    data_fingerprints: Annotated[dict[str, str], _M(
        description="instrument → sha256 of the bars the calibration used (hex)")] = {}


class PublishResult(PublishedParameters, frozen=True, kw_only=True):
    """A publish's answer: the update of the instrument, and what was published with it."""

    published_with: Annotated[dict[str, int], _M(
        description="key → audit version of each account-level set of the recommendation "
                    "published in the same update (liquidation engine, portfolio grid, "
                    "haircut schedules); empty for a model alone")] = {}


InstrumentPath = Annotated[Instrument, msgspec.Meta(description="instrument name")]


class StrictRequest(Request[Any, Any, Any]):
    """A request whose JSON body is decoded straight into the handler's ``data`` type, strictly.

    Litestar decodes a body to plain values and then converts them with ``strict=False``,
    which coerces ``"5"`` to 5 and ``0`` to false, and recurses over the untyped document (a
    body nested 1000 deep raised ``RecursionError``, a 500). Here a typed, strict msgspec
    decode refuses both with a 400 naming the full path (``data[0].ref``); the signature's
    own conversion then passes the decoded Struct through unchanged.
    """

    async def json(self) -> Any:
        cached = value_or_default(self._json, None)
        if cached is not None:
            return cached
        body = await self.body() or b"null"
        field = self.route_handler.parsed_fn_signature.parameters.get("data")
        target = field.annotation if field is not None and field.is_subclass_of(
            msgspec.Struct) else Any
        try:
            value = msgspec.json.decode(body, type=target)
        except msgspec.ValidationError as exc:
            path = error_path(exc) or "body"
            raise ValidationException(
                f"Validation failed for {self.method} {self.url.path}",
                extra=[{"key": path, "message": str(exc), "source": "body"}]) from None
        except (msgspec.DecodeError, RecursionError) as exc:
            reason = ("is nested too deeply" if isinstance(exc, RecursionError)
                      else "is not valid JSON")
            raise ClientException(f"the request body {reason}",
                                  extra={"field": "body"}) from None
        self._json = self._connection_state.json = value
        return value
