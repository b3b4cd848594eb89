"""`--upstream-api responses`: each turn as one streamed `POST /responses`, stateless.

The body carries the full context with `store: false`: the settings the client set,
the options only an upstream acts on (`image`, `prompt_cache_options`), `include`
with `reasoning.encrypted_content` (`upstream_include`), then `"input":` and the
context exactly as the session cache holds it (canonical item JSON), so each turn's
body starts with the previous turn's. The context part is kept per chain
(`ContextCache`) and extended by each turn's new items rather than built whole
again. The answer's events are re-emitted under warmsocket's own response and item
ids.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, ClassVar

from warmsocket.backends.base import TurnContext
from warmsocket.backends.http_upstream import Decoder, HTTPUpstreamBackend
from warmsocket.backends.responses_events import ResponsesSSEDecoder
from warmsocket.backends.upstream_compact import UpstreamCompactor
from warmsocket.compaction_items import expand_items_json
from warmsocket.response_stream import dumps
from warmsocket.upstream import RESPONSES_FORWARDED, explicit_settings, upstream_include

MEMO_ENTRIES = 4096
HEAD_BYTES = 128 * 1024 * 1024
"""What the request heads kept may count (`HeadCache`; instructions and tools are in
every head)."""
_HeadKey = tuple[str | None, bytes, tuple[str, ...], bytes | None, tuple[str, ...]]
"""What a request head is made of: model, settings JSON, include, upstream options,
the settings given at their default."""
MAX_CONTEXT_BYTES = 32 * 1024 * 1024
"""What `ContextCache` keeps at most: the contexts of the most recent chains."""


def request_head(
    settings: dict[str, Any],
    model: str | None,
    *,
    first: dict[str, Any],
    extra: dict[str, Any],
    include: tuple[str, ...] = (),
    options_json: bytes | None = None,
    given_defaults: tuple[str, ...] = (),
) -> bytes:
    """The body up to the value of `input` (the input comes last): `first`, the
    model (None: none, the `prompt`'s template names it), the settings the client
    set (`given_defaults` even at the API's default), the options only an upstream
    acts on (`CreateRequest.upstream_options_json`), `extra` and `include`."""
    fields = {
        **first,
        **({"model": model} if model is not None else {}),
        **explicit_settings(settings, RESPONSES_FORWARDED, given_defaults),
        **(json.loads(options_json) if options_json is not None else {}),
        **extra,
        "include": upstream_include(include),
    }
    return dumps(fields)[:-1] + b',"input":'


class HeadCache:
    """Request heads by response id, reused while the model, settings, `include`,
    upstream options and settings given at their default stay the same.

    Settings compare as their canonical JSON bytes, so a continuation with unchanged
    settings never decodes them.
    """

    def __init__(
        self,
        extra: dict[str, Any],
        *,
        first: dict[str, Any] | None = None,
        max_bytes: int = HEAD_BYTES,
    ) -> None:
        self.first = first or {}
        self.extra = extra
        self.max_bytes = max_bytes
        self._heads: OrderedDict[str, tuple[_HeadKey, bytes]] = OrderedDict()
        self._bytes = 0
        """The heads' and settings' bytes, counted per entry (a chain's entries share
        theirs, so this counts more than is held)."""

    def head(self, turn: TurnContext, model: str) -> bytes:
        parent = self._heads.get(turn.previous_response_id) if turn.previous_response_id else None
        request = turn.request
        sent_model = None if request.model_from_prompt else model  # the template's
        key = (
            sent_model,
            turn.settings_json,
            request.include,
            request.upstream_options_json,
            request.given_defaults,
        )
        if parent is not None and parent[0] == key:
            key, head = parent  # the parent's objects: a chain holds its settings once
        else:
            head = request_head(
                turn.settings,
                sent_model,
                first=self.first,
                extra=self.extra,
                include=request.include,
                options_json=request.upstream_options_json,
                given_defaults=request.given_defaults,
            )
        heads = self._heads
        replaced = heads.pop(turn.response_id, None)
        if replaced is not None:
            self._bytes -= _head_bytes(replaced)
        heads[turn.response_id] = (key, head)
        self._bytes += _head_bytes((key, head))
        while len(heads) > MEMO_ENTRIES or (self._bytes > self.max_bytes and len(heads) > 1):
            _id, dropped = heads.popitem(last=False)
            self._bytes -= _head_bytes(dropped)
        return head

    def forget(self, response_ids: Iterable[str]) -> None:
        for response_id in response_ids:
            dropped = self._heads.pop(response_id, None)
            if dropped is not None:
                self._bytes -= _head_bytes(dropped)


def _head_bytes(entry: tuple[_HeadKey, bytes]) -> int:
    key, head = entry
    return len(head) + len(key[1])


class ContextCache:
    """The request's `"input"` value so far, by response id: `[` and the context's
    items without the closing `]`, kept for the newest turn of each chain.

    A turn continuing a chain takes its parent's entry and appends only what came
    since (the parent's output and the new input: `ContextView.json_from`) instead of
    building the whole context again; the entry moves to the new response. A fork from
    an older response, or a parent no longer here, builds it whole. Bounded by
    `max_bytes` and `MEMO_ENTRIES` (many small contexts cost more than their bytes),
    oldest chains dropped first: an entry is one more copy of a chain's context,
    besides the session cache's.
    """

    def __init__(self, max_bytes: int = MAX_CONTEXT_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[bytearray, int]] = OrderedDict()
        self._bytes = 0

    def context(self, turn: TurnContext) -> bytearray:
        """`[` and the turn's context items, without the `]`."""
        view = turn.view
        parent = turn.previous_response_id
        entry = self._entries.pop(parent, None) if parent is not None else None
        if entry is not None:
            self._bytes -= len(entry[0])
        if entry is not None and entry[1] <= view.items:
            buffer, items = entry
            tail = expand_items_json(view.json_from(items))
            try:
                buffer += tail
            except BufferError:  # a transport still holds it (a write pending)
                buffer = bytearray(buffer)
                buffer += tail
        else:
            buffer = bytearray(b"[")
            buffer += expand_items_json(view.json_from(0))
        self._entries[turn.response_id] = (buffer, view.items)
        self._bytes += len(buffer)
        while len(self._entries) > 1 and (
            self._bytes > self.max_bytes or len(self._entries) > MEMO_ENTRIES
        ):
            _id, (dropped, _items) = self._entries.popitem(last=False)
            self._bytes -= len(dropped)
        return buffer

    def forget(self, response_ids: Iterable[str]) -> None:
        for response_id in response_ids:
            entry = self._entries.pop(response_id, None)
            if entry is not None:
                self._bytes -= len(entry[0])


class ResponsesHTTPBackend(HTTPUpstreamBackend):
    name = "upstream-responses"
    responses_upstream: ClassVar[bool] = True
    api: ClassVar[str] = "responses"
    path: ClassVar[str] = "/responses"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._body_heads = HeadCache({"stream": True, "store": False})
        self._contexts = ContextCache()
        self._compactor = UpstreamCompactor(self.config, self.router, self.stats)

    async def compact(self, turn: TurnContext, context: bytes) -> dict[str, Any] | None:
        """The upstream's own compaction of the turn's context (`upstream_compact`)."""
        return await self._compactor.compact(turn, context)

    async def aclose(self) -> None:
        self._compactor.close()
        await super().aclose()

    def forget(self, response_ids: Iterable[str]) -> None:
        """Drop what is kept of these responses (`Engine.forget`)."""
        ids = tuple(response_ids)
        self._body_heads.forget(ids)
        self._contexts.forget(ids)

    def build_body(self, turn: TurnContext, model: str) -> list[bytes | bytearray]:
        head = self._body_heads.head(turn, model)
        return [head, self._contexts.context(turn), b"]}"]

    def new_decoder(self) -> Decoder:
        return ResponsesSSEDecoder()
