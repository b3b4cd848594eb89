"""Token caching and prefix matching: the Rust cache against the reference, and the
semantic digest against its Python restatement.

The machine is the cache machine of `test_cache_properties` with a tokenizer and the
prefix index switched on, plus rules that re-send histories the way clients do
(replayed output items with ids, statuses and empty annotations dropped or added,
content as a string or a lone text part, keys reordered, truncated, edited, extended)
and continue them through the match. Stats (bytes include the token and index costs)
and snapshots must stay identical, and every match, token count and block hash must
agree.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule

from tests.test_cache_properties import CacheMachine, item, items, outcome
from warmsocket import Items, SessionCache, Tokenizer
from warmsocket._reference import RefCache, semantic_digest

TOKENIZER = Tokenizer.builtin("o200k_base")


def token_info(info: Any) -> tuple[Any, ...]:
    return (
        info.id,
        info.previous_response_id,
        info.parent_id,
        info.owner,
        info.store,
        info.connection,
        info.depth,
        info.items,
        info.bytes,
        info.tokens,
        info.input_items,
        info.output_items,
        info.settings,
        info.meta,
    )


def replayed(value: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """An item as a client might re-send it: the same meaning, other bytes."""
    out = dict(value)
    flip = lambda: data.draw(st.booleans())  # noqa: E731
    if "id" in out and flip():
        del out["id"]
    if flip():
        out["status"] = "completed"
    if flip():
        out["note"] = None
    content = out.get("content")
    kind = "output_text" if out.get("role") == "assistant" else "input_text"
    if isinstance(content, str) and flip():
        out["content"] = [{"type": kind, "text": content, "annotations": []}]
    elif (
        isinstance(content, list)
        and len(content) == 1
        and isinstance(content[0], dict)
        and isinstance(content[0].get("text"), str)
        and flip()
    ):
        out["content"] = content[0]["text"]
    if flip():
        out = dict(reversed(list(out.items())))
    return out


def edited(value: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """The same item with its meaning changed."""
    out = dict(value)
    choice = data.draw(st.integers(0, 2))
    if choice == 0 and isinstance(out.get("content"), str):
        out["content"] += "!"
    elif choice == 1:
        out["role"] = "developer" if out.get("role") != "developer" else "user"
    else:
        out["edited"] = True
    return out


class PrefixMachine(CacheMachine):
    info = staticmethod(token_info)

    @initialize(
        budget=st.sampled_from((3000, 6000, 1 << 30)),
        block_size=st.sampled_from((1, 4, 16)),
        keep=st.booleans(),
    )
    def make(self, budget: int, block_size: int, keep: bool) -> None:  # type: ignore[override]
        options: dict[str, Any] = {
            "max_item_bytes": 4000,
            "tokenizer": TOKENIZER,
            "block_size": block_size,
            "keep_token_ids": keep,
            "prefix_index": True,
        }
        self.rust = SessionCache(budget, **options)
        self.ref = RefCache(budget, **options)
        self.open_connection()

    def history(self, data: st.DataObject) -> tuple[list[dict[str, Any]], str, int | None]:
        """A history a client would send: a cached context, re-sent with noise,
        maybe truncated, edited or extended."""
        rid, owner, conn = self.pick_target(data)
        got = self.both("context", lambda c: c.context_objects(rid, owner=owner, connection=conn))
        context: list[dict[str, Any]] = got[1] if got[0] == "ok" else []
        sent = [replayed(v, data) if data.draw(st.booleans()) else v for v in context]
        if sent and data.draw(st.integers(0, 3)) == 0:
            sent = sent[: data.draw(st.integers(0, len(sent)))]
        if sent and data.draw(st.integers(0, 3)) == 0:
            i = data.draw(st.integers(0, len(sent) - 1))
            sent[i] = edited(sent[i], data)
        sent += data.draw(st.lists(item, max_size=2))
        return sent, owner, conn

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), store=st.booleans(), keep_binding=st.booleans())
    def resend(self, data: st.DataObject, store: bool, keep_binding: bool) -> None:
        sent, owner, conn = self.history(data)
        payload: Any = json.dumps(sent).encode() if data.draw(st.booleans()) else sent
        got = outcome(lambda: self.rust.match(payload, owner=owner, connection=conn))
        want = outcome(lambda: self.ref.match(payload, owner=owner, connection=conn))
        assert got[0] == want[0], (got, want)
        if got[0] == "error":
            assert got == want
            return
        m, r = got[1], want[1]
        assert (m.items, m.tokens, m.sent, m.parent_id) == (r.items, r.tokens, r.sent, r.parent_id)
        assert m.new_items.json() == r.new_items.json()
        assert m.new_items.tokens == r.new_items.tokens
        assert (m.binding is None) == (r.binding is None)
        amount = "none" if not m.items else "all" if m.items == m.sent else "some"
        event(f"resend: matched {amount}")
        if m.parent_id and "#" in m.parent_id:
            event("resend: ends inside a node")
        if m.binding is not None:
            assert m.binding.implicit
            assert m.binding.view().json() == r.binding.view().json()
            self.bindings.append((m.binding, r.binding))
        # Continue the chain through the match, as the engine does.
        self.counter += 1
        rid = f"r{self.counter}"
        reply = [{"role": "assistant", "content": f"reply {rid}"}]

        def create(c: Any) -> Any:
            found = m if isinstance(c, SessionCache) else r
            return c.create(
                rid,
                owner=owner,
                input=found.new_items,
                output=reply,
                previous_response_id=found.binding,
                store=store,
                connection=conn,
            )

        created = self.both("create_from_match", create, self.info)
        if created[0] == "ok":
            self.ids.append(rid)
            self.scope[rid] = (owner, created[1].connection)
            assert created[1].previous_response_id is None
            got_input = outcome(
                lambda: self.rust.input_items(rid, owner=owner, connection=conn).json()
            )
            assert got_input == outcome(
                lambda: self.ref.input_items(rid, owner=owner, connection=conn).json()
            )
        if m.binding is not None and not keep_binding:
            m.binding.release()
            r.binding.release()

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def tokens_and_hashes(self, data: st.DataObject) -> None:
        rid, owner, conn = self.pick_target(data)
        other, owner2, conn2 = self.pick_target(data)
        extra = data.draw(st.one_of(st.none(), items))

        def view(c: Any) -> Any:
            new = None if extra is None else c.items(extra)
            a = c.view(rid, owner=owner, connection=conn, extra=new)
            ids = a.token_ids()
            return (a.tokens, None if ids is None else list(ids), a.block_hashes())

        got = self.both("tokens", view)
        if got[0] == "ok":
            assert got[1][0] == len(got[1][1])

        def shared(c: Any) -> Any:
            a = c.view(rid, owner=owner, connection=conn)
            return a.shared_prefix_tokens(c.view(other, owner=owner2, connection=conn2))

        self.both("shared_prefix", shared)


PrefixMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPrefixAgainstReference = PrefixMachine.TestCase


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(("a", "b", "text", "type", "id")), children, max_size=3)
    ),
    max_leaves=8,
)
part = st.one_of(
    st.text(max_size=6),
    st.fixed_dictionaries(
        {"type": st.sampled_from(("input_text", "output_text", "refusal")), "text": st.text()},
        optional={
            "annotations": st.sampled_from(([], None, [{"type": "x"}])),
            "logprobs": st.sampled_from(([], None, [1])),
            "extra": json_value,
        },
    ),
    st.dictionaries(st.sampled_from(("type", "image_url", "file_id")), json_value, max_size=3),
)
any_item = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(("message", "function_call_output", "reasoning", None, 1)),
        "role": st.sampled_from(("user", "assistant", None, 2)),
        "id": st.text(max_size=4),
        "status": st.sampled_from(("completed", None)),
        "content": st.one_of(st.text(max_size=6), st.lists(part, max_size=3), json_value),
        "output": st.one_of(st.text(max_size=6), st.lists(part, max_size=3)),
        "call_id": st.text(max_size=4),
        "x": json_value,
    },
)


@settings(max_examples=500, deadline=None)
@given(a=any_item, b=any_item)
def test_semantic_digest_matches_the_reference(a: dict[str, Any], b: dict[str, Any]) -> None:
    items_ = Items.from_objects([a, b])
    da, db = items_.item_meta(0).digest, items_.item_meta(1).digest
    assert da == semantic_digest(a)
    assert db == semantic_digest(b)
    # Key order never matters.
    reordered = Items.from_objects([dict(reversed(list(a.items())))])
    assert reordered.item_meta(0).digest == da
    event("equal digests" if da == db else "different digests")
