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

The work is bounded (`MAX_STEPS`, `MAX_BYTES`), for the whole value: the model runs
on the event loop, and a small schema can ask for a huge value (members that each
`$ref` the whole schema, `minItems` of `minItems`, a `minLength` of 10**11). A value
larger than that raises `ExampleTooLarge`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 32
"""Nesting (and `$ref` hops) followed before giving up with null: a recursive
schema (a tree node of tree nodes) stops at its optional members anyway."""

MAX_STEPS = 10_000
"""Schema nodes visited (each value made, `$ref` followed, `allOf` part merged) for
one value at most: a tool's schema needs a few hundred."""

MAX_BYTES = 64 * 1024
"""The JSON text of one value at most (about; strings counted escaped)."""


class ExampleTooLarge(ValueError):
    """The simplest value a schema accepts takes more than `MAX_STEPS` steps or
    `MAX_BYTES` of JSON to make (or has none: a member that requires itself), or
    holds a number too long to write."""

    def __init__(self) -> None:
        super().__init__(
            f"the simplest value its schema accepts is too large to make (over "
            f"{MAX_STEPS:,} steps or {MAX_BYTES:,} bytes)"
        )


@dataclass(slots=True)
class _Budget:
    """What is left of `MAX_STEPS` and `MAX_BYTES`, shared by the whole recursion."""

    steps: int = MAX_STEPS
    size: int = MAX_BYTES

    def spend(self, *, steps: int = 0, size: int = 0) -> None:
        """Take `steps` and `size` bytes, before the work: a string's length is checked
        before the string is made."""
        self.steps -= steps
        self.size -= size
        if self.steps < 0 or self.size < 0:
            raise ExampleTooLarge


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
    (a function tool's schema, or None) accepts; ``{}`` when it says nothing.
    Raises `ExampleTooLarge`."""
    value = example_value(parameters) if isinstance(parameters, dict) else {}
    if not isinstance(value, dict):
        value = {}  # arguments are an object whatever the schema says
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def example_value(
    schema: Any, root: Any = None, depth: int = 0, budget: _Budget | None = None
) -> Any:
    """The simplest value `schema` accepts; `root` is the document its `$ref`s
    point into (the schema itself at the top), `budget` what is left for the whole
    value (all of it at the top). Raises `ExampleTooLarge`."""
    if root is None:
        root = schema
    if budget is None:
        budget = _Budget()
    budget.spend(steps=1)
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return _given(None, budget)
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return example_value(_resolve(ref, root), root, depth + 1, budget)
    if "const" in schema:
        return _given(schema["const"], budget)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return _given(enum[0], budget)
    if "default" in schema:
        return _given(schema["default"], budget)
    for choices in ("anyOf", "oneOf"):
        options = schema.get(choices)
        if isinstance(options, list) and options:
            return example_value(options[0], root, depth + 1, budget)
    parts = schema.get("allOf")
    if isinstance(parts, list) and parts:
        budget.spend(steps=len(parts))
        return example_value(_merged(schema, parts, root), root, depth + 1, budget)
    return _made(schema, root, depth, budget)


def _made(schema: dict[str, Any], root: Any, depth: int, budget: _Budget) -> Any:
    """The simplest value of `schema`'s type (one with no `const`, `enum`, `default`
    nor combination to take it from)."""
    kind = _type(schema)
    if kind == "object":
        return _object(schema, root, depth, budget)
    if kind == "array":
        return _array(schema, root, depth, budget)
    if kind == "string":
        return _string(schema, budget)
    if kind in ("integer", "number"):
        return _given(_number(schema, kind), budget)
    if kind == "boolean":
        return _given(False, budget)
    return _given(None, budget)


def _given(value: Any, budget: _Budget) -> Any:
    """`value` (a schema's `const`, `enum` or `default`, or a scalar), its JSON text
    paid for."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except ValueError:  # an integer past Python's 4,300 digits (a bound plus one)
        raise ExampleTooLarge from None
    budget.spend(size=len(text))
    return value


def _string(schema: dict[str, Any], budget: _Budget) -> str:
    text = _FORMATS.get(str(schema.get("format")), "")
    length = schema.get("minLength")
    if isinstance(length, int) and len(text) < length:
        budget.spend(size=length + 2)  # before the string is made: it may be huge
        return "x" * length
    budget.spend(size=len(text) + 2)  # a format's example needs no escape
    return text


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


def _object(schema: dict[str, Any], root: Any, depth: int, budget: _Budget) -> dict[str, Any]:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    required = schema.get("required")
    names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
    budget.spend(size=2)
    out: dict[str, Any] = {}
    for name in names:
        budget.spend(size=len(json.dumps(name, ensure_ascii=False)) + 2)  # `"name":` and `,`
        out[name] = example_value(properties.get(name, {}), root, depth + 1, budget)
    return out


def _array(schema: dict[str, Any], root: Any, depth: int, budget: _Budget) -> list[Any]:
    prefix = schema.get("prefixItems")
    items = schema.get("items")
    if isinstance(items, list):  # draft 4-2019 tuples
        prefix, items = items, schema.get("additionalItems")
    budget.spend(size=2)
    out = [_element(part, root, depth, budget) for part in prefix or ()]
    count = schema.get("minItems")
    if isinstance(count, int) and len(out) < count:
        # Each element spends at least a step: a huge `minItems` ends with the budget.
        out.extend(_element(items, root, depth, budget) for _ in range(count - len(out)))
    return out


def _element(schema: Any, root: Any, depth: int, budget: _Budget) -> Any:
    budget.spend(size=1)  # its `,`
    return example_value(schema, root, depth + 1, budget)


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
