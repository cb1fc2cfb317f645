"""The calibration spec: what to calibrate, on which data, against which objectives.

A frozen msgspec Struct (it is also the API's request body). ``validate_spec`` checks
everything that can be checked before any data is read or any trial runs; the data-dependent
checks (stress windows inside the data, horizons shorter than it) run in
``calibration.calibrate.prepare`` before the first trial.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import msgspec

from calibration._errors import InvalidParameters
from calibration.data import repair_policy
from calibration.horizon import to_bars
from calibration.liquidation import LiquidationConfig
from calibration.models import FAMILIES, make_model
from calibration.windows import StressWindow


class DataRefSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One instrument's data: references relative to the data root, optional day range.

    ``repair`` names the opt-in repairs (``ohlc-range``, ``duplicates``; domain.md §1),
    ``timestamp_format`` the ``strftime`` format of non-ISO dates (``%d/%m/%Y``) and
    ``timestamp_unit`` the unit of epoch numbers (default: told by magnitude).
    """

    instrument: str
    ref: str
    funding: str | None = None
    depth: str | None = None
    start: str | None = None
    end: str | None = None
    repair: list[Literal["ohlc-range", "duplicates"]] = []
    timestamp_format: str | None = None
    timestamp_unit: Literal["s", "ms", "us", "ns"] | None = None


class ParamSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A search range ``[low, high]`` (``log`` for scale parameters), or a fixed ``value``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    value: Any = None


class ObjectivesSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Two objectives, minimised together (domain.md §5).

    ``capital_cost`` is always the notional-weighted mean IM rate; ``insolvency`` is
    ``bad_debt_bps`` (bad debt per notional opened, bps) or ``uncovered_es_bps`` (mean
    uncovered loss per observation beyond the margin, both sides, bps of notional).
    """

    insolvency: Literal["bad_debt_bps", "uncovered_es_bps"] = "bad_debt_bps"


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
    """

    kupiec_alpha: float | None = 0.05
    no_red_in_stress_windows: bool = True
    max_premature_share: float | None = 0.6
    max_procyclicality: float | None = None


class PublishedSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The parameters in force, and how far one update may move each (absolute units)."""

    params: dict[str, Any]
    max_change: dict[str, float] = {}


class WalkForwardSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """In-sample/out-of-sample split: trials see bars before ``in_sample_end`` (ISO day,
    exclusive; default the first ``in_sample_fraction`` of the common span), and the
    recommendation is then evaluated on ``folds`` equal later segments."""

    in_sample_end: str | None = None
    in_sample_fraction: float = 0.7
    folds: int = 2


class StressWindowSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named stress window of whole UTC days ``start .. end`` (inclusive)."""

    name: str
    start: str
    end: str | None = None


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
    """

    data: list[DataRefSpec]
    model: str
    search_space: dict[str, ParamSpec] = {}
    objectives: ObjectivesSpec = ObjectivesSpec()
    constraints: ConstraintsSpec = ConstraintsSpec()
    risk_appetite_bps: float | None = None
    published: PublishedSpec | None = None
    walk_forward: WalkForwardSpec = WalkForwardSpec()
    stress_windows: list[StressWindowSpec] | None = None
    horizon_bars: int | None = None
    horizon: str | None = None
    liquidation: dict[str, Any] = {}
    n_trials: int | None = 100
    timeout_seconds: float | None = None
    seed: int = 0
    sampler: Literal["auto", "tpe", "nsga2", "random"] = "auto"


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
    names = [d.instrument for d in spec.data]
    if len(set(names)) != len(names):
        raise _bad("two data entries name the same instrument", "data")
    for i, d in enumerate(spec.data):
        repair_policy(d.repair, field=f"data[{i}].repair")
    known = [*FAMILIES[spec.model].param_names(), "addon_coef", "addon_exponent", "adv_window_bars"]
    space = search_space(spec)
    for name, p in space.items():
        field = f"search_space.{name}"
        if name not in known:
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
    if wf.folds < 1:
        raise _bad("folds must be at least 1", "walk_forward.folds")
    if spec.published is not None:
        for name in (*spec.published.params, *spec.published.max_change):
            if name not in known:
                raise _bad(f"published parameter {name!r} is not a {spec.model} parameter",
                           f"published.{name}")
        for name, step in spec.published.max_change.items():
            if not step >= 0:
                raise _bad(f"max_change of {name} must be >= 0", f"published.max_change.{name}")
        try:
            make_model(spec.model, dict(spec.published.params))
        except InvalidParameters as exc:
            raise _bad(f"published: {exc}", f"published.params.{exc.field}") from None
    for i, w in enumerate(spec.stress_windows or ()):
        try:
            StressWindow.from_dates(w.name, w.start, w.end)
        except InvalidParameters as exc:
            raise _bad(str(exc), f"stress_windows[{i}]") from None
    LiquidationConfig.from_mapping(spec.liquidation)


def spec_hash(spec: CalibrationSpec) -> str:
    """sha256 of the spec's canonical JSON (sorted keys): the same spec, the same hash."""
    canonical = msgspec.json.encode(msgspec.to_builtins(spec), order="sorted")
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
        text = str(exc)
        path = text.rsplit("at `", 1)[-1].rstrip("`") if "at `" in text else "$"
        path = path.removeprefix("$").removeprefix(".")
        for marker in ("unknown field `", "missing required field `"):
            if marker in text:  # name the field itself, not the object holding it
                name = text.split(marker, 1)[1].split("`", 1)[0]
                path = f"{path}.{name}" if path else name
        raise _bad(f"spec: {text}", path or "spec") from None
    except msgspec.DecodeError as exc:
        raise _bad(f"spec is not valid JSON: {exc}", "spec") from None
    validate_spec(spec)
    return spec
