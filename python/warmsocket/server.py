"""The asyncio layer: sockets, tasks, timers and backpressure; no protocol decisions.

One TCP connection speaks HTTP/1.1 (`warmsocket.http11`, `warmsocket.httpapi`) until
a WebSocket upgrade on `/v1/responses`; then the `websockets` Sans-I/O
`ServerProtocol` handles the handshake, incoming frames, ping/pong and the closing
handshake, and `warmsocket.session.ResponsesSession` holds the protocol state. This
module only moves bytes and events between them, the socket and the model backend.

Without an extension, the client's whole messages (final, unfragmented text or binary
frames) are split off the byte stream and unmasked in Rust (`_core.ClientFrames`); its
other frames go, whole, to the protocol object, which so always sits at a frame
boundary and keeps handling control frames, fragments and protocol errors.

Outgoing events are framed in Rust (`_core.ResponseEncoder`): text frames, or binary
msgpack frames when the client chose the `warmsocket.msgpack` subprotocol. Without a
negotiated extension those frames go to the transport as they are, after whatever the
protocol object has queued (control frames keep their order, and nothing is written
once it has sent a close frame). With permessage-deflate, each event's payload goes
through the protocol object's `send_text` / `send_binary` instead.

Writes produced in one event-loop iteration are coalesced into one `writelines`
call; nothing waits longer than the current iteration. When the socket's write
buffer is full, model tasks wait and reading pauses, so a client that does not read
cannot make the server buffer without bound; and when it reads nothing of what
waits for it for `--http-idle-timeout`, the connection is dropped (`_check_writes`),
so such a client cannot hold a connection, its turns and their buffers forever either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from websockets.exceptions import InvalidHeader, NegotiationError
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request as WSRequest
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from warmsocket import errors, ids
from warmsocket._core import ClientFrames, CreateRequest, SessionCache, rust_heap
from warmsocket.admission import (
    REFUSED_BODY_BYTES,
    REFUSED_WAIT,
    Admission,
    KeyLimit,
    KeySlot,
    Verdict,
)
from warmsocket.backends.base import Backend, ImmediateBackend, StreamItem
from warmsocket.conversations import DEFAULT_CONVERSATION_BUDGET, Conversations
from warmsocket.engine import (
    Engine,
    Framing,
    Limits,
    SharedResponses,
    SharedStoreUnavailable,
    Turn,
    new_cache,
    tokenizer_for,
)
from warmsocket.errors import APIError
from warmsocket.hosts import HostPolicy, listens_on_loopback_only
from warmsocket.http11 import (
    CONTINUE,
    MAX_HEAD_BYTES,
    HTTPError,
    Request,
    RequestParser,
    coalesced,
    encode_response,
)
from warmsocket.httpapi import PROBES, Auth, HTTPApp, access_line, needs_key, route_of
from warmsocket.metrics import (
    Metrics,
    background_collector,
    cache_collector,
    connection_limit_collector,
    conversation_collector,
    rust_heap_collector,
    shared_store_collector,
)
from warmsocket.origins import OriginPolicy, cors_headers
from warmsocket.request_rate import RateLimits, RequestRate, TokenRate
from warmsocket.response_stream import dumps
from warmsocket.session import (
    CloseConnection,
    Message,
    ResponsesSession,
    StartModel,
    StopModel,
)
from warmsocket.tls import client_identity
from warmsocket.tls_listener import TLS_HANDSHAKE_RECORD, TLSEvents, TLSListener

log = logging.getLogger("warmsocket.server")

FLUSH_BYTES = 64 * 1024
"""Output a model task lets wait for the next scheduled flush; past this it writes
at once (then waits while the connection's write buffer is full)."""

HTTP_READ_AHEAD = MAX_HEAD_BYTES + 64 * 1024
"""Bytes of later (pipelined) requests an HTTP connection buffers while it answers one.
Past this it stops reading until that answer is done: the rest waits in the client's and
the kernel's socket buffers, so a pipelining client is slowed, never refused. Reading
goes on below it, so a client that goes away mid-answer is noticed at once."""

_DRAIN_POLL_SECONDS = 0.05
"""How often a draining server looks whether anything is left (`Server.drain`)."""

SHUTDOWN_WRITE_SECONDS = 10.0
"""At most this long `Server.close` writes what is still queued for Redis; `serve`
gives it what the drain left of `--shutdown-timeout`, within `MIN_SHUTDOWN_WRITE_SECONDS`
and this."""
MIN_SHUTDOWN_WRITE_SECONDS = 2.0

HTTP_END_SECONDS = 1.0
"""At most this long `Server.close` waits for the HTTP answers it ended to be written
(`Connection.end_http_request`) before it closes their connections."""

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What an HTTP/2 client with prior knowledge sends first (RFC 9113, 3.4)."""


def _http2_frame(kind: int, payload: bytes) -> bytes:
    """An HTTP/2 frame on stream 0 without flags (RFC 9113, 4.1)."""
    return len(payload).to_bytes(3, "big") + bytes((kind, 0)) + bytes(4) + payload


HTTP2_REFUSAL = _http2_frame(0x4, b"") + _http2_frame(  # an empty SETTINGS, then
    0x7,  # GOAWAY: last stream 0, HTTP_1_1_REQUIRED (0xd), what to do
    bytes(4) + (0xD).to_bytes(4, "big") + b"warmsocket speaks HTTP/1.1 only",
)
"""The whole answer to an HTTP/2 client on this HTTP/1.1 server."""
_NOT_HTTP11_FIRST_BYTES = frozenset({TLS_HANDSHAKE_RECORD, HTTP2_PREFACE[0]})
"""First bytes of a connection that may be no HTTP/1.1 client's (a TLS record, the
HTTP/2 preface); "P" also starts POST, told apart by what follows."""
HANDSHAKE_TIMEOUT = 60.0
"""Seconds a TLS handshake may take without `--http-head-timeout`."""
LINGER_SECONDS = 2.0
"""How long a connection that refused a request still reads (and drops) what its client
sends after the answer (`Connection._close_lingering`)."""
CLOSE_TIMEOUT = 10.0
"""Seconds a WebSocket client has to answer the server's close frame before the
connection is dropped (as `websockets`' own servers' `close_timeout`): until then it
holds its place under --max-connections and its key's --max-connections-per-key."""

WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: closing the socket resets the connection, unsent bytes dropped."""
MSGPACK_SUBPROTOCOL = Subprotocol("warmsocket.msgpack")
"""Events and client messages as msgpack in binary frames (same objects as the JSON)."""


if sys.platform == "linux":
    import fcntl
    import termios

    def _unacknowledged(sock: Any) -> int:
        """Bytes sent on a TCP socket that the peer has not acknowledged yet, with what
        the kernel has not sent yet (ioctl SIOCOUTQ); 0 when it cannot be asked."""
        try:
            count = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        return int.from_bytes(count, sys.byteorder, signed=True)

else:

    def _unacknowledged(sock: Any) -> int:
        """Not asked outside Linux: progress is then what left the transport's buffer."""
        return 0


def select_subprotocol(
    protocol: ServerProtocol, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """`warmsocket.msgpack` when offered; otherwise none (JSON text frames, spec §1.3)."""
    return MSGPACK_SUBPROTOCOL if MSGPACK_SUBPROTOCOL in offered else None


def _shared_conversation(message: Message, engine: Engine) -> str | None:
    """The conversation a create continues when conversations are shared (Redis): its
    copy is to be checked first, off the session (`Conversations.fresh`)."""
    if engine.conversations.board is None or type(message) is not CreateRequest:
        return None
    assert isinstance(message, CreateRequest)
    return message.conversation


def frame_payloads(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in `data` (as Rust framed them)."""
    pos, end = 0, len(data)
    while pos < end:
        opcode = data[pos] & 0x0F
        length = data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            length = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif length == 127:
            length = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
        yield opcode, data[pos : pos + length]
        pos += length


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: frozenset[str] = frozenset()
    limits: Limits = field(default_factory=Limits)
    memory_budget: int = 1 << 30
    max_item_bytes: int = 32 * 1024 * 1024
    models: tuple[str, ...] = ("warmsocket-mock",)
    """`--model`: the names GET /v1/models lists; the first one picks the default
    tokenizer."""
    listed_models: tuple[str, ...] | None = None
    """What GET /v1/models lists when not `models` (with an upstream:
    `upstream_cli.client_models`)."""
    ws_ping_interval: float | None = 20.0
    ws_ping_timeout: float | None = 20.0
    http_idle_timeout: float | None = 75.0
    """`--http-idle-timeout`: seconds an HTTP connection with no request being answered
    waits for the client's next bytes: between requests (then it closes), and within
    a request body (then 408). None: no limit."""
    http_head_timeout: float | None = 30.0
    """`--http-head-timeout`: seconds from a request head's first byte to its end (then
    408). None: no limit."""
    http_body_timeout: float | None = 300.0
    """`--http-body-timeout`: seconds from the end of a request head to the end of its
    body (then 408). None: no limit."""
    tls: ssl.SSLContext | None = None
    """`--tls-cert`, `--tls-key` (`warmsocket.tls`): https:// and wss://; None: plain."""
    owner_by_client_certificate: bool = False
    """`--owner-by-client-certificate`: a verified client certificate's names are part of
    each request's owner (`tls.client_identity`, `httpapi.Auth.owner`)."""
    allowed_origins: tuple[str, ...] = ()
    """`--allowed-origin`: the web origins whose requests are served
    (`warmsocket.origins`); a request with another `Origin` gets 403."""
    allowed_hosts: tuple[str, ...] = ()
    """`--allowed-host`: the host names requests may be addressed to besides localhost
    and IP addresses (`warmsocket.hosts`); checked on a server on loopback, or when
    given."""
    max_connections: int | None = None
    """`--max-connections`: connections kept open at once (`warmsocket.admission`);
    None: no limit."""
    max_connections_per_key: int | None = None
    """`--max-connections-per-key`: open WebSockets, HTTP creates being answered and
    background responses running per API key (`admission.KeyLimit`); None: no limit."""
    requests_per_minute_per_key: int | None = None
    """`--requests-per-minute-per-key`: creates and compactions one API key may make a
    minute (`request_rate.RequestRate`); None: no limit."""
    request_burst_per_key: int | None = None
    """How many of them a key may make at once; None: a minute's worth."""
    tokens_per_minute_per_key: int | None = None
    """`--tokens-per-minute-per-key`: input and output tokens one API key's responses
    may use a minute (`request_rate.TokenRate`); None: no limit."""
    backlog: int = 1024
    access_log: bool = True
    """A log line per HTTP request (`httpapi.access_line`); `--no-access-log`: none."""
    reuse_port: bool = False
    """`--reuse-port`: several processes listen on one port (SO_REUSEPORT)."""
    metrics_port: int | None = None
    """`--metrics-port`: a second port (on `host`) that answers only GET /healthz and
    GET /metrics, open until the drain ends; None: none."""
    tokenizer: str | None = None
    """`--tokenizer`: o200k_base, cl100k_base, a tokenizer.json path, none; None follows
    the first model name."""
    prefix_diffing: bool = True
    """Match full-history requests against cached chains and cache tokens per item
    (`--no-prefix-diffing` turns both off: the naive baseline)."""
    conversation_budget: int = DEFAULT_CONVERSATION_BUDGET
    """`--conversation-budget`: item bytes all conversations may hold."""
    shutdown_timeout: float = 25.0
    """`--shutdown-timeout`: seconds a shutdown lets what is under way finish
    (`Server.drain`)."""


class MetricsPortError(OSError):
    """`--metrics-port` could not be listened on (the API's port could)."""


class Server:
    """A running warmsocket server: one port, HTTP and WebSocket mode."""

    def __init__(
        self,
        config: ServerConfig,
        backend: Backend,
        *,
        cache: SessionCache | None = None,
        metrics: Metrics | None = None,
        shared: SharedResponses | None = None,
    ) -> None:
        """`shared`: stored responses shared with other processes (`--redis-url`)."""
        self.config = config
        self.metrics = metrics or Metrics()
        given = cache.tokenizer if cache is not None else None
        tokenizer = given or tokenizer_for(config.tokenizer, config.models[0])
        self.cache = cache or new_cache(
            config.memory_budget,
            config.max_item_bytes,
            tokenizer=tokenizer,
            prefix_diffing=config.prefix_diffing,
        )
        self.metrics.collectors.append(cache_collector(lambda: self.cache.stats().as_dict()))
        self.metrics.collectors.append(rust_heap_collector(rust_heap))
        self.engine = Engine(
            self.cache,
            backend,
            metrics=self.metrics,
            limits=config.limits,
            tokenizer=tokenizer,
            shared=shared,
            conversations=Conversations(
                budget_bytes=config.conversation_budget,
                max_item_bytes=config.max_item_bytes,
                board=getattr(shared, "conversation_board", None),
            ),
        )
        if shared is not None:
            self.metrics.collectors.append(shared_store_collector(shared.stats))
        self.key_limit = KeyLimit(config.max_connections_per_key)
        holds = getattr(shared, "key_holds", None)
        if holds is not None and self.key_limit.limit is not None:
            holds.follow(self.key_limit.held, self.key_limit.limit)  # shared from start
            self.key_limit.elsewhere = holds.elsewhere
            self.key_limit.on_release = holds.nudge
        self.metrics.collectors.append(self.key_limit.collect)
        buckets = getattr(shared, "request_buckets", None)
        self.request_rate = RequestRate(
            config.requests_per_minute_per_key,
            burst=config.request_burst_per_key,
            shared=buckets,
        )
        self.token_rate = TokenRate(config.tokens_per_minute_per_key, shared=buckets)
        if self.token_rate.limited:
            self.engine.tokens_used = self.token_rate.spend
        self.rate_limits = RateLimits(self.request_rate, self.token_rate)
        self.metrics.collectors.append(self.request_rate.collect)
        self.metrics.collectors.append(self.token_rate.collect)
        self.http = HTTPApp(
            self.engine,
            auth=Auth(config.api_keys),
            key_limit=self.key_limit,
            rate_limits=self.rate_limits,
            models=config.models if config.listed_models is None else config.listed_models,
            access_log=config.access_log,
        )
        self.metrics.collectors.append(background_collector(self.http.background.stats))
        self.metrics.collectors.append(conversation_collector(self.engine.conversations.stats))
        self.immediate = backend.immediate if isinstance(backend, ImmediateBackend) else None
        """The backend's way to answer a turn at once, if it has one."""
        self.eager_start = bool(getattr(backend, "eager_start", False))
        """Whether a model task's first step runs in place (`Backend`'s docs)."""
        self.connections: set[Connection] = set()
        self.admission = Admission(config.max_connections)
        self.origins = OriginPolicy(config.allowed_origins)
        self.hosts = HostPolicy(
            config.allowed_hosts, loopback_only=listens_on_loopback_only(config.host)
        )
        self.metrics.collectors.append(
            connection_limit_collector(config.max_connections, self.admission.counts)
        )
        self.tls_events = TLSEvents()
        self.metrics.collectors.append(self.tls_events.collect)
        self._server: asyncio.Server | TLSListener | None = None
        self._probe_server: asyncio.Server | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self.draining = False
        """Shutting down (`drain`): connections close as what they carry ends."""

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.config.port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def metrics_port(self) -> int | None:
        """The port of `--metrics-port` (the one picked, for 0), None without it."""
        if self._probe_server is None or not self._probe_server.sockets:
            return self.config.metrics_port
        port: int = self._probe_server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Connect the shared store, if any (raises ConnectionError), then listen
        (raises OSError)."""
        shared = self.engine.shared
        if shared is not None:
            await shared.start(
                on_deleted=self._forget,
                on_cancel=self.http.background.cancel_announced,
                stored_ids=self.cache.stored_ids,
            )
        loop = asyncio.get_running_loop()
        config = self.config
        if config.tls is not None:
            self._server = await TLSListener.open(
                config.host,
                config.port,
                self._tls_port_accepted,
                admission=self.admission,
                deadline=config.http_head_timeout or HANDSHAKE_TIMEOUT,
                backlog=config.backlog,
                reuse_port=config.reuse_port,
            )
        else:
            self._server = await loop.create_server(
                lambda: Connection(self),
                config.host,
                config.port,
                backlog=config.backlog,
                reuse_address=True,
                reuse_port=config.reuse_port or None,
            )
        if config.metrics_port is not None:
            try:
                self._probe_server = await loop.create_server(
                    lambda: Connection(self, probes_only=True),
                    config.host,
                    config.metrics_port,
                    reuse_address=True,
                )
            except OSError as exc:
                self._server.close()
                raise MetricsPortError(exc.errno, exc.strerror) from exc

    def _tls_port_accepted(self, sock: socket.socket, first_byte: int, verdict: Verdict) -> None:
        """A connection on the TLS port sent its first byte (`tls_listener`): a TLS
        client's gets the handshake, a plain-HTTP client's a 400."""
        plain = first_byte != TLS_HANDSHAKE_RECORD
        task = asyncio.get_running_loop().create_task(
            self._tls_port_connection(sock, verdict, plain)
        )
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _tls_port_connection(
        self, sock: socket.socket, verdict: Verdict, plain: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        connection = Connection(self, counted=verdict, plain_on_tls_port=plain)
        config = self.config
        try:
            if plain:
                await loop.connect_accepted_socket(lambda: connection, sock)
            else:
                await loop.connect_accepted_socket(
                    lambda: connection,
                    sock,
                    ssl=config.tls,
                    # A handshake is bounded as a request head is.
                    ssl_handshake_timeout=config.http_head_timeout or HANDSHAKE_TIMEOUT,
                )
        except BaseException as exc:
            if connection.transport is None:  # it never started: nothing else releases it
                self.admission.release(verdict)
            # (Closes the file only when the loop has not taken it: it holds a reference.)
            sock.close()
            if not isinstance(exc, Exception):
                raise  # cancelled: the server closes
            if not plain:
                self.tls_events.handshake_failed(exc)

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def drain(self, grace: float) -> tuple[int, int]:
        """A graceful shutdown's first step (`close` is the second): stop listening and
        let what is under way finish, for at most `grace` seconds. Each WebSocket closes
        with 1001 once its responses under way have ended (new creates on it are
        refused: `ResponsesSession.drain`), each HTTP connection once its request is
        answered (those that start now say `Connection: close`), idle ones at once;
        background responses run on. `GET /healthz` answers 503 `draining` meanwhile.
        Returns when nothing is left, or at the end of `grace`, the connections and
        background responses left then (0, 0: everything finished in time); what is
        left on a connection then fails (`Connection.drain_ended`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.draining = True
        self.http.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            # Its own deadline is a backstop, a poll later than the drain's: at the
            # drain's, what is left is counted, then failed (`drain_ended`). Were they
            # the same, a connection's timer could fail and close it first, and the
            # drain would report nothing left (a shutdown timeout not logged).
            connection.wind_down(grace + _DRAIN_POLL_SECONDS)
        background = self.http.background
        while (self.connections or background.running) and loop.time() < deadline:
            await asyncio.sleep(min(_DRAIN_POLL_SECONDS, max(0.0, deadline - loop.time())))
        left = (len(self.connections), background.running)
        for connection in list(self.connections):
            connection.drain_ended()
        return left

    async def close(self, write_seconds: float = SHUTDOWN_WRITE_SECONDS) -> None:
        """Stop listening, close every connection (1001 for WebSockets), release backends,
        write what is still queued for Redis (conversations' additions, background
        responses' state, stored responses) for at most `write_seconds` in all."""
        listeners = [s for s in (self._server, self._probe_server) if s is not None]
        for listener in listeners:
            listener.close()
        for handshake in list(self._handshakes):
            handshake.cancel()
        # (Without a drain before: a request arriving while those under way end is
        # refused with a 503, not started and then cut.)
        self.draining = self.http.draining = True
        await self._end_http_requests()
        for connection in list(self.connections):
            connection.shutdown()
        for listener in listeners:
            await listener.wait_closed()
        await self.http.background.aclose()
        await self.engine.backend.aclose()
        deadline = asyncio.get_running_loop().time() + write_seconds
        await self.engine.conversations.aclose(write_seconds)
        if self.engine.shared is not None:
            left = deadline - asyncio.get_running_loop().time()
            await self.engine.shared.aclose(flush_timeout=max(0.0, left))

    async def _end_http_requests(self) -> None:
        """End the HTTP answers still under way before their connections close, each
        as its client can tell from a cut connection (`Connection.end_http_request`);
        wait at most `HTTP_END_SECONDS` for them to be written."""
        ending = [t for c in list(self.connections) if (t := c.end_http_request()) is not None]
        if ending:
            await asyncio.wait(ending, timeout=HTTP_END_SECONDS)

    def _forget(self, owner: str, response_id: str) -> None:
        """Another process deleted a shared response: drop the local copy too, and stop
        the background response if it runs here. Deletions are announced whether they
        deleted anything or not (`SharedStore.delete`): the backend's copies go only
        with the owner's response, never for another key's failed try at its id (which
        would make the owner's next turn send its whole context again); not cached
        here, the response has no copies (they go when it is evicted)."""
        if self.cache.delete(response_id, owner=owner):
            self.engine.forget((response_id,))
        self.http.background.delete_announced(owner, response_id)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _Writer:
    """The HTTP handlers' view of the transport."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.answered = False

    def write(self, data: bytes) -> None:
        self.answered = True
        self._connection.write(data)

    async def drain(self) -> None:
        await self._connection.drain()

    def stream_started(self) -> None:
        self._connection.http_stream_started()

    @property
    def closing(self) -> bool:
        connection = self._connection
        transport = connection.transport
        return connection.lost or (transport is not None and transport.is_closing())

    @property
    def shutting_down(self) -> bool:
        return self._connection.http_shutting_down


class Connection(asyncio.Protocol):
    """One TCP connection: HTTP/1.1, possibly upgraded to WebSocket mode."""

    def __init__(
        self,
        server: Server,
        *,
        probes_only: bool = False,
        counted: Verdict | None = None,
        plain_on_tls_port: bool = False,
    ) -> None:
        self.server = server
        self.probes_only = probes_only
        """Taken on `--metrics-port`: only GET /healthz and /metrics are answered, and
        the connection limit does not count it."""
        self._counted = counted
        """The connection limit's verdict, when the listener counted the connection
        (`TLSListener`); None: `connection_made` asks for one."""
        self.plain_on_tls_port = plain_on_tls_port
        """A plain-HTTP client on the TLS port: its requests get a 400 that says to use
        https:// (`tls_listener`)."""
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer_identity: str | None = None
        """Its verified client certificate's names (`tls.client_identity`), with
        `--owner-by-client-certificate`; part of its requests' owner."""
        self.lost = False
        self._parser = RequestParser(max_body_bytes=server.config.limits.max_message_bytes)
        self._http_task: asyncio.Task[None] | None = None
        # Reading paused: later requests' bytes passed HTTP_READ_AHEAD during an answer.
        self._read_ahead_paused = False
        # The client half-closed (EOF) while a request was answered: answer what it
        # sent, then close.
        self._eof = False
        # The request in progress streams its answer (SSE).
        self._streaming = False
        self.http_shutting_down = False
        """The server's shutdown ended the request in progress (`end_http_request`)."""
        # The HTTP timeouts (`_http_wait`): one timer, moved lazily to the deadline.
        self._http_timer: asyncio.TimerHandle | None = None
        self._http_deadline: float | None = None
        self._head_since: float | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        """Drops a WebSocket whose client does not answer a close (`CLOSE_TIMEOUT`)."""
        self._close_delivered = 0
        self._close_since = 0.0
        self._head_vetted = False
        """The head of the request whose body is arriving was checked (`_head_admissible`)."""
        self._body_since: float | None = None
        # Bytes handed to the transport; minus its write buffer, what it has sent. The
        # write-stall check (`_check_writes`) compares that between its runs.
        self._written = 0
        self._received = 0
        """Bytes read from the client (`_pong_within`: an upload going on)."""
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_sent = 0
        self._stall_since = 0.0
        self._cache_connection: int | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        # Bytes for the transport, in order: the protocol object's output and our frames.
        self._out: list[bytes] = []
        self._flush_scheduled = False
        # Whether frames built in Rust go to the transport as they are (no extension).
        self._direct = True
        # WebSocket mode
        self.ws: ServerProtocol | None = None
        self.session: ResponsesSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._fragments: list[bytes] = []
        self._text = False
        """The message whose frames `_fragments` holds is a text message."""
        self._timer: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._pong = asyncio.Event()
        # Client messages held, in order, while a shared-store load runs for the first.
        self._held: deque[Message] = deque()
        self._loading: asyncio.Task[None] | None = None
        self._immediate = server.immediate
        # The client's frames, split in Rust (none with extensions: then `ws` reads all).
        self._frames: ClientFrames | None = None
        self._opened_at = 0.0  # when the WebSocket opened (monotonic)
        # What the connection limit made of this connection (`Admission.admit`); None
        # once it was closed to make room.
        self._verdict: Verdict | None = None
        # An HTTP request has been answered on it: between requests it is idle.
        self._served = False
        self._key_slot: KeySlot | None = None
        """This WebSocket's place under its owner's `--max-connections-per-key`."""
        self._refused_timer: asyncio.TimerHandle | None = None
        # Answered and half-closed: what the client still sends is dropped until it
        # closes or LINGER_SECONDS pass (`_close_lingering`).
        self._lingering: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self.server.connections.add(self)
        if self.server.config.owner_by_client_certificate:
            # (The loop hands a TLS connection over once its handshake is done.)
            self.peer_identity = client_identity(transport.get_extra_info("peercert"))
        verdict: Verdict | None = self._counted
        if verdict is None and not self.probes_only:
            verdict = self.server.admission.admit()
        self._verdict = verdict
        if verdict == "dropped":
            transport.abort()
            return
        if verdict == "refused":
            # Past --max-connections: read the request (little of its body) and answer
            # 503 (`_http_next`); a client that sends nothing soon is dropped.
            self._parser = RequestParser(max_body_bytes=REFUSED_BODY_BYTES)
            self._refused_timer = self.loop.call_later(REFUSED_WAIT, transport.abort)
        self._http_wait()

    def data_received(self, data: bytes) -> None:
        self.server.metrics.bytes_received += len(data)
        self._received += len(data)
        if self.ws is not None:
            self._ws_safely(self._ws_data, data)
            return
        if self._lingering is not None:
            return  # the rest of a refused request
        if self._served:
            self.server.admission.busy(self)
        elif self._parser.receiving is None and data[0] in _NOT_HTTP11_FIRST_BYTES:
            if data[0] == TLS_HANDSHAKE_RECORD:
                # (No HTTP request starts so; on the TLS port this is plaintext already.)
                self._tls_on_plain_port()
                return
            if len(data) >= 4 and HTTP2_PREFACE.startswith(bytes(data[: len(HTTP2_PREFACE)])):
                self._http2_prior_knowledge()
                return
        self._parser.feed(data)
        if self._http_task is None:
            self._http_next()
        self._check_read_ahead()

    def eof_received(self) -> bool | None:
        if self.ws is not None:
            self._ws_safely(self._ws_eof)
            return None
        if self._http_task is None or self._streaming:
            # Between requests: nothing to answer. During a stream (SSE): a client that
            # closed cannot be told from one that half-closed until a write fails, and
            # one that went away must stop its model at once; so EOF ends the stream.
            return None
        # A half-closed client (`shutdown(SHUT_WR)`, `nc -N`, some proxies) still reads:
        # keep writing to it; the connection closes once its requests are answered.
        self._eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._writable.set()
        self.server.connections.discard(self)
        if self._key_slot is not None:
            self._key_slot.release()
        admission = self.server.admission
        admission.busy(self)
        admission.release(self._verdict)
        self._verdict = None
        if self._refused_timer is not None:
            self._refused_timer.cancel()
        if self._lingering is not None:
            self._lingering.cancel()
        if self._http_task is not None:
            self._http_task.cancel()
        if self._cache_connection is not None:
            self.server.engine.close_connection(self._cache_connection)
            self.server.metrics.connection_closed("http")
            self._cache_connection = None
        if self.session is not None:
            self.session.connection_lost()
            self._run_actions()
            self.server.metrics.connection_closed("websocket")
            ws = self.ws
            log.info(
                "websocket closed",
                extra={
                    "connection": self.session.connection,
                    "seconds": round(time.monotonic() - self._opened_at, 3),
                    "close_code": ws.close_rcvd.code if ws and ws.close_rcvd else None,
                    "error_type": type(exc).__name__ if exc is not None else None,
                },
            )
        if self._timer is not None:
            self._timer.cancel()
        if self._http_timer is not None:
            self._http_timer.cancel()
            self._http_timer = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._loading is not None:
            self._loading.cancel()
        self._held.clear()

    def pause_writing(self) -> None:
        self._writable.clear()
        if self.transport is not None:
            self.transport.pause_reading()
        self._watch_writes()

    def resume_writing(self) -> None:
        self._writable.set()
        if (
            self.transport is not None
            and not self.lost
            and self._loading is None
            and not self._read_ahead_paused
        ):
            self.transport.resume_reading()

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.server.metrics.bytes_sent += len(data)
            self._written += len(data)
            self.transport.write(data)

    async def drain(self) -> None:
        if not self._writable.is_set():
            await self._writable.wait()

    def wind_down(self, grace: float) -> None:
        """The server is draining (`Server.drain`): close once what this connection
        carries has ended."""
        session = self.session
        if session is not None:
            session.drain(self.loop.time(), grace)
            self._run_actions()
            self._flush()
            self._arm_timer()
        elif self.ws is not None:
            self.shutdown()
        elif self._http_task is None and self._parser.receiving is None:
            self._close_transport()
        # Else the request in progress is answered first (`_http_next`).

    def drain_ended(self) -> None:
        """The drain's time is up: the WebSocket's responses still under way fail (a
        terminal event each, rather than a close in the middle), then it closes."""
        session = self.session
        if session is None or session.closed:
            return
        session.tick(max(self.loop.time(), session.close_deadline or 0.0))
        self._run_actions()
        self._flush()

    def end_http_request(self) -> asyncio.Task[None] | None:
        """Server shutdown: the HTTP request under way is cancelled to end its answer
        (a stream with a terminal event, `response.failed`; a request not yet answered
        with a 503 the SDK retries: `HTTPApp.handle`). Its task, to wait for; None
        without one."""
        task = self._http_task
        if self.ws is not None or task is None or task.done() or self.lost:
            return None
        self.http_shutting_down = True
        task.cancel()
        return task

    def shutdown(self) -> None:
        """Server shutdown: WebSockets get 1001 (going away), after a terminal event for
        each response still under way (`response.failed`, as when a drain's time is up:
        without a drain, or one a second signal cut short, a close in the middle of a
        turn is all the client would get); HTTP connections close."""
        session = self.session
        if session is not None and not session.closed:
            session.drain(self.loop.time(), 0.0)
            self.drain_ended()
        if self.ws is not None and self.ws.state is State.OPEN:
            self.ws.send_close(1001, "server shutting down")
            self._flush()
        else:
            self._close_transport()

    def _watch_writes(self) -> None:
        """Writing is paused, or the transport closes with bytes left to send: from
        now on check that the client reads them (`_check_writes`)."""
        timeout = self.server.config.http_idle_timeout
        transport = self.transport
        if timeout is None or transport is None or self.lost or self._stall_timer is not None:
            return
        self._stall_sent = self._delivered(transport)
        self._stall_since = self.loop.time()
        self._stall_timer = self.loop.call_later(timeout / 4, self._check_writes)

    def _delivered(self, transport: asyncio.Transport) -> int:
        """Bytes written that left the transport's buffer and (on Linux) that the client
        acknowledged. The kernel's send buffer can hold megabytes and takes more from
        the transport only once much of it is free, so the transport's buffer alone
        can stand still for long while a slow client reads."""
        delivered = self._written - transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        return delivered - _unacknowledged(sock) if sock is not None else delivered

    def _check_writes(self) -> None:
        """Drop the connection when the client received nothing (`_delivered`) for
        `--http-idle-timeout` while bytes waited in the transport's buffer and it could
        take no more (writing paused) or was closing: the client stopped reading.
        Otherwise the connection's turns would wait for it forever (a model task waits
        while writing is paused), and so would closing it (a transport closes once its
        buffer is sent).

        Progress is looked at every quarter of the timeout, so a client is dropped
        between one and one and a quarter timeouts after the last bytes it took. A
        slow reader is not dropped: its bytes move. The drop is what a reset from the
        client would be: its turns stop, their upstream requests are closed."""
        self._stall_timer = None
        transport = self.transport
        timeout = self.server.config.http_idle_timeout
        if transport is None or self.lost or timeout is None:
            return
        unsent = transport.get_write_buffer_size()
        if not unsent or (self._writable.is_set() and not transport.is_closing()):
            return  # not blocked (any more): `_watch_writes` starts again when it is
        now = self.loop.time()
        sent = self._delivered(transport)
        if sent != self._stall_sent:
            self._stall_sent, self._stall_since = sent, now
        elif now - self._stall_since >= timeout:
            kind = "websocket" if self.session is not None else "http"
            connection = self.session.connection if self.session else self._cache_connection
            log.info(
                "client stopped reading",
                extra={
                    "kind": kind,
                    "connection": connection,
                    "seconds": timeout,
                    "unsent_bytes": unsent,
                },
            )
            self.server.metrics.write_stalled(kind)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # A reset: on a plain close the kernel would keep the socket and the
                # unsent bytes for minutes, probing a client that does not read.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            transport.abort()
            return
        self._stall_timer = self.loop.call_later(timeout / 4, self._check_writes)

    # -- HTTP ----------------------------------------------------------------------------

    def _http_next(self) -> None:
        try:
            request = self._parser.next_request()
        except Exception as exc:
            # Called from `data_received` and from a finished request's task: nothing
            # above would answer, so every failure answers here and closes.
            error = exc if isinstance(exc, HTTPError) else HTTPError(400, "Invalid request.")
            if self._verdict == "refused" and error.status == 413:
                self._refuse_past_limit("none")  # its body passed REFUSED_BODY_BYTES
                return
            if not isinstance(exc, HTTPError):
                log.error("cannot parse an HTTP request", extra={"error_type": type(exc).__name__})
            self._answer_unread(APIError(error.code, error.message, status=error.status))
            return
        if request is None:
            draining = self.server.draining and self._parser.receiving is None
            if self._eof or draining:  # half-closed, or shutting down: no more requests
                self._close_transport()
            else:
                if self._parser.receiving == "body" and not self._head_vetted:
                    self._head_vetted = True
                    if not self._head_admissible():
                        return
                if self._parser.wants_continue():
                    if self._verdict == "refused":  # answered now: the body stays unsent
                        self._refuse_past_limit("none")
                        return
                    self.write(CONTINUE)
                self._http_wait()
            return
        self._http_deadline = self._head_since = self._body_since = None
        self._head_vetted = False
        request.peer_identity = self.peer_identity
        # (Most requests are neither: no work for them.)
        hosts = self.server.hosts
        refusable = (
            self._verdict == "refused"
            or self.probes_only
            or self.plain_on_tls_port
            or "origin" in request.headers
            or not hosts.allows(request.headers.get("host"))
        )
        if refusable and not self._admissible(request):
            return
        if request.is_websocket_upgrade:
            self._upgrade(request)
            return
        self._http_task = self.loop.create_task(self._http_handle(request))

    def _head_admissible(self) -> bool:
        """Whether the request whose body is arriving may go on sending it. One its head
        has it refused for (no valid key, a host or origin not allowed, this connection
        past a limit) is answered now, before a `100 Continue` and before its body:
        else a client without a key could have the server hold --max-message-bytes of
        body on each of its connections before being told."""
        try:
            request = self._parser.head_of_body()
        except HTTPError:
            return True  # (a bad target: answered once the request is complete)
        if request is None:
            return True
        request.peer_identity = self.peer_identity
        if not self._admissible(request):
            return False
        route = route_of(request.segments)[0]
        if not needs_key(request, route):
            return True
        try:
            self.server.http.auth.owner(request)
        except APIError as error:
            origin = request.headers.get("origin")
            if origin is not None:  # an allowed page's (`_admissible`): it may read why
                error.headers = {**(error.headers or {}), **dict(cors_headers(origin))}
            self._answer_and_close(error, route, request)
            return False
        return True

    def _admissible(self, request: Request) -> bool:
        """Whether `request` goes on to its route: on a connection past
        --max-connections only a probe does, only one for a host `--allowed-host`
        allows (`warmsocket.hosts`), and only a web page `--allowed-origin` lets in
        (`warmsocket.origins`). Answers and closes otherwise."""
        route = route_of(request.segments)[0]
        probe = request.method == "GET" and route in PROBES
        if self.plain_on_tls_port:
            self.server.tls_events.plain_http_request()
            self._answer_and_close(errors.plain_http_on_tls_port(), route, request)
            return False
        if self.probes_only and not probe:
            error = errors.not_found_route(request.method, request.path)
            error.message += " This port (--metrics-port) answers GET /healthz and /metrics only."
            self._answer_and_close(error, route, request)
            return False
        if self._verdict == "refused":
            if not probe:
                self._refuse_past_limit(route, request)
                return False
            request.keep_alive = False  # a probe: answered, then the connection closes
        host = request.headers.get("host")
        if not self.server.hosts.allows(host):
            log.info(
                "request refused: its host is not allowed (--allowed-host)",
                extra={"route": route, "host": (host or "")[:200]},  # a name, no content
            )
            refused = errors.host_not_allowed(
                host or "", loopback_only=self.server.hosts.loopback_only
            )
            self._answer_and_close(refused, route, request)
            return False
        origin = request.headers.get("origin")
        if origin is not None and not self.server.origins.allows(origin):
            log.info(
                "web page refused: its origin is not allowed (--allowed-origin)",
                extra={"route": route, "origin": origin[:200]},  # a site's address
            )
            self._answer_and_close(errors.origin_not_allowed(origin), route, request)
            return False
        return True

    def _http_wait(self) -> None:
        """No request is being answered: (re)set the deadline for the client's bytes.

        Nothing buffered: the keep-alive idle timeout. Part of a head: the head timeout,
        from its first byte (or from the end of the answer it was sent behind). Part of
        a body: the idle timeout again, from the last bytes received, and the body
        timeout, from the end of the head (or of the answer it was sent behind),
        whichever ends first."""
        config = self.server.config
        now = self.loop.time()
        timeout: float | None
        receiving = self._parser.receiving
        if receiving == "head":
            if self._head_since is None:
                self._head_since = now
            start, timeout = self._head_since, config.http_head_timeout
        else:
            self._head_since = None
            start, timeout = now, config.http_idle_timeout
            if receiving is None and self._served and self._verdict == "admitted":
                self.server.admission.idle(self)
        deadline = start + timeout if timeout else None
        if receiving == "body":
            if self._body_since is None:
                self._body_since = now
            if config.http_body_timeout:
                whole = self._body_since + config.http_body_timeout
                deadline = whole if deadline is None else min(deadline, whole)
        else:
            self._body_since = None
        self._http_deadline = deadline
        timer = self._http_timer
        if deadline is not None and (timer is None or timer.when() > deadline):
            if timer is not None:
                timer.cancel()
            self._http_timer = self.loop.call_at(deadline, self._http_timed_out)

    def _http_timed_out(self) -> None:
        self._http_timer = None
        deadline = self._http_deadline
        if deadline is None or self.lost or self.ws is not None or self._http_task is not None:
            return
        if self._lingering is not None:
            return  # answered already
        if self.loop.time() < deadline:  # moved on since this timer was set
            self._http_timer = self.loop.call_at(deadline, self._http_timed_out)
            return
        receiving = self._parser.receiving
        config = self.server.config
        if receiving is None:
            log.debug("closing an idle HTTP connection")
            self._close_transport()
            return
        if receiving == "head":
            message = (
                f"The request head was not received within {config.http_head_timeout:g} "
                "seconds (--http-head-timeout)."
            )
        else:
            body_since, whole = self._body_since, config.http_body_timeout
            if whole and body_since is not None and self.loop.time() >= body_since + whole:
                message = (
                    f"The request body was not received within {whole:g} seconds of its "
                    "head (--http-body-timeout)."
                )
            else:
                message = (
                    f"No bytes of the request body arrived for {config.http_idle_timeout:g} "
                    "seconds (--http-idle-timeout)."
                )
        # A client too slow for its timeout is not given LINGER_SECONDS more.
        self._answer_unread(APIError(None, message, status=408), linger=False)

    def _tls_on_plain_port(self) -> None:
        """A TLS client (https://, wss://) on the plain-HTTP port: it cannot read a
        plain answer, so the connection closes; the log says what to change."""
        self.server.tls_events.tls_on_plain_port()
        self.server.metrics.count_error("tls_on_plain_http_port")
        self._close_transport()

    def _http2_prior_knowledge(self) -> None:
        """An HTTP/2 client that skipped negotiation (prior knowledge: a proxy's
        cluster set to HTTP/2, `http2=True, http1=False`): it cannot read an HTTP/1.1
        answer, so it gets HTTP/2's own: GOAWAY with HTTP_1_1_REQUIRED (RFC 9113,
        7), after the SETTINGS frame a server's preface starts with; then the
        connection closes."""
        self.server.metrics.count_error("http2_not_supported")
        self.write(HTTP2_REFUSAL)
        self._close_transport()

    def _answer_unread(self, error: APIError, *, linger: bool = True) -> None:
        """Answer a request that was never read whole (it could not be parsed, was too
        large, or did not arrive in time) with `error`, count it (route `none` in
        `/metrics`: no route was known) and close (`_close_lingering` unless not
        `linger`)."""
        self._answer_and_close(error, "none", linger=linger)

    def _refuse_past_limit(self, route: str, request: Request | None = None) -> None:
        """Answer a connection past --max-connections 503 and close it."""
        limit = self.server.admission.limit or 0
        self._answer_and_close(errors.too_many_connections(limit), route, request)

    def _answer_and_close(
        self, error: APIError, route: str, request: Request | None = None, *, linger: bool = True
    ) -> None:
        """Answer a request the connection itself refuses (`request` None: one never
        read whole), count it, log it, and close."""
        server = self.server
        server.metrics.count_error(error.code or error.type)
        server.metrics.http_request(route, error.status)
        request_id = ids.request_id()
        if server.config.access_log:
            access_line(request, request_id, error.status, error)
        self.write(_error_response(error, request_id))
        if linger:
            self._close_lingering()
        else:
            self._close_transport()

    def _close_lingering(self) -> None:
        """Close after answering a request whose bytes may still be arriving (a body
        too large, a refused upload): send the answer and a FIN, then read and drop what
        the client still sends until it closes or for LINGER_SECONDS, then close. A
        close with unread bytes resets the connection, and the reset can reach the
        client before it has read the answer (RFC 9112, 9.6: a lingering close)."""
        transport = self.transport
        if transport is None or self.lost or not transport.can_write_eof():
            self._close_transport()  # (TLS cannot half-close: closed as before)
            return
        transport.write_eof()
        self._lingering = self.loop.call_later(LINGER_SECONDS, self._close_transport)
        if transport.get_write_buffer_size():
            self._watch_writes()  # a client that reads nothing is not waited for
        self._read_ahead_paused = False
        transport.resume_reading()  # whatever paused it: what comes now is dropped

    def close_for_room(self) -> None:
        """Close this idle keep-alive connection: a new one takes its place under
        --max-connections (`Admission.admit`)."""
        self._verdict = None
        log.debug("closing an idle HTTP connection to make room")
        self._close_transport()

    async def _http_handle(self, request: Request) -> None:
        if self._cache_connection is None:
            # HTTP keep-alive connections scope store=false state too: nothing outlives them.
            self._cache_connection = self.server.cache.open_connection()
            self.server.metrics.connection_opened("http")
        keep_alive = False
        if self.server.draining:
            request.keep_alive = False  # answered with `Connection: close`
        writer = _Writer(self)
        try:
            keep_alive = await self.server.http.handle(
                request, writer, connection=self._cache_connection
            )
            if keep_alive and not self._writable.is_set():
                # The next pipelined request is answered once the client has read this
                # answer (down to the low-water mark): without the wait, 128 KiB of
                # small requests (GET /metrics, a large stored response) could pile
                # gigabytes of answers into the write buffer of a client that reads
                # none of them. One that never reads is dropped (`_check_writes`).
                await self._writable.wait()
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("unhandled error in an HTTP handler")
            if not writer.answered:  # (else a head in the body: the connection closes)
                self.write(_error_response(errors.server_error()))
        finally:
            self._http_task = None
            self._streaming = False
            self._served = True
        if not keep_alive:
            self._close_transport()
            return
        if not self.lost:
            self._http_next()
            self._check_read_ahead()

    def _check_read_ahead(self) -> None:
        """Pause reading while a request is answered and the bytes buffered after it pass
        HTTP_READ_AHEAD; resume when that is no longer so."""
        transport = self.transport
        if transport is None or self.lost:
            return
        over = (
            self.ws is None
            and self._http_task is not None
            and self._parser.buffered > HTTP_READ_AHEAD
        )
        if over and not self._read_ahead_paused:
            self._read_ahead_paused = True
            transport.pause_reading()
        elif not over and self._read_ahead_paused:
            self._read_ahead_paused = False
            # (Unless paused for another reason too: see `resume_writing`.)
            if self._writable.is_set() and self._loading is None:
                transport.resume_reading()

    def http_stream_started(self) -> None:
        """The request in progress answers with a stream: from now on EOF ends it."""
        self._streaming = True
        if self._eof:
            self._close_transport()  # the client's EOF came first (see `eof_received`)

    def _close_transport(self) -> None:
        """Close once what is buffered is sent; drop the connection if the client does
        not read it (`_check_writes`)."""
        transport = self.transport
        if transport is not None:
            transport.close()
            if transport.get_write_buffer_size():
                self._watch_writes()

    # -- WebSocket upgrade ---------------------------------------------------------------

    def _upgrade(self, request: Request) -> None:
        server = self.server
        route, path_id, _sub = route_of(request.segments)
        if route != "responses" or path_id is not None:
            error = errors.not_found_route("GET", request.path)
            self._refuse(error)
            return
        try:
            owner = server.http.auth.owner(request)
        except APIError as error:
            self._refuse(error)
            return
        if server.draining:  # a request that arrived whole only after the drain began
            self._refuse(errors.draining_server())
            return
        limit = server.config.limits.max_message_bytes
        protocol = ServerProtocol(
            extensions=[ServerPerMessageDeflateFactory()],
            subprotocols=[MSGPACK_SUBPROTOCOL],
            select_subprotocol=select_subprotocol,
            max_size=max(2 * limit, limit + 16 * 1024 * 1024),
            logger=logging.getLogger("warmsocket.websockets"),
        )
        protocol.receive_data(request.handshake_head())
        handshake = protocol.events_received()
        if not handshake or not isinstance(handshake[0], WSRequest):
            self._refuse(APIError(None, "Invalid WebSocket handshake.", status=400))
            return
        try:
            response = protocol.accept(handshake[0])
        except Exception:
            # websockets builds its refusal's text from the bad header and cannot encode
            # a non-ASCII one (UnicodeEncodeError): refuse here, without echoing it.
            # (`_refuse` logs the refusal; the exception's text is not logged.)
            self._refuse(
                APIError(
                    None,
                    "Invalid WebSocket handshake: the Sec-WebSocket-Protocol and "
                    "Sec-WebSocket-Extensions headers must be ASCII tokens.",
                    status=400,
                )
            )
            return
        if response.status_code != 101:
            # websockets' own refusal (e.g. 400 for a bad Sec-WebSocket-Key, 426): its
            # status, in our words and shape.
            self._refuse(_handshake_refusal(response.status_code, protocol.handshake_exc))
            return
        slot = server.key_limit.take(owner)
        if slot is None:
            self._refuse(errors.too_many_for_key(server.key_limit.limit or 0))
            return
        self._key_slot = slot  # released as the connection closes
        protocol.send_response(response)
        self.ws = protocol
        server.metrics.connection_opened("websocket")
        self._direct = not protocol.extensions
        if self._direct:
            # Whole messages are read in Rust; other frames go to `protocol`.
            self._frames = ClientFrames(protocol.max_size)
        framing: Framing = "msgpack" if protocol.subprotocol == MSGPACK_SUBPROTOCOL else "websocket"
        self.session = ResponsesSession(
            server.engine,
            owner=owner,
            now=self.loop.time(),
            framing=framing,
            client_key=server.http.auth.token(request),
        )
        self._arm_timer()
        if server.config.ws_ping_interval:
            self._keepalive = self.loop.create_task(self._keepalive_loop())
        leftover = self._parser.take_buffer()
        if leftover:
            self._ws_safely(self._ws_data, leftover)
        else:
            self._flush()
        self._opened_at = time.monotonic()
        log.info("websocket opened", extra={"connection": self.session.connection})

    def _refuse(self, error: APIError) -> None:
        request_id = ids.request_id()  # the x-request-id of the refusal, for the log
        log.info(
            "websocket refused",
            extra={"request_id": request_id, "status": error.status, "code": error.code},
        )
        server = self.server
        server.metrics.count_error(error.code or error.type)
        server.metrics.http_request("responses", error.status)
        self.write(_error_response(error, request_id))
        self._close_transport()

    # -- WebSocket mode ------------------------------------------------------------------

    def _ws_data(self, data: bytes) -> None:
        ws = self.ws
        assert ws is not None
        frames = self._frames
        if frames is not None and ws.state is not State.OPEN:
            # Closing: the protocol object reads everything from here on (it is at a
            # frame boundary; a partial frame held here goes first).
            data = frames.take_buffered() + data
            self._frames = frames = None
        if frames is None:
            ws.receive_data(data)
            self._ws_events()
        else:
            session = self.session
            for whole_message, text, chunk in frames.feed(data):
                if not whole_message:
                    ws.receive_data(chunk)
                    self._ws_events()
                elif ws.state is State.OPEN and session is not None:
                    # (After a close frame or a protocol error in this read, the
                    # protocol object discards what follows: so is this.)
                    self._ws_message(session, chunk, text)
        if not self._run_actions():
            self._flush()
        # else: a model task starts in this iteration; the flush scheduled after it
        # writes `response.created` together with what its first step produced.

    def _ws_eof(self) -> None:
        assert self.ws is not None
        self.ws.receive_eof()
        self._ws_events()
        self._flush()

    def _ws_safely(self, handle: Callable[..., None], *args: Any) -> None:
        """`handle(*args)`, for what the client sent; a bug there is `_ws_failed`."""
        try:
            handle(*args)
        except Exception:
            self._ws_failed()

    def _ws_failed(self) -> None:
        """A bug met while handling what the client sent (logged with its type, never
        its text): the connection closes with 1011 and a reason, rather than the
        transport being aborted (uvloop's "Fatal error on transport"), which the
        client saw as 1006 with no reason, and every other lane with it."""
        log.exception("unhandled error on a WebSocket connection")
        session, ws = self.session, self.ws
        if session is not None and not session.closed:
            session.connection_lost()  # its responses stop, its state is freed
            try:
                self._run_actions()
            except Exception:
                log.exception("unhandled error stopping a WebSocket's responses")
        if ws is not None and ws.state is State.OPEN:
            ws.send_close(1011, "internal error: see the server's log")
        # (A partial frame held by `_frames` goes to the protocol object with the next
        # read, as on any close: `_ws_data`.)
        self._flush()

    def _ws_events(self) -> None:
        assert self.ws is not None
        session = self.session
        for event in self.ws.events_received():
            if not isinstance(event, Frame):
                continue
            opcode = event.opcode
            data = bytes(event.data)  # already bytes for data frames: no copy
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                text = self._text = opcode is Opcode.TEXT
                if not event.fin:
                    self._fragments = [data]
                elif session is not None:
                    self._ws_message(session, data, text)
            elif opcode is Opcode.CONT:
                self._fragments.append(data)
                if event.fin:
                    message = b"".join(self._fragments)
                    self._fragments = []
                    if session is not None:
                        self._ws_message(session, message, self._text)
            elif opcode is Opcode.PONG:
                self._pong.set()
        closing = self.ws.state is State.CLOSED or self.ws.state is State.CLOSING
        if closing and session is not None and not session.closed:
            session.connection_lost()

    def _ws_message(self, session: ResponsesSession, data: bytes, text: bool) -> None:
        rate = self.server.rate_limits
        if self.server.engine.shared is None:
            if not rate.limited:
                session.receive_message(data, text=text)
            elif not session.closed:
                self._receive_counted(session, session.parse_message(data, text=text))
            return
        if session.closed:
            return
        message = session.parse_message(data, text=text)
        if (
            not self._held
            and not (rate.needs_io and type(message) is CreateRequest)
            and session.unresolved_parent(message) is None
            and not session.unresolved_references(message)
            and _shared_conversation(message, self.server.engine) is None
        ):
            self._receive_counted(session, message)
            return
        # A parent to load from the shared store first, or messages already waiting
        # for one: this message waits too, so nothing overtakes on this connection.
        self._held.append(message)
        if self._loading is None:
            self._loading = self.loop.create_task(self._load_held(session))
            if self.transport is not None:
                self.transport.pause_reading()

    def _receive_counted(self, session: ResponsesSession, message: Message) -> None:
        """Hand `message` to the session; a create past its key's
        `--requests-per-minute-per-key` (or `--tokens-per-minute-per-key`) is refused
        on its lane instead (counted here, in this process)."""
        if type(message) is CreateRequest:
            refusal = self.server.rate_limits.check_local(session.owner)
            if refusal is not None:
                session.refuse_create(message, refusal)
                return
        session.receive_parsed(message)

    async def _load_named(self, session: ResponsesSession, message: Message) -> APIError | None:
        """Load what a held create names and this process lacks from the shared store:
        its parent first, then the responses its item_references name (those Redis
        has a record of, found in one round trip for all of them). A retriable error
        for the create's lane when Redis does not answer (the response may well exist;
        the connection and the lane go on); a miss is the session's not found."""
        engine = self.server.engine
        parent = session.unresolved_parent(message)
        references = [r for r in session.unresolved_references(message) if r != parent]
        try:
            if parent is not None:
                await self._load_one(parent, session.owner)
            if references and not session.closed:
                for response_id in await engine.shared_candidates(references, owner=session.owner):
                    if session.closed:
                        break
                    await self._load_one(response_id, session.owner)
        except SharedStoreUnavailable as exc:
            param = "previous_response_id" if exc.response_id == parent else "input"
            return errors.shared_store_unavailable(exc.response_id, param=param)
        return None

    async def _load_one(self, response_id: str, owner: str) -> None:
        """`Engine.load_shared`, a failure other than SharedStoreUnavailable logged (the
        session then answers not found)."""
        try:
            await self.server.engine.load_shared(response_id, owner=owner)
        except SharedStoreUnavailable:
            raise
        except Exception as exc:
            log.error("shared store load failed", extra={"error_type": type(exc).__name__})

    async def _load_held(self, session: ResponsesSession) -> None:
        """Feed the held messages in order, each after its parent was looked up."""
        engine = self.server.engine
        rate = self.server.rate_limits
        try:
            while self._held and not session.closed:
                if rate.limited and type(self._held[0]) is CreateRequest:
                    # Counted first: a create refused for its rate loads nothing.
                    too_fast = (await rate.check(session.owner)).refusal
                    if session.closed:
                        break
                    if too_fast is not None:
                        message = self._held.popleft()
                        assert isinstance(message, CreateRequest)
                        session.refuse_create(message, too_fast)
                        if not self._run_actions():
                            self._flush()
                        continue
                refusal = await self._load_named(session, self._held[0])
                if session.closed:
                    break
                conversation = _shared_conversation(self._held[0], engine)
                claimed = None
                try:
                    if conversation is not None and refusal is None and not session.closed:
                        refusal, claimed = await self._claim_and_read(
                            session, conversation, self._held[0]
                        )
                    if session.closed:
                        break
                    message = self._held.popleft()
                    if refusal is not None and isinstance(message, CreateRequest):
                        session.refuse_create(message, refusal)
                    else:
                        session.receive_parsed(message)
                finally:
                    if claimed is not None:
                        engine.conversations.unclaim(session.owner, claimed)
                if not self._run_actions():
                    self._flush()
        except Exception as exc:
            # A bug, not a miss: end the connection (1011) rather than leave it
            # reading nothing with messages held.
            log.error("cannot continue a held message", extra={"error_type": type(exc).__name__})
            self._held.clear()
            if self.ws is not None:
                self.ws.fail(1011, "internal error")
                self._flush()
        finally:
            if session.closed:
                self._held.clear()
            self._loading = None
        if self.transport is not None and not self.lost and self._writable.is_set():
            self.transport.resume_reading()

    async def _claim_and_read(
        self, session: ResponsesSession, conv_id: str, message: Message
    ) -> tuple[APIError | None, str | None]:
        """Before a create with a shared conversation: hold it across processes when
        the create will add to it and starts at once (`Conversations.claim`; one
        queued behind its lane's responses takes the hold when it starts, or it would
        be refused for what runs now), then make its copy the conversation as Redis
        has it, last (nothing waits between this and the create; a 404 is the
        create's own, from `Engine.prepare`). Answers the create's refusal, if any,
        and the id to `unclaim` once it started."""
        conversations = self.server.engine.conversations
        owner = session.owner
        claimed = None
        try:
            if (
                isinstance(message, CreateRequest)
                and message.store
                and session.starts_now(message.stream_id)
            ):
                await conversations.claim(owner, conv_id)
                claimed = conv_id
            await conversations.fresh(owner, conv_id)
        except SharedStoreUnavailable:
            return errors.shared_store_unavailable(conv_id, param="conversation"), claimed
        except APIError as error:
            if claimed is None and error.code == "conversation_locked":
                return error, None
        except BaseException:
            if claimed is not None:  # (cancelled: the connection was lost)
                conversations.unclaim(owner, claimed)
            raise
        return None, claimed

    def _run_actions(self) -> bool:
        """Carry out the session's outbox. Returns whether a model task was started."""
        session = self.session
        ws = self.ws
        if session is None or ws is None:
            return False
        actions = session.take_outbox()
        if not actions:
            return False
        started = False
        if self._direct:
            # Whatever the protocol object queued (pongs, ...) goes out first.
            self._out += ws.data_to_send()
        while actions:
            started |= self._carry_out(session, ws, actions)
            # A turn answered at once put its events (and what followed) in the outbox.
            actions = session.take_outbox()
        self._schedule_flush()
        return started

    def _carry_out(self, session: ResponsesSession, ws: ServerProtocol, actions: list[Any]) -> bool:
        started = False
        direct = self._direct
        for action in actions:
            if type(action) is bytes:
                if ws.state is not State.OPEN:
                    continue
                if direct:
                    # Not a local alias: a turn answered at once flushes (a new list).
                    self._out.append(action)
                else:
                    for opcode, payload in frame_payloads(action):
                        if opcode == Opcode.TEXT.value:
                            ws.send_text(payload)
                        else:
                            ws.send_binary(payload)
            elif isinstance(action, StartModel):
                if not self._answer_now(session, ws, action.turn):
                    self._start_model(session, action.turn)
                    started = True
            elif isinstance(action, StopModel):
                task = self._tasks.pop(action.turn.response_id, None)
                if task is not None and task is not asyncio.current_task():
                    task.cancel()
            elif isinstance(action, CloseConnection) and ws.state is State.OPEN:
                ws.send_close(action.code, action.reason)
                if direct:
                    self._out += ws.data_to_send()
        return started

    def _answer_now(self, session: ResponsesSession, ws: ServerProtocol, turn: Turn) -> bool:
        """Run the turn to its end now if the backend can answer without waiting.

        The events go out in three writes, each as soon as it is ready: `created` and
        `in_progress` before the model runs, the output's events before the turn's
        end is stored, then the terminal event. The client reads the earlier events
        while this process works on the rest (one write at the end made the client
        wait for all of it: a turn took ~15 % longer end to end).
        """
        immediate = self._immediate
        if immediate is None or turn.tokenize_off_loop or turn.may_compact:
            # (a large input is tokenised off the loop, in the model task; a turn that
            # may be compacted runs there too)
            return False
        self._flush()  # what came before this action: `response.created`, ...
        try:
            events = immediate(turn.context())
        except APIError as error:
            session.model_error(turn, error)
            return True
        except Exception as exc:
            log.error("backend error", extra={"error_type": type(exc).__name__})
            session.model_error(turn)
            return True
        if events is None:
            return False
        session.model_events(turn, events)
        if not turn.finished:
            # Only the output's frames so far (a terminal would have finished the turn).
            self._carry_out(session, ws, session.take_outbox())
            self._flush()
        session.model_done(turn)
        return True

    def _start_model(self, session: ResponsesSession, turn: Turn) -> None:
        """Start the turn's model task.

        For a backend with `eager_start` the task's first step runs now, in this
        callback, where an upstream backend writes its request: the request goes
        out before the rest of the callback (the `response.created` write,
        bookkeeping) and without waiting for an event-loop pass. From Python 3.12 on
        that is an eager task (its first step runs with the task current, so
        `asyncio.timeout` and `wait_for` work in it); on 3.11 the first step runs
        outside any task and `_Resumed` continues it as one. (Not from inside
        another task: a queued turn started as one ends is scheduled as usual.)"""
        coro = self._run_model(session, turn)
        if not self.server.eager_start or asyncio.current_task() is not None:
            self._tasks[turn.response_id] = self.loop.create_task(coro)
            return
        if sys.version_info >= (3, 12):
            task = asyncio.Task(coro, loop=self.loop, eager_start=True)
            if not task.done():
                self._tasks[turn.response_id] = task
            elif not task.cancelled() and (error := task.exception()) is not None:
                self._first_step_failed(session, turn, error)
            return
        try:
            pending = coro.send(None)
        except StopIteration:
            return  # the turn ended in its first step
        except Exception as exc:
            self._first_step_failed(session, turn, exc)
            return
        self._tasks[turn.response_id] = self.loop.create_task(_Resumed(coro, pending))

    def _first_step_failed(
        self, session: ResponsesSession, turn: Turn, error: BaseException
    ) -> None:
        """An error raised in an eager first step before `_run_model`'s own handlers."""
        log.error("backend error", extra={"error_type": type(error).__name__})
        session.model_error(turn)

    async def _run_model(self, session: ResponsesSession, turn: Turn) -> None:
        engine = self.server.engine
        stream: AsyncIterator[StreamItem] | None = None
        try:
            if turn.tokenize_off_loop:
                self._flush()  # `response.created` goes out while the input is tokenised
                await turn.count_input_tokens_off_loop()
            if not turn.request.generate:  # a warm-up, counted: nothing to generate
                session.model_done(turn)
                self._run_actions()
                self._flush()
                return
            stream = engine.model_stream(turn)
            async for event in stream:
                if type(event) is list:
                    session.model_events(turn, event)
                else:
                    session.model_event(turn, event)  # type: ignore[arg-type]
                self._run_actions()
                if turn.finished:
                    break
                if sum(map(len, self._out)) >= FLUSH_BYTES:
                    # Much output ready at once: to the transport now, so that its
                    # write backpressure (below) holds it, not this list.
                    self._flush()
                if not self._writable.is_set():
                    self._flush()
                    await self._writable.wait()
                    # Reading resumed with writing: let the loop read (a ping, a
                    # steer) before this task fills the buffer and pauses it again.
                    await asyncio.sleep(0)
            else:
                session.model_done(turn)
                # The terminal event goes out now, not after the stream is closed
                # and the task has ended (one event-loop pass later).
                self._run_actions()
                self._flush()
        except asyncio.CancelledError:
            raise
        except APIError as error:
            session.model_error(turn, error)
        except Exception as exc:
            log.error("backend error", extra={"error_type": type(exc).__name__})
            session.model_error(turn)
        finally:
            self._tasks.pop(turn.response_id, None)
            # `Backend.stream` promises an async iterator; only generators have aclose.
            aclose = None if stream is None else getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        self._run_actions()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        ws = self.ws
        transport = self.transport
        if ws is None or transport is None or self.lost:
            self._out = []
            return
        chunks = self._out
        self._out = []
        chunks += ws.data_to_send()
        if ws.state is State.CLOSING and self._close_timer is None:
            # The server sent its close frame (or answered the client's): the client
            # has CLOSE_TIMEOUT to end the connection, from when it has received what
            # came before the frame (`_close_unanswered`).
            self._close_delivered = self._delivered(transport)
            self._close_since = self.loop.time()
            self._close_timer = self.loop.call_later(CLOSE_TIMEOUT / 4, self._close_unanswered)
        if not chunks:
            return
        eof = False
        if b"" in chunks:
            # The protocol object asks for the TCP connection to be closed.
            eof = True
            chunks = [c for c in chunks if c]
        if chunks:
            size = sum(map(len, chunks))
            self.server.metrics.bytes_sent += size
            self._written += size
            transport.writelines(coalesced(chunks))
        if eof:
            self._close_transport()

    def _close_unanswered(self) -> None:
        """Drop a WebSocket whose client has not closed CLOSE_TIMEOUT after it last
        received any of what the server sent: a slow reader still taking the turn's
        last events (megabytes: they repeat the whole output) is not cut off; one
        that received everything, close frame included, and does not answer is."""
        self._close_timer = None
        transport = self.transport
        if transport is None or self.lost:
            return
        now = self.loop.time()
        delivered = self._delivered(transport)
        if delivered != self._close_delivered:
            self._close_delivered, self._close_since = delivered, now
        if now - self._close_since < CLOSE_TIMEOUT:
            self._close_timer = self.loop.call_later(CLOSE_TIMEOUT / 4, self._close_unanswered)
            return
        log.info(
            "websocket close not answered; dropping the connection",
            extra={"seconds": CLOSE_TIMEOUT},
        )
        transport.abort()

    def _arm_timer(self) -> None:
        session = self.session
        if session is None:
            return
        deadline = session.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        session = self.session
        if session is None:
            return
        session.tick(self.loop.time())
        self._run_actions()
        self._flush()
        self._arm_timer()

    async def _keepalive_loop(self) -> None:
        config = self.server.config
        interval = config.ws_ping_interval or 20.0
        timeout = config.ws_ping_timeout
        try:
            while not self.lost and self.ws is not None and self.ws.state is State.OPEN:
                await asyncio.sleep(interval)
                if self.ws.state is not State.OPEN:
                    return
                self._pong.clear()
                self.ws.send_ping(int(time.monotonic() * 1000).to_bytes(8, "big"))
                self._flush()
                if not timeout:
                    continue
                if not await self._pong_within(timeout):
                    log.info("websocket keepalive timed out")
                    if self.ws.state is State.OPEN:
                        self.ws.fail(1011, "keepalive ping timeout")
                        self._flush()
                    self._close_transport()
                    return
        except asyncio.CancelledError:
            return

    async def _pong_within(self, timeout: float) -> bool:
        """Whether the client answers the ping just sent within `timeout` seconds of
        receiving it.

        The ping waits behind what was written before it, so a client that reads
        slowly gets it late: while the client has not received the ping yet and has
        received more since the last look, the wait goes on. The pong waits behind what
        the client is sending too (a large message over a slow link): while more of it
        has arrived since the last look, the wait goes on as well. Otherwise it fails
        (a client that receives nothing at all, and sends nothing)."""
        ping_end = self._written
        transport = self.transport
        seen = self._delivered(transport) if transport is not None else -1
        received = self._received
        while True:
            try:
                await asyncio.wait_for(self._pong.wait(), timeout)
                return True
            except TimeoutError:
                transport = self.transport
                if transport is None or self.lost:
                    return False
                if self._received > received:  # uploading: its pong comes after
                    received = self._received
                    continue
                delivered = self._delivered(transport)
                if delivered >= ping_end or delivered == seen:
                    return False
                seen = delivered


def _error_response(error: APIError, request_id: str | None = None) -> bytes:
    """An error answered by the connection itself (not a handler), which then closes."""
    headers = [("x-request-id", request_id or ids.request_id()), *(error.headers or {}).items()]
    return encode_response(
        error.status, dumps(error.http_body()), headers=headers, keep_alive=False
    )


def _handshake_refusal(status: int, reason: Exception | None) -> APIError:
    """The error for a WebSocket handshake `websockets` refused with `status` because
    of `reason`: it names the request header at fault (never its value)."""
    if status >= 500:  # a bug: `websockets` logged it
        return errors.server_error(
            "The WebSocket handshake failed on the server. Try again; if it keeps failing, "
            "report it."
        )
    header: str | None = None
    missing = False
    if isinstance(reason, InvalidHeader):
        header, missing = reason.name, reason.value is None
    elif isinstance(reason, NegotiationError):
        header = "Sec-WebSocket-Extensions"  # the only negotiation that can fail here
    if status == 426 and header is not None:
        return errors.websocket_upgrade_required(header, missing=missing)
    return errors.invalid_websocket_handshake(header, missing=missing, status=status)


_FIRST_STEP_TAKEN = object()


class _Resumed(Coroutine[Any, Any, None]):
    """A coroutine whose first step already ran and yielded `pending` (the future it
    waits for, or None for a bare yield), continued as a task: `create_task(_Resumed(
    coro, pending))`. The task's first step yields `pending`, then it drives `coro`
    (`send`, `throw`, `close`), as a task of `coro` would have from there on.

    A coroutine object itself, not a coroutine awaiting `coro`: a task cancelled
    before its first step throws the cancellation in (`throw`), so `coro` runs its
    handlers; a coroutine function's body would never have started, leaving `coro`
    suspended and what it waited for (an upstream connection) never taken."""

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, None], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def send(self, value: Any) -> Any:
        pending, self._pending = self._pending, _FIRST_STEP_TAKEN
        if pending is not _FIRST_STEP_TAKEN:
            return pending  # (what `coro` waits for: the task waits for it in turn)
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        pending, self._pending = self._pending, _FIRST_STEP_TAKEN
        cancelled = isinstance(typ, asyncio.CancelledError) or typ is asyncio.CancelledError
        if cancelled and isinstance(pending, asyncio.Future):
            pending.cancel()  # (as a task cancelled while it waits cancels what it waits for)
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._pending = _FIRST_STEP_TAKEN
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, None]:
        raise TypeError("a _Resumed is run as a task (create_task), not awaited")


async def run_server(
    config: ServerConfig,
    backend: Backend,
    *,
    ready: Callable[[Server], Any] | None = None,
) -> None:
    """Serve until cancelled."""
    server = Server(config, backend)
    await server.start()
    if ready is not None:
        ready(server)
    try:
        await server.serve_forever()
    finally:
        await server.close()
