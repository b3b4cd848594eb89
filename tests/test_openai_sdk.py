"""The official `openai` SDK against warmsocket, unchanged: HTTP, SSE, WebSocket, lanes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.lib.responses_websocket import (
    AsyncResponsesWebSocketSession,
    ResponsesWebSocketError,
    ResponsesWebSocketLimits,
)
from pydantic import BaseModel

from tests.support import FUNCTION_TOOLS, RunningServer, check_sse_event, check_ws_event
from warmsocket import mockmodel

MODEL = "warmsocket-mock"
LIMITS = ResponsesWebSocketLimits(
    max_lanes=8,
    max_events_per_lane=256,
    max_events=1024,
    max_bytes_per_lane=16 * 1024 * 1024,
    max_bytes=32 * 1024 * 1024,
    max_response_bytes=None,
)


_clients: list[OpenAI] = []


def client(server: RunningServer, **kw: Any) -> OpenAI:
    """A sync SDK client, closed when the test ends (`_close_clients`)."""
    sdk = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, **kw)
    _clients.append(sdk)
    return sdk


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close the SDK clients a test made: a pooled socket left to the garbage collector
    is a ResourceWarning, which fails whatever test is running when it is collected."""
    yield
    while _clients:
        _clients.pop().close()


def aclient(server: RunningServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)


# -- HTTP mode ------------------------------------------------------------------------------


def test_http_create_retrieve_input_items_delete(server: RunningServer) -> None:
    sdk = client(server)
    first = sdk.responses.create(model=MODEL, input="hello", instructions="be nice")
    assert first.status == "completed" and first.output_text == "You said: hello"
    assert first._request_id and first._request_id.startswith("req_")
    second = sdk.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "user", "content": "/transcript"},
        ],
    )
    assert second.output_text.splitlines() == [
        "user: hello",
        "assistant: You said: hello",
        "user: a",
        "user: b",
        "user: /transcript",
    ]
    fetched = sdk.responses.retrieve(second.id)
    assert fetched.id == second.id and fetched.output_text == second.output_text
    assert fetched.previous_response_id == first.id
    items = list(sdk.responses.input_items.list(second.id, limit=1))  # paginates 3 pages
    assert [i.content[0].text for i in items] == ["/transcript", "b", "a"]  # type: ignore[union-attr]
    ascending = sdk.responses.input_items.list(second.id, order="asc", limit=2)
    assert [i.content[0].text for i in ascending.data] == ["a", "b"]  # type: ignore[union-attr]
    assert ascending.has_more
    sdk.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError) as info:
        sdk.responses.retrieve(second.id)
    assert info.value.status_code == 404
    assert "not found" in info.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.responses.delete(second.id)


def test_http_errors_are_openai_errors(server: RunningServer) -> None:
    sdk = client(server)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.responses.create(model=MODEL, input="x", previous_response_id="resp_missing")
    assert info.value.code == "previous_response_not_found"
    assert info.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.responses.create(model=MODEL, input=[{"role": "robot", "content": "x"}])  # type: ignore[list-item]
    assert info.value.code == "invalid_value"
    raw = httpx.post(f"{server.base_url}/responses", content=b"{nope")
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    assert raw.headers["x-request-id"].startswith("req_")
    assert httpx.get(f"{server.base_url}/nowhere").status_code == 404


def test_a_prompt_template_is_refused_with_what_to_do(server: RunningServer) -> None:
    """The built-in model cannot read a template stored at OpenAI: `prompt` is a 400
    that says what to send instead, not silently ignored (the request would go on
    without the template's instructions). Its shape is still checked first. The
    same for `moderation`."""
    sdk = client(server)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(prompt={"id": "pmpt_1", "variables": {"name": "Ada"}}, input="hi")
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter", "prompt")
    assert "'instructions'" in refused.value.message
    with pytest.raises(openai.BadRequestError) as malformed:
        sdk.responses.create(model=MODEL, prompt={"version": "2"}, input="hi")  # type: ignore[typeddict-item]
    assert malformed.value.param == "prompt.id"
    # Nor does it moderate: a `block` policy is refused, not ignored.
    with pytest.raises(openai.BadRequestError) as unmoderated:
        sdk.responses.create(
            model=MODEL,
            input="hi",
            moderation={"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}}},
        )
    assert (unmoderated.value.param, unmoderated.value.code) == (
        "moderation",
        "unsupported_parameter",
    )
    # `access_programs` only selects what OpenAI allows: nothing to refuse here.
    allowed = sdk.responses.create(model=MODEL, input="hi", access_programs={"cyber": "standard"})
    assert allowed.output_text == "You said: hi"


def test_http_store_false_is_not_retrievable(server: RunningServer) -> None:
    sdk = client(server)
    response = sdk.responses.create(model=MODEL, input="zdr", store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError):
        sdk.responses.create(model=MODEL, input="x", previous_response_id=response.id)


def test_http_streaming_events_match_sdk_types(server: RunningServer) -> None:
    sdk = client(server)
    events = list(sdk.responses.create(model=MODEL, input="stream me", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # Raw SSE framing: event: / data: lines, flat shapes, no [DONE].
    with httpx.stream(
        "POST",
        f"{server.base_url}/responses",
        json={"model": MODEL, "input": "raw", "stream": True},
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in raw.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert len(names) == len(payloads) and "[DONE]" not in lines
    for name, payload in zip(names, payloads, strict=True):
        assert payload["type"] == name
        check_sse_event(payload)


def test_http_stream_helper_accepts_our_ordering(server: RunningServer) -> None:
    sdk = client(server)
    with sdk.responses.stream(model=MODEL, input="helper") as stream:
        for _event in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == "You said: helper"
    with sdk.responses.stream(
        model=MODEL,
        input='/call read_file {"path": "a.py"}',
        tools=FUNCTION_TOOLS,  # type: ignore[arg-type]
    ) as stream:
        final = stream.get_final_response()
    assert final.output[0].type == "function_call"


def test_stream_helper_with_a_reasoning_item(server: RunningServer) -> None:
    # The SDK's stream state folds the reasoning summary events into its snapshot.
    sdk = client(server)
    with sdk.responses.stream(model=MODEL, input="/think Brief.\nhi") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.reasoning_summary_text.delta" in kinds
    reasoning = final.output[0]
    assert reasoning.type == "reasoning"
    assert [part.text for part in reasoning.summary] == ["Brief."]
    assert final.output_text == "You said: /think Brief.\nhi"


def test_stream_helper_with_a_web_search(server: RunningServer) -> None:
    # The SDK's stream state takes the hosted tool's progress events and the call's
    # item into its snapshot, typed.
    sdk = client(server)
    with sdk.responses.stream(
        model=MODEL, input="/search warm caches\n/reply Found.", tools=[{"type": "web_search"}]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds.index("response.web_search_call.searching") < kinds.index(
        "response.output_text.delta"
    )
    search = final.output[0]
    assert search.type == "web_search_call" and search.status == "completed"
    assert search.action.type == "search" and search.action.query == "warm caches"
    assert final.output_text == "Found."
    message = final.output[1]
    assert message.type == "message" and message.content[0].type == "output_text"
    (citation,) = message.content[0].annotations
    assert citation.type == "url_citation" and citation.title == "Results for warm caches"


def test_an_answer_over_max_output_tokens_ends_incomplete(server: RunningServer) -> None:
    """The built-in model counts four characters a token, as its usage does: an
    answer longer than `max_output_tokens` is cut there, the message and the response
    are `incomplete` (reason `max_output_tokens`) over HTTP, SSE and WebSocket, the
    response is stored as it ended, and the chain goes on from it."""
    sdk = client(server)
    long_input = "word " * 100
    full = sdk.responses.create(model=MODEL, input=long_input).output_text
    cut = sdk.responses.create(model=MODEL, input=long_input, max_output_tokens=16)
    assert (cut.status, cut.incomplete_details and cut.incomplete_details.reason) == (
        "incomplete",
        "max_output_tokens",
    )
    assert cut.output[0].type == "message" and cut.output[0].status == "incomplete"
    assert full.startswith(cut.output_text) and len(cut.output_text) == 16 * 4
    assert cut.usage is not None and cut.usage.output_tokens == 16
    stored = sdk.responses.retrieve(cut.id)
    assert stored.model_dump() == cut.model_dump()
    after = sdk.responses.create(model=MODEL, input="/transcript", previous_response_id=cut.id)
    assert after.status == "completed"
    assert f"assistant: {cut.output_text}" in after.output_text.splitlines()
    # Short enough: completed, as before.
    fits = sdk.responses.create(model=MODEL, input="hi", max_output_tokens=16)
    assert fits.status == "completed" and fits.incomplete_details is None
    # A call's arguments are cut too, the call incomplete.
    call = '/call read_file {"path": "' + "a" * 200 + '"}'
    called = sdk.responses.create(
        model=MODEL, input=call, tools=FUNCTION_TOOLS, max_output_tokens=16
    )
    assert called.status == "incomplete"
    assert called.output[0].type == "function_call" and called.output[0].status == "incomplete"
    # (The SDK's stream helper has a final response only for `response.completed`.)
    with sdk.responses.stream(model=MODEL, input=long_input, max_output_tokens=16) as stream:
        streamed = list(stream)
    assert streamed[-1].type == "response.incomplete"
    assert streamed[-1].response.output_text == cut.output_text
    with sdk.responses.connect() as connection:
        connection.response.create(model=MODEL, input=long_input, max_output_tokens=16)
        events = []
        for event in connection:
            events.append(event.model_dump(mode="json", exclude_unset=True, warnings=False))
            if event.type in ("response.completed", "response.incomplete", "error"):
                break
    for payload in events:
        check_ws_event(payload)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_the_built_in_model_gives_log_probabilities(server: RunningServer) -> None:
    """Asked for (`include: ["message.output_text.logprobs"]`, `top_logprobs`), the
    built-in model gives each text delta deterministic log probabilities
    (`mockmodel.text_logprobs`): in the deltas, all of them in the text's `.done`,
    and in the stored message's part with each token's `bytes`, over SSE, HTTP and
    WebSocket (every event checked against the SDK's types). Cut at
    `max_output_tokens`, they are the cut text's. Not asked for: none."""
    sdk = client(server)
    asked: dict[str, Any] = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    with httpx.stream(
        "POST",
        f"{server.base_url}/responses",
        json={"model": MODEL, "input": "two words", "stream": True, **asked},
        headers={"Authorization": "Bearer sk-test"},  # the SDK's key: the same owner
    ) as raw:
        payloads = [json.loads(line[6:]) for line in raw.iter_lines() if line.startswith("data: ")]
    for payload in payloads:
        check_sse_event(payload)
    deltas = [p for p in payloads if p["type"] == "response.output_text.delta"]
    expected = [mockmodel.text_logprobs(d["delta"], 2) for d in deltas]
    assert [d["logprobs"] for d in deltas] == expected and len(expected) > 1
    (done,) = [p for p in payloads if p["type"] == "response.output_text.done"]
    flat = [entry for entries in expected for entry in entries]
    assert done["logprobs"] == flat
    part = payloads[-1]["response"]["output"][0]["content"][0]
    with_bytes = [
        {
            **entry,
            "bytes": list(entry["token"].encode()),
            "top_logprobs": [
                {**top, "bytes": list(top["token"].encode())} for top in entry["top_logprobs"]
            ],
        }
        for entry in flat
    ]
    assert part["logprobs"] == with_bytes
    stored = sdk.responses.retrieve(payloads[-1]["response"]["id"])
    stored_part = stored.output[0].content[0]  # type: ignore[union-attr]
    assert [lp.model_dump() for lp in stored_part.logprobs or ()] == with_bytes  # type: ignore[union-attr]
    # Cut at the limit: the log probabilities are the cut text's.
    cut = sdk.responses.create(model=MODEL, input="word " * 100, max_output_tokens=16, **asked)
    cut_part = cut.output[0].content[0]  # type: ignore[union-attr]
    assert "".join(lp.token for lp in cut_part.logprobs or ()) == cut.output_text  # type: ignore[union-attr]
    with sdk.responses.connect() as connection:
        connection.response.create(model=MODEL, input="over websocket", **asked)
        events = []
        for event in connection:
            events.append(event.model_dump(mode="json", exclude_unset=True, warnings=False))
            if event.type in ("response.completed", "error"):
                break
        connection.response.create(model=MODEL, input="not asked")
        plain = []
        for event in connection:
            plain.append(event.model_dump(mode="json", exclude_unset=True, warnings=False))
            if event.type in ("response.completed", "error"):
                break
    for payload in events:
        check_ws_event(payload)
    ws_deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [d["logprobs"] for d in ws_deltas] == [
        mockmodel.text_logprobs(d["delta"], 2) for d in ws_deltas
    ]
    assert all(e["logprobs"] == [] for e in plain if e["type"] == "response.output_text.delta")
    assert plain[-1]["response"]["output"][0]["content"][0]["logprobs"] == []


class Weather(BaseModel):
    city: str
    sky: str


def test_structured_output_with_parse(server: RunningServer) -> None:
    # `responses.parse` sends `text.format` (a JSON schema) and parses the output text.
    sdk = client(server)
    answer = '/reply {"city": "Lima", "sky": "sunny"}'
    parsed = sdk.responses.parse(model=MODEL, input=answer, text_format=Weather)
    assert parsed.output_parsed == Weather(city="Lima", sky="sunny")
    assert parsed.text is not None and parsed.text.format is not None
    assert parsed.text.format.type == "json_schema" and parsed.text.format.name == "Weather"
    # After a tool call, chained: the answer comes once the output is back.
    first = sdk.responses.parse(
        model=MODEL,
        input=f'/call get_weather {{"city": "Lima"}}\n{answer}',
        tools=FUNCTION_TOOLS,  # type: ignore[arg-type]
        text_format=Weather,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert first.output_parsed is None
    second = sdk.responses.parse(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=FUNCTION_TOOLS,  # type: ignore[arg-type]
        text_format=Weather,
    )
    assert second.output_parsed == Weather(city="Lima", sky="sunny")


def test_http_failure_is_a_failed_response(server: RunningServer) -> None:
    sdk = client(server)
    events = list(sdk.responses.create(model=MODEL, input="/fail", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None  # type: ignore[union-attr]
    assert events[-1].response.error.code == "server_error"  # type: ignore[union-attr]


# -- WebSocket mode: raw connection ---------------------------------------------------------


def test_sync_connect_tool_loop(server: RunningServer) -> None:
    sdk = client(server)
    with sdk.responses.connect() as connection:
        connection.response.create(
            model=MODEL,
            input='/call get_weather {"city": "Rome"}',
            tools=FUNCTION_TOOLS,  # type: ignore[arg-type]
        )
        call = None
        for event in connection:
            check_ws_event(event.model_dump(mode="json", exclude_unset=True))
            if event.type == "response.output_item.done" and event.item.type == "function_call":
                call = event.item
            if event.type == "response.completed":
                first = event.response
                break
        assert call is not None and call.name == "get_weather"
        connection.response.create(
            model=MODEL,
            previous_response_id=first.id,
            tools=FUNCTION_TOOLS,  # type: ignore[arg-type]
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "warm"}],
        )
        for event in connection:
            if event.type == "response.completed":
                assert event.response.output_text == "get_weather returned: warm"
                break


def test_async_connect_streams_and_reports_errors(server: RunningServer) -> None:
    async def main() -> None:
        async with aclient(server) as sdk, sdk.responses.connect() as connection:
            await connection.response.create(model=MODEL, input="x", previous_response_id="resp_no")
            event = await connection.recv()
            assert event.type == "error"
            assert event.error.code == "previous_response_not_found"  # type: ignore[union-attr]
            await connection.response.create(model=MODEL, input="after error")
            deltas = []
            async for event in connection:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                if event.type == "response.completed":
                    break
            assert "".join(deltas) == "You said: after error"

    asyncio.run(main())


# -- WebSocket mode: the lanes helper -------------------------------------------------------


def test_lanes_concurrent_fork_and_warmup(any_backend: RunningServer) -> None:
    server = any_backend

    async def main() -> None:
        async with (
            aclient(server) as sdk,
            sdk.responses.connect(websocket_connection_options={"max_size": None}) as connection,
            AsyncResponsesWebSocketSession(connection, limits=LIMITS) as session,
        ):
            planner = session.lane("planner")
            coder = session.lane("coder")
            # Warm-up on one lane: instructions and tools primed, no output.
            await planner.send(
                {
                    "type": "response.create",
                    "model": MODEL,
                    "generate": False,
                    "instructions": "plan",
                    "tools": FUNCTION_TOOLS,
                    "store": False,
                }
            )
            warm = await planner.get_final_response()
            assert warm.status == "completed" and warm.output == []
            # Two lanes at once; the slow one does not block the fast one.
            await planner.send(
                {
                    "type": "response.create",
                    "model": MODEL,
                    "store": False,
                    "previous_response_id": warm.id,
                    "instructions": "plan",
                    "input": "/sleep 300\nslow plan",
                }
            )
            await coder.send(
                {"type": "response.create", "model": MODEL, "input": "quick", "store": False}
            )
            quick = await asyncio.wait_for(coder.get_final_response(), 5)
            plan = await asyncio.wait_for(planner.get_final_response(), 5)
            assert quick.output_text == "You said: quick"
            assert plan.output_text == "You said: /sleep 300\nslow plan"
            # Fork the planner's response onto a new lane.
            fork = session.lane("reviewer")
            await fork.send(
                {
                    "type": "response.create",
                    "model": MODEL,
                    "store": False,
                    "previous_response_id": plan.id,
                    "input": "/transcript",
                }
            )
            forked = await fork.get_final_response()
            assert forked.output_text.splitlines() == [
                "user: /sleep 300",
                "slow plan",
                "assistant: You said: /sleep 300",
                "slow plan",
                "user: /transcript",
            ]
            # A request error on a lane is raised on that lane only.
            await coder.send(
                {
                    "type": "response.create",
                    "model": MODEL,
                    "input": "x",
                    "previous_response_id": "resp_missing",
                }
            )
            with pytest.raises(ResponsesWebSocketError):
                await coder.get_final_response()
            await coder.send({"type": "response.create", "model": MODEL, "input": "again"})
            assert (await coder.get_final_response()).output_text == "You said: again"

    asyncio.run(main())


def test_a_create_that_is_not_valid_json_is_refused_on_its_lane(server: RunningServer) -> None:
    """The SDK serialises a NaN as `NaN` and a lone surrogate (a filename decoded with
    surrogateescape) as `\\ud800`: not valid JSON for the server. The error must come on
    the create's lane: on the default lane the named lane waited for ever, and every
    later send on it failed ("Consume the current response...")."""

    async def main() -> None:
        async with (
            aclient(server) as sdk,
            sdk.responses.connect() as connection,
            AsyncResponsesWebSocketSession(connection, limits=LIMITS) as session,
        ):
            lane = session.lane("a")
            for bad in ({"temperature": float("nan")}, {"input": "file \udcff.txt"}):
                await lane.send({"type": "response.create", "model": MODEL, "input": "x", **bad})
                with pytest.raises(ResponsesWebSocketError) as info:
                    await asyncio.wait_for(lane.get_final_response(), 5)
                assert info.value.event.error.code == "invalid_json"  # type: ignore[union-attr]
            await lane.send({"type": "response.create", "model": MODEL, "input": "fine"})
            done = await asyncio.wait_for(lane.get_final_response(), 5)
            assert done.output_text == "You said: fine"

    asyncio.run(main())


CUSTOM_TOOLS = [{"type": "custom", "name": "apply_patch", "description": "Apply a patch."}]


def test_custom_tool_loop_over_websocket(any_backend: RunningServer) -> None:
    # A custom (freeform) tool, as Codex's apply_patch on GPT-5: the call carries free
    # text, its output continues the chain. Chat Completions has no custom tools, so
    # warmsocket leaves them out there and the model says it cannot call one.
    sdk = client(any_backend)
    patch = "*** Begin Patch\n*** Update File: a.py\n*** End Patch"
    prompt = "/custom apply_patch " + patch.replace("\n", " ")
    with sdk.responses.connect() as connection:
        connection.response.create(model=MODEL, input=prompt, tools=CUSTOM_TOOLS)  # type: ignore[arg-type]
        first = _completed(connection)
        if first.output[-1].type != "custom_tool_call":
            assert first.output_text == (
                "Cannot call apply_patch: it is not one of this request's custom tools."
            )
            assert any_backend.server.engine.backend.name == "upstream-chat"
            return
        call = first.output[-1]
        assert (call.name, call.input) == ("apply_patch", patch.replace("\n", " "))
        connection.response.create(
            model=MODEL,
            previous_response_id=first.id,
            input=[{"type": "custom_tool_call_output", "call_id": call.call_id, "output": "done"}],
            tools=CUSTOM_TOOLS,  # type: ignore[arg-type]
        )
        second = _completed(connection)
    assert second.output_text == "apply_patch returned: done"


def _completed(connection: Any) -> Any:
    """The Response of the next terminal event on a `responses.connect()` connection;
    every event was parsed into the SDK's types on the way."""
    for event in connection:
        if event.type == "response.completed":
            return event.response
        assert event.type not in ("error", "response.failed"), event
    raise AssertionError("the connection closed")
