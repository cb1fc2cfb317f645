"""The account backtest as one self-contained HTML page (matplotlib SVG inlined, no script).

Charts: bad debt per window, cross against isolated (USD); contagion per window (healthy-leg
liquidations and accounts saved by cross, counts); the venue's insurance fund through the
run (USD). Tables: the figures per window, the worst accounts. Every figure carries its unit
and every contagion figure is explained in one line, as is the adverse-extreme price reading.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; SVG only

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np

from calibration.accounts._engine import AccountResult
from calibration.accounts._report import AccountBacktestReport, AccountFigures
from calibration.horizon import format_duration
from calibration.html_report import _legend, _svg

#: Rows of the worst-accounts table.
WORST_ACCOUNTS = 20

_CROSS = "#1565c0"
_ISOLATED = "#c62828"


def account_legend(mode: str) -> tuple[tuple[str, str], ...]:
    """One line per contagion figure and for the price reading (domain.md §7)."""
    pooled = "portfolio" if mode == "portfolio" else "cross"
    return (
        ("healthy legs", "positions closed with their liquidated account although, alone "
                         "with their entry-IM share of the collateral (the isolated twin), "
                         "they were never liquidated or only later: the loss of another leg "
                         "took them down (count)."),
        ("hedge-break loss", "what those healthy legs lost at their account's close-out "
                             "prices, max(0, −PnL) summed, USD: the cost of unwinding a hedge "
                             "that would have held."),
        ("saved by cross", f"accounts never liquidated under {pooled} margin although at "
                           "least one of their positions, alone with its share of the "
                           "collateral, was (count)."),
        ("bad debt cross / isolated", f"close-out equity below zero, summed, USD: {pooled} "
                                      "pools each account's collateral against all its "
                                      "positions; isolated replays each position alone with "
                                      "its entry-IM share of the collateral."),
        ("adverse extremes", "within a bar every price is read at its worst for the account, "
                             "one side per asset: the low where the account is net long the "
                             "asset (collateral included), the high where net short. OHLC "
                             "does not say whether the extremes of different instruments "
                             "coincide, so this is the conservative reading."),
        ("window", "accounts are counted in the window where they open, and so are their "
                   "liquidations and bad debt; all: the whole run."),
    )


def _usd(value: float) -> str:
    return f"{value:,.0f}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _bad_debt_chart(figures: list[AccountFigures], pooled: str) -> str:
    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = np.arange(len(figures))
    width = 0.38
    cross = [f.bad_debt_cross_usd for f in figures]
    isolated = [f.bad_debt_isolated_usd for f in figures]
    ax.bar(x - width / 2, cross, width, color=_CROSS, label=f"{pooled} (pooled per account)")
    ax.bar(x + width / 2, isolated, width, color=_ISOLATED,
           label="isolated (each position alone)")
    for i, (c, s) in enumerate(zip(cross, isolated, strict=True)):
        ax.annotate(f"{_usd(c)}", (i - width / 2, c), ha="center", va="bottom", fontsize=7)
        ax.annotate(f"{_usd(s)}", (i + width / 2, s), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f.window for f in figures])
    ax.set_ylabel("bad debt (USD)")
    ax.margins(y=0.2)
    ax.set_title(f"Bad debt per window, {pooled} against isolated (USD)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(alpha=0.3, axis="y")
    # Outside the axes: inside, it would cover the tallest bars' values.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg(fig)


def _contagion_chart(figures: list[AccountFigures], pooled: str) -> str:
    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = np.arange(len(figures))
    width = 0.38
    healthy = [f.healthy_leg_liquidations for f in figures]
    saved = [f.saved_by_cross for f in figures]
    ax.bar(x - width / 2, healthy, width, color="#ef6c00",
           label="healthy-leg liquidations (positions)")
    ax.bar(x + width / 2, saved, width, color="#2e7d32", label=f"saved by {pooled} (accounts)")
    for i, (h, s) in enumerate(zip(healthy, saved, strict=True)):
        ax.annotate(f"{h:,}", (i - width / 2, h), ha="center", va="bottom", fontsize=7)
        ax.annotate(f"{s:,}", (i + width / 2, s), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f.window for f in figures])
    ax.set_ylabel("count")
    ax.margins(y=0.2)
    ax.set_title("Contagion per window: healthy legs closed, accounts saved by pooling "
                 "(counts)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(alpha=0.3, axis="y")
    # Outside the axes: inside, it would cover the tallest bars' values.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg(fig)


def _fund_chart(result: AccountResult) -> str:
    path = result.fund_path()
    start = float(result.insurance_fund_usd)
    ts = result.timestamp_ms
    times = [np.datetime64(int(ts[0]), "ms")] + [np.datetime64(int(ts[b]), "ms")
                                                  for b, _ in path]
    levels = [start] + [level for _, level in path]
    times.append(np.datetime64(int(ts[-1]), "ms"))
    levels.append(levels[-1])
    scale, unit = (1e6, "million USD") if max(abs(v) for v in levels) >= 1e6 else (1.0, "USD")
    fig, ax = plt.subplots(figsize=(11, 3.2))
    ax.step(np.array(times), np.array(levels) / scale, where="post", color="#424242", lw=1.2,
            label=f"fund level ({_count(len(path), 'bar')} with a close-out)")
    ax.axhline(0.0, color=_ISOLATED, lw=0.8, ls="--", label="exhausted below this line")
    ax.set_ylabel(f"insurance fund ({unit})")
    ax.set_title(f"The venue's insurance fund: liquidation fees in, bad debt out ({unit})",
                 fontsize=10)
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _svg(fig)


def _frontier_chart(rows: list[dict[str, Any]], bar_seconds: int) -> str:
    """Bad debt (and ADL volume, when any) per capacity: the throughput–insolvency frontier;
    the unlimited row is drawn at the right edge, labelled "no limit"."""
    finite = [float(r["capacity"]) for r in rows if r["capacity"] is not None]
    edge = (max(finite) * 2.0) if finite else 1.0
    xs = [float(r["capacity"]) if r["capacity"] is not None else edge
          for r in rows]
    order = np.argsort(xs, kind="stable")
    x = np.array(xs)[order]
    bad = np.array([float(rows[i]["bad_debt_usd"]) for i in order])
    adl = np.array([float(rows[i].get("adl_volume_usd", 0.0)) for i in order])
    fig, ax = plt.subplots(figsize=(11, 3.4))
    ax.plot(x, bad, marker="o", color=_CROSS, lw=1.4, label="bad debt (USD)")
    if adl.any():
        ax.plot(x, adl, marker="s", color=_ISOLATED, lw=1.0, ls="--",
                label="ADL volume at bankruptcy prices (USD)")
    if len(x) > 1 and x.min() > 0:
        ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(["no limit" if rows[i]["capacity"] is None else f"{xs[i]:g}"
                        for i in order], fontsize=8)
    ax.set_xlabel(f"capacity per bar of {format_duration(bar_seconds)}")
    ax.set_ylabel("USD")
    ax.set_title("Throughput–insolvency frontier: bad debt per engine capacity", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def _figures_table(figures: list[AccountFigures], mode: str, pooled: str) -> str:
    rows = []
    for f in figures:
        rows.append(
            f"<tr><td>{html.escape(f.window)}</td><td>{f.accounts:,}</td>"
            f"<td>{f.positions:,}</td><td>{_usd(f.notional_opened_usd)}</td>"
            f"<td>{f.liquidated_accounts:,}</td><td>{f.liquidated_positions:,}</td>"
            f"<td>{_usd(f.bad_debt_cross_usd)}</td>"
            f"<td>{_usd(f.bad_debt_isolated_usd)}</td><td>{f.healthy_leg_liquidations:,}</td>"
            f"<td>{_usd(f.hedge_break_loss_usd)}</td><td>{f.saved_by_cross:,}</td></tr>")
    return ("<table id='figures'><tr><th>window</th><th>accounts</th><th>positions</th>"
            "<th>notional opened (USD)</th>"
            f"<th>liquidated accounts ({html.escape(mode)})</th>"
            f"<th>liquidated positions ({html.escape(mode)})</th>"
            f"<th>bad debt, {pooled} (USD)</th><th>bad debt, isolated (USD)</th>"
            "<th>healthy legs (positions)</th><th>hedge-break loss (USD)</th>"
            f"<th>saved by {pooled} (accounts)</th></tr>" + "".join(rows) + "</table>")


def _worst_table(report: AccountBacktestReport, result: AccountResult) -> str:
    gross: dict[str, float] = {}
    legs: dict[str, int] = {}
    for acc in result.accounts:
        gross[acc.id] = float(sum(abs(v) for v in acc.positions.values()))
        legs[acc.id] = len(acc.positions)
    worst = sorted((a for a in report.accounts if a.bad_debt_usd > 0),
                   key=lambda a: (-a.bad_debt_usd, a.id))[:WORST_ACCOUNTS]
    if not worst:
        return "<p id='worst'>No account left bad debt.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(a.id)}</td><td>{html.escape(a.trigger_time or '–')}</td>"
        f"<td>{legs.get(a.id, 0)}</td><td>{_usd(gross.get(a.id, 0.0))}</td>"
        f"<td>{_usd(a.bad_debt_usd)}</td></tr>" for a in worst)
    return (f"<table id='worst'><tr><th>account</th><th>trigger time (bar open, UTC)</th>"
            "<th>positions</th><th>gross notional at entry (USD)</th>"
            f"<th>bad debt, {html.escape(report.mode)} (USD)</th></tr>{rows}</table>"
            f"<p class='legend'>The {_count(len(worst), 'account')} with the most bad debt "
            f"under {html.escape(report.mode)} margin, of {len(report.accounts):,} opened "
            "(liquidated ones without bad debt are not listed).</p>")


def render_account_report(report: AccountBacktestReport, result: AccountResult) -> str:
    """The HTML page (a string) of ``run_account_backtest``'s ``(report, result)``.

    Names come from the caller's data: matplotlib would read ``$...$`` in them as mathtext,
    so every text is drawn literally.
    """
    with plt.rc_context({"text.parse_math": False}):
        return _render(report, result)


def _capacity_label(row: dict[str, Any], kind: str) -> str:
    if row["capacity"] is None:
        return "no limit"
    if kind == "notional":
        return f"{_usd(float(row['capacity']))} USD/bar"
    return f"{float(row['capacity']):g}/bar"


def _frontier_kind(report: AccountBacktestReport) -> str:
    return str(report.frontier_kind or "accounts")


def _frontier_table(report: AccountBacktestReport) -> str:
    kind = _frontier_kind(report)
    head = ("<tr><th>capacity</th><th>per minute</th><th>bad debt (USD)</th>"
            "<th>added by waiting (USD)</th><th>liquidated accounts</th>"
            "<th>peak backlog (accounts)</th><th>mean / max wait (bars)</th></tr>")
    body = []
    for r in report.frontier or []:
        per_minute = "—" if r.get("per_minute") is None else f"{float(r['per_minute']):,.3g}"
        body.append(
            f"<tr><td>{html.escape(_capacity_label(r, kind))}</td><td>{per_minute}</td>"
            f"<td>{_usd(float(r['bad_debt_usd']))}</td>"
            f"<td>{_usd(float(r['bad_debt_added_usd']))}</td>"
            f"<td>{int(r['liquidated_accounts']):,}</td><td>{int(r['peak_backlog']):,}</td>"
            f"<td>{float(r['mean_wait_bars']):.2f} / {int(r['max_wait_bars'])}</td></tr>")
    return "<table id='frontier'>" + head + "".join(body) + "</table>"


def _render(report: AccountBacktestReport, result: AccountResult) -> str:
    pooled = "portfolio" if report.mode == "portfolio" else "cross"
    figures = list(report.summary)
    liq = report.liquidation
    parts = [
        f"<h1>Account backtest: {html.escape(report.model)}, {html.escape(report.mode)} "
        "margin</h1>",
        f"<p>Instruments {html.escape(', '.join(report.instruments))}; market fingerprint "
        f"<code>{report.market_fingerprint[:16]}</code>; engine "
        f"{html.escape(report.engine_version)}; generated "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.</p>",
        f"<p>Close-out horizon {html.escape(report.horizon)} ({report.horizon_bars} bars of "
        f"{format_duration(report.bar_seconds)}); accounts held at most "
        f"{liq['holding_bars']:,} bars; close-out {liq['latency_bars']} bars after the "
        f"trigger; insurance fund at the start {_usd(float(liq['insurance_fund_usd']))} USD, "
        f"at its lowest {_usd(report.insurance_fund_min_usd)} USD"
        + (f", exhausted at {html.escape(report.insurance_fund_exhausted_at)}"
           if report.insurance_fund_exhausted_at else ", never exhausted") + ".</p>",
    ]
    if report.portfolio_model:
        parts.append(f"<p>Requirement: portfolio model "
                     f"<code>{html.escape(report.portfolio_model)}</code>; the isolated twins "
                     f"keep {html.escape(report.model)} per instrument.</p>")
    if any(report.dropped_bars.values()):
        parts.append("<p>Bars dropped to align the instruments: " + ", ".join(
            f"{html.escape(k)} {v:,}" for k, v in report.dropped_bars.items()) + ".</p>")
    if report.skipped:
        parts.append(f"<p>{len(report.skipped):,} accounts not opened (entry outside the data "
                     "or inside the models' warm-up).</p>")
    parts += [
        "<h2>Figures per window</h2>", _figures_table(figures, report.mode, pooled),
        _legend(account_legend(report.mode)),
        "<h2>Bad debt per window</h2><div class='chart' id='chart-bad-debt'>"
        + _bad_debt_chart(figures, pooled) + "</div>",
        "<h2>Contagion per window</h2><div class='chart' id='chart-contagion'>"
        + _contagion_chart(figures, pooled) + "</div>",
        "<h2>Worst accounts</h2>", _worst_table(report, result),
        "<h2>Insurance fund</h2><div class='chart' id='chart-fund'>" + _fund_chart(result)
        + "</div>",
    ]
    if report.frontier:
        parts.append("<h2>Throughput–insolvency frontier</h2><div class='chart' "
                     "id='chart-frontier'>"
                     + _frontier_chart(report.frontier, report.bar_seconds) + "</div>")
        parts.append(_frontier_table(report))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;font-size:13px}td{text-align:right}td:first-child{text-align:"
             "left}.chart svg{max-width:100%;height:auto}.legend{font-size:13px;"
             "color:#424242;margin:0 0 1em;padding-left:1.2em}.legend li{margin:1px 0}")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>marginlab account backtest {html.escape(report.model)}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(parts) + "</body></html>")
