"""Any well-formed upstream answer, relayed: generated Responses streams in OpenAI's
event order (messages with annotations, function and custom tool calls, reasoning,
hosted tool calls with their progress events, finished or cut short), cut at random
points, go through the Rust decoder and the Sans-I/O session. Every event the client
gets must pass the SDK's types, be numbered without gaps, point at the right output
index, and the completed Response must hold what the upstream produced."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_session import Harness
from warmsocket._core import ResponsesStreamDecoder
from warmsocket.backends.base import ModelEvent
from warmsocket.backends.responses_events import ResponsesSSEDecoder, model_events

TEXT = st.text(max_size=12)
PIECES = st.lists(TEXT, min_size=1, max_size=4)
NAME = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)


@st.composite
def segments(draw: st.DrawFn) -> list[dict[str, Any]]:
    """The output items of one upstream answer, as the upstream makes them."""
    out: list[dict[str, Any]] = []
    for n in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["message", "function_call", "custom", "reasoning", "hosted"]))
        segment: dict[str, Any] = {"kind": kind, "n": n, "pieces": draw(PIECES)}
        if kind == "message":
            # Annotations after some of the deltas: (after which delta, the annotation).
            count = draw(st.integers(0, 2))
            segment["annotations"] = [
                (
                    draw(st.integers(0, len(segment["pieces"]) - 1)),
                    {
                        "type": "url_citation",
                        "url": f"https://example.com/{n}/{i}",
                        "title": draw(TEXT),
                        "start_index": 0,
                        "end_index": draw(st.integers(0, 40)),
                    },
                )
                for i in range(count)
            ]
            segment["annotations"].sort(key=lambda pair: pair[0])
        elif kind in ("function_call", "custom"):
            segment["name"] = draw(NAME)
        elif kind == "hosted":
            segment["tool"] = draw(st.sampled_from(["web_search_call", "image_generation_call"]))
            segment["finished"] = draw(st.booleans())
        out.append(segment)
    return out


def upstream_events(segments: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI's events for these items, and the output items a client must end with
    (`None` where the id is warmsocket's own and is not compared)."""
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {"id": "resp_up", "status": "in_progress"}}
    ]
    expected: list[Any] = []

    def add(event: dict[str, Any]) -> None:
        events.append(event)

    for index, seg in enumerate(segments):
        item_id = f"up_{seg['kind']}_{seg['n']}"
        at = {"item_id": item_id, "output_index": index}
        text = "".join(seg["pieces"])
        kind = seg["kind"]
        if kind == "message":
            started = {"id": item_id, "type": "message", "role": "assistant", "content": []}
            add({"type": "response.output_item.added", "output_index": index, "item": started})
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": []}
            add({"type": "response.content_part.added", **at, "content_index": 0, "part": part})
            annotations = list(seg["annotations"])
            for i, piece in enumerate(seg["pieces"]):
                add(
                    {"type": "response.output_text.delta", **at, "content_index": 0, "delta": piece}
                )
                while annotations and annotations[0][0] == i:
                    _after, annotation = annotations.pop(0)
                    add(
                        {
                            "type": "response.output_text.annotation.added",
                            **at,
                            "content_index": 0,
                            "annotation_index": 0,
                            "annotation": annotation,
                        }
                    )
            add({"type": "response.output_text.done", **at, "content_index": 0, "text": text})
            cited = [a for _i, a in seg["annotations"]]
            whole = {"type": "output_text", "text": text, "annotations": cited}
            add({"type": "response.content_part.done", **at, "content_index": 0, "part": whole})
            done = {**started, "status": "completed", "content": [whole]}
            add({"type": "response.output_item.done", "output_index": index, "item": done})
            if text or cited:  # an empty message is nothing to show: left out
                expected.append(("message", text, cited))
        elif kind in ("function_call", "custom"):
            custom = kind == "custom"
            field, prefix = (
                ("input", "custom_tool_call_input")
                if custom
                else (
                    "arguments",
                    "function_call_arguments",
                )
            )
            item_type = "custom_tool_call" if custom else "function_call"
            call = {"id": item_id, "type": item_type, "call_id": f"call_{seg['n']}"}
            call["name"] = seg["name"]
            add(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**call, field: ""},
                }
            )
            for piece in seg["pieces"]:
                add({"type": f"response.{prefix}.delta", **at, "delta": piece})
            add({"type": f"response.{prefix}.done", **at, field: text})
            add(
                {
                    "type": "response.output_item.done",
                    "output_index": index,
                    "item": {**call, field: text},
                }
            )
            expected.append((item_type, call["call_id"], seg["name"], text))
        elif kind == "reasoning":
            started = {"id": item_id, "type": "reasoning", "summary": []}
            add({"type": "response.output_item.added", "output_index": index, "item": started})
            summary = {**at, "summary_index": 0}
            empty = {"type": "summary_text", "text": ""}
            add({"type": "response.reasoning_summary_part.added", **summary, "part": empty})
            for piece in seg["pieces"]:
                add({"type": "response.reasoning_summary_text.delta", **summary, "delta": piece})
            add({"type": "response.reasoning_summary_text.done", **summary, "text": text})
            filled = {"type": "summary_text", "text": text}
            add({"type": "response.reasoning_summary_part.done", **summary, "part": filled})
            done = {**started, "summary": [filled], "encrypted_content": f"sealed-{seg['n']}"}
            add({"type": "response.output_item.done", "output_index": index, "item": done})
            expected.append(done)
        else:
            tool = seg["tool"]
            if tool == "web_search_call":
                started = {
                    "id": item_id,
                    "type": tool,
                    "status": "in_progress",
                    "action": {"type": "search", "query": text},
                }
                phases = [{"type": f"response.{tool}.{p}"} for p in ("in_progress", "searching")]
                done = {**started, "status": "completed"}
            else:
                started = {"id": item_id, "type": tool, "status": "in_progress", "result": None}
                phases = [
                    {"type": f"response.{tool}.in_progress"},
                    {"type": f"response.{tool}.generating"},
                    *(
                        {
                            "type": f"response.{tool}.partial_image",
                            "partial_image_index": i,
                            "partial_image_b64": piece,
                        }
                        for i, piece in enumerate(seg["pieces"])
                    ),
                ]
                done = {**started, "status": "completed", "result": text}
            add({"type": "response.output_item.added", "output_index": index, "item": started})
            for phase in phases:
                add({**phase, **at})
            if seg["finished"]:
                add({"type": "response.output_item.done", "output_index": index, "item": done})
                expected.append(done)
            else:
                expected.append(started)  # cut short: kept as it started
    usage = {"input_tokens": 10, "output_tokens": 5}
    add({"type": "response.completed", "response": {"id": "resp_up", "usage": usage}})
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return events, expected


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def normalized(item: dict[str, Any]) -> Any:
    """An output item as the expectations describe it."""
    kind = item["type"]
    if kind == "message":
        (part,) = item["content"]
        return ("message", part["text"], part["annotations"])
    if kind == "function_call":
        return (kind, item["call_id"], item["name"], item["arguments"])
    if kind == "custom_tool_call":
        return (kind, item["call_id"], item["name"], item["input"])
    return item


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments(), st.data())
def test_any_upstream_answer_is_relayed_whole_and_valid(
    items: list[dict[str, Any]], data: st.DataObject
) -> None:
    events, expected = upstream_events(items)
    decoded: list[ModelEvent] = []
    if data.draw(st.booleans(), label="over SSE (else WebSocket messages)"):
        body = sse(events)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=8)))
        decoder = ResponsesSSEDecoder()
        for start, stop in zip([0, *cuts], [*cuts, len(body)], strict=True):
            decoded += decoder.feed(body[start:stop])
        decoded += decoder.finish()
    else:
        stream = ResponsesStreamDecoder()
        for event in events:
            decoded += model_events(stream.message(json.dumps(event).encode()))
        assert stream.done

    h = Harness()  # checks every event against the SDK's types
    h.send(input="go", stream_id="lane")
    (turn,) = h.started
    for event in decoded:
        h.session.model_event(turn, event)
    h.session.model_done(turn)
    h.drain()

    sent = h.events
    assert [e["sequence_number"] for e in sent] == list(range(len(sent)))
    assert all(e.get("stream_id") == "lane" for e in sent)
    response = h.last("response.completed")["response"]
    output = response["output"]
    assert [normalized(item) for item in output] == expected
    # Every item event points at its item's place in the output.
    ids = {item["id"]: index for index, item in enumerate(output)}
    for event in sent:
        if "item" in event:
            assert ids[event["item"]["id"]] == event["output_index"], event["type"]
        elif "item_id" in event:
            assert ids[event["item_id"]] == event["output_index"], event["type"]
    # Hosted progress events came through, each once, in order.
    relayed = [
        e["type"]
        for e in sent
        if ".web_search_call." in e["type"] or ".image_generation_call." in e["type"]
    ]
    upstream = [
        e["type"]
        for e in events
        if ".web_search_call." in e["type"] or ".image_generation_call." in e["type"]
    ]
    assert relayed == upstream
    assert response["usage"]["input_tokens"] == 10
