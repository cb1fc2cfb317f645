"""The calibration spec: what to calibrate, on which data, against which objectives.

A frozen msgspec Struct (it is also the API's request body). ``validate_spec`` checks
everything that can be checked before any data is read or any trial runs; the data-dependent
checks (stress windows inside the data, horizons shorter than it) run in
``calibration.calibrate.prepare`` before the first trial.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from calibration._errors import InvalidParameters
from calibration.data import repair_policy
from calibration.horizon import to_bars
from calibration.liquidation import LiquidationConfig
from calibration.models import FAMILIES, make_model
from calibration.windows import StressWindow

#: Instrument names: what uploads, reports, stores and the audit trail key on. Letters, digits
#: and ``_ . -``, starting with a letter or digit, at most 64 characters (the audit column).
INSTRUMENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Instrument = Annotated[str, msgspec.Meta(
    min_length=1, max_length=64, pattern=INSTRUMENT_PATTERN,
    description="instrument name (letters, digits, `_ . -`; at most 64 characters)",
    examples=["BTCUSDT"])]
#: A data reference: a path relative to the data root, without control characters (a NUL
#: cannot name a file), at most 1024 characters; ``resolve_ref`` checks the rest.
REF_PATTERN = r"^[^\x00-\x1f\x7f]+$"
Ref = Annotated[str, msgspec.Meta(
    min_length=1, max_length=1024, pattern=REF_PATTERN,
    description="path of a data file relative to the data root (e.g. `uploads/BTC.csv`)")]
#: Stress-window names: shown in reports and charts, so a short identifier (no ``$``, no markup).
WINDOW_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.:()+,-]{0,63}$"
WindowName = Annotated[str, msgspec.Meta(
    min_length=1, max_length=64, pattern=WINDOW_NAME_PATTERN,
    description="window name (letters, digits, space and `_ . : ( ) + , -`; at most 64)")]
#: An ISO day ``YYYY-MM-DD`` (UTC); years 0001..9999.
Day = Annotated[str, msgspec.Meta(
    pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
    description="UTC day, ISO `YYYY-MM-DD`", examples=["2022-11-08"])]
#: A short free-text setting (a duration, a format): bounded, no control characters.
Short = Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                    pattern=r"^[^\x00-\x1f\x7f]+$")]
#: Parameter names of a family (``decay``, ``horizon_bars``).
ParamName = Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
#: A search-space key: a model parameter (``decay``) or an account-level one, dotted
#: (``engine.partial_fraction``, ``portfolio.offset_credit_cap``,
#: ``portfolio.extended_weights[0]``, ``haircuts.BTC.ratios[1]``; ``calibrate._accounts``).
SearchKey = Annotated[str, msgspec.Meta(
    min_length=1, max_length=128,
    pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+(\[[0-9]{1,3}\])?)*$",
    description="a model parameter (`decay`) or a dotted account-level one "
                "(`engine.partial_fraction`, `portfolio.offset_credit_cap`, "
                "`haircuts.BTC.ratios[1]`)")]
#: A collateral asset (``BTC``, ``USDT``).
AssetName = Annotated[str, msgspec.Meta(min_length=1, max_length=16,
                                        pattern=r"^[A-Za-z0-9]+$")]
#: numpy's (so Optuna's) seed range: 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
#: Out-of-sample folds: each is a full evaluation of the recommendation.
MAX_FOLDS = 50
#: Instruments per request and stress windows per request.
MAX_INSTRUMENTS = 32
MAX_WINDOWS = 64
#: Largest close-out horizon in bars (as ``calibration.horizon.to_bars``).
MAX_HORIZON_BARS = 10**7


class DataRefSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One instrument's data: references relative to the data root, optional day range.

    ``repair`` names the opt-in repairs (``ohlc-range``, ``duplicates``; domain.md §1),
    ``timestamp_format`` the ``strftime`` format of non-ISO dates (``%d/%m/%Y``) and
    ``timestamp_unit`` the unit of epoch numbers (default: told by magnitude).
    """

    instrument: Instrument
    ref: Ref
    funding: Annotated[Ref, msgspec.Meta(
        description="funding settlements file relative to the data root (`funding_rate`, "
                    "decimal per settlement, or `funding_rate_pct`)")] | None = None
    depth: Annotated[Ref, msgspec.Meta(
        description="Binance bookDepth snapshots file relative to the data root (USD "
                    "notional within ±1% of mid)")] | None = None
    start: Annotated[Day, msgspec.Meta(description="first UTC day kept (inclusive)")] | None = None
    end: Annotated[Day, msgspec.Meta(description="last UTC day kept (inclusive)")] | None = None
    repair: Annotated[list[Literal["ohlc-range", "duplicates"]], msgspec.Meta(
        max_length=2, description="opt-in repairs (domain.md §1); none: strict")] = []
    timestamp_format: Annotated[Short, msgspec.Meta(
        description="`strftime` format of non-ISO dates, e.g. `%d/%m/%Y`")] | None = None
    timestamp_unit: Annotated[Literal["s", "ms", "us", "ns"], msgspec.Meta(
        description="unit of epoch numbers (seconds … nanoseconds); none: told by "
                    "magnitude")] | None = None


class ParamSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A search range ``[low, high]`` (``log`` for scale parameters), or a fixed ``value``."""

    low: Annotated[float, msgspec.Meta(
        description="lower end of the range, in the parameter's units")] | None = None
    high: Annotated[float, msgspec.Meta(
        description="upper end of the range, in the parameter's units")] | None = None
    log: Annotated[bool, msgspec.Meta(description="sample on a log scale (needs low > 0)")] = False
    integer: Annotated[bool, msgspec.Meta(description="whole numbers only (bars)")] = False
    value: Annotated[Any, msgspec.Meta(
        description="a fixed value instead of a range, in the parameter's units")] = None


#: A registered metric's name (``calibration.calibrate.METRICS``: ``capital_cost``, ...).
MetricName = Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                         pattern=r"^[a-z][a-z0-9_]*$")]


class ObjectivesSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The objectives, minimised together (domain.md §5; issue 14).

    ``minimize`` names any registered metrics (``calibration.calibrate.METRICS``:
    ``capital_cost``, ``insolvency_bps``, ``liquidations_at_risk``, ``premature_share``,
    ``procyclicality``, ``contagion``); the first is what "cheapest" ranks by, ties by the
    others in order. Default: ``capital_cost`` (the notional-weighted mean IM rate) and
    ``insolvency_bps``, whose measure ``insolvency`` chooses: ``bad_debt_bps`` (bad debt
    per notional opened, bps) or ``uncovered_es_bps`` (mean uncovered loss per observation
    beyond the margin, both sides, bps of notional). ``appetite_on`` is the objective
    ``risk_appetite_bps`` bounds (default ``insolvency_bps``), in that objective's units.
    """

    insolvency: Annotated[Literal["bad_debt_bps", "uncovered_es_bps"], msgspec.Meta(
        description="the insolvency objective: bad debt per notional opened (bps) or mean "
                    "uncovered loss beyond the margin (bps of notional)")] = "bad_debt_bps"
    minimize: Annotated[list[MetricName], msgspec.Meta(
        min_length=1, max_length=6,
        description="registered metrics minimised together, the first ranking 'cheapest' "
                    "(capital_cost, insolvency_bps, liquidations_at_risk, premature_share, "
                    "procyclicality, contagion); null: capital_cost and "
                    "insolvency_bps")] | None = None
    appetite_on: Annotated[MetricName, msgspec.Meta(
        description="the objective risk_appetite_bps bounds, in its units; null: "
                    "insolvency_bps")] | None = None


class ConstraintsSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Feasibility rules (each a value, feasible when ≤ 0; ``None`` switches it off).

    A trial stores them by name in its metrics and as one ``trial.set_constraint`` value,
    ``calibrate.violation``: same feasibility, same infeasibility measure for the samplers.

    Attributes:
        kupiec_alpha: Kupiec POF not rejected at this level on any instrument and side.
            One-sided: only too many breaches count against a model (conservative margins
            are priced by the capital objective, not refused).
        no_red_in_stress_windows: the traffic light is not red on any stress window.
        max_premature_share: premature liquidations / liquidations at most this.
        max_procyclicality: the largest 30-day margin increase ratio at most this.
        no_red_light_in_any_regime: the traffic light is not red in any volatility regime
            (``calibration.calibrate._regimes``), on any instrument and side; the constraint
            is ``red_light_in_regime``.
        max: metric name → its ceiling, in the metric's units (any registered metric:
            ``liquidations_at_risk``, ``contagion``, ...); the constraint is named after
            the metric. ``premature_share`` and ``procyclicality`` may be bounded here or
            by the two fields above, not both.
    """

    kupiec_alpha: Annotated[float, msgspec.Meta(
        gt=0, lt=1, description="Kupiec POF test level (probability); null: off")] | None = 0.05
    no_red_in_stress_windows: Annotated[bool, msgspec.Meta(
        description="no red traffic light on any stress window")] = True
    max_premature_share: Annotated[float, msgspec.Meta(
        ge=0, le=1, description="largest share of premature liquidations (fraction); "
                                "null: off")] | None = 0.6
    max_procyclicality: Annotated[float, msgspec.Meta(
        ge=1, description="largest 30-day margin increase (ratio, >= 1); null: off")] | None = None
    no_red_light_in_any_regime: Annotated[bool, msgspec.Meta(
        description="no red traffic light in any volatility regime (terciles of trailing "
                    "one-day realised volatility, domain.md §11)")] = False
    max: Annotated[dict[MetricName, float], msgspec.Meta(
        max_length=16, description="registered metric → ceiling, in the metric's units "
                                   "(constraint named after the metric); null: "
                                   "none")] | None = None


class PublishedSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The parameters in force, and how far one update may move each (in the units of the
    parameter's publishing rule, ``calibration.publishing.DEFAULT_RULES``). Keys are model
    parameters or dotted account-level search keys (``engine.partial_fraction``,
    ``haircuts.BTC.ratios[1]``), so the search keeps both inside the publish guardrails."""

    params: Annotated[dict[SearchKey, Any], msgspec.Meta(
        max_length=64, description="parameters in force, in their own units (model "
                                   "parameters, or dotted account-level keys)")]
    max_change: Annotated[dict[SearchKey, float], msgspec.Meta(
        max_length=64, description="largest change per update, in the units of each "
                                   "parameter's publishing rule")] = {}


class WalkForwardSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """In-sample/out-of-sample split: trials see bars before ``in_sample_end`` (ISO day,
    exclusive; default the first ``in_sample_fraction`` of the common span), and the
    recommendation is then evaluated on ``folds`` equal later segments."""

    in_sample_end: Annotated[Day, msgspec.Meta(
        description="first out-of-sample UTC day (exclusive end of the in-sample "
                    "span)")] | None = None
    in_sample_fraction: Annotated[float, msgspec.Meta(
        gt=0, lt=1, description="in-sample share of the common span (fraction)")] = 0.7
    folds: Annotated[int, msgspec.Meta(
        ge=1, le=MAX_FOLDS, description="out-of-sample segments (count)")] = 2


class StressWindowSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named stress window of whole UTC days ``start .. end`` (inclusive)."""

    name: WindowName
    start: Annotated[Day, msgspec.Meta(description="first UTC day (inclusive)")]
    end: Annotated[Day, msgspec.Meta(
        description="last UTC day (inclusive); null: the start day")] | None = None


class HaircutTiersSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One collateral asset's haircut tiers (domain.md §9): bands capped at ``caps_usd`` with
    their ``ratios`` given, or ratios derived from the asset's depth (``depth``: the
    liquidity-adjusted rule's ``spread_rate``, ``impact_coef``, ``impact_exponent``,
    ``confidence``; depth and volatility read from the in-sample bars). Either way the ratios
    are made non-increasing (a running minimum: a larger holding never counts at a higher
    ratio)."""

    caps_usd: Annotated[list[float], msgspec.Meta(
        max_length=16, description="upper bound of each band but the last, USD, "
                                   "increasing; [] for one flat ratio")] = []
    ratios: Annotated[list[float], msgspec.Meta(
        max_length=17, description="value ratio of each band (len(caps_usd) + 1), fractions "
                                   "in [0, 1]")] | None = None
    depth: Annotated[dict[ParamName, float], msgspec.Meta(
        max_length=8, description="liquidity-adjusted ratios from depth: spread_rate, "
                                  "impact_coef, impact_exponent, confidence")] | None = None


class HaircutCoverageSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the haircut coverage backtest (domain.md §9; ``accounts.haircut_coverage``).

    ``holdings_usd`` default: each band cap and twice the last (one holding of 1M USD for a
    flat ratio); ``liquidation_bars`` default: the close-out horizon."""

    holdings_usd: Annotated[list[float], msgspec.Meta(
        min_length=1, max_length=32, description="reference holdings, USD")] | None = None
    liquidation_bars: Annotated[int, msgspec.Meta(
        ge=1, le=MAX_HORIZON_BARS, description="bars to sell a holding; null: the close-out "
                                               "horizon")] | None = None
    expected_breach_rate: Annotated[float, msgspec.Meta(
        gt=0, lt=1, description="p of the coverage statistics (fraction)")] = 0.01
    spread_rate: Annotated[float, msgspec.Meta(
        ge=0, lt=1, description="selling cost, fraction of value")] = 0.0005
    impact_coef: Annotated[float, msgspec.Meta(
        ge=0, description="impact coefficient (0: none)")] = 0.0
    impact_exponent: Annotated[float, msgspec.Meta(gt=0, description="impact exponent")] = 0.5
    depth_fraction_of_adv: Annotated[float, msgspec.Meta(
        gt=0, le=1, description="depth as a fraction of ADV without order-book depth")] = 0.01
    overlapping: Annotated[bool, msgspec.Meta(
        description="every bar an observation (else every liquidation_bars-th)")] = True


class BookSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A reference book of constant USD exposures (``PortfolioBook``)."""

    name: WindowName
    notional_usd: Annotated[dict[Instrument, float], msgspec.Meta(
        min_length=1, max_length=MAX_INSTRUMENTS,
        description="instrument → signed USD notional (> 0 long)")]
    collateral_usd: Annotated[dict[AssetName, float], msgspec.Meta(
        max_length=16, description="asset → USD value of collateral held in it")] = {}


class PortfolioCoverageSpec(msgspec.Struct, frozen=True, kw_only=True,
                            forbid_unknown_fields=True):
    """Settings of the portfolio coverage backtest (domain.md §8;
    ``accounts.portfolio_coverage``). ``books`` default: long the first instrument / short
    the second, and an equal-weight basket, 1M USD each."""

    books: Annotated[list[BookSpec], msgspec.Meta(
        min_length=1, max_length=16, description="reference books")] | None = None
    confidence: Annotated[float, msgspec.Meta(
        gt=0.5, lt=1, description="coverage level tested; null: the model's (grid: "
                                  "0.99)")] | None = None
    step_bars: Annotated[int, msgspec.Meta(
        ge=1, le=MAX_HORIZON_BARS, description="bars between observations (1: "
                                               "overlapping)")] = 1
    requirement: Annotated[Literal["im", "mm"], msgspec.Meta(
        description="the requirement tested")] = "im"
    loss_prices: Annotated[Literal["close", "adverse"], msgspec.Meta(
        description="loss at the horizon's close or at each asset's adverse extreme")] = "close"


class AccountsSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An account population over the spec's market (domain.md §7–§10), what account-level
    search-space keys and metrics are evaluated on (``calibration.calibrate._accounts``).

    Attributes:
        population: ``PopulationSpec`` fields of a seeded generator (``seed`` default: the
            spec's; ``entry_every_bars``: the liquidation cohort cadence); null with ``file``.
        file: accounts file relative to the data root (``load_accounts``: JSON or CSV).
        mode: ``cross`` (per-instrument model rates pooled) or ``portfolio`` (a portfolio
            margin model's requirement, domain.md §8).
        engine: ``AccountConfig`` fields over the liquidation settings' holding and latency
            (``preset`` names a venue's); ``mode`` and ``haircuts`` are set here instead.
        portfolio_model: the portfolio family or preset of ``mode="portfolio"``.
        portfolio: its fixed parameters.
        haircuts: collateral asset → haircut tiers (the trigger test's collateral value).
        haircut_coverage: the haircut coverage backtest's settings.
        portfolio_coverage: the portfolio coverage backtest's settings.
    """

    population: Annotated[dict[ParamName, Any], msgspec.Meta(
        description="PopulationSpec fields (seeded generator)")] | None = None
    file: Annotated[Ref, msgspec.Meta(
        description="accounts file (JSON or CSV) relative to the data root")] | None = None
    mode: Annotated[Literal["cross", "portfolio"], msgspec.Meta(
        description="pooled per-instrument rates, or a portfolio margin model")] = "cross"
    engine: Annotated[dict[ParamName, Any], msgspec.Meta(
        description="AccountConfig fields (liquidation engine, domain.md §10)")] = {}
    portfolio_model: Annotated[Short, msgspec.Meta(
        description="portfolio family or preset (`grid`, `historical`, "
                    "`deribit_pme_2024`, `paradex`)")] = "grid"
    portfolio: Annotated[dict[ParamName, Any], msgspec.Meta(
        description="the portfolio model's fixed parameters")] = {}
    haircuts: Annotated[dict[AssetName, HaircutTiersSpec], msgspec.Meta(
        max_length=16, description="collateral asset → haircut tiers")] = {}
    haircut_coverage: Annotated[HaircutCoverageSpec, msgspec.Meta(
        description="haircut coverage backtest settings")] = HaircutCoverageSpec()
    portfolio_coverage: Annotated[PortfolioCoverageSpec, msgspec.Meta(
        description="portfolio coverage backtest settings")] = PortfolioCoverageSpec()


class CalibrationSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a calibration needs; its canonical JSON hash keys results and caches.

    Attributes:
        data: one entry per instrument.
        model: the margin model family (``tiered``, ``ewma``, ``fhs``).
        search_space: per parameter a range or a fixed value, over the family's defaults.
        objectives: which insolvency measure is the second objective.
        constraints: feasibility rules.
        risk_appetite_bps: the largest acceptable insolvency (objective units, bps).
        published: the parameters in force and the guardrails on changing them.
        walk_forward: in-sample / out-of-sample split.
        stress_windows: named windows (``None``: domain.md's crash episodes).
        horizon_bars: the close-out horizon (margin period of risk) in bars: it sizes the
            model's margin and is the coverage test's loss window (domain.md §2).
        horizon: the same as a duration (``"1h"``, ``"2d"``) or a digit string of bars,
            converted with the data's bar size. Set one of ``horizon``, ``horizon_bars`` and
            a fixed ``search_space.horizon_bars``, or several alike; none: 1h.
        liquidation: ``LiquidationConfig`` fields for the position population.
        n_trials: trials to run (at least one of ``n_trials`` and ``timeout_seconds``).
        timeout_seconds: stop starting trials after this long.
        seed: sampler seed; one worker with the same inputs gives the same result.
        sampler: ``auto``, ``tpe``, ``nsga2`` or ``random`` (see ``calibrate.make_sampler``).
        batch_size: reproducible batches (``calibrate.propose_batch``): the sampler proposes
            this many parameter sets at a time from the finished trials of earlier batches
            only, and workers evaluate them in trial-number order, so the study, the front
            and the recommendation are the same for 1, 2 or N workers; ``None``: every
            worker asks the sampler for itself (faster, not reproducible in parallel).
        accounts: an account population over the market, for account-level search-space
            keys (``engine.*``, ``portfolio.*``, ``haircuts.*``) and metrics; ``None``: none
            (``contagion`` then uses a default seeded population).
    """

    data: Annotated[list[DataRefSpec], msgspec.Meta(
        min_length=1, max_length=MAX_INSTRUMENTS, description="one entry per instrument")]
    model: Annotated[str, msgspec.Meta(
        max_length=32, description="margin model family (`tiered`, `ewma`, `fhs`)")]
    search_space: Annotated[dict[SearchKey, ParamSpec], msgspec.Meta(
        max_length=64, description="per parameter a range or a fixed value, over the "
                                   "family's defaults; dotted keys address the accounts "
                                   "section (`engine.*`, `portfolio.*`, `haircuts.*`)")] = {}
    objectives: Annotated[ObjectivesSpec, msgspec.Meta(
        description="the insolvency objective")] = ObjectivesSpec()
    constraints: Annotated[ConstraintsSpec, msgspec.Meta(
        description="feasibility rules")] = ConstraintsSpec()
    risk_appetite_bps: Annotated[float, msgspec.Meta(
        ge=0, description="largest acceptable insolvency (bps)")] | None = None
    published: Annotated[PublishedSpec, msgspec.Meta(
        description="parameters in force and the guardrails on changing them")] | None = None
    walk_forward: Annotated[WalkForwardSpec, msgspec.Meta(
        description="in-sample / out-of-sample split")] = WalkForwardSpec()
    stress_windows: Annotated[list[StressWindowSpec], msgspec.Meta(
        max_length=MAX_WINDOWS, description="named windows; null: domain.md's crash "
                                            "episodes")] | None = None
    horizon_bars: Annotated[int, msgspec.Meta(
        ge=1, le=MAX_HORIZON_BARS, description="close-out horizon (bars)")] | None = None
    horizon: Annotated[Short, msgspec.Meta(
        description="close-out horizon as a duration (`1h`, `2d`) or a digit string of "
                    "bars")] | None = None
    liquidation: Annotated[dict[ParamName, Any], msgspec.Meta(
        description="LiquidationConfig fields (position population, close-out)")] = {}
    n_trials: Annotated[int, msgspec.Meta(
        ge=1, description="trials to run (count)")] | None = 100
    timeout_seconds: Annotated[float, msgspec.Meta(
        gt=0, description="stop starting trials after this long (s)")] | None = None
    seed: Annotated[int, msgspec.Meta(
        ge=0, le=MAX_SEED, description="sampler seed (0 .. 2**32-1)")] = 0
    sampler: Annotated[Literal["auto", "tpe", "nsga2", "random"], msgspec.Meta(
        description="Optuna sampler")] = "auto"
    batch_size: Annotated[int, msgspec.Meta(
        ge=1, le=1000, description="reproducible batches: parameter sets proposed this many "
                                   "at a time from earlier batches only, so the result is "
                                   "the same for any number of workers (count)")] | None = None
    accounts: Annotated[AccountsSpec, msgspec.Meta(
        description="account population for account-level parameters and metrics")] | None = None


#: Default search ranges per family (public parameter names, domain.md §2). Parameters not
#: listed keep the model's default; the close-out horizon is a policy choice, not searched.
DEFAULT_SEARCH_SPACES: dict[str, dict[str, ParamSpec]] = {
    "ewma": {
        "decay": ParamSpec(low=0.9, high=0.999),
        "confidence": ParamSpec(low=0.99, high=0.999),
        "floor_rate": ParamSpec(low=0.002, high=0.05, log=True),
        "apc_buffer": ParamSpec(low=0.25, high=1.0),
    },
    "tiered": {
        "base_mmr": ParamSpec(low=0.002, high=0.05, log=True),
        "tier_growth": ParamSpec(low=1.0, high=3.0),
        "im_to_mm": ParamSpec(low=1.5, high=3.0),
    },
    "fhs": {
        "window_bars": ParamSpec(low=500, high=5000, integer=True),
        "confidence": ParamSpec(low=0.99, high=0.999),
        "decay": ParamSpec(low=0.9, high=0.999),
        "stress_weight": ParamSpec(low=0.25, high=1.0),
        "floor_rate": ParamSpec(low=0.002, high=0.05, log=True),
    },
}


def search_space(spec: CalibrationSpec) -> dict[str, ParamSpec]:
    """The family's default space overlaid with the spec's (spec entries win)."""
    space = dict(DEFAULT_SEARCH_SPACES.get(spec.model, {}))
    space.update(spec.search_space)
    return space


def _bad(message: str, field: str) -> InvalidParameters:
    return InvalidParameters(message, field=field)


def validate_spec(spec: CalibrationSpec) -> None:
    """Refuse a spec that cannot run, naming the field, before any data is read.

    Raises:
        InvalidParameters: unknown model or parameter, empty or inverted range, a fixed value
            the model refuses, no trials and no time budget, bad guardrails or windows.
    """
    if spec.model not in FAMILIES:
        raise _bad(f"unknown model {spec.model!r}; choose one of {', '.join(sorted(FAMILIES))}",
                   "model")
    if not spec.data:
        raise _bad("data needs at least one instrument", "data")
    if spec.batch_size is not None and spec.batch_size < 2 and spec.sampler == "nsga2":
        raise _bad("nsga2 breeds each batch as a generation of batch_size parents and needs "
                   "batch_size >= 2", "batch_size")
    if len(spec.data) > MAX_INSTRUMENTS:
        raise _bad(f"at most {MAX_INSTRUMENTS} instruments", "data")
    names = [d.instrument for d in spec.data]
    if len(set(names)) != len(names):
        raise _bad("two data entries name the same instrument", "data")
    for i, d in enumerate(spec.data):
        repair_policy(d.repair, field=f"data[{i}].repair")
    known = [*FAMILIES[spec.model].param_names(), "addon_coef", "addon_exponent", "adv_window_bars"]
    from calibration.calibrate._accounts import is_account_key, validate_accounts

    full_space = search_space(spec)
    space = {k: v for k, v in full_space.items() if not is_account_key(k)}
    for name, p in full_space.items():
        field = f"search_space.{name}"
        if name not in known and not is_account_key(name):
            raise _bad(f"unknown parameter {name!r} for model {spec.model!r}", field)
        if p.value is not None:
            if p.low is not None or p.high is not None:
                raise _bad(f"{name}: give either a fixed value or a range, not both", field)
            continue
        if p.low is None or p.high is None:
            raise _bad(f"{name}: a range needs low and high (or a fixed value)", field)
        if not (math.isfinite(p.low) and math.isfinite(p.high)):
            raise _bad(f"{name}: bounds must be finite", field)
        if p.low >= p.high:
            raise _bad(f"{name}: empty or inverted range [{p.low}, {p.high}]", field)
        if p.log and p.low <= 0:
            raise _bad(f"{name}: a log range needs low > 0", field)
    # Every corner of the space must be a valid model (catches out-of-range bounds early).
    for corner in ("low", "high"):
        params = {k: (v.value if v.value is not None else getattr(v, corner))
                  for k, v in space.items()}
        params = {k: (round(v) if space[k].integer and v is not None else v)
                  for k, v in params.items()}
        try:
            make_model(spec.model, params)
        except InvalidParameters as exc:
            raise _bad(f"search space {corner} end: {exc}",
                       f"search_space.{exc.field}" if exc.field else "search_space") from None
    if "horizon_bars" in space and space["horizon_bars"].value is None:
        raise _bad("the close-out horizon is a policy choice, not searched: give "
                   "horizon_bars a fixed value, or set horizon / horizon_bars at the top",
                   "search_space.horizon_bars")
    if spec.horizon_bars is not None:
        to_bars(spec.horizon_bars, 60, "horizon_bars")
    if spec.horizon is not None:
        to_bars(spec.horizon, 60, "horizon")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int) or not (
            0 <= spec.seed <= MAX_SEED):
        raise _bad(f"seed must be a whole number in 0..{MAX_SEED} (numpy's seed range)",
                   "seed")
    if spec.n_trials is None and spec.timeout_seconds is None:
        raise _bad("give n_trials, timeout_seconds or both", "n_trials")
    if spec.n_trials is not None and spec.n_trials < 1:
        raise _bad("n_trials must be at least 1", "n_trials")
    if spec.timeout_seconds is not None and not spec.timeout_seconds > 0:
        raise _bad("timeout_seconds must be positive", "timeout_seconds")
    if spec.risk_appetite_bps is not None and not spec.risk_appetite_bps >= 0:
        raise _bad("risk_appetite_bps must be >= 0", "risk_appetite_bps")
    c = spec.constraints
    if c.kupiec_alpha is not None and not 0 < c.kupiec_alpha < 1:
        raise _bad("kupiec_alpha must be in (0, 1)", "constraints.kupiec_alpha")
    if c.max_premature_share is not None and not 0 <= c.max_premature_share <= 1:
        raise _bad("max_premature_share must be in [0, 1]", "constraints.max_premature_share")
    if c.max_procyclicality is not None and not c.max_procyclicality >= 1:
        raise _bad("max_procyclicality must be >= 1", "constraints.max_procyclicality")
    wf = spec.walk_forward
    if not 0 < wf.in_sample_fraction < 1:
        raise _bad("in_sample_fraction must be in (0, 1)", "walk_forward.in_sample_fraction")
    if not 1 <= wf.folds <= MAX_FOLDS:
        raise _bad(f"folds must be in 1..{MAX_FOLDS}", "walk_forward.folds")
    if spec.published is not None:
        # dotted (account-level) names are checked with the accounts section below
        for name in (*spec.published.params, *spec.published.max_change):
            if name not in known and not is_account_key(name):
                raise _bad(f"published parameter {name!r} is not a {spec.model} parameter",
                           f"published.{name}")
        for name, step in spec.published.max_change.items():
            if not step >= 0:
                raise _bad(f"max_change of {name} must be >= 0", f"published.max_change.{name}")
        try:
            make_model(spec.model, {k: v for k, v in spec.published.params.items()
                                    if not is_account_key(k)})
        except InvalidParameters as exc:
            raise _bad(f"published: {exc}", f"published.params.{exc.field}") from None
    if len(spec.stress_windows or ()) > MAX_WINDOWS:
        raise _bad(f"at most {MAX_WINDOWS} stress windows", "stress_windows")
    for i, w in enumerate(spec.stress_windows or ()):
        try:
            StressWindow.from_dates(w.name, w.start, w.end)
        except InvalidParameters as exc:
            raise _bad(str(exc), f"stress_windows[{i}]") from None
    for name, bound in (spec.constraints.max or {}).items():
        if not math.isfinite(bound):
            raise _bad(f"the bound on {name} must be finite", f"constraints.max.{name}")
    from calibration.calibrate._objectives import validate_metrics  # registry needs spec

    validate_metrics(spec)
    liquidation_config(spec.liquidation)
    validate_accounts(spec, full_space)


def liquidation_config(fields: Mapping[str, Any], field: str = "liquidation") -> LiquidationConfig:
    """``LiquidationConfig.from_mapping`` with errors naming the full path
    (``liquidation.leverages``)."""
    try:
        return LiquidationConfig.from_mapping(fields)
    except InvalidParameters as exc:
        raise _bad(str(exc), f"{field}.{exc.field}" if exc.field else field) from None


#: Fields added after studies and caches were keyed by the hash, with their defaults: left
#: out of the canonical form at those defaults, so a spec that does not use them keeps its
#: hash (and resumes its study, hits its cache).
_LATER_FIELDS: dict[str, dict[str, Any]] = {
    "objectives": {"minimize": None, "appetite_on": None},
    "constraints": {"max": None, "no_red_light_in_any_regime": False},
}


def spec_hash(spec: CalibrationSpec) -> str:
    """sha256 of the spec's canonical JSON (sorted keys): the same spec, the same hash."""
    builtins = msgspec.to_builtins(spec)
    for later in ("batch_size", "accounts"):  # added later: absent keeps the earlier hash
        if builtins.get(later) is None:
            builtins.pop(later, None)
    for section, defaults in _LATER_FIELDS.items():
        part = builtins.get(section)
        if isinstance(part, dict):
            for name, default in defaults.items():
                if name in part and part[name] == default:
                    del part[name]
    canonical = msgspec.json.encode(builtins, order="sorted")
    return hashlib.sha256(canonical).hexdigest()


def decode_spec(raw: bytes | str) -> CalibrationSpec:
    """Parse and validate a spec from JSON.

    Raises:
        InvalidParameters: malformed JSON, an unknown field, a wrong type, or a rule above;
            ``field`` names the path at fault.
    """
    try:
        spec = msgspec.json.decode(raw, type=CalibrationSpec)
    except msgspec.ValidationError as exc:
        raise _bad(f"spec: {exc}", error_path(exc) or "spec") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _bad(f"spec is not valid JSON: {exc}", "spec") from None
    validate_spec(spec)
    return spec


def error_path(exc: msgspec.ValidationError) -> str:
    """The full path (``data[0].ref``) a msgspec validation error is about; ``""`` for the
    document itself. An unknown or missing field names itself, not the object holding it."""
    text = str(exc)
    path = text.rsplit("at `", 1)[-1].rstrip("`") if "at `" in text else "$"
    path = path.removeprefix("$").removeprefix(".")
    for marker in ("unknown field `", "missing required field `"):
        if marker in text:
            name = text.split(marker, 1)[1].split("`", 1)[0]
            path = f"{path}.{name}" if path else name
    return path
