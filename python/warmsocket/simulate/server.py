"""The simulated upstream's HTTP and WebSocket server.

Routes (the API only under `/v1`, as vLLM serves it: elsewhere a 404
`{"detail":"Not Found"}`; health and the test hooks with or without it):

* `POST /v1/chat/completions` — Chat Completions, streamed (vLLM-shaped chunks, the
  usage chunk with `stream_options.include_usage`, `data: [DONE]`) or not; a text
  answer over `max_completion_tokens` or `max_tokens` is cut there (`finish_reason:
  length`), over `max_output_tokens` on the Responses routes (`response.incomplete`);
* `POST /v1/responses` — the Responses API, stateless (`previous_response_id` is
  answered `previous_response_not_found`), SSE or JSON. As OpenAI's: a reasoning
  item carries its `encrypted_content` only when `include` asks for
  `reasoning.encrypted_content`, and one sent back without it is a 404 (an id of
  nothing stored); here and in WebSocket mode;
* `GET /v1/responses` + WebSocket upgrade — WebSocket mode: one response at a time
  per connection, which remembers only its latest response (continuing anything
  else is `previous_response_not_found`), and a lifetime after which the connection
  gets `websocket_connection_limit_reached` and is closed;
* `POST /v1/responses/compact` — the window of the input: its user messages and one
  compaction item only this server reads (a queued fault with `status` 404 answers
  as a server without the endpoint);
* `GET /v1/models`, `GET /health`, `GET /healthz`;
* `GET /stats[?bodies=1][&since=N]` — what it received (see `RequestRecord`; the
  last `KEPT_REQUESTS`, `requests_total` counts them all);
* `POST /control` — test hooks: `{"faults": [...]}` queues faults for the next
  requests (`{"status": 503}`, `{"status": 503, "retry_after": "3"}` (its
  `Retry-After` header), `{"status": 400, "code": ..., "message": ...,
  "param": ...}`, `{"break_after": N}` closes the connection after N streamed events,
  `{"stall_after": N}` sends N streamed events then nothing more (the connection
  stays open), `{"hang": true}` never answers, `{"delay_ms": N}`), `{"forget": true}`
  drops every
  WebSocket connection's remembered response, `{"close_websockets": true}`,
  `{"reset_stats": true}`, `{"reset_cache": true}`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn, cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request as WSRequest
from websockets.protocol import State
from websockets.server import ServerProtocol

from warmsocket import errors, mockmodel
from warmsocket.client_events import ECHOED_DEFAULTS
from warmsocket.errors import APIError
from warmsocket.http11 import (
    LAST_CHUNK,
    HTTPError,
    Request,
    RequestParser,
    chunk,
    coalesced,
    encode_response,
    response_head,
)
from warmsocket.prefixhash import count_tokens, tokenizer
from warmsocket.response_stream import ResponseStream, dumps, usage_object
from warmsocket.simulate.model import (
    CallIds,
    LatencyModel,
    Prefill,
    PrefixCache,
    canonical_items,
    items_from_chat,
    items_from_input,
    parse_request,
    plan,
    seal_reasoning,
    unpersisted_reasoning,
    unsealed_reasoning,
    wants_sealed_reasoning,
)

log = logging.getLogger("warmsocket.simulate")

_canonical = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode
MAX_BODY_BYTES = 256 * 1024 * 1024


@dataclass(slots=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[str, ...] = ("warmsocket-sim",)
    latency: LatencyModel = field(default_factory=LatencyModel)
    block_tokens: int = 16
    cache_blocks: int = 1 << 20
    ws_lifetime: float = 3600.0
    record_bodies: int = 256
    """Keep the request bodies of the latest N requests for `/stats?bodies=1`."""
    api_key: str | None = None
    max_model_len: int | None = None
    """The context window in tokens (`--max-model-len`): listed in `/v1/models` and
    enforced as vLLM does; None for no limit."""


@dataclass(slots=True)
class RequestRecord:
    """One request as `/stats` reports it. Times are `time.monotonic()` seconds."""

    seq: int
    api: str
    """'chat', 'responses' or 'responses-ws'."""
    connection: int
    model: str | None
    stream: bool
    bytes: int
    started: float
    """When the body had been parsed and the request was recorded."""
    received: float = 0.0
    """When the request's last byte had been read (before the body was parsed)."""
    first_token: float | None = None
    """When the first output was written (after the prefill time), streamed answers only."""
    status: int = 200
    items: int = 0
    """Items (or messages) in the full context the model saw."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    """As the answer's usage reports them (`completion_tokens` for chat)."""
    previous_response_id: str | None = None
    chained: bool = False
    """responses-ws: continued the connection's remembered response."""
    context_sha256: str = ""
    """Of the full context (items) as the model saw it, ids and statuses left out; like
    `context`, for the latest `record_bodies` requests, computed when /stats reads them."""
    reply: str = ""
    fault: str | None = None
    finished: float | None = None
    aborted: float | None = None
    body: str | None = None
    context: str | None = None
    """The full context (items, canonical JSON) the model saw; kept like `body`, and
    made when /stats reads it (not on the request's path: its cost grows with the
    conversation)."""
    context_items: list[dict[str, Any]] | None = field(default=None, repr=False)
    """That context until /stats makes `context` and `context_sha256` of it (not
    reported; nothing changes the items once answered)."""


KEPT_REQUESTS = 100_000
"""The requests `/stats` reports, the most recent (a long run keeps no more)."""
CALL_ID_MEMORY = 1 << 16
"""Item digests remembered for making call ids (`CallIds`), the most recent."""


class SimStats:
    def __init__(self, record_bodies: int) -> None:
        self.record_bodies = record_bodies
        self.requests: deque[RequestRecord] = deque(maxlen=KEPT_REQUESTS)
        """The most recent requests, oldest first."""
        self.requests_total = 0
        self.connections_opened = 0
        self.connections_open = 0
        self.websockets_opened = 0
        self._bodies: deque[RequestRecord] = deque()

    def new(
        self,
        api: str,
        connection: int,
        body: bytes,
        model: Any,
        stream: bool,
        received: float | None = None,
    ) -> RequestRecord:
        now = time.monotonic()
        record = RequestRecord(
            seq=self.requests_total,
            api=api,
            connection=connection,
            model=model if isinstance(model, str) else None,
            stream=stream,
            bytes=len(body),
            started=now,
            received=now if received is None else received,
        )
        if self.record_bodies > 0:
            record.body = body.decode("utf-8", "replace")
            self._bodies.append(record)
            while len(self._bodies) > self.record_bodies:
                dropped = self._bodies.popleft()
                dropped.body = dropped.context = dropped.context_items = None
        self.requests.append(record)
        self.requests_total += 1
        return record

    def report(self, *, bodies: bool, since: int) -> dict[str, Any]:
        """Requests from the `since`-th on (counted from the first; those no longer
        kept left out)."""
        records = []
        first_kept = self.requests_total - len(self.requests)
        for record in itertools.islice(self.requests, max(0, since - first_kept), None):
            _render_context(record)
            entry = asdict(record)
            del entry["context_items"]
            if not bodies:
                entry.pop("body")
                entry.pop("context")
            records.append(entry)
        return {
            "connections_opened": self.connections_opened,
            "connections_open": self.connections_open,
            "websockets_opened": self.websockets_opened,
            "requests_total": self.requests_total,
            "requests": records,
        }


def _render_context(record: RequestRecord) -> None:
    """Make a record's `context` and `context_sha256` from the items it keeps, once."""
    items = record.context_items
    if items is not None:
        record.context = _canonical(items)
        record.context_sha256 = context_digest(items)
        record.context_items = None


class SimServer:
    """The simulated upstream. Run it with `start()`; stop it with `close()`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats(config.record_bodies)
        self.cache = PrefixCache(config.cache_blocks, config.block_tokens)
        self.call_ids = CallIds(CALL_ID_MEMORY)
        self.faults: deque[dict[str, Any]] = deque()
        self.prompts: dict[str, str] = {}
        """Prompt templates by id (`POST /control {"prompts": {id: instructions}}`):
        OpenAI's stored prompts, as a Responses request's `prompt` names them."""
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._ids = 0

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.config.port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        tokenizer()  # built once per process (~0.2 s): not inside the first request
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.config.host, self.config.port, reuse_address=True
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def next_connection_id(self) -> int:
        self._ids += 1
        return self._ids

    def take_fault(self) -> dict[str, Any] | None:
        return self.faults.popleft() if self.faults else None

    def control(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise APIError("invalid_value", "Send a JSON object.")
        faults = body.get("faults")
        if isinstance(faults, list):
            self.faults.extend(f for f in faults if isinstance(f, dict))
        prompts = body.get("prompts")
        if isinstance(prompts, dict):
            self.prompts.update({k: v for k, v in prompts.items() if isinstance(v, str)})
        if body.get("reset_stats"):
            still_open = self.stats.connections_open
            self.stats = SimStats(self.config.record_bodies)
            # Counted down as they close (`connection_lost`): carried over, else negative.
            self.stats.connections_open = still_open
        if body.get("reset_cache"):
            self.cache.clear()
        for connection in list(self.connections):
            if body.get("forget") and connection.ws_state is not None:
                connection.ws_state.latest = None
            if body.get("close_websockets") and connection.ws is not None:
                connection.close_websocket(1001, "closed by /control")
        return {"faults_queued": len(self.faults)}


@dataclass(slots=True)
class _WSState:
    opened: float
    latest: tuple[str, list[dict[str, Any]], list[bytes]] | None = None
    """The connection's remembered response: (id, full context including its output,
    the context's items as JSON)."""
    busy: bool = False
    queue: deque[tuple[bytes, float]] = field(default_factory=deque)
    """Messages waiting, with the time each was read in full."""


@dataclass(slots=True)
class _Answer:
    """What the model does for one request, with its timing."""

    reply: mockmodel.Reply
    prefill: Prefill
    first_delay: float
    call_ids: list[str]
    """One per function call of the reply, in order."""
    output_tokens: int
    reasoning_tokens: int = 0
    """Of `output_tokens`, the reasoning's (``/think``)."""
    cut_short: bool = False
    """The text was cut at the request's output token limit (`max_output_tokens`,
    `max_completion_tokens`, `max_tokens`): the answer ends `incomplete`, or with
    `finish_reason: length`."""


class _Connection(asyncio.Protocol):
    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.id = server.next_connection_id()
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(max_body_bytes=MAX_BODY_BYTES)
        self.task: asyncio.Task[None] | None = None
        self.lost = False
        self.record: RequestRecord | None = None
        self.ws: ServerProtocol | None = None
        self.ws_state: _WSState | None = None
        self._fragments: list[bytes] = []
        self._lifetime_timer: asyncio.TimerHandle | None = None
        self.received = 0.0
        """When the request being answered was read in full."""
        self.answering = False
        """Something of the HTTP answer has been written (too late to send an error)."""

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.server.stats.connections_opened += 1
        self.server.stats.connections_open += 1

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self._ws_data(data)
            return
        self.parser.feed(data)
        if self.task is None:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        self.server.stats.connections_open -= 1
        if self._lifetime_timer is not None:
            self._lifetime_timer.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.record is not None and self.record.finished is None:
            self.record.aborted = time.monotonic()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        self.answering = True
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def _unexpected(self, error: Exception) -> None:
        """An error nothing in the simulator expected (malformed input it did not check,
        or a bug): log its type (no content in logs) and end the request's record as
        the 500 it is answered with."""
        record = self.record
        log.error(
            "request %s on connection %d failed: %s",
            "-" if record is None else record.seq,
            self.id,
            type(error).__name__,
        )
        if record is not None:
            record.status = 500
            record.finished = time.monotonic()

    # -- HTTP --------------------------------------------------------------------------------

    def _next(self) -> None:
        try:
            request = self.parser.next_request()
        except HTTPError as error:
            body = dumps(APIError(None, error.message, status=error.status).http_body())
            self.write(encode_response(error.status, body, keep_alive=False))
            if self.transport is not None:
                self.transport.close()
            return
        if request is None:
            return
        self.received = time.monotonic()
        if request.is_websocket_upgrade:
            self._upgrade(request)
            return
        self.task = self.loop.create_task(self._handle(request))

    async def _handle(self, request: Request) -> None:
        self.answering = False
        try:
            await self._route(request)
        except APIError as error:
            self.write(
                encode_response(
                    error.status,
                    dumps(error.http_body()),
                    headers=list(error.headers.items()) if error.headers else None,
                    keep_alive=request.keep_alive,
                )
            )
        except asyncio.CancelledError:
            return
        except _Abort:
            self.abort()
            return
        except Exception as error:  # answered, so the client does not wait forever
            self._unexpected(error)
            if self.answering:  # a streamed answer has begun: it cannot become an error
                self.abort()
                return
            body = dumps(errors.server_error().http_body())
            self.write(encode_response(500, body, keep_alive=request.keep_alive))
        finally:
            self.task = None
            self.record = None
        if not request.keep_alive:
            if self.transport is not None:
                self.transport.close()
            return
        if not self.lost:
            self._next()

    async def _route(self, request: Request) -> None:
        path = request.path.rstrip("/")
        method = request.method
        if path.startswith("/v1/"):
            path = path[3:]
        elif path not in _ROOT_ROUTES:
            # As vLLM (FastAPI): the API is under /v1 only, so an --upstream URL
            # without /v1 fails here as it would in front of a real server.
            self._not_found(request)
            return
        if method == "GET" and path in {"/health", "/healthz"}:
            self._json(request, 200, {"status": "ok"})
            return
        if method == "GET" and path == "/stats":
            bodies = request.query_value("bodies") in {"1", "true"}
            since = _since(request.query_value("since"))
            self._json(request, 200, self.server.stats.report(bodies=bodies, since=since))
            return
        if method == "POST" and path == "/control":
            self._json(request, 200, self.server.control(_decode(request.body)))
            return
        self._check_key(request)
        if method == "GET" and path == "/models":
            window = self.server.config.max_model_len
            cards = [
                {
                    "id": m,
                    "object": "model",
                    "created": 0,
                    "owned_by": "warmsocket-sim",
                    **({"max_model_len": window} if window else {}),
                }
                for m in self.server.config.models
            ]
            self._json(request, 200, {"object": "list", "data": cards})
            return
        if method == "POST" and path == "/chat/completions":
            await self._chat(request)
            return
        if method == "POST" and path == "/responses":
            await self._responses(request)
            return
        if method == "POST" and path == "/responses/compact":
            await self._compact(request)
            return
        self._not_found(request)

    def _not_found(self, request: Request) -> None:
        """An unknown route, answered as vLLM (FastAPI) answers it."""
        self.write(encode_response(404, NOT_FOUND_BODY, keep_alive=request.keep_alive))

    def _check_key(self, request: Request) -> None:
        key = self.server.config.api_key
        if key is None:
            return
        header = request.header("authorization")
        if header != f"Bearer {key}":
            raise errors.invalid_api_key()

    def _json(self, request: Request, status: int, value: Any) -> None:
        self.write(encode_response(status, dumps(value), keep_alive=request.keep_alive))

    # -- the model -----------------------------------------------------------------------------

    def _answer(
        self,
        record: RequestRecord,
        *,
        instructions: str | None,
        tools: Any,
        items: list[dict[str, Any]],
        encoded: list[bytes] | None = None,
        max_tokens: Any = None,
        choice: mockmodel.ToolChoice = mockmodel.AUTO,
    ) -> _Answer:
        unsealed = unsealed_reasoning(items)
        if unsealed is not None:
            record.status = 400
            raise APIError(
                "invalid_encrypted_content",
                f"The encrypted content of reasoning item {unsealed[:64]!r} could not be verified.",
                param="input",
            )
        if encoded is None:
            encoded = canonical_items(items)
        tool_list = tools if isinstance(tools, list) else []
        prefill = self.server.cache.lookup(instructions, tool_list, encoded)
        _check_context_window(record, prefill.prompt_tokens, max_tokens, self.server.config)
        reply = plan(items, tools=tools, instructions=instructions, choice=choice)
        reply, cut_short = _within(reply, max_tokens)
        record.items = len(items)
        record.prompt_tokens = prefill.prompt_tokens
        record.cached_tokens = prefill.cached_tokens
        record.reply = reply.kind
        if reply.kind == "call":
            output = "".join(call.name + call.arguments for call in reply.calls)
        else:
            output = reply.text
        reasoning_tokens = count_tokens(reply.reasoning) if reply.reasoning else 0
        record.output_tokens = output_tokens = count_tokens(output) + reasoning_tokens
        if record.body is not None:  # kept for /stats?bodies=1: the context too
            record.context_items = items
        latency = self.server.config.latency
        uncached = prefill.prompt_tokens - prefill.cached_tokens
        first = latency.first_token_seconds(uncached, reply.sleep_ms)
        call_ids = self._call_ids(reply, instructions, items, encoded)
        return _Answer(reply, prefill, first, call_ids, output_tokens, reasoning_tokens, cut_short)

    def _call_ids(
        self,
        reply: mockmodel.Reply,
        instructions: str | None,
        items: list[dict[str, Any]],
        encoded: list[bytes],
    ) -> list[str]:
        """One id per call of the reply, from the context (`CallIds`): the same context
        gets the same calls, whoever sends it."""
        if not reply.calls:
            return []
        first = self.server.call_ids.first(instructions, items, encoded)
        return [first if n == 0 else f"{first}_{n}" for n in range(len(reply.calls))]

    async def _fault(self, record: RequestRecord) -> dict[str, Any] | None:
        """Apply a queued fault that acts before the answer; return one that acts during it."""
        fault = self.server.take_fault()
        if fault is None:
            return None
        record.fault = next(iter(fault), None)
        if "delay_ms" in fault:
            await asyncio.sleep(float(fault["delay_ms"]) / 1000.0)
            return None
        if fault.get("hang"):
            await asyncio.Event().wait()
        status = fault.get("status")
        if isinstance(status, int):
            record.status = status
            raise APIError(
                fault.get("code"),
                fault.get("message", f"Simulated failure (HTTP {status})."),
                param=fault.get("param"),
                status=status,
                type=fault.get(
                    "type", "server_error" if status >= 500 else "invalid_request_error"
                ),
                headers={"retry-after": str(fault["retry_after"])}
                if "retry_after" in fault
                else None,
            )
        return fault

    def _deltas(self, answer: _Answer) -> list[tuple[str, str]]:
        """('reasoning' | 'search' | 'text' | 'cite' | 'call' | 'args' | 'custom' | 'input',
        piece) in order; a 'call' or 'custom' piece is a name, a 'search' or 'cite'
        piece the query (a 'cite' follows the text that cites the search); the
        reasoning (``/think``), first, comes a word at a time, then the web search
        (``/search``)."""
        reply = answer.reply
        pieces: list[tuple[str, str]] = []
        if reply.reasoning is not None:
            pieces += [("reasoning", p) for p in mockmodel.text_deltas(reply.reasoning)]
        if reply.search is not None:
            pieces.append(("search", reply.search))
        if reply.kind == "call":
            for call in reply.calls:
                if call.custom:  # its input a word at a time
                    pieces.append(("custom", call.name))
                    pieces += [("input", p) for p in mockmodel.text_deltas(call.arguments)]
                    continue
                pieces.append(("call", call.name))
                pieces += [("args", p) for p in mockmodel.argument_deltas(call.arguments)]
        elif reply.kind == "text":
            pieces += [("text", p) for p in mockmodel.text_deltas(reply.text)]
            if reply.search is not None:  # the answer cites the search
                pieces.append(("cite", reply.search))
        return pieces

    def _mark_first_token(self) -> None:
        if self.record is not None and self.record.first_token is None:
            self.record.first_token = time.monotonic()

    async def _prefill_time(self, first_delay: float, prefill: Prefill) -> None:
        """Wait out the time to the first token, then cache the prompt's blocks: only a
        prefill that ran to its end leaves them (a request cut off before adds none)."""
        if first_delay > 0:
            await asyncio.sleep(first_delay)
        self.server.cache.fill(prefill)

    async def _whole_answer_time(self, answer: _Answer) -> None:
        """Wait until a non-streamed answer is done: the prefill, then the decode time of
        all its output tokens (the model generates them whether or not they stream)."""
        await self._prefill_time(answer.first_delay, answer.prefill)
        decode = self.server.config.latency.output_seconds(answer.output_tokens)
        if decode > 0:
            await asyncio.sleep(decode)

    async def _pace(
        self, pieces: list[bytes], answer: _Answer, texts: list[str], *, last: bool = True
    ) -> None:
        """Write `pieces` (first one after the first-token delay), paced by the decode
        rate; when they are the answer's `last`, its record is finished before the last
        one is written (`_mark_finished`)."""
        latency = self.server.config.latency
        await self._prefill_time(answer.first_delay, answer.prefill)
        self._mark_first_token()
        if latency.decode_tokens_per_second <= 0:
            if last:
                self._mark_finished()
            if self.transport is not None and not self.lost:
                self.transport.writelines(coalesced(pieces))
            return
        for index, (piece, text) in enumerate(zip(pieces, texts, strict=False)):
            if last and index == len(pieces) - 1:
                self._mark_finished()
            self.write(piece)
            if text:
                await asyncio.sleep(latency.decode_seconds(text))

    def _mark_finished(self) -> None:
        """The answer's record is finished now, before its last bytes are written: once
        they are, a client in another process may see the answer end before this
        process runs again (on a busy machine), and the bench's timeline would have the
        upstream finish after the client got the end."""
        if self.record is not None and self.record.finished is None:
            self.record.finished = time.monotonic()

    # -- Chat Completions --------------------------------------------------------------------

    async def _chat(self, request: Request) -> None:
        body = _decode(request.body)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise errors.invalid_type("messages", "an array of messages")
        stream = body.get("stream") is True
        record = self.server.stats.new(
            "chat", self.id, request.body, body.get("model"), stream, self.received
        )
        self.record = record
        _check_chat(record, body)
        fault = await self._fault(record)
        instructions, items = items_from_chat(body["messages"])
        limit = body.get("max_completion_tokens")
        answer = self._answer(
            record,
            instructions=instructions,
            tools=body.get("tools"),
            items=items,
            max_tokens=body.get("max_tokens") if limit is None else limit,
            choice=_tool_choice(body),
        )
        model = body.get("model") or "warmsocket-sim"
        if answer.reply.kind == "fail" and not stream:
            record.status = 500
            raise errors.model_failed()
        if not stream:
            await self._whole_answer_time(answer)
            self._mark_finished()
            self._json(request, 200, self._chat_completion(answer, model))
            return
        options = body.get("stream_options") or {}  # an object: `_check_chat`
        include_usage = options.get("include_usage") is True
        top = body.get("top_logprobs")
        logprobs = (top if isinstance(top, int) else 0) if body.get("logprobs") is True else None
        chunks, texts = self._chat_chunks(answer, model, include_usage, logprobs)
        if "service_tier" in body:  # as OpenAI's chunks say which tier served them
            tier = served_fields(body, 0)["service_tier"]
            chunks = [c[:-1] + b',"service_tier":' + dumps(tier) + b"}" for c in chunks]
        pieces = [chunk(b"data: " + c + b"\n\n") for c in chunks]
        pieces.append(chunk(b"data: [DONE]\n\n") + LAST_CHUNK)
        texts.append("")
        self.write(_sse_head(request))
        cut = _cut_after(fault)
        if cut is not None:
            await self._pace(pieces[:cut], answer, texts, last=False)
            await _break_or_stall(fault)
        await self._pace(pieces, answer, texts)

    def _chat_chunks(
        self, answer: _Answer, model: str, include_usage: bool, logprobs: int | None = None
    ) -> tuple[list[bytes], list[str]]:
        """The chunks of a streamed answer; with `logprobs` (the request's `logprobs:
        true`; its `top_logprobs` alternatives), each content chunk's log
        probabilities (`chat_logprobs`)."""
        base = {
            "id": "chatcmpl-" + os.urandom(12).hex(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        def choice(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
            entry = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return dumps({**base, "choices": [entry]})

        chunks = [choice({"role": "assistant", "content": ""})]
        texts = [""]
        index = -1  # of the tool call being streamed
        for kind, piece in self._deltas(answer):
            if kind in ("search", "cite"):
                continue  # a hosted tool and its citation: no chat form
            texts.append(piece)
            if kind == "reasoning":  # as DeepSeek and vLLM's reasoning parsers send it
                chunks.append(choice({"reasoning_content": piece}))
            elif kind == "text":
                scores = None if logprobs is None else chat_logprobs(piece, logprobs)
                chunks.append(choice({"content": piece}, logprobs=scores))
            elif kind == "call":
                index += 1
                call = {
                    "id": answer.call_ids[index],
                    "type": "function",
                    "index": index,
                    "function": {"name": piece, "arguments": ""},
                }
                chunks.append(choice({"tool_calls": [call]}))
            else:
                chunks.append(
                    choice({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                )
        if answer.reply.kind == "fail":
            error = {"message": "The model failed to generate a response.", "type": "server_error"}
            chunks.append(dumps({"error": {**error, "code": 500}}))
            texts.append("")
            return chunks, texts
        chunks.append(choice({}, _finish_reason(answer)))
        texts.append("")
        if include_usage:
            chunks.append(dumps({**base, "choices": [], "usage": _chat_usage(answer)}))
            texts.append("")
        return chunks, texts

    def _chat_completion(self, answer: _Answer, model: str) -> dict[str, Any]:
        reply = answer.reply
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if reply.kind == "call":
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call, call_id in zip(reply.calls, answer.call_ids, strict=True)
            ]
        else:
            message["content"] = reply.text
        return {
            "id": "chatcmpl-" + os.urandom(12).hex(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": _finish_reason(answer),
                }
            ],
            "usage": _chat_usage(answer),
        }

    # -- Responses over HTTP ------------------------------------------------------------------

    async def _responses(self, request: Request) -> None:
        body, raw_items = _decode_request(request.body)
        if not isinstance(body, dict):
            raise errors.invalid_type("body", "a JSON object")
        stream = body.get("stream") is True
        record = self.server.stats.new(
            "responses", self.id, request.body, body.get("model"), stream, self.received
        )
        self.record = record
        previous = body.get("previous_response_id")
        if previous is not None:
            record.previous_response_id = str(previous)
            record.status = 400
            raise errors.previous_response_not_found(str(previous))
        fault = await self._fault(record)
        _check_call_items(record, body.get("input"))
        items = items_from_input(body.get("input"))
        _refuse_unpersisted(record, items, store=body.get("store") is not False)
        instructions = _instructions(record, body, self.server.prompts)
        answer = self._answer(
            record,
            instructions=instructions,
            tools=body.get("tools"),
            items=items,
            encoded=raw_items if raw_items is not None and len(raw_items) == len(items) else None,
            max_tokens=body.get("max_output_tokens"),
            choice=_tool_choice(body),
        )
        frames, texts, _stream = self._response_events(body, answer, previous_response_id=None)
        if not stream:
            await self._whole_answer_time(answer)
            terminal = json.loads(frames[-1])
            self._mark_finished()
            self._json(request, 200, terminal["response"])
            return
        pieces = [chunk(sse_event(frame)) for frame in frames]
        pieces[-1] += LAST_CHUNK
        self.write(_sse_head(request))
        cut = _cut_after(fault)
        if cut is not None:
            await self._pace(pieces[:cut], answer, texts, last=False)
            await _break_or_stall(fault)
        await self._pace(pieces, answer, texts)

    async def _compact(self, request: Request) -> None:
        """`POST /v1/responses/compact`, as OpenAI answers it: the window of the input
        (its user messages, then one compaction item only this server reads: its
        `encrypted_content` is `SIM_COMPACTION` and the base64 of the input's
        transcript, the summary), after the latency model's time for reading the input
        and writing the summary. A queued fault with a status answers instead."""
        body, raw_items = _decode_request(request.body)
        if not isinstance(body, dict):
            raise errors.invalid_type("body", "a JSON object")
        record = self.server.stats.new(
            "compact", self.id, request.body, body.get("model"), False, self.received
        )
        self.record = record
        fault = self.server.take_fault()
        if fault is not None and isinstance(fault.get("status"), int):
            record.fault, record.status = "status", fault["status"]
            if fault["status"] == 404:
                self._not_found(request)  # as a server without the endpoint answers
                return
            raise APIError(None, "Simulated failure.", status=fault["status"], type="server_error")
        items = items_from_input(body.get("input"))
        summary = mockmodel.transcript(items, None)
        aligned = raw_items is not None and len(raw_items) == len(items)
        await self._compaction_time(body, items, raw_items if aligned else None, summary)
        sealed = SIM_COMPACTION + base64.b64encode(summary.encode()).decode()
        window = [
            _user_message(item, f"msg_sim{record.seq}_{index}")
            for index, item in enumerate(items)
            if _is_user_message(item)
        ]
        window.append(
            {"id": f"cmp_sim{record.seq}_item", "type": "compaction", "encrypted_content": sealed}
        )
        usage = usage_object(count_tokens(json.dumps(items)), 0, count_tokens(summary))
        answer = {
            "id": f"cmp_sim{record.seq}",
            "object": "response.compaction",
            "created_at": int(time.time()),
            "output": window,
            "usage": usage,
        }
        self._mark_finished()
        self._json(request, 200, answer)

    async def _compaction_time(
        self,
        body: dict[str, Any],
        items: list[dict[str, Any]],
        encoded: list[bytes] | None,
        summary: str,
    ) -> None:
        """Wait as a model compacting the input would: the overhead, the prefill of the
        input's tokens not in the prefix cache, then the decode time of the summary."""
        instructions = body.get("instructions")
        tools = body.get("tools")
        prefill = self.server.cache.lookup(
            instructions if isinstance(instructions, str) else None,
            tools if isinstance(tools, list) else [],
            canonical_items(items) if encoded is None else encoded,
        )
        latency = self.server.config.latency
        uncached = prefill.prompt_tokens - prefill.cached_tokens
        await self._prefill_time(latency.first_token_seconds(uncached), prefill)
        decode = latency.output_seconds(count_tokens(summary))
        if decode > 0:
            await asyncio.sleep(decode)

    def _response_events(
        self, body: dict[str, Any], answer: _Answer, *, previous_response_id: str | None
    ) -> tuple[list[bytes], list[str], ResponseStream]:
        # Every setting is echoed, as the API does (the SDK's Response requires some,
        # such as parallel_tool_calls).
        settings = {name: body.get(name, default) for name, default in ECHOED_DEFAULTS.items()}
        settings["tools"] = body.get("tools") or []
        response = ResponseStream(
            response_id="resp_" + os.urandom(24).hex(),
            model=str(body.get("model") or "warmsocket-sim"),
            settings=settings,
            previous_response_id=previous_response_id,
            store=body.get("store") is not False,
            created_at=int(time.time()),
        )
        frames = response.start()
        texts = ["", ""]
        calls = iter(answer.call_ids)
        reasoning = answer.reply.reasoning
        pieces = self._deltas(answer)
        for position, (kind, piece) in enumerate(pieces):
            if kind == "input":
                continue  # sent with its call
            if kind == "custom":
                words = []
                for later, text in pieces[position + 1 :]:
                    if later != "input":
                        break
                    words.append(text)
                new = response.custom_tool_call(next(calls), piece, words)
                piece = "".join(words)
            elif kind == "reasoning":
                if reasoning is None:
                    continue  # sent whole, with its first word
                words = mockmodel.text_deltas(reasoning)
                sealed = seal_reasoning(reasoning) if wants_sealed_reasoning(body) else None
                new = response.reasoning_item(reasoning, sealed, words)
                piece, reasoning = reasoning, None
            elif kind == "search":
                new = response.web_search_call(piece)
                piece = ""  # no tokens: the search is the tool's, not the model's
            elif kind == "cite":
                citation = mockmodel.search_citation(piece, answer.reply.text)
                new = response.text_annotation(citation)
                piece = ""
            elif kind == "text":
                new = response.text_delta(piece, sim_logprobs(piece, body) or None)
            elif kind == "call":
                new = response.tool_call_start(next(calls), piece)
            else:
                new = response.tool_arguments_delta(piece)
            frames += new
            texts += [piece] + [""] * (len(new) - 1)
        prefill = answer.prefill
        usage = usage_object(
            prefill.prompt_tokens,
            prefill.cached_tokens,
            answer.output_tokens,
            answer.reasoning_tokens,
        )
        searches = sum(kind == "search" for kind, _piece in pieces)
        response.set_fields(served_fields(body, searches))
        if answer.reply.kind == "fail":
            closing = response.fail(errors.model_failed().response_error(), usage)
        elif answer.cut_short:
            closing = response.incomplete("max_output_tokens", usage, int(time.time()))
        else:
            closing = response.complete(usage, int(time.time()))
        frames += closing
        texts += [""] * len(closing)
        return frames, texts, response

    # -- Responses WebSocket mode --------------------------------------------------------------

    def _upgrade(self, request: Request) -> None:
        path = request.path.rstrip("/")
        if path != "/v1/responses":
            self.write(encode_response(404, NOT_FOUND_BODY, keep_alive=False))
            if self.transport is not None:
                self.transport.close()
            return
        try:
            self._check_key(request)
        except APIError as error:
            self.write(encode_response(401, dumps(error.http_body()), keep_alive=False))
            if self.transport is not None:
                self.transport.close()
            return
        protocol = ServerProtocol(max_size=MAX_BODY_BYTES)
        protocol.receive_data(request.handshake_head())
        handshake = protocol.events_received()
        if not handshake or not isinstance(handshake[0], WSRequest):
            self.abort()
            return
        protocol.send_response(protocol.accept(handshake[0]))
        self.ws = protocol
        self.ws_state = _WSState(opened=self.loop.time())
        self.server.stats.websockets_opened += 1
        self._lifetime_timer = self.loop.call_later(
            self.server.config.ws_lifetime, self._lifetime_reached
        )
        leftover = self.parser.take_buffer()
        if leftover:
            self._ws_data(leftover)
        else:
            self._ws_flush()

    def _ws_data(self, data: bytes) -> None:
        ws = self.ws
        state = self.ws_state
        assert ws is not None and state is not None
        ws.receive_data(data)
        for event in ws.events_received():
            if not isinstance(event, Frame):
                continue
            if event.opcode in {Opcode.TEXT, Opcode.BINARY}:
                if event.fin:
                    state.queue.append((bytes(event.data), time.monotonic()))
                else:
                    self._fragments = [bytes(event.data)]
            elif event.opcode is Opcode.CONT:
                self._fragments.append(bytes(event.data))
                if event.fin:
                    state.queue.append((b"".join(self._fragments), time.monotonic()))
                    self._fragments = []
        self._ws_flush()
        if not state.busy and state.queue:
            state.busy = True
            self.task = self.loop.create_task(self._ws_run())

    def _ws_flush(self) -> None:
        ws = self.ws
        if ws is None or self.transport is None or self.lost:
            return
        chunks = ws.data_to_send()
        eof = bool(chunks) and chunks[-1] == b""
        data = [c for c in chunks if c]
        if data:
            self.transport.writelines(coalesced(data))
        if eof:
            self.transport.close()

    def _ws_send(self, frames: list[bytes]) -> None:
        ws = self.ws
        if ws is None or ws.state is not State.OPEN:
            return
        for frame in frames:
            ws.send_text(frame)
        self._ws_flush()

    def close_websocket(self, code: int, reason: str) -> None:
        ws = self.ws
        if ws is not None and ws.state is State.OPEN:
            ws.send_close(code, reason)
            self._ws_flush()

    def _lifetime_reached(self) -> None:
        self._lifetime_timer = None
        state = self.ws_state
        if state is not None and not state.busy:
            self._expire()

    def _expire(self) -> None:
        error = errors.connection_limit_reached(self.server.config.ws_lifetime / 60.0)
        self._ws_send([dumps(error.ws_event())])
        self.close_websocket(1000, "connection lifetime reached")

    async def _ws_run(self) -> None:
        state = self.ws_state
        assert state is not None
        try:
            while state.queue and not self.lost:
                message, self.received = state.queue.popleft()
                if self.loop.time() - state.opened >= self.server.config.ws_lifetime:
                    self._expire()
                    return
                try:
                    await self._ws_create(message, state)
                except APIError as error:
                    self._ws_send([dumps(error.ws_event())])
                except _Abort:
                    raise
                except Exception as error:  # answered, so the client does not wait forever
                    self._unexpected(error)
                    self._ws_send([dumps(errors.server_error().ws_event())])
                finally:
                    self.record = None
        except asyncio.CancelledError:
            return
        except _Abort:
            self.abort()
            return
        finally:
            state.busy = False
            self.task = None

    async def _ws_create(self, message: bytes, state: _WSState) -> None:
        body, raw_items = _decode_request(message)
        if not isinstance(body, dict) or body.get("type") != "response.create":
            raise errors.invalid_value("type", "Only response.create is supported here.")
        record = self.server.stats.new(
            "responses-ws", self.id, message, body.get("model"), True, self.received
        )
        self.record = record
        previous = body.get("previous_response_id")
        context: list[dict[str, Any]] = []
        context_encoded: list[bytes] = []
        if previous is not None:
            record.previous_response_id = str(previous)
            if state.latest is None or state.latest[0] != previous:
                record.status = 400
                raise errors.previous_response_not_found(str(previous))
            _id, context, context_encoded = state.latest
            record.chained = True
        fault = await self._fault(record)
        _check_call_items(record, body.get("input"))
        new = items_from_input(body.get("input"))
        _refuse_unpersisted(record, new, store=body.get("store") is not False)
        if raw_items is None or len(raw_items) != len(new):
            raw_items = canonical_items(new)
        items = context + new
        encoded = context_encoded + raw_items
        instructions = _instructions(record, body, self.server.prompts)
        answer = self._answer(
            record,
            instructions=instructions,
            tools=body.get("tools"),
            items=items,
            encoded=encoded,
            max_tokens=body.get("max_output_tokens"),
            choice=_tool_choice(body),
        )
        frames, texts, response = self._response_events(
            body, answer, previous_response_id=previous if isinstance(previous, str) else None
        )
        cut = _cut_after(fault)
        if cut is not None:
            await self._ws_paced(frames[:cut], answer, texts, last=False)
            await _break_or_stall(fault)
        await self._ws_paced(frames, answer, texts)
        if answer.reply.kind != "fail":
            output = response.output
            state.latest = (response.response_id, items + output, encoded + canonical_items(output))
        else:
            state.latest = None

    async def _ws_paced(
        self, frames: list[bytes], answer: _Answer, texts: list[str], *, last: bool = True
    ) -> None:
        """`_pace` for WebSocket frames."""
        latency = self.server.config.latency
        await self._prefill_time(answer.first_delay, answer.prefill)
        self._mark_first_token()
        if latency.decode_tokens_per_second <= 0:
            if last:
                self._mark_finished()
            self._ws_send(frames)
            return
        for index, (frame, text) in enumerate(zip(frames, texts, strict=False)):
            if last and index == len(frames) - 1:
                self._mark_finished()
            self._ws_send([frame])
            if text:
                await asyncio.sleep(latency.decode_seconds(text))


NOT_FOUND_BODY = b'{"detail":"Not Found"}'
"""vLLM's (FastAPI's) answer to a route it does not have."""
_ROOT_ROUTES = frozenset({"/health", "/healthz", "/stats", "/control"})
"""Routes answered without the /v1 prefix too (vLLM's /health; the test hooks)."""


class _Abort(Exception):
    """Drop the connection (a simulated broken stream)."""


def _cut_after(fault: dict[str, Any] | None) -> int | None:
    """How many streamed events a `break_after` or `stall_after` fault lets through."""
    if fault is None:
        return None
    for name in ("break_after", "stall_after"):
        if name in fault:
            return int(fault[name])
    return None


async def _break_or_stall(fault: dict[str, Any] | None) -> NoReturn:
    """After the events a fault lets through: `break_after` drops the connection;
    `stall_after` sends nothing more and keeps it open (until the client goes away)."""
    if fault is not None and "stall_after" in fault:
        await asyncio.Event().wait()
    raise _Abort


SIM_COMPACTION = "sim-compaction:"
"""How a compaction item of this server's `encrypted_content` starts."""


MODERATION_CATEGORIES = ("harassment", "hate", "self-harm", "sexual", "violence")


def served_fields(body: dict[str, Any], searches: int) -> dict[str, Any]:
    """What OpenAI's final Response says of how it served a request: the tier (`auto`
    or none resolves to `default`), moderation results when `moderation` asked for
    them (nothing flagged), and hosted tools' usage when the answer searched."""
    tier = body.get("service_tier")
    fields: dict[str, Any] = {"service_tier": "default" if tier in (None, "auto") else tier}
    moderation = body.get("moderation")
    if isinstance(moderation, dict):
        result = {
            "type": "moderation_result",
            "model": str(moderation.get("model")),
            "flagged": False,
            "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
            "category_scores": dict.fromkeys(MODERATION_CATEGORIES, 1e-06),
            "category_applied_input_types": {name: ["text"] for name in MODERATION_CATEGORIES},
        }
        fields["moderation"] = {"input": result, "output": result}
    if searches:
        no_tokens = {"image_tokens": 0, "text_tokens": 0}
        fields["tool_usage"] = {
            "image_gen": {
                "input_tokens": 0,
                "input_tokens_details": no_tokens,
                "output_tokens": 0,
                "total_tokens": 0,
            },
            "web_search": {"num_requests": searches},
        }
    return fields


def _is_user_message(item: dict[str, Any]) -> bool:
    return item.get("type", "message") == "message" and item.get("role") == "user"


def _user_message(item: dict[str, Any], new_id: str) -> dict[str, Any]:
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "input_text", "text": content}]
    message_id = item.get("id")
    return {
        "id": message_id if isinstance(message_id, str) else new_id,
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": content,
    }


def context_digest(items: list[dict[str, Any]]) -> str:
    """A digest of a context that ignores item ids and statuses (they differ by who made them)."""
    normalized = [{k: v for k, v in item.items() if k not in {"id", "status"}} for item in items]
    return hashlib.sha256(_canonical(normalized).encode()).hexdigest()


def _chat_usage(answer: _Answer) -> dict[str, Any]:
    prefill = answer.prefill
    completion = answer.output_tokens
    return {
        "prompt_tokens": prefill.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prefill.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": prefill.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": answer.reasoning_tokens},
    }


def sse_event(frame: bytes) -> bytes:
    """One of the simulator's own event frames as an SSE event (its type, from the built-in
    model, is a plain event name)."""
    start = frame.find(b'"type":"') + 8
    end = frame.find(b'"', start)
    return b"event: " + frame[start:end] + b"\ndata: " + frame + b"\n\n"


def _sse_head(request: Request) -> bytes:
    headers = [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("cache-control", "no-cache"),
        ("transfer-encoding", "chunked"),
    ]
    if not request.keep_alive:
        headers.append(("connection", "close"))
    return response_head(200, headers)


def _within(reply: mockmodel.Reply, max_tokens: Any) -> tuple[mockmodel.Reply, bool]:
    """A text reply cut to `max_tokens` output tokens (its reasoning's included), and
    whether it was cut; a call or a failure is left as it is."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or reply.kind != "text":
        return reply, False
    budget = max_tokens - (count_tokens(reply.reasoning) if reply.reasoning else 0)
    if count_tokens(reply.text) <= budget:
        return reply, False
    low, high = 0, len(reply.text)  # the longest prefix within the budget
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(reply.text[:middle]) <= budget:
            low = middle
        else:
            high = middle - 1
    return dataclasses.replace(reply, text=reply.text[:low]), True


LOGPROBS = mockmodel.LOGPROBS


def sim_logprobs(piece: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A text delta's log probabilities, as OpenAI gives them when `include` asks
    for `message.output_text.logprobs` (`mockmodel.text_logprobs`); [] when not
    asked for."""
    include = body.get("include")
    if not isinstance(include, list) or LOGPROBS not in include:
        return []
    top = body.get("top_logprobs")
    return mockmodel.text_logprobs(piece, top if isinstance(top, int) else 0)


def chat_logprobs(piece: str, top: int) -> dict[str, Any]:
    """A content chunk's `logprobs`, as vLLM and OpenAI's Chat Completions give them:
    the same values as `sim_logprobs`, each with its token's `bytes`."""
    entry = sim_logprobs(piece, {"include": [LOGPROBS], "top_logprobs": top})[0]

    def with_bytes(value: dict[str, Any]) -> dict[str, Any]:
        return {**value, "bytes": list(value["token"].encode())}

    alternatives = [with_bytes(t) for t in entry["top_logprobs"]]
    return {"content": [{**with_bytes(entry), "top_logprobs": alternatives}]}


def _instructions(
    record: RequestRecord, body: dict[str, Any], prompts: dict[str, str]
) -> str | None:
    """A Responses request's instructions: its `instructions`, else those of the
    prompt template its `prompt` names (`{{name}}` replaced by its string
    `variables`), as OpenAI reads a stored prompt. An unknown template is a 404."""
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        return instructions
    prompt = body.get("prompt")
    if not isinstance(prompt, dict):
        return None
    template = prompts.get(str(prompt.get("id")))
    if template is None:
        record.status = 404
        raise APIError(
            None, f"Prompt with id '{prompt.get('id')}' not found.", param="prompt", status=404
        )
    variables = prompt.get("variables")
    for name, value in (variables if isinstance(variables, dict) else {}).items():
        if isinstance(value, str):
            template = template.replace("{{" + str(name) + "}}", value)
    return template


def _check_context_window(
    record: RequestRecord, prompt_tokens: int, max_tokens: Any, config: SimConfig
) -> None:
    """Refuse a request longer than `--max-model-len`, as vLLM does: the prompt and
    the output limit asked for (none: the prompt alone) must fit the window."""
    window = config.max_model_len
    if window is None:
        return
    completion = max_tokens if isinstance(max_tokens, int) else 0
    if prompt_tokens + completion <= window:
        return
    record.status = 400
    raise APIError(
        None,
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{prompt_tokens + completion} tokens ({prompt_tokens} in the messages, {completion} "
        "in the completion). Please reduce the length of the messages or completion.",
        type="BadRequestError",
    )


def _since(value: str | None) -> int:
    """`/stats?since=N`: a request count."""
    try:
        return int(value or 0)
    except ValueError:
        raise errors.invalid_type("since", "an integer") from None


_CALL_ITEMS = frozenset(
    {"function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output"}
)


def _check_call_items(record: RequestRecord, value: Any) -> None:
    """Refuse a tool call or output item whose `call_id` or `name` is not a string, as
    the API does (the model matches outputs to calls by them)."""
    for index, item in enumerate(value if isinstance(value, list) else ()):
        if not isinstance(item, dict) or item.get("type") not in _CALL_ITEMS:
            continue
        for name in ("call_id", "name"):
            if item.get(name) is not None and not isinstance(item[name], str):
                record.status = 400
                raise errors.invalid_type(f"input[{index}].{name}", "a string")


def _check_chat(record: RequestRecord, body: dict[str, Any]) -> None:
    """Refuse the Chat Completions fields the simulator reads in a shape vLLM would
    refuse too, with a 400 rather than a failure inside the model."""
    error = _chat_error(body)
    if error is not None:
        record.status = 400
        raise error


def _chat_error(body: dict[str, Any]) -> APIError | None:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return errors.invalid_type("stream_options", "an object")
    for index, message in enumerate(body["messages"]):
        if isinstance(message, dict):
            error = _chat_message_error(message, f"messages[{index}]")
            if error is not None:
                return error
    return None


def _chat_message_error(message: dict[str, Any], param: str) -> APIError | None:
    tool_call_id = message.get("tool_call_id")
    if tool_call_id is not None and not isinstance(tool_call_id, str):
        return errors.invalid_type(f"{param}.tool_call_id", "a string")
    calls = message.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        return errors.invalid_type(f"{param}.tool_calls", "an array")
    for index, call in enumerate(calls):
        where = f"{param}.tool_calls[{index}]"
        if not isinstance(call, dict):
            return errors.invalid_type(where, "an object")
        if call.get("id") is not None and not isinstance(call["id"], str):
            return errors.invalid_type(f"{where}.id", "a string")
        function = call.get("function")
        if function is not None and not isinstance(function, dict):
            return errors.invalid_type(f"{where}.function", "an object")
        if function is not None and not isinstance(function.get("name", ""), str):
            return errors.invalid_type(f"{where}.function.name", "a string")
    return None


def _tool_choice(body: dict[str, Any]) -> mockmodel.ToolChoice:
    return mockmodel.tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))


def _finish_reason(answer: _Answer) -> str:
    if answer.cut_short:
        return "length"
    return "tool_calls" if answer.reply.kind == "call" else "stop"


def _refuse_unpersisted(record: RequestRecord, items: list[dict[str, Any]], *, store: bool) -> None:
    """A reasoning item sent back without its `encrypted_content` is looked up by id,
    and this upstream stores nothing: a 404, in OpenAI's words (what OpenAI answers a
    client that replays reasoning with `store: false` without having asked for
    `include: ["reasoning.encrypted_content"]`)."""
    missing = unpersisted_reasoning(items)
    if missing is None:
        return
    record.status = 404
    message = f"Item with id '{missing[:64]}' not found."
    if not store:
        message += (
            " Items are not persisted when `store` is set to false. Try again with `store`"
            " set to true, or remove this item from your input."
        )
    raise APIError(None, message, param="input", status=404)


def _decode_request(data: bytes) -> tuple[Any, list[bytes] | None]:
    try:
        return parse_request(data) if data else (None, None)
    except (ValueError, UnicodeDecodeError):
        raise errors.invalid_json("the body is not valid JSON") from None


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        raise errors.invalid_json("the body is not valid JSON") from None


async def serve_until(
    config: SimConfig, stop: asyncio.Event, ready: Callable[[SimServer], Any] | None = None
) -> None:
    server = SimServer(config)
    await server.start()
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        await server.close()
