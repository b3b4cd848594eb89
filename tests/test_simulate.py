"""The simulated upstream on its own: its latency model and its prefix cache."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx2 as httpx
import pytest
from websockets.sync.client import connect

from tests.support import FUNCTION_TOOLS
from tests.upstream_support import RunningSim, running_sim
from warmsocket import mockmodel
from warmsocket.prefixhash import PromptHasher, count_tokens
from warmsocket.simulate.model import LatencyModel, PrefixCache, canonical_items

# -- the latency model ----------------------------------------------------------------------


def test_latency_model_arithmetic() -> None:
    instant = LatencyModel()
    assert instant.first_token_seconds(10_000) == 0.0
    assert instant.first_token_seconds(10_000, sleep_ms=250) == pytest.approx(0.25)
    assert instant.decode_seconds("many words here") == 0.0
    model = LatencyModel(
        overhead_ms=40, prefill_tokens_per_second=2_000, decode_tokens_per_second=50
    )
    # overhead + uncached tokens / prefill rate (+ any /sleep)
    assert model.first_token_seconds(0) == pytest.approx(0.040)
    assert model.first_token_seconds(500) == pytest.approx(0.040 + 0.25)
    assert model.first_token_seconds(500, sleep_ms=100) == pytest.approx(0.140 + 0.25)
    # one token / decode rate per token of the delta, at least one token
    text = " the quick brown fox jumps over the lazy dog"
    assert count_tokens(text) > 1
    assert model.decode_seconds(text) == pytest.approx(count_tokens(text) / 50)
    assert model.decode_seconds("") == pytest.approx(1 / 50)
    overhead_only = LatencyModel(overhead_ms=15)
    assert overhead_only.first_token_seconds(10**6) == pytest.approx(0.015)


LATENCY = LatencyModel(
    overhead_ms=20, prefill_tokens_per_second=10_000, decode_tokens_per_second=100
)
LONG_INSTRUCTIONS = "You are the build agent of a large repository. " * 300  # ~3,000 tokens
EARLY = 0.005
"""How early the simulator's event loop may wake (libuv timers have ms resolution)."""
LATE = 0.2
"""Scheduling slack on a busy machine; well below what a wrong formula would add."""


def ask(sim: RunningSim, api: str, text: str) -> dict[str, Any]:
    """One streamed request straight to the simulator; returns its /stats record."""
    url = f"http://127.0.0.1:{sim.port}/v1"
    if api == "chat":
        messages = [
            {"role": "system", "content": LONG_INSTRUCTIONS},
            {"role": "user", "content": text},
        ]
        body = {"model": "m", "messages": messages, "stream": True}
        with httpx.Client(base_url=url, timeout=10) as http:
            answer = http.post("/chat/completions", json=body)
        assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
    elif api == "responses":
        body = {"model": "m", "instructions": LONG_INSTRUCTIONS, "input": text, "stream": True}
        with httpx.Client(base_url=url, timeout=10) as http:
            answer = http.post("/responses", json=body)
        assert answer.status_code == 200 and "event: response.completed" in answer.text
    else:
        with connect(url.replace("http", "ws") + "/responses", open_timeout=5) as ws:
            ws.send(
                json.dumps(
                    {
                        "type": "response.create",
                        "model": "m",
                        "instructions": LONG_INSTRUCTIONS,
                        "input": text,
                    }
                )
            )
            while json.loads(ws.recv(timeout=10))["type"] != "response.completed":
                pass
    record: dict[str, Any] = sim.stats()["requests"][-1]
    assert record["status"] == 200 and record["finished"] is not None
    return record


@pytest.mark.parametrize("api", ["chat", "responses", "responses-ws"])
def test_a_running_simulator_follows_its_latency_model(api: str) -> None:
    """The first output comes overhead + uncached prompt tokens / prefill rate after
    the request was read; then each delta takes its tokens / decode rate. A repeated
    prompt is cached, so only its new tail is prefilled."""
    with running_sim(latency=LATENCY) as sim:
        cold = ask(sim, api, "hello")
        warm = ask(sim, api, "hello again")
    assert cold["cached_tokens"] == 0 and cold["prompt_tokens"] > 2_500
    assert warm["prompt_tokens"] - warm["cached_tokens"] < 40  # the instructions are cached
    for record, said in [(cold, "hello"), (warm, "hello again")]:
        uncached = record["prompt_tokens"] - record["cached_tokens"]
        first = 0.020 + uncached / 10_000
        assert first - EARLY <= record["first_token"] - record["started"] < first + LATE
        deltas = mockmodel.text_deltas(f"You said: {said}")
        decode = sum(LATENCY.decode_seconds(delta) for delta in deltas)
        assert decode >= 0.03
        took = record["finished"] - record["first_token"]
        assert decode - EARLY * len(deltas) <= took < decode + LATE


# -- the prefix cache ---------------------------------------------------------------------------

BLOCK = 16


def prompt(name: str, words: int = 60) -> tuple[str, list[Any], list[bytes]]:
    """A prompt of its own from its first block on (8 full blocks for 60 words)."""
    text = " ".join(f"{name}{i}" for i in range(words))
    return f"Agent {name}.", [], canonical_items([{"role": "user", "content": text}])


def cached(cache: PrefixCache, instructions: str, tools: list[Any], items: list[bytes]) -> str:
    """Which of the prompt's full blocks the cache holds: '1' held, '.' not."""
    _tokens, keys = PromptHasher(BLOCK).hash(instructions, tools, items)
    return "".join("1" if key in cache else "." for key in keys)


def test_the_prefix_cache_evicts_least_recently_used_leaves_first() -> None:
    cache = PrefixCache(capacity=20, block_tokens=BLOCK)
    a, b, c = prompt("a"), prompt("b"), prompt("c")
    assert cached(cache, *a) == "." * 8
    assert cache.prefill(*a).cached_tokens == 0
    assert cache.prefill(*b).cached_tokens == 0
    assert cache.prefill(*a).cached_tokens == 8 * BLOCK  # used again: now newer than b
    assert len(cache) == 16
    assert cache.prefill(*c).cached_tokens == 0
    # 24 blocks > 20: down to 90 % (18) by dropping the 6 least recently used, which are
    # b's last blocks (a block is stamped newer than the blocks after it).
    assert len(cache) == 18
    assert (cached(cache, *a), cached(cache, *b), cached(cache, *c)) == (
        "11111111",
        "11......",
        "11111111",
    )
    assert cache.prefill(*b).cached_tokens == 2 * BLOCK


def test_the_prefix_cache_stays_within_capacity_and_caches_prefixes() -> None:
    """Conversations that grow, fork and share instructions, through a small cache:
    after every request the cache holds at most its capacity, what it holds of any
    prompt is a prefix of its blocks, and a request is told exactly that prefix."""
    rng = random.Random(5)
    capacity = 24
    cache = PrefixCache(capacity=capacity, block_tokens=BLOCK)
    prompts: list[tuple[str, list[Any], list[bytes]]] = []
    for step in range(300):
        if prompts and rng.random() < 0.6:  # continue (or fork) an earlier conversation
            instructions, tools, items = rng.choice(prompts)
            keep = rng.randint(max(1, len(items) - 2), len(items))
            items = items[:keep]
        else:
            instructions, tools, items = f"System {rng.randint(0, 3)}.", [], []
            if rng.random() < 0.5:
                tools = [FUNCTION_TOOLS[rng.randint(0, 1)]]
        words = " ".join(f"w{step}_{i}" for i in range(rng.randint(1, 40)))
        items = [*items, *canonical_items([{"role": "user", "content": words}])]
        held = cached(cache, instructions, tools, items)
        leading = len(held) - len(held.lstrip("1"))
        result = cache.prefill(instructions, tools, items)
        assert result.cached_tokens == min(result.prompt_tokens, leading * BLOCK)
        assert len(cache) <= capacity
        prompts.append((instructions, tools, items))
        for earlier in prompts[-40:]:
            held = cached(cache, *earlier)
            assert "1" not in held.lstrip("1"), held  # a prefix: no hole, no tail alone
    assert cache.lookups == 300 and 0 < cache.hits < 300
