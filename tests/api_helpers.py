"""Helpers shared by the API tests: synthetic bar files, calibration specs, keys and waiting."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: 2023-01-01T00:00:00Z: after every default stress window but one (none is needed).
START_MS = 1_672_531_200_000
FINAL = ("succeeded", "failed", "cancelled")


def bars_csv(n: int, *, seed: int = 0, bar_seconds: int = 1800, start_ms: int = START_MS,
             drop_rows: tuple[int, ...] = ()) -> bytes:
    """A valid OHLCV CSV of ``n`` bars (random walk around 100, seeded).

    ``drop_rows`` removes those bars, which leaves gaps the validation report must list.
    """
    rng = np.random.default_rng(seed)
    r = rng.standard_t(4, n) * 0.004
    r[0] = 0.0
    close = 100.0 * np.exp(np.cumsum(r))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) * (1 + rng.exponential(0.002, n))
    low = np.minimum(open_, close) * (1 - rng.exponential(0.002, n))
    volume = rng.uniform(10, 100, n)
    ts = start_ms + np.arange(n, dtype=np.int64) * bar_seconds * 1000
    dropped = set(drop_rows)
    lines = ["timestamp_ms,open,high,low,close,volume"]
    lines += [f"{ts[i]},{open_[i]:.6f},{high[i]:.6f},{low[i]:.6f},{close[i]:.6f},{volume[i]:.4f}"
              for i in range(n) if i not in dropped]
    return ("\n".join(lines) + "\n").encode()


def calibration_spec(ref: str, *, instrument: str = "SYN", n_trials: int = 6,
                     seed: int = 1, **extra: Any) -> dict[str, Any]:
    """A small EWMA calibration on one uploaded dataset (in-sample split at 70 %)."""
    spec: dict[str, Any] = {
        "data": [{"instrument": instrument, "ref": ref}],
        "model": "ewma",
        "search_space": {"warmup_bars": {"value": 200}, "horizon_bars": {"value": 4}},
        "n_trials": n_trials,
        "seed": seed,
        "stress_windows": [],
        "walk_forward": {"folds": 1},
    }
    spec.update(extra)
    return spec


def key_config(**keys_by_role: str) -> str:
    """``MARGINLAB_API_KEYS`` JSON for ``role=key`` pairs (keys stored as sha256 digests)."""
    return json.dumps({hashlib.sha256(key.encode()).hexdigest(): {"name": role, "role": role}
                       for role, key in keys_by_role.items()})


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(probe: Callable[[], T | None], *, timeout_s: float, every_s: float = 0.2,
             what: str = "condition") -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)
