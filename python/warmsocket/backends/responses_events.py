"""Responses API streaming events from an upstream -> model events.

Used by the `responses` (SSE) and `responses-ws` backends. warmsocket re-emits the
answer under its own response and item ids, so only what the model produced is
taken: text deltas, function and custom tool calls (`output_item.added` gives
`call_id` and name, then argument or input deltas) and the usage of the terminal
event. Text or arguments that
arrive only in a `.done` event (servers that do not stream deltas) are emitted
then. A reasoning item streams (its start, its summary and text deltas) and ends
with the whole item from its `output_item.done` (adding `encrypted_content`). A
hosted tool call (web search, code interpreter, ...) is shown from its
`output_item.added`, its own events (those naming its `item_id`) are passed on as
they come, and the whole item from its `output_item.done` finishes it. Upstream
item ids are kept for these. A message's annotations (a web search's citations) are
taken as they come, or from a message that was not streamed. Each message's
`output_item.added` is a `MessageStart`, so two messages in a row stay two. The
fields of the terminal event's Response that tell what the upstream did (the tier
that served it, moderation results, ...) come as `ResponseFields`.

The events are read in Rust (`_core.ResponsesStreamDecoder`,
`rust/framing/upstream.rs`): one call per chunk of an SSE body or per WebSocket
message, without parsing the lifecycle events that repeat the whole Response. This
module turns what it returns into model events (`response.incomplete` into
`TurnIncomplete`, with the upstream's reason), and `response.failed` and `error`
events into `UpstreamError`; a stream that ends without a terminal event is a
broken stream (`finish`).
"""

from __future__ import annotations

import json
from typing import Any

from warmsocket._core import ResponsesStreamDecoder
from warmsocket.backends.base import (
    HostedCallEvent,
    HostedCallStart,
    MessageStart,
    ModelEvent,
    OutputItem,
    ReasoningDelta,
    ReasoningStart,
    RefusalDelta,
    ResponseFields,
    TextAnnotation,
    TextDelta,
    TextLogprobs,
    ToolArgumentsDelta,
    ToolCallStart,
    TurnIncomplete,
    UsageReport,
)
from warmsocket.upstream import UpstreamError, from_error_object, transport_error


class ResponsesSSEDecoder:
    """The SSE body of a streamed `POST /responses` -> model events."""

    __slots__ = ("stream",)

    def __init__(self) -> None:
        self.stream = ResponsesStreamDecoder()

    def feed(self, data: bytes) -> list[ModelEvent]:
        """Raises UpstreamError."""
        return model_events(self.stream.feed(data))

    def finish(self) -> list[ModelEvent]:
        """Raises UpstreamError, also when no terminal event came."""
        events = model_events(self.stream.finish())
        if not self.stream.done:
            raise transport_error("closed")
        return events

    @property
    def started(self) -> bool:
        return self.stream.started

    @property
    def ended(self) -> bool:
        """The terminal event arrived: the stream is over, whether or not the HTTP body
        ends with it."""
        return bool(self.stream.done)

    @property
    def response_id(self) -> str | None:
        """The upstream's id of the response (from its terminal event)."""
        return self.stream.response_id


def model_events(decoded: list[tuple[Any, ...]]) -> list[ModelEvent]:
    """`ResponsesStreamDecoder` output -> model events. Raises UpstreamError for a
    stop (`response.failed`, `error`, a message that is not a JSON object)."""
    out: list[ModelEvent] = []
    for event in decoded:
        kind = event[0]
        if kind == "text":
            out.append(TextDelta(event[1]))
        elif kind == "refusal":
            out.append(RefusalDelta(event[1]))
        elif kind == "args":
            out.append(ToolArgumentsDelta(event[1]))
        elif kind == "call":
            out.append(ToolCallStart(event[1], event[2], event[3]))
        elif kind == "item":
            out.append(OutputItem(event[1]))
        elif kind == "message":
            out.append(MessageStart())
        elif kind == "annotation":
            out.append(TextAnnotation(event[1]))
        elif kind == "item_event":
            out.append(HostedCallEvent(event[1]))
        elif kind == "item_start":
            out.append(HostedCallStart(event[1]))
        elif kind == "reasoning_delta":
            out.append(ReasoningDelta(event[3], event[1], event[2]))
        elif kind == "reasoning":
            out.append(ReasoningStart(event[1] or None))
        elif kind == "usage":
            out.append(UsageReport(event[1], event[2], event[3], event[4]))
        elif kind == "incomplete":
            out.append(TurnIncomplete(event[1]))
        elif kind == "logprobs":
            out.append(TextLogprobs(event[1]))
        elif kind == "response_fields":
            out.append(ResponseFields(event[1]))
        else:
            raise _stopped(event)
    return out


def _stopped(stop: tuple[Any, ...]) -> UpstreamError:
    kind = stop[0]
    if kind == "failed":
        return from_error_object(json.loads(stop[1]) if stop[1] is not None else None)
    if kind == "error":
        return from_error_object(json.loads(stop[1]), status=stop[2])
    return transport_error("protocol")
