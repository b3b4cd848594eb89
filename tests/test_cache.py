"""The session cache's Python API: items, lookups, scopes, bindings, budget, snapshots."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

import warmsocket
from tests.support import gil_stall_fraction
from warmsocket import (
    BUILD_PROFILE,
    Binding,
    CacheError,
    CacheFull,
    ContextView,
    DuplicateResponseId,
    InvalidItems,
    ItemNotJson,
    ItemNotObject,
    Items,
    ItemTooLarge,
    OwnerMismatch,
    ResponseNotFound,
    SessionCache,
    SnapshotError,
    Tokenizer,
    WarmsocketError,
)
from warmsocket import _reference as ref
from warmsocket._core import CreateRequest, Rejection, parse_client_message

OWNER = "owner-a"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"type": "message", "role": "assistant", "content": text}


def turn(cache: SessionCache, rid: str, prev: str | None = None, **kw: object) -> None:
    cache.create(
        rid,
        owner=OWNER,
        input=[user(f"{rid} in")],
        output=[assistant(f"{rid} out")],
        previous_response_id=prev,
        **kw,  # type: ignore[arg-type]
    )


def has(cache: SessionCache, rid: str, connection: int | None = None) -> bool:
    try:
        cache.get(rid, owner=OWNER, connection=connection)
    except ResponseNotFound:
        return False
    return True


# -- module surface ---------------------------------------------------------------------


def test_exception_tree_matches_the_stub() -> None:
    assert issubclass(CacheError, WarmsocketError)
    assert issubclass(WarmsocketError, Exception)
    assert issubclass(ResponseNotFound, CacheError)
    assert issubclass(ResponseNotFound, LookupError)
    assert issubclass(OwnerMismatch, ResponseNotFound)
    assert issubclass(DuplicateResponseId, CacheError)
    assert issubclass(DuplicateResponseId, ValueError)
    assert issubclass(InvalidItems, CacheError)
    assert issubclass(InvalidItems, ValueError)
    for cls in (ItemNotJson, ItemNotObject, ItemTooLarge):
        assert issubclass(cls, InvalidItems)
    assert issubclass(CacheFull, CacheError)
    assert issubclass(CacheFull, MemoryError)
    assert issubclass(SnapshotError, CacheError)
    assert issubclass(SnapshotError, ValueError)
    assert ResponseNotFound.__module__ == "warmsocket._core"


def test_public_names() -> None:
    for name in warmsocket.__all__:
        assert hasattr(warmsocket, name), name
    assert "SessionCache" in warmsocket.__all__
    assert BUILD_PROFILE in ("release", "debug")
    assert isinstance(warmsocket.__version__, str)


def test_import_does_not_pull_in_the_server_stack() -> None:
    code = (
        "import sys, warmsocket\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('asyncio', 'websockets', 'uvloop') or m.startswith('warmsocket.server'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- items --------------------------------------------------------------------------


def test_items_are_canonical_json() -> None:
    items = Items.parse(b'[ {"b": 1, "a": {"z": [1, "\\u00e9"], "y": null}}, {"role": "user"} ]')
    assert len(items) == 2
    assert items.item_json(0) == '{"a":{"y":null,"z":[1,"é"]},"b":1}'.encode()
    assert items.json() == b"[" + items.item_json(0) + b"," + items.item_json(1) + b"]"
    assert items.nbytes == len(items.item_json(0)) + len(items.item_json(1))
    assert items.item_json(-1) == b'{"role":"user"}'
    same = Items.from_objects([{"b": 1, "a": {"y": None, "z": [1, "é"]}}, {"role": "user"}])
    assert same.json() == items.json()
    assert Items.parse(items.json().decode()).json() == items.json()
    assert items.to_objects() == json.loads(items.json())


def test_item_meta() -> None:
    items = Items.from_objects(
        [
            user("hi"),
            {"type": "function_call", "call_id": "c1", "name": "f", "id": "fc_1"},
            {"content": "neither type nor role"},
        ]
    )
    m = items.item_meta(0)
    assert (m.type, m.role, m.id, m.call_id, m.name) == ("message", "user", None, None, None)
    assert m.nbytes == len(items.item_json(0))
    f = items.item_meta(1)
    assert (f.type, f.id, f.call_id, f.name) == ("function_call", "fc_1", "c1", "f")
    assert items.item_meta(2).type == ""
    with pytest.raises(IndexError):
        items.item_meta(3)
    with pytest.raises(IndexError):
        items.item_json(-4)
    # Slices: bounds outside the items, negative ones too, are IndexError (as the
    # stub says), not OverflowError.
    assert len(items.slice(1)) == 2 and len(items.slice(0, 0)) == 0
    for start, end in ((-1, None), (0, -1), (2, 1), (0, 4)):
        with pytest.raises(IndexError):
            items.slice(start, end)


def test_concat() -> None:
    a = Items.from_objects([user("a")])
    b = Items.from_objects([user("b"), user("c")])
    c = a.concat(b)
    assert len(c) == 3
    assert c.to_objects() == [user("a"), user("b"), user("c")]
    assert c.nbytes == a.nbytes + b.nbytes


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", ItemNotJson),
        (b"[", ItemNotJson),
        (b'{"a": 1}', ItemNotJson),
        (b"\xff", ItemNotJson),
        (b'[{"a": 1}, "secret"]', ItemNotObject),
        (b"[[]]", ItemNotObject),
        (b'[{"a": "' + b"x" * 100 + b'"}]', ItemTooLarge),
    ],
)
def test_item_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        Items.parse(data, max_item_bytes=50)
    assert "secret" not in str(info.value)
    assert isinstance(info.value, InvalidItems)


def test_item_errors_name_the_index() -> None:
    with pytest.raises(ItemNotObject, match="Item 1 "):
        Items.parse(b'[{"a": 1}, 2]')
    with pytest.raises(ItemTooLarge, match="Item 2 is 11 bytes"):
        Items.parse(b'[{}, {}, {"a": 12345}]', max_item_bytes=10)


def test_a_dict_changed_while_it_is_read_is_no_panic() -> None:
    """A value's conversion can run Python code (a Mapping's `items`) that changes the
    dict being read: PyO3's dict iterator panicked (PanicException, a BaseException,
    across the boundary); the dict is read from a list of its pairs."""

    outer: dict[str, object] = {"role": "user"}

    class Growing(Mapping[str, int]):
        def __getitem__(self, key: str) -> int:
            return 1

        def __iter__(self) -> Iterator[str]:
            return iter(["a"])

        def __len__(self) -> int:
            return 1

        def items(self) -> Any:
            outer["added"] = 1  # the dict being read grows
            return [("a", 1)]

    outer["content"] = Growing()
    items = Items.from_objects([outer])  # what it held when its pairs were listed
    assert items.to_objects() == [{"role": "user", "content": {"a": 1}}]


def test_from_objects_errors() -> None:
    with pytest.raises(ItemNotObject):
        Items.from_objects(["not a dict"])  # type: ignore[list-item]
    with pytest.raises(ItemNotJson, match=r"Item 0 .*'set'"):
        Items.from_objects([{"a": {1, 2}}])
    with pytest.raises(ItemNotJson, match="keys must be strings"):
        Items.from_objects([{1: "x"}])  # type: ignore[dict-item]
    with pytest.raises(ItemNotJson, match="not finite"):
        Items.from_objects([{"a": float("nan")}])
    with pytest.raises(ItemNotJson, match="64 bits"):
        Items.from_objects([{"a": 2**70}])
    with pytest.raises(TypeError):
        Items.from_objects({"role": "user"})  # type: ignore[arg-type]
    cache = SessionCache()
    for buffer in (bytearray(b'[{"a": 1}]'), memoryview(b'[{"a": 1}]')):
        # (Its bytes, iterated, read as numbers: "Item 0 is a JSON number".)
        with pytest.raises(TypeError, match=r"bytes\(buffer\)"):
            cache.create("r", owner=OWNER, input=buffer)  # type: ignore[arg-type]
    deep: dict[str, object] = {}
    cursor = deep
    for _ in range(200):
        cursor["a"] = {}
        cursor = cursor["a"]  # type: ignore[assignment]
    with pytest.raises(ItemNotJson, match="deeper"):
        Items.from_objects([deep])


# -- the item depth limit ---------------------------------------------------------------

MAX_ITEM_DEPTH = 100  # `MAX_DEPTH` in rust/item.rs
TOO_DEEP = f"nested deeper than {MAX_ITEM_DEPTH} levels"


def nested_item(levels: int) -> dict[str, object]:
    """A reasoning item `levels` levels deep (the item is level 1, innermost an empty list)."""
    value: object = []
    for _ in range(levels - 2):
        value = [value]
    return {"id": f"rs_{levels}", "type": "reasoning", "x": value}


def survives_every_re_parse(item: dict[str, object], request: CreateRequest) -> None:
    """Store, snapshot, restore, to_objects, Items.parse(items.json()) all keep `item`."""
    as_text = json.dumps([item]).encode()
    assert request.input.to_objects() == [item]
    cache = SessionCache()
    cache.create("r1", owner=OWNER, input=request.input, output=[assistant("out")])
    cache.create("r2", owner=OWNER, input=[item], previous_response_id="r1")
    cache.create("r3", owner=OWNER, input=as_text, previous_response_id="r2")
    restored = SessionCache()
    assert restored.restore(cache.snapshot()) == 3
    for c in (cache, restored):
        assert c.context_objects("r3", owner=OWNER) == [item, assistant("out"), item, item]
        inp, out = c.own_items("r1", owner=OWNER)
        assert (inp.to_objects(), out.to_objects()) == ([item], [assistant("out")])
        assert c.input_items("r3", owner=OWNER).to_objects() == [item]
        # What the shared store does to reload items, and a chain's whole context.
        assert Items.parse(inp.json()).json() == inp.json()
        context = c.context("r3", owner=OWNER)
        assert Items.parse(context).json() == context
    assert restored.context("r3", owner=OWNER) == cache.context("r3", owner=OWNER)
    assert ref.RefItems.parse(as_text).json() == request.input.json()


def is_refused_everywhere(item: dict[str, object], rejection: Rejection) -> None:
    """The request parser and every other way in refuse `item`, saying why (no content)."""
    assert (rejection.status, rejection.code, rejection.param, rejection.stage) == (
        400,
        "invalid_value",
        "input",
        "create",
    )
    assert rejection.message == f"Invalid 'input': Item 0 is not valid JSON: {TOO_DEEP}."
    as_text = json.dumps([item]).encode()
    for build in (
        lambda: Items.from_objects([item]),
        lambda: Items.parse(as_text),
        lambda: SessionCache().create("r", owner=OWNER, input=[item]),
        lambda: SessionCache().create("r", owner=OWNER, input=as_text),
        lambda: ref.RefItems.from_objects([item]),
        lambda: ref.RefItems.parse(as_text),
    ):
        # Text deeper than serde_json reads fails before items are told apart.
        where = "(Item 0 is not valid JSON|Items are not a JSON array of objects)"
        with pytest.raises(ItemNotJson, match=rf"^{where}: {TOO_DEEP}\.$"):
            build()


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@pytest.mark.parametrize(
    "levels", [MAX_ITEM_DEPTH - 1, MAX_ITEM_DEPTH, MAX_ITEM_DEPTH + 1, 127, 128, 129]
)
def test_item_depth_limit_is_one_rule_from_request_to_restore(levels: int, fmt: str) -> None:
    # serde_json re-parses stored items and stops at 128 levels: whatever the request
    # parser accepts must survive that, wrapped in an array too; the rest is a 400.
    item = nested_item(levels)
    body = {"type": "response.create", "model": "m", "input": [item]}
    data = json.dumps(body).encode() if fmt == "json" else msgpack.packb(body)
    parsed = parse_client_message(data, format=fmt)  # type: ignore[arg-type]
    if isinstance(parsed, CreateRequest):
        survives_every_re_parse(item, parsed)
        assert levels <= MAX_ITEM_DEPTH
    else:
        assert isinstance(parsed, Rejection)
        is_refused_everywhere(item, parsed)
        assert levels > MAX_ITEM_DEPTH


def test_a_snapshot_with_too_deep_items_is_refused_without_crashing() -> None:
    cache = SessionCache()
    cache.create("r", owner=OWNER, input=[nested_item(MAX_ITEM_DEPTH)])
    doc = msgpack.unpackb(cache.snapshot())
    target = SessionCache()
    hostile = '{"type":"reasoning","x":' + "[" * 200_000 + "]" * 200_000 + "}"
    for text, detail in (
        (json.dumps(nested_item(MAX_ITEM_DEPTH + 1)), TOO_DEEP),
        (hostile, TOO_DEEP),  # far deeper than serde_json reads: no stack overflow
    ):
        doc["nodes"][0]["items"][0] = text
        with pytest.raises(SnapshotError, match=f"node 0: .*{detail}"):
            target.restore(msgpack.packb(doc, use_bin_type=True))
        assert target.stats().entries == 0


# -- create, get, views ------------------------------------------------------------


def test_create_and_get() -> None:
    cache = SessionCache()
    info = cache.create(
        "r1",
        owner=OWNER,
        input=b'[{"role":"user","content":"hi"}]',
        output=[assistant("hello")],
        settings=b'{"model":"m"}',
        meta=b'{"k":1}',
    )
    assert info.id == "r1"
    assert info.previous_response_id is None
    assert (info.owner, info.store, info.connection) == (OWNER, True, None)
    assert (info.depth, info.items, info.input_items, info.output_items) == (1, 2, 1, 1)
    assert info.settings == b'{"model":"m"}'
    assert info.meta == b'{"k":1}'
    assert info.tokens == 0
    ctx = cache.context("r1", owner=OWNER)
    assert info.bytes == len(ctx)
    assert json.loads(ctx) == [user("hi"), assistant("hello")]
    child = cache.create(
        "r2", owner=OWNER, input=Items.from_objects([user("more")]), previous_response_id="r1"
    )
    assert (child.depth, child.items, child.previous_response_id) == (2, 3, "r1")
    assert cache.get("r2", owner=OWNER).items == 3
    assert cache.context_objects("r2", owner=OWNER) == [
        user("hi"),
        assistant("hello"),
        user("more"),
    ]
    inp, out = cache.own_items("r2", owner=OWNER)
    assert (len(inp), len(out)) == (1, 0)
    assert inp.to_objects() == [user("more")]


def test_views() -> None:
    cache = SessionCache()
    turn(cache, "a")
    turn(cache, "b", "a")
    extra = Items.from_objects([user("new")])
    view = cache.view("b", owner=OWNER, extra=extra)
    assert isinstance(view, ContextView)
    data = view.json()
    assert view.nbytes == len(data)
    assert view.items == 5
    assert view.tokens == 0
    assert json.loads(data)[-1] == user("new")
    assert view.objects() == json.loads(data)
    assert json.loads(view.tail(from_last_role="user")) == [user("new")]
    assert json.loads(view.tail(from_last_role="assistant")) == [assistant("b out"), user("new")]
    assert view.tail(from_last_role="tool") == data
    assert view.json_from(5) == b""
    for past in (6, -1):
        with pytest.raises(ValueError):
            view.json_from(past)
    assert cache.view(None, owner=OWNER, extra=extra).json() == extra.json()
    assert cache.view(None, owner=OWNER).json() == b"[]"
    # A view is frozen: later changes to the cache do not affect it.
    assert cache.delete("b", owner=OWNER)
    assert cache.delete("a", owner=OWNER)
    assert view.json() == data


def test_info_does_not_hold_the_chain() -> None:
    cache = SessionCache()
    info = cache.create("a", owner=OWNER, input=[user("x" * 10_000)])
    assert cache.delete("a", owner=OWNER)
    assert cache.stats().bytes == 0
    assert info.items == 1


# -- errors leave the cache unchanged -------------------------------------------------


def test_errors_and_unchanged_state() -> None:
    cache = SessionCache(memory_budget=100_000, max_item_bytes=1000)
    turn(cache, "a")
    before = cache.stats().as_dict()

    def same(**changed: int) -> None:
        expected = dict(before, **changed)
        assert cache.stats().as_dict() == expected

    with pytest.raises(DuplicateResponseId):
        turn(cache, "a")
    same()
    with pytest.raises(ItemTooLarge):
        cache.create("b", owner=OWNER, input=[user("x" * 2000)], previous_response_id="a")
    same()
    with pytest.raises(ItemNotJson):
        cache.create("b", owner=OWNER, input=b"nope")
    with pytest.raises(ItemTooLarge):
        cache.create("b", owner=OWNER, input=Items.from_objects([user("x" * 2000)]))
    same()
    with pytest.raises(CacheFull) as full:
        cache.create("b", owner=OWNER, input=[user("x" * 900)] * 200)
    assert isinstance(full.value, MemoryError)
    same()
    with pytest.raises(ValueError, match="requires a connection"):
        cache.create("b", owner=OWNER, store=False)
    with pytest.raises(ValueError, match="not open"):
        cache.create("b", owner=OWNER, store=False, connection=12345)
    same()
    with pytest.raises(TypeError):
        cache.create("b", owner=OWNER, previous_response_id=5)  # type: ignore[arg-type]
    same()
    with pytest.raises(ResponseNotFound) as nf:
        cache.create("b", owner=OWNER, previous_response_id="missing")
    assert isinstance(nf.value, LookupError)
    assert str(nf.value) == "Response with id 'missing' not found."
    same(misses=1)
    with pytest.raises(OwnerMismatch) as om:
        cache.create("b", owner="someone else", previous_response_id="a")
    assert str(om.value) == "Response with id 'a' not found."
    same(misses=2)
    assert not has(cache, "b")


def test_owner_mismatch_everywhere() -> None:
    cache = SessionCache()
    turn(cache, "a")
    for call in (
        lambda: cache.get("a", owner="x"),
        lambda: cache.bind("a", owner="x"),
        lambda: cache.view("a", owner="x"),
        lambda: cache.context("a", owner="x"),
        lambda: cache.context_objects("a", owner="x"),
        lambda: cache.own_items("a", owner="x"),
    ):
        with pytest.raises(OwnerMismatch):
            call()
    assert not cache.delete("a", owner="x")
    assert has(cache, "a")


# -- scopes and connections ----------------------------------------------------------


def test_scopes_and_the_taint_rule() -> None:
    cache = SessionCache()
    c1 = cache.open_connection()
    c2 = cache.open_connection()
    turn(cache, "stored")
    cache.create(
        "local",
        owner=OWNER,
        input=[user("l")],
        previous_response_id="stored",
        store=False,
        connection=c1,
    )
    info = cache.create("tainted", owner=OWNER, previous_response_id="local", connection=c1)
    assert info.store is True
    assert info.connection == c1
    assert cache.get("local", owner=OWNER, connection=c1).connection == c1
    # Stored entries: any connection of the owner; local entries: only their own.
    assert has(cache, "stored") and has(cache, "stored", c2)
    assert not has(cache, "local") and not has(cache, "local", c2)
    assert not has(cache, "tainted") and has(cache, "tainted", c1)
    # Another owner on another connection cannot tell the entry exists.
    with pytest.raises(ResponseNotFound) as e:
        cache.get("local", owner="x", connection=c2)
    assert type(e.value) is ResponseNotFound
    s = cache.stats()
    assert (s.entries, s.stored_entries, s.local_entries, s.connections) == (3, 1, 2, 2)
    bytes_before = s.bytes
    assert cache.close_connection(c1) == 2
    s = cache.stats()
    assert (s.entries, s.local_entries, s.connections) == (1, 0, 1)
    assert s.bytes < bytes_before
    assert cache.close_connection(c1) == 0
    assert cache.close_connection(999) == 0
    with pytest.raises(ValueError):
        cache.create("again", owner=OWNER, store=False, connection=c1)


def test_evict_and_delete() -> None:
    cache = SessionCache()
    conn = cache.open_connection()
    turn(cache, "a")
    turn(cache, "b", "a")
    turn(cache, "l", "b", store=False, connection=conn)
    ctx = cache.context("l", owner=OWNER, connection=conn)
    assert not cache.evict("a", owner=OWNER, connection=conn), "stored entries stay loadable"
    assert not cache.evict("l", owner="x", connection=conn)
    assert not cache.evict("l", owner=OWNER, connection=conn + 1)
    assert not cache.delete("l", owner=OWNER)
    assert cache.delete("b", owner=OWNER)
    assert not cache.delete("b", owner=OWNER)
    assert not has(cache, "b")
    assert cache.context("l", owner=OWNER, connection=conn) == ctx, "descendants keep their context"
    assert cache.evict("l", owner=OWNER, connection=conn)
    assert cache.stats().evictions == 0


# -- bindings ---------------------------------------------------------------------------


def test_bindings() -> None:
    cache = SessionCache()
    turn(cache, "a")
    turn(cache, "b", "a")
    ctx = cache.context("b", owner=OWNER)
    with cache.bind("b", owner=OWNER) as binding:
        assert isinstance(binding, Binding)
        assert binding.response_id == "b"
        assert cache.stats().pinned == 1
        assert binding.info().depth == 2
        assert cache.delete("b", owner=OWNER)
        assert cache.delete("a", owner=OWNER)
        assert cache.stats().entries == 0
        assert binding.view().json() == ctx
        extra = Items.from_objects([user("next")])
        assert json.loads(binding.view(extra).json())[-1] == user("next")
        info = cache.create("c", owner=OWNER, input=extra, previous_response_id=binding)
        assert (info.depth, info.previous_response_id) == (3, "b")
    assert cache.stats().pinned == 0
    with pytest.raises(ResponseNotFound):
        binding.info()
    with pytest.raises(ResponseNotFound):
        cache.create("d", owner=OWNER, previous_response_id=binding)
    binding.release()  # idempotent


def test_a_binding_of_another_cache_is_refused() -> None:
    """It used to be taken: the child was another cache's memory (kept past that
    cache's `close_connection`, metered there), and a match over it could panic when
    the two caches tokenise differently."""
    first, second = SessionCache(), SessionCache()
    turn(first, "a")
    with first.bind("a", owner=OWNER) as binding:
        with pytest.raises(ValueError, match="another SessionCache"):
            second.create("b", owner=OWNER, input=[user("x")], previous_response_id=binding)
        assert second.stats().entries == 0
        first.create("b", owner=OWNER, input=[user("x")], previous_response_id=binding)


def test_binding_released_when_collected() -> None:
    cache = SessionCache()
    turn(cache, "a")
    binding = cache.bind("a", owner=OWNER)
    assert cache.stats().pinned == 1
    del binding
    gc.collect()
    assert cache.stats().pinned == 0


def test_old_binding_does_not_unpin_a_recreated_entry() -> None:
    cache = SessionCache()
    turn(cache, "a")
    old = cache.bind("a", owner=OWNER)
    assert cache.delete("a", owner=OWNER)
    turn(cache, "a")
    new = cache.bind("a", owner=OWNER)
    old.release()
    assert cache.stats().pinned == 1
    new.release()
    assert cache.stats().pinned == 0


def test_close_invalidates_bindings_and_frees_local_content() -> None:
    cache = SessionCache()
    conn = cache.open_connection()
    cache.create("l", owner=OWNER, input=[user("x" * 50_000)], store=False, connection=conn)
    binding = cache.bind("l", owner=OWNER, connection=conn)
    assert cache.stats().pinned == 1
    assert cache.close_connection(conn) == 1
    assert cache.stats().bytes == 0
    assert cache.stats().pinned == 0
    with pytest.raises(ResponseNotFound):
        binding.view()


def test_binding_parent_follows_visibility() -> None:
    cache = SessionCache()
    conn = cache.open_connection()
    turn(cache, "l", store=False, connection=conn)
    binding = cache.bind("l", owner=OWNER, connection=conn)
    with pytest.raises(ResponseNotFound):
        cache.create("x", owner=OWNER, previous_response_id=binding)
    with pytest.raises(OwnerMismatch):
        cache.create("x", owner="y", previous_response_id=binding, connection=conn)
    assert (
        cache.create("x", owner=OWNER, previous_response_id=binding, connection=conn).connection
        == conn
    )


# -- the budget -------------------------------------------------------------------------


def entry_bytes() -> int:
    probe = SessionCache()
    turn(probe, "a0")
    return probe.stats().bytes


def test_budget_evicts_lru_chains_whole() -> None:
    unit = entry_bytes()
    cache = SessionCache(memory_budget=unit * 5 + unit // 2)
    turn(cache, "a0")
    turn(cache, "a1", "a0")
    turn(cache, "b0")
    turn(cache, "b1", "b0")
    cache.get("a1", owner=OWNER)
    turn(cache, "c0")
    turn(cache, "c1", "c0")
    s = cache.stats()
    assert s.evictions == 2
    assert s.bytes <= s.memory_budget
    assert not has(cache, "b1") and not has(cache, "b0")
    assert has(cache, "a0") and has(cache, "a1")


def test_pinned_chains_are_kept_even_over_budget() -> None:
    unit = entry_bytes()
    cache = SessionCache(memory_budget=unit * 2 + unit // 2)
    turn(cache, "a0")
    turn(cache, "a1", "a0")
    with cache.bind("a1", owner=OWNER):
        # Nothing can go: a1 is pinned, a0 has a live child, b0 is b1's parent.
        turn(cache, "b0")
        turn(cache, "b1", "b0")
        s = cache.stats()
        assert (s.entries, s.evictions) == (4, 0)
        assert s.bytes > s.memory_budget
        # The unpinned chain goes as a whole; the pinned one stays.
        turn(cache, "c0")
        assert not has(cache, "b1") and not has(cache, "b0")
        assert has(cache, "a0") and has(cache, "a1")
    turn(cache, "d0")
    assert not has(cache, "a1") and not has(cache, "a0")
    # has() touches what it finds, so c0 was the oldest leaf and went first.
    assert cache.stats().entries == 1
    assert cache.stats().evictions == 5


# -- snapshots --------------------------------------------------------------------------


def test_snapshot_round_trip() -> None:
    cache = SessionCache()
    conn = cache.open_connection()
    turn(cache, "a", settings=b'{"model":"m"}')
    turn(cache, "b", "a", settings=b'{"model":"m"}')
    turn(cache, "c", "b", settings=b'{"model":"other"}')
    turn(cache, "secret", "c", store=False, connection=conn)
    assert cache.delete("b", owner=OWNER)
    data = cache.snapshot()
    assert b"secret" not in data
    other = SessionCache()
    assert other.restore(data) == 2
    for rid in ("a", "c"):
        assert other.context(rid, owner=OWNER) == cache.context(rid, owner=OWNER)
        mine, theirs = cache.get(rid, owner=OWNER), other.get(rid, owner=OWNER)
        assert (mine.settings, mine.meta, mine.depth) == (
            theirs.settings,
            theirs.meta,
            theirs.depth,
        )
    assert not has(other, "b")
    assert other.restore(data) == 0


def test_bad_snapshots_raise_and_change_nothing() -> None:
    cache = SessionCache()
    turn(cache, "a")
    good = cache.snapshot()
    target = SessionCache()
    turn(target, "z")
    before = target.stats().as_dict()
    for bad in (
        b"",
        b"junk",
        good[: len(good) // 2],
        good.replace(b"warmsocket-cache", b"warmsocket-cachX"),
    ):
        with pytest.raises(SnapshotError):
            target.restore(bad)
        assert target.stats().as_dict() == before


# -- stats ------------------------------------------------------------------------------


def test_stats() -> None:
    cache = SessionCache(memory_budget=10**9)
    conn = cache.open_connection()
    turn(cache, "a")
    turn(cache, "l", store=False, connection=conn)
    cache.get("a", owner=OWNER)
    with pytest.raises(ResponseNotFound):
        cache.get("nope", owner=OWNER)
    s = cache.stats()
    d = s.as_dict()
    assert d == {
        "entries": 2,
        "stored_entries": 1,
        "local_entries": 1,
        "bytes": s.bytes,
        "memory_budget": 10**9,
        "hits": 1,
        "misses": 1,
        "evictions": 0,
        "connections": 1,
        "pinned": 0,
    }
    assert s.bytes > 0
    assert cache.memory_budget == 10**9
    assert cache.max_item_bytes == 33554432
    assert "entries=2" in repr(s)


# -- the GIL ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_json_releases_the_gil() -> None:
    cache = SessionCache()
    chunk = Items.from_objects([{"role": "user", "content": "x" * 1_000_000}])
    prev = None
    for i in range(48):
        cache.create(f"r{i}", owner=OWNER, input=chunk, previous_response_id=prev)
        prev = f"r{i}"
    view = cache.view(prev, owner=OWNER)
    assert view.nbytes > 48_000_000
    # The measurement can tell: a C call that holds the GIL stalls the other thread...
    text = "a" * 20_000_000
    assert gil_stall_fraction(lambda: text.encode("utf-16")) > 0.5
    # ...while materialising a context lets it run.
    assert gil_stall_fraction(view.json) < 0.3


@pytest.mark.timeout(60)
def test_tokenising_a_large_extra_or_match_input_releases_the_gil() -> None:
    """`view(extra=...)` tokenises the extra items, and `match` with decoded values (one
    item may be megabytes) tokenises what did not match: both grow with their input, so
    neither may hold the GIL (they did: about 6 ms per MB held)."""
    cache = SessionCache(tokenizer=Tokenizer.builtin("o200k_base"))
    words = " ".join(f"word{n}" for n in range(600_000))  # about 5 MB
    big = [{"role": "user", "content": words}]
    extra = Items.from_objects(big)
    assert gil_stall_fraction(lambda: cache.view(None, owner=OWNER, extra=extra)) < 0.3
    cache.create("r0", owner=OWNER, input=[{"role": "user", "content": "hi"}])
    binding = cache.bind("r0", owner=OWNER)
    assert gil_stall_fraction(lambda: binding.view(extra)) < 0.3
    binding.release()
    text = json.dumps(big)
    assert gil_stall_fraction(lambda: cache.match(text, owner=OWNER)) < 0.3


FLOATS = [
    "123456789.123456789", "123456789.12345679", "2.5e-308", "0.1", "1e23",
    "9007199254740993.0", "1.7976931348623157e308", "4.9e-324", "2.2250738585072014e-308",
    "0.30000000000000004", "1e-7", "8.98846567431158e307",
]  # fmt: skip


def test_numbers_in_items_keep_their_exact_value() -> None:
    """Every number in an item is stored as the double it denotes, whichever way the
    item comes in (JSON text, client message, Python objects)."""
    raw = "[" + ",".join(FLOATS) + "]"
    expected = json.loads(raw)
    item = '{"type":"reasoning","summary":[],"zz":' + raw + "}"
    text = "[" + item + "]"
    via_text = Items.parse(text.encode()).to_objects()[0]["zz"]
    via_objects = Items.from_objects([{"type": "reasoning", "summary": [], "zz": expected}])
    message = ('{"type":"response.create","model":"m","input":[' + item + "]}").encode()
    request = parse_client_message(message)
    assert isinstance(request, CreateRequest)
    for got in (via_text, via_objects.to_objects()[0]["zz"], request.input.to_objects()[0]["zz"]):
        assert got == expected
        assert [float(x).hex() for x in got] == [float(x).hex() for x in expected]
