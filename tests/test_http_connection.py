"""The HTTP connection layer against misbehaving clients: raw sockets, byte by byte."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from tests.support import RunningServer, WSClient, output_text, running_server
from tests.test_framing_server import CREATE, _masked
from warmsocket.backends.base import StreamItem, TextDelta, TurnContext
from warmsocket.server import HTTP2_PREFACE, HTTP2_REFUSAL, HTTP_READ_AHEAD, WRITE_HIGH_WATER

UPGRADE = (
    b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
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


def read_responses(raw: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """`count` Content-Length framed responses, in the order they arrive."""
    data = b""
    out = []
    while len(out) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            status, headers, _ = split_response(data[: end + 4])
            length = int(headers["content-length"])
            if len(data) >= end + 4 + length:
                out.append((status, headers, data[end + 4 : end + 4 + length]))
                data = data[end + 4 + length :]
                continue
        chunk = raw.recv(1 << 20)
        assert chunk, f"closed after {len(out)} responses"
        data += chunk
    return out


def post(body: bytes, path: bytes = b"/v1/responses") -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%b" % (
        path,
        len(body),
        body,
    )


def create(text: str, padding: int = 0) -> bytes:
    """A create request; `padding` spaces in its JSON make its body that much larger."""
    return post(b'{"model": "m", "input": %b%b}' % (json.dumps(text).encode(), b" " * padding))


class Sender(threading.Thread):
    """Sends `data` on `raw` (blocking while the server does not read); counts what went."""

    def __init__(self, raw: socket.socket, data: bytes) -> None:
        super().__init__(daemon=True)
        self.raw, self.data, self.sent, self.error = raw, memoryview(data), 0, None
        self.start()

    def run(self) -> None:
        try:
            while self.sent < len(self.data):
                self.sent += self.raw.send(self.data[self.sent : self.sent + 65536])
        except OSError as exc:
            self.error = exc


def buffered_by_the_server(srv: RunningServer) -> list[tuple[int, bool, bool]]:
    """(bytes buffered unparsed, request in progress, reading paused) per connection."""

    def look() -> list[tuple[int, bool, bool]]:
        return [
            (c._parser.buffered, c._http_task is not None, getattr(c, "_read_ahead_paused", False))
            for c in srv.server.connections
        ]

    result: list[tuple[int, bool, bool]] = srv.call(look)
    return result


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


KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
VERSION = b"Sec-WebSocket-Version: 13\r\n"


@pytest.mark.parametrize(
    ("change", "status", "header", "fix"),
    [
        pytest.param((KEY, b"Sec-WebSocket-Key: c2hvcnQ=\r\n"), 400,
                     "Sec-WebSocket-Key is not", "16 random", id="bad-key"),
        pytest.param((KEY, b""), 400,
                     "Sec-WebSocket-Key is missing", "16 random bytes", id="no-key"),
        pytest.param((VERSION, b"Sec-WebSocket-Version: 8\r\n"), 400,
                     "Version is not", "Version: 13'", id="version-8"),
        pytest.param((VERSION, b""), 400,
                     "Sec-WebSocket-Version is missing", "Version: 13'", id="no-version"),
        pytest.param((b"websocket", b"websocket, h2c"), 426,
                     "Upgrade does not", "POST /v1/responses", id="two-upgrades"),
        pytest.param((b"Connection: Upgrade", b"Connection: upgrades"), 426,
                     "Connection", "'Upgrade:", id="no-upgrade-option"),
        pytest.param((KEY, KEY + b"Sec-WebSocket-Extensions: permessage-deflate; =x\r\n"), 400,
                     "Sec-WebSocket-Extensions is not valid", "Offer 'permessage-deflate'",
                     id="bad-extensions"),
        pytest.param((KEY, KEY + b"Sec-WebSocket-Protocol: a b\r\n"), 400,
                     "Sec-WebSocket-Protocol is not valid", "Offer 'warmsocket.msgpack'",
                     id="bad-subprotocol"),
    ],
)  # fmt: skip
def test_websockets_own_refusals_are_json_errors(
    server: RunningServer,
    change: tuple[bytes, bytes],
    status: int,
    header: str,
    fix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE.replace(*change) + b"\r\n"
    with caplog.at_level(logging.INFO):
        reply = exchange(server.port, request)
    got, headers, body = split_response(reply)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"].startswith("req_") and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] is None
    message = error["message"].replace(" header ", " ")
    assert header in message and fix in message, message
    for echoed in ("c2hvcnQ", "h2c", "upgrades", "=x", "a b"):  # values are not echoed
        assert echoed not in error["message"]
    if status == 426:
        assert error["code"] == "websocket_upgrade_required"
        assert headers["upgrade"] == "websocket"
    else:
        assert error["code"] is None
    if "Version is" in header:
        assert headers["sec-websocket-version"] == "13"  # RFC 6455, 4.4
    (record,) = [r for r in caplog.records if r.getMessage() == "websocket refused"]
    assert record.__dict__["status"] == status
    metrics = server.server.metrics
    assert metrics.errors[error["code"] or "invalid_request_error"] == 1
    assert metrics.http_requests[("responses", status)] == 1
    assert metrics.connections_opened.get("websocket", 0) == 0


# -- what a connection buffers while it answers --------------------------------------------------

ONE_READ = 256 * 1024  # the most one `data_received` brings (uvloop's read buffer)


def test_pipelined_bytes_past_the_read_ahead_wait_and_are_answered_in_order(
    server: RunningServer,
) -> None:
    pipelined = [create(f"n{i}", padding=1 << 20) for i in range(1, 17)]  # 16 MiB
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(create("/sleep 1500\nslow"))
        time.sleep(0.1)
        sender = Sender(raw, b"".join(pipelined))
        time.sleep(0.5)  # the slow request still runs
        ((buffered, in_progress, paused),) = buffered_by_the_server(server)
        assert in_progress
        assert sender.sent > HTTP_READ_AHEAD + 4 * ONE_READ  # the client sent far more
        assert buffered <= HTTP_READ_AHEAD + ONE_READ
        assert paused
        responses = read_responses(raw, 1 + len(pipelined))
        sender.join(10)
        assert sender.error is None and sender.sent == sum(map(len, pipelined))
    texts = [json.loads(body)["output"][0]["content"][0]["text"] for _, _, body in responses]
    assert texts == ["You said: /sleep 1500\nslow"] + [f"You said: n{i}" for i in range(1, 17)]


def test_a_flood_during_an_answer_stays_bounded_then_gets_431(server: RunningServer) -> None:
    # The audit's case: no end of head ever, sent while a slow request is answered.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(create("/sleep 1000\nslow"))
        time.sleep(0.1)
        sender = Sender(raw, b"G" * (16 << 20))
        time.sleep(0.4)
        ((buffered, in_progress, paused),) = buffered_by_the_server(server)
        assert in_progress
        assert sender.sent > HTTP_READ_AHEAD + 4 * ONE_READ
        assert buffered <= HTTP_READ_AHEAD + ONE_READ
        assert paused
        (status, _, body), (too_large, _, _) = read_responses(raw, 2)
        assert status == 200 and json.loads(body)["status"] == "completed"
        assert too_large == 431


def test_pipelined_requests_wait_while_their_client_reads_no_answer(
    server: RunningServer,
) -> None:
    """A client that sends thousands of small requests at once and reads nothing gets
    them answered as it reads: the answers waiting in the server stay within the write
    buffer's high-water mark and one answer, not one answer per request sent."""
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    count = HTTP_READ_AHEAD // len(request)  # all within what the server reads ahead
    answer_size = len(
        exchange(server.port, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    )
    assert count * answer_size > 8 * WRITE_HIGH_WATER  # the unbounded case is large

    def write_buffers() -> list[int]:
        return [c.transport.get_write_buffer_size() for c in server.server.connections]

    with small_window_connection(server.port) as raw:
        raw.sendall(request * count)
        small_send_buffers(server)
        time.sleep(0.5)
        (waiting,) = server.call(write_buffers)
        assert waiting <= WRITE_HIGH_WATER + 2 * answer_size
        # Reading, the client gets every answer, in order.
        answers = read_responses(raw, count)
    assert [status for status, _, _ in answers] == [200] * count


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param(b"", 401, id="no-key"),
        pytest.param(b"Authorization: Bearer sk-wrong\r\n", 401, id="wrong-key"),
        pytest.param(b"Authorization: Bearer sk-1\r\nOrigin: https://evil.example\r\n", 403,
                     id="origin-not-allowed"),
    ],
)  # fmt: skip
def test_a_refused_head_is_answered_before_its_body(headers: bytes, status: int) -> None:
    """A request its head has refused (no valid key, a page not allowed) is answered
    as soon as its head arrives, without a 100 Continue: the server does not hold up
    to --max-message-bytes of a body it will refuse, for each connection."""
    body_length = 8 << 20
    with (
        running_server(api_keys=frozenset({"sk-1"})) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
    ):
        raw.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
            + headers
            + b"Content-Length: %d\r\n\r\n" % body_length
            + b"{" * 65536  # some of the body: the rest is never sent
        )
        answer = read_head(raw).partition(b"\r\n\r\n")[0]
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer
        assert b"connection: close" in answer.lower()


def test_a_head_with_a_key_still_gets_its_100_continue_and_answer() -> None:
    with (
        running_server(api_keys=frozenset({"sk-1"})) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
    ):
        body = b'{"model": "m", "input": "hi"}'
        raw.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
            b"Authorization: Bearer sk-1\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert read_head(raw).startswith(b"HTTP/1.1 100 ")
        raw.sendall(body)
        ((status, _, answer),) = read_responses(raw, 1)
        assert status == 200 and json.loads(answer)["status"] == "completed"


def test_an_http_1_0_stream_is_not_chunked_and_ends_with_the_connection(
    server: RunningServer,
) -> None:
    """HTTP/1.0 has no chunked coding (RFC 9112, 6.1): an SSE answer to an HTTP/1.0
    request (nginx proxies with it unless told otherwise) is the events as they are,
    ended by closing the connection, not chunk framing the client would pass on as
    part of the events."""
    body = b'{"model": "m", "input": "hi", "stream": true}'
    request = b"POST /v1/responses HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    status, headers, events = split_response(exchange(server.port, request))
    assert status == 200 and "transfer-encoding" not in headers
    assert headers["connection"] == "close"
    assert events.startswith(b"event: response.created\ndata: ")
    assert events.rstrip().split(b"\n\n")[-1].startswith(b"event: response.completed\n")


# -- half-closed and vanished clients -------------------------------------------------------------


def http_tasks(srv: RunningServer) -> list[Any]:
    result: list[Any] = srv.call(
        lambda: [c._http_task for c in srv.server.connections if c._http_task is not None]
    )
    return result


def wait_for(condition: Any, timeout: float = 2.0) -> float:
    """Seconds until `condition()` held (fails after `timeout`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.005)
    return time.monotonic() - start


def test_a_half_closed_client_gets_its_answers_then_the_connection_closes(
    server: RunningServer,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(create("/sleep 300\nslow") + create("second"))
        raw.shutdown(socket.SHUT_WR)
        replies = read_until_closed(raw)
    first, second = replies.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and b"You said: /sleep 300\\nslow" in first
    assert second.startswith(b"200 ") and b"You said: second" in second
    # Nothing in progress: EOF closes at once, a partial head unanswered.
    for data in [b"", b"GET /healthz HTTP/1.1\r\n"]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(data)
            raw.shutdown(socket.SHUT_WR)
            assert read_until_closed(raw) == b""


def test_a_reset_connection_still_cancels_its_request(server: RunningServer) -> None:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    raw.sendall(create("/sleep 5000\nslow"))
    wait_for(lambda: len(http_tasks(server)) == 1)
    (task,) = http_tasks(server)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST
    assert wait_for(lambda: server.call(task.done)) < 0.5  # (its model sleeps 5 s)


def test_eof_during_a_stream_ends_it_at_once(server: RunningServer) -> None:
    body = b'{"model": "m", "input": "/sleep 5000\\nhi", "stream": true}'
    for half_close in (False, True):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(post(body))
            assert read_head(raw).startswith(b"HTTP/1.1 200 ")
            wait_for(lambda: len(http_tasks(server)) == 1)
            (task,) = http_tasks(server)
            if half_close:
                raw.shutdown(socket.SHUT_WR)
            else:
                raw.close()  # FIN: the client read everything so far
            assert wait_for(partial(server.call, task.done)) < 0.1


# -- timeouts -------------------------------------------------------------------------------------

IDLE, HEAD = 0.3, 0.6


@pytest.fixture
def impatient() -> Iterator[RunningServer]:
    with running_server(http_idle_timeout=IDLE, http_head_timeout=HEAD) as srv:
        yield srv


def closed_after(raw: socket.socket, start: float) -> tuple[bytes, float]:
    """What the server sent until it closed, and when it closed (seconds from `start`)."""
    data = read_until_closed(raw)
    return data, time.monotonic() - start


def test_an_idle_http_connection_is_closed(impatient: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=5) as raw:
        data, after = closed_after(raw, time.monotonic())  # never sent anything
    assert data == b"" and IDLE * 0.8 < after < IDLE + 1
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        ((status, _, _),) = read_responses(raw, 1)
        data, after = closed_after(raw, time.monotonic())  # kept alive, then idle
    assert status == 200 and data == b"" and IDLE * 0.8 < after < IDLE + 1


def test_a_slow_head_gets_408(impatient: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=5) as raw:
        start = time.monotonic()
        raw.sendall(b"GET /healthz HTTP/1.1\r\n")
        try:
            for i in range(40):  # a header line every 0.1 s: never idle, never done
                time.sleep(0.1)
                raw.sendall(b"X-%d: a\r\n" % i)
        except OSError:
            pass  # closed by the server
        data, after = closed_after(raw, start)
    status, headers, body = split_response(data)
    assert status == 408 and HEAD * 0.8 < after < HEAD + 1
    assert headers["x-request-id"].startswith("req_") and headers["connection"] == "close"
    assert "--http-head-timeout" in json.loads(body)["error"]["message"]


def test_a_stalled_body_gets_408_and_a_trickled_one_is_read(impatient: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=5) as raw:
        raw.sendall(b"POST /v1/responses HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        data, after = closed_after(raw, time.monotonic())
    status, _, body = split_response(data)
    assert status == 408 and IDLE * 0.8 < after < IDLE + 1
    assert "--http-idle-timeout" in json.loads(body)["error"]["message"]
    # Bytes keep coming (each gap under the idle timeout), the whole well within
    # --http-body-timeout (300 s): the body is read.
    request = create("trickled", padding=12)
    head_end = request.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=5) as raw:
        raw.sendall(request[:head_end])
        for i in range(head_end, len(request), 4):  # ~1 s in all, past both timeouts
            time.sleep(0.1)
            raw.sendall(request[i : i + 4])
        ((status, _, body),) = read_responses(raw, 1)
    assert status == 200 and json.loads(body)["output"][0]["content"][0]["text"].endswith("led")


def test_requests_never_read_whole_are_counted_in_metrics() -> None:
    # Unparsable, or not received in time: answered by the connection before any
    # route was known, and counted under route "none".
    with running_server(http_idle_timeout=IDLE, http_head_timeout=HEAD) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(b"NOT HTTP\r\n\r\n")
            assert split_response(read_until_closed(raw))[0] == 400
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\n")  # the head never ends
            assert split_response(read_until_closed(raw))[0] == 408
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(b"POST /v1/responses HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            assert split_response(read_until_closed(raw))[0] == 408
        metrics = srv.server.metrics.render()
    assert 'warmsocket_http_requests_total{route="none",status="400"} 1' in metrics
    assert 'warmsocket_http_requests_total{route="none",status="408"} 2' in metrics
    assert 'warmsocket_errors_total{code="invalid_request_error"} 3' in metrics


def test_a_trickled_body_gets_408_at_the_body_timeout() -> None:
    body_timeout = 0.8
    with running_server(
        http_idle_timeout=IDLE, http_head_timeout=HEAD, http_body_timeout=body_timeout
    ) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            start = time.monotonic()
            raw.sendall(b"POST /v1/responses HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
            try:
                for _ in range(40):  # a byte every 0.1 s: never idle, done after 10 s
                    time.sleep(0.1)
                    raw.sendall(b" ")
            except OSError:
                pass  # closed by the server
            data, after = closed_after(raw, start)
        status, headers, body = split_response(data)
        assert status == 408 and body_timeout * 0.8 < after < body_timeout + 1
        assert headers["x-request-id"].startswith("req_") and headers["connection"] == "close"
        message = json.loads(body)["error"]["message"]
        assert "--http-body-timeout" in message and "0.8 seconds" in message
        # The clock starts when the head ends: head and body take longer than the body
        # timeout together, the body alone does not.
        request = create("in time")
        head_end = request.index(b"\r\n\r\n") + 4
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            start = time.monotonic()
            for piece in (request[:head_end], request[head_end:]):
                step = len(piece) // 4 + 1
                for i in range(0, len(piece), step):  # 4 pieces, 0.15 s apart
                    raw.sendall(piece[i : i + step])
                    time.sleep(0.15)
            ((status, _, body),) = read_responses(raw, 1)
            assert time.monotonic() - start > body_timeout
        assert status == 200 and json.loads(body)["status"] == "completed"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(b"POST /v1/responses HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            data, after = closed_after(raw, time.monotonic())
        status, _, body = split_response(data)
        assert status == 408 and IDLE * 0.8 < after < body_timeout
        assert "--http-idle-timeout" in json.loads(body)["error"]["message"]


def test_timeouts_do_not_cut_requests_being_answered_or_websockets(
    impatient: RunningServer,
) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=5) as raw:
        raw.sendall(create("/sleep 1000\nslow"))
        ((status, _, _),) = read_responses(raw, 1)
        assert status == 200
    with WSClient(impatient.ws_url) as ws:
        time.sleep(HEAD + IDLE)
        assert output_text(ws.turn(input="still here")) == "You said: still here"


# -- clients that stop reading --------------------------------------------------------------------


DELTA = ("word " * 13108)[:65536]  # words: tokenising a long run of one letter is slow


class Firehose:
    """A model that streams 64 KiB deltas, `limit` bytes in all (None: until it is
    stopped); it records whether its stream was closed (the turn was stopped)."""

    name = "firehose"

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.started = threading.Event()
        self.closed = threading.Event()

    async def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        self.started.set()
        sent = 0
        try:
            while self.limit is None or sent < self.limit:
                yield TextDelta(DELTA)
                sent += 65536
                await asyncio.sleep(0)
        finally:
            self.closed.set()

    async def aclose(self) -> None:
        return None


def small_window_connection(port: int, receive_buffer: int = 4096) -> socket.socket:
    """A client socket with a small receive buffer: the server's writes back up soon
    once the client stops reading."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", port))
    return raw


def small_send_buffers(srv: RunningServer) -> None:
    """Kernel send buffers of 128 KiB (no autotuning, which grows them to megabytes)
    for the server's connections: their transports' own buffers fill sooner."""

    def shrink() -> int:
        for connection in srv.server.connections:
            sock = connection.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        return len(srv.server.connections)

    wait_for(lambda: srv.call(shrink))


def dropped_after(srv: RunningServer, start: float, timeout: float = 5.0) -> float:
    """Seconds from `start` until the server has no connection left."""
    wait_for(lambda: not srv.call(lambda: list(srv.server.connections)), timeout)
    return time.monotonic() - start


def stall_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "client stopped reading"]


@pytest.mark.parametrize("stream", [True, False])
def test_an_http_client_that_stops_reading_is_dropped(
    stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Streamed: the model waits for the client forever. Not streamed: the answer waits
    # in the write buffer, and closing the idle connection waited for it to be sent.
    backend = Firehose(limit=None if stream else 16 << 20)
    body = b'{"model": "m", "input": "go", "stream": %b}' % (b"true" if stream else b"false")
    with (
        caplog.at_level(logging.INFO),
        running_server(backend=backend, http_idle_timeout=IDLE, http_head_timeout=HEAD) as srv,
    ):
        with small_window_connection(srv.port) as raw:
            raw.sendall(post(body))
            assert backend.started.wait(5)
            after = dropped_after(srv, time.monotonic())  # never read a byte
            assert backend.closed.wait(1)  # the turn was stopped, as on a disconnect
            with pytest.raises(ConnectionResetError):  # what was not sent is dropped
                read_until_closed(raw)
        assert IDLE <= after < IDLE + 2
        metrics = srv.server.metrics.render()
    assert 'warmsocket_write_stalls_total{kind="http"} 1' in metrics
    (record,) = stall_records(caplog)
    assert record.__dict__["kind"] == "http" and record.__dict__["unsent_bytes"] > 0
    assert record.__dict__["seconds"] == IDLE


@pytest.mark.parametrize("ping_interval", [None, 0.2])
def test_a_websocket_client_that_stops_reading_is_dropped(
    ping_interval: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    # With pings, the keepalive gave up on the client after 0.4 s but then waited,
    # forever, to send what was buffered before closing; without, nothing looked.
    backend = Firehose()
    with (
        caplog.at_level(logging.INFO),
        running_server(
            backend=backend,
            http_idle_timeout=IDLE,
            ws_ping_interval=ping_interval,
            ws_ping_timeout=ping_interval,
        ) as srv,
    ):
        raw = small_window_connection(srv.port)
        with raw:
            raw.sendall(b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + b"\r\n")
            assert read_head(raw).startswith(b"HTTP/1.1 101 ")
            raw.sendall(_masked(json.dumps(CREATE).encode()))
            assert backend.started.wait(5)
            dropped_after(srv, time.monotonic())
            assert backend.closed.wait(1)
        metrics = srv.server.metrics.render()
    assert 'warmsocket_write_stalls_total{kind="websocket"} 1' in metrics
    (record,) = stall_records(caplog)
    assert record.__dict__["kind"] == "websocket"
    assert record.__dict__["connection"] is not None


def test_a_slow_reader_that_keeps_reading_is_not_dropped(caplog: pytest.LogCaptureFixture) -> None:
    # Writing stays paused for longer than the timeout (the client drains the buffer
    # to its low-water mark slower than that), but every check sees progress.
    backend = Firehose(limit=384 << 10)  # the text, then four events that repeat it
    body = b'{"model": "m", "input": "go", "stream": true}'
    with (
        caplog.at_level(logging.INFO),
        running_server(backend=backend, http_idle_timeout=IDLE, http_head_timeout=HEAD) as srv,
    ):

        def paused() -> bool:
            return any(not c._writable.is_set() for c in srv.server.connections)

        with small_window_connection(srv.port, 65536) as raw:
            small_send_buffers(srv)
            raw.sendall(post(body))
            received = b""
            longest = paused_since = 0.0
            while not received.endswith(b"0\r\n\r\n"):
                chunk = raw.recv(65536)
                assert chunk, "closed by the server"
                received += chunk
                time.sleep(0.1)  # about 600 KiB/s
                now = time.monotonic()
                if not srv.call(paused):
                    paused_since = 0.0
                elif not paused_since:
                    paused_since = now
                longest = max(longest, now - paused_since if paused_since else 0.0)
    assert b"event: response.completed" in received
    assert longest > 2 * IDLE  # the case this test is about happened
    assert not stall_records(caplog)


def test_progress_is_what_the_client_acknowledged() -> None:
    # With autotuned kernel buffers (megabytes), the kernel takes more from the
    # transport only once a third of its buffer is free: the transport's buffer can
    # stand still for longer than the timeout while a slow client reads.
    with running_server(backend=Firehose(), http_idle_timeout=10) as srv:

        def progress() -> tuple[int, int]:
            (connection,) = srv.server.connections
            transport = connection.transport
            return transport.get_write_buffer_size(), connection._delivered(transport)

        with small_window_connection(srv.port, 65536) as raw:
            raw.sendall(post(b'{"model": "m", "input": "go", "stream": true}'))
            time.sleep(0.3)  # the buffers fill
            before = srv.call(progress)
            read = 0
            while read < 128 << 10:
                read += len(raw.recv(65536))
                time.sleep(0.01)
            time.sleep(0.05)
            after = srv.call(progress)
    assert after[0] == before[0] > 0  # the transport's buffer did not move
    assert after[1] - before[1] >= 64 << 10  # what the client read was acknowledged


def test_a_slow_websocket_reader_is_not_failed_by_the_keepalive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server's ping waits behind what is already buffered for the client, so a
    # client that reads slowly but steadily gets it (and answers) long after the ping
    # timeout: that is not a dead client. It was failed with 1011.
    ping_timeout = 0.3
    backend = Firehose(limit=384 << 10)
    with (
        caplog.at_level(logging.INFO),
        running_server(
            backend=backend,
            http_idle_timeout=2.0,
            ws_ping_interval=0.2,
            ws_ping_timeout=ping_timeout,
        ) as srv,
    ):
        client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{srv.port}/v1/responses"))
        with small_window_connection(srv.port, 65536) as raw:
            client.send_request(client.connect())
            raw.sendall(b"".join(client.data_to_send()))
            small_send_buffers(srv)
            late_pings: list[float] = []
            types: list[str] = []
            while "response.completed" not in types:
                chunk = raw.recv(65536)
                assert chunk, f"closed by the server after {types[-3:]}"
                client.receive_data(chunk)
                for event in client.events_received():
                    if isinstance(event, Response):
                        assert event.status_code == 101
                        client.send_text(json.dumps({**CREATE, "stream": True}).encode())
                    elif event.opcode is Opcode.PING:  # answered by `client` below
                        sent_ms = int.from_bytes(event.data, "big")
                        late_pings.append(time.monotonic() - sent_ms / 1000)
                    elif event.opcode is Opcode.TEXT:
                        types.append(json.loads(event.data)["type"])
                    else:
                        assert event.opcode is not Opcode.CLOSE, event
                if pending := client.data_to_send():
                    raw.sendall(b"".join(pending))
                time.sleep(0.1)  # about 600 KiB/s
    assert max(late_pings) > 2 * ping_timeout  # the case this test is about happened
    assert "websocket keepalive timed out" not in caplog.messages
    assert not stall_records(caplog)


def test_a_client_that_never_answers_pings_is_failed_by_the_keepalive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    interval = timeout = 0.2
    with (
        caplog.at_level(logging.INFO),
        running_server(
            http_idle_timeout=None, ws_ping_interval=interval, ws_ping_timeout=timeout
        ) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
    ):
        raw.sendall(b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + b"\r\n")
        start = time.monotonic()
        data, after = closed_after(raw, start)
    assert data.startswith(b"HTTP/1.1 101 ")
    close = b"\x88" + bytes([2 + len(b"keepalive ping timeout")]) + (1011).to_bytes(2, "big")
    assert data.endswith(close + b"keepalive ping timeout")
    assert interval + timeout <= after < interval + timeout + 1
    assert "websocket keepalive timed out" in caplog.messages


def test_a_client_uploading_a_large_message_slowly_is_not_failed_by_the_keepalive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client cannot answer a ping before the data frame it is sending has gone out:
    a large create over a slow link (an agent re-sending its whole transcript) got
    `1011 keepalive ping timeout` mid-upload. Bytes arriving are a sign of life."""
    with (
        caplog.at_level(logging.INFO),
        running_server(http_idle_timeout=None, ws_ping_interval=0.2, ws_ping_timeout=0.2) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
    ):
        raw.sendall(b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + b"\r\n")
        assert read_head(raw).startswith(b"HTTP/1.1 101 ")
        text = "x" * 60_000
        frame = _masked(json.dumps({**CREATE, "input": text}).encode())
        pieces = [frame[i : i + 2_000] for i in range(0, len(frame), 2_000)]
        for piece in pieces:  # about 1.5 s: several ping intervals and timeouts
            raw.sendall(piece)
            time.sleep(0.05)
        received = b""
        while b"response.completed" not in received:
            chunk = raw.recv(65536)
            assert chunk, "closed before the answer"
            assert b"keepalive ping timeout" not in chunk
            received += chunk
    assert "websocket keepalive timed out" not in caplog.messages


def test_a_websocket_client_that_stops_reading_fails_the_keepalive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Without the write-stall check (--http-idle-timeout 0), a ping stuck behind bytes
    # the client does not read still ends in the keepalive's timeout: the wait for a
    # late pong goes on only while the client receives something.
    backend = Firehose()
    with (
        caplog.at_level(logging.INFO),
        running_server(
            backend=backend, http_idle_timeout=None, ws_ping_interval=0.2, ws_ping_timeout=0.2
        ) as srv,
        small_window_connection(srv.port) as raw,
    ):
        raw.sendall(b"GET /v1/responses HTTP/1.1\r\n" + UPGRADE + b"\r\n")
        assert read_head(raw).startswith(b"HTTP/1.1 101 ")
        raw.sendall(_masked(json.dumps(CREATE).encode()))
        assert backend.started.wait(5)
        wait_for(lambda: "websocket keepalive timed out" in caplog.messages, 3)


def test_an_http2_client_with_prior_knowledge_is_told_http_1_1_is_required(
    server: RunningServer,
) -> None:
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # the client's empty SETTINGS
    answer = exchange(server.port, HTTP2_PREFACE + settings)
    assert answer == HTTP2_REFUSAL
    frames = []
    while answer:
        length = int.from_bytes(answer[:3], "big")
        frames.append((answer[3], answer[9 : 9 + length]))
        answer = answer[9 + length :]
    assert [kind for kind, _ in frames] == [0x4, 0x7]  # SETTINGS, GOAWAY
    goaway = frames[1][1]
    assert int.from_bytes(goaway[4:8], "big") == 0xD  # HTTP_1_1_REQUIRED
    assert b"HTTP/1.1" in goaway[8:]
    assert 'warmsocket_errors_total{code="http2_not_supported"} 1' in server.server.metrics.render()
    # A request whose first bytes could start the preface is still HTTP/1.1.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"P")
        time.sleep(0.05)  # (its own segment)
        raw.sendall(create("split")[1:])
        ((status, _headers, body),) = read_responses(raw, 1)
    assert status == 200 and b"You said: split" in body
