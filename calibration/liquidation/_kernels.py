"""numba kernels of the liquidation simulation (domain.md §4); see ``calibration.liquidation``.

The plain-Python reference every kernel is tested against is ``tests/reference_liquidation.py``.

Trigger test in "x-space". For a long opened at the close ``C_e`` of bar ``e`` with leverage
``L`` (collateral per unit of quantity ``off = C_e / L``) and cumulative funding ``D`` (price
units), the trigger condition "equity at the low <= MM at the low" is

    low_t * (1 - mm_t) - D_t  <=  C_e - off - D_e

and for a short, "equity at the high <= MM at the high" is

    D_t - high_t * (1 + mm_t)  <=  D_e - C_e - off.

The left side ``x_t`` does not depend on the position, the right side (the threshold) does not
depend on t. So per MM-rate series one pass over the margins builds lower bounds of ``x`` over
blocks of 8 and 64 bars for both sides (``x_block_bounds``, from the series' cached
``price_blocks``), and every position's first passage is a walk over at most ``holding / 64``
block bounds plus a few single bars (``first_passage``); the positions of one entry bar are
visited by falling threshold so their searches share one walk. Nothing scans bar by bar per
position. The exact minima of the raw extremes (``block_minima``, cached per series) answer
the close-out's worst price over long windows, and their window minima per block
(``window_min``, cached too) the premature test (bankruptcy reached in bars
``t .. t + recovery``, trigger bar included).

Inputs are typed records rather than positional splats: ``SideBars`` (one side's bars),
``BlockIndex`` (a ``block_minima`` index), ``QueryRows`` and ``PositionRows`` (the queries and
the positions behind them), ``CloseoutSettings`` and ``CascadeSettings`` (scalars from the
config), and the outputs ``FundLedger``, ``TriggerSlots`` and ``PositionSlots``. numba compiles
one specialisation per record type, as for positional arguments.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numba as nb
import numpy as np
from numpy.typing import NDArray

#: numba options of every kernel (as in ``calibration._kernels``): compiled once per machine.
_JIT: dict[str, Any] = {"nogil": True, "cache": True}

#: Below this many bars a close-out's windows (latency, recovery) are scanned bar by bar:
#: the block index's phases cost more in mispredicted branches than a short scan.
_SHORT_RANGE_BARS = 128

#: Equity within this fraction of notional above MM triggers the liquidation (see _threshold).
TIE_TOLERANCE = 1e-9

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


class SideBars(NamedTuple):
    """One side (long or short) of one instrument's bars, every array of shape ``(n,)``."""

    is_long: bool
    close: FloatArray  # closes (price)
    extreme: FloatArray  # adverse extreme: low for longs, high for shorts (price)
    funding_cum: FloatArray  # cumulative funding (price units)
    depth_usd: FloatArray  # bid (longs) / ask (shorts) depth, or the ADV-based depth (USD)


class BlockIndex(NamedTuple):
    """``block_minima`` of one series: minima over blocks of 8 and 64 bars, shapes ``(n//8,)``
    and ``(n//64,)``."""

    b8: FloatArray
    b64: FloatArray


class QueryRows(NamedTuple):
    """Query rows of one side: row ``r`` opened at the close of ``entries[r]``, ascending; its
    ``K`` columns are effective leverages, each with a trigger bar (-1: none)."""

    entries: IntArray  # (R,)
    leverage: FloatArray  # (R, K)
    trig: IntArray  # (R, K)


class PositionRows(NamedTuple):
    """The positions behind the queries of ``QueryRows``: query ``(r, c)`` stands for ``J``
    positions, one per notional, sharing trigger, liquidation price and premature flag.
    Position ``(r, c, j)`` has index ``pos_base[r] + c * col_stride + j * notional_stride``."""

    notional_usd: FloatArray  # (R, J)
    notional_pow: FloatArray  # (R, J): notional_usd ** impact_exponent
    pos_base: IntArray  # (R,)
    col_stride: int
    notional_stride: int


class CloseoutSettings(NamedTuple):
    """``LiquidationConfig``'s close-out scalars (rates are fractions of price / notional)."""

    latency_bars: int
    at_liquidation_price: bool  # the optimistic fill (with latency 0 only)
    recovery_bars: int
    spread_rate: float
    impact_coef: float
    impact_exponent: float
    fee_rate: float


class CascadeSettings(NamedTuple):
    """``LiquidationConfig``'s cascade scalars."""

    kappa: float  # price move per unit of liquidated USD / depth USD
    holding_bars: int


class FundLedger(NamedTuple):
    """Per-bar moves of the insurance fund, shape ``(n,)`` (empty: not recorded)."""

    delta_usd: FloatArray  # net move settling at each bar (× population_scale)
    seen: BoolArray  # a close-out settles at the bar
    population_scale: float


class TriggerSlots(NamedTuple):
    """One slot per triggered query, each of shape ``(S,)``: trigger bar, premature flag,
    positions, and the sums over its positions (USD, one position each) of notional, bad debt
    and fee, the positions with bad debt and the largest bad debt."""

    trigger_bar: IntArray
    premature: BoolArray
    positions: IntArray  # positions behind the query
    notional_usd: FloatArray
    bad_debt_usd: FloatArray
    fee_usd: FloatArray
    bad_count: IntArray
    worst_usd: FloatArray


class PositionSlots(NamedTuple):
    """One slot per liquidated position (``outcomes`` with ``details``), each ``(D,)``."""

    position: IntArray
    trigger_bar: IntArray
    notional_usd: FloatArray
    liquidation_price: FloatArray
    closeout_price: FloatArray
    closeout_equity_usd: FloatArray
    premature: BoolArray


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _x_value(
    price: float, mm: float, funding_cum: float, is_long: bool
) -> float:  # pragma: no cover - jit
    """The position-independent side of the trigger test at one bar; NaN (no margin) → +inf."""
    x = price * (1.0 - mm) - funding_cum if is_long else funding_cum - price * (1.0 + mm)
    if math.isnan(x):
        return np.inf
    return x


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _threshold(
    entry_close: float, leverage: float, entry_funding_cum: float, is_long: bool
) -> float:  # pragma: no cover - jit
    """A position's trigger threshold in x-space: long ``C_e - C_e/L - D_e``, short
    ``D_e - C_e - C_e/L``; it rises with leverage on both sides.

    Plus ``TIE_TOLERANCE * C_e``: equity within ``TIE_TOLERANCE`` of notional above MM counts
    as having fallen to it. Prices are quoted in round ticks, so equity can land exactly on
    MM (a 10x long from 3388.00 with MM 1% liquidates at exactly 3080.00); floating-point
    rounding must not decide such ties.
    """
    off = entry_close / leverage
    bound: float
    if is_long:
        bound = entry_close - off - entry_funding_cum
    else:
        bound = entry_funding_cum - entry_close - off
    return bound + TIE_TOLERANCE * entry_close


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _value(
    price: FloatArray, mm: FloatArray, funding_cum: FloatArray, is_long: bool, raw: bool, t: int
) -> float:  # pragma: no cover - jit
    """``x_t`` (``raw`` False), or the signed adverse extreme ``low_t`` / ``-high_t`` (True)."""
    v: float
    if raw:
        v = price[t] if is_long else -price[t]
    else:
        v = _x_value(price[t], mm[t], funding_cum[t], is_long)
    return v


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def block_minima(
    price: FloatArray, mm: FloatArray, funding_cum: FloatArray, is_long: bool, raw: bool
) -> tuple[FloatArray, FloatArray]:  # pragma: no cover - jit
    """Minima of ``_value`` over the full blocks of 8 and of 64 bars, shapes ``(n//8,)`` and
    ``(n//64,)``: a two-level index answering range-minimum and first-passage queries in
    O(range / 64 + 16) steps."""
    n = price.shape[0]
    n8 = n // 8
    b8 = np.empty(n8)
    for i in range(n8):
        m = np.inf
        for t in range(8 * i, 8 * i + 8):
            v = _value(price, mm, funding_cum, is_long, raw, t)
            m = min(m, v)
        b8[i] = m
    n64 = n // 64
    b64 = np.empty(n64)
    for i in range(n64):
        m = np.inf
        for j in range(8 * i, 8 * i + 8):
            m = min(m, b8[j])
        b64[i] = m
    return b8, b64


class PriceBlocks(NamedTuple):
    """Per block of 8 bars, the parts of the x-space test that do not depend on the margins
    (``price_blocks``), each of shape ``(n//8,)``; NaN marks a block ``x_block_bounds`` must
    compute exactly (a price that is negative or not finite, a funding sum not finite). The
    funding arrays are empty for a series without funding: its sums are all 0."""

    low_min: FloatArray  # least low (price)
    high_max: FloatArray  # greatest high (price)
    funding_min: FloatArray  # least cumulative funding (price units)
    funding_max: FloatArray  # greatest cumulative funding (price units)


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def price_blocks(
    low: FloatArray, high: FloatArray, funding_cum: FloatArray
) -> PriceBlocks:  # pragma: no cover - jit
    """``PriceBlocks`` of one series, shapes ``(n//8,)``: computed once per series, shared by
    every margin model replayed on it. ``funding_cum`` empty: no funding (empty funding
    arrays)."""
    n8 = low.shape[0] // 8
    with_funding = funding_cum.shape[0] > 0
    low_min = np.empty(n8)
    high_max = np.empty(n8)
    funding_min = np.empty(n8 if with_funding else 0)
    funding_max = np.empty(n8 if with_funding else 0)
    for i in range(n8):
        lo = np.inf
        hi = -np.inf
        dlo = np.inf
        dhi = -np.inf
        prices_ok = True
        funding_ok = True
        for t in range(8 * i, 8 * i + 8):
            a = low[t]
            b = high[t]
            d = funding_cum[t] if with_funding else 0.0
            prices_ok = prices_ok and math.isfinite(a) and math.isfinite(b) and a >= 0.0 \
                and b >= 0.0
            funding_ok = funding_ok and math.isfinite(d)
            lo = min(lo, a)
            hi = max(hi, b)
            dlo = min(dlo, d)
            dhi = max(dhi, d)
        low_min[i] = lo if prices_ok else np.nan
        high_max[i] = hi if prices_ok else np.nan
        if with_funding:
            funding_min[i] = dlo if funding_ok else np.nan
            funding_max[i] = dhi if funding_ok else np.nan
    return PriceBlocks(low_min, high_max, funding_min, funding_max)


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def x_block_bounds(
    low: FloatArray, high: FloatArray, mm: FloatArray, funding_cum: FloatArray,
    blocks: PriceBlocks,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:  # pragma: no cover - jit
    """Lower bounds of ``x`` (``raw=False``) over the blocks of 8 and 64 bars for longs (from
    ``low``) and shorts (from ``high``) of one MM series: ``(b8_long, b64_long, b8_short,
    b64_short)``, shapes ``(n//8,)`` and ``(n//64,)``, for ``_find_first``.

    A block's bound takes the margin's extremes over the block with the prices' and
    funding's (``blocks``): ``low_min * (1 - mm_max) - funding_max`` for longs,
    ``funding_min - high_max * (1 + mm_max)`` for shorts. Every operation is monotone in its
    operands (products of non-negative factors; IEEE rounding is monotone), so the bound
    is at most every bar's ``x``; where a factor could be negative (``mm_max > 1`` for longs,
    ``mm_min < -1`` for shorts) or ``blocks`` flags the block, its exact minimum is taken.
    Only ``mm`` is read per bar, a quarter of the traffic of the exact minima of both sides
    (lows, highs, margins and funding).
    NaN margins are skipped, as ``_x_value`` makes them +inf; a block of NaN margins only
    bounds at +inf.
    """
    n = mm.shape[0]
    n8 = n // 8
    long8 = np.empty(n8)
    short8 = np.empty(n8)
    low_min = blocks.low_min
    high_max = blocks.high_max
    funding_min = blocks.funding_min
    funding_max = blocks.funding_max
    with_funding = funding_min.shape[0] > 0
    for i in range(n8):
        m_max = -np.inf
        m_min = np.inf
        for t in range(8 * i, 8 * i + 8):
            m = mm[t]
            m_max = m if m > m_max else m_max  # NaN never compares: skipped
            m_min = m if m < m_min else m_min
        if m_max < m_min:  # no margin in the block: no bar of it can trigger
            long8[i] = np.inf
            short8[i] = np.inf
            continue
        f = 1.0 - m_max
        lo = low_min[i]
        d_max = funding_max[i] if with_funding else 0.0
        if lo >= 0.0 and f >= 0.0 and d_max == d_max:  # NaN flags fail the test
            long8[i] = lo * f - d_max
        else:
            long8[i] = _exact_block(low, mm, funding_cum, True, i)
        hi = high_max[i]
        d_min = funding_min[i] if with_funding else 0.0
        if hi >= 0.0 and m_min >= -1.0 and d_min == d_min:
            short8[i] = d_min - hi * (1.0 + m_max)
        else:
            short8[i] = _exact_block(high, mm, funding_cum, False, i)
    n64 = n // 64
    long64 = np.empty(n64)
    short64 = np.empty(n64)
    for i in range(n64):
        m_long = np.inf
        m_short = np.inf
        for j in range(8 * i, 8 * i + 8):
            v = long8[j]
            w = short8[j]
            m_long = v if v < m_long else m_long
            m_short = w if w < m_short else m_short
        long64[i] = m_long
        short64[i] = m_short
    return long8, long64, short8, short64


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _exact_block(
    price: FloatArray, mm: FloatArray, funding_cum: FloatArray, is_long: bool, i: int
) -> float:  # pragma: no cover - jit
    """Minimum of ``x`` (``_x_value``) over block ``i`` of 8 bars."""
    m = np.inf
    for t in range(8 * i, 8 * i + 8):
        m = min(m, _x_value(price[t], mm[t], funding_cum[t], is_long))
    return m


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _scan(
    price: FloatArray, mm: FloatArray, funding_cum: FloatArray, is_long: bool, raw: bool,
    a: int, b: int, bound: float,
) -> int:  # pragma: no cover - jit
    """First ``t`` in ``[a, b]`` with ``_value(t) <= bound`` by plain scan, or -1."""
    for t in range(a, b + 1):
        if _value(price, mm, funding_cum, is_long, raw, t) <= bound:
            return t
    return -1


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _find_first(
    price: FloatArray, mm: FloatArray, funding_cum: FloatArray, is_long: bool, raw: bool,
    b8: FloatArray, b64: FloatArray, a: int, b: int, bound: float,
) -> int:  # pragma: no cover - jit
    """First ``t`` in ``[a, b]`` with ``_value(t) <= bound``, or -1.

    Single bars up to a multiple of 8, blocks of 8 up to a multiple of 64, blocks of 64,
    then blocks of 8 and single bars to the end; a block whose entry in ``b8`` / ``b64`` is
    ``<= bound`` is searched inside. The entries may be exact minima (such a block holds the
    answer) or lower bounds (``x_block_bounds``: it may hold none, and the search goes on
    past it); blocks skipped hold no hit either way.
    """
    if a > b:
        return -1
    head = min(b, ((a + 7) & ~7) - 1)
    hit: int = _scan(price, mm, funding_cum, is_long, raw, a, head, bound)
    if hit >= 0:
        return hit
    t = head + 1
    while (t & 63) != 0 and t + 7 <= b:
        if b8[t >> 3] <= bound:
            hit = _scan(price, mm, funding_cum, is_long, raw, t, t + 7, bound)
            if hit >= 0:
                return hit
        t += 8
    while t + 63 <= b:
        if b64[t >> 6] <= bound:
            for u in range(t, t + 64, 8):
                if b8[u >> 3] <= bound:
                    hit = _scan(price, mm, funding_cum, is_long, raw, u, u + 7, bound)
                    if hit >= 0:
                        return hit
        t += 64
    while t + 7 <= b:
        if b8[t >> 3] <= bound:
            hit = _scan(price, mm, funding_cum, is_long, raw, t, t + 7, bound)
            if hit >= 0:
                return hit
        t += 8
    return int(_scan(price, mm, funding_cum, is_long, raw, t, b, bound))


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _range_min(
    price: FloatArray, mm: FloatArray, funding_cum: FloatArray, is_long: bool, raw: bool,
    b8: FloatArray, b64: FloatArray, a: int, b: int,
) -> float:  # pragma: no cover - jit
    """Minimum of ``_value`` over ``[a, b]`` (``+inf`` if empty); same phases as
    ``_find_first``."""
    m = np.inf
    if a > b:
        return m
    head = min(b, ((a + 7) & ~7) - 1)
    for t in range(a, head + 1):
        m = min(m, _value(price, mm, funding_cum, is_long, raw, t))
    t = head + 1
    while (t & 63) != 0 and t + 7 <= b:
        m = min(m, b8[t >> 3])
        t += 8
    while t + 63 <= b:
        m = min(m, b64[t >> 6])
        t += 64
    while t + 7 <= b:
        m = min(m, b8[t >> 3])
        t += 8
    for u in range(t, b + 1):
        m = min(m, _value(price, mm, funding_cum, is_long, raw, u))
    return m


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def first_passage(
    bars: SideBars,
    mm: FloatArray,
    x_index: BlockIndex,
    entries: IntArray,
    leverage: FloatArray,
    order: IntArray,
    holding: int,
) -> IntArray:  # pragma: no cover - jit
    """First bar ``t`` in ``(e, e + holding]`` with ``x_t <= threshold``, for every query.

    Args:
        bars: the side's bars (``extreme`` without cascade; ``depth_usd`` unused).
        mm: MM rate per bar, shape ``(n,)``.
        x_index: ``x_block_bounds`` of the side (or the exact ``block_minima`` of ``x``,
            ``raw=False``: any lower bounds give the same answer, tighter ones faster).
        entries: entry bar of each query row, shape ``(R,)``.
        leverage: effective leverage of each query, shape ``(R, K)``; with the entry close and
            funding it gives the query's threshold (``_threshold``).
        order: the order in which a row's columns are visited. Along falling thresholds
            (leverage descending) the trigger bars rise, so each search resumes where the
            previous one stopped and a row costs one walk through its holding window whatever
            K; where a threshold rises the search starts over (correct in any order); an
            equal one (leverages capped at the same ``1 / IM``) takes the previous answer.
        holding: bars a position stays open at most.

    Returns:
        Trigger bar per query, shape ``(R, K)``, -1 where there is none.
    """
    is_long = bars.is_long
    price = bars.extreme
    funding_cum = bars.funding_cum
    close = bars.close
    b8 = x_index.b8
    b64 = x_index.b64
    n = price.shape[0]
    rows = leverage.shape[0]
    k = leverage.shape[1]
    trig = np.full((rows, k), -1, dtype=np.int64)
    for r in range(rows):
        e = entries[r]
        ce = close[e]
        de = funding_cum[e]
        last = min(e + holding, n - 1)
        pos = e + 1
        prev = np.inf
        found = True
        for i in range(k):
            c = order[i]
            bound = _threshold(ce, leverage[r, c], de, is_long)
            same = bound == prev and i > 0
            if bound > prev:
                pos = e + 1
                found = True
            prev = bound
            if not found:
                continue
            if same:
                # a leverage capped at 1 / IM like the column before: its search would stop
                # at once where that one did
                trig[r, c] = pos
                continue
            t = _find_first(price, mm, funding_cum, is_long, False, b8, b64, pos, last,
                                    bound)
            if t < 0:
                found = False
            else:
                trig[r, c] = t
                pos = t
    return trig


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def cascade(
    bars: SideBars,
    mm: FloatArray,
    rows: QueryRows,
    series_start: IntArray,
    weight: FloatArray,
    settings: CascadeSettings,
) -> FloatArray:  # pragma: no cover - jit
    """Liquidation cascade of one side, solved exactly in one forward pass over the bars.

    ``Q_s`` (USD, ``weight`` summed over the queries triggering at bar ``s``) moves the
    adverse extreme of bar ``s+1``: ``low * max(0, 1 - kappa Q_s / depth_s)`` for longs,
    ``high * (1 + min(1, kappa Q_s / depth_s))`` for shorts. Bar ``s+1`` depends on triggers
    at ``s`` only, so walking forward, ``Q_s`` is final when bar ``s`` is reached (triggers can
    only move earlier, and only to bars after the one being processed); each moved extreme is
    tested against every position open at that bar that has not triggered yet.

    Args:
        bars: the side's bars, ``extreme`` without cascade.
        mm: MM rate per series and bar, shape ``(M, n)``.
        rows: the query rows of every series; ``rows.trig`` holds the trigger bars without
            cascade and is updated in place.
        series_start: rows of series ``m`` are ``series_start[m] : series_start[m+1]``, each
            block ascending by entry bar.
        weight: per query row, shape ``(R,)``: the USD notional liquidated when one query of
            the row triggers.

    Returns:
        The adverse extreme per bar with the cascade's impact, shape ``(n,)``.
    """
    is_long = bars.is_long
    price = bars.extreme
    funding_cum = bars.funding_cum
    depth = bars.depth_usd
    close = bars.close
    entries = rows.entries
    leverage = rows.leverage
    trig = rows.trig
    kappa = settings.kappa
    holding = settings.holding_bars
    n = price.shape[0]
    n_series = series_start.shape[0] - 1
    k = leverage.shape[1]
    adj = price.copy()
    q = np.zeros(n)
    cnt = np.zeros(n, dtype=np.int64)
    n_rows = leverage.shape[0]
    for r in range(n_rows):
        for c in range(k):
            t = trig[r, c]
            if t >= 0:
                q[t] += weight[r]
                cnt[t] += 1
    for s in range(n - 1):
        if cnt[s] == 0:
            continue
        u = s + 1
        d = depth[s]
        move = kappa * q[s] / d if d > 0.0 else (np.inf if q[s] > 0.0 else 0.0)
        if is_long:
            adj[u] = price[u] * max(0.0, 1.0 - move)
        else:
            adj[u] = price[u] * (1.0 + min(1.0, move))
        lo_entry = u - holding
        for m in range(n_series):
            a = series_start[m]
            b = series_start[m + 1]
            if a == b:
                continue
            x = _x_value(adj[u], mm[m, u], funding_cum[u], is_long)
            # rows with lo_entry <= entry < u
            lo = a
            hi = b
            while lo < hi:
                mid = (lo + hi) >> 1
                if entries[mid] < lo_entry:
                    lo = mid + 1
                else:
                    hi = mid
            for r in range(lo, b):
                if entries[r] >= u:
                    break
                for c in range(k):
                    cur = trig[r, c]
                    if (cur < 0 or cur > u) and x <= _threshold(
                        close[entries[r]], leverage[r, c], funding_cum[entries[r]], is_long
                    ):
                        trig[r, c] = u
                        q[u] += weight[r]
                        cnt[u] += 1
                        if cur >= 0:
                            cnt[cur] -= 1
                            if cnt[cur] == 0:
                                q[cur] = 0.0
                            else:
                                q[cur] -= weight[r]
    return adj


@nb.njit(inline="always", **_JIT)  # type: ignore[untyped-decorator]
def _copy_previous(
    agg: TriggerSlots, a: int, out: PositionSlots, i: int, jn: int, position: int,
    notional_stride: int, details: bool,
) -> None:  # pragma: no cover - jit
    """Write trigger slot ``a`` (and, with ``details``, position slots ``i .. i + jn - 1``) as
    copies of the slots just before them; the positions' indices start at ``position``."""
    agg.trigger_bar[a] = agg.trigger_bar[a - 1]
    agg.premature[a] = agg.premature[a - 1]
    agg.positions[a] = agg.positions[a - 1]
    agg.notional_usd[a] = agg.notional_usd[a - 1]
    agg.bad_debt_usd[a] = agg.bad_debt_usd[a - 1]
    agg.fee_usd[a] = agg.fee_usd[a - 1]
    agg.bad_count[a] = agg.bad_count[a - 1]
    agg.worst_usd[a] = agg.worst_usd[a - 1]
    if details:
        for j in range(jn):
            src = i - jn + j
            dst = i + j
            out.position[dst] = position + j * notional_stride
            out.trigger_bar[dst] = out.trigger_bar[src]
            out.notional_usd[dst] = out.notional_usd[src]
            out.liquidation_price[dst] = out.liquidation_price[src]
            out.closeout_price[dst] = out.closeout_price[src]
            out.closeout_equity_usd[dst] = out.closeout_equity_usd[src]
            out.premature[dst] = out.premature[src]


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def outcomes(
    bars: SideBars,
    mm: FloatArray,
    extreme_index: BlockIndex,
    recovery_min: FloatArray,
    rows: QueryRows,
    positions: PositionRows,
    settings: CloseoutSettings,
    fund: FundLedger,
    agg: TriggerSlots,
    agg_start: int,
    out: PositionSlots,
    out_start: int,
    details: bool,
) -> tuple[int, int]:  # pragma: no cover - jit
    """Close-out of every triggered query of one side and MM series.

    Args:
        bars: the side's bars, ``extreme`` with the cascade's impact if any.
        mm: MM rate per bar of the rows' series, shape ``(n,)``.
        extreme_index: ``block_minima`` of the signed extreme (``raw=True``) of
            ``bars.extreme``.
        recovery_min: ``window_min(bars.extreme, is_long, recovery_bars)``, shape
            ``(n//8,)``: the premature test reads it and at most 15 bars instead of searching
            (where ``recovery_bars >= 8`` and the window ends inside the series); empty:
            always searched.
        rows: the triggered (and untriggered, ``trig < 0``) queries. A query with the trigger
            bar and leverage of the column before it (both capped at ``1 / IM``) copies that
            column's slots instead of computing them again.
        positions: the positions behind each query; they differ in slippage only (the impact
            is ``impact_coef * notional_pow / depth ** impact_exponent``: one power per
            trigger).
        settings: ``latency_bars`` from trigger ``t`` to close-out (the fill's base price is
            the worst extreme of bars ``t .. min(t + latency, n - 1)``; latency 0: bar ``t``'s
            own), or ``at_liquidation_price`` (the optimistic engine, latency 0 only), the
            premature test's ``recovery_bars``, slippage and fee.
        fund: each close-out's move of the insurance fund (``-bad debt`` or ``+fee``, times
            ``population_scale``) is added at the close-out bar ``min(t + latency, n - 1)``,
            which is flagged; skipped when ``fund.delta_usd`` is empty.
        agg: one slot per triggered query is written from ``agg_start``.
        out, details: with ``details``, one slot per position is written to ``out`` from
            ``out_start``.

    Returns:
        The next free ``agg`` and ``out`` slots.
    """
    is_long = bars.is_long
    close = bars.close
    price = bars.extreme
    funding_cum = bars.funding_cum
    depth = bars.depth_usd
    q8 = extreme_index.b8
    q64 = extreme_index.b64
    entries = rows.entries
    leverage = rows.leverage
    trig = rows.trig
    notional = positions.notional_usd
    notional_pow = positions.notional_pow
    pos_base = positions.pos_base
    col_stride = positions.col_stride
    notional_stride = positions.notional_stride
    latency = settings.latency_bars
    at_liquidation_price = settings.at_liquidation_price
    recovery = settings.recovery_bars
    spread = settings.spread_rate
    impact_coef = settings.impact_coef
    impact_exponent = settings.impact_exponent
    fee_rate = settings.fee_rate
    fund_delta = fund.delta_usd
    fund_seen = fund.seen
    scale = fund.population_scale
    n = close.shape[0]
    n_rows = trig.shape[0]
    k = trig.shape[1]
    jn = notional.shape[1]
    sign = 1.0 if is_long else -1.0
    with_fund = fund_delta.shape[0] > 0
    with_window = recovery_min.shape[0] > 0
    a = agg_start
    i = out_start
    for r in range(n_rows):
        e = entries[r]
        ce = close[e]
        fe = funding_cum[e]
        for c in range(k):
            t = trig[r, c]
            if t < 0:
                continue
            lev = leverage[r, c]
            if c > 0 and trig[r, c - 1] == t and leverage[r, c - 1] == lev:
                # Leverages capped at 1 / IM coincide (9 of the default 12 columns at IM
                # above 10%): the previous column, just written to slot a - 1, had the same
                # inputs, so its outcome is copied; the fund still gets one move per query,
                # in the same order, so its sums keep their bits.
                _copy_previous(agg, a, out, i, jn, pos_base[r] + c * col_stride,
                               notional_stride, details)
                if with_fund:
                    closeout_bar = min(t + latency, n - 1)
                    fund_delta[closeout_bar] += (agg.fee_usd[a] - agg.bad_debt_usd[a]) * scale
                    fund_seen[closeout_bar] = True
                a += 1
                if details:
                    i += jn
                continue
            off = ce / lev
            dd = funding_cum[t] - fe
            m = mm[t]
            end = min(t + recovery, n - 1)
            if is_long:
                bankrupt = ce - off + dd
                liq = bankrupt / (1.0 - m) if m < 1.0 else price[t]
            else:
                bankrupt = ce + off + dd
                liq = bankrupt / (1.0 + m)
            # premature: bankruptcy not reached in t..end, and the close back past liq. The
            # trigger bar counts: an extreme that ran through bankruptcy there made the
            # liquidation necessary, whatever the close did (domain.md §4). Reaching it within
            # TIE_TOLERANCE of the entry price counts, as for triggers.
            # The close test first: when the close did not come back past liq the search
            # for bankruptcy cannot make it premature, so it is skipped (same flag).
            premature = sign * (close[end] - liq) > 0.0
            if premature:
                reach = sign * bankrupt + TIE_TOLERANCE * ce
                if with_window and recovery >= 8 and t + recovery <= n - 1:
                    # t..end is the rest of t's block, the span of recovery_min and a tail
                    block = t >> 3
                    premature = recovery_min[block] > reach
                    u = t
                    while premature and u <= 8 * block + 7:
                        premature = sign * price[u] > reach
                        u += 1
                    u = 8 * block + recovery + 1
                    while premature and u <= end:
                        premature = sign * price[u] > reach
                        u += 1
                elif end - t < _SHORT_RANGE_BARS:
                    for u in range(t, end + 1):
                        if sign * price[u] <= reach:
                            premature = False
                            break
                else:
                    premature = _find_first(
                        price, mm, funding_cum, is_long, True, q8, q64, t, end, reach
                    ) < 0
            # The close-out window is bars t .. t + latency, the trigger bar included: the
            # engine takes the position over during bar t, so the fill can be no better than
            # the worst price from there to the close-out (domain.md §4; latency 0: bar t's
            # adverse extreme, which may lie far beyond the liquidation price on a gap).
            if at_liquidation_price:
                base = liq
            elif latency < _SHORT_RANGE_BARS:
                last_bar = min(t + latency, n - 1)
                extreme = sign * price[t]  # the signed extreme, as in the index
                for u in range(t + 1, last_bar + 1):
                    v = sign * price[u]
                    extreme = v if v < extreme else extreme
                base = sign * extreme
            else:
                base = sign * _range_min(
                    price, mm, funding_cum, is_long, True, q8, q64, t, min(t + latency, n - 1)
                )
            d = depth[t]
            depth_pow = 0.0
            if impact_coef > 0.0 and d > 0.0:
                depth_pow = math.sqrt(d) if impact_exponent == 0.5 else d**impact_exponent
            inv_ce = 1.0 / ce
            inv_lev = 1.0 / lev
            notional_sum = 0.0
            bad_sum = 0.0
            fee_sum = 0.0
            bad_count = 0
            worst = 0.0
            for j in range(jn):
                notional_usd = notional[r, j]
                slip = spread
                if impact_coef > 0.0:
                    if d > 0.0:
                        slip += impact_coef * notional_pow[r, j] / depth_pow
                    else:
                        slip = np.inf
                slip = min(slip, 1.0)
                qty = notional_usd * inv_ce
                collateral = notional_usd * inv_lev
                pc = base * (1.0 - sign * slip)
                equity = collateral + sign * qty * (pc - ce) - sign * qty * dd
                if abs(equity) <= TIE_TOLERANCE * notional_usd:
                    equity = 0.0  # rounding noise around bankruptcy is not bad debt
                notional_sum += notional_usd
                if equity < 0.0:
                    bad_sum -= equity
                    bad_count += 1
                    worst = max(worst, -equity)
                else:
                    fee_sum += min(fee_rate * notional_usd, equity)
                if details:
                    out.position[i] = pos_base[r] + c * col_stride + j * notional_stride
                    out.trigger_bar[i] = t
                    out.notional_usd[i] = notional_usd
                    out.liquidation_price[i] = liq
                    out.closeout_price[i] = pc
                    out.closeout_equity_usd[i] = equity
                    out.premature[i] = premature
                    i += 1
            agg.trigger_bar[a] = t
            agg.premature[a] = premature
            agg.positions[a] = jn
            agg.notional_usd[a] = notional_sum
            agg.bad_debt_usd[a] = bad_sum
            agg.fee_usd[a] = fee_sum
            agg.bad_count[a] = bad_count
            agg.worst_usd[a] = worst
            a += 1
            if with_fund:
                closeout_bar = min(t + latency, n - 1)
                fund_delta[closeout_bar] += (fee_sum - bad_sum) * scale
                fund_seen[closeout_bar] = True
    return a, i


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def window_min(
    price: FloatArray, is_long: bool, window: int
) -> FloatArray:  # pragma: no cover - jit
    """Per block ``i`` of 8 bars, the least signed extreme (``low`` for longs, ``-high`` for
    shorts) over bars ``8i + 8 .. min(8i + window, n - 1)``, shape ``(n//8,)`` (+inf where
    that is empty, and everywhere for ``window < 8``).

    A window ``t .. t + window`` from a bar of block ``i`` is that span, the rest of block
    ``i`` from ``t`` and the ``t & 7`` bars after ``8i + window``: the premature test
    (``outcomes``) reads one value and at most 15 bars instead of searching. One value per
    block, not per bar: an eighth of the memory. Minima are exact; prices must not be NaN.

    With ``q = window // 8`` the span is blocks ``i + 1 .. i + q - 1`` whole and the first
    ``r = window - 8q + 1`` bars of block ``i + q``; so it is the minimum of a sliding
    minimum over ``q - 1`` block minima (van Herk / Gil-Werman: a prefix and a suffix pass
    per run of ``q - 1`` blocks, two comparisons a block whatever the window) and the
    ``r``-bar head of block ``i + q``. Every pass is a straight loop over an array, ~1 ns a
    bar; the ring of candidate bars this replaced spent 12 ns a bar in mispredicted
    branches, most of a cold backtest's extra time. The last blocks, whose span is cut at
    ``n - 1``, take a suffix minimum of the bars.
    """
    n = price.shape[0]
    n8 = n // 8
    out = np.full(n8, np.inf)
    if window < 8 or n8 == 0:
        return out
    sign = 1.0 if is_long else -1.0
    q = window // 8
    r = window - 8 * q + 1
    blocks = (n + 7) // 8
    block_min = np.full(blocks, np.inf)
    head_min = np.full(blocks, np.inf)
    for j in range(blocks):
        base = 8 * j
        if base + r > n:  # a last, partial block without a head (its minimum is not read)
            break
        m = sign * price[base]
        for k in range(1, r):
            v = sign * price[base + k]
            m = v if v < m else m
        head_min[j] = m
        if base + 8 <= n:
            for k in range(r, 8):
                v = sign * price[base + k]
                m = v if v < m else m
            block_min[j] = m
    # Blocks i whose span ends inside the series: 8i + window <= n - 1.
    full = min(n8, (n - 1 - window) // 8 + 1) if n - 1 >= window else 0
    span = q - 1  # whole blocks in a span
    if span == 0:
        for i in range(full):
            out[i] = head_min[i + q]
    else:
        # vHGW over block_min[1 .. full - 1 + span]: runs of `span` blocks from block 1.
        last = full - 1 + span  # the last block a full span reads
        prefix = np.empty(last + 1)
        suffix = np.empty(last + 1)
        for a in range(1, last + 1, span):
            b = min(a + span, last + 1)
            m = np.inf
            for j in range(a, b):
                v = block_min[j]
                m = v if v < m else m
                prefix[j] = m
            m = np.inf
            for j in range(b - 1, a - 1, -1):
                v = block_min[j]
                m = v if v < m else m
                suffix[j] = m
        for i in range(full):
            lo = i + 1
            hi = i + span
            # lo .. end of its run, and start of the next run .. hi; when lo starts a run
            # both are that run, whose minimum either gives.
            a = suffix[lo]
            b = prefix[hi]
            m = a if a < b else b
            h = head_min[i + q]
            out[i] = h if h < m else m
    # The rest: spans cut at the series' end, the least of bars 8i + 8 .. n - 1.
    m = np.inf
    t = n - 1
    for i in range(n8 - 1, full - 1, -1):
        start = 8 * i + 8
        while t >= start:
            v = sign * price[t]
            m = v if v < m else m
            t -= 1
        if start <= n - 1:  # else the span is empty: +inf
            out[i] = m
    return out


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def fund_levels(
    fund_delta: FloatArray, fund_seen: BoolArray, start_usd: float
) -> tuple[IntArray, FloatArray]:  # pragma: no cover - jit
    """Insurance fund level after each bar with a close-out: ``(bars, levels)``, ascending.

    ``fund_delta[b]`` is the net move of all close-outs settling at bar ``b`` (flagged in
    ``fund_seen``); they settle together.
    """
    n = fund_delta.shape[0]
    count = 0
    for b in range(n):
        if fund_seen[b]:
            count += 1
    bars = np.empty(count, dtype=np.int64)
    levels = np.empty(count)
    level = start_usd
    j = 0
    for b in range(n):
        if fund_seen[b]:
            level += fund_delta[b]
            bars[j] = b
            levels[j] = level
            j += 1
    return bars, levels


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def fund_from_slots(
    closeout_bar: IntArray, order: IntArray, fee_usd: FloatArray, bad_debt_usd: FloatArray,
    population_scale: float, start_usd: float,
) -> tuple[IntArray, FloatArray, FloatArray]:  # pragma: no cover - jit
    """``fund_levels`` from the trigger slots instead of a per-bar ledger: ``(bars, levels,
    deltas)`` with ``deltas`` the net move at each of ``bars``.

    ``order`` is a stable sort of the slots by ``closeout_bar``: within a bar the moves are
    added in slot order starting from 0, as ``outcomes`` adds them to ``FundLedger``, so the
    sums are the ledger's to the bit.
    """
    s = order.shape[0]
    count = 0
    prev = -1
    for i in range(s):
        b = closeout_bar[order[i]]
        if b != prev:
            count += 1
            prev = b
    bars = np.empty(count, dtype=np.int64)
    deltas = np.empty(count)
    levels = np.empty(count)
    j = -1
    prev = -1
    for i in range(s):
        a = order[i]
        b = closeout_bar[a]
        if b != prev:
            j += 1
            bars[j] = b
            deltas[j] = 0.0
            prev = b
        deltas[j] += (fee_usd[a] - bad_debt_usd[a]) * population_scale
    level = start_usd
    for k in range(count):
        level += deltas[k]
        levels[k] = level
    return bars, levels, deltas


@nb.njit(**_JIT)  # type: ignore[untyped-decorator]
def trailing_mean(
    x: FloatArray, window: int, factor: float
) -> FloatArray:  # pragma: no cover - jit
    """``factor`` × mean of ``x[max(0, t-window+1) .. t]`` per bar. The running sum restarts
    from scratch every ``window`` bars, so rounding cannot drift."""
    n = x.shape[0]
    out = np.empty(n)
    s = 0.0
    for t in range(min(window, n)):
        s += x[t]
        out[t] = s * factor / (t + 1)
    f = factor / window
    for block in range(window, n, window):
        s = 0.0
        for i in range(block - window + 1, block + 1):
            s += x[i]
        out[block] = s * f
        for t in range(block + 1, min(block + window, n)):
            s += x[t] - x[t - window]
            out[t] = s * f
    return out
