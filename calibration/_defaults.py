"""Defaults read by light modules (the CLI parser) without importing heavy ones."""

from __future__ import annotations

#: The Optuna storage used when ``--storage`` is not given (``calibration.storage`` re-exports
#: it); here so that building the CLI parser does not import Optuna (~0.2 s of every start).
DEFAULT_STORAGE = "journal:marginlab-studies.log"
