"""Portfolio margin (domain.md §8): one requirement for a whole account, from scenarios.

``IM_t`` is the account's largest loss over a scenario set, positions and collateral revalued
together (collateral that falls with the book, wrong-way, counts), ``MM_t = mm_factor * IM_t``.
Every family maps bars up to and including t to the requirement at t (no look-ahead), takes
keyword-only hyperparameters stored in ``__init__``, and evaluates in ``requirement``.

Exposures. Instruments are linear (perpetuals, spot); an account's USD exposure to instrument
i at bar t is ``x_i = (q_i + c_i) * P_{i,t}``, with ``q_i`` its signed units and ``c_i`` the
collateral units of the asset that instrument i prices (``Market.pricing_instrument``). A
scenario moving instrument i by the simple return ``r_i`` loses ``-Σ_i x_i r_i``.

``grid`` (SPAN / Deribit / Paradex). The risk factors are the market's underlying assets
(instruments on one asset, e.g. BTC spot and a BTC perpetual, move together: the grid has no
basis scenario, the ``historical`` family does). Factor f moves over ``points`` evenly spaced
multiples m of its scan range ``R_{f,t}`` from -R to +R; ``R`` is ``price_range`` or, with
``vol_scaled``, ``max(min_price_range, z_q sigma_{f,t} sqrt(h))`` (``sigma`` the EWMA
volatility of the factor's first instrument, domain.md §2). Joint combinations:

- ``joint="product"``: every combination of the points over all factors. Losses are linear
  in the moves, so its maximum is ``Σ_f |x_f| R_f`` (each factor's worst point chosen on its
  own) for any number of factors, evaluated without enumerating ``points ** F`` cases;
- ``joint="span"``: *together* (every factor at the same multiple m), *singles* (one factor
  at m, the others at 0) and *pairs against* (f at m, g at -m, the others at 0);
- either way the *together* scenarios are the correlation-one moves, the others
  *dispersion* scenarios. Offset credit: a dispersion scenario's loss counts at
  ``1 - credit_t`` with ``credit_t = min(offset_credit_cap, max(0, ρ_t))``, ``ρ_t`` the
  lowest pairwise EWMA correlation of the factors' one-bar log returns at t: the credit for
  an offset is never more than the instruments' correlation;
- *extended moves* ``extended_moves`` (simple returns, e.g. -0.66, +5.0) move each factor
  alone and all factors together, their loss counted at ``extended_weights``;
- ``min_delta_rate`` / ``hedged_delta_rate``: Paradex's ``MinDelta = (2% |net delta| + 1%
  hedged delta) * spot`` per factor, net delta ``|long - short|`` and hedged delta
  ``min(long, short)`` of the factor's long and short exposures, summed over factors;
  ``IM = max(scan, MinDelta)``.

``historical`` (Prisma / FHS). The last ``window_bars`` joint h-bar log returns of the
instruments, ``ln(C_{i,s}/C_{i,s-h})`` for s in t-W+1..t, each standardised by the EWMA
volatility ``sigma_{i,s-h}`` known when it started and rescaled by ``sigma_{i,t}`` (as the
``fhs`` family, jointly: one scenario is one past bar s for every instrument); the account's
loss ES at ``confidence`` (mean of the ``ceil(W(1-q))`` largest) or VaR (the
``ceil(W(1-q))``-th largest). IM is never negative.

Presets (venues.md §1) for linear perpetuals: ``deribit_pme_2024`` (±16%, 9 points,
mm_factor 0.8; the vol scenarios and the dampened extended table do not apply to, or are not
published precisely enough for, linear perpetuals) and ``paradex`` (0, ±4, ±8, ±12, ±16%;
extended -66..+500% at their published weights; MinDelta 2% / 1%; MMR 50% of IMR; the 8 h
funding and fee provisions are not modelled).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtri

from calibration import _kernels
from calibration._errors import InsufficientData, InvalidParameters
from calibration.models._base import Hyperparameters, Rule
from calibration.models._portfolio_kernel import (
    GRID,
    HISTORICAL,
    ScenarioArrays,
    ewma_min_correlation,
    historical_envelope,
    im_series,
    standardised_returns,
)

FloatArray = NDArray[np.float64]

if TYPE_CHECKING:  # calibration.accounts imports calibration.models: no cycle at run time
    from calibration.accounts._market import Market


@dataclass(frozen=True)
class PortfolioRequirement:
    """An account's portfolio requirement through time.

    Attributes:
        im_usd: initial margin per bar, USD, shape ``(n,)``; NaN before ``first_valid_bar``.
        mm_usd: ``mm_factor * im_usd``, USD, shape ``(n,)``.
        first_valid_bar: the first bar with a requirement (the model's warm-up).
    """

    im_usd: FloatArray
    mm_usd: FloatArray
    first_valid_bar: int


def _empty2() -> FloatArray:
    return np.zeros((0, 0))


class PortfolioMarginModel(Hyperparameters, ABC):
    """A portfolio margin model: bars up to t and an account's exposures → IM and MM at t, USD.

    Hyperparameters are keyword-only, ``__init__`` only stores them, ``validate`` names the
    first one out of range; ``requirement`` does the work. No look-ahead: changing any bar
    after t leaves the requirement at t unchanged.
    """

    #: The family name used by the CLI, the API and reports (``grid``, ``historical``).
    family: ClassVar[str]
    #: MM / IM (every family has it; set in ``__init__``).
    mm_factor: float

    def validate(self) -> None:
        """Raise ``InvalidParameters`` naming the first hyperparameter out of range."""
        super().validate()
        if not isinstance(self.mm_factor, int | float) or not 0 < self.mm_factor <= 1:
            raise InvalidParameters(f"mm_factor must be in (0, 1], got {self.mm_factor!r}",
                                    field="mm_factor")

    @property
    def horizon(self) -> int | None:
        """The close-out horizon in bars, ``None`` when unset."""
        value = getattr(self, "horizon_bars", None)
        return None if value is None else int(value)

    def with_horizon(self, horizon_bars: int) -> PortfolioMarginModel:
        """The same model with ``horizon_bars`` set (a new model)."""
        params = self.get_params()
        params["horizon_bars"] = int(horizon_bars)
        return type(self)(**params)

    def _horizon_on(self, bar_seconds: int) -> int:
        if self.horizon is not None:
            return self.horizon
        from calibration.horizon import DEFAULT_HORIZON, to_bars

        return to_bars(DEFAULT_HORIZON, bar_seconds, "horizon")

    @property
    def coverage_level(self) -> float | None:
        """The confidence level the model targets, if it has one."""
        value = getattr(self, "confidence", None)
        return None if value is None else float(value)

    @abstractmethod
    def first_valid_bar(self, bar_seconds: int) -> int:
        """Index of the first bar with a requirement on bars of ``bar_seconds``."""

    @abstractmethod
    def _arrays(self, market: Market) -> ScenarioArrays:
        """The model bound to ``market`` (kernel inputs)."""

    def scenarios(self, market: Market) -> ScenarioArrays:
        """The model bound to ``market``, as the kernels take it.

        Raises:
            InvalidParameters: a hyperparameter is out of range.
            InsufficientData: the market is shorter than the warm-up.
        """
        self.validate()
        first = self.first_valid_bar(market.bar_seconds)
        if first >= len(market):
            raise InsufficientData(f"{self.family} needs more than {first} bars before its "
                                   f"first requirement; the market has {len(market)}")
        return self._arrays(market)

    @abstractmethod
    def scenario_envelope(self, market: Market) -> tuple[FloatArray, FloatArray]:
        """Per instrument and bar, the lowest and highest simple return a standard scenario
        applies, shapes ``(k, n)`` (NaN before the warm-up)."""

    def requirement_from_exposure(self, market: Market,
                                  exposure_usd: FloatArray) -> PortfolioRequirement:
        """IM and MM per bar of USD exposures ``exposure_usd`` (k, n) (positions plus the
        collateral each instrument prices, at that bar's price)."""
        sc = self.scenarios(market)
        x = np.ascontiguousarray(exposure_usd, dtype=np.float64)
        if x.shape != (len(market.instruments), len(market)):
            raise InvalidParameters(f"exposure_usd must have shape (k, n) = "
                                    f"({len(market.instruments)}, {len(market)})",
                                    field="exposure_usd")
        im = im_series(sc, x)
        return PortfolioRequirement(im_usd=im, mm_usd=float(self.mm_factor) * im,
                                    first_valid_bar=int(sc.first_valid))

    def requirement(self, market: Market, units: Mapping[str, float],
                    collateral_units: Mapping[str, float] | None = None
                    ) -> PortfolioRequirement:
        """IM and MM per bar, USD, of a book held constant: ``units`` (instrument → signed
        units) and ``collateral_units`` (asset → units; stable assets carry no price risk),
        revalued at each bar's close.

        Raises:
            InvalidParameters: an instrument or asset the market lacks, a bad parameter.
            InsufficientData: the market is shorter than the warm-up.
        """
        exposure = exposure_units(market, units, collateral_units)
        return self.requirement_from_exposure(market, exposure * market.matrix("close"))


def exposure_units(market: Market, units: Mapping[str, float],
                   collateral_units: Mapping[str, float] | None = None) -> FloatArray:
    """Units per instrument, collateral folded into the instrument that prices it, (k, 1)."""
    from calibration.accounts._market import STABLE_ASSETS

    names = market.instruments
    out = np.zeros((len(names), 1))
    for name, q in units.items():
        if name not in names:
            raise InvalidParameters(f"instrument {name!r} is not in the market "
                                    f"({', '.join(names)})", field="units")
        out[names.index(name), 0] += float(q)
    for asset, u in (collateral_units or {}).items():
        if asset.upper() in STABLE_ASSETS:
            continue
        out[market.pricing_instrument(asset), 0] += float(u)
    return out


def _factor_index(market: Market) -> tuple[NDArray[np.int64], list[int]]:
    """Each instrument's factor (its underlying asset, in order of first appearance), and the
    first instrument of each factor."""
    unders = market.underlyings()
    order: list[str] = []
    for u in unders:
        if u not in order:
            order.append(u)
    factor_of = np.array([order.index(u) for u in unders], dtype=np.int64)
    first = [unders.index(u) for u in order]
    return factor_of, first


class GridPortfolioMargin(PortfolioMarginModel):
    """Scenario-grid portfolio margin (SPAN / Deribit PME / Paradex); see the module docstring
    for the scenario set, the offset credit and the extended moves.

    Args:
        price_range: scan range R as a simple return (0.16 = ±16%), when not ``vol_scaled``.
        points: grid points from -R to +R, evenly spaced (9: 0, ±R/4, ±R/2, ±3R/4, ±R).
        vol_scaled: ``R_{f,t} = max(min_price_range, z_q sigma_{f,t} sqrt(horizon_bars))``.
        confidence: q of ``z_q`` (vol-scaled ranges).
        decay: EWMA decay of the volatility and the correlation.
        horizon_bars: close-out horizon h, bars; ``None``: the default duration.
        warmup_bars: returns seeding the EWMA volatility and correlation; no requirement
            before this bar when either is used.
        min_price_range: floor of a vol-scaled range, simple return.
        extended_moves: extended moves, simple returns (each factor alone and all together).
        extended_weights: weight of each extended move's loss, in [0, 1].
        joint: ``product`` (every combination) or ``span`` (together, singles, pairs).
        offset_credit_cap: most credit on a dispersion scenario, in [0, 1], and never more
            than the factors' lowest EWMA correlation; 0: no credit.
        min_delta_rate, hedged_delta_rate: Paradex MinDelta rates on net and hedged delta.
        mm_factor: MM / IM (Deribit 0.8, Paradex 0.5).
    """

    family = "grid"
    rules: ClassVar[dict[str, Rule]] = {
        "price_range": Rule(low=0.0, high=1.0, low_open=True),
        "points": Rule(low=2, high=1001, integer=True),
        "confidence": Rule(low=0.5, high=1.0, low_open=True, high_open=True),
        "decay": Rule(low=0.0, high=1.0, low_open=True, high_open=True),
        "horizon_bars": Rule(low=1, high=10**7, integer=True, optional=True),
        "warmup_bars": Rule(low=2, integer=True),
        "min_price_range": Rule(low=0.0, high=1.0),
        "offset_credit_cap": Rule(low=0.0, high=1.0),
        "min_delta_rate": Rule(low=0.0, high=1.0),
        "hedged_delta_rate": Rule(low=0.0, high=1.0),
    }

    def __init__(
        self,
        *,
        price_range: float = 0.16,
        points: int = 9,
        vol_scaled: bool = False,
        confidence: float = 0.99,
        decay: float = 0.97,
        horizon_bars: int | None = None,
        warmup_bars: int = 500,
        min_price_range: float = 0.0,
        extended_moves: tuple[float, ...] = (),
        extended_weights: tuple[float, ...] = (),
        joint: str = "product",
        offset_credit_cap: float = 0.0,
        min_delta_rate: float = 0.0,
        hedged_delta_rate: float = 0.0,
        mm_factor: float = 0.8,
    ) -> None:
        self.price_range = price_range
        self.points = points
        self.vol_scaled = vol_scaled
        self.confidence = confidence
        self.decay = decay
        self.horizon_bars = horizon_bars
        self.warmup_bars = warmup_bars
        self.min_price_range = min_price_range
        self.extended_moves = extended_moves
        self.extended_weights = extended_weights
        self.joint = joint
        self.offset_credit_cap = offset_credit_cap
        self.min_delta_rate = min_delta_rate
        self.hedged_delta_rate = hedged_delta_rate
        self.mm_factor = mm_factor

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.vol_scaled, bool):
            raise InvalidParameters(f"vol_scaled must be true or false, got "
                                    f"{self.vol_scaled!r}", field="vol_scaled")
        if self.joint not in ("product", "span"):
            raise InvalidParameters(f"joint must be 'product' or 'span', got {self.joint!r}",
                                    field="joint")
        for name in ("extended_moves", "extended_weights"):
            values = getattr(self, name)
            if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
                raise InvalidParameters(f"{name} must be a list of numbers", field=name)
            rule = (Rule(low=-1.0, low_open=True) if name == "extended_moves"
                    else Rule(low=0.0, high=1.0))
            for v in values:
                rule.check(name, v)
        if len(self.extended_moves) != len(self.extended_weights):
            raise InvalidParameters(
                f"extended_weights needs one weight per extended move ({len(self.extended_moves)}"
                f" moves, {len(self.extended_weights)} weights)", field="extended_weights")

    def _uses_history(self) -> bool:
        return bool(self.vol_scaled) or float(self.offset_credit_cap) > 0.0

    def first_valid_bar(self, bar_seconds: int) -> int:
        return int(self.warmup_bars) if self._uses_history() else 0

    def grid_points(self) -> FloatArray:
        """The multiples of the scan range, shape ``(points,)``, from -1 to 1."""
        result: FloatArray = np.linspace(-1.0, 1.0, int(self.points))
        return result

    def scan_range(self, market: Market) -> FloatArray:
        """``R_{f,t}`` per factor and bar, simple return, shape ``(F, n)``."""
        _, first = _factor_index(market)
        n = len(market)
        if not self.vol_scaled:
            return np.full((len(first), n), float(self.price_range))
        h = self._horizon_on(market.bar_seconds)
        z = float(ndtri(self.confidence)) * math.sqrt(h)
        out = np.empty((len(first), n))
        for f, i in enumerate(first):
            b = market.bars[i]
            var = _kernels.ewma_variance(b.log_returns(), b.squared_returns(),
                                         float(self.decay), int(self.warmup_bars))
            out[f] = np.maximum(float(self.min_price_range), z * np.sqrt(var))
        return out

    def offset_credit(self, market: Market) -> FloatArray:
        """The credit on dispersion scenarios per bar, fraction, shape ``(n,)``."""
        _, first = _factor_index(market)
        n = len(market)
        if float(self.offset_credit_cap) == 0.0 or len(first) < 2:
            return np.zeros(n)
        returns = np.vstack([market.bars[i].log_returns() for i in first])
        rho: FloatArray = ewma_min_correlation(returns, float(self.decay),
                                               int(self.warmup_bars))
        credit: FloatArray = np.minimum(float(self.offset_credit_cap), np.maximum(0.0, rho))
        return credit

    def _arrays(self, market: Market) -> ScenarioArrays:
        factor_of, first = _factor_index(market)
        return ScenarioArrays(
            kind=GRID, factor_of=factor_of, n_factors=len(first),
            scan_range=self.scan_range(market), credit=self.offset_credit(market),
            span=self.joint == "span",
            ext_move=np.array(self.extended_moves, dtype=np.float64),
            ext_weight=np.array(self.extended_weights, dtype=np.float64),
            min_delta_rate=float(self.min_delta_rate),
            hedged_delta_rate=float(self.hedged_delta_rate),
            z=_empty2(), sigma=_empty2(), window=0, tail=1, use_es=True,
            mm_factor=float(self.mm_factor),
            first_valid=self.first_valid_bar(market.bar_seconds))

    def scenario_envelope(self, market: Market) -> tuple[FloatArray, FloatArray]:
        self.validate()
        factor_of, _ = _factor_index(market)
        r = self.scan_range(market)[factor_of]
        return -r, r


class HistoricalPortfolioMargin(PortfolioMarginModel):
    """Filtered historical simulation over joint scenarios (Prisma / FHS); see the module
    docstring.

    Args:
        window_bars: W, the joint h-bar scenarios, one per past bar.
        confidence: q in (0.5, 1); the tail is the ``ceil(W (1 - q))`` largest losses.
        decay: EWMA decay λ of the filtering volatility.
        horizon_bars: close-out horizon h, bars; ``None``: the default duration.
        warmup_bars: returns seeding the EWMA variance.
        measure: ``es`` or ``var``.
        mm_factor: MM / IM.
    """

    family = "historical"
    rules: ClassVar[dict[str, Rule]] = {
        "window_bars": Rule(low=10, integer=True),
        "confidence": Rule(low=0.5, high=1.0, low_open=True, high_open=True),
        "decay": Rule(low=0.0, high=1.0, low_open=True, high_open=True),
        "horizon_bars": Rule(low=1, high=10**7, integer=True, optional=True),
        "warmup_bars": Rule(low=2, integer=True),
    }

    def __init__(
        self,
        *,
        window_bars: int = 500,
        confidence: float = 0.99,
        decay: float = 0.97,
        horizon_bars: int | None = None,
        warmup_bars: int = 500,
        measure: str = "es",
        mm_factor: float = 0.8,
    ) -> None:
        self.window_bars = window_bars
        self.confidence = confidence
        self.decay = decay
        self.horizon_bars = horizon_bars
        self.warmup_bars = warmup_bars
        self.measure = measure
        self.mm_factor = mm_factor

    def validate(self) -> None:
        super().validate()
        if self.measure not in ("es", "var"):
            raise InvalidParameters(f"measure must be 'es' or 'var', got {self.measure!r}",
                                    field="measure")

    def tail_count(self) -> int:
        """How many of the window's scenarios form the tail (at least one)."""
        return max(1, math.ceil(int(self.window_bars) * (1.0 - float(self.confidence)) - 1e-9))

    def first_valid_bar(self, bar_seconds: int) -> int:
        return int(self.warmup_bars) + self._horizon_on(bar_seconds) + int(self.window_bars) - 1

    def _filtered(self, market: Market) -> tuple[FloatArray, FloatArray]:
        h = self._horizon_on(market.bar_seconds)
        k, n = len(market.instruments), len(market)
        z = np.empty((k, n))
        sigma = np.empty((k, n))
        for i, b in enumerate(market.bars):
            var = _kernels.ewma_variance(b.log_returns(), b.squared_returns(),
                                         float(self.decay), int(self.warmup_bars))
            sigma[i] = np.sqrt(var)
            z[i] = standardised_returns(b.close, var, h, int(self.warmup_bars) + h)
        return z, sigma

    def _arrays(self, market: Market) -> ScenarioArrays:
        factor_of, first = _factor_index(market)
        z, sigma = self._filtered(market)
        return ScenarioArrays(
            kind=HISTORICAL, factor_of=factor_of, n_factors=len(first),
            scan_range=_empty2(), credit=np.zeros(0), span=False, ext_move=np.zeros(0),
            ext_weight=np.zeros(0), min_delta_rate=0.0, hedged_delta_rate=0.0,
            z=z, sigma=sigma, window=int(self.window_bars), tail=self.tail_count(),
            use_es=self.measure == "es", mm_factor=float(self.mm_factor),
            first_valid=self.first_valid_bar(market.bar_seconds))

    def scenario_envelope(self, market: Market) -> tuple[FloatArray, FloatArray]:
        self.validate()
        z, sigma = self._filtered(market)
        lo: FloatArray
        hi: FloatArray
        lo, hi = historical_envelope(z, sigma, int(self.window_bars),
                                     self.first_valid_bar(market.bar_seconds))
        return lo, hi


#: Portfolio model families by public name.
PORTFOLIO_FAMILIES: dict[str, type[PortfolioMarginModel]] = {
    "grid": GridPortfolioMargin,
    "historical": HistoricalPortfolioMargin,
}

#: Published grids for linear perpetuals (venues.md §1), as ``grid`` parameters.
PORTFOLIO_PRESETS: dict[str, dict[str, Any]] = {
    # Deribit PME, private/pme/simulate example of 2024-06-17: price_range 0.16,
    # buckets_count 4 -> 9 points incl. 0, mm_factor 0.8.
    "deribit_pme_2024": {"price_range": 0.16, "points": 9, "mm_factor": 0.8},
    # Paradex portfolio margin: spot 0, ±4..±16%; extended moves at their weights;
    # MinDelta 2% net + 1% hedged; MMR = 50% of IMR.
    "paradex": {"price_range": 0.16, "points": 9,
                "extended_moves": (-0.66, -0.33, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0),
                "extended_weights": (0.24, 0.48, 0.32, 0.16, 0.08, 0.0533, 0.04, 0.032),
                "min_delta_rate": 0.02, "hedged_delta_rate": 0.01, "mm_factor": 0.5},
}


def make_portfolio_model(name: str, params: Mapping[str, Any] | None = None
                         ) -> PortfolioMarginModel:
    """A portfolio model from a family (``grid``, ``historical``) or a preset
    (``deribit_pme_2024``, ``paradex``: a ``grid`` whose published parameters ``params``
    may override), validated.

    Raises:
        InvalidParameters: unknown name or parameter (``field`` names it), a value out of
            range.
    """
    params = dict(params or {})
    if name in PORTFOLIO_PRESETS:
        cls: type[PortfolioMarginModel] = GridPortfolioMargin
        params = {**PORTFOLIO_PRESETS[name], **params}
    elif name in PORTFOLIO_FAMILIES:
        cls = PORTFOLIO_FAMILIES[name]
    else:
        known = sorted(PORTFOLIO_FAMILIES) + sorted(PORTFOLIO_PRESETS)
        raise InvalidParameters(f"unknown portfolio model {name!r}; choose one of "
                                f"{', '.join(known)}", field="portfolio_model")
    allowed = cls.param_names()
    for key in params:
        if key not in allowed:
            raise InvalidParameters(f"unknown parameter {key!r} for portfolio model {name!r}; "
                                    f"known: {', '.join(allowed)}", field=key)
    for key in ("extended_moves", "extended_weights"):
        if key in params and isinstance(params[key], list):
            params[key] = tuple(params[key])
    model = cls(**params)
    model.validate()
    return model
