"""One self-contained HTML page a risk operator reads before a recommendation moves collateral.

Charts are matplotlib SVG inlined in the page (no script, no network): the Pareto front with
the recommendation marked; per instrument, the recommended margin against the realised loss
over the horizon with breaches marked and stress windows shaded; bad debt per window in bps
of the notional opened in it (so a 1-day stress window and an 18-month fold compare). Tables:
coverage tests with traffic lights, liquidations and insolvency, and the change against the
published parameters; each column explained in one line under its table.
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
from matplotlib.patches import Patch

from calibration.calibrate import CalibrationResult, Prepared, Recommendation
from calibration.horizon import format_duration
from calibration.models import make_model
from calibration.report import CoverageMetrics, LiquidationMetrics

#: Cell colours of the traffic lights; ``insufficient`` (a window too short for any verdict)
#: is grey like a missing value, not a verdict.
_LIGHT = {"green": "#2e7d32", "yellow": "#f9a825", "red": "#c62828", "insufficient": "#9e9e9e"}
_MAX_POINTS = 2500


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    # Text stays text (not glyph paths): the labels can be read, searched and checked.
    with plt.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _objectives_text(rec: Recommendation) -> str:
    """The recommendation's objectives in words, each in its unit."""
    parts = []
    for name, value in rec.objectives.items():
        if name == "capital_cost":
            parts.append(f"Capital cost (mean IM) {100 * value:.3f}% of notional")
        elif name == "insolvency_bps":
            parts.append(f"insolvency {value:.3f} bps")
        else:
            parts.append(f"{name} {value:.6g}")
    return ", ".join(parts)


def _pareto_chart(result: CalibrationResult) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    # The chart is of the default two objectives; other objectives are in the tables.
    front = [(p.capital_cost, p.insolvency_bps) for p in result.pareto_front
             if p.capital_cost is not None and p.insolvency_bps is not None]
    if front:
        ax.plot([100 * c for c, _ in front], [i for _, i in front],
                "o-", color="#1565c0", label="Pareto front (feasible)")
    rec = result.recommendation
    if rec is not None and {"capital_cost", "insolvency_bps"} <= set(rec.objectives):
        ax.plot([100 * rec.objectives["capital_cost"]], [rec.objectives["insolvency_bps"]],
                marker="*", markersize=18, color="#c62828", linestyle="none",
                label=f"recommendation (trial {rec.trial})")
    ax.set_xlabel("capital cost: mean IM rate (% of notional)")
    ax.set_ylabel("insolvency (bps)")
    ax.set_title("Capital against insolvency")
    ax.grid(alpha=0.3)
    ax.legend()
    return _svg(fig)


def _bucket(values: np.ndarray, size: int, how: str) -> np.ndarray:
    """Blocks of ``size`` consecutive values reduced to their max or mean, NaN ignored; a
    block of NaN only (warm-up, the last bars without a full horizon) gives NaN.

    Counted by hand rather than with ``np.nanmax``/``np.nanmean``, which warn on such
    blocks ("Mean of empty slice"), a warning a reader of the report has no use for.
    """
    n = values.shape[0] // size * size
    block = values[:n].reshape(-1, size)
    finite = ~np.isnan(block)
    count = finite.sum(axis=1)
    if how == "max":
        out: np.ndarray = np.where(finite, block, -np.inf).max(axis=1)
    else:
        out = np.where(finite, block, 0.0).sum(axis=1) / np.maximum(count, 1)
    out[count == 0] = np.nan
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
            label=f"realised loss over {horizon} bars = {prepared.horizon.duration} (worst side)")
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


def bad_debt_bps_of_opened(metrics: LiquidationMetrics) -> float | None:
    """Bad debt of a window per notional opened in it, bps (``bad_debt_usd /
    notional_opened_usd × 1e4``): a 1-day stress window and an 18-month fold compare on it,
    as USD do not. ``None`` when no position opened in the window."""
    if metrics.notional_opened_usd <= 0:
        return None
    return metrics.bad_debt_usd / metrics.notional_opened_usd * 1e4


def _liquidation_chart(metrics: list[LiquidationMetrics], instrument: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.4))
    names = [m.window for m in metrics]
    bps = [bad_debt_bps_of_opened(m) for m in metrics]
    colours = ["#757575" if m.window == "all" else
               "#1565c0" if m.window.startswith("oos_fold") else "#c62828" for m in metrics]
    ax.bar(names, [0.0 if b is None else b for b in bps], color=colours)
    for i, (m, b) in enumerate(zip(metrics, bps, strict=True)):
        text = (f"{m.liquidations:,} liq.\n{m.bad_debt_usd:,.0f} USD" if b is not None
                else "no position\nopened")
        ax.annotate(text, (i, 0.0 if b is None else b), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("bad debt (bps of notional opened)")
    ax.margins(y=0.25)
    kinds = {c: k for c, k in (("#757575", "whole span"), ("#c62828", "stress window"),
                               ("#1565c0", "out-of-sample fold")) if c in colours}
    ax.legend(handles=[Patch(color=c, label=k) for c, k in kinds.items()], fontsize=7,
              loc="upper right")
    ax.set_title(f"{instrument}: bad debt per window, normalised by the notional opened in "
                 "it", fontsize=10)
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(alpha=0.3, axis="y")
    return _svg(fig)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def _light_cell(light: str | None) -> str:
    colour = _LIGHT.get(light or "", "#eeeeee")
    text = "#212121" if light is None else "white"
    return (f"<td style='background:{colour};color:{text}'>"
            f"{html.escape(light or '–')}</td>")


def coverage_legend(expected_rate: float | None) -> tuple[tuple[str, str], ...]:
    """One line per coverage column (domain.md §3); ``expected_rate`` is 1 − q, a fraction."""
    p = "1 − q" if expected_rate is None else f"1 − q = {_pct(expected_rate)}%"
    return (
        ("obs.", "observations: bars with a margin and a whole close-out horizon after them "
                 "(every bar, or every h-th when non-overlapping); one belongs to a window "
                 "when its loss interval overlaps it."),
        ("breaches", "observations whose loss over the horizon exceeded the margin."),
        ("breach rate", f"breaches / observations, in %; the model aims at {p}."),
        ("Kupiec p", f"two-sided p-value of Kupiec's proportion-of-failures test that the "
                     f"breach rate is {p}; a small value says the rate is off, either way."),
        ("one-sided p", "Kupiec's one-sided p-value, 1 − Φ(sign(x − np)·√LR): a small value "
                        "says too many breaches (what the calibration's constraint tests)."),
        ("indep. p", "p-value of Christoffersen's test that breaches do not cluster; a small "
                     "value says they come in runs."),
        ("traffic light", "Basel zones by the binomial probability of so many breaches: "
                          "green, yellow, red; insufficient: a window too short for any "
                          "verdict (even no breach would not be green)."),
        ("max uncovered", "the largest loss beyond the margin, in % of notional."),
    )


def _legend(items: tuple[tuple[str, str], ...]) -> str:
    return ("<ul class='legend'>" + "".join(
        f"<li><b>{html.escape(name)}</b>: {html.escape(text)}</li>" for name, text in items)
        + "</ul>")


def _coverage_table(metrics: list[CoverageMetrics]) -> str:
    rows = []
    for m in metrics:
        for side_name in ("long", "short"):
            s = getattr(m, side_name)
            rows.append(
                f"<tr><td>{html.escape(m.window)}</td><td>{side_name}</td>"
                f"<td>{s.observations:,}</td><td>{s.breaches:,}</td>"
                f"<td>{_pct(s.breach_rate)}</td><td>{_cell(s.kupiec_pvalue)}</td>"
                f"<td>{_cell(s.kupiec_pvalue_one_sided)}</td>"
                f"<td>{_cell(s.christoffersen_pvalue)}</td>{_light_cell(s.traffic_light)}"
                f"<td>{_pct(s.max_uncovered_loss)}</td></tr>")
    expected = metrics[0].long.expected_breach_rate if metrics else None
    return ("<h3>Coverage tests</h3><table><tr><th>window</th><th>side</th><th>obs.</th>"
            "<th>breaches</th><th>breach rate (%)</th><th>Kupiec p</th><th>one-sided p</th>"
            "<th>indep. p</th>"
            "<th>traffic light</th><th>max uncovered (% of notional)</th></tr>"
            + "".join(rows) + "</table>"
            + _legend(coverage_legend(expected)))


def premature_legend(recovery_bars: int) -> str:
    """The one line that says what a premature liquidation is (domain.md §4)."""
    return ("a liquidation whose bankruptcy price is not reached in bars t..t+R (the "
            f"trigger bar t included; R = {recovery_bars} bars) and whose price ends that "
            "window back on the safe side of the liquidation price: the position would "
            "have survived.")


def _liquidation_table(metrics: list[LiquidationMetrics], recovery_bars: int) -> str:
    rows = []
    for m in metrics:
        bps = bad_debt_bps_of_opened(m)
        rows.append(
            f"<tr><td>{html.escape(m.window)}</td><td>{m.positions:,}</td>"
            f"<td>{m.notional_opened_usd:,.0f}</td><td>{m.liquidations:,}</td>"
            f"<td>{m.premature_liquidations:,}</td><td>{_pct(m.premature_share, 1)}</td>"
            f"<td>{m.bad_debt_usd:,.0f}</td><td>{'–' if bps is None else f'{bps:.3f}'}</td>"
            "</tr>")
    legend = (
        ("positions, notional opened", "counted in the window where the position opens."),
        ("liquidations, bad debt", "counted in the window where the liquidation triggers."),
        ("premature", premature_legend(recovery_bars)),
        ("bad debt (bps of notional opened)", "bad debt USD / notional opened USD × 10,000, "
                                              "so windows of any length compare."),
    )
    return ("<h3>Liquidations and insolvency</h3><table><tr><th>window</th>"
            "<th>positions</th><th>notional opened (USD)</th><th>liquidations</th>"
            "<th>premature</th><th>premature share (%)</th><th>bad debt (USD)</th>"
            "<th>bad debt (bps of notional opened)</th></tr>" + "".join(rows) + "</table>"
            + _legend(legend))


def render_calibration_report(result: CalibrationResult, prepared: Prepared) -> str:
    """The HTML page (a string) of a calibration's result and evidence.

    Instrument and window names come from the request: matplotlib would read ``$...$`` in
    them as mathtext (and raise on a bad expression), so every text is drawn literally.
    """
    with plt.rc_context({"text.parse_math": False}):
        return _render(result, prepared)


def _render(result: CalibrationResult, prepared: Prepared) -> str:
    rec = result.recommendation
    parts = [f"<h1>Calibration report: {html.escape(result.model)}</h1>",
             f"<p>Study <code>{html.escape(result.study)}</code>, spec "
             f"<code>{result.spec_hash[:16]}</code>, seed {result.seed}, engine "
             f"{html.escape(result.engine_version)}, generated "
             f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}. Trials: "
             + ", ".join(f"{k} {v}" for k, v in result.trials.items() if v) + ".</p>",
             f"<p>Close-out horizon {html.escape(result.horizon)} ({result.horizon_bars} "
             f"bars of {format_duration(result.bar_seconds)}): it sized every margin and is "
             f"the coverage test's loss window. Workers: {result.workers}; "
             f"{'reproducible' if result.reproducible else 'not reproducible'} from this "
             f"record ({html.escape(result.reproducibility)}).</p>",
             "<h2>Data</h2><ul>" + "".join(
                 f"<li>{html.escape(k)}: fingerprint <code>{v[:16]}</code></li>"
                 for k, v in result.data_fingerprints.items()) + "</ul>"]
    if rec is None:
        parts.append("<p class='bad'>No trial finished: nothing to recommend.</p>")
    else:
        status = "feasible" if rec.feasible else "NOT feasible"
        parts.append(f"<h2>Recommendation (trial {rec.trial}): "
                     f"<span class='{'ok' if rec.feasible else 'bad'}'>{status}</span></h2>"
                     f"<p>{html.escape(rec.explanation)}. {html.escape(_objectives_text(rec))}"
                     ". Binding constraints: "
                     f"{html.escape(', '.join(rec.binding_constraints) or 'none')}.</p>"
                     + "".join(f"<p class='bad'>{html.escape(n)}</p>" for n in rec.notes))
        rows = []
        for name, value in rec.params.items():
            change = (rec.change_vs_published or {}).get(name)
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{_cell(value)}</td>"
                        f"<td>{_cell(change['published'] if change else None)}</td>"
                        f"<td>{_cell(change['change'] if change else None)}</td></tr>")
        parts.append("<table><tr><th>parameter</th><th>recommended</th><th>published</th>"
                     "<th>change</th></tr>" + "".join(rows) + "</table>"
                     "<p class='legend'>Values as in the JSON: rates are fractions of "
                     "notional (0.01 = 1%), *_bars in bars.</p>")
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
            parts.append(_coverage_table(metrics))
            liq = full.liquidation.get(inst, [])
            if liq:
                parts.append(_liquidation_table(liq, prepared.liquidation.recovery_bars))
                parts.append(f"<div class='chart bad-debt' id='bad-debt-{html.escape(inst)}'>"
                             + _liquidation_chart(liq, inst) + "</div>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;font-size:13px}.ok{color:#2e7d32}.bad{color:#c62828}"
             ".chart svg{max-width:100%;height:auto}.legend{font-size:13px;color:#424242;"
             "margin:0 0 1em;padding-left:1.2em}.legend li{margin:1px 0}")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>marginlab report {html.escape(result.study)}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(parts) + "</body></html>")
