"""Coverage backtests of many parameter sets of one model family, in one pass of the data.

A calibration evaluates hundreds of parameter sets on the same bars. Evaluated one at a
time, each set re-reads the whole series and its EWMA recursion runs alone, bound by the
latency of one multiply-add chain; evaluated together, the sets' recursions overlap and the
bars are read once::

    from calibration.batch import evaluate_coverage_batch
    results = evaluate_coverage_batch(bars, "ewma", [{"decay": 0.97}, {"decay": 0.99}],
                                      config=CoverageConfig(horizon_bars=60))
    results[1] == coverage_backtest(bars, make_model("ewma", {"decay": 0.99}), ...)

The results are those of ``coverage_backtest`` for each set, bit for bit (the kernels
repeat its floating-point operations in the same order). ``ewma`` sets (the family of the
calibrations in ``examples/``) run in the batch kernel; sets of other families, EWMA
sets with the liquidity add-on, and an EWMA set alone at its horizon are evaluated one at a
time through ``coverage_backtest``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import ndtri

from calibration import _batch_kernels as _bk
from calibration._bars import BarSeries
from calibration._errors import InsufficientData, InvalidParameters
from calibration.coverage import (
    _BLOCK_BARS,
    CoverageConfig,
    assemble_metrics,
    coverage_backtest,
    observation_spans,
    trail_bars,
)
from calibration.models import EwmaMargin, MarginModel, make_model
from calibration.report import CoverageMetrics
from calibration.windows import StressWindow

__all__ = ["BATCH_FAMILIES", "coverage_of_models", "evaluate_coverage_batch"]

#: Families evaluated by the batch kernel; the others fall back to one set at a time.
BATCH_FAMILIES = ("ewma",)


def evaluate_coverage_batch(
    bars: BarSeries,
    model_family: str,
    param_sets: Sequence[Mapping[str, Any]],
    *,
    config: CoverageConfig | None = None,
    stress_windows: Sequence[StressWindow] = (),
) -> list[list[CoverageMetrics]]:
    """``coverage_backtest`` of each parameter set of ``model_family`` on ``bars``.

    Args:
        bars: the instrument's bars.
        model_family: ``ewma`` (batch kernel), or any family of ``make_model``.
        param_sets: the sets' public hyperparameters, as ``make_model`` takes them.
        config: observation settings shared by every set (horizon, level, overlap, tested
            margin); a set's own ``horizon_bars`` must agree with it as in
            ``coverage_backtest``. Sets of different horizons are grouped per horizon.
        stress_windows: named windows reported after the whole span, as
            ``coverage_backtest``.

    Returns:
        One list per set, in the order of ``param_sets``: the whole-span metrics first, then
        one entry per stress window overlapping the series.

    Raises:
        InvalidParameters: a set's hyperparameters are out of range (``field`` names it).
        InsufficientData: a set leaves no observation on ``bars``.
    """
    models = [make_model(model_family, p) for p in param_sets]
    return coverage_of_models(bars, models, config=config, stress_windows=stress_windows)


def coverage_of_models(
    bars: BarSeries,
    models: Sequence[MarginModel],
    *,
    config: CoverageConfig | None = None,
    stress_windows: Sequence[StressWindow] = (),
) -> list[list[CoverageMetrics]]:
    """``evaluate_coverage_batch`` of models already built (``make_model``, a horizon set
    or not), as ``coverage_backtest(bars, model, config, stress_windows)`` of each: the
    calibration's trials build theirs once for coverage, liquidations and capital cost."""
    config = config or CoverageConfig()
    results: list[list[CoverageMetrics] | None] = [None] * len(models)
    groups: dict[int, list[int]] = {}
    for i, model in enumerate(models):
        if type(model) is EwmaMargin:
            horizon, _ = config.resolve(model, bars.bar_seconds)
            groups.setdefault(horizon, []).append(i)
        else:
            results[i] = coverage_backtest(bars, model, config, stress_windows)
    for horizon, members in groups.items():
        if len(members) == 1:
            # One set alone: nothing to run side by side, and the one-set kernels are
            # faster than the batch machinery for it (7.6 against 12.8 ns/bar measured).
            results[members[0]] = coverage_backtest(bars, models[members[0]], config,
                                                    stress_windows)
            continue
        batch = _ewma_batch(bars, [models[i] for i in members], horizon, config,
                            stress_windows)
        for i, metrics in zip(members, batch, strict=True):
            results[i] = metrics
    return [r for r in results if r is not None]


def _ewma_batch(
    bars: BarSeries, models: list[MarginModel], horizon: int, config: CoverageConfig,
    stress_windows: Sequence[StressWindow],
) -> list[list[CoverageMetrics]]:
    """The EWMA sets of one horizon through the batch kernels."""
    n = len(bars)
    notional = config.notional_usd
    if not (math.isfinite(notional) and notional > 0):
        # As MarginModel.margin_rates refuses it for one set.
        raise InvalidParameters(f"notional_usd must be positive, got {notional!r}",
                                field="notional_usd")
    if horizon >= n:
        raise InsufficientData(
            f"horizon of {horizon} bars is longer than the {n} bars of {bars.instrument!r}"
        )
    step = 1 if config.overlapping else horizon
    stop = n - horizon
    rows = []
    spans: list[list[tuple[str, tuple[int, int, int], tuple[int, int]]]] = []
    levels = []
    for model in models:
        model = model.with_horizon(horizon)
        assert isinstance(model, EwmaMargin)
        model.validate()
        _, level = config.resolve(model, bars.bar_seconds)
        levels.append(level)
        start = model.first_valid_bar()
        if start >= n:
            raise InsufficientData(
                f"{model.family} needs more than {start} bars before its first margin; "
                f"the series {bars.instrument!r} has {n}"
            )
        if start >= stop:
            raise InsufficientData(
                f"{bars.instrument!r}: {n} bars leave no observation after a warm-up of "
                f"{start} bars and a horizon of {horizon}"
            )
        # The same scalars as EwmaMargin._mm_rate and MarginModel.margin_rates.
        scale = float(ndtri(model.confidence)) * math.sqrt(model.horizon_set())
        rows.append((float(model.decay), float(int(model.warmup_bars)), scale,
                     float(model.floor_rate), 1.0 + float(model.apc_buffer),
                     model.max_rate_cap(), model._im_to_mm(config.notional_usd)))
        spans.append(observation_spans(bars, horizon, start, stop, step, stress_windows))
    params = np.asarray(rows, dtype=np.float64)
    grid = np.asarray([[s[1] for s in per_set] for per_set in spans], dtype=np.int64)
    tested = _bk.TEST_MM if config.margin == "mm" else _bk.TEST_IM
    im_per_tested = params[:, 6].copy() if tested == _bk.TEST_MM else np.ones(len(rows))
    long_loss, short_loss = bars.forward_losses(horizon)
    returns = bars.log_returns()
    squared = bars.squared_returns()
    stats, capped, block_min, block_max, block_var = _bk.ewma_coverage_batch(
        returns, squared, long_loss, short_loss, params, grid, tested, im_per_tested,
        _BLOCK_BARS)
    increase = _bk.ewma_increase_batch(
        returns, squared, long_loss, params, grid, tested, block_min, block_max, block_var,
        _BLOCK_BARS, trail_bars(config, bars.bar_seconds))
    out = []
    for k, per_set in enumerate(spans):
        p = 1.0 - levels[k]
        out.append([
            assemble_metrics(name, stats[k, r], float(increase[k, r]), p, bounds,
                             int(capped[k, r]))
            for r, (name, _, bounds) in enumerate(per_set)
        ])
    return out
