"""Progress without re-reading the journal: O(1) status reads, one feed per job per process.

- the fan-out: thirty subscribers of one job cost one reader, and all see the same last
  payload;
- a status read never opens the study's journal: it answers the same with the journal
  replaced by 1 MB or 50 MB of garbage;
- a real server with 30 event-stream clients and status pollers on a calibration of a few
  hundred trials: every client sees the same final state, with every trial done.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
from litestar.testing import TestClient
from optuna.trial import TrialState

from calibration.storage import Coordination
from service.app import create_app
from service.progress import ProgressHub
from service.settings import Settings
from tests.api_helpers import FINAL, bars_csv, calibration_spec, wait_for
from tests.test_faults import EmbeddedService


def test_thirty_subscribers_share_one_reader_and_see_the_same_end() -> None:
    """The hub reads a job once per poll whatever the number of subscribers, and every
    subscriber's last payload is the job's final one."""
    renders = 0
    steps = [(b"1", False), (b"2", False), (b"2", False), (b"3", True)]

    async def render(job_id: str) -> tuple[bytes, bool]:
        nonlocal renders
        renders += 1
        return steps[min(renders - 1, len(steps) - 1)]

    async def main() -> list[list[bytes]]:
        hub = ProgressHub(render, poll_s=0.01)

        async def client() -> list[bytes]:
            return [p async for p in hub.subscribe("job")]

        got = await asyncio.gather(*(client() for _ in range(30)))
        assert hub.feeds == 0  # the feed went with its last subscriber
        return list(got)

    seen = asyncio.run(main())
    assert all(s[-1] == b"3" for s in seen)
    # Each payload at most once per subscriber, in order; one read per poll for all 30.
    assert all(s == sorted(set(s)) for s in seen)
    assert renders == len(steps)


def _journal_garbage(path: Path, size_bytes: int) -> None:
    line = b'{"op_code": 99, "padding": "' + b"x" * 200 + b'"\n'
    with path.open("wb") as f:
        for _ in range(size_bytes // len(line) + 1):
            f.write(line)


@pytest.mark.parametrize("journal_mb", [1, 50])
def test_status_never_reads_the_journal(journal_mb: int, tmp_path: Path) -> None:
    """After a calibration, its study's journal is replaced by ``journal_mb`` MB of records
    Optuna cannot replay: the status still answers, with the progress its workers wrote
    (on main every status read replayed the journal: 0.75–1.1 s at 21.9 MB)."""
    (tmp_path / "data").mkdir()
    settings = Settings(data_root=str(tmp_path / "data"), state_dir=str(tmp_path / "state"),
                        rate_limit_per_minute=0)
    with TestClient(app=create_app(settings)) as client:
        ref = client.post("/v1/datasets?instrument=SYN", content=bars_csv(800, seed=3),
                          headers={"content-type": "text/csv"}).json()["ref"]
        job = client.post("/v1/calibrations", json=calibration_spec(ref, n_trials=4)).json()
        done = wait_for(lambda: (lambda s: s if s["state"] in FINAL else None)(
            client.get(job["status_url"]).json()), timeout_s=60, what="the job")
        assert done["state"] == "succeeded"
        journal = Path(settings.studies_dir) / f"{job['study']}.log"
        with Coordination(f"journal:{journal}") as coordination:  # the independent count
            study = optuna.load_study(study_name=job["study"], storage=coordination.storage)
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                           for t in study.get_trials(deepcopy=False))
        assert done["progress"]["trials_done"] == finished == 4

        _journal_garbage(journal, journal_mb * 1_000_000)
        again = client.get(job["status_url"])
        assert again.status_code == 200
        assert again.json() == done


def _sse_last(base: str, job_id: str, out: list[dict[str, Any]]) -> None:
    last: dict[str, Any] | None = None
    with httpx.Client(base_url=base, timeout=120) as http, \
            http.stream("GET", f"/v1/calibrations/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                last = json.loads(line.partition(":")[2])
    assert last is not None
    out.append(last)


def _poll_last(base: str, job_id: str, out: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=base, timeout=120) as http:
        while True:
            status = http.get(f"/v1/calibrations/{job_id}").json()
            if status["state"] in FINAL:
                out.append(status)
                return
            threading.Event().wait(0.2)


@pytest.mark.integration
@pytest.mark.slow
def test_thirty_event_streams_and_pollers_see_the_same_final_state(tmp_path: Path) -> None:
    """30 SSE clients and 30 status pollers on a 300-trial calibration of a real server:
    every one ends on the same final job (succeeded, every trial done, none running), the
    study holding exactly that many finished trials."""
    n_trials = 300
    app = EmbeddedService(tmp_path, MARGINLAB_RATE_LIMIT_PER_MINUTE="0")
    try:
        app.start()
        ref = app.upload(bars_csv(1500, seed=41))["ref"]
        job = app.submit(calibration_spec(ref, n_trials=n_trials, seed=41))
        base = str(app.http.base_url)
        streams: list[dict[str, Any]] = []
        polls: list[dict[str, Any]] = []
        threads = [threading.Thread(target=_sse_last, args=(base, job["id"], streams))
                   for _ in range(30)]
        threads += [threading.Thread(target=_poll_last, args=(base, job["id"], polls))
                    for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(streams) == 30
        assert len(polls) == 30
        final = app.status(job["id"])
        assert final["state"] == "succeeded", app.tail()
        assert final["progress"]["trials_done"] == n_trials
        assert final["progress"]["running"] == 0
        assert all(s == final for s in streams)
        assert all(p == final for p in polls)
        journal = tmp_path / "state" / "studies" / f"{job['study']}.log"
        with Coordination(f"journal:{journal}") as coordination:
            study = optuna.load_study(study_name=job["study"], storage=coordination.storage)
            trials = study.get_trials(deepcopy=False)
        assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) \
            == n_trials
    finally:
        app.stop()


def test_state_file_store_never_hops_to_a_worker_thread(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded state store reads and writes in the event loop's thread (a hop to a
    worker thread waits for the GIL under load), and keeps FileStore's semantics: values
    round-trip, expire, renew, and a write replaces the entry whole."""
    import anyio.to_thread

    from service.state import StateFileStore

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a worker-thread hop")

    monkeypatch.setattr(anyio.to_thread, "run_sync", refuse)
    store = StateFileStore(tmp_path / "store", create_directories=True).with_namespace("jobs")
    assert isinstance(store, StateFileStore)

    async def scenario() -> None:
        assert await store.get("a") is None
        await store.set("a", b"1" * 300)
        await store.set("a", "2")
        assert await store.get("a") == b"2"
        await store.set("short", b"x", expires_in=1)
        assert await store.get("short", renew_for=60) == b"x"
        assert 30 < (await store.expires_in("short") or 0) <= 60  # renewed
        await store.set("gone", b"x", expires_in=-1)
        assert await store.get("gone") is None

    asyncio.run(scenario())
    # "a" and "short" remain: the expired entry was removed, no temporary file is left
    assert len(list((tmp_path / "store" / "jobs").iterdir())) == 2


def test_embedded_runner_setting_is_checked() -> None:
    assert Settings.from_env({"MARGINLAB_EMBEDDED_RUNNER": "thread"}).embedded_runner == "thread"
    assert Settings.from_env({}).embedded_runner == "process"
    with pytest.raises(ValueError, match="MARGINLAB_EMBEDDED_RUNNER must be 'process' or"):
        Settings(embedded_runner="fork")


def test_progress_writes_are_best_effort_but_never_swallow_rqs_time_limit() -> None:
    """A failed progress write is ignored, the job goes on; rq's time limit, which arrives as
    an exception inside whatever the job is doing, passes through a progress write (it was
    swallowed there, and the job ran on past its limit)."""
    from rq.timeouts import JobTimeoutException

    from service.jobs import ProgressWriter

    class Access:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def set_progress(self, job_id: str, progress: Any) -> None:
            raise self.error

    study = optuna.create_study()
    for error, passes in ((ConnectionError("store away"), False),
                          (JobTimeoutException("limit"), True)):
        writer = ProgressWriter(Access(error), "job", study, 10, None)  # type: ignore[arg-type]
        if passes:
            with pytest.raises(JobTimeoutException):
                writer(1, 10, None)
            with pytest.raises(JobTimeoutException):
                writer.final()
        else:
            writer(1, 10, None)
            assert writer.final() is not None
