"""The turn engine shared by WebSocket mode and HTTP mode.

`Engine.prepare` resolves `previous_response_id` (connection-local entries, then
stored ones), or, when there is none, matches the input against the cached chains
(prefix diffing: a client that re-sends its whole history shares the cached chain
and only the new suffix is tokenised and stored), pins the parent, and returns a
`Turn`; the turn turns model events into Responses events and, at its terminal
event, stores the response in the cache. Neither knows about sockets.

Requests come parsed by Rust (`_core.parse_client_message`: the new input is already
`Items`, the settings canonical JSON) and events are encoded by a Rust
`ResponseEncoder` in the connection's framing: each `Turn` method returns the frames
it produced as one `bytes`, ready for the transport.

Token accounting: with a tokenizer on the cache, every item is tokenised once, when
it enters, so usage is sums of cached counts; the instructions count as a `system`
message, and so do the tools (docs/tokens.md). `cached_tokens` is the part of the
prompt that a previous prompt of this chain already had: the parent's context and
the instructions and tools when they are the parent's; nothing when either changed
(the prompt starts with them).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from warmsocket import _core, errors, ids, item_references
from warmsocket._core import (
    Binding,
    ContextView,
    CreateRequest,
    Items,
    ResponseEncoder,
    SessionCache,
    Tokenizer,
)
from warmsocket.backends.base import (
    Backend,
    HostedCallEvent,
    HostedCallStart,
    MessageStart,
    ModelEvent,
    OutputItem,
    ReasoningDelta,
    ReasoningStart,
    RefusalDelta,
    ResponseFields,
    StreamItem,
    TextAnnotation,
    TextDelta,
    TextLogprobs,
    ToolArgumentsDelta,
    ToolCallStart,
    TurnContext,
    TurnFailed,
    TurnIncomplete,
    UsageReport,
)
from warmsocket.compaction import (
    compacting_stream,
    ends_with_trigger,
    triggered,
    triggered_compaction,
)
from warmsocket.compaction_items import check_sent, starts_context
from warmsocket.conversations import (
    DEFAULT_CONVERSATION_BUDGET,
    Conversation,
    Conversations,
    items_cost,
    let_go_of_nothing,
    refuse_duplicate_ids,
)
from warmsocket.errors import APIError
from warmsocket.memo import Memo, str_bytes
from warmsocket.metrics import Metrics

log = logging.getLogger("warmsocket.engine")

Framing = Literal["json", "websocket", "msgpack", "sse"]
"""How a turn's events are framed (see `_core.ResponseEncoder`)."""

WORKING_COPIES = 4096
"""The responses a backend keeps working copies of, at most (`chat.MEMO_ENTRIES`,
`responses_http.MEMO_ENTRIES`): a connection's older local responses have been
pushed out of them already."""
BYTES_PER_TOKEN_ESTIMATE = 4
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
Usage = tuple[int, int, int, int]
"""(input_tokens, cached_tokens, output_tokens, reasoning_tokens): the reasoning
tokens are part of the output tokens."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits (spec §5.4, §5.6) and sizes."""

    max_message_bytes: int = 32 * 1024 * 1024
    connection_lifetime: float = 3600.0
    max_named_lanes: int = 32
    max_active_responses: int = 16
    max_queued_requests: int = 1024
    max_queued_bytes: int = 64 * 1024 * 1024
    max_pending_steers: int = 8
    close_grace: float = 30.0


def estimate_tokens(nbytes: int) -> int:
    return (nbytes + BYTES_PER_TOKEN_ESTIMATE - 1) // BYTES_PER_TOKEN_ESTIMATE


BUILTIN_TOKENIZERS = ("o200k_base", "cl100k_base")
OFF_LOOP_TOKENIZE_BYTES = 256 * 1024
"""New input at least this large is tokenised in a worker thread, not on the event
loop: ordinary text of this size takes about a millisecond, but one long piece
without a break (a run of one character) takes tens of milliseconds, and its time
grows faster than its length (docs/tokens.md), which would hold up every other
connection of the process."""


def tokenizer_for(spec: str | None, model: str) -> Tokenizer | None:
    """The tokenizer `--tokenizer` names: a built-in encoding, a tokenizer.json path,
    `none`, or None/`auto` to follow the model name (`Tokenizer.for_model`)."""
    if spec is None or spec == "auto":
        return Tokenizer.for_model(model)
    if spec == "none":
        return None
    if spec in BUILTIN_TOKENIZERS:
        return Tokenizer.builtin(spec)
    return Tokenizer.from_file(spec)


def new_cache(
    memory_budget: int,
    max_item_bytes: int,
    *,
    tokenizer: Tokenizer | None,
    prefix_diffing: bool = True,
) -> SessionCache:
    """The server's session cache. With `prefix_diffing` (the default) it tokenises
    items as they enter and indexes chains for matching re-sent histories; without,
    it does neither (the naive baseline: the engine then counts tokens per turn)."""
    return SessionCache(
        memory_budget,
        max_item_bytes=max_item_bytes,
        tokenizer=tokenizer if prefix_diffing else None,
        prefix_index=prefix_diffing,
    )


_PROMPT_KEYS: Memo[tuple[str | None, int | None], str] = Memo()


def prompt_key(instructions: str | None, tools_digest: int | None = None) -> str | None:
    """What the stored meta remembers of what a turn's prompt starts with, its
    instructions and tools (to tell a change); None when it has neither.

    Without tools the key is that of the instructions alone, as before tools were
    counted. Memoised: an agent sends the same instructions and tools every turn,
    and looking them up costs less than hashing them again."""
    if instructions is None and tools_digest is None:
        return None

    def digest() -> str:
        data = b"" if instructions is None else instructions.encode()
        if tools_digest is not None:
            data += b"\0tools:" + tools_digest.to_bytes(8, "little")
        return hashlib.blake2b(data, digest_size=8).hexdigest()

    return _PROMPT_KEYS.get((instructions, tools_digest), str_bytes(instructions), digest)


_INSTRUCTIONS_MEMBER = b'"instructions":'


_REBASED_META = b'{"input_items":'


def rebased_meta(meta: bytes, input_json: bytes, previous_response_id: str | None) -> bytes:
    """The meta of a response whose chain in the cache is not what its request sent,
    with what it sent: a rebased one (`Turn.rebase`: its chain starts at its compaction
    item), or one that continues a conversation (its chain holds the conversation's
    items too). `input_items` lists the input the client sent and the Response object
    names the previous response the client named (`stored_input`,
    `response_object`). Put first, so the prompt key stays the last member
    (`stored_prompt_key`)."""
    previous = _dumps(previous_response_id).encode()
    return b'%b%b,"previous_response_id":%b,%b' % (_REBASED_META, input_json, previous, meta[1:])


def stored_input(info: _core.ResponseInfo) -> list[dict[str, Any]] | None:
    """The input a rebased or conversation response's request sent (`rebased_meta`);
    None for any other response, whose input is its node's in the cache."""
    meta = info.meta
    if not meta.startswith(_REBASED_META):
        return None
    listed = json.loads(meta).get("input_items")
    return listed if isinstance(listed, list) else None


def stored_prompt_key(meta: bytes) -> str | None:
    """The prompt key in a stored response's meta (its `instructions` member).

    The key is the meta's last member, as `ResponseEncoder.terminal_meta` (and the
    engine before it) writes it, so it is read from the end of the bytes; any other
    shape is decoded whole.
    """
    at = meta.rfind(_INSTRUCTIONS_MEMBER)
    if at >= 0 and meta.endswith(b"}"):
        value = meta[at + len(_INSTRUCTIONS_MEMBER) : -1]
        if value == b"null":
            return None
        if len(value) == 18 and value[:1] == b'"' and value[-1:] == b'"':
            return value[1:-1].decode("ascii", "replace")
    key = json.loads(meta).get("instructions")
    return key if isinstance(key, str) else None


class SharedStoreUnavailable(ConnectionError):
    """The shared store did not answer (connection refused, timed out) while a response
    was loaded: it may well exist there. Callers answer a retriable error
    (`errors.shared_store_unavailable`), never 'not found'."""

    def __init__(self, response_id: str) -> None:
        super().__init__("the shared store did not answer")
        self.response_id = response_id


class SharedBackgroundBoard(Protocol):
    """Background responses' state and cancels shared with other processes
    (`shared_background.BackgroundBoard`)."""

    def publish(
        self,
        owner: str,
        response_id: str,
        response: bytes,
        *,
        status: str,
        input_json: bytes | None = None,
    ) -> None:
        """Queue the Response object as it is now (with the first, what its request
        sent: `input_json`); never blocks, never raises."""
        ...

    async def get_input(self, owner: str, response_id: str) -> bytes | None:
        """What a background response's request sent, as a JSON array of items, if a
        process published it. Raises SharedStoreUnavailable when the store does not
        answer."""
        ...

    def append_events(self, owner: str, response_id: str, first: int, events: list[bytes]) -> None:
        """Queue a run's new events (SSE frames), the first of sequence number `first`."""
        ...

    async def written(self, timeout: float) -> bool:
        """Wait until the writes queued so far were written, for at most `timeout`
        seconds; whether they were."""
        ...

    def end_events(
        self, owner: str, response_id: str, count: int, status: str, keep_seconds: int
    ) -> None:
        """Queue the end of a run's `count` events, kept `keep_seconds` more."""
        ...

    def forget(self, owner: str, response_id: str) -> None:
        """Queue the deletion of what was published for the response."""
        ...

    async def can_follow(self, owner: str, response_id: str) -> bool:
        """Whether any process keeps the response's events, or runs it. Raises
        SharedStoreUnavailable when the store does not answer."""
        ...

    async def follow(
        self,
        owner: str,
        response_id: str,
        after: int,
        write: Callable[[bytes], None],
        drain: Callable[[], Awaitable[None]],
        closing: Callable[[], bool],
    ) -> None:
        """Write the response's events after sequence number `after`, then live until
        its run ends or the reader goes away."""
        ...

    @property
    def ttl(self) -> int:
        """Seconds a failed or cancelled response's record is kept."""
        ...

    async def deleted(self, owner: str, response_id: str) -> bool:
        """Whether the response was deleted (its stored record is marked so). Raises
        SharedStoreUnavailable when the store does not answer."""
        ...

    async def get(self, owner: str, response_id: str) -> dict[str, Any] | None:
        """The Response object last published by any process, if any. Raises
        SharedStoreUnavailable when the store does not answer."""
        ...

    async def request_cancel(self, owner: str, response_id: str) -> None:
        """Ask the process that runs the response to cancel it. Raises
        SharedStoreUnavailable when the store does not answer."""
        ...

    async def cancels_asked(self, runs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Those of `runs` (owner, response id) whose cancel was asked lately. Raises
        Redis and OS errors."""
        ...


class SharedResponses(Protocol):
    """Stored responses shared with other processes (`shared_store.SharedStore`).

    The engine and the server know only this protocol, so nothing imports the Redis
    client unless `--redis-url` is given."""

    @property
    def background_board(self) -> SharedBackgroundBoard:
        """Background responses' state, for every process."""
        ...

    async def start(
        self,
        on_deleted: Callable[[str, str], None],
        on_cancel: Callable[[str, str], None] | None = None,
        stored_ids: Callable[[], list[tuple[str, str]]] | None = None,
    ) -> None:
        """Connect (raises ConnectionError) and start writing; `on_deleted(owner, id)`
        is called when any process deletes a shared response, `on_cancel(owner, id)`
        when any process asks for a background response to be cancelled.
        `stored_ids()` lists (owner, id) of the stored responses this process caches,
        to be checked when deletions may have been missed."""
        ...

    async def aclose(self, flush_timeout: float = ...) -> None:
        """Write what is still queued (for at most `flush_timeout` seconds), then
        disconnect."""
        ...

    def publish(self, info: _core.ResponseInfo, input: Items, output: Items) -> None:
        """Queue a stored response for the other processes; never blocks, never raises."""
        ...

    async def load(self, cache: SessionCache, response_id: str, *, owner: str) -> bool:
        """Load a response (and what of its chain is missing) into `cache`; whether it
        is there now. A record that is missing, expired or unreadable is a miss (logged
        and counted when unreadable); when the store does not answer (connection or
        timeout errors), SharedStoreUnavailable (logged and counted)."""
        ...

    async def having_records(self, response_ids: list[str], *, owner: str) -> list[str]:
        """Those of `response_ids` (in order) the store has a record of for `owner`,
        in one round trip however many; SharedStoreUnavailable when it does not answer."""
        ...

    async def delete(self, response_id: str, *, owner: str) -> bool:
        """Mark a response deleted for every process; whether it existed there.
        ConnectionError when the other processes could not be told."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters for /metrics: published, loaded, load_hits, load_misses,
        load_errors, deleted, errors, queued."""
        ...


class Engine:
    """Services shared by every connection: the cache, the backend, metrics, the clock."""

    def __init__(
        self,
        cache: SessionCache,
        backend: Backend,
        *,
        metrics: Metrics | None = None,
        limits: Limits | None = None,
        wall_clock: Callable[[], float] = time.time,
        tokenizer: Tokenizer | None = None,
        shared: SharedResponses | None = None,
        conversations: Conversations | None = None,
    ) -> None:
        """`tokenizer` counts what the cache does not: the instructions, and, when the
        cache has no tokenizer of its own, each turn's whole context (O(context), the
        naive baseline). Without either, tokens are estimated from bytes. Prefix
        diffing is on when the cache has a prefix index. `shared` gets every stored
        response and is asked on local misses (`load_shared`). `conversations`: the
        Conversations API's state (a default one when not given)."""
        self.cache = cache
        self.backend = backend
        self.metrics = metrics or Metrics()
        self.limits = limits or Limits()
        self.wall_clock = wall_clock
        self.prefix_diffing = cache.prefix_index
        self.tokenizer = cache.tokenizer or tokenizer
        self.caches_tokens = cache.tokenizer is not None
        self.shared = shared
        if conversations is None:
            conversations = Conversations(
                budget_bytes=DEFAULT_CONVERSATION_BUDGET, max_item_bytes=cache.max_item_bytes
            )
        self.conversations = conversations
        self.responses_upstream = bool(getattr(backend, "responses_upstream", False))
        self.tokens_used: Callable[[str, int], None] | None = None
        """Told (owner, input + output tokens) of each model pass as it ends, or is
        abandoned after the model began (`--tokens-per-minute-per-key`)."""
        self.still_running: Callable[[str, str], bool] = lambda response_id, owner: False
        """Whether (response id, owner) is a background response still being generated
        here (not stored yet): a create continuing it is told so, not 'not found'."""
        self._instruction_tokens: Memo[str, int] = Memo()
        self._tool_tokens: Memo[int, int] = Memo()
        self._forget = getattr(backend, "forget", None)
        self._local_ids: dict[int, deque[str]] = {}
        """By cache connection: its connection-local responses, the most recent
        (`WORKING_COPIES` covers every one a backend can still hold a copy of)."""

    # -- the backends' working copies ---------------------------------------------------

    def forget(self, response_ids: Iterable[str]) -> None:
        """Responses nothing can continue any more (deleted, never stored, or gone with
        their connection): the backend drops its working copies of them (rendered
        messages, request bodies), if it keeps any."""
        if self._forget is not None:
            self._forget(response_ids)

    def forget_evicted(self) -> None:
        """After a response was stored: the responses the cache evicted for its budget
        to make room can no longer be continued here, so their copies go too (one
        stored and shared through Redis is loaded again when continued, and its
        copies made again)."""
        if self._forget is not None:
            evicted = self.cache.take_evicted()
            if evicted:
                self._forget(evicted)

    def kept_local(self, connection: int, response_id: str) -> None:
        """A response was stored connection-local: its copies go when `connection` does."""
        ids = self._local_ids.get(connection)
        if ids is None:
            ids = self._local_ids[connection] = deque(maxlen=WORKING_COPIES)
        ids.append(response_id)

    def close_connection(self, connection: int) -> None:
        """Drop a cache connection: its connection-local chains, and the backend's
        working copies of them."""
        self.cache.close_connection(connection)
        ids = self._local_ids.pop(connection, None)
        if ids:
            self.forget(ids)

    def cached(self, response_id: str, *, owner: str, connection: int | None = None) -> bool:
        """Whether a lookup of `response_id` by `owner` finds it in the local cache."""
        try:
            self.cache.get(response_id, owner=owner, connection=connection)
        except _core.ResponseNotFound:
            return False
        return True

    async def load_shared(self, response_id: str, *, owner: str) -> bool:
        """After a local miss: load a stored response from the shared store, if there is
        one, into the cache. Whether it is cached now. Requests wait for this before
        the (Sans-I/O) lookup that would otherwise say not found. Raises
        SharedStoreUnavailable when the store did not answer: the caller answers
        `errors.shared_store_unavailable` (503, retriable), not 'not found'."""
        if self.shared is None:
            return False
        return await self.shared.load(self.cache, response_id, owner=owner)

    async def shared_candidates(self, response_ids: list[str], *, owner: str) -> list[str]:
        """Of the responses a create's `item_reference`s name and this process lacks,
        those worth loading one by one (`load_shared`): with several, only those the
        shared store has a record of, asked in one round trip. A reference can name
        anything (one per item, hundreds of thousands in a message): without this
        each made-up one would be a Redis round trip. Raises SharedStoreUnavailable."""
        if self.shared is None or len(response_ids) < 2:
            return response_ids
        return await self.shared.having_records(response_ids, owner=owner)

    def instruction_tokens(self, instructions: str | None) -> int:
        """Tokens of the instructions as a `system` message (memoised; 0 without a
        tokenizer)."""
        tokenizer = self.tokenizer
        if instructions is None or tokenizer is None:
            return 0
        return self._instruction_tokens.get(
            instructions,
            str_bytes(instructions),
            lambda: tokenizer.count_instructions(instructions),
        )

    def tool_tokens(self, request: CreateRequest) -> int:
        """Tokens of the request's tools as a `system` message (memoised by their
        digest; 0 without tools or a tokenizer)."""
        digest = request.tools_digest
        tokenizer = self.tokenizer
        if digest is None or tokenizer is None:
            return 0
        return self._tool_tokens.get(
            digest, 0, lambda: tokenizer.count_tools(request.tools_json or b"[]")
        )

    def prompt_tokens(self, request: CreateRequest) -> int:
        """Tokens of what a request's prompt starts with: its instructions and tools."""
        return sum(self.prompt_token_counts(request))

    def prompt_token_counts(self, request: CreateRequest) -> tuple[int, int]:
        """Tokens of a request's instructions, and of its tools."""
        return self.instruction_tokens(request.instructions), self.tool_tokens(request)

    def prompt_tokenize_off_loop(self, request: CreateRequest) -> bool:
        """Whether the request's instructions and tools are large, and not counted yet:
        then they are counted in a worker thread (`prompt_tokens_off_loop`), as a large
        input is. One long piece without a break takes the tokeniser time that grows
        faster than its length (docs/tokens.md)."""
        if self.tokenizer is None or request.prompt_bytes < OFF_LOOP_TOKENIZE_BYTES:
            return False
        instructions = request.instructions
        if instructions is not None and instructions not in self._instruction_tokens:
            return True
        digest = request.tools_digest
        return digest is not None and digest not in self._tool_tokens

    async def prompt_tokens_off_loop(self, request: CreateRequest) -> int:
        """`prompt_tokens`, in a worker thread when the prompt is large and not counted
        yet (the GIL is released while it works)."""
        if self.prompt_tokenize_off_loop(request):
            return await asyncio.to_thread(self.prompt_tokens, request)
        return self.prompt_tokens(request)

    def context_tokens(self, view: ContextView) -> int:
        """Tokens of a context: the cached count, else counted now, else estimated."""
        if self.caches_tokens:
            return view.tokens
        if self.tokenizer is not None:
            return view.count_tokens(self.tokenizer)
        return estimate_tokens(view.nbytes)

    def resolved_input(
        self, request: CreateRequest, *, owner: str, connection: int | None
    ) -> Items:
        """The request's input, its `item_reference`s replaced by the items they name
        (`item_references`; looked up as `owner`, on `connection` too). Raises
        APIError (404) for a reference nothing resolves."""
        if not request.has_item_references:
            return request.input
        return item_references.resolve(
            self.cache,
            request.input,
            owner=owner,
            connection=connection,
            previous_response_id=request.previous_response_id,
            max_item_bytes=self.cache.max_item_bytes,
        )

    def _input_and_taint(
        self, request: CreateRequest, *, owner: str, connection: int | None
    ) -> tuple[Items, bool]:
        """`resolved_input`, and whether a reference needed the connection's own
        (`store: false`) responses: then a `store: true` response made from it stays
        connection-local (the taint rule), or the item would outlive the connection
        through it. The stored responses are tried alone first, so a reference to
        stored items never taints; the connection's are read only when they fail."""
        if not (request.has_item_references and request.store and connection is not None):
            return self.resolved_input(request, owner=owner, connection=connection), False
        try:
            return self.resolved_input(request, owner=owner, connection=None), False
        except APIError as exc:
            if exc.status != 404:
                raise
        return self.resolved_input(request, owner=owner, connection=connection), True

    def prepare(
        self,
        request: CreateRequest,
        *,
        owner: str,
        connection: int | None,
        lookup_connection: int | None,
        stream_id: str | None = None,
        prepend: Items | None = None,
        framing: Framing = "json",
        client_key: str | None = None,
        counting: bool = False,
    ) -> Turn:
        """Validate against state and bind the parent. Raises APIError; nothing is kept then.

        `connection` scopes what the turn stores (connection-local for store=false);
        `lookup_connection` is where `previous_response_id` may also be found besides
        stored responses (the WebSocket connection; None over HTTP). `prepend` goes
        before the request's input (queued steering); `framing` is how the turn's
        events are framed; `client_key` the client's bearer token
        (`TurnContext.client_key`). `counting`: nothing of the turn is kept (a
        token count, a compaction): its input is not held to the memory budget, and
        it adds nothing to a conversation.
        """
        started = time.perf_counter()
        if request.responses_only and not self.responses_upstream:
            raise errors.needs_responses_upstream(request.responses_only[0])
        prompt = prompt_key(request.instructions, request.tools_digest)
        # Parsing validated the input and made it Items (within the cache's item limit).
        input_items, tainted = self._input_and_taint(
            request, owner=owner, connection=lookup_connection
        )
        if prepend is not None:
            input_items = prepend.concat(input_items)
        check_sent(request.input)
        conversation: Conversation | None = None
        own_input = input_items
        if request.conversation is not None:
            # Its items are the context before the input (never with a
            # previous_response_id): prefix diffing finds the chain that left them.
            conversation = self._conversation(owner, request.conversation)
            input_items = conversation.items.concat(input_items)
        # OpenAI refuses an item id given twice, or one the conversation holds: lists
        # are paged by id. (Resolved: two `item_reference`s to one item are two too.)
        refuse_duplicate_ids(
            own_input,
            param="input",
            kept=() if conversation is None else conversation.item_ids,
        )
        adds_to_conversation = conversation is not None and request.store and not counting
        if conversation is not None and adds_to_conversation:
            if tainted:
                raise errors.invalid_value(
                    "input",
                    "Invalid 'input': it references items of a store: false response "
                    "(this connection's only), which a conversation cannot keep, and "
                    "this response would be added to one (store: true). Send the items "
                    "themselves, or use store: false.",
                )
            # One response at a time adds to a conversation (as OpenAI has it).
            self.conversations.check_free(owner, conversation.id)
            # Its input must fit before the model runs (with the output, once more
            # when it ends): a response the conversation cannot take costs no tokens.
            self.conversations.check_room(items_cost(own_input), used=conversation)
        previous_response_id = request.previous_response_id
        start = context_start(input_items)
        if start is not None:
            # Server-side compaction's item stands for everything before it: the
            # context starts there (a new chain), whatever came before it.
            input_items = input_items.slice(start)
            previous_response_id = None
        cache = self.cache
        binding: Binding | None = None
        # The new items are tokenised later (`Turn.count_input_tokens`), not here: an
        # upstream request does not need their tokens, so it need not wait for them.
        if previous_response_id is None and self.prefix_diffing:
            # Match a re-sent history: only the suffix will be tokenised. With store=true,
            # against stored chains only: built on a connection-local (store=false) one,
            # the response would be connection-local too (the taint rule) and not stored,
            # although the client sent all of its content to be stored.
            scope = None if request.store else connection
            try:
                match = cache.match(input_items, owner=owner, connection=scope, tokenize=False)
            except _core.InvalidItems as exc:
                raise errors.invalid_value("input", f"Invalid 'input': {exc}") from None
            binding, items = match.binding, match.new_items
            self.metrics.prefix_match(match.items)
        else:
            items = input_items

        if previous_response_id is not None:
            try:
                binding = cache.bind(
                    previous_response_id, owner=owner, connection=lookup_connection
                )
            except _core.ResponseNotFound:
                self.metrics.cache_lookup(hit=False)
                if self.still_running(previous_response_id, owner):
                    raise errors.previous_response_running(previous_response_id) from None
                raise errors.previous_response_not_found(previous_response_id) from None
            self.metrics.cache_lookup(hit=True)

        chain_parent: str | None = None
        try:
            if items.nbytes > cache.memory_budget and not counting:
                # The response could never be kept (`CacheFull` when it ends): refused
                # before the model spends tokens on it.
                raise errors.input_over_memory_budget(items.nbytes, cache.memory_budget)
            if binding is not None:
                view = binding.view(items, tokenize=False)
                parent = binding.info()
                same_prompt = stored_prompt_key(parent.meta) == prompt
                cached_tokens, cached_prompt = self._cached_prefix(parent, binding, same_prompt)
                # Backends key what they remember of a chain (upstream replica, chat
                # rendering, upstream response) by the parent. A matched parent is
                # shown to them only when the prompt continues it: with other
                # instructions or tools the request is a new prompt for the upstream.
                if previous_response_id is not None or same_prompt:
                    chain_parent = binding.response_id
            else:
                view = cache.view(
                    None, owner=owner, connection=connection, extra=items, tokenize=False
                )
                cached_tokens, cached_prompt = 0, False
            if view.items == 1 and ends_with_trigger(items):
                raise errors.APIError(
                    None,
                    "Nothing to compact: a compaction_trigger compacts the context before "
                    "it; send it after input, with a previous_response_id, or in a "
                    "conversation.",
                    param="input",
                )
            unanswered = view.unanswered_call_output()
            if unanswered is not None:
                raise errors.invalid_value(
                    "input",
                    "No tool call found for function call output with call_id "
                    f"{unanswered[:64]!r}: send function_call_output items after the "
                    "function_call they answer (in the input or the previous response).",
                )
        except BaseException:
            if binding is not None:
                binding.release()
            raise
        response_id = ids.response_id()
        turn = Turn(
            engine=self,
            request=request,
            response_id=response_id,
            owner=owner,
            connection=connection,
            binding=binding,
            items=items,
            view=view,
            stream_id=stream_id,
            cached_tokens=cached_tokens,
            cached_prompt=cached_prompt,
            framing=framing,
            chain_parent_id=chain_parent,
            prompt_key=prompt,
            local_only=tainted,
        )
        if conversation is not None:
            turn.join_conversation(conversation, own_input)
            if adds_to_conversation:
                turn.hold_conversation()
        turn.client_key = client_key
        self.metrics.observe_rebuild(time.perf_counter() - started)
        return turn

    async def input_tokens(
        self, request: CreateRequest, *, owner: str, include_input: bool = True
    ) -> int:
        """The `usage.input_tokens` this request would get from warmsocket's accounting,
        without running it (`POST /v1/responses/input_tokens`): the previous
        response's context (or the conversation's items), the input (unless
        `include_input` is false), the instructions and the tools. Nothing is stored.
        Raises APIError as `prepare` does."""
        if include_input:
            turn = self.prepare(
                request, owner=owner, connection=None, lookup_connection=None, counting=True
            )
            try:
                await turn.count_input_tokens_off_loop()
                turn.count_input_tokens()
                return turn.usage()[0]
            finally:
                turn.release()
        tokens = await self.prompt_tokens_off_loop(request)
        if request.conversation is not None:
            # As `prepare` reads it: a create's context starts at the last
            # self-contained compaction item (a server-side compaction's).
            items = self._conversation(owner, request.conversation).items
            start = context_start(items)
            if start is not None:
                items = items.slice(start)
            view = self.cache.view(None, owner=owner, connection=None, extra=items)
            return tokens + self.context_tokens(view)
        parent = request.previous_response_id
        if parent is None:
            return tokens
        try:
            binding = self.cache.bind(parent, owner=owner)
        except _core.ResponseNotFound:
            raise errors.previous_response_not_found(parent) from None
        try:
            return tokens + self.context_tokens(binding.view())
        finally:
            binding.release()

    def _conversation(self, owner: str, conversation_id: str) -> Conversation:
        """The owner's conversation a request continues. Raises APIError: 404 for
        none, 409 for one whose additions could not all be written (Redis)."""
        conversation = self.conversations.get(owner, conversation_id, param="conversation")
        if conversation.incomplete:
            raise errors.conversation_incomplete(conversation.id)
        return conversation

    def _cached_prefix(
        self, parent: _core.ResponseInfo, binding: Binding, same_prompt: bool
    ) -> tuple[int, bool]:
        """The tokens of the prompt a previous prompt of this chain already had: those
        of the parent's context, and whether the instructions and tools count too
        (`Turn.cached_tokens` adds them when first asked, after a large prompt was
        counted off the event loop)."""
        if not self.caches_tokens and self.tokenizer is None:
            return estimate_tokens(parent.bytes), False
        if not same_prompt:
            # The prompt starts with the instructions and tools: a change
            # invalidates it all.
            return 0, False
        prefix = parent.tokens if self.caches_tokens else self.context_tokens(binding.view())
        return prefix, True

    def model_stream(self, turn: Turn) -> AsyncIterator[StreamItem]:
        """The model events of a turn: the backend's, after a server-side compaction
        when the request asks for one and its context has reached the threshold
        (`compaction.compacting_stream`); a compaction alone when its input ends with
        a `compaction_trigger` (`compaction.triggered_compaction`)."""
        turn.model_started = True
        if triggered(turn):
            return triggered_compaction(self, turn)
        if turn.request.compact_threshold is None:
            return self.backend.stream(turn.context())
        return compacting_stream(self, turn, turn.request.compact_threshold)

    def successor_request(self, target: Turn, steer_items: Items) -> CreateRequest:
        """The automatic successor of a steered response: same settings, steering as input."""
        return target.request.successor(steer_items, target.response_id)


def context_start(items: Items) -> int | None:
    """The index of the last self-contained compaction item made by warmsocket among
    `items` (the context starts there), None when there is none. One call into Rust
    when there is no compaction item at all."""
    end = len(items)
    while (found := items.slice(0, end).last_of_type("compaction")) is not None:
        if starts_context(items.item_json(found)):
            return found
        end = found
    return None


def _usage(
    report: UsageReport,
    input_tokens: int,
    cached_tokens: int,
    output_chars: int,
    reasoning_chars: int,
) -> Usage:
    """A model pass's usage from the backend's `report`, its missing fields from
    warmsocket's accounting (`input_tokens`, `cached_tokens`) or estimated from the
    characters written."""
    cached = report.cached_tokens if report.cached_tokens is not None else cached_tokens
    reasoning = report.reasoning_tokens
    if reasoning is None:
        reasoning = estimate_tokens(reasoning_chars) if reasoning_chars else 0
    output = report.output_tokens
    if output is None:
        output = estimate_tokens(output_chars) if output_chars else 0
        output += reasoning
    return (input_tokens, min(cached, input_tokens), output, min(reasoning, output))


def _reasoning_chars(item: bytes) -> int:
    """Characters of a reasoning item's summary and text (its tokens, when a backend
    reports none, are estimated from them)."""
    parsed = json.loads(item)
    if parsed.get("type") != "reasoning":
        return 0
    parts = [*(parsed.get("summary") or ()), *(parsed.get("content") or ())]
    return sum(len(part.get("text", "")) for part in parts)


class Turn:
    """One response being produced."""

    def __init__(
        self,
        *,
        engine: Engine,
        request: CreateRequest,
        response_id: str,
        owner: str,
        connection: int | None,
        binding: Binding | None,
        items: Items,
        view: ContextView,
        stream_id: str | None,
        cached_tokens: int,
        cached_prompt: bool = False,
        framing: Framing = "json",
        chain_parent_id: str | None = None,
        prompt_key: str | None = None,
        local_only: bool = False,
    ) -> None:
        """`cached_tokens`: the tokens of the parent's context this prompt has, and with
        `cached_prompt` its instructions' and tools' too; `prompt_key`:
        `prompt_key(request.instructions, request.tools_digest)`; `local_only`: its
        input holds items of the connection's `store: false` responses, so it is kept
        connection-local whatever its `store`."""
        self.engine = engine
        self.request = request
        self.response_id = response_id
        self.owner = owner
        self.connection = connection
        self.binding = binding
        self.items = items
        self.view = view
        self.stream_id = stream_id
        self._cached_prefix = cached_tokens
        self._cached_prompt = cached_prompt
        self.chain_parent_id = chain_parent_id
        self.prompt_key = prompt_key
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.model_started = False
        """Whether the model was asked (`Engine.model_stream`): from then on, what the
        turn's key is charged under `--tokens-per-minute-per-key` counts."""
        self.finished = False
        self.usage_report: UsageReport | None = None
        self.incomplete_reason: str | None = None
        """Set by a `TurnIncomplete` event: the response ends `incomplete` for it."""
        self.end_status = ""
        """How the response ended (`completed`, `incomplete`, `failed`, `cancelled`)."""
        self.earlier_usage: Usage | None = None
        """The usage of a model pass before the answer (a server-side compaction's
        summary), added to the response's."""
        self.output_chars = 0
        self.reasoning_chars = 0
        # Steering queued on this response (spec §3.7).
        self.steers: list[tuple[str, Items]] = []
        self.interrupt_requested = False
        # Whether `items` still await tokenising (the cache has a tokenizer), and the
        # lock of that work (a worker thread may be doing it: `count_input_tokens`).
        self._tokens_pending = engine.caches_tokens
        self._tokens_lock = threading.Lock()
        # The instructions' and tools' tokens, once counted (`_prompt_token_counts`).
        self._prompt_counts: tuple[int, int] | None = None
        self.stream = ResponseEncoder(
            response_id,
            settings=request.settings_json,
            previous_response_id=request.previous_response_id,
            store=request.store,
            created_at=int(engine.wall_clock()),
            stream_id=stream_id,
            framing=framing,
            background=request.background,
        )
        # Item .done events produced before storing failed: sent with the failure.
        self._unsent = b""
        # Made from connection-local state (`local_only`, or rebased on it: `rebase`):
        # kept connection-local.
        self._local_only = local_only
        self._stored_on: int | None = None
        """The connection the stored response is local to (None: stored, or not yet)."""
        # Rebased (`rebase`): what the client sent, as stored responses list it.
        self._rebased_input: bytes | None = None
        # The conversation this response continues (`join_conversation`), and what it
        # adds there before its output: its own input.
        self.conversation: Conversation | None = None
        self._conversation_input: Items | None = None
        self._holds_conversation = False
        self._let_go: Callable[[], None] = let_go_of_nothing
        """Lets go of the conversation across processes (`Conversations.take`)."""
        self.client_key: str | None = None
        """The client's bearer token (`TurnContext.client_key`)."""

    def hold_conversation(self) -> None:
        """Keep other responses from adding to the conversation until this one ends
        (`Conversations.take`)."""
        conversation = self.conversation
        if conversation is not None:
            self._let_go = self.engine.conversations.take(self.owner, conversation.id, self)
            self._holds_conversation = True

    def _leave_conversation(self) -> None:
        conversation = self.conversation
        if self._holds_conversation and conversation is not None:
            self._holds_conversation = False
            self.engine.conversations.leave(self.owner, conversation.id, self)
            self._let_go()  # (after the addition took its own hold: `_store`)

    def join_conversation(self, conversation: Conversation, own_input: Items) -> None:
        """This response reads `conversation` as its context before `own_input` (its
        input, without the conversation's items), and adds both to it when it ends
        `completed` or `incomplete` and is stored (`_store`; not with `store: false`).
        Its Response names the conversation."""
        self.conversation = conversation
        self._conversation_input = own_input
        self.stream.set_response_fields(_dumps({"conversation": {"id": conversation.id}}).encode())

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the instructions and tools (`Engine.prompt_tokens`), once a turn."""
        return sum(self._prompt_token_counts())

    @property
    def instruction_tokens(self) -> int:
        """Tokens of the instructions (`Engine.instruction_tokens`), once a turn."""
        return self._prompt_token_counts()[0]

    @property
    def tool_tokens(self) -> int:
        """Tokens of the tools (`Engine.tool_tokens`), once a turn."""
        return self._prompt_token_counts()[1]

    def _prompt_token_counts(self) -> tuple[int, int]:
        """The instructions' and tools' tokens, kept on the turn: the engine's memo does
        not keep instructions of more than a quarter of its bytes, so large ones,
        counted in a worker thread (`count_input_tokens_off_loop`), would otherwise be
        counted again, on the event loop, each time the turn needs them."""
        if self._prompt_counts is None:
            self._prompt_counts = self.engine.prompt_token_counts(self.request)
        return self._prompt_counts

    @property
    def cached_tokens(self) -> int:
        """Tokens of the prompt a previous prompt of this chain already had: the
        parent's context, and the instructions and tools when they are the parent's."""
        if self._cached_prompt:
            return self._cached_prefix + self.prompt_tokens
        return self._cached_prefix

    @cached_tokens.setter
    def cached_tokens(self, tokens: int) -> None:
        self._cached_prefix = tokens
        self._cached_prompt = False

    @property
    def parent_id(self) -> str | None:
        """The `previous_response_id` the client sent."""
        return self.request.previous_response_id

    def context(self) -> TurnContext:
        return TurnContext(
            response_id=self.response_id,
            model=self.request.model,
            request=self.request,
            view=self.view,
            new_items=len(self.items),
            cached_tokens=self.cached_tokens,
            # The chain's parent, also when found by prefix diffing: upstream
            # backends key what they remember of a chain by it.
            previous_response_id=self.chain_parent_id,
            input=self.items,
            request_sent=self.count_input_tokens if self._tokens_pending else None,
            client_key=self.client_key,
        )

    @property
    def tokenize_off_loop(self) -> bool:
        """Whether the new input, not yet tokenised, or the instructions and tools,
        not yet counted, are large enough to be tokenised in a worker thread
        (`count_input_tokens_off_loop`) before the model starts."""
        return self._input_off_loop or self._prompt_off_loop

    @property
    def _prompt_off_loop(self) -> bool:
        return self._prompt_counts is None and self.engine.prompt_tokenize_off_loop(self.request)

    @property
    def _input_off_loop(self) -> bool:
        return self._tokens_pending and self.items.nbytes >= OFF_LOOP_TOKENIZE_BYTES

    async def count_input_tokens_off_loop(self) -> None:
        """`count_input_tokens` and the prompt's tokens, each in a worker thread when
        it is large (the GIL is released while it works), so the event loop serves
        other connections."""
        if self._input_off_loop:
            await asyncio.to_thread(self.count_input_tokens)
        if self._prompt_off_loop:
            counts = await asyncio.to_thread(self.engine.prompt_token_counts, self.request)
            self._prompt_counts = counts

    def count_input_tokens(self) -> None:
        """Tokenise this turn's new input items, once.

        `Engine.prepare` leaves this out of the request's path: an upstream backend
        calls it (`TurnContext.request_sent`) once its request is on its way, so the
        work overlaps the upstream's; usage and storing call it otherwise. A failure
        leaves the items as they are: storing them then fails the response.
        """
        if not self._tokens_pending:
            return
        # A worker thread may be at it (`count_input_tokens_off_loop`) when a steer or
        # the lifetime's end asks for the usage: that waits for its counts (it read 0).
        with self._tokens_lock:
            if not self._tokens_pending:
                return
            try:
                self._count_input_tokens()
            finally:
                self._tokens_pending = False

    def _count_input_tokens(self) -> None:
        cache = self.engine.cache
        try:
            items = cache.items(self.items)
        except (_core.InvalidItems, _core.TokenizerError) as exc:
            log.error("tokenising the input failed", extra={"error_type": type(exc).__name__})
            return
        self.items = items
        if self.binding is not None:
            self.view = self.binding.view(items)
        else:
            self.view = cache.view(None, owner=self.owner, connection=self.connection, extra=items)

    def start(self) -> bytes:
        return self.stream.start()

    def feed(self, event: ModelEvent) -> bytes:
        """Encode one model event. A TurnFailed event is handled by `fail`, not here."""
        if self.first_token is None and not isinstance(
            event, UsageReport | TurnIncomplete | TextLogprobs | ResponseFields
        ):
            self.first_token = time.perf_counter()
            self.engine.metrics.observe_first_token(self.first_token - self.started)
        if isinstance(event, TextDelta):
            self.output_chars += len(event.text)
            return self.stream.text_delta(event.text)
        if isinstance(event, RefusalDelta):
            self.output_chars += len(event.text)
            return self.stream.refusal_delta(event.text)
        if isinstance(event, ToolArgumentsDelta):
            self.output_chars += len(event.delta)
            return self.stream.tool_arguments_delta(event.delta)
        if isinstance(event, ToolCallStart):
            self.output_chars += len(event.name)
            return self.stream.tool_call_start(event.call_id, event.name, custom=event.custom)
        if isinstance(event, ReasoningDelta):
            self.reasoning_chars += len(event.text)
            return self.stream.reasoning_delta(event.summary, event.index, event.text)
        if isinstance(event, ReasoningStart):
            return self.stream.reasoning_start(event.item_id)
        if isinstance(event, OutputItem):
            streamed = self.stream.open_kind == "reasoning"
            try:
                frames = self.stream.output_item(event.item)
            except ValueError:
                # Not an item the API could show: left out (logged without content).
                log.warning("a malformed output item was left out")
                return b""
            if not streamed:  # a streamed one was counted by its deltas
                self.reasoning_chars += _reasoning_chars(event.item)
            return frames
        if isinstance(event, MessageStart):
            # The next text opens a message of its own.
            open_kind = self.stream.open_kind
            return self.stream.close_item() if open_kind in ("message", "refusal") else b""
        if isinstance(event, TextAnnotation):
            return _or_left_out(self.stream.text_annotation, event.annotation, "text annotation")
        if isinstance(event, HostedCallEvent):
            return _or_left_out(self.stream.item_event, event.event, "hosted tool event")
        if isinstance(event, HostedCallStart):
            # Left out when malformed: its whole item, if it comes, is shown then.
            return _or_left_out(self.stream.item_start, event.item, "hosted tool call start")
        if isinstance(event, UsageReport):
            self.usage_report = event
            return b""
        if isinstance(event, TurnIncomplete):
            self.incomplete_reason = event.reason
            return b""
        if isinstance(event, TextLogprobs):  # not an array: left out
            return _or_left_out(self.stream.text_logprobs, event.logprobs, "log probabilities")
        if isinstance(event, ResponseFields):  # not an object: left out
            return _or_left_out(self.stream.set_response_fields, event.fields, "response fields")
        if isinstance(event, TurnFailed):
            raise TypeError("TurnFailed goes to Turn.fail")
        raise TypeError(f"unknown model event {type(event).__name__}")

    def feed_texts(self, texts: list[str]) -> bytes:
        """Encode a run of text deltas (one event each) in one call."""
        if self.first_token is None:
            self.first_token = time.perf_counter()
            self.engine.metrics.observe_first_token(self.first_token - self.started)
        self.output_chars += sum(map(len, texts))
        return self.stream.text_deltas(texts)

    def starts_new_item(self, event: ModelEvent) -> bool:
        """Whether this event would close the open item and start another (steer point)."""
        if isinstance(event, OutputItem):
            # The whole item finishing the one streamed (reasoning) or under way (a
            # hosted tool call) is not a new item.
            open_kind = self.stream.open_kind
            if open_kind == "reasoning":
                return bool(json.loads(event.item).get("type") != "reasoning")
            if open_kind == "hosted":
                return bool(json.loads(event.item).get("id") != self.stream.open_item_id)
            return True
        if isinstance(event, ToolCallStart | ReasoningStart | HostedCallStart):
            return True
        if isinstance(event, ReasoningDelta):
            return self.stream.open_kind != "reasoning"
        if isinstance(event, TextDelta | TextAnnotation):
            return self.stream.open_kind != "message"
        if isinstance(event, RefusalDelta):
            return self.stream.open_kind != "refusal"
        if isinstance(event, MessageStart):
            return self.stream.open_kind in ("message", "refusal")
        return False

    def usage(self) -> Usage:
        """The response's usage: the backend's report where it gave one, else
        warmsocket's accounting; with `earlier_usage` added."""
        report = self.usage_report or UsageReport()
        self.count_input_tokens()
        input_tokens = report.input_tokens
        if input_tokens is None:
            engine = self.engine
            input_tokens = engine.context_tokens(self.view)
            input_tokens += self.prompt_tokens
        usage = _usage(
            report, input_tokens, self.cached_tokens, self.output_chars, self.reasoning_chars
        )
        earlier = self.earlier_usage
        if earlier is None:
            return usage
        return (
            usage[0] + earlier[0],
            usage[1] + earlier[1],
            usage[2] + earlier[2],
            usage[3] + earlier[3],
        )

    def earlier_pass_usage(
        self,
        report: UsageReport | None,
        *,
        input_tokens: int,
        cached_tokens: int,
        output_chars: int,
    ) -> Usage:
        """The usage of a model pass this response makes before its answer (a
        server-side compaction's summary), counted as `usage` counts the answer's:
        `input_tokens` and `cached_tokens` are warmsocket's accounting of its prompt,
        used where the backend's `report` has none."""
        report = report or UsageReport()
        if report.input_tokens is not None:
            input_tokens = report.input_tokens
        return _usage(report, input_tokens, cached_tokens, output_chars, 0)

    def complete(self) -> bytes:
        """The model finished: `response.completed`, or `response.incomplete` when it
        said it stopped short (`incomplete_reason`); the response is stored. Raises
        APIError if storing fails (then `fail` sends the item events produced so far
        with the failure)."""
        if self.incomplete_reason is not None:
            return self.incomplete(self.incomplete_reason)
        usage = self.usage()
        self._unsent = self.stream.close_item()
        now = int(self.engine.wall_clock())
        self._store(now, usage)
        frames = self._unsent + self.stream.complete(usage, completed_at=now)
        self._unsent = b""
        self._finish("completed", usage)
        return frames

    def incomplete(self, reason: str) -> bytes:
        """`response.incomplete` (steered, or the model stopped short: then the item
        it was writing is `incomplete` too); the response is stored and chainable."""
        usage = self.usage()
        self._unsent = self.stream.close_item(incomplete=reason != "steered")
        now = int(self.engine.wall_clock())
        self._store(now, usage, incomplete=reason)
        frames = self._unsent + self.stream.incomplete(reason, usage, completed_at=now)
        self._unsent = b""
        self._finish("incomplete", usage)
        return frames

    def cancel(self) -> bytes:
        """A background response is cancelled: its open item closed, status
        `cancelled`. Nothing is stored (as for a failure)."""
        frames = self._unsent + self.stream.cancel()
        self._unsent = b""
        self._finish("cancelled")
        return frames

    def fail(self, error: APIError) -> bytes:
        """`response.failed`. Nothing is stored."""
        failure = _dumps(error.response_error()).encode()
        usage = self.usage()
        frames = self._unsent + self.stream.fail(failure, usage)
        self._unsent = b""
        self.engine.metrics.count_error(error.code or "server_error")
        error.counted = True
        # Charged only for what the model did: a request it refused (a context too
        # long, an upstream 429) used no tokens, as OpenAI counts them.
        self._finish("failed", usage if self._model_answered else None)
        return frames

    def rebase(self, start: Items) -> None:
        """Server-side compaction: the response starts a new chain. The model reads
        `start` (the compaction item) as its whole context, and the response is
        stored as a root with no input of its own: its output, the compaction item
        first, is where the chain continues. Built on a connection-local chain, it
        stays connection-local, whatever its `store`."""
        self.count_input_tokens()
        self._rebased_input = self.request.input.json()
        binding = self.binding
        if binding is not None:
            self._local_only |= binding.info().connection is not None
            self.release()
        cache = self.engine.cache
        self.items = start.slice(0, 0)
        self.view = cache.view(None, owner=self.owner, connection=self.connection, extra=start)
        self.cached_tokens = 0
        self.chain_parent_id = None

    @property
    def may_compact(self) -> bool:
        """The turn may start with a compaction (`Engine.model_stream`), which runs in
        the model's task: its events never come at once."""
        return self.request.compact_threshold is not None or triggered(self)

    @property
    def _kept(self) -> bool:
        """Whether the response is stored, not connection-local: only then do its input
        and output go into its conversation. A `store: false` one reads the
        conversation but leaves it as it was (as OpenAI does): conversations are
        written to Redis and snapshots, and `store: false` content never is."""
        return self.request.store and not self._local_only

    def release(self) -> None:
        if self.binding is not None:
            self.binding.release()
            self.binding = None

    def _store(self, completed_at: int, usage: Usage, incomplete: str | None = None) -> None:
        """Store the response as it ends: `completed`, or `incomplete` for a reason."""
        stream = self.stream
        meta = stream.terminal_meta(
            usage,
            completed_at=completed_at,
            incomplete=incomplete,
            instructions=self.prompt_key,
        )
        if self._rebased_input is not None:
            meta = rebased_meta(meta, self._rebased_input, self.request.previous_response_id)
        elif self._conversation_input is not None:
            meta = rebased_meta(meta, self._conversation_input.json(), None)
        cache = self.engine.cache
        output = stream.output_items()
        conversation = self.conversation
        added: Items | None = None
        if conversation is not None and self._conversation_input is not None and self._kept:
            added = self._conversation_input.concat(output)
            self.engine.conversations.check_room(items_cost(added), used=conversation)
        try:
            info = cache.create(
                self.response_id,
                owner=self.owner,
                input=self.items,
                output=output,
                previous_response_id=self.binding,
                settings=self.request.settings_json,
                meta=meta,
                store=self.request.store and not self._local_only,
                connection=self.connection,
            )
        except _core.TokenizerError as exc:
            raise errors.server_error(
                f"The input could not be tokenised ({type(exc).__name__})."
            ) from None
        except _core.ItemTooLarge:
            raise errors.model_failed(
                "The answer has an item larger than this server's item limit "
                "(--max-item-bytes), so it cannot be kept; raise the limit."
            ) from None
        except _core.CacheFull:
            # Not an eviction: this response alone is larger than the whole budget, so
            # the cache refused it. Say so (it is counted as a server_is_overloaded error).
            log.warning(
                "a response is larger than the whole --memory-budget and was not kept",
                extra={"response_id": self.response_id, "memory_budget": cache.memory_budget},
            )
            raise errors.server_overloaded(
                "The response is larger than this server's whole session cache "
                "(--memory-budget), so it cannot be kept; raise the budget."
            ) from None
        except _core.CacheError as exc:
            raise errors.server_overloaded(
                f"The response could not be kept in the session cache ({type(exc).__name__})."
            ) from None
        self._stored_on = info.connection
        if conversation is not None and added is not None and info.connection is None:
            self.engine.conversations.extend(conversation, added)
        shared = self.engine.shared
        if shared is not None and info.connection is None:
            # Stored (store=true, not built on connection-local state): other processes
            # may continue it. Write-behind: queued here, written off the turn's path.
            shared.publish(info, self.items, output)

    def discard(self) -> None:
        """The turn will not run (refused after `Engine.prepare`, e.g. too many
        background responses): what it holds is let go of now, not when it is
        collected (its parent's pin, its conversation)."""
        self.release()
        self._leave_conversation()

    def abandon(self) -> None:
        """The client is gone before the response ended: nothing more is sent or
        stored. Once the model was asked, its input (and what it wrote so far) still
        counts against the key's tokens. Counted in `warmsocket_turns_total` as
        `abandoned` (once, however often it is called)."""
        if self.finished:
            self.release()
            return
        if self.model_started and self.engine.tokens_used is not None:
            self._count_tokens_used(self.usage())
        self.finished = True
        self.release()
        self._leave_conversation()
        engine = self.engine
        engine.forget((self.response_id,))  # never stored: nothing continues it
        engine.metrics.observe_turn(time.perf_counter() - self.started, "abandoned")

    @property
    def _model_answered(self) -> bool:
        return self.usage_report is not None or self.first_token is not None

    def _count_tokens_used(self, usage: Usage | None) -> None:
        """Charge `usage` to the key (`--tokens-per-minute-per-key`), if limited."""
        tokens_used = self.engine.tokens_used
        if tokens_used is not None and usage is not None:
            input_tokens, _cached, output_tokens, _reasoning = usage
            tokens_used(self.owner, input_tokens + output_tokens)

    def _finish(self, status: str, usage: Usage | None = None) -> None:
        """End the turn; `usage`: what its key is charged (a cancel is charged as an
        abandoned turn is; a failure the model refused, nothing)."""
        if status == "cancelled" and self.model_started and self.engine.tokens_used is not None:
            usage = self.usage()
        self._count_tokens_used(usage)
        self.finished = True
        self.end_status = status
        self.release()
        self._leave_conversation()
        engine = self.engine
        if status not in ("completed", "incomplete"):
            engine.forget((self.response_id,))  # never stored: nothing continues it
        else:
            if self._stored_on is not None:
                engine.kept_local(self._stored_on, self.response_id)
            engine.forget_evicted()
        seconds = time.perf_counter() - self.started
        self.engine.metrics.observe_turn(seconds, status)
        if log.isEnabledFor(logging.DEBUG):  # one line per turn: ids, counts, times only
            input_tokens, cached_tokens, output_tokens, _reasoning = self.usage()
            first = None if self.first_token is None else self.first_token - self.started
            log.debug(
                "turn finished",
                extra={
                    "response_id": self.response_id,
                    "stream_id": self.stream_id,
                    "status": status,
                    "seconds": round(seconds, 6),
                    "first_event_seconds": None if first is None else round(first, 6),
                    "input_tokens": input_tokens,
                    "cached_tokens": cached_tokens,
                    "output_tokens": output_tokens,
                },
            )


def _or_left_out(encode: Callable[[bytes], bytes | None], payload: bytes, what: str) -> bytes:
    """`encode(payload)` (nothing for a None), or nothing when the backend's JSON is
    not what the API could show (logged without content)."""
    try:
        return encode(payload) or b""
    except ValueError:
        log.warning("a malformed model event was left out", extra={"event": what})
        return b""


def response_object(
    info: _core.ResponseInfo, output: Items, *, include_output: bool = True
) -> dict[str, Any]:
    """A stored response as the Response object of `GET /v1/responses/{id}`."""
    settings: dict[str, Any] = json.loads(info.settings)
    meta: dict[str, Any] = json.loads(info.meta)
    model = settings.pop("model", None)
    relayed = meta.get("response_fields")
    return {
        "id": info.id,
        "object": "response",
        "created_at": meta.get("created_at"),
        "status": meta.get("status", "completed"),
        "completed_at": meta.get("completed_at"),
        "error": meta.get("error"),
        "incomplete_details": meta.get("incomplete_details"),
        "model": model,
        "output": output.to_objects() if include_output else [],
        "usage": meta.get("usage"),
        "previous_response_id": meta.get("previous_response_id", info.previous_response_id),
        "store": info.store,
        "background": meta.get("background", False),
        **settings,
        **(relayed if isinstance(relayed, dict) else {}),
    }
