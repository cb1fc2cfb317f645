"""The human-readable summary of a backtest report (rich tables)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from calibration.horizon import format_duration
from calibration.report import BacktestReport

if TYPE_CHECKING:
    from calibration.calibrate import CalibrationResult

_LIGHT = {"green": "[green]green[/]", "yellow": "[yellow]yellow[/]", "red": "[red]red[/]"}


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


def print_summary(report: BacktestReport, console: Console) -> None:
    """Print one coverage table and one liquidation table per instrument."""
    params = ", ".join(f"{k}={v}" for k, v in report.params.items())
    console.print(
        f"[bold]{report.model}[/] ({params})\nclose-out horizon {report.horizon} "
        f"({report.horizon_bars} bars of {format_duration(report.bar_seconds)}), "
        f"coverage level {report.coverage_level:g}, "
        f"{'overlapping' if report.overlapping else 'non-overlapping'} observations, "
        f"{report.margin_tested.upper()} tested, engine {report.engine_version}"
    )
    for info, inst in zip(report.datasets, report.instruments, strict=True):
        console.print(
            f"\n[bold]{inst.instrument}[/] {info.ref}: {info.rows:,} bars of "
            f"{info.bar_seconds}s, {info.start} → {info.end}, {info.gaps} gaps "
            f"({info.missing_bars:,} missing bars), fingerprint {info.fingerprint[:12]}"
        )
        if info.suspect_prints:
            count = len(info.suspect_prints)
            shown = ", ".join(info.suspect_prints[:5])
            more = f" and {count - 5} more" if count > 5 else ""
            console.print(
                f"[yellow]{count} suspect prints (wick > 50% beyond the body): {shown}{more}[/]"
            )
        cov = Table(title="coverage", title_justify="left")
        for col in ("window", "side", "obs", "breaches", "rate", "expected", "Kupiec p",
                    "indep. p", "light", "mean MM", "max uncovered", "peak/trough"):
            cov.add_column(col, justify="left" if col in ("window", "side", "light") else "right")
        for m in inst.coverage:
            for side_name, side in (("long", m.long), ("short", m.short)):
                cov.add_row(
                    m.window if side_name == "long" else "",
                    side_name,
                    f"{side.observations:,}",
                    f"{side.breaches:,}",
                    _pct(side.breach_rate),
                    _pct(side.expected_breach_rate),
                    _num(side.kupiec_pvalue, ".3g"),
                    _num(side.christoffersen_pvalue, ".3g"),
                    _LIGHT.get(side.traffic_light or "", "–"),
                    _pct(side.mean_margin_rate),
                    _pct(side.max_uncovered_loss),
                    _num(m.peak_to_trough, ".1f") if side_name == "long" else "",
                )
        console.print(cov)
        if inst.liquidation:
            liq = Table(title="liquidations and insolvency", title_justify="left")
            for col in ("window", "positions", "liquidations", "premature", "bad debt USD",
                        "bad debt bps", "worst position USD", "fund min USD", "fund exhausted"):
                liq.add_column(col, justify="left" if col == "window" else "right")
            for lm in inst.liquidation:
                liq.add_row(
                    lm.window,
                    f"{lm.positions:,}",
                    f"{lm.liquidations:,}",
                    f"{lm.premature_liquidations:,}",
                    _num(lm.bad_debt_usd),
                    _num(lm.bad_debt_bps, ".2f"),
                    _num(lm.worst_position_bad_debt_usd),
                    _num(lm.insurance_fund_min_usd),
                    lm.insurance_fund_exhausted_at or "no",
                )
            console.print(liq)


def print_calibration(result: CalibrationResult, console: Console) -> None:
    """Print the recommendation, its evidence and the Pareto front."""
    t = result.trials
    console.print(
        f"[bold]{result.model}[/] study {result.study} ({result.sampler}, seed {result.seed}): "
        f"{t.get('complete', 0)} complete, {t.get('pruned', 0)} pruned, {t.get('fail', 0)} "
        f"failed trials; spec {result.spec_hash[:12]}, engine {result.engine_version}"
    )
    rec = result.recommendation
    if rec is None:
        console.print("[red]no trial finished: nothing to recommend[/]")
        return
    status = "[green]feasible[/]" if rec.feasible else "[red]NOT feasible[/]"
    appetite = "" if rec.within_risk_appetite else ", [yellow]outside the risk appetite[/]"
    console.print(f"\n[bold]recommendation[/] (trial {rec.trial}): {status}{appetite} — "
                  f"{rec.explanation}")
    params = Table(title_justify="left")
    params.add_column("parameter")
    params.add_column("value", justify="right")
    params.add_column("published", justify="right")
    params.add_column("change", justify="right")
    for name, value in rec.params.items():
        change = (rec.change_vs_published or {}).get(name)
        params.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value),
                       "–" if change is None else f"{change['published']:.6g}",
                       "–" if change is None else f"{change['change']:+.6g}")
    console.print(params)
    console.print(
        f"capital cost (mean IM) {_pct(rec.objectives['capital_cost'])}, insolvency "
        f"{rec.objectives['insolvency_bps']:.3f} bps; constraints "
        + ", ".join(f"{k}={v:.3g}" for k, v in rec.constraints.items())
        + (f"; binding: {', '.join(rec.binding_constraints)}" if rec.binding_constraints
           else "; none binding")
    )
    if rec.out_of_sample:
        oos = Table(title="out of sample", title_justify="left")
        for col in ("fold", "instrument", "long breaches", "short breaches", "light",
                    "bad debt bps"):
            oos.add_column(col)
        for fold, per in rec.out_of_sample.items():
            for inst, m in per.items():
                cov = m["coverage"]
                liq = m.get("liquidation") or {}
                lights = {cov["long"]["traffic_light"], cov["short"]["traffic_light"]}
                light = "red" if "red" in lights else "yellow" if "yellow" in lights else "green"
                oos.add_row(fold, inst, str(cov["long"]["breaches"]),
                            str(cov["short"]["breaches"]), _LIGHT.get(light, light),
                            _num(liq.get("bad_debt_bps"), ".3f"))
        console.print(oos)
    front = Table(title=f"Pareto front ({len(result.pareto_front)} feasible points)",
                  title_justify="left")
    front.add_column("trial", justify="right")
    front.add_column("mean IM", justify="right")
    front.add_column("insolvency bps", justify="right")
    front.add_column("params")
    for p in result.pareto_front[:15]:
        front.add_row(str(p.trial), _pct(p.capital_cost), f"{p.insolvency_bps:.3f}",
                      ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in p.params.items()))
    console.print(front)
