from __future__ import annotations

import functools

#: Version of the engine's numbers: part of every result cache key and study record, so a
#: change in what a figure means (0.2.0: one close-out horizon, rates capped at max_rate,
#: windows by loss interval, premature counting the trigger bar, latency-0 fills at the
#: adverse extreme, one insurance fund per venue) never serves a result computed under the
#: old conventions.
ENGINE_VERSION = "0.2.0"


@functools.cache
def numeric_libraries() -> str:
    """The libraries whose versions can change a trial's numbers, with their versions
    (``numpy 2.4.6, numba 0.68.1, ...``): their kernels, reductions and special functions
    round differently across releases, so two machines agree on a trial to the bit only
    when these agree (recorded on every trial next to the worker)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("numpy", "numba", "llvmlite", "scipy", "pandas"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:  # pragma: no cover - all are dependencies
            parts.append(f"{name} absent")
    return ", ".join(parts)
