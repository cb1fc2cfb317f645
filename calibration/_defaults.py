"""Defaults read by light modules (the CLI parser) without importing heavy ones."""

from __future__ import annotations

#: The Optuna storage used when ``--storage`` is not given (``calibration.storage`` re-exports
#: it); here so that building the CLI parser does not import Optuna (~0.2 s of every start).
DEFAULT_STORAGE = "journal:marginlab-studies.log"

#: The Binance archive root and the bar intervals it keeps at a fixed length (seconds);
#: here so that the parser's ``data fetch`` choices do not import ``calibration.fetch``
#: (urllib, http.client and ssl) on every command. ``calibration.fetch`` re-exports them.
BINANCE_BASE_URL = "https://data.binance.vision/data/"
#: Bar intervals Binance archives that have a fixed length, in seconds.
INTERVALS: dict[str, int] = {
    "1m": 60, "3m": 180, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600, "2h": 7200,
    "4h": 14_400, "6h": 21_600, "8h": 28_800, "12h": 43_200, "1d": 86_400,
}
