"""Model backends: the built-in mock model and (later) upstream adapters."""

from warmsocket.backends.base import (
    Backend,
    ModelEvent,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStart,
    TurnContext,
    TurnFailed,
    UsageReport,
)

__all__ = [
    "Backend",
    "ModelEvent",
    "TextDelta",
    "ToolArgumentsDelta",
    "ToolCallStart",
    "TurnContext",
    "TurnFailed",
    "UsageReport",
]
