"""Compaction items made by warmsocket, and how a model reads them.

A compaction item made here (`warmsocket.compaction`) carries the model's summary
in `encrypted_content` as `wsc1.` and the base64url of a JSON object. It is opaque
to clients but not encrypted: it holds nothing the client did not send or get back
already. Two kinds:

* *in place* (``{"summary": TEXT}``), from `POST /v1/responses/compact`: the window's
  user messages stand before it in the context, and it stands for the rest;
* *self-contained* (``{"summary": TEXT, "before": [...], "after": [...]}``), from
  server-side compaction (`context_management`): it stands for the whole context
  before it, so a context starts at the last one (a client that re-sends its
  history may drop what precedes it, as OpenAI advises). `before` holds the user
  messages the summary follows, `after` the items kept verbatim after it (the last
  response's output and the input that answered it, so a tool call and its output
  stay together).

When one comes back in a context, every backend reads it expanded (`expanded_items`):
its `before` messages, the user message `SUMMARY_HEADER` + summary, its `after`
items. A chat upstream gets them as messages, a Responses upstream as items
(`expand_items_json`), the built-in model in its transcript. A compaction item
another server made (OpenAI's) is passed to a Responses upstream as it came, which
may be the server that made it; a chat upstream cannot read it and is refused it
(`foreign_compaction`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from warmsocket import errors
from warmsocket._core import Items, Rejection, parse_client_message
from warmsocket.client_events import decode_json
from warmsocket.errors import APIError

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


@dataclass(frozen=True, slots=True)
class Compacted:
    """What a compaction item made by warmsocket stands for."""

    summary: str
    before: list[dict[str, Any]] | None
    """The user messages before the summary; None for an in-place item."""
    after: list[dict[str, Any]]
    """The items kept verbatim after the summary (none for an in-place item)."""

    @property
    def self_contained(self) -> bool:
        return self.before is not None


def encode_content(
    summary: str,
    *,
    before: list[dict[str, Any]] | None = None,
    after: list[dict[str, Any]] | None = None,
) -> str:
    """The `encrypted_content` of a compaction item that stands for `summary`:
    in place, or with `before` self-contained."""
    payload: dict[str, Any] = {"summary": summary}
    if before is not None:
        payload["before"] = before
        payload["after"] = after or []
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return CONTENT_PREFIX + base64.urlsafe_b64encode(text.encode()).decode("ascii")


def unpack(item: Mapping[str, Any]) -> Compacted | None:
    """What a compaction item made by warmsocket stands for; None for any other
    item, and for a compaction item another server made."""
    if item.get("type") != "compaction":
        return None
    content = item.get("encrypted_content")
    payload = _payload(content)
    return None if payload is None else _compacted(payload)


def _payload(content: Any) -> bytes | None:
    """The JSON text an `encrypted_content` of warmsocket's holds (None for another).

    Only the base64url `encode_content` writes (padded, no other characters, no stray
    bits in the last one), as the Rust token counter (`rust/token/render.rs`) reads
    it: an item both read as warmsocket's, or both as any other, counts the same."""
    if not isinstance(content, str) or not content.startswith(CONTENT_PREFIX):
        return None
    encoded = content[len(CONTENT_PREFIX) :]
    try:
        text = base64.urlsafe_b64decode(encoded)
    except (ValueError, binascii.Error):
        return None
    # Decoding skips characters outside the alphabet and ignores stray bits: only the
    # text that encodes back to itself is canonical.
    if base64.urlsafe_b64encode(text).decode("ascii") != encoded:
        return None
    return text


def _compacted(text: bytes) -> Compacted | None:
    """What a compaction item's JSON text (`_payload`) stands for; None when it is not
    what warmsocket writes.

    Strict JSON, as the Rust token counter reads it (`decode_json`): a payload nested
    too deeply (json.loads would raise RecursionError), with NaN or an overflowing
    number (re-sent upstream as invalid JSON), a BOM or a lone surrogate is not
    warmsocket's, as a payload that is not JSON at all."""
    try:
        payload = decode_json(text)
    except APIError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("summary"), str):
        return None
    before, after = payload.get("before"), payload.get("after", [])
    if not _item_list(after) or (before is not None and not _item_list(before)):
        return None
    return Compacted(payload["summary"], before, after)


def _item_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


_ANY_SIZE = 1 << 62
"""The item size limit of `check_sent`: the items passed the server's when sent."""


def check_sent(items: Items, *, param: str = "input") -> None:
    """Refuse a client's compaction item of warmsocket's whose items a create would
    not take as input (as a create's input or a conversation's new items: `param`).
    Anyone can send a payload under warmsocket's prefix, and the backends read the
    items it expands to as they read checked input (one that is not failed the
    response with a 500). One call into Rust without compaction items. Raises
    APIError (400 on `param[i]`)."""
    end = len(items)
    while (found := items.slice(0, end).last_of_type("compaction")) is not None:
        end = found
        compacted = unpack(json.loads(items.item_json(found)))
        if compacted is not None and not _valid_expansion(compacted):
            at = f"{param}[{found}].encrypted_content"
            raise errors.invalid_value(
                at,
                f"Invalid '{at}': this compaction item's content holds items that are not "
                "valid input. Send the compaction item as warmsocket made it.",
            )


def _valid_expansion(compacted: Compacted) -> bool:
    """Whether the items a compaction item of warmsocket's stands for are valid input,
    those of compaction items of warmsocket's among them too (a chat upstream expands
    them all). Their depth is bounded by the payload's (`decode_json`). An
    `item_reference` is not: references are resolved (as their owner's items) in a
    request's own input, and warmsocket compacts what they resolved to; one inside
    would reach the upstream unresolved, which may resolve it as nobody's."""
    for value in filter(None, (compacted.after, compacted.before)):
        if any(item.get("type") == "item_reference" for item in value):
            return False
        body = json.dumps({"model": "m", "input": value}).encode()
        checked = parse_client_message(body, websocket=False, max_item_bytes=_ANY_SIZE)
        if isinstance(checked, Rejection):
            return False
        for item in value:
            inner = unpack(item) if item.get("type") == "compaction" else None
            if inner is not None and not _valid_expansion(inner):
                return False
    return True


def summary_of(item: Mapping[str, Any]) -> str | None:
    """The summary of a compaction item made by warmsocket (None for any other)."""
    compacted = unpack(item)
    return None if compacted is None else compacted.summary


def summary_message(summary: str) -> dict[str, Any]:
    """The user message a model reads a summary as."""
    text = SUMMARY_HEADER + summary
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def expanded_items(item: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A compaction item made by warmsocket as the items the model reads in its place
    (Responses input form): its `before` messages, the summary as a user message, its
    `after` items. None for any other item."""
    compacted = unpack(item)
    if compacted is None:
        return None
    return [*(compacted.before or ()), summary_message(compacted.summary), *compacted.after]


def expand_context(
    items: Iterable[dict[str, Any]], *, summary_as_item: bool = False
) -> list[dict[str, Any]]:
    """A context with warmsocket's compaction items expanded in place
    (`expanded_items`); with `summary_as_item` each summary stays an in-place
    compaction item (the built-in model's transcript shows it as one)."""
    out: list[dict[str, Any]] = []
    for item in items:
        compacted = unpack(item) if item.get("type") == "compaction" else None
        if compacted is None:
            out.append(item)
            continue
        out += compacted.before or ()
        if summary_as_item:
            out.append(
                {"type": "compaction", "encrypted_content": encode_content(compacted.summary)}
            )
        else:
            out.append(summary_message(compacted.summary))
        out += compacted.after
    return out


_OURS = b'"encrypted_content":"' + CONTENT_PREFIX.encode()
_FIRST = b"{" + _OURS
_LAST = b',"type":"compaction"}'
_BEFORE = b'"before"'


def starts_context(item_json: bytes) -> bool:
    """Whether an item (its canonical JSON, as `Items` keeps it) is a self-contained
    compaction item made by warmsocket: the context starts at it.

    What `unpack` says, mostly without decoding the item: a context may hold any
    number of compaction items, each looked at on the event loop
    (`engine.context_start`). Canonical JSON has sorted keys, no spaces and no escapes
    it does not need: an item whose bytes lack `"encrypted_content":"wsc1.` is not
    warmsocket's, and one of the usual shape (that member first, `type` last) has
    its content read from its bytes. A summary's JSON text without `"before"` (nor
    a `\\u` escape or a NUL, which could spell it otherwise) has no `before` member:
    the item is in place."""
    if _OURS not in item_json:
        return False
    if item_json.startswith(_FIRST) and item_json.endswith(_LAST):
        start = len(_FIRST) - len(CONTENT_PREFIX)
        content = item_json[start : item_json.index(b'"', start)]
        # A backslash escapes a character base64 has not: not warmsocket's. Without
        # one, the string's bytes are its text.
        text = None if b"\\" in content else _payload(content.decode())
    else:
        item = json.loads(item_json)
        if item.get("type") != "compaction":
            return False
        text = _payload(item.get("encrypted_content"))
    if text is None or (_BEFORE not in text and b"\\u" not in text and b"\0" not in text):
        return False
    compacted = _compacted(text)
    return compacted is not None and compacted.self_contained


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
    compaction items replaced by `expanded_items`; every other item keeps its bytes.
    Costs one search of `data` when it holds no compaction item."""
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
            expansion = expanded_items(json.loads(raw))
            if expansion is not None:
                parts += (_dumps(item) for item in expansion)
                continue
        parts.append(raw)
    joined = b",".join(parts)
    return b"[" + joined + b"]" if array else lead + joined


def _dumps(item: Mapping[str, Any]) -> bytes:
    return json.dumps(item, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()
