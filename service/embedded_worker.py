"""Embedded mode's calibration process: runs, one at a time, the jobs the API process hands it.

The API process starts it (``LocalRunner``, on the first job) as
``python -m service.embedded_worker REPLY_FD``: the service's settings arrive as one JSON line
on standard input, then one job id per line; after each job it writes ``<job id> <final
state>`` to the file descriptor ``REPLY_FD``. Job records, progress and results go through the
state directory's file store exactly as a queue worker's go through Redis, so the API process
reads progress from the record and never shares a GIL, a core or the study journal's lock with
a running calibration.

The process ends when its standard input closes, and within ``PARENT_CHECK_S`` of its parent
dying (a SIGKILLed server must not leave a calibration running on its own; the next server
resumes the job from its study).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading

#: Added to the process's nice value (lower CPU priority than the API process).
NICE_INCREMENT = 10
#: How often the process checks that the API process that started it is alive (seconds).
PARENT_CHECK_S = 0.5

log = logging.getLogger("marginlab.service")


def _exit_with_parent(parent_pid: int) -> None:
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(PARENT_CHECK_S):
            if os.getppid() != parent_pid:
                os._exit(1)  # orphaned: the running trial is reaped by the next server

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Serve jobs until standard input closes; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    reply_fd = int(args[0])
    _exit_with_parent(os.getppid())
    # Serving comes first: when the API process and a calibration both want a core, the
    # scheduler gives it to the API (a status read or /healthz is a millisecond of work; a
    # calibration hardly notices). On an idle core the calibration runs at full speed.
    with contextlib.suppress(OSError):
        os.nice(NICE_INCREMENT)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from calibration.cli import _quiet_optuna
    from service.jobs import JobAccess, execute_calibration, unexpected_error
    from service.settings import Settings

    _quiet_optuna()
    fields = json.loads(sys.stdin.readline())
    known = {f.name for f in dataclasses.fields(Settings)}
    settings = Settings(**{k: v for k, v in fields.items() if k in known})
    if settings.retain_freed_memory:
        from calibration._allocator import retain_freed_memory

        retain_freed_memory()
    access = JobAccess(settings)
    with os.fdopen(reply_fd, "w", buffering=1) as reply:
        for line in sys.stdin:
            job_id = line.strip()
            if not job_id:
                continue
            try:
                final = execute_calibration(job_id, settings, access)
            except Exception as exc:  # the job could not even record its failure
                log.exception("calibration %s: runner error", job_id)
                final = "failed"
                with contextlib.suppress(Exception):
                    access.fail(job_id, unexpected_error(job_id, exc))
            reply.write(f"{job_id} {final}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
