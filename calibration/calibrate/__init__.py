"""Calibration: Optuna searches a model's hyperparameters against capital and insolvency.

domain.md §5. The run flows down these modules, none importing one above it:

- ``_accounts``: the spec's ``accounts`` section and its dotted search-space keys
  (``engine.*``, ``portfolio.*``, ``haircuts.*``); ``AccountEvaluation``, one trial's account
  replay and haircut / portfolio coverage backtests, which the account metrics read.
- ``_prepare``: ``prepare`` loads and splits the spec's data once per process (``Prepared``).
- ``_objectives``: the registry of metrics a spec minimises or bounds (``METRICS``,
  ``register``).
- ``_regimes``: evidence per volatility regime (domain.md §11).
- ``_evaluate``: ``evaluate`` backtests one parameter set (coverage + liquidation) and
  returns the objectives, the constraint values and the evidence (``Evaluation``).
- ``_study``: the study of a spec (``create_or_load_study``, ``load_study``, the sampler).
- ``_recommend``: ``summarize`` reads the Pareto front and picks the recommendation.
- ``_workers``: ``run_worker`` adds trials to a study until the requested count is reached
  (any number of workers, processes or machines, may do so at once).
- ``_compare``: two results side by side against the published parameters replayed.
- ``_run``: the one run sequence, ``run_calibration`` (and ``join_calibration`` for a worker
  joining a study), which the library's ``calibrate``, ``marginlab calibrate`` /
  ``marginlab worker`` and the service's jobs all call.
"""

from calibration.calibrate._compare import (
    ComparedSide,
    Comparison,
    PublishedReplay,
    compare_results,
    replay_published,
)
from calibration.calibrate._evaluate import (
    METRICS_ATTR,
    OBJECTIVE_NAMES,
    VIOLATION_KEY,
    Evaluation,
    evaluate,
    trial_metrics,
    violation,
)
from calibration.calibrate._objectives import (
    METRICS,
    Backtested,
    Metric,
    appetite_objective,
    metric_bounds,
    objective_names,
    register,
)
from calibration.calibrate._prepare import Prepared, cut, load_data_ref, prepare, prepare_bars
from calibration.calibrate._recommend import (
    BINDING_TOLERANCE,
    CalibrationResult,
    ParetoPoint,
    Recommendation,
    best_feasible,
    recommended_trial,
    summarize,
)
from calibration.calibrate._run import (
    StudyWatcher,
    calibrate,
    check_workers,
    join_calibration,
    run_calibration,
)
from calibration.calibrate._study import (
    StudyMismatch,
    check_numerics,
    create_or_load_study,
    load_study,
    make_sampler,
    propose_batch,
    study_name,
)
from calibration.calibrate._workers import TrialCallback, run_worker

__all__ = [
    "BINDING_TOLERANCE",
    "METRICS",
    "METRICS_ATTR",
    "OBJECTIVE_NAMES",
    "VIOLATION_KEY",
    "Backtested",
    "CalibrationResult",
    "ComparedSide",
    "Comparison",
    "Evaluation",
    "Metric",
    "ParetoPoint",
    "Prepared",
    "PublishedReplay",
    "Recommendation",
    "StudyMismatch",
    "StudyWatcher",
    "TrialCallback",
    "appetite_objective",
    "best_feasible",
    "calibrate",
    "check_numerics",
    "check_workers",
    "compare_results",
    "create_or_load_study",
    "cut",
    "evaluate",
    "join_calibration",
    "load_data_ref",
    "load_study",
    "make_sampler",
    "metric_bounds",
    "objective_names",
    "prepare",
    "prepare_bars",
    "propose_batch",
    "recommended_trial",
    "register",
    "replay_published",
    "run_calibration",
    "run_worker",
    "study_name",
    "summarize",
    "trial_metrics",
    "violation",
]
