"""The HTTP connection layer against misbehaving clients: raw sockets, byte by byte."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from tests.support import RunningServer, running_server

UPGRADE = (
    b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def read_until_closed(raw: socket.socket) -> bytes:
    data = b""
    while chunk := raw.recv(65536):
        data += chunk
    return data


def read_head(raw: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and (chunk := raw.recv(65536)):
        data += chunk
    return data


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(data)
        return read_until_closed(raw)


# -- WebSocket handshake refusals --------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"Sec-WebSocket-Protocol: \xff\xfe",
        "Sec-WebSocket-Protocol: warmsocket.msgpack, \u00e9".encode("latin-1"),
        "Sec-WebSocket-Extensions: permessage-deflate; \u00e9".encode("latin-1"),
    ],
)
def test_a_non_ascii_handshake_header_is_refused_with_400_json(
    server: RunningServer, header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        reply = exchange(
            server.port, b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + header + b"\r\n\r\n"
        )
    status, headers, body = split_response(reply)
    assert status == 400
    assert headers["x-request-id"].startswith("req_")
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert "Sec-WebSocket-Protocol" in error["message"]
    assert "\u00e9" not in body.decode() and b"\xff" not in body  # the header is not echoed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert server.server.metrics.connections_opened.get("websocket", 0) == 0


def test_non_ascii_in_other_handshake_headers_still_upgrades(server: RunningServer) -> None:
    for header in ["X-Foo: \u00e9".encode("latin-1"), "User-Agent: agent \u2713".encode()]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + header + b"\r\n\r\n")
            assert read_head(raw).startswith(b"HTTP/1.1 101 ")


def test_handshake_refusals_carry_a_request_id() -> None:
    with running_server(api_keys=frozenset({"sk-1"})) as srv:
        refusals = {
            401: b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + b"\r\n",
            404: b"GET /v1/nowhere HTTP/1.1\r\n" + UPGRADE + b"Authorization: Bearer sk-1\r\n\r\n",
            # websockets' own refusal: a bad Sec-WebSocket-Key.
            400: b"GET /v1/responses HTTP/1.1\r\n"
            + UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short")
            + b"Authorization: Bearer sk-1\r\n\r\n",
        }
        for expected, request in refusals.items():
            status, headers, _body = split_response(exchange(srv.port, request))
            assert status == expected
            assert headers["x-request-id"].startswith("req_"), (status, headers)
        # And the connection's own refusals of a request it cannot parse.
        status, headers, body = split_response(exchange(srv.port, b"GARBAGE\r\n\r\n"))
        assert status == 400 and headers["x-request-id"].startswith("req_")
        assert json.loads(body)["error"]["message"] == "Invalid request line."
