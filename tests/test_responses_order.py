"""`responses_order.py` without sockets: which upstream WebSocket messages a turn may
take as its own, and what reading them costs (no full parse for OpenAI's and
warmsocket's shapes)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmsocket.backends import responses_order
from warmsocket.backends.responses_order import ResponseOrder, peek, response_id
from warmsocket.response_stream import ResponseStream, usage_object
from warmsocket.upstream import UpstreamError


def openai_events(rid: str, text: str = "Hello") -> list[bytes]:
    """One answer in OpenAI's shapes (spec 3.2): `type` first, then `sequence_number`."""
    snapshot = {"id": rid, "object": "response", "status": "in_progress", "output": []}
    item = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": snapshot},
        {"type": "response.in_progress", "response": snapshot},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.output_text.delta", "item_id": "msg_1", "delta": text},
        {"type": "response.completed", "response": {**snapshot, "status": "completed"}},
    ]
    return [
        json.dumps({"type": e.pop("type"), "sequence_number": n, **e}).encode()
        for n, e in enumerate(events)
    ]


def warmsocket_events(rid: str) -> list[bytes]:
    """One answer as warmsocket writes it (`sequence_number` first; the Response's id
    after its status, output and usage)."""
    stream = ResponseStream(
        response_id=rid,
        model="m",
        settings={"instructions": 'Say "hi"', "tools": [{"type": "function", "name": "f"}]},
        previous_response_id=None,
        store=False,
        created_at=1,
    )
    return stream.start() + stream.text_delta("Hello") + stream.complete(usage_object(3, 0, 1), 2)


def run(order: ResponseOrder, messages: list[bytes]) -> list[bytes | None]:
    """`opening` for the first message, `during` for the rest; a terminal event's id is
    confirmed as the decoder would read it."""
    assert order.opening(messages[0]) is True
    out = []
    for raw in messages[1:]:
        terminal = order.during(raw)
        if terminal is not None:
            order.ended(terminal, json.loads(raw)["response"]["id"])
        out.append(terminal)
    return out


def out_of_step(call: Any, *args: Any) -> str:
    with pytest.raises(UpstreamError) as caught:
        call(*args)
    assert caught.value.reason == "out_of_step", caught.value.detail
    assert caught.value.retryable
    assert caught.value.message == "The upstream sent events of another response."
    detail = caught.value.detail
    assert detail is not None
    return detail


@pytest.mark.parametrize("shape", [openai_events, warmsocket_events])
def test_a_response_in_order_passes_without_a_full_parse(
    shape: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_parse(raw: bytes) -> None:
        raise AssertionError(f"parsed in full: {raw[:60]!r}")

    monkeypatch.setattr(responses_order, "_parse", no_parse)
    order = ResponseOrder(had=["resp_0"])
    messages = shape("resp_1")
    terminals = run(order, messages)
    assert terminals == [None] * (len(messages) - 2) + [b"response.completed"]
    assert order.response_id == "resp_1"
    assert order.sequence_number == len(messages) - 1


def test_before_response_created_only_errors_pass() -> None:
    previous = openai_events("resp_0", text="SECRET")
    fresh = ResponseOrder(had=["resp_0"])
    error = b'{"type":"error","status":400,"error":{"code":"previous_response_not_found"}}'
    assert fresh.opening(error) is False
    assert "output_text.delta before response.created" in out_of_step(fresh.opening, previous[3])
    detail = out_of_step(fresh.opening, previous[4])
    assert detail.startswith("the upstream sent response.completed of resp_0 before")
    # A response.created of a response the connection had already: a stray, not new.
    assert "response.created of resp_0, a response this" in out_of_step(fresh.opening, previous[0])
    assert "a message of no known type" in out_of_step(fresh.opening, b'{"delta":"x"}')
    with pytest.raises(UpstreamError) as caught:
        fresh.opening(b"not json")
    assert caught.value.reason == "protocol"
    assert fresh.response_id is None  # none of them began the turn's response
    assert fresh.opening(openai_events("resp_1")[0]) is True
    assert fresh.response_id == "resp_1"


def test_after_response_created_events_of_another_response_do_not_pass() -> None:
    mine, other = openai_events("resp_1"), openai_events("resp_2", text="SECRET")

    def started() -> ResponseOrder:
        order = ResponseOrder()
        assert order.opening(mine[0]) is True
        return order

    detail = out_of_step(started().during, other[0])
    assert detail == (
        "the upstream sent a second response.created of resp_2 during resp_1; connection discarded"
    )
    assert "response.in_progress of resp_2 during resp_1" in out_of_step(started().during, other[1])
    failed = json.dumps(
        {"type": "response.failed", "response": {"id": "resp_2", "error": {"code": "x"}}}
    ).encode()
    assert "response.failed of resp_2 during resp_1" in out_of_step(started().during, failed)
    # A terminal event's id is the decoder's reading.
    order = started()
    assert order.during(other[4]) == b"response.completed"
    assert "response.completed of resp_2" in out_of_step(
        order.ended, b"response.completed", "resp_2"
    )
    # Output events carry no response id: their numbers must go up.
    order = started()
    order.during(mine[1])
    order.during(mine[2])
    detail = out_of_step(order.during, other[2])
    assert detail.startswith("the upstream sent response.output_item.added numbered 2 after 2")
    assert "SECRET" not in detail
    # Errors stop the response whatever their number; events without ids pass.
    assert started().during(b'{"type":"error","sequence_number":0,"error":{}}') is None
    order = started()
    assert order.during(b'{"type":"response.in_progress","response":{}}') is None
    assert order.during(b'{"type":"response.output_text.delta","delta":"x"}') is None
    order.ended(b"response.completed", None)


def test_what_the_log_gets_is_ids_and_types_only() -> None:
    order = ResponseOrder()
    assert order.opening(openai_events("resp_1")[0])
    odd = json.dumps({"type": "response.in_progress", "response": {"id": "you said: SECRET"}})
    detail = out_of_step(order.during, odd.encode())
    assert "SECRET" not in detail and "an id that is not printable" in detail
    detail = out_of_step(ResponseOrder().opening, b'{"type":"SECRET text here"}')
    assert "SECRET" not in detail and "no known type" in detail


_PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.text(max_size=8),
    st.just([]),
    st.just({}),
)
# Nested values with keys that would mislead a reading that ignores depth.
_VALUE = st.one_of(
    _PLAIN,
    st.lists(_PLAIN, max_size=2),
    st.dictionaries(st.sampled_from(["id", "type", "response", "a"]), _PLAIN, max_size=2),
)
_KIND = st.sampled_from(
    [
        "response.created",
        "response.in_progress",
        "response.failed",
        "response.output_text.delta",
        "error",
        'weird "type"\\',
    ]
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """An event with its fields in any order and any spacing, and the event itself."""
    event: dict[str, Any] = {}
    if draw(st.booleans()):
        event["type"] = draw(_KIND)
    if draw(st.booleans()):
        event["sequence_number"] = draw(st.integers(0, 2**40))
    if draw(st.booleans()):
        response = draw(
            st.dictionaries(st.sampled_from(["status", "output", "usage", "x"]), _VALUE, max_size=3)
        )
        if draw(st.booleans()):
            response["id"] = draw(st.text(max_size=10))
        keys = draw(st.permutations(list(response)))
        event["response"] = {k: response[k] for k in keys}
    extra = draw(
        st.dictionaries(st.sampled_from(["item_id", "delta", "stream_id"]), _VALUE, max_size=2)
    )
    event.update(extra)
    keys = draw(st.permutations(list(event)))
    ordered = {k: event[k] for k in keys}
    spaced = draw(st.booleans())
    text = json.dumps(
        ordered, separators=(", ", ": ") if spaced else (",", ":"), ensure_ascii=draw(st.booleans())
    )
    return text.encode(), event


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_the_quick_reading_agrees_with_a_full_parse(message: tuple[bytes, dict[str, Any]]) -> None:
    raw, event = message
    kind, number, at = peek(raw)
    expected = event.get("type")
    assert kind == (expected.encode() if isinstance(expected, str) else b"")
    # The number is read when it is next to the type (or the message was parsed).
    assert number in {event.get("sequence_number"), None}
    if at < 0:
        assert number == event.get("sequence_number")
    response = event.get("response")
    expected_id = response.get("id") if isinstance(response, dict) else None
    assert response_id(raw, at) == (expected_id if isinstance(expected_id, str) else None)
