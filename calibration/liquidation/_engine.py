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
    _ImAt,
)
from calibration.liquidation._results import (
    LiquidationResult,
    _Aggregates,
    _no_details,
    _Replay,
    _SideData,
    closeout_settings,
)
from calibration.margins import MarginSeries
from calibration.models import MarginModel, MarginRates

#: The fund is summed from the trigger slots when there are fewer than one slot per this
#: many bars (see ``simulate_liquidations``).
SPARSE_FUND_BARS_PER_SLOT = 32


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


def _recovery_min(bars: BarSeries, sign: int, recovery: int) -> FloatArray:
    """``window_min`` of the lows (``sign`` 1) or of minus the highs (-1) over the premature
    test's window, cached on the series; empty (``outcomes`` then searches) for windows of
    fewer than 8 bars or when an extreme is NaN or infinite."""
    key = ("liquidation_recovery_min", sign, recovery)
    if key not in bars._cache:
        price = np.ascontiguousarray(bars.low if sign > 0 else bars.high, dtype=np.float64)
        usable = recovery >= 8 and bool(np.isfinite(price).all())
        bars._cache[key] = (_lk.window_min(price, sign > 0, recovery) if usable
                            else np.zeros(0))
    return bars._cache[key]


def _funding_cum(bars: BarSeries, close: FloatArray) -> FloatArray:
    """Cumulative funding per bar (price units, shape ``(n,)``; zeros without funding data),
    cached on the series."""
    key = ("liquidation_funding_cum",)
    if key not in bars._cache:
        if bars.funding_rate is not None:
            bars._cache[key] = np.cumsum(np.asarray(bars.funding_rate, dtype=np.float64) * close)
        else:
            bars._cache[key] = np.zeros(len(bars))
    return bars._cache[key]


def _price_blocks(bars: BarSeries, low: FloatArray, high: FloatArray,
                  funding_cum: FloatArray) -> _lk.PriceBlocks:
    """``price_blocks`` of the bars' own extremes and funding, cached on the series."""
    keys = tuple(("liquidation_price_blocks", name) for name in _lk.PriceBlocks._fields)
    if any(key not in bars._cache for key in keys):
        funding = funding_cum if bars.funding_rate is not None else np.zeros(0)
        for key, array in zip(keys, _lk.price_blocks(low, high, funding), strict=True):
            bars._cache[key] = array
    return _lk.PriceBlocks(*(bars._cache[key] for key in keys))


def simulate_liquidations(
    bars: BarSeries,
    model: MarginModel,
    config: LiquidationConfig | None = None,
    *,
    margins: MarginSeries | None = None,
) -> LiquidationResult:
    """Replay a population of positions through ``bars`` under ``model`` (domain.md §4).

    See ``calibration.liquidation`` for every convention. MM and IM rates come from
    ``model.margin_rates`` once per notional when ``model.notional_dependent``, else once;
    with ``margins`` (``calibration.margins.MarginSeries`` of ``model`` on ``bars``) they are
    taken from that shared series instead, computed there only if not yet.

    Raises:
        InvalidParameters: a bad setting (``field`` names it) or an explicit position whose
            ``entry_ms`` lies before the first bar or whose ``entry_bar`` is past the last.
        DataError: market impact or cascade requested on bars with neither depth nor volume.
        InsufficientData: the series is too short for the model's warm-up.
    """
    config = config if config is not None else LiquidationConfig()
    config.validate()
    if margins is not None:
        margins.check(bars, model)
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
                rates.append(margins.rates(value) if margins is not None
                             else model.margin_rates(bars, notional_usd=value))
        series_of = np.asarray([by_value[v] for v in notionals.tolist()], dtype=np.int64)
    else:
        rates.append(margins.rates() if margins is not None else model.margin_rates(bars))
        series_of = np.zeros(notionals.shape[0], dtype=np.int64)
    first_valid = max(r.first_valid_bar for r in rates)
    mm_series = [np.ascontiguousarray(r.mm_rate, dtype=np.float64) for r in rates]
    im_series = [_ImAt(r) for r in rates]  # read at entry bars only

    funding_cum = _funding_cum(bars, close)
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

    def side_bars(sign: int) -> _lk.SideBars:
        return _lk.SideBars(sign > 0, close, extremes[sign], funding_cum, depths[sign])

    # The x-space index of each side and MM series, from the bars' own extremes (a cascade
    # moves one side's extremes only after that side's first passage): block bounds from one
    # pass over the margins and the series' cached price blocks, both sides at once.
    x_blocks: dict[tuple[int, int], _lk.BlockIndex] = {}
    used = {g.series for side_groups in groups.values() for g in side_groups}
    if used:
        blocks = _price_blocks(bars, low, high, funding_cum)
    for series in sorted(used):
        long8, long64, short8, short64 = _lk.x_block_bounds(
            low, high, mm_series[series], funding_cum, blocks)
        x_blocks[(1, series)] = _lk.BlockIndex(long8, long64)
        x_blocks[(-1, series)] = _lk.BlockIndex(short8, short64)
    for sign, side_groups in groups.items():
        for g in side_groups:
            g.trig = _lk.first_passage(
                side_bars(sign), mm_series[g.series], x_blocks[(sign, g.series)], g.entries,
                g.leverage, g.order, holding,
            )
        if config.cascade and config.cascade_kappa > 0 and side_groups:
            extremes[sign] = _run_cascade(
                side_groups, side_bars(sign), mm_series,
                _lk.CascadeSettings(float(config.cascade_kappa), holding), scale,
            )

    agg_total = 0
    for side_groups in groups.values():
        for g in side_groups:
            agg_total += int(np.count_nonzero(g.query_rows().trig >= 0))
    agg = _Aggregates.empty(agg_total)
    # The fund's moves: a per-bar ledger when close-outs are dense, else summed from the
    # trigger slots after a stable sort (the same bits, ``fund_from_slots``); the ledger's
    # zeroing and scan cost ~2.5 ns a bar, the sort ~5 ns a slot and doubling.
    sparse_fund = agg_total * SPARSE_FUND_BARS_PER_SLOT < n
    fund = _lk.FundLedger(np.zeros(0 if sparse_fund else n),
                          np.zeros(0 if sparse_fund else n, dtype=bool), scale)
    settings = closeout_settings(config)
    no_details = _no_details()
    side_data: list[_SideData] = []
    slot = 0
    for sign, side_groups in groups.items():
        if not side_groups:
            continue
        if extremes[sign] is (low if sign > 0 else high):
            index = _lk.BlockIndex(*_extreme_blocks(bars, sign))
            recovery_min = _recovery_min(bars, sign, settings.recovery_bars)
        else:  # moved by the cascade
            index = _lk.BlockIndex(*_lk.block_minima(extremes[sign], low, low, sign > 0, True))
            recovery_min = np.zeros(0)
        side = _SideData(sign, side_bars(sign), index, recovery_min, side_groups)
        side_data.append(side)
        for g in side_groups:
            start = slot
            slot, _ = _lk.outcomes(
                side.bars, mm_series[g.series], side.extreme_index, side.recovery_min,
                g.query_rows(), g.position_rows(), settings, fund, agg.slots(), slot,
                no_details, 0, False,
            )
            agg.side[start:slot] = sign
    replay = _Replay(mm_series, side_data, config, n)

    # Insurance fund: the running level after each bar with a close-out.
    if sparse_fund:
        closeout_bar = np.minimum(agg.trigger_bar + settings.latency_bars, n - 1)
        fund_bars, fund_usd, fund_delta_usd = _lk.fund_from_slots(
            closeout_bar, np.argsort(closeout_bar, kind="stable"), agg.fee, agg.bad_debt,
            scale, float(config.insurance_fund_usd))
    else:
        fund_bars, fund_usd = _lk.fund_levels(fund.delta_usd, fund.seen,
                                              float(config.insurance_fund_usd))
        fund_delta_usd = np.ascontiguousarray(fund.delta_usd[fund_bars])

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
        fund_delta_usd=fund_delta_usd,
        _layout=layout,
        _agg=agg,
        _replay=replay,
    )


def _run_cascade(
    side_groups: list[_Group], bars: _lk.SideBars, mm: list[FloatArray],
    settings: _lk.CascadeSettings, scale: float,
) -> FloatArray:
    """Run the cascade kernel over every group of one side; updates each group's triggers."""
    sizes = [g.entries.shape[0] for g in side_groups]
    series_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = _lk.QueryRows(
        entries=np.concatenate([g.entries for g in side_groups]).astype(np.int64),
        leverage=np.ascontiguousarray(np.concatenate([g.leverage for g in side_groups])),
        trig=np.ascontiguousarray(np.concatenate([g.query_rows().trig for g in side_groups])),
    )
    weight = np.concatenate([g.notional.sum(axis=1) * scale for g in side_groups])
    mm_stack = np.ascontiguousarray(np.stack([mm[g.series] for g in side_groups]))
    adj: FloatArray = _lk.cascade(bars, mm_stack, rows, series_start, weight, settings)
    for i, g in enumerate(side_groups):
        g.trig = np.ascontiguousarray(rows.trig[series_start[i]:series_start[i + 1]])
    return adj
