"""The Conversations API, driven with the `openai` SDK and `openai-agents`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from itertools import islice
from types import SimpleNamespace
from typing import Any

import httpx2 as httpx
import pytest
from agents import Agent, ModelSettings, OpenAIConversationsSession, responses_websocket_session
from agents.tracing import set_tracing_disabled
from openai import (
    AsyncOpenAI,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    OpenAI,
)
from openai.types.conversations import Conversation, ConversationItem
from pydantic import TypeAdapter

from tests.support import RunningServer, WSClient, check_sse_event, output_text, running_server
from tests.test_agents_sdk import calls, read_file
from warmsocket import conversations, shared_store, write_retry
from warmsocket._core import Items
from warmsocket.conversations import Conversations, items_cost
from warmsocket.engine import SharedStoreUnavailable
from warmsocket.errors import APIError

ITEM = TypeAdapter(ConversationItem)
CONVERSATION = TypeAdapter(Conversation)


def strict(items: list[Any]) -> list[dict[str, Any]]:
    """Items as JSON, each checked against the SDK's `ConversationItem` type."""
    dumped = [item.model_dump(exclude_unset=True, mode="json") for item in items]
    for item in dumped:
        ITEM.validate_python(item)
    return dumped


def test_a_conversation_and_its_items_round_trip(sdk: OpenAI) -> None:
    created = sdk.conversations.create(
        items=[{"role": "user", "content": "hi"}], metadata={"topic": "greeting"}
    )
    CONVERSATION.validate_python(created.model_dump(mode="json"))
    assert created.id.startswith("conv_") and created.metadata == {"topic": "greeting"}
    added = sdk.conversations.items.create(
        created.id,
        items=[
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
            {"type": "message", "role": "assistant", "content": "done", "id": "msg_given"},
        ],
        include=["message.output_text.logprobs"],
    )
    assert [item.type for item in added.data] == [
        "function_call",
        "function_call_output",
        "message",
    ]
    assert added.first_id == added.data[0].id and added.last_id == "msg_given"
    listed = strict(list(sdk.conversations.items.list(created.id, order="asc")))
    assert [item["type"] for item in listed] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert listed[0]["content"] == [{"type": "input_text", "text": "hi"}]
    assert listed[3]["content"] == [{"type": "output_text", "text": "done", "annotations": []}]
    assert listed[3]["id"] == "msg_given" and len({item["id"] for item in listed}) == 4
    # Newest first by default, a page at a time.
    first_page = sdk.conversations.items.list(created.id, limit=3)
    assert [item.id for item in first_page.data] == [item["id"] for item in listed[::-1][:3]]
    assert first_page.has_more
    rest = sdk.conversations.items.list(created.id, limit=3, after=first_page.data[-1].id)
    assert [item.id for item in rest.data] == [listed[0]["id"]] and not rest.has_more
    assert [item.id for item in sdk.conversations.items.list(created.id)] == [
        item["id"] for item in listed[::-1]
    ]
    call = sdk.conversations.items.retrieve(listed[1]["id"], conversation_id=created.id)
    assert call.type == "function_call" and call.call_id == "c1"
    after_delete = sdk.conversations.items.delete(listed[1]["id"], conversation_id=created.id)
    assert after_delete.id == created.id
    assert [i.type for i in sdk.conversations.items.list(created.id, order="asc")] == [
        "message",
        "function_call_output",
        "message",
    ]
    updated = sdk.conversations.update(created.id, metadata={"topic": "numbers"})
    assert updated.metadata == {"topic": "numbers"}
    assert sdk.conversations.retrieve(created.id).metadata == {"topic": "numbers"}
    deleted = sdk.conversations.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (
        created.id,
        True,
        "conversation.deleted",
    )
    with pytest.raises(NotFoundError):
        sdk.conversations.retrieve(created.id)
    with pytest.raises(NotFoundError):
        sdk.conversations.items.list(created.id)


def test_a_page_converts_only_its_own_items(
    sdk: OpenAI, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paging through a long conversation, or a long response input, converts each
    page's items only: a client reading 2,000 items 20 at a time does not make the
    server convert all 2,000 for each of its 100 pages."""
    from warmsocket import httpapi

    items = [{"role": "user", "content": f"m{i}"} for i in range(2000)]
    conversation = sdk.conversations.create()
    for start in range(0, len(items), 20):
        sdk.conversations.items.create(conversation.id, items=items[start : start + 20])  # type: ignore[arg-type]
    response = sdk.responses.create(model="m", input=items)  # type: ignore[arg-type]
    listed: list[int] = []
    for module, name in ((conversations, "listed"), (httpapi, "listed_input_item")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real: listed.append(1) or _real(*a))
    page = sdk.conversations.items.list(conversation.id, limit=20, order="asc")
    assert [item.content[0].text for item in page.data] == [f"m{i}" for i in range(20)]  # type: ignore[union-attr]
    later = sdk.conversations.items.list(conversation.id, limit=5, after=page.data[-1].id)
    assert [item.content[0].text for item in later.data] == ["m18", "m17", "m16", "m15", "m14"]  # type: ignore[union-attr]
    inputs = sdk.responses.input_items.list(response.id, limit=20)
    assert [item.content[0].text for item in inputs.data] == [
        f"m{i}" for i in range(1999, 1979, -1)
    ]  # type: ignore[union-attr]
    more = sdk.responses.input_items.list(response.id, limit=3, after=inputs.data[-1].id)
    assert [item.content[0].text for item in more.data] == ["m1979", "m1978", "m1977"]  # type: ignore[union-attr]
    assert len(listed) == 20 + 5 + 20 + 3


def test_paging_a_conversation_that_holds_an_id_twice_ends(
    sdk: OpenAI, server: RunningServer
) -> None:
    """A conversation kept with an item id twice (added before such items were
    refused, or by two responses at once) is paged through to its end: the SDK's
    auto-pagination, one item a page, was sent x, y, x, y, ... forever."""
    conversation = sdk.conversations.create(
        items=[_message(text) for text in ("one", "two", "three", "four")]  # type: ignore[misc]
    )
    kept = server.server.engine.conversations._by_id[conversation.id]
    kept.item_ids[2] = kept.item_ids[0]
    for order in ("asc", "desc"):
        pages = sdk.conversations.items.list(conversation.id, limit=1, order=order)  # type: ignore[arg-type]
        texts = [item.content[0].text for item in islice(pages, 10)]  # type: ignore[union-attr]
        assert len(texts) < 10 and len(texts) == len(set(texts))
        assert texts[0] == ("one" if order == "asc" else "four")


def test_metrics_count_the_conversations_and_their_bytes(
    server: RunningServer, sdk: OpenAI
) -> None:
    made = sdk.conversations.create(items=[{"role": "user", "content": "x" * 500}])
    with httpx.Client(base_url=server.base_url) as http:
        kept = http.get("/metrics").text.splitlines()
        sdk.conversations.delete(made.id)
        gone = http.get("/metrics").text.splitlines()
    assert "warmsocket_conversations 1" in kept and "warmsocket_conversations 0" in gone
    (size,) = [line for line in kept if line.startswith("warmsocket_conversation_bytes ")]
    assert int(size.split()[1]) > 500 and "warmsocket_conversation_bytes 0" in gone
    assert "warmsocket_conversation_write_errors_total 0" in gone


def test_a_conversation_is_private_to_the_key_that_made_it(server: RunningServer) -> None:
    with (
        OpenAI(base_url=server.base_url, api_key="sk-one", max_retries=0) as one,
        OpenAI(base_url=server.base_url, api_key="sk-two", max_retries=0) as two,
    ):
        mine = one.conversations.create(items=[{"role": "user", "content": "secret"}])
        item_id = next(iter(one.conversations.items.list(mine.id))).id
        for attempt in (
            lambda: two.conversations.retrieve(mine.id),
            lambda: two.conversations.update(mine.id, metadata={}),
            lambda: two.conversations.delete(mine.id),
            lambda: two.conversations.items.list(mine.id),
            lambda: two.conversations.items.create(mine.id, items=[]),
            lambda: two.conversations.items.retrieve(item_id, conversation_id=mine.id),
            lambda: two.conversations.items.delete(item_id, conversation_id=mine.id),
        ):
            with pytest.raises(NotFoundError):
                attempt()
        assert [i.id for i in one.conversations.items.list(mine.id)] == [item_id]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"items": "hi"}, "items"),
        ({"items": [{"role": "user", "content": "x"}] * 21}, "items"),
        (
            {"items": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "items[0].call_id",
        ),
        ({"items": [{"type": "item_reference", "id": "msg_1"}]}, "items[0].type"),
        ({"items": [{"type": "no_such_item"}]}, "items[0].type"),
        ({"items": [{"role": "robot", "content": "x"}]}, "items[0].role"),
        ({"items": [{"role": "user", "content": "x", "type": None}]}, "items[0].type"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
    ],
)
def test_bad_conversations_are_refused_with_the_param_named(
    server: RunningServer, body: dict[str, Any], param: str
) -> None:
    with httpx.Client(base_url=server.base_url) as http:
        reply = http.post("/conversations", json=body)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == param
        assert reply.headers["x-request-id"].startswith("req_")
        assert http.get("/conversations/conv_nothing").status_code == 404


def test_bad_item_requests_are_refused(sdk: OpenAI, server: RunningServer) -> None:
    conversation = sdk.conversations.create()
    with pytest.raises(BadRequestError) as missing:
        sdk.conversations.items.create(conversation.id, items=[{"type": "message"}])  # type: ignore[list-item]
    assert missing.value.body["param"] == "items[0].role"  # type: ignore[index]
    with pytest.raises(NotFoundError):
        sdk.conversations.items.retrieve("msg_none", conversation_id=conversation.id)
    with pytest.raises(NotFoundError):
        sdk.conversations.items.delete("msg_none", conversation_id=conversation.id)
    key = {"Authorization": "Bearer sk-test"}  # the SDK's: the conversation's owner
    with httpx.Client(base_url=server.base_url, headers=key) as http:
        base = f"/conversations/{conversation.id}"
        assert http.post(f"{base}/items", json={}).json()["error"]["param"] == "items"
        assert http.post(base, json={}).json()["error"]["param"] == "metadata"
        assert http.get(f"{base}/items?limit=0").json()["error"]["param"] == "limit"
        assert http.get(f"{base}/items?order=up").json()["error"]["param"] == "order"
        assert http.get(f"{base}/items?after=msg_none").json()["error"]["param"] == "after"
        assert http.put(base, json={}).status_code == 405
        assert http.get(f"{base}/other").status_code == 404
        assert http.post(base, content=b"{not json").json()["error"]["code"] == "invalid_json"
    assert list(sdk.conversations.items.list(conversation.id)) == []


def test_an_item_id_given_twice_is_refused(sdk: OpenAI) -> None:
    """An id given twice, or one the conversation holds, is refused as OpenAI refuses
    it: kept twice, the items list was paged x, y, x, y, ... forever (the SDK's
    auto-pagination never ended)."""
    twice = [_message("one") | {"id": "x"}, _message("two") | {"id": "x"}]
    with pytest.raises(BadRequestError) as created:
        sdk.conversations.create(items=twice)  # type: ignore[arg-type]
    assert created.value.body["param"] == "items"  # type: ignore[index]
    assert created.value.body["message"].startswith("Duplicate item found with id x.")  # type: ignore[index]
    conversation = sdk.conversations.create(items=[twice[0], _message("two") | {"id": "y"}])  # type: ignore[list-item]
    with pytest.raises(BadRequestError) as added:
        sdk.conversations.items.create(conversation.id, items=[_message("three") | {"id": "y"}])  # type: ignore[list-item]
    assert added.value.body["param"] == "items"  # type: ignore[index]
    with pytest.raises(BadRequestError) as continued:
        sdk.responses.create(
            model="m",
            input=[_message("three") | {"id": "x"}],
            conversation=conversation.id,  # type: ignore[list-item]
        )
    assert continued.value.body["param"] == "input"  # type: ignore[index]
    sdk.conversations.items.create(conversation.id, items=[_message("three") | {"id": "z"}])  # type: ignore[list-item]
    listed = sdk.conversations.items.list(conversation.id, limit=1, order="asc")
    assert [item.content[0].text for item in listed] == ["one", "two", "three"]  # type: ignore[union-attr]


def test_adding_past_the_budget_is_refused_and_keeps_everything() -> None:
    # A conversation counts 1 KiB, and each item 128 bytes, besides the items' JSON.
    with (
        running_server(conversation_budget=3072) as server,
        OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk,
    ):
        conversation = sdk.conversations.create(items=[{"role": "user", "content": "x" * 1000}])
        with httpx.Client(
            base_url=server.base_url, headers={"Authorization": "Bearer sk-test"}
        ) as http:
            reply = http.post(
                f"/conversations/{conversation.id}/items",
                json={"items": [{"role": "user", "content": "y" * 1500}]},
            )
        assert reply.status_code == 503
        assert "--conversation-budget" in reply.json()["error"]["message"]
        assert len(list(sdk.conversations.items.list(conversation.id))) == 1
        sdk.conversations.delete(conversation.id)  # frees its bytes
        sdk.conversations.create(items=[{"role": "user", "content": "y" * 1500}])


def test_a_response_whose_input_the_conversation_cannot_take_is_refused_before_the_model() -> None:
    """Past --conversation-budget a response in a conversation is refused with 503 before
    it runs (it used to run, spending the upstream's tokens, then end failed); one with
    `store: false` adds nothing, so it runs."""
    with (
        running_server(conversation_budget=4096) as server,
        OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk,
    ):
        conversation = sdk.conversations.create(items=[{"role": "user", "content": "x" * 1000}])
        turns = dict(server.server.metrics.turns)
        with pytest.raises(InternalServerError) as info:
            sdk.responses.create(model="m", input="y" * 3000, conversation=conversation.id)
        assert info.value.status_code == 503 and info.value.code == "server_is_overloaded"
        assert "--conversation-budget" in info.value.message
        assert dict(server.server.metrics.turns) == turns  # the model never ran
        kept = sdk.responses.create(
            model="m", input="y" * 3000, conversation=conversation.id, store=False
        )
        assert kept.status == "completed"
        assert len(list(sdk.conversations.items.list(conversation.id))) == 1


def test_copies_ahead_of_a_redis_that_does_not_answer_stay_within_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With Redis, a conversation whose additions Redis has not taken yet is served
    from its copy, which cannot be dropped to make room: while Redis did not answer,
    responses' additions grew the copies without bound (15 times the budget in a
    review). Past the budget they are refused (503) until Redis takes what waits."""
    monkeypatch.setattr(conversations, "MAX_QUEUED_ADDITION_BYTES", 100_000)
    answering = True

    class Board:
        async def create(self, *args: object) -> None:
            return None

        async def version(self, *args: object) -> int:
            if not answering:
                await asyncio.sleep(3600)
            return 1

        async def read(self, *args: object) -> None:
            await asyncio.sleep(3600)

        async def append(self, *args: object) -> None:
            await asyncio.sleep(3600)  # Redis does not answer

    async def main() -> tuple[int, int]:
        nonlocal answering
        store = Conversations(budget_bytes=64 * 1024, max_item_bytes=1 << 25, board=Board())  # type: ignore[arg-type]
        conversation = await store.create("o", {})
        added = 0
        for turn in range(50):
            copy = await store.fresh("o", conversation.id)
            answering = False  # (the copy is ahead of Redis from the first addition on)
            items = Items.from_objects([{"role": "user", "content": f"{turn} " + "x" * 20_000}])
            try:
                store.check_room(items_cost(items), used=copy)
            except APIError as exc:
                assert exc.status == 503 and exc.code == "server_is_overloaded"
                break
            store.extend(copy, items)
            added += 1
            await asyncio.sleep(0)
        return added, store.nbytes

    added, held = asyncio.run(asyncio.wait_for(main(), 10))
    assert 0 < added < 50
    assert held <= 64 * 1024


def test_empty_conversations_fill_the_budget_too() -> None:
    """Conversations without items are not free: creating them without end is refused
    once they hold the budget (it was not: each counted 0 bytes)."""
    with (
        running_server(conversation_budget=64 * 1024) as server,
        httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer sk-test"}) as http,
    ):
        metadata = {f"k{n}": "v" * 500 for n in range(16)}
        codes = [
            http.post("/conversations", json={"metadata": metadata}).status_code for _ in range(20)
        ]
        assert codes.count(200) == 7 and codes[7:] == [503] * 13  # 9 KiB each
        store = server.server.engine.conversations
        assert store.nbytes <= 64 * 1024 and len(store) == 7


TWO_RUNS = ["message", "function_call", "function_call_output", "message", "message", "message"]
"""The types of the items a conversation holds after a run with one `read_file` call
and a `/transcript` run."""


def reading_agent() -> Agent:
    """An agent with the `read_file` tool (its calls recorded in `calls`, cleared);
    tracing off: tests stay offline."""
    set_tracing_disabled(True)
    calls.clear()
    return Agent(
        name="coder",
        instructions="You are a coding agent.",
        model="warmsocket-mock",
        tools=[read_file],
        model_settings=ModelSettings(store=True),
    )


def test_an_agent_keeps_its_history_in_a_conversation(any_backend: RunningServer) -> None:
    """`OpenAIConversationsSession`: the agent's runs add their items to a conversation
    on the server and read them back as the next run's history."""
    server = any_backend
    agent = reading_agent()

    async def main() -> tuple[str, str, list[Any]]:
        client = AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        memory = OpenAIConversationsSession(openai_client=client)
        try:
            async with responses_websocket_session(
                api_key="sk-test", base_url=server.base_url
            ) as session:
                first = await session.run(agent, '/call read_file {"path": "a.py"}', session=memory)
                second = await session.run(agent, "/transcript", session=memory)
            items = await memory.get_items()
            kept = [item async for item in client.conversations.items.list(memory.session_id)]
        finally:
            await client.close()
        strict(kept)
        return str(first.final_output), str(second.final_output), items

    first, transcript, items = asyncio.run(main())
    assert first == "read_file returned: contents of a.py"
    assert calls == ["read_file:a.py"]
    assert transcript.splitlines() == [
        "instructions: You are a coding agent.",
        'user: /call read_file {"path": "a.py"}',
        "function_call read_file " + transcript.splitlines()[2].split()[-1],
        "function_call_output " + transcript.splitlines()[2].split()[-1] + " contents of a.py",
        "assistant: read_file returned: contents of a.py",
        "user: /transcript",
    ]
    assert [item.get("type") for item in items] == TWO_RUNS


# -- responses that continue a conversation ------------------------------------------------


def test_responses_continue_a_conversation_and_add_to_it(
    server: RunningServer, sdk: OpenAI
) -> None:
    """Each response reads the conversation's items before its input and adds its input
    and output to it; the next one finds the chain they left by prefix diffing (its
    history is not new work). The Response names the conversation, and stored it
    lists only its own input and names no previous response."""
    conversation = sdk.conversations.create(items=[{"role": "user", "content": "first"}])
    first = sdk.responses.create(model="m", input="second", conversation=conversation.id)
    assert first.conversation is not None and first.conversation.id == conversation.id
    streamed = list(
        sdk.responses.create(
            model="m", input="/transcript", conversation={"id": conversation.id}, stream=True
        )
    )
    for event in streamed:
        check_sse_event(event.model_dump(exclude_unset=True, mode="json"))
    created, done = streamed[0].response, streamed[-1].response
    assert created.conversation is not None and created.conversation.id == conversation.id
    assert done.output_text.splitlines() == [
        "user: first",
        "user: second",
        "assistant: You said: second",
        "user: /transcript",
    ]
    metrics = server.server.metrics
    assert metrics.prefix_matches["hit"] == 1 and metrics.prefix_matched_items == 3
    listed = strict(list(sdk.conversations.items.list(conversation.id, order="asc")))
    texts = [part["text"] for item in listed for part in item["content"]]
    assert texts == ["first", "second", "You said: second", "/transcript", done.output_text]
    # The output items keep the ids the responses gave them.
    assert listed[2]["id"] == first.output[0].id and listed[4]["id"] == done.output[0].id
    stored = sdk.responses.retrieve(done.id)
    assert stored.conversation is not None and stored.conversation.id == conversation.id
    assert stored.previous_response_id is None
    own = [item.model_dump() for item in sdk.responses.input_items.list(done.id)]
    assert [part["text"] for item in own for part in item["content"]] == ["/transcript"]


def test_a_conversation_response_over_websocket_cannot_be_steered(server: RunningServer) -> None:
    key = {"Authorization": "Bearer sk-test"}
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        conversation = sdk.conversations.create()
    with WSClient(server.ws_url, additional_headers=key) as ws:
        ws.create(input="/sleep 300 hello", conversation=conversation.id)
        created = ws.recv()
        assert created["response"]["conversation"] == {"id": conversation.id}
        steer = {
            "type": "response.steer",
            "previous_response_id": created["response"]["id"],
            "input": "faster",
        }
        ws.send(steer)
        events = ws.until_terminal()
        failed = [e for e in [created, *events] if e["type"] == "response.steer.failed"]
        assert failed and failed[0]["error"]["code"] == "steering_not_supported"
        assert events[-1]["type"] == "response.completed"
        again = ws.turn(input="/transcript", conversation=conversation.id)
    assert output_text(again).splitlines() == [
        "user: /sleep 300 hello",
        "assistant: You said: /sleep 300 hello",
        "user: /transcript",
    ]


def test_what_a_conversation_refuses(server: RunningServer, sdk: OpenAI) -> None:
    """An unknown or another key's conversation is a 404 on `conversation`; one with a
    previous_response_id a 400; a response that fails adds nothing."""
    conversation = sdk.conversations.create(items=[{"role": "user", "content": "kept"}])
    with pytest.raises(NotFoundError) as unknown:
        sdk.responses.create(model="m", input="x", conversation="conv_nothing")
    assert unknown.value.body["param"] == "conversation"  # type: ignore[index]
    with (
        OpenAI(base_url=server.base_url, api_key="sk-other", max_retries=0) as other,
        pytest.raises(NotFoundError),
    ):
        other.responses.create(model="m", input="x", conversation=conversation.id)
    first = sdk.responses.create(model="m", input="x")
    with pytest.raises(BadRequestError) as both:
        sdk.responses.create(
            model="m", input="x", conversation=conversation.id, previous_response_id=first.id
        )
    assert both.value.body["param"] == "conversation"  # type: ignore[index]
    failed = sdk.responses.create(model="m", input="/fail", conversation=conversation.id)
    assert failed.status == "failed"
    with WSClient(server.ws_url, additional_headers={"Authorization": "Bearer sk-test"}) as ws:
        refused = ws.turn(input="x", conversation="conv_nothing")
    assert refused[-1]["type"] == "error" and refused[-1]["status"] == 404
    items = list(sdk.conversations.items.list(conversation.id))
    assert [part.text for item in items for part in item.content] == ["kept"]  # type: ignore[union-attr]


def test_a_store_false_response_reads_a_conversation_but_adds_nothing(
    server: RunningServer, sdk: OpenAI
) -> None:
    """A `store: false` response, over HTTP or WebSocket, reads the conversation's items
    as its context but leaves the conversation as it was, as OpenAI does: its input and
    answer are never written to the conversation (which Redis and snapshots keep)."""
    conversation = sdk.conversations.create(items=[{"role": "user", "content": "kept"}])
    over_http = sdk.responses.create(
        model="m", input="/transcript", store=False, conversation=conversation.id
    )
    assert over_http.store is False
    assert over_http.conversation is not None and over_http.conversation.id == conversation.id
    assert over_http.output_text.splitlines() == ["user: kept", "user: /transcript"]
    with WSClient(server.ws_url, additional_headers={"Authorization": "Bearer sk-test"}) as ws:
        over_ws = ws.turn(input="secret", store=False, conversation=conversation.id)
    assert over_ws[-1]["type"] == "response.completed"
    items = list(sdk.conversations.items.list(conversation.id))
    assert [part.text for item in items for part in item.content] == ["kept"]  # type: ignore[union-attr]
    later = sdk.responses.create(model="m", input="/transcript", conversation=conversation.id)
    assert later.output_text.splitlines() == ["user: kept", "user: /transcript"]


def test_an_agent_runs_in_a_conversation(any_backend: RunningServer) -> None:
    """`Runner.run(..., conversation_id=...)` over the WebSocket transport: each turn
    of the tool loop sends its new items with the conversation, which ends up holding
    the whole loop."""
    server = any_backend
    agent = reading_agent()

    async def main() -> tuple[str, str, list[Any]]:
        client = AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
        try:
            conversation = await client.conversations.create()
            async with responses_websocket_session(
                api_key="sk-test", base_url=server.base_url
            ) as session:
                first = await session.run(
                    agent, '/call read_file {"path": "b.py"}', conversation_id=conversation.id
                )
                second = await session.run(agent, "/transcript", conversation_id=conversation.id)
            kept = [
                item async for item in client.conversations.items.list(conversation.id, order="asc")
            ]
        finally:
            await client.close()
        return str(first.final_output), str(second.final_output), strict(kept)

    first, transcript, kept = asyncio.run(main())
    assert first == "read_file returned: contents of b.py"
    assert calls == ["read_file:b.py"]
    lines = transcript.splitlines()
    assert lines[0] == "instructions: You are a coding agent."
    assert lines[1] == 'user: /call read_file {"path": "b.py"}'
    assert lines[2].startswith("function_call read_file ")
    assert lines[3].endswith(" contents of b.py") and lines[-1] == "user: /transcript"
    assert [item["type"] for item in kept] == TWO_RUNS


def test_input_tokens_count_the_conversation(sdk: OpenAI) -> None:
    """`responses.input_tokens.count` with a conversation counts its items as the
    create would: the same `usage.input_tokens`."""
    conversation = sdk.conversations.create(
        items=[{"role": "user", "content": "a longer first message " * 20}]
    )
    alone = sdk.responses.input_tokens.count(model="m", input="next")
    counted = sdk.responses.input_tokens.count(
        model="m", input="next", conversation=conversation.id
    )
    only_history = sdk.responses.input_tokens.count(model="m", conversation=conversation.id)
    assert counted.input_tokens > alone.input_tokens + 60  # the 80 words before it
    assert only_history.input_tokens < counted.input_tokens
    created = sdk.responses.create(model="m", input="next", conversation=conversation.id)
    assert created.usage is not None
    assert created.usage.input_tokens == counted.input_tokens
    with pytest.raises(NotFoundError):
        sdk.responses.input_tokens.count(model="m", input="x", conversation="conv_nothing")


def test_input_tokens_without_input_count_a_conversation_as_a_create_reads_it(
    server: RunningServer, sdk: OpenAI
) -> None:
    """Counted without input, a conversation that a server-side compaction went
    through counts from its compaction item, as the next create reads it (not the
    items the compaction stands for); one that lost items is refused, as a create is."""
    conversation = sdk.conversations.create()
    compacting = sdk.responses.create(
        model="m",
        input="word " * 3000,
        conversation=conversation.id,
        context_management=[{"type": "compaction", "compact_threshold": 1000}],
    )
    assert compacting.output[0].type == "compaction"
    history = sdk.responses.input_tokens.count(conversation=conversation.id)
    hi = sdk.responses.input_tokens.count(model="m", input="hi")
    with_hi = sdk.responses.input_tokens.count(conversation=conversation.id, input="hi")
    created = sdk.responses.create(model="m", input="hi", conversation=conversation.id)
    assert created.usage is not None
    assert history.input_tokens + hi.input_tokens == with_hi.input_tokens
    assert with_hi.input_tokens == created.usage.input_tokens
    server.server.engine.conversations._by_id[conversation.id].incomplete = True
    for counted in ({}, {"input": "hi"}):
        with pytest.raises(ConflictError) as refused:
            sdk.responses.input_tokens.count(conversation=conversation.id, **counted)  # type: ignore[arg-type]
        assert refused.value.body["code"] == "conversation_incomplete"  # type: ignore[index]


# -- the copies kept beside a shared store, against an in-memory board -------------------


class MemoryBoard:
    """A `ConversationBoard` in memory whose appends, by their order, wait for the
    events in `held` (Redis' latency, under the test's control), and fail when their
    index is in `failing` (a write given up)."""

    def __init__(self) -> None:
        self.kept: dict[str, dict[str, Any]] = {}
        self.held: dict[int, asyncio.Event] = {}
        self.failing: set[int] = set()
        self.appends = 0
        self.unreadable = 0
        """Reads to refuse (Redis not answering), from the next."""
        self.seen: list[list[str]] = []
        """The texts of the conversation after each addition."""

    def hold(self, *calls: int) -> list[asyncio.Event]:
        """Hold the appends with these indexes (0: the next one) until released."""
        events = [asyncio.Event() for _ in calls]
        for call, event in zip(calls, events, strict=True):
            self.held[self.appends + call] = event
        return events

    def texts(self, conv_id: str) -> list[str]:
        return [json.loads(item)["content"] for _id, item in self.kept[conv_id]["entries"]]

    async def create(
        self, owner: str, conv_id: str, created_at: int, metadata: bytes, entries: Any
    ) -> None:
        self.kept[conv_id] = {"version": 1, "created": created_at, "entries": list(entries)}

    async def version(self, owner: str, conv_id: str) -> int | None:
        kept = self.kept.get(conv_id)
        return None if kept is None else int(kept["version"])

    async def read(self, owner: str, conv_id: str) -> Any:
        if self.unreadable:
            self.unreadable -= 1
            raise SharedStoreUnavailable(conv_id)
        kept = self.kept.get(conv_id)
        if kept is None:
            return None
        return SimpleNamespace(
            version=kept["version"],
            created_at=kept["created"],
            metadata={},
            entries=list(kept["entries"]),
            incomplete=kept.get("incomplete", False),
        )

    async def append(self, owner: str, conv_id: str, entries: Any) -> tuple[int, int] | None:
        call = self.appends
        self.appends += 1
        if call in self.held:
            await self.held[call].wait()
        if call in self.failing:
            raise RuntimeError("given up")
        kept = self.kept.get(conv_id)
        if kept is None:
            return None
        return await self._add(kept, entries)

    async def append_at(self, owner: str, conv_id: str, version: int, entries: Any) -> Any:
        kept = self.kept.get(conv_id)
        if kept is None:
            return None
        if kept["version"] != version:
            return -2, kept["version"]
        return await self._add(kept, entries)

    async def _add(self, kept: dict[str, Any], entries: Any) -> Any:
        kept["entries"] += entries
        kept["version"] += 1
        self.seen.append([json.loads(item)["content"] for _id, item in kept["entries"]])
        return kept["version"] - 1, kept["version"]

    async def replace(self, owner: str, conv_id: str, version: int, entries: Any) -> Any:
        kept = self.kept.get(conv_id)
        if kept is None:
            return None
        if kept["version"] != version:
            return -2, kept["version"]
        kept["entries"] = list(entries)
        kept["version"] += 1
        return version, kept["version"]

    async def mark_incomplete(self, owner: str, conv_id: str) -> Any:
        kept = self.kept.get(conv_id)
        if kept is None:
            return None
        kept["incomplete"] = True
        kept["version"] += 1
        return kept["version"] - 1, kept["version"]

    async def set_metadata(self, owner: str, conv_id: str, metadata: bytes) -> Any:
        raise NotImplementedError

    async def delete_item(self, owner: str, conv_id: str, item_id: str) -> Any:
        raise NotImplementedError

    async def delete(self, owner: str, conv_id: str) -> bool:
        return self.kept.pop(conv_id, None) is not None


def _message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _texts(conversation: Any) -> list[str]:
    return [item["content"] for item in conversation.items.to_objects()]


def test_an_api_change_waits_for_the_responses_additions_written_behind() -> None:
    async def main() -> tuple[list[str], list[str]]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        (slow,) = board.hold(0)  # Redis slow: the response's addition waits
        store.extend(made, Items.from_objects([_message("b")]))
        adding = asyncio.ensure_future(store.add_items("o", made.id, {"items": [_message("c")]}))
        await asyncio.sleep(0.01)
        assert not adding.done() and board.appends == 1  # waits for the addition before it
        slow.set()
        await adding
        fresh = await store.fresh("o", made.id)
        return _texts(fresh), board.texts(made.id)

    copy, in_redis = asyncio.run(main())
    assert copy == ["a", "b", "c"] and in_redis == ["a", "b", "c"]


def test_an_api_change_waits_for_its_own_conversations_additions_only() -> None:
    """Another conversation's addition, queued after this one's, waits for "Redis":
    the change goes ahead once this conversation's own addition is written. Before,
    it waited for every conversation's additions."""

    async def main() -> tuple[list[str], list[str]]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        other = await store.create("o", {"items": [_message("elsewhere")]})
        mine, stuck = board.hold(0, 1)
        store.extend(made, Items.from_objects([_message("b")]))
        store.extend(other, Items.from_objects([_message("waits")]))
        adding = asyncio.ensure_future(store.add_items("o", made.id, {"items": [_message("c")]}))
        await asyncio.sleep(0.01)
        assert not adding.done()  # waits for its own addition
        mine.set()
        await asyncio.wait_for(adding, 5)
        stuck.set()
        await _written(store)
        fresh = await store.fresh("o", made.id)
        return _texts(fresh), board.texts(made.id)

    copy, in_redis = asyncio.run(main())
    assert copy == in_redis == ["a", "b", "c"]


def test_an_api_change_is_a_503_when_the_additions_before_it_are_not_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis does not answer the response's addition: a change to its conversation is
    refused after twice the socket timeout (a retriable 503, `SharedStoreUnavailable`)
    instead of hanging until the client gives up. The addition is still written once
    Redis answers, and the change can then be made."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.05)

    async def main() -> tuple[list[str], list[str]]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        (down,) = board.hold(0)
        store.extend(made, Items.from_objects([_message("b")]))
        with pytest.raises(SharedStoreUnavailable):
            await asyncio.wait_for(store.add_items("o", made.id, {"items": [_message("c")]}), 5)
        down.set()
        await store.add_items("o", made.id, {"items": [_message("c")]})
        fresh = await store.fresh("o", made.id)
        return _texts(fresh), board.texts(made.id)

    copy, in_redis = asyncio.run(main())
    assert copy == in_redis == ["a", "b", "c"]


def test_a_copy_that_a_response_changed_during_an_api_change_is_read_again() -> None:
    """The API's addition reaches Redis first, the response's (added to the copy while
    it waited) after it: the copy, in the other order, is read again once that is
    written, so every process lists the same order."""

    async def main() -> tuple[list[str], list[str], list[str]]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        api, behind = board.hold(0, 1)
        adding = asyncio.ensure_future(store.add_items("o", made.id, {"items": [_message("c")]}))
        await asyncio.sleep(0.01)  # the API's append waits in "Redis"
        store.extend(made, Items.from_objects([_message("b")]))
        api.set()
        await adding
        behind.set()
        assert store._writes is not None
        await store._writes.join()
        before = _texts(made)
        fresh = await store.fresh("o", made.id)
        return before, _texts(fresh), board.texts(made.id)

    before, copy, in_redis = asyncio.run(main())
    assert before == ["a", "b", "c"]  # the copy's order while it waited
    assert in_redis == ["a", "c", "b"] and copy == in_redis


async def _written(store: Conversations) -> None:
    """Wait until the additions written behind are written (if any were queued)."""
    if store._writes is not None:
        await asyncio.wait_for(store._writes.join(), 5)


def _added_elsewhere(board: MemoryBoard, conv_id: str, text: str) -> None:
    """Another process adds an item to the conversation in "Redis"."""
    kept = board.kept[conv_id]
    item = json.dumps({"content": text, "role": "user", "type": "message"}).encode()
    kept["entries"].append((f"item_{text}", item))
    kept["version"] += 1


def test_a_response_adds_to_the_copy_read_again_while_it_ran() -> None:
    """Another process added to the conversation while a response ran, and a request
    here read it again (a new copy). The response's input and output go after the
    other process's item, here and in Redis; before, they went nowhere, silently."""

    async def main() -> tuple[list[str], list[str]]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        joined = store.get("o", made.id)  # the response starts with it as its context
        _added_elsewhere(board, made.id, "x")
        await store.fresh("o", made.id)  # e.g. its items listed meanwhile
        store.extend(joined, Items.from_objects([_message("b")]))
        await _written(store)
        fresh = await store.fresh("o", made.id)
        return _texts(fresh), board.texts(made.id)

    copy, in_redis = asyncio.run(main())
    assert copy == in_redis == ["a", "x", "b"]


def test_a_response_adds_to_a_copy_dropped_to_make_room_while_it_ran() -> None:
    """The copy was dropped to make room while the response ran (others were used):
    it is kept again with the response's items, which reach Redis after what another
    process added meanwhile. A conversation deleted meanwhile is not kept again."""
    # A conversation counts 1 KiB and each item 128 bytes besides its JSON.
    budget = 3000

    async def main() -> tuple[list[str], list[str], bool, bool]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=budget, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        joined = store.get("o", made.id)
        _added_elsewhere(board, made.id, "x")
        await store.create("o", {"items": [_message("y" * 1000)]})
        dropped = made.id not in store._by_id
        store.extend(joined, Items.from_objects([_message("b")]))
        await _written(store)
        fresh = await store.fresh("o", made.id)
        deleted = await store.create("o", {})
        ended = store.get("o", deleted.id)
        await store.delete("o", deleted.id)
        store.extend(ended, Items.from_objects([_message("late")]))
        kept_again = deleted.id in store._by_id
        return _texts(fresh), board.texts(made.id), dropped, kept_again

    copy, in_redis, dropped, deleted_kept_again = asyncio.run(main())
    assert dropped  # (the situation under test)
    assert copy == in_redis == ["a", "x", "b"]
    assert not deleted_kept_again


def test_a_conversation_deleted_here_is_not_kept_again_from_another_copy() -> None:
    """A response ran on a copy that was then read again (another process changed
    the conversation); the conversation was deleted through this process: when the
    response ends, the copy it read is not kept (and served) again."""

    async def main() -> tuple[bool, bool]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        joined = store.get("o", made.id)  # the response starts on this copy
        _added_elsewhere(board, made.id, "x")
        replaced = await store.fresh("o", made.id) is not joined  # read again
        await store.delete("o", made.id)
        store.extend(joined, Items.from_objects([_message("b")]))  # the response ends
        return replaced, made.id in store._by_id

    replaced, kept_again = asyncio.run(main())
    assert replaced  # (the situation under test)
    assert not kept_again


def test_a_background_response_adds_to_its_conversation_when_it_ends(sdk: OpenAI) -> None:
    conversation = sdk.conversations.create()
    queued = sdk.responses.create(
        model="m", input="/sleep 200 later", conversation=conversation.id, background=True
    )
    assert queued.status == "queued" and queued.conversation is not None
    assert list(sdk.conversations.items.list(conversation.id)) == []  # not before its end
    for _ in range(100):
        done = sdk.responses.retrieve(queued.id)
        if done.status == "completed":
            break
        time.sleep(0.05)
    assert done.status == "completed"
    listed = strict(list(sdk.conversations.items.list(conversation.id, order="asc")))
    assert [item["role"] for item in listed] == ["user", "assistant"]
    assert listed[1]["id"] == done.output[0].id


def test_additions_past_the_queue_are_not_queued_but_written_with_the_conversation(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis not answering for long: what waits to be written is bounded (the
    additions, and one writing of the whole copy); what was not queued reaches Redis
    with the whole copy once it answers."""
    monkeypatch.setattr(conversations, "MAX_QUEUED_ADDITIONS", 2)
    caplog.set_level(logging.ERROR, logger="warmsocket.conversations")

    async def main() -> tuple[list[str], list[str], int]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        (down,) = board.hold(0)  # the first addition waits for "Redis"
        for text in ("b", "c", "d", "e"):
            store.extend(made, Items.from_objects([_message(text)]))
        assert store._unwritten == 3  # b and c, and the copy to write whole
        down.set()
        assert store._writes is not None
        await store._writes.join()
        return _texts(made), board.texts(made.id), store.write_errors

    copy, in_redis, errors = asyncio.run(main())
    assert copy == in_redis == ["a", "b", "c", "d", "e"]
    assert errors == 1  # d not queued (e went with the copy)
    (dropped,) = [r for r in caplog.records if "too many while Redis" in r.getMessage()]
    assert dropped.__dict__["queued"] == 2


def test_additions_past_the_queued_bytes_are_not_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversations, "MAX_QUEUED_ADDITION_BYTES", 2500)

    async def main() -> tuple[list[str], int]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        (down,) = board.hold(0)
        for text in ("b" * 1000, "c" * 1000, "d" * 1000):
            store.extend(made, Items.from_objects([_message(text)]))
        down.set()
        assert store._writes is not None
        await store._writes.join()
        return [text[0] for text in board.texts(made.id)], store.write_errors

    in_redis, errors = asyncio.run(main())
    assert in_redis == ["a", "b", "c", "d"] and errors == 1


def test_additions_queued_behind_a_failed_one_never_go_in_before_it() -> None:
    """'lost' failed while 'd' waited behind it: 'd' is not appended after the hole
    (every other process would have read the conversation without 'lost'), both go
    in with the copy."""

    async def main() -> tuple[list[str], list[list[str]], int]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        board.failing.add(0)
        store.extend(made, Items.from_objects([_message("lost")]))
        store.extend(made, Items.from_objects([_message("d")]))
        assert store._writes is not None
        await store._writes.join()
        return board.texts(made.id), board.seen, store.write_errors

    in_board, seen, write_errors = asyncio.run(main())
    assert in_board == ["a", "lost", "d"]
    assert all("lost" in texts for texts in seen if "d" in texts)
    assert write_errors == 1


def _a_hole(board: MemoryBoard, store: Conversations, made: Any, *, foreign: bool) -> Any:
    """'lost' fails; meanwhile 'd', added after it, reached Redis anyway (a write
    given up that Redis did after all), and, with `foreign`, another process added
    'x': Redis has a hole where 'lost' was."""

    async def arrange() -> None:
        (lost_held,) = board.hold(0)
        board.failing.add(0)
        store.extend(made, Items.from_objects([_message("lost")]))
        store.extend(made, Items.from_objects([_message("d")]))
        kept = board.kept[made.id]
        kept["entries"].append(
            (made.item_ids[-1], b'{"content":"d","role":"user","type":"message"}')
        )
        kept["version"] += 1
        if foreign:
            kept["entries"].append(("item_x", b'{"content":"x","role":"user","type":"message"}'))
            kept["version"] += 1
        lost_held.set()
        assert store._writes is not None
        await store._writes.join()

    return arrange()


def test_a_hole_is_filled_in_its_place_when_nobody_else_changed_the_conversation() -> None:
    async def main() -> tuple[list[str], list[str]]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        await _a_hole(board, store, made, foreign=False)
        fresh = await store.fresh("o", made.id)
        return board.texts(made.id), _texts(fresh)

    in_board, copy = asyncio.run(main())
    assert in_board == copy == ["a", "lost", "d"]


def test_a_hole_another_process_wrote_after_is_marked_incomplete() -> None:
    """As above, but another process added to the conversation meanwhile: 'lost' has
    no place left. The conversation is marked incomplete (creates refuse it) rather
    than left silently without it."""

    async def main() -> tuple[list[str], bool, bool, int]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        await _a_hole(board, store, made, foreign=True)
        incomplete_here = made.incomplete
        fresh = await store.fresh("o", made.id)
        return board.texts(made.id), incomplete_here, fresh.incomplete, store.write_errors

    in_board, here, read_again, write_errors = asyncio.run(main())
    assert in_board == ["a", "d", "x"] and here and read_again
    assert write_errors == 2  # the addition, and the conversation it left incomplete


def test_writing_the_whole_copy_given_up_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """With --redis-write-retry, writing the copy whole can be given up too: it is
    queued again (the copy kept meanwhile), not left undone until another addition."""
    monkeypatch.setattr(write_retry, "WRITE_RETRY_SECONDS", 0.0)  # give up at once

    async def main() -> tuple[list[str], int]:
        board = MemoryBoard()
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        board.failing.add(0)
        board.unreadable = 2  # the first two tries of the copy find Redis down
        store.extend(made, Items.from_objects([_message("lost")]))
        assert store._writes is not None
        await asyncio.wait_for(store._writes.join(), 5)
        return board.texts(made.id), store.write_errors

    in_board, write_errors = asyncio.run(main())
    assert in_board == ["a", "lost"]
    assert write_errors == 3  # the addition, and two tries of the copy


def test_one_response_at_a_time_adds_to_a_conversation(server: RunningServer, sdk: OpenAI) -> None:
    """Two responses to one conversation at once each read it without the other's
    items and added theirs in the order they ended: a slow turn's input came after
    a turn it never saw. The second is refused with OpenAI's 400
    `conversation_locked` while the first runs (over HTTP and on another WebSocket
    lane), reads that add nothing are not, and once it ended the next goes on."""
    conversation = sdk.conversations.create(items=[{"role": "user", "content": "start"}])
    auth = {"Authorization": "Bearer sk-test"}
    with WSClient(server.ws_url, additional_headers=auth) as ws:
        ws.create(input="/sleep 800 first", conversation=conversation.id, stream_id="a")
        assert ws.recv()["type"] == "response.created"
        with pytest.raises(BadRequestError) as locked:
            sdk.responses.create(model="m", input="second", conversation=conversation.id)
        assert (locked.value.code, locked.value.param) == ("conversation_locked", "conversation")
        error = ws.turn(input="third", conversation=conversation.id, stream_id="b")[-1]
        assert (error["type"], error["status"], error["error"]["code"]) == (
            "error",
            400,
            "conversation_locked",
        )
        # Reading it is not adding to it: store: false and token counts go on.
        read = sdk.responses.create(
            model="m", input="/transcript", store=False, conversation=conversation.id
        )
        assert read.output_text.splitlines() == ["user: start", "user: /transcript"]
        counted = sdk.responses.input_tokens.count(
            model="m", input="x", conversation=conversation.id
        )
        assert counted.input_tokens > 0
        assert ws.until_terminal("a")[-1]["type"] == "response.completed"
    after = sdk.responses.create(model="m", input="/transcript", conversation=conversation.id)
    assert after.output_text.splitlines() == [
        "user: start",
        "user: /sleep 800 first",
        "assistant: You said: /sleep 800 first",
        "user: /transcript",
    ]
    # A response that failed or whose client left frees the conversation too.
    with WSClient(server.ws_url, additional_headers=auth) as ws:
        ws.create(input="/sleep 5000 left", conversation=conversation.id)
        assert ws.recv()["type"] == "response.created"
    deadline = time.monotonic() + 5
    while True:
        try:
            sdk.responses.create(model="m", input="back", conversation=conversation.id)
            break
        except BadRequestError:
            assert time.monotonic() < deadline, "the conversation stayed locked"
            time.sleep(0.05)


def test_a_conversation_response_cannot_keep_connection_local_items(server: RunningServer) -> None:
    """A store: true response to a conversation whose input referenced a store: false
    item was connection-local, so it was told `completed` and added nothing to the
    conversation: the turn vanished from the agent's history. It is refused."""
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        conversation = sdk.conversations.create(items=[{"role": "user", "content": "start"}])
    auth = {"Authorization": "Bearer sk-test"}
    with WSClient(server.ws_url, additional_headers=auth) as ws:
        private = ws.turn(input="private", store=False)[-1]["response"]["output"][0]["id"]
        reference = {"type": "item_reference", "id": private}
        error = ws.turn(
            input=[reference, {"role": "user", "content": "next"}], conversation=conversation.id
        )[-1]
        assert (error["type"], error["status"], error["error"]["param"]) == ("error", 400, "input")
        assert "store: false" in error["error"]["message"]
        read = ws.turn(input=[reference], store=False, conversation=conversation.id)
        assert read[-1]["type"] == "response.completed"


def test_counting_tokens_in_a_conversation_is_not_held_to_its_budget() -> None:
    """input_tokens with a conversation stores nothing, yet it was refused as a
    response the conversation could not take (503)."""
    with (
        running_server(conversation_budget=4096) as srv,
        OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0) as sdk,
    ):
        conversation = sdk.conversations.create(items=[{"role": "user", "content": "start"}])
        counted = sdk.responses.input_tokens.count(
            model="m", input="w " * 1500, conversation=conversation.id
        )
        assert counted.input_tokens > 1500
        with pytest.raises(InternalServerError):  # a response would have to be kept
            sdk.responses.create(model="m", input="w " * 1500, conversation=conversation.id)


def test_an_item_id_with_a_slash_can_be_read_and_deleted(sdk: OpenAI) -> None:
    """The SDK sends an id's '/' as %2F; the path was decoded whole before it was
    split, so such an item could be added but never retrieved nor deleted (nor
    popped by openai-agents' session)."""
    odd = ["msg/x", "a%2Fb", "sp ace", "q?#"]
    conversation = sdk.conversations.create(
        items=[{"type": "message", "role": "user", "id": i, "content": i} for i in odd]  # type: ignore[misc]
    )
    for item_id in odd:
        item = sdk.conversations.items.retrieve(item_id, conversation_id=conversation.id)
        assert item.id == item_id
    sdk.conversations.items.delete("msg/x", conversation_id=conversation.id)
    listed = [item.id for item in sdk.conversations.items.list(conversation.id, order="asc")]
    assert listed == odd[1:]
    with httpx.Client(base_url=sdk.base_url, headers={"Authorization": "Bearer sk-test"}) as http:
        # Sent unencoded, a '/' is a separator still: no such route.
        assert http.get(f"conversations/{conversation.id}/items/a/b").status_code == 404


def test_listed_output_text_parts_carry_their_annotations(sdk: OpenAI) -> None:
    """A client may send an assistant's output_text part without `annotations`; the
    SDK's types require them in what is listed (OpenAI always lists them)."""
    assistant = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "earlier answer"}],
    }
    conversation = sdk.conversations.create(items=[assistant])  # type: ignore[list-item]
    listed = strict(list(sdk.conversations.items.list(conversation.id)))
    assert listed[0]["content"] == [
        {"type": "output_text", "text": "earlier answer", "annotations": []}
    ]
    response = sdk.responses.create(model="m", input=[assistant, {"role": "user", "content": "x"}])  # type: ignore[list-item]
    (first, _) = sdk.responses.input_items.list(response.id, order="asc")
    assert first.content[0].annotations == []  # type: ignore[union-attr]


def test_metadata_that_would_pass_the_budget_is_refused() -> None:
    """Metadata updates were charged but not checked: every conversation could grow
    by its 16 keys of 512 characters past --conversation-budget."""
    big = {f"k{n}": "v" * 512 for n in range(16)}
    with (
        running_server(conversation_budget=4096) as server,
        OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk,
    ):
        conversation = sdk.conversations.create(items=[{"role": "user", "content": "x" * 1500}])
        with pytest.raises(InternalServerError) as refused:
            sdk.conversations.update(conversation.id, metadata=big)
        assert refused.value.status_code == 503
        assert "--conversation-budget" in refused.value.message
        assert sdk.conversations.retrieve(conversation.id).metadata == {}
        assert server.server.engine.conversations.nbytes <= 4096
        # Smaller metadata fits; shrinking it never needs room.
        sdk.conversations.update(conversation.id, metadata={"k": "v" * 100})
        sdk.conversations.update(conversation.id, metadata={"k": "v"})
        assert sdk.conversations.retrieve(conversation.id).metadata == {"k": "v"}
