"""API keys with roles, stored hashed; a guard per role.

Keys come from ``MARGINLAB_API_KEYS`` (or the file ``MARGINLAB_API_KEYS_FILE``): a JSON
object mapping the sha256 hex digest of each key to ``{"name": ..., "role": ...}``; roles
are ``reader`` < ``operator`` < ``admin``. Clients send ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``. ``marginlab apikey --role operator --name ci`` prints a new key and
the line to add. With no keys configured the service runs open (every caller is admin) —
for a single machine on loopback only, which is how ``marginlab serve`` binds by default.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from service.settings import Settings

ROLES = ("reader", "operator", "admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name and role."""

    name: str
    role: str
    key_hash: str


def hash_key(key: str) -> str:
    """sha256 hex of an API key (what is stored)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key."""
    return "ml_" + secrets.token_urlsafe(32)


def load_keys(settings: Settings) -> dict[str, Principal] | None:
    """Hash → principal, or ``None`` when no keys are configured (open mode)."""
    raw = settings.api_keys
    if settings.api_keys_file:
        raw = Path(settings.api_keys_file).read_text()
    if not raw:
        return None
    data: dict[str, Any] = json.loads(raw)
    keys = {}
    for digest, entry in data.items():
        role = entry.get("role")
        if role not in ROLES:
            raise ValueError(f"API key {entry.get('name', digest[:8])!r}: unknown role {role!r}")
        keys[digest.lower()] = Principal(entry.get("name", digest[:8]), role, digest.lower())
    return keys


def _presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return connection.headers.get("x-api-key")


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The caller, or 401 when keys are configured and none (or an unknown one) is sent."""
    keys: dict[str, Principal] | None = connection.app.state.api_keys
    if keys is None:
        return Principal("open", "admin", "")
    key = _presented_key(connection)
    if not key:
        raise NotAuthorizedException("an API key is required (Authorization: Bearer <key>)")
    principal = keys.get(hash_key(key))
    if principal is None:
        raise NotAuthorizedException("unknown API key")
    return principal


async def check_role(connection: ASGIConnection[Any, Any, Any, Any], role: str) -> None:
    """Raise 401/403 unless the caller's role is at least ``role``."""
    principal = principal_of(connection)
    if ROLES.index(principal.role) < ROLES.index(role):
        raise PermissionDeniedException(
            f"this needs the {role} role; the key {principal.name!r} is {principal.role}"
        )


def requires(role: str) -> Any:
    """A guard admitting callers whose role is at least ``role``."""

    # async on purpose: Litestar runs a sync guard in a worker thread, a thread hop per request.
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        await check_role(connection, role)

    guard.__name__ = f"requires_{role}"
    return guard


def rate_limit_identity(request: Any) -> str:
    """Rate limits count per configured API key (hashed), else per client address.

    An unknown key, an absent one, or any key in open mode (where keys mean nothing) counts
    against the address: a fresh made-up ``X-API-Key`` per request buys no new allowance.
    """
    keys: dict[str, Principal] | None = request.app.state.api_keys
    key = _presented_key(request)
    if key and keys is not None:
        digest = hash_key(key)
        if digest in keys:
            return "key:" + digest[:16]
    client = request.client
    return "addr:" + (client.host if client else "unknown")
