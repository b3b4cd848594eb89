"""`POST /v1/responses/compact` with the official SDK: the window (the user messages
and one compaction item) is valid for the SDK's types, a new chain continues from it
over HTTP and WebSocket mode on every backend, the model reads the summary in its
place, nothing is stored, and bad requests get clear errors."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI
from openai.types.responses.compacted_response import CompactedResponse
from openai.types.responses.response_compaction_item import ResponseCompactionItem
from openai.types.responses.response_input_message_item import ResponseInputMessageItem
from openai.types.responses.response_usage import ResponseUsage

from tests.support import FUNCTION_TOOLS, RunningServer, WSClient, output_text
from tests.upstream_support import (
    RESPONSES_UPSTREAMS,
    running_sim,
    sim_compaction_summary,
    warmsocket_upstream,
)
from warmsocket import _core, compaction_items
from warmsocket.compaction_items import (
    PROMPT,
    SUMMARY_HEADER,
    encode_content,
    expand_context,
    expand_items_json,
    expanded_items,
    starts_context,
    summary_of,
    unpack,
)

MODEL = "warmsocket-mock"


_CLIENTS: list[OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close the test's SDK clients: an unclosed one leaves its pooled socket to the
    garbage collector, whose ResourceWarning then fails whatever test runs."""
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def client(server: RunningServer) -> OpenAI:
    opened = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    _CLIENTS.append(opened)
    return opened


def checked_window(
    compacted: CompactedResponse, *, made_here: bool = True
) -> tuple[list[str], str]:
    """The window's user message texts and its summary (the compaction item's
    `encrypted_content` when the upstream made it: not `made_here`); every part checked
    against the SDK's types (a window's user messages are input message items: the
    SDK's `ResponseOutputMessage` only knows the assistant role)."""
    raw = compacted.model_dump(mode="json", exclude_unset=True, warnings=False)
    assert raw["object"] == "response.compaction"
    assert raw["id"].startswith("cmp_") and isinstance(raw["created_at"], int)
    ResponseUsage.model_validate(raw["usage"], strict=True)
    *messages, last = raw["output"]
    item = ResponseCompactionItem.model_validate(last, strict=True)
    assert item.id.startswith("cmp_") and item.id != raw["id"]
    texts = []
    for message in messages:
        parsed = ResponseInputMessageItem.model_validate(message, strict=True)
        assert parsed.role == "user" and parsed.status == "completed"
        texts.append(" ".join(part.text for part in parsed.content if part.type == "input_text"))
    if not made_here:
        return texts, item.encrypted_content
    summary = summary_of(last)
    assert summary is not None
    return texts, summary


def window_input(compacted: CompactedResponse) -> list[Any]:
    return [
        item.model_dump(mode="json", exclude_unset=True, warnings=False)
        for item in compacted.output
    ]


def test_compacting_a_chain_and_continuing_from_the_window(server: RunningServer) -> None:
    sdk = client(server)
    first = sdk.responses.create(model=MODEL, input="Plan the refactor.", instructions="Be terse.")
    call = sdk.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input='/call read_file {"path": "a.py"}',
        tools=FUNCTION_TOOLS,  # type: ignore[arg-type]
    )
    (function_call,) = call.output
    assert function_call.type == "function_call"
    done = sdk.responses.create(
        model=MODEL,
        previous_response_id=call.id,
        input=[{"type": "function_call_output", "call_id": function_call.call_id, "output": "x=1"}],
        tools=FUNCTION_TOOLS,  # type: ignore[arg-type]
    )
    assert done.output_text == "read_file returned: x=1"

    compacted = sdk.responses.compact(
        model=MODEL,
        previous_response_id=done.id,
        instructions="Be terse.",
        # Not compact fields: ignored, as others are (a create's would be refused here).
        extra_body={"prompt": {"id": "pmpt_1"}, "moderation": {"model": "m"}},
    )
    texts, summary = checked_window(compacted)
    assert texts == ["Plan the refactor.", '/call read_file {"path": "a.py"}']
    # The built-in model's summary is the transcript of the context (no instructions).
    assert summary.splitlines() == [
        "user: Plan the refactor.",
        "assistant: You said: Plan the refactor.",
        'user: /call read_file {"path": "a.py"}',
        f"function_call read_file {function_call.call_id}",
        f"function_call_output {function_call.call_id} x=1",
        "assistant: read_file returned: x=1",
    ]
    assert compacted.usage.input_tokens > 0 and compacted.usage.output_tokens > 0
    assert compacted.usage.total_tokens == (
        compacted.usage.input_tokens + compacted.usage.output_tokens
    )

    # A new chain from the window: the model reads the summary in the compaction's place.
    window = window_input(compacted)
    after = sdk.responses.create(
        model=MODEL, input=[*window, {"role": "user", "content": "/transcript"}]
    )
    assert after.output_text == "\n".join(
        [*(f"user: {text}" for text in texts), "compaction: " + summary, "user: /transcript"]
    )
    # ... and the chain goes on from there by previous_response_id.
    again = sdk.responses.create(model=MODEL, previous_response_id=after.id, input="next")
    assert again.output_text == "You said: next"


def test_compacting_input_alone_and_with_a_chain(server: RunningServer) -> None:
    sdk = client(server)
    history = [
        {"role": "user", "content": "one"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "1"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "two"}]},
    ]
    alone = sdk.responses.compact(model=MODEL, input=history)  # type: ignore[arg-type]
    texts, summary = checked_window(alone)
    assert texts == ["one", "two"]
    assert summary == "user: one\nassistant: 1\nuser: two"
    # A chain, then more input: the context is the chain's, then the input's.
    parent = sdk.responses.create(model=MODEL, input="zero")
    both = sdk.responses.compact(model=MODEL, previous_response_id=parent.id, input=history)  # type: ignore[arg-type]
    texts, summary = checked_window(both)
    assert texts == ["zero", "one", "two"]
    assert summary.splitlines()[:2] == ["user: zero", "assistant: You said: zero"]
    # Compacting a window again folds the earlier summary into the new one.
    window = window_input(alone)
    twice = sdk.responses.compact(model=MODEL, input=[*window, {"role": "user", "content": "3"}])
    texts, summary = checked_window(twice)
    assert texts == ["one", "two", "3"]
    assert (
        summary == "user: one\nuser: two\ncompaction: user: one\nassistant: 1\nuser: two\nuser: 3"
    )


def test_a_window_continues_on_a_websocket(server: RunningServer) -> None:
    sdk = client(server)
    parent = sdk.responses.create(model=MODEL, input="remember 42")
    compacted = sdk.responses.compact(model=MODEL, previous_response_id=parent.id)
    window = window_input(compacted)
    with sdk.responses.connect() as connection:
        connection.response.create(
            model=MODEL, input=[*window, {"role": "user", "content": "/transcript"}], store=False
        )
        for event in connection:
            assert event.type not in ("error", "response.failed"), event
            if event.type == "response.completed":
                text = event.response.output_text
                break
    assert text.splitlines() == [
        "user: remember 42",
        "compaction: user: remember 42",
        "assistant: You said: remember 42",
        "user: /transcript",
    ]


def test_compacting_stores_nothing(server: RunningServer) -> None:
    sdk = client(server)
    cache = server.server.cache
    parent = sdk.responses.create(model=MODEL, input="x")
    before = cache.stats()
    compacted = sdk.responses.compact(model=MODEL, previous_response_id=parent.id)
    after = cache.stats()
    assert (after.entries, after.bytes) == (before.entries, before.bytes)
    for unknown in (compacted.id, compacted.output[-1].id):
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(unknown)  # type: ignore[arg-type]
    # Not a previous_response_id either, and the parent stays deletable (not pinned).
    with pytest.raises(openai.BadRequestError) as chained:
        sdk.responses.create(model=MODEL, input="y", previous_response_id=compacted.id)
    assert chained.value.code == "previous_response_not_found"
    sdk.responses.delete(parent.id)
    with httpx.Client(base_url=server.base_url) as http:
        metrics = http.get("metrics").text
    assert "warmsocket_compactions_total 1" in metrics.splitlines()


def test_bad_compact_requests_get_clear_errors(server: RunningServer) -> None:
    sdk = client(server)
    with pytest.raises(openai.BadRequestError) as unknown:
        sdk.responses.compact(model=MODEL, previous_response_id="resp_nope")
    assert unknown.value.code == "previous_response_not_found"
    assert unknown.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as nothing:
        sdk.responses.compact(model=MODEL)
    assert nothing.value.param == "input"
    assert "Nothing to compact" in nothing.value.message
    with pytest.raises(openai.BadRequestError) as invalid:
        sdk.responses.compact(model=MODEL, input=[{"type": "message", "role": 5}])  # type: ignore[list-item]
    assert invalid.value.param == "input[0].role"
    with pytest.raises(openai.BadRequestError) as orphan:
        output = {"type": "function_call_output", "call_id": "call_x", "output": "1"}
        sdk.responses.compact(model=MODEL, input=[output])
    assert orphan.value.param == "input"
    with httpx.Client(base_url=server.base_url) as http:
        no_model = http.post("responses/compact", json={"input": "x"})
        tools = http.post(
            "responses/compact", json={"model": MODEL, "input": "x", "tools": FUNCTION_TOOLS}
        )
        streamed = http.post(
            "responses/compact", json={"model": MODEL, "input": "x", "stream": True}
        )
        not_json = http.post("responses/compact", content=b"{nope")
        wrong_method = http.get("responses/compact")
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"
    assert "responses/compact takes" in tools.json()["error"]["message"]
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
    assert not_json.status_code == 400 and not_json.json()["error"]["message"]
    assert wrong_method.status_code == 405


def test_a_compact_request_with_a_conversation_is_refused(server: RunningServer) -> None:
    """Compaction takes no `conversation` (the SDK's params have none). It was taken:
    with no input of its own, the compaction ran on nothing and failed with a 500;
    with input, the conversation's items were silently left out."""
    with httpx.Client(base_url=server.base_url) as http:
        conversation = http.post("conversations", json={}).json()["id"]
        answers = [
            http.post("responses/compact", json={"model": MODEL, **extra})
            for extra in (
                {"conversation": conversation},
                {"conversation": conversation, "input": []},
                {"conversation": conversation, "input": "hi"},
            )
        ]
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "conversation"


def test_a_foreign_compaction_item(any_backend: RunningServer) -> None:
    """OpenAI's compaction items cannot be read by a chat upstream (400, nothing kept);
    a Responses upstream gets them as they came; the built-in model lists them."""
    sdk = client(any_backend)
    foreign = {"type": "compaction", "encrypted_content": "gAAAAABpM0Yj-opaque="}
    backend = any_backend.server.engine.backend.name
    request: dict[str, Any] = {
        "model": MODEL,
        "input": [
            {"role": "user", "content": "hi"},
            foreign,
            {"role": "user", "content": "/transcript"},
        ],
    }
    if backend == "upstream-chat":
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.responses.create(**request)
        assert refused.value.param == "input"
        assert "made by another server" in refused.value.message
        return
    response = sdk.responses.create(**request)
    assert response.output_text == "user: hi\ncompaction\nuser: /transcript"


def ours(payload: bytes) -> dict[str, Any]:
    """A compaction item that looks like warmsocket's: its prefix and the base64url of
    `payload`, which a client may well have forged."""
    content = compaction_items.CONTENT_PREFIX + base64.urlsafe_b64encode(payload).decode()
    return {"type": "compaction", "encrypted_content": content}


# 5 KB: nested too deeply for Python's JSON decoder (RecursionError).
FORGED = ours(b'{"summary":"s","before":' + b"[" * 2000 + b"]" * 2000 + b"}")
NOT_JSON = ours(b'{"summary":')


def test_a_forged_compaction_item_is_read_as_any_invalid_one(any_backend: RunningServer) -> None:
    """A compaction item with warmsocket's prefix whose payload is nested too deeply
    is not warmsocket's, as one whose payload is not JSON: a chat upstream refuses it
    (400), the others list it. It was a 500 (RecursionError), on every later turn of
    the chain too."""
    backend = any_backend.server.engine.backend.name
    with httpx.Client(base_url=any_backend.base_url, timeout=10) as http:
        for item in (NOT_JSON, FORGED):
            request = {
                "model": MODEL,
                "input": [
                    {"role": "user", "content": "hi"},
                    item,
                    {"role": "user", "content": "/transcript"},
                ],
            }
            answer = http.post("responses", json=request)
            if backend == "upstream-chat":
                assert answer.status_code == 400, answer.text
                assert answer.json()["error"]["param"] == "input"
                assert "made by another server" in answer.json()["error"]["message"]
                continue
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["output"][-1]["content"][0]["text"] == (
                "user: hi\ncompaction\nuser: /transcript"
            )
            later = {"model": MODEL, "previous_response_id": body["id"], "input": "/transcript"}
            onward = http.post("responses", json=later)
            assert onward.status_code == 200, onward.text


def test_a_forged_compaction_item_leaves_the_websocket_usable(server: RunningServer) -> None:
    """Over a WebSocket, the forged item's lane gets its answer and the other lanes
    theirs, and the connection goes on (the RecursionError aborted the connection, with
    no close frame, and every lane on it)."""
    forged_input = [
        {"role": "user", "content": "hi"},
        FORGED,
        {"role": "user", "content": "/transcript"},
    ]
    with WSClient(server.ws_url) as ws:
        ws.create(stream_id="other", input="/sleep 200\n/reply still here")
        ws.create(stream_id="forged", input=forged_input)
        lanes: dict[str, list[dict[str, Any]]] = {"other": [], "forged": []}
        while any(not e or e[-1]["type"] != "response.completed" for e in lanes.values()):
            event = ws.recv()
            lanes[event["stream_id"]].append(event)
            assert event["type"] not in ("error", "response.failed"), event
        assert output_text(lanes["forged"]) == "user: hi\ncompaction\nuser: /transcript"
        assert output_text(lanes["other"]) == "still here"
        assert output_text(ws.turn(input="again")) == "You said: again"


def test_compaction_on_every_backend(any_backend: RunningServer) -> None:
    """The summary comes from the backend's model (the simulated upstream answers the
    prompt with its transcript, as the built-in model does); a chain continued from the
    window reaches a chat upstream with the summary as a user message. A Responses
    upstream compacts the context itself (the simulated one as OpenAI does: its own
    opaque item, here the transcript sealed) and gets its item back as it made it."""
    sdk = client(any_backend)
    backend = any_backend.server.engine.backend.name
    upstream_compacts = backend in RESPONSES_UPSTREAMS
    first = sdk.responses.create(model=MODEL, input="alpha")
    second = sdk.responses.create(model=MODEL, previous_response_id=first.id, input="beta")
    compacted = sdk.responses.compact(model=MODEL, previous_response_id=second.id)
    texts, summary = checked_window(compacted, made_here=not upstream_compacts)
    if upstream_compacts:
        sealed = sim_compaction_summary(window_input(compacted)[-1])
        assert sealed is not None
        summary = sealed
    assert texts == ["alpha", "beta"]
    assert "user: alpha" in summary and "assistant: You said: beta" in summary
    window = window_input(compacted)
    after = sdk.responses.create(
        model=MODEL, input=[*window, {"role": "user", "content": "/transcript"}]
    )
    if backend == "mock":
        in_place = "compaction: " + summary
    elif upstream_compacts:  # its own item: the simulated model lists it by its type
        in_place = "compaction"
    else:  # the upstream got a user message
        in_place = "user: " + SUMMARY_HEADER + summary
    assert after.output_text == "\n".join(
        ["user: alpha", "user: beta", in_place, "user: /transcript"]
    )
    # The original chain is untouched by the compaction and goes on.
    onward = sdk.responses.create(model=MODEL, previous_response_id=second.id, input="gamma")
    assert onward.output_text == "You said: gamma"
    with sdk.responses.connect() as connection:
        connection.response.create(model=MODEL, previous_response_id=after.id, input="delta")
        for event in connection:
            assert event.type not in ("error", "response.failed"), event
            if event.type == "response.completed":
                assert event.response.output_text == "You said: delta"
                break


# -- the item format ---------------------------------------------------------------------


def test_a_summary_round_trips_and_other_items_are_left_alone() -> None:
    summary = 'Done: a.py fixed ("x=1"); next: tests. Ünïcode ✓\n'
    item = {"id": "cmp_1", "type": "compaction", "encrypted_content": encode_content(summary)}
    assert item["encrypted_content"].startswith(compaction_items.CONTENT_PREFIX)
    assert summary_of(item) == summary
    assert expanded_items(item) == [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": SUMMARY_HEADER + summary}],
        }
    ]
    compacted = unpack(item)
    assert compacted is not None and not compacted.self_contained
    for other in (
        {"type": "compaction", "encrypted_content": "gAAAA-foreign"},
        {"type": "compaction", "encrypted_content": "wsc1.not*base64"},
        {"type": "compaction", "encrypted_content": "wsc1." + "e30="},  # {}: no summary
        {"type": "compaction"},
        {"type": "message", "role": "user", "content": "wsc1.x"},
    ):
        assert summary_of(other) is None and expanded_items(other) is None


_TOKENIZER = _core.Tokenizer.builtin("o200k_base")


def rust_reads_as_warmsocket_s(item: dict[str, Any]) -> bool:
    """Whether the Rust token counter reads `item` as a compaction item made by
    warmsocket: otherwise it counts the item's JSON text, as any unknown item's."""
    text = json.dumps(item, separators=(",", ":"), sort_keys=True)
    start, sep, end = _TOKENIZER.framing
    unknown = [start, *_TOKENIZER.encode("compaction"), sep, *_TOKENIZER.encode(text), end]
    return list(_TOKENIZER.encode_item(text)) != unknown


def _without_padding(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "encrypted_content": item["encrypted_content"].rstrip("=")}


def _with_stray_bits(item: dict[str, Any]) -> dict[str, Any]:
    """The last character before the padding one up: the same bytes decoded, with bits
    base64url leaves zero set."""
    content = item["encrypted_content"]
    body = content.rstrip("=")
    stray = body[:-1] + chr(ord(body[-1]) + 1) + content[len(body) :]
    assert base64.urlsafe_b64decode(stray[5:]) == base64.urlsafe_b64decode(content[5:])
    return {**item, "encrypted_content": stray}


SELF_CONTAINED = b'{"summary":"s?>","before":[{"role":"user","content":"x"}],"after":[]}'


def nested(depth: int) -> bytes:
    """A self-contained payload `depth` arrays and objects deep (the Rust decoder
    takes 512)."""
    arrays = depth - 3  # the payload, `before` and its item
    return b'{"summary":"s","before":[{"a":' + b"[" * arrays + b"]" * arrays + b"}]}"


@pytest.mark.parametrize(
    "item",
    [
        FORGED,
        ours(nested(513)),
        ours(b'{"summary":"s","before":[],"after":[{"type":"x","n":NaN}]}'),
        ours(b'{"summary":"s","before":[],"after":[{"type":"x","n":-Infinity}]}'),
        ours(b'{"summary":"s","before":[],"after":[{"type":"x","n":1e400}]}'),
        ours(b'{"summary":"\\ud800","before":[]}'),  # a lone surrogate
        ours(b"\xef\xbb\xbf" + SELF_CONTAINED),  # a BOM
        ours(SELF_CONTAINED.decode().encode("utf-16")),
        # base64 of the standard alphabet ("+" and "/"), unpadded, with stray bits
        {
            "type": "compaction",
            "encrypted_content": "wsc1." + base64.b64encode(SELF_CONTAINED).decode(),
        },
        _without_padding(ours(SELF_CONTAINED + b" ")),
        _with_stray_bits(ours(SELF_CONTAINED + b" ")),
    ],
    ids=[
        "2000-deep",
        "513-deep",
        "nan",
        "infinity",
        "overflow",
        "lone-surrogate",
        "bom",
        "utf-16",
        "standard-alphabet",
        "unpadded",
        "stray-bits",
    ],
)
def test_only_strict_payloads_are_warmsocket_s(item: dict[str, Any]) -> None:
    """What the Rust token counter does not read as warmsocket's (JSON it rejects,
    base64url other than `encode_content` writes) is not warmsocket's here either: the
    model reads the item as it came, as the counter counts it, and an invalid number
    is not re-sent upstream as invalid JSON."""
    item_json = json.dumps(item, separators=(",", ":"), sort_keys=True).encode()
    assert not rust_reads_as_warmsocket_s(item)
    assert unpack(item) is None and summary_of(item) is None and expanded_items(item) is None
    assert not starts_context(item_json)
    assert expand_context([item]) == [item]
    assert expand_items_json(b"[" + item_json + b"]") == b"[" + item_json + b"]"


def test_strict_payloads_are_still_read() -> None:
    """The strict reading still takes what warmsocket writes, and nesting up to the
    counter's limit (512)."""
    for payload in (
        SELF_CONTAINED,
        nested(512),
        b'{"summary":"s","before":[],"after":[{"type":"x","n":1e300,"m":-0.5}]}',
    ):
        item = ours(payload)
        item_json = json.dumps(item, separators=(",", ":"), sort_keys=True).encode()
        assert rust_reads_as_warmsocket_s(item)
        compacted = unpack(item)
        assert compacted is not None and compacted.self_contained
        assert starts_context(item_json)


def test_expanding_items_json_keeps_every_other_byte() -> None:
    ours = json.dumps(
        {"encrypted_content": encode_content("S"), "id": "cmp_1", "type": "compaction"},
        separators=(",", ":"),
    ).encode()
    foreign = b'{"encrypted_content":"gAAA","type":"compaction"}'
    other = '{"content":"a é \\"1.50\\"","role":"user","type":"message"}'.encode()
    (expansion,) = expanded_items(json.loads(ours)) or []
    message = json.dumps(expansion, separators=(",", ":"), sort_keys=True).encode()
    assert expand_items_json(b"[" + other + b"]") == b"[" + other + b"]"
    assert expand_items_json(b"[" + other + b"," + ours + b"," + foreign + b"]") == (
        b"[" + other + b"," + message + b"," + foreign + b"]"
    )
    assert expand_items_json(b"," + ours + b"," + other) == b"," + message + b"," + other
    assert expand_items_json(ours) == message
    assert PROMPT not in message.decode()


@pytest.mark.parametrize("api", ["responses", "responses-ws"])
def test_a_responses_upstream_compacts_itself(api: str) -> None:
    """In front of a Responses upstream (OpenAI), `/responses/compact` is the
    upstream's own: warmsocket sends it the chain's context with the model as mapped
    and the instructions, answers with its window, and a chain continued from the
    window gives the upstream its item back as it made it. An upstream without the
    endpoint (404) is compacted by the model instead; any other failure is the
    upstream's."""
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, api, model_map={"*": "sim-model"}) as (
            server,
            metrics,
        ),
    ):
        sdk = client(server)
        first = sdk.responses.create(model=MODEL, input="alpha", instructions="Be brief.")
        second = sdk.responses.create(
            model=MODEL, previous_response_id=first.id, input="beta", instructions="Be brief."
        )
        since = sim.stats()["requests_total"]
        compacted = sdk.responses.compact(
            model=MODEL,
            previous_response_id=second.id,
            instructions="Be brief.",
            prompt_cache_key="chain-7",
            prompt_cache_options={"ttl": "12h"},
            service_tier="default",  # at the API's default: still sent (OpenAI's is auto)
            extra_body={
                "safety_identifier": "user-hash-1",
                "user": "not a compact field",
                # Nor are these (a create's): not sent, not refused.
                "prompt": {"id": "pmpt_1"},
                "moderation": {"model": "omni-moderation-latest"},
            },
        )
        (asked,) = sim.stats(bodies=True, since=since)["requests"]
        assert asked["api"] == "compact"
        body = json.loads(asked["body"])
        assert (body["model"], body["instructions"]) == ("sim-model", "Be brief.")
        # The client's settings the endpoint takes go on; `user` is not one of them.
        assert {k: body.get(k) for k in ("prompt_cache_key", "service_tier", "user")} == {
            "prompt_cache_key": "chain-7",
            "service_tier": "default",
            "user": None,
        }
        assert body["safety_identifier"] == "user-hash-1"
        assert body["prompt_cache_options"] == {"ttl": "12h"}
        assert "prompt" not in body and "moderation" not in body
        assert [item.get("role") for item in body["input"]] == [
            "user",
            "assistant",
            "user",
            "assistant",
        ]
        texts, _sealed = checked_window(compacted, made_here=False)
        assert texts == ["alpha", "beta"]
        window = window_input(compacted)
        assert sim_compaction_summary(window[-1]) == "\n".join(
            ["user: alpha", "assistant: You said: alpha", "user: beta", "assistant: You said: beta"]
        )
        since = sim.stats()["requests_total"]
        after = sdk.responses.create(
            model=MODEL, input=[*window, {"role": "user", "content": "/transcript"}]
        )
        assert after.output_text == "user: alpha\nuser: beta\ncompaction\nuser: /transcript"
        (turn,) = sim.stats(bodies=True, since=since)["requests"]
        (item,) = [i for i in json.loads(turn["body"])["input"] if i["type"] == "compaction"]
        assert item["encrypted_content"] == window[-1]["encrypted_content"]
        # No such endpoint upstream (vLLM): the model writes the summary, in a turn
        # that carries the client's settings on whom it is for (`user` too).
        sim.control(faults=[{"status": 404}])
        since = sim.stats()["requests_total"]
        fallback = sdk.responses.compact(
            model=MODEL,
            previous_response_id=second.id,
            extra_body={"safety_identifier": "user-hash-1", "user": "u-9"},
        )
        texts, summary = checked_window(fallback)
        assert texts == ["alpha", "beta"] and "assistant: You said: beta" in summary
        assert fallback.model_dump(warnings=False)["safety_identifier"] == "user-hash-1"
        _refused, summary_turn = sim.stats(bodies=True, since=since)["requests"]
        sent = json.loads(summary_turn["body"])
        assert (sent["safety_identifier"], sent["user"]) == ("user-hash-1", "u-9")
        assert "tools" not in sent and "text" not in sent
        # Any other failure is the upstream's, not hidden by a summary.
        sim.control(faults=[{"status": 503}])
        with pytest.raises(openai.APIStatusError) as failed:
            sdk.responses.compact(model=MODEL, previous_response_id=second.id)
        assert failed.value.status_code >= 500
        sim.stop()  # and an upstream that is gone
        with pytest.raises(openai.APIStatusError) as unreachable:
            sdk.responses.compact(model=MODEL, previous_response_id=second.id)
        assert unreachable.value.status_code == 502
        sdk.close()
    counted = {
        outcome: n
        for (kind, outcome), n in metrics.upstream.requests.items()
        if kind == "responses_compact"
    }
    assert counted == {"200": 1, "404": 1, "503": 1, "connect": 1}


def test_a_forged_compaction_item_with_invalid_items_is_the_client_s_400(
    any_backend: RunningServer,
) -> None:
    """Anyone can write a payload under warmsocket's prefix: its items reached the
    backends unchecked (a chat upstream's translation raised TypeError: a 500-like
    `server_error` failure; a Responses upstream got them as they were). They are
    checked as input is, and the create refused."""
    forged = ours(
        json.dumps(
            {
                "summary": "s",
                "after": [{"role": "user", "content": [{"type": "output_text", "text": 5}]}],
            }
        ).encode()
    )
    sdk = client(any_backend)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.responses.create(model=MODEL, input=[forged, {"role": "user", "content": "next"}])  # type: ignore[list-item]
    assert info.value.param == "input[0].encrypted_content"
    valid = ours(json.dumps({"summary": "s", "after": [{"role": "user", "content": "x"}]}).encode())
    answer = sdk.responses.create(model=MODEL, input=[valid, {"role": "user", "content": "next"}])  # type: ignore[list-item]
    assert answer.status == "completed"


def test_a_forged_compaction_item_is_checked_nested_and_in_a_conversation(
    server: RunningServer,
) -> None:
    """The items of a compaction item inside another one (a chat upstream expands them
    all), and compaction items added to a conversation (every later response in it
    failed), are checked too."""
    wrong = {"role": "user", "content": [{"type": "output_text", "text": 5}]}
    bad = ours(json.dumps({"summary": "s", "after": [wrong]}).encode())
    nested = ours(json.dumps({"summary": "outer", "after": [bad]}).encode())
    sdk = client(server)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.responses.create(model=MODEL, input=[nested, {"role": "user", "content": "next"}])  # type: ignore[list-item]
    assert info.value.param == "input[0].encrypted_content"
    with httpx.Client(base_url=server.base_url) as http:
        created = http.post("conversations", json={"items": [bad]})
        conversation = http.post("conversations", json={}).json()["id"]
        added = http.post(f"conversations/{conversation}/items", json={"items": [nested]})
    assert created.status_code == 400
    assert created.json()["error"]["param"] == "items[0].encrypted_content"
    assert added.status_code == 400


def test_an_item_reference_inside_a_compaction_item_is_refused(server: RunningServer) -> None:
    """References are resolved (as the owner's items) in a request's own input; one
    inside a compaction item reached the model unresolved, so a Responses upstream
    would resolve it with warmsocket's key, as nobody's. warmsocket compacts what a
    reference resolves to, so its own items never hold one."""
    sdk = client(server)
    first = sdk.responses.create(model=MODEL, input="secret words")
    reference = {"type": "item_reference", "id": first.output[0].id}
    forged = ours(json.dumps({"summary": "s", "after": [reference]}).encode())
    with pytest.raises(openai.BadRequestError) as info:
        sdk.responses.create(
            model=MODEL, input=[forged, {"role": "user", "content": "/transcript"}]
        )  # type: ignore[list-item]
    assert info.value.param == "input[0].encrypted_content"
    # A compaction of input holding the reference keeps what it resolved to, and is
    # taken back.
    compacted = sdk.responses.compact(
        model=MODEL,
        input=[reference, {"role": "user", "content": "more"}],  # type: ignore[list-item]
    )
    again = sdk.responses.create(
        model=MODEL,
        input=[
            *window_input(compacted),
            {"role": "user", "content": "/transcript"},
        ],  # type: ignore[misc]
    )
    assert "secret words" in again.output_text
