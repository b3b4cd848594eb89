"""Prefix diffing and token caching end to end.

Clients that re-send their whole history without `previous_response_id` (HTTP
clients, `openai-agents` by default, a reconnecting client) share the cached chain:
only the new suffix is validated, tokenised and stored; what the upstream receives is
the previous turn's context byte for byte followed by the new items, whatever form the
client re-sent; usage counts the whole context and reports the part a previous prompt
of the chain already had; scopes and owners are respected.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    responses_websocket_session,
)
from agents.tracing import set_tracing_disabled
from openai import AsyncOpenAI

from tests.support import RunningServer, WSClient, running_server
from tests.upstream_support import RunningSim, running_sim, warmsocket_upstream
from warmsocket import SessionCache, Tokenizer
from warmsocket._core import TokenizerFileUnreadable
from warmsocket.cli import build_parser
from warmsocket.engine import prompt_key, tokenizer_for
from warmsocket.serve import config_from_args

INSTRUCTIONS = "You are a terse coding agent."
O200K = Tokenizer.builtin("o200k_base")


@pytest.fixture(autouse=True)
def no_tracing() -> Iterator[None]:
    set_tracing_disabled(True)
    yield


def replayed(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as many clients re-send it: no id or status, text as a string,
    keys in another order."""
    out = {k: v for k, v in reversed(list(item.items())) if k not in ("id", "status")}
    content = out.get("content")
    if isinstance(content, list) and len(content) == 1 and "text" in content[0]:
        out["content"] = content[0]["text"]
    return out


def post(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/responses", json={"model": "warmsocket-mock", **body})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def context_tokens(items: list[bytes], instructions: str | None) -> int:
    tokens = sum(O200K.count_item(item) for item in items)
    return tokens + (O200K.count_instructions(instructions) if instructions else 0)


# ---------------------------------------------------------------- HTTP full replay


def test_http_full_replay_shares_the_chain_on_one_keep_alive_connection(
    server: RunningServer,
) -> None:
    metrics, cache = server.server.metrics, server.server.cache
    history: list[dict[str, Any]] = []
    ids: list[str] = []
    with httpx.Client(base_url=server.base_url) as client:
        for i in range(4):
            history.append({"role": "user", "content": f"question {i}"})
            data = post(client, input=history, store=False, instructions=INSTRUCTIONS)
            assert data["previous_response_id"] is None
            history += [replayed(item) for item in data["output"]]
            ids.append(data["id"])
        assert metrics.prefix_matches["miss"] == 1
        assert metrics.prefix_matches["hit"] == 3
        # Turn k re-sent 2k items; they were found, not stored again.
        assert metrics.prefix_matched_items == 2 + 4 + 6
        # Local to this connection: not retrievable, and each response holds only its
        # new input and its output.
        assert client.get(f"/responses/{ids[-1]}").status_code == 404
        connection = next(iter(server.server.connections))._cache_connection
        info = cache.get(ids[-1], owner="anonymous", connection=connection)
        assert (info.input_items, info.output_items, info.items) == (1, 1, 8)
        assert info.previous_response_id is None and info.parent_id == ids[-2]

        # Another keep-alive connection never sees this connection's local chains.
        with httpx.Client(base_url=server.base_url) as other:
            history.append({"role": "user", "content": "from elsewhere"})
            post(other, input=history, store=False)
        assert metrics.prefix_matches["miss"] == 2


def test_stored_chains_match_from_any_connection_of_their_owner_only() -> None:
    with running_server(api_keys=frozenset({"key-a", "key-b"})) as server:
        metrics = server.server.metrics
        a = {"authorization": "Bearer key-a"}
        b = {"authorization": "Bearer key-b"}
        history: list[dict[str, Any]] = [{"role": "user", "content": "hello"}]
        with httpx.Client(base_url=server.base_url, headers=a) as client:
            first = post(client, input=history)
        history += [*first["output"], {"role": "user", "content": "again"}]
        with httpx.Client(base_url=server.base_url, headers=b) as client:
            post(client, input=history)
        assert metrics.prefix_matches == {"miss": 2}
        with httpx.Client(base_url=server.base_url, headers=a) as client:
            second = post(client, input=history)
            assert metrics.prefix_matches["hit"] == 1
            # The response shows what the client sent: no previous_response_id, and
            # its whole input.
            got = client.get(f"/responses/{second['id']}").json()
            assert got["previous_response_id"] is None
            listed = client.get(f"/responses/{second['id']}/input_items?order=asc").json()
            assert [item["type"] for item in listed["data"]] == ["message"] * 3
            assert listed["data"][1]["id"] == first["output"][0]["id"]
            assert listed["data"][2]["content"][0]["text"] == "again"


def test_edits_and_truncations_share_only_the_common_prefix(server: RunningServer) -> None:
    cache = server.server.cache
    with httpx.Client(base_url=server.base_url) as client:
        history: list[dict[str, Any]] = []
        for i in range(3):
            history.append({"role": "user", "content": f"q{i}"})
            data = post(client, input=history)
            history += data["output"]
        # Edit the second question: the match ends after the first turn.
        edited = [*history[:2], {"role": "user", "content": "q1, edited"}]
        data = post(client, input=edited)
        info = cache.get(data["id"], owner="anonymous")
        assert (info.input_items, info.items) == (1, 4)
        assert data["output"][0]["content"][0]["text"] == "You said: q1, edited"
        # Truncate inside a turn (its input kept, its output dropped): the prefix is
        # shared from that turn's own items.
        data = post(client, input=history[:3])
        info = cache.get(data["id"], owner="anonymous")
        assert (info.input_items, info.items) == (0, 4)
        assert info.parent_id is not None and info.parent_id.endswith("#1")
        assert data["output"][0]["content"][0]["text"] == "You said: q1"


# ---------------------------------------------------------------- openai-agents


@function_tool
def read_file(path: str) -> str:
    """Read a file."""
    return f"contents of {path}"


def test_openai_agents_full_replay_hits_the_prefix_cache_every_turn(
    server: RunningServer,
) -> None:
    metrics = server.server.metrics

    async def main() -> list[int]:
        agent = Agent(
            name="coder",
            instructions=INSTRUCTIONS,
            model="warmsocket-mock",
            tools=[read_file],
            model_settings=ModelSettings(store=True),
        )
        calls = []
        async with responses_websocket_session(
            api_key="sk-test", base_url=server.base_url
        ) as session:
            first = await session.run(
                agent, '/repeat 3 read_file {"path": "a.py"}', auto_previous_response_id=False
            )
            calls.append(len(first.raw_responses))
            ask = {"role": "user", "content": "/transcript"}
            second = await session.run(
                agent, [*first.to_input_list(), ask], auto_previous_response_id=False
            )
            calls.append(len(second.raw_responses))
        # The same over HTTP (the SDK's default transport).
        async with AsyncOpenAI(api_key="sk-test", base_url=server.base_url) as openai:
            http_agent = agent.clone(model=OpenAIResponsesModel("warmsocket-mock", openai))
            third = await Runner.run(http_agent, '/repeat 2 read_file {"path": "b.py"}')
        calls.append(len(third.raw_responses))
        assert str(third.final_output) == "done after 2 calls"
        return calls

    calls = asyncio.run(main())
    assert calls == [4, 1, 3]
    # Every model call after the first of each conversation found its history cached.
    assert metrics.prefix_matches["miss"] == 2
    assert metrics.prefix_matches["hit"] == sum(calls) - 2
    assert metrics.lookups["hit"] == 0  # no previous_response_id was sent


# ---------------------------------------------------------------- upstream bytes


@pytest.fixture(params=["responses", "chat"])
def upstream(request: pytest.FixtureRequest) -> Iterator[tuple[RunningSim, RunningServer]]:
    with running_sim() as sim, warmsocket_upstream(sim.base_url, request.param) as (srv, _):
        yield sim, srv


def test_the_upstream_sees_the_previous_context_byte_for_byte(
    upstream: tuple[RunningSim, RunningServer],
) -> None:
    sim, server = upstream
    history: list[dict[str, Any]] = []
    with httpx.Client(base_url=server.base_url) as client:
        for i in range(5):
            history.append({"role": "user", "content": f"step {i}"})
            # Re-sent in another form each time: other key order, whitespace, the
            # replayed outputs without ids or statuses.
            body = {"model": "m", "input": history, "instructions": INSTRUCTIONS}
            raw = json.dumps(body, indent=i % 3, sort_keys=bool(i % 2))
            response = client.post(
                "/responses", content=raw, headers={"content-type": "application/json"}
            )
            assert response.status_code == 200, response.text
            history += [replayed(item) for item in response.json()["output"]]
    bodies = [r["body"].encode() for r in sim.stats(bodies=True)["requests"]]
    assert len(bodies) == 5
    for earlier, later in itertools.pairwise(bodies):
        assert later.startswith(earlier[:-2])  # the previous body minus its closing `]}`
    assert server.server.metrics.prefix_matches == {"miss": 1, "hit": 4}
    assert all(r["cached_tokens"] > 0 for r in sim.stats()["requests"][1:])


# ---------------------------------------------------------------- usage


def usage_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    usage: dict[str, Any] = events[-1]["response"]["usage"]
    return usage


@pytest.mark.parametrize("diffing", [True, False], ids=["token-caching", "naive"])
def test_usage_counts_the_whole_context_and_what_was_cached(diffing: bool) -> None:
    with running_server(prefix_diffing=diffing) as server:
        cache = server.server.cache
        assert (cache.tokenizer is not None) == diffing
        with WSClient(server.ws_url) as client:
            first = client.turn(input="hello there", instructions=INSTRUCTIONS)
            rid = first[-1]["response"]["id"]
            context = [b'{"content":"hello there","role":"user","type":"message"}']
            usage = usage_of(first)
            assert usage["input_tokens"] == context_tokens(context, INSTRUCTIONS)
            assert usage["input_tokens_details"]["cached_tokens"] == 0
            # A continuation: the parent's context (its output included) and the
            # unchanged instructions were cached.
            context += [json.dumps(first[-1]["response"]["output"][0]).encode()]
            cached = context_tokens(context, INSTRUCTIONS)
            second = client.turn(
                input="and then?", instructions=INSTRUCTIONS, previous_response_id=rid
            )
            context += [b'{"content":"and then?","role":"user","type":"message"}']
            usage = usage_of(second)
            assert usage["input_tokens"] == context_tokens(context, INSTRUCTIONS)
            assert usage["input_tokens_details"]["cached_tokens"] == cached
            # New instructions: the prompt changed from its first token.
            third = client.turn(
                input="x", instructions="Other.", previous_response_id=second[-1]["response"]["id"]
            )
            assert usage_of(third)["input_tokens_details"]["cached_tokens"] == 0
        # Output tokens stay the backend's or the estimate; input is what matters here.
        meta = json.loads(cache.get(rid, owner="anonymous").meta)
        assert meta["instructions"] == prompt_key(INSTRUCTIONS)


def test_usage_of_a_full_replay_counts_the_matched_prefix_as_cached(
    server: RunningServer,
) -> None:
    cache = server.server.cache
    with httpx.Client(base_url=server.base_url) as client:
        history: list[dict[str, Any]] = [{"role": "user", "content": "hello"}]
        first = post(client, input=history, instructions=INSTRUCTIONS)
        history += [*first["output"], {"role": "user", "content": "more"}]
        second = post(client, input=history, instructions=INSTRUCTIONS)
    parent = cache.get(first["id"], owner="anonymous")
    usage = second["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] == parent.tokens + (
        O200K.count_instructions(INSTRUCTIONS)
    )
    view = cache.view(second["id"], owner="anonymous")
    output_tokens = sum(O200K.count_item(json.dumps(item)) for item in second["output"])
    assert usage["input_tokens"] == (
        view.count_tokens(O200K) - output_tokens + O200K.count_instructions(INSTRUCTIONS)
    )
    assert view.tokens == view.count_tokens(O200K)


def test_a_cache_without_a_tokenizer_estimates() -> None:
    with running_server(tokenizer="none") as server:
        assert server.server.cache.tokenizer is None
        assert server.server.engine.prefix_diffing
        with httpx.Client(base_url=server.base_url) as client:
            history: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
            first = post(client, input=history)
            history += [*first["output"], {"role": "user", "content": "again"}]
            second = post(client, input=history)
        assert server.server.metrics.prefix_matches == {"miss": 1, "hit": 1}
        usage = second["usage"]
        assert 0 < usage["input_tokens_details"]["cached_tokens"] < usage["input_tokens"]


def test_the_tokenizer_follows_the_model_name() -> None:
    with running_server(models=("gpt-4-turbo",)) as server:
        tokenizer = server.server.cache.tokenizer
        assert tokenizer is not None and tokenizer.name == "cl100k_base"
    with running_server(tokenizer="o200k_base", models=("gpt-4",)) as server:
        tokenizer = server.server.cache.tokenizer
        assert tokenizer is not None and tokenizer.name == "o200k_base"


# ---------------------------------------------------------------- snapshots and flags


def test_snapshots_keep_matches_and_recount_tokens() -> None:
    def cache(tokenizer: Tokenizer | None) -> SessionCache:
        return SessionCache(tokenizer=tokenizer, prefix_index=True, block_size=4)

    source = cache(O200K)
    source.create("a", owner="o", input=[{"role": "user", "content": "hello"}])
    m = source.match(
        [{"role": "user", "content": "hello"}, {"role": "user", "content": "more"}], owner="o"
    )
    source.create("b", owner="o", input=m.new_items, previous_response_id=m.binding)
    assert m.binding is not None
    m.binding.release()
    data = source.snapshot()
    for tokenizer in (O200K, Tokenizer.builtin("cl100k_base"), None):
        restored = cache(tokenizer)
        assert restored.restore(data) == 2
        info = restored.get("b", owner="o")
        assert (info.previous_response_id, info.parent_id) == (None, "a")
        view = restored.view("b", owner="o")
        assert view.tokens == (view.count_tokens(tokenizer) if tokenizer else 0)
        if tokenizer is O200K:
            assert view.block_hashes() == source.view("b", owner="o").block_hashes()
        # Restored chains are indexed: the history matches again.
        again = restored.match(
            [{"role": "user", "content": "hello"}, {"role": "user", "content": "more"}],
            owner="o",
        )
        assert (again.items, again.parent_id) == (2, "b")


def test_serve_flags_reach_the_server_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["serve", "--tokenizer", "cl100k_base", "--no-prefix-diffing"])
    config = config_from_args(args)
    assert (config.tokenizer, config.prefix_diffing) == ("cl100k_base", False)
    config = config_from_args(build_parser().parse_args(["serve"]))
    assert (config.tokenizer, config.prefix_diffing) == (None, True)
    monkeypatch.setenv("WARMSOCKET_NO_PREFIX_DIFFING", "1")
    monkeypatch.setenv("WARMSOCKET_TOKENIZER", "none")
    config = config_from_args(build_parser().parse_args(["serve"]))
    assert (config.tokenizer, config.prefix_diffing) == ("none", False)
    monkeypatch.setenv("WARMSOCKET_NO_PREFIX_DIFFING", "false")
    assert config_from_args(build_parser().parse_args(["serve"])).prefix_diffing
    monkeypatch.setenv("WARMSOCKET_NO_PREFIX_DIFFING", "maybe")
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["serve"])
    assert exit.value.code == 2
    assert "WARMSOCKET_NO_PREFIX_DIFFING" in capsys.readouterr().err


def test_tokenizer_specs(tmp_path: Any) -> None:
    assert tokenizer_for("none", "gpt-4o") is None
    assert tokenizer_for(None, "gpt-3.5-turbo").name == "cl100k_base"  # type: ignore[union-attr]
    assert tokenizer_for("auto", "unknown").name == "o200k_base"  # type: ignore[union-attr]
    with pytest.raises(TokenizerFileUnreadable):
        tokenizer_for(str(tmp_path / "missing.json"), "m")
