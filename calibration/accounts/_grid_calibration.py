"""Calibrating a portfolio-margin scenario grid (domain.md §8) with a held-out fold.

The grid's free parameters (``search_space``: names of ``GridPortfolioMargin`` with a
``(low, high)`` range each, e.g. ``confidence``, ``min_price_range``, ``offset_credit_cap``)
are searched with Optuna TPE on the **training** observations of the reference books:

- **objective** (minimised): the mean requirement over the training observations as a
  fraction of each book's gross notional, averaged over the books (capital, a fraction);
- **constraint** (``trial.set_constraint``, feasible when ≤ 0): for every book, the training
  breaches minus the most a green traffic light allows at its training observations.

Observations are split by time: those whose loss interval ends before ``split_ms`` train,
the rest are held out. The grid's EWMA state runs through the whole market (it only looks
back), so the held-out requirement is what the model would have charged then. The
recommendation (least capital among feasible trials, ties by trial number) is then tested on
the held-out observations with §3's statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration._errors import InvalidParameters
from calibration.accounts._haircut_calibration import green_limit
from calibration.accounts._market import Market
from calibration.accounts._portfolio_coverage import PortfolioBook, portfolio_coverage
from calibration.models._portfolio import GridPortfolioMargin
from calibration.stats import kupiec_lr, traffic_light


@dataclass(frozen=True)
class FoldCoverage:
    """One book's coverage on one fold (field names as domain.md §3)."""

    book: str
    fold: str
    observations: int
    breaches: int
    breach_rate: float
    kupiec_lr: float
    traffic_light: str
    mean_requirement_rate: float


@dataclass(frozen=True)
class GridCalibration:
    """The recommended grid and its evidence.

    Attributes:
        params: the recommended ``GridPortfolioMargin`` parameters (fixed and searched), or
            ``None`` when no trial was feasible.
        capital_rate: its objective on the training fold (a fraction of gross notional).
        coverage: per book, its ``train`` and ``held_out`` coverage.
        trials, feasible_trials: counts.
    """

    params: dict[str, Any] | None
    capital_rate: float | None
    coverage: list[FoldCoverage]
    trials: int
    feasible_trials: int


def _folds(market: Market, model: GridPortfolioMargin, book: PortfolioBook, split_ms: int,
           confidence: float) -> list[FoldCoverage]:
    cov = portfolio_coverage(market, model, book, confidence=confidence)
    ts = np.asarray(market.timestamp_ms, dtype=np.int64)
    end_bar = np.minimum(cov.observation_bars + cov.horizon_bars, len(ts) - 1)
    train = ts[end_bar] + market.bar_seconds * 1000 <= split_ms
    gross = float(sum(abs(v) for v in book.notional_usd.values()))
    p = 1.0 - confidence
    out = []
    for fold, member in (("train", train), ("held_out", ~train)):
        n = int(member.sum())
        x = int(cov.breach[member].sum())
        out.append(FoldCoverage(
            book=book.name, fold=fold, observations=n, breaches=x,
            breach_rate=x / n if n else 0.0, kupiec_lr=kupiec_lr(n, x, p) if n else 0.0,
            traffic_light=traffic_light(n, x, p) if n else "insufficient",
            mean_requirement_rate=(float(cov.requirement_usd[member].mean()) / gross
                                   if n else 0.0)))
    return out


def calibrate_portfolio_grid(
    market: Market,
    books: Sequence[PortfolioBook],
    *,
    split_ms: int,
    search_space: Mapping[str, tuple[float, float]],
    fixed: Mapping[str, Any] | None = None,
    confidence: float = 0.99,
    n_trials: int = 40,
    seed: int = 0,
) -> GridCalibration:
    """Search ``search_space`` of a ``GridPortfolioMargin`` over ``fixed`` (see the module
    doc); the coverage level tested is ``confidence`` (p = 1 − confidence)."""
    import optuna

    if not books:
        raise InvalidParameters("give at least one reference book", field="books")
    if not search_space:
        raise InvalidParameters("search_space: name at least one grid parameter",
                                field="search_space")
    base = dict(fixed or {})
    for name in search_space:
        if name not in GridPortfolioMargin.rules:
            raise InvalidParameters(f"search_space: {name!r} is not a searchable grid "
                                    f"parameter ({', '.join(GridPortfolioMargin.rules)})",
                                    field=f"search_space.{name}")
    p = 1.0 - confidence

    def run(params: Mapping[str, Any]) -> list[FoldCoverage]:
        model = GridPortfolioMargin(**{**base, **params})
        return [row for book in books for row in _folds(market, model, book, split_ms,
                                                         confidence)]

    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    for _ in range(int(n_trials)):
        trial = study.ask()
        params = {name: trial.suggest_float(name, float(lo), float(hi))
                  for name, (lo, hi) in search_space.items()}
        rows = [r for r in run(params) if r.fold == "train"]
        over = max(r.breaches - green_limit(r.observations, p) for r in rows)
        trial.set_user_attr("excess", float(over))
        trial.set_constraint("green_excess", float(over))
        study.tell(trial, float(np.mean([r.mean_requirement_rate for r in rows])))
    feasible = [t for t in study.trials if t.value is not None and t.user_attrs["excess"] <= 0]
    best = min(feasible, key=lambda t: (t.value, t.number)) if feasible else None
    if best is None:
        return GridCalibration(None, None, [], len(study.trials), 0)
    assert best.value is not None  # feasible trials were told a value
    return GridCalibration(params={**base, **best.params}, capital_rate=float(best.value),
                           coverage=run(best.params), trials=len(study.trials),
                           feasible_trials=len(feasible))
