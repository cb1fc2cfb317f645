"""Replays of real stress days (``marginlab accounts replay NAME``): one command each, equal to
the ``accounts backtest`` it stands for, over files that exist in the shared data set."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from calibration.accounts import REPLAYS, replay
from calibration.cli import build_parser, main


@pytest.mark.parametrize("name", sorted(REPLAYS))
def test_every_replay_parses_and_reads_files_that_exist(name: str, shared_data: Path) -> None:
    chosen = replay(name)
    args = build_parser().parse_args(chosen.arguments())
    assert args.func.__name__ == "_cmd_accounts_backtest"
    for pairs in (chosen.data, chosen.funding, chosen.depth):
        for _, ref in pairs:
            assert (shared_data / ref).is_file(), ref
    assert chosen.start <= chosen.end


def test_replay_is_its_printed_command(shared_data: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``replay 2020-03-12 --json`` prints exactly what ``--print-command``'s command
    prints, and Black Thursday liquidates accounts with bad debt in its window."""
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(shared_data))
    assert main(["accounts", "replay", "2020-03-12", "--print-command"]) == 0
    command = shlex.split(capsys.readouterr().out)
    assert command[:3] == ["marginlab", "accounts", "backtest"]
    assert main(["accounts", "replay", "2020-03-12", "--json"]) == 0
    replayed = capsys.readouterr()
    assert "replay 2020-03-12: Black Thursday" in replayed.err
    assert main([*command[1:], "--json"]) == 0
    direct = json.loads(capsys.readouterr().out)
    report = json.loads(replayed.out)
    assert report == direct
    window = {row["window"]: row for row in report["summary"]}["black_thursday_2020"]
    assert window["liquidated_accounts"] > 0
    assert window["bad_debt_usd"] > 0


def test_unknown_replay_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["accounts", "replay", "2008-09-15"]) == 2
    err = capsys.readouterr().err
    assert "no replay '2008-09-15'" in err
    assert "2025-10-10, 2020-03-12, luna-2022-05" in err
