"""Account-level calibration (issue 14 item 2): the spec's ``accounts`` section, the dotted
search-space keys that address it, and one trial's account evaluation.

Search-space keys (``ParamSpec`` each, like a model parameter's):

- ``engine.<field>``: a numeric ``AccountConfig`` field of the liquidation engine
  (domain.md §10): ``engine.max_liquidations_per_bar`` (capacity, ``integer``),
  ``engine.partial_fraction``, ``engine.backstop_threshold``, ``engine.keeper_bonus_rate``,
  ``engine.liquidation_fee_rate``, ...;
- ``portfolio.<param>`` and ``portfolio.<param>[i]``: a parameter of the portfolio margin
  model of ``accounts.mode = "portfolio"`` (domain.md §8): ``portfolio.price_range`` (the
  scan range), ``portfolio.offset_credit_cap``, ``portfolio.extended_weights[2]`` (one
  element of a tuple parameter; the tuple comes from ``accounts.portfolio`` or the preset);
- ``haircuts.<ASSET>.caps_usd[i]`` (a bracket), ``haircuts.<ASSET>.ratios[i]`` (a band's
  ratio) and ``haircuts.<ASSET>.depth.<name>`` (a parameter of the tiers derived from
  depth: ``spread_rate``, ``impact_coef``, ``impact_exponent``, ``confidence``), of an asset
  named in ``accounts.haircuts`` (domain.md §9).

A trial's account evaluation (``AccountEvaluation``) replays the population once (cross or
portfolio mode, the isolated twins with it), runs the haircut coverage backtest per asset and
the portfolio coverage backtest per reference book, each only when a metric asks for it, all
of them for the recommendation's evidence (whole span, each stress window, each
out-of-sample fold).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from calibration._bars import BarSeries
from calibration._errors import DataReferenceError, InsufficientData, InvalidParameters
from calibration.spec import AccountsSpec, CalibrationSpec, ParamSpec
from calibration.windows import StressWindow

if TYPE_CHECKING:
    from calibration.accounts import (
        Account,
        AccountConfig,
        AccountResult,
        HaircutCoverage,
        Market,
        PopulationSpec,
        PortfolioBook,
        PortfolioCoverage,
    )
    from calibration.accounts._haircuts import HaircutSchedule
    from calibration.liquidation import LiquidationConfig
    from calibration.models import MarginModel, PortfolioMarginModel
    from calibration.publishing import ChangeRule

#: The parameters of tiers derived from depth (``liquidity_adjusted``) a spec may set.
DEPTH_PARAMS = ("spread_rate", "impact_coef", "impact_exponent", "confidence")
#: Accounts one run replays at most (a file's, or the generator's over the whole span): the
#: account backtest API's bound, so one trial's replay stays within memory and minutes.
MAX_ACCOUNTS = 100_000
#: Largest accounts file read, bytes (checked before it is read).
MAX_ACCOUNTS_FILE_BYTES = 64 * 2**20
#: ``AccountConfig`` fields set by the section itself, not by ``accounts.engine``.
_SET_HERE = ("mode", "haircuts")

_ENGINE_KEY = re.compile(r"^engine\.([A-Za-z_][A-Za-z0-9_]*)$")
_PORTFOLIO_KEY = re.compile(r"^portfolio\.([A-Za-z_][A-Za-z0-9_]*)(?:\[([0-9]+)\])?$")
_HAIRCUT_KEY = re.compile(
    r"^haircuts\.([A-Za-z0-9]+)\.(?:(caps_usd|ratios)\[([0-9]+)\]|depth\.([A-Za-z_]+))$")


def is_account_key(name: str) -> bool:
    """Whether a search-space key addresses the accounts section (it is dotted)."""
    return "." in name


def _engine_fields() -> dict[str, bool]:
    """Numeric ``AccountConfig`` fields → whether they are whole numbers."""
    from calibration.accounts import AccountConfig

    out = {}
    for f in dataclasses.fields(AccountConfig):
        kind = str(f.type).replace(" ", "")
        if kind in ("int", "int|None"):
            out[f.name] = True
        elif kind in ("float", "float|None"):
            out[f.name] = False
    return out


@dataclass(frozen=True)
class _Key:
    """A parsed account-level key: ``kind`` (``engine``, ``portfolio``, ``caps_usd``,
    ``ratios``, ``depth``), the asset (haircuts), the name and the index (or -1)."""

    kind: str
    name: str
    asset: str = ""
    index: int = -1


def _parse(key: str, spec: CalibrationSpec, field: str | None = None) -> _Key:
    """The key's meaning, or ``InvalidParameters`` naming ``field`` (default
    ``search_space.<key>``)."""
    field = field or f"search_space.{key}"
    a = spec.accounts
    if a is None:
        raise InvalidParameters(f"{key}: account-level keys need an accounts section "
                                "(accounts.population or accounts.file)", field=field)
    if m := _ENGINE_KEY.match(key):
        fields = _engine_fields()
        if m[1] not in fields or m[1] in _SET_HERE:
            raise InvalidParameters(f"{key}: {m[1]!r} is not a numeric engine field (known: "
                                    f"{', '.join(sorted(fields))})", field=field)
        return _Key("engine", m[1])
    if m := _PORTFOLIO_KEY.match(key):
        if a.mode != "portfolio":
            raise InvalidParameters(f"{key}: portfolio parameters need accounts.mode "
                                    "'portfolio'", field=field)
        base = _portfolio_base(a)
        names = _portfolio_class(a.portfolio_model).param_names()
        if m[1] not in names:
            raise InvalidParameters(f"{key}: {m[1]!r} is not a parameter of portfolio model "
                                    f"{a.portfolio_model!r} (known: {', '.join(names)})",
                                    field=field)
        if m[1] == "horizon_bars":
            raise InvalidParameters(f"{key}: the portfolio model runs at the spec's one "
                                    "close-out horizon (horizon / horizon_bars), not searched",
                                    field=field)
        index = -1 if m[2] is None else int(m[2])
        current = base.get(m[1])
        if index >= 0:
            if not isinstance(current, list | tuple) or index >= len(current):
                size = len(current) if isinstance(current, list | tuple) else 0
                raise InvalidParameters(f"{key}: {m[1]} has {size} element(s) here (set them "
                                        "in accounts.portfolio)", field=field)
        elif isinstance(current, list | tuple):
            raise InvalidParameters(f"{key}: {m[1]} is a list: address one element "
                                    f"({m[1]}[0])", field=field)
        return _Key("portfolio", m[1], index=index)
    if m := _HAIRCUT_KEY.match(key):
        asset = m[1]
        tiers = a.haircuts.get(asset)
        if tiers is None:
            raise InvalidParameters(f"{key}: asset {asset!r} has no tiers in accounts.haircuts",
                                    field=field)
        if m[4] is not None:
            if tiers.depth is None:
                raise InvalidParameters(f"{key}: {asset}'s tiers are not derived from depth "
                                        f"(accounts.haircuts.{asset}.depth)", field=field)
            if m[4] not in DEPTH_PARAMS:
                raise InvalidParameters(f"{key}: {m[4]!r} is not a depth parameter "
                                        f"({', '.join(DEPTH_PARAMS)})", field=field)
            return _Key("depth", m[4], asset=asset)
        kind, index = m[2], int(m[3])
        if kind == "ratios" and tiers.ratios is None:
            raise InvalidParameters(f"{key}: {asset}'s ratios are derived from depth; search "
                                    f"haircuts.{asset}.depth.* instead", field=field)
        size = len(tiers.caps_usd) + (1 if kind == "ratios" else 0)
        if index >= size:
            raise InvalidParameters(f"{key}: {asset} has {size} {kind}", field=field)
        return _Key(kind, kind, asset=asset, index=index)
    raise InvalidParameters(f"{key}: not a model parameter nor an account-level key "
                            "(engine.<field>, portfolio.<param>[i], haircuts.<ASSET>.ratios[i], "
                            "haircuts.<ASSET>.caps_usd[i], haircuts.<ASSET>.depth.<name>)",
                            field=field)


def _portfolio_class(name: str) -> Any:
    from calibration.models._portfolio import (
        PORTFOLIO_FAMILIES,
        PORTFOLIO_PRESETS,
        GridPortfolioMargin,
    )

    if name in PORTFOLIO_PRESETS:
        return GridPortfolioMargin
    if name in PORTFOLIO_FAMILIES:
        return PORTFOLIO_FAMILIES[name]
    known = sorted(PORTFOLIO_FAMILIES) + sorted(PORTFOLIO_PRESETS)
    raise InvalidParameters(f"unknown portfolio model {name!r}; choose one of "
                            f"{', '.join(known)}", field="accounts.portfolio_model")


def _portfolio_base(a: AccountsSpec) -> dict[str, Any]:
    """The portfolio model's fixed parameters: the preset's, then ``accounts.portfolio``."""
    from calibration.models._portfolio import PORTFOLIO_PRESETS

    return {**PORTFOLIO_PRESETS.get(a.portfolio_model, {}), **a.portfolio}


def account_keys(space: Mapping[str, ParamSpec]) -> list[str]:
    """The account-level keys of a search space, in order."""
    return [k for k in space if is_account_key(k)]


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model parameters, account-level parameters)`` of one trial."""
    model = {k: v for k, v in params.items() if not is_account_key(k)}
    return model, {k: v for k, v in params.items() if is_account_key(k)}


# --------------------------------------------------------------------------- publishing


def key_rule(key: str, spec: CalibrationSpec, limit: float | None = None) -> ChangeRule:
    """The publishing rule of one account-level key: its parameter's rule in the kind it
    publishes as (``engine.partial_fraction`` → ``partial_fraction``,
    ``haircuts.BTC.ratios[1]`` → ``ratios``), an element of a list moving as the list's
    elements do (``elementwise_absolute`` → ``absolute``); ``limit`` replaces the default."""
    from calibration.publishing import ChangeRule, rule_for

    rule = rule_for(_parse(key, spec).name, limit)
    if rule.kind == "elementwise_absolute":
        return ChangeRule("absolute", rule.limit)
    if rule.kind == "elementwise_relative":
        return ChangeRule("relative", rule.limit)
    return rule


@dataclass(frozen=True)
class AccountPublication:
    """One parameter set an account-level recommendation publishes (issue 14 item 4).

    Attributes:
        path: what its search keys start with: ``engine``, ``portfolio`` or
            ``haircuts.<ASSET>``; a guardrail refusal names ``<path>.<parameter>``.
        kind: the publishing kind (``liquidation_engine``, ``portfolio_grid``,
            ``haircuts``; ``calibration.publishing.PUBLISHED_KINDS``).
        params: the whole set in force, in each parameter's units: every scalar engine
            field, the grid's parameters at the spec's horizon, or the asset's
            ``{caps_usd, ratios}``; each with ``preset`` when ``accounts.engine`` names one.
    """

    path: str
    kind: str
    params: dict[str, Any]


def account_publications(spec: CalibrationSpec, params: Mapping[str, Any], *,
                         bar_seconds: int, horizon_bars: int,
                         schedules: Mapping[str, Mapping[str, Any]] | None = None,
                         ) -> list[AccountPublication]:
    """What a recommendation's account-level keys publish: the engine settings when an
    ``engine.*`` key is there, the portfolio grid for ``portfolio.*``, one haircut schedule
    per asset with a ``haircuts.<ASSET>.*`` key; each the whole set the trial ran with.

    Args:
        spec: the calibration's spec.
        params: the recommendation's parameters (model ones are ignored).
        bar_seconds: the data's bar size (s), for the engine's holding and latency.
        horizon_bars: the run's close-out horizon (the portfolio model's).
        schedules: asset (upper case) → ``{caps_usd, ratios}`` the recommendation's evidence
            shows; needed for tiers derived from depth.

    Raises:
        InvalidParameters: a set that cannot be published (a portfolio model that is not a
            scenario grid; depth-derived tiers without their schedule), naming the field.
    """
    from calibration.calibrate._prepare import _liquidation_config

    keys = {k: _parse(k, spec) for k in params if is_account_key(k)}
    a = spec.accounts
    if not keys or a is None:
        return []
    out = []
    engine = {p.name: params[k] for k, p in keys.items() if p.kind == "engine"}
    if engine:
        config = engine_config(a, _liquidation_config(spec, bar_seconds), engine, {})
        fields = {name: getattr(config, name) for name in config.__dataclass_fields__
                  if isinstance(getattr(config, name), bool | int | float | str)}
        out.append(AccountPublication("engine", "liquidation_engine", fields))
    portfolio = {k: params[k] for k, p in keys.items() if p.kind == "portfolio"}
    if portfolio:
        from calibration.models import GridPortfolioMargin

        if _portfolio_class(a.portfolio_model) is not GridPortfolioMargin:
            raise InvalidParameters(
                f"portfolio: a {a.portfolio_model!r} portfolio model is not publishable "
                "(portfolio_grid publishes scenario grids)", field="accounts.portfolio_model")
        grid = portfolio_model(a, portfolio, horizon_bars).get_params()
        out.append(AccountPublication("portfolio", "portfolio_grid", {
            n: [float(x) for x in v] if isinstance(v, list | tuple) else v
            for n, v in grid.items()}))
    for asset in sorted({p.asset for p in keys.values() if p.asset}):
        path = f"haircuts.{asset}"
        if a.haircuts[asset].ratios is not None:
            values = {k: params[k] for k, p in keys.items() if p.asset == asset}
            built = haircut_schedules(a, values, None, 1)[asset.upper()]
            schedule = {"caps_usd": [float(c) for c in built.caps_usd],
                        "ratios": [float(r) for r in built.ratios]}
        else:
            shown = (schedules or {}).get(asset.upper())
            if shown is None:
                raise InvalidParameters(f"{path}: tiers derived from depth need the "
                                        "recommendation's evidence (its schedule)",
                                        field=f"accounts.{path}.depth")
            schedule = {"caps_usd": [float(c) for c in shown["caps_usd"]],
                        "ratios": [float(r) for r in shown["ratios"]]}
        out.append(AccountPublication(path, "haircuts", schedule))
    if "preset" in a.engine:
        # every set names the venue it was calibrated for: a DeFi venue's steward caps
        # then stay with each key (the preset may not change in an update)
        out = [dataclasses.replace(p, params={"preset": a.engine["preset"], **p.params})
               for p in out]
    return out


# --------------------------------------------------------------------------- building


def _remap(exc: InvalidParameters, prefix: str, strip: str = "") -> InvalidParameters:
    field = exc.field or ""
    if strip and field.startswith(strip):
        field = field[len(strip):]
    return InvalidParameters(f"{prefix}: {exc}", field=f"{prefix}.{field}" if field else prefix)


def engine_config(a: AccountsSpec, liquidation: LiquidationConfig | None,
                  values: Mapping[str, Any], schedules: Mapping[str, HaircutSchedule],
                  field: str = "accounts.engine") -> AccountConfig:
    """The trial's ``AccountConfig``: the liquidation settings' holding and latency, then
    ``accounts.engine`` (a preset expanded), then the searched ``values``."""
    from calibration.accounts import AccountConfig

    for name in _SET_HERE:
        if name in a.engine:
            raise InvalidParameters(f"accounts.engine.{name}: set accounts.{name} instead",
                                    field=f"accounts.engine.{name}")
    defaults: dict[str, Any] = {}
    if liquidation is not None:
        defaults = {"holding_bars": liquidation.holding_bars,
                    "latency_bars": liquidation.latency_bars}
    raw = {**a.engine, **values, "mode": a.mode}
    try:
        config = AccountConfig.from_mapping(raw, **defaults)
    except InvalidParameters as exc:
        raise _remap(exc, field, "liquidation.") from None
    return dataclasses.replace(config, haircuts=dict(schedules))


def portfolio_model(a: AccountsSpec, values: Mapping[str, Any], horizon_bars: int | None
                    ) -> PortfolioMarginModel:
    """The trial's portfolio model: the fixed parameters with the searched ``values``
    (``name`` or ``name[i]``) over them, at the run's horizon."""
    from calibration.models import make_portfolio_model

    params = _portfolio_base(a)
    for key, value in values.items():
        m = _PORTFOLIO_KEY.match(key)
        assert m is not None
        if m[2] is None:
            params[m[1]] = value
        else:
            items = list(params[m[1]])
            items[int(m[2])] = value
            params[m[1]] = items
    if horizon_bars is not None:
        params["horizon_bars"] = horizon_bars
    try:
        model = make_portfolio_model(a.portfolio_model, params)
    except InvalidParameters as exc:
        raise _remap(exc, "accounts.portfolio") from None
    return model


def haircut_schedules(a: AccountsSpec, values: Mapping[str, Any],
                      liquidity: Mapping[str, tuple[float, float]] | None,
                      liquidation_bars: int) -> dict[str, HaircutSchedule]:
    """asset (upper case) → the trial's schedule: brackets and ratios with the searched
    ``values`` over them, or ratios derived from depth (``liquidity``: asset →
    ``(depth_usd, sigma_per_bar)`` of the in-sample bars; ``None`` in validation, where
    depth-derived tiers are skipped). Ratios are made non-increasing (running minimum)."""
    from calibration.accounts._haircuts import liquidity_adjusted, tiered

    out = {}
    for asset, tiers in a.haircuts.items():
        caps = list(tiers.caps_usd)
        ratios = list(tiers.ratios) if tiers.ratios is not None else None
        depth = dict(tiers.depth or {})
        for key, value in values.items():
            m = _HAIRCUT_KEY.match(key)
            if m is None or m[1] != asset:
                continue
            if m[4] is not None:
                depth[m[4]] = value
            elif m[2] == "caps_usd":
                caps[int(m[3])] = value
            else:
                assert ratios is not None
                ratios[int(m[3])] = value
        where = f"accounts.haircuts.{asset}"
        if ratios is None:
            if liquidity is None:
                continue
            depth_usd, sigma = liquidity[asset]
            try:
                schedule = liquidity_adjusted(depth_usd=depth_usd, sigma_per_bar=sigma,
                                              liquidation_bars=liquidation_bars,
                                              caps_usd=caps, **depth)
            except InvalidParameters as exc:
                raise InvalidParameters(f"{where}: {exc}", field=f"{where}.depth") from None
            out[asset.upper()] = schedule
            continue
        try:
            schedule = tiered(caps, ratios)
        except InvalidParameters as exc:
            raise _remap(exc, where, "haircuts.") from None
        out[asset.upper()] = tiered(caps, list(np.minimum.accumulate(schedule.ratios)))
    return out


def validate_accounts(spec: CalibrationSpec, space: Mapping[str, ParamSpec]) -> None:
    """Refuse an accounts section or account-level key that cannot run, naming the field
    (``accounts.engine.partial_fraction``, ``search_space.haircuts.BTC.ratios[3]``), before
    any data is read."""
    keys = {k: _parse(k, spec) for k in account_keys(space)}
    if spec.published is not None:
        for part in ("params", "max_change"):
            for key in getattr(spec.published, part):
                if is_account_key(key):
                    _parse(key, spec, f"published.{part}.{key}")
        for key in spec.published.max_change:
            if is_account_key(key) and key not in spec.published.params:
                raise InvalidParameters(f"published.max_change.{key}: give its value in "
                                        f"force in published.params", field=
                                        f"published.max_change.{key}")
    a = spec.accounts
    if a is None:
        return
    from calibration.accounts import PopulationSpec

    if a.file is not None and a.population is not None:
        raise InvalidParameters("accounts: give population or file, not both",
                                field="accounts.file")
    if a.file is None:
        try:
            PopulationSpec.from_mapping({"seed": spec.seed, **(a.population or {})})
        except InvalidParameters as exc:
            raise _remap(exc, "accounts.population", "population.") from None
    if a.mode != "portfolio" and (a.portfolio or a.portfolio_model != "grid"):
        raise InvalidParameters("accounts.portfolio: a portfolio model needs accounts.mode "
                                "'portfolio'", field="accounts.portfolio")
    if a.mode == "portfolio":
        _portfolio_class(a.portfolio_model)
        if "horizon_bars" in a.portfolio:
            raise InvalidParameters("accounts.portfolio.horizon_bars: the portfolio model runs "
                                    "at the spec's one close-out horizon (horizon / "
                                    "horizon_bars)", field="accounts.portfolio.horizon_bars")
        for name in _portfolio_base(a):
            if name not in _portfolio_class(a.portfolio_model).param_names():
                raise InvalidParameters(f"accounts.portfolio: unknown parameter {name!r}",
                                        field=f"accounts.portfolio.{name}")
    for asset, tiers in a.haircuts.items():
        where = f"accounts.haircuts.{asset}"
        if (tiers.ratios is None) == (tiers.depth is None):
            raise InvalidParameters(f"{where}: give ratios or depth, one of them",
                                    field=f"{where}.ratios")
        for name, value in (tiers.depth or {}).items():
            if name not in DEPTH_PARAMS:
                raise InvalidParameters(f"{where}.depth: unknown parameter {name!r} (known: "
                                        f"{', '.join(DEPTH_PARAMS)})",
                                        field=f"{where}.depth.{name}")
            _check_depth(name, value, f"{where}.depth.{name}")
    for key, parsed in keys.items():
        p = space[key]
        integer = parsed.kind == "engine" and _engine_fields()[parsed.name]
        if integer and p.value is None and not p.integer:
            raise InvalidParameters(f"{key}: a whole-number field: set integer true",
                                    field=f"search_space.{key}")
        if parsed.kind == "depth":
            for corner in (p.value,) if p.value is not None else (p.low, p.high):
                _check_depth(parsed.name, corner, f"search_space.{key}")
    _check_brackets(a, space, keys)
    haircut_schedules(a, {}, None, 1)  # the fixed tiers alone, before the corners
    for corner in ("low", "high"):
        values = {}
        for key in keys:
            p = space[key]
            v = p.value if p.value is not None else getattr(p, corner)
            values[key] = round(v) if p.integer and v is not None else v
        try:
            schedules = haircut_schedules(a, values, None, 1)
            engine_config(a, None, {keys[k].name: v for k, v in values.items()
                                    if keys[k].kind == "engine"}, schedules)
            if a.mode == "portfolio":
                portfolio_model(a, {k: v for k, v in values.items()
                                    if keys[k].kind == "portfolio"}, None)
        except InvalidParameters as exc:
            # Name the searched key when the refused field is one (``accounts.engine.X``
            # from ``engine.X``), else the section's field.
            field = exc.field or "search_space"
            searched = field.removeprefix("accounts.")
            if searched in keys:
                field = f"search_space.{searched}"
            raise InvalidParameters(f"search space {corner} end: {exc}", field=field) from None


def _check_depth(name: str, value: Any, field: str) -> None:
    ok = isinstance(value, int | float) and math.isfinite(value) and {
        "spread_rate": lambda v: 0 <= v < 1, "impact_coef": lambda v: v >= 0,
        "impact_exponent": lambda v: v > 0, "confidence": lambda v: 0.5 < v < 1,
    }[name](value)
    if not ok:
        raise InvalidParameters(f"{field}: {value!r} is out of range for {name}", field=field)


def _check_brackets(a: AccountsSpec, space: Mapping[str, ParamSpec],
                    keys: Mapping[str, _Key]) -> None:
    """Searched brackets must increase for every draw: each bracket's range lies below the
    next one's (fixed brackets are a one-point range)."""
    for asset, tiers in a.haircuts.items():
        ranges = [(float(c), float(c), f"accounts.haircuts.{asset}.caps_usd[{i}]")
                  for i, c in enumerate(tiers.caps_usd)]
        for key, parsed in keys.items():
            if parsed.kind == "caps_usd" and parsed.asset == asset:
                p = space[key]
                lo = p.value if p.value is not None else p.low
                hi = p.value if p.value is not None else p.high
                assert lo is not None  # validate_spec checked ranges first
                assert hi is not None
                ranges[parsed.index] = (float(lo), float(hi), f"search_space.{key}")
        for (_, hi, _), (lo, _, field) in itertools.pairwise(ranges):
            if not hi < lo:
                raise InvalidParameters(f"{field}: brackets must increase for every draw (the "
                                        "range of a bracket must lie above the one before)",
                                        field=field)


# --------------------------------------------------------------------------- prepared


@dataclass(frozen=True)
class AccountSetup:
    """What a run's account evaluations share, prepared once.

    Attributes:
        section: the spec's accounts section (a default one for ``contagion`` without it).
        accounts: the accounts of ``accounts.file`` (``None``: generated per span).
        population: the generator's settings (``None`` with a file).
        liquidity: asset → ``(depth_usd, sigma_per_bar)`` of its pricing instrument over
            the in-sample bars (median order-book bid depth, else the volume estimate; the
            standard deviation of one-bar log returns), for tiers derived from depth.
        books: the portfolio coverage backtest's reference books.
        liquidation_bars: the haircut coverage backtest's ``h``.
        populations: the generated accounts per span and first bar, drawn on first use
            and reused by every later trial (``population_for``).
    """

    section: AccountsSpec
    accounts: tuple[Account, ...] | None
    population: PopulationSpec | None
    liquidity: dict[str, tuple[float, float]]
    books: tuple[PortfolioBook, ...]
    liquidation_bars: int
    populations: dict[tuple[Any, ...], tuple[Account, ...]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False)

    def population_for(self, market: Market, first_bar: int) -> tuple[Account, ...]:
        """The accounts replayed on ``market`` (the file's, or the generator's drawn once
        per span and first bar: the draw depends on nothing else, so reusing it gives every
        trial the same accounts it would draw itself)."""
        if self.accounts is not None:
            return self.accounts
        from calibration.accounts import generate_population

        assert self.population is not None
        ts = market.timestamp_ms
        key = (tuple(market.instruments), int(ts.shape[0]), int(ts[0]), int(ts[-1]),
               int(first_bar))
        found = self.populations.get(key)
        if found is None:
            if len(self.populations) >= 16:  # a searched warm-up: keep the memo bounded
                self.populations.clear()
            found = self.populations[key] = tuple(generate_population(
                self.population, instruments=market.instruments, timestamp_ms=ts,
                close=market.matrix("close"), first_bar=first_bar))
        return found


def prepare_accounts(spec: CalibrationSpec, root: Any, full: Sequence[BarSeries],
                     in_sample: Sequence[BarSeries],
                     liquidation: LiquidationConfig, horizon_bars: int,
                     fingerprints: dict[str, str]) -> AccountSetup | None:
    """The spec's account setup (``None`` without a section, unless ``contagion`` is a
    metric: then the seeded default population in cross mode). A file's fingerprint joins
    ``fingerprints`` as ``accounts:<ref>``.

    Raises:
        DataReferenceError, InvalidParameters: the file, or a name the market lacks.
    """
    from calibration.accounts import (
        PopulationSpec,
        PortfolioBook,
        basket_book,
        load_accounts,
        long_short_book,
    )
    from calibration.accounts._market import volume_depth_usd
    from calibration.calibrate._objectives import metric_bounds, objective_names

    a = spec.accounts
    if a is None:
        if "contagion" not in (*objective_names(spec), *metric_bounds(spec)):
            return None
        a = AccountsSpec()
    accounts = None
    population = None
    if a.file is not None:
        from calibration.data import resolve_ref

        try:
            path = resolve_ref(a.file, root)
        except DataReferenceError as exc:
            exc.field = "accounts.file"  # type: ignore[attr-defined]
            raise
        if path.stat().st_size > MAX_ACCOUNTS_FILE_BYTES:
            raise InvalidParameters(f"accounts.file is larger than {MAX_ACCOUNTS_FILE_BYTES} "
                                    "bytes", field="accounts.file")
        raw = path.read_bytes()
        fingerprints[f"accounts:{a.file}"] = hashlib.sha256(raw).hexdigest()
        try:
            accounts = tuple(load_accounts(raw.decode("utf-8", errors="replace")))
        except InvalidParameters as exc:
            raise _remap(exc, "accounts.file") from None
        first = int(in_sample[0].timestamp_ms[0])
        end = int(in_sample[0].timestamp_ms[-1])
        if len(accounts) > MAX_ACCOUNTS:
            raise InvalidParameters(f"accounts.file has {len(accounts)} accounts; at most "
                                    f"{MAX_ACCOUNTS}", field="accounts.file")
        if not any(first <= acc.entry_ms < end for acc in accounts):
            raise InsufficientData("accounts.file: no account opens inside the in-sample span")
    else:
        population = PopulationSpec.from_mapping(
            {"seed": spec.seed, "entry_every_bars": liquidation.entry_every_bars,
             **(a.population or {})})
        n_bars = max(len(b) for b in full)
        drawn = -(-n_bars // population.entry_every_bars) * population.accounts_per_entry
        if drawn > MAX_ACCOUNTS:
            raise InvalidParameters(
                f"accounts.population draws about {drawn} accounts over the data; at most "
                f"{MAX_ACCOUNTS} (fewer accounts_per_entry, or a larger entry_every_bars)",
                field="accounts.population.accounts_per_entry")
    names = [b.instrument for b in in_sample]
    from calibration.accounts import underlying_of

    unders: dict[str, BarSeries] = {}
    for b in in_sample:
        unders.setdefault(underlying_of(b.instrument), b)
    liquidity = {}
    for asset in a.haircuts:
        bars = unders.get(asset.upper())
        if bars is None:
            raise InvalidParameters(f"accounts.haircuts.{asset}: no instrument on {asset} in "
                                    f"the data ({', '.join(names)}) to price it",
                                    field=f"accounts.haircuts.{asset}")
        depth = None
        if bars.bid_depth_usd is not None:
            depth = np.asarray(bars.bid_depth_usd, dtype=np.float64)
        if depth is None or np.isnan(depth).all():
            depth = volume_depth_usd(bars, a.haircut_coverage.depth_fraction_of_adv,
                                     liquidation.adv_window_bars)
        level = float(np.nanmedian(depth)) if depth is not None else math.nan
        sigma = float(np.std(np.diff(np.log(np.asarray(bars.close, dtype=np.float64)))))
        if a.haircuts[asset].depth is not None and not (math.isfinite(level) and level > 0):
            raise InvalidParameters(f"accounts.haircuts.{asset}.depth: {bars.instrument} has "
                                    "neither order-book depth nor volume to derive tiers from",
                                    field=f"accounts.haircuts.{asset}.depth")
        liquidity[asset] = (level, sigma)
    books: tuple[PortfolioBook, ...] = ()
    if a.mode == "portfolio":
        pc = a.portfolio_coverage
        if pc.books is not None:
            for i, book in enumerate(pc.books):
                for name in book.notional_usd:
                    if name not in names:
                        raise InvalidParameters(
                            f"accounts.portfolio_coverage.books[{i}]: instrument {name!r} is "
                            f"not in the data ({', '.join(names)})",
                            field=f"accounts.portfolio_coverage.books[{i}].notional_usd")
            books = tuple(PortfolioBook(b.name, dict(b.notional_usd), dict(b.collateral_usd))
                          for b in pc.books)
        else:
            books = ((long_short_book(names[0], names[1]),) if len(names) > 1 else ()) + (
                basket_book(names),)
    return AccountSetup(section=a, accounts=accounts, population=population,
                        liquidity=liquidity, books=books,
                        liquidation_bars=a.haircut_coverage.liquidation_bars or horizon_bars)


# --------------------------------------------------------------------------- one trial


def _green_excess(breaches: int, observations: int, p: float) -> float:
    from calibration.accounts._haircut_calibration import green_limit

    return float(breaches - green_limit(observations, p))


class AccountEvaluation:
    """One parameter set's account-level figures on one span, each computed on first use.

    Args:
        setup: the run's ``AccountSetup``.
        model: the per-instrument margin model (with the run's horizon).
        bars: the span's bars (in-sample, or the whole span).
        values: the trial's account-level parameters (dotted keys).
        liquidation: the run's liquidation settings (holding, latency, ADV window).
        horizon_bars: the close-out horizon.
        windows: the windows of the evidence (stress windows, then folds).
    """

    def __init__(self, setup: AccountSetup, model: MarginModel, bars: Sequence[BarSeries],
                 values: Mapping[str, Any], liquidation: LiquidationConfig, horizon_bars: int,
                 windows: Sequence[StressWindow]) -> None:
        self.setup = setup
        self.model = model
        self.bars = tuple(bars)
        self.values = dict(values)
        self.liquidation = liquidation
        self.horizon_bars = horizon_bars
        self.windows = tuple(windows)

    def _of(self, prefix: str) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k.startswith(prefix)}

    @cached_property
    def market(self) -> Market:
        from calibration.accounts import Market

        return Market.from_series(self.bars)

    @cached_property
    def schedules(self) -> dict[str, HaircutSchedule]:
        """asset → the trial's haircut schedule."""
        return haircut_schedules(self.setup.section, self._of("haircuts."),
                                 self.setup.liquidity, self.setup.liquidation_bars)

    @cached_property
    def config(self) -> AccountConfig:
        """The trial's engine configuration."""
        engine = {k.removeprefix("engine."): v for k, v in self._of("engine.").items()}
        return engine_config(self.setup.section, self.liquidation, engine, self.schedules)

    @cached_property
    def portfolio(self) -> PortfolioMarginModel | None:
        """The trial's portfolio model (``mode="portfolio"``), else ``None``."""
        if self.setup.section.mode != "portfolio":
            return None
        return portfolio_model(self.setup.section, self._of("portfolio."), self.horizon_bars)

    @cached_property
    def replay(self) -> AccountResult:
        """The population replayed once (with its isolated twins)."""
        from calibration.accounts import simulate_accounts

        market = self.market
        accounts = list(self.setup.population_for(market, self.model.first_valid_bar()))
        return simulate_accounts(market, self.model, accounts, self.config,
                                 portfolio=self.portfolio)

    @cached_property
    def haircut_rows(self) -> dict[str, list[HaircutCoverage]]:
        """asset → the haircut coverage backtest of its schedule on its pricing instrument
        (every holding: ``all``, then each window)."""
        from calibration.accounts import haircut_coverage, underlying_of

        hc = self.setup.section.haircut_coverage
        out = {}
        for asset, schedule in self.schedules.items():
            bars = next(b for b in self.bars if underlying_of(b.instrument) == asset)
            holdings = hc.holdings_usd or ([*schedule.caps_usd, 2 * schedule.caps_usd[-1]]
                                           if schedule.caps_usd else [1e6])
            out[asset] = haircut_coverage(
                bars, schedule, holdings_usd=holdings,
                liquidation_bars=self.setup.liquidation_bars,
                spread_rate=hc.spread_rate, impact_coef=hc.impact_coef,
                impact_exponent=hc.impact_exponent,
                depth_fraction_of_adv=hc.depth_fraction_of_adv,
                adv_window_bars=self.liquidation.adv_window_bars,
                expected_breach_rate=hc.expected_breach_rate, overlapping=hc.overlapping,
                stress_windows=self.windows)
        return out

    @cached_property
    def portfolio_rows(self) -> list[tuple[PortfolioBook, PortfolioCoverage]]:
        """Each reference book's portfolio coverage backtest under the trial's model."""
        from calibration.accounts import portfolio_coverage

        model = self.portfolio
        if model is None:
            return []
        pc = self.setup.section.portfolio_coverage
        return [(book, portfolio_coverage(self.market, model, book,
                                          horizon_bars=self.horizon_bars,
                                          confidence=pc.confidence, step_bars=pc.step_bars,
                                          requirement=pc.requirement,
                                          loss_prices=pc.loss_prices))
                for book in self.setup.books]

    def value_of(self, key: str, spec: CalibrationSpec) -> Any:
        """The value in force for an account-level key in this trial: the engine field, the
        schedule's bracket or ratio (after the running minimum), the depth parameter, the
        portfolio parameter (or its element)."""
        parsed = _parse(key, spec)
        if parsed.kind == "engine":
            return getattr(self.config, parsed.name)
        if parsed.kind in ("caps_usd", "ratios"):
            schedule = self.schedules[parsed.asset.upper()]
            return float(getattr(schedule, parsed.kind)[parsed.index])
        if parsed.kind == "depth":
            tiers = self.setup.section.haircuts[parsed.asset]
            return self.values.get(key, (tiers.depth or {}).get(parsed.name))
        assert self.portfolio is not None
        value = self.portfolio.get_params()[parsed.name]
        return value if parsed.index < 0 else float(value[parsed.index])

    def guardrail(self, spec: CalibrationSpec, published: Mapping[str, Any],
                  max_change: Mapping[str, float]) -> float:
        """The worst ``Move.scaled`` of the account-level keys of ``max_change``, from the
        value in ``published`` to this trial's (≤ 0: every move allowed). Each key moves
        under its publishing rule (``ratios[i]`` as the schedule's ratios, one element)."""
        from calibration.publishing import measure_change

        worst = -1.0
        for key, limit in max_change.items():
            move = measure_change(published[key], self.value_of(key, spec),
                                  key_rule(key, spec, limit))
            worst = max(worst, move.scaled)
        return worst

    # -- metrics ------------------------------------------------------------------------

    def haircut_excess(self) -> float:
        """The most breaches beyond a green traffic light over assets and holdings, whole
        span (count; ≤ 0: every holding green)."""
        return max(_green_excess(r.breaches, r.observations, r.expected_breach_rate)
                   for rows in self.haircut_rows.values() for r in rows if r.window == "all")

    def portfolio_excess(self) -> float:
        """The most breaches beyond a green traffic light over the reference books (count)."""
        return max(_green_excess(c.breaches, c.observations, 1.0 - c.confidence)
                   for _, c in self.portfolio_rows)

    def portfolio_capital(self) -> float:
        """Mean requirement per gross notional, averaged over the books (fraction)."""
        return float(np.mean([c.mean_requirement_usd / _gross(book)
                              for book, c in self.portfolio_rows]))

    def held_back(self) -> float:
        """Collateral value the schedules hold back, Σ (V − H(V)) / Σ V over the assets'
        reference holdings (fraction of value)."""
        held = value = 0.0
        for rows in self.haircut_rows.values():
            for r in rows:
                if r.window == "all":
                    held += r.holding_usd - r.haircut_value_usd
                    value += r.holding_usd
        return held / value if value else 0.0

    # -- evidence -----------------------------------------------------------------------

    def evidence(self) -> dict[str, Any]:
        """Everything, whole span and each window: the replay's figures
        (``windows_summary``), each haircut and portfolio coverage row, and the parameters
        in force (schedules, engine fields searched, portfolio model)."""
        from calibration.accounts import windows_summary

        section = self.setup.section
        out: dict[str, Any] = {
            "mode": section.mode,
            "replay": windows_summary(self.replay, self.windows),
            "haircuts": {a: {"caps_usd": list(s.caps_usd), "ratios": list(s.ratios)}
                         for a, s in self.schedules.items()},
            "engine": {k.removeprefix("engine."): getattr(self.config,
                                                          k.removeprefix("engine."))
                       for k in self._of("engine.")},
        }
        if self.schedules:
            out["haircut_coverage"] = [{"asset": asset, **dataclasses.asdict(r)}
                                       for asset, rows in self.haircut_rows.items()
                                       for r in rows]
        if self.portfolio is not None:
            out["portfolio"] = self.portfolio.get_params()
            out["portfolio_coverage"] = [row for book, c in self.portfolio_rows
                                         for row in _portfolio_windows(self.market, book, c,
                                                                       self.windows)]
        return out


def _gross(book: PortfolioBook) -> float:
    return float(sum(abs(v) for v in book.notional_usd.values())) or 1.0


def _portfolio_windows(market: Market, book: PortfolioBook, cov: PortfolioCoverage,
                       windows: Sequence[StressWindow]) -> list[dict[str, Any]]:
    """One book's coverage over the whole span and each window its observations meet (an
    observation belongs to a window when its loss interval (t, t+h] overlaps it, §3)."""
    from calibration.stats import kupiec_pvalue_one_sided, traffic_light

    ts = np.asarray(market.timestamp_ms, dtype=np.int64)
    bar_ms = market.bar_seconds * 1000
    obs = cov.observation_bars
    start = ts[obs] + bar_ms
    end = ts[np.minimum(obs + cov.horizon_bars, len(ts) - 1)] + bar_ms
    p = 1.0 - cov.confidence
    groups = [("all", np.ones(obs.shape[0], dtype=bool))]
    groups += [(w.name, (start < w.end_ms) & (end > w.start_ms)) for w in windows]
    rows = []
    for name, member in groups:
        n = int(member.sum())
        if name != "all" and n == 0:
            continue
        x = int(cov.breach[member].sum())
        uncovered = np.maximum(0.0, cov.loss_usd[member] - cov.requirement_usd[member])
        rows.append({
            "book": book.name, "window": name, "observations": n, "breaches": x,
            "breach_rate": x / n if n else 0.0, "expected_breach_rate": p,
            "kupiec_pvalue_one_sided": kupiec_pvalue_one_sided(n, x, p) if n else 1.0,
            "traffic_light": traffic_light(n, x, p) if n else "insufficient",
            "mean_requirement_rate": (float(cov.requirement_usd[member].mean()) / _gross(book)
                                      if n else 0.0),
            "max_uncovered_loss_usd": float(uncovered.max()) if n else 0.0,
        })
    return rows


__all__ = [
    "AccountEvaluation",
    "AccountPublication",
    "AccountSetup",
    "account_keys",
    "account_publications",
    "is_account_key",
    "key_rule",
    "prepare_accounts",
    "split_params",
    "validate_accounts",
]
