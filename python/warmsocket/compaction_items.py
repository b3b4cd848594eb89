"""Compaction items made by warmsocket, and how a model reads them.

A compaction item made here (`warmsocket.compaction`) carries the model's summary
in `encrypted_content` as `wsc1.` and the base64url of ``{"summary": TEXT}``. It is
opaque to clients but not encrypted: it holds nothing the client did not send or
get back already. When it comes back in a context, every backend sees it as the
user message `SUMMARY_HEADER` + summary, in its place (`expanded`): a chat upstream
as a `user` message, a Responses upstream as a `message` item, the built-in model
in its transcript. A compaction item another server made (OpenAI's) is passed to a
Responses upstream as it came, which may be the server that made it; a chat
upstream cannot read it and is refused it (`foreign_compaction`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from warmsocket import errors
from warmsocket._core import Items

PROMPT = (
    "Write a summary of the conversation so far, to continue it from. Another "
    "assistant will pick up the work from your summary alone; the user's messages "
    "are kept and shown to it verbatim, so do not repeat them. Include the task and "
    "its goal, the decisions made and why, what every tool call found (exact names, "
    "paths, identifiers, numbers and error messages), what is done, and what remains "
    "to do next. Be complete and exact; write only the summary."
)
"""The user message that asks the model for the summary (the built-in model and the
simulated upstream recognise it: they answer with the transcript of the context)."""

SUMMARY_HEADER = "Summary of the earlier part of this conversation (its context was compacted):\n\n"
"""What a compaction item's summary is shown to the model after."""

CONTENT_PREFIX = "wsc1."
"""The start of the `encrypted_content` of a compaction item made by warmsocket."""

_MARKER = b'"type":"compaction"'


def encode_content(summary: str) -> str:
    """The `encrypted_content` of a compaction item that stands for `summary`."""
    payload = json.dumps({"summary": summary}, ensure_ascii=False, separators=(",", ":"))
    return CONTENT_PREFIX + base64.urlsafe_b64encode(payload.encode()).decode("ascii")


def summary_of(item: Mapping[str, Any]) -> str | None:
    """The summary a compaction item made by warmsocket stands for; None for any
    other item, and for a compaction item another server made."""
    if item.get("type") != "compaction":
        return None
    content = item.get("encrypted_content")
    if not isinstance(content, str) or not content.startswith(CONTENT_PREFIX):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(content[len(CONTENT_PREFIX) :]))
    except (ValueError, binascii.Error):
        return None
    summary = payload.get("summary") if isinstance(payload, dict) else None
    return summary if isinstance(summary, str) else None


def expanded(item: Mapping[str, Any]) -> dict[str, Any] | None:
    """A compaction item made by warmsocket as the user message the model reads in
    its place (Responses input form); None for any other item."""
    summary = summary_of(item)
    if summary is None:
        return None
    text = SUMMARY_HEADER + summary
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def foreign_compaction() -> errors.APIError:
    return errors.invalid_value(
        "input",
        "Invalid 'input': a compaction item was made by another server (its "
        "encrypted_content is not warmsocket's), and this upstream cannot read it. Send "
        "the items it was made from instead, or compact them with this server.",
    )


def expand_items_json(data: bytes) -> bytes:
    """Items as canonical JSON text, as the cache keeps them (an array, or the
    comma-joined items of one, with or without a leading comma), with warmsocket's
    compaction items replaced by `expanded`; every other item keeps its bytes. Costs
    one search of `data` when it holds no compaction item."""
    if _MARKER not in data:
        return data
    array = data.startswith(b"[")
    lead = b"," if data.startswith(b",") else b""
    body = data[1:-1] if array else data[len(lead) :]
    items = Items.parse(b"[" + body + b"]")
    parts: list[bytes] = []
    for index in range(len(items)):
        raw = items.item_json(index)
        if items.item_meta(index).type == "compaction":
            message = expanded(json.loads(raw))
            if message is not None:
                raw = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
        parts.append(raw)
    joined = b",".join(parts)
    return b"[" + joined + b"]" if array else lead + joined
