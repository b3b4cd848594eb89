"""`--max-connections`: past it a client is told why (503, `Retry-After`), probes are
still answered, idle keep-alive connections make room, and nothing admitted is touched."""

from __future__ import annotations

import json
import logging
import resource
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support import RunningServer, WSClient, output_text, running_server
from tests.test_cli import _stop, start_serve
from tests.test_http_connection import read_responses, read_until_closed, split_response
from warmsocket import admission
from warmsocket import server as server_module
from warmsocket.admission import Admission, auto_max_connections

LIMIT = 3


@pytest.fixture
def full() -> Iterator[RunningServer]:
    with running_server(max_connections=LIMIT) as srv:
        yield srv


def wait_for(condition: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def admitted(srv: RunningServer) -> int:
    count: int = srv.call(lambda: srv.server.admission.admitted)
    return count


def refused_websocket(srv: RunningServer) -> tuple[int, dict[str, str], dict[str, Any]]:
    with pytest.raises(InvalidStatus) as refused:
        connect(srv.ws_url, open_timeout=5).close()
    response = refused.value.response
    headers = {k.lower(): v for k, v in response.headers.raw_items()}
    return response.status_code, headers, json.loads(response.body)


def test_past_the_limit_a_new_connection_gets_503_and_the_others_go_on(
    full: RunningServer,
) -> None:
    with ExitStack() as stack:
        clients = [stack.enter_context(WSClient(full.ws_url)) for _ in range(LIMIT)]
        first = clients[0].turn(model="m", input="one", store=False)
        status, headers, body = refused_websocket(full)
        assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
        assert body["error"]["code"] == "server_is_overloaded"
        assert body["error"]["type"] == "server_error"
        assert "--max-connections" in body["error"]["message"]
        sdk = openai.OpenAI(base_url=full.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as http_refused:
            sdk.responses.create(model="m", input="hi")
        assert http_refused.value.status_code == 503
        # The admitted connections and their state are untouched.
        previous = first[-1]["response"]["id"]
        again = clients[0].turn(model="m", input="two", previous_response_id=previous)
        assert again[-1]["type"] == "response.completed"
        for client in clients[1:]:
            assert output_text(client.turn(model="m", input="three")) == "You said: three"
        clients.pop().close()
        wait_for(lambda: admitted(full) == LIMIT - 1)
        assert sdk.responses.create(model="m", input="in").output_text == "You said: in"
        sdk.close()  # its keep-alive connection
    metrics = full.server.metrics.render()
    assert f"warmsocket_connection_limit {LIMIT}" in metrics
    assert 'warmsocket_connections_refused_total{how="answered"} 2' in metrics
    assert 'warmsocket_http_requests_total{route="responses",status="503"} 2' in metrics
    assert 'warmsocket_errors_total{code="server_is_overloaded"} 2' in metrics
    wait_for(lambda: admitted(full) == 0)
    assert full.call(lambda: full.server.admission.refusing) == 0


def test_a_full_server_still_answers_its_probes(full: RunningServer) -> None:
    with ExitStack() as stack:
        for _ in range(LIMIT):
            stack.enter_context(WSClient(full.ws_url))
        bodies = {}
        for path in ("/healthz", "/metrics"):
            with socket.create_connection(("127.0.0.1", full.port), timeout=5) as raw:
                raw.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                status, headers, bodies[path] = split_response(read_until_closed(raw))
            assert status == 200 and headers["connection"] == "close"
        assert json.loads(bodies["/healthz"]) == {"status": "ok"}
        # Both probes came past the limit (the second counts itself).
        assert b'warmsocket_connections_refused_total{how="answered"} 2' in bodies["/metrics"]
        with socket.create_connection(("127.0.0.1", full.port), timeout=5) as raw:
            raw.sendall(b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
            assert split_response(read_until_closed(raw))[0] == 503  # only GET probes


def test_an_idle_keep_alive_connection_makes_room_a_websocket_never_does() -> None:
    with running_server(max_connections=2) as srv, ExitStack() as stack:
        waiting = stack.enter_context(socket.create_connection(("127.0.0.1", srv.port), 5))
        kept = stack.enter_context(socket.create_connection(("127.0.0.1", srv.port), 5))
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        ((status, headers, _),) = read_responses(kept, 1)
        assert status == 200 and headers.get("connection") != "close"  # kept alive, idle
        # Full: `waiting` has sent nothing yet (not idle: its request may be on its
        # way), `kept` waits for its next request. A WebSocket takes `kept`'s place.
        ws = stack.enter_context(WSClient(srv.ws_url))
        assert read_until_closed(kept) == b""
        assert output_text(ws.turn(model="m", input="in")) == "You said: in"
        waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_responses(waiting, 1)[0][0] == 200
        # Full of a WebSocket and a busy-then-idle HTTP connection: the next takes the
        # HTTP one's place; the one after that is refused.
        second = stack.enter_context(WSClient(srv.ws_url))
        assert read_until_closed(waiting) == b""
        assert refused_websocket(srv)[0] == 503
        assert output_text(second.turn(model="m", input="both")) == "You said: both"
        assert output_text(ws.turn(model="m", input="alive")) == "You said: alive"
        metrics = srv.server.metrics.render()
    assert "warmsocket_idle_connections_closed_for_room_total 2" in metrics
    assert 'warmsocket_connections_refused_total{how="answered"} 1' in metrics


def test_a_keep_alive_connection_with_its_next_request_under_way_is_not_idle() -> None:
    with (
        running_server(max_connections=1) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
    ):
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_responses(raw, 1)[0][0] == 200
        request = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        raw.sendall(request[:10])  # the next request's first bytes
        wait_for(lambda: srv.call(lambda: srv.server.metrics.bytes_received) > 40)
        assert refused_websocket(srv)[0] == 503
        raw.sendall(request[10:])
        assert read_responses(raw, 1)[0][0] == 200


def test_the_sdk_retries_a_refusal_and_gets_in_once_there_is_room(full: RunningServer) -> None:
    with ExitStack() as stack:
        clients = [stack.enter_context(WSClient(full.ws_url)) for _ in range(LIMIT)]
        threading.Timer(0.3, clients[0].close).start()  # room before the SDK's retry
        sdk = openai.OpenAI(base_url=full.base_url, api_key="x", max_retries=2)
        start = time.monotonic()
        reply = sdk.responses.create(model="m", input="patient")
        assert reply.output_text == "You said: patient"
        assert time.monotonic() - start >= 0.9  # it waited for Retry-After (1 s)
    assert 'warmsocket_connections_refused_total{how="answered"} 1' in (
        full.server.metrics.render()
    )


def test_a_refused_client_is_answered_early_or_dropped_when_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_module, "REFUSED_WAIT", 0.5)
    with running_server(max_connections=1) as srv, WSClient(srv.ws_url):
        # A large body is answered once REFUSED_BODY_BYTES of it arrived.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(
                b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: 10000000\r\n\r\n" + b" " * (admission.REFUSED_BODY_BYTES + 1)
            )
            status, _, body = split_response(read_until_closed(raw))
        assert status == 503 and json.loads(body)["error"]["code"] == "server_is_overloaded"
        # A client that waits for `100 Continue` is answered without sending its body.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(
                b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                b"Content-Length: 1000000\r\n\r\n"
            )
            status, _, body = split_response(read_until_closed(raw))
        assert status == 503 and json.loads(body)["error"]["code"] == "server_is_overloaded"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            start = time.monotonic()
            with pytest.raises((ConnectionResetError, AssertionError)):
                assert read_until_closed(raw) != b""  # nothing sent: dropped unanswered
            assert time.monotonic() - start < 3
        wait_for(lambda: srv.call(lambda: srv.server.admission.refusing) == 0)


def test_too_many_refusals_at_once_are_dropped_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(admission, "REFUSING_AT_ONCE", 2)
    caplog.set_level(logging.WARNING, logger="warmsocket.server")
    with running_server(max_connections=1) as srv, ExitStack() as stack:
        stack.enter_context(WSClient(srv.ws_url))
        silent = [
            stack.enter_context(socket.create_connection(("127.0.0.1", srv.port), 5))
            for _ in range(2)
        ]
        wait_for(lambda: srv.call(lambda: srv.server.admission.refusing) == 2)
        with (
            socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
            pytest.raises((ConnectionResetError, AssertionError)),
        ):
            assert read_until_closed(raw) != b""  # closed at once, unanswered
        for raw in silent:  # the two being refused still get their answer
            raw.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert split_response(read_until_closed(raw))[0] == 503
        metrics = srv.server.metrics.render()
    assert 'warmsocket_connections_refused_total{how="dropped"} 1' in metrics
    assert 'warmsocket_connections_refused_total{how="answered"} 2' in metrics
    warnings = [r for r in caplog.records if r.message.startswith("connection limit reached")]
    assert len(warnings) == 1  # at most one line per LOG_INTERVAL
    assert (warnings[0].limit, warnings[0].refused, warnings[0].dropped) == (1, 1, 0)  # type: ignore[attr-defined]


class _Idle:
    def __init__(self) -> None:
        self.closed = False

    def close_for_room(self) -> None:
        self.closed = True


def test_admission_counts() -> None:
    unlimited = Admission(None)
    assert [unlimited.admit() for _ in range(1000)] == ["admitted"] * 1000
    limited = Admission(2)
    assert (limited.admit(), limited.admit()) == ("admitted", "admitted")
    old, new = _Idle(), _Idle()
    limited.idle(old)
    limited.idle(new)
    limited.busy(new)  # its client sent a request: not idle any more
    assert limited.admit() == "admitted" and old.closed and not new.closed
    assert limited.admitted == 2 and limited.counts["closed_idle"] == 1
    limited.release(None)  # the closed one goes: it no longer counted
    assert limited.admit() == "refused" and limited.refusing == 1
    limited.release("refused")
    limited.release("admitted")
    assert (limited.admitted, limited.refusing) == (1, 0)
    assert limited.admit() == "admitted"


def test_the_default_limit_follows_the_open_file_limit() -> None:
    assert auto_max_connections(1024, upstream=False) == 1024 - admission.FILE_RESERVE
    assert auto_max_connections(1024, upstream=True) == (1024 - admission.FILE_RESERVE) // 2
    # With Redis, its connections (at most REDIS_CONNECTIONS) are kept out too.
    reserved = admission.FILE_RESERVE + admission.REDIS_CONNECTIONS
    assert auto_max_connections(1024, upstream=False, redis=True) == 1024 - reserved
    assert auto_max_connections(10, upstream=False) >= 1


def _low_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


def test_a_server_at_its_open_file_limit_answers_instead_of_closing() -> None:
    """Without a limit, connections past the open-file limit were closed unanswered
    and nothing was logged. With the default, the server stays inside it."""
    proc, listening = start_serve(preexec_fn=_low_file_limit)
    try:
        limit = listening["max_connections"]
        assert limit == 128 - admission.FILE_RESERVE
        url = listening["websocket"]
        with ExitStack() as stack:
            clients = [stack.enter_context(WSClient(url)) for _ in range(limit)]
            statuses = []
            for _ in range(20):
                with pytest.raises(InvalidStatus) as refused:
                    connect(url, open_timeout=5).close()
                statuses.append(refused.value.response.status_code)
            assert statuses == [503] * 20
            assert output_text(clients[-1].turn(model="m", input="ok")) == "You said: ok"
    finally:
        rest = _stop(proc)
    logs = [json.loads(line) for line in rest.splitlines()]
    warning = next(r for r in logs if r["message"].startswith("connection limit reached"))
    assert warning["limit"] == limit and warning["level"] == "warning"
