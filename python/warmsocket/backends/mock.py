"""The built-in deterministic model (`--model-backend mock`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from warmsocket import errors, ids, mockmodel
from warmsocket.backends.base import (
    ModelEvent,
    StreamItem,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStart,
    TurnContext,
    TurnFailed,
)


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
        tail: list[dict[str, Any]] = json.loads(turn.view.tail(from_last_role="user"))
        reply = mockmodel.plan_reply(
            tail,
            function_names=turn.function_names,
            instructions=turn.instructions,
            full_context=lambda: json.loads(turn.view.json()),
        )
        delay = self.ttft + reply.sleep_ms / 1000.0
        if delay:
            await asyncio.sleep(delay)
        if reply.kind == "fail":
            yield TurnFailed(errors.model_failed())
            return
        events: list[ModelEvent]
        if reply.kind == "call":
            events = [ToolCallStart(ids.call_id(), reply.name)]
            events += map(ToolArgumentsDelta, mockmodel.argument_deltas(reply.arguments))
        else:
            events = list(map(TextDelta, mockmodel.text_deltas(reply.text)))
        if not self.delta_interval:
            yield events  # no pacing: the whole answer is ready at once
            return
        for i, event in enumerate(events):
            if i:
                await self._pace()
            yield event

    async def _pace(self) -> None:
        if self.delta_interval:
            await asyncio.sleep(self.delta_interval)

    async def aclose(self) -> None:
        return None
