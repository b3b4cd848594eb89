"""Upstream building blocks without servers: HTTP response parsing, SSE, token blocks,
the affinity router, error mapping, configuration."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmsocket._core import shared_prefix_blocks
from warmsocket.httpclient import (
    READ_HIGH_WATER,
    ConnectFailed,
    ConnectionClosed,
    HTTPPool,
    Origin,
    ProtocolViolation,
    Proxy,
    RequestTimeout,
    ResponseParser,
    proxy_for,
    request_head,
)
from warmsocket.metrics import Metrics
from warmsocket.prefixhash import PromptHasher, context_items, new_chain_key
from warmsocket.router import Router, RouterConfig
from warmsocket.sse import SSEDecoder
from warmsocket.upstream import (
    UpstreamConfig,
    UpstreamError,
    from_error_object,
    from_http_status,
    parse_model_map,
    retry_after_seconds,
    retry_delay,
    transport_error,
)

# -- HTTP response parser ------------------------------------------------------------------


def parse(data: bytes, *, step: int | None = None) -> ResponseParser:
    parser = ResponseParser()
    if step is None:
        parser.feed(data)
    else:
        for start in range(0, len(data), step):
            parser.feed(data[start : start + step])
    return parser


@pytest.mark.parametrize("step", [None, 1, 3])
def test_content_length_body(step: int | None) -> None:
    parser = parse(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello", step=step
    )
    assert parser.head is not None and parser.head.status == 200
    assert parser.head.headers["x-a"] == "1, 2"
    assert parser.done and parser.keep_alive and parser.take_body() == b"hello"


@pytest.mark.parametrize("step", [None, 1, 4])
def test_chunked_body_with_trailers_and_interim_response(step: int | None) -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n"
    )
    parser = parse(data, step=step)
    assert parser.done and parser.keep_alive
    assert parser.take_body() == b"hello world"


def test_close_delimited_body_and_connection_close() -> None:
    parser = parse(b"HTTP/1.1 200 OK\r\n\r\npartial")
    assert not parser.done and not parser.keep_alive
    parser.feed(b" body")
    parser.feed_eof()
    assert parser.done and parser.take_body() == b"partial body"
    parser = parse(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert parser.done and not parser.keep_alive
    parser = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert parser.done and not parser.keep_alive


def test_truncated_and_invalid_responses() -> None:
    parser = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(ConnectionClosed):
        parser.feed_eof()
    with pytest.raises(ProtocolViolation, match="invalid status line"):
        parse(b"SMTP ready\r\n\r\n")
    with pytest.raises(ProtocolViolation, match="invalid header line"):
        parse(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", step=7)
    for head in (
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000,
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    ):
        with pytest.raises(ProtocolViolation, match="too large"):
            parse(head, step=4096)
        with pytest.raises(ProtocolViolation, match="too large"):
            parse(head)
    with pytest.raises(ProtocolViolation):
        parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    for length in (b"-1", b"+2", b"1_0", b"2, 2", b""):
        with pytest.raises(ProtocolViolation, match="Content-Length"):
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nab")
    # Bytes after a complete response: the connection is not reused.
    for response in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",
        b"HTTP/1.1 204 No Content\r\n\r\nextra",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\nextra",
    ):
        for step in (None, 1, 5):
            parser = parse(response, step=step)
            assert parser.done and not parser.keep_alive, (response, step)
    parser = parse(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert parser.done and parser.keep_alive


def test_origin_and_request_head() -> None:
    origin = Origin.parse("https://api.openai.com/v1/")
    assert (origin.host, origin.port, origin.base_path, origin.tls) == (
        "api.openai.com",
        443,
        "/v1",
        True,
    )
    assert origin.host_header == "api.openai.com"
    assert str(Origin.parse("ws://127.0.0.1:81/x")) == "http://127.0.0.1:81/x"
    with pytest.raises(ValueError):
        Origin.parse("ftp://x")
    assert (
        request_head("POST", "/v1/x", [("Host", "h")]) == b"POST /v1/x HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    # A forwarded key with a line break would add a header (or a request).
    for smuggled in ("Bearer k\r\nX-Injected: 1", "Bearer k\nContent-Length: 0", "k\r"):
        with pytest.raises(ValueError):
            request_head("POST", "/v1/x", [("Host", "h"), ("Authorization", smuggled)])


# -- the pool against tiny servers ---------------------------------------------------------


async def _serve(handler: object) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_pool_keeps_connections_alive_and_recovers_from_a_closed_idle_one() -> None:
    accepted = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                if accepted == 1 and served == 2:
                    return  # the server drops an idle keep-alive connection
        except asyncio.IncompleteReadError:
            return
        finally:
            writer.close()

    async def main() -> None:
        server, port = await _serve(handler)
        pool = HTTPPool(Origin.parse(f"http://127.0.0.1:{port}"))
        head = request_head("POST", "/", [("Host", "x"), ("Content-Length", "1")])
        for _ in range(4):
            response = await pool.request([head, b"x"], timeout=5)
            assert response.status == 200 and await response.read() == b"ok"
            response.close()
            await asyncio.sleep(0.01)
        assert pool.opened == 2 and accepted == 2  # one reconnect, after the server's close
        pool.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)

    asyncio.run(main())


def test_an_idle_connection_that_received_bytes_is_not_reused() -> None:
    """An answer that comes on an idle connection (to a request nobody here sent: one
    smuggled in, or a server's stray bytes) makes it unfit: reused, the next request
    would read that answer as its own."""
    accepted = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                if b"/first" in head:
                    await asyncio.sleep(0.05)  # the client is done with the first answer
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def main() -> None:
        server, port = await _serve(handler)
        pool = HTTPPool(Origin.parse(f"http://127.0.0.1:{port}"))
        first = await pool.request([request_head("GET", "/first", [("Host", "x")])], timeout=5)
        assert await first.read() == b"ok"
        first.close()
        await asyncio.sleep(0.2)  # the stray answer arrives while the connection is idle
        second = await pool.request([request_head("GET", "/second", [("Host", "x")])], timeout=5)
        assert await second.read() == b"ok"
        second.close()
        assert (pool.opened, accepted) == (2, 2)
        pool.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)

    asyncio.run(main())


def test_aborted_and_unreusable_responses_hand_their_connection_back() -> None:
    """The pool counts a connection in use until its response is done with, however
    it ends: read and kept alive, closed before its end, aborted (a cancelled turn),
    or aborted after being closed. The count does not drift by one per cancel."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = b"4" if head.startswith(b"GET /partial") else b"2"  # "ok" of 4: unfinished
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %b\r\n\r\nok" % length)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def main() -> None:
        server, port = await _serve(handler)
        pool = HTTPPool(Origin.parse(f"http://127.0.0.1:{port}"))
        head = request_head("GET", "/", [("Host", "x")])
        response = await pool.request([head], timeout=5)
        assert pool.in_use == 1
        response.abort()  # cancelled before its body
        assert pool.in_use == 0
        partial = request_head("GET", "/partial", [("Host", "x")])
        response = await pool.request([partial], timeout=5)
        response.close()  # before the end of its body: not reusable, dropped
        assert pool.in_use == 0 and pool.idle == 0
        response = await pool.request([head], timeout=5)
        assert await response.read() == b"ok"
        response.close()  # kept alive
        response.abort()  # no longer its connection: nothing happens
        assert pool.in_use == 0 and pool.idle == 1
        pool.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)

    asyncio.run(main())


def test_pool_timeouts_and_refused_connections() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1 << 16)
            await reader.read(1 << 16)  # returns at EOF, when the client gives up
        finally:
            writer.close()

    async def main() -> None:
        server, port = await _serve(silent)
        pool = HTTPPool(Origin.parse(f"http://127.0.0.1:{port}"))
        head = request_head("GET", "/", [("Host", "x")])
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(RequestTimeout):
            await pool.request([head], timeout=0.2)
        assert 0.15 <= loop.time() - start < 2
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)
        with pytest.raises(ConnectFailed):
            await HTTPPool(Origin.parse(f"http://127.0.0.1:{port}")).request([head], timeout=1)

    asyncio.run(main())


def test_an_https_origin_that_is_plain_http_fails_at_once_and_says_so() -> None:
    """A TLS handshake answered in plain HTTP (an https:// URL for an http:// server)
    is a permanent connect failure with a hint; one that just hangs still times out,
    and says it was the TLS handshake that did."""

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)  # the ClientHello
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await reader.read(1 << 16)
        writer.close()

    async def main() -> None:
        head = request_head("GET", "/", [("Host", "x")])
        server, port = await _serve(plain)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ConnectFailed) as info:
            await HTTPPool(Origin.parse(f"https://127.0.0.1:{port}")).request([head], timeout=5)
        assert loop.time() - start < 1
        assert info.value.permanent
        assert str(info.value).endswith("is the upstream plain http://?")
        server.close()
        await server.wait_closed()
        server, port = await _serve(silent)
        pool = HTTPPool(Origin.parse(f"https://127.0.0.1:{port}"), connect_timeout=0.2)
        with pytest.raises(ConnectFailed) as info:
            await pool.request([head], timeout=5)
        assert not info.value.permanent
        assert str(info.value).startswith(f"the TLS handshake with 127.0.0.1:{port} timed out")
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_slow_reader_pauses_the_upstream_instead_of_buffering() -> None:
    """While the turn does not take the body (its client reads slowly), the connection
    stops reading past READ_HIGH_WATER, so the upstream's writes back up; the wait is
    not an upstream timeout; reading again takes the whole body."""
    piece = b"x" * 65536
    pieces = 512  # 32 MiB
    written = 0

    async def fast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(pieces):
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            written += len(piece)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, port = await _serve(fast)
        pool = HTTPPool(Origin.parse(f"http://127.0.0.1:{port}"))
        response = await pool.request([request_head("GET", "/", [("Host", "x")])], timeout=0.3)
        await asyncio.sleep(0.8)  # not reading, for longer than the timeout
        held = sum(map(len, response._connection.parser.body))
        assert held <= READ_HIGH_WATER + (1 << 20), held
        assert written < len(piece) * pieces / 2, written  # the upstream was held back
        assert len(await response.read(limit=1 << 30)) == len(piece) * pieces
        response.close()
        pool.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


# -- SSE -----------------------------------------------------------------------------------


def test_sse_decoder() -> None:
    data = (
        b': comment\r\nevent: a\r\ndata: {"x":1}\r\n\r\ndata:two\ndata: lines\nid: 3\n\ndata: tail'
    )
    for step in (1, 5, len(data)):
        decoder = SSEDecoder()
        events = []
        for start in range(0, len(data), step):
            events += decoder.feed(data[start : start + step])
        events += decoder.finish()
        assert events == [(b"a", b'{"x":1}'), (b"", b"two\nlines"), (b"", b"tail")]


def test_sse_decoder_reads_lone_cr_line_ends_and_skips_a_leading_byte_order_mark() -> None:
    # The format's three line ends, mixed, and the stream's one optional BOM (WHATWG
    # HTML, "Interpreting an event stream"); at every split of the stream.
    data = b'\xef\xbb\xbfevent: a\rdata: {"x":1}\r\rdata:two\r\ndata: lines\n\r\ndata: tail\r'
    expected = [(b"a", b'{"x":1}'), (b"", b"two\nlines"), (b"", b"tail")]
    for step in range(1, len(data) + 1):
        decoder = SSEDecoder()
        events = []
        for start in range(0, len(data), step):
            events += decoder.feed(data[start : start + step])
        events += decoder.finish()
        assert events == expected, step
    # Only the stream's first bytes may be a BOM: later, it makes a line no field.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n\n\xef\xbb\xbfdata: y\n\n") == [(b"", b"x")]
    # A stream that is only part of a BOM holds no event.
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef\xbb") == [] and decoder.finish() == []


# -- token blocks ----------------------------------------------------------------------------


def _item(text: str, role: str = "user") -> bytes:
    return json.dumps({"content": text, "role": role, "type": "message"}).encode()


def test_new_chain_key_groups_by_the_first_token_blocks() -> None:
    system = "You are the build agent of a large repository. " * 20  # > 4 blocks of 16
    tools = [{"type": "function", "name": "f", "parameters": {}}]
    first = new_chain_key(system, tools, [_item("one")])
    assert first == new_chain_key(system, tools, [_item("two"), _item("three")])
    assert first != new_chain_key("Another prompt. " * 20, tools, [_item("one")])
    assert new_chain_key("Short.", [], [_item("one")], max_blocks=64) != new_chain_key(
        "Short.", [], [_item("two")], max_blocks=64
    )
    tiny = new_chain_key(None, [], [_item("a")], block_tokens=64)  # less than one block
    assert tiny != new_chain_key(None, [], [_item("b")], block_tokens=64)
    assert len(tiny) == 8


def test_context_items_and_incremental_prompt_hashes() -> None:
    items = [_item(f"message {i} " * 30) for i in range(6)]
    context = b"[" + b",".join(items) + b"]"
    assert list(context_items(context)) == items
    assert list(context_items(b"[]")) == []
    remembering = PromptHasher(16)
    for count in range(1, 7):
        tokens, hashes = remembering.hash("system", [], items[:count])
        fresh_tokens, fresh = PromptHasher(16).hash("system", [], items[:count])
        assert (tokens, hashes) == (fresh_tokens, fresh)
    _tokens, other = PromptHasher(16).hash("system", [], [*items[:3], _item("different")])
    _tokens, three = PromptHasher(16).hash("system", [], items[:3])
    assert shared_prefix_blocks(b"".join(hashes), b"".join(other)) == len(three) > 0


# -- router ------------------------------------------------------------------------------------


def make_router(count: int = 3, **config: object) -> tuple[Router, Metrics, list[float]]:
    metrics = Metrics()
    clock = [0.0]
    router = Router(
        [f"http://r{i}:8000/v1" for i in range(count)],
        RouterConfig(**config),
        metrics=metrics.upstream,
        clock=lambda: clock[0],
    )
    return router, metrics, clock


def test_router_follows_the_parent_and_places_new_chains_by_key() -> None:
    router, metrics, _clock = make_router()
    shared = b"K" * 16  # the new-chain key of a shared system prompt's first blocks
    first = router.route(None, lambda: shared)
    assert all(router.route(None, lambda: shared) is first for _ in range(20))
    router.remember("resp_1", first)
    assert router.route("resp_1", lambda: b"unused") is first
    assert router.route("resp_unknown", lambda: shared) is first  # placed by key again
    spread = {router.route(None, lambda i=i: f"prompt {i}".encode()).index for i in range(60)}
    assert spread == {0, 1, 2}
    assert metrics.upstream.affinity[("hit", "parent")] == 1
    assert metrics.upstream.affinity[("miss", "unknown_parent")] == 1
    assert metrics.upstream.affinity[("new", "prefix")] == 81


def test_router_leaves_failing_and_busy_replicas() -> None:
    router, metrics, clock = make_router(fail_threshold=2, cooldown=5.0, busy_min=4, busy_ratio=2.0)
    home = router.route(None, lambda: b"chain")
    router.remember("p", home)
    for _ in range(2):
        router.begin(home)
        router.end(home, "failed")
    moved = router.route("p", lambda: b"chain")
    assert moved is not home
    assert metrics.upstream.affinity[("miss", "failing")] == 1
    clock[0] = 6.0  # the cooldown is over
    assert router.route("p", lambda: b"chain") is home
    for _ in range(5):
        router.begin(home)
    busy = router.route("p", lambda: b"chain")
    assert busy is not home and busy.in_flight == 0
    assert metrics.upstream.affinity[("miss", "busy")] == 1
    # A retry leaves the replica that just failed.
    assert router.route("p", lambda: b"chain", exclude={home.index}) is not home
    assert metrics.upstream.affinity[("miss", "retry")] == 1


def test_one_replica_needs_no_routing_and_removing_a_replica_moves_only_its_chains() -> None:
    router, metrics, _clock = make_router(1)
    assert router.route("x", lambda: b"") is router.replicas[0]
    assert not metrics.upstream.affinity
    three, _, _ = make_router(3)
    two = Router([r.label for r in three.replicas[:2]])
    for i in range(50):
        key = f"k{i}".encode()
        before = three.route(None, lambda key=key: key)
        after = two.route(None, lambda key=key: key)
        if before.index < 2:
            assert after.index == before.index


# -- errors and configuration ------------------------------------------------------------------


def test_http_error_mapping() -> None:
    body = json.dumps(
        {
            "error": {
                "message": "This model's maximum context length is 4096 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    ).encode()
    error = from_http_status(400, body, {})
    assert (error.status, error.code, error.param, error.retryable) == (
        400,
        "context_length_exceeded",
        "messages",
        False,
    )
    assert error.response_error() == {
        "code": "invalid_prompt",
        "message": "This model's maximum context length is 4096 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
    }
    vllm = json.dumps({"object": "error", "message": "bad", "type": "BadRequestError", "code": 400})
    assert from_http_status(400, vllm.encode(), {}).message == "bad"
    assert from_http_status(422, b'{"detail": "nope"}', {}).message == "nope"
    limited = from_http_status(429, b"", {"retry-after": "3", "x-other": "1"})
    assert limited.headers == {"retry-after": "3", "retry-after-ms": "3000"}
    assert limited.response_error()["code"] == "rate_limit_exceeded"
    for status in (500, 502, 503, 408):
        server = from_http_status(status, b"oops", {})
        assert server.retryable and not server.misconfigured
    auth = from_http_status(401, b"", {})
    assert auth.status == 502 and not auth.retryable and "--upstream-api-key" in auth.message
    assert auth.misconfigured and from_http_status(403, b"", {}).misconfigured
    assert not error.misconfigured and not limited.misconfigured
    assert transport_error("connect", retryable=False).misconfigured
    assert not transport_error("connect").misconfigured
    assert not from_error_object({"code": "server_error"}, status=500).misconfigured
    # Metrics and logs name the upstream's status, not the client's.
    assert (auth.upstream_status, auth.outcome) == (401, "401")
    assert from_http_status(503, b"", {}).outcome == "503"
    assert from_http_status(408, b"", {}).outcome == "408"
    assert transport_error("connect").outcome == "connect"
    assert from_error_object({"code": "server_error"}).retryable
    nested = from_error_object({"code": "invalid_value", "message": "m"}, status=400)
    assert isinstance(nested, UpstreamError) and nested.status == 400 and not nested.retryable
    # Without a status (a response.failed, an error event that gives none), the code
    # tells: one about the request is not retried and reaches the client as the
    # Response object's invalid_prompt; only server errors are retried.
    for code in ("invalid_prompt", "invalid_value"):
        about_request = from_error_object({"code": code, "message": "flagged"})
        assert about_request.status == 400 and not about_request.retryable, code
        assert about_request.response_error()["code"] == "invalid_prompt"
    for error in ({}, {"code": None}, {"code": "odd", "type": "server_error"}):
        assert from_error_object(error).retryable, error
    assert from_error_object({"code": "rate_limit_exceeded"}).status == 429
    # An error event with a 4xx status and no code (OpenAI's for a prompt template it
    # does not have) is the request's fault: not retried, its message kept.
    missing = from_error_object({"message": "Prompt with id 'p' not found."}, status=404)
    assert (missing.status, missing.retryable) == (404, False)
    assert missing.response_error()["message"] == "Prompt with id 'p' not found."
    assert from_error_object({"message": "busy"}, status=503).retryable


ROUTE_404_BODIES = [
    b'{"detail":"Not Found"}',  # vLLM, SGLang (FastAPI)
    b"404 page not found",  # Ollama (Go)
    b"<html><body><h1>404 Not Found</h1></body></html>",  # nginx
    b"",
    b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}',  # llama.cpp
    b'{"error":{"message":"Invalid URL (POST /chat/completions)","type":"invalid_request_error",'
    b'"param":null,"code":null}}',  # OpenAI
    b'{"error":{"code":"not_found","message":"No route for POST /chat/completions.",'
    b'"type":"invalid_request_error"}}',  # warmsocket
]
MODEL_404_BODIES = [
    b'{"error":{"message":"The model `gpt-5` does not exist or you do not have access to it.",'
    b'"type":"invalid_request_error","param":null,"code":"model_not_found"}}',  # OpenAI
    b'{"error":{"message":"The model `x` does not exist.","type":"NotFoundError",'
    b'"param":"model","code":404}}',  # vLLM
    b'{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError",'
    b'"param":null,"code":404}',  # older vLLM
    b'{"error":{"message":"model \\"x\\" not found, try pulling it first","type":"api_error",'
    b'"param":null,"code":null}}',  # Ollama
    b'{"detail":"Model x not found"}',
]


@pytest.mark.parametrize("body", ROUTE_404_BODIES)
def test_a_404_for_a_missing_route_is_a_configuration_error(body: bytes) -> None:
    error = from_http_status(404, body, {}, request="POST /chat/completions")
    assert (error.status, error.type, error.retryable) == (502, "server_error", False)
    assert error.misconfigured  # (a create without `stream` answers HTTP 502)
    assert error.response_error()["code"] == "server_error"
    assert "no such endpoint" in error.message and "request" in error.message
    assert error.outcome == "404"
    assert error.detail is not None
    assert "POST /chat/completions" in error.detail and "/v1" in error.detail


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_a_configuration_error(status: int) -> None:
    """An http:// upstream URL that the server redirects to https:// (or a moved path)
    is warmsocket's misconfiguration: a 502 server_error telling the operator to fix
    --upstream, not the client's invalid request. The log names where it leads (its
    origin only: no path, query or credentials)."""
    location = "https://user:secret@llm.example:8443/v1/chat/completions?key=k"
    error = from_http_status(status, b"", {"location": location}, request="POST /v1/x")
    assert (error.status, error.type, error.retryable) == (502, "server_error", False)
    assert error.misconfigured
    assert error.response_error()["code"] == "server_error"
    assert f"redirected the request (HTTP {status})" in error.message
    assert "--upstream" in error.message and "not a problem with the request" in error.message
    assert error.outcome == str(status)
    assert error.detail is not None
    assert "to https://llm.example:8443:" in error.detail and "--upstream" in error.detail
    assert "secret" not in error.detail and "key=k" not in error.detail
    relative = from_http_status(status, b"", {"location": "/elsewhere"})
    assert relative.detail is not None and "elsewhere" not in relative.detail
    assert from_http_status(204, b"", {}).type == "server_error"


@pytest.mark.parametrize("body", MODEL_404_BODIES)
def test_a_404_for_a_model_passes_through(body: bytes) -> None:
    error = from_http_status(404, body, {}, request="POST /v1/chat/completions")
    assert error.status == 404 and not error.retryable and not error.misconfigured
    assert error.response_error()["code"] == "invalid_prompt"
    assert "odel" in error.message and error.outcome == "404"


def test_config_and_model_map() -> None:
    mapping = parse_model_map(["gpt-4o=Qwen/Qwen3-8B", "*=llama3"])
    config = UpstreamConfig(urls=("http://x/v1",), model_map=mapping)
    assert config.upstream_model("gpt-4o") == "Qwen/Qwen3-8B"
    assert config.upstream_model("other") == "llama3"
    assert UpstreamConfig(urls=("http://x",)).upstream_model("m") == "m"
    with pytest.raises(ValueError):
        parse_model_map(["no-equals"])
    with pytest.raises(ValueError):
        UpstreamConfig(urls=())


class _Turn:
    """What `ContextCache` reads of a turn."""

    def __init__(self, response_id: str, parent: str | None, view: Any) -> None:
        self.response_id = response_id
        self.previous_response_id = parent
        self.view = view


def _chain_view(cache: Any, parent: str | None, new_input: list[dict[str, Any]]) -> Any:
    items = cache.items(new_input)
    if parent is None:
        return cache.view(None, owner="o", extra=items)
    with cache.bind(parent, owner="o") as binding:
        return binding.view(items)


def test_context_cache_extends_a_chain_and_equals_the_whole_context() -> None:
    """Each turn's context bytes equal the view's JSON less its `]`, whether extended
    from the parent's entry, rebuilt for a fork, or copied because a transport still
    held the buffer; the entry moves to the newest turn; the bound holds."""
    from warmsocket._core import SessionCache
    from warmsocket.backends.responses_http import ContextCache

    cache = SessionCache()
    contexts = ContextCache()
    parent: str | None = None
    held: list[memoryview] = []
    for turn in range(12):
        new = [{"type": "message", "role": "user", "content": f"turn {turn} " + "x" * turn}]
        view = _chain_view(cache, parent, new)
        rid = f"resp_{turn}"
        got = contexts.context(_Turn(rid, parent, view))
        assert bytes(got) == view.json()[:-1], turn
        if turn == 5:
            held.append(memoryview(got))  # as a transport with a pending write would
        text = {"type": "output_text", "text": f"a{turn}"}
        output = [{"type": "message", "role": "assistant", "content": [text]}]
        cache.create(rid, owner="o", input=new, output=output, previous_response_id=parent)
        parent = rid
    assert list(contexts._entries) == ["resp_11"]  # the chain's entry moved along
    # A fork from an older response: built whole, and still right.
    view = _chain_view(cache, "resp_3", [{"role": "user", "content": "fork"}])
    fork = contexts.context(_Turn("resp_fork", "resp_3", view))
    assert bytes(fork) == view.json()[:-1]
    # The bound: the oldest entries go first.
    small = ContextCache(max_bytes=1)
    small.context(_Turn("a", None, _chain_view(cache, "resp_2", [])))
    small.context(_Turn("b", None, _chain_view(cache, "resp_4", [])))
    assert list(small._entries) == ["b"]


# -- the response parser against generated responses ----------------------------------------

HEADER_NAMES = ("X-Request-Id", "x-request-id", "Server", "Cache-Control", "X-Ratelimit")
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=12
)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """An HTTP/1.1 response as bytes, and what parsing it must give."""
    status = draw(st.sampled_from([200, 201, 204, 400, 404, 500]))
    http10 = draw(st.booleans())
    headers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_values), max_size=4))
    framing = "none" if status == 204 else draw(st.sampled_from(["length", "chunked", "close"]))
    body = b"" if framing == "none" else draw(st.binary(max_size=300))
    close = draw(st.booleans())
    extra = b"" if framing == "close" else draw(st.sampled_from([b"", b"HTTP/1.1 200"]))
    lines = [f"HTTP/1.{0 if http10 else 1} {status} Whatever".encode()]
    lines += [f"{name}: {value}".encode() for name, value in headers]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}".encode())
        payload = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        sizes = draw(st.lists(st.integers(1, 64), max_size=8))
        payload, at = b"", 0
        for size in sizes:
            piece = body[at : at + size]
            if not piece:
                break
            at += len(piece)
            payload += f"{len(piece):x}".encode() + draw(st.sampled_from([b"", b";ext=1"]))
            payload += b"\r\n" + piece + b"\r\n"
        body = body[:at]
        payload += b"0\r\n" + draw(st.sampled_from([b"", b"Trailer: x\r\n"])) + b"\r\n"
    else:
        payload = body
    if close:
        lines.append(b"Connection: close")
    elif http10:
        lines.append(b"Connection: keep-alive")
    interim = draw(st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\n\r\n"]))
    raw = interim + b"\r\n".join(lines) + b"\r\n\r\n" + payload + extra
    joined: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        joined[key] = f"{joined[key]}, {value}" if key in joined else value
    keep_alive = not close and framing != "close" and not extra
    return raw, {"status": status, "headers": joined, "body": body, "keep_alive": keep_alive}


@settings(max_examples=300, deadline=None)
@given(responses(), st.data())
def test_parser_reads_any_response_at_any_split(
    case: tuple[bytes, dict[str, Any]], data: st.DataObject
) -> None:
    raw, expected = case
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    parser = ResponseParser()
    body = b""
    for start, stop in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        parser.feed(raw[start:stop])
        body += parser.take_body()
    if not parser.done:
        parser.feed_eof()  # a close-delimited body ends with the connection
    body += parser.take_body()
    assert parser.done and parser.head is not None
    assert parser.head.status == expected["status"]
    for name, value in expected["headers"].items():
        assert parser.head.headers[name] == value
    assert body == expected["body"]
    assert parser.keep_alive == expected["keep_alive"]


def test_proxy_urls_and_which_origins_use_them(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = Proxy.parse("http://alice:s%3Acret@proxy.internal:3128")
    assert (proxy.host, proxy.port, str(proxy)) == (
        "proxy.internal",
        3128,
        "http://proxy.internal:3128",
    )
    assert proxy.authorization == "Basic YWxpY2U6czpjcmV0"  # alice:s:cret
    assert (
        Proxy.parse("proxy.internal").port == 80
        and Proxy.parse("proxy.internal").authorization is None
    )
    with pytest.raises(ValueError, match="NO_PROXY"):
        Proxy.parse("socks5://proxy.internal:1080")
    for name in ("NO_PROXY", "no_proxy", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    openai = Origin.parse("https://api.openai.com/v1")
    assert proxy_for(openai) is None  # no proxy set
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    found = proxy_for(openai)
    assert found is not None and found.host == "proxy.internal"
    assert proxy_for(Origin.parse("http://10.0.0.5:8000/v1")) is None  # plain http: direct
    monkeypatch.setenv("NO_PROXY", ".openai.com,localhost")
    assert proxy_for(openai) is None


def _head_turn(response_id: str, parent: str | None, instructions: str) -> Any:
    from types import SimpleNamespace

    settings_ = {"instructions": instructions}
    request = SimpleNamespace(
        model_from_prompt=False, include=(), upstream_options_json=None, given_defaults=()
    )
    return SimpleNamespace(
        request=request,
        settings=settings_,
        settings_json=json.dumps(settings_).encode(),
        previous_response_id=parent,
        response_id=response_id,
    )


def test_request_heads_share_a_chains_settings_and_stay_within_their_bytes() -> None:
    from warmsocket.backends.responses_http import HeadCache

    heads = HeadCache({"store": False}, max_bytes=100_000)
    prompt = "Be brief. " * 1000  # 10 KB, in every head of the chain
    first = heads.head(_head_turn("r0", None, prompt), "m")
    later = heads.head(_head_turn("r1", "r0", prompt), "m")
    assert later is first  # the parent's head, and its settings: held once
    assert heads._heads["r1"][0] is heads._heads["r0"][0]
    # Chains with other large instructions each: the oldest heads go past the bound.
    for n in range(50):
        heads.head(_head_turn(f"other{n}", None, f"{n} " + prompt), "m")
    assert heads._bytes <= 100_000
    assert "other49" in heads._heads and "r0" not in heads._heads
    heads.forget(list(heads._heads))
    assert heads._bytes == 0


def test_retry_after_is_read_in_every_form_and_nonsense_is_ignored() -> None:
    assert retry_after_seconds({"retry-after": "7"}) == 7.0
    assert retry_after_seconds({"retry-after": " 1.5 "}) == 1.5
    # retry-after-ms (OpenAI's) is more precise and wins.
    assert retry_after_seconds({"retry-after": "7", "retry-after-ms": "250"}) == 0.25
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27 <= (retry_after_seconds({"retry-after": soon}) or 0) <= 30
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after_seconds({"retry-after": past}) == 0.0
    assert retry_after_seconds({"retry-after": "99999999999"}) == 24 * 3600.0
    for nonsense in ("", "soon", "-1", "nan", "inf", "1e999", "Mon, 99 Foo 2026 10:00:00 GMT"):
        assert retry_after_seconds({"retry-after": nonsense}) is None, nonsense
    assert retry_after_seconds({}) is None


def test_an_upstream_5xx_keeps_its_wait_and_a_503_stays_a_503() -> None:
    overloaded = from_http_status(503, b"{}", {"retry-after": "4"})
    assert (overloaded.status, overloaded.code, overloaded.type) == (
        503,
        "server_is_overloaded",
        "server_error",
    )
    assert overloaded.retryable and overloaded.retry_after == 4.0
    assert overloaded.headers == {"retry-after": "4", "retry-after-ms": "4000"}
    assert overloaded.response_error()["code"] == "server_error"  # the Response's enum
    # A fraction of a second rounds up in whole seconds; the upstream's text never
    # reaches the client as it came.
    failed = from_http_status(500, b"", {"retry-after-ms": "1200", "retry-after": "x\x7f"})
    assert (failed.status, failed.headers) == (
        500,
        {"retry-after": "2", "retry-after-ms": "1200"},
    )
    assert from_http_status(502, b"", {"retry-after": "soon"}).headers is None


def test_retry_delay_waits_only_for_the_replica_that_failed() -> None:
    def status(code: int, **headers: str) -> UpstreamError:
        return from_http_status(code, b"", headers)

    # Another replica is tried at once, whatever the failed one asked.
    assert retry_delay(status(503, **{"retry-after": "60"}), 0, same_replica=False) == 0.0
    # The same one: its short Retry-After is waited out, a long one goes to the client.
    assert retry_delay(status(503, **{"retry-after": "1"}), 0, same_replica=True) == 1.0
    assert retry_delay(status(503, **{"retry-after": "2"}), 0, same_replica=True) == 2.0
    assert retry_delay(status(503, **{"retry-after": "3"}), 0, same_replica=True) is None
    # Without one, an HTTP 5xx backs off, doubling; a broken connection does not wait.
    assert [retry_delay(status(500), n, same_replica=True) for n in range(6)] == [
        0.25,
        0.5,
        1.0,
        2.0,
        2.0,  # (--upstream-retries 10 waited 128 s before its last try)
        2.0,
    ]
    assert retry_delay(transport_error("closed"), 0, same_replica=True) == 0.0
    assert retry_delay(transport_error("timeout"), 1, same_replica=True) == 0.0
