"""`truncation: "auto"` in front of a Chat Completions upstream: the oldest turns go
when the context would not fit the model's window (`backends/truncation.py`)."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import WSClient
from tests.upstream_support import running_sim, warmsocket_upstream
from warmsocket import Items, SessionCache
from warmsocket.backends import truncation
from warmsocket.backends.truncation import ContextWindows, Cut, choose_cut, context_budget
from warmsocket.prefixhash import tokenizer

WINDOW = 8000
TURN_TEXT = "word " * 300  # ~300 tokens, and as many again in the answer
TURNS = 24


def test_the_budget_leaves_room_for_the_answer_and_a_margin() -> None:
    assert context_budget(4000, None, 100) == 4000 - 500 - 125 - 100
    assert context_budget(4000, 1000, 100) == 4000 - 1000 - 125 - 100
    assert context_budget(4000, 10_000, 0) == 0


def test_choose_cut_keeps_the_previous_cut_while_it_fits() -> None:
    cache = SessionCache(memory_budget=1 << 26, tokenizer=tokenizer())
    items: list[dict[str, Any]] = [{"role": "developer", "content": "Follow the rules."}]
    for n in range(10):
        items.append({"role": "user", "content": f"question {n} " + "x " * 50})
        items.append({"type": "message", "role": "assistant", "content": f"answer {n}"})
    view = cache.view(None, owner="", connection=None, extra=Items.from_objects(items))
    total = view.count_tokens(tokenizer())

    def cut(budget: int, kept: Cut | None = None) -> Cut | None:
        return asyncio.run(choose_cut(view, budget, tokenizer(), kept=kept))

    assert cut(total) is None  # fits whole
    first = cut(total - 1)
    assert first is not None and first.head == 1
    # Cut down to three quarters of the budget: more than the minimum goes.
    assert view.truncation(total - 1, tokenizer()) == (1, 3)
    assert first.start > 3 and items[first.start]["role"] == "user"
    # The previous cut stays while it fits; one that no longer fits moves.
    assert cut(total - 1, kept=Cut(1, 5)) == Cut(1, 5)
    assert cut(total - 1, kept=Cut(1, 3)) == Cut(1, 3)  # the minimum cut fits too
    tighter = next(b for b in range(total, 0, -1) if view.truncation(b, tokenizer()) == (1, 5))
    assert cut(tighter, kept=Cut(1, 3)) == cut(tighter) != Cut(1, 3)  # over budget: moves
    assert cut(0) is None  # nothing fits: sent whole, the upstream refuses it


def test_windows_are_asked_once_and_again_only_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[int] = []
    answers = [{}, {"m": 8192}]

    async def fetch() -> dict[str, int]:
        asked.append(1)
        return answers[len(asked) - 1]

    now = [1000.0]
    monkeypatch.setattr(truncation.time, "monotonic", lambda: now[0])
    windows = ContextWindows(None)
    assert asyncio.run(windows.window("m", fetch)) is None
    assert asyncio.run(windows.window("m", fetch)) is None  # not asked again so soon
    now[0] += truncation.RETRY_SECONDS
    assert asyncio.run(windows.window("m", fetch)) == 8192
    assert asyncio.run(windows.window("m", fetch)) == 8192
    assert len(asked) == 2
    assert asyncio.run(ContextWindows(2048).window("m", fetch)) == 2048  # the flag wins
    probed = ContextWindows(None)
    probed.learn({"m": 4096})  # serve's start-up probe: no turn asks
    assert asyncio.run(probed.window("m", fetch)) == 4096 and len(asked) == 2


def test_models_named_by_clients_neither_grow_the_windows_nor_make_the_upstream_ask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[int] = []

    async def fetch() -> dict[str, int]:
        asked.append(1)
        return {"m": 8192}

    now = [1000.0]
    monkeypatch.setattr(truncation.time, "monotonic", lambda: now[0])
    windows = ContextWindows(None)
    for n in range(1000):
        assert asyncio.run(windows.window(f"made-up-{n}", fetch)) is None
    assert len(asked) == 1  # asked once for all of them
    assert asyncio.run(windows.window("m", fetch)) == 8192
    now[0] += truncation.RETRY_SECONDS
    asyncio.run(windows.window("made-up-again", fetch))
    assert len(asked) == 2


def sent_messages(sim: Any) -> list[list[dict[str, Any]]]:
    return [json.loads(r["body"])["messages"] for r in sim.stats(bodies=True)["requests"]]


def run_chain(url: str, turns: int, **fields: Any) -> list[dict[str, Any]]:
    """`turns` chained turns, each a long user message; the terminal event of each."""
    terminals = []
    with WSClient(url) as client:
        previous = None
        for n in range(turns):
            text = f"turn {n}: {TURN_TEXT}"
            first = [{"role": "developer", "content": "Keep to the task."}] if n == 0 else []
            events = client.turn(
                input=[*first, {"role": "user", "content": text}],
                previous_response_id=previous,
                instructions="Be brief.",
                **fields,
            )
            terminals.append(events[-1])
            if events[-1]["type"] != "response.completed":
                break
            previous = events[-1]["response"]["id"]
    return terminals


@pytest.mark.parametrize(
    ("configured", "off_loop"),
    [(False, False), (True, False), (True, True)],
    ids=["learned", "flag", "counted-off-loop"],
)
def test_an_agent_chain_outgrows_the_window_and_goes_on(
    configured: bool, off_loop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the window learned from the upstream's model list (vLLM's
    `max_model_len`), or given by `--upstream-context-window`, a chain that outgrows
    it goes on: the instructions and the developer message stay, whole turns go from
    the oldest, every request fits (the simulated upstream refuses what does not, as
    vLLM does), and a cut stays for several turns, so the request's start is
    stable for the upstream's prefix cache. The stored chain keeps every turn.
    (`counted-off-loop`: the counting in a worker thread, as for a large context.)"""
    if off_loop:
        monkeypatch.setattr(truncation, "OFF_LOOP_BYTES", 0)
    window: dict[str, Any] = {"context_window": WINDOW} if configured else {}
    window["model_map"] = {"*": "warmsocket-sim"}  # the name its model list has
    with (
        running_sim(max_model_len=None if configured else WINDOW) as sim,
        warmsocket_upstream(sim.base_url, "chat", **window) as (server, metrics),
    ):
        terminals = run_chain(server.ws_url, TURNS, truncation="auto")
        sent = sent_messages(sim)
        statuses = [r["status"] for r in sim.stats()["requests"]]
        # A model with a larger window now: the whole chain goes, as it is stored.
        sim.server.config.max_model_len = None
        with WSClient(server.ws_url) as client:
            last = terminals[-1]["response"]["id"]
            transcript = client.turn(input="/transcript", previous_response_id=last)
    assert [t["type"] for t in terminals] == ["response.completed"] * TURNS
    assert statuses == [200] * len(statuses)
    for messages in sent:
        assert messages[0] == {"role": "system", "content": "Be brief."}
        assert messages[1] == {"role": "system", "content": "Keep to the task."}
        assert messages[2]["role"] == "user"  # a whole turn: from its user message
    starts = [messages[2]["content"].split(":")[0] for messages in sent]
    assert starts[0] == "turn 0" and starts[-1] != "turn 0"
    moved = [b for a, b in itertools.pairwise(starts) if a != b]
    truncated = metrics.upstream.truncated_turns
    assert truncated >= 8 and len(moved) <= truncated / 2  # kept for several turns
    # The chain itself lost nothing: every turn is still in it.
    text = transcript[-1]["response"]["output"][0]["content"][0]["text"]
    assert all(f"user: turn {n}:" in text for n in range(TURNS))


def test_without_truncation_the_upstream_refuses_the_long_context() -> None:
    with (
        running_sim(max_model_len=WINDOW) as sim,
        warmsocket_upstream(sim.base_url, "chat") as (server, metrics),
    ):
        terminals = run_chain(server.ws_url, TURNS)
    failed = terminals[-1]
    assert failed["type"] == "response.failed"
    assert f"maximum context length is {WINDOW} tokens" in failed["response"]["error"]["message"]
    assert metrics.upstream.truncated_turns == 0
    assert 3 < len(terminals) < TURNS


# -- the Rust cut against a restatement -------------------------------------------------------


def reference_cut(tokens: list[int], kinds: list[str], budget: int) -> tuple[int, int] | None:
    """`ContextView.truncation` restated: the leading system and developer messages
    stay; the cut starts at the earliest user message (or keeps everything) from
    which the rest fits."""
    head = 0
    while head < len(kinds) and kinds[head] in ("system", "developer"):
        head += 1
    kept = sum(tokens[:head])
    if head == len(kinds):
        return (head, head) if kept <= budget else None
    for start in range(head, len(kinds)):
        if (start == head or kinds[start] == "user") and kept + sum(tokens[start:]) <= budget:
            return (head, start)
    return None


def item_of(kind: str, n: int, size: int) -> dict[str, Any]:
    text = f"{kind} {n} " + "x " * size
    if kind == "call":
        return {"type": "function_call", "call_id": f"c{n}", "name": "f", "arguments": "{}"}
    if kind == "output":
        return {"type": "function_call_output", "call_id": f"c{n}", "output": text}
    return {"type": "message", "role": kind, "content": text}


kinds_strategy = st.lists(
    st.sampled_from(["system", "developer", "user", "assistant", "call", "output"]),
    min_size=0,
    max_size=14,
)


@settings(max_examples=150, deadline=None)
@given(
    kinds=kinds_strategy,
    sizes=st.lists(st.integers(0, 40), min_size=14, max_size=14),
    splits=st.lists(st.integers(0, 14), max_size=3),
    tokenised=st.booleans(),
    budget_share=st.floats(0, 1.2),
)
def test_the_cut_matches_its_restatement(
    kinds: list[str], sizes: list[int], splits: list[int], tokenised: bool, budget_share: float
) -> None:
    """Over chains of stored responses (several batches, as a real context) and new
    items, tokenised in the cache or counted now: the same cut as the rule says."""
    tok = tokenizer()
    cache = SessionCache(memory_budget=1 << 26, tokenizer=tok if tokenised else None)
    items = [item_of(kind, n, sizes[n]) for n, kind in enumerate(kinds)]
    cuts = sorted({0, *(s for s in splits if s < len(items)), len(items)})
    *stored, (first_new, _end) = list(itertools.pairwise(cuts)) or [(0, 0)]
    parent = None
    for n, (lo, hi) in enumerate(stored):  # a chain of responses: one batch each
        cache.create(f"r{n}", owner="o", input=items[lo:hi], previous_response_id=parent)
        parent = f"r{n}"
    extra = Items.from_objects(items[first_new:])
    view = cache.view(parent, owner="o", connection=None, extra=extra)
    assert view.items == len(items)
    tokens = [tok.count_item(json.dumps(item)) for item in items]
    budget = int(sum(tokens) * budget_share)
    kinds_seen = [k if k in ("system", "developer", "user", "assistant") else "tool" for k in kinds]
    assert view.truncation(budget, tok) == reference_cut(tokens, kinds_seen, budget)
