"""A long-running server keeps nothing of what is over: after connections close and
what they stored is deleted, every count of state goes back to where it was.

One cycle does what a day of clients does (WebSocket turns on chains and lanes, bad
frames, an unknown id, a turn cut off by its client, the SDK's `responses.connect()`,
HTTP and SSE creates, an SSE stream left mid-answer, token counts, compaction,
refused requests, stored responses listed and deleted, a conversation, a background
response), then undoes what it stored. After warm-up cycles (first-use
caches, the SDK's pool), more cycles must leave the cache's entries, the server's
connections and tasks, conversations, background runs, the number of live Python
objects of each type, the memory blocks each line of warmsocket allocated and the
Rust core's heap blocks where they were: a leak of one object every four cycles (one
memory block a cycle, for objects the collector does not see) fails. Bounded caches
are made small here, so that they are full before anything is measured.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import tracemalloc
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import openai
import pytest
from openai import OpenAI

import warmsocket
from tests.redis_support import redis_server
from tests.support import RunningServer, WSClient, running_server
from tests.upstream_support import running_sim, warmsocket_upstream
from warmsocket import conversations, shared_store
from warmsocket._core import rust_heap
from warmsocket.backends import chat, responses_http, responses_ws
from warmsocket.shared_store import SharedStore
from warmsocket.simulate import server as sim_server

MODEL = "warmsocket-mock"
WARM_UP_CYCLES = 20
TRACED_WARM_UP_CYCLES = 10
HALF_CYCLES = 20
MAX_GROWTH_PER_TYPE = 10
"""Live objects of one type the measured cycles (two halves) may add: far fewer than
one a cycle."""
PACKAGE_DIR = os.path.dirname(warmsocket.__file__)
AUTH = {"Authorization": "Bearer sk-test"}
"""The SDK's key: what a WebSocket stores, the SDK deletes."""
TOOLS = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
BOUND = 32
"""What the bounded caches keep here, so that they are full after the warm-up: the
test then shows that nothing grows past its bound (their real bounds are thousands)."""


@pytest.fixture(params=["builtin", "builtin+redis", "chat", "responses", "responses-ws"])
def server(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunningServer]:
    """warmsocket with its built-in model, or in front of the simulated upstream (in
    this process too: its state must settle as well)."""
    monkeypatch.setattr(chat, "MEMO_ENTRIES", BOUND)
    monkeypatch.setattr(responses_http, "MEMO_ENTRIES", BOUND)
    monkeypatch.setattr(responses_ws, "MAX_CHAINS", BOUND)
    monkeypatch.setattr(sim_server, "KEPT_REQUESTS", BOUND)
    monkeypatch.setattr(sim_server, "CALL_ID_MEMORY", BOUND)
    monkeypatch.setattr(shared_store, "ANNOUNCED_MEMORY", BOUND)
    monkeypatch.setattr(conversations, "DELETED_KEPT", BOUND)
    with ExitStack() as stack:
        if request.param == "builtin":
            yield stack.enter_context(running_server())
        elif request.param == "builtin+redis":
            # Stored responses, background runs and conversations shared through Redis.
            url = stack.enter_context(redis_server())
            shared = SharedStore.from_url(url, prefix=f"steady-{uuid.uuid4().hex}")
            running = stack.enter_context(running_server(shared=shared))
            # Its connection pools, bounded, full from the start: a connection opened
            # when the calls at once reach a new high is not a leak.
            asyncio.run_coroutine_threadsafe(_fill_pools(shared), running.loop).result(30)
            yield running
        else:
            sim = stack.enter_context(running_sim(record_bodies=BOUND, cache_blocks=BOUND))
            server, _metrics = stack.enter_context(warmsocket_upstream(sim.base_url, request.param))
            contexts = getattr(server.server.engine.backend, "_contexts", None)
            if contexts is not None:
                contexts.max_bytes = 8 * 1024
            yield server


async def _fill_pools(shared: SharedStore) -> None:
    """Open every connection the store's pools may: as many calls at once."""
    await asyncio.gather(
        *(shared.client.ping() for _ in range(shared_store.REQUEST_CONNECTIONS)),
        *(shared.followers.ping() for _ in range(shared_store.FOLLOW_CONNECTIONS)),
    )


def websocket_cycle(server: RunningServer) -> list[str]:
    """Turns over one raw WebSocket; returns the ids of what it stored."""
    stored: list[str] = []
    with WSClient(server.ws_url, additional_headers=AUTH) as ws:
        first = ws.turn(input="hello", store=False)[-1]["response"]["id"]
        second = ws.turn(
            input="/call lookup {}", previous_response_id=first, store=False, tools=TOOLS
        )
        assert second[-1]["type"] == "response.completed"
        call = second[-1]["response"]["output"][-1]
        ws.turn(
            input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "42"}],
            previous_response_id=second[-1]["response"]["id"],
            store=False,
            tools=TOOLS,
        )
        # Lanes, one of them a fork of the chain.
        ws.create(stream_id="a", input="/sleep 20\nslow", previous_response_id=first, store=False)
        ws.create(stream_id="b", input="fast", previous_response_id=first, store=False)
        ws.until_terminal("b")
        ws.until_terminal("a")
        # Bad input: each an error, the connection usable after it.
        ws.send("{not json")
        assert ws.recv()["type"] == "error"
        ws.send({"type": "response.nonsense"})
        assert ws.recv()["type"] == "error"
        assert ws.turn(input="x", previous_response_id="resp_unknown")[-1]["type"] == "error"
        done = ws.turn(input="kept", store=True)[-1]
        assert done["type"] == "response.completed"
        stored.append(done["response"]["id"])
    # A client that leaves in the middle of a turn.
    with WSClient(server.ws_url) as ws:
        ws.create(input="/sleep 200\ncut off", store=False)
        assert ws.recv()["type"] == "response.created"
    return stored


def sdk_cycle(sdk: OpenAI) -> list[str]:
    """The SDK over HTTP, SSE and `responses.connect()`; returns what it stored."""
    stored: list[str] = []
    plain = sdk.responses.create(model=MODEL, input="plain", store=False)
    assert plain.output_text == "You said: plain"
    with sdk.responses.stream(model=MODEL, input="streamed") as stream:
        streamed = stream.get_final_response()
    stored.append(streamed.id)
    # A re-sent history (prefix diffing against the stored chain).
    replay = sdk.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "streamed"},
            {"role": "assistant", "content": streamed.output_text},
            {"role": "user", "content": "again"},
        ],
    )
    stored.append(replay.id)
    assert [item.id for item in sdk.responses.input_items.list(replay.id)]
    with sdk.responses.connect() as connection:
        connection.response.create(model=MODEL, input="over the SDK", store=False)
        for event in connection:
            if event.type in ("response.completed", "error"):
                assert event.type == "response.completed"
                break
    # Counting, compacting, and what the API refuses.
    assert sdk.responses.input_tokens.count(model=MODEL, input="count me").input_tokens > 0
    window = sdk.responses.compact(model=MODEL, previous_response_id=replay.id)
    assert window.output[-1].type == "compaction"
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve("resp_unknown")
    with pytest.raises(openai.BadRequestError):
        sdk.responses.create(model=MODEL, input=[{"type": "nonsense"}])  # type: ignore[list-item]
    # A client that stops reading an SSE stream and leaves.
    with sdk.responses.create(model=MODEL, input="/sleep 200\nleft", stream=True) as events:
        assert next(iter(events)).type == "response.created"
    conversation = sdk.conversations.create(items=[{"role": "user", "content": "hi"}])
    turn = sdk.responses.create(model=MODEL, input="in it", conversation=conversation.id)
    stored.append(turn.id)
    assert len(sdk.conversations.items.list(conversation.id).data) == 3
    sdk.conversations.delete(conversation.id)
    background = sdk.responses.create(model=MODEL, input="later", background=True)
    deadline = time.monotonic() + 10
    while sdk.responses.retrieve(background.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stored.append(background.id)
    return stored


def cycle(server: RunningServer) -> None:
    # A client of its own each cycle: its keep-alive connection (and the store=false
    # chains the server keeps for it) ends with the cycle.
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        for response_id in websocket_cycle(server) + sdk_cycle(sdk):
            sdk.responses.delete(response_id)


def written(server: RunningServer) -> None:
    """Wait until what the cycles queued for Redis is written: a write in flight holds
    its commands (lists) for a moment, which a loaded machine can catch."""

    async def flushed() -> None:
        engine = server.server.engine
        if engine.shared is not None:
            await engine.shared.flush()
        board = server.server.http.background.board
        if board is not None:
            await board.flush()
        queue = engine.conversations._writes
        if queue is not None:
            await queue.join()
        holds = engine.conversations.holds
        if holds is not None:
            await holds.settled()  # (the holds let go of once the writes were done)

    asyncio.run_coroutine_threadsafe(flushed(), server.loop).result(timeout=10)


def state_counts(server: RunningServer) -> dict[str, int]:
    """What the server holds, read on its loop once every connection has gone (and
    what was queued for Redis is written)."""
    written(server)

    def read() -> dict[str, Any]:
        gc.collect()
        app = server.server
        return {
            "connections": len(app.connections),
            "tasks": len(asyncio.all_tasks()),
            "conversations": len(app.engine.conversations),
            **{f"background_{k}": v for k, v in app.http.background.stats().items()},
            **{f"cache_{k}": v for k, v in app.cache.stats().as_dict().items()},
        }

    deadline = time.monotonic() + 10
    while True:
        counts: dict[str, int] = server.call(read)
        if counts["connections"] == 0 and counts["cache_connections"] == 0:
            return counts
        assert time.monotonic() < deadline, f"connections never closed: {counts}"
        time.sleep(0.02)


def live_objects() -> Counter[str]:
    # urllib.parse keeps the last 128 URLs it split (bounded, filled slowly by the
    # cycles' distinct URLs): not ours to count.
    urllib.parse.clear_cache()
    gc.collect()
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


STEADY = (
    "connections",
    "tasks",
    "conversations",
    "background_running",
    "background_finished",
    "background_retained_bytes",
    "cache_entries",
    "cache_stored_entries",
    "cache_local_entries",
    "cache_bytes",
    "cache_connections",
    "cache_pinned",
)


def blocks_by_line() -> Counter[str]:
    """Memory blocks traced since `tracemalloc.start`, by the line of warmsocket that
    allocated them (a block a library allocated is the library's line: those are
    left to the object counts)."""
    ours = [tracemalloc.Filter(True, f"{PACKAGE_DIR}{os.sep}*")]
    # A full collection empties the free lists, whose blocks count as allocated
    # where they were first made, whoever uses them now.
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(ours)
    return Counter({str(stat.traceback): stat.count for stat in snapshot.statistics("lineno")})


def rust_heap_blocks(server: RunningServer) -> int:
    """The heap blocks the Rust core holds (the process's: the simulated upstream's
    too), once the prefix index has let go of removed responses (it keeps their
    positions for a while, bounded, and would show them as growth here) and the
    reaper thread has freed what it was handed."""

    def read() -> int:
        gc.collect()  # what Python objects holding Rust values keep goes with them
        server.server.cache.sweep_prefix_index()
        return rust_heap(settle=True)[1]

    return server.call(read)


def test_cycles_of_every_kind_of_use_leave_nothing_behind(server: RunningServer) -> None:
    for _ in range(WARM_UP_CYCLES):
        cycle(server)
    tracemalloc.start(1)
    try:
        # What bounded caches and counters replace is traced leaving as well as
        # coming from here on.
        for _ in range(TRACED_WARM_UP_CYCLES):
            cycle(server)
        before_state = state_counts(server)
        live_objects()  # (its first call makes a few objects of its own, once)
        before_objects = live_objects()
        blocks = [blocks_by_line()]
        heap = [rust_heap_blocks(server)]
        for _half in range(2):
            for _ in range(HALF_CYCLES):
                cycle(server)
            after_state = state_counts(server)
            after_objects = live_objects()
            blocks.append(blocks_by_line())
            heap.append(rust_heap_blocks(server))
    finally:
        tracemalloc.stop()
    assert {k: after_state[k] for k in STEADY} == {k: before_state[k] for k in STEADY}
    grown = {
        name: after_objects[name] - before_objects[name]
        for name in after_objects
        if after_objects[name] - before_objects[name] > MAX_GROWTH_PER_TYPE
    }
    assert grown == {}, f"live objects grew over {2 * HALF_CYCLES} cycles: {grown}"
    # Objects the collector does not track (strings, dicts of them) show as memory
    # blocks: a line whose blocks grow in both halves, by one a cycle or more, keeps
    # something of every cycle. (A bounded cache grows once; what a connection or a
    # counter holds, a time or a number, comes and goes by a few.)
    start, middle, end = blocks
    kept = {
        line: (middle[line] - start[line], end[line] - middle[line])
        for line in end
        if min(middle[line] - start[line], end[line] - middle[line]) >= HALF_CYCLES
    }
    assert kept == {}, f"blocks kept each cycle, by the line that made them: {kept}"
    # The same for the Rust core's heap, which neither count above sees.
    rust_grown = (heap[1] - heap[0], heap[2] - heap[1])
    assert min(rust_grown) < HALF_CYCLES, f"Rust heap blocks grew {rust_grown} over each half"
