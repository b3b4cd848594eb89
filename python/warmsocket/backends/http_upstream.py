"""What the two HTTP upstream backends (`chat`, `responses`) share.

One turn is one streamed POST to the replica the router picks, over a pooled
keep-alive connection. Retryable failures (5xx, timeouts, refused or broken
connections, streams that end early) are retried, on another replica when there
is one, only while no model event has been handed on; then, and for any 4xx, the
turn ends with `TurnFailed`. Cancelling the stream (the client went away, or the
response was stopped) aborts the upstream connection at once, which is how an
HTTP upstream learns that a request is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, ClassVar, Protocol

from warmsocket import __version__
from warmsocket.backends.base import (
    HostedCallStart,
    MessageStart,
    ModelEvent,
    OutputItem,
    ReasoningDelta,
    ReasoningStart,
    StreamItem,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStart,
    TurnContext,
    TurnFailed,
)
from warmsocket.httpclient import (
    ConnectFailed,
    ConnectionClosed,
    HTTPPool,
    HTTPResponse,
    Origin,
    ProtocolViolation,
    RequestTimeout,
    proxy_for,
)
from warmsocket.metrics import Metrics, UpstreamMetrics
from warmsocket.router import Outcome, Replica, Router, RouterConfig
from warmsocket.upstream import (
    UpstreamConfig,
    UpstreamError,
    from_http_status,
    retry_delay,
    transport_error,
)

log = logging.getLogger("warmsocket.upstream")


class Decoder(Protocol):
    def feed(self, data: bytes) -> list[ModelEvent]: ...

    def finish(self) -> list[ModelEvent]: ...

    @property
    def ended(self) -> bool:
        """The stream's end marker arrived (`[DONE]`, a terminal event)."""
        ...


END_GRACE = 0.25
"""How long a turn whose stream said it ended waits for the end of its HTTP body
(to keep the connection alive) before it drops the connection and finishes."""


class OutputRecorder:
    """The output items a turn's events make, shaped as the engine stores them.

    A run of text deltas is one message; each tool call is one function_call item; a
    run of reasoning deltas (or a `ReasoningStart` and its deltas) is one reasoning
    item, as the engine opens one. The chat backend counts these items to continue a
    parent's rendering, so there must be one per item the engine stores for the chat
    decoder's events. Only the fields a translation reads are kept: a reasoning item
    (no chat form) is its type alone.
    """

    __slots__ = ("_parts", "_reasoning", "items")

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._parts: list[str] | None = None
        self._reasoning = False
        """A reasoning item is open: reasoning deltas continue it."""

    def add(self, event: ModelEvent) -> None:
        if isinstance(event, TextDelta):
            self._reasoning = False
            if self._parts is None:
                self._parts = []
                self.items.append({"type": "message", "role": "assistant", "content": []})
            self._parts.append(event.text)
        elif isinstance(event, ReasoningDelta | ReasoningStart):
            if isinstance(event, ReasoningStart) or not self._reasoning:
                self._close()
                self._reasoning = True
                self.items.append({"type": "reasoning"})
        elif isinstance(event, ToolCallStart) and event.custom:
            self._close()  # no chat form: only ends a run of text
            self.items.append({"type": "custom_tool_call"})
        elif isinstance(event, ToolCallStart):
            self._close()
            self.items.append(
                {
                    "type": "function_call",
                    "call_id": event.call_id,
                    "name": event.name,
                    "arguments": "",
                }
            )
        elif isinstance(event, MessageStart):
            self._close_text()  # an open reasoning item stays open, as in the engine
        elif isinstance(event, OutputItem | HostedCallStart):
            self._close()
        elif (
            isinstance(event, ToolArgumentsDelta)
            and self._parts is None
            and self.items
            and self.items[-1]["type"] == "function_call"
        ):
            self.items[-1]["arguments"] += event.delta

    def add_all(self, events: list[ModelEvent]) -> None:
        for event in events:
            self.add(event)

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.items

    def _close(self) -> None:
        """The open item (text or reasoning) ends: a new item starts."""
        self._close_text()
        self._reasoning = False

    def _close_text(self) -> None:
        if self._parts is not None:
            text = "".join(self._parts)
            self.items[-1]["content"] = [{"type": "output_text", "text": text}]
            self._parts = None


def chain_key(turn: TurnContext, config: RouterConfig) -> bytes:
    """The new-chain routing key of a turn: a hash of its prompt's first token blocks."""
    from warmsocket.prefixhash import context_items, new_chain_key

    return new_chain_key(
        turn.instructions,
        turn.settings.get("tools") or (),
        context_items(turn.view.json()),
        block_tokens=config.block_tokens,
        max_blocks=config.prefix_blocks,
    )


TRANSPORT_FAILURES = (RequestTimeout, ConnectFailed, ConnectionClosed, ProtocolViolation)
"""What `httpclient` raises when a request fails below HTTP."""


def transport_failure(
    exc: RequestTimeout | ConnectFailed | ConnectionClosed | ProtocolViolation,
) -> UpstreamError:
    """The upstream error of a request that failed below HTTP (a refused or broken
    connection, a timeout, a malformed answer)."""
    if isinstance(exc, RequestTimeout):
        return transport_error("timeout", str(exc))
    if isinstance(exc, ConnectFailed):
        return transport_error("connect", str(exc), retryable=not exc.permanent)
    if isinstance(exc, ConnectionClosed):
        return transport_error("closed", str(exc))
    return transport_error("protocol", str(exc))


def failed_attempt(
    stats: UpstreamMetrics,
    api: str,
    error: UpstreamError,
    turn: TurnContext,
    replica: Replica,
    can_retry: bool,
    delay: float | None = 0.0,
) -> bool:
    """Count and log one failed upstream attempt. Whether to retry it: a retryable
    failure when `can_retry` (nothing forwarded to the client yet, retries left), after
    `delay` seconds."""
    label = error.outcome
    stats.requests[(api, label)] += 1
    retry = error.retryable and can_retry
    extra: dict[str, object] = {
        "response_id": turn.response_id,
        "replica": replica.label,
        "outcome": label,
        "retry": retry,
    }
    if retry and delay:
        extra["retry_in"] = round(delay, 3)
    if error.retry_after is not None:
        extra["retry_after"] = round(error.retry_after, 3)
    if error.detail is not None:
        extra["detail"] = error.detail
    log.warning("upstream request failed", extra=extra)
    return retry


class HTTPUpstreamBackend:
    """Routing, pooling, retries and failure mapping for one HTTP upstream API."""

    name = "upstream"
    api: ClassVar[str] = ""
    path: ClassVar[str] = ""
    records_output: ClassVar[bool] = False
    eager_start: ClassVar[bool] = True
    """`stream`'s first step (routing, writing the request) needs no task."""

    def __init__(self, config: UpstreamConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.stats = self.metrics.upstream
        origins = [Origin.parse(url) for url in config.urls]
        self.router = Router([str(o) for o in origins], config.router, metrics=self.stats)
        self.pools = [
            HTTPPool(
                origin,
                connect_timeout=config.connect_timeout,
                max_idle=config.max_idle_connections,
                on_open=self._opened,
                proxy=proxy_for(origin),
            )
            for origin in origins
        ]
        self.origins = origins
        self._heads = [self._request_head(origin) for origin in origins]
        self._targets = [f"POST {origin.base_path}{self.path}" for origin in origins]
        """What each replica is asked, for the log (the path only: no query, no credentials)."""
        if len(origins) > 1:
            from warmsocket.prefixhash import tokenizer

            tokenizer()  # routing new chains tokenises; build it now, not in a request

    # -- what a subclass provides -------------------------------------------------------------

    def build_body(self, turn: TurnContext, model: str) -> list[bytes | bytearray]:
        """The request body as pieces, written as they are (never joined into one buffer)."""
        raise NotImplementedError

    async def request_body(self, turn: TurnContext, model: str) -> list[bytes | bytearray]:
        """`build_body`, after what a subclass must first wait for. Its first step must
        need no current task (`eager_start`)."""
        return self.build_body(turn, model)

    def new_decoder(self) -> Decoder:
        raise NotImplementedError

    def completed(self, turn: TurnContext, output: list[dict[str, Any]] | None) -> None:
        """The upstream finished the turn normally (`output` if `records_output`)."""

    # -- Backend ------------------------------------------------------------------------------

    async def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        body = await self.request_body(turn, self.config.upstream_model(turn.model))
        length = str(sum(map(len, body))).encode()
        exclude: set[int] = set()
        retries_left = self.config.retries
        forwarded = False
        while True:
            replica = self.router.route(
                turn.previous_response_id,
                lambda: chain_key(turn, self.config.router),
                exclude=exclude,
            )
            pool = self.pools[replica.index]
            key = self.config.key_for(turn.client_key)
            if key is self.config.api_key:
                head = self._heads[replica.index] + length + b"\r\n\r\n"
            else:  # the client's own (--upstream-forward-key)
                head = self._request_head(self.origins[replica.index], key)
                head += length + b"\r\n\r\n"
            self.router.begin(replica)
            outcome: Outcome = "cancelled"
            response: HTTPResponse | None = None
            error: UpstreamError | None = None
            recorder = OutputRecorder() if self.records_output else None
            try:
                started = time.perf_counter()
                response = await pool.request(
                    [head, *body], timeout=self.config.timeout, on_sent=turn.request_sent
                )
                self.stats.first_byte.observe(time.perf_counter() - started)
                if response.status != 200:
                    text = await response.read(64 * 1024)
                    error = from_http_status(
                        response.status,
                        text,
                        response.head.headers,
                        request=self._targets[replica.index],
                        client_key=key is not self.config.api_key,
                    )
                    response.close()
                    response = None
                else:
                    decoder = self.new_decoder()
                    async with aclosing(response.chunks()) as chunks:
                        async for data in chunks:
                            events = decoder.feed(data)
                            if events:
                                # The events of one read are ready together: one item.
                                if recorder is not None:
                                    recorder.add_all(events)
                                forwarded = True
                                yield events
                            if decoder.ended:
                                break  # the turn is over, whenever the body ends
                    events = decoder.finish()
                    if events:
                        if recorder is not None:
                            recorder.add_all(events)
                        forwarded = True
                        yield events
                    await response.drain(END_GRACE)
                    response.close()  # pooled if the body ended, else dropped
                    response = None
                    outcome = "ok"
                    self.stats.requests[(self.api, "200")] += 1
                    self.router.remember(turn.response_id, replica)
                    self.completed(turn, recorder.finish() if recorder is not None else None)
                    return
            except UpstreamError as exc:
                error = exc
            except TRANSPORT_FAILURES as exc:
                error = transport_failure(exc)
            finally:
                if response is not None:
                    response.abort()
                if error is not None:
                    outcome = "failed" if error.retryable else "ok"
                self.router.end(replica, outcome)
            exclude.add(replica.index)
            delay = retry_delay(
                error,
                self.config.retries - retries_left,
                same_replica=len(exclude) >= len(self.pools),
            )
            can_retry = not forwarded and retries_left > 0 and delay is not None
            if not failed_attempt(self.stats, self.api, error, turn, replica, can_retry, delay):
                yield TurnFailed(error)
                return
            retries_left -= 1
            self.stats.retries += 1
            if delay:
                await asyncio.sleep(delay)

    async def aclose(self) -> None:
        for pool in self.pools:
            pool.close()

    # -- helpers ------------------------------------------------------------------------------

    def _opened(self) -> None:
        self.stats.connections_opened[self.api] += 1

    def _request_head(self, origin: Origin, key: str | None = None) -> bytes:
        """The request head up to the Content-Length value (the body length comes last),
        with `key` (else `--upstream-api-key`) as its bearer token."""
        headers = [
            ("Host", origin.host_header),
            ("User-Agent", f"warmsocket/{__version__}"),
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ]
        key = key or self.config.api_key
        if key:
            headers.append(("Authorization", f"Bearer {key}"))
        lines = [f"POST {origin.base_path}{self.path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in headers]
        return ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
