"""Service state on Litestar Stores: jobs, results, datasets and published parameters.

Embedded mode keeps them in a ``FileStore`` under the state directory; with ``REDIS_URL``
in a ``RedisStore``, shared by the API and every worker. Values are msgspec JSON.

**Job records are durable beyond Redis.** With ``REDIS_URL`` the ``jobs``, ``results`` and
``dedup`` namespaces and the active set are written through to a SQL table
(``marginlab_state``, SQLAlchemy) in the database where the durable state lives: the study
storage's PostgreSQL database when the studies are there, else the audit database
(``MARGINLAB_AUDIT_DB``, SQLite under the state directory by default: a Redis-journal
deployment keeps its job records beside the publish audit trail). Redis is their cache and
holds the queue: reads come from Redis and fall back to the table on a miss or while
Redis is away, so a Redis restarted without persistence loses no job (the reconciler
queues again a job whose queue entries vanished). Progress (``progress``) is a cache only:
workers rewrite it as trials finish, and a job's final progress is in its record.

Besides the stores, a set of **active job ids** (queued or running; a Redis set, or one empty
file per job under the state directory): what a restart resumes and the reconciler checks,
since a store cannot list its keys. It may hold finished jobs for a while (they are dropped
when seen); it never misses an active one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
from litestar.di import NamedDependency
from litestar.stores.base import StorageObject, Store
from litestar.stores.file import FileStore
from litestar.stores.redis import RedisStore
from sqlalchemy import (
    Column,
    Float,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine

from service.settings import Settings

T = TypeVar("T")

NAMESPACES = ("jobs", "results", "datasets", "published", "dedup", "index", "progress",
              "accountjobs", "accountspecs", "accountleases")
#: Namespaces written through to the durable table in Redis mode.
DURABLE_NAMESPACES = ("jobs", "results", "dedup", "accountjobs", "accountspecs")
#: Redis set of active job ids (Redis mode; a cache of the durable table's ``active`` rows).
ACTIVE_KEY = "marginlab:active-jobs"
#: Kinds of job with an active set of their own: calibrations (``jobs``) and account
#: backtests (``accountjobs``).
JOB_KINDS = ("jobs", "accountjobs")


def jobs_db_url(settings: Settings) -> str:
    """SQLAlchemy URL of the durable job records (Redis mode): the study storage's
    PostgreSQL database, else the audit database."""
    from service.audit import audit_url

    storage = settings.study_storage or ""
    if storage.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + storage.split("://", 1)[1]
    return audit_url(settings)


_state_table = Table(
    "marginlab_state", MetaData(),
    Column("namespace", String(32), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("value", LargeBinary, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("written_at", Float, nullable=False),
)
_engines: dict[tuple[str, int], Engine] = {}


def _engine(url: str) -> Engine:
    """One engine per URL and process (a forked rq work horse must not share the parent's
    pooled connections)."""
    key = (url, os.getpid())
    engine = _engines.get(key)
    if engine is None:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30})

            @event.listens_for(engine, "connect")
            def _wal(conn: Any, _record: Any) -> None:
                # API and workers write concurrently: WAL lets readers run meanwhile.
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=30000")
        else:
            engine = create_engine(url, pool_pre_ping=True)
        _state_table.metadata.create_all(engine, checkfirst=True)
        _engines[key] = engine
    return engine


class DurableTable:
    """The durable key-value table of the job state (synchronous; see the module doc)."""

    def __init__(self, url: str) -> None:
        self.engine = _engine(url)

    def get(self, namespace: str, key: str) -> bytes | None:
        t = _state_table
        with self.engine.connect() as conn:
            row = conn.execute(select(t.c.value, t.c.expires_at).where(
                t.c.namespace == namespace, t.c.key == key)).first()
        if row is None or (row.expires_at is not None and row.expires_at <= time.time()):
            return None
        return bytes(row.value)

    def set(self, namespace: str, key: str, value: bytes, expires_in: float | None) -> None:
        now = time.time()
        values = {"namespace": namespace, "key": key, "value": value, "written_at": now,
                  "expires_at": None if expires_in is None else now + expires_in}
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
        stmt = upsert(_state_table).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["namespace", "key"],
            set_={k: stmt.excluded[k] for k in ("value", "expires_at", "written_at")})
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def delete(self, namespace: str, key: str | None = None) -> None:
        t = _state_table
        where = [t.c.namespace == namespace] + ([t.c.key == key] if key is not None else [])
        with self.engine.begin() as conn:
            conn.execute(t.delete().where(*where))

    def keys(self, namespace: str) -> list[str]:
        """Keys of a namespace, oldest write first."""
        t = _state_table
        with self.engine.connect() as conn:
            return [r.key for r in conn.execute(select(t.c.key).where(
                t.c.namespace == namespace).order_by(t.c.written_at))]

    def remaining_s(self, namespace: str, key: str) -> int | None:
        t = _state_table
        with self.engine.connect() as conn:
            row = conn.execute(select(t.c.expires_at).where(
                t.c.namespace == namespace, t.c.key == key)).first()
        if row is None or row.expires_at is None:
            return None
        return max(1, int(row.expires_at - time.time()))


#: Errors of a Redis that is away (restarting, unreachable): reads fall back to the table.
_CACHE_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)


def _cache_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (*_CACHE_ERRORS, redis.exceptions.RedisError)


class WriteThroughStore(Store):
    """A namespace kept in the durable table and cached in Redis (see the module doc)."""

    def __init__(self, cache: Store, table: DurableTable, namespace: str) -> None:
        self.cache = cache
        self.table = table
        self.namespace = namespace

    async def set(self, key: str, value: str | bytes, expires_in: int | timedelta | None = None
                  ) -> None:
        raw = value.encode() if isinstance(value, str) else value
        seconds = expires_in.total_seconds() if isinstance(expires_in, timedelta) else expires_in
        await anyio.to_thread.run_sync(self.table.set, self.namespace, key, raw, seconds)
        with contextlib.suppress(*_cache_errors()):
            await self.cache.set(key, raw, expires_in=expires_in)

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        cache_up = True
        try:
            value = await self.cache.get(key)
        except _cache_errors():
            value, cache_up = None, False
        if value is not None:
            return value
        value = await anyio.to_thread.run_sync(self.table.get, self.namespace, key)
        if value is not None and cache_up:  # Redis lost it (restart): cache it again
            ttl = await anyio.to_thread.run_sync(self.table.remaining_s, self.namespace, key)
            with contextlib.suppress(*_cache_errors()):
                await self.cache.set(key, value, expires_in=ttl)
        return value

    async def delete(self, key: str) -> None:
        await anyio.to_thread.run_sync(self.table.delete, self.namespace, key)
        with contextlib.suppress(*_cache_errors()):
            await self.cache.delete(key)

    async def delete_all(self) -> None:
        await anyio.to_thread.run_sync(self.table.delete, self.namespace)
        with contextlib.suppress(*_cache_errors()):
            await self.cache.delete_all()

    async def exists(self, key: str) -> bool:
        return await self.get(key) is not None

    async def expires_in(self, key: str) -> int | None:
        return await anyio.to_thread.run_sync(self.table.remaining_s, self.namespace, key)


class StateFileStore(FileStore):
    """Litestar's ``FileStore``, reading and writing in the calling thread.

    State entries are a few hundred bytes on a local disk: reading one takes microseconds,
    while the worker-thread hop ``FileStore`` makes per file operation waits for the GIL
    (up to the 5 ms switch interval) whenever another thread holds it, which under sixty
    concurrent readers put tens of milliseconds on every request of the event loop, even
    ``/healthz``. Writes stay atomic (a temporary file renamed over the entry).
    """

    def with_namespace(self, namespace: str) -> StateFileStore:
        if not namespace.isalnum():
            raise ValueError(f"Invalid namespace: {namespace!r}")
        return StateFileStore(self.path / namespace)

    async def set(self, key: str, value: str | bytes, expires_in: int | timedelta | None = None
                  ) -> None:
        Path(self.path).mkdir(parents=True, exist_ok=True)
        raw = value.encode("utf-8") if isinstance(value, str) else value
        self._write_sync(self._path_from_key(key), StorageObject.new(data=raw,
                                                                      expires_in=expires_in))

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        path = Path(self._path_from_key(key))
        try:
            stored = StorageObject.from_bytes(path.read_bytes())
        except FileNotFoundError:
            return None
        if stored.expired:
            path.unlink(missing_ok=True)
            return None
        if renew_for and stored.expires_at:
            await self.set(key, stored.data, expires_in=renew_for)
        return stored.data

    async def delete(self, key: str) -> None:
        Path(self._path_from_key(key)).unlink(missing_ok=True)

    async def exists(self, key: str) -> bool:
        return await self.get(key) is not None

    async def expires_in(self, key: str) -> int | None:
        try:
            stored = StorageObject.from_bytes(Path(self._path_from_key(key)).read_bytes())
        except FileNotFoundError:
            return None
        return None if stored.expires_at is None else stored.expires_in


def make_root_store(settings: Settings) -> Store:
    """The root store of the service's state for these settings."""
    if settings.redis_url:
        from redis.asyncio import Redis

        client = Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                socket_timeout=5)
        return RedisStore(client, namespace="marginlab", handle_client_shutdown=True)
    return StateFileStore(Path(settings.state_dir).resolve() / "store", create_directories=True)


def make_state(settings: Settings) -> State:
    """The service state for these settings (with the durable table in Redis mode)."""
    durable = DurableTable(jobs_db_url(settings)) if settings.redis_url else None
    return State(make_root_store(settings), durable)


class State:
    """Typed access to the namespaces of one root store (async)."""

    def __init__(self, root: Store, durable: DurableTable | None = None) -> None:
        self.root = root
        assert isinstance(root, FileStore | RedisStore)
        self.durable = durable
        self.stores: dict[str, Store] = {name: root.with_namespace(name) for name in NAMESPACES}
        if durable is not None:
            for name in DURABLE_NAMESPACES:
                self.stores[name] = WriteThroughStore(self.stores[name], durable, name)
        for store in self.stores.values():
            if isinstance(store, FileStore):  # with_namespace does not create directories
                Path(store.path).mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        """Mutual exclusion for a read-modify-write of shared state: within this process
        (an asyncio lock) and, in Redis mode, across processes (a Redis lock)."""
        local = self._locks.setdefault(name, asyncio.Lock())
        async with local:
            if isinstance(self.root, RedisStore):
                async with self.root._redis.lock(f"marginlab:lock:{name}", timeout=30,
                                                 blocking_timeout=30):
                    yield
            else:
                yield

    async def get(self, namespace: str, key: str, type_: type[T]) -> T | None:
        raw = await self.stores[namespace].get(key)
        return None if raw is None else msgspec.json.decode(raw, type=type_)

    async def put(self, namespace: str, key: str, value: Any,
                  expires_in: int | None = None) -> None:
        await self.stores[namespace].set(key, msgspec.json.encode(value), expires_in=expires_in)

    async def delete(self, namespace: str, key: str) -> None:
        await self.stores[namespace].delete(key)

    @staticmethod
    def _active_names(kind: str) -> tuple[str, str, str]:
        """(directory, durable namespace, Redis set) of the active set of ``kind``."""
        assert kind in JOB_KINDS
        if kind == "jobs":  # the calibrations' names, as before account jobs had a set
            return "active-jobs", "active", ACTIVE_KEY
        return f"active-{kind}", f"active-{kind}", f"{ACTIVE_KEY}:{kind}"

    def _active_dir(self, kind: str = "jobs") -> Path:
        assert isinstance(self.root, FileStore)
        path = Path(self.root.path) / self._active_names(kind)[0]
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def add_active(self, job_id: str, kind: str = "jobs") -> None:
        """Remember a queued or running job of ``kind`` (until ``drop_active``)."""
        _, table, key = self._active_names(kind)
        if isinstance(self.root, RedisStore):
            if self.durable is not None:
                await anyio.to_thread.run_sync(self.durable.set, table, job_id, b"", None)
            with contextlib.suppress(*_cache_errors()):
                await self.root._redis.sadd(key, job_id)
        else:
            (self._active_dir(kind) / job_id).touch()

    async def drop_active(self, job_id: str, kind: str = "jobs") -> None:
        """Forget a job that ended."""
        _, table, key = self._active_names(kind)
        if isinstance(self.root, RedisStore):
            if self.durable is not None:
                await anyio.to_thread.run_sync(self.durable.delete, table, job_id)
            with contextlib.suppress(*_cache_errors()):
                await self.root._redis.srem(key, job_id)
        else:
            (self._active_dir(kind) / job_id).unlink(missing_ok=True)

    async def active_ids(self, kind: str = "jobs") -> list[str]:
        """Ids of the jobs of ``kind`` remembered as active, oldest first where known."""
        _, table, key = self._active_names(kind)
        if self.durable is not None:  # the truth; the Redis set may have been lost
            return await anyio.to_thread.run_sync(self.durable.keys, table)
        if isinstance(self.root, RedisStore):
            members = await self.root._redis.smembers(key)
            return sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        found = []
        for path in self._active_dir(kind).iterdir():
            try:
                found.append((path.stat().st_mtime, path.name))
            except FileNotFoundError:  # dropped meanwhile
                continue
        return [name for _, name in sorted(found)]

    async def close(self) -> None:
        if isinstance(self.root, RedisStore):
            await self.root._redis.aclose()


def run_sync(settings: Settings, op: Callable[[State], Awaitable[T]]) -> T:
    """Run one state operation from synchronous code (a queue worker): a fresh client on a
    fresh event loop, closed afterwards."""

    async def main() -> T:
        state = make_state(settings)
        try:
            return await op(state)
        finally:
            await state.close()

    return asyncio.run(main())


#: How handlers ask for the service state (a named dependency wired in ``create_app``).
Svc = NamedDependency[State]
