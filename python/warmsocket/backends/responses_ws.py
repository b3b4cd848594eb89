"""`--upstream-api responses-ws`: turns over warm upstream WebSocket-mode connections.

For OpenAI, xAI or another warmsocket. Each replica has a pool of open WebSocket
connections to `<url>/responses` (one turn at a time per connection, at least
`ws_warm_connections` kept open and idle). Requests go with `store: false`, so the
upstream's state lives on the connection that produced it:

* a turn whose parent was produced on a connection that is still open, idle, young
  enough, and still remembers that response (it is the connection's latest) goes on
  that connection with the upstream's own `previous_response_id` and only the new
  input items (*chained*);
* any other turn goes on an idle (or new) connection with its full context, from
  the session cache (*full*);
* when the upstream answers `previous_response_not_found`, or the connection turns
  out to be closed before anything was answered, the turn is replayed transparently
  with its full context (on a fresh connection when needed), so the client never
  sees the upstream's state loss;
* a connection older than `ws_lifetime` gets no new turn: it is closed at a turn
  boundary and its chains continue elsewhere with a full replay (*rotation*), before
  the upstream's own lifetime limit can end a turn.
* a turn's messages are checked to be of its own response, one response at a time
  (`responses_order.py`): a connection found out of step (a message of an earlier
  response still in flight, an upstream running two at once) is discarded, and the
  turn replayed on another one while nothing has reached the client.

Cancelling a turn mid-response closes its connection: WebSocket mode has no cancel
event, so closing is how the upstream learns to stop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidProxy,
    InvalidProxyStatus,
    InvalidStatus,
    WebSocketException,
)
from websockets.protocol import State
from websockets.uri import get_proxy, parse_proxy, parse_uri

from warmsocket import __version__
from warmsocket._core import MAX_UPSTREAM_EVENT_BYTES, ResponsesStreamDecoder
from warmsocket.backends.base import ModelEvent, StreamItem, TurnContext, TurnFailed
from warmsocket.backends.http_upstream import chain_key, failed_attempt
from warmsocket.backends.responses_events import model_events
from warmsocket.backends.responses_http import HeadCache
from warmsocket.backends.responses_order import ResponseOrder
from warmsocket.backends.upstream_compact import UpstreamCompactor
from warmsocket.compaction_items import expand_items_json
from warmsocket.errors import SERVER_ERROR
from warmsocket.httpclient import PLAIN_HTTP_HINT, Origin, connect_failure, plain_answer_to_tls
from warmsocket.metrics import Metrics
from warmsocket.response_stream import dumps
from warmsocket.router import Outcome, Replica, Router
from warmsocket.upstream import (
    UpstreamConfig,
    UpstreamError,
    from_http_status,
    retry_delay,
    transport_error,
)

MAX_CHAINS = 200_000
HAD_RESPONSES = 16
"""Response ids a connection remembers having had: a `response.created` of one of
them is a stray message, not a new response."""
CLOSE_TIMEOUT = 2.0
"""Seconds closing an upstream connection waits for the upstream's close frame
(websockets' default, 10 s, held a server's shutdown that long when an upstream did
not answer)."""
_INPUT_KEY = b'"input":'


class UpstreamSocket:
    """One WebSocket-mode connection to a replica."""

    __slots__ = (
        "__weakref__",
        "busy",
        "erred",
        "expiring",
        "expiry",
        "had",
        "head",
        "key",
        "last_used",
        "opened",
        "replica",
        "ws",
    )

    def __init__(
        self, replica: Replica, ws: ClientConnection, opened: float, key: str | None = None
    ) -> None:
        self.replica = replica
        self.ws = ws
        self.key = key
        """The bearer token it was opened with: only turns sent with that key go on it
        (`--upstream-forward-key`)."""
        self.opened = opened
        self.last_used = opened
        self.busy = False
        self.head: str | None = None
        """The upstream response id this connection remembers (its latest)."""
        self.had: deque[str] = deque(maxlen=HAD_RESPONSES)
        """The upstream ids of the latest responses created on this connection."""
        self.expiring = False
        """The upstream said the connection's lifetime ended while a response ran: the
        response finishes (within the upstream's grace period), then it is closed."""
        self.expiry: asyncio.TimerHandle | None = None
        """Closes the connection at the end of its lifetime if it is idle then."""
        self.erred = False
        """An `error` message came on it (`ResponseOrder.erred`): it is not pooled
        again, as the next turn, whoever's, could read an answer still to come as its
        own."""

    @property
    def open(self) -> bool:
        return self.ws.state is State.OPEN

    @property
    def spoke_while_idle(self) -> bool:
        """Messages arrived while no turn was on this connection (an upstream that
        misbehaves, or multiplexes): the next turn would read them as its own. Read
        from websockets' receive queue (its asyncio implementation, pinned <16)."""
        frames = getattr(getattr(self.ws, "recv_messages", None), "frames", None)
        try:
            return bool(frames is not None and len(frames))
        except TypeError:
            return False

    def abort(self) -> None:
        self.head = None
        if self.expiry is not None:  # (its timer would keep it until its lifetime ends)
            self.expiry.cancel()
            self.expiry = None
        transport = self.ws.transport
        if transport is not None:
            transport.abort()


@dataclass(slots=True)
class _Placement:
    replica: Replica
    socket: UpstreamSocket | None = None
    previous: str | None = None
    error: UpstreamError | None = None


def check_proxy(url: str) -> None:
    """ValueError (saying why, without the proxy's URL: it may hold credentials) when
    the environment names a proxy for `url` that websockets cannot use; checked at
    start, as the HTTP upstreams check theirs."""
    proxy = get_proxy(parse_uri(url))
    if proxy is None:
        return
    try:
        scheme = parse_proxy(proxy).scheme
    except InvalidProxy as exc:
        raise ValueError(
            f"the environment's proxy for the upstream cannot be used: {exc.msg} "
            "(HTTPS_PROXY, ALL_PROXY; add the upstream's host to NO_PROXY to connect "
            "directly)"
        ) from None
    if scheme.startswith("socks") and importlib.util.find_spec("python_socks") is None:
        raise ValueError(
            "the environment's proxy for the upstream is a SOCKS proxy: "
            "pip install python-socks, or add the upstream's host to NO_PROXY"
        )


class ResponsesWSBackend:
    name = "upstream-responses-ws"
    responses_upstream: ClassVar[bool] = True
    api: ClassVar[str] = "responses-ws"

    def __init__(self, config: UpstreamConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.stats = self.metrics.upstream
        origins = [Origin.parse(url) for url in config.urls]
        self.urls = [
            f"{'wss' if o.tls else 'ws'}://{o.host_header}{o.base_path}/responses" for o in origins
        ]
        # As the HTTP upstreams: a TLS upstream through the environment's proxy (which
        # websockets reads, NO_PROXY included), a plain one directly.
        self._proxy: list[Literal[True] | None] = [True if o.tls else None for o in origins]
        for url, proxy in zip(self.urls, self._proxy, strict=True):
            if proxy:
                check_proxy(url)
        self._hosts = [o.host_header for o in origins]
        self._paths = [f"{o.base_path}/responses" for o in origins]
        self.router = Router([str(o) for o in origins], config.router, metrics=self.stats)
        self._idle: list[list[UpstreamSocket]] = [[] for _ in origins]
        self._chains: OrderedDict[str, tuple[weakref.ref[UpstreamSocket], str, float]] = (
            OrderedDict()
        )
        """The connection each response was made on, its upstream id, and when that
        connection opened. Weak: a closed connection is not kept (with its buffers) for
        the responses it made."""
        self._heads = HeadCache({"store": False}, first={"type": "response.create"})
        self._warming: set[asyncio.Task[None]] = set()
        self._closing = False
        self._compactor = UpstreamCompactor(config, self.router, self.stats)
        if len(origins) > 1:
            from warmsocket.prefixhash import tokenizer

            tokenizer()  # routing new chains tokenises; build it now, not in a request

    # -- Backend ------------------------------------------------------------------------------

    async def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        head = self._heads.head(turn, self.config.upstream_model(turn.model))
        key = self.config.key_for(turn.client_key)
        exclude: set[int] = set()
        retries_left = self.config.retries
        forwarded = False
        fresh = False
        free_replay = True
        while True:
            placed = await self._place(turn, key, exclude, fresh=fresh)
            replica = placed.replica
            failure = placed.error
            answered = False  # the upstream began answering on this attempt
            if placed.socket is not None:
                socket, previous = placed.socket, placed.previous
                self.router.begin(replica)
                outcome: Outcome = "cancelled"
                reusable = False
                try:
                    decoder = ResponsesStreamDecoder()
                    async for events in self._exchange(turn, socket, head, previous, decoder):
                        forwarded = True
                        yield events
                    reusable = True
                    outcome = "ok"
                    self.stats.requests[(self.api, "ok")] += 1
                    socket.head = decoder.response_id
                    if decoder.response_id is not None:
                        self._remember(turn.response_id, socket, decoder.response_id)
                    self.router.remember(turn.response_id, replica)
                except UpstreamError as exc:
                    failure = exc
                    # A rejected request leaves the connection usable, unless the
                    # rejection was an `error` message (`UpstreamSocket.erred`).
                    reusable = not exc.retryable
                    outcome = "failed" if exc.retryable else "ok"
                    if previous is not None:
                        # A continuation that fails evicts its parent upstream (spec
                        # 5.3): chaining from it again would only earn a
                        # previous_response_not_found round trip.
                        socket.head = None
                finally:
                    answered = decoder.started
                    self.router.end(replica, outcome)
                    self._release(socket, reusable=reusable)
                if failure is None:
                    return
                if previous is not None and not forwarded:
                    if failure.reason == "closed":
                        self.stats.replays["connection_lost"] += 1
                    elif failure.reason == "out_of_step":
                        self.stats.replays["out_of_step"] += 1
            assert failure is not None
            # A connection found closed before the upstream began answering (a pooled
            # one the upstream let go: its lifetime, an idle timeout) is the upstream's
            # state loss, which the client never sees: replayed on a fresh connection
            # once per turn without using one of --upstream-retries. So is a connection
            # found out of step (another response's events: a message still in flight
            # when the turn took it, or an upstream running two responses at once),
            # which is discarded: the fault is the connection's, not the request's.
            free = free_replay and (
                (failure.reason == "closed" and not answered) or failure.reason == "out_of_step"
            )
            replica_failed = failure.reason not in {"closed", "out_of_step"}
            if replica_failed:
                exclude.add(replica.index)
            delay = retry_delay(
                failure,
                self.config.retries - retries_left,
                same_replica=replica_failed and len(exclude) >= len(self.router.replicas),
            )
            can_retry = not forwarded and (retries_left > 0 or free) and delay is not None
            if not failed_attempt(self.stats, self.api, failure, turn, replica, can_retry, delay):
                yield TurnFailed(failure)
                return
            if free:
                free_replay = False
            else:
                retries_left -= 1
                self.stats.retries += 1
            if not replica_failed:
                fresh = True  # the connection failed, not the replica: another connection
            elif delay:
                await asyncio.sleep(delay)

    async def compact(self, turn: TurnContext, context: bytes) -> dict[str, Any] | None:
        """The upstream's own compaction of the turn's context, over HTTP to the same
        origin (`upstream_compact`)."""
        return await self._compactor.compact(turn, context)

    async def aclose(self) -> None:
        """Close the idle connections, all at once: each waits at most `CLOSE_TIMEOUT`
        for the upstream's close frame (a server shutting down waits for this)."""
        self._compactor.close()
        self._closing = True
        for task in list(self._warming):
            task.cancel()
        idle = [socket for sockets in self._idle for socket in sockets]
        for sockets in self._idle:
            sockets.clear()
        await asyncio.gather(*(socket.ws.close() for socket in idle), return_exceptions=True)

    # -- one exchange -------------------------------------------------------------------------

    async def _exchange(
        self,
        turn: TurnContext,
        socket: UpstreamSocket,
        head: bytes,
        previous: str | None,
        decoder: ResponsesStreamDecoder,
    ) -> AsyncIterator[list[ModelEvent]]:
        """Send the turn on `socket` and stream its events, a message's at a time;
        replays once on state loss. Each message is checked to be of this turn's
        response (`responses_order.py`) before it is decoded."""
        body = self._body(turn, head, previous)
        started = time.perf_counter()
        if previous is not None:
            self.stats.chained += 1
        order = ResponseOrder(socket.had)
        while True:
            await self._send(socket, body)
            if turn.request_sent is not None:
                turn.request_sent()
            raw = await self._receive(socket)
            created = order.opening(raw)  # else an error event
            socket.erred = socket.erred or order.erred
            try:
                events = _model_events(decoder.message(raw))
            except UpstreamError as error:
                if (
                    error.upstream_code == "previous_response_not_found"
                    and previous is not None
                    and not decoder.started
                ):
                    # The upstream lost the chain: send the full context instead.
                    self.stats.replays["previous_response_not_found"] += 1
                    previous = None
                    body = self._body(turn, head, None)
                    continue
                raise
            if not created:  # (an error event the decoder did not read as one)
                raise transport_error("protocol", "an error event without an error")
            break
        if order.response_id is not None:
            socket.had.append(order.response_id)
        self.stats.first_byte.observe(time.perf_counter() - started)
        while True:
            if events:
                yield events
            if decoder.done:
                return
            raw = await self._receive(socket)
            terminal = order.during(raw)
            socket.erred = socket.erred or order.erred
            decoded = decoder.message(raw)
            if terminal is not None:
                order.ended(terminal, decoder.response_id)
            try:
                events = model_events(decoded)
            except UpstreamError as error:
                if error.upstream_code != "websocket_connection_limit_reached":
                    raise
                # The upstream's connection lifetime ended while this response runs:
                # the upstream finishes it within its grace period (spec 1.7), then
                # closes. Keep reading it; the connection is not used again.
                socket.expiring = True
                events = []

    async def _send(self, socket: UpstreamSocket, body: bytes) -> None:
        try:
            await socket.ws.send(body, text=True)
        except ConnectionClosed:
            raise transport_error("closed") from None

    async def _receive(self, socket: UpstreamSocket) -> bytes:
        try:
            async with asyncio.timeout(self.config.timeout):
                raw = await socket.ws.recv(decode=False)
        except TimeoutError:
            raise transport_error("timeout") from None
        except ConnectionClosed:
            raise transport_error("closed") from None
        return raw if isinstance(raw, bytes) else raw.encode()

    def _body(self, turn: TurnContext, head: bytes, previous: str | None) -> bytes:
        if previous is None or turn.input is None:
            return head + expand_items_json(turn.view.json()) + b"}"
        prefix = head[: -len(_INPUT_KEY)]
        chained = b'"previous_response_id":' + dumps(previous) + b","
        return prefix + chained + _INPUT_KEY + expand_items_json(turn.input.json()) + b"}"

    # -- connections --------------------------------------------------------------------------

    async def _place(
        self, turn: TurnContext, key: str | None, exclude: set[int], *, fresh: bool
    ) -> _Placement:
        """The connection for this turn (one opened with `key`), and the upstream id to
        chain from (None: full)."""
        replica = self.router.route(
            turn.previous_response_id,
            lambda: chain_key(turn, self.config.router),
            exclude=exclude,
        )
        parent = self._chains.get(turn.previous_response_id or "")
        if parent is not None and not exclude and not fresh:
            socket_ref, upstream_id, opened = parent
            socket = socket_ref()
            if socket is None:  # closed, and gone: at the end of its lifetime, or lost
                expired = time.monotonic() - opened >= self.config.ws_lifetime
                why_not = "rotated" if expired else "connection_lost"
            else:
                usable = (
                    "other_key" if socket.key != key else self._usable(socket, upstream_id, replica)
                )
                if usable is None:
                    socket.busy = True
                    idle = self._idle[replica.index]
                    if socket in idle:
                        idle.remove(socket)
                    socket.last_used = time.monotonic()
                    return _Placement(replica, socket, upstream_id)
                why_not = usable
            self.stats.replays[why_not] += 1
        try:
            socket = await self._checkout(replica, key)
        except UpstreamError as error:
            self.router.begin(replica)
            self.router.end(replica, "failed" if error.retryable else "ok")
            return _Placement(replica, error=error)
        return _Placement(replica, socket)

    def _usable(self, socket: UpstreamSocket, upstream_id: str, replica: Replica) -> str | None:
        """None if a chained turn can go on `socket`, else why not (a replay reason)."""
        if socket.replica is not replica:
            return "moved"
        expired = time.monotonic() - socket.opened >= self.config.ws_lifetime
        if expired and not socket.busy:
            self._retire(socket)  # (if its expiry has not closed it already)
            return "rotated"
        if not socket.open:
            return "connection_lost"
        if socket.head != upstream_id:
            return "superseded"
        if socket.busy:
            return "busy"  # (an expired one is rotated when released)
        if socket.spoke_while_idle:
            socket.abort()
            return "connection_lost"
        return None

    async def _checkout(self, replica: Replica, key: str | None) -> UpstreamSocket:
        """An idle connection of `replica` opened with `key`, else a new one."""
        idle = self._idle[replica.index]
        now = time.monotonic()
        chosen: UpstreamSocket | None = None
        for socket in list(idle):
            if socket.key != key:
                continue  # another client's (--upstream-forward-key): never shared
            if socket.spoke_while_idle:
                idle.remove(socket)
                socket.abort()
                continue
            if not socket.open or now - socket.opened >= self.config.ws_lifetime:
                self._retire(socket)
                continue
            # Prefer a connection that holds no chain's state, else the least recently used.
            if chosen is None or (socket.head is None, -socket.last_used) > (
                chosen.head is None,
                -chosen.last_used,
            ):
                chosen = socket
        if chosen is not None:
            idle.remove(chosen)
        else:
            chosen = await self._open(replica, key)
        chosen.busy = True
        chosen.last_used = now
        self._top_up(replica)
        return chosen

    def _release(self, socket: UpstreamSocket, *, reusable: bool) -> None:
        socket.busy = False
        socket.last_used = time.monotonic()
        if not reusable or socket.erred or not socket.open or self._closing:
            socket.abort()
            return
        age = time.monotonic() - socket.opened
        idle = self._idle[socket.replica.index]
        if (
            socket.expiring
            or age >= self.config.ws_lifetime
            or len(idle) >= self.config.max_idle_connections
        ):
            self._retire(socket)
            return
        idle.append(socket)
        if socket.expiry is None:
            # An idle connection is closed when its lifetime ends, not when a later
            # turn happens to look at the pool.
            socket.expiry = asyncio.get_running_loop().call_later(
                self.config.ws_lifetime - age, self._expire, socket
            )

    def _expire(self, socket: UpstreamSocket) -> None:
        socket.expiry = None
        if not socket.busy and socket in self._idle[socket.replica.index]:
            self._retire(socket)

    def _retire(self, socket: UpstreamSocket) -> None:
        idle = self._idle[socket.replica.index]
        if socket in idle:
            idle.remove(socket)
        if socket.expiry is not None:
            socket.expiry.cancel()
            socket.expiry = None
        socket.head = None
        if socket.open:
            task = asyncio.get_running_loop().create_task(socket.ws.close(1000, "rotated"))
            self._warming.add(task)  # keep a reference until it finishes
            task.add_done_callback(self._warming.discard)

    async def _open(self, replica: Replica, key: str | None) -> UpstreamSocket:
        """A new connection to `replica`, opened with `key` as its bearer token."""
        headers = {}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            ws = await connect(
                self.urls[replica.index],
                proxy=self._proxy[replica.index],
                additional_headers=headers,
                user_agent_header=f"warmsocket/{__version__}",
                max_size=MAX_UPSTREAM_EVENT_BYTES,
                compression=None,
                open_timeout=self.config.connect_timeout,
                close_timeout=CLOSE_TIMEOUT,
                ping_interval=20,
                ping_timeout=20,
            )
        except InvalidStatus as exc:
            response = exc.response
            status = response.status_code
            if status < 400 or status in {400, 405, 426}:
                # The URL answers HTTP but not a WebSocket upgrade: a server without
                # WebSocket mode (FastAPI answers 405 to a GET on a POST route).
                raise UpstreamError(
                    "upstream_endpoint_not_found",
                    "The upstream server does not offer WebSocket mode at its URL: "
                    "warmsocket's upstream API is misconfigured. This is a server error, "
                    "not a problem with the request.",
                    status=502,
                    type=SERVER_ERROR,
                    reason="status",
                    detail=f"the upstream answered the WebSocket upgrade with HTTP {status}; "
                    "does it speak WebSocket mode? (else --upstream-api responses)",
                    misconfigured=True,
                ) from None
            headers = {k.lower(): v for k, v in response.headers.raw_items()}
            raise from_http_status(
                response.status_code,
                bytes(response.body or b""),
                headers,
                request=f"GET {self._paths[replica.index]} (WebSocket)",
                client_key=key is not self.config.api_key,
            ) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            # WebSocketException: a failed handshake, and also a proxy or URL that
            # websockets refuses (InvalidProxy, InvalidURI are not InvalidHandshake).
            where = self._hosts[replica.index]
            if isinstance(exc, InvalidProxyStatus):
                why = f"the proxy answered CONNECT with {exc.response.status_code}"
            else:
                why = connect_failure(exc)
            detail = f"cannot connect to {where} ({why})"
            if plain_answer_to_tls(exc):
                raise transport_error(
                    "connect", detail + PLAIN_HTTP_HINT, retryable=False
                ) from None
            raise transport_error("connect", detail) from None
        self.stats.connections_opened[self.api] += 1
        return UpstreamSocket(replica, ws, time.monotonic(), key)

    def _top_up(self, replica: Replica) -> None:
        """Open connections in the background until `ws_warm_connections` are idle (with
        `--upstream-api-key`: those of clients' own keys are not kept warm)."""
        if self._closing:
            return
        missing = (
            self.config.ws_warm_connections
            - sum(1 for s in self._idle[replica.index] if s.key == self.config.api_key)
            - sum(1 for t in self._warming if t.get_name() == f"warm-{replica.index}")
        )
        for _ in range(max(0, missing)):
            task = asyncio.get_running_loop().create_task(
                self._warm(replica), name=f"warm-{replica.index}"
            )
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    async def _warm(self, replica: Replica) -> None:
        try:
            socket = await self._open(replica, self.config.api_key)
        except UpstreamError:
            return
        if self._closing:
            await socket.ws.close()
            return
        self._release(socket, reusable=True)  # idle, with its expiry

    def forget(self, response_ids: Iterable[str]) -> None:
        """Drop what is kept of these responses (`Engine.forget`)."""
        ids = tuple(response_ids)
        self._heads.forget(ids)
        for response_id in ids:
            self._chains.pop(response_id, None)

    def _remember(self, response_id: str, socket: UpstreamSocket, upstream_id: str) -> None:
        chains = self._chains
        chains[response_id] = (weakref.ref(socket), upstream_id, socket.opened)
        chains.move_to_end(response_id)
        while len(chains) > MAX_CHAINS:
            chains.popitem(last=False)


def _model_events(decoded: list[tuple[Any, ...]]) -> list[ModelEvent]:
    """`model_events`, with the upstream's connection-limit error as a lost
    connection (retried on a fresh one), not as an error of the request."""
    try:
        return model_events(decoded)
    except UpstreamError as error:
        if error.upstream_code == "websocket_connection_limit_reached":
            raise transport_error("closed") from None
        raise
