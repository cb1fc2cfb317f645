"""Replays of real stress events with one call (``marginlab accounts replay EVENT``).

``2020-03-12``: Black Thursday in kind (venues.md M1) on hourly Binance ETH/USDT
(``binance_spot_1h_2017_2021``, PROVENANCE.md #7): 400 Maker-like vaults, long ETH (the
collateral) against USDT (the debt) at collateral ratios 152%..220% and 300..300,000 USD,
opened at 2020-03-12 00:00 UTC, liquidated below 150% (MM = 1/3 of the collateral's value),
replayed three ways: the engine alone; keepers (13% bonus, the Maker penalty) paying 2 USD of
gas behind a one-hour oracle (the OSM); the same with gas × 100 on the 12th.

``2025-10-10``: the BTCUSDT perpetual's 5-minute bars of the day (PROVENANCE.md #11) with
Binance's ±1% bookDepth bands (#12) as the depth every close-out's impact divides by; a seeded
population of directional books (10k..20M USD, 5..40x, 0.5% MM) replayed by the engine alone,
under the ``hyperliquid`` preset (partial 20%, backstop at 2/3 MM, ADL) and under ``dydx_v4``
with one liquidation per 300 s block (a binding throughput).

``luna-2022-05``: LUNA/USDT 1-minute, 2022-05-08 .. 05-13 (``_luna_rows``), under the
engine, the ``hyperliquid`` and the ``aave_v3`` presets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from calibration._errors import InvalidParameters
from calibration.accounts._book import Account
from calibration.accounts._engine import AccountConfig, simulate_accounts
from calibration.accounts._market import Market

#: The events ``replay_event`` knows.
REPLAY_EVENTS: tuple[str, ...] = ("2020-03-12", "2025-10-10", "luna-2022-05")

BT_START_MS, BT_END_MS = 1_583_798_400_000, 1_584_316_800_000  # 2020-03-10 .. 03-16 UTC
BT_ENTRY_MS = 1_583_971_200_000  # 2020-03-12 00:00 UTC
BT_SPIKE_END_MS = 1_584_057_600_000  # 2020-03-13 00:00 UTC
BT_DATA = "binance_spot_1h_2017_2021/ETHUSDT_1h.csv"
BT_MM_PARAMS = {"base_mmr": 1 / 3, "tier_growth": 1.0, "bracket_caps_usd": []}
BT_BASE = AccountConfig(holding_bars=96, latency_bars=1, spread_rate=0.002)
BT_KEEPERS = dataclasses.replace(
    BT_BASE, keeper_bonus_rate=0.13, keeper_gas_usd=2.0, gas_multiplier=100.0,
    gas_window="black_thursday=2020-03-12", oracle_heartbeat_bars=1)


def black_thursday_vaults(seed: int = 7, n: int = 400) -> list[Account]:
    """The Maker-like vaults of the 2020-03-12 replay (module docstring), seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for a in range(n):
        notional = float(np.exp(rng.uniform(np.log(300), np.log(300_000))))
        ratio = float(rng.uniform(1.52, 2.2))
        out.append(Account(id=f"vault{a}", entry_ms=BT_ENTRY_MS,
                           collateral={"USDT": notional * (1 - 1 / ratio)},
                           positions={"ETHUSDT": notional}))
    return out


def black_thursday_market(root: Path) -> Market:
    """Hourly ETH/USDT 2020-03-10 .. 03-16 from the data root."""
    from calibration import load_bars

    return Market.from_series([load_bars(BT_DATA, root=root, start_ms=BT_START_MS,
                                         end_ms=BT_END_MS)])


def replay_event(event: str, root: Path) -> list[dict[str, Any]]:
    """One row per scenario of ``event``: ``scenario``, ``liquidated_accounts``, and for
    2020-03-12 ``keeper_declines`` (account-bars), ``bankrupt_accounts``, ``bad_debt_usd``;
    for 2025-10-10 ``bad_debt_usd``, ``adl_volume_usd``, ``backstop_pnl_usd``,
    ``peak_backlog``; for luna-2022-05 the same but the backlog (USD throughout)."""
    from calibration.models import TieredMargin

    if event not in REPLAY_EVENTS:
        raise InvalidParameters(f"unknown event {event!r} (known: {', '.join(REPLAY_EVENTS)})",
                                field="event")
    if event == "2025-10-10":
        return _oct10_rows(root)
    if event == "luna-2022-05":
        return _luna_rows(root)
    market = black_thursday_market(root)
    vaults = black_thursday_vaults()
    model = TieredMargin(**BT_MM_PARAMS)  # type: ignore[arg-type]
    scenarios = {
        "engine alone": BT_BASE,
        "keepers, normal gas, 1h oracle": dataclasses.replace(BT_KEEPERS, gas_window=None),
        "keepers, gas x100 on 03-12, 1h oracle": BT_KEEPERS,
    }
    rows = []
    for name, cfg in scenarios.items():
        r = simulate_accounts(market, model, vaults, cfg)
        rows.append({"scenario": name, "liquidated_accounts": int((r.trigger_bar >= 0).sum()),
                     "keeper_declines": int(r.keeper_declined.sum()),
                     "bankrupt_accounts": int((r.bad_debt_usd > 0).sum()),
                     "bad_debt_usd": float(r.bad_debt_usd.sum())})
    return rows


OCT10_START_MS, OCT10_END_MS = 1_760_054_400_000, 1_760_140_800_000  # 2025-10-10 UTC
OCT10_BARS = "binance_usdm_perp_5m_2025_10/BTCUSDT_perp_5m.csv"
OCT10_DEPTH = "btc_2025_10_10_crash_microstructure/BTCUSDT-bookDepth-2025-10-10.csv"


def oct10_market(root: Path) -> Market:
    """BTCUSDT perpetual 5-minute bars of 2025-10-10 with the ±1% bookDepth bands as the
    close-outs' depth (bars without a fresh snapshot: the ADV estimate)."""
    from calibration import load_bars
    from calibration.data import load_book_depth, with_depth

    bars = load_bars(OCT10_BARS, root=root, start_ms=OCT10_START_MS, end_ms=OCT10_END_MS)
    return Market.from_series([with_depth(bars, load_book_depth(OCT10_DEPTH, root=root))])


def oct10_book(root: Path) -> tuple[Market, Any, list[Account]]:
    """The 2025-10-10 replay's market, its flat 0.5% MM model and its seeded population (50
    accounts an hour, 10k–20M USD at 5–40x)."""
    from calibration.accounts._book import PopulationSpec, generate_population
    from calibration.models import TieredMargin

    market = oct10_market(root)
    model = TieredMargin(base_mmr=0.005, tier_growth=1.0, bracket_caps_usd=[])
    accounts = generate_population(
        PopulationSpec(seed=10, entry_every_bars=12, accounts_per_entry=50,
                       notional_usd=(10_000.0, 20_000_000.0), leverage=(5.0, 40.0)),
        instruments=market.instruments, timestamp_ms=market.timestamp_ms,
        close=market.matrix("close"), first_bar=0)
    return market, model, accounts


def _oct10_rows(root: Path) -> list[dict[str, Any]]:
    from calibration.accounts._venue_presets import preset_fields

    market, model, accounts = oct10_book(root)
    base = AccountConfig(holding_bars=288, latency_bars=1, impact_coef=0.01,
                         insurance_fund_usd=1_000_000.0)
    scenarios = {
        "engine alone, depth-band impact": base,
        "hyperliquid preset": AccountConfig.from_mapping(
            {**preset_fields("hyperliquid")}, **{
                k: getattr(base, k) for k in ("holding_bars", "latency_bars", "impact_coef",
                                              "insurance_fund_usd")}),
        "dydx_v4 preset, 1 per block of 300 s": AccountConfig.from_mapping(
            {**preset_fields("dydx_v4"), "max_liquidations_per_block": 1,
             "block_seconds": 300.0}, **{
                k: getattr(base, k) for k in ("holding_bars", "latency_bars", "impact_coef",
                                              "insurance_fund_usd")}),
    }
    return _venue_rows(market, model, accounts, scenarios, with_backlog=True)


LUNA_START_MS, LUNA_END_MS = 1_651_968_000_000, 1_652_400_000_000  # 2022-05-08 .. 05-13 UTC
LUNA_BARS = "binance_spot_luna_1m_2022_05/LUNAUSDT_1m_2022-05.csv"


def _luna_rows(root: Path) -> list[dict[str, Any]]:
    """LUNA/USDT 1-minute 2022-05-08 .. 05-13 (before Binance's halt, PROVENANCE.md #3):
    directional books (1k..2M USD, 2..10x, 2% MM), depth 1% of the trailing day's volume."""
    from calibration import load_bars
    from calibration.accounts._book import PopulationSpec, generate_population
    from calibration.accounts._venue_presets import preset_fields
    from calibration.models import TieredMargin

    market = Market.from_series([load_bars(LUNA_BARS, root=root, start_ms=LUNA_START_MS,
                                           end_ms=LUNA_END_MS)])
    model = TieredMargin(base_mmr=0.02, tier_growth=1.0, bracket_caps_usd=[])
    accounts = generate_population(
        PopulationSpec(seed=5, entry_every_bars=60, accounts_per_entry=10,
                       notional_usd=(1_000.0, 2_000_000.0), leverage=(2.0, 10.0)),
        instruments=market.instruments, timestamp_ms=market.timestamp_ms,
        close=market.matrix("close"), first_bar=0)
    keep: dict[str, Any] = {"holding_bars": 1440, "latency_bars": 1, "impact_coef": 0.01,
            "adv_window_bars": 1440, "insurance_fund_usd": 1_000_000.0}
    scenarios = {
        "engine alone, ADV impact": AccountConfig(**keep),
        "hyperliquid preset": AccountConfig.from_mapping(preset_fields("hyperliquid"), **keep),
        "aave_v3 preset": AccountConfig.from_mapping(preset_fields("aave_v3"), **keep),
    }
    return _venue_rows(market, model, accounts, scenarios, with_backlog=False)


def _venue_rows(market: Market, model: Any, accounts: list[Account],
                scenarios: dict[str, AccountConfig], *, with_backlog: bool
                ) -> list[dict[str, Any]]:
    """One row per scenario: liquidated accounts, bad debt, ADL volume and the backstop's
    PnL (USD), and the peak queue (accounts) when ``with_backlog``."""
    rows = []
    for name, cfg in scenarios.items():
        r = simulate_accounts(market, model, accounts, cfg)
        row: dict[str, Any] = {
            "scenario": name, "liquidated_accounts": int((r.trigger_bar >= 0).sum()),
            "bad_debt_usd": float(r.bad_debt_usd.sum()),
            "adl_volume_usd": r.adl.adl_volume_usd if r.adl is not None else 0.0,
            "backstop_pnl_usd": (float(r.backstop_pnl_usd.sum())
                                 if r.backstop_pnl_usd.size else 0.0)}
        if with_backlog:
            row["peak_backlog"] = int(r.backlog.max()) if r.backlog.size else 0
        rows.append(row)
    return rows
