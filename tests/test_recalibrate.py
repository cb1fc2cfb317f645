"""Scheduled recalibration through a running service: publish only inside the guardrails."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from service.recalibrate import recalibrate_once
from tests.serving import running_service, write_bars_csv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running service whose guardrails allow decay to move 0.001 per update, any time."""
    root = tmp_path_factory.mktemp("recal")
    write_bars_csv(root / "BTC.csv", 3000, seed=21)
    guardrails = json.dumps({"min_interval_s": 0, "max_change": {"decay": 0.001}})
    with running_service(root, MARGINLAB_GUARDRAILS=guardrails) as base:
        yield base


def _spec(seed: int) -> dict[str, Any]:
    return {"data": [{"instrument": "BTCUSDT", "ref": "BTC.csv"}], "model": "ewma",
            "search_space": {"horizon_bars": {"value": 4}, "warmup_bars": {"value": 300},
                             "confidence": {"value": 0.99}},
            "constraints": {"kupiec_alpha": None, "no_red_in_stress_windows": False,
                            "max_premature_share": None},
            "liquidation": {"leverages": [5], "notionals_usd": [10000]},
            "n_trials": 6, "seed": seed}


@pytest.mark.slow
def test_publish_then_unchanged_then_refused_then_clamped(api: str) -> None:
    """First run publishes; the same result again changes nothing; a different one that moves
    decay too far is refused, and with --clamp publishes decay moved by exactly the limit."""
    quiet: list[str] = []
    first = recalibrate_once(api, _spec(1), "BTCUSDT", key=None, log=quiet.append,
                             poll_s=0.2)
    assert first["published"] is True
    assert first["version"] == 1
    again = recalibrate_once(api, _spec(1), "BTCUSDT", key=None, log=quiet.append, poll_s=0.2)
    assert again["published"] is False
    assert any("unchanged" in line for line in quiet)
    with urllib.request.urlopen(f"{api}/v1/recommendations/BTCUSDT") as resp:
        before = json.loads(resp.read())["params"]
    refused = None
    for seed in range(2, 12):  # another seed whose recommendation moves decay by > 0.001
        refused = recalibrate_once(api, _spec(seed), "BTCUSDT", key=None, log=quiet.append,
                                   poll_s=0.2)
        if refused.get("refused"):
            break
    assert refused is not None
    assert refused["published"] is False
    assert refused["refused"][0]["guardrail"] == "max_change"
    with urllib.request.urlopen(f"{api}/v1/recommendations/BTCUSDT") as resp:
        assert json.loads(resp.read())["params"] == before  # a refusal changes nothing
    clamped = recalibrate_once(api, _spec(seed), "BTCUSDT", key=None, clamp=True,
                               log=quiet.append, poll_s=0.2)
    assert clamped["published"] is True
    with urllib.request.urlopen(f"{api}/v1/recommendations/BTCUSDT") as resp:
        after = json.loads(resp.read())["params"]
    assert abs(after["decay"] - before["decay"]) == pytest.approx(0.001)
