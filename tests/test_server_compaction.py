"""Server-side compaction (`context_management`): a turn whose context reaches the
threshold starts with a self-contained compaction item, the model answers from it,
the chain goes on from it (by id, or re-sent whole), and it is never stored more
widely than the state it was made from."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI

from tests.support import (
    FUNCTION_TOOLS,
    RunningServer,
    WSClient,
    check_sequence,
    output_text,
    running_server,
)
from warmsocket import errors
from warmsocket._core import Items
from warmsocket.backends.base import StreamItem, TextDelta, TurnContext, TurnFailed, UsageReport
from warmsocket.backends.mock import MockBackend
from warmsocket.compaction import last_turn_start
from warmsocket.compaction_items import (
    CONTENT_PREFIX,
    PROMPT,
    SUMMARY_HEADER,
    Compacted,
    encode_content,
    starts_context,
    unpack,
)
from warmsocket.engine import context_start, estimate_tokens

MODEL = "warmsocket-mock"
THRESHOLD = 1000  # the API's minimum
COMPACT = [{"type": "compaction", "compact_threshold": THRESHOLD}]
LONG = " ".join(f"word{i}" for i in range(600))  # past the threshold on its own


def compacted_item(item: dict[str, Any]) -> Compacted:
    compacted = unpack(item)
    assert compacted is not None and compacted.self_contained, item
    return compacted


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [
        content if isinstance(content, str) else "".join(part["text"] for part in content)
        for content in (message["content"] for message in messages)
    ]


def in_place(server: RunningServer, summary: str) -> str:
    """How a transcript shows a summary: the built-in model reads the item; an
    upstream got a user message."""
    if server.server.engine.backend.name == "mock":
        return "compaction: " + summary
    return "user: " + SUMMARY_HEADER + summary


def test_a_chain_compacts_at_the_threshold_over_websocket(any_backend: RunningServer) -> None:
    with WSClient(any_backend.ws_url) as ws:
        first = ws.turn(input="Start the task.", context_management=COMPACT)
        assert [item["type"] for item in first[-1]["response"]["output"]] == ["message"]
        first_id = first[-1]["response"]["id"]
        second = ws.turn(input=LONG, previous_response_id=first_id, context_management=COMPACT)
        check_sequence(second)
        added, compacting, done = second[2:5]
        assert [added["type"], compacting["type"], done["type"]] == [
            "response.output_item.added",
            "response.compaction.compacting",
            "response.output_item.done",
        ]
        item_id = added["item"]["id"]
        assert added["item"]["type"] == "compaction" and added["output_index"] == 0
        assert (compacting["item_id"], compacting["output_index"]) == (item_id, 0)
        assert done["item"]["id"] == item_id and done["output_index"] == 0
        compacted = compacted_item(done["item"])
        # The user messages before the summary; the last response's output and this
        # turn's input kept as they are after it.
        assert texts(compacted.before or []) == ["Start the task."]
        assert [item["role"] for item in compacted.after] == ["assistant", "user"]
        assert texts(compacted.after) == ["You said: Start the task.", LONG]
        assert "user: Start the task." in compacted.summary
        # The model answered from the compaction item; the response holds both.
        response = second[-1]["response"]
        assert [item["type"] for item in response["output"]] == ["compaction", "message"]
        assert response["output"][0] == done["item"]
        assert output_text(second) == "You said: " + LONG
        assert response["previous_response_id"] == first_id
        # The chain goes on from the compaction item: what came before is not re-read.
        third = ws.turn(input="/transcript", previous_response_id=response["id"])
    assert output_text(third) == "\n".join(
        [
            "user: Start the task.",
            in_place(any_backend, compacted.summary),
            "assistant: You said: Start the task.",
            f"user: {LONG}",
            f"assistant: You said: {LONG}",
            "user: /transcript",
        ]
    )


TRIGGER = [{"type": "compaction_trigger"}]


def test_a_compaction_trigger_compacts_the_context_and_nothing_else(
    any_backend: RunningServer,
) -> None:
    """A create whose input ends with a `compaction_trigger` item: its context (the
    trigger left out) is compacted, the compaction item is the whole output, the
    model does not answer, and the chain goes on from the item. The trigger reaches
    no upstream (a Responses upstream refuses one that is not the last item)."""
    with WSClient(any_backend.ws_url) as ws:
        first = ws.turn(input="Start the task.")
        second = ws.turn(input="Go on.", previous_response_id=first[-1]["response"]["id"])
        second_id = second[-1]["response"]["id"]
        third = ws.turn(input=TRIGGER, previous_response_id=second_id)
        check_sequence(third)
        assert [event["type"] for event in third] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.compaction.compacting",
            "response.output_item.done",
            "response.completed",
        ]
        response = third[-1]["response"]
        assert [item["type"] for item in response["output"]] == ["compaction"]
        assert response["previous_response_id"] == second_id
        compacted = compacted_item(response["output"][0])
        # The user messages before the summary; the last response's output after it.
        assert texts(compacted.before or []) == ["Start the task.", "Go on."]
        assert texts(compacted.after) == ["You said: Go on."]
        assert "compaction_trigger" not in compacted.summary
        fourth = ws.turn(input="/transcript", previous_response_id=response["id"])
    assert output_text(fourth).splitlines() == [
        "user: Start the task.",
        "user: Go on.",
        *in_place(any_backend, compacted.summary).splitlines(),
        "assistant: You said: Go on.",
        "user: /transcript",
    ]
    with httpx.Client(base_url=any_backend.base_url) as http:  # (the same owner: no key)
        listed = http.get(f"responses/{response['id']}/input_items").json()["data"]
        stored = http.get(f"responses/{response['id']}").json()
    assert [item["type"] for item in listed] == ["compaction_trigger"]
    assert stored == response
    if any_backend.server.engine.backend.name == "mock":  # (an upstream counts its own)
        assert response["usage"]["output_tokens"] == estimate_tokens(len(compacted.summary))


def test_a_compaction_trigger_must_be_the_last_input_item(server: RunningServer) -> None:
    misplaced = [*TRIGGER, {"role": "user", "content": "x"}]
    with WSClient(server.ws_url) as ws:
        ws.create(input=misplaced, stream_id="s")
        error = ws.recv()
        assert output_text(ws.turn(input="still here")) == "You said: still here"
    assert (error["type"], error["stream_id"], error["error"]["param"]) == (
        "error",
        "s",
        "input[0].type",
    )
    assert "final input item" in error["error"]["message"]
    with httpx.Client(base_url=server.base_url) as http:
        refused = http.post("responses", json={"model": MODEL, "input": misplaced})
        made = http.post("conversations", json={"items": TRIGGER})
        alone = http.post("responses", json={"model": MODEL, "input": TRIGGER})
        hello = [{"role": "user", "content": "hello"}]
        window = http.post("responses/compact", json={"model": MODEL, "input": hello + TRIGGER})
    assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_value")
    assert (made.status_code, made.json()["error"]["param"]) == (400, "items[0].type")
    # Nothing before it: refused before any model runs (the summary turn failed).
    assert (alone.status_code, alone.json()["error"]["param"]) == (400, "input")
    assert alone.json()["error"]["message"].startswith("Nothing to compact")
    # The compact endpoint compacts anyway: a trigger at the end is no part of the context.
    output = window.json()["output"]
    assert [item["type"] for item in output] == ["message", "compaction"]
    unpacked = unpack(output[1])
    assert unpacked is not None and unpacked.summary == "user: hello"


def test_a_compaction_trigger_compacts_a_conversation(sdk: OpenAI) -> None:
    """The trigger and the compaction item are added to the conversation; its next
    response reads the context from the compaction item on."""
    conversation = sdk.conversations.create(items=[{"role": "user", "content": "Start."}])
    sdk.responses.create(model=MODEL, input="Go on.", conversation=conversation.id)
    compacted = sdk.responses.create(
        model=MODEL,
        input=TRIGGER,  # type: ignore[arg-type]
        conversation=conversation.id,
    )
    assert [item.type for item in compacted.output] == ["compaction"]
    listed = sdk.conversations.items.list(conversation.id, order="asc").data
    assert [item.type for item in listed][-2:] == ["compaction_trigger", "compaction"]
    after = sdk.responses.create(model=MODEL, input="/transcript", conversation=conversation.id)
    lines = after.output_text.splitlines()
    assert lines[:2] == ["user: Start.", "user: Go on."]
    assert lines[2].startswith("compaction: ")
    assert lines[-2:] == ["assistant: You said: Go on.", "user: /transcript"]


def test_tools_a_developer_added_outlive_a_compaction(sdk: OpenAI) -> None:
    """An `additional_tools` item is kept verbatim through a compaction, as the user
    messages are: summarised away, the tools it added could no longer be called."""
    added = {"type": "additional_tools", "role": "developer", "tools": FUNCTION_TOOLS}
    first = sdk.responses.create(
        model=MODEL,
        input=[added, {"role": "user", "content": "Start."}],  # type: ignore[list-item]
    )
    compacted = sdk.responses.create(
        model=MODEL,
        input=TRIGGER,  # type: ignore[arg-type]
        previous_response_id=first.id,
    )
    item = compacted.output[0].model_dump(exclude_none=True)
    kept = compacted_item(item).before or []
    assert [entry["type"] for entry in kept] == ["additional_tools", "message"]
    assert kept[0]["tools"] == FUNCTION_TOOLS and kept[0]["id"].startswith("at_")
    after = sdk.responses.create(
        model=MODEL, input="/transcript", previous_response_id=compacted.id
    )
    assert after.output_text.splitlines()[:2] == ["additional_tools", "user: Start."]
    window = sdk.responses.compact(model=MODEL, previous_response_id=first.id)
    assert [entry.type for entry in window.output] == ["additional_tools", "message", "compaction"]
    # Made by a developer, not a model: a history that ends with one after a user
    # message is that user's turn (it was read as the model's answer, kept whole).
    user = {"type": "message", "role": "user", "content": "a"}
    assert last_turn_start([user, added, {**user, "content": "b"}]) == 2
    assert last_turn_start([user, {"type": "program", "call_id": "p"}, user]) == 1


def test_programmatic_tool_calling_items_and_additional_tools_are_input(sdk: OpenAI) -> None:
    """Items of the API's input union warmsocket does not make itself are kept and
    listed as sent (they were refused as an unknown item type)."""
    items: list[Any] = [
        {"type": "additional_tools", "role": "developer", "tools": FUNCTION_TOOLS},
        {"type": "program", "id": "cm_1", "call_id": "p1", "code": "f()", "fingerprint": "x"},
        {
            "type": "program_output",
            "id": "cmo_1",
            "call_id": "p1",
            "result": "done",
            "status": "completed",
        },
        {"role": "user", "content": "/transcript"},
    ]
    made = sdk.responses.create(model=MODEL, input=items)
    listed = sdk.responses.input_items.list(made.id, order="asc").data
    assert made.output_text.splitlines() == [
        "additional_tools",
        "program",
        "program_output",
        "user: /transcript",
    ]
    assert [item.type for item in listed] == [
        "additional_tools",
        "program",
        "program_output",
        "message",
    ]


def test_below_the_threshold_nothing_changes(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        events = ws.turn(input="hello", context_management=COMPACT)
        again = ws.turn(
            input="/transcript",
            previous_response_id=events[-1]["response"]["id"],
            context_management=[{"type": "compaction"}],  # the default threshold: 100k
        )
    assert [event["type"] for event in events].count("response.compaction.compacting") == 0
    assert output_text(again) == "user: hello\nassistant: You said: hello\nuser: /transcript"


def test_a_bad_context_management_is_refused_as_the_api_refuses_it(server: RunningServer) -> None:
    """The API's schema: a non-empty array of `compaction` entries whose threshold is an
    integer of at least 1,000. A threshold below it is refused, not used, over HTTP and
    over WebSocket (where the connection stays usable)."""
    below = [{"type": "compaction", "compact_threshold": 500}]
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.responses.create(model=MODEL, input="hi", context_management=below)  # type: ignore[list-item]
        with pytest.raises(openai.BadRequestError) as unknown:
            sdk.responses.create(
                model=MODEL,
                input="hi",
                context_management=[{"type": "truncate"}],  # type: ignore[list-item]
            )
    body = refused.value.body
    assert isinstance(body, dict)
    assert (refused.value.code, body["param"]) == (
        "invalid_value",
        "context_management[0].compact_threshold",
    )
    assert "Expected a value >= 1000, but got 500" in refused.value.message
    assert unknown.value.code == "invalid_value"
    with WSClient(server.ws_url) as ws:
        error = ws.turn(input="hi", context_management=[])[-1]
        assert error["type"] == "error" and error["status"] == 400
        assert (error["error"]["code"], error["error"]["param"]) == (
            "invalid_value",
            "context_management",
        )
        assert output_text(ws.turn(input="hi", context_management=COMPACT)) == "You said: hi"


def test_a_resent_history_starts_at_the_compaction_item(server: RunningServer) -> None:
    """The stateless pattern (store=false, the whole history every turn): the server
    reads the context from the last compaction item on, as OpenAI tells such clients
    to cut it themselves."""
    sdk = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    history: list[Any] = [{"role": "user", "content": "Start the task."}]
    first = sdk.responses.create(
        model=MODEL, input=history, store=False, context_management=COMPACT
    )
    history += [item.model_dump(exclude_none=True) for item in first.output]
    history.append({"role": "user", "content": LONG})
    second = sdk.responses.create(
        model=MODEL, input=history, store=False, context_management=COMPACT
    )
    assert [item.type for item in second.output] == ["compaction", "message"]
    history += [item.model_dump(exclude_none=True) for item in second.output]
    history.append({"role": "user", "content": "/transcript"})
    third = sdk.responses.create(model=MODEL, input=history, store=False)
    sdk.close()
    summary = compacted_item(history[3]).summary
    assert third.output_text.splitlines()[:2] == [
        "user: Start the task.",
        "compaction: user: Start the task.",
    ]
    assert third.output_text.endswith(
        f"user: {LONG}\nassistant: You said: {LONG}\nuser: /transcript"
    )
    assert third.output_text.count("user: Start the task.") == 2  # the line and the summary's
    assert summary.splitlines()[0] == "user: Start the task."


class SlowSummary(MockBackend):
    """The built-in model, taking its time over a summary."""

    async def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        if PROMPT.encode() in turn.view.tail():
            await asyncio.sleep(0.3)
        async for item in super().stream(turn):
            yield item


def test_a_triggered_compaction_cannot_be_steered() -> None:
    """It has no answer for steering to join: refused as for `context_management`."""
    with running_server(backend=SlowSummary()) as server, WSClient(server.ws_url) as ws:
        first = ws.turn(input="Start the task.")
        ws.create(input=TRIGGER, previous_response_id=first[-1]["response"]["id"])
        rid = ws.recv()["response"]["id"]
        ws.send({"type": "response.steer", "previous_response_id": rid, "input": "faster"})
        events = ws.until_terminal()
    failed = next(event for event in events if event["type"] == "response.steer.failed")
    assert failed["error"]["code"] == "steering_not_supported"
    assert "compaction_trigger" in failed["error"]["message"]
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["compaction"]


def test_a_compacting_response_cannot_be_steered(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        ws.create(input="/sleep 300\nhello", context_management=COMPACT)
        rid = ws.recv()["response"]["id"]
        ws.send({"type": "response.steer", "previous_response_id": rid, "input": "faster"})
        events = ws.until_terminal()
    failed = next(event for event in events if event["type"] == "response.steer.failed")
    assert failed["error"]["code"] == "steering_not_supported"
    assert failed["steer"]["input"] == "faster"
    assert output_text(events) == "You said: /sleep 300\nhello"


def test_compaction_of_unstored_state_is_not_stored(server: RunningServer) -> None:
    """A stored response built on connection-local (store=false) state stays on the
    connection; compaction makes a new chain, which must not change that."""
    with WSClient(server.ws_url) as ws:
        local = ws.turn(input="a secret plan", store=False)
        compacted = ws.turn(
            input=LONG,
            previous_response_id=local[-1]["response"]["id"],
            context_management=COMPACT,
        )
        rid = compacted[-1]["response"]["id"]
        assert compacted[-1]["response"]["output"][0]["type"] == "compaction"
        with httpx.Client(base_url=server.base_url) as http:
            assert http.get(f"responses/{rid}").status_code == 404
        again = ws.turn(input="/transcript", previous_response_id=rid)
    assert output_text(again).startswith("user: a secret plan\ncompaction: ")


def test_a_stored_compacted_response_is_retrievable(server: RunningServer) -> None:
    sdk = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    first = sdk.responses.create(model=MODEL, input="Start.", tools=FUNCTION_TOOLS)  # type: ignore[arg-type]
    second = sdk.responses.create(
        model=MODEL, input=LONG, previous_response_id=first.id, context_management=COMPACT
    )
    stored = sdk.responses.retrieve(second.id)
    assert [item.type for item in stored.output] == ["compaction", "message"]
    # As it was created: its chain in the cache starts at the compaction item, but it
    # names the previous response the client named.
    assert stored.previous_response_id == first.id
    assert stored.model_dump() == second.model_dump()
    # Its input went into the compaction item; it lists what the client sent.
    listed = sdk.responses.input_items.list(second.id).data
    assert [(item.type, item.role) for item in listed] == [("message", "user")]  # type: ignore[union-attr]
    assert listed[0].content[0].text == LONG  # type: ignore[union-attr]
    # A window made from it keeps the user messages the item holds.
    window = sdk.responses.compact(model=MODEL, previous_response_id=second.id)
    user_texts = [
        part.text
        for item in window.output
        if item.type == "message"
        for part in item.content  # type: ignore[union-attr]
    ]
    assert user_texts == ["Start.", LONG]
    try:
        sdk.responses.create(model=MODEL, input="x", previous_response_id=second.id)
    except openai.APIError as error:  # pragma: no cover - a failure to report
        raise AssertionError(error) from None
    finally:
        sdk.close()


class SummaryFails(MockBackend):
    """The built-in model, failing whenever it is asked for a summary."""

    async def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        if PROMPT.encode() in turn.view.tail():
            yield TurnFailed(errors.model_failed())
            return
        async for item in super().stream(turn):
            yield item


def test_a_compacted_resent_history_lists_what_the_client_sent(server: RunningServer) -> None:
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        history: list[Any] = [{"role": "user", "content": "Start the task."}]
        first = sdk.responses.create(model=MODEL, input=history)
        history += [item.model_dump(exclude_none=True) for item in first.output]
        history.append({"role": "user", "content": LONG})
        second = sdk.responses.create(model=MODEL, input=history, context_management=COMPACT)
        assert [item.type for item in second.output] == ["compaction", "message"]
        stored = sdk.responses.retrieve(second.id)
        listed = sdk.responses.input_items.list(second.id, order="asc").data
    assert stored.previous_response_id is None
    assert stored.model_dump() == second.model_dump()
    assert [item.id for item in listed][1] == first.output[0].id
    assert [item.role for item in listed] == ["user", "assistant", "user"]  # type: ignore[union-attr]
    assert listed[2].content[0].text == LONG  # type: ignore[union-attr]


def test_a_failed_summary_fails_the_response_and_keeps_the_chain() -> None:
    with running_server(backend=SummaryFails()) as server, WSClient(server.ws_url) as ws:
        first = ws.turn(input="Start the task.")
        first_id = first[-1]["response"]["id"]
        failed = ws.turn(input=LONG, previous_response_id=first_id, context_management=COMPACT)
        assert [event["type"] for event in failed][2:4] == [
            "response.output_item.added",
            "response.compaction.compacting",
        ]
        assert failed[-1]["type"] == "response.failed"
        assert failed[-1]["response"]["error"]["code"] == "server_error"
        # Nothing of the failed turn is kept; the chain it continued is as it was.
        again = ws.turn(input="/transcript", previous_response_id=first_id)
        assert output_text(again) == (
            "user: Start the task.\nassistant: You said: Start the task.\nuser: /transcript"
        )
        sdk = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        parent = sdk.responses.create(model=MODEL, input="Start the task.")
        with pytest.raises(openai.APIStatusError) as refused:
            sdk.responses.compact(model=MODEL, previous_response_id=parent.id)
        sdk.close()
    assert refused.value.status_code == 500
    assert "The model failed" in refused.value.message


def test_the_summary_turn_is_in_the_usage(server: RunningServer) -> None:
    """A compacting response's usage is its answer's and its summary's, each counted
    by warmsocket's accounting here (the built-in model reports none)."""
    sdk = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    first = sdk.responses.create(model=MODEL, input="Start the task.", instructions="Be brief.")
    count = sdk.responses.input_tokens.count
    context = count(
        model=MODEL, previous_response_id=first.id, input=LONG, instructions="Be brief."
    ).input_tokens
    cached = count(
        model=MODEL, previous_response_id=first.id, instructions="Be brief."
    ).input_tokens
    prompt = count(model=MODEL, input=[{"role": "user", "content": PROMPT}]).input_tokens
    second = sdk.responses.create(
        model=MODEL,
        input=LONG,
        previous_response_id=first.id,
        instructions="Be brief.",
        context_management=COMPACT,
    )
    item = second.output[0].model_dump(exclude_none=True)
    answer = count(model=MODEL, input=[item], instructions="Be brief.").input_tokens
    stored = sdk.responses.retrieve(second.id)
    sdk.close()
    summary = compacted_item(item).summary
    usage = second.usage
    assert usage is not None and stored.usage == usage
    assert usage.input_tokens == context + prompt + answer
    assert usage.input_tokens_details.cached_tokens == cached  # the summary's prefix
    assert usage.output_tokens == estimate_tokens(len(summary)) + estimate_tokens(
        len(second.output_text)
    )
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


class ReportsUsage(MockBackend):
    """The built-in model, reporting its own usage: one count for a summary turn,
    another for an answer."""

    def immediate(self, turn: TurnContext) -> None:
        return None  # every answer goes through `stream`, which reports the usage

    async def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        summary = PROMPT.encode() in turn.view.tail()
        async for item in super().stream(turn):
            yield item
        if summary:
            yield UsageReport(input_tokens=1000, cached_tokens=600, output_tokens=50)
        else:
            yield UsageReport(input_tokens=7, cached_tokens=0, output_tokens=3, reasoning_tokens=2)


def test_a_backend_s_usage_of_the_summary_turn_is_added() -> None:
    with running_server(backend=ReportsUsage()) as server, WSClient(server.ws_url) as ws:
        first = ws.turn(input="Start the task.")
        plain = first[-1]["response"]["usage"]
        compacting = ws.turn(
            input=LONG,
            previous_response_id=first[-1]["response"]["id"],
            context_management=COMPACT,
        )
    check_sequence(compacting)
    assert plain["input_tokens"] == 7 and plain["output_tokens"] == 3
    usage = compacting[-1]["response"]["usage"]
    assert compacting[-1]["response"]["output"][0]["type"] == "compaction"
    assert usage["input_tokens"] == 1007
    assert usage["input_tokens_details"]["cached_tokens"] == 600
    assert usage["output_tokens"] == 53
    assert usage["output_tokens_details"]["reasoning_tokens"] == 2
    assert usage["total_tokens"] == 1060


class BriefSummary(MockBackend):
    """The built-in model, summarising any context in one sentence (its own summary
    is the whole transcript, as long as the context)."""

    def immediate(self, turn: TurnContext) -> None:
        return None

    async def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        if PROMPT.encode() in turn.view.tail():
            yield TextDelta("The user asked thirty questions.")
            return
        async for item in super().stream(turn):
            yield item


def test_a_history_the_cache_has_not_seen_compacts_to_less() -> None:
    """The first request of a history the cache has not seen (a new or restarted
    server, another replica, an evicted chain) has no parent: all of it is input.
    The compaction item summarises it up to its last turn (the last answer and the
    new input), which it keeps as it is, so the model reads less than the context
    that crossed the threshold (it kept all of it after the summary: more)."""
    answer = " ".join(f"detail{i}" for i in range(60))
    history: list[dict[str, Any]] = []
    for i in range(30):
        history.append({"role": "user", "content": f"question {i}"})
        history.append({"type": "message", "role": "assistant", "content": f"{i}: {answer}"})
    history.append({"role": "user", "content": "/transcript"})
    with (
        running_server(backend=BriefSummary()) as server,
        OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk,
    ):
        response = sdk.responses.create(
            model=MODEL,
            input=history,  # type: ignore[arg-type]
            context_management=COMPACT,
        )
        item = response.output[0].model_dump(exclude_none=True)
        count = sdk.responses.input_tokens.count
        compacted_tokens = count(model=MODEL, input=[item]).input_tokens  # type: ignore[list-item]
        history_tokens = count(model=MODEL, input=history).input_tokens  # type: ignore[arg-type]
    compacted = compacted_item(item)
    assert texts(compacted.before or []) == [f"question {i}" for i in range(30)]
    assert texts(compacted.after) == [f"29: {answer}", "/transcript"]
    assert compacted_tokens < history_tokens / 2
    assert response.output_text.splitlines()[-4:] == [
        "user: question 29",
        "compaction: The user asked thirty questions.",
        f"assistant: 29: {answer}",
        "user: /transcript",
    ]


def test_the_last_turn_of_a_history_keeps_its_tool_calls_answered() -> None:
    """Where a history sent whole is split when it has no cached parent: at the
    last run of model items (the last response's output), else at the last user
    message; never between a tool call and the output that answers it."""

    def user(text: str) -> dict[str, Any]:
        return {"role": "user", "content": text}

    def call(call_id: str) -> dict[str, Any]:
        return {"type": "function_call", "call_id": call_id, "name": "f", "arguments": "{}"}

    def output(call_id: str) -> dict[str, Any]:
        return {"type": "function_call_output", "call_id": call_id, "output": "x"}

    reply = {"type": "message", "role": "assistant", "content": "a"}
    reasoning = {"type": "reasoning", "summary": []}
    cases: list[tuple[list[dict[str, Any]], int]] = [
        ([user("1"), reply, user("2"), reply, user("3")], 3),  # a chat
        ([user("1"), call("a"), output("a"), reasoning, call("b"), output("b")], 3),  # a loop
        ([user(str(i)) for i in range(61)], 60),  # no model item
        ([user("1"), call("a"), call("b"), output("a"), user("2"), output("b")], 1),
        ([user("1"), call("a"), user("2"), reply, user("3"), output("a")], 1),
        ([], 0),
        ([reply], 0),
    ]
    for items, start in cases:
        assert last_turn_start(items) == start, items


class RecordsSettings(MockBackend):
    """The built-in model, keeping the settings of each summary turn it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.summary_settings: list[dict[str, Any]] = []
        self.summary_given_defaults: list[tuple[str, ...]] = []

    def immediate(self, turn: TurnContext) -> None:
        return None

    async def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        if PROMPT.encode() in turn.view.tail():
            self.summary_settings.append(dict(turn.settings))
            self.summary_given_defaults.append(turn.request.given_defaults)
        async for item in super().stream(turn):
            yield item


def test_the_summary_turn_carries_whom_the_request_is_for() -> None:
    """The summary turn is made on the client's behalf: the upstream gets its
    `user`, `safety_identifier`, cache key and retention, and service tier; not its
    tools, sampling or output format, which are the answer's."""
    backend = RecordsSettings()
    own = {
        "user": "u-9",
        "safety_identifier": "user-hash-1",
        "prompt_cache_key": "chain-7",
        "prompt_cache_retention": "24h",
        "service_tier": "flex",
    }
    with running_server(backend=backend) as server, WSClient(server.ws_url) as ws:
        first = ws.turn(input="Start the task.")
        compacting = ws.turn(
            input=LONG,
            previous_response_id=first[-1]["response"]["id"],
            context_management=COMPACT,
            tools=FUNCTION_TOOLS,
            temperature=0.2,
            text={"format": {"type": "json_object"}},
            **own,
        )
    assert compacting[-1]["response"]["output"][0]["type"] == "compaction"
    (settings,) = backend.summary_settings
    assert {name: settings[name] for name in own} == own
    assert (settings["tools"], settings["temperature"]) == ([], 1.0)
    assert settings["text"]["format"] == {"type": "text"}


def test_the_summary_turn_keeps_a_service_tier_given_at_its_default() -> None:
    """`service_tier: "default"` given by the client stays given in the summary turn
    (an upstream takes a missing tier as `auto`), not dropped for equalling the
    API's default; a request without one makes a summary turn without one."""
    backend = RecordsSettings()
    with running_server(backend=backend) as server, WSClient(server.ws_url) as ws:
        for tier in ({"service_tier": "default"}, {}):
            first = ws.turn(input="Start the task.")
            ws.turn(
                input=LONG,
                previous_response_id=first[-1]["response"]["id"],
                context_management=COMPACT,
                temperature=1.0,
                **tier,
            )
    assert backend.summary_given_defaults == [("service_tier",), ()]


def test_the_context_starts_at_the_last_self_contained_item() -> None:
    self_contained = encode_content("S", before=[], after=[])
    in_place = encode_content("T")

    def item(content: str) -> dict[str, str]:
        return {"type": "compaction", "encrypted_content": content}

    user = {"role": "user", "content": "u"}
    cases = [
        ([user], None),
        ([user, item(in_place)], None),
        ([user, item(self_contained), user], 1),
        ([item(self_contained), user, item(self_contained), item(in_place), user], 2),
        ([item(self_contained), {"type": "compaction", "encrypted_content": "gAAAA"}], 0),
    ]
    for objects, start in cases:
        assert context_start(Items.from_objects(objects)) == start, objects


def test_many_compaction_items_are_told_apart_without_decoding_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A create may hold any number of compaction items, each looked at on the event
    loop to find where the context starts: one of another server's, or one of
    warmsocket's in place, is told apart from its bytes, without decoding its JSON
    (100,000 of them held every other connection up for most of a second)."""
    foreign = {"type": "compaction", "encrypted_content": "gAAAA-another-server"}
    ours = {"type": "compaction", "encrypted_content": encode_content('T\n"quoted"')}
    objects = [foreign, ours] * 50_000 + [{"role": "user", "content": "u"}]
    items = Items.from_objects(objects)
    decoded: list[str | bytes] = []
    loads = json.loads

    def counting(text: str | bytes, **kwargs: Any) -> Any:
        decoded.append(text)
        return loads(text, **kwargs)

    monkeypatch.setattr(json, "loads", counting)
    assert context_start(items) is None
    assert context_start(items.concat(Items.from_objects([self_contained_item()]))) == 100_001
    assert len(decoded) == 1  # the self-contained item's summary alone


def self_contained_item() -> dict[str, str]:
    return {"type": "compaction", "encrypted_content": encode_content("S", before=[], after=[])}


def _payload_texts() -> st.SearchStrategy[bytes]:
    """JSON texts a compaction item's content may hold: warmsocket's own, and the
    shapes a client could write by hand (spaces, escaped names, a `before` that is
    not a member, other encodings, no JSON at all)."""
    item_lists = st.lists(st.fixed_dictionaries({"role": st.just("user")}), max_size=2)
    members = st.fixed_dictionaries(
        {"summary": st.one_of(st.text(max_size=8), st.integers())},
        optional={
            "before": st.one_of(item_lists, st.none(), st.just(5), st.just(["x"])),
            "after": st.one_of(item_lists, st.just("x")),
            "nested": st.just({"before": []}),
            "word": st.just("before"),
        },
    )
    return st.tuples(members, st.integers(0, 5)).map(_written)


def _written(case: tuple[dict[str, Any], int]) -> bytes:
    payload, how = case
    text = json.dumps(payload)
    if how == 1:
        return json.dumps(payload, indent=1).encode()
    if how == 2:
        return text.replace('"before"', '"\\u0062efore"').encode()
    if how == 3:
        return text.encode("utf-16-le")
    if how == 4:
        return b"\xef\xbb\xbf" + text.encode()
    if how == 5:
        return text.encode()[: len(text) // 2]
    return text.encode()


@settings(max_examples=300, deadline=None)
@given(
    text=_payload_texts(),
    content=st.sampled_from(["urlsafe", "standard", "spoiled", "foreign"]),
    extra=st.sampled_from(
        [{}, {"id": "cmp_1"}, {"a": {"encrypted_content": "wsc1.e30"}}, {"z": 1}]
    ),
)
def test_where_a_context_starts_is_what_unpacking_the_item_says(
    text: bytes, content: str, extra: dict[str, Any]
) -> None:
    """The quick look at an item's bytes answers as decoding it whole does."""
    encoded = {
        "urlsafe": base64.urlsafe_b64encode(text).decode(),
        "standard": base64.b64encode(text).decode(),
        "spoiled": base64.urlsafe_b64encode(text).decode() + "\n",
        "foreign": "",
    }[content]
    prefix = "gAAAA" if content == "foreign" else CONTENT_PREFIX
    item = {"type": "compaction", "encrypted_content": prefix + encoded, **extra}
    item_json = Items.from_objects([item]).item_json(0)
    compacted = unpack(json.loads(item_json))
    assert starts_context(item_json) == (compacted is not None and compacted.self_contained)
