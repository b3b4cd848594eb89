"""`--max-connections-per-key` across the processes on one Redis (`shared_key_holds`):
what a key holds in the other processes counts, as of at most half a second ago; a
process that stops takes its counts out, and one that dies stops counting a few
seconds later."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.redis_support import paused
from tests.support import WSClient, output_text
from tests.test_key_limit import A, B, bearer, held, wait_until
from tests.test_shared_store_serve import redis_url, two_servers
from warmsocket import shared_key_holds
from warmsocket.shared_key_holds import SharedKeyHolds

__all__ = ["redis_url"]  # a fixture

T = TypeVar("T")


def test_a_key_is_limited_across_processes(redis_url: str) -> None:
    with two_servers(redis_url, max_connections_per_key=2) as (a, b):
        on_a = WSClient(a.ws_url, additional_headers=bearer(A))
        on_b = WSClient(b.ws_url, additional_headers=bearer(A))
        (owner,) = held(a)
        holds_a = a.server.engine.shared.key_holds  # type: ignore[union-attr]
        wait_until(lambda: a.call(lambda: holds_a.elsewhere(owner)) == 1)
        # One here and one on B: a second here is past the key's two.
        with pytest.raises(InvalidStatus) as refused:
            connect(a.ws_url, additional_headers=bearer(A), open_timeout=5).close()
        assert refused.value.response.status_code == 429
        # Another key is served; the key's WebSockets go on.
        with WSClient(a.ws_url, additional_headers=bearer(B)) as other:
            assert output_text(other.turn(model="m", input="b")) == "You said: b"
        assert output_text(on_b.turn(model="m", input="x")) == "You said: x"
        on_b.close()
        wait_until(lambda: a.call(lambda: holds_a.elsewhere(owner)) == 0)
        with WSClient(a.ws_url, additional_headers=bearer(A)) as second:
            assert output_text(second.turn(model="m", input="y")) == "You said: y"
        on_a.close()


class Processes:
    """`make(held)`: a SharedKeyHolds sharing `held`, as one process would, all on one
    Redis under one prefix; their clients closed on leaving."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        self.clients: list[aioredis.Redis] = []

    def make(self, held: Counter[str], limit: int = 4) -> SharedKeyHolds:
        client = aioredis.Redis.from_url(self.redis_url)
        self.clients.append(client)
        shared = SharedKeyHolds(client, self.prefix)
        shared.follow(held, limit)
        return shared

    async def __aenter__(self) -> Processes:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for client in self.clients:
            await client.aclose()


@pytest.fixture
def holds(redis_url: str) -> Processes:
    return Processes(redis_url)


async def closing(processes: Processes, body: Coroutine[Any, Any, T]) -> T:
    async with processes:
        return await body


def test_each_process_knows_what_its_keys_hold_elsewhere(holds: Processes) -> None:
    """What a key holds elsewhere is known where it holds something too, or where it
    is at its limit in all (limit 4 here); other keys' first connection here is let
    in, which is right."""

    async def main() -> dict[str, int]:
        one = holds.make(Counter({"o": 3, "p": 1, "q": 1}))
        two = holds.make(Counter({"o": 2, "r": 4}))
        await one.sync()
        await two.sync()
        await one.sync()
        return {
            "one o": one.elsewhere("o"),
            "one p": one.elsewhere("p"),
            "one r": one.elsewhere("r"),  # at its limit on two
            "two o": two.elsewhere("o"),
            "two q": two.elsewhere("q"),  # held on one only, below its limit
            "holders": one.holders,
        }

    assert asyncio.run(closing(holds, main())) == {
        "one o": 2,
        "one p": 0,
        "one r": 4,
        "two o": 3,
        "two q": 0,
        "holders": 2,
    }


def test_processes_with_other_limits_each_read_the_keys_at_theirs(holds: Processes) -> None:
    """During a rolling change of --max-connections-per-key: a key holding 7 on a
    process whose limit is 10 is at the limit of one whose limit is 5."""

    async def main() -> tuple[int, int]:
        ten = holds.make(Counter({"o": 7}), limit=10)
        five = holds.make(Counter(), limit=5)
        other_ten = holds.make(Counter(), limit=10)
        for each in (ten, five, other_ten):
            await each.sync()
        await ten.sync()  # (the last change made under a limit of 10)
        await five.sync()
        await other_ten.sync()
        return five.elsewhere("o"), other_ten.elsewhere("o")

    assert asyncio.run(closing(holds, main())) == (7, 0)


def test_counts_that_change_change_the_totals(holds: Processes) -> None:
    async def main() -> list[int]:
        held = Counter({"o": 3})
        one = holds.make(held)
        two = holds.make(Counter({"o": 1}))
        seen = []
        for count in (3, 1, 0, 2):
            held["o"] = count
            await one.sync()
            await two.sync()
            seen.append(two.elsewhere("o"))
        return seen

    assert asyncio.run(closing(holds, main())) == [3, 1, 0, 2]


def test_many_owners_cost_what_this_process_holds(holds: Processes) -> None:
    async def main() -> tuple[int, int, int]:
        many = holds.make(Counter({f"key_{n}": 1 + n % 3 for n in range(5000)}))
        reader = holds.make(Counter({"key_4999": 1, "key_7": 1}))
        await many.sync()
        await reader.sync()
        return reader.elsewhere("key_4999"), reader.elsewhere("key_7"), len(reader._elsewhere)

    assert asyncio.run(closing(holds, main())) == (1 + 4999 % 3, 1 + 7 % 3, 2)


def test_a_process_that_stops_takes_its_counts_out(holds: Processes) -> None:
    async def main() -> tuple[int, int, int]:
        stopping = holds.make(Counter({"o": 4}))
        reader = holds.make(Counter())
        stopping.start()
        await asyncio.sleep(0.1)
        await reader.sync()
        before = reader.elsewhere("o")
        await stopping.aclose()
        await reader.sync()
        return before, reader.elsewhere("o"), reader.holders

    assert asyncio.run(closing(holds, main())) == (4, 0, 1)


def test_counts_are_added_again_after_the_shared_keys_expired(holds: Processes) -> None:
    """Redis paused (or cut off) longer than the totals' lifetime but not the processes'
    own counts' (3 against 4 TTLs): the totals expire. Each process then adds all it
    holds again, not just what changed since it last wrote (which is nothing): the key
    stayed limited at 2 + 3, not 0, after Redis came back."""

    async def main() -> tuple[int, int]:
        one = holds.make(Counter({"o": 2}))
        two = holds.make(Counter({"o": 3}))
        for each in (one, two, one):
            await each.sync()
        assert (one.elsewhere("o"), two.elsewhere("o")) == (3, 2)
        client = holds.clients[0]
        await client.delete(f"{holds.prefix}:holders", f"{holds.prefix}:held_total")
        for each in (one, two, one):
            await each.sync()
        return one.elsewhere("o"), two.elsewhere("o")

    assert asyncio.run(closing(holds, main())) == (3, 2)


def test_what_a_key_lets_go_of_is_written_at_once(holds: Processes) -> None:
    """A key that closes a WebSocket here to open one on another process (a load
    balancer's choice) must not be refused there for up to two sync periods: a
    release nudges the next write to come at once, not at the next period."""

    async def main() -> tuple[float, float]:
        held = Counter({"o": 2})
        one = holds.make(held)
        one.start()
        client = holds.clients[0]
        total = f"{holds.prefix}:held_total"
        while await client.zscore(total, "o") != 2:
            await asyncio.sleep(0.005)
        started = time.monotonic()
        held["o"] = 1
        one.nudge()
        while await client.zscore(total, "o") != 1:
            await asyncio.sleep(0.005)
        nudged = time.monotonic() - started
        held["o"] = 0  # not nudged: at the next period
        started = time.monotonic()
        while await client.zscore(total, "o") is not None:
            await asyncio.sleep(0.005)
        await one.aclose()
        return nudged, time.monotonic() - started

    nudged, periodic = asyncio.run(closing(holds, main()))
    assert nudged < 0.2 < periodic, (nudged, periodic)


def test_a_process_that_died_stops_counting(
    holds: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_key_holds, "TTL_SECONDS", 0.3)

    async def main() -> tuple[int, int, int]:
        dead = holds.make(Counter({"o": 4}))
        reader = holds.make(Counter())
        await dead.sync()  # then it writes no more, and deletes nothing
        await reader.sync()
        before = reader.elsewhere("o")
        await asyncio.sleep(0.4)
        await reader.sync()
        return before, reader.elsewhere("o"), reader.holders

    assert asyncio.run(closing(holds, main())) == (4, 0, 1)


def test_what_was_read_counts_for_a_while_when_redis_does_not_answer(
    holds: Processes, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_key_holds, "TTL_SECONDS", 1.0)

    async def main() -> tuple[int, int, int]:
        other = holds.make(Counter({"o": 2}))
        reader = holds.make(Counter({"o": 1}))
        await other.sync()
        await reader.sync()
        with paused(redis_url):
            with pytest.raises(Exception):  # noqa: B017 (Redis's timeout)
                await asyncio.wait_for(reader.sync(), 0.3)
            during = reader.elsewhere("o")
            await asyncio.sleep(1.1)
            after = reader.elsewhere("o")
        await other.sync()  # (not dead: it writes again once Redis answers)
        await reader.sync()
        return during, after, reader.elsewhere("o")

    started = time.monotonic()
    assert asyncio.run(closing(holds, main())) == (2, 0, 2)
    assert time.monotonic() - started < 10
