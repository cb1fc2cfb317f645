"""Make the generated OpenAPI document say what the service does.

Litestar's generator misses three things, fixed here on the built document (once, when the
app is created, so ``/schema`` and ``openapi/openapi.json`` are the same):

- Field descriptions: Litestar reads ``msgspec.Meta(description=...)`` but not docstrings;
  every property it left bare takes its text from its Struct's ``Attributes:`` docstring
  section (Google style, ``name: text`` or ``a, b: text``).
- ``array_like`` Structs (``FundPoint``) go on the wire as arrays, ``[time, fund_usd]``;
  Litestar documents them as objects. They become fixed-length arrays (``prefixItems``).
- Probes and the index (``/``, ``/healthz``, ``/readyz``, ``/metrics``) need no key:
  ``security: []`` overrides the document-wide API key requirement.
"""

from __future__ import annotations

import inspect
import re

import msgspec
from litestar.openapi.spec import Link, OpenAPI, Reference, Schema
from litestar.openapi.spec.enums import OpenAPIType

#: Paths answered without an API key.
OPEN_PATHS = ("/", "/healthz", "/readyz", "/metrics")
_SECTION = re.compile(r"^\s*(Attributes|Args):\s*$")
_ENTRY = re.compile(r"^(\s*)([A-Za-z_][\w, ]*):\s*(.*)$")


def _structs() -> dict[str, type[msgspec.Struct]]:
    """Every Struct of this code base by the names Litestar gives components (``Name`` and,
    when two share a name, ``module_path_Name``)."""
    found: dict[str, type[msgspec.Struct]] = {}
    todo = list(msgspec.Struct.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__module__.startswith(("calibration", "service")):
            continue
        found.setdefault(cls.__name__, cls)
        found[f"{cls.__module__.replace('.', '_')}_{cls.__name__}"] = cls
    return found


def attribute_docs(cls: type) -> dict[str, str]:
    """``name → text`` from the ``Attributes:`` section of a class docstring."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    out: dict[str, str] = {}
    in_section = False
    indent: int | None = None
    current: list[str] = []
    lines = doc.splitlines()
    for line in lines:
        if _SECTION.match(line):
            in_section, indent, current = True, None, []
            continue
        if not in_section:
            continue
        if not line.strip():
            continue
        entry = _ENTRY.match(line)
        width = len(line) - len(line.lstrip())
        if indent is None and entry:
            indent = width
        if entry and width == indent:
            names = [n.strip() for n in entry.group(2).split(",")]
            current = names
            for name in names:
                out[name] = entry.group(3).strip()
        elif indent is not None and width > indent and current:
            for name in current:
                out[name] = f"{out[name]} {line.strip()}".strip()
        else:
            in_section = False
    return out


def _array_like(schema: Schema, cls: type[msgspec.Struct]) -> Schema:
    """An ``array_like`` Struct's object schema as the fixed-length array it is sent as."""
    props = schema.properties or {}
    items = [props[name] for name in cls.__struct_fields__]
    fields = ", ".join(cls.__struct_fields__)
    return Schema(description=f"{schema.description or ''} Sent as an array `[{fields}]`.",
                  type=OpenAPIType.ARRAY, prefix_items=items, min_items=len(items),
                  max_items=len(items))


#: (path, method, statuses) of a creating operation → (link name, path, method, parameter,
#: where the value is in the response): what a client (and schemathesis's stateful tests)
#: can call next with what it got.
LINKS = {
    ("/v1/datasets", "post", ("201",)): [
        ("GetDataset", "/v1/datasets/{dataset_id}", "get", "dataset_id", "$response.body#/id"),
    ],
    ("/v1/calibrations", "post", ("200", "202")): [
        (f"{verb.title()}{name}", path, verb, "job_id", "$response.body#/id")
        for name, path, verb in (
            ("Calibration", "/v1/calibrations/{job_id}", "get"),
            ("Calibration", "/v1/calibrations/{job_id}", "delete"),
            ("Events", "/v1/calibrations/{job_id}/events", "get"),
            ("Result", "/v1/calibrations/{job_id}/result", "get"),
            ("Report", "/v1/calibrations/{job_id}/report", "get"),
        )
    ],
}


def _link(document: OpenAPI) -> None:
    paths = document.paths or {}
    for (path, method, statuses), links in LINKS.items():
        source = getattr(paths.get(path), method, None)
        if source is None or not source.responses:
            continue
        built = {}
        for name, target_path, target_method, parameter, value in links:
            target = getattr(paths.get(target_path), target_method, None)
            if target is None or not target.operation_id:
                continue
            built[name] = Link(operation_id=target.operation_id,
                               parameters={parameter: value})
        for status in statuses:
            response = source.responses.get(status)
            if response is not None and not isinstance(response, Reference):
                response.links = dict(built)


def polish(document: OpenAPI) -> OpenAPI:
    """The document with descriptions filled, array-like Structs as arrays and the open paths
    marked ``security: []`` (in place; returned for convenience)."""
    structs = _structs()
    components = document.components.schemas if document.components else None
    for name, schema in (components or {}).items():
        cls = structs.get(name)
        if cls is None or not isinstance(schema, Schema):
            continue
        if schema.description is None and cls.__doc__:
            schema.description = inspect.cleandoc(cls.__doc__).split("\n\n")[0]
        docs = attribute_docs(cls)
        for field, prop in (schema.properties or {}).items():
            if isinstance(prop, Schema | Reference) and not prop.description:
                text = docs.get(field)
                if text:
                    prop.description = text
        if cls.__struct_config__.array_like and schema.properties:
            components[name] = _array_like(schema, cls)  # type: ignore[index]
    _link(document)
    for path, item in (document.paths or {}).items():
        if path in OPEN_PATHS:
            for method in ("get", "head"):
                operation = getattr(item, method, None)
                if operation is not None:
                    operation.security = []
    return document
