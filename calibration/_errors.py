"""Exceptions raised by marginlab's domain library.

The hierarchy, with the builtin each also resembles::

    MarginlabError
    ├── DataError (ValueError)              data that cannot be used as it is
    │   ├── DataReferenceError              a reference escaping the data root, or no file
    │   └── DataValidationError             bars breaking domain.md §1 (row and column at fault)
    ├── InvalidParameters (ValueError)         unknown model, unknown or out-of-range hyperparameter
    └── InsufficientData (ValueError)          a horizon or warm-up longer than the data

Callers (the CLI, the service) map these to exit code 2 or problem+json; the library never
formats HTTP errors itself.
"""

from __future__ import annotations


class MarginlabError(Exception):
    """Root of every error marginlab raises on purpose."""


class DataError(MarginlabError, ValueError):
    """Market data that cannot be used as it is."""


class DataReferenceError(DataError):
    """A data reference that is absolute, escapes the data root, or names no file."""


class DataValidationError(DataError):
    """Bars that violate the data rules of domain.md §1.

    Attributes:
        row: 1-based data row at fault, header excluded (``None`` when not one row).
        column: column at fault (``None`` when the fault is not one column).
    """

    def __init__(self, message: str, *, row: int | None = None, column: str | None = None):
        where = []
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.row = row
        self.column = column


class InvalidParameters(MarginlabError, ValueError):
    """An unknown model family, or an unknown or out-of-range hyperparameter.

    Attributes:
        field: the parameter at fault, when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class InsufficientData(MarginlabError, ValueError):
    """Too few bars for the requested horizon, window or warm-up."""
