"""Stored responses shared between processes through a real Redis server."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import redis
import redis.asyncio

from tests.redis_support import AnswerDropper, paused, redis_server, restartable_redis_server
from warmsocket import shared_announcements, shared_background, shared_store, write_retry
from warmsocket._core import ItemNotJson, Items, SessionCache
from warmsocket.conversations import Conversations
from warmsocket.engine import SharedStoreUnavailable
from warmsocket.shared_store import SharedStore, failure_reason


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def turn(cache: SessionCache, rid: str, parent: str | None, text: str, **kw: Any) -> None:
    info = cache.create(
        rid,
        owner=kw.pop("owner", "o"),
        input=[{"role": "user", "content": text}],
        output=[
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": f"re {text}"}],
            }
        ],
        previous_response_id=parent,
        settings=b'{"model":"m","tools":[{"type":"function","name":"f"}]}',
        meta=b'{"status":"completed"}',
        **kw,
    )
    assert info.id == rid


def share(store: SharedStore, cache: SessionCache, rid: str, **kw: Any) -> None:
    """Publish a response as the engine does after storing it."""
    store.publish(cache.get(rid, owner="o", **kw), *cache.own_items(rid, owner="o", **kw))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_chain_published_by_one_process_loads_in_another(redis_url: str) -> None:
    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        store_a = SharedStore.from_url(redis_url, prefix="t1")
        store_b = SharedStore.from_url(redis_url, prefix="t1")
        await store_a.start()
        await store_b.start()
        parent = None
        for i in range(150):  # more than one load batch
            turn(a, f"r{i}", parent, f"t{i}")
            share(store_a, a, f"r{i}")
            parent = f"r{i}"
        await store_a.flush()
        assert await store_b.load(b, "r149", owner="o")
        assert b.context("r149", owner="o") == a.context("r149", owner="o")
        assert b.get("r149", owner="o").settings == a.get("r149", owner="o").settings
        assert store_b.loaded == 150
        # Another owner sees nothing.
        assert not await store_b.load(b, "r149", owner="someone-else")
        await store_a.aclose()
        await store_b.aclose()

    run(main())


def test_many_calls_at_once_wait_for_a_connection_instead_of_failing(redis_url: str) -> None:
    """More Redis calls at once than the pool holds (a busy process: loads, conversation
    reads, rate checks) wait their turn: redis-py's own pool failed the 101st at once
    (MaxConnectionsError), which read as Redis not answering (503s). Followers' blocking
    reads have connections of their own, so many of them do not hold the rest up."""

    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        store_a = SharedStore.from_url(redis_url, prefix="t_pool")
        store_b = SharedStore.from_url(redis_url, prefix="t_pool")
        await store_a.start()
        await store_b.start()
        turn(a, "r0", None, "t0")
        share(store_a, a, "r0")
        await store_a.flush()
        # Followers waiting for events that do not come (each blocks a second).
        followers = [
            asyncio.create_task(store_b.followers.xread({f"t_pool:none{i}": "0-0"}, block=1000))
            for i in range(shared_store.FOLLOW_CONNECTIONS * 2)
        ]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        values = await asyncio.gather(
            *(store_b.client.exists(f"t_pool:key{i}") for i in range(400)),
            store_b.load(b, "r0", owner="o"),
        )
        assert values == [0] * 400 + [True]
        assert time.monotonic() - started < 0.9  # not behind the followers' reads
        assert store_b.load_errors == 0
        await asyncio.gather(*followers)
        await store_a.aclose()
        await store_b.aclose()

    run(main())


class CrowdedCache:
    """A cache whose every `create` first makes another chain's response, as other
    connections' turns do while a load inserts in its worker thread: the budget
    evicts the least recently used unpinned leaves to make room."""

    def __init__(self, cache: SessionCache) -> None:
        self._cache = cache
        self._others = 0

    def create(self, rid: str, **kw: Any) -> Any:
        self._others += 1
        turn(self._cache, f"other{self._others}", None, "x" * 20_000)
        return self._cache.create(rid, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def test_a_chain_being_loaded_is_not_evicted_under_it(redis_url: str) -> None:
    # Each loaded response is pinned until the next one is made on it: without that,
    # the budget evicted the newest loaded leaf between two creates and the load
    # answered not found.
    async def main() -> None:
        a = SessionCache()
        b = SessionCache(memory_budget=48_000)
        store = SharedStore.from_url(redis_url, prefix="t13")
        await store.start()
        parent = None
        for i in range(8):
            turn(a, f"r{i}", parent, f"t{i}" * 300)
            share(store, a, f"r{i}")
            parent = f"r{i}"
        await store.flush()
        crowded: Any = CrowdedCache(b)
        assert await store.load(crowded, "r7", owner="o")
        assert b.context("r7", owner="o") == a.context("r7", owner="o")
        assert b.stats().evictions > 0  # the other chains made the budget evict
        await store.aclose()

    run(main())


def test_loading_stops_at_a_locally_cached_ancestor(redis_url: str) -> None:
    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        store = SharedStore.from_url(redis_url, prefix="t2")
        await store.start()
        for i, parent in enumerate([None, "r0", "r1", "r2"]):
            turn(a, f"r{i}", parent, f"t{i}")
            share(store, a, f"r{i}")
        await store.flush()
        turn(b, "r0", None, "t0")
        turn(b, "r1", "r0", "t1")
        assert await store.load(b, "r3", owner="o")
        assert store.loaded == 2  # r2 and r3 only; r0..r1 were shared, not copied
        assert b.context("r3", owner="o") == a.context("r3", owner="o")
        await store.aclose()

    run(main())


def test_connection_local_state_is_never_written(redis_url: str) -> None:
    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        conn = a.open_connection()
        store = SharedStore.from_url(redis_url, prefix="t3")
        await store.start()
        turn(a, "local", None, "zdr", store=False, connection=conn)
        turn(a, "tainted", "local", "stored on top", store=True, connection=conn)
        for rid in ("local", "tainted"):
            share(store, a, rid, connection=conn)
        await store.flush()
        assert store.published == 0
        assert await store.client.keys("t3:*") == []
        assert not await store.load(b, "tainted", owner="o")
        await store.aclose()

    run(main())


def test_deleted_responses_are_not_found_but_their_descendants_load(redis_url: str) -> None:
    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        store = SharedStore.from_url(redis_url, prefix="t4")
        await store.start()
        turn(a, "p", None, "parent")
        turn(a, "c", "p", "child")
        for rid in ("p", "c"):
            share(store, a, rid)
        await store.flush()
        assert await store.delete("p", owner="o")
        assert not await store.delete("nope", owner="o")
        assert not await store.load(b, "p", owner="o")
        assert await store.load(b, "c", owner="o")
        assert b"parent" in b.context("c", owner="o")
        with pytest.raises(LookupError):
            b.get("p", owner="o")
        await store.aclose()

    run(main())


def test_items_at_the_depth_limit_load_in_another_process(redis_url: str) -> None:
    # Loading re-parses the items' JSON; an item the cache accepted must survive that
    # (at 127 levels it once did not, and the other process answered not found).
    def nested(levels: int) -> dict[str, object]:
        value: object = []
        for _ in range(levels - 2):
            value = [value]
        return {"type": "reasoning", "id": f"rs_{levels}", "x": value}

    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        store = SharedStore.from_url(redis_url, prefix="t9")
        await store.start()
        accepted = []
        for levels in (99, 100, 101, 127):
            rid = f"deep{levels}"
            try:
                a.create(rid, owner="o", input=[nested(levels)], output=[nested(levels)])
            except ItemNotJson:
                continue
            accepted.append(levels)
            share(store, a, rid)
            await store.flush()
            assert await store.load(b, rid, owner="o")
            assert b.context(rid, owner="o") == a.context(rid, owner="o")
            assert b.context_objects(rid, owner="o") == [nested(levels)] * 2
        assert accepted == [99, 100]
        await store.aclose()

    run(main())


def test_a_missing_link_means_not_found_and_ttl_is_set(redis_url: str) -> None:
    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        store = SharedStore.from_url(redis_url, prefix="t5", ttl_seconds=120)
        await store.start()
        turn(a, "x0", None, "a")
        turn(a, "x1", "x0", "b")
        for rid in ("x0", "x1"):
            share(store, a, rid)
        await store.flush()
        assert 0 < await store.client.ttl("t5:r:o:x1") <= 120
        await store.client.delete("t5:r:o:x0")  # e.g. expired
        assert not await store.load(b, "x1", owner="o")
        assert b.stats().entries == 0  # never a partial chain
        await store.aclose()

    run(main())


@pytest.mark.timeout(60)
def test_a_chain_that_goes_on_outlives_the_ttl_of_its_first_records(redis_url: str) -> None:
    """Records expire a TTL after their write, but a chain that is continued must stay
    loadable in another process as long as its newest record is: its ancestors are
    kept alive with it (records and settings). A chain that stops expires."""
    ttl = 2

    async def main() -> None:
        a = SessionCache()
        store = SharedStore.from_url(redis_url, prefix="t5k", ttl_seconds=ttl)
        reader = SharedStore.from_url(redis_url, prefix="t5k", ttl_seconds=ttl)
        await store.start()
        await reader.start()
        turn(a, "k0", None, "first")
        turn(a, "stop", None, "other")  # a chain that is not continued
        share(store, a, "k0")
        share(store, a, "stop")
        await store.flush()
        parent = "k0"
        for step in range(1, 5):  # the chain goes on past twice the TTL
            await asyncio.sleep(ttl * 0.6)
            turn(a, f"k{step}", parent, f"step {step}")
            share(store, a, f"k{step}")
            await store.flush()
            parent = f"k{step}"
        # k0 was written 4.8 s ago, with a 2 s TTL: kept alive by the chain.
        b = SessionCache()
        assert await reader.load(b, "k4", owner="o"), "the chain lost a link"
        assert b.context("k4", owner="o") == a.context("k4", owner="o")
        assert reader.load_errors == 0
        # Every link's horizon is at least a TTL past its own write.
        for step in range(1, 5):
            live = await store.client.hget(f"t5k:r:o:k{step}", "live")
            assert live is not None and int(live) > 0
        # The chain that stopped is gone.
        assert not await reader.load(SessionCache(), "stop", owner="o")
        await store.aclose()
        await reader.aclose()

    run(main())


def test_keeping_a_chain_alive_walks_it_once_per_ttl(redis_url: str) -> None:
    """Records written while their parent's horizon is a TTL away raise only the
    parent: one step, not a walk of the whole chain."""

    async def main() -> None:
        a = SessionCache()
        store = SharedStore.from_url(redis_url, prefix="t5w", ttl_seconds=3600)
        await store.start()
        parent = None
        for step in range(30):
            turn(a, f"w{step}", parent, f"s{step}")
            share(store, a, f"w{step}")
            parent = f"w{step}"
        await store.flush()
        lives = [await store.client.hget(f"t5w:r:o:w{step}", "live") for step in range(30)]
        assert lives[0] == b"inf"  # a root has no ancestors
        # One horizon for the chain, set when w1 was written (w0's root horizon).
        assert len(set(lives[1:])) == 1
        horizon = int(lives[1]) / 1000  # ms
        now = (await store.client.time())[0]
        assert now + 3600 <= horizon <= now + 2 * 3600 + 5
        # Every ancestor lives until the horizon; the newest record a TTL from now.
        for step in range(29):
            assert await store.client.ttl(f"t5w:r:o:w{step}") >= horizon - now - 5
        assert await store.client.ttl("t5w:r:o:w29") <= 3600
        await store.aclose()

    run(main())


def test_redis_down_is_survivable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="warmsocket.shared_store")

    async def main() -> None:
        store = SharedStore.from_url("redis://:hunter2@127.0.0.1:1/0")
        with pytest.raises(ConnectionError) as info:
            await store.start()
        # Where, and the OS's reason; never the password.
        assert str(info.value) == "cannot reach Redis at 127.0.0.1:1 (Connection refused)"
        # A load Redis does not answer is not a miss: the response may exist.
        with pytest.raises(SharedStoreUnavailable) as unavailable:
            await store.load(SessionCache(), "r", owner="o")
        assert unavailable.value.response_id == "r"
        assert store.errors == 1
        assert (store.load_errors, store.load_misses) == (1, 0)
        await store.client.aclose()

    run(main())
    (record,) = [r for r in caplog.records if r.getMessage() == "cannot read from Redis"]
    assert (record.redis, record.reason) == ("127.0.0.1:1", "Connection refused")  # type: ignore[attr-defined]
    assert "hunter2" not in caplog.text


def test_a_load_redis_does_not_answer_is_unavailable_not_a_miss(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis hangs (SIGSTOP) during a load: the load raises SharedStoreUnavailable
    within the timeouts (the caller answers 503: the response exists), and loads the
    whole chain once Redis answers again."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    caplog.set_level(logging.ERROR, logger="warmsocket.shared_store")

    async def main(url: str) -> None:
        a, b = SessionCache(), SessionCache()
        store = SharedStore.from_url(url, prefix="u1")
        await store.start()
        turn(a, "r0", None, "secret words")
        turn(a, "r1", "r0", "more")
        for rid in ("r0", "r1"):
            share(store, a, rid)
        await store.flush()
        with paused(url):
            started = time.monotonic()
            with pytest.raises(SharedStoreUnavailable) as info:
                await store.load(b, "r1", owner="o")
            assert time.monotonic() - started < 2  # two tries of 0.2 s
        assert info.value.response_id == "r1"
        assert b.stats().entries == 0  # nothing half loaded
        stats = store.stats()
        assert (stats["load_errors"], stats["load_misses"], stats["errors"]) == (1, 0, 1)
        assert await store.load(b, "r1", owner="o")  # nothing was lost
        assert b.context("r1", owner="o") == a.context("r1", owner="o")
        await store.aclose()

    with redis_server() as url:  # its own: this test stops it
        run(main(url))
    (record,) = [r for r in caplog.records if r.getMessage() == "cannot read from Redis"]
    assert record.reason == "timed out"  # type: ignore[attr-defined]
    assert "secret" not in caplog.text


def test_a_write_redis_does_not_answer_is_tried_again_until_it_answers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stops answering (SIGSTOP, as a hung Redis or a failover) for longer than a
    write's try and its one retry: the write is tried again (`write_retry`) and lands
    once Redis answers, the response queued behind it too: nothing lost, no error."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    caplog.set_level(logging.WARNING, logger="warmsocket.shared_store")

    async def main(url: str) -> None:
        a, b = SessionCache(), SessionCache()
        store = SharedStore.from_url(url, prefix="w1")
        await store.start()
        turn(a, "r0", None, "secret words")
        turn(a, "r1", "r0", "more")
        with paused(url):
            share(store, a, "r0")
            await asyncio.sleep(1.5)  # tries of 2 x 0.2 s, each timed out
            share(store, a, "r1")
            await asyncio.sleep(0.2)
            assert store.published == 0 and store.stats()["queued"] == 1
        await asyncio.wait_for(store.flush(), 10)
        assert (store.published, store.errors) == (2, 0)
        reader = SharedStore.from_url(url, prefix="w1")
        assert await reader.load(b, "r1", owner="o")
        assert b.context("r1", owner="o") == a.context("r1", owner="o")
        await reader.client.aclose()
        await store.aclose()

    with redis_server() as url:  # its own: this test stops it
        run(main(url))
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("cannot write stored responses to Redis; trying again") == 1
    assert messages.count("stored responses written to Redis after all") == 1
    assert "cannot write stored responses to Redis" not in messages  # (never given up)
    (retrying,) = [r for r in caplog.records if r.getMessage().endswith("trying again")]
    assert retrying.reason == "timed out"  # type: ignore[attr-defined]
    assert "secret" not in caplog.text


def test_a_write_is_given_up_when_redis_stays_away(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis gone (shut down: connections refused) for longer than
    `WRITE_RETRY_SECONDS`: the write is given up, logged and counted; the process
    keeps its response."""
    monkeypatch.setattr(write_retry, "WRITE_RETRY_SECONDS", 0.6)
    caplog.set_level(logging.WARNING, logger="warmsocket.shared_store")

    async def main(url: str) -> float:
        a = SessionCache()
        store = SharedStore.from_url(url, prefix="w2")
        await store.start()
        turn(a, "r0", None, "secret words")
        with redis.Redis.from_url(url) as raw, contextlib.suppress(redis.ConnectionError):
            raw.shutdown(nosave=True)
        started = time.monotonic()
        share(store, a, "r0")
        await asyncio.wait_for(store.flush(), 10)
        took = time.monotonic() - started
        assert (store.published, store.errors) == (0, 1)
        assert a.get("r0", owner="o").id == "r0"
        await store.aclose(flush_timeout=0.1)
        return took

    with redis_server() as url:
        took = run(main(url))
    assert 0.3 <= took < 5  # tried again (after 0.1 s, 0.2 s), then given up
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("cannot write stored responses to Redis; trying again") == 1
    (given_up,) = [
        r for r in caplog.records if r.getMessage() == "cannot write stored responses to Redis"
    ]
    assert given_up.reason == "Connection refused"  # type: ignore[attr-defined]
    assert "secret" not in caplog.text


def test_writes_a_demoted_primary_refuses_are_tried_again_until_it_is_primary_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failover demotes the Redis the processes write to (a replica now, of a primary
    it cannot reach), then promotes it again: what was written meanwhile, refused with
    READONLY, is written once it takes writes, stored responses and background state
    alike; nothing given up, and another process finds both."""
    caplog.set_level(logging.WARNING, logger="warmsocket")

    async def main(url: str) -> None:
        a, b = SessionCache(), SessionCache()
        store = SharedStore.from_url(url, prefix="ro")
        await store.start()
        board = store.background_board
        turn(a, "r0", None, "secret words")
        with redis.Redis.from_url(url) as raw:
            raw.replicaof("127.0.0.1", 1)  # nothing listens there: read-only meanwhile
            with pytest.raises(redis.ReadOnlyError):
                raw.set("probe", 1)
            share(store, a, "r0")
            board.publish("o", "bg", b'{"status": "failed"}', status="failed")
            await asyncio.sleep(1.0)
            assert (store.published, store.errors) == (0, 0)
            raw.replicaof("no", "one")
        await asyncio.wait_for(store.flush(), 10)
        await asyncio.wait_for(board.flush(), 10)
        assert (store.published, store.errors) == (1, 0)
        reader = SharedStore.from_url(url, prefix="ro")
        assert await reader.load(b, "r0", owner="o")
        assert await reader.background_board.get("o", "bg") == {"status": "failed"}
        await reader.client.aclose()
        await store.aclose()

    with redis_server() as url:  # its own: this test demotes it
        run(main(url))
    messages = [r.getMessage() for r in caplog.records]
    assert "cannot write stored responses to Redis" not in messages  # (never given up)
    assert "cannot write background responses' state to Redis" not in messages
    (retrying,) = [r for r in caplog.records if r.getMessage().endswith("trying again")]
    assert retrying.reason == "ReadOnlyError"  # type: ignore[attr-defined]
    assert "secret" not in caplog.text


def test_writes_follow_a_failover_endpoint_to_the_new_primary() -> None:
    """Behind a failover endpoint (a name that now leads to the new primary), the
    connections made before the failover still lead to the demoted primary, which
    refuses writes: they are closed, and the writes land on the new primary."""

    async def main(old_url: str, new_url: str) -> None:
        a = SessionCache()
        endpoint = AnswerDropper(old_url)  # a proxy: new connections go to its target
        store = SharedStore.from_url(await endpoint.start(), prefix="fo")
        await store.start()
        turn(a, "r0", None, "x")
        share(store, a, "r0")
        await store.flush()  # a connection to the old primary, idle in the pool
        turn(a, "r1", "r0", "y")
        with redis.Redis.from_url(old_url) as raw:
            raw.replicaof("127.0.0.1", 1)
        endpoint.target = new_url.removeprefix("redis://").split("/")[0].split(":")
        share(store, a, "r1")  # alone: a write on a new connection would get there anyway
        await asyncio.wait_for(store.flush(), 10)
        store.background_board.publish("o", "bg", b'{"status": "failed"}', status="failed")
        await asyncio.wait_for(store.background_board.flush(), 10)
        assert (store.published, store.errors) == (2, 0)
        async with redis.asyncio.Redis.from_url(new_url) as new:
            assert await new.exists("fo:r:o:r1", "fo:b:o:bg") == 2
        await store.aclose()
        await endpoint.aclose()

    with redis_server() as old_url, redis_server() as new_url:
        run(main(old_url, new_url))


def test_conversation_writes_leave_a_demoted_primary_too() -> None:
    """A conversation change refused with READONLY (its connection leads to the
    demoted primary) is answered 503 and closes the idle connections, so that the
    client's retry reaches the new primary through the failover endpoint, instead of
    getting READONLY for as long as the pool keeps the old connections."""

    async def main(old_url: str, new_url: str) -> tuple[bool, int]:
        endpoint = AnswerDropper(old_url)
        store = SharedStore.from_url(await endpoint.start(), prefix="cf")
        await store.start()
        board = store.conversation_board
        await board.create("o", "conv_1", 1, b"{}", [])  # a connection, idle in the pool
        with redis.Redis.from_url(old_url) as raw:
            raw.replicaof("127.0.0.1", 1)
        endpoint.target = new_url.removeprefix("redis://").split("/")[0].split(":")
        with pytest.raises(SharedStoreUnavailable):
            await board.create("o", "conv_2", 2, b"{}", [])
        await board.create("o", "conv_2", 2, b"{}", [])  # the client's retry
        async with redis.asyncio.Redis.from_url(new_url) as new:
            landed = await board.version("o", "conv_2") is not None
            keys = len(await new.keys("cf:*conv_2*"))
        await store.aclose()
        await endpoint.aclose()
        return landed, keys

    with redis_server() as old_url, redis_server() as new_url:
        landed, keys = run(main(old_url, new_url))
    assert landed and keys > 0


def test_records_that_are_missing_or_unreadable_are_misses_not_outages(redis_url: str) -> None:
    """Only Redis not answering is an outage; a record it answers with but that cannot
    be loaded stays 'not found' (a retry would not help)."""

    async def main() -> None:
        cache = SessionCache()
        store = SharedStore.from_url(redis_url, prefix="t12")
        await store.start()
        client = store.client
        future = msgpack.packb({"v": 2})
        await client.hset("t12:r:o:future", mapping={"parent": "", "data": future})
        await client.hset("t12:r:o:garbage", mapping={"parent": "", "data": b"\xc1"})
        await client.set("t12:r:o:wrongtype", "x")  # HMGET answers WRONGTYPE
        orphan = {"v": 1, "input": b"[]", "output": b"[]", "settings": "gone", "meta": b"{}"}
        await client.hset("t12:r:o:orphan", mapping={"parent": "", "data": msgpack.packb(orphan)})
        for rid in ("never-written", "future", "garbage", "wrongtype", "orphan"):
            assert not await store.load(cache, rid, owner="o"), rid
        stats = store.stats()
        assert (stats["load_misses"], stats["load_errors"], stats["errors"]) == (5, 0, 4)
        await store.aclose()

    run(main())


def test_failure_reasons_name_the_operating_systems_cause() -> None:
    def chained(error: Exception, cause: BaseException) -> Exception:
        try:
            raise error from cause
        except Exception as exc:
            return exc

    dns = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert failure_reason(chained(redis.ConnectionError("x"), dns)) == "Name or service not known"
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('h', 1)")
    assert failure_reason(chained(redis.ConnectionError("x"), refused)) == "Connection refused"
    assert failure_reason(chained(redis.TimeoutError("x"), TimeoutError())) == "timed out"
    # No OS error below: the type only, never the text (Redis' replies can quote keys).
    assert failure_reason(redis.ResponseError("WRONGTYPE key r:o:secret")) == "ResponseError"
    assert SharedStore.from_url("unix:///run/redis.sock").address == "unix:/run/redis.sock"
    assert SharedStore.from_url("redis://u:pw@[::1]:7000/2").address == "[::1]:7000"


def test_closing_writes_what_is_still_queued(redis_url: str) -> None:
    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        store = SharedStore.from_url(redis_url, prefix="t6")
        await store.start()
        parent = None
        for i in range(300):  # more than one write batch, all queued before any write
            turn(a, f"q{i}", parent, f"t{i}")
            share(store, a, f"q{i}")
            parent = f"q{i}"
        assert store.stats()["queued"] == 300
        await store.aclose()  # right away, as at shutdown
        assert store.published == 300
        reader = SharedStore.from_url(redis_url, prefix="t6")
        assert await reader.load(b, "q299", owner="o")
        assert b.context("q299", owner="o") == a.context("q299", owner="o")
        await reader.client.aclose()

    run(main())


def test_closing_with_nothing_queued_and_no_time_left_drops_nothing(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """At shutdown the writers may get no time at all (the drain used it up): with
    nothing queued, nothing is reported dropped."""
    caplog.set_level(logging.ERROR)

    async def main() -> None:
        a = SessionCache()
        store = SharedStore.from_url(redis_url, prefix="t-none")
        await store.start()
        conversations = Conversations(
            budget_bytes=1 << 20, max_item_bytes=1 << 20, board=store.conversation_board
        )
        made = await conversations.create("o", {"items": [{"role": "user", "content": "a"}]})
        conversations.extend(made, Items.from_objects([{"role": "user", "content": "b"}]))
        turn(a, "r0", None, "x")
        share(store, a, "r0")
        await store.flush()
        assert conversations._writes is not None
        await conversations._writes.join()
        await conversations.aclose(0)
        await store.aclose(flush_timeout=0)

    run(main())
    assert not [r for r in caplog.records if r.name.startswith("warmsocket")]


def test_deletions_reach_the_queue_and_the_other_processes(redis_url: str) -> None:
    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        writer = SharedStore.from_url(redis_url, prefix="t7")
        reader = SharedStore.from_url(redis_url, prefix="t7")
        heard: list[tuple[str, str]] = []
        await writer.start()
        await reader.start(on_deleted=lambda owner, rid: heard.append((owner, rid)))
        await asyncio.sleep(0.2)  # the subscription is up
        turn(a, "queued", None, "x")
        share(writer, a, "queued")
        assert await writer.delete("queued", owner="o")  # before the writer wrote it
        await writer.flush()
        assert not await reader.load(b, "queued", owner="o")
        assert not await writer.delete("queued", owner="o")  # already deleted
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        assert heard[0] == ("o", "queued")
        await writer.aclose()
        await reader.aclose()

    run(main())


def test_the_deletion_listener_survives_an_unexpected_error(redis_url: str) -> None:
    async def main() -> None:
        a = SessionCache()
        writer = SharedStore.from_url(redis_url, prefix="t8")
        reader = SharedStore.from_url(redis_url, prefix="t8")
        real = reader.client.xread
        failed: list[bool] = []

        async def first_call_fails(*args: Any, **kwargs: Any) -> Any:
            if not failed:
                failed.append(True)
                raise RuntimeError("a bug below the listener")
            return await real(*args, **kwargs)

        reader.client.xread = first_call_fails  # type: ignore[method-assign]
        heard: list[tuple[str, str]] = []
        await writer.start()
        await reader.start(on_deleted=lambda owner, rid: heard.append((owner, rid)))
        turn(a, "later", None, "x")
        share(writer, a, "later")
        await writer.flush()
        # Deleted while the reader waits to try again (1 s): heard all the same.
        assert await writer.delete("later", owner="o")
        for _ in range(150):
            if heard:
                break
            await asyncio.sleep(0.02)
        assert failed and heard == [("o", "later")]
        assert reader.stats()["errors"] == 1
        await writer.aclose()
        await reader.aclose()  # does not raise the listener's old error

    run(main())


def test_deletions_and_cancels_made_while_a_process_could_not_read_reach_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis restarted (with its data) while a process followed the announcements: what
    was announced while that process was not connected still reaches it (pub/sub, used
    before, lost it: the deleted response stayed in that process's cache)."""

    async def main(url: str, restart: Callable[[], None]) -> list[tuple[str, str, str]]:
        writer = SharedStore.from_url(url, prefix="t-gap")
        reader = SharedStore.from_url(url, prefix="t-gap")
        heard: list[tuple[str, str, str]] = []
        await writer.start()
        await reader.start(
            on_deleted=lambda owner, rid: heard.append(("deleted", owner, rid)),
            on_cancel=lambda owner, rid: heard.append(("cancel", owner, rid)),
        )
        assert await writer.delete("before", owner="o") is False
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        restart()  # the reader's blocked read fails: it tries again every second
        # Announced before the reader is back: it has not read since the restart.
        await writer.delete("meanwhile", owner="o")
        await writer.background_board.request_cancel("o", "run")
        for _ in range(200):
            if len(heard) == 3:
                break
            await asyncio.sleep(0.02)
        await writer.aclose()
        await reader.aclose()
        return heard

    with restartable_redis_server() as (url, restart):
        heard = run(main(url, restart))
    assert heard == [
        ("deleted", "o", "before"),
        ("deleted", "o", "meanwhile"),
        ("cancel", "o", "run"),
    ]


def test_deletions_and_cancels_made_while_a_process_was_cut_off_reach_it(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A process cut off from Redis (a partition, its connections reset) while others
    delete and cancel: once back, it hears all of it. With pub/sub it heard nothing
    of what was published meanwhile, and kept serving the deleted response."""

    async def main() -> tuple[list[tuple[str, str, str]], int]:
        proxy = AnswerDropper(redis_url)
        writer = SharedStore.from_url(redis_url, prefix="t-cut")
        reader = SharedStore.from_url(await proxy.start(), prefix="t-cut")
        heard: list[tuple[str, str, str]] = []
        await writer.start()
        await reader.start(
            on_deleted=lambda owner, rid: heard.append(("deleted", owner, rid)),
            on_cancel=lambda owner, rid: heard.append(("cancel", owner, rid)),
        )
        proxy.cut()
        for _ in range(200):  # the reader's read failed, and its retry
            if reader.announcements.errors:
                break
            await asyncio.sleep(0.02)
        assert reader.announcements.errors == 1
        await writer.delete("meanwhile", owner="o")
        await writer.background_board.request_cancel("o", "run")
        await asyncio.sleep(1.5)  # the reader tried again (every second): still cut off
        assert heard == []
        proxy.mend()
        for _ in range(200):
            if len(heard) == 2:
                break
            await asyncio.sleep(0.02)
        await writer.aclose()
        await reader.aclose()
        await proxy.aclose()
        return heard, reader.announcements.missed

    caplog.set_level(logging.INFO, logger="warmsocket.shared_store")
    heard, missed = run(main())
    assert heard == [("deleted", "o", "meanwhile"), ("cancel", "o", "run")]
    assert missed == 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("cannot read Redis deletions and cancels; trying again every second") == 1
    assert "following Redis deletions and cancels again" in messages


async def deleted_while_cut_off(
    proxy: AnswerDropper, writer: SharedStore, reader: SharedStore, deleted: list[str]
) -> None:
    """Delete `deleted`, then far more than the stream keeps (`KEEP` set to 3: trimmed to
    about 100), while `reader` is cut off; then wait until it checked its cache."""
    proxy.cut()
    await asyncio.sleep(0.3)
    for rid in deleted:
        await writer.delete(rid, owner="o")
    for n in range(500):
        await writer.delete(f"r{n}", owner="o")
    proxy.mend()
    for _ in range(300):
        if reader.rechecks:
            return
        await asyncio.sleep(0.02)


def test_deletions_trimmed_before_a_process_read_them_are_found_in_the_records(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """More deletions were announced while a process was cut off than the stream keeps:
    it reports the gap, then checks each stored response it caches against its record
    and drops those deleted meanwhile (before, it kept serving them until they left
    its cache)."""
    monkeypatch.setattr(shared_announcements, "KEEP", 3)
    monkeypatch.setattr(shared_store, "RECHECK_BATCH", 2)  # more than one round trip
    cache = SessionCache()

    async def main() -> tuple[int, int, list[tuple[str, str]]]:
        proxy = AnswerDropper(redis_url)
        writer = SharedStore.from_url(redis_url, prefix="t-trim")
        reader = SharedStore.from_url(await proxy.start(), prefix="t-trim")
        dropped: list[tuple[str, str]] = []

        def deleted(owner: str, rid: str) -> None:
            dropped.append((owner, rid))
            cache.delete(rid, owner=owner)

        await writer.start()
        await reader.start(on_deleted=deleted, stored_ids=cache.stored_ids)
        for rid in ("gone1", "kept", "gone2", "unwritten"):
            turn(cache, rid, None, rid)
        turn(cache, "theirs", None, "x", owner="p")
        for rid in ("gone1", "kept", "gone2"):
            share(reader, cache, rid)
        reader.publish(cache.get("theirs", owner="p"), *cache.own_items("theirs", owner="p"))
        await reader.flush()
        await deleted_while_cut_off(proxy, writer, reader, ["gone1", "gone2"])
        await writer.aclose()
        await reader.aclose()
        await proxy.aclose()
        return reader.announcements.missed, reader.rechecks, dropped

    caplog.set_level(logging.INFO, logger="warmsocket.shared_store")
    missed, rechecks, dropped = run(main())
    assert (missed, rechecks) == (1, 1)
    # (The newest of the 500 are still in the stream, trimmed roughly: heard.)
    assert sorted(d for d in dropped if d[1].startswith("gone")) == [("o", "gone1"), ("o", "gone2")]
    assert sorted(cache.stored_ids()) == [("o", "kept"), ("o", "unwritten"), ("p", "theirs")]
    messages = [r.getMessage() for r in caplog.records]
    assert any("dropped before this process read them" in m for m in messages)
    [checked] = [r for r in caplog.records if r.getMessage().startswith("checked the cached")]
    assert (checked.checked, checked.dropped) == (5, 2)  # type: ignore[attr-defined]


def test_deletions_trimmed_while_a_process_was_paused_are_found_in_the_records(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process was paused (its event loop held up) while more was announced than
    the stream keeps; no read failed, so only how long its read took tells."""
    monkeypatch.setattr(shared_announcements, "KEEP", 3)
    monkeypatch.setattr(shared_announcements, "STALL_SECONDS", 0.3)
    cache = SessionCache()

    async def main() -> tuple[int, list[str]]:
        writer = SharedStore.from_url(redis_url, prefix="t-stall")
        reader = SharedStore.from_url(redis_url, prefix="t-stall")
        await writer.start()
        await reader.start(
            on_deleted=lambda owner, rid: cache.delete(rid, owner=owner),
            stored_ids=cache.stored_ids,
        )
        turn(cache, "gone", None, "x")
        share(reader, cache, "gone")
        await reader.flush()
        await asyncio.sleep(0.1)  # the reader waits in a read

        def others_meanwhile() -> None:
            with redis.Redis.from_url(redis_url) as client:
                key = reader.announcements.key
                client.xadd(key, {"k": "deleted", "o": "o", "id": "first"})  # wakes the read
                client.hset(reader._key("o", "gone"), "deleted", "1")
                for rid in ["gone", *(f"r{n}" for n in range(500))]:
                    client.xadd(key, {"k": "deleted", "o": "o", "id": rid}, maxlen=3)

        thread = threading.Thread(target=others_meanwhile)
        thread.start()
        time.sleep(2.0)  # the reader's process paused (its event loop held up)
        thread.join()
        for _ in range(300):
            if reader.rechecks:
                break
            await asyncio.sleep(0.02)
        await writer.aclose()
        await reader.aclose()
        return reader.announcements.missed, sorted(rid for _, rid in cache.stored_ids())

    missed, cached = run(main())
    assert missed == 1 and cached == []


def test_a_stream_begun_again_is_counted_from_its_own_start(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis lost the stream (restarted empty, flushed) and others announced again
    before this process looked: its count of what it had read belonged to the old
    stream, and hid the next trimmed gap (more read than the new stream ever had)."""
    monkeypatch.setattr(shared_announcements, "KEEP", 3)

    async def main() -> int:
        proxy = AnswerDropper(redis_url)
        writer = SharedStore.from_url(redis_url, prefix="t-anew")
        reader = SharedStore.from_url(await proxy.start(), prefix="t-anew")
        await writer.start()
        await reader.start(on_deleted=lambda owner, rid: None)
        announcements = reader.announcements

        async def until(done: Callable[[], bool]) -> None:
            for _ in range(500):
                if done():
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("not in time")

        for n in range(1000):
            await writer.delete(f"old{n}", owner="o")
        await until(lambda: announcements._read >= 1000)
        proxy.cut()
        await until(lambda: announcements.errors >= 1)
        await writer.client.delete(announcements.key)  # the stream is lost
        for n in range(2):
            await writer.delete(f"new{n}", owner="o")
        proxy.mend()
        await until(lambda: announcements._read == 2)  # read from the new stream's start
        proxy.cut()
        await until(lambda: announcements.errors >= 2)
        for n in range(500):  # trimmed to about 100 before the reader reads again
            await writer.delete(f"later{n}", owner="o")
        proxy.mend()
        await until(lambda: announcements.missed > 0)
        await writer.aclose()
        await reader.aclose()
        await proxy.aclose()
        return announcements.missed

    assert run(main()) == 1


def test_a_response_deleted_elsewhere_before_it_was_written_is_written_deleted(
    redis_url: str,
) -> None:
    """Another process deleted a response this one had not written yet (its write
    waited for Redis): it is written marked deleted, not loadable again."""
    cache = SessionCache()
    turn(cache, "r", None, "x")

    async def main() -> tuple[bytes | None, bool]:
        proxy = AnswerDropper(redis_url)
        store = SharedStore.from_url(await proxy.start(), prefix="t-tomb")
        await store.start()
        proxy.cut()
        share(store, cache, "r")  # its write waits
        await asyncio.sleep(0.2)
        heard: list[str] = []
        store._deleted_elsewhere("o", "r", lambda owner, rid: heard.append(rid))
        proxy.mend()
        await store.flush()
        mark = await store.client.hget(store._key("o", "r"), "deleted")
        other = SessionCache()
        loaded = await store.load(other, "r", owner="o")
        await store.aclose()
        await proxy.aclose()
        assert heard == ["r"]
        return mark, loaded

    assert run(main()) == (b"1", False)


def test_a_running_response_deleted_elsewhere_is_written_deleted_after_its_deletion(
    redis_url: str,
) -> None:
    """Another process deleted a background response while this one ran it, and this
    one wrote its stored response before it heard (or without ever hearing): the record
    is deleted all the same, and its background state is not shown either; a
    response that never ran leaves nothing behind."""
    cache = SessionCache()
    turn(cache, "r", None, "x")

    async def main() -> tuple[bool, bool, dict[str, Any] | None, int]:
        runner = SharedStore.from_url(redis_url, prefix="t-race")
        deleter = SharedStore.from_url(redis_url, prefix="t-race")
        await runner.start()
        await deleter.start()
        board = runner.background_board
        board.publish("o", "r", b'{"status": "in_progress"}', status="in_progress")
        await board.flush()
        existed = await deleter.delete("r", owner="o")
        share(runner, cache, "r")  # the run ended: stored, and shown as it ended
        board.publish("o", "r", b'{"status": "completed"}', status="completed")
        await runner.flush()
        await board.flush()
        loaded = await deleter.load(SessionCache(), "r", owner="o")
        state = await deleter.background_board.get("o", "r")
        await deleter.delete("never-ran", owner="o")
        left = await deleter.client.exists("t-race:r:o:never-ran")
        await runner.aclose()
        await deleter.aclose()
        return existed, loaded, state, left

    assert run(main()) == (False, False, None, 0)


def test_responses_cached_at_start_are_checked_against_the_records(redis_url: str) -> None:
    """A process that starts with responses in its cache (restored from a snapshot)
    did not follow the deletions made while it was down: it checks them first."""
    other_cache, cache = SessionCache(), SessionCache()
    for rid in ("deleted_meanwhile", "kept"):
        turn(other_cache, rid, None, rid)
        turn(cache, rid, None, rid)  # (as a snapshot of before would restore them)

    async def main() -> list[str]:
        other = SharedStore.from_url(redis_url, prefix="t-snap")
        await other.start()
        for rid in ("deleted_meanwhile", "kept"):
            share(other, other_cache, rid)
        await other.flush()
        await other.delete("deleted_meanwhile", owner="o")
        starting = SharedStore.from_url(redis_url, prefix="t-snap")
        await starting.start(
            on_deleted=lambda owner, rid: cache.delete(rid, owner=owner),
            stored_ids=cache.stored_ids,
        )
        for _ in range(200):
            if starting.rechecks:
                break
            await asyncio.sleep(0.02)
        await other.aclose()
        await starting.aclose()
        return sorted(rid for _, rid in cache.stored_ids())

    assert run(main()) == ["kept"]


def test_a_check_redis_did_not_answer_is_made_again(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check after missed deletions found Redis gone again: it is made once Redis
    answers, not given up."""
    monkeypatch.setattr(shared_announcements, "KEEP", 3)
    cache = SessionCache()

    async def main() -> tuple[int, int, bool]:
        proxy = AnswerDropper(redis_url)
        writer = SharedStore.from_url(redis_url, prefix="t-recheck")
        reader = SharedStore.from_url(await proxy.start(), prefix="t-recheck")
        checks: list[int] = []
        real_check = reader._recheck_deletions

        async def check(stored: list[tuple[str, str]], on_deleted: Any) -> bool:
            checks.append(len(stored))
            if len(checks) == 1:
                proxy.cut()  # Redis is gone again as the first check begins
                answered = await real_check(stored, on_deleted)
                proxy.mend()
                return answered
            return await real_check(stored, on_deleted)

        monkeypatch.setattr(reader, "_recheck_deletions", check)
        await writer.start()
        await reader.start(
            on_deleted=lambda owner, rid: cache.delete(rid, owner=owner),
            stored_ids=cache.stored_ids,
        )
        turn(cache, "gone", None, "x")
        share(reader, cache, "gone")
        await reader.flush()
        await deleted_while_cut_off(proxy, writer, reader, ["gone"])
        await writer.aclose()
        await reader.aclose()
        await proxy.aclose()
        return len(checks), reader.rechecks, "gone" in {rid for _, rid in cache.stored_ids()}

    checks, rechecks, still_cached = run(main())
    assert checks == 2 and rechecks == 1
    assert not still_cached


def test_settings_lost_from_redis_are_written_again(redis_url: str) -> None:
    """Redis restarted empty (or flushed): the settings a process had written lately
    were only refreshed (EXPIRE), which does nothing on a missing key, so new records
    pointed at settings that no longer existed and no other process could load them."""

    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        writer = SharedStore.from_url(redis_url, prefix="t9")
        reader = SharedStore.from_url(redis_url, prefix="t9")
        await writer.start()
        await reader.start()
        turn(a, "before", None, "x")
        share(writer, a, "before")
        await writer.flush()
        await writer.client.flushall()
        turn(a, "after", None, "y")  # the same settings
        share(writer, a, "after")
        await writer.flush()
        assert await reader.load(b, "after", owner="o")
        assert reader.errors == 0
        await writer.aclose()
        await reader.aclose()

    run(main())


def test_a_deletion_announced_during_a_load_wins(redis_url: str) -> None:
    """The load read the record before it was deleted; the announcement came while the
    load was still running and found nothing here to drop: the load drops it."""

    async def main() -> None:
        a, b = SessionCache(), SessionCache()
        writer = SharedStore.from_url(redis_url, prefix="t10")
        reader = SharedStore.from_url(redis_url, prefix="t10")
        await writer.start()
        await reader.start()
        turn(a, "root", None, "x")
        share(writer, a, "root")
        turn(a, "leaf", "root", "y")
        share(writer, a, "leaf")
        await writer.flush()
        dropped: list[tuple[str, str]] = []
        read_settings = reader._settings

        async def deleted_meanwhile(records: Any) -> dict[str, bytes]:
            settings = await read_settings(records)
            # What the listener does when A's DELETE is announced now.
            reader._deleted_elsewhere("o", "leaf", lambda o, r: dropped.append((o, r)))
            return settings

        reader._settings = deleted_meanwhile  # type: ignore[method-assign]
        assert not await reader.load(b, "leaf", owner="o")
        assert dropped == [("o", "leaf")]
        assert b.get("root", owner="o").id == "root"  # the ancestor is still there
        with pytest.raises(LookupError):
            b.get("leaf", owner="o")
        await writer.aclose()
        await reader.aclose()

    run(main())


def test_a_cold_load_tokenises_off_the_event_loop(redis_url: str) -> None:
    """Loading a long chain tokenises every item; on the event loop that stalled every
    other connection of the process for as long (seconds for a big chain)."""
    from warmsocket.engine import new_cache, tokenizer_for

    async def main() -> None:
        a = SessionCache()
        b = new_cache(1 << 30, 32 << 20, tokenizer=tokenizer_for("o200k_base", "m"))
        writer = SharedStore.from_url(redis_url, prefix="t11")
        reader = SharedStore.from_url(redis_url, prefix="t11")
        await writer.start()
        await reader.start()
        parent = None
        for i in range(12):
            turn(a, f"r{i}", parent, "m" * 300_000)  # slow to tokenise
            share(writer, a, f"r{i}")
            parent = f"r{i}"
        await writer.flush()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.get_running_loop().create_task(ticker())
        started = time.monotonic()
        assert await reader.load(b, "r11", owner="o")
        took = time.monotonic() - started
        task.cancel()
        assert b.view("r11", owner="o").tokens > 0  # tokenised
        # The loop went on while the chain was tokenised (about 1 tick per 5 ms).
        assert took > 0.05 and ticks >= took / 0.005 / 4, (took, ticks)
        await writer.aclose()
        await reader.aclose()

    run(main())


def test_a_followed_background_stream_gets_every_event_once_and_in_order(
    redis_url: str,
) -> None:
    """Board level: a follower on another process reads what was written before it
    came and what comes after, across several reads, each write whole events (an
    empty one would end the HTTP chunked body early), until the end mark."""

    async def main() -> None:
        writer = SharedStore.from_url(redis_url, prefix="t-follow")
        reader = SharedStore.from_url(redis_url, prefix="t-follow")
        await writer.start()
        await reader.start()
        board = writer.background_board
        events = [b"data: %d\n\n" % n for n in range(shared_background.FOLLOW_BATCH + 10)]
        board.append_events("o", "r", 0, events[:3])
        await board.flush()
        assert await reader.background_board.can_follow("o", "r")
        assert not await reader.background_board.can_follow("other", "r")
        written: list[bytes] = []

        async def drain() -> None:
            return None

        follower = asyncio.create_task(
            reader.background_board.follow("o", "r", 0, written.append, drain, lambda: False)
        )
        await asyncio.sleep(0.2)
        assert written == [b"".join(events[1:3])]  # after sequence number 0
        board.append_events("o", "r", 3, events[3:])  # more than one read's worth
        await board.flush()
        await asyncio.sleep(0.2)
        board.end_events("o", "r", len(events), "completed", 60)
        await board.flush()
        await asyncio.wait_for(follower, 5)
        assert len(written) >= 3 and all(written)
        assert b"".join(written) == b"".join(events[1:])
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            assert 0 < await client.ttl("t-follow:be:o:r") <= 60
        board.forget("o", "r")
        await board.flush()
        assert not await reader.background_board.can_follow("o", "r")
        await writer.aclose()
        await reader.aclose()

    run(main())


def test_a_follower_waits_for_a_running_response_with_no_events_yet(redis_url: str) -> None:
    """A client that streams a response another process has just started (its record
    written, no event yet) gets its events, and one whose record is gone is let go."""

    async def main() -> None:
        writer = SharedStore.from_url(redis_url, prefix="t-early")
        reader = SharedStore.from_url(redis_url, prefix="t-early")
        await writer.start()
        await reader.start()
        board, follower_board = writer.background_board, reader.background_board
        board.publish("o", "r", b'{"id":"r","status":"queued"}', status="queued")
        board.publish("o", "done", b'{"id":"done","status":"failed"}', status="failed")
        await board.flush()
        assert await follower_board.can_follow("o", "r")
        assert not await follower_board.can_follow("o", "done")  # ended, no events kept
        assert not await follower_board.can_follow("o", "nothing")
        written: list[bytes] = []

        async def drain() -> None:
            return None

        follower = asyncio.create_task(
            follower_board.follow("o", "r", -1, written.append, drain, lambda: False)
        )
        await asyncio.sleep(shared_background.FOLLOW_BLOCK_MS / 1000 * 1.5)  # no events yet
        assert not follower.done()
        board.append_events("o", "r", 0, [b"data: 0\n\n", b"data: 1\n\n"])
        board.end_events("o", "r", 2, "completed", 60)
        await board.flush()
        await asyncio.wait_for(follower, 5)
        assert b"".join(written) == b"data: 0\n\ndata: 1\n\n"
        # A follower of a running response whose process died (record and events
        # expired) is let go.
        board.publish("o", "r2", b'{"id":"r2","status":"in_progress"}', status="in_progress")
        board.append_events("o", "r2", 0, [b"data: 0\n\n"])
        await board.flush()
        follower = asyncio.create_task(
            follower_board.follow("o", "r2", 0, written.append, drain, lambda: False)
        )
        await asyncio.sleep(0.2)
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            await client.delete("t-early:b:o:r2", "t-early:be:o:r2")
        await asyncio.wait_for(follower, 3 * shared_background.FOLLOW_BLOCK_MS / 1000)
        await writer.aclose()
        await reader.aclose()

    run(main())


def test_background_writes_whose_answers_were_lost_are_tried_again_once_each(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis wrote a run's events but its answers were lost (the client timed out and
    tried again): the events are in the stream once, in order, and nothing is counted
    as failed; so are those written while Redis was paused."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    caplog.set_level(logging.ERROR, logger="warmsocket.shared_background")

    async def main() -> tuple[list[bytes], int]:
        dropper = AnswerDropper(redis_url)
        store = SharedStore.from_url(await dropper.start(), prefix="t-lost")
        await store.start()
        board = store.background_board
        board.append_events("o", "r", 0, [b"data: 0\n\n"])
        await board.flush()
        dropper.dropping = True
        board.append_events("o", "r", 1, [b"data: 1\n\n", b"data: 2\n\n"])
        await asyncio.sleep(1.0)  # written by Redis, not answered; tried again
        dropper.dropping = False
        await asyncio.wait_for(board.flush(), 10)
        with paused(redis_url):
            board.append_events("o", "r", 3, [b"data: 3\n\n"])
            board.end_events("o", "r", 4, "completed", 60)
            await asyncio.sleep(1.0)
        await asyncio.wait_for(board.flush(), 10)
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            entries = await client.xrange("t-lost:be:o:r")
        await store.aclose()
        await dropper.aclose()
        return [b"".join(fields.values()) for _id, fields in entries], store.errors

    events, errors = run(main())
    assert events == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n", b"completed"]
    assert errors == 0
    assert not [r for r in caplog.records if r.name.startswith("warmsocket")]


def test_background_written_waits_for_the_writes_queued_before_it(redis_url: str) -> None:
    """`written` returns once the writes queued before it are in Redis, not waiting for
    later ones; with Redis paused it gives up after its timeout, saying so."""

    async def main() -> None:
        store = SharedStore.from_url(redis_url, prefix="t-written")
        await store.start()
        board = store.background_board
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            board.append_events("o", "r", 0, [b"data: 0\n\n"])
            assert await board.written(5.0)
            assert await client.xlen("t-written:be:o:r") == 1
            with paused(redis_url):
                board.append_events("o", "r", 1, [b"data: 1\n\n"])
                started = time.monotonic()
                assert not await board.written(0.3)
                assert 0.3 <= time.monotonic() - started < 2.0
            assert await board.written(10.0)
            assert await client.xlen("t-written:be:o:r") == 2
            assert await board.written(0.0)  # nothing queued since
        await store.aclose()

    run(main())


def test_background_writes_queued_beyond_the_bound_are_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shared_background, "MAX_QUEUED_WRITES", 5)

    async def main() -> None:
        store = SharedStore.from_url(redis_url, prefix="t-bound")
        await store.start()
        board = store.background_board
        for n in range(8):  # queued before the writer runs
            board.append_events("o", "r", n, [b"data: x\n\n"])
        assert store.errors == 3
        await board.flush()
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            assert await client.xlen("t-bound:be:o:r") == 5
        await store.aclose()

    with caplog.at_level(logging.ERROR, logger="warmsocket.shared_background"):
        run(main())
    dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].__dict__["queued"] == 5


def test_background_writes_being_written_count_against_the_bound(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """While Redis does not answer, the writes being tried again wait as much as those
    queued behind them: together at most MAX_QUEUED_WRITES, not twice as many."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    monkeypatch.setattr(shared_background, "MAX_QUEUED_WRITES", 5)

    async def main() -> tuple[int, int]:
        dropper = AnswerDropper(redis_url)
        store = SharedStore.from_url(await dropper.start(), prefix="t-bound-writing")
        await store.start()
        board = store.background_board
        dropper.dropping = True
        for n in range(5):
            board.append_events("o", "r", n, [b"data: x\n\n"])
        await asyncio.sleep(0.1)  # taken by the writer: being written, unanswered
        for n in range(5, 8):
            board.append_events("o", "r", n, [b"data: x\n\n"])
        dropped = store.errors
        dropper.dropping = False
        await asyncio.wait_for(board.flush(), 10)
        async with redis.asyncio.Redis.from_url(redis_url) as client:
            written = await client.xlen("t-bound-writing:be:o:r")
        await store.aclose()
        await dropper.aclose()
        return dropped, written

    assert run(main()) == (3, 5)


def test_background_writes_left_at_shutdown_are_logged(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis does not answer at shutdown: the background writes it could not take in
    time, being written or queued, are reported dropped (how many, never content), as
    stored responses' are."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    caplog.set_level(logging.ERROR, logger="warmsocket.shared_background")

    async def main() -> None:
        dropper = AnswerDropper(redis_url)
        store = SharedStore.from_url(await dropper.start(), prefix="t-shutdown")
        await store.start()
        board = store.background_board
        dropper.dropping = True
        board.append_events("o", "r", 0, [b"data: secret\n\n"])
        await asyncio.sleep(0.1)  # being written, unanswered
        board.publish("o", "r", b'{"status": "in_progress"}', status="in_progress")
        await store.aclose(flush_timeout=0.5)
        await dropper.aclose()

    run(main())
    (dropped,) = [r for r in caplog.records if "dropped at shutdown" in r.getMessage()]
    assert dropped.__dict__["writes"] == 2
    assert "secret" not in caplog.text


def test_what_waits_to_be_written_is_bounded_by_its_bytes(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis does not answer, writes wait (tried until it does): what they hold is
    bounded by bytes as well as by count, for stored responses and background state."""
    monkeypatch.setattr(shared_store, "QUEUE_BYTES", 3000)
    monkeypatch.setattr(shared_background, "MAX_QUEUED_BYTES", 3000)
    caplog.set_level(logging.ERROR)

    async def main() -> tuple[int, int]:
        cache = SessionCache()
        store = SharedStore.from_url(redis_url, prefix="t-bytes")  # not started: nothing
        for n in range(3):  # is written, as while Redis does not answer
            turn(cache, f"big{n}", None, "x" * 500)  # about 1.1 KB with its output
            share(store, cache, f"big{n}")
        board = store.background_board
        for n in range(3):
            board.publish("o", f"run{n}", b"{" + b" " * 1200 + b"}", status="in_progress")
        queued = (store._queue.qsize(), len(board._ops))
        await store.client.aclose()
        return queued

    assert run(main()) == (2, 2)
    messages = [r.getMessage() for r in caplog.records]
    assert any("stored responses not shared: too many queued" in m for m in messages)
    assert any("background responses' writes to Redis dropped" in m for m in messages)


def test_deleting_a_response_deletes_its_published_background_input(redis_url: str) -> None:
    """A background response's input, published for `input_items` on every process, is
    deleted with the response, also when no process runs it any more to forget it
    (the record's TTL is the store's for a failed or cancelled one)."""

    async def main() -> tuple[bytes | None, bytes | None, int]:
        store = SharedStore.from_url(redis_url, prefix="t-bi")
        await store.start()
        board = store.background_board
        board.publish("o", "resp_x", b'{"status": "failed"}', status="failed", input_json=b"[1]")
        await board.flush()
        before = await board.get_input("o", "resp_x")
        await store.delete("resp_x", owner="o")
        after = await board.get_input("o", "resp_x")
        left = await store.client.exists(board.input_key("o", "resp_x"))
        await store.aclose()
        return before, after, int(left)

    assert run(main()) == (b"[1]", None, 0)
