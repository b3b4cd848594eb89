"""Two warmsocket servers sharing stored responses through a real Redis server."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx2 as httpx
import msgpack  # type: ignore[import-untyped]
import openai
import pytest
import redis

from tests.redis_support import paused, redis_server
from tests.support import (
    RunningServer,
    WSClient,
    check_sse_event,
    check_ws_event,
    output_text,
    running_server,
)
from tests.test_cli import _stop, run, start_serve
from warmsocket import background, shared_background, shared_store, write_retry
from warmsocket.background import BackgroundRun
from warmsocket.conversations import Conversation
from warmsocket.shared_store import RedisClusterUnsupported, SharedStore

AUTH = {"Authorization": "Bearer sk-test"}
WARMSOCKET = os.path.join(os.path.dirname(sys.executable), "warmsocket")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@contextmanager
def two_servers(redis_url: str, **config: Any) -> Iterator[tuple[RunningServer, RunningServer]]:
    """Servers A and B on one Redis, under a key prefix of their own."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with (
        running_server(shared=SharedStore.from_url(redis_url, prefix=prefix), **config) as a,
        running_server(shared=SharedStore.from_url(redis_url, prefix=prefix), **config) as b,
    ):
        yield a, b


def flush(server: RunningServer) -> None:
    """Wait until server's write-behind queue is written (it normally takes ms)."""
    shared = server.server.engine.shared
    assert isinstance(shared, SharedStore)
    asyncio.run_coroutine_threadsafe(shared.flush(), server.loop).result(10)


def shared_stats(server: RunningServer) -> dict[str, int]:
    shared = server.server.engine.shared
    assert isinstance(shared, SharedStore)
    stats: dict[str, int] = server.call(shared.stats)
    return stats


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def transcript(events: list[dict[str, Any]]) -> list[str]:
    return output_text(events).splitlines()


SDK = Callable[..., openai.OpenAI]


@pytest.fixture
def sdk() -> Iterator[SDK]:
    """openai.OpenAI(server, api_key="sk-test") for a server; all closed at the end."""
    clients: list[openai.OpenAI] = []

    def make(server: RunningServer, api_key: str = "sk-test") -> openai.OpenAI:
        client = openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_a_websocket_chain_continues_on_another_process(redis_url: str) -> None:
    with two_servers(redis_url) as (a, b), WSClient(a.ws_url) as ws_a:
        warm = ws_a.turn(generate=False, instructions="be brief")  # warm-up, stored too
        first = ws_a.turn(previous_response_id=warm[-1]["response"]["id"], input="hello")
        second = ws_a.turn(previous_response_id=first[-1]["response"]["id"], input="again")
        flush(a)
        with WSClient(b.ws_url) as ws_b:
            events = ws_b.turn(
                previous_response_id=second[-1]["response"]["id"], input="/transcript"
            )
            assert transcript(events) == [
                "user: hello",
                "assistant: You said: hello",
                "user: again",
                "assistant: You said: again",
                "user: /transcript",
            ]
            # The chain is local on B now: the next turn needs no load.
            more = ws_b.turn(previous_response_id=events[-1]["response"]["id"], input="x")
            assert output_text(more) == "You said: x"
        stats = shared_stats(b)
        assert (stats["load_hits"], stats["load_misses"], stats["loaded"]) == (1, 0, 3)
        assert shared_stats(a)["published"] == 3
        metrics = httpx.get(f"{b.base_url}/metrics").text
        assert 'warmsocket_shared_store_loads_total{result="hit"} 1' in metrics
        assert "warmsocket_shared_store_published_total 2" in metrics  # B's two turns


def test_a_load_keeps_the_order_of_the_messages_after_it(redis_url: str) -> None:
    with two_servers(redis_url) as (a, b):
        with WSClient(a.ws_url) as ws_a:
            remote = ws_a.turn(input="on a")[-1]["response"]["id"]
        flush(a)
        with WSClient(b.ws_url) as ws_b:
            # Sent back to back: the second (same lane) and the third (another lane)
            # must not overtake the first while its parent loads from Redis.
            ws_b.create(previous_response_id=remote, input="first")
            ws_b.create(input="second")
            ws_b.create(input="third", stream_id="other")
            events = []
            while sum(e["type"] == "response.completed" for e in events) < 3:
                events.append(ws_b.recv())
            created = [e["response"] for e in events if e["type"] == "response.created"]
            assert created[0]["previous_response_id"] == remote
            # Lane FIFO: "second" starts after "first" completed ("other" runs alongside).
            lane = [e["type"] for e in events if e.get("stream_id") is None]
            assert lane.index("response.completed") < lane.index("response.created", 1)
            completed = [e for e in events if e["type"] == "response.completed"]
            assert output_text(completed[:1]) == "You said: first"


def test_http_retrieve_input_items_and_continue_on_another_process(
    redis_url: str, sdk: SDK
) -> None:
    with two_servers(redis_url) as (a, b):
        first = sdk(a).responses.create(model="m", input="hello", instructions="be nice")
        second = sdk(a).responses.create(
            model="m",
            previous_response_id=first.id,
            input=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        )
        flush(a)
        on_b = sdk(b)
        fetched = on_b.responses.retrieve(second.id)
        assert fetched.output_text == "You said: b"
        assert fetched.previous_response_id == first.id
        assert fetched.instructions is None and on_b.responses.retrieve(first.id).instructions
        items = on_b.responses.input_items.list(second.id, order="asc")
        assert [i.content[0].text for i in items.data] == ["a", "b"]  # type: ignore[union-attr]
        follow = on_b.responses.create(
            model="m", previous_response_id=second.id, input="/transcript"
        )
        assert follow.output_text.splitlines() == [
            "user: hello",
            "assistant: You said: hello",
            "user: a",
            "user: b",
            "assistant: You said: b",
            "user: /transcript",
        ]


def test_input_tokens_counts_a_chain_made_on_another_process(redis_url: str, sdk: SDK) -> None:
    with two_servers(redis_url) as (a, b):
        first = sdk(a).responses.create(model="m", input="count me " * 30)
        flush(a)
        on_b = sdk(b).responses.input_tokens.count(previous_response_id=first.id, input="more")
        on_a = sdk(a).responses.input_tokens.count(previous_response_id=first.id, input="more")
        assert on_b.input_tokens == on_a.input_tokens > 0
        assert shared_stats(b)["loaded"] == 1


def test_a_background_response_is_shared_once_it_is_stored(redis_url: str, sdk: SDK) -> None:
    with two_servers(redis_url) as (a, b):
        created = sdk(a).responses.create(model="m", input="later", background=True)
        deadline = time.monotonic() + 10
        while sdk(a).responses.retrieve(created.id).status != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        flush(a)
        on_b = sdk(b).responses.retrieve(created.id)
        assert on_b.background is True and on_b.output_text == "You said: later"


def board_flush(server: RunningServer) -> None:
    """Wait until server's background board has written what it queued."""
    shared = server.server.engine.shared
    assert isinstance(shared, SharedStore)
    asyncio.run_coroutine_threadsafe(shared.background_board.flush(), server.loop).result(10)


def status_on(client: openai.OpenAI, rid: str) -> str | None:
    try:
        return client.responses.retrieve(rid).status
    except openai.NotFoundError:
        return None


def test_a_background_response_running_elsewhere_is_seen_cancelled_and_deleted(
    redis_url: str, sdk: SDK
) -> None:
    """Replicas behind a load balancer: the client's polls, cancel and delete land on
    a process that does not run the response."""
    with two_servers(redis_url) as (a, b):
        on_a, on_b = sdk(a), sdk(b)
        created = on_a.responses.create(model="m", input="/sleep 20000\nlater", background=True)
        # What A shows, B shows: in_progress once the model started.
        eventually(lambda: status_on(on_b, created.id) == "in_progress")
        seen = on_b.responses.retrieve(created.id)
        assert seen.id == created.id and seen.background is True
        # Another owner sees nothing of it.
        with pytest.raises(openai.NotFoundError):
            sdk(b, api_key="sk-other").responses.retrieve(created.id)
        # Cancelled from B: A stops it, and both say so.
        started = time.monotonic()
        cancelled = on_b.responses.cancel(created.id)
        assert cancelled.status == "cancelled" and cancelled.id == created.id
        assert time.monotonic() - started < 5
        assert on_a.responses.retrieve(created.id).status == "cancelled"
        assert a.server.metrics.turns["cancelled"] == 1
        board_flush(a)
        assert on_b.responses.retrieve(created.id).status == "cancelled"
        assert on_b.responses.cancel(created.id).status == "cancelled"  # again: as it is
        # Not stored, so not continuable anywhere.
        with pytest.raises(openai.BadRequestError):
            on_b.responses.create(model="m", input="x", previous_response_id=created.id)
        # Deleted from B: gone on both, and A forgot its run.
        on_b.responses.delete(created.id)
        board_flush(b)
        eventually(lambda: status_on(on_a, created.id) is None)
        board_flush(a)
        assert status_on(on_b, created.id) is None
        assert a.call(lambda: a.server.http.background.stats())["finished"] == 0


def test_a_background_responses_input_is_listed_on_every_process(redis_url: str, sdk: SDK) -> None:
    """`input_items` of a background response running on A, asked of B: a 404 before
    (its input was A's alone until stored), also for a cancelled one, for good. Now
    listed as A lists it, and deleted from Redis with the response."""
    with two_servers(redis_url) as (a, b):
        on_a, on_b = sdk(a), sdk(b)
        sent = [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]},
            {"role": "user", "content": "/sleep 20000"},
        ]
        created = on_a.responses.create(model="m", input=sent, background=True)  # type: ignore[arg-type]
        eventually(lambda: status_on(on_b, created.id) == "in_progress")
        on_a_items = [item.model_dump() for item in on_a.responses.input_items.list(created.id)]
        on_b_items = [item.model_dump() for item in on_b.responses.input_items.list(created.id)]
        assert on_b_items == on_a_items and len(on_b_items) == 2
        assert on_b.responses.cancel(created.id).status == "cancelled"
        board_flush(a)
        listed = on_b.responses.input_items.list(created.id, order="asc")
        assert [item.model_dump() for item in listed] == on_a_items[::-1]
        on_b.responses.delete(created.id)
        shared = b.server.engine.shared
        assert isinstance(shared, SharedStore)
        with redis.Redis.from_url(redis_url) as client:
            assert not list(client.scan_iter(f"{shared.prefix}:bi:*"))
        with pytest.raises(openai.NotFoundError):
            on_b.responses.input_items.list(created.id)


def test_a_cancel_whose_announcement_was_lost_still_ends_the_run(
    redis_url: str, sdk: SDK, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process that runs a background response missed the cancel's announcement
    (trimmed from the stream while it could not read, say): the cancel kept in Redis
    ends the run at its next heartbeat."""
    monkeypatch.setattr(background, "HEARTBEAT_SECONDS", 0.3)
    with two_servers(redis_url) as (a, b):
        on_a = sdk(a)
        created = on_a.responses.create(model="m", input="/sleep 20000\nlater", background=True)
        eventually(lambda: status_on(on_a, created.id) == "in_progress")
        board = b.server.engine.shared.background_board  # type: ignore[union-attr]
        owner = a.call(lambda: next(iter(a.server.http.background._running.values())).owner)
        # As `request_cancel` does, less the announcement.
        with redis.Redis.from_url(redis_url) as client:
            client.set(board._cancel_key(owner, created.id), 1, ex=30)
        eventually(lambda: status_on(on_a, created.id) == "cancelled", timeout=5)
        assert a.server.metrics.turns["cancelled"] == 1


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    events = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")
    ]
    for event in events:
        check_sse_event(event)
    return events


def events_key(redis_url: str, server: RunningServer, rid: str) -> str:
    """The Redis key of a background response's events."""
    shared = server.server.engine.shared
    assert isinstance(shared, SharedStore)
    with redis.Redis.from_url(redis_url) as r:
        keys = list(r.scan_iter(f"{shared.prefix}:be:*:{rid}"))
    assert len(keys) == 1, keys
    return str(keys[0].decode())


def test_a_background_response_is_streamed_again_on_another_process(
    redis_url: str, sdk: SDK
) -> None:
    """The client reconnects to the stream of a running background response through
    a load balancer: the process it lands on streams the events so far, then live."""
    with two_servers(redis_url) as (a, b):
        on_a, on_b = sdk(a), sdk(b)
        created = on_a.responses.create(model="m", input="/sleep 1500\nlater", background=True)
        seen: list[Any] = []
        with on_b.responses.retrieve(created.id, stream=True) as stream:
            for event in stream:
                if not seen:  # the first events come while it runs
                    assert on_a.responses.retrieve(created.id).status != "completed"
                seen.append(event)
        assert [e.type for e in seen[:3]] == [
            "response.created",
            "response.queued",
            "response.in_progress",
        ]
        assert seen[-1].type == "response.completed"
        assert seen[-1].response.output_text == "You said: /sleep 1500\nlater"
        # The same events, in the same order, as the process that ran it streams them.
        with (
            httpx.Client(base_url=a.base_url, headers=AUTH) as on_a_http,
            httpx.Client(base_url=b.base_url, headers=AUTH) as on_b_http,
        ):
            local = sse_events(on_a_http.get(f"responses/{created.id}", params={"stream": "true"}))
            again = sse_events(on_b_http.get(f"responses/{created.id}", params={"stream": "true"}))
            tail = sse_events(
                on_b_http.get(
                    f"responses/{created.id}", params={"stream": "true", "starting_after": "3"}
                )
            )
            assert [e.model_dump(exclude_unset=True) for e in seen] == local == again
            assert tail == local[4:]
            # Another owner's request finds nothing to stream.
            other = on_b_http.get(
                f"responses/{created.id}",
                params={"stream": "true"},
                headers={"Authorization": "Bearer sk-other"},
            )
            assert other.status_code == 404
        # After the run is forgotten on A, A streams them from Redis too.
        a.call(lambda: a.server.http.background._finished.clear())
        with httpx.Client(base_url=a.base_url, headers=AUTH) as on_a_http:
            assert (
                sse_events(on_a_http.get(f"responses/{created.id}", params={"stream": "true"}))
                == local
            )
        # Deleted: nothing to stream anywhere.
        on_b.responses.delete(created.id)
        board_flush(b)
        with httpx.Client(base_url=b.base_url, headers=AUTH) as on_b_http:
            gone = on_b_http.get(f"responses/{created.id}", params={"stream": "true"})
        assert gone.status_code == 404


def test_a_background_response_is_on_every_process_once_created(
    redis_url: str, sdk: SDK, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create is answered once its response is on the board, however slow Redis
    is (within `SHARE_WAIT_SECONDS`): a client that polls or streams it next through
    another process finds it there, never 'not found'."""
    written = shared_background.BackgroundBoard._write

    async def slow_write(board: shared_background.BackgroundBoard, ops: Any) -> None:
        await asyncio.sleep(0.3)
        await written(board, ops)

    monkeypatch.setattr(shared_background.BackgroundBoard, "_write", slow_write)
    with two_servers(redis_url) as (a, b):
        on_a, on_b = sdk(a), sdk(b)
        for streamed in (False, True):
            started = time.monotonic()
            created = on_a.responses.create(model="m", input="/sleep 3000\nx", background=True)
            assert 0.3 <= time.monotonic() - started < background.SHARE_WAIT_SECONDS + 0.5
            if streamed:
                with on_b.responses.retrieve(created.id, stream=True) as stream:
                    first = next(iter(stream))
                assert first.type == "response.created"
            else:
                assert on_b.responses.retrieve(created.id).status in {"queued", "in_progress"}
            on_a.responses.cancel(created.id)


def test_a_stream_followed_elsewhere_ends_when_its_events_go(redis_url: str, sdk: SDK) -> None:
    """A follower on another process is not left waiting for a run that is gone:
    deleted, or expired because its process died."""
    with two_servers(redis_url) as (a, b):
        on_a = sdk(a)
        created = on_a.responses.create(model="m", input="/sleep 20000\nx", background=True)
        eventually(lambda: status_on(on_a, created.id) == "in_progress")
        board_flush(a)
        key = events_key(redis_url, a, created.id)
        with httpx.Client(base_url=b.base_url, headers=AUTH, timeout=10) as http:
            with http.stream(
                "GET", f"responses/{created.id}", params={"stream": "true"}
            ) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[6:])["type"] == "response.created"
                # As if its process died: its record and its events expire.
                with redis.Redis.from_url(redis_url) as r:
                    assert r.delete(key, key.replace(":be:", ":b:", 1)) == 2
                started = time.monotonic()
                rest = list(lines)
            waited = time.monotonic() - started
        assert waited < 3 * shared_background.FOLLOW_BLOCK_MS / 1000
        assert not any('"response.completed"' in line for line in rest)
        on_a.responses.cancel(created.id)


def test_a_gap_in_the_shared_events_ends_the_stream_before_it(redis_url: str, sdk: SDK) -> None:
    """Events lost in a Redis outage are not skipped over: the stream ends before them."""
    with two_servers(redis_url) as (a, b):
        on_a = sdk(a)
        created = on_a.responses.create(model="m", input="complete", background=True)
        eventually(lambda: status_on(on_a, created.id) == "completed")
        board_flush(a)
        key = events_key(redis_url, a, created.id)
        with redis.Redis.from_url(redis_url) as r:
            assert r.xdel(key, "0-5") == 1  # sequence number 4
        with httpx.Client(base_url=b.base_url, headers=AUTH) as http:
            events = sse_events(http.get(f"responses/{created.id}", params={"stream": "true"}))
        assert [e["sequence_number"] for e in events] == [0, 1, 2, 3]


def test_a_stream_asked_from_past_its_end_ends_at_once_elsewhere(redis_url: str, sdk: SDK) -> None:
    """A client resumes a stream that has ended from past its last event (it saw them
    all, or asks for more than there were): on another process, as on the one that
    ran it, the stream ends at once, empty, rather than be held until its events
    expire (`RETAIN_SECONDS`)."""
    with two_servers(redis_url) as (a, b):
        on_a = sdk(a)
        created = on_a.responses.create(model="m", input="x", background=True)
        eventually(lambda: status_on(on_a, created.id) == "completed")
        board_flush(a)
        with httpx.Client(base_url=b.base_url, headers=AUTH, timeout=5) as http:
            events = sse_events(http.get(f"responses/{created.id}", params={"stream": "true"}))
            last = events[-1]["sequence_number"]
            for after in (last, last + 1, last + 50, 2**63 - 1):
                started = time.monotonic()
                tail = http.get(
                    f"responses/{created.id}", params={"stream": "true", "starting_after": after}
                )
                took = time.monotonic() - started
                assert (tail.status_code, sse_events(tail)) == (200, []), after
                assert took < shared_background.FOLLOW_BLOCK_MS / 1000, after


def test_a_starting_after_past_any_sequence_number_is_refused(redis_url: str, sdk: SDK) -> None:
    """`starting_after` larger than any sequence number (a 64-bit integer) is a 400
    naming it, on the process that runs the response and on another, rather than an
    empty stream there and a Redis error counted (an alert on Redis' health)."""
    with two_servers(redis_url) as (a, b):
        on_a = sdk(a)
        created = on_a.responses.create(model="m", input="x", background=True)
        eventually(lambda: status_on(on_a, created.id) == "completed")
        board_flush(a)
        for server in (a, b):
            with httpx.Client(base_url=server.base_url, headers=AUTH) as http:
                for after in (str(2**63), "99999999999999999999"):
                    refused = http.get(
                        f"responses/{created.id}",
                        params={"stream": "true", "starting_after": after},
                    )
                    assert refused.status_code == 400, after
                    error = refused.json()["error"]
                    assert (error["type"], error["param"]) == (
                        "invalid_request_error",
                        "starting_after",
                    )
        assert shared_stats(b)["errors"] == 0


def test_a_running_response_deleted_elsewhere_is_stopped_and_never_stored(
    redis_url: str, sdk: SDK
) -> None:
    with two_servers(redis_url) as (a, b):
        on_a, on_b = sdk(a), sdk(b)
        created = on_a.responses.create(model="m", input="/sleep 20000\nlater", background=True)
        eventually(lambda: status_on(on_b, created.id) is not None)
        on_b.responses.delete(created.id)
        eventually(lambda: status_on(on_a, created.id) is None)
        assert a.server.metrics.turns["cancelled"] == 1
        board_flush(a)
        board_flush(b)
        assert status_on(on_b, created.id) is None
        with pytest.raises(openai.NotFoundError):
            on_b.responses.delete(created.id)


def test_a_response_deleted_while_it_ran_elsewhere_stays_deleted(redis_url: str, sdk: SDK) -> None:
    """B deletes a background response A runs, and A never hears of it (the
    announcement trimmed before A read it, or A stored the response just before it
    heard): the run ends and is stored there, but what A writes is deleted already;
    the other processes neither retrieve it, continue it, nor stream it again."""
    with two_servers(redis_url) as (a, b):
        on_a, on_b = sdk(a), sdk(b)
        shared = a.server.engine.shared
        assert isinstance(shared, SharedStore)
        a.call(lambda: shared._listener.cancel())  # A hears no more deletions
        created = on_a.responses.create(model="m", input="/sleep 1500\nlater", background=True)
        eventually(lambda: status_on(on_b, created.id) == "in_progress")
        on_b.responses.delete(created.id)
        eventually(lambda: status_on(on_a, created.id) == "completed")  # A ran it to its end
        flush(a)
        board_flush(a)
        assert status_on(on_b, created.id) is None
        with pytest.raises(openai.BadRequestError) as continued:
            on_b.responses.create(model="m", input="more", previous_response_id=created.id)
        assert continued.value.code == "previous_response_not_found"
        with httpx.Client(base_url=b.base_url, headers=AUTH) as http:
            again = http.get(f"responses/{created.id}", params={"stream": "true"})
        assert again.status_code == 404


def test_a_failed_background_response_is_seen_elsewhere(redis_url: str, sdk: SDK) -> None:
    with two_servers(redis_url) as (a, b):
        on_a, on_b = sdk(a), sdk(b)
        created = on_a.responses.create(model="m", input="/fail", background=True)
        eventually(lambda: status_on(on_a, created.id) == "failed")
        board_flush(a)
        failed = on_b.responses.retrieve(created.id)
        assert failed.status == "failed" and failed.error is not None
        assert failed.error.code == "server_error"
        # It outlives the run's own memory on A: A answers from the board too.
        a.call(lambda: a.server.http.background._finished.clear())
        assert on_a.responses.retrieve(created.id).status == "failed"
        assert on_b.responses.cancel(created.id).status == "failed"


def test_a_failed_response_deleted_elsewhere_is_gone_where_it_ran(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, sdk: SDK
) -> None:
    """A failed response whose run A has let go (it keeps the Response object alone),
    deleted through B: A no longer serves it, nor deletes it a second time."""
    monkeypatch.setattr(background, "MAX_FINISHED", 0)  # runs let go at once
    with two_servers(redis_url) as (a, b):
        on_a, on_b = sdk(a), sdk(b)
        created = on_a.responses.create(model="m", input="/fail", background=True)
        eventually(lambda: status_on(on_a, created.id) == "failed")
        board_flush(a)
        on_b.responses.delete(created.id)
        eventually(lambda: status_on(on_a, created.id) is None)
        assert status_on(on_b, created.id) is None
        with pytest.raises(openai.NotFoundError):
            on_a.responses.delete(created.id)


def _drop_background_record(redis_url: str, server: RunningServer, response_id: str) -> None:
    """Delete a background response's record from Redis (as when its TTL ends, or as
    if its final write never reached Redis)."""
    shared = server.server.engine.shared
    assert isinstance(shared, SharedStore)
    with redis.Redis.from_url(redis_url) as client:
        (record,) = client.scan_iter(f"{shared.prefix}:b:*:{response_id}")
        client.delete(record)


def test_a_failed_response_goes_with_its_record_where_it_ran_too(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, sdk: SDK
) -> None:
    """Once the record of a failed response is gone from Redis because its TTL ended,
    A, which ran it and has let its run go, says 'not found' as B does, rather than
    serve it on for its whole life."""
    monkeypatch.setattr(background, "MAX_FINISHED", 0)
    with two_servers(redis_url) as (a, b):
        on_a, on_b = sdk(a), sdk(b)
        shared = a.server.engine.shared
        assert isinstance(shared, SharedStore)
        shared.ttl = 1  # --redis-ttl 1: the record is written to last a second
        created = on_a.responses.create(model="m", input="/fail", background=True)
        eventually(lambda: status_on(on_a, created.id) == "failed")
        board_flush(a)
        time.sleep(1.2)  # Redis lets it go, and A's copy is as old
        assert status_on(on_a, created.id) is None
        assert status_on(on_b, created.id) is None
        with pytest.raises(openai.NotFoundError):
            on_a.responses.delete(created.id)


def test_a_failed_response_whose_record_was_lost_is_still_served_where_it_ran(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, sdk: SDK
) -> None:
    """A failed response whose record Redis does not have, within its TTL and not
    deleted (its final write was dropped from a full queue, given up, or lost at a
    shutdown), is still served by the process that ran it, as without Redis, rather
    than 'not found' everywhere; and deleted there."""
    monkeypatch.setattr(background, "MAX_FINISHED", 0)
    with two_servers(redis_url) as (a, b):
        on_a, on_b = sdk(a), sdk(b)
        created = on_a.responses.create(model="m", input="/fail", background=True)
        eventually(lambda: status_on(on_a, created.id) == "failed")
        board_flush(a)
        _drop_background_record(redis_url, a, created.id)
        assert status_on(on_a, created.id) == "failed"
        assert status_on(on_b, created.id) is None  # (B never had it)
        on_a.responses.delete(created.id)
        assert status_on(on_a, created.id) is None


def test_background_records_expire_unless_their_process_lives(redis_url: str, sdk: SDK) -> None:
    """A running response's record lives RUNNING_TTL seconds (written again while its
    process runs it); a failed or cancelled one as long as a stored response."""
    with two_servers(redis_url) as (a, _b):
        on_a = sdk(a)
        running = on_a.responses.create(model="m", input="/sleep 20000\nx", background=True)
        failed = on_a.responses.create(model="m", input="/fail", background=True)
        eventually(lambda: status_on(on_a, failed.id) == "failed")
        board_flush(a)
        shared = a.server.engine.shared
        assert isinstance(shared, SharedStore)
        with redis.Redis.from_url(redis_url) as client:
            owner = next(
                key.decode().split(":")[2]
                for key in client.scan_iter(f"{shared.prefix}:b:*:{running.id}")
            )
            ttl_running = client.ttl(f"{shared.prefix}:b:{owner}:{running.id}")
            ttl_failed = client.ttl(f"{shared.prefix}:b:{owner}:{failed.id}")
        assert 0 < ttl_running <= shared_background.RUNNING_TTL
        assert shared.ttl - 60 < ttl_failed <= shared.ttl
        on_a.responses.cancel(running.id)


def test_prefix_matched_responses_load_with_their_history(redis_url: str) -> None:
    def user(text: str) -> dict[str, str]:
        return {"role": "user", "content": text}

    with two_servers(redis_url) as (a, b):
        base = f"{a.base_url}/responses"
        r1 = httpx.post(base, json={"model": "m", "input": [user("u1"), user("u2")]}).json()
        # Re-sent history, no previous_response_id; it matches r1 (all of it) ...
        full = [user("u1"), user("u2"), *r1["output"], user("u3")]
        r2 = httpx.post(base, json={"model": "m", "input": full}).json()
        # ... and one that matches only r1's first item (the parent is `r1#1`).
        r3 = httpx.post(base, json={"model": "m", "input": [user("u1"), user("u4")]}).json()
        assert r2["previous_response_id"] is None and r3["previous_response_id"] is None
        flush(a)
        shared = a.server.engine.shared
        assert isinstance(shared, SharedStore)
        with redis.Redis.from_url(redis_url) as client:
            record = client.hgetall(f"{shared.prefix}:r:anonymous:{r3['id']}")
        assert record[b"parent"].decode() == r1["id"]  # linked to r1, of which ...
        assert msgpack.unpackb(record[b"data"])["prefix"] == 1  # ... the first item counts
        for response, sent in ((r2, ["u1", "u2", "You said: u2", "u3"]), (r3, ["u1", "u4"])):
            listed = httpx.get(
                f"{b.base_url}/responses/{response['id']}/input_items", params={"order": "asc"}
            ).json()
            assert [item["content"][0]["text"] for item in listed["data"]] == sent
            follow = httpx.post(
                f"{b.base_url}/responses",
                json={"model": "m", "previous_response_id": response["id"], "input": "/transcript"},
            ).json()
            lines = follow["output"][0]["content"][0]["text"].splitlines()
            assert [line.split(": ", 1)[1] for line in lines] == [
                *sent,
                f"You said: {sent[-1]}",
                "/transcript",
            ]


def test_delete_on_one_process_is_seen_by_the_other(redis_url: str, sdk: SDK) -> None:
    with two_servers(redis_url) as (a, b):
        made = sdk(a).responses.create(model="m", input="delete me")
        kept = sdk(a).responses.create(model="m", input="more", previous_response_id=made.id)
        flush(a)
        sdk(b).responses.delete(made.id)  # B never had it: deleted in Redis
        with pytest.raises(openai.NotFoundError):
            sdk(b).responses.delete(made.id)

        def gone_on_a() -> bool:
            reply = httpx.get(f"{a.base_url}/responses/{made.id}", headers=AUTH)
            return reply.status_code == 404

        eventually(gone_on_a)  # A heard of it (pub/sub) and dropped its copy
        with WSClient(a.ws_url, additional_headers=AUTH) as ws_a:
            error = ws_a.turn(previous_response_id=made.id, input="x")[-1]
            assert error["type"] == "error"
            assert error["error"]["code"] == "previous_response_not_found"
            # Its descendant still continues, with the deleted response's content.
            events = ws_a.turn(previous_response_id=kept.id, input="/transcript")
            assert transcript(events)[0] == "user: delete me"
        with WSClient(b.ws_url, additional_headers=AUTH) as ws_b:
            events = ws_b.turn(previous_response_id=kept.id, input="/transcript")
            assert transcript(events)[0] == "user: delete me"
            assert httpx.get(f"{b.base_url}/responses/{made.id}", headers=AUTH).status_code == 404


def test_deleted_before_it_was_written_stays_deleted(redis_url: str) -> None:
    with two_servers(redis_url) as (a, b):
        shared = a.server.engine.shared
        assert isinstance(shared, SharedStore)

        def make_and_delete() -> str:
            # Made and queued in one event-loop step: the writer has not run yet.
            cache = a.server.cache
            info = cache.create(
                "resp_tomb", owner="anonymous", input=[{"role": "user", "content": "x"}]
            )
            shared.publish(info, *cache.own_items("resp_tomb", owner="anonymous"))
            return "resp_tomb"

        rid = a.call(make_and_delete)
        assert httpx.delete(f"{a.base_url}/responses/{rid}").status_code == 200
        flush(a)
        assert httpx.get(f"{b.base_url}/responses/{rid}").status_code == 404


def test_store_false_is_never_shared(redis_url: str) -> None:
    with two_servers(redis_url) as (a, b), WSClient(a.ws_url) as ws_a:
        local = ws_a.turn(input="zero data retention", store=False)[-1]["response"]["id"]
        tainted = ws_a.turn(previous_response_id=local, input="stored on top")
        tainted_id = tainted[-1]["response"]["id"]
        flush(a)
        assert shared_stats(a)["published"] == 0
        with WSClient(b.ws_url) as ws_b:
            for rid in (local, tainted_id):
                error = ws_b.turn(previous_response_id=rid, input="x")[-1]
                assert error["error"]["code"] == "previous_response_not_found"
                assert httpx.get(f"{b.base_url}/responses/{rid}").status_code == 404
        shared = a.server.engine.shared
        assert isinstance(shared, SharedStore)
        with redis.Redis.from_url(redis_url) as client:
            assert client.keys(f"{shared.prefix}:*") == []


def test_another_owner_cannot_load_a_shared_response(redis_url: str, sdk: SDK) -> None:
    keys = frozenset({"sk-one", "sk-two"})
    with two_servers(redis_url, api_keys=keys) as (a, b):
        made = sdk(a, "sk-one").responses.create(model="m", input="private")
        flush(a)
        with pytest.raises(openai.NotFoundError):
            sdk(b, "sk-two").responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            sdk(b, "sk-two").responses.delete(made.id)
        headers = {"Authorization": "Bearer sk-two"}
        with WSClient(b.ws_url, additional_headers=headers) as ws_b:
            error = ws_b.turn(previous_response_id=made.id, input="x")[-1]
            assert error["error"]["code"] == "previous_response_not_found"
        assert sdk(b, "sk-one").responses.retrieve(made.id).output_text == "You said: private"


def test_another_owner_s_failed_delete_leaves_the_owner_s_upstream_copies(
    redis_url: str, sdk: SDK
) -> None:
    """Every deletion is announced, deleted or not: the process holding the owner's
    response dropped the backend's working copies of it (its next turn upstream then
    sent the whole context again) for another key's failed try at its id."""
    keys = frozenset({"sk-one", "sk-two"})
    with two_servers(redis_url, api_keys=keys) as (a, b):
        forgotten: list[str] = []
        a.server.engine.forget = forgotten.extend  # type: ignore[method-assign]
        made = sdk(a, "sk-one").responses.create(model="m", input="private")
        flush(a)
        with pytest.raises(openai.NotFoundError):
            sdk(b, "sk-two").responses.delete(made.id)
        # Announcements arrive in order: once the owner's own deletion is heard, the
        # other key's was too.
        sdk(b, "sk-one").responses.delete(made.id)
        eventually(lambda: bool(forgotten))
        time.sleep(0.2)
        assert forgotten == [made.id]


def test_a_redis_outage_leaves_local_service_running(monkeypatch: pytest.MonkeyPatch) -> None:
    # (Writes are tried until Redis answers, test_shared_store: here they are given up.)
    monkeypatch.setattr(write_retry, "WRITE_RETRY_SECONDS", 0.5)
    with redis_server() as url, two_servers(url) as (a, b):
        with WSClient(a.ws_url) as ws_a:
            before = ws_a.turn(input="before")[-1]["response"]["id"]
            flush(a)
            with redis.Redis.from_url(url) as client:
                client.shutdown(nosave=True)
            # Local state still works on A, new turns too (their writes fail, counted).
            events = ws_a.turn(previous_response_id=before, input="/transcript")
            assert transcript(events) == [
                "user: before",
                "assistant: You said: before",
                "user: /transcript",
            ]
            after = events[-1]["response"]["id"]
            assert httpx.get(f"{a.base_url}/responses/{after}").status_code == 200
            # A background response runs to its end (its state cannot be shared).
            body = {"model": "m", "input": "in the background", "background": True}
            queued = httpx.post(f"{a.base_url}/responses", json=body).json()
            poll = f"{a.base_url}/responses/{queued['id']}"
            eventually(lambda: httpx.get(poll).json()["status"] == "completed")
            # A DELETE that Redis cannot be told of deletes nothing (503, retry): the
            # other processes would keep serving it, and so would this one after an
            # eviction.
            refused = httpx.delete(f"{a.base_url}/responses/{after}")
            assert refused.status_code == 503 and "Retry" in refused.json()["error"]["message"]
            assert httpx.get(f"{a.base_url}/responses/{after}").status_code == 200
        # B cannot reach A's responses: a retriable 503 (not "not found": they exist),
        # quickly, no crash.
        started = time.monotonic()
        with WSClient(b.ws_url) as ws_b:
            error = ws_b.turn(previous_response_id=before, input="x")[-1]
            assert (error["status"], error["error"]["code"]) == (503, "server_error")
            assert output_text(ws_b.turn(input="still here")) == "You said: still here"
        assert httpx.get(f"{b.base_url}/responses/{before}").status_code == 503
        assert httpx.delete(f"{b.base_url}/responses/{before}").status_code == 503
        assert time.monotonic() - started < 30
        flush(a)
        assert shared_stats(a)["errors"] >= 1
        metrics = httpx.get(f"{b.base_url}/metrics").text
        errors = next(
            line
            for line in metrics.splitlines()
            if line.startswith("warmsocket_shared_store_errors_total ")
        )
        assert int(errors.split()[1]) >= 2


def test_http_answers_a_retriable_503_while_redis_does_not_answer_a_load(
    monkeypatch: pytest.MonkeyPatch, sdk: SDK
) -> None:
    """Redis hangs while B loads A's response: the SDK sees a 503 server_error (which
    it retries by itself), not 'not found'; once Redis answers, the chain continues."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    with redis_server() as url, two_servers(url) as (a, b):  # its own Redis: stopped here
        first = sdk(a).responses.create(model="m", input="secret words")
        flush(a)
        on_b = sdk(b)
        with paused(url):
            with pytest.raises(openai.InternalServerError) as refused:
                on_b.responses.create(model="m", previous_response_id=first.id, input="more")
            error = refused.value
            assert error.status_code == 503
            assert (error.type, error.code, error.param) == (
                "server_error",
                "server_error",
                "previous_response_id",
            )
            assert first.id in error.message and "retry the request" in error.message
            assert "secret" not in error.message
            # Looked up by id: the same error, without a param.
            for path in (f"responses/{first.id}", f"responses/{first.id}/input_items"):
                reply = httpx.get(f"{b.base_url}/{path}")
                assert reply.status_code == 503, path
                body = reply.json()["error"]
                assert (body["type"], body["code"], body["param"]) == (
                    "server_error",
                    "server_error",
                    None,
                )
        # Redis answers again: nothing was lost, the chain continues on B.
        follow = on_b.responses.create(
            model="m", previous_response_id=first.id, input="/transcript"
        )
        assert follow.output_text.splitlines() == [
            "user: secret words",
            "assistant: You said: secret words",
            "user: /transcript",
        ]
        # What Redis does not have is still not found.
        with pytest.raises(openai.BadRequestError) as missing:
            on_b.responses.create(model="m", previous_response_id="resp_nowhere", input="x")
        assert missing.value.code == "previous_response_not_found"
        assert httpx.get(f"{b.base_url}/responses/resp_nowhere").status_code == 404
        stats = shared_stats(b)
        assert (stats["load_errors"], stats["load_hits"], stats["load_misses"]) == (3, 1, 2)
        metrics = httpx.get(f"{b.base_url}/metrics").text
        assert 'warmsocket_shared_store_loads_total{result="error"} 3' in metrics
        assert 'warmsocket_errors_total{code="server_error"} 3' in metrics


def test_a_websocket_create_is_refused_on_its_lane_while_redis_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis hangs while B loads the parent of a create: an `error` event with status
    503 on that create's lane, in order with what the client sent after it; the
    connection goes on, and once Redis answers the chain continues on it."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    with redis_server() as url, two_servers(url) as (a, b):  # its own Redis: stopped here
        with WSClient(a.ws_url) as ws_a:
            remote = ws_a.turn(input="on a")[-1]["response"]["id"]
        flush(a)
        with WSClient(b.ws_url) as ws_b:
            head = ws_b.turn(input="local", store=False, stream_id="x")[-1]["response"]["id"]
            with paused(url):
                # Back to back: the create whose parent cannot be loaded, one after it
                # on its lane (continuing the lane's head) and one on the default lane.
                ws_b.create(previous_response_id=remote, input="first", stream_id="x")
                ws_b.create(previous_response_id=head, input="second", stream_id="x")
                ws_b.create(input="third")
                events = [ws_b.recv()]
                while sum(e["type"] == "response.completed" for e in events) < 2:
                    events.append(ws_b.recv())
            refused = events[0]  # before anything of the requests sent after it
            assert refused["type"] == "error" and refused["stream_id"] == "x"
            parsed = check_ws_event(refused)  # the SDK's type for it
            assert parsed.status == 503
            assert (parsed.error.type, parsed.error.code, parsed.error.param) == (
                "server_error",
                "server_error",
                "previous_response_id",
            )
            assert remote in parsed.error.message and "on a" not in parsed.error.message
            assert [e["type"] for e in events].count("error") == 1
            completed = {e.get("stream_id"): e for e in events if e["type"] == "response.completed"}
            # The lane's head was kept (a store=false head would be gone if evicted).
            assert output_text([completed["x"]]) == "You said: second"
            assert completed["x"]["response"]["previous_response_id"] == head
            assert output_text([completed[None]]) == "You said: third"
            # Redis answers again: the same create now continues A's chain, on the same
            # connection and lane.
            events = ws_b.turn(previous_response_id=remote, input="/transcript", stream_id="x")
            assert transcript(events) == [
                "user: on a",
                "assistant: You said: on a",
                "user: /transcript",
            ]
            # What Redis does not have is still not found.
            missing = ws_b.turn(previous_response_id="resp_nowhere", input="x", stream_id="x")
            assert missing[-1]["status"] == 400
            assert missing[-1]["error"]["code"] == "previous_response_not_found"
        stats = shared_stats(b)
        assert (stats["load_errors"], stats["load_hits"], stats["load_misses"]) == (1, 1, 1)


def _serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [WARMSOCKET, "serve", "--port", "0", "--log-format", "json", *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        record = json.loads(line)
        if record["message"] == "listening":
            return proc, record["url"]
    proc.wait(10)
    raise AssertionError("server exited before listening")


def test_serve_processes_share_and_flush_at_shutdown(redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    flags = ("--redis-url", redis_url, "--redis-prefix", prefix, "--redis-ttl", "600")
    a, base_a = _serve(*flags)
    try:
        made = httpx.post(f"{base_a}/responses", json={"model": "m", "input": "secret words"})
        rid = made.json()["id"]
        a.send_signal(signal.SIGTERM)  # right after the turn: the queue is flushed first
        assert a.wait(timeout=20) == 0
        assert a.stderr is not None
        logs = a.stderr.read()
        assert "secret words" not in logs
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        if a.stderr is not None:
            a.stderr.close()
    with redis.Redis.from_url(redis_url) as client:
        assert 0 < client.ttl(f"{prefix}:r:anonymous:{rid}") <= 600
    b, base_b = _serve(*flags)
    try:
        follow = httpx.post(
            f"{base_b}/responses",
            json={"model": "m", "previous_response_id": rid, "input": "/transcript"},
        ).json()
        assert "user: secret words" in follow["output"][0]["content"][0]["text"]
    finally:
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=20) == 0
        if b.stderr is not None:
            b.stderr.close()


def test_a_shutdown_while_redis_does_not_answer_ends_in_time() -> None:
    """Redis hangs (SIGSTOP) when serve is told to stop: what is still to be written
    gets what the drain left of --shutdown-timeout (at least 2 s), then is dropped and
    logged: the process does not outlive its orchestrator's grace period."""
    with redis_server() as url:  # its own: this test stops it
        proc, base = _serve("--redis-url", url, "--shutdown-timeout", "1")
        try:
            with paused(url):
                body = {"model": "m", "input": "secret words"}
                assert httpx.post(f"{base}/responses", json=body).status_code == 200
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0
                took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.stderr is not None
        logs = [json.loads(line) for line in proc.stderr]
        proc.stderr.close()
    assert took < 5  # 2 s to write (10 s before the budget was shared)
    (dropped,) = [
        r for r in logs if r["message"] == "shared store: pending writes dropped at shutdown"
    ]
    assert dropped["responses"] == 1
    assert "secret" not in json.dumps(logs)


def test_an_unreachable_redis_or_a_missing_client_stops_serve_with_advice() -> None:
    result = subprocess.run(
        [WARMSOCKET, "serve", "--port", "0", "--redis-url", "redis://:hunter2@127.0.0.1:1/0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "cannot reach Redis" in result.stderr
    (line,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert (line["redis"], line["reason"]) == ("127.0.0.1:1", "Connection refused")
    assert "hunter2" not in result.stderr
    without_redis = (
        "import sys; sys.modules['redis'] = None; from warmsocket.cli import main; "
        "sys.exit(main(['serve', '--port', '0', '--redis-url', 'redis://127.0.0.1:1/0']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", without_redis], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "pip install 'redis>=5.0.1'" in result.stderr


def test_a_redis_cluster_stops_serve_with_advice() -> None:
    """A cluster node answers PING, then refuses the scripts that read a chain (its
    keys span slots): serve says so at start instead of failing every request."""
    with redis_server("--cluster-enabled", "yes") as url:
        result = subprocess.run(
            [WARMSOCKET, "serve", "--port", "0", "--redis-url", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    (line,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert line["message"] == RedisClusterUnsupported.advice
    assert line["redis"] == url.removeprefix("redis://").removesuffix("/0")
    assert "single Redis primary" in line["error"]


def test_the_server_does_not_import_redis_without_redis_url() -> None:
    code = (
        "import sys, warmsocket.serve, warmsocket.server, warmsocket.httpapi; "
        "sys.exit('redis' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_serve_processes_on_one_port_with_reuse_port(redis_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    prefix = f"t{uuid.uuid4().hex[:8]}"
    flags = ("--port", str(port), "--reuse-port", "--redis-url", redis_url)
    a, listening = start_serve(*flags, "--redis-prefix", prefix)
    try:
        b, _ = start_serve(*flags, "--redis-prefix", prefix)
    except BaseException:
        _stop(a)
        raise
    logs: list[str] = []
    try:
        url = listening["websocket"]
        with WSClient(url) as client:
            stored = client.turn(model="m", input="first")[-1]["response"]["id"]
        time.sleep(0.3)  # written behind the turn: on the other process within ms
        for n in range(24):  # the kernel spreads connections over both processes
            with WSClient(url) as client:
                events = client.turn(model="m", input="/transcript", previous_response_id=stored)
                assert output_text(events).startswith("user: first\n"), n
    finally:
        logs = [_stop(a), _stop(b)]
    opened = [sum('"websocket opened"' in line for line in log.splitlines()) for log in logs]
    assert sum(opened) == 25 and all(opened), opened


def test_reuse_port_refuses_a_snapshot_and_warns_without_redis(tmp_path: Any) -> None:
    result = run(
        WARMSOCKET, "serve", "--port", "0", "--reuse-port", "--snapshot", str(tmp_path / "s")
    )
    assert result.returncode == 1
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["message"].startswith("--snapshot cannot be used with --reuse-port")
    proc = subprocess.Popen(
        [WARMSOCKET, "serve", "--port", "0", "--reuse-port"], stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        warning = json.loads(proc.stderr.readline())
        assert warning["level"] == "warning"
        assert warning["message"].startswith("--reuse-port without --redis-url")
        assert json.loads(proc.stderr.readline())["message"] == "listening"
    finally:
        _stop(proc)


def test_an_id_longer_than_any_response_id_is_not_looked_up_nor_announced(
    redis_url: str,
) -> None:
    """Every process remembers the ids announced lately: a DELETE of a 60 KB id was
    announced to all of them (and kept in the Redis stream) before."""
    with two_servers(redis_url) as (a, b):
        shared = a.server.engine.shared
        assert isinstance(shared, SharedStore)
        long_id = "resp_" + "x" * 60_000
        for method in ("DELETE", "GET"):
            answer = httpx.request(method, f"{a.base_url}/responses/{long_id}", headers=AUTH)
            assert answer.status_code == 404
            assert len(answer.text) < 1000  # the id is not echoed whole
        short = httpx.delete(f"{a.base_url}/responses/resp_nothing", headers=AUTH)
        assert short.status_code == 404
        with redis.Redis.from_url(redis_url) as client:
            assert client.xlen(f"{shared.prefix}:announced") == 1  # only the short one
        eventually(lambda: any(rid == "resp_nothing" for _o, rid in b_announced(b)))
        assert all(len(rid) < 100 for _owner, rid in b_announced(b))


def b_announced(server: RunningServer) -> list[tuple[str, str]]:
    shared = server.server.engine.shared
    assert isinstance(shared, SharedStore)
    return list(shared._announced)


def test_what_was_written_to_redis_is_held_by_nothing_once_deleted(
    redis_url: str, sdk: SDK, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once Redis has what the writers were given, and the responses and the
    conversation were deleted, nothing keeps them in the process: not the writers
    waiting for their next write, not the heartbeat waiting for its next beat."""
    monkeypatch.setattr(background, "HEARTBEAT_SECONDS", 0.2)
    with two_servers(redis_url) as (a, _b):
        on_a = sdk(a)
        made = on_a.conversations.create(items=[{"role": "user", "content": "one"}])
        said = on_a.responses.create(model="m", input="two", conversation=made.id)
        later = on_a.responses.create(model="m", input="/sleep 600\nlater", background=True)
        eventually(lambda: status_on(on_a, later.id) == "completed")
        time.sleep(0.3)  # a beat after the run ended
        flush(a)
        board_flush(a)
        on_a.conversations.delete(made.id)
        on_a.responses.delete(said.id)
        on_a.responses.delete(later.id)
        board_flush(a)

        def held() -> list[str]:
            gc.collect()
            kept = [
                o
                for o in gc.get_objects()
                if isinstance(o, (Conversation, BackgroundRun, shared_store._Record))
            ]
            return [type(o).__name__ for o in kept]

        assert a.call(held) == []
