"""`item_reference` input items: a client that keeps `store: true` sends earlier items
back by id (the Vercel AI SDK does for every earlier assistant item), and warmsocket
puts the stored items in their place; a reference to nothing the owner has is the
API's 404, and the connection goes on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI

from tests.redis_support import paused, redis_server
from tests.support import FUNCTION_TOOLS, RunningServer, WSClient, output_text
from tests.test_shared_store_serve import flush, shared_stats, two_servers
from tests.upstream_support import running_sim, warmsocket_upstream
from warmsocket import errors, ids, shared_store
from warmsocket._core import Items, SessionCache
from warmsocket.item_references import referenced_responses, resolve, response_of_item

MODEL = "warmsocket-mock"
PROMPT = '/think Weather first.\n/call get_weather {"city": "Lima"}'
AUTH = {"Authorization": "Bearer sk-test"}


@pytest.fixture
def sdk(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as client:
        yield client


def refs(items: Any) -> list[dict[str, Any]]:
    return [{"type": "item_reference", "id": item.id} for item in items]


def test_item_ids_name_their_response() -> None:
    assert response_of_item("msg_ab12_3") == "resp_ab12"
    assert response_of_item("rs_ab12_0") == "resp_ab12"
    for other in ("msg_client", "rs_up", "msg", "msg__1", "msg_ab_x", "nothing"):
        assert response_of_item(other) is None, other
    items = [
        {"type": "item_reference", "id": "fc_r1_1"},
        {"type": "message", "role": "user", "content": "x", "id": "msg_r2_0"},
        {"type": "item_reference", "id": "msg_r1_2"},
        {"type": "item_reference", "id": "rs_up"},
    ]
    assert referenced_responses(items) == ["resp_r1"]
    # The ids `input_items` gives input items that came without one name their
    # response and index (and only in the form it writes them).
    response_id = ids.response_id()
    listed = ids.input_item_id(response_id, 5)
    assert ids.input_item_of(listed) == (response_id, 5)
    assert referenced_responses([{"type": "item_reference", "id": listed}]) == [response_id]
    for other in (listed[:-1], listed[:-4] + "00005", listed.upper(), "msg_" + "g" * 52):
        assert ids.input_item_of(other) is None, other


@settings(max_examples=80, deadline=None)
@given(
    turns=st.lists(
        st.tuples(st.integers(1, 3), st.integers(0, 3), st.booleans()), min_size=1, max_size=6
    ),
    chosen=st.data(),
)
def test_any_references_resolve_to_the_context_they_stand_for(
    turns: list[tuple[int, int, bool]], chosen: st.DataObject
) -> None:
    """A chain of responses (inputs with or without clients' own ids, outputs with the
    ids warmsocket makes) re-sent whole with any of its identified items as
    references: it resolves to that context exactly when every reference can be
    found (warmsocket's ids always; a client's through `previous_response_id` or a
    reference to a later response), else a 404. Another owner finds none."""
    cache = SessionCache()
    parent: str | None = None
    turn_of: list[int] = []  # the turn of each item of the context
    for turn, (inputs, outputs, client_ids) in enumerate(turns):
        response_id = f"resp_{turn:02x}cafe"
        stem = response_id.removeprefix("resp_")
        own_input = [
            {"type": "message", "role": "user", "content": f"u{turn}.{i}"}
            | ({"id": f"msg_client{turn}x{i}"} if client_ids else {})
            for i in range(inputs)
        ]
        output = [
            {"type": "message", "role": "assistant", "id": f"msg_{stem}_{i}", "content": f"a{i}"}
            for i in range(outputs)
        ]
        cache.create(
            response_id, owner="o", input=own_input, output=output, previous_response_id=parent
        )
        turn_of += [turn] * (inputs + outputs)
        parent = response_id
    assert parent is not None
    context = cache.context_objects(parent, owner="o")
    identified = [i for i, item in enumerate(context) if "id" in item]
    replaced = chosen.draw(st.sets(st.sampled_from(identified)) if identified else st.just(set()))
    previous = chosen.draw(st.sampled_from([None, parent]))
    sent = [
        {"type": "item_reference", "id": item["id"]} if i in replaced else item
        for i, item in enumerate(context)
    ]
    # The latest response a reference to warmsocket's ids names: its chain is searched.
    named = [turn_of[i] for i in replaced if "client" not in context[i]["id"]]
    reach = len(turns) - 1 if previous is not None else max(named, default=-1)
    findable = all(turn_of[i] <= reach for i in replaced)

    def resolved(owner: str) -> list[dict[str, Any]]:
        items = Items.from_objects(sent)
        return resolve(
            cache,
            items,
            owner=owner,
            connection=None,
            previous_response_id=previous,
            max_item_bytes=1 << 20,
        ).to_objects()

    if findable:
        assert resolved("o") == context
    else:
        with pytest.raises(errors.APIError) as missing:
            resolved("o")
        assert missing.value.status == 404
    if replaced:
        with pytest.raises(errors.APIError) as other:
            resolved("someone else")
        assert other.value.status == 404


def test_a_history_of_references_is_the_history(server: RunningServer, sdk: OpenAI) -> None:
    """The AI SDK's pattern: user messages whole, earlier assistant items (reasoning,
    calls, messages) as references. The model sees the items, and the re-sent history
    is matched to the cached chain like one sent whole."""
    first = sdk.responses.create(model=MODEL, input=PROMPT, tools=FUNCTION_TOOLS)
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and call.type == "function_call"
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    history: list[Any] = [{"role": "user", "content": PROMPT}, *refs(first.output), output]
    second = sdk.responses.create(model=MODEL, input=history, tools=FUNCTION_TOOLS)
    assert second.output_text == "get_weather returned: sunny"
    history += [*refs(second.output), {"role": "user", "content": "/transcript"}]
    third = sdk.responses.create(model=MODEL, input=history, tools=FUNCTION_TOOLS)
    assert third.output_text.splitlines()[2:] == [
        "reasoning Weather first.",
        f"function_call get_weather {call.call_id}",
        f"function_call_output {call.call_id} sunny",
        "reasoning Weather first.",
        "assistant: get_weather returned: sunny",
        "user: /transcript",
    ]
    # Turns 2 and 3 matched what they re-sent: 3 items, then 6.
    assert server.server.metrics.prefix_matched_items == 3 + 6


def test_an_unknown_reference_is_not_found(server: RunningServer, sdk: OpenAI) -> None:
    mine = sdk.responses.create(model=MODEL, input="mine")
    for item_id in ("msg_nothing_0", "no-such-form", f"{mine.output[0].id}9"):
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.responses.create(model=MODEL, input=[{"type": "item_reference", "id": item_id}])
        assert missing.value.param == "input"
        assert f"Item with id '{item_id}' not found." in missing.value.message
    # Another owner's item is not found either, whatever its id says.
    with (
        OpenAI(base_url=server.base_url, api_key="sk-other", max_retries=0) as other,
        pytest.raises(openai.NotFoundError),
    ):
        other.responses.create(model=MODEL, input=refs(mine.output))
    # Over WebSocket: an error event, and the connection goes on.
    with WSClient(server.ws_url, additional_headers=AUTH) as ws:
        (error,) = ws.turn(input=[{"type": "item_reference", "id": "msg_nothing_0"}])
        assert (error["type"], error["status"], error["error"]["param"]) == ("error", 404, "input")
        after = ws.turn(input=[*refs(mine.output), {"role": "user", "content": "/transcript"}])
    assert output_text(after).splitlines() == ["assistant: You said: mine", "user: /transcript"]


def test_listed_input_items_can_be_referenced(server: RunningServer, sdk: OpenAI) -> None:
    """`input_items.list` gives the input items that came without an id ids of
    warmsocket's; a reference to one is that item, as a reference to an output item
    is (it was a 404), and so is it on a WebSocket. A listed id past the input, or
    another owner's, is not found."""
    first = sdk.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "one"},
            {"role": "user", "content": "two", "id": "msg_client_two"},
            {"role": "user", "content": "three"},
        ],
    )
    one, two, three = sdk.responses.input_items.list(first.id, order="asc").data
    assert two.id == "msg_client_two"
    history = [*refs([three, one]), *refs(first.output), {"role": "user", "content": "/transcript"}]
    after = sdk.responses.create(model=MODEL, input=history)  # type: ignore[arg-type]
    assert after.output_text.splitlines() == [
        "user: three",
        "user: one",
        "assistant: You said: three",
        "user: /transcript",
    ]
    # A continuation's own input, and a conversation's response's (listed from what
    # its request sent), listed and referenced the same way.
    second = sdk.responses.create(model=MODEL, input="four", previous_response_id=first.id)
    (four,) = sdk.responses.input_items.list(second.id).data
    conversation = sdk.conversations.create()
    third = sdk.responses.create(model=MODEL, input="five", conversation=conversation.id)
    (five,) = sdk.responses.input_items.list(third.id).data
    with WSClient(server.ws_url, additional_headers=AUTH) as ws:
        events = ws.turn(input=[*refs([four, five]), {"role": "user", "content": "/transcript"}])
    assert output_text(events).splitlines() == ["user: four", "user: five", "user: /transcript"]
    past_the_input = three.id[:-4] + "0003"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.create(model=MODEL, input=[{"type": "item_reference", "id": past_the_input}])
    assert f"Item with id '{past_the_input}' not found." in missing.value.message
    with (
        OpenAI(base_url=server.base_url, api_key="sk-other", max_retries=0) as other,
        pytest.raises(openai.NotFoundError),
    ):
        other.responses.create(model=MODEL, input=refs([one]))


def test_items_of_other_names_resolve_through_the_chain(sdk: OpenAI) -> None:
    """An id warmsocket did not make (the client's own, an upstream's) is found in
    the outputs of the responses the other references name, or in the chain of
    `previous_response_id`."""
    first = sdk.responses.create(
        model=MODEL, input=[{"role": "user", "content": "one", "id": "msg_client_a"}]
    )
    second = sdk.responses.create(model=MODEL, input="two", previous_response_id=first.id)
    by_chain = sdk.responses.create(
        model=MODEL,
        previous_response_id=second.id,
        input=[
            {"type": "item_reference", "id": "msg_client_a"},
            {"role": "user", "content": "/transcript"},
        ],
    )
    assert by_chain.output_text.splitlines()[-2:] == ["user: one", "user: /transcript"]
    by_neighbour = sdk.responses.create(
        model=MODEL,
        input=[
            {"type": "item_reference", "id": "msg_client_a"},
            *refs(second.output),
            {"role": "user", "content": "/transcript"},
        ],
    )
    assert by_neighbour.output_text.splitlines() == [
        "user: one",
        "assistant: You said: two",
        "user: /transcript",
    ]


def test_a_connection_s_own_items_resolve_in_websocket_mode(server: RunningServer) -> None:
    with WSClient(server.ws_url) as ws:
        first = ws.turn(input="kept here", store=False)[-1]["response"]
        item_id = first["output"][0]["id"]
        events = ws.turn(
            store=False,
            input=[
                {"role": "user", "content": "kept here"},
                {"type": "item_reference", "id": item_id},
                {"role": "user", "content": "/transcript"},
            ],
        )
    assert output_text(events).splitlines() == [
        "user: kept here",
        "assistant: You said: kept here",
        "user: /transcript",
    ]
    # Not stored: another connection has nothing of it.
    with WSClient(server.ws_url) as other:
        (error,) = other.turn(input=[{"type": "item_reference", "id": item_id}])
    assert error["status"] == 404


def test_a_stored_response_that_references_a_store_false_item_stays_on_its_connection(
    server: RunningServer, sdk: OpenAI
) -> None:
    """A `store: true` create on a WebSocket whose `item_reference` names an item of a
    `store: false` response of the connection reads it, but is kept connection-local,
    as one built on a `store: false` parent is (the taint rule): once the connection
    is gone the item cannot be read through it. A reference to a stored item taints
    nothing."""
    with WSClient(server.ws_url, additional_headers=AUTH) as ws:
        private = ws.turn(input="/reply PRIVATE-ANSWER", store=False)[-1]["response"]
        events = ws.turn(
            input=[
                {"type": "item_reference", "id": private["output"][0]["id"]},
                {"role": "user", "content": "/transcript"},
            ]
        )
        made = events[-1]["response"]
        assert output_text(events).splitlines() == [
            "assistant: PRIVATE-ANSWER",
            "user: /transcript",
        ]
        # Its own connection continues it.
        again = ws.turn(input="more", previous_response_id=made["id"])
        assert again[-1]["type"] == "response.completed"
        public = ws.turn(input="/reply PUBLIC-ANSWER")[-1]["response"]
        stored = ws.turn(input=[{"type": "item_reference", "id": public["output"][0]["id"]}])
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(made["id"])
    with pytest.raises(openai.NotFoundError):
        sdk.responses.input_items.list(made["id"])
    assert sdk.responses.retrieve(stored[-1]["response"]["id"]).status == "completed"


def test_compaction_and_token_counts_read_references(server: RunningServer, sdk: OpenAI) -> None:
    first = sdk.responses.create(model=MODEL, input="alpha")
    history = [{"role": "user", "content": "alpha"}, *refs(first.output)]
    whole = [{"role": "user", "content": "alpha"}, *[o.model_dump() for o in first.output]]
    counted = sdk.responses.input_tokens.count(model=MODEL, input=history)  # type: ignore[arg-type]
    assert (
        counted.input_tokens
        == sdk.responses.input_tokens.count(
            model=MODEL,
            input=whole,  # type: ignore[arg-type]
        ).input_tokens
    )
    compacted = sdk.responses.compact(model=MODEL, input=history)  # type: ignore[arg-type]
    summary = json.loads(compacted.model_dump_json(warnings=False))["output"][-1]
    assert summary["type"] == "compaction"


@pytest.mark.parametrize("api", ["chat", "responses", "responses-ws"])
def test_an_upstream_gets_the_items_not_the_references(api: str) -> None:
    with (
        running_sim() as sim,
        warmsocket_upstream(sim.base_url, api) as (server, _metrics),
        OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        first = client.responses.create(model=MODEL, input="alpha")
        history = [
            {"role": "user", "content": "alpha"},
            *refs(first.output),
            {"role": "user", "content": "/transcript"},
        ]
        after = client.responses.create(model=MODEL, input=history)  # type: ignore[arg-type]
        _first, second = sim.stats(bodies=True)["requests"]
    assert after.output_text.splitlines()[:2] == ["user: alpha", "assistant: You said: alpha"]
    assert "item_reference" not in second["body"]


def test_references_to_another_process_s_responses_load_from_redis() -> None:
    """Behind a load balancer: the responses the references name were made on
    another process, and are loaded from Redis first, over HTTP and WebSocket."""

    def history(response: Any) -> list[dict[str, Any]]:
        first_input = {"role": "user", "content": response.output_text.removeprefix("You said: ")}
        return [first_input, *refs(response.output), {"role": "user", "content": "/transcript"}]

    with redis_server() as url, two_servers(url) as (a, b):
        with OpenAI(base_url=a.base_url, api_key="sk-test", max_retries=0) as on_a:
            for_http = on_a.responses.create(model=MODEL, input="for http")
            for_ws = on_a.responses.create(model=MODEL, input="for ws")
        flush(a)
        with OpenAI(base_url=b.base_url, api_key="sk-test", max_retries=0) as on_b:
            over_http = on_b.responses.create(model=MODEL, input=history(for_http))  # type: ignore[arg-type]
        with WSClient(b.ws_url, additional_headers=AUTH) as ws:
            over_ws = ws.turn(input=history(for_ws))
        loaded = shared_stats(b)["load_hits"]
    assert over_http.output_text.splitlines() == [
        "user: for http",
        "assistant: You said: for http",
        "user: /transcript",
    ]
    assert loaded == 2  # each from Redis, not found locally
    assert output_text(over_ws).splitlines() == [
        "user: for ws",
        "assistant: You said: for ws",
        "user: /transcript",
    ]


def test_references_to_made_up_responses_cost_one_redis_round_trip() -> None:
    """Each response a reference names was loaded from Redis in turn: a message of
    made-up references (one per item, hundreds of thousands fit) held a create slot
    for a Redis round trip each. Redis is asked which it has, once, and only those
    are loaded."""
    made_up = [{"type": "item_reference", "id": f"msg_{n:032x}_0"} for n in range(300)]
    with redis_server() as url, two_servers(url) as (a, b):
        with OpenAI(base_url=a.base_url, api_key="sk-test", max_retries=0) as on_a:
            first = on_a.responses.create(model=MODEL, input="one")
            second = on_a.responses.create(model=MODEL, input="two")
        flush(a)
        both = [
            *refs(first.output),
            *refs(second.output),
            {"role": "user", "content": "/transcript"},
        ]
        with OpenAI(base_url=b.base_url, api_key="sk-test", max_retries=0) as on_b:
            answer = on_b.responses.create(model=MODEL, input=both)  # type: ignore[arg-type]
            assert answer.output_text.splitlines() == [
                "assistant: You said: one",
                "assistant: You said: two",
                "user: /transcript",
            ]
            with pytest.raises(openai.NotFoundError):
                on_b.responses.create(model=MODEL, input=[*made_up, *refs(first.output)])  # type: ignore[list-item]
        with WSClient(b.ws_url, additional_headers=AUTH) as ws:
            error = ws.turn(input=[*made_up, {"role": "user", "content": "x"}])[-1]
            assert (error["type"], error["status"], error["error"]["param"]) == (
                "error",
                404,
                "input",
            )
            assert ws.turn(input="still usable")[-1]["type"] == "response.completed"
        stats = shared_stats(b)
    assert (stats["load_hits"], stats["load_misses"]) == (2, 0)


def test_references_while_redis_does_not_answer_are_a_retriable_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asking Redis which named responses it has is a load like another: while Redis
    does not answer, a 503 to retry (over WebSocket on the create's lane, the
    connection going on), never 'not found'."""
    monkeypatch.setattr(shared_store, "SOCKET_TIMEOUT", 0.2)
    with redis_server() as url, two_servers(url) as (a, b):
        with OpenAI(base_url=a.base_url, api_key="sk-test", max_retries=0) as on_a:
            made = [on_a.responses.create(model=MODEL, input=text) for text in ("one", "two")]
        flush(a)
        both = [*refs(made[0].output), *refs(made[1].output)]
        with (
            OpenAI(base_url=b.base_url, api_key="sk-test", max_retries=0) as on_b,
            WSClient(b.ws_url, additional_headers=AUTH) as ws,
        ):
            with paused(url):
                with pytest.raises(openai.InternalServerError) as refused:
                    on_b.responses.create(model=MODEL, input=both)  # type: ignore[arg-type]
                assert (refused.value.status_code, refused.value.param) == (503, "input")
                error = ws.turn(input=both)[-1]
                assert (error["type"], error["status"], error["error"]["param"]) == (
                    "error",
                    503,
                    "input",
                )
            again = ws.turn(input=[*both, {"role": "user", "content": "/transcript"}])
            assert output_text(again).splitlines()[:2] == [
                "assistant: You said: one",
                "assistant: You said: two",
            ]


def test_references_load_one_by_one_when_redis_refuses_the_batch_question() -> None:
    """Redis answering the EXISTS pipeline with an error (an ACL without EXISTS, say)
    made the create a 500, and closed a WebSocket with 1011: the references are
    loaded one by one then, as before."""
    with redis_server() as url, two_servers(url) as (a, b):
        with OpenAI(base_url=a.base_url, api_key="sk-test", max_retries=0) as on_a:
            made = [on_a.responses.create(model=MODEL, input=text) for text in ("one", "two")]
        flush(a)
        with redis.Redis.from_url(url) as admin:
            admin.acl_setuser("default", enabled=True, nopass=True, commands=["-exists"])
        try:
            history = [*refs(made[0].output), *refs(made[1].output)]
            transcript = {"role": "user", "content": "/transcript"}
            with OpenAI(base_url=b.base_url, api_key="sk-test", max_retries=0) as on_b:
                answer = on_b.responses.create(model=MODEL, input=[*history, transcript])  # type: ignore[list-item]
            with WSClient(b.ws_url, additional_headers=AUTH) as ws:
                again = ws.turn(input=[*history, transcript])
        finally:
            with redis.Redis.from_url(url) as admin:
                admin.acl_setuser("default", commands=["+exists"])
    expected = ["assistant: You said: one", "assistant: You said: two", "user: /transcript"]
    assert answer.output_text.splitlines() == expected
    assert output_text(again).splitlines() == expected
