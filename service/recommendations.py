"""``/v1/recommendations/{instrument}``: the parameters in force, polled before every listing.

Hot path: each API process keeps the published parameters in memory and serves them with an
ETag (``304`` on ``If-None-Match``); with Redis a pub/sub message on publish drops the cached
entry in every process, so nothing stale is served beyond the message's delivery.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.exceptions import NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from service import examples
from service.auth import requires
from service.errors import COMMON, problem_responses
from service.schemas import PublishedParameters
from service.state import Svc

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
    """Published parameters per instrument."""

    path = "/v1/recommendations"
    tags = ["recommendations"]

    @get("/{instrument:str}", guards=[requires("reader")],
         summary="The parameters in force for an instrument (ETag, 304 when unchanged)",
         responses={**problem_responses(*COMMON, 404),
             200: ResponseSpec(data_container=PublishedParameters,
                               description="the published parameters",
                               examples=[examples.PUBLISHED]),
             304: ResponseSpec(data_container=None, description="unchanged since the ETag"),
         })
    async def get_published(
        self, request: Request[Any, Any, Any], svc: Svc,
        instrument: Annotated[str, Parameter(description="instrument",
                                             examples=[examples.INSTRUMENT])],
    ) -> Response[bytes]:
        cache: PublishedCache = request.app.state.published_cache
        entry = cache.get(instrument)
        if entry is None:
            raw = await svc.stores["published"].get(instrument)
            if raw is None:
                raise NotFoundException(f"no published parameters for {instrument!r}")
            entry = cache.put(instrument, raw)
        body, etag = entry
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(b"", status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)


def decode(raw: bytes) -> PublishedParameters:
    """Parse stored published parameters."""
    return msgspec.json.decode(raw, type=PublishedParameters)
