"""The Litestar application: one factory, every plugin, store, handler and route wired here."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import optuna
from litestar import Litestar, Request, Response
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.datastructures import State as AppState
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.stores.memory import MemoryStore
from litestar.stores.registry import StoreRegistry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from calibration._errors import MarginlabError
from calibration._version import ENGINE_VERSION
from service import errors
from service.accounts import AccountController, resume_account_jobs
from service.audit import AuditLog, audit_url
from service.auth import load_keys
from service.backtests import BacktestController
from service.calibrations import CalibrationController
from service.datasets import STALE_PART_S, DatasetController, sweep_partial_uploads
from service.health import REQUESTS, HealthController
from service.jobs import JobAccess, LocalRunner, RqRunner
from service.listings import ListingController
from service.openapi_doc import polish
from service.ratelimit import RateLimit
from service.recommendations import (
    CHANNEL,
    PublishedCache,
    RecommendationController,
    repair_published,
)
from service.schemas import StrictRequest
from service.settings import Settings
from service.state import State, make_state

log = logging.getLogger("marginlab.service")


def _provide_state(request: Request[Any, Any, Any]) -> State:
    state: State = request.app.state.service_state
    return state


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the API for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    keys = load_keys(settings)
    if keys is None:
        log.warning("no API keys configured: the API is open to anyone who can reach it")

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Everything imported so far (numpy, pandas, optuna, the app) lives as long as the
        # process: out of the collector's reach, a full collection under load scans only
        # what requests allocate instead of pausing every request for tens of milliseconds.
        gc.freeze()
        # Uploads a killed process left half written. Embedded mode is the only process
        # writing them; in Redis mode another API process may be mid-upload right now.
        sweep_partial_uploads(settings.data_root,
                              older_than_s=0.0 if settings.embedded else STALE_PART_S)
        state = make_state(settings)
        app.state.service_state = state
        app.state.audit = AuditLog(audit_url(settings))
        if settings.embedded:
            try:  # the store is a cache of the audit trail: rebuild what a crash lost
                await repair_published(app.state)
            except Exception as exc:
                log.warning("could not rebuild the published store at start: %s", exc)
            from anyio.from_thread import BlockingPortal

            async with BlockingPortal() as portal:
                access = JobAccess(settings, runner=lambda op: portal.call(op, state))
                runner: Any = LocalRunner(settings, access)
                app.state.runner = runner
                await runner.resume_active(state)
                await resume_account_jobs(app.state, state, embedded=True)
                runner.start()
                try:
                    yield
                finally:
                    runner.stop()
                    await state.close()
                    app.state.audit.close()
            return
        app.state.runner = RqRunner(settings)
        from redis.asyncio import Redis

        assert settings.redis_url is not None
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        # A pooled connection from before a Redis restart fails once: reconnect and retry
        # (the calibration index's RPUSH is on this client).
        app.state.redis = Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=5,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError])
        listener = asyncio.create_task(_listen_published(app, settings))
        reconciler = asyncio.create_task(_reconcile_jobs(settings))
        account_jobs = asyncio.create_task(_resume_account_jobs(app, state))
        try:
            yield
        finally:
            for task in (listener, reconciler, account_jobs):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            app.state.runner.stop()
            await app.state.redis.aclose()
            await state.close()
            app.state.audit.close()

    app = Litestar(
        route_handlers=[HealthController, DatasetController, BacktestController,
                        CalibrationController, RecommendationController, ListingController,
                        AccountController],
        dependencies={"svc": Provide(_provide_state, sync_to_thread=False)},
        lifespan=[lifespan],
        middleware=[RateLimit(settings.rate_limit_per_minute)]
        if settings.rate_limit_per_minute > 0 else [],
        stores=StoreRegistry(default_factory=lambda name: MemoryStore()),
        exception_handlers={
            MarginlabError: errors.marginlab_error,
            ConnectionError: errors.connection_error,
            TimeoutError: errors.connection_error,
            # redis-py's errors do not derive from the builtins: without these a Redis outage
            # would answer 500 instead of 503.
            RedisConnectionError: errors.connection_error,
            RedisTimeoutError: errors.connection_error,
            HTTPException: errors.http_error,
            Exception: errors.internal_error,
        },
        after_request=_count,
        openapi_config=OpenAPIConfig(
            title="marginlab", version=ENGINE_VERSION,
            description="Backtest and calibrate margin models on historical market data.",
            components=Components(security_schemes={
                "apiKey": SecurityScheme(type="http", scheme="bearer",
                                         description="Authorization: Bearer <API key>"),
            }),
            security=[{"apiKey": []}],
        ),
        request_max_body_size=settings.max_upload_bytes,
        request_class=StrictRequest,
        state=AppState({"settings": settings, "api_keys": keys,
                        "published_cache": PublishedCache()}),
    )
    # Built once here, polished, and cached where Litestar serves /schema from.
    openapi = app.plugins.get(OpenAPIPlugin)
    openapi._openapi = polish(openapi.provide_openapi())
    return app


async def _count(response: Response[Any]) -> Response[Any]:
    REQUESTS.labels("any", str(response.status_code)).inc()
    return response


async def _reconcile_jobs(settings: Settings) -> None:
    """Redis mode: fail jobs whose workers all died, even when no worker is left to notice."""
    import anyio
    import redis

    from service.jobs import reconcile_jobs

    connection = redis.Redis.from_url(settings.redis_url or "", socket_connect_timeout=2,
                                      socket_timeout=5)
    try:
        while True:
            await asyncio.sleep(settings.job_heartbeat_s)
            try:
                await anyio.to_thread.run_sync(reconcile_jobs, settings, connection)
            except Exception as exc:  # Redis away: the next round tries again
                log.warning("reconciling jobs failed (%s)", type(exc).__name__)
    finally:
        connection.close()


async def _resume_account_jobs(app: Litestar, state: State) -> None:
    """Redis mode: take over account backtest jobs whose API process died (their lease
    lapsed), at start and every ``MARGINLAB_JOB_HEARTBEAT_S``."""
    while True:
        try:
            await resume_account_jobs(app.state, state, embedded=False)
        except Exception as exc:  # Redis away: the next round tries again
            log.warning("resuming account backtests failed (%s)", type(exc).__name__)
        await asyncio.sleep(app.state.settings.job_heartbeat_s)


async def _listen_published(app: Litestar, settings: Settings) -> None:
    """Drop the per-process published cache when any process publishes (Redis pub/sub)."""
    from redis.asyncio import Redis

    assert settings.redis_url is not None
    while True:
        client = Redis.from_url(settings.redis_url)
        try:
            pubsub = client.pubsub()
            await pubsub.subscribe(CHANNEL)
            # Anything published while we were not listening may be cached: start clean,
            # and rebuild the store from the audit trail (a publish during an outage
            # committed there only).
            app.state.published_cache.drop()
            app.state.published_cache.trusted = True
            try:
                await repair_published(app.state, app.state.redis)
            except Exception as exc:  # the audit trail unreachable: reads repair it later
                log.warning("could not rebuild the published store: %s", exc)
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    app.state.published_cache.drop(message["data"].decode())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # No invalidation can arrive now: serve nothing from memory until resubscribed.
            app.state.published_cache.trusted = False
            app.state.published_cache.drop()
            log.warning("published-parameters listener lost Redis (%s); retrying", exc)
            await asyncio.sleep(1.0)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
