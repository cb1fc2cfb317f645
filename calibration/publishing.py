"""Guardrails on publishing margin parameters (pure: the service stores, this decides).

An update may move each parameter at most as far as its ``ChangeRule`` allows (as Aave's
risk stewards cap LTV moves at 0.25% per update), may come no sooner than
``min_interval_s`` after the previous one, must say why, and may not drop a parameter that
is published. Every parameter of every family has a rule (``DEFAULT_RULES``, one table);
configuration changes only the limits, never whether a parameter is guarded.

The rules compare *effective* parameters (``effective_params``): the family's defaults filled
in on both sides, so leaving a parameter out cannot move it to its default unchecked. One
function (``measure_change``) decides every max-change question, with one boundary: a change
equal to the limit is allowed. Publishing's ``check_update`` and the calibration's
``guardrail`` constraint both use it.

A violation names the guardrail and by how much it is exceeded; callers refuse the whole
update.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from calibration.horizon import DEFAULT_HORIZON, to_bars
from calibration.models import LiquidityAddon, TieredMargin, make_model
from calibration.models._liquidity import ADDON_PARAMS

RuleKind = Literal["absolute", "relative", "elementwise_relative", "elementwise_absolute",
                   "fixed"]

#: Rounding slack of the boundary: a change equal to the limit up to float error is allowed.
_EPS = 1e-9


@dataclass(frozen=True)
class ChangeRule:
    """How far one update may move one parameter.

    Attributes:
        kind: ``absolute``: ``|new - old| <= limit`` in the parameter's units;
            ``relative``: ``|new - old| / |old| <= limit`` (a fraction: 0.25 = 25%);
            ``elementwise_relative``: the relative rule on every element of a list of the
            same length; ``elementwise_absolute``: the absolute rule on every element;
            ``fixed``: the value may not change in an update at all.
        limit: the largest change (units as ``kind`` says; unused for ``fixed``).
    """

    kind: RuleKind
    limit: float


#: The one table of guardrails: every parameter of every family (and of the liquidity
#: add-on) with its rule and default limit. Bar counts move relatively (they scale with the
#: bar size); ``horizon_bars`` moves margin by √h, so 25% longer is at most ~12% more margin.
DEFAULT_RULES: dict[str, ChangeRule] = {
    # tiered
    "base_mmr": ChangeRule("absolute", 0.0025),
    "tier_growth": ChangeRule("absolute", 0.25),
    "bracket_caps_usd": ChangeRule("elementwise_relative", 0.5),
    "mmr_schedule": ChangeRule("elementwise_relative", 0.25),
    "imr_schedule": ChangeRule("elementwise_relative", 0.25),
    # shared by several families
    "im_to_mm": ChangeRule("absolute", 0.25),
    "max_rate": ChangeRule("absolute", 0.05),
    "confidence": ChangeRule("absolute", 0.005),
    "decay": ChangeRule("absolute", 0.01),
    "floor_rate": ChangeRule("absolute", 0.0025),
    "horizon_bars": ChangeRule("relative", 0.25),
    "warmup_bars": ChangeRule("relative", 0.5),
    # ewma
    "apc_buffer": ChangeRule("absolute", 0.1),
    # fhs
    "window_bars": ChangeRule("relative", 0.25),
    "stress_weight": ChangeRule("absolute", 0.1),
    "stress_lookback_bars": ChangeRule("relative", 0.25),
    "measure": ChangeRule("fixed", 0.0),
    # liquidity add-on (absent = addon_coef 0)
    "addon_coef": ChangeRule("absolute", 0.05),
    "addon_exponent": ChangeRule("absolute", 0.1),
    "adv_window_bars": ChangeRule("relative", 0.5),
    # collateral haircut schedules (model "haircuts"): the value ratio of every band moves
    # at most Aave's risk-steward LTV cap per update (venues.md §3: 0.25% absolute, AV5)
    "caps_usd": ChangeRule("elementwise_relative", 0.5),
    "ratios": ChangeRule("elementwise_absolute", 0.0025),
    # the liquidation engine (model "liquidation_engine", domain.md §10); names not listed
    # here (mode, policy, queue order, switches) may not change in an update
    "holding_bars": ChangeRule("relative", 0.5),
    "latency_bars": ChangeRule("absolute", 1.0),
    "spread_rate": ChangeRule("absolute", 0.001),
    "liquidation_fee_rate": ChangeRule("absolute", 0.0025),
    "insurance_fund_usd": ChangeRule("relative", 0.5),
    "impact_coef": ChangeRule("absolute", 0.05),
    "impact_exponent": ChangeRule("absolute", 0.1),
    "depth_fraction_of_adv": ChangeRule("relative", 0.5),
    "cascade_kappa": ChangeRule("absolute", 0.05),
    "upnl_weight": ChangeRule("absolute", 0.1),
    "partial_fraction": ChangeRule("absolute", 0.1),
    "cooldown_bars": ChangeRule("relative", 0.5),
    "max_liquidations_per_bar": ChangeRule("relative", 0.5),
    "max_liquidation_notional_per_bar": ChangeRule("relative", 0.5),
    # portfolio-margin scenario grids (model "portfolio_grid", domain.md §8); points, joint
    # and vol_scaled have no rule: they may not change in an update
    "price_range": ChangeRule("absolute", 0.02),
    "min_price_range": ChangeRule("absolute", 0.01),
    "extended_moves": ChangeRule("elementwise_absolute", 0.02),
    "extended_weights": ChangeRule("elementwise_absolute", 0.1),
    "offset_credit_cap": ChangeRule("absolute", 0.05),
    "min_delta_rate": ChangeRule("absolute", 0.0025),
    "hedged_delta_rate": ChangeRule("absolute", 0.0025),
    "mm_factor": ChangeRule("absolute", 0.05),
}

#: Parameter sets published beside margin models, through the same guardrails and audit:
#: a collateral asset's haircut schedule (``{"caps_usd": [...], "ratios": [...]}``, domain.md
#: §9), the liquidation engine's settings (scalar ``AccountConfig`` fields, §10) and a
#: portfolio-margin scenario grid (``GridPortfolioMargin`` parameters, §8).
PUBLISHED_KINDS = ("haircuts", "liquidation_engine", "portfolio_grid")

#: Presets of on-chain venues (``calibration.accounts.VENUE_PRESETS``), whose parameters
#: governance moves in small steps: their publications default to the steward caps below.
DEFI_PRESETS = ("aave_v3", "dydx_v4", "hyperliquid")
#: Aave's risk-steward caps (venues.md §3, AV5): updates at least 3 days apart; LTV and
#: liquidation threshold 0.25 points absolute, liquidation bonus 0.5 points absolute. In the
#: engine's terms: a haircut band's ratio (the share of value counted, as LTV/LT) and the
#: liquidation fee (the liquidator's bonus, ``liquidation_fee_rate``), fractions.
STEWARD_MAX_CHANGE: dict[str, float] = {"ratios": 0.0025, "liquidation_fee_rate": 0.005}
#: The steward's shortest interval between two updates (s).
STEWARD_MIN_INTERVAL_S = 3 * 86_400.0

#: The default limits alone (what ``MARGINLAB_GUARDRAILS``'s ``max_change`` overrides).
DEFAULT_MAX_CHANGE: dict[str, float] = {n: r.limit for n, r in DEFAULT_RULES.items()}


@dataclass(frozen=True)
class Guardrails:
    """Server-side limits on one update of published parameters.

    Attributes:
        max_change: parameter → largest change per update, in the units of its rule's kind
            (``DEFAULT_RULES``); a parameter not named keeps its default limit.
        min_interval_s: seconds that must pass between two updates of an instrument.
        require_reason: an update must carry a non-empty reason.
        min_reason_chars: shortest acceptable reason.
    """

    max_change: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MAX_CHANGE))
    min_interval_s: float = 0.0
    require_reason: bool = True
    min_reason_chars: int = 10

    def rule(self, name: str) -> ChangeRule:
        """The rule of ``name`` with this configuration's limit (an unknown name is fixed)."""
        return rule_for(name, self.max_change.get(name))


def steward_guardrails(guardrails: Guardrails) -> Guardrails:
    """``guardrails`` with the steward caps of DeFi presets over them: each capped limit the
    tighter of the two, updates at least ``STEWARD_MIN_INTERVAL_S`` apart."""
    limits = dict(guardrails.max_change)
    for name, cap in STEWARD_MAX_CHANGE.items():
        limits[name] = min(float(limits.get(name, DEFAULT_RULES[name].limit)), cap)
    return Guardrails(max_change=limits,
                      min_interval_s=max(guardrails.min_interval_s, STEWARD_MIN_INTERVAL_S),
                      require_reason=guardrails.require_reason,
                      min_reason_chars=guardrails.min_reason_chars)


def is_defi(params: Mapping[str, Any] | None) -> bool:
    """Whether a published set (engine settings, a haircut schedule, a portfolio grid)
    names a DeFi preset (``"preset": "aave_v3"``)."""
    return params is not None and params.get("preset") in DEFI_PRESETS


def rule_for(name: str, limit: float | None = None) -> ChangeRule:
    """``name``'s rule from ``DEFAULT_RULES``, with ``limit`` instead of the default when
    given; a parameter the table does not know may not change."""
    default = DEFAULT_RULES.get(name, ChangeRule("fixed", 0.0))
    return default if limit is None else ChangeRule(default.kind, float(limit))


@dataclass(frozen=True)
class Move:
    """How far a parameter moves under its rule.

    Attributes:
        actual: the change in the rule's units (``inf`` when it cannot be measured: a
            default that cannot be resolved, a list whose length changes, a move away from 0
            under a relative rule; 1 for any change of a ``fixed`` parameter).
        limit: the rule's limit (0 for ``fixed``).
        allowed: ``actual <= limit`` (equal is allowed, up to float rounding).
    """

    actual: float
    limit: float
    allowed: bool

    @property
    def excess(self) -> float:
        """``actual - limit`` (≤ 0 when allowed)."""
        return self.actual - self.limit

    @property
    def scaled(self) -> float:
        """A constraint value for an optimiser: ≤ 0 exactly when allowed, ``excess / limit``
        otherwise (1 for a limit of 0 or a change that cannot be measured)."""
        if self.limit > 0 and math.isfinite(self.actual):
            value = self.excess / self.limit
        else:
            value = -1.0 if self.actual == 0 else 1.0
        return min(value, 0.0) if self.allowed else max(value, 1e-9)


def measure_change(old: Any, new: Any, rule: ChangeRule) -> Move:
    """The one max-change rule: how far ``old → new`` moves under ``rule`` and whether that
    is allowed (a change equal to the limit is)."""
    if _same(old, new):
        return Move(0.0, 0.0 if rule.kind == "fixed" else rule.limit, True)
    if rule.kind == "fixed":
        return Move(1.0, 0.0, False)
    if old is None or new is None:  # a default that could not be resolved: not measurable
        return Move(math.inf, rule.limit, False)
    if rule.kind in ("elementwise_relative", "elementwise_absolute"):
        olds, news = list(old), list(new)
        if len(olds) != len(news):
            return Move(math.inf, rule.limit, False)
        step = _relative if rule.kind == "elementwise_relative" else _absolute
        actual = max((step(float(a), float(b)) for a, b in zip(olds, news, strict=True)),
                     default=0.0)
        return Move(actual, rule.limit, actual <= rule.limit + _EPS)
    a, b = float(old), float(new)
    if rule.kind == "relative":
        actual = _relative(a, b)
        return Move(actual, rule.limit, actual <= rule.limit + _EPS)
    actual = abs(b - a)
    return Move(actual, rule.limit, actual <= rule.limit + _EPS * max(1.0, abs(a), abs(b)))


def _same(old: Any, new: Any) -> bool:
    if old is None or new is None or isinstance(old, str) or isinstance(new, str):
        return bool(old == new)
    if isinstance(old, list | tuple) or isinstance(new, list | tuple):
        return (isinstance(old, list | tuple) and isinstance(new, list | tuple)
                and len(old) == len(new) and all(float(a) == float(b)
                                                 for a, b in zip(old, new, strict=True)))
    return float(old) == float(new)


def _absolute(old: float, new: float) -> float:
    return abs(new - old) if math.isfinite(old) and math.isfinite(new) else math.inf


def _relative(old: float, new: float) -> float:
    if old == new:
        return 0.0
    if old == 0 or not (math.isfinite(old) and math.isfinite(new)):
        return math.inf
    return abs(new - old) / abs(old)


def effective_params(model: str, params: Mapping[str, Any], *,
                     bar_seconds: int | None = None) -> dict[str, Any]:
    """Every parameter of ``model``'s family (and of the liquidity add-on) as the model
    will use it: defaults filled in, lists as lists of floats.

    A model without the add-on has ``addon_coef`` 0 (no add-on margin). ``tiered``'s
    ``mmr_schedule`` and ``imr_schedule`` are the per-bracket rates in force (derived from
    ``base_mmr``/``tier_growth``/``im_to_mm`` when not given). With ``bar_seconds`` the
    defaults that are durations are resolved to bars (``horizon_bars``: 1h,
    ``stress_lookback_bars``: a year); without it they stay ``None``, a value of its own
    that only an unchanged ``None`` matches.

    ``haircuts`` and ``liquidation_engine`` (``PUBLISHED_KINDS``) are validated as the account
    engine reads them, with the engine's defaults filled in.

    Raises:
        InvalidParameters: parameters the family refuses.
    """
    if model in PUBLISHED_KINDS:
        return _effective_kind(model, params)
    built = make_model(model, params)
    out = built.get_params()
    if not isinstance(built, LiquidityAddon):
        defaults = inspect.signature(LiquidityAddon.__init__).parameters
        out.update({name: defaults[name].default for name in ADDON_PARAMS})
        out["addon_coef"] = 0.0
    base = built.base if isinstance(built, LiquidityAddon) else built
    if isinstance(base, TieredMargin):
        caps, mmr, _ = base.brackets()
        out["mmr_schedule"] = [float(x) for x in mmr]
        out["imr_schedule"] = ([float(x) for x in base._imr(caps.shape[0])]
                               if base.imr_schedule is not None
                               else [float(x) * float(base.im_to_mm) for x in mmr])
    for name, value in out.items():
        if isinstance(value, list | tuple):
            out[name] = [float(x) for x in value]
    if bar_seconds is not None:
        if "horizon_bars" in out and out["horizon_bars"] is None:
            out["horizon_bars"] = to_bars(DEFAULT_HORIZON, bar_seconds, "horizon")
        if "stress_lookback_bars" in out and out["stress_lookback_bars"] is None:
            out["stress_lookback_bars"] = max(1, 365 * 86_400 // bar_seconds)
    return out


def _effective_kind(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    from calibration._errors import InvalidParameters
    from calibration.accounts import AccountConfig

    if kind != "liquidation_engine":
        # a grid or schedule may name the venue preset it was calibrated for (its DeFi
        # steward caps then apply to it, and it may not change in an update)
        preset = params.get("preset")
        if preset is not None:
            from calibration.accounts import VENUE_PRESETS

            if preset not in VENUE_PRESETS:
                raise InvalidParameters(f"unknown preset {preset!r} (known: "
                                        f"{', '.join(sorted(VENUE_PRESETS))})",
                                        field="params.preset")
        params = {k: v for k, v in params.items() if k != "preset"}
    if kind == "portfolio_grid":
        from calibration.models import make_portfolio_model

        grid = make_portfolio_model("grid", params).get_params()
        return {**{name: [float(x) for x in value] if isinstance(value, list | tuple)
                   else value for name, value in grid.items()}, "preset": preset}
    if kind == "haircuts":
        unknown = set(params) - {"caps_usd", "ratios"}
        if unknown or "ratios" not in params:
            raise InvalidParameters("a haircut schedule is {caps_usd: [USD, increasing], "
                                    "ratios: [one more fraction in [0, 1]], preset: optional "
                                    "venue}" + (f"; unknown {sorted(unknown)}" if unknown
                                                else ""), field="params")
        config = AccountConfig.from_mapping({"haircuts": {"ASSET": dict(params)}})
        schedule = config.haircuts["ASSET"]
        return {"caps_usd": [float(c) for c in schedule.caps_usd],
                "ratios": [float(r) for r in schedule.ratios], "preset": preset}
    for name, value in params.items():
        if isinstance(value, Mapping | list | tuple):
            raise InvalidParameters(f"liquidation_engine: {name} is not a single value "
                                    "(publish haircut schedules as model haircuts, one "
                                    "collateral asset each)", field=f"params.{name}")
    config = AccountConfig.from_mapping(dict(params))
    out = {name: getattr(config, name) for name in config.__dataclass_fields__
           if isinstance(getattr(config, name), bool | int | float | str)
           or getattr(config, name) is None}
    # the venue preset named, if any: it may not change (nor be dropped) in an update, so
    # a DeFi preset's steward caps stay in force for the key
    out["preset"] = params.get("preset")
    return out


@dataclass(frozen=True)
class Violation:
    """One guardrail an update breaks, with the figures.

    Attributes:
        guardrail: ``max_change``, ``dropped``, ``model``, ``min_interval`` or ``reason``.
        parameter: the parameter at fault (``max_change`` and ``dropped``).
        limit: the allowed amount (change in the rule's units, or seconds).
        actual: the requested amount (``inf``: the change cannot be measured).
        excess: ``actual - limit`` (how much too far, or too soon in seconds).
        message: one sentence for people.
        rule: the max-change rule's kind (``absolute``, ``relative``, ...), else ``None``.
        key: the published key the violation is about (``None``: the request's own).
    """

    guardrail: str
    parameter: str | None
    limit: float
    actual: float
    excess: float
    message: str
    rule: str | None = None
    key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for problem details; a change that cannot be measured has
        ``actual`` and ``excess`` null)."""
        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {"guardrail": self.guardrail, "parameter": self.parameter, "limit": self.limit,
                "actual": num(self.actual), "excess": num(self.excess),
                "message": self.message, "rule": self.rule, "key": self.key}


def check_update(
    previous: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    *,
    guardrails: Guardrails,
    seconds_since_previous: float | None,
    reason: str | None,
    model: str,
    previous_model: str | None = None,
    bar_seconds: int | None = None,
) -> list[Violation]:
    """Every guardrail the update ``previous → new`` of a ``model`` breaks (empty: it may be
    published).

    Parameters are compared as ``effective_params`` (defaults filled in on both sides,
    durations resolved with ``bar_seconds`` when known). A parameter published before and
    missing now is refused (``dropped``) whatever its default. The first publication of an
    instrument (``previous is None``) is not limited by ``max_change`` or ``min_interval_s``;
    it still needs a reason. ``previous_model`` other than ``model`` is refused (a family
    switch needs a new instrument entry).
    """
    violations: list[Violation] = []
    text = (reason or "").strip()
    if guardrails.require_reason and len(text) < guardrails.min_reason_chars:
        violations.append(Violation(
            "reason", None, float(guardrails.min_reason_chars), float(len(text)),
            float(guardrails.min_reason_chars - len(text)),
            f"a reason of at least {guardrails.min_reason_chars} characters is required",
        ))
    if previous is None:
        return violations
    if seconds_since_previous is not None and seconds_since_previous < guardrails.min_interval_s:
        wait = guardrails.min_interval_s - seconds_since_previous
        violations.append(Violation(
            "min_interval", None, guardrails.min_interval_s, seconds_since_previous, wait,
            f"the last update was {seconds_since_previous:.0f} s ago; updates must be at least "
            f"{guardrails.min_interval_s:.0f} s apart (wait {wait:.0f} s more)",
        ))
    if previous_model is not None and previous_model != model:
        violations.append(Violation(
            "model", None, 0.0, 1.0, 1.0,
            f"the instrument is published as {previous_model}; switching to {model} needs a "
            "new instrument entry"))
        return violations
    for name in sorted(set(previous) - set(new)):
        violations.append(Violation(
            "dropped", name, 0.0, 1.0, 1.0,
            f"{name} is published ({_show(previous[name])}) and missing from the update; "
            "an update must give every published parameter (it would fall back to its "
            "default unchecked)", rule=guardrails.rule(name).kind))
    old_eff = effective_params(model, previous, bar_seconds=bar_seconds)
    new_eff = effective_params(model, new, bar_seconds=bar_seconds)
    for name in sorted(set(old_eff) | set(new_eff)):
        old, cur = old_eff.get(name), new_eff.get(name)
        rule = guardrails.rule(name)
        move = measure_change(old, cur, rule)
        if not move.allowed:
            violations.append(Violation(
                "max_change", name, move.limit, move.actual, move.excess,
                _move_message(name, old, cur, rule, move), rule=rule.kind))
    return violations


def _show(value: Any) -> str:
    if value is None:
        return "the default"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(f"{float(x):.6g}" for x in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return f"{float(value):.6g}"


def _move_message(name: str, old: Any, cur: Any, rule: ChangeRule, move: Move) -> str:
    change = f"{_show(old)} → {_show(cur)}"
    if rule.kind == "fixed":
        return f"{name} would change ({change}); it may not change in an update"
    if not math.isfinite(move.actual):
        why = ("the default duration cannot be converted to bars without the instrument's "
               "bar size; give it explicitly on both sides" if old is None or cur is None
               else "the change cannot be measured (a list of another length, or a move "
                    "away from 0)")
        return f"{name} would change ({change}); {why}"
    if rule.kind == "absolute":
        return (f"{name} would move by {move.actual:.6g} ({change}); the limit per update is "
                f"{move.limit:.6g} (exceeded by {move.excess:.6g})")
    what = "an element of " + name if rule.kind == "elementwise_relative" else name
    return (f"{what} would move by {move.actual:.2%} ({change}); the limit per update is "
            f"{move.limit:.2%} (exceeded by {move.excess:.2%})")


def guardrail_constraint(model: str, published: Mapping[str, Any], params: Mapping[str, Any],
                         max_change: Mapping[str, float], *,
                         bar_seconds: int | None = None) -> float:
    """The calibration's ``guardrail`` constraint: the worst ``Move.scaled`` over the
    parameters named in ``max_change`` (≤ 0: every move allowed), on effective values."""
    old_eff = effective_params(model, published, bar_seconds=bar_seconds)
    new_eff = effective_params(model, params, bar_seconds=bar_seconds)
    worst = -1.0
    for name, limit in max_change.items():
        move = measure_change(old_eff.get(name), new_eff.get(name), rule_for(name, limit))
        worst = max(worst, move.scaled)
    return worst


def clamp_to_guardrails(previous: Mapping[str, Any], new: Mapping[str, Any],
                        guardrails: Guardrails, *, model: str,
                        parameters: Iterable[str] | None = None,
                        bar_seconds: int | None = None) -> dict[str, Any]:
    """``new`` with each parameter moved at most as far as its rule allows from
    ``previous`` (for automatic recalibration, which publishes only inside the guardrails).

    Only ``parameters`` are clamped (default: all). A parameter published and missing from
    ``new`` keeps its published value; one whose change cannot be measured (or is ``fixed``)
    keeps its previous effective value.
    """
    out = dict(new)
    for name in previous:
        if name not in out:
            out[name] = previous[name]
    old_eff = effective_params(model, previous, bar_seconds=bar_seconds)
    new_eff = effective_params(model, out, bar_seconds=bar_seconds)
    names = set(old_eff) if parameters is None else set(parameters)
    for name in sorted(names & set(old_eff) & set(out)):
        old, cur = old_eff[name], new_eff.get(name)
        rule = guardrails.rule(name)
        move = measure_change(old, cur, rule)
        if move.allowed:
            continue
        if rule.kind == "fixed" or cur is None or not math.isfinite(move.actual):
            out[name] = previous.get(name, old)
        elif rule.kind == "absolute":
            out[name] = min(max(float(cur), float(old) - rule.limit), float(old) + rule.limit)
        elif rule.kind == "relative":
            out[name] = _clamp_relative(float(old), float(cur), rule.limit,
                                        integer=isinstance(old, int) or isinstance(cur, int))
        elif rule.kind == "elementwise_absolute":
            out[name] = [min(max(float(b), float(a) - rule.limit), float(a) + rule.limit)
                         for a, b in zip(old, cur, strict=True)]
        else:
            out[name] = [_clamp_relative(float(a), float(b), rule.limit, integer=False)
                         for a, b in zip(old, cur, strict=True)]
    return out


def _clamp_relative(old: float, cur: float, limit: float, *, integer: bool) -> float | int:
    low, high = old - abs(old) * limit, old + abs(old) * limit
    value = min(max(cur, low), high)
    if integer:  # round towards the old value so the clamped count stays inside the rule
        return int(math.floor(value) if value > old else math.ceil(value))
    return value
