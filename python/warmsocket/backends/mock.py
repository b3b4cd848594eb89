"""The built-in deterministic model (`--model-backend mock`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from itertools import islice
from typing import Any

from warmsocket import errors, ids, mockmodel, small_json
from warmsocket.backends.base import (
    HostedCallEvent,
    HostedCallStart,
    ModelEvent,
    OutputItem,
    StreamItem,
    TextAnnotation,
    TextDelta,
    TextLogprobs,
    ToolArgumentsDelta,
    ToolCallStart,
    TurnContext,
    TurnFailed,
    TurnIncomplete,
)
from warmsocket.compaction_items import expand_context
from warmsocket.engine import BYTES_PER_TOKEN_ESTIMATE

READY_BATCH = 256
"""Events of a ready answer handed to the server at once: more wait for the
connection's write buffer to drain (a 100k-word answer would otherwise sit whole in
it, and the client's pings behind it)."""
IMMEDIATE_TEXT = 64 * 1024
"""A reply text longer than this is streamed (`stream`) without being split into
events first to see whether it fits in `READY_BATCH`."""


class MockBackend:
    """Answers from the rebuilt context with `warmsocket.mockmodel`'s rules.

    Latency knobs for benchmarks: `ttft_ms` before the first event, and
    `tokens_per_second` pacing between deltas (one delta counts as one token).
    """

    name = "mock"

    def __init__(self, *, ttft_ms: float = 0.0, tokens_per_second: float = 0.0) -> None:
        self.ttft = max(0.0, ttft_ms) / 1000.0
        self.delta_interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0

    async def stream(self, turn: TurnContext) -> AsyncIterator[StreamItem]:
        reply = self._plan(turn)
        delay = self.ttft + reply.sleep_ms / 1000.0
        if delay:
            await asyncio.sleep(delay)
        events = self._events(reply, turn)
        if not self.delta_interval:
            # No pacing: the answer is ready at once; made and handed over in batches
            # (never all of it at once: a reply of millions of words), so the server's
            # write backpressure holds between them and other connections get their
            # turn.
            first = True
            while batch := list(islice(events, READY_BATCH)):
                if not first:
                    await asyncio.sleep(0)
                first = False
                yield batch
            return
        previous: ModelEvent | None = None
        for event in events:
            if previous is not None and not isinstance(previous, TextLogprobs):
                await self._pace()  # (log probabilities go with their delta)
            previous = event
            yield event

    def immediate(self, turn: TurnContext) -> list[ModelEvent] | None:
        """The whole answer now when nothing makes it wait (no latency knobs, no
        `/sleep`), so the server needs no task for it; None otherwise."""
        if self.ttft or self.delta_interval:
            return None
        reply = self._plan(turn)
        if reply.sleep_ms or len(reply.text) > IMMEDIATE_TEXT:
            return None
        # A long answer goes through `stream`, whose batches wait for a slow reader
        # (an immediate answer is written whole, however large).
        events = list(islice(self._events(reply, turn), READY_BATCH + 1))
        return events if len(events) <= READY_BATCH else None

    def _plan(self, turn: TurnContext) -> mockmodel.Reply:
        tail: list[dict[str, Any]] = small_json.loads(turn.view.tail(from_last_role="user"))
        if tail and tail[0].get("type") == "compaction":
            # No user message after a compaction item that starts the context: read
            # the messages it stands for.
            tail = expand_context(tail, summary_as_item=True)
            tail = tail[mockmodel.last_user_message(tail) or 0 :]
        return mockmodel.plan_reply(
            tail,
            function_names=turn.function_names,
            instructions=turn.instructions,
            full_context=lambda: expand_context(json.loads(turn.view.json()), summary_as_item=True),
            custom_names=lambda: mockmodel.custom_tool_names(turn.settings.get("tools")),
            tool_types=lambda: mockmodel.tool_types(turn.settings.get("tools")),
            choice=_tool_choice(turn),
            parameters=lambda name: mockmodel.function_parameters(turn.settings.get("tools"), name),
        )

    @staticmethod
    def _events(reply: mockmodel.Reply, turn: TurnContext) -> Iterator[ModelEvent]:
        """The answer's events, made as they are taken."""
        events = MockBackend._answer(reply)
        max_output_tokens = turn.request.max_output_tokens
        if max_output_tokens is not None:
            events = _within(events, max_output_tokens, reply.reasoning)
        if mockmodel.LOGPROBS in turn.request.include:
            top = turn.settings.get("top_logprobs")
            events = _with_logprobs(events, top if isinstance(top, int) else 0)
        return events

    @staticmethod
    def _answer(reply: mockmodel.Reply) -> Iterator[ModelEvent]:
        if reply.reasoning is not None:
            yield OutputItem(mockmodel.reasoning_item(reply.reasoning))
        if reply.search is not None:
            yield from _web_search(reply.search)
        if reply.kind == "fail":
            yield TurnFailed(errors.model_failed())
        elif reply.kind == "call":
            for call in reply.calls:
                yield ToolCallStart(ids.call_id(), call.name, custom=call.custom)
                deltas = (mockmodel.text_deltas if call.custom else mockmodel.argument_deltas)(
                    call.arguments
                )
                yield from map(ToolArgumentsDelta, deltas)
        else:
            yield from map(TextDelta, mockmodel.iter_text_deltas(reply.text))
            if reply.search is not None:
                citation = mockmodel.search_citation(reply.search, reply.text)
                yield TextAnnotation(json.dumps(citation).encode())

    async def _pace(self) -> None:
        if self.delta_interval:
            await asyncio.sleep(self.delta_interval)

    async def aclose(self) -> None:
        return None


def _tool_choice(turn: TurnContext) -> mockmodel.ToolChoice:
    """The request's `tool_choice` and `parallel_tool_calls` (its settings are decoded
    only when it has tools: without, there is nothing to choose)."""
    if not turn.request.has_tools:
        return mockmodel.AUTO
    settings = turn.settings
    return mockmodel.tool_choice(settings.get("tool_choice"), settings.get("parallel_tool_calls"))


def _within(
    events: Iterable[ModelEvent], max_output_tokens: int, reasoning: str | None
) -> Iterator[ModelEvent]:
    """The answer cut at `max_output_tokens`, counted as its usage counts them when
    no backend reports any (`BYTES_PER_TOKEN_ESTIMATE` characters a token, the
    reasoning's included): the text or arguments that fit, then `TurnIncomplete`
    (`max_output_tokens`); the whole answer when it fits."""
    per_token = BYTES_PER_TOKEN_ESTIMATE
    reasoning_tokens = -(-len(reasoning) // per_token) if reasoning else 0
    budget = (max_output_tokens - reasoning_tokens) * per_token
    for event in events:
        if isinstance(event, TextDelta | ToolArgumentsDelta | ToolCallStart):
            text = event.name if isinstance(event, ToolCallStart) else _text_of(event)
            if len(text) > budget:
                if budget > 0 and isinstance(event, TextDelta):
                    yield TextDelta(event.text[:budget])
                elif budget > 0 and isinstance(event, ToolArgumentsDelta):
                    yield ToolArgumentsDelta(event.delta[:budget])
                yield TurnIncomplete("max_output_tokens")
                return
            budget -= len(text)
        yield event
    if budget < 0:  # the reasoning alone is over the limit
        yield TurnIncomplete("max_output_tokens")


def _with_logprobs(events: Iterable[ModelEvent], top: int) -> Iterator[ModelEvent]:
    """Each text delta after its log probabilities (`mockmodel.text_logprobs`), as
    the client's `include` asked: the text as it goes out, after any cut."""
    for event in events:
        if isinstance(event, TextDelta):
            logprobs = mockmodel.text_logprobs(event.text, top)
            yield TextLogprobs(json.dumps(logprobs, ensure_ascii=False).encode())
        yield event


def _text_of(event: TextDelta | ToolArgumentsDelta) -> str:
    return event.text if isinstance(event, TextDelta) else event.delta


def _web_search(query: str) -> list[ModelEvent]:
    """A web search call for `query`, as a hosted tool's events come from an upstream."""
    item_id = ids.new_id("ws")
    started = mockmodel.web_search_call(item_id, query, "in_progress")
    events: list[ModelEvent] = [HostedCallStart(json.dumps(started).encode())]
    for phase in mockmodel.SEARCH_PHASES:
        event = {"type": f"response.web_search_call.{phase}", "item_id": item_id}
        events.append(HostedCallEvent(json.dumps(event).encode()))
    done = mockmodel.web_search_call(item_id, query, "completed")
    events.append(OutputItem(json.dumps(done).encode()))
    return events
