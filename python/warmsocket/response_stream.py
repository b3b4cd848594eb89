"""Encoding one response's events: lifecycle snapshots, items, deltas, indices.

A `ResponseStream` owns the per-response `sequence_number` counter (starting at 0),
assigns `output_index` / `content_index`, and encodes each event as JSON bytes the
moment it is produced. The static part of the Response object (id, model, settings,
tools) is encoded once; lifecycle events splice in status, output and usage.
Events are identical on WebSocket and SSE except for `stream_id` (WebSocket named
lanes only).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from warmsocket import ids, mockmodel

Status = Literal["in_progress", "completed", "failed", "incomplete"]

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(value: Any) -> bytes:
    return _dumps(value).encode()


class ResponseStream:
    """The event stream of one response."""

    __slots__ = (
        "_open",
        "_prefix",
        "_static",
        "completed_at",
        "created_at",
        "output",
        "response_id",
        "sequence_number",
        "status",
        "stream_id",
    )

    def __init__(
        self,
        *,
        response_id: str,
        model: str,
        settings: dict[str, Any],
        previous_response_id: str | None,
        store: bool,
        created_at: int,
        stream_id: str | None = None,
    ) -> None:
        self.response_id = response_id
        self.stream_id = stream_id
        self.created_at = created_at
        self.completed_at: int | None = None
        self.sequence_number = 0
        self.status: Status = "in_progress"
        self.output: list[dict[str, Any]] = []
        self._open: _OpenItem | None = None
        static = {
            "id": response_id,
            "object": "response",
            "created_at": created_at,
            "model": model,
            "previous_response_id": previous_response_id,
            "store": store,
            "background": False,
            **settings,
        }
        # '{"id":...}' without its opening brace, so dynamic fields can be spliced in front.
        self._static = dumps(static)[1:]
        self._prefix = b"" if stream_id is None else b'"stream_id":' + dumps(stream_id) + b","

    def set_fields(self, fields: dict[str, Any]) -> None:
        """Fields the Response has from now on, each in place of the setting of its name
        or added (what the server did: the tier that served it, moderation results)."""
        static = json.loads(b"{" + self._static)
        static.update(fields)
        self._static = dumps(static)[1:]

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> list[bytes]:
        """`response.created` and `response.in_progress`."""
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    def complete(self, usage: dict[str, Any], completed_at: int) -> list[bytes]:
        frames = self.close_item()
        self.status = "completed"
        self.completed_at = completed_at
        frames.append(self._lifecycle("response.completed", usage=usage))
        return frames

    def fail(self, error: dict[str, Any], usage: dict[str, Any] | None) -> list[bytes]:
        frames = self.close_item()
        self.status = "failed"
        frames.append(self._lifecycle("response.failed", usage=usage, error=error))
        return frames

    def incomplete(self, reason: str, usage: dict[str, Any], completed_at: int) -> list[bytes]:
        frames = self.close_item(incomplete=reason != "steered")
        self.status = "incomplete"
        self.completed_at = completed_at
        frames.append(
            self._lifecycle("response.incomplete", usage=usage, incomplete={"reason": reason})
        )
        return frames

    def snapshot(
        self,
        *,
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        incomplete: dict[str, Any] | None = None,
    ) -> bytes:
        """The Response object as JSON."""
        return (
            b'{"status":"'
            + self.status.encode()
            + b'","completed_at":'
            + (b"null" if self.completed_at is None else str(self.completed_at).encode())
            + b',"error":'
            + dumps(error)
            + b',"incomplete_details":'
            + dumps(incomplete)
            + b',"usage":'
            + dumps(usage)
            + b',"output":'
            + dumps(self.output)
            + b","
            + self._static
        )

    # -- items ----------------------------------------------------------------------------

    def text_delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[bytes]:
        """A text delta, with its log probabilities (kept with the message) when given."""
        frames, item = self._message()
        item.parts.append(text)
        item.logprobs += logprobs or ()
        frames.append(
            self._event(
                b'"type":"response.output_text.delta",'
                + item.locator
                + b',"content_index":0,"logprobs":'
                + dumps(logprobs or [])
                + b',"delta":'
                + dumps(text)
            )
        )
        return frames

    def refusal_delta(self, text: str) -> list[bytes]:
        """The model's refusal: a message whose one content part is a `refusal`."""
        frames, item = self._message("refusal")
        item.parts.append(text)
        frames.append(
            self._event(
                b'"type":"response.refusal.delta",'
                + item.locator
                + b',"content_index":0,"delta":'
                + dumps(text)
            )
        )
        return frames

    def text_annotation(self, annotation: dict[str, Any]) -> list[bytes]:
        """An annotation of the open message's text (`url_citation`, ...), as OpenAI
        streams it: `response.output_text.annotation.added`, then in the part."""
        frames, item = self._message()
        frames.append(
            self._event(
                b'"type":"response.output_text.annotation.added",'
                + item.locator
                + b',"content_index":0,"annotation_index":'
                + str(len(item.annotations)).encode()
                + b',"annotation":'
                + dumps(annotation)
            )
        )
        item.annotations.append(annotation)
        return frames

    def tool_call_start(self, call_id: str, name: str) -> list[bytes]:
        frames = self.close_item()
        index = len(self.output)
        item_id = self._item_id("fc", index)
        body = {
            "id": item_id,
            "type": "function_call",
            "status": "in_progress",
            "call_id": call_id,
            "name": name,
            "arguments": "",
        }
        opened = _OpenItem("function_call", item_id, index, body)
        self._open = opened
        frames.append(self._item_event("response.output_item.added", index, body))
        return frames

    def tool_arguments_delta(self, delta: str) -> list[bytes]:
        item = self._open
        if item is None or item.kind != "function_call":
            return []
        item.parts.append(delta)
        return [
            self._event(
                b'"type":"response.function_call_arguments.delta",'
                + item.locator
                + b',"delta":'
                + dumps(delta)
            )
        ]

    def reasoning_item(
        self,
        summary: str,
        encrypted_content: str | None = None,
        deltas: list[str] | None = None,
    ) -> list[bytes]:
        """A whole reasoning item with one summary part, in the order OpenAI streams
        it: its text in `deltas` (one delta of it all by default)."""
        frames = self.close_item()
        index = len(self.output)
        item_id = self._item_id("rs", index)
        locator = b'"item_id":' + dumps(item_id) + b',"output_index":' + str(index).encode()
        at = locator + b',"summary_index":0,'
        part = {"type": "summary_text", "text": summary}
        body: dict[str, Any] = {"id": item_id, "type": "reasoning", "summary": [part]}
        if encrypted_content is not None:
            body["encrypted_content"] = encrypted_content
        frames.append(
            self._item_event(
                "response.output_item.added",
                index,
                {"id": item_id, "type": "reasoning", "summary": []},
            )
        )
        frames.append(
            self._event(
                b'"type":"response.reasoning_summary_part.added",'
                + at
                + b'"part":{"type":"summary_text","text":""}'
            )
        )
        for delta in [summary] if deltas is None else deltas:
            if delta:
                frames.append(
                    self._event(
                        b'"type":"response.reasoning_summary_text.delta",'
                        + at
                        + b'"delta":'
                        + dumps(delta)
                    )
                )
        frames.append(
            self._event(
                b'"type":"response.reasoning_summary_text.done",' + at + b'"text":' + dumps(summary)
            )
        )
        frames.append(
            self._event(
                b'"type":"response.reasoning_summary_part.done",' + at + b'"part":' + dumps(part)
            )
        )
        self.output.append(body)
        frames.append(self._item_event("response.output_item.done", index, body))
        return frames

    def custom_tool_call(self, call_id: str, name: str, deltas: list[str]) -> list[bytes]:
        """A whole custom tool call whose input is `deltas` joined, as OpenAI streams it:
        added, the input's deltas, input done, done."""
        frames = self.close_item()
        index = len(self.output)
        item_id = self._item_id("ctc", index)
        at = b'"item_id":' + dumps(item_id) + b',"output_index":' + str(index).encode()
        full = "".join(deltas)
        body = {"id": item_id, "type": "custom_tool_call", "call_id": call_id, "name": name}
        frames.append(self._item_event("response.output_item.added", index, {**body, "input": ""}))
        for delta in deltas:
            frames.append(
                self._event(
                    b'"type":"response.custom_tool_call_input.delta",'
                    + at
                    + b',"delta":'
                    + dumps(delta)
                )
            )
        frames.append(
            self._event(
                b'"type":"response.custom_tool_call_input.done",' + at + b',"input":' + dumps(full)
            )
        )
        done = {**body, "input": full}
        self.output.append(done)
        frames.append(self._item_event("response.output_item.done", index, done))
        return frames

    def web_search_call(self, query: str) -> list[bytes]:
        """A whole web search call for `query`, as OpenAI streams its hosted search: the
        call added (`in_progress`), its `in_progress`, `searching` and `completed`
        events, the call done."""
        frames = self.close_item()
        item_id = ids.new_id("ws")
        index = len(self.output)
        started = mockmodel.web_search_call(item_id, query, "in_progress")
        frames.append(self._item_event("response.output_item.added", index, started))
        at = b'","output_index":' + str(index).encode() + b',"item_id":' + dumps(item_id)
        for phase in mockmodel.SEARCH_PHASES:
            frames.append(self._event(b'"type":"response.web_search_call.' + phase.encode() + at))
        done = mockmodel.web_search_call(item_id, query, "completed")
        self.output.append(done)
        frames.append(self._item_event("response.output_item.done", index, done))
        return frames

    def close_item(self, *, incomplete: bool = False) -> list[bytes]:
        """Finish the open item, if any (its `.done` events); with `incomplete`, it is
        closed `status: incomplete` (cut short)."""
        item = self._open
        if item is None:
            return []
        self._open = None
        status = "incomplete" if incomplete else "completed"
        full = "".join(item.parts)
        part: dict[str, Any]
        if item.kind == "refusal":
            part = {"type": "refusal", "refusal": full}
            body = {**item.body, "status": status, "content": [part]}
            frames = [
                self._event(
                    b'"type":"response.refusal.done",'
                    + item.locator
                    + b',"content_index":0,"refusal":'
                    + dumps(full)
                ),
                self._event(
                    b'"type":"response.content_part.done",'
                    + item.locator
                    + b',"content_index":0,"part":'
                    + dumps(part)
                ),
            ]
        elif item.kind == "message":
            part = {
                "type": "output_text",
                "text": full,
                "annotations": item.annotations,
                "logprobs": [part_logprob(logprob) for logprob in item.logprobs],
            }
            body = {**item.body, "status": status, "content": [part]}
            frames = [
                self._event(
                    b'"type":"response.output_text.done",'
                    + item.locator
                    + b',"content_index":0,"logprobs":'
                    + dumps(item.logprobs)
                    + b',"text":'
                    + dumps(full)
                ),
                self._event(
                    b'"type":"response.content_part.done",'
                    + item.locator
                    + b',"content_index":0,"part":'
                    + dumps(part)
                ),
            ]
        else:
            body = {**item.body, "status": status, "arguments": full}
            frames = [
                self._event(
                    b'"type":"response.function_call_arguments.done",'
                    + item.locator
                    + b',"arguments":'
                    + dumps(full)
                )
            ]
        self.output.append(body)
        frames.append(self._item_event("response.output_item.done", item.index, body))
        return frames

    @property
    def open_kind(self) -> str | None:
        """ "message", "refusal" or "function_call" while an item is open, else None."""
        return None if self._open is None else self._open.kind

    # -- other events carrying this response's sequence numbers --------------------------

    def extra_event(self, event: dict[str, Any]) -> bytes:
        """An event (steering, error) numbered in this response's sequence."""
        body = dumps(event)[1:-1]
        return self._event(body)

    # -- encoding -------------------------------------------------------------------------

    def _message(self, kind: str = "message") -> tuple[list[bytes], _OpenItem]:
        """The open message (of text, or with `kind` "refusal" of a refusal), and the
        events that opened it (closing another item)."""
        item = self._open
        if item is not None and item.kind == kind:
            return [], item
        frames = self.close_item()
        item = self._open_message(kind)
        return frames + item.opened, item

    def _item_id(self, prefix: str, index: int) -> str:
        """The id of the item at output `index`: it names this response, as the Rust
        encoder's do (`warmsocket.item_references`)."""
        stem = self.response_id.partition("_")[2] or self.response_id
        return f"{prefix}_{stem}_{index}"

    def _open_message(self, kind: str = "message") -> _OpenItem:
        index = len(self.output)
        item_id = self._item_id("msg", index)
        body = {
            "id": item_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        item = _OpenItem(kind, item_id, index, body)
        self._open = item
        empty = (
            b'{"type":"refusal","refusal":""}'
            if kind == "refusal"
            else b'{"type":"output_text","text":"","annotations":[],"logprobs":[]}'
        )
        item.opened = [
            self._item_event("response.output_item.added", index, body),
            self._event(
                b'"type":"response.content_part.added",'
                + item.locator
                + b',"content_index":0,"part":'
                + empty
            ),
        ]
        return item

    def _item_event(self, event_type: str, index: int, item: dict[str, Any]) -> bytes:
        return self._event(
            b'"type":"'
            + event_type.encode()
            + b'","output_index":'
            + str(index).encode()
            + b',"item":'
            + dumps(item)
        )

    def _lifecycle(
        self,
        event_type: str,
        *,
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        incomplete: dict[str, Any] | None = None,
    ) -> bytes:
        return self._event(
            b'"type":"'
            + event_type.encode()
            + b'","response":'
            + self.snapshot(usage=usage, error=error, incomplete=incomplete)
        )

    def _event(self, body: bytes) -> bytes:
        seq = self.sequence_number
        self.sequence_number = seq + 1
        return b"{" + self._prefix + b'"sequence_number":' + str(seq).encode() + b"," + body + b"}"


def part_logprob(logprob: dict[str, Any]) -> dict[str, Any]:
    """A delta's log probability as an output text part has it: with the `bytes` of
    its token (and of each top alternative's) when it came without them."""

    def with_bytes(value: dict[str, Any]) -> dict[str, Any]:
        token = value.get("token")
        if "bytes" in value or not isinstance(token, str):
            return dict(value)
        return {**value, "bytes": list(token.encode())}

    top = logprob.get("top_logprobs")
    alternatives = [with_bytes(t) for t in top] if isinstance(top, list) else []
    return {**with_bytes(logprob), "top_logprobs": alternatives}


class _OpenItem:
    __slots__ = (
        "annotations",
        "body",
        "index",
        "item_id",
        "kind",
        "locator",
        "logprobs",
        "opened",
        "parts",
    )

    def __init__(self, kind: str, item_id: str, index: int, body: dict[str, Any]) -> None:
        self.kind = kind
        self.item_id = item_id
        self.index = index
        self.body = body
        self.parts: list[str] = []
        self.annotations: list[dict[str, Any]] = []
        self.logprobs: list[dict[str, Any]] = []
        self.opened: list[bytes] = []
        self.locator = (
            b'"item_id":"' + item_id.encode() + b'","output_index":' + str(index).encode()
        )


def usage_object(
    input_tokens: int, cached_tokens: int, output_tokens: int, reasoning_tokens: int = 0
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }
