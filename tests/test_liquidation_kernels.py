"""The liquidation replay's shortcuts against brute force and the reference simulation: the
x-space block bounds (``x_block_bounds``) and the first passage over them, the premature
test's window minima (``window_min``), and the close-outs copied between leverages capped at
the same ``1 / IM``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.liquidation import LiquidationConfig, _engine, simulate_liquidations
from calibration.liquidation import _kernels as lk
from calibration.models import EwmaMargin
from tests.test_liquidation import GRID, assert_matches_reference, crash_path, make_bars


def _series(seed: int, n: int) -> tuple[np.ndarray, ...]:
    """Lows, highs, MM rates and cumulative funding with what the bounds must survive: NaN
    margins (a warm-up, scattered bars, a whole 64-bar block), margins above 1 and below -1,
    a negative low, a NaN high, a NaN funding sum, funding jumps."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    low = close * (1 - rng.uniform(0, 0.02, n))
    high = close * (1 + rng.uniform(0, 0.02, n))
    mm = rng.uniform(0.005, 0.2, n)
    mm[:100] = np.nan
    mm[rng.choice(n, 50, replace=False)] = np.nan
    mm[640:704] = np.nan
    mm[803] = 1.5  # long factor 1 - mm < 0: that block is taken exactly
    mm[905] = -1.5  # short factor 1 + mm < 0
    low[1001] = -3.0
    high[1107] = np.nan
    funding_cum = np.cumsum(np.where(np.arange(n) % 480 == 0, rng.normal(0, 0.01, n), 0.0)
                            * close)
    funding_cum[1203] = np.nan
    return low, high, mm, funding_cum, close


def _x(price: float, mm: float, funding: float, is_long: bool) -> float:
    x = price * (1.0 - mm) - funding if is_long else funding - price * (1.0 + mm)
    return math.inf if math.isnan(x) else x


def test_x_block_bounds_are_at_most_every_bar_and_exact_where_they_must_be() -> None:
    """Every block's bound is <= the exact ``block_minima`` of ``x`` (raw=False), on both
    levels and sides; blocks whose factors could be negative, or with a flagged price or
    funding sum, hold the exact minimum; a block without any margin bounds at +inf."""
    n = 64 * 40 + 13
    low, high, mm, funding_cum, _ = _series(5, n)
    blocks = lk.price_blocks(low, high, funding_cum)
    bounds = lk.x_block_bounds(low, high, mm, funding_cum, blocks)
    exact = (*lk.block_minima(low, mm, funding_cum, True, False),
             *lk.block_minima(high, mm, funding_cum, False, False))
    for bound, minimum in zip(bounds, exact, strict=True):
        assert bound.shape == minimum.shape
        assert np.all(bound <= minimum)
    long8, long64, short8, short64 = bounds
    assert long8[803 // 8] == exact[0][803 // 8]  # mm > 1
    assert short8[905 // 8] == exact[2][905 // 8]  # mm < -1
    assert long8[1001 // 8] == exact[0][1001 // 8]  # a negative low
    assert short8[1107 // 8] == exact[2][1107 // 8]  # a NaN high
    assert long8[1203 // 8] == exact[0][1203 // 8]  # a NaN funding sum
    assert long64[10] == np.inf
    assert short64[10] == np.inf
    assert np.all(long8[640 // 8: 704 // 8] == np.inf)
    # the bounds are loose elsewhere: the search over them must step past false hits
    assert np.count_nonzero(long8 < exact[0]) > n // 16
    # a series without funding keeps no funding blocks: the same bounds as from zero sums
    zeros = np.zeros(n)
    bare = lk.price_blocks(low, high, np.zeros(0))
    assert bare.funding_min.shape == (0,)
    for a, b in zip(lk.x_block_bounds(low, high, mm, zeros, bare),
                    lk.x_block_bounds(low, high, mm, zeros, lk.price_blocks(low, high, zeros)),
                    strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("holding", [3, 64, 200, 1000])
def test_first_passage_over_block_bounds_is_brute_force(seed: int, holding: int) -> None:
    """``first_passage`` over the bounds gives every query's first bar with ``x <= threshold``
    in ``(e, e + holding]``, as a bar-by-bar loop and as the exact index, with columns of equal
    leverage (capped at 1 / IM) beside each other, rising leverages after falling ones, and
    entries near the end of the series."""
    rng = np.random.default_rng(seed)
    n = 64 * 30 + 21
    low, high, mm, funding_cum, close = _series(seed, n)
    blocks = lk.price_blocks(low, high, funding_cum)
    long8, long64, short8, short64 = lk.x_block_bounds(low, high, mm, funding_cum, blocks)
    entries = np.sort(np.r_[rng.choice(np.arange(100, n - 1), 60, replace=False),
                            [n - 2, n - 1]]).astype(np.int64)
    requested = np.array([125.0, 75.0, 50.0, 20.0, 10.0, 5.0, 2.0])
    cap = rng.uniform(3.0, 60.0, entries.shape[0])
    leverage = np.ascontiguousarray(np.minimum(requested[None, :], cap[:, None]))
    orders = (np.arange(requested.shape[0], dtype=np.int64),  # leverage descending
              np.array([3, 4, 0, 1, 2, 6, 5], dtype=np.int64))  # thresholds rise midway
    hits = 0
    for is_long, b8, b64 in ((True, long8, long64), (False, short8, short64)):
        extreme = low if is_long else high
        bars = lk.SideBars(is_long, close, extreme, funding_cum, np.zeros(n))
        exact = lk.BlockIndex(*lk.block_minima(extreme, mm, funding_cum, is_long, False))
        for order in orders:
            got = lk.first_passage(bars, mm, lk.BlockIndex(b8, b64), entries, leverage, order,
                                   holding)
            assert np.array_equal(got, lk.first_passage(bars, mm, exact, entries, leverage,
                                                        order, holding))
            for r, e in enumerate(entries.tolist()):
                ce, de = float(close[e]), float(funding_cum[e])
                for c in range(requested.shape[0]):
                    off = ce / float(leverage[r, c])
                    bound = (ce - off - de) if is_long else (de - ce - off)
                    bound = bound + lk.TIE_TOLERANCE * ce
                    want = next((t for t in range(e + 1, min(e + holding, n - 1) + 1)
                                 if _x(float(extreme[t]), float(mm[t]), float(funding_cum[t]),
                                       is_long) <= bound), -1)
                    assert got[r, c] == want, (is_long, e, c)
                    hits += want >= 0
    assert hits > 0


@pytest.mark.parametrize("window", [0, 7, 8, 9, 15, 16, 23, 64, 127, 128, 303, 1440, 1447])
@pytest.mark.parametrize("n", [1, 9, 130, 1000, 5003])
def test_window_min_is_brute_force(window: int, n: int) -> None:
    """``window_min`` per block ``i`` is the least signed extreme of bars ``8i + 8 ..
    min(8i + window, n - 1)``, +inf where that is empty, windows shorter and longer than the
    series: every head length ``window % 8`` (the part of the last block a span reads),
    spans of one block and of many runs of blocks, series not a multiple of 8."""
    rng = np.random.default_rng(n + window)
    price = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    price[rng.choice(n, max(1, n // 20))] *= 0.5  # ties and isolated dips
    for is_long, sign in ((True, 1.0), (False, -1.0)):
        got = lk.window_min(price, is_long, window)
        want = np.array([
            min((sign * price[u] for u in range(8 * i + 8, min(8 * i + window, n - 1) + 1)),
                default=math.inf) if window >= 8 else math.inf
            for i in range(n // 8)])
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("recovery", [8, 9, 15, 16, 33, 130])
def test_premature_flags_from_window_minima_are_the_search_at_every_offset(
        recovery: int) -> None:
    """``outcomes`` with the window minima and without (the search): the same slots to the
    bit, for triggers at every offset in their block of 8, on a path whose rare deep wicks
    reach bankruptcy in the rest of the trigger's block, in the span and in the tail."""
    rng = np.random.default_rng(recovery)
    n = 900
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    low = close * (1 - rng.uniform(0, 0.002, n))
    low[rng.random(n) < 0.03] *= 0.7
    high = close * (1 + rng.uniform(0, 0.002, n))
    high[rng.random(n) < 0.03] *= 1.4
    mm = np.full(n, 0.01)
    funding_cum = np.zeros(n)
    depth = np.full(n, 1e6)
    rows = 400
    entries = np.sort(rng.integers(0, n - 200, rows)).astype(np.int64)
    leverage = np.ascontiguousarray(np.tile([20.0, 10.0, 5.0], (rows, 1)))
    trig = np.ascontiguousarray(
        np.minimum(entries[:, None] + rng.integers(1, 200, (rows, 3)), n - 1))
    notional = np.ascontiguousarray(np.tile([1e3, 1e6], (rows, 1)))
    positions = lk.PositionRows(notional, np.sqrt(notional), np.arange(rows, dtype=np.int64) * 6,
                                1, 3)
    settings = lk.CloseoutSettings(1, False, recovery, 0.0005, 0.01, 0.5, 0.005)
    seen = 0
    for is_long, extreme in ((True, low), (False, high)):
        bars = lk.SideBars(is_long, close, extreme, funding_cum, depth)
        index = lk.BlockIndex(*lk.block_minima(extreme, low, low, is_long, True))
        slots = []
        for recovery_min in (lk.window_min(extreme, is_long, recovery), np.zeros(0)):
            size = rows * 3
            agg = lk.TriggerSlots(
                np.empty(size, dtype=np.int64), np.empty(size, dtype=bool),
                np.empty(size, dtype=np.int64), np.empty(size), np.empty(size), np.empty(size),
                np.empty(size, dtype=np.int64), np.empty(size))
            fund = lk.FundLedger(np.zeros(n), np.zeros(n, dtype=bool), 1.0)
            i64 = np.zeros(0, dtype=np.int64)
            none = lk.PositionSlots(i64, i64, np.zeros(0), np.zeros(0), np.zeros(0),
                                    np.zeros(0), np.zeros(0, dtype=bool))
            end, _ = lk.outcomes(bars, mm, index, recovery_min,
                                 lk.QueryRows(entries, leverage, trig), positions, settings,
                                 fund, agg, 0, none, 0, False)
            assert end == size
            slots.append((agg, fund))
        (agg_w, fund_w), (agg_s, fund_s) = slots
        for a, b in zip((*agg_w, *fund_w[:2]), (*agg_s, *fund_s[:2]), strict=True):
            assert a.tobytes() == b.tobytes()
        premature = agg_w.premature
        assert 0 < np.count_nonzero(premature) < premature.shape[0]
        seen += len({int(t) & 7 for t in agg_w.trigger_bar[~premature]})
    assert seen == 16  # non-premature triggers at every offset of a block, on both sides


def _same_results(a: object, b: object) -> None:
    for name in ("fund_bars", "fund_usd", "fund_delta_usd"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    table_a, table_b = a.position_table(), b.position_table()  # type: ignore[attr-defined]
    for name in ("trigger_bar", "liquidation_price", "closeout_price", "closeout_equity_usd",
                 "bad_debt_usd", "fee_usd", "premature"):
        assert getattr(table_a, name).tobytes() == getattr(table_b, name).tobytes(), name


@pytest.mark.parametrize("recovery", [1, 5, 8, 9, 64, 127, 128, 300])
def test_premature_from_window_minima_is_the_search(
        recovery: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The premature flags read from the cached window minima (windows of 8 bars and more
    that end inside the series) equal the search's (the bar scan below 128 bars, the block
    index from 128), to the bit with everything else."""
    bars = make_bars(crash_path(700, seed=recovery), funding=True, depth=True, seed=recovery)
    model = EwmaMargin(warmup_bars=20, horizon_bars=5, decay=0.9, floor_rate=0.002)
    config = LiquidationConfig(**{**GRID, "holding_bars": 300,  # type: ignore[arg-type]
                                  "recovery_bars": recovery})
    with_window = simulate_liquidations(bars, model, config)
    assert _engine._recovery_min(bars, 1, recovery).shape == ((len(bars) // 8,) if recovery >= 8
                                                              else (0,))
    monkeypatch.setattr(_engine, "_recovery_min", lambda *_: np.zeros(0))
    searched = simulate_liquidations(bars, model, config)
    _same_results(with_window, searched)
    table = with_window.position_table()
    assert 0 < np.count_nonzero(table.premature) < np.count_nonzero(table.trigger_bar >= 0)


def test_window_minima_are_not_used_over_nan_extremes() -> None:
    """A NaN extreme leaves the premature test to the search (whose scan skips the bar)."""
    bars = make_bars(crash_path(300, seed=1), seed=1)
    bars.low[150] = np.nan
    assert _engine._recovery_min(bars, 1, 60).shape == (0,)
    assert _engine._recovery_min(bars, -1, 60).shape == (300 // 8,)


@pytest.mark.parametrize("dense_fund", [False, True])
def test_leverages_capped_alike_match_reference(
        dense_fund: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an IM of 5%+ most requested leverages cap at the same 1 / IM: those columns'
    first passage and close-out are copied from the column before. Engine = brute force,
    and the fund ledger (one move per query, in order) = the fund from the trigger slots."""
    bars = make_bars(crash_path(400, seed=3), funding=True, depth=True, seed=3)
    model = EwmaMargin(warmup_bars=20, horizon_bars=5, decay=0.9, floor_rate=0.05)
    config = LiquidationConfig(**{**GRID,  # type: ignore[arg-type]
                                  "leverages": (2, 3, 5, 10, 15, 20, 25, 50, 100),
                                  "latency_bars": 2, "population_scale": 3.0})
    monkeypatch.setattr(_engine, "SPARSE_FUND_BARS_PER_SLOT", 0 if dense_fund else 10**9)
    result = assert_matches_reference(bars, model, config)
    table = result.position_table()
    k = len(config.leverages)
    lev = table.leverage.reshape(-1, k)
    trig = table.trigger_bar.reshape(-1, k)
    copied = (lev[:, 1:] == lev[:, :-1]) & (trig[:, 1:] == trig[:, :-1]) & (trig[:, 1:] >= 0)
    assert np.count_nonzero(copied) > 100
    monkeypatch.setattr(_engine, "SPARSE_FUND_BARS_PER_SLOT", 10**9 if dense_fund else 0)
    _same_results(result, simulate_liquidations(bars, model, config))
