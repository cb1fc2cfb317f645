"""Replay 2020-03-12 (Black Thursday) in kind: the same as ``marginlab accounts replay
2020-03-12`` (``calibration.accounts._replays``), printed as a table.

    MARGINLAB_DATA_ROOT=../shared/data .venv/bin/python examples/replay_black_thursday.py
"""

from __future__ import annotations

import os
from pathlib import Path

from calibration.accounts._replays import replay_event


def main() -> int:
    root = Path(os.environ.get("MARGINLAB_DATA_ROOT", "../shared/data"))
    for row in replay_event("2020-03-12", root):
        print(f"{row['scenario']:<40} liquidated {row['liquidated_accounts']:>4}  declines "
              f"{row['keeper_declines']:>5}  bankrupt {row['bankrupt_accounts']:>3}  bad debt "
              f"{row['bad_debt_usd']:>10,.0f} USD")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
