"""Benchmark: the cost of ADL feeding back (issue 13) on the 2025-10-10 replay.

Run from the repository root (needs ../shared/data, or MARGINLAB_SHARED_DATA)::

    python -m bench.bench_adl_feedback

The ``dydx_v4`` scenario of ``marginlab accounts replay 2025-10-10`` (one liquidation per
300 s block: the fund is exhausted and ADL fills), replayed with ADL on and with ADL off
(the same run otherwise); CPU time (``time.process_time``) best of ``REPEATS`` after one
warm-up (numba compilation excluded), the walks of the mechanics kernel each run takes
(accounts + twins + one per fixed-point round) and the ADL figures.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import calibration.accounts._engine as engine
from calibration.accounts._engine import AccountConfig, simulate_accounts
from calibration.accounts._replays import oct10_book
from calibration.accounts._venue_presets import preset_fields

REPEATS = 3


def main() -> None:
    root = Path(os.environ.get("MARGINLAB_SHARED_DATA", "../shared/data"))
    market, model, accounts = oct10_book(root)
    on = AccountConfig.from_mapping(
        {**preset_fields("dydx_v4"), "max_liquidations_per_block": 1, "block_seconds": 300.0},
        holding_bars=288, latency_bars=1, impact_coef=0.01, insurance_fund_usd=1_000_000.0)
    off = dataclasses.replace(on, adl=False)
    walks = [0]
    inner = engine._run_mech

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        walks[0] += 1
        return inner(*args, **kwargs)

    engine._run_mech = counted  # type: ignore[assignment]
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for name, cfg in (("adl on", on), ("adl off", off)):
        simulate_accounts(market, model, accounts, cfg)  # warm-up
        best = float("inf")
        for _ in range(REPEATS):
            walks[0] = 0
            t0 = time.process_time()
            r = simulate_accounts(market, model, accounts, cfg)
            best = min(best, time.process_time() - t0)
        extra = ""
        if r.adl is not None:
            extra = (f", {len(r.adl.fills)} ADL fills, "
                     f"{len({f.account for f in r.adl.fills})} accounts deleveraged, "
                     f"volume {r.adl.adl_volume_usd:,.0f} USD")
        print(f"{name}: {best:.3f} s CPU, {walks[0]} walks, bad debt "
              f"{float(r.bad_debt_usd.sum()):,.0f} USD{extra}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
