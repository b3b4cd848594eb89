"""HTTP mode: `POST /v1/responses` (JSON or SSE) and the stored-response endpoints.

Handlers take a parsed request and a `ResponseWriter`; they never touch sockets.
Every response carries `x-request-id` (and, to a web page `--allowed-origin` lets in,
CORS headers: `warmsocket.origins`); errors use OpenAI's JSON error body.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from warmsocket import _core, conversation_routes, errors, ids, item_references
from warmsocket._core import Rejection, parse_client_message
from warmsocket.admission import KeyLimit, KeySlot
from warmsocket.backends.base import TurnFailed
from warmsocket.background import RETAIN_SECONDS, BackgroundResponses, BackgroundRun
from warmsocket.compaction import compact, parse_compact_request
from warmsocket.conversations import with_content_parts
from warmsocket.engine import (
    Engine,
    SharedStoreUnavailable,
    Turn,
    response_object,
    stored_input,
)
from warmsocket.errors import APIError
from warmsocket.http11 import LAST_CHUNK, Request, chunk, encode_response, response_head
from warmsocket.origins import cors_headers, preflight_headers
from warmsocket.pages import cursor_page, list_object, page_params, page_range
from warmsocket.request_rate import RateLimits, RequestRate, TokenRate
from warmsocket.response_stream import dumps
from warmsocket.token_count import parse_count_request
from warmsocket.upstream import UpstreamError

log = logging.getLogger("warmsocket.http")

MAX_RESPONSE_ID_CHARS = 256
"""Longer than any response id (warmsocket's are 53 characters)."""

ANONYMOUS_OWNER = "anonymous"


class ResponseWriter(Protocol):
    """Where a handler writes its response bytes."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def stream_started(self) -> None:
        """The response is a live stream (SSE) from now on: a client that closes its
        side of the connection ends it (one that half-closes is not told apart)."""

    @property
    def closing(self) -> bool: ...

    @property
    def shutting_down(self) -> bool:
        """The server's shutdown timeout has ended with this request under way: its
        handler is cancelled (`Server.close`) and should end the answer at once, with
        a terminal event where one has begun (`_shut_down`)."""

    @property
    def answered(self) -> bool:
        """Bytes of the answer have been written."""


@dataclass(frozen=True, slots=True)
class Auth:
    """API keys and owners: an owner is the id of the API key a request used."""

    api_keys: frozenset[str] = frozenset()

    @staticmethod
    def token(request: Request) -> str | None:
        """The request's bearer token, if it sent one."""
        header = request.header("authorization")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        return token or None

    def owner(self, request: Request) -> str:
        """The owner key of a request. Raises APIError(401) on a bad or missing key.

        With `--owner-by-client-certificate` the connection's certificate names are
        part of it: the same key from two clients whose certificates name different
        things is two owners."""
        token = self.token(request) or ""
        if self.api_keys and token not in self.api_keys:
            raise errors.invalid_api_key()
        identity = request.peer_identity
        if identity is not None:
            both = identity.encode() + b"\0" + token.encode()
            return "peer_" + hashlib.sha256(both).hexdigest()[:24]
        if not token:
            return ANONYMOUS_OWNER
        return "key_" + hashlib.sha256(token.encode()).hexdigest()[:24]


class HTTPApp:
    """The HTTP routes of one server."""

    def __init__(
        self,
        engine: Engine,
        *,
        auth: Auth,
        models: Collection[str],
        ready: Callable[[], bool] = lambda: True,
        access_log: bool = True,
        key_limit: KeyLimit | None = None,
        rate_limits: RateLimits | None = None,
    ) -> None:
        """`access_log`: a log line per request answered (`access_line`). `key_limit`:
        `--max-connections-per-key`, `rate_limits`: `--requests-per-minute-per-key` and
        `--tokens-per-minute-per-key`, all shared with the server's WebSockets."""
        self.engine = engine
        self.key_limit = key_limit or KeyLimit(None)
        self.rate_limits = rate_limits or RateLimits(RequestRate(None), TokenRate(None))
        self.access_log = access_log
        self.auth = auth
        self.models = tuple(models)
        self.ready = ready
        self.draining = False
        """The server is shutting down: `/healthz` says so (503), for load balancers."""
        shared = engine.shared
        self.background = BackgroundResponses(
            board=shared.background_board if shared is not None else None
        )
        engine.still_running = self._still_running

    def _still_running(self, response_id: str, owner: str) -> bool:
        run = self.background.get(response_id, owner)
        return run is not None and not run.finished

    async def handle(self, request: Request, writer: ResponseWriter, *, connection: int) -> bool:
        """Answer one request. Returns whether the connection may be kept alive."""
        request_id = ids.request_id()
        route, path_id, sub = route_of(request.segments)
        started = time.perf_counter()
        status, failure = 500, None
        try:
            status = await self._dispatch(
                request, writer, request_id, route, path_id, sub, connection
            )
        except APIError as error:
            status, failure = error.status, error
            if not error.counted:
                self.engine.metrics.count_error(error.code or error.type)
            writer.write(
                encode_response(
                    error.status,
                    dumps(error.http_body()),
                    headers=[*_headers(request, request_id), *_error_headers(error)],
                    keep_alive=request.keep_alive,
                )
            )
        except asyncio.CancelledError:
            if not _shut_down(writer):
                status = CLIENT_CLOSED  # the client went away before the answer ended
                raise
            # The handler had nothing to end (a stream ends itself): a refusal the SDK
            # retries, unless part of an answer went out already.
            request.keep_alive = False
            failure = errors.shut_down_first()
            status = failure.status if not writer.answered else CLIENT_CLOSED
            if not writer.answered:
                writer.write(
                    encode_response(
                        failure.status,
                        dumps(failure.http_body()),
                        headers=_headers(request, request_id),
                        keep_alive=False,
                    )
                )
        finally:
            if self.access_log and not (route in PROBES and status == 200):
                access_line(request, request_id, status, failure, time.perf_counter() - started)
            # (Requests whose client left count too: status 499.)
            self.engine.metrics.http_request(route, status)
        return request.keep_alive

    async def _dispatch(
        self,
        request: Request,
        writer: ResponseWriter,
        request_id: str,
        route: str,
        path_id: str | None,
        sub: str | None,
        connection: int,
    ) -> int:
        method = request.method
        if is_preflight(request):
            return self._preflight(writer, request, request_id)
        if route == "healthz":
            if method != "GET":
                raise errors.method_not_allowed(method, request.path)
            ok = self.ready() and not self.draining
            status = "ok" if ok else "draining" if self.draining else "starting"
            body = dumps({"status": status})
            return self._json(writer, request, request_id, 200 if ok else 503, body)
        if route == "metrics":
            if method != "GET":
                raise errors.method_not_allowed(method, request.path)
            writer.write(
                encode_response(
                    200,
                    self.engine.metrics.render().encode(),
                    content_type="text/plain; version=0.0.4; charset=utf-8",
                    headers=_headers(request, request_id),
                    keep_alive=request.keep_alive,
                )
            )
            return 200
        owner = self.auth.owner(request)
        if route == "models":
            if method != "GET":
                raise errors.method_not_allowed(method, request.path)
            return self._models(writer, request, request_id, path_id)
        if route == "conversations":
            path = conversation_path(request.segments)
            try:
                code, value = await conversation_routes.answer(
                    self.engine.conversations, request, owner, path
                )
            except SharedStoreUnavailable as exc:
                if not path:  # a create: its id was never given out
                    raise errors.shared_store_unavailable(None, param=None) from None
                raise errors.shared_store_unavailable(exc.response_id, param=None) from None
            return self._json(writer, request, request_id, code, dumps(value))
        if route != "responses":
            raise errors.not_found_route(method, request.path)
        if path_id is None:
            if method == "POST":
                return await self._create(request, writer, request_id, owner, connection)
            if method == "GET":
                raise APIError(
                    "websocket_upgrade_required",
                    "GET /v1/responses is the WebSocket mode endpoint: send a WebSocket "
                    "upgrade, or POST to create a response over HTTP.",
                    status=400,
                )
            raise errors.method_not_allowed(method, request.path)
        if path_id == "compact" and sub is None:
            if method != "POST":
                raise errors.method_not_allowed(method, request.path)
            return await self._compact(request, writer, request_id, owner)
        if len(path_id) > MAX_RESPONSE_ID_CHARS:
            # No response has such an id: not looked up, and a DELETE is not announced
            # to the other processes (which remember the ids announced lately).
            raise errors.response_not_found(path_id)
        if path_id == "input_tokens" and sub is None:
            if method != "POST":
                raise errors.method_not_allowed(method, request.path)
            return await self._input_tokens(request, writer, request_id, owner)
        if sub is None:
            if method == "GET":
                run = self.background.get(path_id, owner)
                streamed = request.query_value("stream") in {"true", "1"}
                if run is not None and streamed:
                    after = _starting_after(request)
                    await self._follow(request, writer, request_id, run, after=after)
                    return 200
                if run is not None:
                    return self._json(writer, request, request_id, 200, run.response_json())
                if streamed:
                    after = _starting_after(request)
                    if await self._follow_elsewhere(
                        request, writer, request_id, owner, path_id, after
                    ):
                        return 200
                    await self._stored_or_elsewhere(owner, path_id)  # unknown: 404
                    where = (
                        ""
                        if self.background.board is not None
                        else " only from the server that runs it (with --redis-url, from any),"
                    )
                    raise errors.unsupported_parameter(
                        "stream",
                        f"Only a background response's events can be streamed again,{where} "
                        f"and only for {int(RETAIN_SECONDS)} s after it ended; retrieve the "
                        "response without 'stream' instead.",
                    )
                try:
                    return await self._retrieve(writer, request, request_id, owner, path_id)
                except APIError as error:
                    # Not stored (yet): a background response another process runs, or
                    # one that failed or was cancelled, as the board shows it.
                    state = await self._elsewhere(error, owner, path_id)
                    return self._json(writer, request, request_id, 200, dumps(state))
            if method == "DELETE":
                return await self._delete(writer, request, request_id, owner, path_id)
            raise errors.method_not_allowed(method, request.path)
        if sub == "input_items" and method == "GET":
            return await self._input_items(writer, request, request_id, owner, path_id)
        if sub == "cancel" and method == "POST":
            run = self.background.get(path_id, owner)
            if run is not None:  # cancelled now, or as it ended
                await self.background.cancel(run)
                return self._json(writer, request, request_id, 200, run.response_json())
            # An unknown id is 404, as for GET and DELETE (spec §6.3, §6.4); a stored
            # background response is given as it ended; any other is 400 (§6.4). One
            # that another process runs is cancelled there.
            try:
                info, _input, output = await self._stored(owner, path_id)
            except APIError as error:
                state = await self._elsewhere(error, owner, path_id, cancel=True)
                return self._json(writer, request, request_id, 200, dumps(state))
            stored = response_object(info, output)
            if stored["background"]:
                return self._json(writer, request, request_id, 200, dumps(stored))
            raise APIError(
                None,
                "Only background responses can be cancelled: create it with 'background': true.",
                param="response_id",
            )
        raise errors.not_found_route(method, request.path)

    # -- routes -----------------------------------------------------------------------------

    async def _create(
        self, request: Request, writer: ResponseWriter, request_id: str, owner: str, connection: int
    ) -> int:
        create = parse_client_message(
            request.body, websocket=False, max_item_bytes=self.engine.cache.max_item_bytes
        )
        if isinstance(create, Rejection):
            raise APIError(
                create.code,
                create.message,
                param=create.param,
                status=create.status,
                type=create.type,
            )
        assert isinstance(create, _core.CreateRequest)
        engine = self.engine
        slot = self._key_slot(owner)
        try:
            await self._count_request(request, owner)
            await self._load_parent(create, owner)
            claimed = await self._claim_conversation(create, owner)
            try:
                await self._fresh_conversation(create, owner)
                turn = engine.prepare(
                    create,
                    owner=owner,
                    connection=connection,
                    lookup_connection=None,
                    framing="sse" if create.stream or create.background else "json",
                    client_key=self.auth.token(request),
                )
            finally:
                if claimed is not None:
                    engine.conversations.unclaim(owner, claimed)  # (the turn holds it)
            if create.background:  # (refused: `BackgroundResponses.start` discards it)
                await self._start_background(request, writer, request_id, turn, slot)
                return 200
            try:
                if create.stream:
                    await self._stream(request, writer, request_id, turn)
                else:
                    await self._complete(request, writer, request_id, turn)
            except BaseException:
                if not turn.finished:
                    turn.discard()  # (its pin and conversation now, not when collected)
                raise
        finally:
            slot.release()  # (a background run's is its own: handed over)
        return 200

    async def _count_request(self, request: Request, owner: str) -> None:
        """Count a create or compaction under `--requests-per-minute-per-key` and
        `--tokens-per-minute-per-key`, or 429; its answer says how many the key has
        left."""
        if self.rate_limits.limited:
            verdict = await self.rate_limits.check(owner)
            if verdict.refusal is not None:
                raise verdict.refusal
            request.answer_headers += verdict.headers

    def _key_slot(self, owner: str) -> KeySlot:
        """A place under `owner`'s `--max-connections-per-key`, or 429."""
        slot = self.key_limit.take(owner)
        if slot is None:
            raise errors.too_many_for_key(self.key_limit.limit or 0)
        return slot

    async def _start_background(
        self, request: Request, writer: ResponseWriter, request_id: str, turn: Turn, slot: KeySlot
    ) -> None:
        """Answer a `background: true` create at once (the response `queued`), or with
        its event stream, which the client may leave: the response runs on, holding
        its create's `slot` until it ends."""
        started = turn.start()  # created, queued
        run = self.background.start(turn, slot.owner, _run_background)
        assert run.task is not None
        held = slot.hand_over()
        run.task.add_done_callback(lambda _task: held.release())
        run.emit(started)
        # On the board before its id is given out: another process finds it at once.
        await self.background.shared()
        if turn.request.stream:
            await self._follow(request, writer, request_id, run, after=-1)
        else:
            self._json(writer, request, request_id, 200, run.response_json())

    async def _follow(
        self,
        request: Request,
        writer: ResponseWriter,
        request_id: str,
        run: BackgroundRun,
        *,
        after: int,
    ) -> None:
        """A background response's events after sequence number `after`, as SSE, then
        live until it ends."""
        await _stream_events(
            request,
            writer,
            request_id,
            lambda write, drain, closing: run.follow(after, write, drain, closing),
        )

    async def _follow_elsewhere(
        self,
        request: Request,
        writer: ResponseWriter,
        request_id: str,
        owner: str,
        rid: str,
        after: int,
    ) -> bool:
        """`_follow` for a background response whose events another process (or this
        one, after its run was forgotten) keeps on the shared board; False when none
        does. Raises APIError 503 when the shared store does not answer."""
        board = self.background.board
        if board is None:
            return False
        try:
            if not await board.can_follow(owner, rid):
                return False
        except SharedStoreUnavailable:
            raise errors.shared_store_unavailable(rid, param=None) from None
        await _stream_events(
            request,
            writer,
            request_id,
            lambda write, drain, closing: board.follow(owner, rid, after, write, drain, closing),
        )
        return True

    async def _load_parent(self, create: _core.CreateRequest, owner: str) -> None:
        """Load `previous_response_id`, and the responses the input's
        `item_reference`s name, from the shared store when only another process has
        them. Raises APIError (a retriable 503) when the store does not answer."""
        engine = self.engine
        if engine.shared is None:
            return
        parent = create.previous_response_id
        try:
            if parent is not None and not engine.cached(parent, owner=owner):
                await engine.load_shared(parent, owner=owner)
            if create.has_item_references:
                # Those Redis has a record of, found in one round trip for all of them.
                named = item_references.referenced_responses(create.input.to_objects())
                missing = [r for r in named if r != parent and not engine.cached(r, owner=owner)]
                for response_id in await engine.shared_candidates(missing, owner=owner):
                    await engine.load_shared(response_id, owner=owner)
        except SharedStoreUnavailable as exc:
            param = "previous_response_id" if exc.response_id == parent else "input"
            raise errors.shared_store_unavailable(exc.response_id, param=param) from None

    async def _claim_conversation(self, create: _core.CreateRequest, owner: str) -> str | None:
        """Hold the conversation a create will add to across processes, before it
        reads it (`Conversations.claim`; nothing without Redis): its id, to
        `unclaim` once the create started or was refused. Raises APIError (400
        `conversation_locked`, or a retriable 503 when Redis does not answer)."""
        conv_id = create.conversation
        if conv_id is None or not create.store or self.engine.conversations.holds is None:
            return None
        try:
            await self.engine.conversations.claim(owner, conv_id)
        except SharedStoreUnavailable:
            raise errors.shared_store_unavailable(conv_id, param="conversation") from None
        return conv_id

    async def _fresh_conversation(self, create: _core.CreateRequest, owner: str) -> None:
        """Make the copy of the create's conversation, if it has one, the conversation as
        Redis has it (`Conversations.fresh`; nothing without Redis). Raises APIError (a
        404, or a retriable 503 when Redis does not answer)."""
        if create.conversation is None:
            return
        try:
            await self.engine.conversations.fresh(owner, create.conversation, param="conversation")
        except SharedStoreUnavailable:
            raise errors.shared_store_unavailable(
                create.conversation, param="conversation"
            ) from None

    async def _input_tokens(
        self, request: Request, writer: ResponseWriter, request_id: str, owner: str
    ) -> int:
        create, has_input = parse_count_request(
            request.body, max_item_bytes=self.engine.cache.max_item_bytes
        )
        await self._load_parent(create, owner)
        await self._fresh_conversation(create, owner)
        count = await self.engine.input_tokens(create, owner=owner, include_input=has_input)
        body = dumps({"object": "response.input_tokens", "input_tokens": count})
        return self._json(writer, request, request_id, 200, body)

    async def _compact(
        self, request: Request, writer: ResponseWriter, request_id: str, owner: str
    ) -> int:
        create, has_input = parse_compact_request(
            request.body, max_item_bytes=self.engine.cache.max_item_bytes
        )
        slot = self._key_slot(owner)  # (a compaction runs the model)
        try:
            await self._count_request(request, owner)
            await self._load_parent(create, owner)
            body = await compact(
                self.engine,
                create,
                has_input=has_input,
                owner=owner,
                client_key=self.auth.token(request),
            )
        finally:
            slot.release()
        return self._json(writer, request, request_id, 200, body)

    async def _stream(
        self, request: Request, writer: ResponseWriter, request_id: str, turn: Turn
    ) -> None:
        frame, end = _start_sse(request, writer, request_id)

        def emit(frames: bytes) -> None:
            if frames:
                writer.write(frame(frames))  # already SSE-framed by the turn's encoder

        try:
            await run_turn(turn, emit, writer.drain, lambda: writer.closing)
        except asyncio.CancelledError:
            if not _shut_down(writer):
                raise
            if not turn.finished:
                emit(turn.fail(errors.server_error(errors.SHUT_DOWN_FIRST)))
            request.keep_alive = False
        writer.write(end)

    async def _complete(
        self, request: Request, writer: ResponseWriter, request_id: str, turn: Turn
    ) -> None:

        def discard(frames: bytes) -> None:
            return None

        async def nothing() -> None:
            return None

        try:
            failure = await run_turn(turn, discard, nothing, lambda: writer.closing)
        except asyncio.CancelledError:
            if not turn.finished and writer.shutting_down:
                turn.fail(errors.server_error(errors.SHUT_DOWN_FIRST))  # (`handle` answers)
            raise
        if failure is not None and (
            400 <= failure.status < 500 or isinstance(failure, UpstreamError)
        ):
            # The model's upstream rejected the request (e.g. context too long), failed
            # (a 5xx, a 503 with the Retry-After it asked for), or warmsocket's upstream
            # configuration is wrong (a 502 saying what to fix): nothing was sent yet,
            # so answer with that error, which the SDK raises or retries (a 200 with a
            # failed Response would read as an empty answer). Trying again cannot help
            # a configuration: the SDK is told not to.
            if isinstance(failure, UpstreamError) and failure.misconfigured:
                failure.headers = {**(failure.headers or {}), "x-should-retry": "false"}
            raise failure
        self._json(writer, request, request_id, 200, turn.stream.response_json())

    async def _retrieve(
        self, writer: ResponseWriter, request: Request, request_id: str, owner: str, rid: str
    ) -> int:
        info, _input, output = await self._stored(owner, rid)
        return self._json(writer, request, request_id, 200, dumps(response_object(info, output)))

    async def _delete(
        self, writer: ResponseWriter, request: Request, request_id: str, owner: str, rid: str
    ) -> int:
        engine = self.engine
        run = self.background.get(rid, owner)
        if run is not None:
            # A background response: stopped if it still runs (then it is not stored),
            # and its events and state forgotten. Found by no other request from now
            # on (a second DELETE meanwhile is a 404, as for a stored response): its
            # cancellation is asked for at once, so it can only end `cancelled`.
            run.forgotten = True
            await self.background.cancel(run)
            self.background.forget(run)
        shared_deleted = False
        # A failed or cancelled one, kept here after its run was forgotten.
        unstored = run is None and self.background.forget_ended(rid, owner)
        if engine.shared is not None:
            # First, and also when it was not cached here: another process may have made
            # it. When Redis cannot be told, nothing is deleted (this process would load
            # it again from Redis, the others would keep serving it): the client retries.
            try:
                # A background response another process runs (not stored yet), or one
                # that failed or was cancelled: looked up before the deletion is
                # announced, as its process then forgets it (and stops it).
                if run is None and not unstored:
                    unstored = await self.background.state_elsewhere(rid, owner) is not None
                shared_deleted = await engine.shared.delete(rid, owner=owner)
            except ConnectionError:
                raise errors.APIError(
                    "server_error",
                    "The response could not be deleted on every server (the shared store "
                    "is unreachable); nothing was deleted. Retry the request.",
                    status=503,
                    type="server_error",
                ) from None
        if (unstored or shared_deleted) and engine.shared is not None:
            # Its record and events (the process that ran it is told, too).
            engine.shared.background_board.forget(owner, rid)
        deleted = engine.cache.delete(rid, owner=owner) or shared_deleted or run is not None
        if deleted:
            engine.forget((rid,))
        if not (deleted or unstored):
            raise errors.response_not_found(rid)
        body = dumps({"id": rid, "object": "response", "deleted": True})
        return self._json(writer, request, request_id, 200, body)

    async def _input_items(
        self, writer: ResponseWriter, request: Request, request_id: str, owner: str, rid: str
    ) -> int:
        run = self.background.get(rid, owner)
        if run is not None and run.turn.stream.status not in STORED_STATUSES:
            # Retrievable but not stored (queued, in progress, failed, cancelled):
            # listed from the run's request, with the ids the stored one would get.
            return self._input_page(writer, request, request_id, rid, run.turn.request.input)
        try:
            info, input_items, _output = await self._stored(owner, rid)
        except APIError as error:
            sent_input = await self._unstored_input(error, owner, rid, run)
            return self._input_page(writer, request, request_id, rid, sent_input)
        sent = stored_input(info)
        if sent is not None:
            limit, order = page_params(request)
            after = request.query_value("after")
            items = [listed_input_item(item, rid, i) for i, item in enumerate(sent)]
            body = dumps(cursor_page(items, after=after, limit=limit, order=order))
            return self._json(writer, request, request_id, 200, body)
        return self._input_page(writer, request, request_id, rid, input_items)

    def _input_page(
        self,
        writer: ResponseWriter,
        request: Request,
        request_id: str,
        rid: str,
        input_items: _core.Items,
    ) -> int:
        """The page of `input_items` the request asks for (`after`, `limit`, `order`)."""
        limit, order = page_params(request)
        after = request.query_value("after")
        # Only the page's items are converted: a client paging through a long input
        # would otherwise convert all of it for every page.
        item_ids = [
            item_id or ids.input_item_id(rid, i) for i, item_id in enumerate(input_items.ids())
        ]
        start, end, has_more = page_range(item_ids, after, limit, order)
        page = input_items.slice(start, end).to_objects()
        listed = [listed_input_item(item, rid, start + i) for i, item in enumerate(page)]
        body = dumps(list_object(listed, order=order, has_more=has_more))
        return self._json(writer, request, request_id, 200, body)

    async def _unstored_input(
        self, error: APIError, owner: str, rid: str, run: BackgroundRun | None
    ) -> _core.Items:
        """After `error` from the stored responses: the input of a background response
        that is retrievable but not stored (its run's, the one kept after a failed or
        cancelled run, or what another process running it published), or `error`
        again."""
        if error.status != 404:
            raise error
        if run is not None:  # (completed, then evicted from the cache)
            return run.turn.request.input
        await self._elsewhere(error, owner, rid)  # not deleted, and still kept
        kept = self.background.ended_input(rid, owner)
        if kept is not None:
            return kept
        board = self.background.board
        if board is None:
            raise error
        try:
            published = await board.get_input(owner, rid)
        except SharedStoreUnavailable:
            raise errors.shared_store_unavailable(rid, param="response_id") from None
        if published is None:
            raise error
        try:
            return _core.Items.parse(published, max_item_bytes=max(len(published), 1))
        except (_core.InvalidItems, ValueError):
            log.error("an unreadable background response input was ignored")
            raise error from None

    def _models(
        self, writer: ResponseWriter, request: Request, request_id: str, model_id: str | None
    ) -> int:
        cards = [
            {"id": m, "object": "model", "created": 0, "owned_by": "warmsocket"}
            for m in self.models
        ]
        if model_id is not None:
            for card in cards:
                if card["id"] == model_id:
                    return self._json(writer, request, request_id, 200, dumps(card))
            raise APIError(
                "model_not_found", f"The model '{model_id[:128]}' does not exist.", status=404
            )
        return self._json(
            writer, request, request_id, 200, dumps({"object": "list", "data": cards})
        )

    # -- helpers ----------------------------------------------------------------------------

    async def _unstored_state(
        self, owner: str, rid: str, *, cancel: bool = False
    ) -> dict[str, Any] | None:
        """The state of a background response that is not stored and does not run
        here: one that failed or was cancelled here, or one on the shared board
        (cancelled first when `cancel`); None when there is none. Raises APIError 503
        when the shared store does not answer."""
        background = self.background
        try:
            if cancel:
                return await background.cancel_elsewhere(rid, owner)
            return await background.state_elsewhere(rid, owner)
        except SharedStoreUnavailable:
            raise errors.shared_store_unavailable(rid, param=None) from None

    async def _elsewhere(
        self, error: APIError, owner: str, rid: str, *, cancel: bool = False
    ) -> dict[str, Any]:
        """After `error` from the stored responses: the background response's state
        (`_unstored_state`), or `error` again when it is not a 'not found' or there is
        no such response."""
        if error.status != 404:
            raise error
        state = await self._unstored_state(owner, rid, cancel=cancel)
        if state is None:
            raise error
        return state

    async def _stored_or_elsewhere(self, owner: str, rid: str) -> None:
        """Raise 404 unless the response is stored or has an unstored state."""
        try:
            await self._stored(owner, rid)
        except APIError as error:
            await self._elsewhere(error, owner, rid)

    async def _stored(
        self, owner: str, rid: str
    ) -> tuple[_core.ResponseInfo, _core.Items, _core.Items]:
        engine = self.engine
        cache = engine.cache
        if engine.shared is not None and not engine.cached(rid, owner=owner):
            try:
                await engine.load_shared(rid, owner=owner)
            except SharedStoreUnavailable:
                raise errors.shared_store_unavailable(rid, param=None) from None
        try:
            info = cache.get(rid, owner=owner)
            _own_input, output = cache.own_items(rid, owner=owner)
            # What the client sent: with prefix diffing, the re-sent history too.
            input_items = cache.input_items(rid, owner=owner)
        except _core.ResponseNotFound:
            raise errors.response_not_found(rid) from None
        return info, input_items, output

    @staticmethod
    def _json(
        writer: ResponseWriter, request: Request, request_id: str, status: int, body: bytes
    ) -> int:
        writer.write(
            encode_response(
                status, body, headers=_headers(request, request_id), keep_alive=request.keep_alive
            )
        )
        return status

    @staticmethod
    def _preflight(writer: ResponseWriter, request: Request, request_id: str) -> int:
        """A browser's CORS preflight. Only an allowed page's gets this far (the server
        refuses other origins first); without an `Origin` it is not one: 405."""
        origin = request.headers.get("origin")
        if origin is None:
            raise errors.method_not_allowed(request.method, request.path)
        requested = request.header("access-control-request-headers")
        headers = [("x-request-id", request_id), *preflight_headers(origin, requested)]
        if not request.keep_alive:
            headers.append(("connection", "close"))
        writer.write(response_head(204, headers))
        return 204


STORED_STATUSES = frozenset({"completed", "incomplete"})
"""How a background response ends when it is stored (otherwise it is not)."""
CLIENT_CLOSED = 499
"""The status an access line gives a request whose client went away first (nginx's)."""
PROBES = frozenset({"healthz", "metrics"})
"""The routes of probes and scrapes: answered past --max-connections and on
--metrics-port, and not logged when they succeed (they come every few seconds)."""


def access_line(
    request: Request | None,
    request_id: str,
    status: int,
    error: APIError | None,
    seconds: float | None = None,
) -> None:
    """One log line per HTTP request: what was asked and how it ended, never its body
    or query (the path's ids are ids, not content). `request` None: one the connection
    answered before it was read whole (unparsable, too large, too slow)."""
    log.info(
        "http request",
        extra={
            "request_id": request_id,
            "method": request.method[:16] if request is not None else None,
            "path": request.path[:200] if request is not None else None,
            "status": status,
            "error_type": errors.log_label(error.type) if error is not None else None,
            "code": errors.log_label(error.code) if error is not None else None,
            "seconds": round(seconds, 6) if seconds is not None else None,
        },
    )


def _headers(request: Request, request_id: str) -> list[tuple[str, str]]:
    """The headers every answer to `request` carries."""
    headers = [("x-request-id", request_id), *request.answer_headers]
    origin = request.headers.get("origin")
    if origin is not None:  # an allowed web page's (the server refused the others)
        headers += cors_headers(origin)
    return headers


async def run_turn(
    turn: Turn,
    emit: Callable[[bytes], None],
    drain: Callable[[], Awaitable[None]],
    closing: Callable[[], bool],
    *,
    started: bool = False,
) -> APIError | None:
    """Drive one HTTP-mode turn from `response.created` (or, `started`, from where
    the caller left it) to its terminal event.

    Returns the error the response failed with, if it failed.
    """
    if not started:
        emit(turn.start())
    if not turn.request.generate:
        await turn.count_input_tokens_off_loop()  # (a warm-up's large input too)
        return _finish(turn, emit)
    if closing():  # gone already: do not start the model
        turn.abandon()
        return None
    engine = turn.engine
    failure: APIError | None = None
    await turn.count_input_tokens_off_loop()  # a large input, not on the event loop
    stream = engine.model_stream(turn)
    try:
        async for item in stream:
            events = item if isinstance(item, list) else (item,)
            for event in events:
                if isinstance(event, TurnFailed):
                    emit(turn.fail(event.error))
                    failure = event.error
                    break
                emit(turn.feed(event))
            if failure is not None:
                break
            await drain()
            if closing():
                turn.abandon()
                return None
    except asyncio.CancelledError:
        if not turn.finished and closing():  # the client left while the model ran
            turn.abandon()
        raise  # (a background response's cancel: its caller ends the turn)
    except APIError as error:
        emit(turn.fail(error))
        return error
    except Exception:
        log.exception("backend error")
        failure = errors.model_failed()
        emit(turn.fail(failure))
        return failure
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
        if not turn.finished and closing():
            turn.abandon()
    if failure is not None:
        return failure
    return _finish(turn, emit)


def _finish(turn: Turn, emit: Callable[[bytes], None]) -> APIError | None:
    """End the turn `completed` (stored); when storing fails, `response.failed` (the
    error returned), in the turn's events as any failure: a stream's 200 head and
    first events have gone out, so no HTTP error can follow them."""
    try:
        emit(turn.complete())
    except APIError as error:
        emit(turn.fail(error))
        return error
    except Exception as exc:  # a bug: the client is told, the turn ends failed
        log.error("cannot end a response", extra={"error_type": type(exc).__name__})
        failure = errors.server_error()
        emit(turn.fail(failure))
        return failure
    return None


def _start_sse(
    request: Request, writer: ResponseWriter, request_id: str
) -> tuple[Callable[[bytes], bytes], bytes]:
    """The head of a streamed (SSE) answer; the connection is a stream now. Returns
    how to frame the body's pieces and what ends it: chunks and the last chunk, or
    for an HTTP/1.0 request (a proxy's default, nginx's), which may not be answered
    chunked, the bytes as they are and the connection's close."""
    headers = [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("cache-control", "no-cache"),
        *_headers(request, request_id),
    ]
    if request.http10:
        request.keep_alive = False  # the end of the body is the connection's
    else:
        headers.append(("transfer-encoding", "chunked"))
    if not request.keep_alive:
        headers.append(("connection", "close"))
    writer.stream_started()
    writer.write(response_head(200, headers))
    if request.http10:
        return bytes, b""
    return chunk, LAST_CHUNK


async def _run_background(run: BackgroundRun) -> None:
    """A background response's turn, from `response.in_progress` to its end."""
    turn = run.turn
    run.emit(turn.stream.in_progress())

    async def nothing() -> None:
        return None

    await run_turn(turn, run.emit, nothing, lambda: False, started=True)


EventSource = Callable[
    [Callable[[bytes], None], Callable[[], Awaitable[None]], Callable[[], bool]], Awaitable[None]
]
"""Writes a background response's events with (write, drain, closing) until it ends."""


async def _stream_events(
    request: Request, writer: ResponseWriter, request_id: str, follow: EventSource
) -> None:
    """Answer with the events `follow` writes, as one SSE body."""
    frame, end = _start_sse(request, writer, request_id)
    try:
        await follow(
            lambda frames: writer.write(frame(frames)), writer.drain, lambda: writer.closing
        )
    except asyncio.CancelledError:
        # At shutdown the body ends where it is, as when the response is cancelled
        # (this process's runs are, next: `Server.close`), not cut in the middle.
        if not _shut_down(writer):
            raise
        request.keep_alive = False
    writer.write(end)


def _shut_down(writer: ResponseWriter) -> bool:
    """Whether the cancellation being handled is the server's shutdown
    (`ResponseWriter.shutting_down`), not the client leaving; if so it is taken: the
    task goes on, to end its answer."""
    if not writer.shutting_down:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


MAX_SEQUENCE_NUMBER = 2**63 - 1
"""The largest `starting_after`: past it, no event's sequence number (and no entry of
the Redis stream that holds them elsewhere)."""


def _starting_after(request: Request) -> int:
    """The `starting_after` query parameter (-1 without one). Raises APIError."""
    value = request.query_value("starting_after")
    if value is None:
        return -1
    try:
        after = int(value)
    except ValueError:
        raise errors.invalid_type("starting_after", "an integer") from None
    if after > MAX_SEQUENCE_NUMBER:
        raise errors.invalid_value(
            "starting_after",
            f"Invalid 'starting_after': expected at most {MAX_SEQUENCE_NUMBER}.",
        )
    return after


def listed_input_item(item: dict[str, Any], response_id: str, index: int) -> dict[str, Any]:
    """An input item as `GET .../input_items` lists it: with an id, content as parts."""
    listed = dict(item)
    given = listed.get("id")
    if not isinstance(given, str) or not given:
        # (As `page_range` pages it: a null or empty id is no cursor a client could send.)
        listed["id"] = ids.input_item_id(response_id, index)
    return with_content_parts(listed)


def is_preflight(request: Request) -> bool:
    """A browser's CORS preflight (answered without a key)."""
    return request.method == "OPTIONS" and "access-control-request-method" in request.headers


def needs_key(request: Request, route: str) -> bool:
    """Whether answering `request` (to `route`) checks its API key: all but preflights
    and the probes (`/healthz`, `/metrics`), as `HTTPApp` answers them."""
    return not is_preflight(request) and route not in PROBES


def route_of(segments: list[str]) -> tuple[str, str | None, str | None]:
    """(route, id, sub-resource) of a path's segments (`Request.segments`); `/v1` is
    optional."""
    parts = segments
    if parts and parts[0] == "v1":
        parts = parts[1:]
    if not parts:
        return ("root", None, None)
    head = parts[0]
    if head in {"healthz", "metrics"} and len(parts) == 1:
        return (head, None, None)
    if head == "models":
        # A model id may hold slashes (`Qwen/Qwen2.5-7B-Instruct`, as vLLM and Hugging
        # Face name them): all of the rest is the id.
        return (head, "/".join(parts[1:]) or None, None)
    if head == "responses" and len(parts) <= 3:
        return (head, parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else None)
    if head == "conversations" and len(parts) <= 4:
        return (head, parts[1] if len(parts) > 1 else None, "/".join(parts[2:]) or None)
    return ("unknown", None, None)


def conversation_path(segments: list[str]) -> list[str]:
    """The segments of a `/v1/conversations/...` path after `conversations`."""
    parts = segments
    if parts and parts[0] == "v1":
        parts = parts[1:]
    return parts[1:]


def _error_headers(error: APIError) -> list[tuple[str, str]]:
    return list(error.headers.items()) if error.headers else []


__all__ = ["Auth", "HTTPApp", "needs_key", "route_of", "run_turn"]
