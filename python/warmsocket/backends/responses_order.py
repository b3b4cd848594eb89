"""Which response an upstream WebSocket-mode message belongs to (`responses-ws`).

WebSocket mode runs one response at a time on a connection (warmsocket never names a
lane upstream), so a turn's messages are: `error` events (a request the upstream
turned down, which warmsocket may send again), then `response.created` of a new
response, then that response's events up to its terminal event. Anything else means
the connection is out of step with its turns: a message of an earlier response that
was still in flight when the turn took the connection, or an upstream that runs two
responses at once. `ResponseOrder` checks each message of one turn before it is
decoded and raises `UpstreamError` with the reason `out_of_step` for such a message;
the backend then discards the connection (and replays the turn on another one while
nothing has reached the client).

What is checked:

* before `response.created`, only `error` events; `response.created` itself must be
  of a response the connection has not had already;
* after it, a second `response.created`, or a lifecycle event (`queued`,
  `in_progress`, `completed`, `failed`, `incomplete`) of another response id;
* `sequence_number`, where it is read (below), increases within the response: output
  events carry no response id, and the numbers of another response's events go back
  (a spec 3.1 counter per response, from 0), so an interleaved response is caught at
  the latest by the next event of the running one.

An event without a `response.id` (or a `response.created` without one) is not held
against the connection: there is nothing to compare.

Cost: no message is parsed in full, and the Rust decoder's work is not repeated.
Each message's `type` (and `sequence_number` when it is just before or just after
the type, as OpenAI and warmsocket write them) is read at its start with one regular
expression, about half a microsecond; a lifecycle event's `response.id` with a second
one, past a run of plain fields (`"status":"in_progress"`, `"output":[]`). The
terminal events' id is the decoder's reading. A message that does not begin that way
(keys in another order, escapes in those fields, a nested field before the id) is
parsed with `json.loads` instead: correct, slower, and never the case for the events
of a normal response from OpenAI or warmsocket (a `response.failed` from warmsocket
is: its error object comes before the id).
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from typing import Any

from warmsocket.upstream import UpstreamError, transport_error

CREATED = b"response.created"
ERROR = b"error"
TERMINAL = frozenset({b"response.completed", b"response.incomplete"})
LIFECYCLE = frozenset(
    {b"response.created", b"response.queued", b"response.in_progress", b"response.failed"}
    | TERMINAL
)
"""The events that carry the Response, with its id."""

_HEAD = re.compile(
    rb'\s*\{\s*(?:"sequence_number"\s*:\s*(\d+)\s*,\s*)?"type"\s*:\s*"([^"\\]*)"'
    rb'(?:\s*,\s*"sequence_number"\s*:\s*(\d+)(?=\s*[,}]))?'
)
"""A message's type, and its sequence_number when it is right before or after it."""

_PLAIN = rb'(?:"[^"\\]*"|[-+.\w]+|\[\s*\]|\{\s*\})'
"""A value with nothing nested: a string without escapes, a number or literal, [] or {}."""

_RESPONSE_ID = re.compile(
    rb'(?:\s*,\s*"[^"\\]*"\s*:\s*' + _PLAIN + rb')*?\s*,\s*"response"\s*:\s*\{'
    rb'(?:\s*"[^"\\]*"\s*:\s*' + _PLAIN + rb"\s*,)*?"
    rb'\s*"id"\s*:\s*"([^"\\]*)"'
)
"""From the end of `_HEAD`: past plain fields, the top-level `response` object, and in
it, past plain fields, its `id`. Only plain values are skipped, so what it finds is at
that depth; anything else (a nested value first) is left to a full parse."""

_PRINTABLE = re.compile(rb"[\w.:\-]{1,128}")


def peek(raw: bytes) -> tuple[bytes | None, int | None, int]:
    """(type, sequence_number, where the type's match ends) of an upstream message;
    the position is -1 when the message was parsed in full to read them. The type is
    b"" for a JSON object without one, None for a message that is not a JSON object."""
    head = _HEAD.match(raw)
    if head is not None:
        number = head[1] or head[3]
        return head[2], None if number is None else int(number), head.end()
    return _parsed_head(raw)


def _parsed_head(raw: bytes) -> tuple[bytes | None, int | None, int]:
    event = _parse(raw)
    if event is None:
        return None, None, -1
    kind = event.get("type")
    number = event.get("sequence_number")
    return (
        kind.encode() if isinstance(kind, str) else b"",
        number if type(number) is int else None,
        -1,
    )


def response_id(raw: bytes, at: int) -> str | None:
    """The `response.id` of a lifecycle event whose `peek` ended at `at`."""
    if at >= 0:
        found = _RESPONSE_ID.match(raw, at)
        if found is not None:
            return found[1].decode("utf-8", "replace")
    event = _parse(raw)
    response = event.get("response") if event is not None else None
    value = response.get("id") if isinstance(response, dict) else None
    return value if isinstance(value, str) else None


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class ResponseOrder:
    """The messages of one turn on an upstream connection, checked against the
    response they must belong to. Sans-I/O: it is given each message before the
    decoder, and raises `UpstreamError` (reason `out_of_step`, or `protocol` for a
    message that is not a JSON object)."""

    __slots__ = ("_had", "erred", "response_id", "sequence_number")

    def __init__(self, had: Container[str] = ()) -> None:
        self._had = had
        """The ids of the responses the connection had before this turn."""
        self.response_id: str | None = None
        """The upstream's id of this turn's response, from its `response.created`."""
        self.sequence_number = -1
        self.erred = False
        """An `error` message came. Nothing in one says which request it answers: it
        may be a stray one (a late error of an earlier request, a connection-level
        error), the answer it stood for still to come. The connection is not in step
        for certain any more."""

    def opening(self, raw: bytes) -> bool:
        """A message before this turn's `response.created`: True if it is that event,
        False for an `error` event (the decoder reads it); anything else raises."""
        kind, number, at = peek(raw)
        if kind == ERROR:
            self.erred = True
            return False
        if kind is None:
            raise transport_error("protocol", "a message that is not a JSON object")
        if kind != CREATED:
            other = response_id(raw, at) if kind in LIFECYCLE else None
            raise _out_of_step(f"{_of(kind, other)} before response.created")
        created = response_id(raw, at)
        if created is not None and created in self._had:
            raise _out_of_step(
                f"response.created of {_name(created)}, a response this connection had"
            )
        self.response_id = created
        if number is not None:
            self.sequence_number = number
        return True

    def during(self, raw: bytes) -> bytes | None:
        """A message after `response.created`; raises for one that is not of this
        response. A terminal event's type is returned: its id, which the decoder
        reads, then goes to `ended`."""
        kind, number, at = peek(raw)
        if kind == ERROR:
            self.erred = True
            return None  # (it stops the response; its number may be the connection's)
        if kind is None:
            raise transport_error("protocol", "a message that is not a JSON object")
        if kind in LIFECYCLE and kind not in TERMINAL:
            other = response_id(raw, at)
            if kind == CREATED:
                raise _out_of_step(f"a second {_of(kind, other)} during {_name(self.response_id)}")
            self._check(kind, other)
        if number is not None:
            if number <= self.sequence_number:
                raise _out_of_step(
                    f"{_of(kind, None)} numbered {number} after {self.sequence_number} "
                    f"during {_name(self.response_id)}"
                )
            self.sequence_number = number
        return kind if kind in TERMINAL else None

    def ended(self, kind: bytes, upstream_id: str | None) -> None:
        """The terminal event `during` returned, with its id as the decoder read it."""
        self._check(kind, upstream_id)

    def _check(self, kind: bytes, other: str | None) -> None:
        if other is not None and self.response_id is not None and other != self.response_id:
            raise _out_of_step(f"{_of(kind, other)} during {_name(self.response_id)}")


def _out_of_step(what: str) -> UpstreamError:
    return transport_error("out_of_step", f"the upstream sent {what}; connection discarded")


def _of(kind: bytes, upstream_id: str | None) -> str:
    """An event for the log: its type, and the response it named (ids and types only,
    and only if they look like ids and types)."""
    name = kind.decode() if _PRINTABLE.fullmatch(kind) else "a message of no known type"
    return name if upstream_id is None else f"{name} of {_name(upstream_id)}"


def _name(upstream_id: str | None) -> str:
    if upstream_id is None:
        return "a response without an id"
    if _PRINTABLE.fullmatch(upstream_id.encode()):
        return upstream_id
    return "an id that is not printable"
