"""Prefix-affinity routing over simulated replicas: chains stay on the replica that
holds their prefix, new chains are placed by their first token blocks, and a
replica that goes away is routed around."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from contextlib import ExitStack

from tests.support import WSClient
from tests.upstream_support import RunningSim, running_sim, warmsocket_upstream

SYSTEM = "You are the build agent of a large repository. " * 40  # ~2 KB, shared


def where(sims: list[RunningSim]) -> dict[str, Counter[int]]:
    """For each system prompt seen, how many requests each replica got."""
    out: dict[str, Counter[int]] = {}
    for index, sim in enumerate(sims):
        for record in sim.stats(bodies=True)["requests"]:
            system = json.loads(record["body"])["messages"][0]["content"]
            out.setdefault(system, Counter())[index] += 1
    return out


def chain(client: WSClient, instructions: str, turns: int) -> str | None:
    previous = None
    for i in range(turns):
        fields = {"previous_response_id": previous} if previous else {}
        events = client.turn(input=f"turn {i}", instructions=instructions, store=False, **fields)
        assert events[-1]["type"] == "response.completed", events[-1]
        previous = events[-1]["response"]["id"]
    return previous


def test_affinity_routing_across_three_replicas() -> None:
    with ExitStack() as stack:
        sims = [stack.enter_context(running_sim()) for _ in range(3)]
        server, metrics = stack.enter_context(
            warmsocket_upstream([sim.base_url for sim in sims], "chat", retries=2)
        )
        affinity = metrics.upstream.affinity
        client = stack.enter_context(WSClient(server.ws_url))
        # Chains sharing a system prompt land together, and each turn follows its parent.
        for _ in range(4):
            chain(client, SYSTEM, 3)
        (shared,) = where(sims).values()
        assert len(shared) == 1 and sum(shared.values()) == 12
        # (With prefix diffing, chains 2-4 start on chain 1's first input, cached on
        # this connection, under the same instructions: their first turns follow it.)
        assert affinity[("new", "prefix")] == 1 and affinity[("hit", "parent")] == 11
        # Their continuations hit the replica's prefix cache.
        home = sims[next(iter(shared))]
        assert all(r["cached_tokens"] >= 320 for r in home.stats()["requests"][1:])
        # Chains with different prompts spread, each staying on its replica.
        heads = {}
        for i in range(12):
            heads[f"Prompt {i}: " + "x" * 100] = chain(client, f"Prompt {i}: " + "x" * 100, 2)
        placement = where(sims)
        assert all(len(replicas) == 1 for replicas in placement.values())
        used = {next(iter(r)) for p, r in placement.items() if p.startswith("Prompt")}
        assert len(used) >= 2
        # A replica goes away: its chains move on (after a retry) and stay where they went.
        prompt = next(p for p, r in placement.items() if p.startswith("Prompt"))
        (gone,) = placement[prompt]
        sims[gone].stop()
        previous = heads[prompt]
        for i in range(3):
            events = client.turn(
                input=f"after {i}", instructions=prompt, store=False, previous_response_id=previous
            )
            assert events[-1]["type"] == "response.completed", events[-1]
            previous = events[-1]["response"]["id"]
        assert affinity[("miss", "retry")] >= 1
        assert metrics.upstream.retries >= 1
        moved = Counter(
            index
            for index, sim in enumerate(sims)
            if index != gone
            for r in sim.stats(bodies=True)["requests"]
            if prompt in r["body"]
        )
        assert list(moved.values()) == [3]  # all three on one surviving replica
        # /metrics shows exactly these counts.
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "# TYPE warmsocket_upstream_affinity_total counter" in text.splitlines()
        lines = [
            line
            for line in text.splitlines()
            if line.startswith("warmsocket_upstream_affinity_total{")
        ]
        assert sorted(lines) == sorted(
            f'warmsocket_upstream_affinity_total{{result="{result}",reason="{reason}"}} {count}'
            for (result, reason), count in affinity.items()
        )
        hits, retries = affinity[("hit", "parent")], affinity[("miss", "retry")]
        assert hits >= 11 + 12 and retries >= 1
        assert f'warmsocket_upstream_affinity_total{{result="hit",reason="parent"}} {hits}' in lines
        assert (
            f'warmsocket_upstream_affinity_total{{result="miss",reason="retry"}} {retries}' in lines
        )
