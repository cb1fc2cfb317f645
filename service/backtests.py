"""``/v1/backtests``: small backtests answered synchronously."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import anyio
from litestar import Controller, Request, post
from litestar.params import Body

from calibration._bars import BarSeries
from calibration._errors import InvalidParameters
from calibration.backtest import run_backtest
from calibration.calibrate import load_data_ref
from calibration.coverage import CoverageConfig
from calibration.models import make_model
from calibration.report import BacktestReport
from calibration.spec import DataRefSpec, liquidation_config
from calibration.windows import DEFAULT_STRESS_WINDOWS, StressWindow
from service import examples
from service.auth import requires
from service.errors import COMMON, PayloadTooLarge, problem_responses
from service.limits import check_refs
from service.schemas import BacktestRequest
from service.settings import Settings


def load_within(refs: Sequence[DataRefSpec], root: str, budget: int,
                prefix: str) -> list[BarSeries]:
    """Load the references one by one, refusing (413) once their bars pass ``budget``: the
    next file is not read once the request is over it."""
    loaded: list[BarSeries] = []
    total = 0
    for i, ref in enumerate(refs):
        bars = load_data_ref(ref, root, f"{prefix}[{i}]")
        total += len(bars)
        if total > budget:
            raise PayloadTooLarge(
                f"more than {budget} bars (the synchronous limit) after {prefix}[{i}]; submit "
                "it as a calibration job (POST /v1/calibrations) or cut the range",
                field=prefix)
        loaded.append(bars)
    return loaded


def _run(body: BacktestRequest, settings: Settings) -> BacktestReport:
    root = settings.data_root
    try:
        make_model(body.model, body.params)
    except InvalidParameters as exc:  # name the request's path: params.decay, not decay
        field = exc.field if exc.field in (None, "model") else f"params.{exc.field}"
        raise InvalidParameters(str(exc), field=field) from None
    check_refs([(f"data[{i}]", d) for i, d in enumerate(body.data)], root,
               per_file=settings.max_file_rows)
    datasets = load_within(body.data, root, settings.max_sync_bars, "data")
    liquidation = None
    if body.liquidation is not None:
        liquidation = liquidation_config(body.liquidation)
    windows = (DEFAULT_STRESS_WINDOWS if body.stress_windows is None else
               tuple(StressWindow.from_dates(w.name, w.start, w.end)
                     for w in body.stress_windows))
    coverage = CoverageConfig(horizon_bars=body.horizon_bars, horizon=body.horizon,
                              coverage_level=body.coverage_level,
                              overlapping=body.overlapping, margin=body.margin,
                              notional_usd=body.notional_usd)
    return run_backtest(datasets, body.model, body.params, coverage=coverage,
                        liquidation=liquidation, stress_windows=windows)


class BacktestController(Controller):
    """Coverage backtest and liquidation simulation of one model, answered at once."""

    path = "/v1/backtests"
    tags = ["backtests"]

    @post("/", guards=[requires("reader")], status_code=200,
          summary="Run a backtest synchronously (small requests only)",
          description="Above MARGINLAB_MAX_SYNC_BARS bars the request is refused with 413 and "
                      "a pointer to POST /v1/calibrations.",
         responses=problem_responses(*COMMON, 400, 413, 422))
    async def create(
        self, request: Request[Any, Any, Any],
        data: Annotated[BacktestRequest, Body(examples=[examples.BACKTEST])],
    ) -> BacktestReport:
        settings = request.app.state.settings
        liquidation_config(data.liquidation or {})  # refuse bad settings first
        report: BacktestReport = await anyio.to_thread.run_sync(_run, data, settings)
        return report
