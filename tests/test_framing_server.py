"""Framing on a real socket: the `warmsocket.msgpack` subprotocol, JSON text frames by
default, no subprotocol the client did not offer, and both write paths (Rust frames
straight to the transport; `send_text` when permessage-deflate is negotiated)."""

from __future__ import annotations

import json
import socket
from typing import Any

import msgpack
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.support import TERMINAL, RunningServer, check_sequence, check_ws_event, output_text
from warmsocket.server import MSGPACK_SUBPROTOCOL


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
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(
            b"GET /v1/responses HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        head, rest = head.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101")
        payload = json.dumps(CREATE).encode()
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + mask + masked)
        buffer = rest
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] not in TERMINAL:
            frame = _next_frame(buffer)
            if frame is None:
                buffer += sock.recv(65536)
                continue
            first, second, payload, buffer = frame
            assert first == 0x81, "FIN + text"
            assert second & 0x80 == 0, "server frames are not masked"
            events.append(json.loads(payload))
        check_sequence(events)
        assert output_text(events) == "You said: hello there"
    finally:
        sock.close()


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
