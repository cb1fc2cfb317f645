"""Account backtest jobs outlive their server process (``service.accounts.resume_account_jobs``).

Real processes: ``marginlab serve`` in embedded mode, SIGKILLed while a job runs, then started
again on the same state; and in Redis mode an API process SIGKILLed while it runs a job, and
another started on the same Redis, which takes the job over once its lease lapses.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.api_helpers import bars_csv, wait_for
from tests.test_api_integration import Deployment, RedisServer, kill_tree
from tests.test_faults import EmbeddedService
from tests.test_faults import own_redis as own_redis  # the fixture: a Redis of the test's own

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Bars per instrument: a job replays for a few seconds (a shared cascade over 40,000
#: accounts), long enough to be killed while it runs.
N_BARS = 80_000


def _body(holding_bars: int = 4000) -> dict[str, Any]:
    return {"data": [{"instrument": "AUSDT", "ref": "a.csv"},
                     {"instrument": "BUSDT", "ref": "b.csv"}],
            "model": "tiered", "params": {"base_mmr": 0.02, "tier_growth": 1.0,
                                          "bracket_caps_usd": []},
            "population": {"seed": 3, "entry_every_bars": 20, "accounts_per_entry": 10,
                           "leverage": [10, 40]},
            "liquidation": {"holding_bars": holding_bars, "cascade": True},
            "stress_windows": []}


def _status(http: Any, job_id: str) -> dict[str, Any]:
    r = http.get(f"/v1/account-backtests/{job_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _final(http: Any, job_id: str, timeout_s: float) -> dict[str, Any]:
    return wait_for(lambda: (lambda s: s if s["state"] in ("succeeded", "failed") else None)(
        _status(http, job_id)), timeout_s=timeout_s, every_s=0.3, what=f"job {job_id}")


def _submit(http: Any, body: dict[str, Any]) -> str:
    r = http.post("/v1/account-backtests", json=body)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def _write_data(root: Path) -> None:
    (root / "a.csv").write_bytes(bars_csv(N_BARS, seed=1))
    (root / "b.csv").write_bytes(bars_csv(N_BARS, seed=2))


def test_embedded_restart_resumes_running_and_queued_account_jobs(tmp_path: Path) -> None:
    """SIGKILL the embedded service while one account job runs and another waits behind it:
    after the restart both run again and succeed, with the report an uninterrupted run
    gives; the log says they were resumed."""
    _write_data(tmp_path)
    service = EmbeddedService(tmp_path, MARGINLAB_MAX_SYNC_BARS="1000")
    try:
        service.start()
        first = _submit(service.http, _body())
        second = _submit(service.http, _body(holding_bars=3000))
        wait_for(lambda: _status(service.http, first)["state"] == "running", timeout_s=60,
                 every_s=0.05, what="the first job to run")
        assert _status(service.http, second)["state"] == "queued"
        service.kill()

        service.start()
        assert _status(service.http, first)["state"] in ("queued", "running")
        done = [_final(service.http, j, 240) for j in (first, second)]
        assert [d["state"] for d in done] == ["succeeded", "succeeded"], done
        assert "resuming account backtest" in service.tail(200)
        again = _final(service.http, _submit(service.http, _body()), 240)
        assert again["report"]["summary"] == done[0]["report"]["summary"]
        assert again["report"]["accounts"] == done[0]["report"]["accounts"]
    finally:
        service.stop()


def test_embedded_restart_fails_a_job_that_no_longer_validates(tmp_path: Path) -> None:
    """A job killed while it runs, whose data is deleted before the restart, ends ``failed``
    at the restart naming why, instead of staying ``running``."""
    _write_data(tmp_path)
    service = EmbeddedService(tmp_path, MARGINLAB_MAX_SYNC_BARS="1000")
    try:
        service.start()
        job = _submit(service.http, _body())
        wait_for(lambda: _status(service.http, job)["state"] == "running", timeout_s=60,
                 every_s=0.05, what="the job to run")
        service.kill()
        (tmp_path / "b.csv").unlink()
        service.start()
        failed = _status(service.http, job)
        assert failed["state"] == "failed", failed
        assert "could not be resumed" in failed["error"]
        assert "b.csv" in failed["error"]
    finally:
        service.stop()


def test_redis_mode_a_dead_api_process_job_is_taken_over(own_redis: RedisServer,
                                                          tmp_path: Path) -> None:
    """Redis mode: SIGKILL the API process running an account job and start another: it
    leaves the job alone while the dead process's lease lasts, then takes it over and runs it
    to the end."""
    _write_data(tmp_path)
    app = Deployment(tmp_path, own_redis.url, f"journal:{tmp_path / 'studies.log'}",
                     MARGINLAB_MAX_SYNC_BARS="1000")
    try:
        app.start_api()
        victim = app.procs[-1]
        job = _submit(app.http, _body())
        wait_for(lambda: _status(app.http, job)["state"] == "running", timeout_s=60,
                 every_s=0.05, what="the job to run")
        kill_tree(victim.pid)
        victim.wait(timeout=10)
        start = time.time()
        app.move_api()  # another API process (not the dead one's port: see start_api)
        app.start_api()
        done = _final(app.http, job, 240)
        assert done["state"] == "succeeded", done
        assert time.time() - start > 5  # it waited for the dead process's lease to lapse
        assert "resuming account backtest" in (tmp_path / "api.log").read_text()
    finally:
        app.close()
