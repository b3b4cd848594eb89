"""Validation of client events: each bad input maps to the spec's error code."""

from __future__ import annotations

import json
from typing import Any

import pytest

from warmsocket.client_events import parse_client_event, validate_create, validate_steer
from warmsocket.errors import APIError


def create(**fields: Any) -> dict[str, Any]:
    return {"type": "response.create", "model": "m", "input": "hi", **fields}


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"\xff\xfe", "invalid_json", None),
        (b"[1, 2]", "invalid_type", "event"),
        (b'"response.create"', "invalid_type", "event"),
        (b"{}", "missing_required_parameter", "type"),
        (b'{"type": "response.cancel"}', "invalid_value", "type"),
        (b'{"type": 7}', "invalid_value", "type"),
        (json.dumps(create(stream_id="")).encode(), "invalid_stream_id", "stream_id"),
        (json.dumps(create(stream_id="a b")).encode(), "invalid_stream_id", "stream_id"),
        (json.dumps(create(stream_id="x" * 257)).encode(), "invalid_stream_id", "stream_id"),
        (json.dumps(create(stream_id=5)).encode(), "invalid_stream_id", "stream_id"),
    ],
)
def test_first_step_errors(message: bytes, code: str, param: str | None) -> None:
    with pytest.raises(APIError) as info:
        parse_client_event(message)
    assert info.value.code == code
    assert info.value.param == param
    assert info.value.status == 400
    assert "hi" not in info.value.message  # never echo content


def test_valid_lane_names() -> None:
    for name in ["a", "A.b-c_9", "x" * 256]:
        assert parse_client_event(json.dumps(create(stream_id=name))).stream_id == name
    assert parse_client_event(json.dumps(create(stream_id=None))).stream_id is None


def test_response_processed_is_ignored() -> None:
    assert parse_client_event(b'{"type":"response.processed","response_id":"r"}').type == (
        "response.processed"
    )


@pytest.mark.parametrize(
    ("fields", "code", "param"),
    [
        ({"model": None}, "missing_required_parameter", "model"),
        ({"model": 3}, "invalid_type", "model"),
        ({"input": 5}, "invalid_type", "input"),
        # `"type": null` is no easy message (it was kept with type null, unread).
        (
            {"input": [{"role": "user", "content": "x", "type": None}]},
            "invalid_type",
            "input[0].type",
        ),
        ({"input": [{"type": None}]}, "invalid_type", "input[0].type"),
        ({"input": [5]}, "invalid_type", "input[0]"),
        ({"input": [{"content": "x"}]}, "missing_required_parameter", "input[0].type"),
        ({"input": [{"role": "robot", "content": "x"}]}, "invalid_value", "input[0].role"),
        ({"input": [{"role": "user", "content": 5}]}, "invalid_type", "input[0].content"),
        (
            {"input": [{"role": "user", "content": [{"type": "bogus"}]}]},
            "invalid_value",
            "input[0].content[0].type",
        ),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "missing_required_parameter",
            "input[0].call_id",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": 1}]},
            "invalid_type",
            "input[0].output",
        ),
        ({"input": [{"type": "nonsense"}]}, "invalid_value", "input[0].type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, None, None),
        ({"input": [{"type": "item_reference"}]}, "missing_required_parameter", "input[0].id"),
        ({"input": [{"type": "item_reference", "id": 7}]}, "invalid_type", "input[0].id"),
        ({"input": []}, "invalid_value", "input"),
        ({"input": ""}, None, None),
        ({"store": "yes"}, "invalid_type", "store"),
        ({"generate": 1}, "invalid_type", "generate"),
        ({"background": True}, "unsupported_parameter", "background"),
        ({"previous_response_id": 7}, "invalid_type", "previous_response_id"),
        ({"previous_response_id": "r", "conversation": "c"}, "invalid_value", "conversation"),
        ({"tools": {}}, "invalid_type", "tools"),
        ({"tools": [{"type": "function"}]}, "missing_required_parameter", "tools[0].name"),
        ({"tool_choice": "sometimes"}, "invalid_value", "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "missing_required_parameter", "tool_choice.name"),
        ({"tool_choice": {"mode": "auto"}}, "invalid_type", "tool_choice"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": "{}"}]},
            "invalid_type",
            "tools[0].parameters",
        ),
        (
            {"tools": [{"type": "function", "name": "f", "strict": "yes"}]},
            "invalid_type",
            "tools[0].strict",
        ),
        ({"temperature": "hot"}, "invalid_type", "temperature"),
        ({"max_output_tokens": -1}, "invalid_value", "max_output_tokens"),
        ({"max_output_tokens": 15}, "invalid_value", "max_output_tokens"),
        ({"max_output_tokens": 16}, None, None),
        ({"top_logprobs": 21}, "invalid_value", "top_logprobs"),
        ({"top_logprobs": 20}, None, None),
        (
            {"context_management": [{"type": "compaction", "compact_threshold": 999}]},
            "invalid_value",
            "context_management[0].compact_threshold",
        ),
        (
            {"context_management": [{"type": "other"}]},
            "invalid_value",
            "context_management[0].type",
        ),
        ({"context_management": []}, "invalid_value", "context_management"),
        ({"metadata": {"k" * 65: "v"}}, "invalid_value", "metadata"),
        ({"metadata": {"k": "v" * 513}}, "invalid_value", "metadata"),
        ({"safety_identifier": "s" * 65}, "invalid_value", "safety_identifier"),
        ({"safety_identifier": "s" * 64}, None, None),
        ({"service_tier": 5}, "invalid_type", "service_tier"),
        ({"service_tier": "some-new-tier"}, None, None),
        ({"include": "reasoning.encrypted_content"}, "invalid_type", "include"),
        ({"include": ["reasoning.encrypted_content", 5]}, "invalid_type", "include[1]"),
        ({"include": ["some.new.value"]}, None, None),
        ({"reasoning": {"effort": 3}}, "invalid_type", "reasoning.effort"),
        ({"reasoning": {"effort": "max"}}, None, None),
        ({"text": {"verbosity": True}}, "invalid_type", "text.verbosity"),
        ({"text": {"format": "json"}}, "invalid_type", "text.format"),
        ({"user": ["u"]}, "invalid_type", "user"),
        ({"prompt_cache_retention": "forever"}, "invalid_value", "prompt_cache_retention"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "invalid_value", "metadata"),
        ({"metadata": {"a": 1}}, "invalid_type", "metadata"),
        ({"truncation": "sometimes"}, "invalid_value", "truncation"),
        ({"background": "true"}, "invalid_type", "background"),
        (
            {"text": {"format": {"type": "json_schema", "schema": {}}}},
            "missing_required_parameter",
            "text.format.name",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "n", "schema": None}}},
            "missing_required_parameter",
            "text.format.schema",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": 1, "schema": {}}}},
            "invalid_type",
            "text.format.name",
        ),
    ],
)
def test_body_errors(fields: dict[str, Any], code: str | None, param: str | None) -> None:
    body = create(**fields)
    if code is None:
        validate_create(body, websocket=True)
        return
    with pytest.raises(APIError) as info:
        validate_create(body, websocket=True)
    assert (info.value.code, info.value.param) == (code, param)


def test_http_rejects_websocket_only_fields() -> None:
    for name, value in [("stream_id", "a"), ("generate", False), ("type", "response.create")]:
        body = {"model": "m", "input": "hi", name: value}
        with pytest.raises(APIError) as info:
            validate_create(body, websocket=False)
        assert (info.value.code, info.value.param) == ("unknown_parameter", name)


def test_http_background_must_be_a_boolean() -> None:
    """`"background": "true"` (a shell's or a form's) is refused, not run in the
    foreground: the client would wait the whole generation with no way to cancel."""
    for value in ("true", 1, {}):
        with pytest.raises(APIError) as info:
            validate_create({"model": "m", "input": "hi", "background": value}, websocket=False)
        assert (info.value.code, info.value.param) == ("invalid_type", "background")
    assert validate_create({"model": "m", "input": "hi", "background": None}, websocket=False)


def test_normalisation_and_defaults() -> None:
    request = validate_create(create(stream=True, input="hi", extra_thing=1), websocket=True)
    assert request.input_items == [{"type": "message", "role": "user", "content": "hi"}]
    assert request.store is True and request.generate is True
    assert request.ignored_fields == ("extra_thing",)
    assert request.settings["tool_choice"] == "auto"
    easy = validate_create(create(input=[{"role": "user", "content": "x"}]), websocket=True)
    assert easy.input_items[0]["type"] == "message"


def test_warmup_allows_empty_input_and_prewarm_forces_it() -> None:
    assert validate_create(create(input=None, generate=False), websocket=True).generate is False
    prewarm = validate_create(create(prompt_cache_options={"prewarm": True}), websocket=True)
    assert prewarm.generate is False


@pytest.mark.parametrize(
    "body",
    [
        {"type": "response.steer", "input": "x"},
        {"type": "response.steer", "previous_response_id": "r", "input": ""},
        {"type": "response.steer", "previous_response_id": "r", "input": []},
        {"type": "response.steer", "previous_response_id": "r", "input": "x", "stream_id": "a"},
        {
            "type": "response.steer",
            "previous_response_id": "r",
            "input": [{"role": "assistant", "content": "x"}],
        },
        {
            "type": "response.steer",
            "previous_response_id": "r",
            "input": [{"type": "function_call_output", "call_id": "c", "output": "o"}],
        },
        {
            "type": "response.steer",
            "previous_response_id": "r",
            "input": [{"role": "user", "content": "x", "id": "msg_1"}],
        },
    ],
)
def test_bad_steers(body: dict[str, Any]) -> None:
    with pytest.raises(APIError) as info:
        validate_steer(body)
    assert info.value.code == "invalid_input"


def test_good_steer() -> None:
    steer = validate_steer(
        {
            "type": "response.steer",
            "previous_response_id": "r",
            "input": [{"type": "message", "role": "user", "content": "x"}],
        }
    )
    assert steer.input_items == [{"type": "message", "role": "user", "content": "x"}]
