"""Calibrating collateral haircut tiers (domain.md §9) against the haircut coverage backtest.

The search keeps the venue's band caps and looks for the band ratios that hold back the least
collateral value while the haircut coverage backtest stays green for every reference holding:

- **monotone by construction**: ratio_0 = 1 − d_0 and ratio_k = ratio_{k−1} − d_k with every
  d ≥ 0, so a larger holding never counts at a higher ratio;
- **objective** (minimised): the collateral value held back, Σ_V (V − H(V)) over the reference
  holdings, USD;
- **constraint** (``trial.set_constraint``, feasible when ≤ 0): for every holding, the
  breaches of the whole sample minus the most a green traffic light allows at its
  observations (``p = expected_breach_rate``).

The recommendation is the feasible trial with the least value held back (ties: the lower trial
number); a named preset (e.g. Binance's BTC schedule) is evaluated on the same data beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy.stats import binom

from calibration._bars import BarSeries
from calibration._errors import InvalidParameters
from calibration.accounts._haircut_coverage import HaircutCoverage, haircut_coverage
from calibration.accounts._haircuts import HaircutSchedule, tiered
from calibration.windows import StressWindow


@dataclass(frozen=True)
class HaircutTierCalibration:
    """The recommended tiers and their evidence.

    Attributes:
        schedule: the recommended schedule (``None`` when no trial was feasible).
        held_back_usd: its objective, Σ (V − H(V)) over ``holdings_usd``, USD.
        holdings_usd: the reference holdings, USD.
        coverage: the recommended schedule's haircut coverage rows (all, then windows).
        presets: name → (held back USD, coverage rows) of each preset on the same data.
        trials: trials run; ``feasible_trials`` those meeting the constraint.
    """

    schedule: HaircutSchedule | None
    held_back_usd: float | None
    holdings_usd: tuple[float, ...]
    coverage: list[HaircutCoverage]
    presets: dict[str, tuple[float, list[HaircutCoverage]]] = field(default_factory=dict)
    trials: int = 0
    feasible_trials: int = 0


def green_limit(observations: int, p: float) -> int:
    """The most breaches a green traffic light allows at ``observations`` (F(x) < 0.95);
    −1 when even none is not green."""
    if observations <= 0:
        return -1
    return int(binom.ppf(0.95, observations, p)) - 1


def _held_back(schedule: HaircutSchedule, holdings: Sequence[float]) -> float:
    return float(sum(v - schedule.value_usd(v) for v in holdings))


def calibrate_haircut_tiers(
    bars: BarSeries,
    *,
    caps_usd: Sequence[float],
    liquidation_bars: int,
    holdings_usd: Sequence[float] | None = None,
    n_trials: int = 100,
    seed: int = 0,
    max_step: float = 0.2,
    expected_breach_rate: float = 0.01,
    coverage_settings: Mapping[str, Any] | None = None,
    stress_windows: Sequence[StressWindow] = (),
    presets: Mapping[str, HaircutSchedule] | None = None,
) -> HaircutTierCalibration:
    """Search band ratios for ``caps_usd`` on ``bars`` (see the module doc).

    Args:
        caps_usd: the bands' upper bounds, USD, increasing (one more band above the last).
        liquidation_bars: bars to sell a holding, ``h``.
        holdings_usd: reference holdings, USD (default: each band's upper bound and twice
            the last).
        n_trials, seed: Optuna TPE trials and seed (the search is deterministic given both).
        max_step: the largest ratio step between adjacent bands (and below 1 for the first).
        coverage_settings: ``haircut_coverage`` keywords (spread, impact, depth, overlap).
        presets: schedules to evaluate beside the recommendation.
    """
    import optuna

    caps = tuple(float(c) for c in caps_usd)
    if not caps:
        raise InvalidParameters("caps_usd: give at least one band cap", field="caps_usd")
    holdings = tuple(float(v) for v in holdings_usd) if holdings_usd else (*caps, 2 * caps[-1])
    if not 0 < max_step <= 1:
        raise InvalidParameters("max_step must be in (0, 1]", field="max_step")
    settings = dict(coverage_settings or {})

    def evaluate(schedule: HaircutSchedule) -> list[HaircutCoverage]:
        return haircut_coverage(bars, schedule, holdings_usd=holdings,
                                liquidation_bars=liquidation_bars,
                                expected_breach_rate=expected_breach_rate,
                                stress_windows=stress_windows, **settings)

    def schedule_of(params: Mapping[str, float]) -> HaircutSchedule:
        ratios, level = [], 1.0
        for k in range(len(caps) + 1):
            level = max(0.0, level - params[f"step_{k}"])
            ratios.append(level)
        return tiered(caps, ratios)

    def excess(rows: list[HaircutCoverage]) -> float:
        return float(max(r.breaches - green_limit(r.observations, expected_breach_rate)
                         for r in rows if r.window == "all"))

    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    for _ in range(int(n_trials)):
        trial = study.ask()
        params = {f"step_{k}": trial.suggest_float(f"step_{k}", 0.0, max_step)
                  for k in range(len(caps) + 1)}
        schedule = schedule_of(params)
        over = excess(evaluate(schedule))
        trial.set_user_attr("excess", over)
        trial.set_constraint("green_excess", over)
        study.tell(trial, _held_back(schedule, holdings))
    feasible = [t for t in study.trials
                if t.value is not None and t.user_attrs["excess"] <= 0]
    best = min(feasible, key=lambda t: (t.value, t.number)) if feasible else None
    chosen = schedule_of(best.params) if best is not None else None
    shown = {name: (_held_back(s, holdings), evaluate(s)) for name, s in (presets or {}).items()}
    return HaircutTierCalibration(
        schedule=chosen, held_back_usd=None if chosen is None else _held_back(chosen, holdings),
        holdings_usd=holdings, coverage=[] if chosen is None else evaluate(chosen),
        presets=shown, trials=len(study.trials), feasible_trials=len(feasible))
