"""A portfolio-grid calibration (domain.md §8) whose recommendation passes the portfolio
coverage test on a held-out fold: Binance 30-minute bars of five coins, trained on
2020-2023, held out on 2024-2025 (the 2024-08-05 unwind and 2025-10-10 inside)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from calibration import load_bars
from calibration._errors import InvalidParameters
from calibration.accounts import (
    Market,
    basket_book,
    calibrate_portfolio_grid,
    long_short_book,
    portfolio_coverage,
)
from calibration.models._portfolio import GridPortfolioMargin
from calibration.stats import traffic_light

NAMES = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT"]
SPLIT_MS = 1_704_067_200_000  # 2024-01-01T00:00Z
SPACE = {"confidence": (0.95, 0.999), "min_price_range": (0.0, 0.1),
         "offset_credit_cap": (0.0, 0.8)}
FIXED = {"vol_scaled": True, "horizon_bars": 2, "warmup_bars": 500}


def test_grid_recommendation_passes_the_held_out_fold(
        data_file: Callable[[str], str], shared_data: Path) -> None:
    market = Market.from_series([load_bars(data_file(f"binance_spot_2020_2025/{n}_30m.csv"),
                                           root=shared_data) for n in NAMES])
    books = [long_short_book("BTCUSDT", "ETHUSDT"), basket_book(NAMES)]
    result = calibrate_portfolio_grid(market, books, split_ms=SPLIT_MS, search_space=SPACE,
                                      fixed=FIXED, n_trials=20, seed=1)
    assert result.params is not None
    assert result.feasible_trials > 0
    for name, (lo, hi) in SPACE.items():
        assert lo <= result.params[name] <= hi
    model = GridPortfolioMargin(**result.params)
    for book in books:
        rows = {r.fold: r for r in result.coverage if r.book == book.name}
        assert rows["train"].traffic_light == "green"
        assert rows["held_out"].traffic_light == "green", rows["held_out"]
        # the folds recounted here from the coverage backtest's own observations
        cov = portfolio_coverage(market, model, book, confidence=0.99)
        ts = np.asarray(market.timestamp_ms)
        ends = [ts[min(b + cov.horizon_bars, len(ts) - 1)] + market.bar_seconds * 1000
                for b in cov.observation_bars]
        held = [bool(br) for br, end in zip(cov.breach, ends, strict=True) if end > SPLIT_MS]
        assert rows["held_out"].observations == len(held)
        assert rows["held_out"].breaches == sum(held)
        assert rows["held_out"].traffic_light == traffic_light(len(held), sum(held), 0.01)
        assert rows["train"].observations + len(held) == cov.observations
    assert result.capital_rate == pytest.approx(np.mean(
        [r.mean_requirement_rate for r in result.coverage if r.fold == "train"]))


def test_grid_search_space_is_checked() -> None:
    """An unknown grid parameter is refused before any data is read."""
    with pytest.raises(InvalidParameters) as err:
        calibrate_portfolio_grid(None, [long_short_book("A", "B")],  # type: ignore[arg-type]
                                 split_ms=0, search_space={"bogus": (0, 1)})
    assert err.value.field == "search_space.bogus"
