"""Bad calibration input is refused with a clear error naming the field, before any trial.

``decode_spec`` / ``validate_spec`` check everything that needs no data; ``prepare`` checks
what needs it (stress windows inside the data); ``Coordination`` refuses a storage it cannot
reach. ``calibrate`` itself validates a spec built in Python before reading any data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from calibration._errors import InvalidParameters
from calibration.calibrate import calibrate, prepare
from calibration.spec import (
    CalibrationSpec,
    DataRefSpec,
    ParamSpec,
    WalkForwardSpec,
    decode_spec,
    spec_hash,
    validate_spec,
)
from calibration.storage import Coordination, StorageUnavailable

BTC = "binance_spot_2020_2025/BTCUSDT_30m.csv"


def raw_spec(**overrides: Any) -> dict[str, Any]:
    """A valid minimal spec as JSON-ready values, overridden."""
    raw: dict[str, Any] = {
        "data": [{"instrument": "BTCUSDT", "ref": BTC, "start": "2021-01-01",
                  "end": "2021-06-30"}],
        "model": "ewma",
        "search_space": {"horizon_bars": {"value": 2}},
        "n_trials": 5,
    }
    raw.update(overrides)
    return raw


def refused(raw: dict[str, Any]) -> InvalidParameters:
    """The error ``decode_spec`` raises for ``raw`` (fails the test when none is raised)."""
    with pytest.raises(InvalidParameters) as info:
        decode_spec(msgspec.json.encode(raw))
    return info.value


def test_a_valid_spec_decodes_and_hashes_stably() -> None:
    """The baseline spec of this module is valid; its hash ignores key order."""
    spec = decode_spec(msgspec.json.encode(raw_spec()))
    again = decode_spec(msgspec.json.encode(dict(reversed(list(raw_spec().items())))))
    assert spec_hash(spec) == spec_hash(again)


def test_unknown_parameter_in_search_space() -> None:
    """A parameter the model does not have names search_space.<name>."""
    err = refused(raw_spec(search_space={"lambda": {"low": 0.9, "high": 0.99}}))
    assert err.field == "search_space.lambda"
    assert "unknown parameter" in str(err)


@pytest.mark.parametrize(("low", "high"), [(0.95, 0.95), (0.99, 0.95)])
def test_empty_or_inverted_range(low: float, high: float) -> None:
    """low == high or low > high names the parameter's range."""
    err = refused(raw_spec(search_space={"decay": {"low": low, "high": high}}))
    assert err.field == "search_space.decay"
    assert "empty or inverted range" in str(err)


def test_range_outside_what_the_model_accepts() -> None:
    """A bound the model refuses (decay >= 1) is caught at the range's end."""
    err = refused(raw_spec(search_space={"decay": {"low": 0.9, "high": 1.5}}))
    assert err.field == "search_space.decay"


def test_no_trials_and_no_time_budget() -> None:
    """Neither n_trials nor timeout_seconds: refused on n_trials."""
    err = refused(raw_spec(n_trials=None, timeout_seconds=None))
    assert err.field == "n_trials"


def test_calibrate_validates_a_spec_built_in_python(tmp_path: Path) -> None:
    """calibrate() refuses a bad Struct before reading data (no data root needed)."""
    spec = CalibrationSpec(data=[DataRefSpec(instrument="BTCUSDT", ref=BTC)], model="ewma",
                           n_trials=None, timeout_seconds=None)
    with pytest.raises(InvalidParameters) as info:
        calibrate(spec, root=tmp_path / "nowhere", storage="memory")
    assert info.value.field == "n_trials"
    inverted = CalibrationSpec(data=[DataRefSpec(instrument="BTCUSDT", ref=BTC)],
                               model="ewma",
                               search_space={"decay": ParamSpec(low=0.99, high=0.9)})
    with pytest.raises(InvalidParameters) as info:
        validate_spec(inverted)
    assert info.value.field == "search_space.decay"


@pytest.mark.parametrize(("raw", "field"), [
    (raw_spec(bogus=1), "bogus"),
    (raw_spec(constraints={"kupiec": 0.05}), "constraints.kupiec"),
    (raw_spec(data=[{"instrument": "BTCUSDT", "ref": BTC, "symbol": "x"}]), "data[0].symbol"),
    (raw_spec(walk_forward={"folds": 2, "train_end": "2021-03-01"}), "walk_forward.train_end"),
])
def test_unknown_json_field(raw: dict[str, Any], field: str) -> None:
    """A field the spec does not have is named by its own path."""
    err = refused(raw)
    assert err.field == field
    assert "unknown field" in str(err)


@pytest.mark.parametrize(("raw", "field"), [
    ({"model": "ewma"}, "data"),
    (raw_spec(n_trials="many"), "n_trials"),
    (raw_spec(model="garch"), "model"),
    (raw_spec(risk_appetite_bps=-1), "risk_appetite_bps"),
    (raw_spec(constraints={"max_procyclicality": 0.5}), "constraints.max_procyclicality"),
    (raw_spec(published={"params": {"lambda": 0.9}}), "published.lambda"),
    (raw_spec(published={"params": {"decay": 1.2}}), "published.params.decay"),
    (raw_spec(published={"params": {"decay": 0.97}, "max_change": {"decay": -0.01}}),
     "published.max_change.decay"),
    (raw_spec(stress_windows=[{"name": "luna", "start": "2022-05-13", "end": "2022-05-09"}]),
     "stress_windows[0]"),
    (raw_spec(stress_windows=[{"name": "ok", "start": "2021-05-19"},
                              {"name": "bad", "start": "2021-13-01"}]), "stress_windows[1]"),
])
def test_other_bad_fields_are_named(raw: dict[str, Any], field: str) -> None:
    """Missing, mistyped or out-of-range fields each name the field at fault."""
    assert refused(raw).field == field


def test_malformed_json() -> None:
    """Text that is not JSON is refused as a whole spec."""
    with pytest.raises(InvalidParameters) as info:
        decode_spec(b'{"data": [')
    assert info.value.field == "spec"


@pytest.mark.data
def test_stress_window_outside_the_data(shared_data: Path,
                                        data_file: Callable[[str], str]) -> None:
    """prepare() refuses a window the data do not reach, naming it, before any trial."""
    data_file(BTC)
    spec = decode_spec(msgspec.json.encode(raw_spec(stress_windows=[
        {"name": "may_2021_crash", "start": "2021-05-19"},
        {"name": "ftx_2022", "start": "2022-11-08", "end": "2022-11-10"},
    ])))
    with pytest.raises(InvalidParameters) as info:
        prepare(spec, shared_data)
    assert info.value.field == "stress_windows[1]"
    assert "outside the data" in str(info.value)


def test_unreachable_storage() -> None:
    """A Redis storage on a closed port raises StorageUnavailable when opened."""
    with pytest.raises(StorageUnavailable, match="cannot open storage"):
        Coordination("redis://127.0.0.1:1/0")


def test_unsupported_storage_url() -> None:
    """A URL scheme marginlab has no storage for names the storage field."""
    with pytest.raises(InvalidParameters) as info:
        Coordination("mongodb://127.0.0.1/studies")
    assert info.value.field == "storage"


@pytest.mark.parametrize(("workers", "storage", "field"),
                         [(0, "memory", "workers"), (2, "memory", "storage")])
def test_calibrate_refuses_bad_worker_counts(tmp_path: Path, workers: int, storage: str,
                                             field: str) -> None:
    """No worker at all, or several on a storage only this process sees: refused before
    any data is read."""
    spec = CalibrationSpec(data=[DataRefSpec(instrument="BTCUSDT", ref=BTC)], model="ewma")
    with pytest.raises(InvalidParameters) as info:
        calibrate(spec, root=tmp_path / "nowhere", storage=storage, workers=workers)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seed": 2**32}, "seed"),
        ({"seed": -1}, "seed"),
        ({"walk_forward": WalkForwardSpec(folds=51)}, "walk_forward.folds"),
        ({"liquidation": {"leverages": [2000]}}, "liquidation.leverages"),
        ({"liquidation": {"latency_bars": 10**8}}, "liquidation.latency_bars"),
        ({"liquidation": {"leverages": list(range(1, 65)),
                          "notionals_usd": [float(n) for n in range(1, 65)]}},
         "liquidation.leverages"),
    ],
    ids=["seed-2^32", "seed-negative", "folds-51", "leverage-2000", "latency-1e8", "grid-8192"],
)
def test_validate_spec_bounds_python_built_specs(change: dict[str, object], field: str) -> None:
    """Specs built in Python (no decoder constraints) are bounded by validate_spec alike:
    numpy's seed range 0..2**32-1, at most 50 folds, bounded liquidation grids (64 x 64 x 2 =
    8192 positions per entry bar is above the 4096 cap)."""
    base = CalibrationSpec(data=[DataRefSpec(instrument="X", ref="x.csv")], model="ewma")
    with pytest.raises(InvalidParameters) as err:
        validate_spec(msgspec.structs.replace(base, **change))
    assert err.value.field == field
