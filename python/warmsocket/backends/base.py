"""What a model backend is: an async stream of model events for one turn.

The turn engine turns these into Responses API events (item boundaries, indices,
sequence numbers); a backend only says what the model produced. An item ends when
an event of another item starts, or when the stream ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from warmsocket._core import ContextView, CreateRequest, Items
    from warmsocket.errors import APIError


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Assistant text; starts a message item when none is open."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """Starts a function_call item, or with `custom` a custom (freeform) tool call,
    whose input then comes as `ToolArgumentsDelta`s."""

    call_id: str
    name: str
    custom: bool = False


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    """The model's refusal (a message whose content part is a `refusal`)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolArgumentsDelta:
    """Arguments of the open function_call item."""

    delta: str


@dataclass(frozen=True, slots=True)
class ReasoningStart:
    """A reasoning item starts (closes the open item); its parts come as
    `ReasoningDelta`s, and a whole `OutputItem` of the same id finishes it."""

    item_id: str | None = None
    """The upstream's item id (None: one is made)."""


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Reasoning text as it comes: of summary part `index` when `summary`, else of
    `reasoning_text` content part `index`. Opens a reasoning item when none is."""

    text: str
    summary: bool = False
    index: int = 0


@dataclass(frozen=True, slots=True)
class OutputItem:
    """A whole output item of a type not built from deltas, as JSON: a reasoning item
    (`summary`, optional `content` and `encrypted_content`), a hosted tool call (or a
    custom one whose start never came); with the upstream's `id`. Closes the open
    item, except a reasoning item that finishes the one streamed. It is shown to the
    client and kept in the chain, so it goes back to the upstream with the context
    (as reasoning models need their reasoning items)."""

    item: bytes


@dataclass(frozen=True, slots=True)
class MessageStart:
    """A new message item starts: the text after it is not the open message's (an
    upstream's answer can hold several messages in a row)."""


@dataclass(frozen=True, slots=True)
class TextAnnotation:
    """An annotation of the message's text (a web search's `url_citation`, ...), as
    JSON: shown as it comes and kept in the message's text part. Opens a message item
    when none is."""

    annotation: bytes


@dataclass(frozen=True, slots=True)
class HostedCallStart:
    """A hosted tool call starts (web search, code interpreter, an MCP call, ...), as
    JSON with the upstream's `id`: shown at once, closing the open item. Its progress
    comes as `HostedCallEvent`s, and a whole `OutputItem` of the same id finishes it."""

    item: bytes


@dataclass(frozen=True, slots=True)
class HostedCallEvent:
    """An event of the hosted tool call under way, as the upstream sent it (JSON naming
    its `item_id`: `response.web_search_call.searching`, a code delta, ...); passed on
    with this response's numbering."""

    event: bytes


MAX_REPORTED_TOKENS = 2**53
"""A backend's token count past this (or below 0) is not believed: no model reads
so many, and sums of them must fit the response's unsigned 64-bit usage (and a
JavaScript client's numbers)."""


@dataclass(frozen=True, slots=True)
class UsageReport:
    """The backend's own token accounting; any field left None is computed by the
    server, as is one the backend gave out of range (`MAX_REPORTED_TOKENS`)."""

    input_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    """Of the output tokens, those spent reasoning."""

    def __post_init__(self) -> None:
        for name in ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_REPORTED_TOKENS:
                object.__setattr__(self, name, None)


@dataclass(frozen=True, slots=True)
class TextLogprobs:
    """The log probabilities of the text delta that follows (a JSON array, as an
    upstream's `response.output_text.delta` carried them)."""

    logprobs: bytes


@dataclass(frozen=True, slots=True)
class TurnIncomplete:
    """The model stopped before the end of its answer (its output token limit, a
    content filter): the output so far ends the response `incomplete`, with
    `incomplete_details.reason` = `reason` (`max_output_tokens`, `content_filter`).
    It comes after the output; the response is stored and can be continued."""

    reason: str


@dataclass(frozen=True, slots=True)
class ResponseFields:
    """Fields of the upstream's Response that tell what it did rather than echo the
    request (a JSON object: the `service_tier` that served it, `moderation` results,
    hosted tools' `tool_usage`, ...): warmsocket's Response gets them at its end, each
    in place of the setting of its name (`service_tier`) or added, and keeps them
    when stored."""

    fields: bytes


@dataclass(frozen=True, slots=True)
class TurnFailed:
    """The model failed after the response started: it ends `response.failed`."""

    error: APIError

    def __post_init__(self) -> None:
        # The error is shown to the client, never raised again: drop its traceback. A
        # backend that caught it holds it in a local of its stream's frame, which that
        # traceback holds in turn: a cycle that would keep the turn, with its whole
        # context, alive until the cyclic garbage collector runs.
        self.error.__traceback__ = None


ModelEvent = (
    TextDelta
    | RefusalDelta
    | ToolCallStart
    | ToolArgumentsDelta
    | ReasoningStart
    | ReasoningDelta
    | OutputItem
    | HostedCallStart
    | HostedCallEvent
    | TextAnnotation
    | MessageStart
    | UsageReport
    | TextLogprobs
    | TurnIncomplete
    | ResponseFields
    | TurnFailed
)

StreamItem = ModelEvent | list[ModelEvent]
"""What a backend's stream yields: one event, or a list of events that are ready
together (a burst from one upstream read, or a model with no pacing). A list costs
one pass through the session and one write instead of one per event; it must not
hold back an event that was ready earlier."""


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a backend gets for one turn."""

    response_id: str
    model: str
    request: CreateRequest
    """The parsed create; its settings are canonical JSON until `settings` is asked for."""
    view: ContextView
    """The full context: the parent chain's items followed by this turn's new input."""
    new_items: int
    """How many items at the end of `view` are this turn's input."""
    cached_tokens: int
    """Tokens of the context that were cached before this turn."""
    previous_response_id: str | None = None
    """The parent response's id, None for a new chain. Upstream backends key what they
    remember about a chain (the replica that served it, the upstream's own response id)
    by warmsocket response ids, so a turn finds its parent's entry with this."""
    input: Items | None = None
    """This turn's own new input (the last `new_items` items of `view`), for backends
    that send only new items upstream."""
    request_sent: Callable[[], None] | None = None
    """Work the server left out of the request's path (tokenising the new input). A
    backend that sends a request upstream calls it once the request is written, so
    the work overlaps the upstream's; it is done later otherwise. Never raises."""
    client_key: str | None = None
    """The client's own bearer token, if it sent one: an upstream backend sends it
    upstream with `--upstream-forward-key` (`UpstreamConfig.key_for`). Never logged."""

    @property
    def settings(self) -> dict[str, Any]:
        """The request's echoed settings: instructions, tools, tool_choice, sampling fields.

        Decoded from `settings_json` the first time any turn of the request asks, then
        shared: do not modify it.
        """
        return self.request.settings

    @property
    def settings_json(self) -> bytes:
        """The echoed settings and `model` as canonical JSON (equal bytes = equal settings)."""
        return self.request.settings_json

    @property
    def instructions(self) -> str | None:
        return self.request.instructions

    @property
    def function_names(self) -> list[str]:
        return list(self.request.function_names)


class Backend(Protocol):
    """A model that streams one turn.

    A backend whose upstream speaks the Responses API sets `responses_upstream =
    True`: the fields only such an upstream honours (`CreateRequest.responses_only`:
    OpenAI's prompt templates, moderation) go to it; any other backend refuses a
    request with one (400).

    A backend that keeps working copies of responses (rendered messages, request
    bodies) defines `forget(response_ids)`: the engine calls it when nothing can
    continue those responses any more (deleted, never stored, or gone with their
    connection), so the copies go with them.

    A backend may also set a class attribute `eager_start = True`: the server then
    runs the first step of `stream`'s iteration (up to its first wait) in the
    callback that received the client's message, outside any task, so an upstream
    request goes out at once. From Python 3.12 on that step runs as an eager task;
    on 3.11 it runs outside any task, so it must not need a current task (no
    `asyncio.timeout`, no `asyncio.current_task`; `asyncio.wait_for` is fine there).
    """

    name: str

    def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        """The model events of one turn, singly or in lists of events that are ready
        together. Cancelling the iteration must stop the work."""
        ...

    async def aclose(self) -> None:
        """Release pooled connections."""
        ...


@runtime_checkable
class CompactingBackend(Backend, Protocol):
    """A backend whose upstream compacts conversations itself (`POST
    /responses/compact`): its window is what `POST /v1/responses/compact` answers."""

    async def compact(self, turn: TurnContext, context: bytes) -> dict[str, Any] | None:
        """The upstream's `response.compaction` object for `context` (items as the
        cache keeps them, comma-joined) with the turn's model and instructions; None
        when the upstream has no compaction endpoint (warmsocket then compacts with
        the model). Raises APIError (the upstream's failure)."""
        ...


@runtime_checkable
class ImmediateBackend(Backend, Protocol):
    """A backend that can sometimes answer at once (the built-in model without its
    latency knobs): the server then runs the turn to its end in the same step, with
    no task."""

    def immediate(self, turn: TurnContext) -> list[ModelEvent] | None:
        """The whole answer, when producing it needs no waiting; None to use `stream`.
        Exceptions are backend errors, as from `stream`."""
        ...
