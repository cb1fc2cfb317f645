"""OpenAPI examples of every endpoint (request bodies, parameters and responses)."""

from __future__ import annotations

from litestar.openapi.spec import Example

BTC_REF = "uploads/BTCUSDT-3f1c0a9e2b7d4c15.csv"

BACKTEST = Example(
    summary="EWMA margin at 99% through the FTX week",
    value={
        "data": [{"instrument": "BTCUSDT", "ref": BTC_REF, "start": "2022-10-01",
                  "end": "2022-11-30"}],
        "model": "ewma",
        "params": {"decay": 0.97, "confidence": 0.99, "horizon_bars": 4, "warmup_bars": 500},
        "liquidation": {"leverages": [5, 10, 20], "notionals_usd": [10000, 1000000]},
        "stress_windows": [{"name": "ftx", "start": "2022-11-08", "end": "2022-11-10"}],
    },
)

CALIBRATION = Example(
    summary="Calibrate EWMA on BTC and ETH with guardrails against the published parameters",
    value={
        "data": [{"instrument": "BTCUSDT", "ref": BTC_REF},
                 {"instrument": "ETHUSDT", "ref": "uploads/ETHUSDT-8a2e51c07f3b9d64.csv"}],
        "model": "ewma",
        "search_space": {"decay": {"low": 0.9, "high": 0.999},
                         "horizon_bars": {"value": 4}, "warmup_bars": {"value": 500}},
        "risk_appetite_bps": 2.0,
        "published": {"params": {"decay": 0.97, "confidence": 0.99},
                      "max_change": {"decay": 0.01}},
        "stress_windows": [{"name": "luna", "start": "2022-05-09", "end": "2022-05-13"},
                           {"name": "ftx", "start": "2022-11-08", "end": "2022-11-10"}],
        "walk_forward": {"in_sample_end": "2023-01-01", "folds": 2},
        "n_trials": 200,
        "seed": 7,
    },
)

JOB_ID = Example(summary="a calibration id", value="0bb5fdab8bc6479e8a221d55783a6f27")
DATASET_ID = Example(summary="a dataset id (fingerprint prefix)", value="3f1c0a9e2b7d4c15")
INSTRUMENT = Example(summary="an instrument", value="BTCUSDT")

PUBLISHED = Example(
    summary="published EWMA parameters",
    value={"instrument": "BTCUSDT", "model": "ewma",
           "params": {"decay": 0.975, "confidence": 0.995, "horizon_bars": 4},
           "version": 3, "published_at": "2026-11-20T08:00:00Z",
           "calibration_id": "0bb5fdab8bc6479e8a221d55783a6f27",
           "data_fingerprints": {"BTCUSDT": "3f1c0a9e2b7d4c15..."}},
)

HEALTH = Example(summary="alive", value={"status": "ok"})
INDEX_LINKS = {"service": "marginlab", "docs": "/schema", "openapi": "/schema/openapi.json",
               "health": "/healthz"}
INDEX = Example(summary="where the documentation is", value=INDEX_LINKS)
CALIBRATIONS = Example(
    summary="the first page of succeeded calibrations on BTCUSDT",
    value={"items": [{"id": "0bb5fdab8bc6479e8a221d55783a6f27", "state": "succeeded",
                      "cache_key": "54eafb55...", "spec_hash": "80ae0797...",
                      "study": "marginlab-ewma-80ae0797a6e314cf-54eafb55", "model": "ewma",
                      "instruments": ["BTCUSDT"], "n_trials": 200,
                      "created_at": "2026-11-24T10:00:00Z",
                      "started_at": "2026-11-24T10:00:01Z",
                      "finished_at": "2026-11-24T10:04:10Z", "error": None, "cached": False,
                      "joined": False,
                      "status_url": "/v1/calibrations/0bb5fdab8bc6479e8a221d55783a6f27",
                      "result_url": "/v1/calibrations/0bb5fdab8bc6479e8a221d55783a6f27/result",
                      "progress": None}],
           "total": 1, "limit": 50, "offset": 0, "next_offset": None},
)
READY = Example(summary="ready",
                value={"status": "ready",
                       "checks": {"store": "ok", "study_storage": "ok", "queue": "ok"}})

DATASET = Example(
    summary="an uploaded dataset",
    value={"id": "3f1c0a9e2b7d4c15", "instrument": "BTCUSDT", "ref": BTC_REF,
           "fingerprint": "3f1c0a9e2b7d4c15...", "rows": 87602,
           "start": "2020-09-20T00:00:00Z", "end": "2025-09-19T23:00:00Z", "bar_seconds": 1800,
           "gaps": [{"after_row": 4390, "start_ms": 1608537600000, "missing_bars": 9}],
           "missing_bars": 45, "suspect_prints": [], "uploaded_at": "2026-11-24T10:00:00Z",
           "size_bytes": 7090123, "format": "csv", "version": 1, "latest": True},
)

PUBLISH = Example(
    summary="publish a calibration's recommendation",
    value={"calibration_id": "0bb5fdab8bc6479e8a221d55783a6f27",
           "reason": "monthly recalibration; FTX and LUNA windows green"},
)

MARGIN = Example(
    summary="two accounts under BTCUSDT's published tiers",
    value={"accounts": [{"id": "desk-1", "positions": {"BTCUSDT": 100000}},
                        {"id": "desk-2", "positions": {"BTCUSDT": -50000},
                         "equity_usd": 600}]},
)

ACCOUNT_BACKTEST = Example(
    summary="a seeded population on BTC and ETH through the FTX week, cross margin",
    value={"data": [{"instrument": "BTCUSDT", "ref": BTC_REF, "start": "2022-10-01",
                     "end": "2022-11-30"},
                    {"instrument": "ETHUSDT", "ref": "uploads/ETHUSDT-9a1b2c3d4e5f6071.csv",
                     "start": "2022-10-01", "end": "2022-11-30"}],
           "model": "tiered", "params": {"base_mmr": 0.01, "tier_growth": 2.0},
           "population": {"seed": 1, "entry_every_bars": 48, "accounts_per_entry": 20},
           "mode": "cross", "liquidation": {"latency_bars": 1}},
)
