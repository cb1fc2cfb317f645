"""``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

from typing import Any

import anyio
from litestar import Controller, Request, Response, get
from litestar.openapi.datastructures import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from calibration.storage import Coordination
from service import examples
from service.errors import PROBLEM, problem
from service.settings import Settings
from service.state import Svc

REQUESTS = Counter("marginlab_http_requests_total", "HTTP requests", ["method", "status"])


def _storage_ok(settings: Settings) -> bool:
    # Opening is not enough: a journal whose records cannot be replayed opens fine and
    # then fails every calibration. Replaying is what a worker does first.
    if settings.per_study_journals:
        # A journal per study: the directory must take new ones; each study's journal is
        # checked (and its torn tail cut) by the worker that opens it, and one study's
        # damage is that study's alone. The legacy shared journal is replayed if present.
        settings.studies_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.studies_dir / ".readyz"
        probe.touch()
        probe.unlink()
        if not settings.legacy_journal.exists():
            return True
    with Coordination(settings.storage_url) as coordination:
        coordination.readable()
        return True


class HealthController(Controller):
    """Liveness, readiness and metrics (no auth: for orchestrators and scrapers)."""

    tags = ["operations"]

    @get("/", summary="Where the documentation is",
         description="Links to the interactive documentation and the OpenAPI document.",
         responses={200: ResponseSpec(generate_examples=False, data_container=dict[str, str],
                                      description="links", examples=[examples.INDEX])})
    async def index(self) -> dict[str, str]:
        return dict(examples.INDEX_LINKS)

    @get("/healthz", summary="The process is up",
         responses={200: ResponseSpec(generate_examples=False, data_container=dict[str, str],
                                      description="alive",
                                      examples=[examples.HEALTH])})
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", summary="Store, study storage and queue are reachable",
         responses={200: ResponseSpec(generate_examples=False, data_container=dict[str, Any],
                                      description="ready",
                                      examples=[examples.READY]),
                    503: ResponseSpec(generate_examples=False, data_container=dict[str, Any],
                                      media_type=PROBLEM,
                                      description="a dependency is unreachable")})
    async def readyz(self, request: Request[Any, Any, Any], svc: Svc) -> Response[Any]:
        checks: dict[str, str] = {}
        try:
            await svc.stores["jobs"].exists("readyz")
            checks["store"] = "ok"
        except Exception as exc:
            checks["store"] = f"unreachable: {type(exc).__name__}"
        try:
            await anyio.to_thread.run_sync(_storage_ok, request.app.state.settings)
            checks["study_storage"] = "ok"
        except Exception as exc:
            # A record that cannot be decoded is not an outage: say which it is.
            unreadable = isinstance(exc, ValueError) or isinstance(exc.__cause__, ValueError)
            checks["study_storage"] = (f"unreadable: {type(exc).__name__}" if unreadable
                                       else f"unreachable: {type(exc).__name__}")
        try:
            ok = await anyio.to_thread.run_sync(request.app.state.runner.ping)
            checks["queue"] = "ok" if ok else "down"
        except Exception as exc:
            checks["queue"] = f"unreachable: {type(exc).__name__}"
        if all(v == "ok" for v in checks.values()):
            return Response({"status": "ready", "checks": checks})
        return problem(503, "Not ready", "a dependency is unreachable", request, checks=checks)

    @get("/metrics", summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST)
    async def metrics(self) -> Response[bytes]:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
