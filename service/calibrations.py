"""``/v1/calibrations``: submit, follow (JSON or Server-Sent Events), cancel, read results."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, Parameter, QueryParameter
from litestar.response import ServerSentEvent

from calibration._errors import InvalidParameters
from calibration._version import ENGINE_VERSION
from calibration.calibrate import (
    CalibrationResult,
    Comparison,
    Prepared,
    compare_results,
    prepare,
    study_name,
)
from calibration.spec import INSTRUMENT_PATTERN, CalibrationSpec, spec_hash, validate_spec
from service import examples
from service.auth import requires
from service.errors import COMMON, PayloadTooLarge, problem_responses, redact
from service.jobs import now_iso
from service.limits import check_refs
from service.progress import ProgressHub, with_progress
from service.schemas import CalibrationJob, CalibrationPage, JobState
from service.settings import Settings
from service.state import State, Svc

FINAL = ("succeeded", "failed", "cancelled")
JobId = Annotated[str, Parameter(description="calibration id (32 hex digits)", min_length=1,
                                 max_length=64, pattern=r"^[0-9A-Za-z_-]+$",
                                 examples=[examples.JOB_ID])]


def cache_key(spec: CalibrationSpec, prepared: Prepared) -> str:
    """Canonical hash of (spec, data fingerprints, engine version): the result cache key."""
    parts = [spec_hash(spec), *(f"{k}={v}" for k, v in sorted(prepared.fingerprints.items())),
             ENGINE_VERSION]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _links(job: CalibrationJob, settings: Settings | None = None) -> CalibrationJob:
    """The job as clients see it: its URLs, and an error without the server's secrets."""
    error = job.error
    if error is not None:
        error = redact(error, data_root=settings.data_root if settings else None,
                       state_dir=settings.state_dir if settings else None)
    return msgspec.structs.replace(
        job, status_url=f"/v1/calibrations/{job.id}",
        result_url=f"/v1/calibrations/{job.id}/result", error=error)


class CalibrationController(Controller):
    """Calibration jobs run by workers; results cached by their inputs."""

    path = "/v1/calibrations"
    tags = ["calibrations"]

    @post("/", guards=[requires("operator")], status_code=202,
          summary="Start (or join, or answer from cache) a calibration",
          description=(
              "Validated before anything runs. An identical request (same spec, same data "
              "fingerprints, same engine) returns the cached result's job at once "
              "(`cached: true`, 200); one identical to a queued or running job joins it "
              "(`joined: true`)."
          ), responses={**problem_responses(*COMMON, 400, 413, 422), 200: ResponseSpec(
              data_container=CalibrationJob, generate_examples=False,
              description="answered from the result cache (`cached: true`)")})
    async def create(
        self, request: Request[Any, Any, Any], svc: Svc,
        data: Annotated[CalibrationSpec, Body(examples=[examples.CALIBRATION])],
    ) -> Response[CalibrationJob]:
        settings: Settings = request.app.state.settings
        validate_spec(data)
        if data.n_trials is None:
            # A time budget alone has no trial bound: MARGINLAB_MAX_TRIALS would not hold.
            raise InvalidParameters(f"this server needs n_trials (at most {settings.max_trials}"
                                    "); timeout_seconds may cut it short", field="n_trials")
        if data.n_trials > settings.max_trials:
            raise PayloadTooLarge(f"n_trials {data.n_trials} is above the limit of "
                                  f"{settings.max_trials}", field="n_trials")
        await anyio.to_thread.run_sync(lambda: check_refs(
            [(f"data[{i}]", d) for i, d in enumerate(data.data)], settings.data_root,
            per_file=settings.max_file_rows, total=settings.max_job_rows))
        prepared = await anyio.to_thread.run_sync(prepare, data, settings.data_root)
        key = cache_key(data, prepared)
        existing_id = await svc.get("dedup", key, str)
        if existing_id:
            existing = await svc.get("jobs", existing_id, CalibrationJob)
            cached = await svc.stores["results"].exists(key)
            if existing is not None and existing.state == "succeeded" and cached:
                job = msgspec.structs.replace(existing, cached=True)
                return Response(_links(job), status_code=200)
            if existing is not None and existing.state in ("queued", "running"):
                return Response(_links(msgspec.structs.replace(existing, joined=True)),
                                status_code=202)
        job = CalibrationJob(
            id=uuid.uuid4().hex, state="queued", cache_key=key, spec_hash=spec_hash(data),
            study=f"{study_name(data)}-{key[:8]}", model=data.model,
            instruments=[d.instrument for d in data.data], n_trials=data.n_trials,
            created_at=now_iso(),
        )
        await svc.stores["jobs"].set(f"{job.id}:spec", msgspec.json.encode(data))
        await svc.put("jobs", job.id, job)
        await _remember(request, svc, job.id)
        await svc.put("dedup", key, job.id, expires_in=settings.result_ttl_s)
        runner = request.app.state.runner
        try:
            await anyio.to_thread.run_sync(runner.submit, job.id)
        except Exception:
            # Not queued: a later identical request must start afresh, not join a ghost.
            with contextlib.suppress(Exception):
                await svc.delete("dedup", key)
                await svc.put("jobs", job.id, msgspec.structs.replace(
                    job, state="failed", finished_at=now_iso(),
                    error="could not be queued; submit again"))
            raise
        # After queuing: what the reconciler finds active always has its queue entries.
        await svc.add_active(job.id)
        return Response(_links(job), status_code=202)

    @get("/", guards=[requires("reader")],
         summary="List calibrations, newest first (filters, pagination)",
         description="Each calibration's state, instrument(s), model and times, without "
                     "progress (read one calibration for that). Filters combine (and).",
         responses={**problem_responses(*COMMON, 400, 422), 200: ResponseSpec(
             data_container=CalibrationPage, generate_examples=False,
             description="one page of calibrations", examples=[examples.CALIBRATIONS])})
    async def list_calibrations(
        self, request: Request[Any, Any, Any], svc: Svc,
        job_state: Annotated[JobState | None, QueryParameter(
            name="state", description="only calibrations in this state")] = None,
        instrument: Annotated[str | None, Parameter(
            description="only calibrations on this instrument", min_length=1,
            max_length=64, pattern=INSTRUMENT_PATTERN)] = None,
        created_after: Annotated[str | None, Parameter(
            description="only calibrations created at or after this UTC instant (ISO 8601)",
            max_length=40, pattern=_ISO_INSTANT)] = None,
        created_before: Annotated[str | None, Parameter(
            description="only calibrations created before this UTC instant (ISO 8601)",
            max_length=40, pattern=_ISO_INSTANT)] = None,
        limit: Annotated[int, Parameter(description="page size (count)", ge=1,
                                        le=MAX_PAGE)] = 50,
        offset: Annotated[int, Parameter(description="calibrations to skip (count)",
                                         ge=0, le=MAX_LISTED)] = 0,
    ) -> CalibrationPage:
        after = _instant(created_after, "created_after")
        before = _instant(created_before, "created_before")
        ids = await _listed(request, svc)
        matching: list[CalibrationJob] = []
        for job_id in reversed(ids):
            job = await svc.get("jobs", job_id, CalibrationJob)
            if job is None or (job_state and job.state != job_state) or (
                    instrument and instrument not in job.instruments):
                continue
            created = _instant(job.created_at, "created_at")
            if (after and created and created < after) or (
                    before and created and created >= before):
                continue
            matching.append(job)
        page = [_links(j) for j in matching[offset:offset + limit]]
        more = offset + limit < len(matching)
        return CalibrationPage(items=page, total=len(matching), limit=limit, offset=offset,
                               next_offset=offset + limit if more else None)

    @get("/{job_id:str}", guards=[requires("reader")],
         summary="A calibration's state and progress (kept in its record by the workers)",
         responses=problem_responses(*COMMON, 404))
    async def status(self, request: Request[Any, Any, Any], svc: Svc,
                     job_id: JobId) -> CalibrationJob:
        job = await with_progress(svc, await _job(svc, job_id))
        return _links(job, request.app.state.settings)

    @get("/{job_id:str}/events", guards=[requires("reader")], media_type="text/event-stream",
         summary="Progress as Server-Sent Events until the job ends",
         responses={**problem_responses(*COMMON, 404), 200: ResponseSpec(
             data_container=str, media_type="text/event-stream", generate_examples=False,
             description="`event: progress` records whose `data:` is the job as JSON "
                         "(a CalibrationJob with its progress), one per change; the stream "
                         "ends after the job's final state")})
    async def events(self, request: Request[Any, Any, Any], svc: Svc,
                     job_id: JobId) -> ServerSentEvent:
        await _job(svc, job_id)
        hub = _hub(request, svc)

        async def stream() -> AsyncIterator[str]:
            async for payload in hub.subscribe(job_id):
                yield payload.decode()

        return ServerSentEvent(stream(), event_type="progress")

    @delete("/{job_id:str}", guards=[requires("operator")], status_code=200,
            summary="Cancel a calibration (workers stop after their current trial)",
         responses=problem_responses(*COMMON, 404))
    async def cancel(self, svc: Svc, job_id: JobId) -> CalibrationJob:
        job = await _job(svc, job_id)
        if job.state not in FINAL:
            job = msgspec.structs.replace(job, state="cancelled", finished_at=now_iso())
            await svc.put("jobs", job_id, job)
            await svc.delete("dedup", job.cache_key)
            await svc.drop_active(job_id)
        return _links(job)

    @get("/{job_id:str}/report", guards=[requires("reader")], media_type="text/html",
         summary="A self-contained HTML report (charts, coverage table, change vs published)",
         responses=problem_responses(*COMMON, 404))
    async def report(self, request: Request[Any, Any, Any], svc: Svc,
                     job_id: JobId) -> Response[str]:
        job = await _job(svc, job_id)
        raw = await svc.stores["results"].get(job.cache_key)
        if raw is None:
            raise NotFoundException(f"calibration {job_id} has no result yet ({job.state})")
        spec_raw = await svc.stores["jobs"].get(f"{job_id}:spec") or b""
        result = msgspec.json.decode(raw, type=CalibrationResult)
        page = await anyio.to_thread.run_sync(_report, request.app.state.settings, spec_raw,
                                              result)
        return Response(page, media_type="text/html")

    @get("/{job_id:str}/compare/{other_id:str}", guards=[requires("reader")],
         summary="Two finished calibrations side by side, against the published parameters",
         description=(
             "Parameters, objectives and per-window evidence of both recommendations, and the "
             "published parameters (those of the first calibration's spec) replayed over "
             "the first calibration's history; `recommended` applies the calibration's rule "
             "to the three."
         ), responses=problem_responses(*COMMON, 404))
    async def compare(self, request: Request[Any, Any, Any], svc: Svc, job_id: JobId,
                      other_id: Annotated[str, Parameter(
                          description="the second calibration's id", min_length=1,
                          max_length=64, pattern=r"^[0-9A-Za-z_-]+$")]) -> Comparison:
        results = []
        for an_id in (job_id, other_id):
            job = await _job(svc, an_id)
            raw = await svc.stores["results"].get(job.cache_key)
            if raw is None:
                raise NotFoundException(f"calibration {an_id} has no result ({job.state})")
            results.append(msgspec.json.decode(raw, type=CalibrationResult))
        spec_raw = await svc.stores["jobs"].get(f"{job_id}:spec") or b""
        settings: Settings = request.app.state.settings
        first, second = results
        comparison: Comparison = await anyio.to_thread.run_sync(
            _compare, settings, spec_raw, first, second)
        return comparison

    @get("/{job_id:str}/result", guards=[requires("reader")],
         summary="Pareto front, recommendation and evidence of a finished calibration",
         responses=problem_responses(*COMMON, 404))
    async def result(self, request: Request[Any, Any, Any], svc: Svc,
                     job_id: JobId) -> CalibrationResult:
        job = await _job(svc, job_id)
        raw = await svc.stores["results"].get(job.cache_key)
        if raw is None:
            detail = (f"calibration {job_id} is {job.state}; no result yet" if job.state not in
                      FINAL else f"calibration {job_id} ended {job.state}; no result")
            raise NotFoundException(detail)
        result = msgspec.json.decode(raw, type=CalibrationResult)
        settings: Settings = request.app.state.settings
        # The study storage's URL may carry a password and a server path: never sent out.
        return msgspec.structs.replace(result, storage=redact(
            result.storage, data_root=settings.data_root, state_dir=settings.state_dir))


def _compare(settings: Settings, spec_raw: bytes, a: CalibrationResult,
             b: CalibrationResult) -> Comparison:
    from calibration.spec import decode_spec

    prepared = prepare(decode_spec(spec_raw), settings.data_root) if spec_raw else None
    return compare_results(a, b, prepared=prepared)


def _hub(request: Request[Any, Any, Any], svc: State) -> ProgressHub:
    """This process's progress feeds (made on first use)."""
    hub: ProgressHub | None = getattr(request.app.state, "progress_hub", None)
    if hub is None:
        settings: Settings = request.app.state.settings

        async def render(job_id: str) -> tuple[bytes, bool] | None:
            job = await svc.get("jobs", job_id, CalibrationJob)
            if job is None:
                return None
            job = _links(await with_progress(svc, job), settings)
            return msgspec.json.encode(job), job.state in FINAL

        hub = ProgressHub(render)
        request.app.state.progress_hub = hub
    return hub


def _report(settings: Settings, spec_raw: bytes, result: CalibrationResult) -> str:
    from calibration.html_report import render_calibration_report
    from calibration.spec import decode_spec

    prepared = prepare(decode_spec(spec_raw), settings.data_root)
    return render_calibration_report(result, prepared)


#: Key, in the jobs store, of the ids of every calibration in creation order (the newest
#: ``MAX_LISTED`` kept).
_INDEX = "_index"
MAX_LISTED = 10_000
MAX_PAGE = 200
_ISO_INSTANT = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9:.]+(Z|[+-][0-9]{2}:?[0-9]{2})?)?$"
_index_lock = asyncio.Lock()


async def _remember(request: Request[Any, Any, Any], svc: Svc, job_id: str) -> None:
    """Add a calibration to the listing's index (atomically in Redis, under a lock in the
    one embedded process); in Redis mode also in the durable table (``listing`` rows,
    written once, in creation order), so a Redis restarted without persistence loses no
    calibration from the listing."""
    redis = getattr(request.app.state, "redis", None)
    if redis is not None:
        if svc.durable is not None:
            await anyio.to_thread.run_sync(svc.durable.set, _LISTING, job_id, b"", None)
        # The Redis store and this list share the server: RPUSH + LTRIM cannot lose an id to
        # a concurrent request of another API process.
        await redis.rpush(INDEX_KEY, job_id)
        await redis.ltrim(INDEX_KEY, -MAX_LISTED, -1)
        return
    async with _index_lock:
        ids = await _listed(request, svc)
        await svc.put("jobs", _INDEX, [*ids, job_id][-MAX_LISTED:])


INDEX_KEY = "marginlab:calibration-index"
#: Namespace of the listing's rows in the durable table (Redis mode).
_LISTING = "listing"


async def _listed(request: Request[Any, Any, Any], svc: Svc) -> list[str]:
    """Calibration ids, oldest first (the newest ``MAX_LISTED``)."""
    redis = getattr(request.app.state, "redis", None)
    if redis is not None:
        if svc.durable is not None:  # the truth; Redis's list may have been lost
            ids = await anyio.to_thread.run_sync(svc.durable.keys, _LISTING)
            return ids[-MAX_LISTED:]
        # A retried RPUSH may have landed twice: keep each id once, at its first place.
        return list(dict.fromkeys(i.decode() for i in await redis.lrange(INDEX_KEY, 0, -1)))
    return await svc.get("jobs", _INDEX, list[str]) or []


def _instant(text: str | None, field: str) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidParameters(f"{field}: not an ISO 8601 instant: {text[:40]!r}",
                                field=field) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def _job(svc: Svc, job_id: JobId) -> CalibrationJob:
    job = await svc.get("jobs", job_id, CalibrationJob)
    if job is None:
        raise NotFoundException(f"no calibration {job_id!r}")
    return job
