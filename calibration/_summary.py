"""The human-readable summaries of a backtest report and of a calibration (rich tables).

Every table fits an 80-column terminal: wide figures are split over several narrow tables
rather than cut, numbers are never wrapped or truncated (their columns do not wrap), and every
number's header or label states its unit. The JSON keeps rates as fractions of notional
(domain.md §2); here they are shown as percentages, and the headers say so.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from calibration.horizon import format_duration
from calibration.report import BacktestReport

if TYPE_CHECKING:
    from calibration.accounts import AccountBacktestReport
    from calibration.calibrate import CalibrationResult, ParetoPoint

_LIGHT = {"green": "[green]green[/]", "yellow": "[yellow]yellow[/]", "red": "[red]red[/]",
          "insufficient": "[dim]insufficient[/]"}
#: Worst first: the light of several sides together is the worst verdict among them, and
#: ``insufficient`` (too few observations for any verdict) only when no side has a verdict.
_LIGHT_ORDER = ("red", "yellow", "green", "insufficient")
#: Rows of the Pareto table before it is cut (the recommendation is always added).
PARETO_ROWS = 10


def _light(value: str | None) -> str:
    if value is None:
        return "–"
    return _LIGHT.get(value, escape(value))


def worst_light(lights: Iterable[str | None]) -> str | None:
    """The worst traffic light among ``lights`` (red > yellow > green > insufficient);
    ``None`` when none is given."""
    present = set(lights)
    return next((light for light in _LIGHT_ORDER if light in present), None)


def _pct(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage, without the sign: the header carries the unit."""
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


class _Titled:
    """A table with its title and caption, printed as lines of their own (at the console's
    width, not squeezed into the table's)."""

    def __init__(self, title: str, columns: Sequence[tuple[str, str]],
                 caption: str | None = None) -> None:
        self.title = title
        self.caption = caption
        # Right-justified columns hold numbers and never wrap (so they are never cut); the
        # others fold when the table is too wide.
        self.table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for header, justify in columns:
            numeric = justify == "right"
            self.table.add_column(header, justify="right" if numeric else "left",
                                  no_wrap=numeric, overflow="fold")

    def add_row(self, *cells: str) -> None:
        self.table.add_row(*cells)

    def add_section(self) -> None:
        self.table.add_section()

    def print(self, console: Console) -> None:
        console.print()
        if self.title:
            console.print(f"[bold]{self.title}[/]")
        console.print(self.table)
        if self.caption:
            console.print(self.caption)


def _coverage_tables(report: BacktestReport, inst_index: int) -> list[_Titled]:
    inst = report.instruments[inst_index]
    margin = report.margin_tested.upper()
    expected = next((m.long.expected_breach_rate for m in inst.coverage), None)
    counts = _Titled(
        f"coverage: {margin} against the loss over {report.horizon_bars} bars "
        f"({report.horizon}) "
        f"(expected breach rate {_pct(expected)}%)",
        [("window", "left"), ("side", "left"), ("obs.", "right"), ("breaches", "right"),
         ("breach\nrate %", "right"), ("traffic\nlight", "left")],
    )
    tests = _Titled(
        "coverage tests and margin",
        [("window", "left"), ("side", "left"), ("Kupiec\np", "right"),
         ("1-sided\np", "right"), ("indep.\np", "right"),
         (f"mean\n{margin} %", "right"), ("max\nuncov. %", "right"),
         ("peak/\ntrough ×", "right")],
    )
    for m in inst.coverage:
        for side_name, side in (("long", m.long), ("short", m.short)):
            first = side_name == "long"
            window = escape(m.window) if first else ""
            counts.add_row(window, side_name, f"{side.observations:,}", f"{side.breaches:,}",
                           _pct(side.breach_rate), _light(side.traffic_light))
            tests.add_row(window, side_name, _num(side.kupiec_pvalue, ".3g"),
                          _num(side.kupiec_pvalue_one_sided, ".3g"),
                          _num(side.christoffersen_pvalue, ".3g"),
                          _pct(side.mean_margin_rate), _pct(side.max_uncovered_loss),
                          _num(m.peak_to_trough, ".1f") if first else "")
    return [counts, tests]


def _liquidation_tables(report: BacktestReport,
                        inst_index: int) -> tuple[list[_Titled], str]:
    liquidation = report.instruments[inst_index].liquidation or []
    events = _Titled(
        "liquidations (positions by the window they open in, liquidations by the window "
        "they trigger in)",
        [("window", "left"), ("positions", "right"), ("liquidations", "right"),
         ("premature", "right"), ("premature\nshare %", "right")],
    )
    money = _Titled(
        "insolvency",
        [("window", "left"), ("bad debt\nUSD", "right"),
         ("bad debt bps\nof opened", "right"), ("worst\nposition USD", "right"),
         ("fund min\nUSD", "right")],
    )
    exhausted: list[str] = []
    for lm in liquidation:
        window = escape(lm.window)
        events.add_row(window, f"{lm.positions:,}", f"{lm.liquidations:,}",
                       f"{lm.premature_liquidations:,}", _pct(lm.premature_share, 1))
        money.add_row(window, _num(lm.bad_debt_usd), _num(lm.bad_debt_bps, ".2f"),
                      _num(lm.worst_position_bad_debt_usd), _num(lm.insurance_fund_min_usd))
        if lm.insurance_fund_exhausted_at:
            exhausted.append(f"{escape(lm.window)} {lm.insurance_fund_exhausted_at}")
    note = ("insurance fund: never exhausted" if not exhausted else
            "[red]insurance fund exhausted[/] (window, first time): " + "; ".join(exhausted))
    return [events, money], note


def print_summary(report: BacktestReport, console: Console) -> None:
    """Print, per instrument, the coverage tables and the liquidation tables."""
    params = ", ".join(f"{k}={v}" for k, v in report.params.items())
    console.print(
        f"[bold]{report.model}[/] ({escape(params)})\nclose-out horizon {report.horizon} "
        f"({report.horizon_bars} bars of {format_duration(report.bar_seconds)}), "
        f"coverage level {report.coverage_level:g}, "
        f"{'overlapping' if report.overlapping else 'non-overlapping'} observations, "
        f"{report.margin_tested.upper()} tested, engine {report.engine_version}; "
        "rates in % of notional"
    )
    for i, (info, inst) in enumerate(zip(report.datasets, report.instruments, strict=True)):
        console.print(
            f"\n[bold]{escape(inst.instrument)}[/] {escape(info.ref)}: {info.rows:,} bars of "
            f"{info.bar_seconds} s, {info.start} → {info.end}, {info.gaps:,} "
            f"gap{'' if info.gaps == 1 else 's'} "
            f"({info.missing_bars:,} missing bars), fingerprint {info.fingerprint[:12]}"
        )
        if info.close_only:
            console.print("close-only series (price snapshots): losses use closes")
        if info.repairs or info.repair_policy:
            console.print(f"{len(info.repairs):,} rows repaired under "
                          f"{escape(', '.join(info.repair_policy))} (listed in --json)")
        if info.depth_stale_bars:
            console.print(f"{info.depth_stale_bars:,} bars with stale depth (ADV used)")
        if info.suspect_prints:
            count = len(info.suspect_prints)
            shown = ", ".join(info.suspect_prints[:5])
            more = f" and {count - 5} more" if count > 5 else ""
            console.print(
                f"[yellow]{count} suspect prints (wick > 50% beyond the body): {shown}{more}[/]"
            )
        for table in _coverage_tables(report, i):
            table.print(console)
        capped = inst.coverage[0].capped_bars if inst.coverage else 0
        if capped:
            console.print(f"[yellow]{capped:,} observation bars had their margin capped at "
                          f"max_rate ({_pct(report.params.get('max_rate', 1.0))}%)[/]")
        if inst.liquidation:
            tables, note = _liquidation_tables(report, i)
            for table in tables:
                table.print(console)
            console.print(note)


def _fmt_param(value: Any, digits: int = 6) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def pareto_rows(front: Sequence[ParetoPoint], recommended: int | None,
                limit: int = PARETO_ROWS) -> tuple[list[tuple[int, ParetoPoint]], bool]:
    """The Pareto points to show, as ``(rank, point)`` (rank 1 = cheapest): the first
    ``limit`` and, when it lies further down, the recommended trial; and whether the table
    is cut (more points than ``limit``)."""
    rows = list(enumerate(front[:limit], start=1))
    if recommended is not None and all(p.trial != recommended for _, p in rows):
        rows += [(k, p) for k, p in enumerate(front, start=1) if p.trial == recommended]
    return rows, len(front) > limit


def _stacked(name: str, unit: str, width: int = 12) -> str:
    """A narrow header: the metric's name and unit folded at ``width`` characters."""
    return "\n".join(textwrap.wrap(name.replace("_", " "), width) + textwrap.wrap(unit, width))


def _objective_columns(
        result: CalibrationResult) -> list[tuple[str, str, Callable[[float | None], str]]]:
    """The front's objectives as ``(name, header, format)``, in the spec's order: the two
    defaults under their usual headers, any other under its name and its metric's unit
    (fractions shown as %)."""
    from calibration.calibrate._objectives import METRICS

    front = result.pareto_front
    names = list(front[0].objectives) if front and front[0].objectives else [
        "capital_cost", "insolvency_bps"]
    columns: list[tuple[str, str, Callable[[float | None], str]]] = []
    for name in names:
        unit = METRICS[name].unit if name in METRICS else ""
        if name == "capital_cost":
            columns.append((name, "mean IM\n% of notional", lambda v: _pct(v, 3)))
        elif name == "insolvency_bps":
            columns.append((name, "insolvency\nbps", lambda v: _num(v, ".3f")))
        elif unit.startswith("fraction of "):
            columns.append((name, _stacked(name, f"% of {unit.removeprefix('fraction of ')}"),
                            lambda v: _pct(v, 3)))
        else:
            columns.append((name, _stacked(name, unit), lambda v: _num(v, ".4g")))
    return columns


def _pareto_table(result: CalibrationResult) -> tuple[_Titled, str | None]:
    front = result.pareto_front
    rec = result.recommendation
    recommended = rec.trial if rec is not None else None
    rows, cut = pareto_rows(front, recommended)
    names = list(front[0].params) if front else []
    varying = [n for n in names if len({repr(p.params.get(n)) for p in front}) > 1]
    fixed = [n for n in names if n not in varying]
    if not front:
        title = "Pareto front: no feasible point"
    elif cut:
        title = (f"Pareto front: showing {min(PARETO_ROWS, len(front))} of {len(front)} "
                 "Pareto trials, cheapest first")
        if rows[-1][0] > PARETO_ROWS:
            title += f", and the recommendation (rank {rows[-1][0]})"
    else:
        title = f"Pareto front: all {len(front)} Pareto trials, cheapest first"
    objectives = _objective_columns(result)
    table = _Titled(title, [("rank", "right"), ("trial", "right"),
                           *[(header, "right") for _, header, _ in objectives],
                           ("parameters that differ between the points", "left")],
                   caption="* the recommendation" if recommended is not None and front
                   else None)
    for i, (rank, p) in enumerate(rows):
        if i and rank != rows[i - 1][0] + 1:
            table.add_section()
        mark = "*" if p.trial == recommended else ""
        table.add_row(f"{rank}", f"{p.trial}{mark}",
                      *[show(p.objectives.get(name, getattr(p, name, None)))
                        for name, _, show in objectives],
                      escape(", ".join(f"{n}={_fmt_param(p.params.get(n), 4)}"
                                       for n in varying)) or "–")
    same = None
    if fixed and front:
        same = "the same on every Pareto point: " + escape(", ".join(
            f"{n}={_fmt_param(front[0].params[n], 6)}" for n in fixed))
    return table, same


def print_calibration(result: CalibrationResult, console: Console) -> None:
    """Print the recommendation, its evidence and the Pareto front."""
    t = result.trials
    console.print(
        f"[bold]{result.model}[/] study {escape(result.study)} ({result.sampler}, seed "
        f"{result.seed}): {t.get('complete', 0)} complete, {t.get('pruned', 0)} pruned, "
        f"{t.get('fail', 0)} failed trials; spec {result.spec_hash[:12]}, engine "
        f"{result.engine_version}\nclose-out horizon {result.horizon} ({result.horizon_bars} "
        f"bars of {format_duration(result.bar_seconds)}); {result.workers} worker"
        f"{'' if result.workers == 1 else 's'}, "
        f"{'reproducible' if result.reproducible else 'not reproducible'} from this record: "
        f"{escape(result.reproducibility)}"
    )
    rec = result.recommendation
    if rec is None:
        console.print("[red]no trial finished: nothing to recommend[/]")
        return
    status = "[green]feasible[/]" if rec.feasible else "[red]NOT feasible[/]"
    appetite = "" if rec.within_risk_appetite else ", [yellow]outside the risk appetite[/]"
    console.print(f"\n[bold]recommendation[/] (trial {rec.trial}): {status}{appetite} — "
                  f"{escape(rec.explanation)}")
    for note in rec.notes:
        console.print(f"[bold yellow]note: {escape(note)}[/]")
    params = _Titled("", [("parameter", "left"), ("value", "right"), ("published", "right"),
                         ("change", "right")],
                    caption="values as in the JSON: rates are fractions of notional "
                            "(0.01 = 1%), *_bars in bars")
    for name, value in rec.params.items():
        change = (rec.change_vs_published or {}).get(name)
        params.add_row(escape(name), _fmt_param(value),
                       "–" if change is None else f"{change['published']:.6g}",
                       "–" if change is None else f"{change['change']:+.6g}")
    params.print(console)
    defaults = [f"capital cost (mean IM): {_pct(rec.objectives['capital_cost'], 3)}% of "
                "notional"] if "capital_cost" in rec.objectives else []
    if "insolvency_bps" in rec.objectives:
        defaults.append(f"insolvency: {_num(rec.objectives['insolvency_bps'], '.3f')} bps")
    if defaults:
        console.print("; ".join(defaults))
    others = {k: v for k, v in rec.objectives.items()
              if k not in ("capital_cost", "insolvency_bps")}
    if others:
        from calibration.calibrate._objectives import METRICS

        console.print(("other objectives: " if defaults else "objectives: ") + "; ".join(
            f"{k} {v:.6g}" + (f" ({METRICS[k].unit})" if k in METRICS else "")
            for k, v in others.items()), markup=False, highlight=False)
    if rec.constraints:
        console.print(
            "constraints (≤ 0 holds): "
            + ", ".join(f"{escape(k)} {v:.3g}" for k, v in rec.constraints.items())
            + (f"; binding: {escape(', '.join(rec.binding_constraints))}"
               if rec.binding_constraints else "; none binding")
        )
    if rec.out_of_sample:
        oos = _Titled("out of sample (walk-forward folds)",
                     [("fold", "left"), ("instrument", "left"), ("long\nbreaches", "right"),
                      ("short\nbreaches", "right"), ("traffic\nlight", "left"),
                      ("bad debt bps\nof opened", "right")])
        for fold, per in rec.out_of_sample.items():
            for inst, m in per.items():
                cov = m["coverage"]
                liq = m.get("liquidation") or {}
                light = worst_light(cov[s].get("traffic_light") for s in ("long", "short"))
                oos.add_row(escape(fold), escape(inst), f"{cov['long']['breaches']:,}",
                            f"{cov['short']['breaches']:,}", _light(light),
                            _num(liq.get("bad_debt_bps"), ".3f"))
        oos.print(console)
    if rec.accounts:
        _print_account_evidence(rec.accounts, console)
    table, same = _pareto_table(result)
    table.print(console)
    if same:
        console.print(same)


def _print_account_evidence(accounts: dict[str, Any], console: Console) -> None:
    """The account-level evidence of a recommendation: per window of the whole span (the
    stress windows and the folds) the replay's accounts, liquidations and bad debt, and the
    worst traffic light of the haircut and portfolio coverage backtests."""
    whole = accounts.get("whole_span") or {}
    lights: dict[tuple[str, str], list[str]] = {}
    for part in ("haircut_coverage", "portfolio_coverage"):
        for row in whole.get(part, []):
            lights.setdefault((part, row["window"]), []).append(row["traffic_light"])
    table = _Titled(f"accounts ({escape(str(whole.get('mode', '')))} margin), whole span",
                    [("window", "left"), ("accounts", "right"), ("liquidated", "right"),
                     ("bad debt\nUSD", "right"), ("healthy\nlegs", "right"),
                     ("haircut\nlight", "left"), ("portfolio\nlight", "left")])
    for row in whole.get("replay", []):
        w = row["window"]
        cells = []
        for part in ("haircut_coverage", "portfolio_coverage"):
            got = lights.get((part, w))
            cells.append(_light(worst_light(got)) if got else "–")
        table.add_row(escape(w), f"{row['accounts']:,}", f"{row['liquidated_accounts']:,}",
                      f"{row['bad_debt_usd']:,.0f}", f"{row['healthy_leg_liquidations']:,}",
                      *cells)
    table.print(console)


#: Accounts shown in the worst-accounts table.
WORST_ACCOUNTS = 10


def print_accounts(report: AccountBacktestReport, console: Console) -> None:
    """Print an account backtest: settings, the figures per window, the worst accounts."""
    console.print(
        f"[bold]{report.model}[/] accounts, {report.mode} margin, "
        f"{', '.join(escape(i) for i in report.instruments)}; close-out horizon "
        f"{report.horizon} ({report.horizon_bars} bars of {format_duration(report.bar_seconds)})"
        f"; holding {report.liquidation['holding_bars']} bars, latency "
        f"{report.liquidation['latency_bars']} bars; market {report.market_fingerprint[:12]}"
    )
    console.print(f"prices: {report.adverse_extremes}")
    if any(report.dropped_bars.values()):
        console.print("bars dropped to align: " + ", ".join(
            f"{escape(k)} {v:,}" for k, v in report.dropped_bars.items()))
    counts = _Titled("accounts (counted in the window where they open)",
                     [("window", "left"), ("accounts", "right"), ("liquidated", "right"),
                      ("positions\nliquidated", "right"), ("healthy\nlegs", "right"),
                      ("saved by\ncross", "right")])
    money = _Titled("bad debt, USD (cross: pooled; isolated: each position alone)",
                    [("window", "left"), ("this mode", "right"), ("cross", "right"),
                     ("isolated", "right"), ("hedge-break\nloss", "right")])
    for f in report.summary:
        counts.add_row(escape(f.window), f"{f.accounts:,}", f"{f.liquidated_accounts:,}",
                       f"{f.liquidated_positions:,}", f"{f.healthy_leg_liquidations:,}",
                       f"{f.saved_by_cross:,}")
        money.add_row(escape(f.window), _num(f.bad_debt_usd), _num(f.bad_debt_cross_usd),
                      _num(f.bad_debt_isolated_usd), _num(f.hedge_break_loss_usd))
    counts.print(console)
    money.print(console)
    worst = sorted((a for a in report.accounts if a.bad_debt_usd > 0),
                   key=lambda a: -a.bad_debt_usd)[:WORST_ACCOUNTS]
    if worst:
        table = _Titled(f"worst accounts (of {len(report.accounts):,})",
                        [("id", "left"), ("trigger time", "left"), ("bad debt USD", "right")])
        for a in worst:
            table.add_row(escape(a.id), a.trigger_time or "–", _num(a.bad_debt_usd))
        table.print(console)
    console.print(f"insurance fund minimum {_num(report.insurance_fund_min_usd)} USD"
                  + (f", exhausted at {report.insurance_fund_exhausted_at}"
                     if report.insurance_fund_exhausted_at else ""))
    if report.skipped:
        console.print(f"{len(report.skipped):,} accounts not opened (entry outside the data "
                      "or in the models' warm-up); listed in --json")
    if report.queue is not None:
        q = report.queue
        console.print(f"liquidation queue: peak backlog {q['peak_backlog']:,} accounts, wait "
                      f"mean {q['mean_wait_bars']:.1f} / max {q['max_wait_bars']:,} bars, bad "
                      f"debt added by waiting {_num(q.get('bad_debt_added_usd'))} USD")
    if report.adl is not None:
        adl = report.adl
        console.print(f"auto-deleveraging: {adl['adl_fills']:,} fills, volume "
                      f"{_num(adl['adl_volume_usd'])} USD at bankruptcy prices, absorbed "
                      f"{_num(adl['adl_absorbed_usd'])} USD by {len(adl['per_account']):,} "
                      f"accounts, uncovered {_num(adl['adl_uncovered_usd'])} USD")
    if report.backstop is not None:
        vault = report.backstop
        console.print(f"backstop vault: {vault['accounts']:,} accounts taken over, PnL "
                      f"{_num(vault['backstop_pnl_usd'])} USD")
    if report.frontier:
        table = _Titled("throughput-insolvency frontier (capacity: close-out starts per bar)",
                        [("capacity", "right"), ("per minute", "right"),
                         ("bad debt USD", "right"), ("added USD", "right"),
                         ("liquidated", "right"), ("peak backlog", "right")])
        for r in report.frontier:
            cap = r["capacity"]
            table.add_row("none" if cap is None else f"{cap:,g}",
                          "–" if r["per_minute"] is None else f"{r['per_minute']:,.2f}",
                          _num(r["bad_debt_usd"]), _num(r["bad_debt_added_usd"]),
                          f"{r['liquidated_accounts']:,}", f"{r['peak_backlog']:,}")
        table.print(console)
