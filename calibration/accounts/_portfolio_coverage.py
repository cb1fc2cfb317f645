"""Portfolio coverage backtest (domain.md §8): §3's statistics on an account's h-bar loss
against its portfolio requirement, with breach attribution.

A reference book holds constant USD exposures (rebalanced at every observation, as a CCP's
reference portfolio): ``notional_usd`` per instrument (signed) and ``collateral_usd`` per
asset (non-stable collateral carries the price risk of the instrument that prices it). At
each observation bar t (after the model's warm-up, with h bars after it; every ``step_bars``
bars: overlapping when 1):

- requirement ``M_t``: the model's IM (or MM) of the exposures at t (bars up to t only);
- loss ``L_t = -Σ_i x_i r_i`` with ``r_i = C_{i,t+h} / C_{i,t} - 1`` (``loss_prices="close"``,
  the joint realised move) or, with ``"adverse"``, each asset at its worst price over
  t+1..t+h for the book's net side (min low net long, max high net short; the engine's
  conservative reading, since the extremes of different instruments need not coincide);
- breach when ``L_t > M_t``; uncovered loss ``max(0, L_t - M_t)``.

Statistics (``calibration.stats``) with ``p = 1 - confidence``: Kupiec POF (two-sided and
one-sided p-values), Christoffersen independence and conditional coverage, the Basel traffic
light. Breach attribution: for each breach, every held instrument whose realised move lies
outside the range the model's standard scenarios span at t (``scenario_envelope``), with its
direction (``down`` below the lowest scenario move, ``up`` above the highest); a breach with
no such instrument is ``joint`` (every move within its range; their combination, or an
offset credit, was not covered).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from calibration._errors import InsufficientData, InvalidParameters
from calibration.accounts._market import STABLE_ASSETS, Market
from calibration.models._portfolio import PortfolioMarginModel
from calibration.stats import (
    chi2_pvalue,
    christoffersen_lr,
    kupiec_lr,
    kupiec_pvalue_one_sided,
    traffic_light,
    transitions,
)

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class PortfolioBook:
    """A reference book of constant USD exposures.

    Attributes:
        name: shown in reports (``long_btc_short_eth``, ...).
        notional_usd: instrument → signed USD notional (> 0 long).
        collateral_usd: asset → USD value of collateral held in it.
    """

    name: str
    notional_usd: Mapping[str, float]
    collateral_usd: Mapping[str, float] = field(default_factory=dict)

    def exposure_usd(self, market: Market) -> FloatArray:
        """USD exposure per instrument, collateral folded into its pricing instrument, (k,)."""
        names = market.instruments
        x = np.zeros(len(names))
        for name, value in self.notional_usd.items():
            if name not in names:
                raise InvalidParameters(f"book {self.name!r}: instrument {name!r} is not in the "
                                        f"market ({', '.join(names)})", field="book.notional_usd")
            x[names.index(name)] += float(value)
        for asset, value in self.collateral_usd.items():
            if asset.upper() not in STABLE_ASSETS:
                x[market.pricing_instrument(asset)] += float(value)
        return x


def long_short_book(long: str, short: str, notional_usd: float = 1e6) -> PortfolioBook:
    """Long ``long`` and short ``short``, ``notional_usd`` each (e.g. long BTC / short ETH)."""
    return PortfolioBook(name=f"long_{long}_short_{short}",
                         notional_usd={long: notional_usd, short: -notional_usd})


def basket_book(instruments: tuple[str, ...] | list[str],
                notional_usd: float = 1e6) -> PortfolioBook:
    """Long every instrument, equal weight, ``notional_usd`` in total."""
    return PortfolioBook(name=f"basket_{len(instruments)}",
                         notional_usd={i: notional_usd / len(instruments) for i in instruments})


def carry_book(spot: str, perp: str, notional_usd: float = 1e6, *,
               collateral_asset: str = "BTC",
               collateral_usd: float = 2e5) -> PortfolioBook:
    """Long ``spot``, short ``perp`` of equal notional, collateral in ``collateral_asset``."""
    return PortfolioBook(name=f"carry_{spot}_{perp}",
                         notional_usd={spot: notional_usd, perp: -notional_usd},
                         collateral_usd={collateral_asset: collateral_usd})


@dataclass(frozen=True)
class BreachAttribution:
    """One breach: ``time_ms`` its observation bar's open time, ``loss_usd`` and
    ``requirement_usd``, and ``unspanned``: (instrument, ``down``/``up``, realised simple
    return, the scenario bound it passed) per instrument, empty for a ``joint`` breach."""

    bar: int
    time_ms: int
    loss_usd: float
    requirement_usd: float
    unspanned: tuple[tuple[str, str, float, float], ...]

    @property
    def kind(self) -> str:
        """``unspanned`` when some instrument moved beyond every scenario, else ``joint``."""
        return "unspanned" if self.unspanned else "joint"


@dataclass(frozen=True)
class PortfolioCoverage:
    """The coverage of one book under one model (field names as domain.md §3).

    Attributes:
        observation_bars: the observation bars, shape ``(n_obs,)``.
        loss_usd, requirement_usd: per observation, USD, ``(n_obs,)``.
        breach: per observation, ``(n_obs,)``.
        attribution: one entry per breach, in time order.
    """

    book: str
    model: str
    horizon_bars: int
    step_bars: int
    confidence: float
    requirement: str
    loss_prices: str
    observations: int
    breaches: int
    breach_rate: float
    kupiec_lr: float
    kupiec_pvalue: float
    kupiec_pvalue_one_sided: float
    christoffersen_lr: float
    conditional_coverage_lr: float
    traffic_light: str
    mean_requirement_usd: float
    max_uncovered_loss_usd: float
    observation_bars: NDArray[np.int64]
    loss_usd: FloatArray
    requirement_usd: FloatArray
    breach: NDArray[np.bool_]
    attribution: tuple[BreachAttribution, ...]

    def unspanned_counts(self) -> dict[tuple[str, str], int]:
        """Breaches per (instrument, direction) no scenario spanned; ``("joint", "")`` for
        breaches with every move inside its range."""
        out: dict[tuple[str, str], int] = {}
        for a in self.attribution:
            keys = [(u[0], u[1]) for u in a.unspanned] or [("joint", "")]
            for key in keys:
                out[key] = out.get(key, 0) + 1
        return out


def portfolio_coverage(
    market: Market,
    model: PortfolioMarginModel,
    book: PortfolioBook,
    *,
    horizon_bars: int | None = None,
    confidence: float | None = None,
    step_bars: int = 1,
    requirement: str = "im",
    loss_prices: str = "close",
) -> PortfolioCoverage:
    """Backtest ``book``'s h-bar losses against ``model``'s requirement (module docstring).

    Args:
        horizon_bars: h, bars; ``None``: the model's (its default duration when unset). A
            model with a different horizon is refused: one horizon sizes both.
        confidence: the coverage level tested; ``None``: the model's (``grid`` has none:
            then 0.99).
        step_bars: bars between observations (1: overlapping; h: non-overlapping).
        requirement: ``im`` or ``mm``.
        loss_prices: ``close`` or ``adverse``.

    Raises:
        InvalidParameters: a setting out of range, naming it.
        InsufficientData: no observation after the warm-up.
    """
    if requirement not in ("im", "mm"):
        raise InvalidParameters(f"requirement must be 'im' or 'mm', got {requirement!r}",
                                field="requirement")
    if loss_prices not in ("close", "adverse"):
        raise InvalidParameters(f"loss_prices must be 'close' or 'adverse', got "
                                f"{loss_prices!r}", field="loss_prices")
    if isinstance(step_bars, bool) or not isinstance(step_bars, int) or step_bars < 1:
        raise InvalidParameters(f"step_bars must be a whole number >= 1, got {step_bars!r}",
                                field="step_bars")
    h = horizon_bars if horizon_bars is not None else model._horizon_on(market.bar_seconds)
    if isinstance(h, bool) or not isinstance(h, int) or h < 1:
        raise InvalidParameters(f"horizon_bars must be a whole number >= 1, got {h!r}",
                                field="horizon_bars")
    if model.horizon not in (None, h):
        raise InvalidParameters(f"the model's horizon_bars ({model.horizon}) differs from the "
                                f"test's ({h})", field="horizon_bars")
    model = model.with_horizon(h)
    q = confidence if confidence is not None else (model.coverage_level or 0.99)
    if not isinstance(q, int | float) or not 0.5 < q < 1:
        raise InvalidParameters(f"confidence must be in (0.5, 1), got {q!r}",
                                field="confidence")
    n = len(market)
    x = book.exposure_usd(market)
    req = model.requirement_from_exposure(market, np.repeat(x[:, None], n, axis=1))
    series = req.im_usd if requirement == "im" else req.mm_usd
    obs = np.arange(req.first_valid_bar, n - h, step_bars, dtype=np.int64)
    if obs.size == 0:
        raise InsufficientData(f"no observation: the model's first requirement is at bar "
                               f"{req.first_valid_bar} and the market has {n} bars "
                               f"(horizon {h})")
    close = market.matrix("close")
    moves = close[:, obs + h] / close[:, obs] - 1.0  # (k, n_obs)
    if loss_prices == "adverse":
        low, high = market.matrix("low"), market.matrix("high")
        unders = market.underlyings()
        net = {u: 0.0 for u in unders}
        for i, u in enumerate(unders):
            net[u] += x[i]
        for i, u in enumerate(unders):
            window = np.arange(1, h + 1)[:, None] + obs[None, :]  # (h, n_obs)
            worst = (low[i][window].min(axis=0) if net[u] >= 0
                     else high[i][window].max(axis=0))
            moves[i] = worst / close[i, obs] - 1.0
    loss = -(x[:, None] * moves).sum(axis=0)
    m = series[obs]
    breach = loss > m
    lo, hi = model.scenario_envelope(market)
    names = market.instruments
    attribution = []
    for j in np.flatnonzero(breach):
        t = int(obs[j])
        unspanned = []
        for i in range(len(names)):
            if x[i] == 0.0:
                continue
            r = float(moves[i, j])
            if r < lo[i, t]:
                unspanned.append((names[i], "down", r, float(lo[i, t])))
            elif r > hi[i, t]:
                unspanned.append((names[i], "up", r, float(hi[i, t])))
        attribution.append(BreachAttribution(
            bar=t, time_ms=int(market.timestamp_ms[t]), loss_usd=float(loss[j]),
            requirement_usd=float(m[j]), unspanned=tuple(unspanned)))
    n_obs, x_b, p = int(obs.size), int(breach.sum()), 1.0 - float(q)
    pof = kupiec_lr(n_obs, x_b, p)
    ind = christoffersen_lr(transitions([bool(b) for b in breach]))
    uncovered = np.maximum(0.0, loss - m)
    return PortfolioCoverage(
        book=book.name, model=model.family, horizon_bars=h, step_bars=step_bars,
        confidence=float(q), requirement=requirement, loss_prices=loss_prices,
        observations=n_obs, breaches=x_b, breach_rate=x_b / n_obs, kupiec_lr=pof,
        kupiec_pvalue=chi2_pvalue(pof, 1),
        kupiec_pvalue_one_sided=kupiec_pvalue_one_sided(n_obs, x_b, p),
        christoffersen_lr=ind, conditional_coverage_lr=pof + ind,
        traffic_light=traffic_light(n_obs, x_b, p),
        mean_requirement_usd=float(m.mean()),
        max_uncovered_loss_usd=float(uncovered.max()),
        observation_bars=obs, loss_usd=loss, requirement_usd=m, breach=breach,
        attribution=tuple(attribution))
