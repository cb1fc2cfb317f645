"""Initial margin tiers for a new listing (domain.md §6).

An instrument with less history than the look-back borrows it from proxies: each proxy's
h-bar returns are rescaled by the volatility ratio own/proxy measured over their overlap, the
expected shortfall at ``confidence`` of the rescaled losses (both sides) gives a rate per proxy,
the own history (when long enough) gives one more, and the most conservative is taken. A
novelty buffer (EMIR art. 25(3): conservative for new products) multiplies it and decays
with a half-life as own history accumulates:
``novelty = 1 + novelty_buffer * 0.5 ** (own_days / novelty_halflife_days)``. The result is
the first bracket's MMR; brackets grow by ``tier_growth`` (capped so IM ≤ 100%), IM is
``im_to_mm`` times MMR, max leverage ``1 / IM``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calibration._bars import BarSeries, FloatArray
from calibration._errors import InsufficientData, InvalidParameters
from calibration.horizon import resolve_horizon
from calibration.models import BINANCE_BTCUSDT_2021_CAPS_USD, TieredMargin


@dataclass(frozen=True)
class ListingConfig:
    """How initial tiers are derived.

    Attributes:
        horizon_bars: close-out horizon h, bars of the input series.
        horizon: the same as a duration (``"1h"``), converted with the series' bar size; set
            one of the two (or both alike); neither: ``horizon.DEFAULT_HORIZON`` (1h).
        confidence: ES level q.
        lookback_bars: proxy history used (the most recent bars), ``None`` = all.
        min_overlap_bars: own bars overlapping a proxy needed to measure the vol ratio;
            with fewer the ratio is 1 and only the novelty buffer guards.
        min_own_bars: own bars needed to estimate an own ES at all.
        floor_rate: lowest first-bracket MMR.
        novelty_buffer: extra fraction with no own history (0.5 = +50%).
        novelty_halflife_days: own history after which the buffer has halved, days.
        tier_growth: MMR ratio between consecutive brackets.
        bracket_caps_usd: bracket caps (USD) of the target tier structure.
        im_to_mm: IM / MM per bracket.
    """

    horizon_bars: int | None = None
    horizon: str | None = None
    confidence: float = 0.99
    lookback_bars: int | None = None
    min_overlap_bars: int = 48
    min_own_bars: int = 200
    floor_rate: float = 0.005
    novelty_buffer: float = 0.5
    novelty_halflife_days: float = 30.0
    tier_growth: float = 2.0
    bracket_caps_usd: tuple[float, ...] = BINANCE_BTCUSDT_2021_CAPS_USD
    im_to_mm: float = 2.0

    def validate(self) -> None:
        """Raise ``InvalidParameters`` naming the first setting out of range."""
        checks = [
            ("horizon_bars", self.horizon_bars is None or self.horizon_bars >= 1),
            ("confidence", 0.5 < self.confidence < 1),
            ("min_overlap_bars", self.min_overlap_bars >= 2),
            ("min_own_bars", self.min_own_bars >= 2),
            ("floor_rate", 0 <= self.floor_rate < 1),
            ("novelty_buffer", self.novelty_buffer >= 0),
            ("novelty_halflife_days", self.novelty_halflife_days > 0),
            ("tier_growth", self.tier_growth >= 1),
            ("im_to_mm", self.im_to_mm >= 1),
            ("lookback_bars", self.lookback_bars is None or self.lookback_bars > 1),
        ]
        for name, ok in checks:
            if not ok:
                raise InvalidParameters(f"listing setting {name} is out of range", field=name)


@dataclass(frozen=True)
class ProxyEvidence:
    """What one proxy says about the new instrument.

    Attributes:
        instrument: the proxy.
        vol_ratio: own / proxy volatility over the overlap (1 when it cannot be measured).
        overlap_bars: bars both series have.
        es_rate: ES of the proxy's rescaled h-bar losses, fraction of notional.
        observations: h-bar windows used.
    """

    instrument: str
    vol_ratio: float
    overlap_bars: int
    es_rate: float
    observations: int


@dataclass(frozen=True)
class Tier:
    """One bracket of the recommended structure."""

    cap_usd: float
    mmr: float
    imr: float
    max_leverage: float
    maintenance_amount_usd: float


@dataclass(frozen=True)
class ListingRecommendation:
    """Initial tiers and the evidence behind them; ``horizon_bars`` is the close-out horizon
    the ES was taken over, in bars of the input series, ``horizon`` the duration."""

    instrument: str
    base_rate: float
    novelty_factor: float
    own_days: float
    own_es_rate: float | None
    binding: str
    proxies: list[ProxyEvidence]
    tiers: list[Tier]
    params: dict[str, Any] = field(default_factory=dict)
    horizon_bars: int = 0
    horizon: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "instrument": self.instrument, "base_rate": self.base_rate,
            "novelty_factor": self.novelty_factor, "own_days": self.own_days,
            "own_es_rate": self.own_es_rate, "binding": self.binding,
            "proxies": [p.__dict__ for p in self.proxies],
            "tiers": [t.__dict__ for t in self.tiers], "params": self.params,
            "horizon_bars": self.horizon_bars, "horizon": self.horizon,
        }


def _h_returns(close: FloatArray, h: int) -> FloatArray:
    logc = np.log(close)
    out: FloatArray = logc[h:] - logc[:-h]
    return out


def _es_both_sides(h_returns: FloatArray, confidence: float) -> float:
    """Larger of the long and short sides' ES of simple losses, fraction of notional."""
    n = h_returns.shape[0]
    k = max(1, math.ceil(n * (1 - confidence) - 1e-9))
    ordered = np.sort(h_returns)
    long_es = float(np.mean(1 - np.exp(ordered[:k])))
    short_es = float(np.mean(np.exp(ordered[-k:]) - 1))
    return max(long_es, short_es)


def _vol(series: BarSeries, mask: np.ndarray | None = None) -> float:
    r = series.log_returns()[1:]
    if mask is not None:
        r = r[mask[1:]]
    return float(np.std(r, ddof=1)) if r.shape[0] > 1 else float("nan")


def recommend_listing(
    instrument: str,
    own: BarSeries | None,
    proxies: Sequence[BarSeries],
    config: ListingConfig | None = None,
) -> ListingRecommendation:
    """Initial tiers for ``instrument`` from its own (short) history and proxies.

    Raises:
        InvalidParameters: no proxies, bar sizes that differ, a bad setting.
        InsufficientData: a proxy shorter than the horizon.
    """
    config = config or ListingConfig()
    config.validate()
    if not proxies:
        raise InvalidParameters("a listing needs at least one proxy", field="proxies")
    sizes = {p.bar_seconds for p in proxies} | ({own.bar_seconds} if own is not None else set())
    if len(sizes) > 1:
        raise InvalidParameters(f"proxies and own history must share one bar size, got "
                                f"{sorted(sizes)} s; resample first", field="proxies")
    close_out = resolve_horizon({"horizon_bars": config.horizon_bars,
                                 "horizon": config.horizon}, sizes.pop())
    h = close_out.bars
    if config.lookback_bars is not None and config.lookback_bars <= h:
        raise InvalidParameters(f"lookback_bars must exceed the horizon of {h} bars",
                                field="lookback_bars")
    evidence = []
    for proxy in proxies:
        bars = proxy
        if config.lookback_bars is not None and len(proxy) > config.lookback_bars:
            keep = np.zeros(len(proxy), dtype=bool)
            keep[-config.lookback_bars:] = True
            from calibration.data import _subset

            bars = _subset(proxy, keep)
        if len(bars) <= h + 1:
            raise InsufficientData(f"proxy {proxy.instrument} has {len(bars)} bars; the "
                                   f"horizon needs more than {h + 1}")
        ratio, overlap = 1.0, 0
        if own is not None:
            common = np.intersect1d(own.timestamp_ms, proxy.timestamp_ms)
            overlap = int(common.shape[0])
            if overlap >= config.min_overlap_bars:
                own_vol = _vol(own, np.isin(own.timestamp_ms, common))
                proxy_vol = _vol(proxy, np.isin(proxy.timestamp_ms, common))
                if proxy_vol > 0 and math.isfinite(own_vol):
                    ratio = own_vol / proxy_vol
        returns = _h_returns(bars.close, h) * ratio
        evidence.append(ProxyEvidence(proxy.instrument, ratio, overlap,
                                      _es_both_sides(returns, config.confidence),
                                      int(returns.shape[0])))
    own_es = None
    own_days = 0.0
    if own is not None:
        own_days = len(own) * own.bar_seconds / 86_400
        if len(own) >= max(config.min_own_bars, h + 2):
            own_es = _es_both_sides(_h_returns(own.close, h), config.confidence)
    candidates = {f"proxy:{e.instrument}": e.es_rate for e in evidence}
    if own_es is not None:
        candidates["own"] = own_es
    binding = max(candidates, key=lambda k: candidates[k])
    base = candidates[binding]
    novelty = 1 + config.novelty_buffer * 0.5 ** (own_days / config.novelty_halflife_days)
    mmr0 = min(max(config.floor_rate, base * novelty), 1 / config.im_to_mm)
    if mmr0 == config.floor_rate:
        binding = "floor_rate"
    model = TieredMargin(base_mmr=mmr0, tier_growth=config.tier_growth,
                         bracket_caps_usd=config.bracket_caps_usd, im_to_mm=config.im_to_mm)
    model.validate()
    caps, mmr, deduction = model.brackets()
    tiers = [Tier(cap_usd=float(c), mmr=float(m), imr=float(m * config.im_to_mm),
                  max_leverage=float(1 / (m * config.im_to_mm)),
                  maintenance_amount_usd=float(d)) for c, m, d in zip(caps, mmr, deduction,
                                                                       strict=True)]
    return ListingRecommendation(
        instrument=instrument, base_rate=base, novelty_factor=novelty, own_days=own_days,
        own_es_rate=own_es, binding=binding, proxies=evidence, tiers=tiers,
        params={"base_mmr": mmr0, "tier_growth": config.tier_growth,
                "bracket_caps_usd": list(config.bracket_caps_usd),
                "im_to_mm": config.im_to_mm},
        horizon_bars=h, horizon=close_out.duration,
    )
