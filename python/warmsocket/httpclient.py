"""A small asyncio HTTP/1.1 client with keep-alive pooling, for upstream requests.

Why our own: an upstream turn is one POST whose streamed answer is read chunk by
chunk, and the whole per-turn overhead budget is well under a millisecond. This
client does just that: `ResponseParser` is a Sans-I/O parser of one response
(status and headers, parsed in Rust; `Content-Length`, chunked (decoded in Rust) or
read-until-close bodies);
`HTTPConnection` is an `asyncio.Protocol` that feeds it; `HTTPPool` keeps idle
keep-alive connections per origin (LIFO, bounded, with an idle timeout) and opens
new ones when none is free.

Timeouts: `connect_timeout` bounds the TCP (and TLS) connect; `timeout` bounds every
wait for the response head and for each piece of the body. A request whose
connection was reused and then closed by the server before any response byte
arrived is sent once more on a fresh connection (the usual keep-alive race).

Proxies: an `https` origin is reached through the HTTP proxy the environment names
(`HTTPS_PROXY`, honouring `NO_PROXY`, as curl, httpx and `websockets` do), with a
`CONNECT` tunnel and TLS to the origin inside it (`proxy_for`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import ssl
import urllib.request
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import unquote, urlsplit

from warmsocket._core import ChunkedBody, parse_response_head
from warmsocket.http11 import coalesced

MAX_HEAD_BYTES = 64 * 1024
READ_HIGH_WATER = 1024 * 1024
"""Bytes read from the upstream and not taken by the turn yet past which a connection
stops reading (its client reads more slowly than the upstream writes): backpressure
then reaches the upstream instead of the answer piling up in this process."""


class HTTPClientError(Exception):
    """A transport or protocol failure talking to an upstream (not an HTTP error status)."""


class ConnectFailed(HTTPClientError):
    """The TCP/TLS connection could not be established. `permanent`: a configuration
    error that trying again cannot fix (a TLS handshake answered in plain HTTP)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class ConnectionClosed(HTTPClientError):
    """The server closed the connection before the response was complete."""


class ProtocolViolation(HTTPClientError):
    """The server sent something that is not a valid HTTP/1.1 response."""


class RequestTimeout(HTTPClientError, TimeoutError):
    """No response byte arrived within the timeout."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    base_path: str
    """The URL's path without a trailing slash, e.g. '/v1'."""

    @classmethod
    def parse(cls, url: str) -> Origin:
        split = urlsplit(url)
        scheme = split.scheme.lower()
        if scheme in {"ws", "wss"}:
            scheme = "http" if scheme == "ws" else "https"
        if scheme not in {"http", "https"} or not split.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = split.port or (443 if scheme == "https" else 80)
        return cls(scheme, split.hostname, port, split.path.rstrip("/"))

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.base_path}"


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy that tunnels (`CONNECT`) to TLS origins."""

    host: str
    port: int
    authorization: str | None
    """The `Proxy-Authorization` value from the URL's user and password, if any."""

    @classmethod
    def parse(cls, url: str) -> Proxy:
        split = urlsplit(url if "://" in url else f"http://{url}")
        if split.scheme.lower() != "http" or not split.hostname:
            raise ValueError(
                f"only http:// proxies are supported, not {split.scheme}:// (HTTPS_PROXY); "
                "add the upstream's host to NO_PROXY to connect directly"
            )
        authorization = None
        if split.username is not None:
            user = f"{unquote(split.username)}:{unquote(split.password or '')}"
            authorization = "Basic " + base64.b64encode(user.encode()).decode()
        return cls(split.hostname, split.port or 80, authorization)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def proxy_for(origin: Origin) -> Proxy | None:
    """The proxy an `https` origin is reached through: the environment's `HTTPS_PROXY`
    unless `NO_PROXY` covers the origin; None to connect directly. ValueError for a
    proxy URL that is not `http://`."""
    if not origin.tls:
        return None
    url = urllib.request.getproxies().get("https")
    if not url or urllib.request.proxy_bypass(f"{origin.host}:{origin.port}"):
        return None
    return Proxy.parse(url)


class _Tunnel(asyncio.Protocol):
    """Reads the proxy's answer to `CONNECT` (a head, nothing after it)."""

    def __init__(self) -> None:
        self.head: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self.head.done():
            return
        try:
            parsed = parse_response_head(self._buffer)
        except ValueError as exc:
            self.head.set_exception(ConnectFailed(f"invalid answer from the proxy ({exc})"))
            return
        if parsed is not None:
            self.head.set_result(parsed[1])
        elif len(self._buffer) > MAX_HEAD_BYTES:
            self.head.set_exception(ConnectFailed("invalid answer from the proxy (too large)"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectFailed("the proxy closed the connection"))


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: dict[str, str]
    """Lowercased names; repeated headers joined with ', '."""


class ResponseParser:
    """Sans-I/O parser of one HTTP/1.1 response. Feed bytes; take the head and body pieces."""

    __slots__ = (
        "_buffer",
        "_chunks",
        "_length_left",
        "_mode",
        "body",
        "done",
        "head",
        "keep_alive",
    )

    def __init__(self, *, head_request: bool = False) -> None:
        self._buffer = bytearray()
        self.head: ResponseHead | None = None
        self.body: list[bytes] = []
        """Decoded body pieces not yet taken."""
        self.done = False
        self.keep_alive = True
        self._mode = "head"
        self._length_left = 0
        self._chunks: ChunkedBody | None = None
        if head_request:
            self._mode = "head-only"

    def feed(self, data: bytes) -> None:
        """Add bytes. Raises ProtocolViolation."""
        if self.done:
            if data:
                self.keep_alive = False  # bytes after a complete response: do not reuse
            return
        mode = self._mode
        if mode == "length" and not self._buffer:
            # Fast path: body bytes of a Content-Length response.
            take = data[: self._length_left]
            self._length_left -= len(take)
            if take:
                self.body.append(take)
            if self._length_left == 0:
                self.done = True
                if len(data) > len(take):
                    self.keep_alive = False
            return
        if mode == "close":
            if data:
                self.body.append(data)
            return
        if mode == "chunked":
            self._feed_chunks(data)
            return
        if not self._buffer:
            # The usual case: the head starts this read, parsed in place.
            self._advance_from(data)
            return
        self._buffer += data
        self._advance()

    def feed_eof(self) -> None:
        """The peer closed its side. Raises ConnectionClosed if the response is incomplete."""
        self.keep_alive = False
        if self.done:
            return
        if self._mode == "close":
            self.done = True
            return
        raise ConnectionClosed("the upstream closed the connection mid-response")

    def take_body(self) -> bytes:
        pieces = self.body
        if not pieces:
            return b""
        self.body = []
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _advance(self) -> None:
        while not self.done:
            mode = self._mode
            if mode in {"head", "head-only"}:
                if not self._parse_head():
                    return
            elif mode == "length":
                buffer = self._buffer
                take = min(len(buffer), self._length_left)
                if take:
                    self.body.append(bytes(buffer[:take]))
                    del buffer[:take]
                    self._length_left -= take
                if self._length_left == 0:
                    self.done = True
                    if buffer:
                        self.keep_alive = False
                return
            elif mode == "chunked":
                rest = bytes(self._buffer)
                self._buffer.clear()
                self._feed_chunks(rest)
                return
            else:  # close
                if self._buffer:
                    self.body.append(bytes(self._buffer))
                    self._buffer.clear()
                return
        if self._buffer:
            self.keep_alive = False  # bytes after a response without a body: do not reuse

    def _advance_from(self, data: bytes) -> None:
        """`feed` for a read that starts with the head: no copy into the buffer."""
        length = self._head_from(data)
        if length is None:
            self._buffer += data
            return
        if self._mode == "chunked":
            self._feed_chunks(data[length:])
        else:
            self._buffer += data[length:]
            self._advance()

    def _parse_head(self) -> bool:
        buffer = self._buffer
        if b"\r\n\r\n" not in buffer:  # not complete yet: no copy for the parser
            if len(buffer) > MAX_HEAD_BYTES:
                raise ProtocolViolation("response head too large")
            return False
        length = self._head_from(bytes(buffer))
        if length is None:
            return False
        del buffer[:length]
        return True

    def _head_from(self, data: bytes) -> int | None:
        """Parse a head at the start of `data`; its length, or None if incomplete.
        An interim (1xx) head is taken and the mode stays `head`."""
        try:
            parsed = parse_response_head(data)
        except ValueError as exc:
            raise ProtocolViolation(str(exc)) from None
        if parsed is None:
            return None
        length, status, http10, headers = parsed
        if 100 <= status < 200:
            return length  # interim response (100 Continue): parse the next head
        self.head = ResponseHead(status, headers)
        connection = headers.get("connection", "").lower()
        if "close" in connection or (http10 and "keep-alive" not in connection):
            self.keep_alive = False
        if self._mode == "head-only" or status in {204, 304}:
            self.done = True
            return length
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode = "chunked"
        elif "content-length" in headers:
            length_text = headers["content-length"]
            if not (length_text.isascii() and length_text.isdigit()):
                raise ProtocolViolation("invalid Content-Length")
            self._length_left = int(length_text)
            self._mode = "length"
            if self._length_left == 0:
                self.done = True
        else:
            self._mode = "close"
            self.keep_alive = False
        return length

    def _feed_chunks(self, data: bytes) -> None:
        """A read of a chunked body, decoded in Rust (one call, however many chunks)."""
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = ChunkedBody()
        try:
            body = chunks.feed(data)
        except ValueError as exc:
            raise ProtocolViolation(str(exc)) from None
        if body:
            self.body.append(body)
        if chunks.done:
            self.done = True
            if chunks.trailing:
                self.keep_alive = False


class HTTPConnection(asyncio.Protocol):
    """One keep-alive connection to an origin; one request at a time."""

    def __init__(self, pool: HTTPPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.closed = False
        self.requests = 0
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._received_any = False
        self._timeout = 0.0
        self._last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._unread = 0
        """Bytes received since the body was last taken."""
        self._reading_paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._received_any = True
        self._last_activity = self.loop.time()
        try:
            self.parser.feed(data)
        except ProtocolViolation as exc:
            self._fail(exc)
            return
        self._unread += len(data)
        if self._unread > READ_HIGH_WATER and not self._reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        try:
            self.parser.feed_eof()
        except ConnectionClosed as exc:
            self._fail(exc)
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if not self.parser.done and self._error is None:
            self._error = ConnectionClosed("the upstream closed the connection")
        self._wake()

    # -- requests --------------------------------------------------------------------------

    async def send(
        self,
        data: list[bytes | bytearray],
        timeout: float,
        on_sent: Callable[[], None] | None = None,
    ) -> ResponseHead:
        """Write one request, call `on_sent`, and wait for the response head."""
        assert self.transport is not None
        self.parser = ResponseParser()
        self._unread = 0
        if self._reading_paused:
            self._resume_reading()
        self._received_any = False
        self._error = None
        self.requests += 1
        self._timeout = timeout
        self._last_activity = self.loop.time()
        self.transport.writelines(coalesced(data))
        self._arm_timer()
        if on_sent is not None:
            on_sent()
        while self.parser.head is None:
            await self._wait()
        return self.parser.head

    async def read(self) -> bytes | None:
        """The next decoded body bytes, or None at the end of the body."""
        parser = self.parser
        while True:
            if parser.body:
                self._unread = 0
                if self._reading_paused:
                    self._resume_reading()
                return parser.take_body()
            if parser.done:
                self._cancel_timer()
                return None
            await self._wait()

    @property
    def received_any(self) -> bool:
        return self._received_any

    @property
    def reusable(self) -> bool:
        return not self.closed and self.parser.done and self.parser.keep_alive

    def abort(self) -> None:
        """Drop the connection now (the upstream sees the request cancelled)."""
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    # -- internals ------------------------------------------------------------------------

    async def _wait(self) -> None:
        if self._error is not None:
            self._raise_error(self._error)
        if self.closed:
            raise ConnectionClosed("the upstream connection is closed")
        waiter = self.loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            self._raise_error(self._error)

    @staticmethod
    def _raise_error(error: BaseException) -> NoReturn:
        """Raise a copy of the connection's failure. The traceback a raised exception
        collects holds this connection (and the turn) in its frames: raising the stored
        one would make a cycle, connection -> error -> traceback -> frames -> connection,
        that keeps the turn's whole context alive until the cyclic collector runs."""
        raise copy.copy(error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.abort()
        self._wake()

    def _arm_timer(self) -> None:
        if self._timer is None and self._timeout > 0:
            self._timer = self.loop.call_at(self._last_activity + self._timeout, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _resume_reading(self) -> None:
        self._reading_paused = False
        self._last_activity = self.loop.time()  # the wait was this side's, not the upstream's
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _on_timer(self) -> None:
        # Re-armed lazily: activity only moves a timestamp, the timer checks it when it fires.
        self._timer = None
        if self.parser.done or self.closed:
            return
        if self._reading_paused:  # waiting for the turn to take the body: not a timeout
            self._timer = self.loop.call_at(self.loop.time() + self._timeout, self._on_timer)
            return
        deadline = self._last_activity + self._timeout
        if self.loop.time() >= deadline:
            self._fail(RequestTimeout(f"no response from the upstream within {self._timeout:g} s"))
        else:
            self._timer = self.loop.call_at(deadline, self._on_timer)


class HTTPResponse:
    """A response being read. `close()` returns the connection to the pool when possible;
    `close()` or `abort()` hands it back (`HTTPPool.in_use`), once whichever comes first."""

    __slots__ = ("_connection", "_pool", "_released", "head")

    def __init__(self, pool: HTTPPool, connection: HTTPConnection, head: ResponseHead) -> None:
        self._pool = pool
        self._connection = connection
        self.head = head
        self._released = False

    @property
    def status(self) -> int:
        return self.head.status

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        connection = self._connection
        while True:
            data = await connection.read()
            if data is None:
                return
            yield data

    async def read(self, limit: int = 1 << 20) -> bytes:
        """The whole body (at most `limit` bytes are kept)."""
        pieces: list[bytes] = []
        size = 0
        async for data in self.chunks():
            if size < limit:
                pieces.append(data[: limit - size])
                size += len(pieces[-1])
        return b"".join(pieces)

    async def drain(self, grace: float) -> None:
        """Read the rest of the body and drop it, for at most `grace` seconds: what an
        upstream sends after its stream's end marker (`[DONE]`, a terminal event) is
        the body's end, which keeps the connection reusable; one that keeps the body
        open past that (a misbehaving proxy) must not hold a finished turn. A body
        that did not end (or broke) leaves the connection for `close()` to drop."""
        connection = self._connection
        if connection.parser.done and not connection.parser.body:
            return  # the usual case: the body ended with the stream
        with contextlib.suppress(TimeoutError, HTTPClientError):
            # wait_for, not asyncio.timeout: as for connecting (see `_connect`).
            await asyncio.wait_for(self._skip_body(), grace)

    async def _skip_body(self) -> None:
        connection = self._connection
        while await connection.read() is not None:
            pass

    def close(self) -> None:
        """Release the connection: back to the pool if the body was read to its end."""
        if self._take():
            connection = self._connection
            if connection.reusable:
                self._pool.release(connection)
            else:
                self._pool.discard(connection)

    def abort(self) -> None:
        """Drop the connection now (the upstream sees the request cancelled); after
        `close()` it is no longer this response's: nothing to do."""
        if self._take():
            self._pool.discard(self._connection)

    def _take(self) -> bool:
        """Whether the connection is still this response's to hand back (the pool
        counts it in use until then, once)."""
        released = self._released
        self._released = True
        return not released


class HTTPPool:
    """Keep-alive connections to one origin."""

    def __init__(
        self,
        origin: Origin,
        *,
        connect_timeout: float = 10.0,
        max_idle: int = 64,
        idle_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        on_open: Callable[[], None] | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        """`proxy`: tunnel through it (see `proxy_for`, which `HTTPUpstreamBackend`
        asks); None connects directly."""
        self.origin = origin
        self.proxy = proxy
        self.on_open = on_open
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._ssl = (
            ssl_context
            if ssl_context is not None
            else (ssl.create_default_context() if origin.tls else None)
        )
        self._idle: list[HTTPConnection] = []
        self.opened = 0
        """Connections opened so far."""
        self.in_use = 0

    async def request(
        self,
        data: list[bytes | bytearray],
        *,
        timeout: float,
        on_sent: Callable[[], None] | None = None,
    ) -> HTTPResponse:
        """Send a request (head and body pieces) and wait for the response head.

        `on_sent` is called each time the request is written, before waiting for the
        answer: idempotent work to overlap with the server's."""
        for _attempt in range(2):
            connection, reused = await self._acquire()
            self.in_use += 1
            try:
                head = await connection.send(data, timeout, on_sent)
            except ConnectionClosed:
                self.in_use -= 1
                connection.abort()
                if reused and not connection.received_any:
                    continue  # the server closed an idle connection as we sent: once more
                raise
            except BaseException:
                self.in_use -= 1
                connection.abort()
                raise
            return HTTPResponse(self, connection, head)
        raise ConnectionClosed("the upstream closed the connection")  # pragma: no cover

    def release(self, connection: HTTPConnection) -> None:
        self.in_use -= 1
        if len(self._idle) >= self.max_idle or connection.closed:
            connection.abort()
            return
        connection.idle_since = connection.loop.time()
        self._idle.append(connection)

    def discard(self, connection: HTTPConnection) -> None:
        self.in_use -= 1
        connection.abort()

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        for connection in self._idle:
            connection.abort()
        self._idle.clear()

    async def _acquire(self) -> tuple[HTTPConnection, bool]:
        idle = self._idle
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                connection = idle.pop()
                # `reusable`, not only open: bytes that came while it was idle (an
                # answer nobody asked for) make it unfit; its next answer would be
                # the wrong one.
                if connection.reusable and now - connection.idle_since < self.idle_timeout:
                    return connection, True
                connection.abort()
        return await self._connect(), False

    async def _connect(self) -> HTTPConnection:
        origin = self.origin
        stage = ["tcp"]  # how far connecting got, for the timeout's message
        try:
            # wait_for, not asyncio.timeout: this may run outside a task (a backend's
            # eager first step, see `Backend.stream`).
            if self.proxy is not None:
                connection = await asyncio.wait_for(self._tunnel(self.proxy), self.connect_timeout)
            else:
                connection = await asyncio.wait_for(self._direct(stage), self.connect_timeout)
        except TimeoutError:
            if stage[0] == "tls":
                raise ConnectFailed(
                    f"the TLS handshake with {origin.host_header} timed out after "
                    f"{self.connect_timeout:g} s (the TCP connection was made; is the "
                    "upstream plain http://?)"
                ) from None
            raise ConnectFailed(
                f"connecting to {origin.host_header} timed out after {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            message = f"cannot connect to {origin.host_header} ({connect_failure(exc)})"
            if plain_answer_to_tls(exc):
                raise ConnectFailed(message + PLAIN_HTTP_HINT, permanent=True) from None
            raise ConnectFailed(message) from None
        self.opened += 1
        if self.on_open is not None:
            self.on_open()
        return connection

    async def _direct(self, stage: list[str]) -> HTTPConnection:
        """A connection straight to the origin: TCP, then TLS for `https` (two steps,
        so that a timeout can say which one hung)."""
        loop = asyncio.get_running_loop()
        origin = self.origin
        if self._ssl is None:
            _transport, connection = await loop.create_connection(
                lambda: HTTPConnection(self), origin.host, origin.port
            )
            return connection
        transport, _ = await loop.create_connection(asyncio.Protocol, origin.host, origin.port)
        stage[0] = "tls"
        return await self._start_tls(transport)

    async def _start_tls(self, transport: asyncio.WriteTransport) -> HTTPConnection:
        """TLS to the origin over `transport` (closed when the handshake fails)."""
        assert self._ssl is not None  # only https origins start TLS
        connection = HTTPConnection(self)
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, connection, self._ssl, server_hostname=self.origin.host
            )
        except BaseException:
            transport.close()
            raise
        assert tls is not None
        connection.connection_made(tls)
        return connection

    async def _tunnel(self, proxy: Proxy) -> HTTPConnection:
        """A connection to the origin through `proxy`: `CONNECT`, then TLS inside."""
        loop = asyncio.get_running_loop()
        origin = self.origin
        transport, tunnel = await loop.create_connection(_Tunnel, proxy.host, proxy.port)
        try:
            host = f"[{origin.host}]" if ":" in origin.host else origin.host
            lines = [f"CONNECT {host}:{origin.port} HTTP/1.1", f"Host: {host}:{origin.port}"]
            if proxy.authorization is not None:
                lines.append(f"Proxy-Authorization: {proxy.authorization}")
            transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            status = await tunnel.head
            if status != 200:
                raise ConnectFailed(f"the proxy {proxy} answered CONNECT with {status}")
        except BaseException:
            transport.close()
            raise
        return await self._start_tls(transport)  # proxies are used for https origins only


PLAIN_ANSWER_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"}
)
"""OpenSSL's reasons for a TLS handshake answered with bytes that are not TLS (by
version: 3.0 says WRONG_VERSION_NUMBER to an HTTP answer, 3.2 RECORD_LAYER_FAILURE)."""
PLAIN_HTTP_HINT = ": the server does not speak TLS; is the upstream plain http://?"


def plain_answer_to_tls(exc: BaseException) -> bool:
    """Whether a failed connect is a TLS handshake that got a non-TLS answer: an
    `https://` URL for a plain-HTTP server, a configuration error (not retried)."""
    return isinstance(exc, ssl.SSLError) and exc.reason in PLAIN_ANSWER_REASONS


def connect_failure(exc: BaseException) -> str:
    """Why connecting failed, for the operator's log: the error's type, and for TLS
    which check failed (e.g. 'certificate verify failed: self-signed certificate')."""
    reason = type(exc).__name__
    if isinstance(exc, ssl.SSLError):
        reason += f": {getattr(exc, 'verify_message', None) or exc.reason}"
    return reason


def request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """An HTTP/1.1 request head. Raises ValueError when a part holds a line break: a
    value passed on from a client (a forwarded key) must never add a header, or a
    request, to a connection other clients' requests use next."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    if any("\r" in line or "\n" in line for line in lines):
        raise ValueError("a line break inside an HTTP request head's line")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
