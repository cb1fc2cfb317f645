"""Service state on Litestar Stores: jobs, results, datasets and published parameters.

Embedded mode keeps them in a ``FileStore`` under the state directory; with ``REDIS_URL``
in a ``RedisStore``, shared by the API and every worker. Values are msgspec JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from litestar.di import NamedDependency
from litestar.stores.base import Store
from litestar.stores.file import FileStore
from litestar.stores.redis import RedisStore

from service.settings import Settings

T = TypeVar("T")

NAMESPACES = ("jobs", "results", "datasets", "published", "dedup", "index")


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

    async def get(self, namespace: str, key: str, type_: type[T]) -> T | None:
        raw = await self.stores[namespace].get(key)
        return None if raw is None else msgspec.json.decode(raw, type=type_)

    async def put(self, namespace: str, key: str, value: Any,
                  expires_in: int | None = None) -> None:
        await self.stores[namespace].set(key, msgspec.json.encode(value), expires_in=expires_in)

    async def delete(self, namespace: str, key: str) -> None:
        await self.stores[namespace].delete(key)

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
