"""Replays of real stress days: ``marginlab accounts replay NAME``, one command each.

Each replay is an ``accounts backtest`` with fixed arguments over files of the shared data
set (``../shared/data``, see its ``PROVENANCE.md``; data references are relative to
``MARGINLAB_DATA_ROOT``). ``marginlab accounts replay NAME --print-command`` prints the
equivalent ``accounts backtest`` command, so every figure a replay prints can be reproduced
and varied by hand; arguments after the name (``--json``, ``--report FILE``, ``--frontier``,
``--policy`` ...) are passed on.

The populations and mechanics settings are assumptions of these examples, stated here, not
venue data: seeded synthetic books (``PopulationSpec``), a Binance-shaped tiered schedule, a
square-root impact on the depth in the data (order-book bands where the day has them, else a
fraction of traded volume) and the §4 cascade rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from calibration._errors import InvalidParameters

_TIERED = {"base_mmr": 0.004, "tier_growth": 1.5,
           "bracket_caps_usd": [250_000, 1_000_000, 5_000_000]}


@dataclass(frozen=True)
class Replay:
    """One stress day as an account backtest."""

    name: str
    description: str
    data: tuple[tuple[str, str], ...]
    start: str
    end: str
    population: dict[str, Any]
    params: dict[str, Any]
    liquidation: dict[str, Any]
    funding: tuple[tuple[str, str], ...] = ()
    depth: tuple[tuple[str, str], ...] = ()
    model: str = "tiered"
    frontier: str | None = None

    def arguments(self) -> list[str]:
        """The ``marginlab accounts backtest`` arguments of this replay."""
        args = ["accounts", "backtest"]
        for flag, pairs in (("--data", self.data), ("--funding", self.funding),
                            ("--depth", self.depth)):
            for name, ref in pairs:
                args += [flag, f"{name}={ref}"]
        args += ["--start", self.start, "--end", self.end,
                 "--population", json.dumps(self.population),
                 "--model", self.model, "--params", json.dumps(self.params),
                 "--liquidation", json.dumps(self.liquidation)]
        if self.frontier:
            args += ["--frontier", self.frontier]
        return args


REPLAYS: dict[str, Replay] = {
    "2025-10-10": Replay(
        name="2025-10-10",
        description=(
            "The 2025-10-10 cascade on Binance USD-M BTC and ETH perpetuals (5-minute bars, "
            "8-hourly funding), BTC slippage and cascade driven by Binance's published "
            "bookDepth bands (±1 % band, ~30 s snapshots; the bid side fell ~98 % in the "
            "crash), ETH's by 1 % of its trailing traded volume. The day only: the depth "
            "file covers 2025-10-10. 4,800 accounts (a cohort of 200 every hour; directional, "
            "hedged and basket books, 5-50x), a liquidation engine of 20 accounts per "
            "5-minute bar, and the throughput-insolvency frontier."),
        data=(("BTCUSDT", "binance_usdm_perp_5m_2025_10/BTCUSDT_perp_5m.csv"),
              ("ETHUSDT", "binance_usdm_perp_5m_2025_10/ETHUSDT_perp_5m.csv")),
        funding=(("BTCUSDT", "binance_usdm_perp_5m_2025_10/BTCUSDT_funding_8h.csv"),
                 ("ETHUSDT", "binance_usdm_perp_5m_2025_10/ETHUSDT_funding_8h.csv")),
        depth=(("BTCUSDT", "btc_2025_10_10_crash_microstructure/"
                           "BTCUSDT-bookDepth-2025-10-10.csv"),),
        start="2025-10-10", end="2025-10-10",
        population={"seed": 1, "entry_every_bars": 12, "accounts_per_entry": 200,
                    "leverage": [5, 50]},
        params=_TIERED,
        liquidation={"holding_bars": 288, "latency_bars": 1, "spread_rate": 0.0005,
                     "funding": True, "impact_coef": 0.1, "cascade": True,
                     "cascade_kappa": 0.05, "max_liquidations_per_bar": 20},
        frontier="1,5,20,100,inf"),
    "2020-03-12": Replay(
        name="2020-03-12",
        description=(
            "Black Thursday, 2020-03-05 .. 03-15, on Binance BTC and ETH hourly bars (spot: "
            "the shared data has no perpetual bars before 2020-08; the move is the same "
            "market's), slippage and cascade on 1 % of trailing traded volume. 4,400 "
            "accounts (100 every 6 hours, 3-50x), a three-day holding period."),
        data=(("BTCUSDT", "binance_spot_1h_2017_2021/BTCUSDT_1h.csv"),
              ("ETHUSDT", "binance_spot_1h_2017_2021/ETHUSDT_1h.csv")),
        start="2020-03-05", end="2020-03-15",
        population={"seed": 2, "entry_every_bars": 6, "accounts_per_entry": 100,
                    "leverage": [3, 50]},
        params=_TIERED,
        liquidation={"holding_bars": 72, "latency_bars": 1, "spread_rate": 0.0005,
                     "impact_coef": 0.1, "cascade": True, "cascade_kappa": 0.05}),
    "luna-2022-05": Replay(
        name="luna-2022-05",
        description=(
            "LUNA's collapse, 2022-05-01 .. 05-13 (Binance spot LUNAUSDT, 1-minute bars; "
            "trading stopped on 05-13 and the file's later rows are the relaunched token, "
            "left out). Long and short LUNA books with collateral 70 % USDT / 30 % LUNA (the "
            "collateral falls with the book), slippage on 1 % of trailing traded volume, no "
            "cascade. A cohort of 25 accounts every 4 hours, 2-20x."),
        data=(("LUNAUSDT", "binance_spot_luna_1m_2022_05/LUNAUSDT_1m_2022-05.csv"),),
        start="2022-05-01", end="2022-05-13",
        population={"seed": 3, "entry_every_bars": 240, "accounts_per_entry": 25,
                    "leverage": [2, 20], "collateral_weights": {"USDT": 0.7, "LUNA": 0.3}},
        params={"base_mmr": 0.01, "tier_growth": 1.5, "bracket_caps_usd": [250_000, 1_000_000]},
        liquidation={"holding_bars": 1440, "latency_bars": 1, "spread_rate": 0.001,
                     "impact_coef": 0.1}),
}


def replay(name: str) -> Replay:
    """The replay of this name; refused, naming the choices, when there is none."""
    try:
        return REPLAYS[name]
    except KeyError:
        raise InvalidParameters(f"no replay {name!r}; choose one of {', '.join(REPLAYS)}",
                                field="name") from None
