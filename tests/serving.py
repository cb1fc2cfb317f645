"""Run the service as a real HTTP server (``marginlab serve``) for tests that need one."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import random_walk


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_bars_csv(path: Path, n: int, *, seed: int, vol: float = 0.004,
                   start_s: int = 1_640_995_200, bar_seconds: int = 1800,
                   **walk: float | int | None) -> None:
    """A consistent ``timestamp,open,high,low,close,volume`` CSV of a seeded random walk."""
    close = random_walk(n, seed=seed, vol=vol, **walk)  # type: ignore[arg-type]
    lines = ["timestamp,open,high,low,close,volume"]
    for i, c in enumerate(close):
        o = close[i - 1] if i else c
        lines.append(f"{start_s + bar_seconds * i},{o},{max(o, c) * 1.002},"
                     f"{min(o, c) * 0.998},{c},100")
    path.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def running_service(root: Path, **env: str) -> Iterator[str]:
    """The service in embedded mode on a free port with ``root`` as data root; yields its URL."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("REDIS_URL", "MARGINLAB_API_KEYS")}
    environ.update(MARGINLAB_DATA_ROOT=str(root), MARGINLAB_STATE_DIR=str(root / ".state"),
                   **env)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port",
                             str(port)], env=environ, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the service did not start") from None
                time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
