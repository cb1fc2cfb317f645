"""The registry of what a calibration can minimise or bound (issue 14 item 1).

Every entry is a ``Metric``: a name (the spec's and the result's key), a unit, a direction
and how to read it from one backtested parameter set. A spec names any subset as its
objectives (``objectives.minimize``; default ``capital_cost`` and ``insolvency_bps``) and
bounds any others as constraints (``constraints.max``, and the older
``max_premature_share`` / ``max_procyclicality``). Adding a metric is one ``register`` call.

The rule constraints that are not a metric's bound (one-sided Kupiec, no red traffic light
in a stress window, the publishing guardrails) stay in ``_evaluate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from calibration._bars import BarSeries
from calibration._errors import InvalidParameters
from calibration.margins import MarginSeries
from calibration.margins import capital_cost as margin_capital_cost
from calibration.models import MarginModel
from calibration.report import CoverageMetrics, LiquidationMetrics
from calibration.spec import CalibrationSpec

if TYPE_CHECKING:
    from calibration.calibrate._accounts import AccountEvaluation
    from calibration.calibrate._prepare import Prepared


@dataclass(frozen=True)
class Backtested:
    """What a metric reads: one parameter set backtested on one span.

    Attributes:
        prepared: the data and settings.
        model: the margin model, with the run's horizon.
        bars: the instruments' bars of the span (in-sample, or the whole span).
        coverage: instrument → coverage metrics (whole span first, then windows).
        liquidation: instrument → liquidation metrics (whole span first, then windows);
            empty for metrics that do not need the simulation.
        margins: instrument → the trial's one margin series (``calibration.margins``), the
            very rates the coverage test and the liquidation replay used; empty: computed.
        accounts: the trial's account evaluation (``calibrate._accounts``): one replay of
            the population and the haircut / portfolio coverage backtests, shared by every
            account metric; ``None`` without accounts.
    """

    prepared: Prepared
    model: MarginModel
    bars: tuple[BarSeries, ...]
    coverage: Mapping[str, Sequence[CoverageMetrics]]
    liquidation: Mapping[str, Sequence[LiquidationMetrics]]
    margins: Mapping[str, MarginSeries] = dataclasses.field(default_factory=dict)
    accounts: AccountEvaluation | None = None

    def liquidation_totals(self) -> tuple[float, float, int, int, int]:
        """Over the instruments' whole-span figures: ``(notional_opened_usd,
        bad_debt_usd, positions, liquidations, premature_liquidations)``."""
        heads = [ms[0] for ms in self.liquidation.values() if ms]
        return (sum(m.notional_opened_usd for m in heads), sum(m.bad_debt_usd for m in heads),
                sum(m.positions for m in heads), sum(m.liquidations for m in heads),
                sum(m.premature_liquidations for m in heads))


@dataclass(frozen=True)
class Metric:
    """One registered objective or constraint.

    Attributes:
        name: the key in specs and results (``capital_cost``).
        unit: what its values are in (``fraction of notional``).
        direction: ``minimize`` or ``maximize`` (a bound is then a floor).
        description: one sentence for the documentation and the openapi.
        compute: the value of one backtested parameter set.
        needs_liquidation: reads the liquidation simulation (skipped for a trial whose
            coverage is red over the whole span: such a metric counts as violated then).
        unavailable: why a spec cannot have this metric (``None``: it can).
    """

    name: str
    unit: str
    direction: Literal["minimize", "maximize"]
    description: str
    compute: Callable[[Backtested], float]
    needs_liquidation: bool = True
    unavailable: Callable[[CalibrationSpec], str | None] = lambda spec: None

    def oriented(self, value: float) -> float:
        """The value as a minimised quantity (negated for ``maximize``)."""
        return value if self.direction == "minimize" else -value


#: name → metric, in registration order (the order results list constraints in).
METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add ``metric`` to the registry (its name must be new)."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is already registered")
    METRICS[metric.name] = metric
    return metric


def _capital_cost(b: Backtested) -> float:
    """Notional-weighted mean IM rate over the bars with a margin, averaged over
    instruments (fraction of notional)."""
    notionals = b.prepared.liquidation.notionals_usd
    if b.margins:  # the series the other consumers used: nothing computed again
        return margin_capital_cost([b.margins[bars.instrument] for bars in b.bars],
                                   notionals)
    weights = np.asarray(notionals, dtype=np.float64)
    weights = weights / weights.sum()
    per_instrument = []
    for bars in b.bars:
        if b.model.notional_dependent:
            rates = [b.model.margin_rates(bars, notional_usd=float(n)) for n in notionals]
        else:
            rates = [b.model.margin_rates(bars)] * len(notionals)
        means = [float(np.nanmean(r.im_rate[r.first_valid_bar:])) for r in rates]
        per_instrument.append(float(np.dot(weights, means)))
    return float(np.mean(per_instrument))


def _insolvency_bps(b: Backtested) -> float:
    """The spec's insolvency measure, bps: bad debt per notional opened, or the mean
    uncovered loss per observation beyond the margin (both sides, bps of notional)."""
    if b.prepared.spec.objectives.insolvency == "bad_debt_bps":
        opened, bad_debt, _, _, _ = b.liquidation_totals()
        return bad_debt / opened * 1e4 if opened else 0.0
    sides = [s for ms in b.coverage.values() for s in (ms[0].long, ms[0].short)]
    per_obs = [(s.breach_rate or 0.0) * (s.mean_uncovered_loss or 0.0) for s in sides]
    return float(np.mean(per_obs)) * 1e4


def _liquidations_at_risk(b: Backtested) -> float:
    """Liquidations per position opened (fraction): the share of the population the margin
    liquidates."""
    _, _, positions, liquidations, _ = b.liquidation_totals()
    return liquidations / positions if positions else 0.0


def _premature_share(b: Backtested) -> float:
    """Premature liquidations per liquidation (fraction; 0 without liquidations)."""
    _, _, _, liquidations, premature = b.liquidation_totals()
    return premature / liquidations if liquidations else 0.0


def _procyclicality(b: Backtested) -> float:
    """The largest 30-day margin increase ratio over the instruments (ratio, >= 1)."""
    return max(ms[0].max_increase_ratio or 1.0 for ms in b.coverage.values())


def _contagion(b: Backtested) -> float:
    """Healthy-leg liquidations (count, domain.md §7): positions closed with their cross
    (or portfolio) margin account although their isolated twin never triggered or triggered
    later, for the spec's account population (``accounts``; default: a seeded population
    in cross mode on the span's instruments)."""
    assert b.accounts is not None  # prepared whenever contagion is a metric
    return float(b.accounts.replay.summary()["healthy_leg_liquidations"])


def _replay_totals(b: Backtested) -> dict[str, float]:
    assert b.accounts is not None
    summary: dict[str, float] = b.accounts.replay.summary()
    return summary


def _account_bad_debt_bps(b: Backtested) -> float:
    """The accounts' bad debt per notional opened under the section's mode, bps."""
    s = _replay_totals(b)
    return s["bad_debt_usd"] / s["notional_opened_usd"] * 1e4 if s["notional_opened_usd"] \
        else 0.0


def _account_liquidation_rate(b: Backtested) -> float:
    """Liquidated accounts per account opened (fraction)."""
    s = _replay_totals(b)
    return s["liquidated_accounts"] / s["accounts"] if s["accounts"] else 0.0


def _haircut_coverage(b: Backtested) -> float:
    """The haircut coverage backtest (domain.md §9) as one number: over every asset's
    reference holdings, the most breaches beyond what a green traffic light allows at its
    observations (count; ≤ 0: every holding green)."""
    assert b.accounts is not None
    return b.accounts.haircut_excess()


def _portfolio_coverage(b: Backtested) -> float:
    """The portfolio coverage backtest (domain.md §8) as one number: over the reference
    books, the most breaches beyond a green traffic light (count; ≤ 0: every book green)."""
    assert b.accounts is not None
    return b.accounts.portfolio_excess()


def _portfolio_capital_cost(b: Backtested) -> float:
    """The portfolio requirement's mean per gross notional over the reference books'
    observations, averaged over the books (fraction)."""
    assert b.accounts is not None
    return b.accounts.portfolio_capital()


def _collateral_held_back(b: Backtested) -> float:
    """Σ (V − H(V)) / Σ V over every asset's reference holdings (fraction of value)."""
    assert b.accounts is not None
    return b.accounts.held_back()


def _needs_accounts(spec: CalibrationSpec) -> str | None:
    if spec.accounts is None:
        return "this metric needs an accounts section (accounts.population or accounts.file)"
    return None


def _needs_haircuts(spec: CalibrationSpec) -> str | None:
    if spec.accounts is None or not spec.accounts.haircuts:
        return "this metric needs haircut tiers (accounts.haircuts)"
    return None


def _needs_portfolio(spec: CalibrationSpec) -> str | None:
    if spec.accounts is None or spec.accounts.mode != "portfolio":
        return "this metric needs a portfolio margin model (accounts.mode 'portfolio')"
    return None


def _contagion_unavailable(spec: CalibrationSpec) -> str | None:
    if len(spec.data) < 2:
        return ("contagion (healthy-leg liquidations) needs a cross-margin account over at "
                "least two instruments; this spec has one")
    return None


register(Metric("capital_cost", "fraction of notional", "minimize",
                "notional-weighted mean IM rate (what traders must post)", _capital_cost,
                needs_liquidation=False))
register(Metric("insolvency_bps", "bps of notional", "minimize",
                "bad debt per notional opened (objectives.insolvency = bad_debt_bps) or mean "
                "uncovered loss beyond the margin (uncovered_es_bps)", _insolvency_bps))
register(Metric("liquidations_at_risk", "fraction of positions opened", "minimize",
                "liquidations per position opened", _liquidations_at_risk))
register(Metric("premature_share", "fraction of liquidations", "minimize",
                "premature liquidations per liquidation", _premature_share))
register(Metric("procyclicality", "ratio", "minimize",
                "largest 30-day margin increase ratio over the instruments", _procyclicality,
                needs_liquidation=False))
register(Metric("contagion", "healthy-leg liquidations (count)", "minimize",
                "positions closed with their cross-margin account although alone they would "
                "not have been (domain.md §7)", _contagion, needs_liquidation=False,
                unavailable=_contagion_unavailable))
register(Metric("account_bad_debt_bps", "bps of notional", "minimize",
                "the account population's bad debt per notional opened (accounts.mode)",
                _account_bad_debt_bps, needs_liquidation=False, unavailable=_needs_accounts))
register(Metric("account_liquidation_rate", "fraction of accounts", "minimize",
                "liquidated accounts per account opened", _account_liquidation_rate,
                needs_liquidation=False, unavailable=_needs_accounts))
register(Metric("haircut_coverage", "breaches beyond a green light (count)", "minimize",
                "haircut coverage backtest (domain.md §9): most breaches beyond a green "
                "traffic light over the reference holdings; bound it at 0",
                _haircut_coverage, needs_liquidation=False, unavailable=_needs_haircuts))
register(Metric("portfolio_coverage", "breaches beyond a green light (count)", "minimize",
                "portfolio coverage backtest (domain.md §8): most breaches beyond a green "
                "traffic light over the reference books; bound it at 0",
                _portfolio_coverage, needs_liquidation=False, unavailable=_needs_portfolio))
register(Metric("portfolio_capital_cost", "fraction of gross notional", "minimize",
                "mean portfolio requirement per gross notional of the reference books",
                _portfolio_capital_cost, needs_liquidation=False,
                unavailable=_needs_portfolio))
register(Metric("collateral_held_back", "fraction of collateral value", "minimize",
                "collateral value the haircut tiers hold back over the reference holdings",
                _collateral_held_back, needs_liquidation=False, unavailable=_needs_haircuts))

#: The objectives of a spec that names none (domain.md §5).
DEFAULT_OBJECTIVES = ("capital_cost", "insolvency_bps")


def objective_names(spec: CalibrationSpec) -> tuple[str, ...]:
    """The spec's objectives, in order (the first is what "cheapest" ranks by)."""
    return tuple(spec.objectives.minimize) if spec.objectives.minimize else DEFAULT_OBJECTIVES


def appetite_objective(spec: CalibrationSpec) -> str | None:
    """The objective ``risk_appetite_bps`` applies to (``None``: none of the spec's)."""
    names = objective_names(spec)
    chosen = spec.objectives.appetite_on or "insolvency_bps"
    return chosen if chosen in names else None


def metric_bounds(spec: CalibrationSpec) -> dict[str, float]:
    """Metric name → bound (a ceiling for ``minimize`` metrics), in registry order:
    ``constraints.max`` and the older ``max_premature_share`` / ``max_procyclicality``."""
    c = spec.constraints
    given = dict(c.max or {})
    if c.max_premature_share is not None:
        given["premature_share"] = c.max_premature_share
    if c.max_procyclicality is not None:
        given["procyclicality"] = c.max_procyclicality
    return {name: given[name] for name in METRICS if name in given}


def validate_metrics(spec: CalibrationSpec) -> None:
    """Refuse unknown or unavailable objective and constraint names, naming the field.

    Raises:
        InvalidParameters: an unknown name, a repeated objective, a metric this spec cannot
            have (``contagion`` on one instrument), an appetite on no objective, or a bound
            given twice.
    """
    names = objective_names(spec)
    where = {n: f"objectives.minimize[{i}]" for i, n in enumerate(spec.objectives.minimize or ())}
    if len(set(names)) != len(names):
        raise InvalidParameters("objectives.minimize names an objective twice",
                                field="objectives.minimize")
    c = spec.constraints
    for name in c.max or {}:
        where.setdefault(name, f"constraints.max.{name}")
    for legacy, name in (("max_premature_share", "premature_share"),
                         ("max_procyclicality", "procyclicality")):
        if getattr(c, legacy) is not None and name in (c.max or {}):
            raise InvalidParameters(f"{name} is bounded twice: by constraints.{legacy} and "
                                    f"constraints.max.{name}", field=f"constraints.max.{name}")
    for name, field in where.items():
        metric = METRICS.get(name)
        if metric is None:
            raise InvalidParameters(
                f"unknown metric {name!r}; choose one of {', '.join(METRICS)}", field=field)
        reason = metric.unavailable(spec)
        if reason is not None:
            raise InvalidParameters(reason, field=field)
    appetite_on = spec.objectives.appetite_on
    if appetite_on is not None and appetite_on not in names:
        raise InvalidParameters(f"appetite_on names {appetite_on!r}, which is not an objective",
                                field="objectives.appetite_on")
    if spec.risk_appetite_bps is not None and appetite_objective(spec) is None:
        raise InvalidParameters(
            "risk_appetite_bps bounds insolvency_bps, which is not an objective here: name "
            "the objective it bounds in objectives.appetite_on", field="risk_appetite_bps")


__all__ = [
    "DEFAULT_OBJECTIVES",
    "METRICS",
    "Backtested",
    "Metric",
    "appetite_objective",
    "metric_bounds",
    "objective_names",
    "register",
    "validate_metrics",
]
