"""The committed OpenAPI document: ``python -m service.openapi > openapi/openapi.json``.

``tests/test_openapi.py`` fails when the app and the committed file differ.
"""

from __future__ import annotations

import json
import sys

import msgspec

from service.app import create_app
from service.settings import Settings


def render() -> str:
    """The app's OpenAPI document as stable JSON (sorted keys, two-space indent)."""
    app = create_app(Settings(api_keys='{"0": {"name": "schema", "role": "reader"}}'))
    # msgspec first: defaults in the schema are Structs the json module cannot encode.
    plain = json.loads(msgspec.json.encode(app.openapi_schema.to_schema()))
    return json.dumps(plain, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(render())
