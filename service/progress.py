"""Reading a calibration's progress: O(1) from its job record, one reader per job per process.

Workers keep the progress numbers next to the job record (``service.jobs.ProgressWriter``);
``GET /v1/calibrations/{id}`` reads the record and that entry, two key lookups whatever the
study's size, and never opens the study's journal (so never waits on its lock).

Event streams share one ``Feed`` per job per process: a single task polls the record every
``POLL_S`` and wakes every subscriber when the job as clients see it changes, so thirty
clients of one job cost one poll, not thirty.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec

from service.schemas import CalibrationJob, Progress
from service.state import State

FINAL = ("succeeded", "failed", "cancelled")
#: How often a feed reads its job's record (seconds).
POLL_S = 0.25
#: Longest a stream stays open (seconds).
STREAM_FOR_S = 3600.0

log = logging.getLogger("marginlab.service")


async def with_progress(state: State, job: CalibrationJob) -> CalibrationJob:
    """The job with its latest progress: the workers' live entry while it runs, the one
    stored in the record once it ended (the live entry if the record has none)."""
    if job.state in FINAL and job.progress is not None:
        return job
    try:
        live = await state.get("progress", job.id, Progress)
    except Exception:  # a cache only (Redis away): the record is the truth
        live = None
    if live is None:
        return job
    if job.state != "running":  # queued again, or ended without final numbers: no ETA
        live = msgspec.structs.replace(live, eta_seconds=None)
    return msgspec.structs.replace(job, progress=live)


def _moved(feed: Feed, seen: int) -> bool:
    return feed.version != seen


class Feed:
    """The latest payload of one job, shared by its subscribers."""

    def __init__(self) -> None:
        self.payload: bytes | None = None
        self.version = 0
        self.final = False
        self.subscribers = 0
        self.changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None


class ProgressHub:
    """Per-process fan-out of job payloads to event-stream subscribers.

    ``render`` turns a job id into ``(payload, final)``: the job as clients see it, JSON.
    """

    def __init__(self, render: Callable[[str], Awaitable[tuple[bytes, bool] | None]],
                 poll_s: float = POLL_S) -> None:
        self.render = render
        self.poll_s = poll_s
        self._feeds: dict[str, Feed] = {}

    async def _poll(self, job_id: str, feed: Feed) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STREAM_FOR_S
        try:
            while loop.time() < deadline:
                try:
                    rendered = await self.render(job_id)
                except Exception as exc:  # a store hiccup: subscribers keep the last payload
                    log.warning("progress feed of %s: %s", job_id, type(exc).__name__)
                    rendered = None
                if rendered is not None and rendered[0] != feed.payload:
                    async with feed.changed:
                        feed.payload, feed.final = rendered
                        feed.version += 1
                        feed.changed.notify_all()
                if feed.final:
                    return
                await asyncio.sleep(self.poll_s)
        finally:
            async with feed.changed:
                feed.final = True
                feed.version += 1
                feed.changed.notify_all()

    async def subscribe(self, job_id: str) -> AsyncIterator[bytes]:
        """Every change of the job's payload (the current one first) until it ends."""
        feed = self._feeds.get(job_id)
        if feed is None or (feed.task is not None and feed.task.done()):
            feed = Feed()
            self._feeds[job_id] = feed
            feed.task = asyncio.create_task(self._poll(job_id, feed))
        feed.subscribers += 1
        seen = 0
        sent: bytes | None = None
        try:
            while True:
                async with feed.changed:
                    await feed.changed.wait_for(functools.partial(_moved, feed, seen))
                    seen, payload, final = feed.version, feed.payload, feed.final
                if payload is not None and payload != sent:
                    sent = payload
                    yield payload
                if final:
                    return
        finally:
            feed.subscribers -= 1
            if feed.subscribers == 0 and self._feeds.get(job_id) is feed:
                del self._feeds[job_id]
                if feed.task is not None and not feed.task.done():
                    feed.task.cancel()  # not awaited: a closing generator must not block

    @property
    def feeds(self) -> int:
        """Jobs polled now (one task each)."""
        return len(self._feeds)
