"""Session cache benchmarks: the Rust cache beside the pure-Python reference, same run.

Groups: appending a turn to chains of 10, 100 and 1,000 turns, and materialising the
full context of such chains. Every bench checks its result. With `--benchmark-enable`
(and a release build) the `test_target_*` tests also assert the performance targets;
the memory target runs always.
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any

import pytest

from warmsocket import Items, SessionCache
from warmsocket._reference import RefCache

OWNER = "bench"
TURNS = (10, 100, 1000)
IMPLS = ("rust", "reference")
FILLER = "The quick brown fox jumps over the lazy dog. " * 10  # 450 bytes


def turn_items(i: int) -> tuple[bytes, bytes]:
    """One turn, about 1 KB as JSON: a user message in, an assistant message out."""
    sent = [{"role": "user", "content": f"question {i}: {FILLER[:150]}"}]
    produced = [
        {"type": "message", "role": "assistant", "content": f"answer {i}: {FILLER}{FILLER[:300]}"}
    ]
    return json.dumps(sent).encode(), json.dumps(produced).encode()


NEW_INPUT, NEW_OUTPUT = turn_items(-1)


def make_cache(impl: str) -> Any:
    return SessionCache() if impl == "rust" else RefCache()


@functools.cache
def chain(impl: str, turns: int) -> tuple[Any, str, bytes]:
    """A cache holding one chain of `turns` turns, its leaf id and the expected context."""
    cache = make_cache(impl)
    items: list[bytes] = []
    prev = None
    for i in range(turns):
        sent, produced = turn_items(i)
        cache.create(f"t{i}", owner=OWNER, input=sent, output=produced, previous_response_id=prev)
        items += [Items.parse(sent).item_json(0), Items.parse(produced).item_json(0)]
        prev = f"t{i}"
    assert prev is not None
    return cache, prev, b"[" + b",".join(items) + b"]"


# -- the groups ------------------------------------------------------------------------


@pytest.mark.parametrize("turns", TURNS)
@pytest.mark.parametrize("impl", IMPLS)
def test_append_turn(benchmark: Any, timing: bool, impl: str, turns: int) -> None:
    benchmark.group = f"append a turn to a {turns}-turn chain"
    cache, leaf, _ = chain(impl, turns)
    ids = itertools.count()
    last: list[str] = []

    def setup() -> tuple[tuple[str], dict[str, Any]]:
        # Untimed: drop the previous round's turn so every round sees the same cache.
        while last:
            cache.delete(last.pop(), owner=OWNER)
        last.append(f"new{next(ids)}")
        return (last[0],), {}

    def append(rid: str) -> Any:
        return cache.create(
            rid, owner=OWNER, input=NEW_INPUT, output=NEW_OUTPUT, previous_response_id=leaf
        )

    rounds = 2000 if impl == "rust" else 30
    info = benchmark.pedantic(append, setup=setup, rounds=rounds, warmup_rounds=1)
    assert (info.depth, info.items, info.previous_response_id) == (turns + 1, 2 * turns + 2, leaf)
    assert info.bytes == len(cache.context(info.id, owner=OWNER))
    setup()
    cache.delete(last.pop(), owner=OWNER)


@pytest.mark.parametrize("turns", TURNS)
@pytest.mark.parametrize("impl", IMPLS)
def test_materialise_context(benchmark: Any, timing: bool, impl: str, turns: int) -> None:
    benchmark.group = f"materialise a {turns}-turn context"
    cache, leaf, expected = chain(impl, turns)
    result = benchmark(cache.context, leaf, owner=OWNER)
    assert result == expected


# -- the targets ---------------------------------------------------------------------


def append_seconds(stopwatch: Any, impl: str, turns: int, batch: int) -> float:
    """Best time per appended turn, over batches of `batch` forks of the chain's leaf."""
    cache, leaf, _ = chain(impl, turns)
    ids = itertools.count()
    made: list[str] = []

    def clear() -> None:
        while made:
            cache.delete(made.pop(), owner=OWNER)

    def append_batch() -> None:
        for _ in range(batch):
            rid = f"x{next(ids)}"
            cache.create(
                rid, owner=OWNER, input=NEW_INPUT, output=NEW_OUTPUT, previous_response_id=leaf
            )
            made.append(rid)

    seconds: float = stopwatch(append_batch, setup=clear, repeats=15 if impl == "rust" else 3)
    clear()
    return seconds / batch


def context_seconds(stopwatch: Any, impl: str, turns: int) -> float:
    cache, leaf, _ = chain(impl, turns)
    repeats = 100 if impl == "rust" else 20
    return float(stopwatch(lambda: cache.context(leaf, owner=OWNER), repeats=repeats))


def test_target_append_cost_does_not_grow_with_the_chain(stopwatch: Any) -> None:
    # Alternate the two measurements so load from other processes hits both alike.
    rounds = [
        (append_seconds(stopwatch, "rust", 10, 200), append_seconds(stopwatch, "rust", 1000, 200))
        for _ in range(5)
    ]
    short = min(r[0] for r in rounds)
    long = min(r[1] for r in rounds)
    print(f"\nappend: {short * 1e6:.2f} us at 10 turns, {long * 1e6:.2f} us at 1,000 turns")
    assert long <= 1.5 * short


def delete_seconds(stopwatch: Any, turns: int) -> float:
    """Best time per deletion, deleting a chain of `turns` turns oldest first (as a
    client deleting its history in order does), built anew before each timing."""
    cache = make_cache("rust")
    ids = itertools.count()
    made: list[str] = []

    def build() -> None:
        made.clear()
        prev = None
        for _ in range(turns):
            rid = f"d{next(ids)}"
            cache.create(
                rid, owner=OWNER, input=NEW_INPUT, output=NEW_OUTPUT, previous_response_id=prev
            )
            made.append(rid)
            prev = rid

    def delete_oldest_first() -> None:
        for rid in made:
            assert cache.delete(rid, owner=OWNER)

    seconds: float = stopwatch(delete_oldest_first, setup=build, repeats=5)
    assert cache.stats().entries == 0
    return seconds / turns


def test_target_delete_cost_does_not_grow_with_the_chain(stopwatch: Any) -> None:
    """Each deletion looked for the nearest ancestor still cached, up the whole chain
    of deleted ones: O(depth) each, O(depth^2) for a history deleted oldest first."""
    rounds = [(delete_seconds(stopwatch, 10), delete_seconds(stopwatch, 10_000)) for _ in range(3)]
    short = min(r[0] for r in rounds)
    long = min(r[1] for r in rounds)
    print(f"\ndelete: {short * 1e6:.2f} us at 10 turns, {long * 1e6:.2f} us at 10,000 turns")
    assert long <= 2 * short


def test_target_materialise_at_1_gb_per_second(stopwatch: Any) -> None:
    _, _, expected = chain("rust", 1000)
    rate = len(expected) / context_seconds(stopwatch, "rust", 1000)
    print(f"\nmaterialise 1,000 turns ({len(expected)} bytes): {rate / 1e9:.2f} GB/s")
    assert rate >= 1e9


def test_target_rust_20x_the_reference_at_1000_turns(stopwatch: Any) -> None:
    # Alternate the measurements so load from other processes hits both alike.
    rust_append = ref_append = rust_context = ref_context = float("inf")
    for _ in range(3):
        ref_append = min(ref_append, append_seconds(stopwatch, "reference", 1000, 5))
        rust_append = min(rust_append, append_seconds(stopwatch, "rust", 1000, 200))
        ref_context = min(ref_context, context_seconds(stopwatch, "reference", 1000))
        rust_context = min(rust_context, context_seconds(stopwatch, "rust", 1000))
    append, context = ref_append / rust_append, ref_context / rust_context
    print(f"\nat 1,000 turns Rust is {append:.0f}x (append) and {context:.0f}x (context) faster")
    assert append >= 20
    assert context >= 20


def test_memory_32_forks_of_a_1_mb_context() -> None:
    cache = SessionCache()
    prev = None
    big = "x" * 4970
    for i in range(100):
        sent = [{"role": "user", "content": f"{i} {big}"}]
        produced = [{"role": "assistant", "content": f"{i} {big}"}]
        cache.create(f"t{i}", owner=OWNER, input=sent, output=produced, previous_response_id=prev)
        prev = f"t{i}"
    assert prev is not None
    context = cache.view(prev, owner=OWNER).nbytes
    assert 1_000_000 <= context < 1_010_000
    own = 0
    for k in range(32):
        new = Items.from_objects([{"role": "user", "content": f"fork {k} " + "y" * 1000}])
        own += new.nbytes
        info = cache.create(f"fork{k}", owner=OWNER, input=new, previous_response_id=prev)
        assert info.bytes == context + 1 + new.nbytes
    total = cache.stats().bytes
    print(f"\n32 forks of a {context}-byte context: {total} bytes ({own} of them new items)")
    assert total < 1_200_000 + own
