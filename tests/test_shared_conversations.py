"""Conversations shared between processes through a real Redis (`--redis-url`)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis

from tests.redis_support import AnswerDropper, paused, redis_server
from tests.support import RunningServer, WSClient, output_text, running_server
from tests.test_conversations import strict
from tests.test_shared_store_serve import two_servers
from warmsocket import conversations as conversations_module
from warmsocket import shared_store, write_retry
from warmsocket._core import Items
from warmsocket.conversations import Conversations
from warmsocket.shared_conversations import SharedConversations
from warmsocket.shared_store import SharedStore

KEY = {"Authorization": "Bearer sk-test"}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)


def conversations(server: RunningServer) -> Conversations:
    return server.server.engine.conversations


def written(server: RunningServer) -> None:
    """Wait until the server's additions of responses are written to Redis."""
    store = conversations(server)

    async def drained() -> None:
        if store._writes is not None:
            await store._writes.join()

    asyncio.run_coroutine_threadsafe(drained(), server.loop).result(10)


def texts(items: list[dict[str, Any]]) -> list[str]:
    return [part["text"] for item in items for part in item.get("content", [])]


def test_every_process_serves_every_conversation(redis_url: str) -> None:
    """Made on A; read, changed and continued on B, and on A again: each process sees
    the others' changes at once (its copy is checked against Redis' version)."""
    with two_servers(redis_url) as (a, b), client(a) as on_a, client(b) as on_b:
        made = on_a.conversations.create(
            items=[{"role": "user", "content": "one"}], metadata={"k": "v"}
        )
        assert on_b.conversations.retrieve(made.id).metadata == {"k": "v"}
        on_b.conversations.items.create(made.id, items=[{"role": "user", "content": "two"}])
        on_a.conversations.update(made.id, metadata={"k": "w"})
        assert on_b.conversations.retrieve(made.id).metadata == {"k": "w"}
        answer = on_a.responses.create(model="m", input="/transcript", conversation=made.id)
        assert answer.output_text.splitlines() == ["user: one", "user: two", "user: /transcript"]
        written(a)
        listed = strict(list(on_b.conversations.items.list(made.id, order="asc")))
        assert texts(listed) == ["one", "two", "/transcript", answer.output_text]
        # B continues it, over WebSocket; A lists what B added, and deletes an item.
        with WSClient(b.ws_url, additional_headers=KEY) as ws:
            again = ws.turn(input="/transcript", conversation=made.id)
        first_lines = answer.output_text.splitlines()
        assert output_text(again).splitlines() == [
            *first_lines,
            "assistant: " + first_lines[0],
            *first_lines[1:],
            "user: /transcript",
        ]
        written(b)
        listed = strict(list(on_a.conversations.items.list(made.id, order="asc")))
        assert len(listed) == 6
        on_a.conversations.items.delete(listed[1]["id"], conversation_id=made.id)
        assert texts(strict(list(on_b.conversations.items.list(made.id, order="asc"))))[:2] == [
            "one",
            "/transcript",
        ]
        on_b.conversations.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            on_a.conversations.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            on_a.responses.create(model="m", input="x", conversation=made.id)


def test_a_response_adds_after_what_another_process_added_while_it_ran(redis_url: str) -> None:
    """A background response continues the conversation on A; meanwhile B adds an
    item, and A lists the items (its copy is read again). When the response ends its
    input and output go after B's item, on both; before, they were silently left out
    of the conversation."""
    with two_servers(redis_url) as (a, b), client(a) as on_a, client(b) as on_b:
        made = on_a.conversations.create(items=[{"role": "user", "content": "first"}])
        queued = on_a.responses.create(
            model="m", input="/sleep 800\nsecond", conversation=made.id, background=True
        )
        on_b.conversations.items.create(made.id, items=[{"role": "user", "content": "on B"}])
        assert texts(strict(list(on_a.conversations.items.list(made.id, order="asc")))) == [
            "first",
            "on B",
        ]
        for _ in range(200):
            done = on_a.responses.retrieve(queued.id)
            if done.status == "completed":
                break
            time.sleep(0.05)
        assert done.status == "completed"
        written(a)
        expected = ["first", "on B", "/sleep 800\nsecond", done.output_text]
        for each in (on_a, on_b):
            assert texts(strict(list(each.conversations.items.list(made.id, order="asc")))) == (
                expected
            )


def test_another_key_sees_no_shared_conversation(redis_url: str) -> None:
    with two_servers(redis_url) as (a, b), client(a) as on_a:
        made = on_a.conversations.create(items=[{"role": "user", "content": "mine"}])
        with openai.OpenAI(base_url=b.base_url, api_key="sk-other", max_retries=0) as other:
            with pytest.raises(openai.NotFoundError):
                other.conversations.retrieve(made.id)
            with pytest.raises(openai.NotFoundError):
                other.conversations.delete(made.id)
        assert on_a.conversations.retrieve(made.id).id == made.id


def test_copies_stay_within_the_budget_and_are_read_again(redis_url: str) -> None:
    """A process keeps copies of the conversations it used within its budget, dropping
    the least recently used; a dropped one is read from Redis when used again."""
    with two_servers(redis_url, conversation_budget=4096) as (a, _b), client(a) as on_a:
        made = [
            on_a.conversations.create(items=[{"role": "user", "content": str(i) * 1500}])
            for i in range(4)
        ]
        store = conversations(a)
        assert store.nbytes <= 4096 and len(store) < 4
        for conversation, digit in zip(made, "0123", strict=True):
            items = list(on_a.conversations.items.list(conversation.id))
            assert texts(strict(items)) == [digit * 1500]


def test_a_redis_outage_is_a_retriable_503_and_nothing_is_lost(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.3)
    with two_servers(redis_url) as (a, _b), client(a) as on_a:
        made = on_a.conversations.create(items=[{"role": "user", "content": "kept"}])
        with paused(redis_url):
            with pytest.raises(openai.InternalServerError) as down:
                on_a.conversations.items.list(made.id)
            assert down.value.status_code == 503
            assert f"while loading '{made.id}'" in down.value.message
            with pytest.raises(openai.InternalServerError) as down:
                on_a.conversations.create()  # (no id was given out: none is named)
            assert down.value.status_code == 503
            assert "did not answer. This is temporary" in down.value.message
            with pytest.raises(openai.InternalServerError):
                on_a.responses.create(model="m", input="x", conversation=made.id)
            with WSClient(a.ws_url, additional_headers=KEY) as ws:
                refused = ws.turn(input="x", conversation=made.id)
            assert refused[-1]["type"] == "error" and refused[-1]["status"] == 503
            assert refused[-1]["error"]["param"] == "conversation"
        assert texts(strict(list(on_a.conversations.items.list(made.id)))) == ["kept"]
        shared = a.server.engine.shared
        assert isinstance(shared, SharedStore)
        assert shared.conversation_board.errors >= 2
        assert a.call(shared.stats)["errors"] >= shared.conversation_board.errors


def test_a_change_waiting_for_additions_redis_does_not_answer_is_a_503(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background response on the conversation ended while Redis does not answer
    (SIGSTOP): its addition waits to be written. A change to the conversation is then
    a retriable 503 within about twice the socket timeout; before, it hung until the
    client gave up. Nothing is lost once Redis answers."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.3)
    with two_servers(redis_url) as (a, _b), client(a) as on_a:
        made = on_a.conversations.create(items=[{"role": "user", "content": "kept"}])
        queued = on_a.responses.create(
            model="m", input="/sleep 300\nlater", conversation=made.id, background=True
        )
        with paused(redis_url):
            pending = 0
            for _ in range(200):
                pending = a.call(lambda: conversations(a)._by_id[made.id].pending)
                if pending:
                    break
                time.sleep(0.05)
            assert pending  # the response ended: its addition waits for Redis
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError) as down:
                on_a.with_options(timeout=8).conversations.update(made.id, metadata={"k": "v"})
            assert down.value.status_code == 503 and time.monotonic() - started < 5
        assert on_a.conversations.update(made.id, metadata={"k": "v"}).metadata == {"k": "v"}
        written(a)
        done = on_a.responses.retrieve(queued.id)
        listed = texts(strict(list(on_a.conversations.items.list(made.id, order="asc"))))
        assert listed == ["kept", "/sleep 300\nlater", done.output_text]


def test_an_addition_redis_does_not_answer_is_written_once_it_does(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response's addition written behind while Redis does not answer (SIGSTOP) is
    tried again until it does, and is then in Redis and in every copy."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)

    async def main() -> tuple[list[str], list[str], int]:
        shared = SharedStore.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
        await shared.start()
        board = shared.conversation_board
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        with paused(redis_url):
            store.extend(made, Items.from_objects([_message("b")]))
            await asyncio.sleep(1.5)  # tries of 2 x 0.2 s, each timed out
        in_redis, copy = await _after_writes(store, board, made.id)
        await store.aclose()
        await shared.aclose()
        return in_redis, copy, store.write_errors

    in_redis, copy, write_errors = asyncio.run(main())
    assert in_redis == ["a", "b"] and copy == ["a", "b"]
    assert write_errors == 0


def test_an_addition_whose_answer_was_lost_is_not_added_twice(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis did a response's addition but its answer was lost: the client timed out
    and tried again (redis-py's retry, then `write_retry`'s). The items are in the
    conversation once, and the copy, read again, is Redis' conversation."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)

    async def main() -> tuple[list[str], list[str], int]:
        dropper = AnswerDropper(redis_url)
        shared = SharedStore.from_url(await dropper.start(), prefix=f"t{uuid.uuid4().hex[:8]}")
        await shared.start()
        board = shared.conversation_board
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [_message("a")]})
        store.extend(made, Items.from_objects([_message("b")]))  # (Redis has the script)
        await _after_writes(store, board, made.id)
        dropper.dropping = True
        store.extend(made, Items.from_objects([_message("c")]))
        await asyncio.sleep(1.0)  # done by Redis, not answered; tried again
        dropper.dropping = False
        in_redis, copy = await _after_writes(store, board, made.id)
        await store.aclose()
        await shared.aclose()
        await dropper.aclose()
        return in_redis, copy, store.write_errors

    in_redis, copy, write_errors = asyncio.run(main())
    assert in_redis == ["a", "b", "c"] and copy == ["a", "b", "c"]
    assert write_errors == 0


async def _given_up(store: Conversations) -> None:
    """Wait until an addition was given up (the whole copy is then tried, again and
    again, until Redis answers)."""
    for _ in range(500):
        if store.write_errors:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not given up in time")


async def _store_on(redis_url: str, prefix: str) -> tuple[SharedStore, Conversations]:
    shared = SharedStore.from_url(redis_url, prefix=prefix)
    await shared.start()
    board = shared.conversation_board
    return shared, Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)


def test_an_addition_given_up_leaves_no_hole_once_redis_answers(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --redis-write-retry an addition Redis did not answer is given up. Before,
    the next addition went in after it, and every other process read the
    conversation without its items; now the copy is written whole."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    monkeypatch.setattr(write_retry, "WRITE_RETRY_SECONDS", 0.3)
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[list[str], list[str], list[str], int]:
        shared, store = await _store_on(redis_url, prefix)
        made = await store.create("o", {"items": [_message("a")]})
        with paused(redis_url):
            store.extend(made, Items.from_objects([_message("b")]))
            await _given_up(store)
        store.extend(made, Items.from_objects([_message("c")]))
        in_redis, copy = await _after_writes(store, shared.conversation_board, made.id)
        other_shared, other = await _store_on(redis_url, prefix)
        elsewhere = await other.fresh("o", made.id)
        texts = [item["content"] for item in elsewhere.items.to_objects()]
        for each in (store, other):
            await each.aclose()
        for each_shared in (shared, other_shared):
            await each_shared.aclose()
        return in_redis, copy, texts, store.write_errors

    in_redis, copy, elsewhere, write_errors = asyncio.run(main())
    assert in_redis == copy == elsewhere == ["a", "b", "c"]
    assert write_errors >= 1  # the addition (and the tries of the whole copy since)


def test_an_addition_not_queued_is_written_with_the_whole_conversation(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the queue's bound, an addition is not queued: its items reach Redis with
    the whole conversation once Redis answers, with no further addition needed."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    monkeypatch.setattr(conversations_module, "MAX_QUEUED_ADDITIONS", 1)

    async def main() -> tuple[list[str], list[str], int]:
        shared, store = await _store_on(redis_url, f"t{uuid.uuid4().hex[:8]}")
        made = await store.create("o", {"items": [_message("a")]})
        with paused(redis_url):
            store.extend(made, Items.from_objects([_message("b")]))  # queued
            store.extend(made, Items.from_objects([_message("c")]))  # past the bound
            store.extend(made, Items.from_objects([_message("d")]))
            await asyncio.sleep(0.5)
        in_redis, copy = await _after_writes(store, shared.conversation_board, made.id)
        await store.aclose()
        await shared.aclose()
        return in_redis, copy, store.write_errors

    in_redis, copy, write_errors = asyncio.run(main())
    assert in_redis == copy == ["a", "b", "c", "d"]
    assert write_errors == 1


def test_items_given_up_while_another_process_added_go_after_its_items(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process was cut off from Redis (its addition never reached it) while
    another added to the conversation: its items go in after the other's, as an
    addition written late does; nothing is lost, nothing is marked."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    monkeypatch.setattr(write_retry, "WRITE_RETRY_SECONDS", 0.3)
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[list[str], list[str], bool]:
        proxy = AnswerDropper(redis_url)
        shared, store = await _store_on(await proxy.start(), prefix)
        other_shared, other = await _store_on(redis_url, prefix)
        made = await store.create("o", {"items": [_message("a")]})
        proxy.cut()
        store.extend(made, Items.from_objects([_message("late")]))
        await _given_up(store)
        proxy.mend()
        await other.add_items("o", made.id, {"items": [_message("elsewhere")]})
        store.extend(made, Items.from_objects([_message("c")]))
        in_redis, copy = await _after_writes(store, shared.conversation_board, made.id)
        incomplete = (await other.fresh("o", made.id)).incomplete
        for each in (store, other):
            await each.aclose()
        for each_shared in (shared, other_shared):
            await each_shared.aclose()
        await proxy.aclose()
        return in_redis, copy, incomplete

    in_redis, copy, incomplete = asyncio.run(main())
    assert in_redis == copy == ["a", "elsewhere", "late", "c"]
    assert not incomplete


def test_a_create_refuses_to_continue_an_incomplete_conversation(redis_url: str) -> None:
    with two_servers(redis_url) as (a, _b), client(a) as on_a:
        made = on_a.conversations.create(items=[{"role": "user", "content": "a"}])
        shared = a.server.engine.shared
        assert isinstance(shared, SharedStore)
        meta_key, _items_key = shared.conversation_board._keys(a_owner(a), made.id)
        with redis.Redis.from_url(redis_url) as direct:
            direct.hset(meta_key, mapping={"incomplete": 1})
            direct.hincrby(meta_key, "version", 1)
        with pytest.raises(openai.ConflictError) as refused:
            on_a.responses.create(model="m", input="x", conversation=made.id)
        error = refused.value.body
        assert isinstance(error, dict) and error["code"] == "conversation_incomplete"
        # Its items can still be listed, to start a new conversation from.
        assert texts(strict(list(on_a.conversations.items.list(made.id)))) == ["a"]


def a_owner(server: RunningServer) -> str:
    (owner,) = {c.owner for c in conversations(server)._by_id.values()}
    return owner


def test_a_create_sent_twice_creates_once(redis_url: str) -> None:
    """A create tried again after its answer was lost (redis-py's retry) leaves the
    conversation as the first made it."""

    async def main() -> list[str]:
        shared = SharedStore.from_url(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
        board = shared.conversation_board
        for _ in range(2):
            await board.create("o", "conv_1", 1, b"{}", [("msg_1", b'{"content":"a"}')])
        stored = await board.read("o", "conv_1")
        await shared.client.aclose()
        assert stored is not None and stored.version == 1
        return [json.loads(item)["content"] for _id, item in stored.entries]

    assert asyncio.run(main()) == ["a"]


def _message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def _after_writes(
    store: Conversations, board: SharedConversations, conv_id: str
) -> tuple[list[str], list[str]]:
    """Once the additions are written: the texts in Redis, and in the copy."""
    assert store._writes is not None
    await asyncio.wait_for(store._writes.join(), 10)
    stored = await board.read("o", conv_id)
    assert stored is not None
    in_redis = [json.loads(item)["content"] for _id, item in stored.entries]
    fresh = await store.fresh("o", conv_id)
    return in_redis, [item["content"] for item in fresh.items.to_objects()]


def test_the_keys_expire_with_the_ttl(redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with (
        running_server(shared=SharedStore.from_url(redis_url, prefix=prefix, ttl_seconds=50)) as a,
        client(a) as on_a,
    ):
        made = on_a.conversations.create(items=[{"role": "user", "content": "x"}])
    with redis.Redis.from_url(redis_url) as raw:
        keys = sorted(raw.keys(f"{prefix}:c*"))
        assert [k.decode().split(":")[1] for k in keys] == ["c", "ci"]
        assert all(0 < raw.ttl(k) <= 50 for k in keys)
        assert any(made.id in k.decode() for k in keys)


def test_item_ids_with_spaces_and_percents_are_kept_apart(redis_url: str) -> None:
    """A client chooses item ids: one with a space (or what looks escaped) is read
    back as it was on another process, and deleting one leaves its look-alikes."""
    odd = ["x y", "x", "x%20y", "x ", "%", " lead"]
    with two_servers(redis_url) as (a, b), client(a) as on_a, client(b) as on_b:
        made = on_a.conversations.create(
            items=[
                {"type": "message", "role": "user", "id": item_id, "content": item_id}
                for item_id in odd
            ]
        )
        listed = strict(list(on_b.conversations.items.list(made.id, order="asc")))
        assert [item["id"] for item in listed] == odd
        assert texts(listed) == odd
        on_b.conversations.items.delete("x", conversation_id=made.id)
        kept = [i for i in odd if i != "x"]
        for side in (on_a, on_b):
            listed = strict(list(side.conversations.items.list(made.id, order="asc")))
            assert [item["id"] for item in listed] == kept
        answer = on_b.responses.create(model="m", input="/transcript", conversation=made.id)
        assert answer.output_text.splitlines()[:-1] == [f"user: {i}" for i in kept]


def test_an_entry_written_before_ids_were_escaped_can_still_be_deleted(redis_url: str) -> None:
    """An item id with a '%' was written as it is before ids were escaped; the delete
    matched only the escaped form, and answered 404 until the conversation expired."""
    with two_servers(redis_url) as (a, b), client(a) as on_a, client(b) as on_b:
        made = on_a.conversations.create(
            items=[{"type": "message", "role": "user", "id": "p%q", "content": "old"}]
        )
        with redis.Redis.from_url(redis_url) as plain:
            (key,) = plain.keys(f"*:ci:*:{made.id}")
            (entry,) = plain.lrange(key, 0, -1)
            assert entry.startswith(b"p%25q ")
            plain.lset(key, 0, b"p%q " + entry.partition(b" ")[2])  # the old form
            plain.hincrby(key.replace(b":ci:", b":c:"), "version", 1)
        assert [i.id for i in on_b.conversations.items.list(made.id)] == ["p%q"]
        on_b.conversations.items.delete("p%q", conversation_id=made.id)
        assert list(on_a.conversations.items.list(made.id)) == []
