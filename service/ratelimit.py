"""Per-key request limits: a fixed one-minute window counted in each API process.

Litestar's ``RateLimitMiddleware`` keeps every request's timestamp of the window and
re-encodes that list on each request, so its cost grows with the limit (measured here: a
limit of 10^8/min cut ``GET /v1/recommendations`` from 10k to 2k req/s). A counter per key
and window is O(1). Counts are per process: with N API processes a client gets up to N times
the limit, which is how the limit should be sized.

Memory is bounded: at most ``max_identities`` counters (least recently seen dropped first),
and an unknown or absent key is counted against the client address (``rate_limit_identity``),
so neither made-up keys nor many addresses grow the table without bound.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from litestar.enums import ScopeType
from litestar.exceptions import TooManyRequestsException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import rate_limit_identity

EXEMPT = ("/healthz", "/readyz", "/metrics", "/schema")


class RateLimit(ASGIMiddleware):
    """429 once a key (or address) makes more than ``per_minute`` requests in a minute."""

    def __init__(self, per_minute: int, max_identities: int = 100_000) -> None:
        self.per_minute = per_minute
        self.max_identities = max_identities
        self._window = 0
        self._counts: OrderedDict[str, int] = OrderedDict()

    async def handle(self, scope: Scope, receive: Receive, send: Send,
                     next_app: ASGIApp) -> None:
        if scope["type"] != ScopeType.HTTP or scope["path"].startswith(EXEMPT):
            await next_app(scope, receive, send)
            return
        now = time.time()
        window = int(now // 60)
        if window != self._window:
            self._window = window
            self._counts = OrderedDict()
        from litestar import Request

        key = rate_limit_identity(Request[Any, Any, Any](scope))
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count  # now the most recently seen
        if len(self._counts) > self.max_identities:
            self._counts.popitem(last=False)
        reset = str(int((window + 1) * 60 - now))
        if count > self.per_minute:
            raise TooManyRequestsException(
                f"more than {self.per_minute} requests this minute; retry in {reset} s",
                headers={"RateLimit-Limit": str(self.per_minute), "RateLimit-Remaining": "0",
                         "RateLimit-Reset": reset, "Retry-After": reset},
            )
        remaining = str(self.per_minute - count)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"ratelimit-limit", str(self.per_minute).encode()),
                            (b"ratelimit-remaining", remaining.encode()),
                            (b"ratelimit-reset", reset.encode())]
                message["headers"] = headers
            await send(message)

        await next_app(scope, receive, send_with_headers)
