"""``/v1/recommendations/{instrument}``: the parameters in force, polled before every listing.

The audit trail (``service.audit``) is the source of truth; the store (Redis, or the embedded
file store) is a cache of each instrument's latest update, rebuilt from the trail: at start,
whenever the Redis listener (re)connects, and on any read that finds it missing or at another
version. A publish is one durable step from the client's view: it succeeds once its audit
row commits, even if the cache cannot be written then; an ``Idempotency-Key`` makes retries
safe (the same key and body get the same answer and no second version).

Hot path: each API process keeps the published parameters in memory and serves them with an
ETag (``304`` on ``If-None-Match``). With Redis a pub/sub message on publish drops the cached
entry in every process (and while the listener is disconnected nothing is served from
memory); in embedded mode each entry remembers the store file's identity (inode, mtime,
size) and one ``stat`` per request tells whether any process has written it since.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State as AppState
from litestar.exceptions import NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, HeaderParameter, Parameter
from litestar.stores.base import Store
from litestar.stores.file import FileStore
from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from calibration._errors import InvalidParameters, MarginlabError
from calibration.calibrate import CalibrationResult
from calibration.calibrate._accounts import account_publications, split_params
from calibration.publishing import (
    PUBLISHED_KINDS,
    Violation,
    check_update,
    effective_params,
    is_defi,
    steward_guardrails,
)
from calibration.spec import INSTRUMENT_PATTERN, CalibrationSpec
from service import examples
from service.audit import AuditLog, UpdateRecord
from service.auth import check_role, principal_of, requires
from service.errors import COMMON, ServiceUnavailable, problem_responses
from service.schemas import CalibrationJob, PublishedParameters, PublishResult
from service.state import State, Svc

log = logging.getLogger("marginlab.service")
CHANNEL = "marginlab:published"
#: What a cache (store) operation raises when its backend is down: the audit trail answers.
CACHE_ERRORS: tuple[type[BaseException], ...] = (OSError, RedisError)
#: Longest ``Idempotency-Key`` accepted (characters).
MAX_IDEMPOTENCY_KEY = 128

Entry = tuple[bytes, str]


class PublishedCache:
    """Per-process cache of encoded published parameters and their ETags.

    An entry may carry a ``stamp`` (the store file's identity in embedded mode); ``get``
    with another stamp misses. ``trusted`` is false while invalidations cannot arrive (the
    Redis listener is disconnected): then nothing is served from memory. ``put`` with the
    ``generation`` read before loading is ignored when a ``drop`` came in between, so a
    load that raced a publish never caches the older value.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[bytes, str, object]] = {}
        self._epoch = 0
        self._drops: dict[str, int] = {}
        self.trusted = True

    def get(self, instrument: str, stamp: object = None) -> Entry | None:
        if not self.trusted:
            return None
        entry = self._entries.get(instrument)
        if entry is None or entry[2] != stamp:
            return None
        return entry[0], entry[1]

    def generation(self, instrument: str) -> tuple[int, int]:
        return self._epoch, self._drops.get(instrument, 0)

    @staticmethod
    def entry_of(body: bytes) -> Entry:
        return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'

    def put(self, instrument: str, body: bytes, *, stamp: object = None,
            generation: tuple[int, int] | None = None) -> Entry:
        entry = self.entry_of(body)
        if self.trusted and (generation is None or generation == self.generation(instrument)):
            self._entries[instrument] = (*entry, stamp)
        return entry

    def drop(self, instrument: str | None = None) -> None:
        if instrument is None:
            self._entries.clear()
            self._epoch += 1
        else:
            self._entries.pop(instrument, None)
            self._drops[instrument] = self._drops.get(instrument, 0) + 1


async def publish(svc: Svc, value: PublishedParameters, redis: Any | None) -> None:
    """Store published parameters and tell every API process to drop its cached copy."""
    await svc.put("published", value.instrument, value)
    if redis is not None:
        await redis.publish(CHANNEL, value.instrument)


#: File store paths by (store, instrument): the path rule hashes the key, a stat does not.
_PATHS: dict[tuple[str, str], str] = {}


def store_stamp(store: Store, instrument: str) -> object:
    """The identity of an instrument's entry in a file store (``None`` for other stores,
    whose changes arrive by pub/sub): inode, mtime and size, or ``"missing"``."""
    if not isinstance(store, FileStore):
        return None
    memo = (os.fspath(store.path), instrument)
    path = _PATHS.get(memo)
    if path is None:
        if len(_PATHS) > 10_000:  # instruments come from URLs: keep the memo bounded
            _PATHS.clear()
        path = _PATHS[memo] = os.fspath(store._path_from_key(instrument))
    try:
        # FileStore writes a temporary file and renames it over the entry: a new inode.
        st = os.stat(path)
    except OSError:
        return "missing"
    return st.st_ino, st.st_mtime_ns, st.st_size


def _version(raw: bytes | None) -> int:
    """The version of a store copy (-1: none, or unreadable)."""
    try:
        return -1 if raw is None else decode(raw).version
    except msgspec.DecodeError:
        return -1


def _agrees(raw: bytes | None, record: UpdateRecord) -> bool:
    """Whether a store copy is exactly the audit record's published value."""
    if raw is None:
        return False
    try:
        return decode(raw) == _to_published(record)
    except msgspec.DecodeError:
        return False


async def load_published(app_state: AppState, instrument: str) -> Entry:
    """The published entry of an instrument, checked against the audit trail (the truth):
    the store's copy when it equals the trail's latest update, else rebuilt from the trail
    and written back (best effort). Cached unless the store is unreachable.

    Raises:
        NotFoundException: nothing was ever published for it.
        ServiceUnavailable: neither the store nor the audit trail can answer.
    """
    cache: PublishedCache = app_state.published_cache
    store = app_state.service_state.stores["published"]
    generation = cache.generation(instrument)
    reachable = True
    raw: bytes | None = None
    try:
        raw = await store.get(instrument)
    except CACHE_ERRORS as exc:
        reachable = False
        log.warning("published store unreachable (%s); answering from the audit trail", exc)
    try:
        record = await anyio.to_thread.run_sync(app_state.audit.latest, instrument)
    except SQLAlchemyError as exc:
        if raw is None:
            raise ServiceUnavailable("neither the published store nor the audit trail can "
                                     "be reached; retry later") from exc
        log.warning("audit trail unreachable (%s); serving the store's copy", exc)
        return PublishedCache.entry_of(raw)
    if record is not None and not _agrees(raw, record):
        raw = msgspec.json.encode(_to_published(record))
        if reachable:
            try:
                await store.set(instrument, raw)
            except CACHE_ERRORS as exc:
                reachable = False
                log.warning("cannot repair the published store (%s)", exc)
    if raw is None:
        raise NotFoundException(f"no published parameters for {instrument!r}")
    if not reachable:
        return PublishedCache.entry_of(raw)
    return cache.put(instrument, raw, stamp=store_stamp(store, instrument),
                     generation=generation)


async def repair_published(app_state: AppState, redis: Any | None = None) -> list[str]:
    """Rewrite every store entry that is missing or differs from the audit trail's latest
    (and tell the other processes); returns the instruments repaired.

    Raises:
        OSError, RedisError: the store is unreachable (nothing is lost: the next call, or
            a read, repairs it).
    """
    audit: AuditLog = app_state.audit
    state: State = app_state.service_state
    repaired = []
    for record in await anyio.to_thread.run_sync(audit.latest_all):
        raw = await state.stores["published"].get(record.instrument)
        if not _agrees(raw, record):
            await publish(state, _to_published(record), redis)
            app_state.published_cache.drop(record.instrument)
            repaired.append(record.instrument)
    if repaired:
        log.info("published store rebuilt from the audit trail for %s", ", ".join(repaired))
    return repaired


class RecommendationController(Controller):
    """Published parameters per instrument: read (hot path), publish (admin), history."""

    path = "/v1/recommendations"
    tags = ["recommendations"]

    # The hot path other services poll: the reader check runs inline (a guard costs a copy
    # of the route handler per request in Litestar) and the state comes without DI.
    @get("/{instrument:str}", opt={"role": "reader"},
         summary="The parameters in force for an instrument (ETag, 304 when unchanged)",
         description="Served from memory while nothing has changed; answered from the audit "
                     "trail when the store (Redis) is unreachable.",
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
        app_state = request.app.state
        cache: PublishedCache = app_state.published_cache
        stamp = store_stamp(app_state.service_state.stores["published"], instrument)
        entry = cache.get(instrument, stamp)
        if entry is None:
            entry = await load_published(app_state, instrument)
        body, etag = entry
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(b"", status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    @post("/{instrument:str}", guards=[requires("admin")], status_code=201,
          summary="Publish parameters for an instrument (guardrails enforced, audited)",
          description="Publishes a calibration's recommendation, explicit parameters, or a "
                      "past version (rollback). Refused with 422 and the guardrail, parameter "
                      "and excess when an update moves a parameter too far (defaults filled "
                      "in on both sides), drops a published parameter, comes too soon, or has "
                      "no reason; a refused update changes nothing. Success means the update "
                      "is in the audit trail. With an `Idempotency-Key` header a retry of the "
                      "same request answers the same version (never a second one, never "
                      "refused as too soon); the same key with another request is a 422. "
                      "A calibration whose recommendation has account-level keys also "
                      "publishes each set they map into (liquidation engine, portfolio grid, "
                      "one haircut schedule per asset) under a key of its own "
                      "(`<instrument>.engine`, `<instrument>.portfolio`, "
                      "`<instrument>.haircuts.<ASSET>`, or `publish_as`), each under its "
                      "kind's guardrails (Aave's steward caps for a DeFi preset), all in one "
                      "audit transaction: one refusal, naming the field path, publishes "
                      "none of them.",
          responses=problem_responses(*COMMON, 400, 422))
    async def publish_parameters(
        self, request: Request[Any, Any, Any], svc: Svc,
        instrument: Annotated[str, Parameter(description="instrument", min_length=1,
                                             max_length=64, pattern=INSTRUMENT_PATTERN,
                                             examples=[examples.INSTRUMENT])],
        data: Annotated[PublishRequest, Body(examples=[examples.PUBLISH])],
        idempotency_key: Annotated[str | None, HeaderParameter(
            name="Idempotency-Key", required=False, max_length=MAX_IDEMPOTENCY_KEY,
            description="a client-chosen unique string (e.g. a UUID) per intended update; "
                        "a retry with the same key and body gets the first answer")] = None,
    ) -> PublishResult:
        settings = request.app.state.settings
        audit: AuditLog = request.app.state.audit
        digest = _request_hash(instrument, data)
        if idempotency_key is not None:
            if not idempotency_key.strip() or not idempotency_key.isprintable():
                raise InvalidParameters("Idempotency-Key must be 1 to 128 printable "
                                        "characters", field="Idempotency-Key")
            replay = await _replay(request.app.state, idempotency_key, digest)
            if replay is not None:
                return replay
        sources = await _resolve(svc, audit, instrument, data)
        now = datetime.now(UTC)
        principal = principal_of(request)
        violations: list[Violation] = []
        records: list[UpdateRecord] = []
        # Every set of the request is checked against its own key's latest update, with its
        # kind's guardrails; one violation anywhere refuses them all (nothing is written).
        for i, source in enumerate(sources):
            key = source.key or instrument
            previous = await anyio.to_thread.run_sync(audit.latest, key)
            old = None if previous is None else previous.new_params
            since = None if previous is None else (now - previous.created_at).total_seconds()
            guardrails = settings.guardrails
            if source.model in PUBLISHED_KINDS and (is_defi(source.params) or is_defi(old)):
                guardrails = steward_guardrails(guardrails)
            found = check_update(
                old, source.params, guardrails=guardrails, seconds_since_previous=since,
                reason=data.reason, model=source.model,
                previous_model=None if previous is None else previous.model,
                bar_seconds=source.bar_seconds)
            if i > 0:  # the reason is the request's, checked once; fields carry the path
                found = [_at(v, source.path, key) for v in found if v.guardrail != "reason"]
            violations += found
            records.append(UpdateRecord(
                instrument=key, version=1 if previous is None else previous.version + 1,
                model=source.model, previous_params=old,
                new_params=source.params, calibration_id=source.calibration_id,
                data_fingerprints=source.fingerprints, actor=principal.name,
                reason=data.reason.strip(), rollback_of=source.rollback_of, created_at=now,
            ))
        if violations:
            raise GuardrailViolation(violations)
        record, together = records[0], tuple(records[1:])
        try:
            await anyio.to_thread.run_sync(lambda: audit.append(
                record, idempotency_key=idempotency_key, request_hash=digest,
                together=together))
        except IntegrityError:
            if idempotency_key is not None:  # the same request, sent twice at once
                replay = await _replay(request.app.state, idempotency_key, digest)
                if replay is not None:
                    return replay
            raise InvalidParameters("another update of this instrument was published at the "
                                    "same moment; retry", field="instrument") from None
        for row in records:
            await _write_cache(request.app.state, _to_published(row))
        return _result(record, together)

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


async def _write_cache(app_state: AppState, value: PublishedParameters) -> None:
    """Copy a committed update into the store and drop cached copies; a store that is down
    is no failure of the publish (reads answer from the audit trail, and the store is
    rebuilt from it when it is back)."""
    try:
        await publish(app_state.service_state, value, getattr(app_state, "redis", None))
    except CACHE_ERRORS as exc:
        log.warning("published %s version %d to the audit trail; the store is unreachable "
                    "(%s) and will be rebuilt from the trail", value.instrument, value.version,
                    exc)
    app_state.published_cache.drop(value.instrument)


def _at(violation: Violation, path: str, key: str) -> Violation:
    """A violation of an account-level set, its parameter named by the full path
    (``haircuts.BTC.ratios``; the set's path for a guardrail on the whole update)."""
    name = f"{path}.{violation.parameter}" if violation.parameter else path
    return dataclasses.replace(violation, parameter=name, key=key,
                               message=f"{path} (published as {key}): {violation.message}")


def _result(record: UpdateRecord, together: Sequence[UpdateRecord]) -> PublishResult:
    return PublishResult(**msgspec.structs.asdict(_to_published(record)),
                         published_with={r.instrument: r.version for r in together})


async def _replay(app_state: AppState, key: str, digest: str) -> PublishResult | None:
    """The answer already given to an idempotency key (``None``: the key is new).

    Raises:
        InvalidParameters: the key was used for another request.
    """
    found = await anyio.to_thread.run_sync(app_state.audit.by_idempotency_key, key)
    if found is None:
        return None
    used_hash, record = found
    if used_hash != digest:
        raise InvalidParameters(
            f"Idempotency-Key was already used for another request (it published "
            f"{record.instrument} version {record.version}); use a new key for a new update",
            field="Idempotency-Key")
    together = await anyio.to_thread.run_sync(app_state.audit.published_together, record)
    for row in (record, *together):
        raw = None
        with contextlib.suppress(*CACHE_ERRORS):
            raw = await app_state.service_state.stores["published"].get(row.instrument)
        if _version(raw) < row.version:  # the first attempt may not have reached it
            await _write_cache(app_state, _to_published(row))
    return _result(record, together)


def _request_hash(instrument: str, body: PublishRequest) -> str:
    """sha256 of the request's canonical JSON (instrument and body, keys sorted)."""
    fields = msgspec.to_builtins(body)
    if fields.get("publish_as") is None:  # a request without it hashes as it always did
        fields.pop("publish_as", None)
    canonical = msgspec.json.encode({"instrument": instrument, **fields}, order="sorted")
    return hashlib.sha256(canonical).hexdigest()


class PublishRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Publish a calibration's recommendation, explicit parameters, or roll back.

    Give exactly one of ``calibration_id``, ``params`` (with ``model``) and
    ``rollback_to_version``. Guardrails apply to each alike.

    Attributes:
        reason: why, for the audit trail (text).
        calibration_id: publish this calibration's recommendation (its model parameters
            here, its account-level sets each under its own key, together or not at all).
        params: publish these parameters, each in its own units (with ``model``).
        model: margin model family of ``params``, or ``haircuts`` (a collateral asset's
            schedule ``{caps_usd, ratios}``), ``liquidation_engine`` (the engine's scalar
            settings) or ``portfolio_grid`` (a scenario grid's parameters), each published
            under a key of its own with the same guardrails.
        rollback_to_version: publish this past audit version again.
        publish_as: for a calibration with account-level keys: set (``engine``,
            ``portfolio``, ``haircuts.<ASSET>``) → the key it publishes under (default
            ``<instrument>.<set>``, e.g. ``BTCUSDT.haircuts.BTC``).
    """

    reason: str
    calibration_id: str | None = None
    params: dict[str, Any] | None = None
    model: str | None = None
    rollback_to_version: int | None = None
    publish_as: dict[str, Annotated[str, msgspec.Meta(
        min_length=1, max_length=64, pattern=INSTRUMENT_PATTERN)]] | None = None


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


@dataclass(frozen=True)
class _Source:
    """What a publish request publishes: the family, parameters and their provenance;
    ``bar_seconds`` is the bar size of a calibration's data (``None`` when not known).
    An account-level set of a calibration carries its ``key`` and ``path`` (``engine``,
    ``portfolio``, ``haircuts.<ASSET>``)."""

    model: str
    params: dict[str, Any]
    calibration_id: str | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)
    rollback_of: int | None = None
    bar_seconds: int | None = None
    key: str = ""
    path: str = ""


async def _resolve(svc: State, audit: AuditLog, instrument: str,
                   body: PublishRequest) -> list[_Source]:
    """What a publish request publishes: the instrument's set first, then a calibration's
    account-level sets."""
    sources = [body.calibration_id is not None, body.params is not None,
               body.rollback_to_version is not None]
    if sum(sources) != 1:
        raise InvalidParameters("give exactly one of calibration_id, params and "
                                "rollback_to_version", field="calibration_id")
    if body.publish_as is not None and body.calibration_id is None:
        raise InvalidParameters("publish_as names the keys of a calibration's account-level "
                                "sets; it needs calibration_id", field="publish_as")
    if body.calibration_id is None:
        return [await _resolve_one(audit, instrument, body)]
    return await _resolve_calibration(svc, instrument, body)


async def _resolve_calibration(svc: State, instrument: str,
                               body: PublishRequest) -> list[_Source]:
    """A calibration's recommendation: its model parameters under ``instrument``, and one
    set per account-level kind its dotted keys map into (``account_publications``)."""
    assert body.calibration_id is not None
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
    model_params, account_params = split_params(rec.params)
    fingerprints = dict(result.data_fingerprints)
    out = [_Source(result.model, model_params, body.calibration_id, fingerprints, None,
                   result.bar_seconds)]
    publications = []
    if account_params:
        spec_raw = await svc.stores["jobs"].get(f"{body.calibration_id}:spec")
        if spec_raw is None:
            raise InvalidParameters(f"calibration {body.calibration_id} has account-level "
                                    "parameters and its spec is gone; publish each set as "
                                    "explicit params", field="calibration_id")
        spec = msgspec.json.decode(spec_raw, type=CalibrationSpec)
        shown = ((rec.accounts or {}).get("whole_span") or {}).get("haircuts")
        publications = account_publications(spec, rec.params, bar_seconds=result.bar_seconds,
                                            horizon_bars=result.horizon_bars, schedules=shown)
    paths = {p.path for p in publications}
    for path in sorted(set(body.publish_as or {}) - paths):
        raise InvalidParameters(f"publish_as.{path}: the recommendation publishes no such set "
                                f"(it has: {', '.join(sorted(paths)) or 'none'})",
                                field=f"publish_as.{path}")
    keys = {instrument: "instrument"}
    for p in publications:
        key = (body.publish_as or {}).get(p.path) or f"{instrument}.{p.path}"
        where = f"publish_as.{p.path}"
        if len(key) > 64 or not re.fullmatch(INSTRUMENT_PATTERN, key):
            raise InvalidParameters(f"{where}: the key {key!r} is not a valid name (at most "
                                    "64 letters, digits, `_ . -`); give a shorter one",
                                    field=where)
        if key in keys:
            raise InvalidParameters(f"{where}: {key!r} is also the key of {keys[key]}",
                                    field=where)
        keys[key] = p.path
        out.append(_Source(p.kind, p.params, body.calibration_id, fingerprints, None,
                           result.bar_seconds, key=key, path=p.path))
    return out


async def _resolve_one(audit: AuditLog, instrument: str, body: PublishRequest) -> _Source:
    """Explicit parameters, or a past version (rollback)."""
    if body.params is not None:
        if body.model is None:
            raise InvalidParameters("params need a model", field="model")
        # refuse parameters the model (or the haircut schedule / engine) would refuse
        effective_params(body.model, body.params)
        return _Source(body.model, dict(body.params))
    assert body.rollback_to_version is not None
    old = await anyio.to_thread.run_sync(audit.version, instrument, body.rollback_to_version)
    if old is None:
        raise InvalidParameters(f"{instrument} has no version {body.rollback_to_version}",
                                field="rollback_to_version")
    return _Source(old.model, dict(old.new_params), old.calibration_id,
                   dict(old.data_fingerprints), old.version)


def decode(raw: bytes) -> PublishedParameters:
    """Parse stored published parameters."""
    return msgspec.json.decode(raw, type=PublishedParameters)
