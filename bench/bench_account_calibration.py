"""CPU per trial of an account-level calibration (issue 14 item 2), against a model-only
trial on the same bars, in one process (ratios are what to compare across machines).

Run: ``python -m bench.bench_account_calibration`` (needs ``../shared/data``; ~20 s). Each
figure is the median CPU time (``time.process_time``) of ``REPEATS`` evaluations after one
warm-up (the numba kernels compiled or loaded from the cache), without the coverage-red
pruning (so the model-only trial runs its liquidation replay).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

from calibration.calibrate import evaluate, prepare
from calibration.spec import decode_spec

ROOT = os.environ.get("MARGINLAB_DATA_ROOT", "../shared/data")
REPEATS = 5
MODEL = {"decay": {"value": 0.95}, "floor_rate": {"value": 0.016},
         "confidence": {"value": 0.99}, "apc_buffer": {"value": 0.5},
         "horizon_bars": {"value": 2}, "warmup_bars": {"value": 300}}
PARAMS = {k: v["value"] for k, v in MODEL.items()}
RULES_OFF = {"kupiec_alpha": None, "no_red_in_stress_windows": False,
             "max_premature_share": None}


def _spec(**extra: Any) -> Any:
    raw = {"data": [{"instrument": i, "ref": f"binance_spot_2020_2025/{i}_30m.csv",
                     "start": "2022-04-01", "end": "2022-12-31"}
                    for i in ("BTCUSDT", "ETHUSDT")],
           "model": "ewma", "search_space": dict(MODEL),
           "walk_forward": {"in_sample_end": "2022-12-01", "folds": 1}, **extra}
    return decode_spec(json.dumps(raw))


def _cpu(prepared: Any, params: dict[str, Any]) -> float:
    evaluate(prepared, params, prune_hopeless=False)
    times = []
    for _ in range(REPEATS):
        start = time.process_time()
        evaluate(prepared, params, prune_hopeless=False)
        times.append(time.process_time() - start)
    return statistics.median(times)


#: The account-level section both account benchmarks calibrate on.
ACCOUNT_SECTION: dict[str, Any] = {
    "population": {"accounts_per_entry": 5, "collateral_weights": {"USDT": 0.5, "BTC": 0.5}},
    "mode": "portfolio", "engine": {"policy": "partial"}, "portfolio": {"warmup_bars": 300},
    "haircuts": {"BTC": {"caps_usd": [1e6], "ratios": [0.98, 0.95]}}}


def main() -> None:
    section = ACCOUNT_SECTION
    cases = {
        "model only (capital_cost, insolvency_bps)": (_spec(), PARAMS),
        "contagion alone (cross, default population)": (_spec(
            objectives={"minimize": ["capital_cost", "contagion"]},
            constraints=RULES_OFF), PARAMS),
        "account-level, 3 account objectives + 2 coverage constraints": (_spec(
            accounts=section,
            objectives={"minimize": ["portfolio_capital_cost", "account_bad_debt_bps",
                                     "collateral_held_back"]},
            constraints={**RULES_OFF, "max": {"haircut_coverage": 0,
                                              "portfolio_coverage": 0}}),
            {**PARAMS, "engine.partial_fraction": 0.4, "portfolio.price_range": 0.1,
             "haircuts.BTC.ratios[1]": 0.9}),
        "account-level, + contagion and account_liquidation_rate (same replay)": (_spec(
            accounts=section,
            objectives={"minimize": ["portfolio_capital_cost", "account_bad_debt_bps",
                                     "collateral_held_back", "contagion",
                                     "account_liquidation_rate"]},
            constraints={**RULES_OFF, "max": {"haircut_coverage": 0,
                                              "portfolio_coverage": 0}}),
            {**PARAMS, "engine.partial_fraction": 0.4, "portfolio.price_range": 0.1,
             "haircuts.BTC.ratios[1]": 0.9}),
    }
    base = None
    print(f"load average {os.getloadavg()[0]:.2f}; CPU per trial, median of {REPEATS}")
    for name, (spec, params) in cases.items():
        cpu = _cpu(prepare(spec, ROOT), params)
        base = base or cpu
        print(f"{name:72s} {cpu * 1e3:8.1f} ms  ×{cpu / base:.2f}")


if __name__ == "__main__":
    main()
