"""``simulate_accounts(..., workers=N)``: the same result bit for bit as one worker.

One worker is one kernel call over every row (the replay the brute-force tests in
``test_accounts`` check); N workers cut the rows into blocks taken by N threads. Every figure
of the result is compared byte for byte, on real bars (BTC / ETH / SOL through the LUNA crash)
and a population large enough that both passes split into many blocks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from calibration import InvalidParameters, load_bars, make_model
from calibration.accounts import (
    AccountConfig,
    AccountResult,
    Market,
    PopulationSpec,
    generate_population,
    simulate_accounts,
)
from calibration.accounts._split import row_blocks
from calibration.models import make_portfolio_model

LUNA_30M = [f"binance_spot_2020_2025/{s}USDT_30m.csv" for s in ("BTC", "ETH", "SOL")]


def _assert_same_bits(a: AccountResult, b: AccountResult) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype, f.name
            assert x.shape == y.shape, f.name
            assert x.tobytes() == y.tobytes(), f.name  # NaN where NaN, -0.0 where -0.0
        else:
            assert x == y, f.name


@pytest.fixture(scope="module")
def luna(shared_data: Path, data_file: Callable[[str], str]) -> Market:
    for r in LUNA_30M:
        data_file(r)
    start, end = 1_651_363_200_000, 1_653_782_400_000  # 2022-05-01 .. 2022-05-29
    return Market.from_series([load_bars(r, root=shared_data, start_ms=start, end_ms=end)
                               for r in LUNA_30M])


@pytest.mark.data
def test_workers_replay_bit_for_bit_in_every_mode(luna: Market) -> None:
    """Cross, isolated, portfolio, mixed modes and the mechanics (partial closes under a
    capacity limit): 2 and 3 workers give every array of 1 worker's result."""
    spec = PopulationSpec(seed=5, entry_every_bars=3, accounts_per_entry=6,
                          leverage=(5.0, 40.0), collateral_weights={"USDT": 0.6, "BTC": 0.4})
    accounts = generate_population(spec, instruments=luna.instruments,
                                   timestamp_ms=luna.timestamp_ms, close=luna.matrix("close"))
    n_pos = sum(len(a.positions) for a in accounts)
    # Both passes cut into many blocks, so the threads interleave.
    assert len(row_blocks(len(accounts), 2)) >= 4
    assert len(row_blocks(n_pos, 2)) >= 8
    model = make_model("tiered", {"base_mmr": 0.02, "tier_growth": 1.5,
                                  "bracket_caps_usd": [50_000, 250_000]})
    pm = make_portfolio_model("deribit_pme_2024")
    base = AccountConfig(holding_bars=96, latency_bars=1, spread_rate=0.001,
                         liquidation_fee_rate=0.002)
    mixed = [dataclasses.replace(a, mode=("cross", "isolated", "portfolio")[j % 3])
             for j, a in enumerate(accounts)]
    runs = [
        (accounts, base, None),
        (accounts, dataclasses.replace(base, mode="isolated"), None),
        (accounts, dataclasses.replace(base, mode="portfolio"), pm),
        (mixed, base, pm),
        (accounts, dataclasses.replace(base, policy="partial", max_liquidations_per_bar=3),
         None),
    ]
    for population, cfg, portfolio in runs:
        one = simulate_accounts(luna, model, population, cfg, portfolio=portfolio)
        assert 0 < int((one.trigger_bar >= 0).sum()) < len(one.accounts)
        for workers in (2, 3):
            _assert_same_bits(one, simulate_accounts(luna, model, population, cfg,
                                                     portfolio=portfolio, workers=workers))


def test_row_blocks_cover_the_rows_in_order() -> None:
    """Contiguous, in order, no gap, no overlap; one block for one worker or few rows."""
    for n_rows, workers in ((0, 2), (100, 2), (10_000, 2), (100_003, 3), (5_000, 64)):
        blocks = row_blocks(n_rows, workers)
        flat = [r for lo, hi in blocks for r in range(lo, hi)]
        assert flat == list(range(n_rows))
    assert row_blocks(100_000, 1) == [(0, 100_000)]
    assert row_blocks(300, 2) == [(0, 300)]


def test_workers_must_be_a_whole_number(luna: Market) -> None:
    accounts = generate_population(PopulationSpec(seed=1), instruments=luna.instruments,
                                   timestamp_ms=luna.timestamp_ms, close=luna.matrix("close"))
    model = make_model("tiered", {"base_mmr": 0.02})
    for bad in (0, -1, 1.5, True, 65):
        with pytest.raises(InvalidParameters) as info:
            simulate_accounts(luna, model, accounts[:5], workers=bad)  # type: ignore[arg-type]
        assert info.value.field == "workers"


@pytest.mark.data
def test_cli_workers_prints_the_same_report(shared_data: Path, data_file: Callable[[str], str],
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``marginlab accounts backtest --workers 2``: the JSON report of ``--workers 1``, text
    for text; ``--workers 0`` exits 2 naming the field."""
    from calibration.cli import main

    for r in LUNA_30M:
        data_file(r)
    monkeypatch.setenv("MARGINLAB_DATA_ROOT", str(shared_data))
    args = ["accounts", "backtest", *(a for r in LUNA_30M
                                      for a in ("--data", f"{r.split('/')[1][:7]}={r}")),
            "--start", "2022-05-01", "--end", "2022-05-28",
            "--population", '{"seed": 3, "entry_every_bars": 2, "accounts_per_entry": 2, '
                            '"leverage": [5, 40]}',
            "--model", "tiered", "--params", '{"base_mmr": 0.02, "tier_growth": 1.5}',
            "--liquidation", '{"holding_bars": 96}', "--json"]
    assert main([*args, "--workers", "1"]) == 0
    one = capsys.readouterr().out
    assert main([*args, "--workers", "2"]) == 0
    assert capsys.readouterr().out == one
    assert json.loads(one)["summary"][0]["liquidated_accounts"] > 0
    assert main([*args, "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err
