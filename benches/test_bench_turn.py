"""One WebSocket-mode turn against a bare `websockets` echo of a same-size message.

A turn is one `response.create` and the ~16 events of an 8-delta answer; the echo is
one message each way. Both servers run in their own processes; the client parses
every message it receives in both arms. Targets: a turn costs at most 2x the echo
round trip, and a turn on 1,000 items of history at most 1.2x a turn on 10 items.

A third arm, measured in the same rounds and reported (no target): a bare
`websockets` server that answers with a recorded turn's 16 events, framed once and
written in one call: the cost of the protocol's answer to the client and the
transport with no server work at all, so `turn / replay` is warmsocket's own share.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop
from websockets.asyncio.client import ClientConnection, connect

from benches.servers import (
    echo_server,
    interleaved_medians,
    replay_server,
    require_release_build,
    timing_enabled,
)
from warmsocket.bench.procs import warmsocket_server

WORDS = "alpha beta gamma delta epsilon zeta"  # "You said: " + 6 words = 8 deltas
ROUNDS = 400


class Client:
    """An asyncio websockets client driven from synchronous benchmark code."""

    def __init__(self, url: str) -> None:
        self.loop = uvloop.new_event_loop()
        self.conn: ClientConnection = self.loop.run_until_complete(
            connect(url, max_size=None, compression=None)
        )

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.conn.close())
        self.loop.close()


async def _turn(conn: ClientConnection, message: bytes) -> dict[str, Any]:
    await conn.send(message, text=True)
    while True:
        event = json.loads(await conn.recv(decode=False))
        if event["type"] in {"response.completed", "response.failed", "error"}:
            return event  # type: ignore[no-any-return]


async def _echo(conn: ClientConnection, message: bytes) -> dict[str, Any]:
    await conn.send(message, text=True)
    return json.loads(await conn.recv(decode=False))  # type: ignore[no-any-return]


def create(previous: str | None = None, text: str = WORDS) -> bytes:
    body: dict[str, Any] = {
        "type": "response.create",
        "model": "warmsocket-mock",
        "store": False,
        "input": [{"role": "user", "content": text}],
    }
    if previous:
        body["previous_response_id"] = previous
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    with warmsocket_server() as ws, echo_server() as echo:
        yield ws.ws_url, f"ws://127.0.0.1:{echo.port}"


def _chain(client: Client, items: int) -> str | None:
    """A connection-local chain of `items` items (a user message and a reply per turn)."""
    previous = None
    for i in range(items // 2):
        event = client.run(_turn(client.conn, create(previous, f"turn {i}")))
        previous = event["response"]["id"]
    return previous


def _turn_fn(client: Client, previous: str | None) -> Callable[[], dict[str, Any]]:
    message = create(previous)
    return lambda: client.run(_turn(client.conn, message))


def _check(event: dict[str, Any], history_items: int) -> None:
    assert event["type"] == "response.completed", event
    assert event["response"]["output"][0]["content"][0]["text"] == f"You said: {WORDS}"


async def _answer(conn: ClientConnection, message: bytes) -> list[bytes]:
    """One turn's messages, as received (for the replay server)."""
    await conn.send(message, text=True)
    received = []
    while True:
        raw = await conn.recv(decode=False)
        received.append(raw)
        if json.loads(raw)["type"] in {"response.completed", "response.failed", "error"}:
            return received


@pytest.mark.benchmark(group="turn-vs-echo")
def test_websocket_turn_vs_echo(benchmark: Any, servers: tuple[str, str]) -> None:
    require_release_build(benchmark)
    ws_url, echo_url = servers
    turn_client, echo_client = Client(ws_url), Client(echo_url)
    message = create()
    answer = turn_client.run(_answer(turn_client.conn, message))
    try:
        with replay_server([raw.decode() for raw in answer]) as replay:
            replay_client = Client(replay.ws_url)
            try:
                _turn_vs_echo(benchmark, turn_client, echo_client, replay_client, message)
            finally:
                replay_client.close()
    finally:
        turn_client.close()
        echo_client.close()


def _turn_vs_echo(
    benchmark: Any, turn_client: Client, echo_client: Client, replay_client: Client, message: bytes
) -> None:
    turn = _turn_fn(turn_client, None)
    echo = lambda: echo_client.run(_echo(echo_client.conn, message))  # noqa: E731
    replay = lambda: replay_client.run(_turn(replay_client.conn, message))  # noqa: E731
    _check(turn(), 0)
    assert echo()["input"][0]["content"] == WORDS
    _check(replay(), 0)
    benchmark.pedantic(turn, rounds=ROUNDS if timing_enabled(benchmark) else 1)
    if not timing_enabled(benchmark):
        return
    medians = interleaved_medians({"turn": turn, "echo": echo, "replay": replay}, rounds=ROUNDS)
    ratio = medians["turn"] / medians["echo"]
    benchmark.extra_info.update(
        turn_us=medians["turn"] * 1e6,
        echo_us=medians["echo"] * 1e6,
        replay_us=medians["replay"] * 1e6,
        ratio=ratio,
        replay_vs_echo=medians["replay"] / medians["echo"],
        turn_vs_replay=medians["turn"] / medians["replay"],
    )
    print(
        f"\nturn {medians['turn'] * 1e6:.0f} us, echo {medians['echo'] * 1e6:.0f} us, "
        f"replay of the answer {medians['replay'] * 1e6:.0f} us: turn/echo {ratio:.2f}x, "
        f"replay/echo {medians['replay'] / medians['echo']:.2f}x, "
        f"turn/replay {medians['turn'] / medians['replay']:.2f}x"
    )
    assert ratio <= 2.0, f"a turn costs {ratio:.2f}x the echo round trip (target <= 2x)"


@pytest.mark.benchmark(group="turn-by-history")
@pytest.mark.parametrize("history", [10, 1000])
def test_websocket_turn_by_history(benchmark: Any, servers: tuple[str, str], history: int) -> None:
    require_release_build(benchmark)
    client = Client(servers[0])
    try:
        head = _chain(client, history)
        turn = _turn_fn(client, head)
        event = turn()
        _check(event, history)
        benchmark.pedantic(turn, rounds=ROUNDS if timing_enabled(benchmark) else 1)
    finally:
        client.close()


@pytest.mark.benchmark(group="turn-by-history-ratio")
def test_websocket_turn_flat_in_history(benchmark: Any, servers: tuple[str, str]) -> None:
    require_release_build(benchmark)
    short_client, long_client = Client(servers[0]), Client(servers[0])
    try:
        short = _turn_fn(short_client, _chain(short_client, 10))
        long = _turn_fn(long_client, _chain(long_client, 1000))
        _check(short(), 10)
        _check(long(), 1000)
        benchmark.pedantic(long, rounds=ROUNDS if timing_enabled(benchmark) else 1)
        if timing_enabled(benchmark):
            medians = interleaved_medians({"10": short, "1000": long}, rounds=ROUNDS)
            ratio = medians["1000"] / medians["10"]
            benchmark.extra_info.update(ratio=ratio)
            assert ratio <= 1.2, f"a turn on 1,000 items costs {ratio:.2f}x one on 10 (<= 1.2x)"
    finally:
        short_client.close()
        long_client.close()
