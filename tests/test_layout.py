"""The layout: ``calibration`` imports nothing of ``service``; the ``marginlab`` script is
``service.cli``, the library's commands plus the service's, every flag kept."""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _service_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line`` of every import of ``service`` (or a submodule) in one source file,
    wherever it sits (module level, a function, ``TYPE_CHECKING``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        if any(n == "service" or n.startswith("service.") for n in names):
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_calibration_imports_nothing_of_service() -> None:
    """No module under calibration/ imports service (data flows down, nothing imports up)."""
    files = sorted((ROOT / "calibration").rglob("*.py"))
    assert len(files) > 20  # the walk found the package
    offenders = [hit for f in files for hit in _service_imports(f)]
    assert offenders == []


def test_the_import_check_sees_nested_imports(tmp_path: Path) -> None:
    """The AST walk finds ``import service``, ``from service.x import y`` inside functions,
    and ignores look-alikes (``services``, relative imports)."""
    src = tmp_path / "probe.py"
    src.write_text("import services\nfrom . import service\n"
                   "def f():\n    import service.jobs\n"
                   "    from service.auth import hash_key\n")
    hits = [h.rsplit(":", 1)[1] for h in _service_imports(src, tmp_path)]
    assert hits == ["4", "5"]


def test_console_script_is_service_cli() -> None:
    """pyproject's ``marginlab`` script is ``service.cli:run``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"marginlab": "service.cli:run"}


def _commands(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Top-level command → its sorted option strings."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sorted(o for a in p._actions for o in a.option_strings
                         if o not in ("-h", "--help"))
            for name, p in sub.choices.items()}


#: The service commands' flags as they were when calibration/cli.py held them (and
#: ``--allow-other-numerics``, added since).
SERVICE_FLAGS = {
    "serve": ["--host", "--port", "--workers"],
    "worker": ["--allow-other-numerics", "--burst", "--claim-trials", "--quiet", "--storage",
               "--study", "--worker-index"],
    "recalibrate": ["--api", "--clamp", "--every", "--instrument", "--once", "--spec"],
    "apikey": ["--name", "--role"],
}


def test_service_cli_keeps_every_command_and_flag() -> None:
    """service.cli offers the library's commands and the service's with their old flags;
    calibration.cli only the library's."""
    from calibration import cli as core
    from service import cli

    library = _commands(core.build_parser())
    full = _commands(cli.build_parser())
    assert set(library) == {"backtest", "accounts", "calibrate", "compare", "worker", "data"}
    assert set(full) == set(library) | {"serve", "recalibrate", "apikey"}
    for name, flags in SERVICE_FLAGS.items():
        assert full[name] == flags, name
    for name in library.keys() - {"worker"}:
        assert full[name] == library[name], name
    assert "--burst" not in library["worker"]


def test_library_worker_needs_a_study(capsys: pytest.CaptureFixture[str]) -> None:
    """calibration.cli's worker without --study exits 2 naming --study (the job queue is
    the service's)."""
    from calibration.cli import main

    assert main(["worker"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: worker needs --study")
    assert err.count("\n") == 1


def test_apikey_through_service_cli(capsys: pytest.CaptureFixture[str]) -> None:
    """marginlab apikey prints a key and the keys-file entry for its sha256."""
    from service.cli import main

    assert main(["apikey", "--role", "reader", "--name", "ci"]) == 0
    key_line, entry_line = capsys.readouterr().out.splitlines()
    key = key_line.rsplit(": ", 1)[1]
    entry = json.loads(entry_line.split(": ", 1)[1])
    assert entry == {hashlib.sha256(key.encode()).hexdigest(): {"name": "ci", "role": "reader"}}


def test_serve_refuses_a_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    """marginlab serve on a port someone listens on exits 2 before starting a server."""
    import socket

    from service.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
