"""The Sans-I/O state of one WebSocket-mode connection.

`ResponsesSession` takes client messages, model events and clock ticks in, and puts
what should happen in its outbox: data to send (`bytes`: one or more events, framed
as the connection's `framing` asks — WebSocket text frames, msgpack binary frames, or
JSON lines for tests), `StartModel` / `StopModel` for the backend,
`CloseConnection`. It never raises on bad client input (every problem becomes an
error event) and performs no I/O, so tests drive it without sockets or an event loop.

Each client message is decoded and validated by one call into Rust
(`_core.parse_client_message`); each model event is encoded by one call into the
turn's Rust `ResponseEncoder`.

Rules implemented here (spec §2, §3.7, §5):

* lanes: FIFO per `stream_id`, concurrent across lanes, at most 16 active responses
  per connection (more are queued, never rejected), at most 32 named lanes;
* `previous_response_id` resolves from this connection's entries, then stored ones;
* each lane's latest response is pinned in the cache; a failed same-lane
  continuation evicts its parent, a failed fork keeps it;
* steering: accepted / pending / failed, `incomplete` with reason `steered` and an
  automatic successor on the same lane;
* lifetime: `websocket_connection_limit_reached`, then a clean close once in-flight
  responses finish (bounded by a grace period);
* disconnect: in-flight and queued work is cancelled and connection-local state freed.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from warmsocket import errors, ids, item_references
from warmsocket._core import (
    Binding,
    CreateRequest,
    Items,
    Rejection,
    SteerRequest,
    frame_event,
    message_stream_id,
    parse_client_message,
)
from warmsocket.backends.base import ModelEvent, TextDelta, TurnFailed
from warmsocket.engine import Engine, Framing, Turn
from warmsocket.errors import APIError
from warmsocket.response_stream import dumps

log = logging.getLogger("warmsocket.session")

# How many finished response ids a connection remembers for steering replies.
_FINISHED_MEMORY = 256


@dataclass(frozen=True, slots=True)
class StartModel:
    """Run the backend for this turn and feed its events back."""

    turn: Turn


@dataclass(frozen=True, slots=True)
class StopModel:
    """Cancel the backend work of this turn; later events for it are ignored."""

    turn: Turn


@dataclass(frozen=True, slots=True)
class CloseConnection:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class LaneRejection:
    """A message refused before it was read as a request (too large, not valid JSON,
    not a known event) that names its lane: its error goes to that lane, in order, as
    a refused create's does."""

    error: APIError
    stream_id: str


Action = bytes | StartModel | StopModel | CloseConnection
Message = (
    CreateRequest | SteerRequest | Rejection | LaneRejection | APIError | CloseConnection | None
)
"""A decoded client message (`parse_message`); an APIError or LaneRejection when it
was too large; a CloseConnection (1007) for a text message that is not UTF-8."""

NOT_UTF8 = CloseConnection(1007, "a text message must be UTF-8: send JSON encoded as UTF-8")
"""RFC 6455 §8.1: a text message that is not UTF-8 fails the connection."""


@dataclass(slots=True)
class _Pending:
    """A queued create: validated, or carrying the error to report when its turn comes."""

    request: CreateRequest | None
    error: APIError | None
    previous_response_id: str | None
    # Steering that becomes this request's input prefix (automatic successors).
    steer_ids: tuple[str, ...] = ()
    nbytes: int = 0
    """What it holds while it waits (its input items and settings), counted against
    `Limits.max_queued_bytes`."""


@dataclass(slots=True)
class _PendingSteer:
    """Accepted steering waiting for the client's explicit continuation (steer.pending)."""

    target_id: str
    items: Items
    steer_ids: list[str]


@dataclass(slots=True)
class _Lane:
    name: str | None
    queue: deque[_Pending] = field(default_factory=deque)
    active: Turn | None = None
    head: Binding | None = None
    head_id: str | None = None
    in_ready: bool = False
    pending_steer: _PendingSteer | None = None


class ResponsesSession:
    """One WebSocket-mode connection's protocol state."""

    def __init__(
        self,
        engine: Engine,
        *,
        owner: str,
        now: float,
        framing: Framing = "json",
        client_key: str | None = None,
    ) -> None:
        """`client_key`: the bearer token the connection was opened with
        (`TurnContext.client_key`)."""
        self.engine = engine
        self.client_key = client_key
        self.limits = engine.limits
        self.owner = owner
        self.framing: Framing = framing
        self._format: Literal["json", "msgpack"] = "msgpack" if framing == "msgpack" else "json"
        self._max_item_bytes = engine.cache.max_item_bytes
        self.connection = engine.cache.open_connection()
        self.opened_at = now
        self.deadline = now + self.limits.connection_lifetime
        self.close_deadline: float | None = None
        self.outbox: list[Action] = []
        self.expired = False
        self.draining = False
        """The server is shutting down (`drain`)."""
        self.closed = False
        self._lanes: dict[str | None, _Lane] = {}
        self._named_lanes = 0
        self._ready: deque[_Lane] = deque()
        self._pumping = False
        """A `_pump` loop is running: a response that ends inside it (a warm-up ends at
        once) only marks its lane ready, and that loop starts what comes next."""
        self._active: dict[str, tuple[Turn, _Lane]] = {}
        self._queued = 0
        self._queued_bytes = 0
        # response id -> (stream_id, next sequence number) of recently finished responses
        self._finished: OrderedDict[str, tuple[str | None, int]] = OrderedDict()

    # -- inputs -------------------------------------------------------------------------

    def receive_message(self, data: bytes | str, *, text: bool = False) -> None:
        """One client message (a text or binary WebSocket message; `text`: the bytes
        of a text message, which must be UTF-8)."""
        if self.closed:
            return
        self.receive_parsed(self.parse_message(data, text=text))

    def parse_message(self, data: bytes | str, *, text: bool = False) -> Message:
        """Decode and validate one client message; changes no state.

        With `receive_parsed`, this is `receive_message` in two steps, so that the
        asyncio layer can look at a request (`unresolved_parent`) and do I/O before
        the session sees it."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        size = len(data)
        if size > self.limits.max_message_bytes:
            error = errors.message_too_large(size, self.limits.max_message_bytes)
            lane = message_stream_id(data) if self._format == "json" else None
            return error if lane is None else LaneRejection(error, lane)
        parsed = parse_client_message(
            data, max_item_bytes=self._max_item_bytes, format=self._format
        )
        if text and type(parsed) is Rejection and not _is_utf8(data):
            # (Checked only for a message refused: the parser reads UTF-8 alone.)
            return NOT_UTF8
        if type(parsed) is Rejection and self._format == "json":
            assert isinstance(parsed, Rejection)
            if parsed.stage == "message" and (lane := message_stream_id(data)) is not None:
                # Not valid JSON (a lone surrogate, a NaN, too deep) or no known event,
                # but its lane can be read: the SDK's lane waits for an answer there
                # (on the default lane it would wait for ever).
                return LaneRejection(_api_error(parsed), lane)
        return parsed

    def receive_parsed(self, parsed: Message) -> None:
        """One client message, as `parse_message` returned it."""
        if self.closed:
            return
        kind = type(parsed)
        if kind is CreateRequest:
            assert isinstance(parsed, CreateRequest)
            self._receive_create(parsed, parsed.stream_id, None)
        elif kind is Rejection:
            assert isinstance(parsed, Rejection)
            if parsed.stage == "create":
                self._receive_create(None, parsed.stream_id, parsed)
            elif parsed.stage == "steer":
                self._reject_steer(parsed)
            else:
                self._error(_api_error(parsed), None)
        elif kind is SteerRequest:
            assert isinstance(parsed, SteerRequest)
            self._receive_steer(parsed)
        elif kind is LaneRejection:
            assert isinstance(parsed, LaneRejection)
            if parsed.stream_id not in self._lanes:
                # Nothing on that lane to keep in order with: answered now, and no lane
                # is opened (nor counted against --max-lanes) for a message not read.
                self._error(parsed.error, parsed.stream_id)
            else:
                self._receive_create(None, parsed.stream_id, parsed.error)
        elif kind is CloseConnection:
            assert isinstance(parsed, CloseConnection)
            self.engine.metrics.count_error("invalid_utf8")
            log.info("connection failed: a text message was not UTF-8", extra={"code": 1007})
            self.outbox.append(parsed)
            self.connection_lost()
        elif isinstance(parsed, APIError):
            self._error(parsed, None)
        # None: `response.processed` (Codex), ignored (spec §2.3).

    def refuse_create(self, request: CreateRequest, error: APIError) -> None:
        """A create the asyncio layer could not hand over as it is: its parent could not
        be loaded (the shared store did not answer). `error` goes to the create's lane,
        in order with that lane's other requests; the lane's head stays (the chain is
        not lost, and continues once the store answers again)."""
        if self.closed:
            return
        self._receive_create(None, request.stream_id, error)

    def unresolved_parent(self, parsed: Message) -> str | None:
        """The `previous_response_id` of a create that this connection cannot resolve
        from the local cache and that is not running here either, else None.

        The asyncio layer may then fetch it from a shared store before handing the
        message to `receive_parsed` (the session itself does no I/O)."""
        if type(parsed) is not CreateRequest:
            return None
        assert isinstance(parsed, CreateRequest)
        parent = parsed.previous_response_id
        if parent is None or parent in self._active or self.closed:
            return None
        try:
            self.engine.cache.get(parent, owner=self.owner, connection=self.connection)
        except LookupError:
            return parent
        return None

    def unresolved_references(self, parsed: Message) -> list[str]:
        """The responses the `item_reference`s of a create name that this connection
        cannot find in the local cache: the asyncio layer may fetch them from a shared
        store first, as it does the parent (`unresolved_parent`)."""
        if type(parsed) is not CreateRequest or self.closed:
            return []
        assert isinstance(parsed, CreateRequest)
        if not parsed.has_item_references:
            return []
        named = item_references.referenced_responses(parsed.input.to_objects())
        return [
            response_id
            for response_id in named
            if not self.engine.cached(response_id, owner=self.owner, connection=self.connection)
        ]

    def model_event(self, turn: Turn, event: ModelEvent) -> None:
        """One event from the backend for `turn`."""
        if turn.finished or self.closed:
            return
        if isinstance(event, TurnFailed):
            self._fail(turn, event.error)
            return
        if turn.interrupt_requested and turn.starts_new_item(event):
            self._interrupt(turn)
            return
        frames = turn.feed(event)
        if frames:
            self.outbox.append(frames)

    def model_events(self, turn: Turn, events: list[ModelEvent]) -> None:
        """Events from the backend for `turn` that were ready together: their frames
        go out as one write."""
        if turn.finished or self.closed:
            return
        frames: list[bytes] = []
        i, count = 0, len(events)
        while i < count:
            event = events[i]
            if isinstance(event, TurnFailed) or (
                turn.interrupt_requested and turn.starts_new_item(event)
            ):
                if frames:
                    self.outbox.append(b"".join(frames))
                self.model_event(turn, event)
                return
            if type(event) is TextDelta:
                # A run of text deltas is one message: one call encodes it (only its
                # first delta can be an item boundary, checked above).
                end = i + 1
                while end < count and type(events[end]) is TextDelta:
                    end += 1
                encoded = turn.feed_texts([e.text for e in events[i:end] if type(e) is TextDelta])
                i = end
            else:
                encoded = turn.feed(event)
                i += 1
            if encoded:
                frames.append(encoded)
        if frames:
            self.outbox.append(b"".join(frames))

    def model_done(self, turn: Turn) -> None:
        """The backend finished `turn` normally."""
        if turn.finished or self.closed:
            return
        self._complete(turn)

    def model_error(self, turn: Turn, error: APIError | None = None) -> None:
        """The backend raised: the response fails with `server_error` (or `error`)."""
        if turn.finished or self.closed:
            return
        self._fail(turn, error or errors.model_failed())

    def tick(self, now: float) -> None:
        """Advance the lifetime clock."""
        if self.closed:
            return
        if not self.expired and not self.draining and now >= self.deadline:
            self._expire(now)
        ending = self.expired or self.draining
        if ending and self.close_deadline is not None and now >= self.close_deadline:
            if self.draining:
                reason = errors.SHUT_DOWN_FIRST
                self._drop_queued(errors.draining_connection())
            else:
                reason = "The connection lifetime ended first."
            for turn, _lane in list(self._active.values()):
                self.outbox.append(StopModel(turn))
                self._fail(turn, errors.server_error(reason))
        self._maybe_close()

    def next_deadline(self) -> float | None:
        """When `tick` should next be called."""
        if self.closed:
            return None
        return self.close_deadline if self.expired or self.draining else self.deadline

    def drain(self, now: float, grace: float) -> None:
        """The server is shutting down (spec §1.7, §5.6): new creates are refused
        (`errors.draining_connection`, on their lane); the responses under way, and those
        queued before, run on for at most `grace` seconds (`tick` then fails them); the
        connection closes with 1001 (going away: the SDK reconnects on it) as soon as
        none is left, at once when none is."""
        if self.closed or self.draining:
            return
        self.draining = True
        deadline = now + grace
        if self.close_deadline is None or deadline < self.close_deadline:
            self.close_deadline = deadline
        self._maybe_close()

    def connection_lost(self) -> None:
        """The socket is gone: cancel everything and free this connection's state."""
        if self.closed:
            return
        self.closed = True
        for turn, _lane in list(self._active.values()):
            self.outbox.append(StopModel(turn))
            turn.abandon()
        self._active.clear()
        for lane in self._lanes.values():
            lane.queue.clear()
            lane.active = None
            if lane.head is not None:
                lane.head.release()
                lane.head = None
        self._ready.clear()
        self._queued = self._queued_bytes = 0
        self.engine.close_connection(self.connection)

    def take_outbox(self) -> list[Action]:
        outbox, self.outbox = self.outbox, []
        return outbox

    @property
    def active_responses(self) -> int:
        return len(self._active)

    @property
    def queued_requests(self) -> int:
        return self._queued

    @property
    def named_lanes(self) -> int:
        return self._named_lanes

    def lane_head(self, stream_id: str | None) -> str | None:
        lane = self._lanes.get(stream_id)
        return None if lane is None else lane.head_id

    # -- creates ------------------------------------------------------------------------

    def _receive_create(
        self,
        request: CreateRequest | None,
        stream_id: str | None,
        rejection: Rejection | APIError | None,
    ) -> None:
        if self.draining:
            self._error(errors.draining_connection(), stream_id)
            return
        if self.expired:
            # On the create's lane, as the queued creates' answers at expiry: the SDK
            # routes an error without stream_id to the default lane, and a named lane
            # would wait for its answer until the socket closes (spec Q13).
            self._error(errors.connection_limit_reached(self._lifetime_minutes()), stream_id)
            return
        lane = self._lanes.get(stream_id)
        new_named = lane is None and stream_id is not None
        if new_named and self._named_lanes >= self.limits.max_named_lanes:
            self._error(errors.stream_limit_reached(self.limits.max_named_lanes), stream_id)
            return
        nbytes = 0 if request is None else request.input.nbytes + len(request.settings_json)
        # Checked before a new lane is made: a create refused for a full queue (a
        # passing overload) must not use up one of the connection's named lanes.
        refusal = self._queue_refusal(lane, nbytes)
        if refusal is not None:
            self._error(refusal, stream_id)
            return
        if lane is None:
            lane = self._new_lane(stream_id)
        if request is not None:
            pending = _Pending(request, None, request.previous_response_id, nbytes=nbytes)
        else:
            assert rejection is not None
            if isinstance(rejection, APIError):  # unparsed: no parent known
                pending = _Pending(None, rejection, None)
            else:
                pending = _Pending(None, _api_error(rejection), rejection.previous_response_id)
        lane.queue.append(pending)
        self._queued += 1
        self._queued_bytes += pending.nbytes
        self._make_ready(lane)
        self._pump()

    def starts_now(self, stream_id: str | None) -> bool:
        """Whether a create on lane `stream_id` received now would start at once (an
        idle lane, a free active slot), not wait in the lane's queue."""
        return self._starts_now(self._lanes.get(stream_id))

    def _starts_now(self, lane: _Lane | None) -> bool:
        idle = lane is None or (lane.active is None and not lane.queue)
        return idle and len(self._active) < self.limits.max_active_responses

    def _queue_refusal(self, lane: _Lane | None, nbytes: int) -> APIError | None:
        """Why a create holding `nbytes` cannot wait on `lane` (None: a new lane), or
        None. The queue's limits count only when it would wait: one that starts at once
        (an idle lane, a free active slot) waits in no queue."""
        if self._starts_now(lane):
            return None
        if self._queued >= self.limits.max_queued_requests:
            return errors.too_many_queued(self.limits.max_queued_requests)
        if self._queued_bytes + nbytes > self.limits.max_queued_bytes:
            return errors.queued_bytes_exceeded(self.limits.max_queued_bytes)
        return None

    def _new_lane(self, stream_id: str | None) -> _Lane:
        if stream_id is not None:
            self._named_lanes += 1
        lane = _Lane(stream_id)
        self._lanes[stream_id] = lane
        return lane

    def _make_ready(self, lane: _Lane) -> None:
        if lane.active is None and lane.queue and not lane.in_ready:
            lane.in_ready = True
            self._ready.append(lane)

    def _pump(self) -> None:
        """Start queued requests while there is room.

        Never re-entered: a response that ends while a request starts (a warm-up,
        `generate: false`, completes inside `_start`) calls back here through
        `_after_terminal`; recursing would add frames per queued warm-up and overflow
        the stack with a long pipelined queue, so the running loop goes on instead."""
        if self._pumping:
            return
        self._pumping = True
        try:
            self._pump_ready()
        finally:
            self._pumping = False

    def _pump_ready(self) -> None:
        limit = self.limits.max_active_responses
        while self._ready and len(self._active) < limit and not self.closed:
            lane = self._ready.popleft()
            lane.in_ready = False
            if lane.active is not None or not lane.queue:
                continue
            pending = lane.queue.popleft()
            self._queued -= 1
            self._queued_bytes -= pending.nbytes
            self._start(lane, pending)
            self._make_ready(lane)

    def _start(self, lane: _Lane, pending: _Pending) -> None:
        if pending.error is not None or pending.request is None:
            self._reject(lane, pending.error or errors.server_error(), pending.previous_response_id)
            return
        request = pending.request
        prepend: Items | None = None
        steer = lane.pending_steer
        if steer is not None and request.previous_response_id == steer.target_id:
            prepend = steer.items
        try:
            turn = self.engine.prepare(
                request,
                owner=self.owner,
                connection=self.connection,
                lookup_connection=self.connection,
                stream_id=lane.name,
                prepend=prepend,
                framing=self.framing,
                client_key=self.client_key,
            )
        except APIError as error:
            if pending.steer_ids:
                self._steer_failed_ids(pending, error, lane)
            self._reject(lane, error, request.previous_response_id)
            return
        except Exception:
            # A bug (logged by type; the formatters never write its text). A queued
            # create starts from a model task's end, where nothing else would answer
            # it: it gets a server_error on its lane, and the lane goes on.
            log.exception("unhandled error starting a response")
            failure = errors.server_error()
            if pending.steer_ids:
                self._steer_failed_ids(pending, failure, lane)
            self._reject(lane, failure, request.previous_response_id)
            return
        if prepend is not None:
            lane.pending_steer = None
        self._active[turn.response_id] = (turn, lane)
        lane.active = turn
        self.outbox.append(turn.start())
        if request.generate or turn.tokenize_off_loop:
            # (A warm-up whose input or prompt is large is counted in a worker thread
            # by the model task, which then completes it without asking the model.)
            self.outbox.append(StartModel(turn))
        else:
            self._complete(turn)

    def _reject(self, lane: _Lane, error: APIError, previous_id: str | None) -> None:
        """A request that never started: one error event on its lane."""
        self._error(error, lane.name)
        if previous_id is not None and previous_id == lane.head_id and error.status >= 400:
            self._evict_head(lane)

    # -- terminals ----------------------------------------------------------------------

    def _complete(self, turn: Turn) -> None:
        try:
            frames = turn.complete()
        except APIError as error:
            self._fail(turn, error)
            return
        self.outbox.append(frames)
        self._after_terminal(turn, turn.end_status)  # completed, or incomplete

    def _interrupt(self, turn: Turn) -> None:
        """Stop a steered response at an item boundary: `incomplete` with reason `steered`."""
        self.outbox.append(StopModel(turn))
        try:
            frames = turn.incomplete("steered")
        except APIError as error:
            self._fail(turn, error)
            return
        self.outbox.append(frames)
        self._after_terminal(turn, "incomplete")

    def _fail(self, turn: Turn, error: APIError) -> None:
        self.outbox.append(turn.fail(error))
        self._after_terminal(turn, "failed")

    def _after_terminal(self, turn: Turn, status: str) -> None:
        _turn, lane = self._active.pop(turn.response_id)
        lane.active = None
        self._remember_finished(turn)
        if status == "failed":
            if turn.parent_id is not None and turn.parent_id == lane.head_id:
                self._evict_head(lane)
        else:
            self._advance_head(lane, turn.response_id)
        if turn.steers:
            self._settle_steers(turn, lane, status)
        self._make_ready(lane)
        self._pump()
        self._maybe_close()

    def _advance_head(self, lane: _Lane, response_id: str) -> None:
        old = lane.head
        try:
            lane.head = self.engine.cache.bind(
                response_id, owner=self.owner, connection=self.connection
            )
            lane.head_id = response_id
        except LookupError:
            lane.head, lane.head_id = None, None
        if old is not None:
            old.release()

    def _evict_head(self, lane: _Lane) -> None:
        head_id = lane.head_id
        if lane.head is not None:
            lane.head.release()
        lane.head, lane.head_id = None, None
        if head_id is not None:
            self.engine.cache.evict(head_id, owner=self.owner, connection=self.connection)

    def _remember_finished(self, turn: Turn) -> None:
        self._finished[turn.response_id] = (turn.stream_id, turn.stream.sequence_number)
        while len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    # -- steering -----------------------------------------------------------------------

    def _reject_steer(self, rejection: Rejection) -> None:
        target_id = rejection.previous_response_id or ""
        entry = self._active.get(target_id)
        turn = entry[0] if entry is not None else None
        # The input is given back when it is valid (another field was wrong); invalid
        # input is not: the event's schema only holds valid steering input.
        echoed = rejection.steer_input_json
        raw_input = json.loads(echoed) if echoed is not None else ""
        self._steer_failed(target_id, raw_input, _api_error(rejection), turn)

    def _receive_steer(self, steer: SteerRequest) -> None:
        target_id = steer.previous_response_id
        entry = self._active.get(target_id)
        turn = entry[0] if entry is not None else None
        if turn is None or turn.finished:
            raw_input = json.loads(steer.input_json)
            if target_id in self._finished:
                error = errors.steer_error(
                    "response_already_completed",
                    "The response already finished and no longer accepts steering input.",
                )
            else:
                error = errors.steer_error(
                    "response_not_found", "The target response is not active on this connection."
                )
            self._steer_failed(target_id, raw_input, error, None)
            return
        if turn.may_compact or turn.conversation is not None:
            what = (
                "server-side compaction (context_management, compaction_trigger)"
                if turn.conversation is None
                else "a conversation"
            )
            error = errors.steer_error(
                "steering_not_supported",
                f"A response with {what} cannot be steered: send the input as the next "
                "response.create.",
            )
            self._steer_failed(target_id, json.loads(steer.input_json), error, turn)
            return
        if len(turn.steers) >= self.limits.max_pending_steers:
            error = errors.steer_error(
                "too_many_pending_steers",
                f"At most {self.limits.max_pending_steers} steering inputs may wait for one "
                "response.",
            )
            self._steer_failed(target_id, json.loads(steer.input_json), error, turn)
            return
        held = self._queued_bytes + self._steering_bytes()
        if held + steer.input.nbytes > self.limits.max_queued_bytes:
            # Waiting steering counts with the waiting creates: --max-queued-bytes is
            # what a connection may make the server hold for it (8 steers of 32 MiB
            # on each of 16 responses were 4 GiB).
            error = errors.steer_error(
                "too_many_pending_steers",
                f"The steering inputs and requests waiting on this connection would hold "
                f"more than {self.limits.max_queued_bytes} bytes (--max-queued-bytes).",
            )
            self._steer_failed(target_id, json.loads(steer.input_json), error, turn)
            return
        steer_id = ids.steer_id()
        turn.steers.append((steer_id, steer.input))
        accepted = {
            "type": "response.steer.accepted",
            "steer": {"id": steer_id, "previous_response_id": target_id},
        }
        self.outbox.append(turn.stream.event(dumps(accepted)))
        if not turn.interrupt_requested:
            turn.interrupt_requested = True
            if turn.stream.open_kind is None:
                self._interrupt(turn)

    def _steering_bytes(self) -> int:
        """What the steering waiting on this connection holds: on its running responses
        and pending on its lanes (at most `max_pending_steers` per response)."""
        total = sum(
            items.nbytes for turn, _lane in self._active.values() for _, items in turn.steers
        )
        for lane in self._lanes.values():
            if lane.pending_steer is not None:
                total += lane.pending_steer.items.nbytes
        return total

    def _settle_steers(self, turn: Turn, lane: _Lane, status: str) -> None:
        steer_ids = [steer_id for steer_id, _items in turn.steers]
        items = turn.steers[0][1]
        for _steer_id, batch in turn.steers[1:]:
            items = items.concat(batch)
        if status == "failed":
            error = errors.steer_error(
                "response_not_active", "The response failed before the steering input applied."
            )
            for steer_id, batch in turn.steers:
                self._steer_failed_event(
                    turn.response_id, batch.to_objects(), error, turn, steer_id
                )
            return
        required = required_input(turn.stream.output_items())
        if required:
            # Stopped for client-owned tool output: no automatic successor (spec §3.7),
            # also when the steer interrupted it (`incomplete`) after a call was made:
            # a successor's context would hold a call without its output, which an
            # upstream refuses.
            self._supersede_pending_steer(lane)
            lane.pending_steer = _PendingSteer(turn.response_id, items, steer_ids)
            for steer_id in steer_ids:
                pending = {
                    "type": "response.steer.pending",
                    "steer": {"id": steer_id, "previous_response_id": turn.response_id},
                    "reason": "waiting_for_required_input",
                    "required_input": required,
                }
                self.outbox.append(turn.stream.event(dumps(pending)))
            self._remember_finished(turn)  # (its numbers went on: a later steer's too)
            return
        successor = self.engine.successor_request(turn, items)
        nbytes = items.nbytes  # (still held for the connection: --max-queued-bytes)
        lane.queue.appendleft(
            _Pending(successor, None, turn.response_id, tuple(steer_ids), nbytes=nbytes)
        )
        self._queued += 1
        self._queued_bytes += nbytes

    def _steer_failed(
        self, target_id: str, raw_input: Any, error: APIError, turn: Turn | None
    ) -> None:
        self._steer_failed_event(target_id, raw_input, error, turn, None)

    def _supersede_pending_steer(self, lane: _Lane) -> None:
        """A newer response on the lane waits for its own steering: the older one's will
        never be applied (the client continued elsewhere), which its steers are told."""
        old = lane.pending_steer
        if old is None:
            return
        lane.pending_steer = None
        failure = errors.steer_error(
            "response_not_active",
            "A later response on this lane took the pending steering's place: send it "
            "again with the next create.",
        )
        for steer_id in old.steer_ids:
            self._steer_failed_event(
                old.target_id, old.items.to_objects(), failure, None, steer_id, lane.name
            )

    def _steer_failed_ids(self, pending: _Pending, error: APIError, lane: _Lane) -> None:
        failure = errors.steer_error("successor_creation_failed", error.message)
        request = pending.request
        items = request.input.to_objects() if request is not None else []
        for steer_id in pending.steer_ids:
            self._steer_failed_event(
                pending.previous_response_id or "", items, failure, None, steer_id, lane.name
            )

    def _steer_failed_event(
        self,
        target_id: str,
        raw_input: Any,
        error: APIError,
        turn: Turn | None,
        steer_id: str | None,
        stream_id: str | None = None,
    ) -> None:
        steer: dict[str, Any] = {
            "input": _steer_input_echo(raw_input),
            "previous_response_id": target_id,
        }
        if steer_id is not None:
            steer["id"] = steer_id
        event: dict[str, Any] = {
            "type": "response.steer.failed",
            "steer": steer,
            "error": {"type": error.type, "code": error.code, "message": error.message},
        }
        self.engine.metrics.count_error(error.code or "invalid_input")
        if turn is not None and not turn.finished:
            self.outbox.append(turn.stream.event(dumps(event)))
            return
        finished = self._finished.get(target_id)
        if finished is not None:
            stream_id, sequence_number = finished
            # The response's numbering goes on past its terminal event, one per event.
            self._finished[target_id] = (stream_id, sequence_number + 1)
        else:
            sequence_number = 0
        if stream_id is not None:
            event["stream_id"] = stream_id
        event["sequence_number"] = sequence_number
        self.outbox.append(frame_event(dumps(event), self.framing))

    # -- lifetime -----------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        """The lifetime ran out: what runs finishes (within the grace), what waits is
        refused, each on its lane in turn, and new creates are refused at once."""
        self.expired = True
        self.close_deadline = now + self.limits.close_grace
        error = errors.connection_limit_reached(self._lifetime_minutes())
        default = self._lanes.get(None)
        if default is None or (default.active is None and not default.queue):
            # The connection-scoped notice (OpenAI sends it on idle connections). Not
            # while the default lane has an answer on its way: the SDK would take the
            # notice as that response's error and drop the response.
            self._error(error, None)
        self._refuse_queued(error)

    def _refuse_queued(self, error: APIError) -> None:
        """Every queued create is answered with `error` instead, on its lane when its
        turn comes (after the lane's running response: a lane's events never overlap;
        spec Q13: a named lane would otherwise wait for an answer that never comes)."""
        for lane in self._lanes.values():
            if not lane.queue:
                continue
            waiting: list[_Pending] = []
            for pending in lane.queue:
                if pending.steer_ids:
                    # An automatic successor: the client sent no create, only steering,
                    # which will never apply now (its steers are told so).
                    self._steer_failed_ids(pending, error, lane)
                else:
                    waiting.append(pending)
            self._queued -= len(lane.queue) - len(waiting)
            if lane.active is None:  # (waiting for an active slot): answered now
                for _pending in waiting:
                    self._error(error, lane.name)
                self._queued -= len(waiting)
                lane.queue.clear()
                continue
            lane.queue = deque(_Pending(None, error, p.previous_response_id) for p in waiting)
        self._queued_bytes = 0  # (a lane left ready with nothing queued is passed over)
        self._pump()

    def _drop_queued(self, error: APIError) -> None:
        """Drop every queued request now, each answered with `error` on its lane (the
        end of a drain's grace: what ran has just ended)."""
        for lane in self._lanes.values():
            for _pending in lane.queue:
                self._error(error, lane.name)
            lane.queue.clear()
            lane.in_ready = False
        self._ready.clear()
        self._queued = self._queued_bytes = 0

    def _maybe_close(self) -> None:
        if self.closed or self._active or self._queued:
            return
        if self.draining:
            self.outbox.append(CloseConnection(1001, "server shutting down"))
            self.connection_lost()
        elif self.expired:
            self.outbox.append(CloseConnection(1000, "connection lifetime reached"))
            self.connection_lost()

    def _lifetime_minutes(self) -> float:
        return self.limits.connection_lifetime / 60.0

    # -- output -------------------------------------------------------------------------

    def _error(self, error: APIError, stream_id: str | None) -> None:
        self.engine.metrics.count_error(error.code or error.type)
        log.info(
            "request rejected",
            extra={
                "code": errors.log_label(error.code),
                "status": error.status,
                "param": errors.log_label(error.param),
            },
        )
        self.outbox.append(frame_event(dumps(error.ws_event(stream_id=stream_id)), self.framing))


def _api_error(rejection: Rejection) -> APIError:
    """A refused message's error, as the error vocabulary's type."""
    return APIError(
        rejection.code,
        rejection.message,
        param=rejection.param,
        status=rejection.status,
        type=rejection.type,
    )


_OUTPUT_OF_CALL = {
    "function_call": "function_call_output",
    "custom_tool_call": "custom_tool_call_output",
    "computer_call": "computer_call_output",
    "shell_call": "shell_call_output",
    "apply_patch_call": "apply_patch_call_output",
}
"""Client-owned calls and the input item each waits for (`ResponseSteerRequiredInput`)."""


def required_input(output: Items) -> list[dict[str, Any]]:
    """The `required_input` stubs of what `output` waits for from the client: its
    client-owned tool calls' outputs and its MCP approval requests' responses."""
    required: list[dict[str, Any]] = []
    for index in range(len(output)):
        meta = output.item_meta(index)
        kind = meta.type
        if kind in _OUTPUT_OF_CALL and meta.call_id is not None:
            stub: dict[str, Any] = {"type": _OUTPUT_OF_CALL[kind], "call_id": meta.call_id}
            if kind == "function_call":
                stub["name"] = meta.name or ""
            required.append(stub)
        elif kind == "mcp_approval_request" and meta.id is not None:
            required.append({"type": "mcp_approval_response", "approval_request_id": meta.id})
        elif kind == "tool_search_call" and meta.call_id is not None:
            item = output.slice(index, index + 1).to_objects()[0]
            if item.get("execution") == "client":
                required.append(
                    {"type": "tool_search_output", "call_id": meta.call_id, "execution": "client"}
                )
    return required


def _steer_input_echo(raw: Any) -> Any:
    """The steering input as the client sent it (strings and item lists are echoed),
    with each message's `type` written out (the event's schema requires it; a steer's
    messages may leave it out)."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        return [
            {"type": "message", **item} if isinstance(item, dict) and "type" not in item else item
            for item in raw
        ]
    return ""


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
