"""One self-contained HTML page a risk operator reads before a recommendation moves collateral.

Charts are matplotlib SVG inlined in the page (no script, no network): the Pareto front with
the recommendation marked; per instrument, the recommended margin against the realised loss
over the horizon with breaches marked and stress windows shaded; bad debt and liquidations
per stress window and out-of-sample fold. Tables: coverage tests with traffic lights, and the
change against the published parameters.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; SVG only

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np

from calibration.calibrate import CalibrationResult, Prepared
from calibration.models import make_model

_LIGHT = {"green": "#2e7d32", "yellow": "#f9a825", "red": "#c62828"}
_MAX_POINTS = 2500


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _pareto_chart(result: CalibrationResult) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    front = result.pareto_front
    if front:
        ax.plot([100 * p.capital_cost for p in front], [p.insolvency_bps for p in front],
                "o-", color="#1565c0", label="Pareto front (feasible)")
    rec = result.recommendation
    if rec is not None:
        ax.plot([100 * rec.objectives["capital_cost"]], [rec.objectives["insolvency_bps"]],
                marker="*", markersize=18, color="#c62828", linestyle="none",
                label=f"recommendation (trial {rec.trial})")
    ax.set_xlabel("capital cost: mean IM rate (%)")
    ax.set_ylabel("insolvency (bps)")
    ax.set_title("Capital against insolvency")
    ax.grid(alpha=0.3)
    ax.legend()
    return _svg(fig)


def _bucket(values: np.ndarray, size: int, how: str) -> np.ndarray:
    n = values.shape[0] // size * size
    block = values[:n].reshape(-1, size)
    with np.errstate(all="ignore"):
        out: np.ndarray = (np.nanmax(block, axis=1) if how == "max"
                           else np.nanmean(block, axis=1))
    return out


def _margin_chart(prepared: Prepared, params: Mapping[str, Any], instrument: str) -> str:
    bars = next(b for b in prepared.full if b.instrument == instrument)
    horizon = prepared.horizon.bars
    model = make_model(prepared.spec.model, params).with_horizon(horizon)
    rates = model.margin_rates(bars)
    long_loss, short_loss = bars.forward_losses(horizon)
    loss = np.fmax(long_loss, short_loss)
    margin = rates.mm_rate
    breach = loss > margin
    times = bars.timestamp_ms.astype("datetime64[ms]")
    size = max(1, len(bars) // _MAX_POINTS)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    t_b = times[: len(times) // size * size][::size]
    ax.plot(t_b, 100 * _bucket(loss, size, "max"), color="#9e9e9e", lw=0.6,
            label=f"realised loss over {horizon} bars (worst side)")
    ax.plot(t_b, 100 * _bucket(margin, size, "mean"), color="#1565c0", lw=1.2,
            label="recommended MM rate")
    idx = np.flatnonzero(breach)
    if idx.size:
        ax.scatter(times[idx], 100 * loss[idx], s=6, color="#c62828", zorder=3,
                   label=f"breaches ({idx.size})")
    for w in (*prepared.stress_windows, *prepared.folds):
        start = np.datetime64(w.start_ms, "ms")
        end = np.datetime64(w.end_ms, "ms")
        if end < times[0] or start > times[-1]:
            continue
        x0, x1 = float(mdates.date2num(start)), float(mdates.date2num(end))
        fold = w.name.startswith("oos_fold")
        ax.axvspan(x0, x1, color="#ffcc80" if not fold else "#e3f2fd",
                   alpha=0.5 if not fold else 0.35, lw=0)
        if not fold:
            ax.annotate(w.name, (x0, 0.97), xycoords=("data", "axes fraction"), fontsize=7,
                        rotation=90, va="top")
    split = np.datetime64(prepared.in_sample_end_ms, "ms")
    ax.axvline(float(mdates.date2num(split)), color="#424242", ls="--", lw=1)
    ax.set_ylabel("% of notional")
    ax.set_title(f"{instrument}: margin against realised loss (stress windows shaded, "
                 "out-of-sample after the dashed line)")
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _svg(fig)


def _liquidation_chart(windows: list[tuple[str, float, int]], instrument: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = [w[0] for w in windows]
    ax.bar(names, [w[1] for w in windows], color="#c62828")
    for i, (_, bad, liq) in enumerate(windows):
        ax.annotate(f"{liq} liq.", (i, bad), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("bad debt (USD)")
    ax.set_title(f"{instrument}: bad debt per stress window and out-of-sample fold")
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(alpha=0.3, axis="y")
    return _svg(fig)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def render_calibration_report(result: CalibrationResult, prepared: Prepared) -> str:
    """The HTML page (a string) of a calibration's result and evidence."""
    rec = result.recommendation
    parts = [f"<h1>Calibration report: {html.escape(result.model)}</h1>",
             f"<p>Study <code>{html.escape(result.study)}</code>, spec "
             f"<code>{result.spec_hash[:16]}</code>, seed {result.seed}, engine "
             f"{html.escape(result.engine_version)}, generated "
             f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}. Trials: "
             + ", ".join(f"{k} {v}" for k, v in result.trials.items() if v) + ".</p>",
             "<h2>Data</h2><ul>" + "".join(
                 f"<li>{html.escape(k)}: fingerprint <code>{v[:16]}</code></li>"
                 for k, v in result.data_fingerprints.items()) + "</ul>"]
    if rec is None:
        parts.append("<p class='bad'>No trial finished: nothing to recommend.</p>")
    else:
        status = "feasible" if rec.feasible else "NOT feasible"
        parts.append(f"<h2>Recommendation (trial {rec.trial}): "
                     f"<span class='{'ok' if rec.feasible else 'bad'}'>{status}</span></h2>"
                     f"<p>{html.escape(rec.explanation)}. Capital cost (mean IM) "
                     f"{100 * rec.objectives['capital_cost']:.3f}%, insolvency "
                     f"{rec.objectives['insolvency_bps']:.3f} bps. Binding constraints: "
                     f"{html.escape(', '.join(rec.binding_constraints) or 'none')}.</p>")
        rows = []
        for name, value in rec.params.items():
            change = (rec.change_vs_published or {}).get(name)
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{_cell(value)}</td>"
                        f"<td>{_cell(change['published'] if change else None)}</td>"
                        f"<td>{_cell(change['change'] if change else None)}</td></tr>")
        parts.append("<table><tr><th>parameter</th><th>recommended</th><th>published</th>"
                     "<th>change</th></tr>" + "".join(rows) + "</table>")
        parts.append("<h3>Constraints (≤ 0 is feasible)</h3><table><tr><th>constraint</th>"
                     "<th>value</th></tr>" + "".join(
                         f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>"
                         for k, v in rec.constraints.items()) + "</table>")
    parts.append("<h2>Pareto front</h2><div class='chart'>" + _pareto_chart(result) + "</div>")
    if rec is not None:
        from calibration.calibrate import evaluate

        full = evaluate(prepared, rec.params, full=True)
        for inst, metrics in full.coverage.items():
            parts.append(f"<h2>{html.escape(inst)}</h2><div class='chart'>"
                         + _margin_chart(prepared, rec.params, inst) + "</div>")
            rows = []
            for m in metrics:
                for side_name in ("long", "short"):
                    s = getattr(m, side_name)
                    light = s.traffic_light or ""
                    rows.append(
                        f"<tr><td>{html.escape(m.window)}</td><td>{side_name}</td>"
                        f"<td>{s.observations}</td><td>{s.breaches}</td>"
                        f"<td>{_cell(s.breach_rate)}</td><td>{_cell(s.kupiec_pvalue)}</td>"
                        f"<td>{_cell(s.christoffersen_pvalue)}</td>"
                        f"<td style='background:{_LIGHT.get(light, '#eee')};color:white'>"
                        f"{light or '–'}</td><td>{_cell(s.max_uncovered_loss)}</td></tr>")
            parts.append("<h3>Coverage tests</h3><table><tr><th>window</th><th>side</th>"
                         "<th>obs</th><th>breaches</th><th>rate</th><th>Kupiec p</th>"
                         "<th>indep. p</th><th>traffic light</th><th>max uncovered</th></tr>"
                         + "".join(rows) + "</table>")
            liq = [(m.window, m.bad_debt_usd, m.liquidations)
                   for m in full.liquidation.get(inst, []) if m.window != "all"]
            if liq:
                parts.append("<div class='chart'>" + _liquidation_chart(liq, inst) + "</div>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;font-size:13px}.ok{color:#2e7d32}.bad{color:#c62828}"
             ".chart svg{max-width:100%;height:auto}")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>marginlab report {html.escape(result.study)}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(parts) + "</body></html>")
