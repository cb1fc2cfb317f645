"""``/v1/datasets``: upload (streamed, size-limited), list, describe."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
from litestar import Controller, Request, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from calibration._errors import InvalidParameters
from calibration.backtest import dataset_info
from calibration.data import load_bars
from service import examples
from service.auth import requires
from service.errors import COMMON, PayloadTooLarge, problem_responses
from service.jobs import now_iso
from service.limits import check_file_rows
from service.schemas import DatasetInfo
from service.state import Svc

log = logging.getLogger("marginlab.service")

UPLOAD_DIR = "uploads"
#: Key of the instrument → dataset ids (oldest version first) map.
_VERSIONS = "_versions"
#: Key of the map written before versions (instrument → latest id), read as one version.
_LEGACY_INDEX = "_instruments"
#: A safe instrument name: it becomes part of a file name and of every listing.
INSTRUMENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: Redis mode: an interrupted upload's ``.part`` file older than this is swept (another API
#: process may be writing a younger one); embedded mode sweeps them all at start.
STALE_PART_S = 3600.0


def dataset_id(instrument: str, fingerprint: str, format: str) -> str:
    """The id of a dataset: unique per (instrument, content fingerprint, file format)."""
    digest = hashlib.sha256(f"{instrument}\n{format}\n{fingerprint}".encode()).hexdigest()
    return digest[:16]


def is_part_file(path: Path) -> bool:
    """An upload still being written (or interrupted): ``….part`` or ``….part.<format>``."""
    return path.name.endswith(".part") or ".part." in path.name


def sweep_partial_uploads(data_root: str | Path, *, older_than_s: float = 0.0) -> list[str]:
    """Delete interrupted uploads' temporary files under ``uploads/``; returns their names."""
    directory = Path(data_root).resolve() / UPLOAD_DIR
    if not directory.is_dir():
        return []
    swept = []
    cutoff = time.time() - older_than_s
    for path in directory.iterdir():
        if not is_part_file(path):
            continue
        try:
            if older_than_s and path.stat().st_mtime > cutoff:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        swept.append(path.name)
    if swept:
        log.warning("swept %d interrupted upload(s) from %s: %s", len(swept), UPLOAD_DIR,
                    ", ".join(sorted(swept)))
    return swept


def _describe(path: Path, root: Path, instrument: str, size: int,
              format: str, max_rows: int = 10_000_000) -> DatasetInfo:
    ref = str(path.relative_to(root))
    check_file_rows(path, max_rows, "body")  # before decoding: Parquet compresses 10^4:1
    bars = load_bars(ref, root=root, instrument=instrument)
    info = dataset_info(bars)
    return DatasetInfo(
        id=dataset_id(instrument, bars.fingerprint, format), instrument=instrument, ref=ref,
        fingerprint=bars.fingerprint, rows=info.rows, start=info.start, end=info.end,
        bar_seconds=info.bar_seconds,
        gaps=[{"after_row": g.after_row, "start_ms": g.start_ms, "missing_bars": g.missing_bars}
              for g in bars.gaps],
        missing_bars=info.missing_bars, suspect_prints=info.suspect_prints,
        uploaded_at=now_iso(), size_bytes=size, format=format,
    )


async def _versions(svc: Svc) -> dict[str, list[str]]:
    raw = await svc.get("datasets", _VERSIONS, dict[str, list[str]])
    if raw is not None:
        return raw
    legacy = await svc.get("datasets", _LEGACY_INDEX, dict[str, str]) or {}
    return {instrument: [i] for instrument, i in legacy.items()}


def _with_version(info: DatasetInfo, ids: list[str]) -> DatasetInfo:
    return msgspec.structs.replace(info, version=ids.index(info.id) + 1,
                                   latest=ids[-1] == info.id)


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
            "`ref` can then be used in backtests and calibrations. A dataset's `id` is unique "
            "per (instrument, content fingerprint, format). A new file for an instrument is "
            "added as its next `version` (`latest: true`); earlier versions stay listed and "
            "their files and refs keep working; cached results computed on the previous "
            "latest version (other content) are dropped. The same content in the same "
            "format again returns the existing dataset unchanged."
        ),
        responses=problem_responses(*COMMON, 400, 413, 422),
    )
    async def upload(
        self,
        request: Request[Any, Any, Any],
        svc: Svc,
        instrument: str = Parameter(min_length=1, max_length=64,
                                    pattern=INSTRUMENT_PATTERN,
                                    description="instrument name, e.g. BTCUSDT: 1 to 64 "
                                                "letters, digits, `_`, `.` or `-`, "
                                                "starting with a letter or digit",
                                    examples=[examples.INSTRUMENT]),
        format: str = Parameter(default="csv", pattern="^(csv|parquet)$",
                                description="csv or parquet"),
    ) -> DatasetInfo:
        settings = request.app.state.settings
        root = Path(settings.data_root).resolve()
        target_dir = root / UPLOAD_DIR
        target_dir.mkdir(parents=True, exist_ok=True)
        limit = settings.max_upload_bytes
        # ``.part.<format>``: swept at start if the process dies before the end, and read
        # in place with its format's loader.
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=f"{instrument}-",
                                        suffix=f".part.{format}")
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
            info = await anyio.to_thread.run_sync(_describe, Path(tmp_name), root, instrument,
                                                  size, format, settings.max_file_rows)
            named = target_dir / f"{instrument}-{info.id}.{format}"
            info = msgspec.structs.replace(info, ref=str(named.relative_to(root)))
            async with svc.lock("datasets"):
                existing = await svc.get("datasets", info.id, DatasetInfo)
                versions = await _versions(svc)
                ids = versions.get(instrument, [])
                if existing is not None and info.id in ids and named.exists():
                    # The same content in the same format: nothing to add or replace.
                    return _with_version(existing, ids)
                os.replace(tmp_name, named)
                previous = await svc.get("datasets", ids[-1], DatasetInfo) if ids else None
                if previous is not None and previous.fingerprint != info.fingerprint:
                    await _invalidate(svc, previous)
                ids = [*(i for i in ids if i != info.id), info.id]
                await svc.put("datasets", info.id, info)
                versions[instrument] = ids
                await svc.put("datasets", _VERSIONS, versions)
            return _with_version(info, ids)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    @get("/", guards=[requires("reader")], summary="List uploaded datasets",
         responses={**problem_responses(*COMMON),
                    200: ResponseSpec(generate_examples=False, data_container=list[DatasetInfo],
                                      description="every dataset, by instrument, oldest "
                                                  "version first (`latest` marks the "
                                                  "newest of each instrument)",
                                      examples=[examples.DATASET])})
    async def list_datasets(self, svc: Svc) -> list[DatasetInfo]:
        found = []
        for _, ids in sorted((await _versions(svc)).items()):
            for dataset in ids:
                info = await svc.get("datasets", dataset, DatasetInfo)
                if info is not None:
                    found.append(_with_version(info, ids))
        return found

    @get("/{dataset_id:str}", guards=[requires("reader")],
         summary="One dataset: metadata, fingerprint, validation report and gaps",
         responses=problem_responses(*COMMON, 404))
    async def get_dataset(
        self, svc: Svc,
        dataset_id: Annotated[str, Parameter(description="dataset id",
                                             examples=[examples.DATASET_ID])],
    ) -> DatasetInfo:
        info = None if dataset_id.startswith("_") else await svc.get(
            "datasets", dataset_id, DatasetInfo)
        if info is None:
            raise NotFoundException(f"no dataset {dataset_id!r}")
        return _with_version(info, (await _versions(svc)).get(info.instrument, [info.id]))


async def _invalidate(svc: Svc, old: DatasetInfo) -> None:
    """Drop cached results computed on an instrument's previous latest dataset."""
    keys = await svc.get("index", f"fp:{old.fingerprint}", list[str]) or []
    for key in keys:
        await svc.delete("results", key)
    await svc.delete("index", f"fp:{old.fingerprint}")
