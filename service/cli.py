"""``marginlab``, the console script: the library's commands (``calibration.cli``) plus the
service's.

The service adds ``serve`` (the REST API), the worker's job-queue mode (``marginlab worker``
without ``--study``, with ``--burst``), ``recalibrate`` (a schedule against a running API) and
``apikey``. ``calibration`` imports nothing of ``service``: this module builds on
``calibration.cli.build_parser`` instead, so every command keeps its name and flags.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import NoReturn

from calibration import cli as core
from calibration._errors import InvalidParameters


def _cmd_worker(args: argparse.Namespace) -> int:
    """``--study``: the library's worker on that study; without it, the service's job queue."""
    if args.study is not None:
        return core._cmd_worker(args)
    from service.jobs import run_queue_worker
    from service.settings import Settings

    core._quiet_optuna()
    run_queue_worker(Settings.from_env(), burst=args.burst)
    return 0


def _port_is_free(host: str, port: int) -> None:
    """Refuse a port something already listens on: granian binds with SO_REUSEPORT, so a
    second server would share the port and split the requests (with its own embedded state)
    instead of failing. A plain bind, without that option, fails while anyone listens."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InvalidParameters(f"cannot serve on {host}:{port}: {exc.strerror or exc} "
                                    "(is another marginlab serve running there?)",
                                    field="port") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from granian import Granian
    from granian.constants import Interfaces

    if args.workers > 1 and not os.environ.get("REDIS_URL"):
        raise InvalidParameters("--workers > 1 needs REDIS_URL (embedded state is per process)",
                                field="workers")
    _port_is_free(args.host, args.port)
    Granian("service.app:create_app", factory=True, address=args.host, port=args.port,
            interface=Interfaces.ASGI, workers=args.workers).serve()
    return 0


def _cmd_apikey(args: argparse.Namespace) -> int:
    from service.auth import hash_key, new_key

    key = new_key()
    entry = {hash_key(key): {"name": args.name, "role": args.role}}
    print(f"key (give it to {args.name}; it is not stored): {key}")
    print(f"add to MARGINLAB_API_KEYS / the keys file: {json.dumps(entry)}")
    return 0


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    from calibration.data import parse_duration_seconds
    from service.recalibrate import run_schedule

    spec = core._json_object(f"@{args.spec}", "spec")
    every = parse_duration_seconds(args.every)
    key = os.environ.get("MARGINLAB_API_KEY")
    return run_schedule(args.api, spec, args.instrument, every_s=every, key=key,
                        clamp=args.clamp, once=args.once)


def build_parser() -> argparse.ArgumentParser:
    """``calibration.cli.build_parser()`` with the service's commands and the worker's queue
    mode."""
    parser = core.build_parser()
    sub = core.subcommands(parser)

    wk = sub.choices["worker"]
    wk.add_argument("--burst", action="store_true",
                    help="queue mode: exit when the queue is empty")
    wk.set_defaults(func=_cmd_worker)

    sv = sub.add_parser(
        "serve", help="run the REST API (embedded defaults: no Redis or database needed)",
        description="Without REDIS_URL the API keeps its state under .marginlab/ and runs "
                    "calibrations in-process; with REDIS_URL (and MARGINLAB_STORAGE) it queues "
                    "them for `marginlab worker` processes.",
    )
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--workers", type=int, default=1, help="HTTP worker processes (Redis mode)")
    sv.set_defaults(func=_cmd_serve)

    rc = sub.add_parser(
        "recalibrate", help="re-run a stored spec on a schedule and publish inside guardrails",
        description="Submits the spec to the API, waits, and publishes a feasible "
                    "recommendation for the instrument; the server's guardrails decide. The "
                    "API key (admin) is read from MARGINLAB_API_KEY.",
    )
    rc.add_argument("--spec", required=True, help="the calibration spec (JSON file)")
    rc.add_argument("--instrument", required=True, help="the instrument to publish for")
    rc.add_argument("--every", default="1d", help="interval between runs (default: 1d)")
    rc.add_argument("--api", default="http://127.0.0.1:8000", help="the service's base URL")
    rc.add_argument("--clamp", action="store_true",
                    help="when refused for max_change, publish the recommendation moved only "
                         "as far as the guardrails allow")
    rc.add_argument("--once", action="store_true", help="one run, then exit")
    rc.set_defaults(func=_cmd_recalibrate)

    ak = sub.add_parser("apikey", help="make a new API key and the line that configures it")
    ak.add_argument("--role", choices=("reader", "operator", "admin"), required=True)
    ak.add_argument("--name", required=True, help="who the key is for")
    ak.set_defaults(func=_cmd_apikey)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``marginlab`` command (``calibration.cli.main`` with this parser)."""
    return core.main(argv, parser=build_parser())


def run() -> NoReturn:
    """The ``marginlab`` console script: ``main()``, then ``calibration.cli.exit_now``."""
    core.exit_now(main())


if __name__ == "__main__":  # pragma: no cover
    run()
