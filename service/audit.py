"""The durable, append-only record of every published-parameters update.

SQLite under the state directory by default, PostgreSQL when ``MARGINLAB_AUDIT_DB`` (or a
``postgresql://`` study storage) says so. Rows are only ever inserted; the parameters in
force for an instrument are its row with the highest version. ``(instrument, version)`` is
unique, so two concurrent publishes cannot both become version n: one fails and changes
nothing.

A publish with an ``Idempotency-Key`` writes the key, the hash of its request and the version
it created in ``marginlab_publish_requests``, in the same transaction as its update row: a
retry finds the answer it was given, and the key can never name two versions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Engine

from service.settings import Settings

metadata = MetaData()
updates = Table(
    "marginlab_published_updates",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("instrument", String(64), nullable=False, index=True),
    Column("version", Integer, nullable=False),
    Column("model", String(32), nullable=False),
    Column("previous_params", JSON, nullable=True),
    Column("new_params", JSON, nullable=False),
    Column("calibration_id", String(64), nullable=True),
    Column("data_fingerprints", JSON, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("reason", Text, nullable=False),
    Column("rollback_of", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("instrument", "version", name="uq_instrument_version"),
)
#: Idempotency keys of publishes (a table of its own, so existing audit databases gain it
#: through ``create_all`` without a migration).
requests = Table(
    "marginlab_publish_requests",
    metadata,
    Column("idempotency_key", String(128), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("instrument", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class UpdateRecord:
    """One published update (a row)."""

    instrument: str
    version: int
    model: str
    previous_params: dict[str, Any] | None
    new_params: dict[str, Any]
    calibration_id: str | None
    data_fingerprints: dict[str, str]
    actor: str
    reason: str
    rollback_of: int | None
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = dict(self.__dict__)
        out["created_at"] = self.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return out


def audit_url(settings: Settings) -> str:
    """Where the audit trail lives for these settings."""
    if settings.audit_db:
        url = settings.audit_db
    elif settings.study_storage and settings.study_storage.startswith("postgresql"):
        url = settings.study_storage
    else:
        path = Path(settings.state_dir).resolve() / "audit.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


class AuditLog:
    """Append-only access to the updates table (synchronous; call off the event loop)."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @staticmethod
    def _record(row: Any) -> UpdateRecord:
        created = row.created_at
        if created.tzinfo is None:  # SQLite drops the zone; we only ever write UTC
            created = created.replace(tzinfo=UTC)
        return UpdateRecord(
            instrument=row.instrument, version=row.version, model=row.model,
            previous_params=_json(row.previous_params), new_params=_json(row.new_params) or {},
            calibration_id=row.calibration_id,
            data_fingerprints=_json(row.data_fingerprints) or {}, actor=row.actor,
            reason=row.reason, rollback_of=row.rollback_of, created_at=created,
        )

    def latest(self, instrument: str) -> UpdateRecord | None:
        """The update in force for an instrument."""
        with self.engine.connect() as conn:
            row = conn.execute(select(updates).where(updates.c.instrument == instrument)
                               .order_by(updates.c.version.desc()).limit(1)).first()
        return None if row is None else self._record(row)

    def version(self, instrument: str, version: int) -> UpdateRecord | None:
        """One past update."""
        with self.engine.connect() as conn:
            row = conn.execute(select(updates).where(
                (updates.c.instrument == instrument) & (updates.c.version == version))).first()
        return None if row is None else self._record(row)

    def history(self, instrument: str) -> list[UpdateRecord]:
        """Every update of an instrument, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(updates).where(updates.c.instrument == instrument)
                                .order_by(updates.c.version.desc())).all()
        return [self._record(r) for r in rows]

    def latest_all(self) -> list[UpdateRecord]:
        """The update in force for every instrument ever published."""
        newest = (select(updates.c.instrument, func.max(updates.c.version).label("version"))
                  .group_by(updates.c.instrument).subquery())
        with self.engine.connect() as conn:
            rows = conn.execute(select(updates).join(newest, (
                updates.c.instrument == newest.c.instrument)
                & (updates.c.version == newest.c.version))).all()
        return [self._record(r) for r in rows]

    def by_idempotency_key(self, key: str) -> tuple[str, UpdateRecord] | None:
        """``(request hash, the update it created)`` of an idempotency key, if it was used."""
        with self.engine.connect() as conn:
            row = conn.execute(select(requests).where(
                requests.c.idempotency_key == key)).first()
        if row is None:
            return None
        record = self.version(row.instrument, row.version)
        assert record is not None  # written in the same transaction, never deleted
        return str(row.request_hash), record

    def append(self, record: UpdateRecord, *, idempotency_key: str | None = None,
               request_hash: str | None = None,
               together: tuple[UpdateRecord, ...] = ()) -> None:
        """Insert one update (and those published ``together`` with it, each under its own
        key), and its idempotency key when given, in one transaction: all rows or none
        (raises on a duplicate version or key: nothing is written then)."""
        with self.engine.begin() as conn:
            if idempotency_key is not None:
                conn.execute(insert(requests).values(
                    idempotency_key=idempotency_key, request_hash=request_hash or "",
                    instrument=record.instrument, version=record.version,
                    created_at=record.created_at))
            for row in (record, *together):
                conn.execute(insert(updates).values(
                    instrument=row.instrument, version=row.version, model=row.model,
                    previous_params=row.previous_params, new_params=row.new_params,
                    calibration_id=row.calibration_id,
                    data_fingerprints=row.data_fingerprints, actor=row.actor,
                    reason=row.reason, rollback_of=row.rollback_of,
                    created_at=row.created_at,
                ))

    def published_together(self, record: UpdateRecord) -> list[UpdateRecord]:
        """The other updates of ``record``'s transaction (same moment, calibration and
        actor; other keys)."""
        if record.calibration_id is None:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(select(updates).where(
                (updates.c.created_at == record.created_at)
                & (updates.c.calibration_id == record.calibration_id)
                & (updates.c.actor == record.actor)
                & (updates.c.instrument != record.instrument))
                .order_by(updates.c.instrument)).all()
        return [self._record(r) for r in rows]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
