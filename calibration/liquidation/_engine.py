"""``simulate_liquidations``: margin rates → population → first passage → cascade → close-outs →
fund (the rules: ``calibration.liquidation``)."""

from __future__ import annotations

import numpy as np

from calibration._bars import BarSeries
from calibration._errors import DataError
from calibration.liquidation import _kernels as _lk
from calibration.liquidation._config import LiquidationConfig
from calibration.liquidation._population import (
    FloatArray,
    _explicit_groups,
    _ExplicitLayout,
    _grid_groups,
    _GridLayout,
    _Group,
)
from calibration.liquidation._results import (
    _NO_DETAILS,
    LiquidationResult,
    _Aggregates,
    _Replay,
    _SideData,
)
from calibration.models import MarginModel, MarginRates


def _depths(bars: BarSeries, config: LiquidationConfig) -> tuple[FloatArray, FloatArray]:
    """Depth (USD) per bar for long and short close-outs (bid / ask, or a share of ADV)."""
    needed = config.impact_coef > 0 or (config.cascade and config.cascade_kappa > 0)
    if bars.bid_depth_usd is not None and bars.ask_depth_usd is not None:
        return bars.bid_depth_usd, bars.ask_depth_usd
    traded = bars.traded_usd()
    if traded is None:
        if needed:
            raise DataError(
                f"market impact and cascades need order-book depth or volume; "
                f"{bars.instrument!r} has neither (set impact_coef=0 and cascade=false)"
            )
        zeros = np.zeros(len(bars))
        return zeros, zeros
    # cached on the series, like its other features: calibration re-simulates the same bars
    key = ("liquidation_depth_usd", int(config.adv_window_bars),
           float(config.depth_fraction_of_adv))
    if key not in bars._cache:
        bars._cache[key] = _lk.trailing_mean(
            np.ascontiguousarray(traded, dtype=np.float64), int(config.adv_window_bars),
            86_400.0 / bars.bar_seconds * float(config.depth_fraction_of_adv),
        )
    depth = bars._cache[key]
    return depth, depth


def _extreme_blocks(bars: BarSeries, sign: int) -> tuple[FloatArray, FloatArray]:
    """``block_minima`` of the lows (``sign`` 1) or of minus the highs (-1), cached on the
    series."""
    keys = (("liquidation_blocks", sign, 8), ("liquidation_blocks", sign, 64))
    if keys[0] not in bars._cache or keys[1] not in bars._cache:
        price = np.ascontiguousarray(bars.low if sign > 0 else bars.high, dtype=np.float64)
        bars._cache[keys[0]], bars._cache[keys[1]] = _lk.block_minima(
            price, price, price, sign > 0, True
        )
    return bars._cache[keys[0]], bars._cache[keys[1]]



def simulate_liquidations(
    bars: BarSeries, model: MarginModel, config: LiquidationConfig | None = None
) -> LiquidationResult:
    """Replay a population of positions through ``bars`` under ``model`` (domain.md §4).

    See ``calibration.liquidation`` for every convention. MM and IM rates come from
    ``model.margin_rates`` once per notional when ``model.notional_dependent``, else once.

    Raises:
        InvalidParameters: a bad setting (``field`` names it) or an explicit position whose
            ``entry_ms`` lies before the first bar or whose ``entry_bar`` is past the last.
        DataError: market impact or cascade requested on bars with neither depth nor volume.
        InsufficientData: the series is too short for the model's warm-up.
    """
    config = config if config is not None else LiquidationConfig()
    config.validate()
    n = len(bars)
    close = np.ascontiguousarray(bars.close, dtype=np.float64)
    low = np.ascontiguousarray(bars.low, dtype=np.float64)
    high = np.ascontiguousarray(bars.high, dtype=np.float64)
    explicit = config.positions is not None
    sides_cfg = tuple(config.sides)
    side_signs = tuple(1 if s == "long" else -1 for s in sides_cfg)

    # MM / IM series: one per distinct notional when the model depends on size, else one.
    if explicit:
        assert config.positions is not None
        notionals = np.asarray([float(p.notional_usd) for p in config.positions])
    else:
        notionals = np.asarray([float(v) for v in config.notionals_usd])
    rates: list[MarginRates] = []
    if model.notional_dependent:
        by_value: dict[float, int] = {}
        for value in notionals.tolist():
            if value not in by_value:
                by_value[value] = len(rates)
                rates.append(model.margin_rates(bars, notional_usd=value))
        series_of = np.asarray([by_value[v] for v in notionals.tolist()], dtype=np.int64)
    else:
        rates.append(model.margin_rates(bars))
        series_of = np.zeros(notionals.shape[0], dtype=np.int64)
    first_valid = max(r.first_valid_bar for r in rates)
    mm_series = [np.ascontiguousarray(r.mm_rate, dtype=np.float64) for r in rates]
    im_series = [np.asarray(r.im_rate, dtype=np.float64) for r in rates]

    if bars.funding_rate is not None:
        funding_cum = np.cumsum(np.asarray(bars.funding_rate, dtype=np.float64) * close)
    else:
        funding_cum = np.zeros(n)
    depth_long, depth_short = _depths(bars, config)
    depth_long = np.ascontiguousarray(depth_long, dtype=np.float64)
    depth_short = np.ascontiguousarray(depth_short, dtype=np.float64)
    scale = float(config.population_scale)

    groups: dict[int, list[_Group]] = {1: [], -1: []}
    layout: _GridLayout | _ExplicitLayout
    if explicit:
        assert config.positions is not None
        layout, entry_bars, entry_positions, entry_notional = _explicit_groups(
            bars, config.positions, notionals, series_of, mm_series, im_series, first_valid,
            close, funding_cum, groups, scale,
        )
    else:
        layout, entry_bars, entry_positions, entry_notional = _grid_groups(
            n, config, notionals, series_of, mm_series, im_series, first_valid, side_signs,
            close, funding_cum, groups, scale, model.notional_dependent,
        )

    for side_groups in groups.values():
        for g in side_groups:
            g.notional_pow = np.ascontiguousarray(g.notional ** float(config.impact_exponent))
    holding = int(config.holding_bars)
    # First passage without cascade, then (optionally) the cascade's forward pass.
    extremes: dict[int, FloatArray] = {1: low, -1: high}
    depths = {1: depth_long, -1: depth_short}
    for sign, side_groups in groups.items():
        blocks: dict[int, tuple[FloatArray, FloatArray]] = {}
        for g in side_groups:
            if g.series not in blocks:
                blocks[g.series] = _lk.block_minima(
                    extremes[sign], mm_series[g.series], funding_cum, sign > 0, False
                )
            b8, b64 = blocks[g.series]
            g.trig = _lk.first_passage(
                extremes[sign], mm_series[g.series], funding_cum, sign > 0, b8, b64, close,
                g.entries, g.leverage, g.order, holding,
            )
        if config.cascade and config.cascade_kappa > 0 and side_groups:
            extremes[sign] = _run_cascade(
                side_groups, extremes[sign], close, mm_series, funding_cum, depths[sign], sign > 0,
                float(config.cascade_kappa), holding, scale,
            )

    agg_total = 0
    for side_groups in groups.values():
        for g in side_groups:
            assert g.trig is not None
            agg_total += int(np.count_nonzero(g.trig >= 0))
    agg = _Aggregates.empty(agg_total)
    fund_delta = np.zeros(n)
    fund_seen = np.zeros(n, dtype=bool)
    side_data: list[_SideData] = []
    slot = 0
    for sign, side_groups in groups.items():
        if not side_groups:
            continue
        if extremes[sign] is (low if sign > 0 else high):
            q8, q64 = _extreme_blocks(bars, sign)
        else:  # moved by the cascade
            q8, q64 = _lk.block_minima(extremes[sign], low, low, sign > 0, True)
        side = _SideData(sign, extremes[sign], depths[sign], side_groups, q8, q64)
        side_data.append(side)
        for g in side_groups:
            start = slot
            slot, _ = _lk.outcomes(
                *side.kernel_args(g, close, mm_series[g.series], funding_cum, config),
                scale, fund_delta, fund_seen, *agg.arrays(), slot, False,
                *_NO_DETAILS, 0,
            )
            agg.side[start:slot] = sign
    replay = _Replay(close, funding_cum, mm_series, side_data, config, n)

    # Insurance fund: the running level after each bar with a close-out.
    fund_bars, fund_usd = _lk.fund_levels(fund_delta, fund_seen, float(config.insurance_fund_usd))

    return LiquidationResult(
        config=config,
        instrument=bars.instrument,
        fingerprint=bars.fingerprint,
        timestamp_ms=bars.timestamp_ms,
        positions_opened=int(entry_positions.sum()),
        entry_bars=entry_bars,
        entry_positions=entry_positions,
        entry_notional_usd=entry_notional,
        liquidations=int(agg.count.sum()),
        fund_bars=fund_bars,
        fund_usd=fund_usd,
        fund_delta_usd=np.ascontiguousarray(fund_delta[fund_bars]),
        _layout=layout,
        _agg=agg,
        _replay=replay,
    )


def _run_cascade(
    side_groups: list[_Group], price: FloatArray, close: FloatArray, mm: list[FloatArray],
    funding_cum: FloatArray, depth: FloatArray, is_long: bool, kappa: float, holding: int,
    scale: float,
) -> FloatArray:
    """Run the cascade kernel over every group of one side; updates each group's triggers."""
    sizes = [g.entries.shape[0] for g in side_groups]
    series_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    entries = np.concatenate([g.entries for g in side_groups]).astype(np.int64)
    leverage = np.ascontiguousarray(np.concatenate([g.leverage for g in side_groups]))
    weight = np.concatenate([g.notional.sum(axis=1) * scale for g in side_groups])
    trig = np.ascontiguousarray(np.concatenate([g.trig for g in side_groups if g.trig is not None]))
    mm_stack = np.ascontiguousarray(np.stack([mm[g.series] for g in side_groups]))
    adj: FloatArray = _lk.cascade(
        price, mm_stack, funding_cum, depth, is_long, kappa, holding, series_start, close,
        entries, leverage, weight, trig,
    )
    for i, g in enumerate(side_groups):
        g.trig = np.ascontiguousarray(trig[series_start[i]:series_start[i + 1]])
    return adj
