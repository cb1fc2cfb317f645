"""Every error leaves as RFC 9457 ``application/problem+json`` with the field at fault.

Domain exceptions (``calibration``'s ``MarginlabError`` tree) map to 422 (bad parameters or
data), 413 (too large) or 503 (storage/queue unreachable); Litestar's HTTP exceptions keep
their status; anything else is a 500 that says nothing of the stack.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from calibration._errors import (
    DataError,
    DataReferenceError,
    DataValidationError,
    InsufficientData,
    InvalidParameters,
    MarginlabError,
)
from calibration.storage import StorageUnavailable

log = logging.getLogger("marginlab.service")
PROBLEM = "application/problem+json"
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
#: ``scheme://user:password@`` (or ``user@``) in a URL: the credentials part.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@")
#: A quoted literal as Python's repr writes it (a data file's cell in a data error).
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def redact(text: str, *, data_root: str | None = None, state_dir: str | None = None) -> str:
    """``text`` without credentials in URLs nor the server's absolute paths.

    ``postgresql://u:secret@db/x`` becomes ``postgresql://***@db/x``; the data root's absolute
    path becomes ``<data root>`` and the state directory's ``<state dir>``.
    """
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    forms = [(form, name) for root, name in ((data_root, "<data root>"),
                                            (state_dir, "<state dir>")) if root
             for form in {str(Path(root).resolve()), str(Path(root).absolute())}
             if len(form) > 1]
    # The longer path first: the state directory may lie inside the data root.
    for form, name in sorted(forms, key=lambda f: -len(f[0])):
        text = text.replace(form, name)
    return text


def _without_cells(message: str, keep: tuple[str | None, ...]) -> str:
    """A data error's message with the file's text cells replaced by ``'…'``: a reader may
    name any file under the data root, so its content must not come back (the row and
    column say where to look). The names in ``keep`` (the column, the reference) stay."""
    kept = {repr(k) for k in keep if k}

    def cell(match: re.Match[str]) -> str:
        return match.group(0) if match.group(0) in kept else "'…'"

    return _QUOTED.sub(cell, message)


def _detail(request: Request[Any, Any, Any], text: str) -> str:
    settings = getattr(request.app.state, "settings", None)
    if settings is None:
        return redact(text)
    return redact(text, data_root=settings.data_root, state_dir=settings.state_dir)


class ServiceUnavailable(MarginlabError):
    """Redis, the queue or the study storage cannot be reached right now."""


class PayloadTooLarge(MarginlabError):
    """A body, upload or synchronous request above the configured limit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def problem(status: int, title: str, detail: str, request: Request[Any, Any, Any],
            **extra: Any) -> Response[dict[str, Any]]:
    """A problem+json response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail,
            "instance": request.url.path, **{k: v for k, v in extra.items() if v is not None}}
    return Response(body, status_code=status, media_type=PROBLEM)


def marginlab_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Domain errors → 4xx/5xx problem details naming the field at fault."""
    field = getattr(exc, "field", None)
    detail = _detail(request, str(exc))
    if isinstance(exc, DataValidationError):
        return problem(422, "Invalid data", _without_cells(detail, (exc.column,)), request,
                       field=exc.column, row=exc.row)
    if isinstance(exc, DataReferenceError):
        return problem(422, "Invalid data reference", detail, request, field=field or "ref")
    if isinstance(exc, InvalidParameters):
        return problem(422, "Invalid parameters", detail, request, field=field)
    if isinstance(exc, InsufficientData | DataError):
        return problem(422, "Unusable data", detail, request, field=field)
    violations = getattr(exc, "violations", None)
    if violations is not None:
        first = violations[0]
        return problem(422, "Guardrail violated", detail, request,
                       field=first.parameter or first.guardrail,
                       violations=[v.as_dict() for v in violations])
    if isinstance(exc, PayloadTooLarge):
        return problem(413, "Too large", detail, request, field=field)
    if isinstance(exc, StorageUnavailable | ServiceUnavailable):
        return problem(503, "Service unavailable", detail, request)
    return problem(422, "Unprocessable request", detail, request, field=field)


def connection_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Redis or database unreachable → 503 (retry later), never a 500."""
    log.warning("backend unreachable: %s", exc)
    return problem(503, "Service unavailable", "a backing service (Redis, queue or study "
                   "storage) is unreachable; retry later", request)


def http_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Litestar's HTTP exceptions as problem details (validation errors name the field)."""
    assert isinstance(exc, HTTPException)
    extra: dict[str, Any] = {}
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            extra["field"] = _field_of(first)
        extra["errors"] = exc.extra
    elif isinstance(exc.__cause__, SerializationException) or (
            isinstance(exc.extra, dict) and exc.extra.get("field") == "body"):
        extra["field"] = "body"  # the body is not valid JSON
    title = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
             405: "Method not allowed", 413: "Too large", 429: "Too many requests"}.get(
        exc.status_code, "Error")
    response = problem(exc.status_code, title, str(exc.detail), request, **extra)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def _field_of(error: dict[str, Any]) -> str:
    """The field a Litestar validation error is about (an unknown field names itself)."""
    key = str(error.get("key") or "")
    unknown = _UNKNOWN_FIELD.search(str(error.get("message", "")))
    if unknown and error.get("source") == "body" and not key.endswith(unknown.group(1)):
        # Litestar's key is the object holding the field, "data" for the body itself.
        parent = "" if key == "data" else key
        return f"{parent}.{unknown.group(1)}" if parent else unknown.group(1)
    return key or str(error.get("source") or "body")


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Anything unexpected: logged here, a bare 500 to the client."""
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "Internal error",
                   "the request failed on our side; it has been logged", request)


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """RFC 9457 problem details, as every error of this API is sent.

    Attributes:
        type: problem type URI (``about:blank``).
        title: short summary of the problem class.
        status: HTTP status code.
        detail: what went wrong, for a person.
        instance: the request path.
        field: the request field at fault, full path (``data[0].ref``), or a data column.
        row: data row at fault, 1-based, header excluded.
        errors: every validation error (``key``, ``message``, ``source``).
        violations: every guardrail violated (parameter, limit, excess).
        checks: readiness per dependency (``ok`` or why not).
    """

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    field: str | None = None
    row: int | None = None
    errors: list[dict[str, Any]] | None = None
    violations: list[dict[str, Any]] | None = None
    checks: dict[str, str] | None = None


def problem_responses(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problem+json errors a handler can answer."""
    text = {400: "malformed request", 401: "no or unknown API key", 403: "role too low",
            404: "not found", 413: "too large", 422: "invalid parameters or data",
            429: "rate limit exceeded", 503: "a backing service is unreachable"}
    return {c: ResponseSpec(generate_examples=False, data_container=Problem, media_type=PROBLEM,
                            description=text[c]) for c in codes}


#: The errors every authenticated, rate-limited route can answer (400: a parameter or body
#: outside the documented schema).
COMMON = (400, 401, 403, 429, 503)
