"""Replay 2020-03-12 (Black Thursday) on hourly Binance ETH/USDT with Maker-like vaults: the
engine alone, keepers at normal gas behind a one-hour oracle, and keepers with gas ×100 on the
12th (venues.md M1). Prints liquidations, keeper declines and bad debt per scenario.

    MARGINLAB_DATA_ROOT=../shared/data .venv/bin/python examples/replay_black_thursday.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibration import load_bars
from calibration.accounts import AccountConfig, Market, simulate_accounts
from tests.test_account_venue import (
    BT_BASE,
    BT_END,
    BT_KEEPERS,
    BT_MM,
    BT_START,
    black_thursday_vaults,
)


def main() -> int:
    root = Path(os.environ.get("MARGINLAB_DATA_ROOT", "../shared/data"))
    bars = load_bars("binance_spot_1h_2017_2021/ETHUSDT_1h.csv", root=root,
                     start_ms=BT_START, end_ms=BT_END)
    market = Market.from_series([bars])
    vaults = black_thursday_vaults()
    scenarios = {
        "engine alone": AccountConfig(**BT_BASE),
        "keepers, normal gas, 1h oracle": AccountConfig(
            **BT_BASE, **{**BT_KEEPERS, "gas_window": None}),
        "keepers, gas x100 on 03-12, 1h oracle": AccountConfig(**BT_BASE, **BT_KEEPERS),
    }
    print(f"{'scenario':<40}{'liquidated':>11}{'declines':>10}{'bankrupt':>10}"
          f"{'bad debt USD':>14}")
    for name, cfg in scenarios.items():
        r = simulate_accounts(market, BT_MM, vaults, cfg)
        print(f"{name:<40}{int((r.trigger_bar >= 0).sum()):>11}"
              f"{int(r.keeper_declined.sum()):>10}{int((r.bad_debt_usd > 0).sum()):>10}"
              f"{r.bad_debt_usd.sum():>14,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
