"""Generate the JSON Schema files in ``schemas/json/``: the wire contract, for producers in
other languages, and the routing data format (``schemas.routing``).

Run ``python -m schemas.export`` after changing a model; a test fails while they differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from schemas.models import SCHEMA_VERSION, WIRE_MODELS
from schemas.routing import DATA_MODELS

JSON_DIR = Path(__file__).resolve().parent / "json"


def schema_documents() -> dict[str, bytes]:
    docs = {}
    for name, model in {**WIRE_MODELS, **DATA_MODELS}.items():
        schema = model.model_json_schema(mode="validation")
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://tierstream.dev/schemas/{name}.v{SCHEMA_VERSION}.json",
            **schema,
        }
        docs[f"{name}.v{SCHEMA_VERSION}.json"] = (
            orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )
    return docs


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for filename, body in schema_documents().items():
        (JSON_DIR / filename).write_bytes(body)
        print(f"wrote {JSON_DIR / filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
