"""Evidence per volatility regime (domain.md §11): does a margin hold in calm and in
turbulent markets alike?

Each bar is classified by its trailing realised volatility — the standard deviation of the
log close-to-close returns of the ``window_bars`` bars ending at it — into terciles over the
span (an ex-post classification: the cut points use the whole span): ``calm``, ``normal``,
``turbulent``. Bars without a full trailing window are unclassified.

Per regime: the coverage test of the observations whose margin bar lies in it (the long loss
``1 - min(low[t+1..t+h]) / close[t]`` and the short loss ``max(high[t+1..t+h]) / close[t]
- 1`` against the tested (maintenance) margin, as ``calibration.coverage``), with its traffic
light; and the liquidations triggered, and their bad debt, in its bars. Margin calls are the
liquidation triggers of a bar; their Pearson correlation with the bar's trailing volatility
says whether the margin calls come with volatility (procyclical) or not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from calibration import _kernels
from calibration._bars import BarSeries
from calibration.stats import binomial_cdf, traffic_light

REGIMES = ("calm", "normal", "turbulent")
#: Traffic-light red threshold of the Basel binomial CDF (as the stress-window constraint).
_RED = 0.9999


def trailing_volatility(close: NDArray[np.float64], window_bars: int) -> NDArray[np.float64]:
    """Per bar, the standard deviation (ddof 0) of the ``window_bars`` log returns ending at
    it, shape ``(n,)``; NaN before a full window."""
    returns = np.diff(np.log(close))
    if returns.shape[0] < window_bars:
        return np.full(close.shape[0], np.nan)
    # A sliding O(n) kernel: numpy's std over a sliding_window_view materialised n x window
    # values (30 GB for five years of minutes with a one-day window).
    out: NDArray[np.float64] = _kernels.trailing_std(returns, int(window_bars))
    return out


def classify(volatility: NDArray[np.float64]) -> NDArray[np.int8]:
    """Terciles of the defined volatilities: 0 calm, 1 normal, 2 turbulent, -1 none."""
    labels = np.full(volatility.shape[0], -1, dtype=np.int8)
    defined = np.isfinite(volatility)
    if defined.sum() < 3:
        return labels
    low, high = np.quantile(volatility[defined], [1 / 3, 2 / 3])
    labels[defined] = np.where(volatility[defined] <= low, 0,
                               np.where(volatility[defined] <= high, 1, 2)).astype(np.int8)
    return labels


def side_losses(bars: BarSeries, horizon_bars: int
                ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per margin bar t, the long and short loss over (t, t+h] as fractions of close[t],
    shape ``(n,)`` each; NaN where the horizon runs past the data."""
    n = len(bars)
    long = np.full(n, np.nan)
    short = np.full(n, np.nan)
    if n > horizon_bars:
        lows = np.lib.stride_tricks.sliding_window_view(bars.low[1:], horizon_bars).min(axis=1)
        highs = np.lib.stride_tricks.sliding_window_view(bars.high[1:], horizon_bars).max(axis=1)
        m = n - horizon_bars
        long[:m] = 1.0 - lows[:m] / bars.close[:m]
        short[:m] = highs[:m] / bars.close[:m] - 1.0
    return long, short


def regime_coverage(labels: NDArray[np.int8], margin: NDArray[np.float64],
                    losses: tuple[NDArray[np.float64], NDArray[np.float64]],
                    expected_breach_rate: float) -> dict[str, dict[str, Any]]:
    """Per regime and side: observations, breaches, breach rate and traffic light."""
    out: dict[str, dict[str, Any]] = {}
    for code, name in enumerate(REGIMES):
        entry: dict[str, Any] = {}
        for side, loss in zip(("long", "short"), losses, strict=True):
            keep = (labels == code) & np.isfinite(margin) & np.isfinite(loss)
            n = int(keep.sum())
            x = int((loss[keep] > margin[keep]).sum())
            entry[side] = {
                "observations": n, "breaches": x, "breach_rate": x / n if n else None,
                "traffic_light": traffic_light(n, x, expected_breach_rate) if n else None,
                "red_margin": (binomial_cdf(x, n, expected_breach_rate) - _RED) if n else None,
            }
        out[name] = entry
    return out


def regime_evidence(bars: BarSeries, margin: NDArray[np.float64], horizon_bars: int,
                    expected_breach_rate: float, window_bars: int,
                    trigger_bar: NDArray[np.int64] | None = None,
                    bad_debt_usd: NDArray[np.float64] | None = None) -> dict[str, Any]:
    """One instrument's evidence per regime (module docstring).

    Args:
        bars: the instrument's bars.
        margin: the tested margin rate per bar, fraction of notional, shape ``(n,)``.
        horizon_bars: the close-out horizon, bars.
        expected_breach_rate: ``1 - coverage level``.
        window_bars: the trailing volatility window, bars.
        trigger_bar: per simulated position, the bar its liquidation triggered (-1: none).
        bad_debt_usd: per simulated position, its bad debt, USD.

    Returns:
        ``{"window_bars", "regimes": {calm|normal|turbulent: {"bars", "long", "short",
        "liquidations", "bad_debt_usd"}}, "volatility_margin_call_correlation"}``.
    """
    key = ("trailing_volatility", int(window_bars))  # parameter-free: once per series
    if key not in bars._cache:
        bars._cache[key] = trailing_volatility(bars.close, window_bars)
    vol = bars._cache[key]
    labels = classify(vol)
    coverage = regime_coverage(labels, margin, side_losses(bars, horizon_bars),
                               expected_breach_rate)
    calls = np.zeros(len(bars), dtype=np.float64)
    debt = np.zeros(len(bars), dtype=np.float64)
    if trigger_bar is not None:
        hit = trigger_bar >= 0
        np.add.at(calls, trigger_bar[hit], 1.0)
        if bad_debt_usd is not None:
            np.add.at(debt, trigger_bar[hit], bad_debt_usd[hit])
    regimes: dict[str, Any] = {}
    for code, name in enumerate(REGIMES):
        in_regime = labels == code
        regimes[name] = {"bars": int(in_regime.sum()), **coverage[name],
                         "liquidations": int(calls[in_regime].sum()),
                         "bad_debt_usd": float(debt[in_regime].sum())}
    defined = labels >= 0
    corr = None
    if trigger_bar is not None and defined.sum() > 2 and calls[defined].std() > 0 \
            and vol[defined].std() > 0:
        corr = float(np.corrcoef(vol[defined], calls[defined])[0, 1])
    return {"window_bars": window_bars, "regimes": regimes,
            "volatility_margin_call_correlation": corr}


def worst_red_margin(evidence: dict[str, Any]) -> float:
    """The largest ``F(breaches) - 0.9999`` over regimes and sides (> 0: a red light)."""
    worst = -_RED
    for entry in evidence["regimes"].values():
        for side in ("long", "short"):
            value = entry[side]["red_margin"]
            if value is not None:
                worst = max(worst, value)
    return worst


__all__ = ["REGIMES", "classify", "regime_coverage", "regime_evidence", "side_losses",
           "trailing_volatility", "worst_red_margin"]
