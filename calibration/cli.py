"""``marginlab`` command line: the one door from the environment into the library.

The library's commands (backtest, accounts, calibrate, worker on a named study, data). The
installed ``marginlab`` script is ``service.cli``, which builds on ``build_parser`` and adds the
service's commands (serve, the worker's job-queue mode, recalibrate, apikey), so nothing here
imports ``service``.

Reads ``MARGINLAB_DATA_ROOT`` (default: the working directory) to resolve data references.
Bad input ends with exit code 2 and a one-line ``error: ...`` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from calibration._bars import BarSeries
from calibration._errors import InvalidParameters, MarginlabError
from calibration._version import ENGINE_VERSION

if TYPE_CHECKING:
    from rich.console import Console

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def _named(text: str) -> tuple[str | None, str]:
    """``NAME=REF`` → (NAME, REF); a bare ``REF`` → (None, REF)."""
    name, sep, ref = text.partition("=")
    if sep and name and "/" not in name:
        return name, ref
    return None, text


def _day_ms(text: str, field: str) -> int:
    try:
        d = date.fromisoformat(text)
    except ValueError:
        raise InvalidParameters(f"{field} must be an ISO date (YYYY-MM-DD), got {text!r}",
                                field=field) from None
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)


def _json_object(text: str, field: str) -> dict[str, Any]:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise InvalidParameters(f"{field}: cannot read {text[1:]!r}: {exc.strerror}",
                                    field=field) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidParameters(f"{field} is not valid JSON: {exc.msg} at char {exc.pos}",
                                field=field) from None
    if not isinstance(value, dict):
        raise InvalidParameters(f"{field} must be a JSON object", field=field)
    return value


def _explicit_positions(items: object) -> tuple[Any, ...]:
    """``[{"side", "entry" (ISO time) or "entry_bar", "notional_usd", "leverage"}, ...]``."""
    from calibration.liquidation import ExplicitPosition

    if not isinstance(items, list):
        raise InvalidParameters("positions must be a list of objects", field="positions")
    out = []
    for i, item in enumerate(items):
        where = f"positions[{i}]"
        if not isinstance(item, dict):
            raise InvalidParameters(f"{where} must be an object", field=where)
        extra = set(item) - {"side", "entry", "entry_bar", "notional_usd", "leverage"}
        if extra:
            raise InvalidParameters(f"{where}: unknown key {sorted(extra)[0]!r}", field=where)
        try:
            entry_ms = None
            if "entry" in item:
                stamp = datetime.fromisoformat(str(item["entry"]).replace("Z", "+00:00"))
                if stamp.tzinfo is None:
                    stamp = stamp.replace(tzinfo=UTC)
                entry_ms = int(stamp.timestamp() * 1000)
            out.append(ExplicitPosition(
                side=item["side"], entry_bar=item.get("entry_bar"),
                notional_usd=float(item["notional_usd"]), leverage=float(item["leverage"]),
                entry_ms=entry_ms,
            ))
        except KeyError as exc:
            raise InvalidParameters(f"{where}: missing {exc.args[0]!r}", field=where) from None
        except (TypeError, ValueError) as exc:
            raise InvalidParameters(f"{where}: {exc}", field=where) from None
    return tuple(out)


def _load_datasets(args: argparse.Namespace, root: str) -> list[BarSeries]:
    from calibration.data import (
        align,
        load_bars,
        load_book_depth,
        load_funding,
        parse_duration_seconds,
        repair_policy,
        resample,
        with_depth,
        with_funding,
    )

    start = _day_ms(args.start, "start") if args.start else None
    end = _day_ms(args.end, "end") + 86_400_000 if args.end else None
    repair = repair_policy(args.repair, field="repair")
    datasets = []
    for item in args.data:
        name, ref = _named(item)
        datasets.append(load_bars(ref, root=root, instrument=name, start_ms=start, end_ms=end,
                                  timestamp_format=args.timestamp_format,
                                  timestamp_unit=args.timestamp_unit, repair=repair))
    names = [b.instrument for b in datasets]
    if len(set(names)) != len(names):
        raise InvalidParameters(
            f"two datasets are named the same ({', '.join(names)}); name them NAME=REF",
            field="data",
        )

    def target(name: str | None, what: str) -> int:
        if name is None:
            if len(datasets) != 1:
                raise InvalidParameters(f"--{what} needs NAME=REF with several --data",
                                        field=what)
            return 0
        if name not in names:
            raise InvalidParameters(f"--{what} names unknown instrument {name!r}", field=what)
        return names.index(name)

    for item in args.funding or []:
        name, ref = _named(item)
        i = target(name, "funding")
        datasets[i] = with_funding(datasets[i], load_funding(ref, root=root))
    for item in args.depth or []:
        name, ref = _named(item)
        i = target(name, "depth")
        datasets[i] = with_depth(datasets[i], load_book_depth(ref, root=root))
    if args.resample:
        seconds = parse_duration_seconds(args.resample)
        datasets = [resample(b, seconds) for b in datasets]
    if args.align and len(datasets) > 1:
        datasets = align(datasets)
    return datasets


def _data_notes(datasets: Sequence[BarSeries]) -> list[str]:
    """What loading did to the data, one line each: nothing is repaired silently (§1)."""
    from calibration.coverage import iso_utc

    lines = []
    for bars in datasets:
        if bars.close_only:
            lines.append(f"note: {bars.instrument}: close-only series; losses use closes")
        if bars.newest_first:
            lines.append(f"note: {bars.instrument}: the file lists bars newest first; reversed")
        for r in bars.repairs:
            lines.append(f"repaired: {bars.instrument} row {r.row} ({iso_utc(r.timestamp_ms)}) "
                         f"{r.defect}: {r.change}")
    return lines


def _cmd_backtest(args: argparse.Namespace) -> int:
    from calibration.backtest import run_backtest
    from calibration.coverage import CoverageConfig
    from calibration.liquidation import LiquidationConfig
    from calibration.report import to_json
    from calibration.windows import DEFAULT_STRESS_WINDOWS, StressWindow

    root = os.environ.get("MARGINLAB_DATA_ROOT", os.getcwd())
    params = _json_object(args.params, "params")
    # rich (~0.05 s of import) only for a terminal: its spinner and progress bar are all it
    # adds there, and elsewhere the notes are plain lines.
    err = _stderr_console()
    with err.status("loading data", spinner="dots") if err is not None else _null():
        datasets = _load_datasets(args, root)
    for line in _data_notes(datasets):
        if err is not None:
            err.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr)
    coverage = CoverageConfig(
        horizon=args.horizon,
        coverage_level=args.coverage_level,
        overlapping=not args.non_overlapping,
        margin=args.margin,
        notional_usd=args.notional_usd,
    )
    liquidation: LiquidationConfig | None = None
    if not args.no_liquidation:
        fields = _json_object(args.liquidation, "liquidation") if args.liquidation else {}
        if "positions" in fields:
            fields["positions"] = _explicit_positions(fields["positions"])
        liquidation = LiquidationConfig.from_mapping(fields)
    if args.no_stress_windows:
        windows: tuple[StressWindow, ...] = ()
    elif args.stress_window:
        windows = tuple(StressWindow.parse(w) for w in args.stress_window)
    else:
        windows = DEFAULT_STRESS_WINDOWS
    total_bars = sum(len(b) for b in datasets)
    if err is None or total_bars <= 200_000 or args.quiet:
        report = run_backtest(
            datasets, args.model, params, coverage=coverage, liquidation=liquidation,
            stress_windows=windows,
        )
    else:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
            console=err, transient=True,
        ) as bar:
            task = bar.add_task("backtest", total=None)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=what)

            report = run_backtest(
                datasets, args.model, params, coverage=coverage, liquidation=liquidation,
                stress_windows=windows, progress=progress,
            )
    if args.json:
        sys.stdout.buffer.write(to_json(report) + b"\n")
    else:
        from calibration._summary import print_summary

        print_summary(report, _stdout_console())
    return 0


def _cmd_accounts_backtest(args: argparse.Namespace) -> int:
    from calibration.accounts import (
        AccountConfig,
        Market,
        PopulationSpec,
        load_accounts,
        run_account_backtest,
    )
    from calibration.data import resolve_ref
    from calibration.windows import DEFAULT_STRESS_WINDOWS, StressWindow

    root = os.environ.get("MARGINLAB_DATA_ROOT", os.getcwd())
    params = _json_object(args.params, "params")
    portfolio_params = (_json_object(args.portfolio_params, "portfolio_params")
                        if args.portfolio_params else None)
    if args.mode == "portfolio" and not args.portfolio_model:
        raise InvalidParameters("--mode portfolio needs --portfolio-model (grid, historical, "
                                "deribit_pme_2024 or paradex)", field="portfolio_model")
    if portfolio_params is not None and not args.portfolio_model:
        raise InvalidParameters("--portfolio-params goes with --portfolio-model",
                                field="portfolio_model")
    market = Market.from_series(_load_datasets(args, root))
    fields = _json_object(args.liquidation, "liquidation") if args.liquidation else {}
    if args.policy:
        fields = {**fields, "policy": args.policy}
    per_day = max(1, 86_400 // market.bar_seconds)
    config = AccountConfig.from_mapping(fields, mode=args.mode, holding_bars=7 * per_day)
    accounts = population = None
    if args.accounts:
        path = resolve_ref(args.accounts, root)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidParameters(f"cannot read accounts {args.accounts!r}: {exc}",
                                    field="accounts") from None
        accounts = load_accounts(text)
    else:
        population = PopulationSpec.from_mapping(_json_object(args.population, "population"))
    if args.no_stress_windows:
        windows: tuple[StressWindow, ...] = ()
    elif args.stress_window:
        windows = tuple(StressWindow.parse(w) for w in args.stress_window)
    else:
        windows = DEFAULT_STRESS_WINDOWS
    from calibration.accounts import parse_capacities

    frontier = parse_capacities(args.frontier) if args.frontier else None
    report, result = run_account_backtest(market, args.model, params, accounts=accounts,
                                          population=population, config=config,
                                          stress_windows=windows,
                                          portfolio_model=args.portfolio_model,
                                          portfolio_params=portfolio_params,
                                          frontier=frontier,
                                          frontier_kind=args.frontier_kind,
                                          workers=args.workers)
    if args.report:
        from calibration.accounts import render_account_report

        try:
            Path(args.report).write_text(render_account_report(report, result))
        except OSError as exc:
            raise InvalidParameters(f"cannot write the report {args.report!r}: "
                                    f"{exc.strerror}", field="report") from None
    if args.compare_policies:
        return _print_policies(args, market, params, list(result.accounts), config)
    if args.json:
        import msgspec

        sys.stdout.buffer.write(msgspec.json.encode(report) + b"\n")
        return 0
    from calibration._summary import print_accounts

    print_accounts(report, _stdout_console())
    return 0


def _cmd_accounts_replay(args: argparse.Namespace) -> int:
    from calibration.accounts._replays import replay_event

    root = Path(os.environ.get("MARGINLAB_DATA_ROOT", os.getcwd()))
    rows = replay_event(args.event, root)
    if args.json:
        import msgspec

        sys.stdout.buffer.write(msgspec.json.encode(rows) + b"\n")
        return 0
    cols = [c for c in rows[0] if c != "scenario"]
    print(f"{'scenario':<40}" + "".join(f"{c:>20}" for c in cols))
    for r in rows:
        print(f"{r['scenario']:<40}" + "".join(
            f"{r[c]:>20,.0f}" if isinstance(r[c], float) else f"{r[c]:>20,}" for c in cols))
    return 0


def _print_policies(args: argparse.Namespace, market: Any, params: dict[str, Any],
                    accounts: list[Any], config: Any) -> int:
    """``--compare-policies``: one row per liquidation policy for the same accounts."""
    from calibration.accounts import compare_policies, least_loss
    from calibration.horizon import resolve_horizon
    from calibration.models import make_model

    margin = make_model(args.model, params)
    horizon = resolve_horizon({"params.horizon_bars": margin.horizon}, market.bar_seconds)
    portfolio = None
    if args.portfolio_model:
        from calibration.models import make_portfolio_model

        portfolio = make_portfolio_model(args.portfolio_model, _json_object(
            args.portfolio_params, "portfolio_params") if args.portfolio_params else None
        ).with_horizon(horizon.bars)
    rows = compare_policies(market, margin.with_horizon(horizon.bars), accounts, config,
                            portfolio=portfolio)
    if args.json:
        import msgspec

        sys.stdout.buffer.write(msgspec.json.encode(
            {"policies": rows, "least_loss": least_loss(rows)}) + b"\n")
        return 0
    cols = ("policy", "liquidated_accounts", "liquidated_positions", "liquidated_notional_usd",
            "bad_debt_usd", "fee_usd")
    print("  ".join(f"{c:>26}" for c in cols))
    for row in rows:
        print("  ".join(f"{row[c]:>26,.2f}" if isinstance(row[c], float) else f"{row[c]:>26}"
                        for c in cols))
    print(f"least bad debt: {least_loss(rows)}")
    return 0


_OTHER_NUMERICS_HELP = ("a study created under other versions of numpy, numba, llvmlite, "
                        "scipy or pandas (refused by default: its result would no longer be "
                        "reproducible, and then says so)")


def _retain_freed_memory() -> None:
    """Trials reuse the memory their predecessors freed (``calibration._allocator``),
    unless ``MARGINLAB_RETAIN_FREED_MEMORY=0``; forked helpers inherit the setting."""
    if os.environ.get("MARGINLAB_RETAIN_FREED_MEMORY", "1") != "0":
        from calibration._allocator import retain_freed_memory

        retain_freed_memory()


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from calibration.calibrate import TrialCallback, check_workers, prepare, run_calibration
    from calibration.spec import decode_spec

    root = os.environ.get("MARGINLAB_DATA_ROOT", os.getcwd())
    try:
        raw = Path(args.spec).read_bytes()
    except OSError as exc:
        raise InvalidParameters(f"cannot read spec {args.spec!r}: {exc.strerror}",
                                field="spec") from None
    spec = decode_spec(raw)
    check_workers(args.workers, args.storage)
    _retain_freed_memory()
    err = Console(stderr=True)
    prepared = prepare(spec, root)  # kept for the HTML report's evidence
    _quiet_optuna()
    show = err.is_terminal and not args.quiet
    with Progress(
        TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=err, disable=not show, transient=True,
    ) as bar:
        task = bar.add_task("", total=spec.n_trials)

        def on_trial(done: int, total: int | None, best: dict[str, Any] | None) -> None:
            bar.update(task, completed=done, description=progress_best_text(best))

        def watch(_study: object) -> TrialCallback | None:
            # The callback scans the study: only pay for it when someone watches.
            return on_trial if show else None

        result = run_calibration(spec, root=root, storage=args.storage, study=args.study,
                                 prepared=prepared, workers=args.workers, watch=watch,
                                 allow_other_numerics=args.allow_other_numerics)
    assert result is not None  # no stop signal: the run ends with a result
    if args.report:
        from calibration.html_report import render_calibration_report

        Path(args.report).write_text(render_calibration_report(result, prepared))
    if args.json:
        import msgspec

        sys.stdout.buffer.write(msgspec.json.encode(result) + b"\n")
    else:
        from calibration._summary import print_calibration

        print_calibration(result, _stdout_console())
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from calibration.calibrate import join_calibration

    root = os.environ.get("MARGINLAB_DATA_ROOT", os.getcwd())
    if args.study is None:
        # Without a study the worker consumes the service's job queue: service.cli's door.
        raise InvalidParameters("worker needs --study here (the job-queue worker is the "
                                "service's: marginlab worker, installed with the service)",
                                field="study")
    _quiet_optuna()
    if args.claim_trials < 1:
        raise InvalidParameters("--claim-trials must be at least 1", field="claim_trials")
    _retain_freed_memory()
    ran = join_calibration(args.study, storage=args.storage, root=root,
                           worker=args.worker_index, claim_trials=args.claim_trials,
                           allow_other_numerics=args.allow_other_numerics)
    if not args.quiet:
        print(f"worker finished: ran {ran} trials of study {args.study}", file=sys.stderr)
    return 0


def _load_result(ref: str, field: str, storage: str, root: str) -> tuple[Any, Any]:
    """A calibration result and its spec (``None`` from a file) from ``ref``: a result JSON
    file (``--json``'s output), or else a study id in ``storage`` (summarized here)."""
    import msgspec

    from calibration.calibrate import CalibrationResult, load_study, prepare, summarize
    from calibration.storage import Coordination

    path = Path(ref)
    if path.is_file():
        try:
            return msgspec.json.decode(path.read_bytes(), type=CalibrationResult), None
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidParameters(f"{field}: {ref!r} is not a calibration result: {exc}",
                                    field=field) from None
    with Coordination(storage) as coordination:
        try:
            study, spec = load_study(ref, coordination)
        except InvalidParameters as exc:
            raise InvalidParameters(f"{field}: {ref!r} is neither a result file nor a study "
                                    f"({exc})", field=field) from None
        return summarize(study, prepare(spec, root), storage), spec


def _cmd_compare(args: argparse.Namespace) -> int:
    import msgspec

    from calibration.calibrate import compare_results, prepare
    from calibration.spec import decode_spec

    root = os.environ.get("MARGINLAB_DATA_ROOT", os.getcwd())
    _quiet_optuna()
    a, spec_a = _load_result(args.a, "a", args.storage, root)
    b, spec_b = _load_result(args.b, "b", args.storage, root)
    spec = spec_a or spec_b
    if args.spec:
        try:
            spec = decode_spec(Path(args.spec).read_bytes())
        except OSError as exc:
            raise InvalidParameters(f"cannot read spec {args.spec!r}: {exc.strerror}",
                                    field="spec") from None
    published = _json_object(args.published, "published") if args.published else None
    prepared = prepare(spec, root) if spec is not None else None
    comparison = compare_results(a, b, prepared=prepared, published=published)
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(comparison) + b"\n")
        return 0
    print(f"a: {comparison.a.study} (trial {comparison.a.trial}, "
          f"{'feasible' if comparison.a.feasible else 'NOT feasible'})")
    print(f"b: {comparison.b.study} (trial {comparison.b.trial}, "
          f"{'feasible' if comparison.b.feasible else 'NOT feasible'})")
    if not comparison.same_data:
        print("note: the two results ran on different data")

    def cell(value: Any) -> str:
        return "–" if value is None else (f"{value:.6g}" if isinstance(value, float)
                                          else str(value))

    print(f"{'':<24}{'a':>14}{'b':>14}{'published':>14}")
    for title, rows in (("parameters", comparison.params),
                        ("objectives (in-sample)", comparison.objectives)):
        print(title)
        for name, row in rows.items():
            print(f"  {name:<22}{cell(row['a']):>14}{cell(row['b']):>14}"
                  f"{cell(row['published']):>14}")
    print("bad debt per window, bps (a / b / published)")
    for window, per_inst in comparison.windows.items():
        for inst, sides in per_inst.items():
            values = " / ".join(cell((sides.get(k) or {}).get("bad_debt_bps"))
                                for k in ("a", "b", "published"))
            print(f"  {window} {inst}: {values}")
    print(f"recommended: {comparison.recommended or 'none'} ({comparison.explanation})")
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from calibration.fetch import ArchiveClient, fetch_binance

    root = os.environ.get("MARGINLAB_DATA_ROOT", os.getcwd())
    days = []
    for field in ("start", "end"):
        text = getattr(args, field)
        try:
            days.append(date.fromisoformat(text))
        except ValueError:
            raise InvalidParameters(f"--{field} must be an ISO date (YYYY-MM-DD), got {text!r}",
                                    field=field) from None
    client = ArchiveClient(base_url=args.base_url)
    err = Console(stderr=True)
    with Progress(TextColumn("archives"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), console=err,
                  disable=not err.is_terminal or args.json, transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        report = fetch_binance(args.symbol, interval=args.interval, start=days[0], end=days[1],
                               root=root, market=args.market, funding=args.funding,
                               client=client, progress=progress)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0

    def stamp(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")

    print(f"{report.symbol} {report.market} {report.interval} {report.start}..{report.end}: "
          f"{report.rows} bars ({stamp(report.first_ms)} .. {stamp(report.last_ms)} UTC) "
          f"from {len(report.archives)} archives")
    print(f"  bars:        {report.bars_ref}")
    print(f"  fingerprint: {report.fingerprint}")
    gaps = "none" if not report.gaps else (
        f"{len(report.gaps)} ({report.missing_bars} bars missing; first at "
        f"{stamp(report.gaps[0].start_ms)})")
    print(f"  gaps:        {gaps}")
    if report.funding_ref is not None:
        print(f"  funding:     {report.funding_ref} ({report.funding_rows} settlements)")
    if report.unverified:
        print(f"  unverified:  {len(report.unverified)} archives had no .CHECKSUM")
    print(f"  missing:     {len(report.missing) or 'none'}")
    for path in report.missing:
        print(f"    {path}")
    return 0


def _stderr_console() -> Console | None:
    """rich's console on standard error when that is a terminal (what rich itself would
    call one), else None: nothing there needs rich."""
    try:
        tty = sys.stderr.isatty()
    except ValueError:  # closed
        tty = False
    if not (tty or os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE") == "1"):
        return None
    from rich.console import Console

    err = Console(stderr=True)
    return err if err.is_terminal else None


def _stdout_console() -> Console:
    """The console of the human-readable summaries at rich's own width: ``COLUMNS`` if set,
    else the terminal's (also when stdout is piped from one), else 80. The tables fit 80."""
    from rich.console import Console

    return Console()


def progress_best_text(best: dict[str, Any] | None) -> str:
    """The progress bar's "best so far": what the recommendation would be now
    (``calibration.calibrate.best_feasible``, the risk appetite applied)."""
    if best is None:
        return "best: no feasible trial yet"
    where = "" if best.get("within_risk_appetite", True) else " (none within appetite)"
    if "capital_cost" in best and "insolvency_bps" in best:
        return (f"best{where}: trial {best['trial']}, IM {100 * best['capital_cost']:.2f}% of "
                f"notional, {best['insolvency_bps']:.2f} bps")
    named = best.get("objectives", {})
    return f"best{where}: trial {best['trial']}, " + ", ".join(
        f"{name} {value:.4g}" for name, value in named.items())


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def build_parser() -> argparse.ArgumentParser:
    """The ``marginlab`` argument parser."""
    parser = _Parser(prog="marginlab", description="Backtest and calibrate margin models.")
    parser.add_argument("--version", action="version", version=f"marginlab {ENGINE_VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    bt = sub.add_parser(
        "backtest",
        help="coverage backtest and liquidation simulation of one margin model",
        description=(
            "Coverage backtest (did margin cover the loss over the close-out horizon?) and "
            "liquidation/insolvency simulation of a margin model on historical bars. Data "
            "references are paths relative to MARGINLAB_DATA_ROOT (default: the working "
            "directory)."
        ),
    )
    bt.add_argument("--data", action="append", required=True, metavar="[NAME=]REF",
                    help="bars file (CSV/Parquet) under the data root; repeat per instrument")
    bt.add_argument("--model", required=True, help="model family: tiered, ewma or fhs")
    bt.add_argument("--params", default="{}", metavar="JSON",
                    help="hyperparameters as a JSON object, or @file.json (default: {})")
    bt.add_argument("--horizon", metavar="BARS|DURATION",
                    help="close-out horizon (margin period of risk) in bars (60) or as a "
                         "duration (1h, 2d): sizes the margin and is the test's loss window; "
                         "the same as params' horizon_bars (set one, or both alike); "
                         "default 1h")
    bt.add_argument("--coverage-level", type=float, metavar="Q",
                    help="coverage level q (default: the model's confidence, else 0.99)")
    bt.add_argument("--non-overlapping", action="store_true",
                    help="observe every horizon-th bar instead of every bar")
    bt.add_argument("--margin", choices=("mm", "im"), default="mm",
                    help="which margin the coverage test checks (default: mm)")
    bt.add_argument("--notional-usd", type=float, default=10_000.0,
                    help="position size for notional-dependent models (default: 10000)")
    bt.add_argument("--funding", action="append", metavar="[NAME=]REF",
                    help="funding-rate file for an instrument")
    bt.add_argument("--depth", action="append", metavar="[NAME=]REF",
                    help="Binance bookDepth file for an instrument")
    bt.add_argument("--repair", metavar="DEFECT[,DEFECT]",
                    help="opt-in repairs of named defects, each listed in the report: "
                         "ohlc-range (clamp open/close into [low, high]), duplicates (drop "
                         "rows repeating an earlier row); default: none (strict)")
    bt.add_argument("--timestamp-format", metavar="STRFTIME",
                    help="format of non-ISO date cells, e.g. %%d/%%m/%%Y (day-first dates "
                         "are refused without it)")
    bt.add_argument("--timestamp-unit", choices=("s", "ms", "us", "ns"),
                    help="unit of epoch timestamps (default: told by magnitude)")
    bt.add_argument("--start", metavar="YYYY-MM-DD", help="first day to use")
    bt.add_argument("--end", metavar="YYYY-MM-DD", help="last day to use (inclusive)")
    bt.add_argument("--resample", metavar="DURATION", help="aggregate bars first (e.g. 5m)")
    bt.add_argument("--align", action="store_true",
                    help="restrict all instruments to their common timestamps")
    bt.add_argument("--stress-window", action="append", metavar="NAME=FROM[..TO]",
                    help="named stress window (repeat); default: the domain's crash episodes")
    bt.add_argument("--no-stress-windows", action="store_true", help="report whole series only")
    bt.add_argument("--liquidation", metavar="JSON",
                    help="liquidation settings as a JSON object (leverages, notionals_usd, "
                         "latency_bars, ...), or @file.json")
    bt.add_argument("--no-liquidation", action="store_true",
                    help="skip the liquidation/insolvency simulation")
    bt.add_argument("--json", action="store_true", help="print the full JSON report")
    bt.add_argument("--quiet", action="store_true", help="no progress bar")
    bt.set_defaults(func=_cmd_backtest)

    ac = sub.add_parser("accounts", help="account-level backtests (cross / isolated margin)")
    ac_sub = ac.add_subparsers(dest="accounts_command", required=True, parser_class=_Parser)
    ab = ac_sub.add_parser(
        "backtest",
        help="replay accounts (collateral pooled across instruments) through the bars",
        description=(
            "Account liquidation replay (domain.md §7): cross margin pools each account's "
            "collateral against the sum of its positions' requirements; isolated replays each "
            "position alone with its entry-IM share of the collateral. Reports liquidations, "
            "bad debt cross vs isolated, healthy-leg liquidations and accounts saved by cross, "
            "overall and per stress window. Data references are relative to "
            "MARGINLAB_DATA_ROOT."
        ),
    )
    ab.add_argument("--data", action="append", required=True, metavar="NAME=REF",
                    help="bars of one instrument (repeat); the market is their common bars")
    books = ab.add_mutually_exclusive_group(required=True)
    books.add_argument("--accounts", metavar="FILE",
                       help="accounts as JSON (list of {id, entry, collateral, positions}) or "
                            "CSV (id,entry,kind,name,amount), under the data root")
    books.add_argument("--population", metavar="JSON",
                       help="a seeded population (calibration.accounts.PopulationSpec fields) "
                            "as JSON, or @file.json")
    ab.add_argument("--model", required=True, help="model family for every instrument")
    ab.add_argument("--params", default="{}", metavar="JSON",
                    help="hyperparameters as a JSON object, or @file.json")
    ab.add_argument("--mode", choices=("isolated", "cross", "portfolio"), default="cross",
                    help="margin mode of every account that names none (default: cross)")
    ab.add_argument("--portfolio-model", metavar="NAME",
                    help="for accounts in portfolio mode: the requirement's scenario model, a "
                         "family (grid, historical) or a published preset (deribit_pme_2024, "
                         "paradex)")
    ab.add_argument("--portfolio-params", metavar="JSON",
                    help="the portfolio model's hyperparameters as a JSON object, or @file.json")
    ab.add_argument("--liquidation", metavar="JSON",
                    help="holding_bars, latency_bars, spread_rate, liquidation_fee_rate, "
                         "insurance_fund_usd, capacity, adl, backstop_threshold, partial_*, "
                         "keeper_*, oracle_* (AccountConfig fields) as JSON, or @file.json; "
                         "\"preset\": hyperliquid|dydx_v4|aave_v3|binance sets a venue's fields "
                         "(explicit keys override)")
    ab.add_argument("--policy", choices=("close_all", "largest_requirement_first", "partial",
                                         "hedge_preserving"),
                    help="liquidation policy (default close_all; see AccountConfig.policy)")
    ab.add_argument("--compare-policies", action="store_true",
                    help="replay the same accounts under every liquidation policy and print "
                         "bad debt and liquidated notional per policy")
    ab.add_argument("--frontier", metavar="C[,C]",
                    help="capacities (liquidations per bar, or USD per bar with "
                         "--frontier-kind notional; inf: no limit), e.g. 1,2,5,10,inf: adds "
                         "the throughput-insolvency frontier to the report")
    ab.add_argument("--frontier-kind", choices=("accounts", "notional"), default="accounts",
                    help="what --frontier's capacities limit (default: accounts per bar)")
    ab.add_argument("--workers", type=int, default=1, metavar="N",
                    help="threads replaying the accounts (default 1); the same figures for any "
                         "N, bit for bit")
    ab.add_argument("--funding", action="append", metavar="NAME=REF", help=argparse.SUPPRESS)
    ab.add_argument("--depth", action="append", metavar="NAME=REF", help=argparse.SUPPRESS)
    ab.add_argument("--repair", metavar="DEFECT[,DEFECT]", help="opt-in repairs (as backtest)")
    ab.add_argument("--timestamp-format", metavar="STRFTIME", help=argparse.SUPPRESS)
    ab.add_argument("--timestamp-unit", choices=("s", "ms", "us", "ns"), help=argparse.SUPPRESS)
    ab.add_argument("--start", metavar="YYYY-MM-DD", help="first day to use")
    ab.add_argument("--end", metavar="YYYY-MM-DD", help="last day to use (inclusive)")
    ab.add_argument("--resample", metavar="DURATION", help="aggregate bars first (e.g. 1h)")
    ab.add_argument("--stress-window", action="append", metavar="NAME=FROM[..TO]",
                    help="named stress window (repeat); default: the domain's crash episodes")
    ab.add_argument("--no-stress-windows", action="store_true", help="report all only")
    ab.add_argument("--json", action="store_true", help="print the full JSON report")
    ab.add_argument("--report", metavar="FILE",
                    help="also write the HTML report (charts of bad debt and contagion per "
                         "window, the worst accounts, the insurance fund) to FILE")
    ab.set_defaults(func=_cmd_accounts_backtest, align=False)

    rp = ac_sub.add_parser(
        "replay", help="replay a real stress event with the venue mechanics (one command)",
        description=("Replay a real stress event from the data under MARGINLAB_DATA_ROOT: "
                     "2020-03-12 (Black Thursday in kind: hourly ETH, Maker-like vaults, the "
                     "engine alone, keepers behind a one-hour oracle, and a gas spike); "
                     "2025-10-10 (BTCUSDT perpetual 5m with Binance's ±1% book-depth bands "
                     "driving the impact: the engine, the hyperliquid and dydx_v4 presets); "
                     "luna-2022-05 (LUNA 1m: the engine, hyperliquid and aave_v3)."))
    rp.add_argument("event", choices=("2020-03-12", "2025-10-10", "luna-2022-05"),
                    help="the event")
    rp.add_argument("--json", action="store_true", help="print the rows as JSON")
    rp.set_defaults(func=_cmd_accounts_replay, align=False)

    from calibration._defaults import DEFAULT_STORAGE

    cal = sub.add_parser(
        "calibrate",
        help="search a model's parameters (Optuna) for capital cost against insolvency",
        description=(
            "Multi-objective calibration of a margin model from a JSON spec (see examples/). "
            "Studies live in --storage; re-running the same spec resumes its study."
        ),
    )
    cal.add_argument("--spec", required=True, help="the calibration spec (JSON file)")
    cal.add_argument("--storage", default=DEFAULT_STORAGE,
                     help=f"study storage: a journal file path, redis://..., postgresql://... "
                          f"or memory (default: {DEFAULT_STORAGE})")
    cal.add_argument("--workers", type=int, default=1,
                     help="worker processes on this machine, this one included (default: 1)")
    cal.add_argument("--study", help="study name (default: derived from the spec's hash)")
    cal.add_argument("--json", action="store_true", help="print the full JSON result")
    cal.add_argument("--report", metavar="OUT.html",
                     help="also write a self-contained HTML report (charts and tables)")
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    cal.add_argument("--allow-other-numerics", action="store_true",
                     help="resume " + _OTHER_NUMERICS_HELP)
    cal.set_defaults(func=_cmd_calibrate)

    cmp_ = sub.add_parser(
        "compare", help="two calibration results side by side, against the published "
                        "parameters replayed over the same history",
        description="A and B are result files (calibrate --json) or study ids in --storage. "
                    "The published parameters (the spec's, or --published) are replayed over "
                    "the data of A's spec (a study's own, or --spec).",
    )
    cmp_.add_argument("a", help="the first result: a result JSON file or a study id")
    cmp_.add_argument("b", help="the second result: a result JSON file or a study id")
    cmp_.add_argument("--storage", default=DEFAULT_STORAGE,
                      help="the study storage of study ids (default: %(default)s)")
    cmp_.add_argument("--spec", help="the spec whose data the published parameters are "
                                     "replayed over (default: the first study's)")
    cmp_.add_argument("--published", metavar="JSON",
                      help="the parameters in force, JSON or @file (default: the spec's)")
    cmp_.add_argument("--json", action="store_true", help="print the comparison as JSON")
    cmp_.set_defaults(func=_cmd_compare)

    wk = sub.add_parser(
        "worker", help="join a running calibration study and add trials to it",
        description="Join a study from this or another machine; data references resolve "
                    "under MARGINLAB_DATA_ROOT and must match the study's fingerprints.",
    )
    wk.add_argument("--study", help="the study name; without it, consume the service's job "
                                    "queue (needs REDIS_URL)")
    wk.add_argument("--storage", default=DEFAULT_STORAGE, help="the study's storage URL")
    wk.add_argument("--worker-index", type=int, default=1,
                    help="offsets the sampler seed so workers explore differently")
    wk.add_argument("--claim-trials", type=int, default=1, metavar="N",
                    help="with batch_size: claim up to N of a batch's queued trials at once "
                         "and compute their coverage in one pass (a worker's share is "
                         "ceil(batch_size / workers); below batch_size, claims shrink towards "
                         "the batch's end; the results are the same for any N; 1, the "
                         "default, measured fastest)")
    wk.add_argument("--quiet", action="store_true", help="no closing line")
    wk.add_argument("--allow-other-numerics", action="store_true",
                    help="join " + _OTHER_NUMERICS_HELP)
    wk.set_defaults(func=_cmd_worker)

    from calibration._defaults import BINANCE_BASE_URL, INTERVALS

    da = sub.add_parser("data", help="fetch market data into the data root")
    da_sub = da.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    fe = da_sub.add_parser(
        "fetch", help="download an exchange's public kline archives",
        description="Download Binance's public kline archives (data.binance.vision; monthly "
                    "for whole months, daily for the rest), verify their checksums, validate "
                    "the bars and write binance/{market}/{SYMBOL}_{interval}_{start}_{end}.csv "
                    "under MARGINLAB_DATA_ROOT (default: the working directory).",
    )
    fe.add_argument("exchange", choices=("binance",), help="the exchange (binance)")
    fe.add_argument("symbol", help="the exchange's symbol, e.g. BTCUSDT")
    fe.add_argument("--interval", required=True, choices=tuple(INTERVALS), metavar="INTERVAL",
                    help=f"bar interval: {', '.join(INTERVALS)}")
    fe.add_argument("--start", required=True, metavar="YYYY-MM-DD", help="first day (UTC)")
    fe.add_argument("--end", required=True, metavar="YYYY-MM-DD",
                    help="last day (UTC, inclusive)")
    fe.add_argument("--market", choices=("spot", "um"), default="spot",
                    help="spot or um (USD-M futures) (default: spot)")
    fe.add_argument("--funding", action="store_true",
                    help="also fetch the funding rates into ..._funding.csv (um only)")
    fe.add_argument("--base-url", default=BINANCE_BASE_URL,
                    help=f"archive root, e.g. a mirror (default: {BINANCE_BASE_URL})")
    fe.add_argument("--json", action="store_true", help="print the report as JSON")
    fe.set_defaults(func=_cmd_data_fetch)

    return parser


def subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any]:
    """The subcommand table of a ``build_parser()`` parser, for a caller that adds commands
    (``service.cli``) or extends one (``.choices["worker"]``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError("the parser has no subcommands")


def main(argv: Sequence[str] | None = None,
         parser: argparse.ArgumentParser | None = None) -> int:
    """Parse ``argv`` with ``parser`` (default: ``build_parser()``) and run the command: its
    exit code, 2 with one ``error:`` line on stderr for a ``MarginlabError``."""
    parser = parser if parser is not None else build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except MarginlabError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return code


def exit_now(code: int) -> NoReturn:
    """Exit with ``code`` without the interpreter's finalisation. Tearing down numba's JIT
    state and the loaded modules takes ~0.3 s after a calibration or backtest, for a process
    that is ending anyway; every file the command wrote is closed by then, and the standard
    streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> NoReturn:
    """``python -m calibration.cli``: ``main()``, then ``exit_now`` (the installed
    ``marginlab`` script is ``service.cli.run``, these commands and the service's)."""
    exit_now(main())


if __name__ == "__main__":  # pragma: no cover
    run()
