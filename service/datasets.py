"""``/v1/datasets``: upload (streamed, size-limited), list, describe."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import anyio
from litestar import Controller, Request, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from calibration._errors import InvalidParameters
from calibration.backtest import dataset_info
from calibration.data import load_bars
from calibration.spec import INSTRUMENT_PATTERN
from service import examples
from service.auth import requires
from service.errors import COMMON, PayloadTooLarge, problem_responses
from service.jobs import now_iso
from service.limits import check_file_rows
from service.schemas import DatasetInfo
from service.state import Svc

UPLOAD_DIR = "uploads"
#: Key of the instrument → current dataset id map.
_INDEX = "_instruments"


def _describe(path: Path, root: Path, instrument: str, size: int,
              max_rows: int = 10_000_000) -> tuple[DatasetInfo, str]:
    ref = str(path.relative_to(root))
    check_file_rows(path, max_rows, "body")  # before decoding: Parquet compresses 10^4:1
    bars = load_bars(ref, root=root, instrument=instrument)
    info = dataset_info(bars)
    return DatasetInfo(
        id=bars.fingerprint[:16], instrument=instrument, ref=ref, fingerprint=bars.fingerprint,
        rows=info.rows, start=info.start, end=info.end, bar_seconds=info.bar_seconds,
        gaps=[{"after_row": g.after_row, "start_ms": g.start_ms, "missing_bars": g.missing_bars}
              for g in bars.gaps],
        missing_bars=info.missing_bars, suspect_prints=info.suspect_prints,
        uploaded_at=now_iso(), size_bytes=size,
    ), bars.fingerprint


class DatasetController(Controller):
    """Market data the service can backtest and calibrate on."""

    path = "/v1/datasets"
    tags = ["datasets"]

    @post(
        "/", guards=[requires("operator")], status_code=201,
        summary="Upload a bar file (CSV or Parquet), streamed",
        description=(
            "The raw file is the request body (`Content-Type: text/csv` or "
            "`application/vnd.apache.parquet`). It is validated (domain.md §1: the row and "
            "column at fault on error), fingerprinted and stored under the data root; its "
            "`ref` can then be used in backtests and calibrations. Uploading a new file for "
            "the same instrument replaces it and drops cached results computed on the old one."
        ),
        responses=problem_responses(*COMMON, 400, 413, 422),
    )
    async def upload(
        self,
        request: Request[Any, Any, Any],
        svc: Svc,
        instrument: str = Parameter(min_length=1, max_length=64,
                                    pattern=INSTRUMENT_PATTERN,
                                    description="instrument name, e.g. BTCUSDT",
                                    examples=[examples.INSTRUMENT]),
        format: str = Parameter(default="csv", pattern="^(csv|parquet)$",
                                description="csv or parquet"),
    ) -> DatasetInfo:
        settings = request.app.state.settings
        root = Path(settings.data_root).resolve()
        target_dir = root / UPLOAD_DIR
        target_dir.mkdir(parents=True, exist_ok=True)
        limit = settings.max_upload_bytes
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, suffix=f".{format}.part")
        size = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"upload larger than {limit} bytes", field="body")
                    handle.write(chunk)
            if size == 0:
                raise InvalidParameters("empty upload", field="body")
            final = target_dir / f"{instrument}-{os.urandom(4).hex()}.{format}"
            os.replace(tmp_name, final)
            try:
                info, fingerprint = await anyio.to_thread.run_sync(
                    _describe, final, root, instrument, size, settings.max_file_rows)
            except Exception:
                final.unlink(missing_ok=True)
                raise
            named = final.with_name(f"{instrument}-{fingerprint[:16]}.{format}")
            os.replace(final, named)
            info = DatasetInfo(**{**_fields(info), "ref": str(named.relative_to(root))})
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        current = await svc.get("datasets", _INDEX, dict[str, str]) or {}
        previous = current.get(instrument)
        if previous and previous != info.id:
            await _invalidate(svc, previous)
        await svc.put("datasets", info.id, info)
        current[instrument] = info.id
        await svc.put("datasets", _INDEX, current)
        return info

    @get("/", guards=[requires("reader")], summary="List uploaded datasets",
         responses={**problem_responses(*COMMON),
                    200: ResponseSpec(generate_examples=False, data_container=list[DatasetInfo],
                                      description="the current dataset of each instrument",
                                      examples=[examples.DATASET])})
    async def list_datasets(self, svc: Svc) -> list[DatasetInfo]:
        current = await svc.get("datasets", _INDEX, dict[str, str]) or {}
        found = [await svc.get("datasets", i, DatasetInfo) for _, i in sorted(current.items())]
        return [d for d in found if d is not None]

    @get("/{dataset_id:str}", guards=[requires("reader")],
         summary="One dataset: metadata, fingerprint, validation report and gaps",
         responses=problem_responses(*COMMON, 404))
    async def get_dataset(
        self, svc: Svc,
        dataset_id: Annotated[str, Parameter(description="dataset id",
                                             examples=[examples.DATASET_ID])],
    ) -> DatasetInfo:
        info = await svc.get("datasets", dataset_id, DatasetInfo)
        if info is None:
            raise NotFoundException(f"no dataset {dataset_id!r}")
        return info


def _fields(info: DatasetInfo) -> dict[str, Any]:
    return {f: getattr(info, f) for f in info.__struct_fields__}


async def _invalidate(svc: Svc, old_id: str) -> None:
    """Drop cached results computed on a replaced dataset."""
    old = await svc.get("datasets", old_id, DatasetInfo)
    if old is None:
        return
    keys = await svc.get("index", f"fp:{old.fingerprint}", list[str]) or []
    for key in keys:
        await svc.delete("results", key)
    await svc.delete("index", f"fp:{old.fingerprint}")
