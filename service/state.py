"""Service state on Litestar Stores: jobs, results, datasets and published parameters.

Embedded mode keeps them in a ``FileStore`` under the state directory; with ``REDIS_URL``
in a ``RedisStore``, shared by the API and every worker. Values are msgspec JSON.

Besides the stores, a set of **active job ids** (queued or running; a Redis set, or one empty
file per job under the state directory): what a restart resumes and the reconciler checks,
since a store cannot list its keys. It may hold finished jobs for a while (they are dropped
when seen); it never misses an active one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from litestar.di import NamedDependency
from litestar.stores.base import Store
from litestar.stores.file import FileStore
from litestar.stores.redis import RedisStore

from service.settings import Settings

T = TypeVar("T")

NAMESPACES = ("jobs", "results", "datasets", "published", "dedup", "index", "accountjobs")
#: Redis set of active job ids (Redis mode).
ACTIVE_KEY = "marginlab:active-jobs"


def make_root_store(settings: Settings) -> Store:
    """The root store of the service's state for these settings."""
    if settings.redis_url:
        from redis.asyncio import Redis

        client = Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                socket_timeout=5)
        return RedisStore(client, namespace="marginlab", handle_client_shutdown=True)
    return FileStore(Path(settings.state_dir).resolve() / "store", create_directories=True)


class State:
    """Typed access to the namespaces of one root store (async)."""

    def __init__(self, root: Store) -> None:
        self.root = root
        assert isinstance(root, FileStore | RedisStore)
        self.stores: dict[str, Store] = {name: root.with_namespace(name) for name in NAMESPACES}
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

    def _active_dir(self) -> Path:
        assert isinstance(self.root, FileStore)
        path = Path(self.root.path) / "active-jobs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def add_active(self, job_id: str) -> None:
        """Remember a queued or running job (until ``drop_active``)."""
        if isinstance(self.root, RedisStore):
            await self.root._redis.sadd(ACTIVE_KEY, job_id)
        else:
            (self._active_dir() / job_id).touch()

    async def drop_active(self, job_id: str) -> None:
        """Forget a job that ended."""
        if isinstance(self.root, RedisStore):
            await self.root._redis.srem(ACTIVE_KEY, job_id)
        else:
            (self._active_dir() / job_id).unlink(missing_ok=True)

    async def active_ids(self) -> list[str]:
        """Ids of the jobs remembered as active, oldest first where known."""
        if isinstance(self.root, RedisStore):
            members = await self.root._redis.smembers(ACTIVE_KEY)
            return sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        found = []
        for path in self._active_dir().iterdir():
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
        state = State(make_root_store(settings))
        try:
            return await op(state)
        finally:
            await state.close()

    return asyncio.run(main())


#: How handlers ask for the service state (a named dependency wired in ``create_app``).
Svc = NamedDependency[State]
