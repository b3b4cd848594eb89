"""The simplest value a JSON Schema accepts: the arguments the built-in model makes
up for a call it is made to make (`tool_choice: required` or a named tool) without a
``/call`` directive giving them.

It covers what function tools' `parameters` use (as pydantic and the `openai-agents`
SDK write them, strict or not): `type` (one or a list), `properties` with
`required`, `items` and `prefixItems` with `minItems`, `enum`, `const`, `default`,
`anyOf`/`oneOf` (the first choice), `allOf` (merged), local `$ref`s to `$defs` or
`definitions`, `minimum`/`exclusiveMinimum`/`maximum`, `minLength` and the common
string `format`s. A `pattern` is not followed. Deterministic: the same schema gives
the same value.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32
"""Nesting (and `$ref` hops) followed before giving up with null: a recursive
schema (a tree node of tree nodes) stops at its optional members anyway."""

_FORMATS = {
    "date-time": "1970-01-01T00:00:00Z",
    "date": "1970-01-01",
    "time": "00:00:00Z",
    "duration": "P0D",
    "email": "user@example.com",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-0000-0000-000000000000",
}


def example_arguments(parameters: Any) -> str:
    """A function call's `arguments`: the JSON of the simplest object `parameters`
    (a function tool's schema, or None) accepts; ``{}`` when it says nothing."""
    value = example_value(parameters) if isinstance(parameters, dict) else {}
    if not isinstance(value, dict):
        value = {}  # arguments are an object whatever the schema says
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def example_value(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """The simplest value `schema` accepts; `root` is the document its `$ref`s
    point into (the schema itself at the top)."""
    if root is None:
        root = schema
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return example_value(_resolve(ref, root), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if "default" in schema:
        return schema["default"]
    for choices in ("anyOf", "oneOf"):
        options = schema.get(choices)
        if isinstance(options, list) and options:
            return example_value(options[0], root, depth + 1)
    parts = schema.get("allOf")
    if isinstance(parts, list) and parts:
        return example_value(_merged(schema, parts, root), root, depth + 1)
    kind = _type(schema)
    if kind == "object":
        return _object(schema, root, depth)
    if kind == "array":
        return _array(schema, root, depth)
    if kind == "string":
        text = _FORMATS.get(str(schema.get("format")), "")
        length = schema.get("minLength")
        if isinstance(length, int) and len(text) < length:
            text = "x" * length
        return text
    if kind in ("integer", "number"):
        return _number(schema, kind)
    if kind == "boolean":
        return False
    return None


def _type(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str)]
        kind = next((k for k in kinds if k != "null"), kinds[0] if kinds else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _object(schema: dict[str, Any], root: Any, depth: int) -> dict[str, Any]:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    required = schema.get("required")
    names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
    return {name: example_value(properties.get(name, {}), root, depth + 1) for name in names}


def _array(schema: dict[str, Any], root: Any, depth: int) -> list[Any]:
    prefix = schema.get("prefixItems")
    items = schema.get("items")
    if isinstance(items, list):  # draft 4-2019 tuples
        prefix, items = items, schema.get("additionalItems")
    out = [example_value(part, root, depth + 1) for part in prefix or ()]
    count = schema.get("minItems")
    if isinstance(count, int) and len(out) < count:
        out.extend(example_value(items, root, depth + 1) for _ in range(count - len(out)))
    return out


def _number(schema: dict[str, Any], kind: str) -> int | float:
    """0, moved into the bounds: up to a minimum, down to a maximum (an integer
    rounded inwards)."""
    integer = kind == "integer"
    value: int | float = 0
    low, above = _bound(schema, "minimum"), _bound(schema, "exclusiveMinimum")
    high, below = _bound(schema, "maximum"), _bound(schema, "exclusiveMaximum")
    if low is not None and value < low:
        value = math.ceil(low) if integer else low
    if above is not None and value <= above:
        value = math.floor(above) + 1 if integer else above + 0.5
    if high is not None and value > high:
        value = math.floor(high) if integer else high
    if below is not None and value >= below:
        value = math.ceil(below) - 1 if integer else below - 0.5
    return value


def _bound(schema: dict[str, Any], name: str) -> int | float | None:
    value = schema.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _resolve(ref: str, root: Any) -> Any:
    """A local reference (``#/$defs/Name``); None for any other."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _merged(schema: dict[str, Any], parts: list[Any], root: Any) -> dict[str, Any]:
    """`allOf` as one schema: the parts' members merged, properties and required
    lists joined (a `$ref`'d part resolved first)."""
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    properties: dict[str, Any] = dict(merged.get("properties") or {})
    required: list[Any] = list(merged.get("required") or [])
    for part in parts:
        for _ in range(MAX_DEPTH):
            if not (isinstance(part, dict) and isinstance(part.get("$ref"), str)):
                break
            part = _resolve(part["$ref"], root)
        if not isinstance(part, dict):
            continue
        for key, value in part.items():
            if key == "properties" and isinstance(value, dict):
                properties.update(value)
            elif key == "required" and isinstance(value, list):
                required.extend(n for n in value if n not in required)
            else:
                merged.setdefault(key, value)
    if properties:
        merged["properties"] = properties
    if required:
        merged["required"] = required
    return merged
