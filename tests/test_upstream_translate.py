"""Translation between the Responses API and upstream APIs, without sockets.

Request side: Responses items, tools and tool_choice -> Chat Completions. Response
side: recorded chunk streams of the shapes vLLM and OpenAI publish -> model events,
fed whole and split at every byte boundary; Responses SSE -> model events.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmsocket._core import MAX_UPSTREAM_EVENT_BYTES
from warmsocket.backends.base import (
    MessageStart,
    ModelEvent,
    ReasoningDelta,
    ResponseFields,
    TextDelta,
    TextLogprobs,
    ToolArgumentsDelta,
    ToolCallStart,
    TurnIncomplete,
    UsageReport,
)
from warmsocket.backends.chat_translate import (
    ChatChunkDecoder,
    chat_messages,
    chat_request_fields,
    chat_tool_choice,
    chat_tools,
    request_head,
)
from warmsocket.backends.http_upstream import OutputRecorder
from warmsocket.backends.responses_events import ResponsesSSEDecoder
from warmsocket.client_events import validate_create
from warmsocket.errors import APIError
from warmsocket.sse import SSEDecoder
from warmsocket.upstream import UpstreamConfig, UpstreamError

FIXTURES = Path(__file__).parent / "fixtures"


def decode(decoder: Any, data: bytes, *, step: int | None = None) -> list[ModelEvent]:
    events: list[ModelEvent] = []
    if step is None:
        events += decoder.feed(data)
    else:
        for start in range(0, len(data), step):
            events += decoder.feed(data[start : start + step])
    return events + decoder.finish()


def merged(events: list[ModelEvent]) -> list[ModelEvent]:
    """Adjacent deltas joined (feeding in pieces may split or join them differently)."""
    out: list[ModelEvent] = []
    for event in events:
        if out and type(event) is type(out[-1]) is TextDelta:
            out[-1] = TextDelta(out[-1].text + event.text)  # type: ignore[union-attr]
        elif out and type(event) is type(out[-1]) is ToolArgumentsDelta:
            out[-1] = ToolArgumentsDelta(out[-1].delta + event.delta)  # type: ignore[union-attr]
        else:
            out.append(event)
    return out


# -- request: items -> messages ------------------------------------------------------------


def test_items_to_messages_in_order() -> None:
    items = [
        {"type": "message", "role": "developer", "content": "be brief"},
        {"type": "message", "role": "user", "content": "weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
        },
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"c":"P"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"c":"R"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {
            "type": "function_call_output",
            "call_id": "c2",
            "output": [{"type": "input_text", "text": "rain"}],
        },
        {"type": "function_call", "call_id": "c3", "name": "read_file", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c3", "output": "x"},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "and this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
            ],
        },
    ]
    assert chat_messages(items) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"c":"P"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"c":"R"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c3",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c3", "content": "x"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and this?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                },
            ],
        },
    ]


def test_text_parts_collapse_to_a_string_except_several_user_parts() -> None:
    one = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    assert chat_messages(one) == [{"role": "user", "content": "hi"}]
    two = [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
        }
    ]
    assert chat_messages(two)[0]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
    ]


def test_tools_and_tool_choice() -> None:
    tools = [
        {
            "type": "function",
            "name": "f",
            "description": "d",
            "parameters": {"type": "object"},
            "strict": True,
        },
        {"type": "web_search"},
    ]
    assert chat_tools(tools) == [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": "d",
                "parameters": {"type": "object"},
                "strict": True,
            },
        }
    ]
    assert chat_tool_choice("required") == "required"
    assert chat_tool_choice({"type": "function", "name": "f"}) == {
        "type": "function",
        "function": {"name": "f"},
    }
    allowed = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "f"}],
    }
    assert chat_tool_choice(allowed) == {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
    }


def test_request_fields_carry_only_what_the_client_set() -> None:
    plain = validate_create({"model": "m", "input": "hi"}, websocket=False).settings
    assert chat_request_fields(plain, "up") == {
        "model": "up",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body = {
        "model": "m",
        "input": "hi",
        "tools": [{"type": "function", "name": "f", "parameters": {}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0.2,
        "max_output_tokens": 64,
        "reasoning": {"effort": "low"},
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
    }
    fields = chat_request_fields(validate_create(body, websocket=False).settings, "up")
    assert fields == {
        "model": "up",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0.2,
        "max_tokens": 64,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": {"type": "object"}},
        },
        "reasoning_effort": "low",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    head = request_head(validate_create(body, websocket=False).settings, "up")
    assert head.endswith(b',"messages":[')
    assert json.loads(head + b"]}")["messages"] == []
    openai = request_head(validate_create(body, websocket=False).settings, "up", openai=True)
    fields = json.loads(openai + b"]}")
    assert fields["max_completion_tokens"] == 64 and "max_tokens" not in fields


def test_openai_gets_its_own_chat_fields_and_no_other_server_does() -> None:
    """`safety_identifier`, `prompt_cache_key` (which steers OpenAI's prompt cache),
    `prompt_cache_retention` and `service_tier` go to OpenAI's Chat Completions,
    which takes them; other servers do not know them. Given at the API's default
    (`service_tier: "default"`), they still go."""
    body = {
        "model": "m",
        "input": "hi",
        "safety_identifier": "user-hash-1",
        "prompt_cache_key": "chain-7",
        "prompt_cache_retention": "24h",
        "service_tier": "default",
        "user": "u-9",
        "text": {"verbosity": "low"},
    }
    request = validate_create(body, websocket=False)
    sent = chat_request_fields(
        request.settings, "up", given_defaults=request.given_defaults, openai=True
    )
    own = ("safety_identifier", "prompt_cache_key", "prompt_cache_retention", "service_tier")
    assert {name: sent[name] for name in (*own, "user")} == {
        name: body[name] for name in (*own, "user")
    }
    assert sent["verbosity"] == "low"  # `text.verbosity`, as OpenAI's chat names it
    elsewhere = chat_request_fields(request.settings, "up", given_defaults=request.given_defaults)
    assert not {*own, "verbosity"} & set(elsewhere) and elsewhere["user"] == "u-9"


@pytest.mark.parametrize(
    ("urls", "field"),
    [
        (("https://api.openai.com/v1",), "max_completion_tokens"),
        (("https://my-east.openai.azure.com/openai/v1",), "max_completion_tokens"),
        (
            ("https://api.openai.com/v1", "https://eu.openai.azure.com/openai/v1"),
            "max_completion_tokens",
        ),
        (("http://127.0.0.1:8000/v1",), "max_tokens"),
        (("http://localhost:11434/v1",), "max_tokens"),
        (("https://api.openai.com.example.net/v1",), "max_tokens"),
        (("https://openai.azure.com.evil.test/v1",), "max_tokens"),
        (("https://api.openai.com/v1", "http://10.0.0.5:8000/v1"), "max_tokens"),
    ],
)
def test_the_token_limit_field_follows_the_upstream(urls: tuple[str, ...], field: str) -> None:
    """OpenAI's reasoning models refuse `max_tokens` on Chat Completions; Ollama
    ignores `max_completion_tokens` (unbounded answers). So OpenAI and Azure OpenAI
    get the one, every other server the other."""
    assert UpstreamConfig(urls=urls).at_openai == (field == "max_completion_tokens")


# -- response: chat chunks -> events -------------------------------------------------------


OPENAI_PARALLEL = [
    ToolCallStart("call_DdmO9pD3xa9XTPNJ32zg2hcA", "get_weather"),
    ToolArgumentsDelta('{"location": "Paris, France"}'),
    ToolCallStart("call_ABCDEFGHIJKLMNOPQRSTUVWX", "get_weather"),
    ToolArgumentsDelta('{"location": "Bogotá, Colombia"}'),
    ResponseFields(b'{"service_tier":"default"}'),  # the tier that served it
    UsageReport(input_tokens=1117, cached_tokens=1024, output_tokens=52, reasoning_tokens=0),
]
VLLM_PARALLEL = [
    TextDelta("Let me check both."),
    ToolCallStart("chatcmpl-tool-3f9c8e2b1a7d4c6e8f0a1b2c3d4e5f60", "get_weather"),
    ToolArgumentsDelta('{"city": "Dallas"}'),
    ToolCallStart("chatcmpl-tool-9b8a7c6d5e4f40312a1b0c9d8e7f6a5b", "get_forecast"),
    ToolArgumentsDelta('{"city": "Dallas", "days": 5}'),
    UsageReport(input_tokens=412, cached_tokens=384, output_tokens=49),
]
VLLM_TEXT = [TextDelta("Hello there!"), UsageReport(21, None, 3)]


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("openai_chat_parallel_tools.sse", OPENAI_PARALLEL),
        ("vllm_chat_parallel_tools.sse", VLLM_PARALLEL),
        ("vllm_chat_text.sse", VLLM_TEXT),
    ],
)
@pytest.mark.parametrize("step", [None, 1, 7, 64])
def test_recorded_chunk_streams(fixture: str, expected: list[ModelEvent], step: int | None) -> None:
    data = (FIXTURES / fixture).read_bytes()
    events = decode(ChatChunkDecoder(), data, step=step)
    assert merged(events) == expected
    if step is None and fixture.startswith("openai"):
        # Deltas are passed on as they come, one per chunk.
        assert events[1] == ToolArgumentsDelta('{"lo')


def test_recorded_parallel_calls_become_two_items() -> None:
    recorder = OutputRecorder()
    for event in decode(
        ChatChunkDecoder(), (FIXTURES / "vllm_chat_parallel_tools.sse").read_bytes()
    ):
        recorder.add(event)
    items = recorder.finish()
    assert [i["type"] for i in items] == ["message", "function_call", "function_call"]
    assert items[2]["arguments"] == '{"city": "Dallas", "days": 5}'
    # Rendered back, they are one assistant message with both calls.
    (message,) = chat_messages(items)
    assert message["content"] == "Let me check both."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_forecast"]


def _sse(*chunks: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (c.encode() if isinstance(c, str) else json.dumps(c).encode()) + b"\n\n"
        for c in chunks
    )


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_calls_without_index_and_whole_arguments_in_one_chunk() -> None:
    # Some servers (older Ollama) send each call whole, without `index`.
    data = _sse(
        _delta({"role": "assistant", "content": ""}),
        _delta({"tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]}),
        _delta({"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": '{"x":1}'}}]}),
        _delta({}, "tool_calls"),
        "[DONE]",
    )
    assert decode(ChatChunkDecoder(), data) == [
        ToolCallStart("a", "f"),
        ToolArgumentsDelta("{}"),
        ToolCallStart("b", "g"),
        ToolArgumentsDelta('{"x":1}'),
    ]


def test_parallel_calls_all_at_index_zero_are_told_apart_by_their_ids() -> None:
    # Ollama's OpenAI-compatible stream numbers every parallel call `index: 0`, each
    # whole with its own id: the client gets two calls, not one call with the second
    # call's arguments glued onto the first's.
    data = _sse(
        _delta({"role": "assistant", "content": ""}),
        _delta(
            {"tool_calls": [{"id": "a", "index": 0, "function": {"name": "f", "arguments": "{}"}}]}
        ),
        _delta(
            {
                "tool_calls": [
                    {"id": "b", "index": 0, "function": {"name": "g", "arguments": '{"x":1}'}}
                ]
            }
        ),
        _delta({}, "tool_calls"),
        "[DONE]",
    )
    assert decode(ChatChunkDecoder(), data) == [
        ToolCallStart("a", "f"),
        ToolArgumentsDelta("{}"),
        ToolCallStart("b", "g"),
        ToolArgumentsDelta('{"x":1}'),
    ]


def test_an_id_repeated_on_every_chunk_continues_the_same_call() -> None:
    # Some servers repeat the call's id (and name) on each of its chunks.
    call = {"id": "a", "index": 0, "type": "function"}
    data = _sse(
        _delta({"tool_calls": [{**call, "function": {"name": "f", "arguments": '{"a"'}}]}),
        _delta({"tool_calls": [{**call, "function": {"name": "f", "arguments": ":1}"}}]}),
        _delta({}, "tool_calls"),
    )
    events = decode(ChatChunkDecoder(), data)
    assert merged(events) == [ToolCallStart("a", "f"), ToolArgumentsDelta('{"a":1}')]


def test_another_id_on_a_calls_later_chunks_continues_it() -> None:
    # Some servers (Poolside) send one id with a call's name, then another id on each
    # of its later chunks, which carry no name: one call, its arguments whole.
    data = _sse(
        _delta(
            {"tool_calls": [{"id": "A", "index": 0, "function": {"name": "f", "arguments": ""}}]}
        ),
        _delta({"tool_calls": [{"id": "B", "index": 0, "function": {"arguments": '{"a"'}}]}),
        _delta({"tool_calls": [{"id": "B", "index": 0, "function": {"arguments": ":1}"}}]}),
        _delta({}, "tool_calls"),
    )
    events = decode(ChatChunkDecoder(), data)
    assert merged(events) == [ToolCallStart("A", "f"), ToolArgumentsDelta('{"a":1}')]


def test_arguments_before_the_name_wait_for_it_and_a_missing_id_is_generated() -> None:
    data = _sse(
        _delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}),
        _delta({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ":1}"}}]}),
        _delta({}, "tool_calls"),
    )
    events = decode(ChatChunkDecoder(), data)
    assert isinstance(events[0], ToolCallStart) and events[0].name == "f"
    assert events[0].call_id.startswith("call_")
    assert merged(events[1:]) == [ToolArgumentsDelta('{"a":1}')]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_deltas_stream_before_what_follows(field: str) -> None:
    # DeepSeek and vLLM's reasoning parsers stream `reasoning_content` (newer vLLM and
    # OpenRouter: `reasoning`) before the answer: reasoning text deltas, which the
    # answer's first delta (a new item) then closes.
    data = _sse(
        _delta({"role": "assistant", "content": ""}),
        _delta({field: "Think "}),
        _delta({field: "hard.", "content": None}),
        _delta({"content": "Hi"}),
        _delta({field: "More?"}),
        _delta({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f"}}]}),
        _delta({field: "Done."}),
        _delta({}, "stop"),
    )
    for step in (None, 7):
        events = decode(ChatChunkDecoder(), data, step=step)
        assert events == [
            ReasoningDelta("Think "),
            ReasoningDelta("hard."),
            TextDelta("Hi"),
            ReasoningDelta("More?"),
            ToolCallStart("a", "f"),
            ReasoningDelta("Done."),
        ]
    # The recorder's items are the encoder's: messages split where the reasoning was,
    # and each run of reasoning deltas is one reasoning item (which the chat backend
    # counts to continue the next turn's rendering from this one's).
    recorder = OutputRecorder()
    for event in [TextDelta("a"), *decode(ChatChunkDecoder(), data)]:
        recorder.add(event)
    items = recorder.finish()
    assert [i["type"] for i in items] == [
        "message",
        "reasoning",
        "message",
        "reasoning",
        "function_call",
        "reasoning",
    ]
    assert [i["content"] for i in items if i["type"] == "message"] == [
        [{"type": "output_text", "text": "a"}],
        [{"type": "output_text", "text": "Hi"}],
    ]


def test_interleaved_calls_are_refused() -> None:
    data = _sse(
        _delta(
            {"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": ""}}]}
        ),
        _delta(
            {"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}}]}
        ),
        _delta({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
    )
    with pytest.raises(UpstreamError) as info:
        decode(ChatChunkDecoder(), data)
    assert info.value.retryable and "interleaved" in info.value.message


def test_stream_errors() -> None:
    # An error object mid-stream (vLLM) is a retryable server error...
    data = _sse(
        _delta({"role": "assistant"}), {"error": {"message": "boom", "type": "x", "code": 500}}
    )
    with pytest.raises(UpstreamError) as info:
        decode(ChatChunkDecoder(), data)
    assert info.value.retryable and info.value.status == 500
    # ...a stream that stops without finish_reason or [DONE] is broken...
    with pytest.raises(UpstreamError) as info:
        decode(ChatChunkDecoder(), _sse(_delta({"content": "par"})))
    assert info.value.retryable and info.value.reason == "closed"
    # ...and a non-JSON chunk is a protocol error.
    with pytest.raises(UpstreamError) as info:
        decode(ChatChunkDecoder(), b"data: {nope\n\n")
    assert info.value.reason == "protocol"


def test_a_llama_cpp_error_line_is_the_upstream_s_error() -> None:
    """llama.cpp writes `error: {...}` (no `data:`), then `data: [DONE]`."""
    data = (
        _sse(_delta({"role": "assistant"}))
        + b'error: {"code":400,"message":"too long","type":"exceed_context_size_error"}\r\n\r\n'
        + b"data: [DONE]\n\n"
    )
    with pytest.raises(UpstreamError) as info:
        decode(ChatChunkDecoder(), data)
    assert (info.value.status, info.value.message) == (400, "too long")
    assert not info.value.retryable
    # An `event: error` whose data is `{"error": {...}}`, its code no HTTP status: a
    # failure of the upstream's (as an error without a status is), not the request's.
    data = b'event: error\ndata: {"error": {"message": "gone", "code": 7}}\n\n'
    with pytest.raises(UpstreamError) as info:
        decode(ChatChunkDecoder(), data)
    assert (info.value.status, info.value.retryable) == (500, True)


def test_a_chunk_nested_too_deeply_is_a_protocol_error() -> None:
    # 100,000 nested arrays: the decoder gives up (RecursionError), and the chunk is
    # the upstream's protocol error (retried), as a non-JSON one is, not a crash.
    with pytest.raises(UpstreamError) as info:
        decode(ChatChunkDecoder(), b"data: " + b"[" * 100_000 + b"\n\n")
    assert info.value.retryable and info.value.reason == "protocol"


@pytest.mark.parametrize(
    "chunk",
    [{"choices": 5}, {"choices": True}, {"choices": [{"delta": {}, "finish_reason": ["stop"]}]}],
)
def test_a_chunk_of_the_wrong_shape_is_a_protocol_error(chunk: dict[str, Any]) -> None:
    # Valid JSON, but not a chat completion chunk: the turn is retried (nothing was
    # forwarded yet) and counted as the upstream's protocol error, as a non-JSON chunk
    # is, rather than failing inside the decoder.
    with pytest.raises(UpstreamError) as info:
        decode(ChatChunkDecoder(), _sse(chunk, "[DONE]"))
    assert info.value.retryable and info.value.reason == "protocol"


def test_continuous_usage_keeps_the_last_report() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    data = _sse(
        {**_delta({"content": "a"}), "usage": usage},
        {**_delta({"content": "b"}, "stop"), "usage": {**usage, "completion_tokens": 2}},
        "[DONE]",
    )
    events = decode(ChatChunkDecoder(), data)
    assert events[-1] == UsageReport(5, None, 2)


@pytest.mark.parametrize(
    ("finish", "reason"),
    [("length", "max_output_tokens"), ("content_filter", "content_filter"), ("stop", None)],
)
def test_an_answer_cut_short_ends_incomplete(finish: str, reason: str | None) -> None:
    data = _sse(_delta({"content": "a"}), _delta({}, finish), "[DONE]")
    events = decode(ChatChunkDecoder(), data)
    assert events == [TextDelta("a")] + ([TurnIncomplete(reason)] if reason else [])


def test_a_chunk_s_log_probabilities_come_before_its_text() -> None:
    scores = {
        "content": [
            {
                "token": "a",
                "logprob": -0.1,
                "bytes": [97],
                "top_logprobs": [{"token": "b", "logprob": -2.0, "bytes": [98]}, 5],
            },
            {"logprob": -1.0},  # no token: left out
        ]
    }
    data = _sse(
        {"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": scores}]},
        _delta({"content": "c"}),
        _delta({}, "stop"),
        "[DONE]",
    )
    events = decode(ChatChunkDecoder(), data)
    assert events[1:] == [TextDelta("a"), TextDelta("c")]
    assert isinstance(events[0], TextLogprobs)
    assert json.loads(events[0].logprobs) == [
        {
            "token": "a",
            "logprob": -0.1,
            "bytes": [97],
            "top_logprobs": [{"token": "b", "logprob": -2.0, "bytes": [98]}],
        }
    ]
    fields = chat_request_fields({"top_logprobs": 3}, "m", logprobs=True)
    assert (fields["logprobs"], fields["top_logprobs"]) == (True, 3)
    assert "logprobs" not in chat_request_fields({"top_logprobs": 3}, "m")


# -- response: Responses SSE -> events -----------------------------------------------------


def _event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


RESPONSE = {"id": "resp_up", "object": "response", "status": "in_progress", "output": []}


def responses_stream() -> bytes:
    """The shape of a recorded OpenAI stream: text, then a function call."""
    msg = {
        "id": "msg_1",
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    call = {
        "id": "fc_1",
        "type": "function_call",
        "status": "in_progress",
        "call_id": "call_9",
        "name": "f",
        "arguments": "",
    }
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    usage = {
        "input_tokens": 300,
        "input_tokens_details": {"cached_tokens": 256},
        "output_tokens": 12,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 312,
    }
    return b"".join(
        [
            _event("response.created", sequence_number=0, response=RESPONSE),
            _event("response.in_progress", sequence_number=1, response=RESPONSE),
            _event("response.output_item.added", sequence_number=2, output_index=0, item=msg),
            _event(
                "response.content_part.added",
                sequence_number=3,
                item_id="msg_1",
                output_index=0,
                content_index=0,
                part=part,
            ),
            _event(
                "response.output_text.delta",
                sequence_number=4,
                item_id="msg_1",
                output_index=0,
                content_index=0,
                delta="Hel",
                logprobs=[],
            ),
            _event(
                "response.output_text.delta",
                sequence_number=5,
                item_id="msg_1",
                output_index=0,
                content_index=0,
                delta="lo",
                logprobs=[],
            ),
            _event(
                "response.output_text.done",
                sequence_number=6,
                item_id="msg_1",
                output_index=0,
                content_index=0,
                text="Hello",
                logprobs=[],
            ),
            _event(
                "response.output_item.done",
                sequence_number=7,
                output_index=0,
                item={**msg, "status": "completed"},
            ),
            _event("response.output_item.added", sequence_number=8, output_index=1, item=call),
            _event(
                "response.function_call_arguments.delta",
                sequence_number=9,
                item_id="fc_1",
                output_index=1,
                delta='{"a":',
            ),
            _event(
                "response.function_call_arguments.done",
                sequence_number=10,
                item_id="fc_1",
                output_index=1,
                arguments='{"a":1}',
            ),
            _event(
                "response.output_item.done",
                sequence_number=11,
                output_index=1,
                item={**call, "arguments": '{"a":1}'},
            ),
            _event(
                "response.completed",
                sequence_number=12,
                response={**RESPONSE, "status": "completed", "usage": usage},
            ),
        ]
    )


@pytest.mark.parametrize("step", [None, 1, 50])
def test_responses_stream_to_events(step: int | None) -> None:
    decoder = ResponsesSSEDecoder()
    events = merged(decode(decoder, responses_stream(), step=step))
    assert events == [
        MessageStart(),  # the message's output_item.added
        TextDelta("Hello"),
        ToolCallStart("call_9", "f"),
        ToolArgumentsDelta('{"a":1}'),  # the rest came only in the .done event
        UsageReport(300, 256, 12, 0),
    ]
    assert decoder.response_id == "resp_up"


def test_responses_without_deltas_and_failures() -> None:
    # A server that sends only finished items.
    item = {
        "id": "msg_2",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "All at once"}],
    }
    data = _event("response.output_item.done", output_index=0, item=item) + _event(
        "response.completed", response={**RESPONSE, "status": "completed"}
    )
    assert decode(ResponsesSSEDecoder(), data) == [TextDelta("All at once")]
    failed = {**RESPONSE, "status": "failed", "error": {"code": "server_error", "message": "x"}}
    with pytest.raises(UpstreamError) as info:
        decode(ResponsesSSEDecoder(), _event("response.failed", response=failed))
    assert info.value.retryable
    flat = _event("error", code="rate_limit_exceeded", message="slow down", param=None)
    with pytest.raises(UpstreamError) as info:
        decode(ResponsesSSEDecoder(), flat)
    assert info.value.status == 429 and not info.value.retryable
    with pytest.raises(UpstreamError) as info:
        decode(ResponsesSSEDecoder(), _event("response.created", response=RESPONSE))
    assert info.value.reason == "closed"
    # Stopped short: incomplete, for the upstream's reason (the output limit by default).
    for details, reason in [
        ({"reason": "content_filter"}, "content_filter"),
        ({"reason": "max_output_tokens"}, "max_output_tokens"),
        (None, "max_output_tokens"),
    ]:
        cut = {**RESPONSE, "status": "incomplete", "incomplete_details": details}
        data = _event("response.output_text.delta", item_id="m", output_index=0, delta="Hi")
        data += _event("response.incomplete", response=cut)
        assert decode(ResponsesSSEDecoder(), data)[-1] == TurnIncomplete(reason)


# -- what a broken upstream can make the server hold ------------------------------------------


def test_sse_decoder_bounds_an_event_and_its_lines() -> None:
    decoder = SSEDecoder(max_event_bytes=100)
    for _ in range(5):  # events under the bound, one after another
        assert decoder.feed(b"data: " + b"a" * 80 + b"\n\n") == [(b"", b"a" * 80)]
    with pytest.raises(ValueError, match="over 100 bytes"):
        decoder.feed(b"data: " + b"a" * 120)  # a line that has not ended
    many_lines = SSEDecoder(max_event_bytes=100)
    with pytest.raises(ValueError, match="over 100 bytes"):
        many_lines.feed(b"data: " + b"a" * 60 + b"\ndata: " + b"b" * 60 + b"\n")
    assert SSEDecoder().feed(b"data: " + b"a" * 1000 + b"\n\n")  # unbounded by default


sse_lines = st.sampled_from(
    [b"data: {}", b"data:x", b"data: a b", b"event: e", b": comment", b"id: 1", b"", b"data: "]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(sse_lines, max_size=12), st.booleans(), st.data())
def test_sse_decoder_gives_the_same_events_at_any_split(
    lines: list[bytes], crlf: bool, data: st.DataObject
) -> None:
    raw = (b"\r\n" if crlf else b"\n").join(lines) + b"\n\n"
    whole = SSEDecoder()
    expected = whole.feed(raw) + whole.finish()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    split = SSEDecoder(max_event_bytes=1 << 20)
    events = []
    for start, stop in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        events += split.feed(raw[start:stop])
    assert events + split.finish() == expected


def test_an_endless_upstream_event_is_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from warmsocket.backends import chat_translate

    monkeypatch.setattr(chat_translate, "MAX_UPSTREAM_EVENT_BYTES", 1000)
    chat = ChatChunkDecoder()
    with pytest.raises(UpstreamError) as info:
        chat.feed(b'data: {"choices": [' + b" " * 2000)
    assert info.value.reason == "protocol"
    responses = ResponsesSSEDecoder()
    block = b"x" * (1 << 20)
    responses.feed(b"event: response.output_text.delta\ndata: ")
    with pytest.raises(UpstreamError) as info:
        for _ in range(MAX_UPSTREAM_EVENT_BYTES // len(block) + 1):
            responses.feed(block)
    assert info.value.reason == "protocol"


LOOK = {"type": "input_text", "text": "look"}


def test_content_a_chat_upstream_cannot_take_is_refused_not_dropped() -> None:
    """An image by `file_id` vanished from the message (the model answered without
    it); a file by `file_url` went out as an empty `file` the upstream refused with
    an unhelpful error. Both are the client's 400 on `input` now, saying what to send."""
    image = {"type": "input_image", "file_id": "file_1", "detail": "auto"}
    by_url = {"type": "input_file", "file_url": "https://example.invalid/a.pdf"}
    for part, hint in [(image, "image_url"), (by_url, "file_data")]:
        message = {"type": "message", "role": "user", "content": [LOOK, part]}
        with pytest.raises(APIError) as info:
            chat_messages([message])
        assert (info.value.status, info.value.param) == (400, "input")
        assert hint in info.value.message
    kept = {"type": "input_file", "file_id": "file_1", "filename": "a.pdf"}
    message = {"type": "message", "role": "user", "content": [LOOK, kept]}
    assert chat_messages([message])[0]["content"][1] == {
        "type": "file",
        "file": {"file_id": "file_1", "filename": "a.pdf"},
    }


def test_programmatic_tool_calling_and_additional_tools_in_chat_form() -> None:
    """A program and its output have no chat form (the platform ran the program) and
    are left out, as hosted calls are; so is an additional_tools item of hosted tools
    only. One with function tools is refused: left out, the model could not call
    them, and a chat request has one list of tools, the request's."""
    user = {"type": "message", "role": "user", "content": "go"}
    program = {"type": "program", "id": "cm_1", "call_id": "p1", "code": "1", "fingerprint": "f"}
    output = {
        "type": "program_output",
        "id": "cmo_1",
        "call_id": "p1",
        "result": "1",
        "status": "completed",
    }
    hosted = {"type": "additional_tools", "role": "developer", "tools": [{"type": "web_search"}]}
    odd = {"type": "additional_tools", "role": "developer", "tools": "not a list"}
    assert chat_messages([user, program, output, hosted, odd]) == [
        {"role": "user", "content": "go"}
    ]
    function = {"type": "function", "name": "f", "parameters": {}}
    added = {"type": "additional_tools", "role": "developer", "tools": [function]}
    with pytest.raises(APIError) as info:
        chat_messages([user, added])
    assert (info.value.status, info.value.param) == (400, "input")
    assert "put them in the request's 'tools'" in info.value.message


def test_a_text_format_a_chat_upstream_cannot_take_is_refused() -> None:
    body = {"model": "m", "input": "hi", "text": {"format": {"type": "json_objict"}}}
    with pytest.raises(APIError) as info:
        chat_request_fields(validate_create(body, websocket=False).settings, "up")
    assert (info.value.status, info.value.param) == (400, "text.format.type")


def test_a_json_schema_description_goes_upstream() -> None:
    schema = {"type": "json_schema", "name": "out", "description": "d", "schema": {}}
    body = {"model": "m", "input": "hi", "text": {"format": schema}}
    fields = chat_request_fields(validate_create(body, websocket=False).settings, "up")
    assert fields["response_format"]["json_schema"]["description"] == "d"


def test_a_tool_call_without_a_name_is_a_protocol_error() -> None:
    """Its arguments were held until a name came, then dropped: `completed`, nothing."""
    data = _sse(
        _delta({"tool_calls": [{"index": 0, "id": "c", "function": {"arguments": "{}"}}]}),
        _delta({}, "tool_calls"),
        "[DONE]",
    )
    with pytest.raises(UpstreamError) as info:
        decode(ChatChunkDecoder(), data)
    assert info.value.reason == "protocol" and "without a name" in info.value.message


def test_a_legacy_function_call_is_a_tool_call() -> None:
    """`delta.function_call` (the deprecated `functions` API) from older servers."""
    data = _sse(
        _delta({"role": "assistant", "function_call": {"name": "f", "arguments": '{"a"'}}),
        _delta({"function_call": {"arguments": ": 1}"}}),
        _delta({}, "function_call"),
        "[DONE]",
    )
    events = decode(ChatChunkDecoder(), data)
    assert isinstance(events[0], ToolCallStart) and events[0].name == "f"
    assert "".join(e.delta for e in events if isinstance(e, ToolArgumentsDelta)) == '{"a": 1}'


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_a_finish_reason_of_a_request_given_up_is_a_failure(reason: str) -> None:
    """vLLM and SGLang end a request their engine dropped with `finish_reason: abort`:
    read as the answer's end, the cut answer was `completed`, stored and continued."""
    data = _sse(_delta({"role": "assistant", "content": "par"}), _delta({}, reason), "[DONE]")
    with pytest.raises(UpstreamError) as info:
        decode(ChatChunkDecoder(), data)
    assert (info.value.status, info.value.retryable) == (500, True)
    assert reason in info.value.message
