"""Shared fixtures: the real market data in ../shared/data, and synthetic bar series."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibration import BarSeries
from calibration.data import fingerprint

SHARED_DATA = Path(
    os.environ.get("MARGINLAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def _absent(what: str) -> None:
    if os.environ.get("MARGINLAB_REQUIRE_DATA"):
        pytest.fail(f"{what} is missing and MARGINLAB_REQUIRE_DATA is set")
    pytest.skip(f"{what} is absent (set MARGINLAB_REQUIRE_DATA=1 to fail instead of skipping)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data root ``../shared/data``; skips (or fails in CI) where it is absent."""
    if not SHARED_DATA.is_dir():
        _absent(f"real market data {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_file(shared_data: Path) -> Callable[[str], str]:
    """Check that one reference under ``../shared/data`` exists and return it."""

    def check(ref: str) -> str:
        if not (shared_data / ref).is_file():
            _absent(f"data file {ref}")
        return ref

    return check


def make_bars(
    close: np.ndarray,
    *,
    seed: int = 0,
    bar_seconds: int = 60,
    start_ms: int = 1_600_000_000_000,
    volume: bool = True,
    instrument: str = "TEST",
) -> BarSeries:
    """A consistent OHLCV series around the given closes (random wicks, seeded)."""
    rng = np.random.default_rng(seed)
    close = np.asarray(close, dtype=np.float64)
    open_ = np.r_[close[0], close[:-1]]
    body_hi = np.maximum(open_, close)
    body_lo = np.minimum(open_, close)
    high = body_hi * (1 + rng.exponential(0.002, close.shape))
    low = body_lo * (1 - rng.exponential(0.002, close.shape))
    ts = start_ms + np.arange(close.shape[0], dtype=np.int64) * bar_seconds * 1000
    vol = rng.uniform(10, 100, close.shape) if volume else None
    return BarSeries(
        instrument=instrument, timestamp_ms=ts, open=open_, high=high, low=low, close=close,
        volume=vol, bar_seconds=bar_seconds,
        fingerprint=fingerprint(ts, (open_, high, low, close), vol), source="synthetic",
    )


def random_walk(n: int, *, seed: int = 0, vol: float = 0.002, crash_at: int | None = None,
                crash: float = -0.2) -> np.ndarray:
    """Geometric random-walk closes with an optional one-bar crash."""
    rng = np.random.default_rng(seed)
    r = rng.standard_t(4, n) * vol / np.sqrt(2)
    if crash_at is not None:
        r[crash_at] = np.log1p(crash)
    r[0] = 0.0
    out: np.ndarray = 100.0 * np.exp(np.cumsum(r))
    return out


def walk_frame(n: int, *, seed: int) -> pd.DataFrame:
    """``n`` 30-minute bars of a seeded normal random walk (0.4% a bar) with the columns a
    data file holds: timestamp_ms, open, high, low, close, volume."""
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.standard_normal(n) * 0.004))
    frame = pd.DataFrame({
        "timestamp_ms": 1_600_000_000_000 + np.arange(n, dtype=np.int64) * 1_800_000,
        "open": np.r_[close[0], close[:-1]],
        "close": close,
    })
    frame["high"] = frame[["open", "close"]].max(axis=1) * 1.001
    frame["low"] = frame[["open", "close"]].min(axis=1) * 0.999
    frame["volume"] = 50.0
    return frame[["timestamp_ms", "open", "high", "low", "close", "volume"]]


#: A run of at least this many tests compiles the numba kernels in the background first.
_WARM_UP_FROM_ITEMS = 200
_WARM_UP: list[subprocess.Popen[bytes]] = []


def _warms_up(n_items: int) -> bool:
    return n_items >= _WARM_UP_FROM_ITEMS and not os.environ.get("MARGINLAB_TEST_NO_WARMUP")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a run that compiles in the background, the account engine's tests go last: the
    background process compiles the account kernels first (the slowest to compile, tens of
    seconds), while the tests before them compile the single-instrument kernels they need
    themselves; neither compiles what the other is compiling. Otherwise the order (files
    alphabetical) put the account tests first, compiling the same kernels twice at once."""
    if _warms_up(len(items)):
        items.sort(key=lambda item: item.path.name.startswith("test_account"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the linters in the background when their tests will run (``tests/test_lint``),
    and on a large run the kernels' compilation (``calibration._warmup``, as the Docker
    image build runs it): on a fresh clone every kernel is compiled where a test first
    needs it, often inside a worker or server subprocess on a test's clock (~85 s of
    compilation in all here); the background process fills numba's on-disk cache on the
    other core, and later tests and their subprocesses load from it. A test that needs a
    kernel first still compiles it itself: the results are the same either way."""
    if any(item.path.name == "test_lint.py" for item in session.items):
        from tests.test_lint import start_linters

        start_linters()
    if _warms_up(len(session.items)):
        _WARM_UP.append(subprocess.Popen(
            [sys.executable, "-m", "calibration._warmup"], cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.test_lint import stop_linters

    stop_linters()
    for proc in _WARM_UP:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
