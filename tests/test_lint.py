"""The code base stays ruff- and mypy-clean (run as tests so CI enforces them).

Both linters are started in the background as soon as pytest has collected a test of this
module (``tests/conftest.py``'s ``pytest_collection_finish`` calls ``start_linters``): mypy
takes tens of seconds of one core, which then overlap with the tests that wait on servers
and subprocesses instead of adding to the suite's time. Each test waits for its linter and
asserts on its exit code and output exactly as if it had run it there.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The commands, run from the project root.
LINTERS: dict[str, list[str]] = {
    "ruff": [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
    "mypy": [sys.executable, "-m", "mypy", "--no-incremental"],
}

#: Linters started by ``start_linters``: the process and the file holding its output.
_STARTED: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}


def start_linters() -> None:
    """Start every linter not started yet, in the background."""
    for name, command in LINTERS.items():
        if name not in _STARTED:
            out = tempfile.TemporaryFile()  # noqa: SIM115 (read by the test, closed after)
            proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            _STARTED[name] = (proc, out)


def stop_linters() -> None:
    """End linters no test waited for (a run stopped early) and drop their output."""
    while _STARTED:
        proc, out = _STARTED.popitem()[1]
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        out.close()


def _result(name: str) -> tuple[int, str]:
    """Exit code and output (stdout and stderr) of one linter, started here if need be."""
    start_linters()
    proc, out = _STARTED[name]
    code = proc.wait(timeout=600)
    out.seek(0)
    return code, out.read().decode(errors="replace")


@pytest.mark.slow
def test_ruff_clean() -> None:
    """ruff reports no finding anywhere in the project."""
    code, output = _result("ruff")
    assert code == 0, output


@pytest.mark.slow
def test_mypy_clean() -> None:
    """mypy --strict reports no error in calibration/ and service/."""
    code, output = _result("mypy")
    assert code == 0, output
