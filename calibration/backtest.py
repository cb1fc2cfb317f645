"""One call that runs a whole backtest and returns the JSON-ready report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from calibration._bars import BarSeries
from calibration._errors import InvalidParameters
from calibration._version import ENGINE_VERSION
from calibration.coverage import CoverageConfig, coverage_backtest, iso_utc
from calibration.data import find_suspect_prints
from calibration.liquidation import (
    LiquidationConfig,
    LiquidationResult,
    shared_insurance_fund,
    simulate_liquidations,
)
from calibration.margins import MarginSeries
from calibration.models import LiquidityAddon, make_model
from calibration.report import BacktestReport, DatasetInfo, InstrumentReport, RepairInfo
from calibration.windows import DEFAULT_STRESS_WINDOWS, StressWindow

#: The position grid and close-out settings used when the caller names none.
DEFAULT_LIQUIDATION = LiquidationConfig()

#: Called after each step with ``(steps_done, steps_total, what)``.
ProgressCallback = Callable[[int, int, str], None]


def dataset_info(bars: BarSeries) -> DatasetInfo:
    """The provenance block of a series for reports."""
    return DatasetInfo(
        instrument=bars.instrument,
        ref=bars.source,
        fingerprint=bars.fingerprint,
        rows=len(bars),
        start=iso_utc(int(bars.timestamp_ms[0])),
        end=iso_utc(int(bars.timestamp_ms[-1])),
        bar_seconds=bars.bar_seconds,
        gaps=len(bars.gaps),
        missing_bars=sum(g.missing_bars for g in bars.gaps),
        suspect_prints=[iso_utc(int(bars.timestamp_ms[r])) for r in find_suspect_prints(bars)],
        close_only=bars.close_only,
        newest_first=bars.newest_first,
        repair_policy=list(bars.repair_policy),
        repairs=[RepairInfo(row=r.row, time=iso_utc(r.timestamp_ms), defect=r.defect,
                            change=r.change) for r in bars.repairs],
        depth_stale_bars=bars.depth_stale_bars,
    )


def run_backtest(
    datasets: Sequence[BarSeries],
    model: str,
    params: Mapping[str, Any] | None = None,
    *,
    coverage: CoverageConfig | None = None,
    liquidation: LiquidationConfig | None = DEFAULT_LIQUIDATION,
    stress_windows: Sequence[StressWindow] = DEFAULT_STRESS_WINDOWS,
    progress: ProgressCallback | None = None,
) -> BacktestReport:
    """Coverage backtest (and, unless ``liquidation`` is None, the liquidation simulation) of
    one model on each dataset.

    The datasets are the instruments of one venue: their liquidations draw on one insurance
    fund of ``liquidation.insurance_fund_usd`` (``shared_insurance_fund``; close-outs at the
    same time settle together, summed in the order of ``datasets``), reported once at the
    report level; each instrument reports its own contribution to it.

    Args:
        datasets: validated bar series, one per instrument.
        model: family name (``tiered``, ``ewma``, ``fhs``).
        params: the family's public hyperparameters (plus liquidity add-on ones).
        coverage: coverage settings; defaults follow the model (its horizon and confidence).
        liquidation: position grid and close-out settings, or ``None`` to skip.
        stress_windows: named windows every figure is also reported for.
        progress: called after each instrument step.

    Raises:
        InvalidParameters, InsufficientData, DataError: see ``calibration.errors``.
    """
    margin_model = make_model(model, params)
    coverage = coverage or CoverageConfig()
    if not datasets:
        raise InvalidParameters("a backtest needs at least one dataset", field="data")
    sizes = sorted({b.bar_seconds for b in datasets})
    if len(sizes) > 1:
        raise InvalidParameters(
            f"the datasets have different bar sizes ({', '.join(f'{s} s' for s in sizes)}); "
            "one close-out horizon needs one bar size: resample them to one", field="data")
    # One horizon sizes the margin and is the test's loss window (domain.md §2).
    close_out = coverage.horizon_for(margin_model, sizes[0])
    margin_model = margin_model.with_horizon(close_out.bars)
    coverage = dataclasses.replace(coverage, horizon_bars=close_out.bars, horizon=None)
    horizon, level = coverage.resolve(margin_model, sizes[0])
    if liquidation is not None:
        liquidation.validate()
    total = len(datasets) * (2 if liquidation is not None else 1)
    done = 0
    coverages = []
    results: list[LiquidationResult] = []
    for bars in datasets:
        # One margin series per instrument, shared by the coverage test and the liquidations.
        margins = MarginSeries(margin_model, bars)
        coverages.append(coverage_backtest(bars, margin_model, coverage, stress_windows,
                                           margins=margins))
        done += 1
        if progress:
            progress(done, total, f"{bars.instrument}: coverage")
        if liquidation is not None:
            results.append(simulate_liquidations(bars, margin_model, liquidation,
                                                 margins=margins))
            done += 1
            if progress:
                progress(done, total, f"{bars.instrument}: liquidations")
    # One insurance fund for the venue: every instrument's close-outs move it, in time order.
    fund = shared_insurance_fund(results) if liquidation is not None else None
    reports = []
    for i, bars in enumerate(datasets):
        liq_metrics = None
        contribution = None
        if fund is not None:
            result = results[i]
            liq_metrics = [result.metrics("all", None, None, fund)]
            ts = bars.timestamp_ms
            liq_metrics += [
                result.metrics(w.name, w.start_ms, w.end_ms, fund)
                for w in stress_windows
                if w.start_ms <= int(ts[-1]) and w.end_ms > int(ts[0])
            ]
            contribution = result.fund_contribution_path()
        reports.append(
            InstrumentReport(
                instrument=bars.instrument, coverage=coverages[i], liquidation=liq_metrics,
                fund_contribution_path=contribution,
            )
        )
    name = margin_model.family
    if isinstance(margin_model, LiquidityAddon):
        name = f"{margin_model.base.family}+liquidity"
    liq_config = None
    if liquidation is not None:
        liq_config = {
            k: v for k, v in dataclasses.asdict(liquidation).items() if k != "positions"
        }
        if liquidation.positions is not None:
            liq_config["positions"] = len(liquidation.positions)
    return BacktestReport(
        engine_version=ENGINE_VERSION,
        model=name,
        params=_jsonable(margin_model.get_params()),
        horizon_bars=horizon,
        horizon=close_out.duration,
        horizon_seconds=close_out.seconds,
        bar_seconds=sizes[0],
        overlapping=coverage.overlapping,
        coverage_level=level,
        margin_tested=coverage.margin,
        notional_usd=coverage.notional_usd,
        datasets=[dataset_info(b) for b in datasets],
        instruments=reports,
        liquidation_config=liq_config,
        insurance_fund_start_usd=None if fund is None else fund.start_usd,
        insurance_fund_path=None if fund is None else fund.path(),
        insurance_fund_min_usd=None if fund is None else fund.min_usd,
        insurance_fund_exhausted_at=None if fund is None else fund.exhausted_at,
    )


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
