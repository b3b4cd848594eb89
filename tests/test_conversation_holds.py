"""One response at a time adds to a shared conversation across processes
(`conversation_holds`), against a real Redis."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis

from tests.redis_support import paused, redis_server
from tests.support import RunningServer, WSClient
from tests.test_shared_conversations import client, texts, written
from tests.test_shared_store_serve import two_servers
from warmsocket import shared_store
from warmsocket._core import Items
from warmsocket.conversation_holds import SharedHolds
from warmsocket.conversations import Conversations
from warmsocket.engine import SharedStoreUnavailable
from warmsocket.errors import APIError
from warmsocket.shared_store import SharedStore

KEY = {"Authorization": "Bearer sk-test"}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def hold_keys(redis_url: str, server: RunningServer) -> list[bytes]:
    shared = server.server.engine.shared
    assert isinstance(shared, SharedStore)
    with redis.Redis.from_url(redis_url) as direct:
        return list(direct.scan_iter(f"{shared.conversation_board.prefix}:cl:*"))


def eventually_free(redis_url: str, server: RunningServer) -> None:
    deadline = time.monotonic() + 5
    while hold_keys(redis_url, server):
        assert time.monotonic() < deadline, "a hold was never let go of"
        time.sleep(0.02)


def test_a_second_process_is_refused_while_a_response_adds_to_the_conversation(
    redis_url: str,
) -> None:
    """A response to a conversation runs on A; a create on B with the same conversation
    read it without A's items and added its own before them. Now B refuses it with
    OpenAI's 400 `conversation_locked` (over HTTP and over WebSocket mode), reads that
    add nothing go on, and B's next create once A's ended reads A's items."""
    with two_servers(redis_url) as (a, b), client(a) as on_a, client(b) as on_b:
        made = on_a.conversations.create(items=[{"role": "user", "content": "start"}])
        with WSClient(a.ws_url, additional_headers=KEY) as ws:
            ws.create(input="/sleep 4000 first", conversation=made.id)
            assert ws.recv()["type"] == "response.created"
            with pytest.raises(openai.BadRequestError) as locked:
                on_b.responses.create(model="m", input="second", conversation=made.id)
            assert (locked.value.code, locked.value.param) == (
                "conversation_locked",
                "conversation",
            )
            with WSClient(b.ws_url, additional_headers=KEY) as on_b_ws:
                error = on_b_ws.turn(input="third", conversation=made.id)[-1]
                read_ws = on_b_ws.turn(input="/transcript", store=False, conversation=made.id)
            assert read_ws[-1]["type"] == "response.completed"
            assert (error["type"], error["status"], error["error"]["code"]) == (
                "error",
                400,
                "conversation_locked",
            )
            read = on_b.responses.create(
                model="m", input="/transcript", store=False, conversation=made.id
            )
            assert read.output_text.splitlines() == ["user: start", "user: /transcript"]
            assert ws.until_terminal()[-1]["type"] == "response.completed"
        # At once: the hold lasts until A's addition is written, and B waits for that.
        after = on_b.responses.create(model="m", input="/transcript", conversation=made.id)
        assert after.output_text.splitlines()[:2] == ["user: start", "user: /sleep 4000 first"]
        written(b)
        listed = list(on_a.conversations.items.list(made.id, order="asc"))
        assert texts([item.model_dump() for item in listed])[:2] == ["start", "/sleep 4000 first"]
        assert len(listed) == 5  # start, first and its answer, /transcript and its answer
        eventually_free(redis_url, a)


def test_holds_are_let_go_of_when_a_create_is_refused_or_cancelled(redis_url: str) -> None:
    """A create refused after its claim (bad input), a background response cancelled,
    a WebSocket create continuing a conversation: none leaves a hold in Redis, and
    the other process goes on at once."""
    with two_servers(redis_url) as (a, b), client(a) as on_a, client(b) as on_b:
        made = on_a.conversations.create(items=[{"role": "user", "content": "start"}])
        with pytest.raises(openai.BadRequestError):
            on_a.responses.create(
                model="m",
                input=[{"type": "function_call_output", "call_id": "nope", "output": "x"}],
                conversation=made.id,
            )
        on_b.responses.create(model="m", input="after a refusal", conversation=made.id)
        running = on_a.responses.create(
            model="m", input="/sleep 5000 long", conversation=made.id, background=True
        )
        assert on_a.responses.cancel(running.id).status == "cancelled"
        on_b.responses.create(model="m", input="after a cancel", conversation=made.id)
        with WSClient(a.ws_url, additional_headers=KEY) as ws:
            assert ws.turn(input="on a", conversation=made.id)[-1]["type"] == "response.completed"
        written(a)
        on_b.responses.create(model="m", input="after a websocket turn", conversation=made.id)
        written(b)
        eventually_free(redis_url, a)
        items = on_a.conversations.items.list(made.id, order="asc")
        listed = texts([item.model_dump() for item in items])
        inputs = ["after a refusal", "after a cancel", "on a", "after a websocket turn"]
        assert listed[0] == "start"
        assert [text for text in listed if text in inputs] == inputs


def test_a_redis_outage_at_the_claim_is_a_retriable_503(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.3)
    with two_servers(redis_url) as (a, _b), client(a) as on_a:
        made = on_a.conversations.create(items=[{"role": "user", "content": "kept"}])
        with paused(redis_url), pytest.raises(openai.InternalServerError) as down:
            on_a.responses.create(model="m", input="x", conversation=made.id)
        assert down.value.status_code == 503
        assert down.value.body["param"] == "conversation"  # type: ignore[index]
        # Nothing held is left behind: the next create goes on.
        answer = on_a.responses.create(model="m", input="/transcript", conversation=made.id)
        assert answer.output_text.splitlines() == ["user: kept", "user: /transcript"]


# -- the holds themselves ---------------------------------------------------------------


async def _holds(redis_url: str, prefix: str, **timing: float) -> tuple[SharedStore, SharedHolds]:
    shared = SharedStore.from_url(redis_url, prefix=prefix)
    await shared.start()
    return shared, SharedHolds(shared.conversation_board, **timing)


async def _try_claim(holds: SharedHolds) -> str:
    """'taken', the code of the claim's refusal, or 'unavailable' (Redis)."""
    try:
        await holds.claim("o", "conv_1")
    except APIError as refused:
        return refused.code
    except SharedStoreUnavailable:
        return "unavailable"
    return "taken"


async def _close(*processes: tuple[SharedStore, SharedHolds]) -> None:
    for shared, holds in processes:
        await holds.aclose()
        await shared.aclose()


def test_a_dead_process_holds_nothing_past_the_lease(redis_url: str) -> None:
    """A hold is renewed while held (past its lease), let go of when released, and a
    process that stops renewing (it died) holds nothing past the lease."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    timing = {"lease_seconds": 0.4, "renew_seconds": 0.1, "wait_seconds": 0.0}

    async def main() -> list[str]:
        shared_a, on_a = await _holds(redis_url, prefix, **timing)
        shared_b, on_b = await _holds(redis_url, prefix, **timing)
        seen = []
        await on_a.claim("o", "conv_1")
        await asyncio.sleep(1.0)  # 2.5 leases: renewed
        seen.append(await _try_claim(on_b))
        on_a.release("o", "conv_1")
        await asyncio.sleep(0.05)
        await on_b.claim("o", "conv_1")  # free at once
        seen.append("taken by b")
        # B dies holding it: no renewal, no release.
        assert on_b._renewer is not None
        on_b._renewer.cancel()
        seen.append(await _try_claim(on_a))
        await asyncio.sleep(0.6)
        await on_a.claim("o", "conv_1")
        seen.append("taken by a after the lease")
        await on_a.aclose()
        for shared in (shared_a, shared_b):
            await shared.aclose()
        return seen

    assert asyncio.run(main()) == [
        "conversation_locked",
        "taken by b",
        "conversation_locked",
        "taken by a after the lease",
    ]


def test_a_claim_redis_does_not_answer_holds_nothing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[bool, bool]:
        shared, holds = await _holds(redis_url, prefix)
        with paused(redis_url), pytest.raises(SharedStoreUnavailable):
            await holds.claim("o", "conv_1")
        held_after_outage = holds.holds("o", "conv_1")
        await holds.claim("o", "conv_1")
        held = holds.holds("o", "conv_1")
        holds.release("o", "conv_1")
        await holds.aclose()
        await shared.aclose()
        return held_after_outage, held

    assert asyncio.run(main()) == (False, True)


class _Response:
    finished = False


def test_the_hold_lasts_until_the_addition_is_written(redis_url: str) -> None:
    """A response that ended lets go of the conversation only once its input and
    output are written to Redis: another process's create meanwhile would read the
    conversation without them."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> list[tuple[str, bool]]:
        shared = SharedStore.from_url(redis_url, prefix=prefix)
        await shared.start()
        board = shared.conversation_board
        store = Conversations(budget_bytes=1 << 20, max_item_bytes=1 << 20, board=board)
        made = await store.create("o", {"items": [{"role": "user", "content": "a"}]})
        appending = asyncio.Event()
        may_append = asyncio.Event()
        append = board.append

        async def slow_append(*args: Any) -> Any:
            appending.set()
            await may_append.wait()
            return await append(*args)

        board.append = slow_append  # type: ignore[method-assign]
        seen = []
        holds = store.holds
        assert holds is not None
        await store.claim("o", made.id)
        response = _Response()
        let_go = store.take("o", made.id, response)
        store.unclaim("o", made.id)
        store.extend(made, Items.from_objects([{"role": "user", "content": "b"}]))
        store.leave("o", made.id, response)
        let_go()
        await appending.wait()
        seen.append(("while written", holds.holds("o", made.id)))
        may_append.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not holds.holds("o", made.id):
                break
        seen.append(("once written", holds.holds("o", made.id)))
        await store.aclose()
        await shared.aclose()
        return seen

    assert asyncio.run(main()) == [("while written", True), ("once written", False)]


def test_a_claim_waits_a_little_for_a_hold_about_to_be_let_go_of(redis_url: str) -> None:
    """A response that just ended on another process holds the conversation until its
    addition is written: the client's next create, sent at once, waits for that (a
    fraction of a second) instead of being refused."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> float:
        shared_a, on_a = await _holds(redis_url, prefix)
        shared_b, on_b = await _holds(redis_url, prefix)
        await on_a.claim("o", "conv_1")
        loop = asyncio.get_running_loop()
        loop.call_later(0.15, on_a.release, "o", "conv_1")
        started = time.monotonic()
        await on_b.claim("o", "conv_1")
        waited = time.monotonic() - started
        on_b.release("o", "conv_1")
        await _close((shared_a, on_a), (shared_b, on_b))
        return waited

    assert 0.1 < asyncio.run(main()) < 0.5


def test_a_hold_taken_without_a_claim_counts_a_conflict(redis_url: str) -> None:
    """A response started from a queue (no claim could refuse it) takes the hold in the
    background: when another process has it, that is counted (and logged), and its
    hold is not renewed over the other's."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[int, int, bool]:
        shared_a, on_a = await _holds(redis_url, prefix, renew_seconds=0.05, wait_seconds=0.0)
        shared_b, on_b = await _holds(redis_url, prefix, renew_seconds=0.05)
        await on_b.claim("o", "conv_1")
        on_a.adopt("o", "conv_1")
        await asyncio.sleep(0.3)  # a few renewals: none of A's lost
        conflicts = on_a.conflicts, on_b.conflicts
        on_a.release("o", "conv_1")
        await on_a.aclose()  # (A's let-go leaves B's hold)
        with redis.Redis.from_url(redis_url) as direct:
            b_holds = direct.exists(f"{prefix}:cl:o:conv_1") == 1
        await on_b.aclose()
        for shared in (shared_a, shared_b):
            await shared.aclose()
        return (*conflicts, b_holds)

    assert asyncio.run(main()) == (1, 0, True)


def test_a_websocket_lost_while_its_create_reads_the_conversation_holds_nothing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection is lost after its create claimed the conversation, while the
    copy is read: the claim is let go of with the read cancelled (before, the
    conversation stayed held in every process for as long as this one ran)."""
    with two_servers(redis_url) as (a, b), client(a) as on_a, client(b) as on_b:
        made = on_a.conversations.create(items=[{"role": "user", "content": "start"}])
        store = a.server.engine.conversations
        reading = threading.Event()
        may_read = asyncio.Event()
        fresh = store.fresh

        async def slow_fresh(*args: Any, **kwargs: Any) -> Any:
            reading.set()
            await may_read.wait()
            return await fresh(*args, **kwargs)

        monkeypatch.setattr(store, "fresh", slow_fresh)
        with WSClient(a.ws_url, additional_headers=KEY) as ws:
            ws.create(input="x", conversation=made.id)
            assert reading.wait(5)
            assert a.call(len, store.holds) == 1  # (claimed)
            for connection in a.call(list, a.server.connections):
                if connection.transport is not None:
                    a.call(connection.transport.abort)
        eventually_free(redis_url, a)
        assert a.call(len, store.holds) == 0
        a.call(may_read.set)
        answer = on_b.responses.create(model="m", input="/transcript", conversation=made.id)
        assert answer.output_text.splitlines() == ["user: start", "user: /transcript"]


def test_a_take_redis_ran_late_holds_nothing_for_long(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stalls while a create claims the conversation: the client gets a 503, and
    once Redis resumes it runs the take it was sent (after the let-go, also sent
    meanwhile). Before, that hold stayed for its whole lease (20 s), refusing every
    create in every process, this one too; now this process replaces its own, and
    lets go of it again at its next renewal."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.3)
    with two_servers(redis_url) as (a, b), client(a) as on_a, client(b) as on_b:
        holds = a.server.engine.conversations.holds
        assert holds is not None
        a.call(setattr, holds, "_renew_seconds", 0.2)
        made = on_a.conversations.create(items=[{"role": "user", "content": "kept"}])
        with paused(redis_url):
            with pytest.raises(openai.InternalServerError):
                on_a.responses.create(model="m", input="x", conversation=made.id)
            time.sleep(2.0)  # (the let-go times out too)
        time.sleep(0.5)
        started = time.monotonic()
        on_b.responses.create(model="m", input="on b", conversation=made.id)
        on_a.responses.create(model="m", input="on a", conversation=made.id)
        assert time.monotonic() - started < 5


def test_a_claim_and_a_queued_response_in_one_process_both_hold(redis_url: str) -> None:
    """A queued response of this process starts (`adopt`) while a create's claim waits
    for Redis: before, the claim's hold replaced the response's, one release let go
    of it in Redis while the response still ran, and another process took it."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[int, bool, str]:
        shared_a, on_a = await _holds(redis_url, prefix)
        shared_b, on_b = await _holds(redis_url, prefix, wait_seconds=0.0)
        claim = asyncio.create_task(on_a.claim("o", "conv_1"))
        await asyncio.sleep(0)  # (the claim waits for Redis)
        on_a.adopt("o", "conv_1")
        await claim
        refs = on_a._held[("o", "conv_1")].refs
        on_a.release("o", "conv_1")  # (the create was refused: the response runs on)
        await asyncio.sleep(0.1)
        with redis.Redis.from_url(redis_url) as direct:
            held_in_redis = direct.exists(f"{prefix}:cl:o:conv_1") == 1
        elsewhere = await _try_claim(on_b)
        await _close((shared_a, on_a), (shared_b, on_b))
        return refs, held_in_redis, elsewhere

    assert asyncio.run(main()) == (2, True, "conversation_locked")


def test_a_queued_websocket_create_is_judged_when_it_starts(redis_url: str) -> None:
    """A create pipelined behind a long response on its lane was refused when it came,
    for a short response another process ran then, long over when its turn came."""
    with two_servers(redis_url) as (a, b), client(a) as on_a, client(b) as on_b:
        made = on_a.conversations.create(items=[{"role": "user", "content": "start"}])
        short = threading.Thread(
            target=lambda: on_b.responses.create(
                model="m", input="/sleep 1500 short", conversation=made.id
            )
        )
        short.start()
        time.sleep(0.3)
        with WSClient(a.ws_url, additional_headers=KEY) as ws:
            ws.create(input="/sleep 3000 long, no conversation")
            ws.create(input="queued", conversation=made.id)
            assert ws.until_terminal()[-1]["type"] == "response.completed"
            assert ws.until_terminal()[-1]["type"] == "response.completed"
        short.join()


def test_shutdown_lets_go_of_holds_within_its_time(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Redis hung at shutdown, letting go of the holds waited for Redis's timeouts
    past the time shutdown had (10 s for 1 s): they expire with their lease anyway."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 2.5)
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> float:
        shared = SharedStore.from_url(redis_url, prefix=prefix)
        await shared.start()
        store = Conversations(
            budget_bytes=1 << 20, max_item_bytes=1 << 20, board=shared.conversation_board
        )
        await store.claim("o", "conv_1")
        with paused(redis_url):
            started = time.monotonic()
            await store.aclose(1.0)
            took = time.monotonic() - started
        await shared.aclose()
        return took

    assert asyncio.run(main()) < 1.5


def test_a_hold_lost_in_a_redis_stall_is_taken_again(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stalled past a hold's lease: it is marked lost. Before, it was never taken
    again while its response ran: another process could take the conversation."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    timing = {"lease_seconds": 0.6, "renew_seconds": 0.2, "wait_seconds": 0.0}

    async def main() -> str:
        shared_a, on_a = await _holds(redis_url, prefix, **timing)
        shared_b, on_b = await _holds(redis_url, prefix, **timing)
        await on_a.claim("o", "conv_1")
        with paused(redis_url):
            await asyncio.sleep(1.2)  # two leases
        await asyncio.sleep(0.6)  # (renewals: lost, then taken again)
        elsewhere = await _try_claim(on_b)
        await _close((shared_a, on_a), (shared_b, on_b))
        return elsewhere

    assert asyncio.run(main()) == "conversation_locked"


def test_a_process_replaces_its_own_hold_left_in_redis_and_lets_go_at_close(
    redis_url: str,
) -> None:
    """A token of this process's own in Redis (a take whose answer was lost) is not
    another process's hold: a claim replaces it. A hold taken for a queued response
    (`adopt`) is in Redis; closing lets go of every hold."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[bool, bool, list[bytes]]:
        shared, holds = await _holds(redis_url, prefix, wait_seconds=0.0)
        key = f"{prefix}:cl:o:conv_1"
        with redis.Redis.from_url(redis_url) as direct:
            direct.set(key, f"{holds._process}:999", px=20_000)
            await holds.claim("o", "conv_1")
            holds.adopt("o", "conv_2")
            await asyncio.sleep(0.2)
            adopted = direct.exists(f"{prefix}:cl:o:conv_2") == 1
            claimed = direct.get(key) != f"{holds._process}:999".encode()
            await holds.aclose()
            left = list(direct.scan_iter(f"{prefix}:cl:*"))
        await shared.aclose()
        return claimed, adopted, left

    assert asyncio.run(main()) == (True, True, [])


def test_a_take_answered_after_its_hold_was_let_go_of_is_let_go_of_too(
    redis_url: str,
) -> None:
    """A queued response's background take was still trying when the response ended:
    it took the conversation after this process had let go of it, and nothing renewed
    or let go of that: every process was refused for the lease (20 s)."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> tuple[int, str]:
        shared_a, on_a = await _holds(redis_url, prefix)
        shared_b, on_b = await _holds(redis_url, prefix, wait_seconds=0.0)
        await on_b.claim("o", "conv_1")
        on_a.adopt("o", "conv_1")  # (B has it: a conflict)
        await asyncio.sleep(0.05)
        on_a.release("o", "conv_1")
        await asyncio.sleep(0.05)
        on_b.release("o", "conv_1")
        await asyncio.sleep(0.5)
        with redis.Redis.from_url(redis_url) as direct:
            left = int(direct.exists(f"{prefix}:cl:o:conv_1"))
        again = await _try_claim(on_b)
        await _close((shared_a, on_a), (shared_b, on_b))
        return left, again

    assert asyncio.run(main()) == (0, "taken")


def test_claims_waiting_together_are_refused_together(redis_url: str) -> None:
    """Creates on one process waiting for a conversation another process holds: each
    waited for the one before it, the k-th refused after about k seconds."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> list[tuple[str, float]]:
        shared_a, on_a = await _holds(redis_url, prefix)
        shared_b, on_b = await _holds(redis_url, prefix)
        await on_b.claim("o", "conv_1")

        async def claim() -> tuple[str, float]:
            started = time.monotonic()
            return await _try_claim(on_a), time.monotonic() - started

        results = await asyncio.gather(*(claim() for _ in range(4)))
        await _close((shared_a, on_a), (shared_b, on_b))
        return list(results)

    results = asyncio.run(main())
    assert [code for code, _took in results] == ["conversation_locked"] * 4
    assert max(took for _code, took in results) < 1.8


def test_a_claim_redis_does_not_answer_is_a_503_even_on_a_hold_it_lost(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim on a conversation this process holds but lost in Redis (a queued
    response's, another process had it) while Redis does not answer was a 400
    conversation_locked, which clients do not retry; it is the retriable 503."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.3)
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> str:
        shared_a, on_a = await _holds(redis_url, prefix)
        shared_b, on_b = await _holds(redis_url, prefix, wait_seconds=0.0)
        await on_b.claim("o", "conv_1")
        on_a.adopt("o", "conv_1")
        await asyncio.sleep(0.1)
        on_b.release("o", "conv_1")
        await asyncio.sleep(0.1)
        with paused(redis_url):
            answer = await _try_claim(on_a)
        await _close((shared_a, on_a), (shared_b, on_b))
        return answer

    assert asyncio.run(main()) == "unavailable"
