"""``/v1/recommendations/{instrument}``: the parameters in force, polled before every listing.

Hot path: each API process keeps the published parameters in memory and serves them with an
ETag (``304`` on ``If-None-Match``); with Redis a pub/sub message on publish drops the cached
entry in every process, so nothing stale is served beyond the message's delivery.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, Parameter
from sqlalchemy.exc import IntegrityError

from calibration._errors import InvalidParameters, MarginlabError
from calibration.calibrate import CalibrationResult
from calibration.models import make_model
from calibration.publishing import Violation, check_update
from calibration.spec import INSTRUMENT_PATTERN
from service import examples
from service.audit import AuditLog, UpdateRecord
from service.auth import check_role, principal_of, requires
from service.errors import COMMON, problem_responses
from service.schemas import CalibrationJob, PublishedParameters
from service.state import State, Svc

CHANNEL = "marginlab:published"


class PublishedCache:
    """Per-process cache of encoded published parameters and their ETags."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[bytes, str]] = {}

    def get(self, instrument: str) -> tuple[bytes, str] | None:
        return self._entries.get(instrument)

    def put(self, instrument: str, body: bytes) -> tuple[bytes, str]:
        entry = (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
        self._entries[instrument] = entry
        return entry

    def drop(self, instrument: str | None = None) -> None:
        if instrument is None:
            self._entries.clear()
        else:
            self._entries.pop(instrument, None)


async def publish(svc: Svc, value: PublishedParameters, redis: Any | None) -> None:
    """Store published parameters and tell every API process to drop its cached copy."""
    await svc.put("published", value.instrument, value)
    if redis is not None:
        await redis.publish(CHANNEL, value.instrument)


class RecommendationController(Controller):
    """Published parameters per instrument: read (hot path), publish (admin), history."""

    path = "/v1/recommendations"
    tags = ["recommendations"]

    # The hot path other services poll: the reader check runs inline (a guard costs a copy
    # of the route handler per request in Litestar) and the state comes without DI.
    @get("/{instrument:str}", opt={"role": "reader"},
         summary="The parameters in force for an instrument (ETag, 304 when unchanged)",
         responses={**problem_responses(*COMMON, 404),
             200: ResponseSpec(generate_examples=False, data_container=PublishedParameters,
                               description="the published parameters",
                               examples=[examples.PUBLISHED]),
             304: ResponseSpec(generate_examples=False, data_container=None,
                               description="unchanged since the ETag"),
         })
    async def get_published(
        self, request: Request[Any, Any, Any],
        instrument: Annotated[str, Parameter(description="instrument", min_length=1,
                                             max_length=64, pattern=INSTRUMENT_PATTERN,
                                             examples=[examples.INSTRUMENT])],
    ) -> Response[bytes]:
        await check_role(request, "reader")
        svc: State = request.app.state.service_state
        cache: PublishedCache = request.app.state.published_cache
        # Only Redis mode has the pub/sub listener that drops stale entries; embedded mode
        # (one process, a file store) reads the store every time so a publish shows at once.
        entry = cache.get(instrument) if request.app.state.settings.redis_url else None
        if entry is None:
            raw = await svc.stores["published"].get(instrument)
            if raw is None:
                # The audit trail is the source of truth; the store is its fast copy.
                record = await anyio.to_thread.run_sync(request.app.state.audit.latest,
                                                        instrument)
                if record is None:
                    raise NotFoundException(f"no published parameters for {instrument!r}")
                raw = msgspec.json.encode(_to_published(record))
                await svc.stores["published"].set(instrument, raw)
            entry = cache.put(instrument, raw)
        body, etag = entry
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(b"", status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    @post("/{instrument:str}", guards=[requires("admin")], status_code=201,
          summary="Publish parameters for an instrument (guardrails enforced, audited)",
          description="Publishes a calibration's recommendation, explicit parameters, or a "
                      "past version (rollback). Refused with 422 and the guardrail, parameter "
                      "and excess when an update moves a parameter too far, comes too soon, "
                      "or has no reason; a refused update changes nothing.",
          responses=problem_responses(*COMMON, 400, 422))
    async def publish_parameters(
        self, request: Request[Any, Any, Any], svc: Svc,
        instrument: Annotated[str, Parameter(description="instrument", min_length=1,
                                             max_length=64, pattern=INSTRUMENT_PATTERN,
                                             examples=[examples.INSTRUMENT])],
        data: Annotated[PublishRequest, Body(examples=[examples.PUBLISH])],
    ) -> PublishedParameters:
        settings = request.app.state.settings
        audit: AuditLog = request.app.state.audit
        model, params, calibration_id, fingerprints, rollback_of = await _resolve(
            svc, audit, instrument, data)
        previous = await anyio.to_thread.run_sync(audit.latest, instrument)
        now = datetime.now(UTC)
        since = None if previous is None else (now - previous.created_at).total_seconds()
        violations = check_update(
            None if previous is None else previous.new_params, params,
            guardrails=settings.guardrails, seconds_since_previous=since, reason=data.reason)
        if previous is not None and previous.model != model:
            violations = [*violations, Violation(
                "model", None, 0.0, 1.0, 1.0,
                f"{instrument} is published as {previous.model}; switching to {model} needs a "
                "new instrument entry")]
        if violations:
            raise GuardrailViolation(violations)
        principal = principal_of(request)
        record = UpdateRecord(
            instrument=instrument, version=1 if previous is None else previous.version + 1,
            model=model, previous_params=None if previous is None else previous.new_params,
            new_params=params, calibration_id=calibration_id, data_fingerprints=fingerprints,
            actor=principal.name, reason=data.reason.strip(), rollback_of=rollback_of,
            created_at=now,
        )
        try:
            await anyio.to_thread.run_sync(audit.append, record)
        except IntegrityError:
            raise InvalidParameters("another update of this instrument was published at the "
                                    "same moment; retry", field="instrument") from None
        value = _to_published(record)
        await publish(svc, value, getattr(request.app.state, "redis", None))
        request.app.state.published_cache.drop(instrument)
        return value

    @get("/{instrument:str}/history", guards=[requires("reader")],
         summary="Every published update of an instrument, newest first",
         responses=problem_responses(*COMMON, 404))
    async def history(
        self, request: Request[Any, Any, Any],
        instrument: Annotated[str, Parameter(description="instrument", min_length=1,
                                             max_length=64, pattern=INSTRUMENT_PATTERN,
                                             examples=[examples.INSTRUMENT])],
    ) -> list[dict[str, Any]]:
        records = await anyio.to_thread.run_sync(request.app.state.audit.history, instrument)
        if not records:
            raise NotFoundException(f"nothing was ever published for {instrument!r}")
        return [r.as_dict() for r in records]


class PublishRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Publish a calibration's recommendation, explicit parameters, or roll back.

    Give exactly one of ``calibration_id``, ``params`` (with ``model``) and
    ``rollback_to_version``. Guardrails apply to each alike.

    Attributes:
        reason: why, for the audit trail (text).
        calibration_id: publish this calibration's recommendation.
        params: publish these parameters, each in its own units (with ``model``).
        model: margin model family of ``params``.
        rollback_to_version: publish this past audit version again.
    """

    reason: str
    calibration_id: str | None = None
    params: dict[str, Any] | None = None
    model: str | None = None
    rollback_to_version: int | None = None


class GuardrailViolation(MarginlabError):
    """An update outside the guardrails; nothing was published."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__("; ".join(v.message for v in violations))
        self.violations = violations


def _to_published(record: UpdateRecord) -> PublishedParameters:
    return PublishedParameters(
        instrument=record.instrument, model=record.model, params=record.new_params,
        version=record.version,
        published_at=record.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        calibration_id=record.calibration_id, data_fingerprints=record.data_fingerprints,
    )


async def _resolve(svc: State, audit: AuditLog, instrument: str,
                   body: PublishRequest) -> tuple[str, dict[str, Any], str | None,
                                                  dict[str, str], int | None]:
    """(model, params, calibration id, fingerprints, rollback_of) of a publish request."""
    sources = [body.calibration_id is not None, body.params is not None,
               body.rollback_to_version is not None]
    if sum(sources) != 1:
        raise InvalidParameters("give exactly one of calibration_id, params and "
                                "rollback_to_version", field="calibration_id")
    if body.calibration_id is not None:
        job = await svc.get("jobs", body.calibration_id, CalibrationJob)
        if job is None:
            raise InvalidParameters(f"no calibration {body.calibration_id!r}",
                                    field="calibration_id")
        raw = await svc.stores["results"].get(job.cache_key)
        if raw is None:
            raise InvalidParameters(f"calibration {body.calibration_id} has no result "
                                    f"({job.state})", field="calibration_id")
        result = msgspec.json.decode(raw, type=CalibrationResult)
        rec = result.recommendation
        if rec is None or not rec.feasible:
            raise InvalidParameters("the calibration's recommendation is not feasible; "
                                    "publish explicit params to override", field="calibration_id")
        if instrument not in result.data_fingerprints:
            raise InvalidParameters(f"calibration {body.calibration_id} did not cover "
                                    f"{instrument!r}", field="calibration_id")
        return result.model, dict(rec.params), body.calibration_id, result.data_fingerprints, None
    if body.params is not None:
        if body.model is None:
            raise InvalidParameters("params need a model", field="model")
        make_model(body.model, body.params)  # refuse parameters the model would refuse
        return body.model, dict(body.params), None, {}, None
    assert body.rollback_to_version is not None
    old = await anyio.to_thread.run_sync(audit.version, instrument, body.rollback_to_version)
    if old is None:
        raise InvalidParameters(f"{instrument} has no version {body.rollback_to_version}",
                                field="rollback_to_version")
    return (old.model, dict(old.new_params), old.calibration_id, dict(old.data_fingerprints),
            old.version)


def decode(raw: bytes) -> PublishedParameters:
    """Parse stored published parameters."""
    return msgspec.json.decode(raw, type=PublishedParameters)
