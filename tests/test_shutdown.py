"""A graceful shutdown: what is under way finishes, nothing new is taken.

`Server.drain` in process (every kind of connection at once), and `warmsocket serve`
on SIGTERM: a turn under way completes, or fails with a terminal event when the
`--shutdown-timeout` runs out, and a second signal closes at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.support import WSClient, check_sse_event, running_server
from tests.test_cli import WARMSOCKET
from warmsocket.httpapi import ANONYMOUS_OWNER


def events_until_closed(
    client: WSClient | ClientConnection, timeout: float = 10
) -> tuple[list[dict[str, Any]], int]:
    """Every event until the server closes the connection, and the close code."""
    events: list[dict[str, Any]] = []
    while True:
        try:
            message = client.recv(timeout=timeout)
            events.append(message if isinstance(message, dict) else json.loads(message))
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            return events, closed.rcvd.code


def sse_events(body: bytes) -> list[dict[str, Any]]:
    events = [
        json.loads(line[len(b"data: ") :])
        for line in body.splitlines()
        if line.startswith(b"data: ") and line != b"data: [DONE]"
    ]
    for event in events:
        check_sse_event(event)
    return events


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_drain_finishes_what_is_under_way_and_closes_each_connection_when_done() -> None:
    """A WebSocket with a turn under way gets the turn's end and then 1001, a new create
    on it the error that says to reconnect; an idle one 1001 at once; an SSE stream
    under way ends whole."""
    with running_server() as srv:
        busy = WSClient(srv.ws_url)
        idle = WSClient(srv.ws_url)
        assert idle.turn(input="earlier")[-1]["type"] == "response.completed"
        busy.create(input="/sleep 1500 slow words")
        assert busy.recv()["type"] == "response.created"
        streamed: dict[str, Any] = {}

        def stream() -> None:
            with httpx.Client(base_url=srv.base_url, timeout=10) as http:
                body = {"model": "m", "input": "/sleep 1500 streamed", "stream": True}
                with http.stream("POST", "/responses", json=body) as reply:
                    streamed["body"] = reply.read()

        streaming = threading.Thread(target=stream)
        streaming.start()
        time.sleep(0.15)  # the stream's request is under way
        started = time.monotonic()
        drained = asyncio.run_coroutine_threadsafe(srv.server.drain(10), srv.loop)
        idle_events, idle_code = events_until_closed(idle)
        assert (idle_events, idle_code) == ([], 1001)
        assert time.monotonic() - started < 1.0  # at once, not after the others
        busy.create(input="too late", stream_id="later")
        busy_events, busy_code = events_until_closed(busy)
        drained.result(timeout=10)
        streaming.join(10)
        took = time.monotonic() - started
    assert busy_code == 1001
    types = [e["type"] for e in busy_events]
    assert types[-1] == "response.completed" and "response.failed" not in types
    (error,) = [e for e in busy_events if e["type"] == "error"]
    assert error["stream_id"] == "later"
    assert error["error"]["code"] == "websocket_connection_limit_reached"
    completed = busy_events[-1]["response"]["output"][0]["content"][0]["text"]
    assert completed.endswith("slow words")
    assert sse_events(streamed["body"])[-1]["type"] == "response.completed"
    assert 1.2 < took < 6  # waited for the sleeps, not for the grace


def test_a_request_behind_the_one_under_way_is_answered_then_the_connection_closes() -> None:
    """On a keep-alive connection: the request under way at the drain is answered as
    usual, a pipelined `/healthz` behind it says `draining` (503), then the server
    closes the connection. New connections are refused meanwhile."""
    with running_server() as srv:
        body = json.dumps({"model": "m", "input": "/sleep 300 hi"}).encode()
        requests = (
            b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
            + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(requests)
            time.sleep(0.1)
            drained = asyncio.run_coroutine_threadsafe(srv.server.drain(10), srv.loop)
            time.sleep(0.05)
            assert refused(srv.port)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        drained.result(timeout=10)
    first, second = received.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 ") and b'"status":"completed"' in first
    assert second.startswith(b"503 ") and b'{"status":"draining"}' in second
    assert b"connection: close" in second.lower()


def test_a_websocket_upgrade_that_completes_during_the_drain_is_refused() -> None:
    """Its head began before the drain (so its connection was not idle) and ended
    after: 503, not a new session the drain would then have to wait for."""
    with running_server() as srv:
        head = (
            b"GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n"
        )
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(head)
            time.sleep(0.1)
            drained = asyncio.run_coroutine_threadsafe(srv.server.drain(10), srv.loop)
            time.sleep(0.1)
            sock.sendall(b"\r\n")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        drained.result(timeout=10)
    assert received.startswith(b"HTTP/1.1 503 ")
    assert b"shutting down" in received


def test_a_drain_that_runs_out_fails_the_turn_then_closes_and_background_runs_finish() -> None:
    """A turn longer than the grace ends `response.failed` (a terminal event, not a
    close in the middle of it), then 1001. A background response that ends within the
    grace is waited for, and stored."""
    with running_server() as srv:
        with httpx.Client(base_url=srv.base_url, timeout=10) as http:
            queued = http.post(
                "/responses", json={"model": "m", "input": "/sleep 300 later", "background": True}
            ).json()
        slow = WSClient(srv.ws_url)
        slow.create(input="/sleep 5000 never")
        assert slow.recv()["type"] == "response.created"
        started = time.monotonic()
        asyncio.run_coroutine_threadsafe(srv.server.drain(0.5), srv.loop).result(timeout=10)
        took = time.monotonic() - started
        events, code = events_until_closed(slow)

        async def stored() -> str:
            info = srv.server.cache.get(queued["id"], owner=ANONYMOUS_OWNER)
            return info.id

        found = asyncio.run_coroutine_threadsafe(stored(), srv.loop).result(timeout=5)
    assert 0.45 < took < 3
    assert code == 1001
    failed = events[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["error"]["message"] == "The server shut down first."
    assert found == queued["id"]


@pytest.fixture
def serve_process(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], str]]:
    args: tuple[str, ...] = getattr(request, "param", ())
    proc = subprocess.Popen(
        [WARMSOCKET, "serve", "--port", "0", "--log-format", "json", *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            record = json.loads(line)
            if record["message"] == "listening":
                yield proc, record["websocket"]
                break
        else:
            raise AssertionError("server exited before listening")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def start_turn(ws: ClientConnection, text: str) -> None:
    """Send a create and wait for its `response.created`."""
    ws.send(json.dumps({"type": "response.create", "model": "m", "input": text}))
    assert json.loads(ws.recv(timeout=5))["type"] == "response.created"


def _log(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    assert proc.stderr is not None
    return [json.loads(line) for line in proc.stderr.read().splitlines()]


def test_sigterm_lets_a_turn_under_way_finish(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    proc, url = serve_process
    with connect(url, open_timeout=5) as ws:
        start_turn(ws, "/sleep 500 x")
        proc.send_signal(signal.SIGTERM)
        events, code = events_until_closed(ws)
    assert events[-1]["type"] == "response.completed"
    assert code == 1001
    assert proc.wait(timeout=10) == 0
    steps = {"draining", "drained", "shutting down", "shutdown timeout reached"}
    messages = [r["message"] for r in _log(proc) if r["message"] in steps]
    assert messages == ["draining", "drained", "shutting down"]


@pytest.mark.parametrize("serve_process", [("--shutdown-timeout", "0.3")], indirect=True)
def test_sigterm_fails_what_outlasts_the_shutdown_timeout(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    proc, url = serve_process
    with connect(url, open_timeout=5) as ws:
        start_turn(ws, "/sleep 9000")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        events, _code = events_until_closed(ws)
    assert events[-1]["type"] == "response.failed"
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert "shutdown timeout reached" in [r["message"] for r in _log(proc)]


def test_a_second_signal_ends_the_drain_at_once(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    proc, url = serve_process
    with connect(url, open_timeout=5) as ws:
        start_turn(ws, "/sleep 9000")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        for line in proc.stderr:
            if json.loads(line)["message"] == "draining":
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        # The turn still ends with its terminal event before the close (it got only
        # the close: a failure with no event, for the SDK a broken connection).
        events, code = events_until_closed(ws)
    assert time.monotonic() - started < 5
    assert "drain cut short by a second signal" in [r["message"] for r in _log(proc)]
    assert code == 1001
    assert [e["type"] for e in events][-1:] == ["response.failed"]
    assert events[-1]["response"]["error"]["message"] == "The server shut down first."


@pytest.mark.parametrize(
    "serve_process",
    [
        (
            "--shutdown-timeout",
            "0",
        )
    ],
    indirect=True,
)
def test_no_drain_still_ends_each_lane_s_turn_before_the_close(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    proc, url = serve_process
    with connect(url, open_timeout=5) as ws:
        create = {"type": "response.create", "model": "m", "input": "/sleep 9000 x"}
        ws.send(json.dumps(create))
        ws.send(json.dumps({**create, "stream_id": "other"}))
        created = 0
        while created < 2:
            created += json.loads(ws.recv(timeout=5))["type"] == "response.created"
        proc.send_signal(signal.SIGTERM)
        events, code = events_until_closed(ws)
        assert proc.wait(timeout=10) == 0
    assert code == 1001
    failed = [e for e in events if e["type"] == "response.failed"]
    assert sorted(str(e.get("stream_id")) for e in failed) == ["None", "other"]


@pytest.mark.parametrize("serve_process", [("--shutdown-timeout", "0.3")], indirect=True)
def test_sigterm_ends_http_answers_that_outlast_the_shutdown_timeout(
    serve_process: tuple[subprocess.Popen[str], str],
) -> None:
    """What is still under way over HTTP when the timeout ends is told so, through the
    SDK: a stream ends with `response.failed`, a request not yet answered gets a 503
    (which the SDK retries); a background response's follower ends whole, as it does
    when the response is cancelled (there is no event for that), not cut."""
    proc, url = serve_process
    sdk = openai.OpenAI(
        base_url=url.replace("ws://", "http://").removesuffix("/responses"),
        api_key="sk-test",
        max_retries=0,
    )
    seen: dict[str, Any] = {}
    begun = {name: threading.Event() for name in ("stream", "follower")}

    def stream() -> None:
        events = []
        for event in sdk.responses.create(model="m", input="/sleep 9000 x", stream=True):
            events.append(event)
            begun["stream"].set()
        seen["stream"] = events

    def complete() -> None:
        try:
            sdk.responses.create(model="m", input="/sleep 9000 y")
        except openai.APIStatusError as error:
            seen["complete"] = error

    def follower() -> None:
        queued = sdk.responses.create(model="m", input="/sleep 9000 z", background=True)
        events: list[Any] = []
        try:
            for event in sdk.responses.retrieve(queued.id, stream=True):
                events.append(event)
                begun["follower"].set()
        except openai.APIError as error:
            events.append(error)
        seen["follower"] = events

    threads = [threading.Thread(target=f, daemon=True) for f in (stream, complete, follower)]
    for thread in threads:
        thread.start()
    assert all(event.wait(5) for event in begun.values())
    time.sleep(0.3)  # (the create without a stream has no sign that it began)
    proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(10)
    assert proc.wait(timeout=10) == 0
    failed = seen["stream"][-1]
    assert failed.type == "response.failed"
    assert failed.response.error.message == "The server shut down first."
    assert [e.sequence_number for e in seen["stream"]] == list(range(len(seen["stream"])))
    assert isinstance(seen["complete"], openai.InternalServerError)
    assert seen["complete"].status_code == 503
    assert seen["follower"][-1].type == "response.in_progress"
