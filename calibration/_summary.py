"""The human-readable summary of a backtest report (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from calibration.report import BacktestReport

_LIGHT = {"green": "[green]green[/]", "yellow": "[yellow]yellow[/]", "red": "[red]red[/]"}


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


def print_summary(report: BacktestReport, console: Console) -> None:
    """Print one coverage table and one liquidation table per instrument."""
    params = ", ".join(f"{k}={v}" for k, v in report.params.items())
    console.print(
        f"[bold]{report.model}[/] ({params})\nhorizon {report.horizon_bars} bars, "
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
