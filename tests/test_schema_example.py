"""`schema_example`: the arguments the built-in model makes up for a forced call must
be accepted by the tool's schema, as a JSON Schema validator and pydantic (the
`openai-agents` SDK's `function_tool` parses arguments with it) read it."""

from __future__ import annotations

import datetime
import enum
import json
import time
import uuid
from typing import Annotated, Any, Literal

import jsonschema
import pytest
from agents.function_schema import function_schema
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from warmsocket.schema_example import ExampleTooLarge, example_arguments, example_value


def test_plain_types_and_required_members() -> None:
    schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "lines": {"type": "integer"},
            "ratio": {"type": "number"},
            "force": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "optional": {"type": "string"},
        },
        "required": ["path", "lines", "ratio", "force", "tags"],
    }
    assert json.loads(example_arguments(schema)) == {
        "path": "",
        "lines": 0,
        "ratio": 0,
        "force": False,
        "tags": [],
    }


def test_nothing_to_go_by_gives_an_empty_object() -> None:
    for parameters in (None, {}, {"type": "object"}, {"type": "string"}, "junk", []):
        assert example_arguments(parameters) == "{}"


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"const": "v1"}, "v1"),
        ({"enum": ["celsius", "fahrenheit"]}, "celsius"),
        ({"type": "string", "default": "main"}, "main"),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, 0),
        ({"type": ["null", "string"]}, ""),
        ({"type": "string", "minLength": 3}, "xxx"),
        ({"type": "string", "format": "date-time"}, "1970-01-01T00:00:00Z"),
        ({"type": "string", "format": "uuid"}, "00000000-0000-0000-0000-000000000000"),
        ({"type": "integer", "minimum": 5}, 5),
        ({"type": "integer", "minimum": 2.5}, 3),
        ({"type": "integer", "exclusiveMinimum": 0}, 1),
        ({"type": "integer", "maximum": -3}, -3),
        ({"type": "integer", "exclusiveMaximum": -3}, -4),
        ({"type": "number", "exclusiveMinimum": 1}, 1.5),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, [0, 0]),
        ({"prefixItems": [{"type": "string"}, {"type": "boolean"}]}, ["", False]),
        ({"type": "null"}, None),
    ],
)
def test_values(schema: dict[str, Any], expected: Any) -> None:
    assert example_value(schema) == expected


def test_refs_and_all_of_are_followed() -> None:
    schema = {
        "$defs": {
            "Point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
            },
            "Named": {"properties": {"name": {"type": "string"}}, "required": ["name"]},
        },
        "type": "object",
        "properties": {
            "at": {"$ref": "#/$defs/Point"},
            "label": {"allOf": [{"$ref": "#/$defs/Named"}, {"required": ["size"]}]},
        },
        "required": ["at", "label"],
    }
    assert example_value(schema) == {"at": {"x": 0, "y": 0}, "label": {"name": "", "size": None}}


def test_recursive_and_broken_refs_end() -> None:
    loop = {"$ref": "#"}
    assert example_value(loop) is None
    tree = {
        "type": "object",
        "properties": {"child": {"$ref": "#"}},
        "required": ["child"],
    }
    value = example_value(tree)
    depth = 0
    while isinstance(value, dict):
        value, depth = value["child"], depth + 1
    assert value is None and depth > 5  # stops, deep down, instead of recursing forever
    assert example_value({"$ref": "#/$defs/Missing"}) is None
    assert example_value({"$ref": "https://example.com/schema"}) is None
    assert example_value({"allOf": [{"$ref": "#"}]}) is None


def _requiring(**members: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(members), "properties": members}


# Small schemas whose simplest value is huge: three members that each are the whole
# schema again (3**32 objects: it froze the server), 2,000 arrays of 2,000 (8 MB of
# arguments after 6 s), a string of 10**11 characters (100 GB asked for), an integer
# one past the largest JSON number Python reads (ValueError when written).
HUGE_EXAMPLES = {
    "self-references": _requiring(a={"$ref": "#"}, b={"$ref": "#"}, c={"$ref": "#"}),
    "min-items": _requiring(
        s={"type": "array", "minItems": 2000, "items": {"type": "array", "minItems": 2000}}
    ),
    "min-length": _requiring(s={"type": "string", "minLength": 10**11}),
    "past-a-bound": _requiring(n={"type": "integer", "exclusiveMinimum": 10**4300 - 1}),
}


@pytest.mark.parametrize("schema", HUGE_EXAMPLES.values(), ids=HUGE_EXAMPLES.keys())
def test_a_huge_simplest_value_is_refused_at_once(schema: dict[str, Any]) -> None:
    """The work is bounded for the whole value, not only its depth: the model (on the
    event loop) gives up within a fraction of a second instead of building it."""
    started = time.monotonic()
    with pytest.raises(ExampleTooLarge):
        example_arguments(schema)
    assert time.monotonic() - started < 1


class Unit(enum.Enum):
    CELSIUS = "c"
    FAHRENHEIT = "f"


class Location(BaseModel):
    city: str
    country: Annotated[str, Field(min_length=2, max_length=2)]
    coordinates: tuple[float, float] | None = None


class Query(BaseModel):
    location: Location
    unit: Unit
    mode: Literal["fast", "exact"]
    days: Annotated[int, Field(ge=1, le=14)]
    threshold: Annotated[float, Field(gt=0)]
    when: datetime.datetime
    request_id: uuid.UUID
    stations: Annotated[list[Location], Field(min_length=1)]
    note: str | None = None
    limit: int = 10


def weather(query: Query, verbose: bool) -> str:
    """A tool with nested models, enums and constrained numbers."""
    return "ok"


def read_file(path: str, start: int = 0) -> str:
    """Read a file."""
    return "ok"


@pytest.mark.parametrize("tool", [weather, read_file], ids=["nested", "simple"])
def test_agents_function_tools_accept_the_arguments(tool: Any) -> None:
    """The strict schema `openai-agents`' `function_tool` sends, and the pydantic
    model it parses the arguments with."""
    made = function_schema(tool, strict_json_schema=True)
    arguments = example_arguments(made.params_json_schema)
    jsonschema.validate(json.loads(arguments), made.params_json_schema)
    made.params_pydantic_model.model_validate_json(arguments)  # raises when refused


def test_pydantic_models_accept_the_arguments() -> None:
    """Pydantic's own (not strict) schema: only the required members are made."""
    schema = Query.model_json_schema()
    arguments = example_arguments(schema)
    jsonschema.validate(json.loads(arguments), schema)
    query = Query.model_validate_json(arguments)
    assert query.days == 1 and query.threshold > 0 and len(query.stations) == 1


# -- any schema of the covered kinds ---------------------------------------------------------

_scalars = st.one_of(
    st.just({"type": "string"}),
    st.builds(lambda n: {"type": "string", "minLength": n}, st.integers(0, 5)),
    st.sampled_from([{"type": "string", "format": f} for f in ("date-time", "email", "uri")]),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(
        lambda kind, low, span, exclusive: {
            "type": kind,
            ("exclusiveMinimum" if exclusive else "minimum"): low,
            "maximum": low + span,
        },
        st.sampled_from(["integer", "number"]),
        st.integers(-50, 50),
        st.integers(2, 10),
        st.booleans(),
    ),
    st.lists(st.integers() | st.text(max_size=5), min_size=1, max_size=3).map(
        lambda values: {"enum": values}
    ),
    st.integers().map(lambda value: {"const": value}),
)


def _extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    members = st.dictionaries(st.text("abcdef", min_size=1, max_size=4), children, max_size=4)
    return st.one_of(
        st.builds(
            lambda props, data: {
                "type": "object",
                "properties": props,
                "required": [n for n in props if data.draw(st.booleans())],
                "additionalProperties": False,
            },
            members,
            st.data(),
        ),
        st.builds(
            lambda item, n: {"type": "array", "items": item, "minItems": n},
            children,
            st.integers(0, 3),
        ),
        st.builds(lambda a, b: {"anyOf": [a, b]}, children, children),
        children.filter(lambda item: item.get("type") not in (None, "null"))
        .filter(lambda item: isinstance(item["type"], str))
        .map(lambda item: {**item, "type": [item["type"], "null"]}),
    )


schemas = st.recursive(_scalars, _extend, max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(schemas)
def test_any_covered_schema_accepts_its_example(schema: dict[str, Any]) -> None:
    value = example_value(schema)
    jsonschema.validate(
        value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
