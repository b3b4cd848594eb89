"""warmsocket in front of the simulated upstream, for each `--upstream-api`.

Checks what the client sees (the official SDK and a strict raw client) and what the
upstream received (`/stats`): the exact full context on every request, byte-stable
bodies turn to turn, state loss replayed transparently, failure mapping, retries
only before the first event, cancellation, pooling.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx2 as httpx
import openai
import pytest
from openai import AuthenticationError, OpenAI

from tests.support import (
    FUNCTION_TOOLS,
    RunningServer,
    WSClient,
    check_sequence,
    check_sse_event,
    output_text,
    running_server,
)
from tests.upstream_support import (
    RunningSim,
    normalize_call_ids,
    running_sim,
    warmsocket_upstream,
)
from warmsocket import mockmodel
from warmsocket.backends import chat
from warmsocket.backends.responses_http import HeadCache
from warmsocket.metrics import Metrics
from warmsocket.prefixhash import count_tokens
from warmsocket.simulate.model import items_from_chat, items_from_input
from warmsocket.simulate.server import chat_logprobs, sim_logprobs
from warmsocket.upstream import UpstreamConfig
from warmsocket.upstream_cli import build_backend

APIS = ["chat", "responses", "responses-ws"]
INSTRUCTIONS = "You are terse."


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def stack(api: str) -> Iterator[tuple[RunningSim, RunningServer, Metrics]]:
    with running_sim() as sim, warmsocket_upstream(sim.base_url, api) as (server, metrics):
        yield sim, server, metrics


def norm(item: dict[str, Any]) -> tuple[Any, ...]:
    """What a model sees of an item (ids, statuses and shapes aside)."""
    kind = item.get("type", "message")
    if kind == "message":
        return ("message", item.get("role"), mockmodel.message_text(item))
    if kind == "function_call":
        return ("function_call", item["call_id"], item["name"], item["arguments"])
    if kind == "function_call_output":
        return ("function_call_output", item["call_id"], mockmodel.output_text(item))
    return (kind,)


def seen_context(record: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The full context the upstream's model saw for one request."""
    assert record["context"] is not None
    return [norm(item) for item in json.loads(record["context"])]


def sent_context(record: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The context carried by the request body itself (everything, for HTTP APIs)."""
    body = json.loads(record["body"])
    if record["api"] == "chat":
        _instructions, items = items_from_chat(body["messages"])
    else:
        items = items_from_input(body["input"])
    return [norm(item) for item in items]


def script(client: WSClient) -> tuple[list[list[tuple[Any, ...]]], str]:
    """A tool loop and a transcript; returns the expected context of each turn."""
    contexts: list[list[tuple[Any, ...]]] = []
    context: list[tuple[Any, ...]] = []
    previous: str | None = None

    def turn(new: list[dict[str, Any]]) -> dict[str, Any]:
        nonlocal previous
        context.extend(norm(item) for item in new)
        contexts.append(list(context))
        events = client.turn(
            input=new,
            instructions=INSTRUCTIONS,
            tools=FUNCTION_TOOLS,
            store=False,
            **({"previous_response_id": previous} if previous else {}),
        )
        terminal = events[-1]
        assert terminal["type"] == "response.completed", terminal
        previous = terminal["response"]["id"]
        context.extend(norm(item) for item in terminal["response"]["output"])
        return terminal

    first = turn([{"role": "user", "content": '/call get_weather {"city": "Oslo"}'}])
    (call,) = [o for o in first["response"]["output"] if o["type"] == "function_call"]
    assert call["name"] == "get_weather" and call["arguments"] == '{"city": "Oslo"}'
    second = turn([{"type": "function_call_output", "call_id": call["call_id"], "output": "cold"}])
    assert output_text([second]) == "get_weather returned: cold"
    third = turn([{"role": "user", "content": "/repeat 2 read_file {}"}])
    (call,) = [o for o in third["response"]["output"] if o["type"] == "function_call"]
    fourth = turn([{"type": "function_call_output", "call_id": call["call_id"], "output": "a"}])
    (call,) = [o for o in fourth["response"]["output"] if o["type"] == "function_call"]
    turn([{"type": "function_call_output", "call_id": call["call_id"], "output": "b"}])
    last = turn([{"role": "user", "content": "/transcript"}])
    return contexts, output_text([last])


def test_tool_loop_carries_the_full_context_byte_stable(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    sim, server, metrics = stack
    with WSClient(server.ws_url) as client:
        contexts, transcript = script(client)
    records = sim.stats(bodies=True)["requests"]
    assert [r["status"] for r in records] == [200] * len(contexts)
    for record, expected in zip(records, contexts, strict=True):
        assert seen_context(record) == expected
    if api == "responses-ws":
        assert [r["chained"] for r in records] == [False] + [True] * (len(records) - 1)
        for record, expected in zip(records[1:], contexts[1:], strict=True):
            assert len(sent_context(record)) == 1  # only the new item went up
            assert sent_context(record) == expected[-1:]
        assert metrics.upstream.chained == len(records) - 1
    else:
        for record, expected in zip(records, contexts, strict=True):
            assert sent_context(record) == expected
        if api == "chat":
            # Only the first turn was translated whole; the others reused the parent's
            # rendered messages and still produced exactly the same bytes.
            assert server.server.engine.backend.full_renders == 1  # type: ignore[attr-defined]
        bodies = [r["body"].encode() for r in records]
        for earlier, later in itertools.pairwise(bodies):
            assert later.startswith(earlier[:-2])  # the previous body minus `]}`
    # The upstream's prefix cache served everything but the new tail of each turn.
    assert all(r["cached_tokens"] > 0 for r in records[1:])
    # The same conversation on the built-in model gives the same transcript.
    with running_server() as builtin, WSClient(builtin.ws_url) as client:
        _contexts, expected_transcript = script(client)
    assert normalize_call_ids(transcript) == normalize_call_ids(expected_transcript)
    assert transcript.startswith(f"instructions: {INSTRUCTIONS}\nuser: /call get_weather")


def test_chat_memo_stays_within_its_bytes_and_drops_superseded_parents_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rendered messages `chat` keeps are bounded in bytes, and what goes first is
    a parent its chain has moved on from: an idle chain's newest turn, though older
    than every turn of a busy chain, is still continued without a full translation."""
    with running_sim() as sim, warmsocket_upstream(sim.base_url, "chat") as (server, _m):
        backend: Any = server.server.engine.backend
        with WSClient(server.ws_url) as client:
            idle = client.turn(input="x " * 10_000, store=False)[-1]["response"]["id"]
            idle_bytes = backend._memo_bytes
            monkeypatch.setattr(chat, "MEMO_BYTES", idle_bytes + 4_000)
            busy = client.turn(input="hello", store=False)[-1]["response"]["id"]
            for _ in range(20):
                busy = client.turn(input="more", previous_response_id=busy, store=False)
                busy = busy[-1]["response"]["id"]
                assert backend._memo_bytes <= chat.MEMO_BYTES
            # The busy chain's parents went, the idle chain's only turn stayed.
            assert idle in backend._memo and busy in backend._memo
            assert len(backend._memo) < 22
            # A continuation counts its messages (its parent's too), its head and its
            # settings once; the settings are its parent's object, held once by the chain.
            newest = backend._memo[busy]
            assert newest.nbytes == sum(map(len, newest.messages)) + len(newest.head) + len(
                newest.system or b""
            ) + len(newest.settings)
            assert all(
                rendered.settings is newest.settings
                for rendered in backend._memo.values()
                if rendered is not backend._memo[idle]
            )
            done = client.turn(input="/transcript", previous_response_id=idle, store=False)
        lines = output_text(done).splitlines()
        assert [line.split(":")[0] for line in lines] == ["user", "assistant", "user"]
        assert lines[0].split() == ["user:"] + ["x"] * 10_000
        assert backend.full_renders == 2  # the first turn of each chain only
        assert sum(r.nbytes for r in backend._memo.values()) == backend._memo_bytes


def test_chat_continues_a_reasoning_chain_without_translating_it_again() -> None:
    """A reasoning model's turns (`reasoning_content`: DeepSeek-R1, Qwen3 thinking)
    start with a reasoning item, which has no chat form: each next turn still renders
    only its new messages after its parent's, and sends exactly the messages a
    translation of the whole context gives. A call that comes after the reasoning,
    right after an assistant message the client sent, joins that message as a full
    translation has it (that turn's child is translated whole)."""
    call = '/call get_weather {"city": "Oslo"}'
    turns: list[list[dict[str, Any]]] = [
        [{"role": "user", "content": "/think Hmm.\nhello"}],
        [{"role": "user", "content": f"/think Look.\n{call}"}],
        [{"type": "function_call_output", "output": "cold"}],
        [{"role": "user", "content": "/think Done.\nthanks"}],
        [
            {"role": "user", "content": f"/think Again.\n{call}"},
            {"role": "assistant", "content": "On it."},
        ],
        [{"type": "function_call_output", "output": "warm"}],
    ]
    with running_sim() as sim, warmsocket_upstream(sim.base_url, "chat") as (server, _m):
        backend: Any = server.server.engine.backend
        context: list[dict[str, Any]] = []
        contexts: list[list[dict[str, Any]]] = []
        previous: str | None = None
        renders: list[int] = []
        with WSClient(server.ws_url) as client:
            for new in turns:
                if new[0].get("type") == "function_call_output":
                    new[0]["call_id"] = context[-1]["call_id"]
                context += new
                contexts.append(list(context))
                events = client.turn(
                    input=new,
                    tools=FUNCTION_TOOLS,
                    store=False,
                    **({"previous_response_id": previous} if previous else {}),
                )
                assert events[-1]["type"] == "response.completed", events[-1]
                response = events[-1]["response"]
                assert response["output"][0]["type"] == "reasoning"
                previous = response["id"]
                context += response["output"]
                renders.append(backend.full_renders)
        bodies = [json.loads(r["body"]) for r in sim.stats(bodies=True)["requests"]]
        for body, sent in zip(bodies, contexts, strict=True):
            assert body["messages"] == chat.chat_messages(sent)
        assert bodies[-1]["messages"][-2]["content"] == "On it."
        assert bodies[-1]["messages"][-2]["tool_calls"]  # the call joined the message
        # Only the first turn, and the one after the joined call, were translated whole.
        assert renders == [1, 1, 1, 1, 1, 2]


def kept_by_backend(backend: Any, response_id: str) -> bool:
    """Whether the upstream backend keeps a working copy of the response (rendered
    messages, a request body or head, its upstream connection)."""
    if response_id in getattr(backend, "_memo", {}) or response_id in getattr(
        backend, "_chains", {}
    ):
        return True
    heads = [getattr(backend, name, None) for name in ("_body_heads", "_heads")]
    contexts = getattr(backend, "_contexts", None)
    return any(isinstance(cache, HeadCache) and response_id in cache._heads for cache in heads) or (
        contexts is not None and response_id in contexts._entries
    )


def test_working_copies_go_with_their_connection_and_on_delete(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """What a backend keeps of a response so that the next turn costs less goes when
    nothing can continue the response any more: its connection closed (store=false),
    it failed, or it was deleted."""
    _sim, server, _metrics = stack
    backend: Any = server.server.engine.backend
    auth = {"Authorization": "Bearer sk-test"}
    with WSClient(server.ws_url, additional_headers=auth) as client:
        first = client.turn(input="one", store=False)[-1]["response"]["id"]
        second = client.turn(input="two", previous_response_id=first, store=False)
        local = [first, second[-1]["response"]["id"]]
        failed = client.turn(input="/fail", previous_response_id=local[-1], store=False)[-1]
        assert failed["type"] == "response.failed"
        stored = [client.turn(input=f"kept {n}")[-1]["response"]["id"] for n in range(2)]
        assert all(kept_by_backend(backend, rid) for rid in local + stored)
        assert not kept_by_backend(backend, failed["response"]["id"])  # gone at once
    deadline = time.monotonic() + 5
    while any(kept_by_backend(backend, rid) for rid in local):
        assert time.monotonic() < deadline, "the closed connection's copies were kept"
        time.sleep(0.01)
    assert all(kept_by_backend(backend, rid) for rid in stored)  # stored: still continuable
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        sdk.responses.delete(stored[0])
        assert not kept_by_backend(backend, stored[0])
        assert kept_by_backend(backend, stored[1])
        # Another key's delete is a 404 and drops nothing.
        other = OpenAI(base_url=server.base_url, api_key="sk-other", max_retries=0)
        with other, pytest.raises(openai.NotFoundError):
            other.responses.delete(stored[1])
        assert kept_by_backend(backend, stored[1])
        follow = sdk.responses.create(
            model="m", input="/transcript", previous_response_id=stored[1]
        )
        assert "user: kept 1" in follow.output_text


OWNER = "anonymous"  # of a request without a key


def test_working_copies_go_when_the_cache_evicts_their_response(api: str) -> None:
    """A response the session cache evicted for its budget cannot be continued here:
    the backend's copies of it go then, not when the connection closes."""
    with running_sim() as sim:
        upstream = UpstreamConfig(urls=(sim.base_url,), api=api)  # type: ignore[arg-type]
        backend: Any = build_backend(upstream, Metrics())
        with (
            running_server(backend=backend, memory_budget=1 << 20) as server,
            WSClient(server.ws_url) as client,
        ):
            large = "word " * 40_000  # ~200 KB: five fill the budget
            ids = [
                client.turn(input=f"{n} {large}", store=False)[-1]["response"]["id"]
                for n in range(8)
            ]
            assert server.server.cache.stats().evictions > 0
            (connection,) = [c.session.connection for c in server.server.connections if c.session]
            engine = server.server.engine
            gone = [
                rid for rid in ids if not engine.cached(rid, owner=OWNER, connection=connection)
            ]
            assert gone and gone == ids[: len(gone)]  # the oldest
            assert not any(kept_by_backend(backend, rid) for rid in gone)
            assert kept_by_backend(backend, ids[-1])
            missed = client.turn(input="more", previous_response_id=gone[0], store=False)
            assert missed[-1]["error"]["code"] == "previous_response_not_found"


def test_openai_sdk_websocket_and_http(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    sim, server, _metrics = stack
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        with sdk.responses.connect() as connection:
            connection.response.create(
                model="any-model",
                input='/call read_file {"path": "a.txt"}',
                tools=FUNCTION_TOOLS,  # type: ignore[arg-type]
                store=False,
            )
            for event in connection:
                if event.type == "response.completed":
                    first = event.response
                    break
            (call,) = [o for o in first.output if o.type == "function_call"]
            connection.response.create(
                model="any-model",
                previous_response_id=first.id,
                tools=FUNCTION_TOOLS,  # type: ignore[arg-type]
                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "42"}],
                store=False,
            )
            for event in connection:
                if event.type == "response.completed":
                    assert event.response.output_text == "read_file returned: 42"
                    assert event.response.model == "any-model"
                    usage = event.response.usage
                    assert usage is not None and usage.input_tokens_details.cached_tokens > 0
                    break
        created = sdk.responses.create(model="m", input="hello", instructions="hi")
        assert created.output_text == "You said: hello"
        streamed = sdk.responses.create(
            model="m", input="/transcript", previous_response_id=created.id, stream=True
        )
        deltas = []
        for event in streamed:
            check_sse_event(event.model_dump(mode="json", exclude_unset=True))
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        assert "".join(deltas) == "user: hello\nassistant: You said: hello\nuser: /transcript"
        models = {r["model"] for r in sim.stats()["requests"]}
        assert models == {"any-model", "m"}


def test_model_map_and_upstream_metrics() -> None:
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, "chat", model_map={"*": "served-model"}) as (
            server,
            _metrics,
        ),
        WSClient(server.ws_url) as client,
    ):
        events = client.turn(input="hi")
        assert events[-1]["response"]["model"] == "warmsocket-mock"
        assert sim.stats()["requests"][0]["model"] == "served-model"
        text = _get(server, "/metrics")
        assert 'warmsocket_upstream_requests_total{api="chat",outcome="200"} 1' in text
        assert "warmsocket_upstream_connections_opened_total" in text


def _get(server: RunningServer, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
        text: str = r.read().decode()
    return text


def test_stats_time_each_request_in_order(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """`/stats` times read in full <= recorded <= first output <= finished (benchmarks
    cut turns at these instants)."""
    sim, server, _metrics = stack
    with WSClient(server.ws_url) as client:
        script(client)
    records = sim.stats()["requests"]
    assert records
    for record in records:
        assert 0 < record["received"] <= record["started"], record
        assert record["started"] <= record["first_token"] <= record["finished"], record


PARALLEL = '/call get_weather {"city": "Lima"}\n/call read_file {"path": "a.txt"}'


def parallel_turns(client: WSClient) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Two tool calls in one response, their outputs sent back in the other order;
    returns the calls and the final response."""
    first = client.turn(input=PARALLEL, tools=FUNCTION_TOOLS, store=False)[-1]
    assert first["type"] == "response.completed", first
    calls = [o for o in first["response"]["output"] if o["type"] == "function_call"]
    outputs = {"get_weather": "sunny", "read_file": "text of a"}
    back = [
        {"type": "function_call_output", "call_id": c["call_id"], "output": outputs[c["name"]]}
        for c in reversed(calls)
    ]
    second = client.turn(
        input=back,
        tools=FUNCTION_TOOLS,
        store=False,
        previous_response_id=first["response"]["id"],
    )[-1]
    assert second["type"] == "response.completed", second
    return calls, second["response"]


def test_parallel_tool_calls_round_trip(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """Parallel tool calls come through as separate function_call items (distinct call
    ids, streamed one after the other), and their outputs go back to the upstream in
    its own form: for Chat Completions one assistant message with both tool_calls,
    then one tool message each."""
    sim, server, _metrics = stack
    with WSClient(server.ws_url) as client:
        calls, final = parallel_turns(client)
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "Lima"}'),
        ("read_file", '{"path": "a.txt"}'),
    ]
    assert len({c["call_id"] for c in calls}) == 2
    added = [e for e in client.events if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added[:2]] == [0, 1]
    text = "get_weather returned: sunny; read_file returned: text of a"
    assert final["output"][-1]["content"][0]["text"] == text
    records = sim.stats(bodies=True)["requests"]
    assert [r["status"] for r in records] == [200, 200]
    ids = [c["call_id"] for c in calls]
    assert seen_context(records[1]) == [
        ("message", "user", PARALLEL),
        ("function_call", ids[0], "get_weather", '{"city": "Lima"}'),
        ("function_call", ids[1], "read_file", '{"path": "a.txt"}'),
        ("function_call_output", ids[1], "text of a"),
        ("function_call_output", ids[0], "sunny"),
    ]
    if api == "chat":
        messages = json.loads(records[1]["body"])["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
        assert [c["id"] for c in messages[1]["tool_calls"]] == ids
        assert [m["tool_call_id"] for m in messages[2:]] == [ids[1], ids[0]]
    # The built-in model answers the same conversation the same way.
    with running_server() as builtin, WSClient(builtin.ws_url) as client:
        builtin_calls, builtin_final = parallel_turns(client)
    assert [c["name"] for c in builtin_calls] == ["get_weather", "read_file"]
    assert builtin_final["output"][-1]["content"][0]["text"] == text


def test_the_client_gets_the_upstreams_usage(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """Each response's usage is the upstream's own count for that request, over
    WebSocket and HTTP. (warmsocket's estimate, used when an upstream reports none,
    differs here: it counts no tools and caches by token, not by block.)"""
    sim, server, _metrics = stack
    with WSClient(server.ws_url) as client:
        script(client)
    usages = [e["response"]["usage"] for e in client.events if e["type"] == "response.completed"]
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        created = sdk.responses.create(
            model="m",
            input="/call read_file {}",
            instructions=INSTRUCTIONS,
            tools=FUNCTION_TOOLS,  # type: ignore[arg-type]
        )
        assert created.usage is not None
        usages.append(created.usage.model_dump(mode="json"))
    records = sim.stats()["requests"]
    assert len(records) == len(usages) == 7
    assert [
        (u["input_tokens"], u["input_tokens_details"]["cached_tokens"], u["output_tokens"])
        for u in usages
    ] == [(r["prompt_tokens"], r["cached_tokens"], r["output_tokens"]) for r in records]
    assert all(u["total_tokens"] == u["input_tokens"] + u["output_tokens"] for u in usages)
    assert all(r["cached_tokens"] > 0 for r in records[1:])  # the numbers to get right


@pytest.mark.parametrize("api", ["responses", "responses-ws"])
def test_responses_go_upstream_with_store_false(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """warmsocket keeps the state: whatever the client asks (store defaults to true),
    the upstream is told not to store anything."""
    sim, server, _metrics = stack
    with WSClient(server.ws_url) as client:
        first = client.turn(input="stored by default")[-1]
        assert first["type"] == "response.completed" and first["response"]["store"] is True
        client.turn(input="again", store=True, previous_response_id=first["response"]["id"])
        script(client)
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        assert sdk.responses.create(model="m", input="hi", store=True).store is True
        streamed = sdk.responses.create(model="m", input="hi", stream=True)
        assert [e.type for e in streamed][-1] == "response.completed"
    bodies = [json.loads(r["body"]) for r in sim.stats(bodies=True)["requests"]]
    assert len(bodies) == 10
    assert [body["store"] for body in bodies] == [False] * len(bodies)


def test_a_responses_upstream_is_asked_for_encrypted_reasoning(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """With `store: false` the upstream keeps no reasoning item, so every request asks
    for `reasoning.encrypted_content` (OpenAI sends it only when asked, and answers a
    reasoning item sent back without it with a 404), after what the client's own
    `include` asks for, which is passed on; a continuation that changes `include`
    gets its own. Chat Completions has no `include`."""
    sim, server, _metrics = stack
    logprobs = "message.output_text.logprobs"
    with WSClient(server.ws_url) as client:
        first = client.turn(input="one", include=[logprobs])[-1]["response"]
        second = client.turn(input="two", previous_response_id=first["id"], include=[logprobs])
        third = client.turn(input="three", previous_response_id=second[-1]["response"]["id"])
        fourth = client.turn(
            input="four",
            previous_response_id=third[-1]["response"]["id"],
            include=["reasoning.encrypted_content", logprobs],
        )
        assert fourth[-1]["type"] == "response.completed"
    bodies = [json.loads(r["body"]) for r in sim.stats(bodies=True)["requests"]]
    if api == "chat":
        assert all("include" not in body for body in bodies)
        return
    assert [body["include"] for body in bodies] == [
        [logprobs, "reasoning.encrypted_content"],
        [logprobs, "reasoning.encrypted_content"],
        ["reasoning.encrypted_content"],
        ["reasoning.encrypted_content", logprobs],
    ]


def test_options_only_an_upstream_acts_on_reach_a_responses_upstream(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """`image` and `prompt_cache_options` (OpenAI's cache lifetime and breakpoint
    mode) go to a Responses upstream as the client sent them, less `prewarm`
    (warmsocket's warm-up) and `comparison_response_id` (a warmsocket response id)
    and null members; a continuation without them sends none. Chat Completions has
    no such fields."""
    sim, server, _metrics = stack
    cache_options = {
        "ttl": "12h",
        "mode": "explicit",
        "prewarm": False,
        "comparison_response_id": "r",
    }
    with WSClient(server.ws_url) as client:
        first = client.turn(
            input="one",
            prompt_cache_options=cache_options,
            image={"context_compression": "disabled"},
        )[-1]["response"]
        second = client.turn(input="two", previous_response_id=first["id"])
        third = client.turn(
            input="three",
            previous_response_id=second[-1]["response"]["id"],
            prompt_cache_options={"ttl": None},
        )
        assert third[-1]["type"] == "response.completed"
    bodies = [json.loads(r["body"]) for r in sim.stats(bodies=True)["requests"]]
    sent = [(body.get("prompt_cache_options"), body.get("image")) for body in bodies]
    if api == "chat":
        assert sent == [(None, None)] * 3
        return
    assert sent == [
        ({"ttl": "12h", "mode": "explicit"}, {"context_compression": "disabled"}),
        (None, None),
        (None, None),
    ]


def test_settings_given_at_the_api_default_still_reach_the_upstream(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """`temperature: 1` and `top_p: 1`, which a model's own sampling defaults (vLLM's
    `generation_config`) would otherwise replace, and `service_tier: "default"`,
    which OpenAI would take as `auto` when left out, are sent when the client gives
    them, though they equal the API's defaults; settings left out are not. The
    request heads reused along a chain tell the two apart (same echoed settings)."""
    sim, server, _metrics = stack
    at_default = {"temperature": 1.0, "top_p": 1.0, "service_tier": "default"}
    with WSClient(server.ws_url) as client:
        response_id = None
        for given in (at_default, {}, {"temperature": 0.5}, at_default):
            events = client.turn(input="hi", previous_response_id=response_id, **given)
            assert events[-1]["type"] == "response.completed", events[-1]
            response = events[-1]["response"]
            assert (response["temperature"], response["top_p"]) == (
                given.get("temperature", 1.0),
                given.get("top_p", 1.0),
            )
            response_id = response["id"]
    bodies = [json.loads(r["body"]) for r in sim.stats(bodies=True)["requests"]]
    names = ("temperature", "top_p") if api == "chat" else tuple(at_default)
    sent = [{name: body[name] for name in names if name in body} for body in bodies]
    expected = {name: at_default[name] for name in names}
    assert sent == [expected, {}, {"temperature": 0.5}, expected]


def test_a_prompt_template_reaches_a_responses_upstream(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """`prompt` (a template stored at OpenAI, with its variables) goes to a Responses
    upstream, which reads it (the simulated one as OpenAI does: its instructions,
    `{{name}}` replaced); a body without `model` sends none, the template naming it;
    a template the upstream does not have is its 404. A Chat Completions upstream
    cannot read one: 400 on `prompt`, and the connection goes on."""
    sim, server, _metrics = stack
    sim.control(prompts={"pmpt_1": "Speak to {{name}}."})
    template = {"id": "pmpt_1", "variables": {"name": "Ada"}}
    with WSClient(server.ws_url) as client:
        first = client.turn(input="/transcript", prompt=template, model=None)
        if api == "chat":
            assert first[-1]["type"] == "error", first[-1]
            assert (first[-1]["error"]["code"], first[-1]["error"]["param"]) == (
                "unsupported_parameter",
                "prompt",
            )
            assert "--upstream-api responses" in first[-1]["error"]["message"]
            assert output_text(client.turn(input="still here")) == "You said: still here"
            assert sim.stats()["requests_total"] == 1
            return
        assert output_text(first).splitlines()[0] == "instructions: Speak to Ada."
        second = client.turn(
            input="/transcript",
            prompt=template,
            previous_response_id=first[-1]["response"]["id"],
        )
        assert output_text(second).splitlines()[0] == "instructions: Speak to Ada."
        missing = client.turn(input="x", prompt={"id": "pmpt_nope"})
    bodies = [json.loads(r["body"]) for r in sim.stats(bodies=True)["requests"]]
    assert [body["prompt"] for body in bodies[:2]] == [template] * 2
    assert "model" not in bodies[0] and bodies[1]["model"] == "warmsocket-mock"
    assert missing[-1]["type"] == "response.failed"
    assert "Prompt with id 'pmpt_nope' not found" in missing[-1]["response"]["error"]["message"]


def test_moderation_and_access_programs_reach_a_responses_upstream(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """`moderation` (moderated completions: a `block` policy must not be dropped)
    and `access_programs` go to a Responses upstream as sent. A Chat Completions
    upstream runs no moderation: 400 on `moderation`; `access_programs`, which
    only selects what OpenAI allows, is left out there."""
    sim, server, _metrics = stack
    moderation = {"model": "omni-moderation-latest", "policy": {"output": {"mode": "block"}}}
    programs = {"cyber": "standard"}
    with WSClient(server.ws_url) as client:
        moderated = client.turn(input="hi", moderation=moderation, access_programs=programs)
        plain = client.turn(input="hi", access_programs=programs)
    assert plain[-1]["type"] == "response.completed"
    bodies = [json.loads(r["body"]) for r in sim.stats(bodies=True)["requests"]]
    if api == "chat":
        assert moderated[-1]["type"] == "error"
        assert moderated[-1]["error"]["param"] == "moderation"
        (body,) = bodies
        assert "access_programs" not in body and "moderation" not in body
        return
    assert moderated[-1]["type"] == "response.completed"
    assert [(b.get("moderation"), b.get("access_programs")) for b in bodies] == [
        (moderation, programs),
        (None, programs),
    ]


def test_what_a_responses_upstream_did_reaches_the_client_and_stays_stored(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """The fields of the upstream's final Response that say what it did (the
    simulated upstream answers as OpenAI does: the tier that served an `auto` request
    is `default`; moderation results; hosted tools' `tool_usage`) are in the
    client's final Response, over WebSocket, SSE and a plain HTTP create, and in the
    stored response. The first events keep the request's tier, as OpenAI's do.
    A Chat Completions upstream other than OpenAI says none of them: the Response
    keeps the request's settings."""
    _sim, server, _metrics = stack
    moderation = {"model": "omni-moderation-latest"}
    tools = [{"type": "web_search"}]
    key = {"Authorization": "Bearer sk-test"}  # the SDK's below: the same owner
    with WSClient(server.ws_url, additional_headers=key) as client:
        plain = client.turn(input="hi", service_tier="auto")
        flex = client.turn(input="hi", service_tier="flex")
        searched = client.turn(input="/search weather Lima", tools=tools)
        if api != "chat":
            moderated = client.turn(input="hi", moderation=moderation)
    for events in (plain, flex, searched):
        assert events[-1]["type"] == "response.completed", events[-1]
    created = plain[0]["response"]
    final = plain[-1]["response"]
    assert created["service_tier"] == "auto"
    assert flex[-1]["response"]["service_tier"] == "flex"
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        if api == "chat":
            assert final["service_tier"] == "auto"
            assert "tool_usage" not in searched[-1]["response"]
            stored = sdk.responses.retrieve(final["id"])
            assert stored.service_tier == "auto" and stored.moderation is None
            return
        assert final["service_tier"] == "default"
        assert searched[-1]["response"]["tool_usage"]["web_search"] == {"num_requests": 1}
        result = moderated[-1]["response"]["moderation"]
        assert result["input"]["model"] == "omni-moderation-latest"
        assert result["output"]["flagged"] is False
        assert "moderation" not in plain[-1]["response"]
        # Stored: the Response as the client got it at its end.
        for events in (plain, flex, searched, moderated):
            response = events[-1]["response"]
            stored_json = sdk.responses.retrieve(response["id"]).model_dump(exclude_unset=True)
            for field in ("service_tier", "moderation", "tool_usage"):
                assert stored_json.get(field) == response.get(field), field
        # Over SSE and a plain HTTP create too, and a chain goes on from them.
        stream = sdk.responses.create(
            model="m", input="hi", moderation=moderation, service_tier="auto", stream=True
        )
        events = list(stream)
        for event in events:
            check_sse_event(event.model_dump(exclude_unset=True, mode="json"))
        done = events[-1].response
        assert done.service_tier == "default" and done.moderation is not None
        created_sse = events[0].response
        assert created_sse.service_tier == "auto" and created_sse.moderation is None
        answer = sdk.responses.create(
            model="m", input="again", previous_response_id=done.id, service_tier="priority"
        )
        assert answer.service_tier == "priority" and answer.status == "completed"
        assert answer.moderation is None


def test_an_answer_the_upstream_cut_short_ends_incomplete(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """An upstream that stops at the output token limit (`finish_reason: length`,
    `response.incomplete`) ends the client's response `incomplete` with reason
    `max_output_tokens`, the message `incomplete` (every event checked against the
    SDK's types), stored as it ended; the chain goes on from it."""
    sim, server, _metrics = stack
    long_input = "word " * 100
    key = {"Authorization": "Bearer sk-test"}  # the SDK's below: the same owner
    with WSClient(server.ws_url, additional_headers=key) as client:
        events = client.turn(input=long_input, max_output_tokens=16)
        check_sequence(events)
        terminal = events[-1]
        assert terminal["type"] == "response.incomplete", terminal
        response = terminal["response"]
        assert response["incomplete_details"] == {"reason": "max_output_tokens"}
        (message,) = response["output"]
        assert message["status"] == "incomplete"
        text = message["content"][0]["text"]
        after = client.turn(input="/transcript", previous_response_id=response["id"])
    assert f"You said: {long_input}".startswith(text) and 0 < len(text) < len(long_input)
    assert count_tokens(text) <= 16
    assert output_text(after).splitlines()[1] == f"assistant: {text}"
    first, _second = (json.loads(r["body"]) for r in sim.stats(bodies=True)["requests"])
    limit = "max_tokens" if api == "chat" else "max_output_tokens"
    assert first[limit] == 16
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        stored = sdk.responses.retrieve(response["id"])
    assert stored.status == "incomplete" and stored.output_text == text


def test_a_chat_upstream_gets_the_token_limit_field_it_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In front of OpenAI (`UpstreamConfig.at_openai`, by host: patched here, the
    simulated upstream being on loopback) the limit goes as `max_completion_tokens`,
    and the answer is cut at it all the same; OpenAI's own fields go with it. The
    tier its chunks say served the request is the Response's `service_tier`."""
    monkeypatch.setattr(UpstreamConfig, "at_openai", property(lambda self: True))
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, "chat") as (server, _metrics),
        WSClient(server.ws_url) as client,
    ):
        events = client.turn(
            input="word " * 100,
            max_output_tokens=16,
            prompt_cache_key="chain-7",
            service_tier="auto",
        )
        (body,) = (json.loads(r["body"]) for r in sim.stats(bodies=True)["requests"])
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["max_completion_tokens"] == 16 and "max_tokens" not in body
    assert (body["prompt_cache_key"], body["service_tier"]) == ("chain-7", "auto")
    assert events[0]["response"]["service_tier"] == "auto"
    assert events[-1]["response"]["service_tier"] == "default"


def test_log_probabilities_come_through_a_responses_upstream(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """With `include: ["message.output_text.logprobs"]` and `top_logprobs`, each text
    delta carries the upstream's log probabilities, the text's `.done` all of them,
    and the message's part (kept in the chain) has them with their tokens' `bytes`,
    as OpenAI's part does (every event checked against the SDK's types). A Chat
    Completions upstream is asked for them (`logprobs: true`, `top_logprobs`), and
    its chunks' `logprobs.content` come through, their `bytes` kept."""
    sim, server, _metrics = stack
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 1}
    with WSClient(server.ws_url) as client:
        events = client.turn(input="two words", **asked)
        plain = client.turn(input="not asked")
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    (done,) = [e for e in events if e["type"] == "response.output_text.done"]
    part = events[-1]["response"]["output"][0]["content"][0]
    body, plain_body = (json.loads(r["body"]) for r in sim.stats(bodies=True)["requests"])
    assert all(e["logprobs"] == [] for e in plain if e["type"] == "response.output_text.delta")
    if api == "chat":
        assert (body["logprobs"], body["top_logprobs"]) == (True, 1)
        assert "logprobs" not in plain_body
        expected = [chat_logprobs(d["delta"], 1)["content"] for d in deltas]
    else:
        expected = [sim_logprobs(d["delta"], body) for d in deltas]
    assert [d["logprobs"] for d in deltas] == expected and expected[0]
    assert done["logprobs"] == [entry for entries in expected for entry in entries]
    assert part["logprobs"] == [
        {
            **entry,
            "bytes": list(entry["token"].encode()),
            "top_logprobs": [
                {**top, "bytes": list(top["token"].encode())} for top in entry["top_logprobs"]
            ],
        }
        for entries in expected
        for entry in entries
    ]


def test_an_upstream_that_requires_a_key_gets_it(api: str) -> None:
    """--upstream-api-key goes upstream as `Authorization: Bearer KEY` on every API
    (the simulated upstream refuses any other); the client's own key does not."""
    with (
        running_sim(api_key="upstream-key") as sim,
        warmsocket_upstream(sim.base_url, api, api_key="upstream-key") as (server, metrics),
    ):
        headers = {"Authorization": "Bearer client-key"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=sim.base_url, headers=headers) as http:
            assert http.post("/chat/completions", json=body).status_code == 401
        with WSClient(server.ws_url, additional_headers=headers) as client:
            first = client.turn(input="one", store=False)
            assert output_text(first) == "You said: one"
            second = client.turn(
                input="two", store=False, previous_response_id=first[-1]["response"]["id"]
            )
            assert output_text(second) == "You said: two"
        with OpenAI(base_url=server.base_url, api_key="client-key", max_retries=0) as sdk:
            assert sdk.responses.create(model="m", input="three").output_text == "You said: three"
        assert [r["status"] for r in sim.stats()["requests"]] == [200, 200, 200]
        outcome = "ok" if api == "responses-ws" else "200"
        assert dict(metrics.upstream.requests) == {(api, outcome): 3}


def test_each_client_s_own_key_goes_upstream_with_forwarding(api: str) -> None:
    """`--upstream-forward-key`: the upstream (which takes only `client-key` here)
    gets each client's own bearer token, over WebSocket, HTTP and the compact
    endpoint, and answers a key it refuses with its own 401, which the client gets
    (not warmsocket's 502 for its own key). A client without a key gets
    `--upstream-api-key` when there is one."""
    with (
        running_sim(api_key="client-key") as sim,
        warmsocket_upstream(sim.base_url, api, forward_key=True) as (server, metrics),
    ):
        good = {"Authorization": "Bearer client-key"}
        with WSClient(server.ws_url, additional_headers=good) as client:
            first = client.turn(input="one", store=False)
            assert output_text(first) == "You said: one"
            second = client.turn(input="two", previous_response_id=first[-1]["response"]["id"])
            assert output_text(second) == "You said: two"
        with WSClient(server.ws_url, additional_headers={"Authorization": "Bearer bad"}) as client:
            refused = client.turn(input="three")
        # Started before the upstream answered: it fails with the upstream's words.
        failed = refused[-1]["response"]["error"]
        assert refused[-1]["type"] == "response.failed"
        assert failed["message"].startswith("Incorrect or missing API key")
        with OpenAI(base_url=server.base_url, api_key="client-key", max_retries=0) as sdk:
            assert sdk.responses.create(model="m", input="four").output_text == "You said: four"
            if api != "chat":  # its own compaction endpoint gets the key too
                window = sdk.responses.compact(model="m", input="five")
                assert window.output[-1].type == "compaction"
        with (
            OpenAI(base_url=server.base_url, api_key="bad", max_retries=0) as sdk,
            pytest.raises(AuthenticationError) as denied,
        ):
            sdk.responses.create(model="m", input="six")
        assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
        assert "Incorrect or missing API key" in denied.value.message  # the upstream's words
        assert {r["status"] for r in sim.stats()["requests"]} == {200}
        assert metrics.upstream.requests[(api, "401")] == 2  # refused before recording
    with (
        running_sim(api_key="fallback-key") as sim,
        warmsocket_upstream(sim.base_url, api, forward_key=True, api_key="fallback-key") as (
            server,
            _metrics,
        ),
        WSClient(server.ws_url) as anonymous,
    ):
        assert output_text(anonymous.turn(input="seven")) == "You said: seven"


def test_upstream_websockets_are_never_shared_between_keys() -> None:
    """responses-ws with `--upstream-forward-key`: each client's turns go on
    connections opened with its own key (one upstream connection per key here, reused
    by the same key later), and the warm ones are those of `--upstream-api-key`."""
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, "responses-ws", forward_key=True) as (server, metrics),
    ):
        for key in ("key-a", "key-b", "key-a"):
            auth = {"Authorization": f"Bearer {key}"}
            with WSClient(server.ws_url, additional_headers=auth) as ws:
                first = ws.turn(input="one")
                ws.turn(input="two", previous_response_id=first[-1]["response"]["id"])
        backend = server.server.engine.backend
        idle = [s for sockets in backend._idle for s in sockets]  # type: ignore[attr-defined]
    assert sorted(str(s.key) for s in idle) == ["None", "key-a", "key-b"]
    # key-a's second client reused key-a's connection; the warm one is keyless.
    assert metrics.upstream.connections_opened["responses-ws"] == 3


def test_a_large_input_tokenised_off_the_loop_reaches_the_upstream(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """A turn whose input is tokenised in a worker thread (256 KiB or more) first:
    the model task's first step (eager for upstream backends) waits for it, then the
    upstream gets the whole input and the client its answer."""
    sim, server, _metrics = stack
    text = "word " * (300 * 1024 // 5)
    with WSClient(server.ws_url) as client:
        events = client.turn(input=text, store=False)
    assert events[-1]["type"] == "response.completed", events[-1]
    assert output_text(events) == f"You said: {text}"
    (record,) = sim.stats(bodies=True)["requests"]
    assert seen_context(record) == [("message", "user", text)]


def test_reasoning_reaches_the_client_and_goes_back_upstream(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """An upstream's reasoning item is shown to the client (every event checked
    against the SDK's types) and kept in the chain. A Responses upstream gets it
    back, `encrypted_content` included, as reasoning models need (the simulated
    upstream refuses content it did not seal, as OpenAI does); Chat Completions has
    no form for it."""
    sim, server, _metrics = stack
    prompt = '/think Weather first.\n/call get_weather {"city": "Lima"}'
    with WSClient(server.ws_url) as client:
        events = client.turn(input=prompt, tools=FUNCTION_TOOLS)
        first = events[-1]["response"]
        reasoning, call = first["output"]
        answer = client.turn(
            input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "warm"}],
            previous_response_id=first["id"],
            tools=FUNCTION_TOOLS,
        )
        # A client replaying the whole history (no previous_response_id) sends the
        # reasoning item back itself: matched to the cached chain, sent up as it was.
        replay = [
            {"role": "user", "content": prompt},
            *first["output"],
            {"type": "function_call_output", "call_id": call["call_id"], "output": "warm"},
            *answer[-1]["response"]["output"],
            {"role": "user", "content": "/transcript"},
        ]
        transcript = output_text(client.turn(input=replay, tools=FUNCTION_TOOLS))
    assert reasoning["type"] == "reasoning" and call["type"] == "function_call"
    # The reasoning streamed a word at a time, as the upstream sent it.
    delta = "reasoning_text" if api == "chat" else "reasoning_summary_text"
    deltas = [e["delta"] for e in events if e["type"] == f"response.{delta}.delta"]
    assert deltas == ["Weather", " first."]
    # The upstream's count of reasoning tokens is the client's.
    details = first["usage"]["output_tokens_details"]
    assert details["reasoning_tokens"] == count_tokens("Weather first.") > 0
    assert [o["type"] for o in answer[-1]["response"]["output"]] == ["reasoning", "message"]
    records = sim.stats(bodies=True)["requests"]
    assert [r["status"] for r in records] == [200, 200, 200]
    if api == "chat":
        # Reasoning deltas (`reasoning_content`) became a reasoning_text part.
        assert reasoning["content"] == [{"type": "reasoning_text", "text": "Weather first."}]
        assert reasoning["summary"] == [] and "encrypted_content" not in reasoning
        assert "reasoning" not in transcript
        return
    assert reasoning["summary"] == [{"type": "summary_text", "text": "Weather first."}]
    assert reasoning["encrypted_content"].startswith("wsim1.")
    # The upstream saw its reasoning item again on both later requests, verbatim.
    for record in records[1:]:
        context = json.loads(record["context"])
        sent = next(item for item in context if item.get("type") == "reasoning")
        assert sent["encrypted_content"] == reasoning["encrypted_content"]
        assert sent["id"] == reasoning["id"]
    # (line 1 is the prompt's second line)
    assert transcript.splitlines()[2:4] == [
        "reasoning Weather first.",
        f"function_call get_weather {call['call_id']}",
    ]


def test_a_hosted_tool_call_streams_its_progress_and_goes_back_upstream(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """An upstream's hosted tool call (the simulated upstream searches the web as
    OpenAI does) is shown when it starts, its own progress events are passed on as
    they come, renumbered into the client's response (every event checked against
    the SDK's types), and the whole call, under the upstream's item id, is kept in the
    chain and goes back upstream. Chat Completions has no hosted tools."""
    sim, server, _metrics = stack
    tools = [{"type": "web_search"}, *FUNCTION_TOOLS]
    prompt = '/search weather Lima\n/call get_weather {"city": "Lima"}'
    with WSClient(server.ws_url) as client:
        events = client.turn(input=prompt, tools=tools, stream_id="lane-1")
        first = events[-1]["response"]
        if api == "chat":
            assert output_text(events) == "Cannot search: this request has no web_search tool."
            return
        call = first["output"][-1]
        answer = client.turn(
            input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "warm"}],
            previous_response_id=first["id"],
            tools=tools,
        )
        again = client.turn(
            input="thanks", previous_response_id=answer[-1]["response"]["id"], tools=tools
        )
    check_sequence(events)
    assert again[-1]["type"] == "response.completed"
    search = first["output"][0]
    assert [o["type"] for o in first["output"]] == ["web_search_call", "function_call"]
    types = [e["type"] for e in events]
    start = types.index("response.output_item.added")
    assert types[start : start + 5] == [
        "response.output_item.added",
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
        "response.output_item.done",
    ]
    shown = events[start : start + 5]
    assert shown[0]["item"]["status"] == "in_progress" and shown[-1]["item"] == search
    assert search["status"] == "completed" and search["action"]["query"] == "weather Lima"
    # The upstream's item id; warmsocket's own numbering, index and lane.
    assert search["id"].startswith("ws_")
    assert all(e.get("item_id", search["id"]) == search["id"] for e in shown)
    assert all(e["output_index"] == 0 and e["stream_id"] == "lane-1" for e in shown)
    # The answer (after a second search) cites it: the upstream's annotation, passed on.
    message = answer[-1]["response"]["output"][-1]
    text = "get_weather returned: warm"
    assert message["content"][0]["text"] == text
    citation = mockmodel.search_citation("weather Lima", text)
    assert message["content"][0]["annotations"] == [citation]
    (added,) = [e for e in answer if e["type"] == "response.output_text.annotation.added"]
    assert added["annotation"] == citation and added["item_id"] == message["id"]
    # The upstream saw the calls and the cited answer again, as they were.
    records = sim.stats(bodies=True)["requests"]
    context = json.loads(records[1]["context"])
    assert [item for item in context if item.get("type") == "web_search_call"] == [search]
    context = json.loads(records[-1]["context"])
    sent = [item for item in context if item.get("type") == "message" and "id" in item]
    assert sent[-1]["content"][0]["annotations"] == [citation]


class CustomToolUpstream:
    """A WebSocket-mode upstream whose model calls a custom (freeform) tool first, as
    GPT-5 does with Codex's `apply_patch`, then answers "patched"."""

    CALL: ClassVar[dict[str, str]] = {
        "id": "ctc_up1",
        "type": "custom_tool_call",
        "call_id": "call_patch1",
        "name": "apply_patch",
        "input": "*** Begin Patch\n*** End Patch",
    }

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def events(self, turn: int) -> list[dict[str, Any]]:
        rid = f"resp_up{turn}"
        snapshot = {"id": rid, "object": "response", "status": "in_progress", "output": []}
        if turn == 1:
            item = self.CALL
            streamed = [
                {
                    "type": "response.output_item.added",
                    "output_index": 0,
                    "item": {**item, "input": ""},
                },
                {
                    "type": "response.custom_tool_call_input.delta",
                    "output_index": 0,
                    "item_id": item["id"],
                    "delta": item["input"],
                },
                {
                    "type": "response.custom_tool_call_input.done",
                    "output_index": 0,
                    "item_id": item["id"],
                    "input": item["input"],
                },
            ]
        else:
            item = {
                "id": "msg_up2",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "patched"}],
            }
            streamed = [
                {
                    "type": "response.output_item.added",
                    "output_index": 0,
                    "item": {**item, "content": []},
                },
                {
                    "type": "response.output_text.delta",
                    "output_index": 0,
                    "item_id": item["id"],
                    "content_index": 0,
                    "delta": "patched",
                },
            ]
        done = {
            **snapshot,
            "status": "completed",
            "output": [item],
            "usage": {"input_tokens": 9, "output_tokens": 4},
        }
        events = [
            {"type": "response.created", "response": snapshot},
            *streamed,
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": done},
        ]  # fmt: skip
        return [{**event, "sequence_number": n} for n, event in enumerate(events)]

    async def __call__(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in ws:
                self.requests.append(json.loads(message))
                for event in self.events(len(self.requests)):
                    await ws.send(json.dumps(event))
        except ConnectionClosed:
            pass


def test_a_custom_tool_call_from_the_upstream_streams_and_stays_in_the_chain() -> None:
    """A custom (freeform) tool call streams through like a function call and is
    stored in the chain: the client's custom_tool_call_output then continues it."""
    from tests.test_upstream_failures import ws_front

    upstream = CustomToolUpstream()
    tools = [{"type": "custom", "name": "apply_patch", "description": "Apply a patch."}]
    with ws_front(upstream) as (front, _metrics, client):
        first = client.turn(input="fix it", tools=tools)  # each event checked by the SDK
        output = {"type": "custom_tool_call_output", "call_id": "call_patch1", "output": "ok"}
        second = client.turn(
            input=[output], previous_response_id=first[-1]["response"]["id"], tools=tools
        )
        with httpx.Client(base_url=front.base_url) as http:
            stored = http.get(f"/responses/{first[-1]['response']['id']}").json()
    # Streamed as the upstream streamed it, under warmsocket's own item id (as a
    # function call is).
    assert [e["type"] for e in first[2:6]] == [
        "response.output_item.added",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
        "response.output_item.done",
    ]
    done = first[5]["item"]
    assert done["id"].startswith("ctc_") and done["id"] != CustomToolUpstream.CALL["id"]
    assert done == {**CustomToolUpstream.CALL, "id": done["id"]}
    assert first[3]["delta"] == CustomToolUpstream.CALL["input"]
    assert first[-1]["response"]["output"] == [done]
    assert stored["output"] == [done]
    assert output_text(second) == "patched"
    # Chained upstream: only the output went up, after the upstream's own response.
    assert upstream.requests[1]["previous_response_id"] == "resp_up1"
    assert upstream.requests[1]["input"] == [output]


def test_a_background_response_runs_and_is_cancelled_in_front_of_an_upstream(
    api: str, stack: tuple[RunningSim, RunningServer, Metrics]
) -> None:
    """A background response's turn goes to the upstream like any other; cancelling it
    closes the upstream request, and the next turns are served as before."""
    _sim, server, _metrics = stack
    sdk = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    try:
        done = sdk.responses.create(model="m", input="in the background", background=True)
        slow = sdk.responses.create(model="m", input="/sleep 5000\nslow", background=True)
        deadline = time.monotonic() + 10
        while sdk.responses.retrieve(done.id).status != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert sdk.responses.retrieve(done.id).output_text == "You said: in the background"
        started = time.monotonic()
        assert sdk.responses.cancel(slow.id).status == "cancelled"
        assert time.monotonic() - started < 2
        after = sdk.responses.create(model="m", input="next", previous_response_id=done.id)
        assert after.output_text == "You said: next"
    finally:
        sdk.close()
