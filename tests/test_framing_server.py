"""Framing on a real socket: the `warmsocket.msgpack` subprotocol, JSON text frames by
default, no subprotocol the client did not offer, and both write paths (Rust frames
straight to the transport; `send_text` when permessage-deflate is negotiated)."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import ClientConnection, connect

from tests.support import (
    TERMINAL,
    RunningServer,
    check_sequence,
    check_ws_event,
    output_text,
    running_server,
)
from warmsocket.backends.base import ModelEvent, TurnContext
from warmsocket.backends.mock import MockBackend
from warmsocket.engine import Turn
from warmsocket.server import MSGPACK_SUBPROTOCOL
from warmsocket.session import ResponsesSession


def _connect(server: RunningServer, **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("max_size", None)
    return connect(server.ws_url, open_timeout=5, **kwargs)


def _turn(conn: ClientConnection, body: dict[str, Any], *, binary: bool) -> list[Any]:
    """Send one create; receive up to its terminal event, checking frame types."""
    if binary:
        conn.send(msgpack.packb(body))
    else:
        conn.send(json.dumps(body))
    events = []
    while True:
        raw = conn.recv(timeout=10)
        if binary:
            assert isinstance(raw, bytes), "msgpack events come in binary frames"
            event = msgpack.unpackb(raw)
        else:
            assert isinstance(raw, str), "JSON events come in text frames"
            event = json.loads(raw)
        check_ws_event(event)
        events.append(event)
        if event["type"] in TERMINAL or event["type"] == "error":
            return events


CREATE = {"type": "response.create", "model": "warmsocket-mock", "input": "hello there"}


@pytest.mark.parametrize("compression", [None, "deflate"])
def test_msgpack_subprotocol(server: RunningServer, compression: str | None) -> None:
    with _connect(server, subprotocols=[MSGPACK_SUBPROTOCOL], compression=compression) as conn:
        assert conn.subprotocol == MSGPACK_SUBPROTOCOL
        first = _turn(conn, {**CREATE, "stream_id": "a"}, binary=True)
        check_sequence(first)
        assert output_text(first) == "You said: hello there"
        assert all(e["stream_id"] == "a" for e in first)
        rid = first[-1]["response"]["id"]
        second = _turn(
            conn,
            {**CREATE, "input": "/transcript", "previous_response_id": rid, "stream_id": "a"},
            binary=True,
        )
        assert "user: hello there" in output_text(second)
        # Errors come as msgpack too, including a message that is not msgpack.
        conn.send(b"\xc1")
        error = msgpack.unpackb(conn.recv(timeout=10))
        assert error["type"] == "error" and error["error"]["code"] == "invalid_msgpack"
        bad = _turn(conn, {**CREATE, "model": 5}, binary=True)
        assert bad[-1]["error"]["param"] == "model"


@pytest.mark.parametrize("compression", [None, "deflate"])
def test_json_text_frames_by_default(server: RunningServer, compression: str | None) -> None:
    with _connect(server, compression=compression) as conn:
        assert conn.subprotocol is None
        events = _turn(conn, CREATE, binary=False)
        check_sequence(events)
        assert output_text(events) == "You said: hello there"
        extensions = (
            conn.response.headers.get("Sec-WebSocket-Extensions") if conn.response else None
        )
        assert (extensions is not None) == (compression == "deflate")


def test_an_unknown_subprotocol_gets_none(server: RunningServer) -> None:
    with _connect(server, subprotocols=["openai-beta.responses.v1"]) as conn:
        assert conn.subprotocol is None
        assert conn.response is not None
        assert "Sec-WebSocket-Protocol" not in conn.response.headers
        events = _turn(conn, CREATE, binary=False)
        assert output_text(events) == "You said: hello there"
    with _connect(server, subprotocols=["other", MSGPACK_SUBPROTOCOL]) as conn:
        assert conn.subprotocol == MSGPACK_SUBPROTOCOL


def test_json_messages_in_binary_frames_are_read_as_json(server: RunningServer) -> None:
    with _connect(server, compression=None) as conn:
        conn.send(json.dumps(CREATE).encode())  # a binary frame holding UTF-8 JSON
        events = []
        while not events or events[-1]["type"] not in TERMINAL:
            events.append(json.loads(conn.recv(timeout=10)))
        assert output_text(events) == "You said: hello there"


@pytest.mark.parametrize("compression", [None, "deflate"])
@pytest.mark.parametrize("fragmented", [False, True])
def test_a_text_message_that_is_not_utf8_fails_its_connection_with_1007(
    server: RunningServer, compression: str | None, fragmented: bool
) -> None:
    """RFC 6455 §8.1: a text message that is not UTF-8 fails the connection (1007);
    it got an `invalid_json` error event. The same bytes in a binary message still
    get that error, and the connection goes on; another connection's chain is not
    touched."""
    bad = json.dumps(CREATE).encode().replace(b"hello", b"h\xffllo")
    with _connect(server, compression=compression) as other:
        first = _turn(other, CREATE, binary=False)
        with _connect(server, compression=compression) as conn:
            conn.send([bad[:20], bad[20:]] if fragmented else bad, text=True)
            with pytest.raises(ConnectionClosedError) as closed:
                conn.recv(timeout=10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1007
        assert "UTF-8" in closed.value.rcvd.reason
        with _connect(server, compression=compression) as conn:
            conn.send([bad[:20], bad[20:]] if fragmented else bad)  # binary
            error = json.loads(conn.recv(timeout=10))
            assert (error["type"], error["error"]["code"]) == ("error", "invalid_json")
            assert output_text(_turn(conn, CREATE, binary=False)) == "You said: hello there"
        follow = {
            **CREATE,
            "input": "/transcript",
            "previous_response_id": first[-1]["response"]["id"],
        }
        assert "user: hello there" in output_text(_turn(other, follow, binary=False))


def test_control_frames_stay_ordered_with_direct_writes(server: RunningServer) -> None:
    """Pings answered between streamed frames; a close after a turn is clean."""
    with _connect(server, compression=None) as conn:
        conn.send(json.dumps({**CREATE, "input": "/sleep 50\nhello"}))
        pong = conn.ping(b"x")
        assert pong.wait(5)
        events = []
        while not events or events[-1]["type"] not in TERMINAL:
            events.append(json.loads(conn.recv(timeout=10)))
        check_sequence(events)
        conn.close()
        assert conn.close_code == 1000


def test_raw_frames_on_the_wire(server: RunningServer) -> None:
    """Without extensions the server's frames are unmasked, FIN, text, one event each."""
    sock, buffer = _raw_upgrade(server.port)
    try:
        _send_masked(sock, json.dumps(CREATE).encode())
        events = _read_turn(sock, buffer)
        check_sequence(events)
        assert output_text(events) == "You said: hello there"
    finally:
        sock.close()


def test_an_immediate_turn_streams_its_events_before_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The built-in model answers in the same step, but the client does not wait for
    the whole turn: `response.created` is on the wire before the model runs, the
    output's events before the turn's end is stored, the terminal event last."""
    on_wire: dict[str, bytes] = {}
    sockets: list[socket.socket] = []
    peeked = threading.Event()  # the client reads only after the server peeked

    class Peeking(MockBackend):
        def immediate(self, turn: TurnContext) -> list[ModelEvent] | None:
            on_wire["model starts"] = _peek(sockets[0], b"response.in_progress")
            return super().immediate(turn)

    model_done = ResponsesSession.model_done

    def peeking_model_done(self: ResponsesSession, turn: Turn) -> None:
        on_wire["turn ends"] = _peek(sockets[0], b"response.output_text.delta")
        peeked.set()
        model_done(self, turn)

    monkeypatch.setattr(ResponsesSession, "model_done", peeking_model_done)
    with running_server(backend=Peeking()) as server:
        sock, buffer = _raw_upgrade(server.port)
        sockets.append(sock)
        try:
            _send_masked(sock, json.dumps(CREATE).encode())
            assert peeked.wait(10)
            events = _read_turn(sock, buffer)
        finally:
            sock.close()
    check_sequence(events)
    deltas = sum(e["type"] == "response.output_text.delta" for e in events)
    assert deltas > 1
    assert b'"response.created"' in on_wire["model starts"]
    assert b'"response.in_progress"' in on_wire["model starts"]
    assert b"response.output_text.delta" not in on_wire["model starts"]
    assert on_wire["turn ends"].count(b'"response.output_text.delta"') == deltas
    assert b'"response.output_text.done"' not in on_wire["turn ends"]
    assert b'"response.completed"' not in on_wire["turn ends"]


def test_immediate_turns_of_two_lanes_in_one_read(server: RunningServer) -> None:
    """Two creates arriving in one read both start at once: every event of both
    lanes reaches the client, each lane's in sequence from `response.created`."""
    sock, buffer = _raw_upgrade(server.port)
    try:
        frames = b"".join(
            _masked(json.dumps({**CREATE, "stream_id": lane}).encode()) for lane in "ab"
        )
        sock.sendall(frames)
        events = _read_turn(sock, buffer, terminals=2)
    finally:
        sock.close()
    for lane in "ab":
        lane_events = [e for e in events if e.get("stream_id") == lane]
        assert lane_events[0]["type"] == "response.created"
        check_sequence(lane_events)
        assert output_text(lane_events) == "You said: hello there"


def test_a_message_split_into_one_byte_reads(server: RunningServer) -> None:
    """A client message arriving a byte at a time is read whole, then answered."""
    sock, buffer = _raw_upgrade(server.port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        frame = _masked(json.dumps({**CREATE, "input": "bit by bit"}).encode())
        for i in range(len(frame)):
            sock.sendall(frame[i : i + 1])
            if i % 16 == 0:
                time.sleep(0.001)  # keep the pieces apart on the wire
        events = _read_turn(sock, buffer)
    finally:
        sock.close()
    check_sequence(events)
    assert output_text(events) == "You said: bit by bit"


def test_ping_and_fragments_between_messages_in_one_read(server: RunningServer) -> None:
    """A ping and a fragmented message in the same read as whole messages: the pings
    are answered and every message, the fragmented one too."""
    sock, buffer = _raw_upgrade(server.port)
    try:
        first = json.dumps({**CREATE, "input": "one", "stream_id": "a"}).encode()
        split = json.dumps({**CREATE, "input": "two", "stream_id": "b"}).encode()
        third = json.dumps({**CREATE, "input": "three", "stream_id": "c"}).encode()
        sock.sendall(
            _masked(first)
            + _masked(b"are you there", opcode=0x9)
            + _masked(split[:10], opcode=0x1, fin=False)
            + _masked(split[10:20], opcode=0x0, fin=False)
            + _masked(b"", opcode=0x9)
            + _masked(split[20:], opcode=0x0)
            + _masked(third, opcode=0x2)  # JSON in a binary frame is read as JSON
        )
        frames = _read_frames(sock, buffer, terminals=3, until_close=False)
    finally:
        sock.close()
    pongs = [payload for opcode, payload in frames if opcode == 0xA]
    assert pongs == [b"are you there", b""]
    events = [json.loads(payload) for opcode, payload in frames if opcode == 0x1]
    for lane, text in (("a", "one"), ("b", "two"), ("c", "three")):
        lane_events = [e for e in events if e.get("stream_id") == lane]
        check_sequence(lane_events)
        assert output_text(lane_events) == f"You said: {text}"


def test_a_close_frame_ends_reading_messages_after_it(server: RunningServer) -> None:
    """A message after the client's close frame in the same read is not answered."""
    sock, buffer = _raw_upgrade(server.port)
    try:
        sock.sendall(
            _masked((1000).to_bytes(2, "big"), opcode=0x8)
            + _masked(json.dumps({**CREATE, "input": "too late"}).encode())
        )
        frames = _read_frames(sock, buffer, terminals=0)
    finally:
        sock.close()
    assert frames == [(0x8, (1000).to_bytes(2, "big"))]


@pytest.mark.parametrize(
    ("frame", "close_code"),
    [
        (bytes([0x81, 0x05]) + b"hello", 1002),  # not masked
        (bytes([0xC1, 0x85, 1, 2, 3, 4]) + b"hello", 1002),  # RSV1 without an extension
        (bytes([0x83, 0x80, 1, 2, 3, 4]), 1002),  # reserved opcode
        (bytes([0x81, 0xFF]) + (2**40).to_bytes(8, "big") + bytes(4), 1009),  # too big
    ],
    ids=["unmasked", "rsv1", "opcode", "too-big"],
)
def test_bad_frames_close_with_the_protocol_code(
    server: RunningServer, frame: bytes, close_code: int
) -> None:
    """After a whole message, a frame no client may send: the connection closes with
    the code `websockets` gives that frame."""
    sock, buffer = _raw_upgrade(server.port)
    try:
        sock.sendall(_masked(json.dumps(CREATE).encode()))
        assert output_text(_read_turn(sock, buffer)) == "You said: hello there"
        sock.sendall(frame)
        frames = _read_frames(sock, b"", terminals=0)
    finally:
        sock.close()
    assert len(frames) == 1 and frames[0][0] == 0x8
    assert int.from_bytes(frames[0][1][:2], "big") == close_code


def _peek(sock: socket.socket, wanted: bytes, timeout: float = 2.0) -> bytes:
    """What has arrived on `sock` and not been read yet, once it holds `wanted` (or
    after `timeout`); reads nothing."""
    deadline = time.monotonic() + timeout
    data = b""
    while wanted not in data and time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.01)
        if readable:
            data = sock.recv(1 << 20, socket.MSG_PEEK)
    return data


def _raw_upgrade(port: int) -> tuple[socket.socket, bytes]:
    """A client socket upgraded to WebSocket by hand, and the bytes after the head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    head, rest = head.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock, rest


def _send_masked(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_masked(payload))


def _masked(payload: bytes, *, opcode: int = 0x1, fin: bool = True) -> bytes:
    """One masked frame (payload under 64 KiB), as a client sends it."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        return bytes([first, 0x80 | len(payload)]) + mask + masked
    return bytes([first, 0x80 | 126]) + len(payload).to_bytes(2, "big") + mask + masked


def _read_turn(sock: socket.socket, buffer: bytes, terminals: int = 1) -> list[dict[str, Any]]:
    """Frames up to the `terminals`-th terminal event; each must be FIN + text and
    unmasked."""
    events: list[dict[str, Any]] = []
    while sum(e["type"] in TERMINAL for e in events) < terminals:
        frame = _next_frame(buffer)
        if frame is None:
            buffer += sock.recv(65536)
            continue
        first, second, payload, buffer = frame
        assert first == 0x81, "FIN + text"
        assert second & 0x80 == 0, "server frames are not masked"
        events.append(json.loads(payload))
    return events


def _read_frames(
    sock: socket.socket, buffer: bytes, *, terminals: int, until_close: bool = True
) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the server's frames until it closes the connection (or,
    without `until_close`, until `terminals` terminal events came)."""
    frames: list[tuple[int, bytes]] = []
    events = 0
    while until_close or events < terminals:
        frame = _next_frame(buffer)
        if frame is None:
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
            continue
        first, second, payload, buffer = frame
        assert first & 0x80, "server frames are final"
        assert second & 0x80 == 0, "server frames are not masked"
        frames.append((first & 0x0F, payload))
        if first & 0x0F == 0x1 and json.loads(payload)["type"] in TERMINAL:
            events += 1
    return frames


def _next_frame(data: bytes) -> tuple[int, int, bytes, bytes] | None:
    """(first byte, second byte, payload, rest) of the first complete frame, if any."""
    if len(data) < 2:
        return None
    length, start = data[1] & 0x7F, 2
    if length == 126:
        if len(data) < 4:
            return None
        length, start = int.from_bytes(data[2:4], "big"), 4
    elif length == 127:
        if len(data) < 10:
            return None
        length, start = int.from_bytes(data[2:10], "big"), 10
    if len(data) < start + length:
        return None
    return data[0], data[1], data[start : start + length], data[start + length :]


def test_a_ping_is_answered_while_a_long_answer_waits_for_a_slow_reader(
    server: RunningServer,
) -> None:
    """A 100,000-word answer (about 19 MB of events) to a client that reads slowly:
    the server writes it as the client reads (write backpressure) and reads between
    its writes, so a ping the client sends meanwhile is answered behind what is
    already on its way, not behind the whole answer (it was: the pong came after the
    last event)."""
    words = 100_000
    total = words + 10  # created, in_progress, item and part events, completed

    async def read_slowly() -> tuple[int, int | None, str]:
        async with async_connect(
            server.ws_url, ping_interval=None, max_size=None, compression=None
        ) as conn:
            await conn.send(json.dumps({**CREATE, "input": " ".join(["word"] * words)}))
            seen, pong, seen_at_pong = 0, None, None
            while True:
                event = json.loads(await conn.recv())
                seen += 1
                if seen == 3000:
                    pong = await conn.ping()
                if pong is not None and seen_at_pong is None:
                    if pong.done():
                        seen_at_pong = seen
                    elif seen % 100 == 0:
                        await asyncio.sleep(0.005)  # a slow reader, until the pong
                if event["type"] in TERMINAL:
                    return seen, seen_at_pong, event["type"]

    seen, seen_at_pong, terminal = asyncio.run(asyncio.wait_for(read_slowly(), 60))
    assert (seen, terminal) == (total, "response.completed")
    assert seen_at_pong is not None and seen_at_pong < 0.6 * total, seen_at_pong
