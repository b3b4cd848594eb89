"""Many threads hammering one cache: no deadlock, no crash, consistent state afterwards."""

from __future__ import annotations

import json
import random
import threading

import pytest

from warmsocket import CacheFull, ResponseNotFound, SessionCache

THREADS = 16
OPS = 2000
OWNER = "owner"


def own_items(rid: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"{rid}:in"},
        {"role": "assistant", "content": f"{rid}:out"},
    ]


def contents(context: bytes) -> list[str]:
    return [item["content"] for item in json.loads(context)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("budget", [60_000, 1 << 30])
def test_threads_hammering_one_cache(budget: int) -> None:
    cache = SessionCache(memory_budget=budget)
    # Every response ever created, with the context it must have (as item contents).
    expected: dict[str, list[str]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(t: int) -> None:
        rng = random.Random(t)
        conn = cache.open_connection()
        mine: list[tuple[str, int | None]] = []  # (id, connection it is visible from)
        bindings = []
        start.wait()
        for i in range(OPS):
            op = rng.random()
            try:
                if op < 0.4:
                    rid = f"t{t}-{i}"
                    parent, via = rng.choice(mine) if mine and rng.random() < 0.8 else (None, None)
                    if parent is None and rng.random() < 0.3:
                        with lock:
                            others = list(expected)
                        parent = rng.choice(others) if others else None
                        via = None
                    store = rng.random() < 0.7
                    info = cache.create(
                        rid,
                        owner=OWNER,
                        input=own_items(rid)[:1],
                        output=own_items(rid)[1:],
                        previous_response_id=parent,
                        store=store,
                        connection=conn if (via is not None or not store) else None,
                    )
                    with lock:
                        base = expected[parent] if parent else []
                        expected[rid] = [*base, f"{rid}:in", f"{rid}:out"]
                    assert info.items == len(expected[rid])
                    mine.append((rid, conn if info.connection is not None else None))
                elif op < 0.6 and mine:
                    rid, via = rng.choice(mine)
                    data = cache.context(rid, owner=OWNER, connection=via or conn)
                    assert contents(data) == expected[rid]
                elif op < 0.7 and mine:
                    rid, via = rng.choice(mine)
                    binding = cache.bind(rid, owner=OWNER, connection=via or conn)
                    assert contents(binding.view().json()) == expected[rid]
                    bindings.append(binding)
                elif op < 0.8 and bindings:
                    bindings.pop(rng.randrange(len(bindings))).release()
                elif op < 0.85 and mine:
                    rid, via = rng.choice(mine)
                    if via is None:
                        cache.delete(rid, owner=OWNER)
                    else:
                        cache.evict(rid, owner=OWNER, connection=via)
                elif op < 0.87:
                    # A new connection: everything local to the old one goes.
                    for binding in bindings:
                        binding.release()
                    bindings.clear()
                    cache.close_connection(conn)
                    mine = [(rid, via) for rid, via in mine if via is None]
                    conn = cache.open_connection()
                else:
                    cache.stats()
            except (ResponseNotFound, CacheFull):
                pass  # evicted or removed by another thread meanwhile
            except BaseException as e:
                errors.append(e)
                raise
        for binding in bindings:
            binding.release()
        cache.close_connection(conn)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]

    s = cache.stats()
    assert s.connections == 0
    assert s.local_entries == 0
    assert s.pinned == 0
    assert s.entries == s.stored_entries
    if budget < 1 << 20:
        assert s.evictions > 0
    # Every surviving entry has exactly the context its chain was built with.
    survivors = [rid for rid in expected if _present(cache, rid)]
    assert len(survivors) == s.entries
    for rid in survivors:
        assert contents(cache.context(rid, owner=OWNER)) == expected[rid]
    # The byte meter returns to zero once nothing is held.
    for rid in survivors:
        assert cache.delete(rid, owner=OWNER)
    assert cache.stats().bytes == 0


def _present(cache: SessionCache, rid: str) -> bool:
    try:
        cache.get(rid, owner=OWNER)
    except ResponseNotFound:
        return False
    return True
