"""Row budgets checked before a data file is decoded.

Decoding is what costs: a 569 kB Parquet file of 20 M constant rows took the server to 4.2 GB.
A Parquet file states its rows in its footer (``ParquetFile(...).metadata.num_rows``, read
without decoding a column); a CSV's rows are at most its line breaks, counted in one pass over
the bytes. Both are checked against the limits before any frame is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

from calibration._errors import DataError, DataReferenceError
from calibration.data import resolve_ref
from calibration.spec import DataRefSpec
from service.errors import PayloadTooLarge

_PARQUET = (".parquet", ".pq")


def file_rows(path: Path) -> int | None:
    """Rows of a data file without decoding it: Parquet from its footer, CSV (plain) as its
    line breaks (an upper bound: the header counts); ``None`` when it cannot be told cheaply
    (gzip, Feather)."""
    name = path.name.lower()
    if name.endswith(_PARQUET):
        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except Exception as exc:  # pyarrow's own error types: not a Parquet file
            raise DataError(f"{path.name}: cannot read as parquet (no valid footer)") from exc
    if name.endswith(".csv"):
        count = 0
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                count += chunk.count(b"\n")
        return count + 1
    return None


def check_file_rows(path: Path, limit: int, field: str) -> int | None:
    """Refuse (413, ``field``) a file of more than ``limit`` rows before it is decoded."""
    rows = file_rows(path)
    if rows is not None and rows > limit:
        raise PayloadTooLarge(f"the file has {rows} rows; this server decodes at most {limit} "
                              "rows per file (MARGINLAB_MAX_FILE_ROWS)", field=field)
    return rows


def check_refs(refs: Sequence[tuple[str, DataRefSpec]], root: str | os.PathLike[str], *,
               per_file: int, total: int | None = None) -> None:
    """Every file the references name (bars, funding, depth) within ``per_file`` rows, and
    all of them within ``total``, before any is decoded. ``refs`` pairs each reference with
    its path in the request (``data[0]``)."""
    seen = 0
    for prefix, ref in refs:
        for name in ("ref", "funding", "depth"):
            given = getattr(ref, name)
            if not given:
                continue
            field = f"{prefix}.{name}"
            try:
                path = resolve_ref(given, root)
            except DataReferenceError as exc:
                exc.field = field  # type: ignore[attr-defined]
                raise
            seen += check_file_rows(path, per_file, field) or 0
            if total is not None and seen > total:
                raise PayloadTooLarge(
                    f"the request's files hold more than {total} rows together "
                    "(MARGINLAB_MAX_JOB_ROWS); cut the instruments or the files", field=field)
