"""Plain-Python references for the margin models (domain.md §2), written from the spec.

Slow on purpose: simple loops over Python floats, ``math`` and ``statistics`` only, nothing
shared with ``calibration`` (no numba, no numpy, no scipy), so a test comparing the engine with
these compares two independent derivations of the same definitions.

Every function takes plain sequences and returns a list with one float per bar (``nan`` where
the model produces no margin). Rates are fractions of notional.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

NAN = float("nan")


def log_returns(close: Sequence[float]) -> list[float]:
    """``r_t = ln(C_t / C_{t-1})`` per bar; element 0 is NaN (no previous close)."""
    out = [NAN]
    for t in range(1, len(close)):
        out.append(math.log(close[t] / close[t - 1]))
    return out


def ewma_variance(close: Sequence[float], decay: float, warmup_bars: int) -> list[float]:
    """EWMA variance of one-bar log returns per bar, NaN before bar ``warmup_bars``.

    At bar W = ``warmup_bars`` the sample variance (ddof=1) of r_1 .. r_W; after it
    ``var_t = decay * var_{t-1} + (1 - decay) * r_t**2``.
    """
    n = len(close)
    r = log_returns(close)
    out = [NAN] * n
    w = warmup_bars
    if w < 2 or w >= n:
        return out
    seed = r[1 : w + 1]
    mean = sum(seed) / w
    var = sum((x - mean) ** 2 for x in seed) / (w - 1)
    out[w] = var
    for t in range(w + 1, n):
        var = decay * var + (1.0 - decay) * r[t] ** 2
        out[t] = var
    return out


def ewma_rate(
    close: Sequence[float],
    *,
    decay: float,
    confidence: float,
    horizon_bars: int,
    floor_rate: float,
    apc_buffer: float,
    warmup_bars: int,
    max_rate: float = 1.0,
) -> list[float]:
    """``max(floor_rate, z_q * sigma_t * sqrt(horizon_bars)) * (1 + apc_buffer)`` per bar,
    then at most ``max_rate``."""
    z = NormalDist().inv_cdf(confidence)
    out = []
    for var in ewma_variance(close, decay, warmup_bars):
        if math.isnan(var):
            out.append(NAN)
        else:
            out.append(min(max_rate, max(floor_rate, z * math.sqrt(var)
                                         * math.sqrt(horizon_bars)) * (1.0 + apc_buffer)))
    return out


def fhs_tail_count(window_bars: int, confidence: float) -> int:
    """Samples in the tail: ``ceil(window_bars * (1 - confidence))``, at least one.

    The product is rounded to 9 decimals first so that 100 * (1 - 0.99) counts 1, not 2.
    """
    return max(1, math.ceil(round(window_bars * (1.0 - confidence), 9)))


def fhs_rate(
    close: Sequence[float],
    *,
    window_bars: int,
    confidence: float,
    decay: float,
    horizon_bars: int,
    stress_weight: float,
    floor_rate: float,
    warmup_bars: int,
    measure: str = "es",
    max_rate: float = 1.0,
    stress_lookback_bars: int | None = None,
) -> list[float]:
    """Filtered historical simulation MM rate per bar, as the ``FhsMargin`` docstring defines it.

    Samples: ``z_s = ln(C_s / C_{s-h}) / sigma_{s-h}`` for the last ``window_bars`` bars s up
    to t, with ``s - h >= warmup_bars`` (a filtering volatility must exist). At bar t each is
    rescaled by ``sigma_t``: long loss ``1 - exp(sigma_t z)``, short loss ``exp(sigma_t z) - 1``.
    Per side the ES (mean of the k worst losses) or VaR (the k-th worst); the larger side is
    the current rate. Then ``(1 - w) current + w * stressed`` with ``stressed`` the largest
    current rate of the last ``stress_lookback_bars`` bars up to t (all so far when None),
    then the floor, then at most ``max_rate``.
    """
    n = len(close)
    h = horizon_bars
    var = ewma_variance(close, decay, warmup_bars)
    k = fhs_tail_count(window_bars, confidence)
    current = [NAN] * n
    for t in range(n):
        first_s = t - window_bars + 1
        if first_s - h < warmup_bars:
            continue  # the window is not full of samples yet
        sigma_t = math.sqrt(var[t])
        samples = sorted(
            math.log(close[s] / close[s - h]) / math.sqrt(var[s - h])
            for s in range(first_s, t + 1)
        )
        long_losses = sorted((1.0 - math.exp(sigma_t * z) for z in samples), reverse=True)
        short_losses = sorted((math.exp(sigma_t * z) - 1.0 for z in samples), reverse=True)
        if measure == "es":
            long_risk = sum(long_losses[:k]) / k
            short_risk = sum(short_losses[:k]) / k
        else:
            long_risk = long_losses[k - 1]
            short_risk = short_losses[k - 1]
        current[t] = max(long_risk, short_risk)
    out = [NAN] * n
    lookback = n if stress_lookback_bars is None else stress_lookback_bars
    for t in range(n):
        if math.isnan(current[t]):
            continue
        recent = [c for c in current[max(0, t - lookback + 1) : t + 1] if not math.isnan(c)]
        stressed = max(recent)
        blended = (1.0 - stress_weight) * current[t] + stress_weight * stressed
        out[t] = min(max_rate, max(floor_rate, blended))
    return out


def tier_mmrs(
    n_brackets: int,
    *,
    base_mmr: float,
    tier_growth: float,
    im_to_mm: float,
    mmr_schedule: Sequence[float] | None = None,
) -> list[float]:
    """MMR of each of ``n_brackets`` brackets: the schedule (its last rate repeated), or
    ``base_mmr * tier_growth**k`` capped at ``1 / im_to_mm`` so IM stays ≤ 100%."""
    if mmr_schedule is not None:
        rates = list(mmr_schedule)
        while len(rates) < n_brackets:
            rates.append(rates[-1])
        return rates
    return [min(base_mmr * tier_growth**k, 1.0 / im_to_mm) for k in range(n_brackets)]


def tiered_maintenance_usd(
    notional_usd: float, caps_usd: Sequence[float], mmrs: Sequence[float]
) -> float:
    """Maintenance margin (USD) as the sum over brackets of the notional slice in each times
    its MMR — the marginal-rate formulation, with no deduction table.

    ``caps_usd`` are the upper bounds of all brackets but the last (open-ended); ``mmrs`` has
    one rate per bracket (``len(caps_usd) + 1``).
    """
    total = 0.0
    lower = 0.0
    for k, mmr in enumerate(mmrs):
        upper = caps_usd[k] if k < len(caps_usd) else math.inf
        if notional_usd <= lower:
            break
        total += (min(notional_usd, upper) - lower) * mmr
        lower = upper
    return total


def tier_index(notional_usd: float, caps_usd: Sequence[float]) -> int:
    """The bracket of ``notional_usd``: the first k with ``notional_usd < caps_usd[k]``
    (brackets are [floor, cap): a notional at a cap is in the next one)."""
    for k, cap in enumerate(caps_usd):
        if notional_usd < cap:
            return k
    return len(caps_usd)
