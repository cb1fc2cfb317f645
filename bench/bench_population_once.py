"""CPU per account-level trial with the generated population drawn once per span (issue 14)
against drawing it every trial (the memo cleared before each evaluation), in one process.

Run: ``python -m bench.bench_population_once`` (needs ``../shared/data``; ~15 s). Same bars
and account section as ``bench_account_calibration``'s third row; medians of ``REPEATS``
``time.process_time`` figures after a warm-up, alternating the two ways.
"""

from __future__ import annotations

import os
import statistics
import time

from bench.bench_account_calibration import ACCOUNT_SECTION, PARAMS, RULES_OFF, _spec
from calibration.calibrate import evaluate, prepare

ROOT = os.environ.get("MARGINLAB_DATA_ROOT", "../shared/data")
REPEATS = 7


def main() -> None:
    section = ACCOUNT_SECTION
    spec = _spec(accounts=section,
                 objectives={"minimize": ["portfolio_capital_cost", "account_bad_debt_bps",
                                          "collateral_held_back"]},
                 constraints={**RULES_OFF, "max": {"haircut_coverage": 0,
                                                   "portfolio_coverage": 0}})
    params = {**PARAMS, "engine.partial_fraction": 0.4, "portfolio.price_range": 0.1,
              "haircuts.BTC.ratios[1]": 0.9}
    prepared = prepare(spec, ROOT)
    assert prepared.accounts is not None
    memo = prepared.accounts.populations
    evaluate(prepared, params, prune_hopeless=False)
    once, every = [], []
    for _ in range(REPEATS):
        start = time.process_time()
        evaluate(prepared, params, prune_hopeless=False)
        once.append(time.process_time() - start)
        memo.clear()
        start = time.process_time()
        evaluate(prepared, params, prune_hopeless=False)
        every.append(time.process_time() - start)
    a, b = statistics.median(once), statistics.median(every)
    print(f"load average {os.getloadavg()[0]:.2f}; CPU per trial, median of {REPEATS}")
    print(f"population drawn once:        {a * 1e3:7.1f} ms")
    print(f"population drawn every trial: {b * 1e3:7.1f} ms")
    print(f"saved per trial: {(b - a) * 1e3:.1f} ms ({(b - a) / b:.1%})")


if __name__ == "__main__":
    main()
