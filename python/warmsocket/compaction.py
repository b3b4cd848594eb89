"""Compaction: `POST /v1/responses/compact`, and the compaction items it makes.

A compaction turns a long context into a short *window*: every user message of the
context, verbatim (and every `additional_tools` item: the tools it adds stay
callable), followed by one `compaction` item that stands for everything else (spec
§5.7). The client starts a new chain with the window as its `input`
(over HTTP or on its WebSocket), and the model continues from it.

In front of a Responses upstream the upstream compacts: its own
`/responses/compact` gets the context, and its window is the answer
(`backends/upstream_compact.py`; an upstream without the endpoint is compacted as
below). Otherwise warmsocket compacts with the model it serves: the context (the
chain of `previous_response_id`, then the body's `input`) goes to the backend as one
more turn, followed by a user message asking for a summary (`PROMPT`), with the body's
instructions and no tools. The answer's text is the summary. Nothing is stored:
the compaction is not a response, and its id is not a `previous_response_id`.

The compaction item it makes, and how backends read it, are in
`warmsocket.compaction_items`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from warmsocket import errors, ids
from warmsocket._core import ContextView, CreateRequest, Items, parse_client_message
from warmsocket.backends.base import (
    CompactingBackend,
    HostedCallEvent,
    HostedCallStart,
    OutputItem,
    StreamItem,
    TextDelta,
    TurnContext,
    TurnFailed,
    UsageReport,
)
from warmsocket.client_events import COMPACTION_TRIGGER
from warmsocket.compaction_items import PROMPT, encode_content, unpack
from warmsocket.response_stream import dumps, usage_object
from warmsocket.token_count import parse_count_request
from warmsocket.upstream import explicit_settings, upstream_options

if TYPE_CHECKING:
    from warmsocket.engine import Engine, Turn, Usage

_COMPACT_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "previous_response_id",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "safety_identifier",
        "service_tier",
        "image",
    }
)
"""The body fields of `POST /v1/responses/compact` (the SDK's `ResponseCompactParams`)."""

# -- the compact endpoint -----------------------------------------------------------------


def parse_compact_request(body: bytes, *, max_item_bytes: int) -> tuple[CreateRequest, bool]:
    """The create request a compact body stands for (its context: the previous
    response's, then the input), and whether the body has input. Raises APIError
    for a body the endpoint refuses."""
    request, has_input = parse_count_request(
        body, max_item_bytes=max_item_bytes, require_model=True
    )
    refused = {
        "tools": request.has_tools,
        "stream": request.stream,
        "background": request.background,
        "store": not request.store,
        "conversation": request.conversation is not None,
    }
    for field, present in refused.items():
        # The create fields a compaction could not honour; any other field is ignored,
        # as a create ignores what it does not know.
        if present:
            raise errors.APIError(
                None,
                f"Unknown parameter: '{field}'. POST /v1/responses/compact takes "
                + ", ".join(sorted(_COMPACT_FIELDS))
                + ".",
                param=field,
            )
    if not has_input and request.previous_response_id is None:
        raise errors.APIError(
            None,
            "Nothing to compact: send 'input', 'previous_response_id', or both.",
            param="input",
        )
    return request, has_input


async def compact(
    engine: Engine,
    request: CreateRequest,
    *,
    has_input: bool,
    owner: str,
    client_key: str | None = None,
) -> bytes:
    """The compacted window of a request's context, as the `response.compaction`
    object's JSON. Raises APIError as a create would (unknown previous response,
    invalid input, the model failing)."""
    summary_request = _summary_request(request, request.previous_response_id, compact=True)
    ask = parse_client_message(summary_request, websocket=False)
    assert isinstance(ask, CreateRequest), ask
    turn = engine.prepare(
        ask,
        owner=owner,
        connection=None,
        lookup_connection=None,
        prepend=_without_trigger(engine.resolved_input(request, owner=owner, connection=None))
        if has_input
        else None,
        client_key=client_key,
        counting=True,  # (the compacted window is answered, not kept)
    )
    try:
        await turn.count_input_tokens_off_loop()
        backend = engine.backend
        if isinstance(backend, CompactingBackend):
            upstream = await backend.compact(turn.context(), _without_prompt(turn.view))
            if upstream is not None:
                engine.metrics.count_compaction()
                if engine.tokens_used is not None:
                    engine.tokens_used(owner, _total_tokens(upstream.get("usage")))
                return dumps(upstream)
        summary, report = await _summarise(engine, turn.context())
        context = turn.view.objects()[:-1]  # less the prompt
        turn.usage_report = report
        turn.output_chars = len(summary)
        input_tokens, cached_tokens, output_tokens, reasoning_tokens = turn.usage()
        if engine.tokens_used is not None:
            engine.tokens_used(owner, input_tokens + output_tokens)
    finally:
        turn.release()
    item = {
        "id": ids.new_id("cmp"),
        "type": "compaction",
        "encrypted_content": encode_content(summary),
    }
    compacted = {
        "id": ids.new_id("cmp"),
        "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [*window_items(context), item],
        "usage": usage_object(input_tokens, cached_tokens, output_tokens, reasoning_tokens),
    }
    safety_identifier = request.settings.get("safety_identifier")
    if safety_identifier is not None:
        compacted["safety_identifier"] = safety_identifier  # echoed, as OpenAI does
    engine.metrics.count_compaction()
    return dumps(compacted)


def _without_trigger(items: Items) -> Items:
    """A compact body's input less its last item when that is a `compaction_trigger`
    (the endpoint compacts anyway; the trigger is no part of the context)."""
    return items.slice(0, len(items) - 1) if ends_with_trigger(items) else items


def _total_tokens(usage: Any) -> int:
    """Input plus output tokens of an upstream's usage object (0 where it says none)."""
    if not isinstance(usage, Mapping):
        return 0
    total = 0
    for field in ("input_tokens", "output_tokens"):
        value = usage.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            total += value
    return total


def window_items(context: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The user messages of a context and its `additional_tools` items (the tools they
    add stay callable), in order, as the output items of a window (also those a
    self-contained compaction item keeps)."""
    messages: list[dict[str, Any]] = []
    for item in context:
        if item.get("type") == "compaction":
            compacted = unpack(item)
            if compacted is not None and compacted.self_contained:
                messages += window_items([*(compacted.before or ()), *compacted.after])
            continue
        if item.get("type") == "additional_tools":
            tools_id = item.get("id")
            added = {**item, "id": tools_id if isinstance(tools_id, str) else ids.new_id("at")}
            messages.append(added)
            continue
        if item.get("type", "message") != "message" or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            content = [{"type": "input_text", "text": content}]
        message_id = item.get("id")
        messages.append(
            {
                "id": message_id if isinstance(message_id, str) else ids.message_id(),
                "type": "message",
                "status": "completed",
                "role": "user",
                "content": content,
            }
        )
    return messages


# -- server-side compaction ---------------------------------------------------------------


async def compacting_stream(
    engine: Engine, turn: Turn, threshold: int
) -> AsyncIterator[StreamItem]:
    """A turn's model events with server-side compaction (`context_management`).

    When the prompt (the instructions, the tools, the chain, the new input) has
    `threshold` tokens or more, the model first summarises the context: the
    response's first output item is a self-contained compaction item (shown as it
    starts, with `response.compaction.compacting`, and whole once the summary is
    written), and the turn is rebased on it (`Turn.rebase`): the model then answers from the
    compaction item alone, and the chain goes on from this response's output. Below
    the threshold the turn is the backend's, unchanged."""
    context_tokens = await _context_tokens(engine, turn)
    if context_tokens + turn.tool_tokens >= threshold:
        async for batch in _compaction(engine, turn, context_tokens, triggered=False):
            yield batch
    stream = engine.backend.stream(turn.context())
    try:
        async for batch in stream:
            yield batch
    finally:
        await _close(stream)


def triggered(turn: Turn) -> bool:
    """Whether the turn's input ends with a `compaction_trigger` item (parsing let it
    be the last item only)."""
    return ends_with_trigger(turn.items)


def ends_with_trigger(items: Items) -> bool:
    return len(items) > 0 and items.item_meta(-1).type == COMPACTION_TRIGGER


async def triggered_compaction(engine: Engine, turn: Turn) -> AsyncIterator[StreamItem]:
    """The model events of a turn whose input ends with a `compaction_trigger` item:
    its context (the trigger left out) is compacted as `compacting_stream` does past
    its threshold, and the compaction item is the response's whole output; the model
    does not answer. Its usage is the summary's. The chain goes on from the item."""
    context_tokens = await _context_tokens(engine, turn)
    async for batch in _compaction(engine, turn, context_tokens, triggered=True):
        yield batch
    yield UsageReport(input_tokens=0, cached_tokens=0, output_tokens=0, reasoning_tokens=0)


async def _context_tokens(engine: Engine, turn: Turn) -> int:
    """The tokens of the turn's context, its instructions included."""
    await turn.count_input_tokens_off_loop()
    turn.count_input_tokens()
    # The turn's counts: large instructions were counted off the event loop just now.
    return engine.context_tokens(turn.view) + turn.instruction_tokens


async def _compaction(
    engine: Engine, turn: Turn, context_tokens: int, *, triggered: bool
) -> AsyncIterator[StreamItem]:
    """Compact the turn's context (`triggered`: its last input item, the trigger, left
    out) into its first output item, and rebase the turn on that item."""
    item_id = ids.new_id("cmp")
    started = {"id": item_id, "type": "compaction", "encrypted_content": ""}
    compacting = {"type": "response.compaction.compacting", "item_id": item_id}
    yield [HostedCallStart(dumps(started)), HostedCallEvent(dumps(compacting))]
    item, summary_usage = await _self_contained(
        engine, turn, item_id, context_tokens, triggered=triggered
    )
    turn.earlier_usage = summary_usage  # added to the response's usage
    engine.metrics.count_compaction()
    yield OutputItem(dumps(item))
    turn.rebase(Items.from_objects([item]))


async def _self_contained(
    engine: Engine, turn: Turn, item_id: str, context_tokens: int, *, triggered: bool
) -> tuple[dict[str, Any], Usage]:
    """The compaction item that stands for a turn's whole context, and the usage of
    the summary turn that wrote it (`context_tokens`: the context's tokens, the
    instructions included; the summary turn has no tools). The item holds the
    model's summary of the context, the user messages before the summary, and after
    it the last response's output and this turn's input as they are (a tool call
    and the output that answers it stay together; a compaction item among them is
    left out, the summary covers it, and the user messages it holds go before).
    With no cached parent, the input's last turn stands for those (`last_turn_start`).
    `triggered`: the input's last item, a `compaction_trigger`, is in neither."""
    ask = parse_client_message(_summary_request(turn.request), websocket=False)
    assert isinstance(ask, CreateRequest), ask
    own = turn.items.slice(0, len(turn.items) - 1) if triggered else turn.items
    extra = own.concat(Items.from_objects([_prompt_message()]))
    cache = engine.cache
    binding = turn.binding
    if binding is not None:
        view = binding.view(extra, tokenize=False)
        kept = min(binding.info().output_items, turn.view.items - len(turn.items))
    else:
        view = cache.view(
            None, owner=turn.owner, connection=turn.connection, extra=extra, tokenize=False
        )
        kept = 0
    context = TurnContext(
        response_id=ids.response_id(),
        model=turn.request.model,
        request=ask,
        view=view,
        new_items=len(extra),
        cached_tokens=turn.cached_tokens,
        previous_response_id=turn.chain_parent_id,
        input=extra,
        client_key=turn.client_key,
    )
    summary, report = await _summarise(engine, context)
    usage = turn.earlier_pass_usage(
        report,
        input_tokens=context_tokens + _prompt_tokens(engine),
        # The summary turn's prompt has no tools: with tools, it is another prompt.
        cached_tokens=0 if turn.request.has_tools else turn.cached_tokens,
        output_chars=len(summary),
    )
    items = turn.view.objects()
    if triggered:
        items.pop()
    # With no cached parent (a history a new or restarted server, another replica or
    # an evicted chain has not seen) all of it is input: kept whole after the summary,
    # it would make the context larger than the one that crossed the threshold.
    split = len(items) - kept - len(own) if binding is not None else last_turn_start(items)
    tail = items[split:]
    after = [item for item in tail if item.get("type") != "compaction"]
    # The user messages of the compaction items left out of `after` stay too.
    folded = [item for item in tail if item.get("type") == "compaction"]
    before = window_items([*items[:split], *folded])
    content = encode_content(summary, before=before, after=after)
    return {"id": item_id, "type": "compaction", "encrypted_content": content}, usage


_ANSWERS = {"mcp_approval_response": "approval_request_id"}
"""Items that answer a model's item by another field than `call_id`: the field."""
_ASKS = {"mcp_approval_request": "id"}
"""Model items that another field than `call_id` names: the field."""
_NOT_MODEL_MADE = frozenset(
    {"compaction", "item_reference", "additional_tools", COMPACTION_TRIGGER, *_ANSWERS}
)


def last_turn_start(items: Sequence[Mapping[str, Any]]) -> int:
    """Where the last turn of a history sent whole begins: the last response's
    output, i.e. the last run of items a model makes (assistant messages, reasoning,
    tool calls), then this turn's input; the last user message when no model item
    is there. A server-side compaction keeps the items from there on as they are,
    as it keeps the last response's output and the input after a cached parent.
    Moved back so that a tool call and the output that answers it stay together."""
    start = len(items)
    while start > 0 and not _model_made(items[start - 1]):
        start -= 1  # this turn's input
    if start == 0:
        users = [i for i, item in enumerate(items) if _role(item) == "user"]
        start = users[-1] if users else 0
    while start > 0 and _model_made(items[start - 1]):
        start -= 1  # the last response's output
    return _with_the_calls_answered(items, start)


def _with_the_calls_answered(items: Sequence[Mapping[str, Any]], start: int) -> int:
    """`start`, moved back to the earliest model item (a tool call, an approval
    request) that an item from `start` on answers, until none is left before it."""
    asked: dict[str, int] = {}  # the key an answer names -> where the model asked
    for index, item in enumerate(items[:start]):
        key = _key(item, _ASKS) if _model_made(item) else None
        if key is not None:
            asked.setdefault(key, index)
    # From the end back: an answer at or after the start moves the start back to its
    # call, and so brings the items between them in, whose answers are read next.
    index = len(items) - 1
    while index >= start:
        item = items[index]
        key = None if _model_made(item) else _key(item, _ANSWERS)
        call = asked.get(key) if key is not None else None
        if call is not None and call < start:
            start = call
        index -= 1
    return start


def _key(item: Mapping[str, Any], fields: Mapping[str, str]) -> str | None:
    """The call id an item has (`call_id`, or the field `fields` gives its type)."""
    kind = item.get("type")
    key = item.get(fields.get(kind, "call_id") if isinstance(kind, str) else "call_id")
    return key if isinstance(key, str) else None


def _role(item: Mapping[str, Any]) -> object:
    return item.get("role") if item.get("type", "message") == "message" else None


def _model_made(item: Mapping[str, Any]) -> bool:
    """Whether a model makes such an item: an assistant message, reasoning, a tool
    call, a program; not a user's, system's or developer's message, a tool's output,
    an approval, tools a developer added, or a compaction item or trigger."""
    kind = item.get("type", "message")
    if kind == "message":
        return item.get("role") == "assistant"
    return isinstance(kind, str) and not kind.endswith("_output") and kind not in _NOT_MODEL_MADE


def _prompt_tokens(engine: Engine) -> int:
    """Tokens of the message that asks for a summary, as the context counts them."""
    prompt = Items.from_objects([_prompt_message()])
    view = engine.cache.view(None, owner="", connection=None, extra=prompt)
    return engine.context_tokens(view)


def _without_prompt(view: ContextView) -> bytes:
    """The context's items as the cache keeps them (comma-joined), less the summary
    prompt that ends it."""
    context = view.json_from(0)
    prompt = Items.from_objects([_prompt_message()]).json()[1:-1]
    assert context.endswith(prompt), "the summary prompt ends the context"
    return context[: len(context) - len(prompt)].removesuffix(b",")


def _prompt_message() -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": PROMPT}


SUMMARY_SETTINGS = (
    "service_tier",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
)
"""The client's settings a summary turn keeps (besides model, instructions and the
options only an upstream acts on: `upstream_options`): who the
request is for and how it is cached and served, which the upstream is owed for a
turn made on the client's behalf. Tools, sampling and output format are not the
summary's."""


def _summary_request(
    request: CreateRequest, previous_response_id: str | None = None, *, compact: bool = False
) -> bytes:
    """The create body of the summary turn for `request`'s context: a create's
    (server-side compaction) keeps its options, a `prompt` with no model when the
    template names it; a compact body's (`compact`) only what the endpoint takes."""
    options = upstream_options(request, compact=compact)
    body: dict[str, Any] = {
        "model": request.model,
        "input": [_prompt_message()],
        **explicit_settings(request.settings, SUMMARY_SETTINGS, request.given_defaults),
        **options,
    }
    if "prompt" in options and request.model_from_prompt:
        del body["model"]
    if request.instructions is not None:
        body["instructions"] = request.instructions
    if previous_response_id is not None:
        body["previous_response_id"] = previous_response_id
    return json.dumps(body).encode()


async def _summarise(engine: Engine, turn: TurnContext) -> tuple[str, UsageReport | None]:
    """Run the summary turn on the backend: its text, and the backend's usage."""
    parts: list[str] = []
    report: UsageReport | None = None
    stream = engine.backend.stream(turn)
    try:
        async for batch in stream:
            for event in batch if isinstance(batch, list) else (batch,):
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, UsageReport):
                    report = event
                elif isinstance(event, TurnFailed):
                    raise event.error
    finally:
        await _close(stream)
    summary = "".join(parts)
    if not summary.strip():
        raise errors.model_failed("The model wrote no summary of the context to compact it.")
    return summary, report


async def _close(stream: AsyncIterator[StreamItem]) -> None:
    """Stop a backend's stream now, not when it is collected (`Backend.stream` promises
    an async iterator; only generators have `aclose`)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
