"""Responses API streaming events from an upstream -> model events.

Used by the `responses` (SSE) and `responses-ws` backends. warmsocket re-emits the
answer under its own response and item ids, so only what the model produced is
taken: text deltas, function calls (`output_item.added` gives `call_id` and name,
then argument deltas) and the usage of the terminal event. Text or arguments that
arrive only in a `.done` event (servers that do not stream deltas) are emitted
then. Reasoning and hosted-tool events have no model event and are dropped.

`response.failed` and `error` events raise `UpstreamError`; a stream that ends
without a terminal event is a broken stream (`finish`).
"""

from __future__ import annotations

from typing import Any

from warmsocket.backends.base import (
    ModelEvent,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStart,
    UsageReport,
)
from warmsocket.sse import SSEDecoder
from warmsocket.upstream import from_error_object, parse_event, transport_error

# Events that carry nothing a model event needs: skipped without parsing their JSON.
_SKIPPED = frozenset(
    {
        b"response.created",
        b"response.in_progress",
        b"response.queued",
        b"response.content_part.added",
        b"response.content_part.done",
    }
)


class ResponsesEventDecoder:
    """One upstream response's events -> model events."""

    def __init__(self) -> None:
        self.done = False
        self.started = False
        """`response.created` (or any later event) arrived."""
        self.response_id: str | None = None
        """The upstream's id of the response (from its terminal event)."""
        self._emitted: dict[str, int] = {}
        """Characters of text/arguments already emitted, by upstream item id."""
        self._function_items: set[str] = set()

    def event(self, kind: str, data: dict[str, Any]) -> list[ModelEvent]:
        """One parsed event. Raises UpstreamError for `response.failed` and `error`."""
        self.started = True
        if kind == "response.output_text.delta":
            delta = data.get("delta")
            if isinstance(delta, str) and delta:
                self._count(data, len(delta))
                return [TextDelta(delta)]
            return []
        if kind == "response.function_call_arguments.delta":
            delta = data.get("delta")
            if isinstance(delta, str) and delta:
                self._count(data, len(delta))
                return [ToolArgumentsDelta(delta)]
            return []
        if kind == "response.output_item.added":
            item = data.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                item_id = str(item.get("id", ""))
                self._function_items.add(item_id)
                events: list[ModelEvent] = [
                    ToolCallStart(str(item.get("call_id", "")), str(item.get("name", "")))
                ]
                arguments = item.get("arguments")
                if isinstance(arguments, str) and arguments:
                    self._emitted[item_id] = len(arguments)
                    events.append(ToolArgumentsDelta(arguments))
                return events
            return []
        if kind == "response.output_text.done":
            return self._rest(str(data.get("item_id", "")), data.get("text"), TextDelta)
        if kind == "response.function_call_arguments.done":
            return self._rest(str(data.get("item_id", "")), data.get("arguments"), _arguments)
        if kind == "response.output_item.done":
            item = data.get("item")
            if not isinstance(item, dict):
                return []
            item_id = str(item.get("id", ""))
            if item.get("type") == "function_call" and item_id in self._function_items:
                return self._rest(item_id, item.get("arguments"), _arguments)
            if item.get("type") == "message" and item_id not in self._emitted:
                text = "".join(
                    p.get("text", "")
                    for p in item.get("content") or ()
                    if isinstance(p, dict) and p.get("type") == "output_text"
                )
                return self._rest(item_id, text, TextDelta)
            return []
        if kind in {"response.completed", "response.incomplete"}:
            self.done = True
            response = data.get("response")
            if not isinstance(response, dict):
                return []
            if isinstance(response.get("id"), str):
                self.response_id = response["id"]
            usage = response.get("usage")
            if not isinstance(usage, dict):
                return []
            details = usage.get("input_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            return [
                UsageReport(
                    input_tokens=_int(usage.get("input_tokens")),
                    cached_tokens=_int(cached),
                    output_tokens=_int(usage.get("output_tokens")),
                )
            ]
        if kind == "response.failed":
            response = data.get("response")
            error = response.get("error") if isinstance(response, dict) else None
            raise from_error_object(error)
        if kind == "error":
            # SSE errors are flat; WebSocket errors nest `error` and carry `status`.
            nested = data.get("error")
            status = data.get("status")
            raise from_error_object(
                nested if isinstance(nested, dict) else data,
                status=status if isinstance(status, int) else None,
            )
        return []

    def _count(self, data: dict[str, Any], size: int) -> None:
        item_id = str(data.get("item_id", ""))
        self._emitted[item_id] = self._emitted.get(item_id, 0) + size

    def _rest(self, item_id: str, full: Any, make: Any) -> list[ModelEvent]:
        if not isinstance(full, str):
            return []
        sent = self._emitted.get(item_id, 0)
        if len(full) <= sent:
            return []
        self._emitted[item_id] = len(full)
        return [make(full[sent:])]


def _arguments(text: str) -> ModelEvent:
    return ToolArgumentsDelta(text)


class ResponsesSSEDecoder:
    """The SSE body of a streamed `POST /responses` -> model events."""

    def __init__(self) -> None:
        self._sse = SSEDecoder()
        self.events = ResponsesEventDecoder()

    def feed(self, data: bytes) -> list[ModelEvent]:
        return self._decode(self._sse.feed(data))

    def finish(self) -> list[ModelEvent]:
        events = self._decode(self._sse.finish())
        if not self.events.done:
            raise transport_error("closed")
        return events

    @property
    def started(self) -> bool:
        return self.events.started

    def _decode(self, pairs: list[tuple[bytes, bytes]]) -> list[ModelEvent]:
        out: list[ModelEvent] = []
        decoder = self.events
        for name, payload in pairs:
            if name in _SKIPPED:
                decoder.started = True
                continue
            if payload == b"[DONE]":
                continue
            try:
                data = parse_event(payload)
            except ValueError:
                raise transport_error("protocol") from None
            if not isinstance(data, dict):
                raise transport_error("protocol")
            kind = data.get("type")
            if not isinstance(kind, str):
                kind = name.decode("latin-1")
            out += decoder.event(kind, data)
        return out


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
