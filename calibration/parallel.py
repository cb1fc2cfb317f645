"""Helper worker processes for one study: ``calibrate(..., workers=N)`` and
``marginlab calibrate --workers N``.

A helper does what ``marginlab worker --study ID`` does: it joins the study through the
storage and adds trials until the study has its count (``run_worker``). How it is started:

- **fork** (Linux, when this process runs no other thread): the helper is a copy of this
  process made after the imports, the data load and the study's creation. A fresh
  ``marginlab worker`` spends ~1 s importing numpy/pandas/numba/optuna, loading the data
  and initialising numba before its first trial; on a calibration of a few seconds that is
  a fifth of the run, paid again by every helper. The child opens storage connections of its
  own and never touches the parent's; it exits without running the parent's clean-up.
- **a ``marginlab worker`` subprocess** otherwise (no fork on the platform, or threads are
  running, which a fork would copy mid-flight): the same worker a user starts by hand.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from calibration.calibrate import Prepared

_log = logging.getLogger("calibration.parallel")


@dataclass
class Helper:
    """A started helper worker.

    Attributes:
        index: the worker index (1, 2, ...; the caller is worker 0), which offsets the
            sampler's seed.
        how: ``fork`` or ``subprocess``.
    """

    index: int
    how: str
    _process: Any

    def wait(self) -> int:
        """Wait for the helper to exit; its exit code (0 = ran until the study was full)."""
        if self.how == "fork":
            self._process.join()
            return int(self._process.exitcode)
        return int(self._process.wait())


def _forked_worker(storage_url: str, study_name: str, prepared: Prepared,
                   root: str | os.PathLike[str], index: int, deadline: float | None,
                   claim_trials: int = 1) -> None:
    from calibration.calibrate import join_calibration

    try:
        join_calibration(study_name, storage=storage_url, root=root, worker=index,
                         prepared=prepared, deadline=deadline, claim_trials=claim_trials)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: no traceback
        sys.exit(130)


def can_fork() -> bool:
    """Whether helpers can be forked here: Linux (macOS offers fork, but its system
    libraries are not fork-safe; Python defaults to spawn there) and no other thread."""
    return sys.platform.startswith("linux") and threading.active_count() == 1


def start_helpers(count: int, *, storage_url: str, study_name: str, prepared: Prepared,
                  root: str | os.PathLike[str], deadline: float | None = None,
                  claim_trials: int = 1) -> list[Helper]:
    """Start ``count`` helper workers on an existing study.

    Args:
        count: helpers to start (a calibration with N workers starts N - 1).
        storage_url: the study's storage (shared: not ``memory``).
        study_name: the study, created beforehand.
        prepared: this process's prepared data (a forked helper inherits it).
        root: the data root a subprocess helper loads the data from.
        deadline: epoch seconds after which a forked helper asks for no new trial (a
            subprocess helper, like any ``marginlab worker``, starts the spec's
            ``timeout_seconds`` on its own clock).
        claim_trials: each helper's ``run_worker(claim_trials=...)``.
    """
    if count <= 0:
        return []
    if can_fork():
        context = multiprocessing.get_context("fork")
        helpers = []
        for index in range(1, count + 1):
            process = context.Process(
                target=_forked_worker, name=f"marginlab-worker-{index}",
                args=(storage_url, study_name, prepared, root, index, deadline, claim_trials))
            process.start()
            helpers.append(Helper(index, "fork", process))
        return helpers
    env = {**os.environ, "MARGINLAB_DATA_ROOT": os.fspath(root)}
    return [
        Helper(index, "subprocess", subprocess.Popen(
            [sys.executable, "-m", "calibration.cli", "worker", "--study", study_name,
             "--storage", storage_url, "--worker-index", str(index),
             "--claim-trials", str(claim_trials), "--quiet"], env=env))
        for index in range(1, count + 1)
    ]


def wait_helpers(helpers: list[Helper]) -> list[int]:
    """Wait for every helper; their exit codes. A helper that failed is logged: its
    trials are failed or retried through the storage like any dead worker's."""
    codes = []
    for helper in helpers:
        code = helper.wait()
        if code != 0:
            _log.warning("helper worker %d (%s) exited with code %d; the study's other "
                         "workers ran its share, and a trial it left running is failed and "
                         "retried", helper.index, helper.how, code)
        codes.append(code)
    return codes


__all__ = ["Helper", "can_fork", "start_helpers", "wait_helpers"]
