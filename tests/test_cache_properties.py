"""The Rust cache against the pure-Python reference, driven by the same random operations.

Every step does the same thing to both caches and compares what they return (values
or exception types); after every step their stats (entries, bytes, hits, evictions,
...) and snapshots must be identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from warmsocket import SessionCache
from warmsocket._reference import RefBinding, RefCache

OWNERS = ("alice", "bob")
SETTINGS = (b"{}", b'{"model":"a"}', b'{"model":"b","tools":[]}')

text = st.text(st.characters(codec="utf-8"), max_size=12)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(("user", "assistant", "system")), "content": text}
)
typed = st.fixed_dictionaries(
    {
        "type": st.sampled_from(("message", "function_call", "reasoning")),
        "id": text,
        "n": st.integers(-(2**63), 2**64 - 1),
    },
    optional={"role": st.sampled_from(("user", "assistant")), "call_id": text, "ok": st.booleans()},
)
# Large enough to overflow the small budgets (CacheFull) or the item limit (ItemTooLarge).
big = st.sampled_from((3000, 3000, 3000, 5000)).map(lambda n: {"role": "user", "content": "x" * n})
nested: st.SearchStrategy[dict[str, Any]] = st.just({"nested": {"b": [1, None, {"a": []}]}})
item = st.one_of(message, message, message, typed, nested)
items = st.one_of(*[st.lists(item, max_size=3)] * 5, big.map(lambda i: [i]))


def info_fields(info: Any) -> tuple[Any, ...]:
    return (
        info.id,
        info.previous_response_id,
        info.owner,
        info.store,
        info.connection,
        info.depth,
        info.items,
        info.bytes,
        info.input_items,
        info.output_items,
        info.settings,
        info.meta,
    )


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", call())
    except Exception as e:  # compared by exact type
        return ("error", type(e))


class CacheMachine(RuleBasedStateMachine):
    info = staticmethod(info_fields)

    def __init__(self) -> None:
        super().__init__()
        self.rust = SessionCache()
        self.ref = RefCache()
        self.ids: list[str] = []
        self.connections: list[int] = []
        self.open: list[int] = []
        self.bindings: list[tuple[Any, RefBinding]] = []
        self.scope: dict[str, tuple[str, int | None]] = {}  # id -> (owner, connection)
        self.counter = 0

    @initialize(budget=st.sampled_from((2000, 3000, 4000, 1 << 30)))
    def make(self, budget: int) -> None:
        self.rust = SessionCache(memory_budget=budget, max_item_bytes=4000)
        self.ref = RefCache(memory_budget=budget, max_item_bytes=4000)
        self.open_connection()

    def both(
        self, label: str, call: Callable[[Any], Any], same: Callable[[Any], Any] = lambda x: x
    ) -> Any:
        evictions = self.rust.stats().evictions
        got = outcome(lambda: call(self.rust))
        want = outcome(lambda: call(self.ref))
        if got[0] == "ok" and want[0] == "ok":
            assert same(got[1]) == same(want[1])
        else:
            assert got == want, (got, want)
        event(f"{label}: {got[0] if got[0] == 'ok' else got[1].__name__}")
        if self.rust.stats().evictions > evictions:
            event(f"{label}: evicted")
        return got

    def pick_id(self, data: st.DataObject) -> str:
        if not self.ids or data.draw(st.integers(0, 9)) == 0:
            return data.draw(st.sampled_from(("missing", *self.ids)))
        return data.draw(st.sampled_from(self.ids))

    def pick_connection(self, data: st.DataObject) -> int | None:
        """Mostly an open connection, sometimes none, a closed one or an unknown one."""
        if self.open and data.draw(st.integers(0, 9)) < 6:
            return data.draw(st.sampled_from(self.open))
        return data.draw(st.sampled_from((None, *self.connections, 999)))

    def pick_target(self, data: st.DataObject) -> tuple[str, str, int | None]:
        """An id with, mostly, the owner and connection that can see it."""
        rid = self.pick_id(data)
        if rid in self.scope and data.draw(st.integers(0, 4)):
            owner, conn = self.scope[rid]
            return rid, owner, conn if conn is not None else self.pick_connection(data)
        return rid, data.draw(st.sampled_from(OWNERS)), self.pick_connection(data)

    # -- rules

    @rule()
    def open_connection(self) -> None:
        a, b = self.rust.open_connection(), self.ref.open_connection()
        assert a == b
        self.connections.append(a)
        self.open.append(a)

    @precondition(lambda self: self.connections)
    @rule(data=st.data())
    def close_connection(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(self.connections))
        self.both("close", lambda c: c.close_connection(conn))
        if conn in self.open:
            self.open.remove(conn)

    def do_create(
        self,
        label: str,
        rid: str,
        owner: str,
        parent: str | None,
        conn: int | None,
        data: st.DataObject,
    ) -> None:
        new_input = data.draw(items)
        new_output = data.draw(items)
        sent: Any = json.dumps(new_input).encode() if data.draw(st.booleans()) else new_input
        store = data.draw(st.integers(0, 2)) > 0
        settings_ = data.draw(st.sampled_from(SETTINGS))
        meta = b'{"n":%d}' % self.counter
        got = self.both(
            label,
            lambda c: c.create(
                rid,
                owner=owner,
                input=sent,
                output=new_output,
                previous_response_id=parent,
                settings=settings_,
                meta=meta,
                store=store,
                connection=conn,
            ),
            self.info,
        )
        if got[0] == "ok":
            if rid not in self.ids:
                self.ids.append(rid)
            self.scope[rid] = (owner, got[1].connection)

    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    def create_root(self, data: st.DataObject, owner: str) -> None:
        self.counter += 1
        rid = f"r{self.counter}" if data.draw(st.integers(0, 19)) else self.pick_id(data)
        self.do_create("create_root", rid, owner, None, self.pick_connection(data), data)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def create_child(self, data: st.DataObject) -> None:
        self.counter += 1
        parent, owner, conn = self.pick_target(data)
        self.do_create("create_child", f"r{self.counter}", owner, parent, conn, data)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def extend_chain(self, data: st.DataObject) -> None:
        """Continue the newest response, as a conversation does (grows long chains)."""
        self.counter += 1
        parent = self.ids[-1]
        owner, conn = self.scope[parent]
        if conn is None:
            conn = self.pick_connection(data)
        self.do_create("extend_chain", f"r{self.counter}", owner, parent, conn, data)

    @precondition(lambda self: self.bindings)
    @rule(data=st.data(), store=st.booleans(), owner=st.sampled_from(OWNERS))
    def create_from_binding(self, data: st.DataObject, store: bool, owner: str) -> None:
        pair = data.draw(st.sampled_from(self.bindings))
        conn = self.pick_connection(data)
        self.counter += 1
        rid = f"r{self.counter}"

        def create(c: Any) -> Any:
            binding = pair[0] if isinstance(c, SessionCache) else pair[1]
            return c.create(
                rid,
                owner=owner,
                input=[{"role": "user", "content": rid}],
                previous_response_id=binding,
                store=store,
                connection=conn,
            )

        got = self.both("create_from_binding", create, self.info)
        if got[0] == "ok":
            self.ids.append(rid)
            self.scope[rid] = (owner, got[1].connection)

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), kind=st.sampled_from(("get", "context", "tail", "own_items")))
    def lookup(self, data: st.DataObject, kind: str) -> None:
        rid, owner, conn = self.pick_target(data)
        role = data.draw(st.sampled_from(("user", "assistant")))
        calls: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
            "get": (lambda c: c.get(rid, owner=owner, connection=conn), self.info),
            "context": (lambda c: c.context(rid, owner=owner, connection=conn), lambda x: x),
            "tail": (
                lambda c: c.view(rid, owner=owner, connection=conn).tail(from_last_role=role),
                lambda x: x,
            ),
            "own_items": (
                lambda c: c.own_items(rid, owner=owner, connection=conn),
                lambda pair: (pair[0].json(), pair[1].json()),
            ),
        }
        call, same = calls[kind]
        self.both(kind, call, same)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        rid, owner, conn = self.pick_target(data)
        connection = conn if conn is not None else 999
        self.both("evict", lambda c: c.evict(rid, owner=owner, connection=connection))

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        rid, owner, _ = self.pick_target(data)
        self.both("delete", lambda c: c.delete(rid, owner=owner))

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def recreate(self, data: st.DataObject) -> None:
        """Delete or evict a response and create another under the same id."""
        rid, owner, conn = self.pick_target(data)
        if conn is None:
            self.both("delete", lambda c: c.delete(rid, owner=owner))
        else:
            self.both("evict", lambda c: c.evict(rid, owner=owner, connection=conn))
        self.do_create("recreate", rid, owner, None, self.pick_connection(data), data)

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def bind(self, data: st.DataObject) -> None:
        rid, owner, conn = self.pick_target(data)
        got = outcome(lambda: self.rust.bind(rid, owner=owner, connection=conn))
        want = outcome(lambda: self.ref.bind(rid, owner=owner, connection=conn))
        assert (got[0], want[0]) in (("ok", "ok"), ("error", "error"))
        if got[0] == "ok":
            self.bindings.append((got[1], want[1]))
        else:
            assert got == want
        event(f"bind: {got[0]}")

    @precondition(lambda self: self.bindings)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        pair = data.draw(st.sampled_from(self.bindings))
        pair[0].release()
        pair[1].release()

    @precondition(lambda self: self.bindings)
    @rule(data=st.data())
    def binding_view(self, data: st.DataObject) -> None:
        rust, ref = data.draw(st.sampled_from(self.bindings))
        got = outcome(lambda: rust.view().json())
        want = outcome(lambda: ref.view().json())
        assert got == want

    @rule()
    def restore_own_snapshot(self) -> None:
        data = self.rust.snapshot()
        self.both("restore", lambda c: c.restore(data))

    # -- invariants

    @invariant()
    def same_stats(self) -> None:
        assert self.rust.stats().as_dict() == self.ref.stats().as_dict()

    @invariant()
    def same_snapshots(self) -> None:
        assert self.rust.snapshot() == self.ref.snapshot()


CacheMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheAgainstReference = CacheMachine.TestCase
