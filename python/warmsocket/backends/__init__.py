"""Model backends: the built-in mock model and the upstream adapters."""

from warmsocket.backends.base import (
    Backend,
    HostedCallEvent,
    HostedCallStart,
    MessageStart,
    ModelEvent,
    OutputItem,
    ReasoningDelta,
    ReasoningStart,
    TextAnnotation,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallStart,
    TurnContext,
    TurnFailed,
    UsageReport,
)

__all__ = [
    "Backend",
    "HostedCallEvent",
    "HostedCallStart",
    "MessageStart",
    "ModelEvent",
    "OutputItem",
    "ReasoningDelta",
    "ReasoningStart",
    "TextAnnotation",
    "TextDelta",
    "ToolArgumentsDelta",
    "ToolCallStart",
    "TurnContext",
    "TurnFailed",
    "UsageReport",
]
