"""``calibration._allocator``: trials reuse the memory their predecessors freed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from calibration import cli
from service.settings import Settings

# One "trial": five series of 1.84M float64 (five years of minute bars, 70% in sample),
# written and freed together, as a trial's margin series are.
_ROUNDS = textwrap.dedent("""
    import resource
    import numpy as np
    from calibration._allocator import retain_freed_memory
    applied = retain_freed_memory()
    def trial():
        series = [np.ones(1_840_000) for _ in range(5)]
        return sum(float(s[-1]) for s in series)
    trial()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        trial()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    print(applied, faults)
""")


def _faults_per_trial() -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_retained_memory_serves_the_next_trial_without_page_faults() -> None:
    applied, faults = _faults_per_trial()
    assert applied == "True"
    # 5 x 14.7 MB is ~18,000 pages; reused memory faults none of them in again (glibc's
    # defaults, measured on the 2-core machine: ~2,100 a round).
    assert faults < 50


def test_calling_it_again_returns_the_first_answer() -> None:
    code = ("from calibration._allocator import retain_freed_memory as r; "
            "a = r(); b = r(); print(a == b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "True"


def test_the_cli_and_the_service_apply_it_unless_told_not_to(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    import calibration._allocator as allocator

    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv("MARGINLAB_RETAIN_FREED_MEMORY", raising=False)
    cli._retain_freed_memory()
    assert calls == [1]
    monkeypatch.setenv("MARGINLAB_RETAIN_FREED_MEMORY", "0")
    cli._retain_freed_memory()
    assert calls == [1]
    assert Settings.from_env({}).retain_freed_memory is True
    assert Settings.from_env({"MARGINLAB_RETAIN_FREED_MEMORY": "0"}).retain_freed_memory is False
