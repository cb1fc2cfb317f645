"""Calibration: Optuna searches a model's hyperparameters against capital and insolvency.

domain.md §5. ``prepare`` loads and splits the data once; ``evaluate`` backtests one
parameter set (coverage + liquidation) and returns the two objectives and the constraint
values; ``run_worker`` adds trials to a study until the requested count is reached (any
number of workers, processes or machines, may do so at once); ``summarize`` reads the
Pareto front and picks the recommendation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import msgspec
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from calibration._bars import BarSeries
from calibration._errors import (
    DataReferenceError,
    InsufficientData,
    InvalidParameters,
    MarginlabError,
)
from calibration._version import ENGINE_VERSION
from calibration.coverage import CoverageConfig, coverage_backtest, iso_utc
from calibration.data import (
    _subset,
    load_bars,
    load_book_depth,
    load_funding,
    repair_policy,
    with_depth,
    with_funding,
)
from calibration.horizon import Horizon, resolve_horizon
from calibration.liquidation import (
    LiquidationConfig,
    shared_insurance_fund,
    simulate_liquidations,
)
from calibration.models import FAMILIES, MarginModel, make_model
from calibration.publishing import guardrail_constraint
from calibration.report import CoverageMetrics, LiquidationMetrics
from calibration.spec import (
    CalibrationSpec,
    DataRefSpec,
    ParamSpec,
    search_space,
    spec_hash,
    validate_spec,
)
from calibration.stats import binomial_cdf
from calibration.storage import Coordination
from calibration.windows import DEFAULT_STRESS_WINDOWS, StressWindow

log = logging.getLogger("marginlab.calibrate")

OBJECTIVE_NAMES = ("capital_cost", "insolvency_bps")
#: Traffic-light red threshold of the Basel binomial CDF.
_RED = 0.9999


class StudyMismatch(MarginlabError, ValueError):
    """A worker's data or spec differs from the study it was asked to join."""


def _day_ms(day: str, field: str) -> int:
    try:
        d = date.fromisoformat(day)
    except ValueError:
        raise InvalidParameters(f"{field}: not an ISO date: {day!r}", field=field) from None
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)


def load_data_ref(ref: DataRefSpec, root: str | os.PathLike[str], field: str) -> BarSeries:
    """The bars one ``DataRefSpec`` names: day range applied, funding and depth attached.

    ``field`` (``data[0]``) prefixes the path in errors about the day range and repairs.
    """
    start = _day_ms(ref.start, f"{field}.start") if ref.start else None
    end = _day_ms(ref.end, f"{field}.end") + 86_400_000 if ref.end else None
    policy = repair_policy(ref.repair, field=f"{field}.repair")
    with _ref_field(f"{field}.ref"):
        bars = load_bars(ref.ref, root=root, instrument=ref.instrument, start_ms=start,
                         end_ms=end, timestamp_format=ref.timestamp_format,
                         timestamp_unit=ref.timestamp_unit, repair=policy)
    if ref.funding:
        with _ref_field(f"{field}.funding"):
            funding = load_funding(ref.funding, root=root)
        bars = with_funding(bars, funding)
    if ref.depth:
        with _ref_field(f"{field}.depth"):
            depth = load_book_depth(ref.depth, root=root)
        bars = with_depth(bars, depth)
    return bars


@contextlib.contextmanager
def _ref_field(field: str) -> Iterator[None]:
    """Name the request's path (``data[0].funding``) on a reference that names no file."""
    try:
        yield
    except DataReferenceError as exc:
        exc.field = field  # type: ignore[attr-defined]
        raise


def cut(bars: BarSeries, start_ms: int | None, end_ms: int | None) -> BarSeries:
    """The bars with ``start_ms <= timestamp < end_ms`` (a new series with its own
    fingerprint)."""
    keep = np.ones(len(bars), dtype=bool)
    if start_ms is not None:
        keep &= bars.timestamp_ms >= start_ms
    if end_ms is not None:
        keep &= bars.timestamp_ms < end_ms
    return bars if keep.all() else _subset(bars, keep)


@dataclass(frozen=True)
class Prepared:
    """Data loaded and split once per process, shared by every trial.

    Attributes:
        spec: the validated spec.
        full: each instrument's bars over the whole requested span.
        in_sample: the same bars before ``in_sample_end_ms`` (what trials see).
        in_sample_end_ms: the in-sample / out-of-sample boundary, epoch ms UTC.
        stress_windows: the named windows of the spec (or domain.md's).
        folds: the out-of-sample segments, as windows ``oos_fold_1`` ...
        liquidation: the position population and close-out settings.
        fingerprints: instrument → content fingerprint of its full bars.
        horizon: the one close-out horizon of every trial (domain.md §2).
        space: the search space, with ``horizon_bars`` fixed to ``horizon`` for families
            that have one (what trials run with).
    """

    spec: CalibrationSpec
    full: tuple[BarSeries, ...]
    in_sample: tuple[BarSeries, ...]
    in_sample_end_ms: int
    stress_windows: tuple[StressWindow, ...]
    folds: tuple[StressWindow, ...]
    liquidation: LiquidationConfig
    fingerprints: dict[str, str]
    horizon: Horizon
    space: dict[str, ParamSpec]

    @property
    def coverage(self) -> CoverageConfig:
        """Coverage settings of every evaluation."""
        return CoverageConfig(horizon_bars=self.horizon.bars)


def _liquidation_config(spec: CalibrationSpec, bar_seconds: int) -> LiquidationConfig:
    """The spec's liquidation settings over defaults scaled to the bar size: a new cohort
    every day, held a week, latency one bar, recovery one day."""
    per_day = max(1, 86_400 // bar_seconds)
    base: dict[str, Any] = {
        "entry_every_bars": per_day, "holding_bars": 7 * per_day, "recovery_bars": per_day,
        "adv_window_bars": per_day,
    }
    return LiquidationConfig.from_mapping(spec.liquidation, defaults=base)


def prepare(spec: CalibrationSpec, root: str | os.PathLike[str]) -> Prepared:
    """Load, validate and split the spec's data; check what needs the data.

    Raises:
        DataError, InvalidParameters, InsufficientData: a reference, window or horizon that
            does not fit the data — before any trial runs.
    """
    validate_spec(spec)  # a spec built in Python has not been through decode_spec
    full = [load_data_ref(d, root, f"data[{i}]") for i, d in enumerate(spec.data)]
    first = max(int(b.timestamp_ms[0]) for b in full)
    last = min(int(b.timestamp_ms[-1]) for b in full)
    if first >= last:
        raise InvalidParameters("the instruments' data do not overlap in time", field="data")
    wf = spec.walk_forward
    if wf.in_sample_end:
        split = _day_ms(wf.in_sample_end, "walk_forward.in_sample_end")
        if not first < split < last:
            raise InvalidParameters(
                f"in_sample_end {wf.in_sample_end} is outside the common data span "
                f"{iso_utc(first)} .. {iso_utc(last)}", field="walk_forward.in_sample_end")
    else:
        split = first + int((last - first) * wf.in_sample_fraction)
    if spec.stress_windows is None:
        windows = tuple(w for w in DEFAULT_STRESS_WINDOWS if w.start_ms <= last
                        and w.end_ms > first)
    else:
        windows = tuple(StressWindow.from_dates(w.name, w.start, w.end)
                        for w in spec.stress_windows)
        for i, w in enumerate(windows):
            if w.start_ms > last or w.end_ms <= first:
                raise InvalidParameters(
                    f"stress window {w.name!r} lies outside the data "
                    f"({iso_utc(first)} .. {iso_utc(last)})", field=f"stress_windows[{i}]")
    edges = np.linspace(split, last + 1, wf.folds + 1).astype(np.int64)
    folds = tuple(StressWindow(f"oos_fold_{k + 1}", int(edges[k]), int(edges[k + 1]))
                  for k in range(wf.folds))
    in_sample = tuple(cut(b, None, split) for b in full)
    sizes = [b.bar_seconds for b in full]
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            raise InvalidParameters(
                f"{full[i].instrument} has {size} s bars, {full[0].instrument} {sizes[0]} s: "
                "one close-out horizon needs one bar size", field=f"data[{i}].ref")
    space = search_space(spec)
    fixed = space.get("horizon_bars")
    close_out = resolve_horizon(
        {"horizon_bars": spec.horizon_bars, "horizon": spec.horizon,
         "search_space.horizon_bars": fixed.value if fixed is not None else None},
        sizes[0])
    if "horizon_bars" in FAMILIES[spec.model].param_names():
        space["horizon_bars"] = ParamSpec(value=close_out.bars, integer=True)
    liquidation = _liquidation_config(spec, full[0].bar_seconds)
    probe = make_model(spec.model, _fixed_or_low(spec)).with_horizon(close_out.bars)
    horizon = close_out.bars
    for b in in_sample:
        need = probe.first_valid_bar() + horizon + 1
        if len(b) <= need:
            raise InsufficientData(
                f"{b.instrument}: {len(b)} in-sample bars; the model's warm-up and horizon "
                f"need more than {need}")
    return Prepared(
        spec=spec, full=tuple(full), in_sample=in_sample, in_sample_end_ms=split,
        stress_windows=windows, folds=folds, liquidation=liquidation,
        fingerprints={b.instrument: b.fingerprint for b in full},
        horizon=close_out, space=space,
    )


def _fixed_or_low(spec: CalibrationSpec) -> dict[str, Any]:
    out = {}
    for name, p in search_space(spec).items():
        value = p.value if p.value is not None else p.low
        out[name] = round(value) if p.integer and value is not None else value
    return out


@dataclass(frozen=True)
class Evaluation:
    """One parameter set backtested.

    Attributes:
        objectives: ``(capital_cost, insolvency_bps)``, both minimised.
        constraints: name → value, feasible when ≤ 0.
        coverage: instrument → coverage metrics (whole span first, then windows).
        liquidation: instrument → liquidation metrics (same order).
        pruned: why the liquidation simulation was skipped, if it was.
    """

    objectives: tuple[float, float]
    constraints: dict[str, float]
    coverage: dict[str, list[CoverageMetrics]]
    liquidation: dict[str, list[LiquidationMetrics]]
    pruned: str | None = None

    @property
    def feasible(self) -> bool:
        """All constraints ≤ 0."""
        return all(v <= 0 for v in self.constraints.values())

    def summary(self) -> dict[str, Any]:
        """JSON-ready metrics (stored on the trial, shown in results)."""
        summary: dict[str, Any] = msgspec.to_builtins({
            "objectives": dict(zip(OBJECTIVE_NAMES, self.objectives, strict=True)),
            "constraints": self.constraints,
            "coverage": self.coverage,
            "liquidation": self.liquidation,
            "pruned": self.pruned,
        })
        return summary

    def summary_json(self) -> str:
        """``summary()`` as compact JSON text (how it is stored on a trial)."""
        return msgspec.json.encode(self.summary()).decode()


#: The one constraint stored on a trial (see ``violation``).
VIOLATION_KEY = "violation"


def violation(constraints: Mapping[str, float]) -> float:
    """The constraints as one value with the same feasibility and the same measure of
    infeasibility: the sum of the violated ones (> 0), which is what NSGA-II and TPE rank
    infeasible trials by, or else the largest (≤ 0).

    A trial stores this one value with ``trial.set_constraint`` rather than one constraint
    per rule: each is a storage write (a journal append with fsync, ~0.3–1.5 ms here), and
    the named values are in the trial's metrics (``trial_metrics(t)["constraints"]``).
    """
    worst = max(constraints.values())
    if worst <= 0:
        return float(worst)
    return float(sum(v for v in constraints.values() if v > 0))


#: Trial user attribute holding ``Evaluation.summary_json()``. Text, not a nested dict:
#: Optuna deep-copies a trial on ``tell`` and on every copying read, and a 30–40 KB nested
#: summary (five instruments × windows) cost ~3 ms a copy; a string is copied by reference.
METRICS_ATTR = "metrics_json"


def trial_metrics(trial: FrozenTrial) -> dict[str, Any] | None:
    """A trial's stored evaluation summary (``Evaluation.summary()``), or ``None``."""
    raw = trial.user_attrs.get(METRICS_ATTR)
    if raw is None:
        legacy: dict[str, Any] | None = trial.user_attrs.get("metrics")
        return legacy
    decoded: dict[str, Any] = msgspec.json.decode(raw)
    return decoded


def _capital_cost(model: MarginModel, bars_list: Sequence[BarSeries],
                  notionals: Sequence[float]) -> float:
    """Notional-weighted mean IM rate over the bars with a margin, averaged over
    instruments (fraction of notional)."""
    weights = np.asarray(notionals, dtype=np.float64)
    weights = weights / weights.sum()
    per_instrument = []
    for bars in bars_list:
        if model.notional_dependent:
            rates = [model.margin_rates(bars, notional_usd=float(n)) for n in notionals]
        else:
            rates = [model.margin_rates(bars)] * len(notionals)
        means = [float(np.nanmean(r.im_rate[r.first_valid_bar:])) for r in rates]
        per_instrument.append(float(np.dot(weights, means)))
    return float(np.mean(per_instrument))


def evaluate(
    prepared: Prepared,
    params: Mapping[str, Any],
    *,
    full: bool = False,
    prune_hopeless: bool = True,
) -> Evaluation:
    """Backtest one parameter set: objectives, constraints and metrics.

    Args:
        prepared: the data and settings.
        params: the model's public hyperparameters.
        full: evaluate on the whole span with the out-of-sample folds as extra windows (for
            the recommendation) instead of the in-sample bars only (for trials).
        prune_hopeless: skip the liquidation simulation when the coverage test is red over
            the whole in-sample span (the margin misses far more than allowed everywhere).
    """
    spec = prepared.spec
    model = make_model(spec.model, params).with_horizon(prepared.horizon.bars)
    bars_list = prepared.full if full else prepared.in_sample
    windows = prepared.stress_windows + (prepared.folds if full else ())
    coverage = {b.instrument: coverage_backtest(b, model, prepared.coverage, windows)
                for b in bars_list}
    constraints: dict[str, float] = {}
    c = spec.constraints
    overall = [(m[0].long, m[0].short) for m in coverage.values()]
    sides = [s for pair in overall for s in pair]
    if c.kupiec_alpha is not None:
        # One-sided test of "too many breaches" at its nominal size (domain.md §3); a side
        # with fewer breaches than expected has a p-value above 0.5 and cannot fail.
        worst = -1.0
        for s in sides:
            if s.kupiec_pvalue_one_sided is not None:
                worst = max(worst, c.kupiec_alpha - s.kupiec_pvalue_one_sided)
        constraints["kupiec"] = worst
    if c.no_red_in_stress_windows and prepared.stress_windows:
        names = {w.name for w in prepared.stress_windows}
        worst = -_RED
        for metrics in coverage.values():
            for m in metrics:
                if m.window not in names:
                    continue
                for s in (m.long, m.short):
                    if s.observations:
                        f = binomial_cdf(s.breaches, s.observations, s.expected_breach_rate)
                        worst = max(worst, f - _RED)
        # Scaled so that "one breach too many" is of order one.
        constraints["traffic_light_red"] = worst * 1e4
    if c.max_procyclicality is not None:
        ratios = [m[0].max_increase_ratio or 1.0 for m in coverage.values()]
        constraints["procyclicality"] = max(ratios) - c.max_procyclicality
    if spec.published is not None and spec.published.max_change:
        # Publishing's own rule on effective parameters (the trial's horizon included), so
        # a recommendation inside this constraint is inside the publish guardrails too.
        constraints["guardrail"] = guardrail_constraint(
            spec.model, spec.published.params, model.get_params(),
            spec.published.max_change, bar_seconds=prepared.horizon.bar_seconds)
    hopeless = prune_hopeless and not full and any(s.traffic_light == "red" for s in sides)
    liquidation: dict[str, list[LiquidationMetrics]] = {}
    if hopeless:
        if c.max_premature_share is not None:
            constraints["premature_share"] = 1.0
        return Evaluation((math.inf, math.inf), constraints, coverage, liquidation,
                          pruned="coverage red over the whole in-sample span")
    opened = bad_debt = 0.0
    liquidated = premature = 0
    results = [simulate_liquidations(b, model, prepared.liquidation) for b in bars_list]
    # The instruments of a spec share the venue's one insurance fund (domain.md §4).
    fund = shared_insurance_fund(results)
    for b, result in zip(bars_list, results, strict=True):
        ts = b.timestamp_ms
        liq_metrics = [result.metrics("all", None, None, fund)]
        liq_metrics += [result.metrics(w.name, w.start_ms, w.end_ms, fund) for w in windows
                        if w.start_ms <= int(ts[-1]) and w.end_ms > int(ts[0])]
        liquidation[b.instrument] = liq_metrics
        head = liq_metrics[0]
        opened += head.notional_opened_usd
        bad_debt += head.bad_debt_usd
        liquidated += head.liquidations
        premature += head.premature_liquidations
    if c.max_premature_share is not None:
        share = premature / liquidated if liquidated else 0.0
        constraints["premature_share"] = share - c.max_premature_share
    if spec.objectives.insolvency == "bad_debt_bps":
        insolvency = bad_debt / opened * 1e4 if opened else 0.0
    else:
        per_obs = [(s.breach_rate or 0.0) * (s.mean_uncovered_loss or 0.0) for s in sides]
        insolvency = float(np.mean(per_obs)) * 1e4
    capital = _capital_cost(model, bars_list, prepared.liquidation.notionals_usd)
    return Evaluation((capital, insolvency), constraints, coverage, liquidation)


def make_sampler(spec: CalibrationSpec, *, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler for a spec; ``worker`` offsets the seed so parallel workers differ.

    ``auto`` picks multivariate TPE for budgets up to 150 trials: it needs the fewest
    trials to find a good front, and its own cost (~3–10 ms a trial below 150 trials here)
    is small next to a backtest. Above that NSGA-II: TPE's cost grows with the history
    (~30 ms a trial by trial 1000 on these machines, more than a whole 30-minute-bar
    backtest) while NSGA-II stays near 1 ms, and its generations parallelise over workers
    without a constant liar. GP is not offered: it needs torch, which marginlab does not
    install. Random is there as a baseline.
    """
    seed = spec.seed + 7919 * worker
    choice = spec.sampler
    if choice == "auto":
        choice = "tpe" if (spec.n_trials or 10_000) <= 150 else "nsga2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if choice == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                              constant_liar=True, n_startup_trials=10)
        if choice == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=24)
    return optuna.samplers.RandomSampler(seed=seed)


def _suggest(trial: optuna.Trial, space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    with warnings.catch_warnings():
        # The published parameters are enqueued as they are, even where they lie outside
        # the searched range: that trial is the baseline, and Optuna runs it with the
        # published values (warning that they are out of range, which here is the point).
        warnings.filterwarnings("ignore", r"Fixed parameter .* is out of range",
                                UserWarning)
        for name, p in space.items():
            if p.value is not None:
                params[name] = p.value
            elif p.integer:
                assert p.low is not None
                assert p.high is not None
                params[name] = trial.suggest_int(name, round(p.low), round(p.high),
                                                 log=p.log)
            else:
                assert p.low is not None
                assert p.high is not None
                params[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
    return params


def study_name(spec: CalibrationSpec) -> str:
    """The default study name: model and spec hash, so a re-run resumes the same study."""
    return f"marginlab-{spec.model}-{spec_hash(spec)[:16]}"


def create_or_load_study(
    spec: CalibrationSpec, prepared: Prepared, coordination: Coordination,
    name: str | None = None,
) -> optuna.Study:
    """Create the study (metric names, spec and fingerprints as attributes, the published
    parameters enqueued as the first trial), or load it if it exists for the same inputs.

    Raises:
        StudyMismatch: a study of that name exists for another spec or other data.
    """
    name = name or study_name(spec)
    digest = spec_hash(spec)
    with coordination.slot_lock(name):
        study = optuna.create_study(
            storage=coordination.storage, study_name=name, load_if_exists=True,
            directions=["minimize", "minimize"], sampler=make_sampler(spec),
        )
        attrs = study.user_attrs
        if "spec_hash" in attrs:
            if attrs["spec_hash"] != digest:
                raise StudyMismatch(f"study {name!r} exists for another spec")
            if attrs["fingerprints"] != prepared.fingerprints:
                raise StudyMismatch(f"study {name!r} exists for other data")
            return study
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(OBJECTIVE_NAMES))
        study.set_user_attr("spec", msgspec.to_builtins(spec))
        study.set_user_attr("spec_hash", digest)
        study.set_user_attr("fingerprints", prepared.fingerprints)
        study.set_user_attr("engine_version", ENGINE_VERSION)
        if spec.published is not None:
            space = search_space(spec)
            warm = {k: v for k, v in spec.published.params.items()
                    if k in space and space[k].value is None}
            if warm:
                study.enqueue_trial(warm, user_attrs={"published": True})
    return study


def load_study(name: str, coordination: Coordination, *, worker: int = 1) -> tuple[
        optuna.Study, CalibrationSpec]:
    """Open an existing study and its spec (for ``marginlab worker``)."""
    try:
        summaries = optuna.study.get_all_study_names(storage=coordination.storage)
    except Exception as exc:
        raise MarginlabError(f"cannot list studies in {coordination.url!r}: {exc}") from exc
    if name not in summaries:
        raise InvalidParameters(f"no study {name!r} in {coordination.url!r}", field="study")
    probe = optuna.load_study(study_name=name, storage=coordination.storage)
    spec = msgspec.convert(probe.user_attrs["spec"], CalibrationSpec)
    study = optuna.load_study(study_name=name, storage=coordination.storage,
                              sampler=make_sampler(spec, worker=worker))
    return study, spec


def _finished(study: optuna.Study) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               for t in study.get_trials(deepcopy=False))


#: Called after each trial this worker finishes: ``(finished, total_or_None, best)``.
TrialCallback = Callable[[int, int | None, dict[str, Any] | None], None]


def run_worker(
    study: optuna.Study,
    prepared: Prepared,
    coordination: Coordination,
    *,
    n_trials: int | None,
    deadline: float | None = None,
    on_trial: TrialCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_s: float = 0.2,
) -> int:
    """Add trials to ``study`` until ``n_trials`` are finished (COMPLETE or PRUNED) or the
    deadline passes; returns how many this worker ran.

    Several workers may run this on one study at once: asking for a trial happens under the
    storage's slot lock and counts WAITING and RUNNING trials, so the total never exceeds
    ``n_trials``. A RUNNING trial whose worker stopped beating is failed and its parameters
    enqueued again (``Coordination.reap_stale_trials``); a worker with nothing to ask waits
    for such retries until every trial is finished.
    """
    return _run_trials(study, prepared, coordination, n_trials=n_trials, deadline=deadline,
                       on_trial=on_trial, should_stop=should_stop, poll_s=poll_s)


def _run_trials(
    study: optuna.Study,
    prepared: Prepared,
    coordination: Coordination,
    *,
    n_trials: int | None,
    deadline: float | None,
    on_trial: TrialCallback | None,
    should_stop: Callable[[], bool] | None,
    poll_s: float,
) -> int:
    space = prepared.space
    worker = f"{socket.gethostname()}:{os.getpid()}"
    ran = 0
    # Waiting for other workers' last trials: start short (they usually end within one
    # trial's time, and this worker's exit, then the summary, wait on it) and back off to
    # ``poll_s`` (each poll counts the study's trials in the storage).
    wait_s = min(0.01, poll_s)
    while True:
        if should_stop is not None and should_stop():
            return ran
        with coordination.slot_lock(study.study_name):
            coordination.reap_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            active = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                     TrialState.WAITING) for t in trials)
            expired = deadline is not None and time.time() >= deadline
            room = n_trials is None or active < n_trials
            trial = None
            if waiting or (room and not expired):
                with warnings.catch_warnings():
                    # RDB storages: Optuna warns that its heartbeat is meant for optimize();
                    # here the trial beats through ``coordination.heartbeat`` instead.
                    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed",
                                            UserWarning)
                    trial = study.ask()
        if trial is None:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if expired or not running:
                return ran
            time.sleep(wait_s)
            wait_s = min(2 * wait_s, poll_s)
            continue
        with coordination.heartbeat(trial._trial_id):
            try:
                params = _suggest(trial, space)
                result = evaluate(prepared, params)
                if result.constraints:
                    trial.set_constraint(VIOLATION_KEY, violation(result.constraints))
                # One attribute for the evidence: every storage write is a journal append
                # (with fsync); the full parameter set is trial.params plus the spec's fixed
                # values. The worker's identity rides in the same write: the result counts
                # the workers that ran trials, which changes what a seed reproduces (§5).
                summary = result.summary()
                summary["worker"] = worker
                trial.set_user_attr(METRICS_ATTR, msgspec.json.encode(summary).decode())
                if result.pruned:
                    study.tell(trial, state=TrialState.PRUNED)
                else:
                    study.tell(trial, list(result.objectives))
            except BaseException:
                # Whatever stops this worker mid-trial (an error, a job time limit raised
                # into it, a KeyboardInterrupt) leaves no trial RUNNING behind it.
                _fail_if_running(study, trial)
                raise
        ran += 1
        if on_trial is not None:
            on_trial(_finished(study), n_trials,
                     best_feasible(study, prepared.spec.risk_appetite_bps))


def _fail_if_running(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark ``trial`` FAIL unless it already finished (best effort: the storage may be the
    reason the worker stops)."""
    try:
        state = study._storage.get_trial(trial._trial_id).state
        if state == TrialState.RUNNING:
            study.tell(trial, state=TrialState.FAIL)
    except Exception as exc:  # the original error is what the caller raises
        log.warning("could not fail trial %s after an interruption: %s", trial.number, exc)


def _params_of(trial: FrozenTrial, space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """The model parameters a trial ran with: its suggested values and the space's fixed
    ones, in the space's order (as ``_suggest`` built them)."""
    # Studies written before the params were derived stored them as an attribute.
    stored: dict[str, Any] | None = trial.user_attrs.get("params")
    if stored is not None:
        return dict(stored)
    return {name: p.value if p.value is not None else trial.params[name]
            for name, p in space.items()}


def recommended_trial(front: Sequence[FrozenTrial],
                      risk_appetite_bps: float | None) -> tuple[FrozenTrial | None, bool]:
    """The recommendation among feasible Pareto trials (domain.md §5), and whether it is
    within the risk appetite.

    The cheapest (capital cost, then insolvency) trial whose insolvency, bps, is at most
    ``risk_appetite_bps`` (any, when ``None``); when none is, the one with the least
    insolvency. ``(None, False)`` for an empty front. ``summarize`` and the progress
    displays both choose by this, so "best so far" is what the result would recommend.
    """
    ordered = sorted(front, key=lambda t: (t.values[0], t.values[1]))
    for t in ordered:
        if risk_appetite_bps is None or t.values[1] <= risk_appetite_bps:
            return t, True
    if not ordered:
        return None, False
    return min(ordered, key=lambda t: t.values[1]), False


def best_feasible(study: optuna.Study,
                  risk_appetite_bps: float | Literal["study"] | None = "study",
                  ) -> dict[str, Any] | None:
    """What the recommendation would be if the study stopped now (for progress displays):
    ``{"trial", "capital_cost", "insolvency_bps", "within_risk_appetite"}``, or ``None``
    while no trial is feasible.

    ``risk_appetite_bps`` defaults to the appetite of the spec stored on the study.
    """
    if isinstance(risk_appetite_bps, str):  # "study"
        stored = study.user_attrs.get("spec") or {}
        risk_appetite_bps = stored.get("risk_appetite_bps")
    best, within = recommended_trial(study.best_trials, risk_appetite_bps)
    if best is None or best.values is None:
        return None
    return {"trial": best.number, "capital_cost": best.values[0],
            "insolvency_bps": best.values[1], "within_risk_appetite": within}


class ParetoPoint(msgspec.Struct, frozen=True, kw_only=True):
    """A feasible non-dominated trial.

    Attributes:
        trial: Optuna trial number.
        params: the trial's parameters, each in its own units.
        capital_cost: notional-weighted mean IM rate (fraction of notional).
        insolvency_bps: the insolvency objective (bps of notional).
    """

    trial: int
    params: dict[str, Any]
    capital_cost: float
    insolvency_bps: float


class Recommendation(msgspec.Struct, frozen=True, kw_only=True):
    """The recommended parameters and the evidence behind them.

    ``feasible`` says whether every constraint holds; ``within_risk_appetite`` whether the
    insolvency is within the spec's appetite. When nothing is feasible this is the closest
    trial (smallest total violation) and ``binding_constraints`` are the violated ones.
    ``capital_cost`` in ``objectives`` is the notional-weighted mean IM rate as a fraction
    of notional (0.05 = 5%, 20x leverage); ``insolvency_bps`` is in basis points of notional.
    ``notes`` are what an operator must read before acting (e.g. leverage below 2x).

    Attributes:
        trial: Optuna trial number.
        params: the recommended parameters, each in its own units.
        feasible: every constraint holds.
        within_risk_appetite: insolvency within ``risk_appetite_bps``.
        objectives: ``capital_cost`` (fraction of notional) and ``insolvency_bps`` (bps).
        constraints: each constraint's value (feasible when <= 0, in its own units).
        binding_constraints: constraints at or over their bound.
        in_sample: coverage and liquidation evidence on the in-sample span.
        out_of_sample: the same per out-of-sample fold.
        change_vs_published: per parameter ``published``, ``recommended`` and ``change``
            (parameter units); null without published parameters.
        explanation: one sentence on why this trial.
        notes: warnings an operator must read.
    """

    trial: int
    params: dict[str, Any]
    feasible: bool
    within_risk_appetite: bool
    objectives: dict[str, float]
    constraints: dict[str, float]
    binding_constraints: list[str]
    in_sample: dict[str, Any]
    out_of_sample: dict[str, Any]
    change_vs_published: dict[str, dict[str, float]] | None
    explanation: str
    notes: list[str] = []


class CalibrationResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a calibration returns (the CLI's ``--json`` and the API's result).

    ``horizon_bars`` is the close-out horizon every trial sized its margin for and tested
    over, in bars of ``bar_seconds``; ``horizon`` is the duration it spans. ``workers`` is
    how many worker processes ran the study's trials. ``reproducible`` says whether the
    record alone (spec, data fingerprints, seed, engine) reproduces the result: only with one
    worker, a trial count rather than a time budget, and no failed (retried) trial, since
    several workers interleave their trials in an order no record fixes;
    ``reproducibility`` says why (not).

    Attributes:
        study: Optuna study name.
        storage: the study storage, credentials and server paths redacted by the service.
        model: margin model family.
        spec_hash: sha256 of the canonical spec (hex).
        seed: sampler seed.
        engine_version: marginlab engine version.
        data_fingerprints: instrument → sha256 of its bars (hex).
        trials: trial counts by state (``complete``, ``pruned``, ``fail``, ...).
        sampler: the Optuna sampler used.
        recommendation: the recommended trial (null: no trial finished).
        pareto_front: feasible non-dominated trials.
        horizon_bars: close-out horizon (bars).
        horizon: close-out horizon as a duration (``1h``).
        bar_seconds: bar size (s).
        workers: worker processes that ran trials (count).
        reproducible: the record alone reproduces the result.
        reproducibility: why it does (not).
    """

    study: str
    storage: str
    model: str
    spec_hash: str
    seed: int
    engine_version: str
    data_fingerprints: dict[str, str]
    trials: dict[str, int]
    sampler: str
    recommendation: Recommendation | None
    pareto_front: list[ParetoPoint]
    horizon_bars: int
    horizon: str
    bar_seconds: int
    workers: int
    reproducible: bool
    reproducibility: str


#: A constraint within this of its bound (in its own units) is reported as binding.
BINDING_TOLERANCE = 0.05


def summarize(study: optuna.Study, prepared: Prepared, storage_url: str) -> CalibrationResult:
    """Pareto front and recommendation of a finished (or stopped) study."""
    spec = prepared.spec
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    front = sorted(study.best_trials, key=lambda t: (t.values[0], t.values[1]))
    space = prepared.space
    pareto = [ParetoPoint(trial=t.number, params=_params_of(t, space), capital_cost=t.values[0],
                          insolvency_bps=t.values[1]) for t in front]
    appetite = spec.risk_appetite_bps
    explanation = ""
    chosen, within = recommended_trial(front, appetite)
    if chosen is not None and within:
        explanation = ("cheapest feasible Pareto point" +
                       ("" if appetite is None else f" with insolvency ≤ {appetite:g} bps"))
    elif chosen is not None:
        explanation = (f"no feasible point is within the risk appetite of {appetite:g} bps; "
                       "this is the feasible point with the least insolvency")
    else:
        scored = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                  and t.constraints]
        if scored:
            chosen = min(scored, key=lambda t: sum(max(0.0, v) for v in t.constraints.values()))
            explanation = ("no trial satisfies every constraint; this is the closest trial "
                           "(smallest total violation)")
    recommendation = None
    if chosen is not None:
        recommendation = _recommend(chosen, prepared, explanation)
    workers, reproducible, why = _reproducibility(trials, spec)
    return CalibrationResult(
        study=study.study_name, storage=storage_url, model=spec.model,
        spec_hash=spec_hash(spec), seed=spec.seed, engine_version=ENGINE_VERSION,
        data_fingerprints=prepared.fingerprints, trials=counts,
        sampler=type(study.sampler).__name__, recommendation=recommendation,
        pareto_front=pareto, horizon_bars=prepared.horizon.bars,
        horizon=prepared.horizon.duration, bar_seconds=prepared.horizon.bar_seconds,
        workers=workers, reproducible=reproducible, reproducibility=why,
    )


def _reproducibility(trials: Sequence[FrozenTrial], spec: CalibrationSpec
                     ) -> tuple[int, bool, str]:
    """``(workers, reproducible, why)`` of a study from its trials' recorded workers."""
    seen = set()
    for t in trials:
        metrics = trial_metrics(t)
        if metrics is not None and "worker" in metrics:
            seen.add(metrics["worker"])
    workers = len(seen)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    if workers > 1:
        return workers, False, (f"{workers} workers ran the trials: their order, and so what "
                                "the sampler proposed, depends on timing")
    if spec.timeout_seconds is not None:
        return workers, False, ("a time budget stops the study: how many trials run depends "
                                "on the machine")
    if failed:
        return workers, False, f"{failed} trial(s) failed and were retried"
    return workers, True, "one worker, a fixed trial count and a seed: a re-run gives the same"


def _recommend(trial: FrozenTrial, prepared: Prepared, explanation: str) -> Recommendation:
    spec = prepared.spec
    params = _params_of(trial, prepared.space)
    in_sample_eval = evaluate(prepared, params, prune_hopeless=False)
    full_eval = evaluate(prepared, params, full=True)
    constraints = in_sample_eval.constraints
    feasible = in_sample_eval.feasible
    if feasible:
        binding = [k for k, v in constraints.items() if v > -BINDING_TOLERANCE]
    else:
        binding = [k for k, v in constraints.items() if v > 0]
    capital, insolvency = in_sample_eval.objectives
    appetite = spec.risk_appetite_bps
    fold_names = [f.name for f in prepared.folds]
    oos: dict[str, Any] = {}
    for inst, metrics in full_eval.coverage.items():
        liq = {m.window: m for m in full_eval.liquidation.get(inst, [])}
        for m in metrics:
            if m.window in fold_names:
                oos.setdefault(m.window, {})[inst] = msgspec.to_builtins(
                    {"coverage": m, "liquidation": liq.get(m.window)})
    change = None
    if spec.published is not None:
        change = {}
        for name, old in spec.published.params.items():
            new = params.get(name, old)
            if isinstance(old, int | float) and isinstance(new, int | float):
                change[name] = {"published": float(old), "recommended": float(new),
                                "change": float(new) - float(old)}
    notes = []
    if capital > 0.5:
        notes.append(f"implies leverage below 2x: mean IM {capital:.1%} of notional "
                     f"(at most {1 / capital:.2f}x)")
    capped = sum(m.capped_bars for ms in in_sample_eval.coverage.values() for m in ms[:1])
    if capped:
        notes.append(f"{capped} in-sample observation bars had their margin capped at "
                     "max_rate")
    return Recommendation(
        trial=trial.number, params=params, feasible=feasible, notes=notes,
        within_risk_appetite=appetite is None or insolvency <= appetite,
        objectives={"capital_cost": capital, "insolvency_bps": insolvency},
        constraints=constraints, binding_constraints=binding,
        in_sample=in_sample_eval.summary(), out_of_sample=oos,
        change_vs_published=change, explanation=explanation,
    )


def calibrate(
    spec: CalibrationSpec,
    *,
    root: str | os.PathLike[str],
    storage: str = "memory",
    study: str | None = None,
    on_trial: TrialCallback | None = None,
    prepared: Prepared | None = None,
    workers: int = 1,
) -> CalibrationResult:
    """Run a whole calibration: this process and ``workers - 1`` helper processes
    (``calibration.parallel``) add trials to one study; other workers may join it too.

    Args:
        spec: what to calibrate.
        root: the data root the spec's references are relative to.
        storage: the study storage URL (``memory`` only with one worker).
        study: the study name (default: derived from the spec).
        on_trial: called after each of this process's trials.
        prepared: the spec's data, if already prepared (``prepare``).
        workers: worker processes, this one included.

    Raises:
        MarginlabError subclasses for bad input, before any trial runs.
    """
    from calibration.parallel import start_helpers, wait_helpers

    if workers < 1:
        raise InvalidParameters("workers must be at least 1", field="workers")
    if workers > 1 and storage == "memory":
        raise InvalidParameters("more than one worker needs a shared storage (a journal file, "
                                "redis:// or postgresql://), not memory", field="storage")
    prepared = prepared or prepare(spec, root)
    with Coordination(storage) as coordination:
        opt_study = create_or_load_study(spec, prepared, coordination, study)
        deadline = time.time() + spec.timeout_seconds if spec.timeout_seconds else None
        helpers = start_helpers(workers - 1, storage_url=storage,
                                study_name=opt_study.study_name, prepared=prepared,
                                root=root, deadline=deadline)
        try:
            run_worker(opt_study, prepared, coordination, n_trials=spec.n_trials,
                       deadline=deadline, on_trial=on_trial)
        finally:
            wait_helpers(helpers)
        return summarize(opt_study, prepared, storage)


__all__ = [
    "METRICS_ATTR",
    "OBJECTIVE_NAMES",
    "VIOLATION_KEY",
    "CalibrationResult",
    "Evaluation",
    "ParetoPoint",
    "Prepared",
    "Recommendation",
    "StudyMismatch",
    "calibrate",
    "create_or_load_study",
    "cut",
    "evaluate",
    "load_study",
    "make_sampler",
    "prepare",
    "recommended_trial",
    "run_worker",
    "study_name",
    "summarize",
    "trial_metrics",
    "violation",
]
