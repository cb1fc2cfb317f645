"""Service settings, read from the environment once at start-up (the service's only door to it).

| variable | meaning | default |
|---|---|---|
| ``REDIS_URL`` | Redis for stores, the job queue (rq) and pub/sub | unset: embedded mode |
| ``MARGINLAB_STORAGE`` | Optuna study storage URL | a journal per study, ``<state dir>/studies/`` |
| ``MARGINLAB_DATA_ROOT`` | root of data references; uploads go to ``uploads/`` below it | cwd |
| ``MARGINLAB_STATE_DIR`` | embedded mode's stores and journal | ``.marginlab`` |
| ``MARGINLAB_API_KEYS`` (or ``_FILE``) | hashed API keys (``service.auth``) | unset: open |
| ``MARGINLAB_RATE_LIMIT_PER_MINUTE`` | requests per minute per key (or address) | 600 |
| ``MARGINLAB_MAX_UPLOAD_BYTES`` | largest dataset upload | 256 MiB |
| ``MARGINLAB_MAX_SYNC_BARS`` | largest synchronous backtest (bars, all instruments) | 500000 |
| ``MARGINLAB_MAX_TRIALS`` | largest ``n_trials`` of one calibration | 5000 |
| ``MARGINLAB_MAX_FILE_ROWS`` | most rows decoded from one data file (uploads and refs) | 10^7 |
| ``MARGINLAB_MAX_JOB_ROWS`` | most rows of all files of one calibration | 2 * 10^7 |
| ``MARGINLAB_RESULT_TTL_S`` | lifetime of cached results | 7 days |
| ``MARGINLAB_WORKERS_PER_JOB`` | queue jobs (workers) per calibration with Redis | 2 |
| ``MARGINLAB_JOB_RETRIES`` | times rq re-runs a queue job whose worker died | 3 |
| ``MARGINLAB_JOB_TIMEOUT_S`` | time limit of one queue job (rq), seconds | 1 day |
| ``MARGINLAB_JOB_HEARTBEAT_S`` | Redis mode's liveness period, seconds: below | 5 |
| ``MARGINLAB_AUDIT_DB`` | SQLAlchemy URL of the publish audit trail | SQLite in the state dir |
| ``MARGINLAB_GUARDRAILS`` | JSON ``max_change``, ``min_interval_s``, ``min_reason_chars`` | below |
| ``MARGINLAB_RETAIN_FREED_MEMORY`` | ``0``: workers leave glibc's malloc at its defaults | ``1`` |

``MARGINLAB_JOB_HEARTBEAT_S`` (``h``) sets how fast Redis mode notices a dead process: a queue
worker renews the heartbeat of the job it runs every ``h`` and the job counts as abandoned
``3h`` after a missed renewal; workers and API processes sweep for abandoned jobs every
``h``; an API process renews the lease of the account backtest it runs every ``h``, and a
lease ``4h`` old is taken over. Shorter notices sooner; longer tolerates longer stalls (a
process paused, Redis slow) without taking a live process's job for a dead one's.

``max_change`` overrides limits of ``calibration.publishing.DEFAULT_RULES`` (every parameter
of every family has one; the rule's kind says whether the limit is absolute or relative).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.publishing import DEFAULT_MAX_CHANGE, Guardrails

__all__ = ["DEFAULT_MAX_CHANGE", "Settings"]


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    redis_url: str | None = None
    study_storage: str | None = None
    data_root: str = "."
    state_dir: str = ".marginlab"
    api_keys: str | None = None
    api_keys_file: str | None = None
    rate_limit_per_minute: int = 600
    max_upload_bytes: int = 256 * 1024 * 1024
    max_sync_bars: int = 500_000
    max_trials: int = 5000
    max_file_rows: int = 10_000_000
    max_job_rows: int = 20_000_000
    result_ttl_s: int = 7 * 86_400
    workers_per_job: int = 2
    job_retries: int = 3
    job_timeout_s: int = 24 * 3600
    job_heartbeat_s: int = 5
    audit_db: str | None = None
    guardrails_json: str | None = None
    #: Calibration workers keep freed memory for their next trial's arrays instead of
    #: page-faulting them in afresh (``calibration._allocator``).
    retain_freed_memory: bool = True
    #: Embedded mode: ``process`` runs calibrations in a child process of the API
    #: (``service.embedded_worker``), so reads never compete with a running study for the
    #: API's GIL; ``thread`` runs them in a thread of the API process (debugging, tests that
    #: patch the job code).
    embedded_runner: str = "process"

    def __post_init__(self) -> None:
        if self.job_heartbeat_s < 1:
            raise ValueError("MARGINLAB_JOB_HEARTBEAT_S must be at least 1 (seconds), not "
                             f"{self.job_heartbeat_s}")
        if self.embedded_runner not in ("process", "thread"):
            raise ValueError("MARGINLAB_EMBEDDED_RUNNER must be 'process' or 'thread', not "
                             f"{self.embedded_runner!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``env`` (default ``os.environ``)."""
        env = os.environ if env is None else env

        def num(name: str, default: int) -> int:
            raw = env.get(name)
            return default if raw in (None, "") else int(raw)

        return cls(
            redis_url=env.get("REDIS_URL") or None,
            study_storage=env.get("MARGINLAB_STORAGE") or None,
            data_root=env.get("MARGINLAB_DATA_ROOT") or os.getcwd(),
            state_dir=env.get("MARGINLAB_STATE_DIR") or ".marginlab",
            api_keys=env.get("MARGINLAB_API_KEYS") or None,
            api_keys_file=env.get("MARGINLAB_API_KEYS_FILE") or None,
            rate_limit_per_minute=num("MARGINLAB_RATE_LIMIT_PER_MINUTE", 600),
            max_upload_bytes=num("MARGINLAB_MAX_UPLOAD_BYTES", 256 * 1024 * 1024),
            max_sync_bars=num("MARGINLAB_MAX_SYNC_BARS", 500_000),
            max_trials=num("MARGINLAB_MAX_TRIALS", 5000),
            max_file_rows=num("MARGINLAB_MAX_FILE_ROWS", 10_000_000),
            max_job_rows=num("MARGINLAB_MAX_JOB_ROWS", 20_000_000),
            result_ttl_s=num("MARGINLAB_RESULT_TTL_S", 7 * 86_400),
            workers_per_job=num("MARGINLAB_WORKERS_PER_JOB", 2),
            job_retries=num("MARGINLAB_JOB_RETRIES", 3),
            job_timeout_s=num("MARGINLAB_JOB_TIMEOUT_S", 24 * 3600),
            job_heartbeat_s=num("MARGINLAB_JOB_HEARTBEAT_S", 5),
            audit_db=env.get("MARGINLAB_AUDIT_DB") or None,
            guardrails_json=env.get("MARGINLAB_GUARDRAILS") or None,
            embedded_runner=env.get("MARGINLAB_EMBEDDED_RUNNER") or "process",
            retain_freed_memory=env.get("MARGINLAB_RETAIN_FREED_MEMORY", "1") != "0",
        )

    @property
    def guardrails(self) -> Guardrails:
        """Publishing guardrails: ``MARGINLAB_GUARDRAILS`` over the defaults (Aave-style
        0.25% absolute on rates, a day between updates, a reason of 10+ characters)."""
        fields: dict[str, Any] = {
            "max_change": dict(DEFAULT_MAX_CHANGE), "min_interval_s": 86_400.0,
            "min_reason_chars": 10,
        }
        if self.guardrails_json:
            given = json.loads(self.guardrails_json)
            if "max_change" in given:
                fields["max_change"] = {**fields["max_change"], **given.pop("max_change")}
            fields.update(given)
        return Guardrails(**fields)

    @property
    def embedded(self) -> bool:
        """No Redis configured: memory/file stores and an in-process job runner."""
        return self.redis_url is None

    @property
    def storage_url(self) -> str:
        """The Optuna storage given by ``MARGINLAB_STORAGE``, else the state directory's
        legacy shared journal (read for studies written before journals were per study;
        ``study_storage_url`` says which storage holds a given study)."""
        if self.study_storage:
            return self.study_storage
        return f"journal:{self.legacy_journal}"

    @property
    def per_study_journals(self) -> bool:
        """No ``MARGINLAB_STORAGE``: every study has a journal file of its own under
        ``studies_dir``, so one study's size or damage never slows or breaks another."""
        return not self.study_storage

    @property
    def legacy_journal(self) -> Path:
        """The journal every study of the state directory shared before (still read)."""
        return Path(self.state_dir).resolve() / "studies.log"

    @property
    def studies_dir(self) -> Path:
        """Directory of the per-study journals (``<study>.log`` each)."""
        return Path(self.state_dir).resolve() / "studies"

    def study_storage_url(self, study: str) -> str:
        """The Optuna storage of one study.

        With ``MARGINLAB_STORAGE`` that storage; otherwise the study's own journal,
        ``<state dir>/studies/<study>.log``, except for a study that only the legacy shared
        ``studies.log`` holds (written by an earlier version), which stays there: no
        migration is needed, and new studies never touch the shared file.
        """
        if self.study_storage:
            return self.study_storage
        own = self.studies_dir / f"{study}.log"
        if not own.exists() and _in_legacy_journal(self.legacy_journal, study):
            return f"journal:{self.legacy_journal}"
        return f"journal:{own}"


def _in_legacy_journal(path: Path, study: str) -> bool:
    """Whether the legacy shared journal holds a study of this name (a scan for its
    CREATE_STUDY record, remembered per size of the file: the file only grows)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    key = (str(path), size)
    names = _LEGACY_NAMES.get(key)
    if names is None:
        names = set()
        with open(path, "rb") as handle:
            for line in handle:
                if b'"study_name"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("op_code") == 0 and "study_name" in record:  # CREATE_STUDY
                    names.add(str(record["study_name"]))
        _LEGACY_NAMES.clear()
        _LEGACY_NAMES[key] = names
    return study in names


_LEGACY_NAMES: dict[tuple[str, int], set[str]] = {}
