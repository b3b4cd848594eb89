"""A slow, obviously-correct pure-Python session cache: the oracle for the Rust one.

Same method names and the same rules as `warmsocket._core.SessionCache`, written the
direct way: a response's scope is found by walking up its chain, its context by
concatenating the chain, the live children of an entry and the live bytes of the
cache by scanning everything. Hypothesis drives this and the Rust cache with the same
operations and compares them (`tests/test_cache_properties.py`); the benchmarks use
it as their baseline.

The rules, in one place:

* A response is a node: its own input and output items, `settings`, `meta`, and
  its parent. Its context is the concatenation of the own items from the root.
* Scope: a node is local to connection `c` when it was created with `store=False`
  on `c`, or when its parent is local to `c`; otherwise it is stored. Local entries
  are visible only to lookups passing `connection=c`; stored ones to any lookup of
  their owner. A visible entry of another owner raises `OwnerMismatch`.
* Bytes: each node costs `NODE_OVERHEAD + len(id) + len(settings) (unless equal to
  the parent's) + len(meta) + sum(ITEM_OVERHEAD + len(item))`; the cache's bytes are
  the costs of every node still reachable from an entry or a binding.
* Budget: before inserting, while the bytes exceed the budget, evict the least
  recently used candidate (an entry with no pins and no live children, other than
  the new entry's nearest indexed ancestor); after each eviction, evict the nearest
  indexed ancestor too if that made it a candidate (the cascade).
* Tokens (with a tokenizer): an item's tokens are its rendering's framed tokens
  (`_reference_tokens`); a context's tokens are its items' concatenated, and its
  block hashes are computed from scratch over them. A node additionally costs 16
  bytes per block its own tokens completed, 4 bytes per token of its two tails (the
  tokens after the last full block, after its input and after its output), and 4
  bytes per own token when token ids are kept.
* Prefix matching (with `prefix_index`, which costs 96 bytes per item): the match
  of a sent history is the longest prefix, compared by semantic digest
  (`semantic_digest`), of the context of any live node of the owner visible from
  the connection (stored, or local to it) that covers at least one of that node's
  own items. Among the nodes that give it, one whose own items end exactly there
  wins, then the most recently made. When the prefix ends inside a node, a node
  holding that node's first items (id `<id>#<n>`, its settings and meta) is made
  under its parent. A response created on a match has no `previous_response_id`.

Canonical JSON here is `json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=False)`, which agrees with the Rust form on strings, integers, booleans,
null and nesting; floats may print differently (`1e+16` here, `1e16` in Rust), so
the property tests do not use them.
"""

from __future__ import annotations

import builtins
import itertools
import json
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]
import xxhash

from warmsocket import _reference_tokens as ref_tokens
from warmsocket._core import (
    CacheFull,
    DuplicateResponseId,
    ItemNotJson,
    ItemNotObject,
    ItemTooLarge,
    OwnerMismatch,
    ResponseNotFound,
    SnapshotError,
    Tokenizer,
)

# Must match rust/node.rs (the property tests compare `stats().bytes`).
NODE_OVERHEAD = 320
ITEM_OVERHEAD = 160
INDEX_OVERHEAD = 96
TOKEN_ID_BYTES = 4
HASH_BYTES = 8
DEFAULT_BUDGET = 1 << 30
DEFAULT_MAX_ITEM_BYTES = 1 << 25
SNAPSHOT_FORMAT = "warmsocket-cache"
SNAPSHOT_VERSION = 1
# Deepest nesting of an item, the item itself being level 1 (`MAX_DEPTH` in
# rust/item.rs: low enough that serde_json re-parses every stored item, wrapped too).
MAX_DEPTH = 100


def _not_found(response_id: str) -> str:
    shown = response_id if len(response_id) <= 128 else response_id[:128] + "..."
    return f"Response with id '{shown}' not found."


# -- items ---------------------------------------------------------------------------


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _too_deep(where: int) -> ItemNotJson:
    return ItemNotJson(f"Item {where} is not valid JSON: nested deeper than {MAX_DEPTH} levels.")


def _depth(value: Any) -> int:
    """Levels of `value` (1 for a scalar or an empty container), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _check_json(value: Any, where: int, depth: int = 1) -> Any:
    """Return `value` as plain JSON data, or raise ItemNotJson."""
    if depth > MAX_DEPTH:
        raise _too_deep(where)
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise ItemNotJson(
                f"Item {where} is not valid JSON: an integer does not fit in 64 bits."
            )
        return int(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ItemNotJson(f"Item {where} is not valid JSON: a float is not finite.")
        return value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ItemNotJson(f"Item {where} is not valid JSON: object keys must be strings.")
        return {k: _check_json(v, where, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_check_json(v, where, depth + 1) for v in value]
    raise ItemNotJson(f"Item {where} is not valid JSON: a {type(value).__name__} is not JSON.")


_TEXT_PARTS = ("input_text", "output_text")


def _plain_text(part: Any) -> str | None:
    """The text a content part means exactly, or None."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return None
    if part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
        return None
    for key, value in part.items():
        if key in ("type", "text") or value is None:
            continue
        if key in ("annotations", "logprobs") and value == []:
            continue
        return None
    text: str = part["text"]
    return text


def semantic_digest(item: dict[str, Any]) -> bytes:
    """XXH3-128 of the item's canonical JSON with replay noise normalised away."""
    norm = {k: v for k, v in item.items() if v is not None and k not in ("id", "status")}
    kind = item.get("type")
    if kind is None and isinstance(item.get("role"), str):
        norm["type"] = kind = "message"
    key = {"message": "content", "function_call_output": "output"}.get(kind)  # type: ignore[arg-type]
    parts = norm.get(key) if key else None
    if isinstance(parts, list):
        plain = [_plain_text(p) for p in parts]
        if len(parts) == 1 and plain[0] is not None:
            norm[key] = plain[0]  # type: ignore[index]
        else:
            norm[key] = [  # type: ignore[index]
                t
                if t is not None
                else ({k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p)
                for t, p in zip(plain, parts, strict=True)
            ]
    return xxhash.xxh3_128_digest(_canonical(norm))


@dataclass(frozen=True)
class RefItem:
    """One item: canonical JSON plus the fields the server needs."""

    json: bytes
    type: str
    id: str | None
    role: str | None
    call_id: str | None
    name: str | None
    digest: bytes

    @staticmethod
    def from_object(obj: Any, index: int, max_item_bytes: int) -> RefItem:
        if not isinstance(obj, dict):
            raise ItemNotObject(f"Item {index} is not a JSON object.")
        if _depth(obj) > MAX_DEPTH:
            raise _too_deep(index)
        data = _canonical(obj)
        if len(data) > max_item_bytes:
            raise ItemTooLarge(f"Item {index} is {len(data)} bytes, over {max_item_bytes}.")

        def text(key: str) -> str | None:
            value = obj.get(key)
            return value if isinstance(value, str) else None

        role = text("role")
        kind = text("type")
        if kind is None:
            kind = "message" if role is not None else ""
        return RefItem(
            data, kind, text("id"), role, text("call_id"), text("name"), semantic_digest(obj)
        )

    @property
    def nbytes(self) -> int:
        return len(self.json)


@dataclass(frozen=True)
class RefItems:
    """An immutable batch of items."""

    items: tuple[RefItem, ...] = ()
    tokens: int = 0
    """Set by a tokenising cache's `items` and `match`."""

    @staticmethod
    def parse(data: bytes | str, *, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> RefItems:
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ItemNotJson(f"Items are not a JSON array of objects: {e}.") from None
        if not isinstance(value, list):
            raise ItemNotJson("Items are not a JSON array of objects: expected an array.")
        return RefItems._build(value, max_item_bytes)

    @staticmethod
    def from_objects(
        items: Sequence[Mapping[str, Any]], *, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES
    ) -> RefItems:
        values = [_check_json(obj, i) for i, obj in enumerate(items)]
        return RefItems._build(values, max_item_bytes)

    @staticmethod
    def _build(values: list[Any], max_item_bytes: int, offset: int = 0) -> RefItems:
        return RefItems(
            tuple(RefItem.from_object(v, offset + i, max_item_bytes) for i, v in enumerate(values))
        )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items)

    def json(self) -> bytes:
        return _array(self.items)

    def to_objects(self) -> list[dict[str, Any]]:
        return [json.loads(item.json) for item in self.items]

    def concat(self, other: RefItems) -> RefItems:
        return RefItems(self.items + other.items)


def _array(items: Sequence[RefItem]) -> bytes:
    return b"[" + b",".join(item.json for item in items) + b"]"


def _items_arg(value: Any, max_item_bytes: int) -> RefItems:
    if value is None:
        return RefItems()
    if isinstance(value, RefItems):
        for i, item in enumerate(value.items):
            if item.nbytes > max_item_bytes:
                raise ItemTooLarge(f"Item {i} is {item.nbytes} bytes, over {max_item_bytes}.")
        return value
    if isinstance(value, bytes | str):
        return RefItems.parse(value, max_item_bytes=max_item_bytes)
    return RefItems.from_objects(value, max_item_bytes=max_item_bytes)


# -- nodes, views, bindings -----------------------------------------------------------


_SERIALS = itertools.count(1)


@dataclass(eq=False)
class _Node:
    id: str
    owner: str
    parent: _Node | None
    store: bool
    created_on: int | None  # the connection of a store=False response
    input: RefItems
    output: RefItems
    settings: bytes
    meta: bytes
    implicit: bool = False
    serial: int = field(default_factory=lambda: next(_SERIALS))

    def own(self) -> tuple[RefItem, ...]:
        return self.input.items + self.output.items

    def ancestors(self) -> Iterator[_Node]:
        """This node, then its parent, and so on to the root."""
        node: _Node | None = self
        while node is not None:
            yield node
            node = node.parent

    def scope(self) -> int | None:
        """The connection this node is local to: the nearest `store=False` response's."""
        for node in self.ancestors():
            if not node.store:
                return node.created_on
        return None

    def context(self) -> list[RefItem]:
        chain = list(self.ancestors())[::-1]
        return [item for node in chain for item in node.input.items + node.output.items]

    def cost(self, config: _Config) -> int:
        shared = self.parent is not None and self.parent.settings == self.settings
        own = self.own()
        per_item = ITEM_OVERHEAD + (INDEX_OVERHEAD if config.prefix_index else 0)
        cost = (
            NODE_OVERHEAD
            + len(self.id.encode())
            + (0 if shared else len(self.settings))
            + len(self.meta)
            + sum(per_item + item.nbytes for item in own)
        )
        if config.tokenizer is not None:
            block = config.block_size
            before = config.tokens_of(self.parent.context()) if self.parent else 0
            after_input = before + config.tokens_of(self.input.items)
            after = after_input + config.tokens_of(self.output.items)
            cost += HASH_BYTES * (after // block - before // block)
            cost += TOKEN_ID_BYTES * (after_input % block + after % block)
            if config.keep_token_ids:
                cost += TOKEN_ID_BYTES * (after - before)
        return cost


@dataclass
class _Config:
    """A reference cache's token and index settings."""

    tokenizer: Tokenizer | None = None
    block_size: int = 16
    seed: int = 0
    keep_token_ids: bool = False
    prefix_index: bool = False
    _memo: dict[bytes, list[int]] = field(default_factory=dict)

    def item_tokens(self, item: RefItem) -> list[int]:
        """The framed tokens of one item (memoised by its JSON)."""
        if self.tokenizer is None:
            return []
        tokens = self._memo.get(item.json)
        if tokens is None:
            tok = self.tokenizer
            rendered = ref_tokens.render_item(item.json)
            tokens = ref_tokens.framed_tokens(rendered, tok.encode, tok.framing)
            self._memo[item.json] = tokens
        return tokens

    def tokens_of(self, items: Sequence[RefItem]) -> int:
        return sum(len(self.item_tokens(item)) for item in items)

    def ids_of(self, items: Sequence[RefItem]) -> list[int]:
        return [t for item in items for t in self.item_tokens(item)]


@dataclass(frozen=True)
class RefInfo:
    """The reference's `ResponseInfo`, computed from the chain each time."""

    id: str
    previous_response_id: str | None
    parent_id: str | None
    owner: str
    store: bool
    connection: int | None
    depth: int
    items: int
    bytes: int
    tokens: int
    input_items: int
    output_items: int
    settings: builtins.bytes
    meta: builtins.bytes

    @staticmethod
    def of(node: _Node, config: _Config) -> RefInfo:
        context = node.context()
        parent_id = node.parent.id if node.parent else None
        return RefInfo(
            id=node.id,
            previous_response_id=None if node.implicit else parent_id,
            parent_id=parent_id,
            owner=node.owner,
            store=node.store,
            connection=node.scope(),
            depth=len(list(node.ancestors())),
            items=len(context),
            bytes=len(_array(context)),
            tokens=config.tokens_of(context),
            input_items=len(node.input),
            output_items=len(node.output),
            settings=node.settings,
            meta=node.meta,
        )


class RefView:
    """A context, frozen when made."""

    def __init__(self, node: _Node | None, extra: RefItems | None, config: _Config) -> None:
        self._items = (node.context() if node else []) + list(extra.items if extra else ())
        self._config = config

    @property
    def items(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return len(self.json())

    @property
    def tokens(self) -> int:
        return self._config.tokens_of(self._items)

    def token_ids(self) -> list[int] | None:
        if self._config.tokenizer is None:
            return None
        return self._config.ids_of(self._items)

    def block_hashes(self) -> bytes | None:
        ids = self.token_ids()
        if ids is None:
            return None
        return ref_tokens.block_hashes(ids, self._config.block_size, self._config.seed)

    def count_tokens(self, tokenizer: Tokenizer) -> int:
        config = _Config(tokenizer)
        return config.tokens_of(self._items)

    def shared_prefix_tokens(self, other: RefView) -> int | None:
        a, b = self.block_hashes(), other.block_hashes()
        if a is None or b is None:
            return None
        return ref_tokens.shared_prefix_blocks(a, b) * self._config.block_size

    def json(self) -> bytes:
        return _array(self._items)

    def objects(self) -> list[dict[str, Any]]:
        return [json.loads(item.json) for item in self._items]

    def tail(self, *, from_last_role: str = "user") -> bytes:
        for i in range(len(self._items) - 1, -1, -1):
            item = self._items[i]
            if item.type == "message" and item.role == from_last_role:
                return _array(self._items[i:])
        return self.json()


class RefBinding:
    """A pin on one entry, holding its node until released."""

    def __init__(
        self, cache: RefCache, node: _Node, entry: _Entry | None, implicit: bool = False
    ) -> None:
        self._cache = weakref.ref(cache)
        self._config = cache._config
        self.response_id = node.id
        self.node: _Node | None = node
        self.serial = entry.serial if entry is not None else None
        self.implicit = implicit

    def _held(self) -> _Node:
        if self.node is None:
            raise ResponseNotFound(_not_found(self.response_id))
        return self.node

    def info(self) -> RefInfo:
        return RefInfo.of(self._held(), self._config)

    def view(self, extra: RefItems | None = None, *, tokenize: bool = True) -> RefView:
        cache = self._cache()
        if cache is not None and extra is not None and tokenize:
            extra = cache.items(extra)
        return RefView(self._held(), extra, self._config)

    def release(self) -> None:
        if self.node is None:
            return
        self.node = None
        cache = self._cache()
        if cache is not None and self.serial is not None:
            entry = cache._index.get(self.response_id)
            if entry is not None and entry.serial == self.serial and entry.pins > 0:
                entry.pins -= 1

    def __enter__(self) -> RefBinding:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


@dataclass(eq=False)
class _Entry:
    node: _Node
    serial: int
    tick: int
    pins: int = 0


@dataclass
class RefStats:
    entries: int
    stored_entries: int
    local_entries: int
    bytes: int
    memory_budget: int
    hits: int
    misses: int
    evictions: int
    connections: int
    pinned: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RefPrefixMatch:
    binding: RefBinding | None
    items: int
    tokens: int
    sent: int
    parent_id: str | None
    new_items: RefItems


# -- the cache -------------------------------------------------------------------------


@dataclass(eq=False)
class RefCache:
    """The reference session cache. Not thread-safe; slow on purpose."""

    memory_budget: int = DEFAULT_BUDGET
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES
    tokenizer: Tokenizer | None = field(default=None, kw_only=True)
    block_size: int = field(default=16, kw_only=True)
    seed: int = field(default=0, kw_only=True)
    keep_token_ids: bool = field(default=False, kw_only=True)
    prefix_index: bool = field(default=False, kw_only=True)
    _config: _Config = field(init=False)
    _index: dict[str, _Entry] = field(default_factory=dict)
    _connections: set[int] = field(default_factory=set)
    _bindings: weakref.WeakSet[RefBinding] = field(default_factory=weakref.WeakSet)
    _next_connection: int = 1
    _serial: int = 0
    _tick: int = 0
    _hits: int = 0
    _misses: int = 0
    _evictions: int = 0

    def __post_init__(self) -> None:
        self._config = _Config(
            self.tokenizer, self.block_size, self.seed, self.keep_token_ids, self.prefix_index
        )

    # -- connections

    def open_connection(self) -> int:
        connection = self._next_connection
        self._next_connection += 1
        self._connections.add(connection)
        return connection

    def close_connection(self, connection: int) -> int:
        if connection not in self._connections:
            return 0
        self._connections.remove(connection)
        for binding in list(self._bindings):
            if binding.node is not None and binding.node.scope() == connection:
                binding.node = None
        doomed = [i for i, e in self._index.items() if e.node.scope() == connection]
        for response_id in doomed:
            del self._index[response_id]
        return len(doomed)

    # -- lookups

    def _lookup(self, response_id: str, owner: str, connection: int | None) -> _Entry:
        entry = self._index.get(response_id)
        scope = entry.node.scope() if entry else None
        if entry is None or (scope is not None and scope != connection):
            self._misses += 1
            raise ResponseNotFound(_not_found(response_id))
        if entry.node.owner != owner:
            self._misses += 1
            raise OwnerMismatch(_not_found(response_id))
        self._hits += 1
        return entry

    def _touch(self, entry: _Entry) -> None:
        self._tick += 1
        entry.tick = self._tick

    def _lookup_touch(self, response_id: str, owner: str, connection: int | None) -> _Node:
        entry = self._lookup(response_id, owner, connection)
        self._touch(entry)
        return entry.node

    def get(self, response_id: str, *, owner: str, connection: int | None = None) -> RefInfo:
        return RefInfo.of(self._lookup_touch(response_id, owner, connection), self._config)

    def bind(self, response_id: str, *, owner: str, connection: int | None = None) -> RefBinding:
        entry = self._lookup(response_id, owner, connection)
        self._touch(entry)
        entry.pins += 1
        binding = RefBinding(self, entry.node, entry)
        self._bindings.add(binding)
        return binding

    def view(
        self,
        response_id: str | None,
        *,
        owner: str,
        connection: int | None = None,
        extra: RefItems | None = None,
        tokenize: bool = True,
    ) -> RefView:
        if extra is not None and tokenize:
            extra = self.items(extra)
        node = None if response_id is None else self._lookup_touch(response_id, owner, connection)
        return RefView(node, extra, self._config)

    def context(self, response_id: str, *, owner: str, connection: int | None = None) -> bytes:
        return self.view(response_id, owner=owner, connection=connection).json()

    def context_objects(
        self, response_id: str, *, owner: str, connection: int | None = None
    ) -> list[dict[str, Any]]:
        return self.view(response_id, owner=owner, connection=connection).objects()

    def own_items(
        self, response_id: str, *, owner: str, connection: int | None = None
    ) -> tuple[RefItems, RefItems]:
        node = self._lookup_touch(response_id, owner, connection)
        return node.input, node.output

    # -- create

    def create(
        self,
        response_id: str,
        *,
        owner: str,
        input: Any = None,
        output: Any = None,
        previous_response_id: str | RefBinding | None = None,
        settings: bytes = b"{}",
        meta: bytes = b"{}",
        store: bool = True,
        connection: int | None = None,
    ) -> RefInfo:
        new_input = _items_arg(input, self.max_item_bytes)
        new_output = _items_arg(output, self.max_item_bytes)
        if not store and connection is None:
            raise ValueError("store=False requires a connection")
        if not store and connection not in self._connections:
            raise ValueError(f"connection {connection} is not open")
        if response_id in self._index:
            raise DuplicateResponseId(f"A response with id '{response_id}' is already cached.")
        parent: _Node | None = None
        if isinstance(previous_response_id, RefBinding):
            parent = previous_response_id._held()
            scope = parent.scope()
            if scope is not None and scope != connection:
                raise ResponseNotFound(_not_found(previous_response_id.response_id))
            if parent.owner != owner:
                raise OwnerMismatch(_not_found(previous_response_id.response_id))
        elif previous_response_id is not None:
            parent = self._lookup(previous_response_id, owner, connection).node
        node = _Node(
            response_id,
            owner,
            parent,
            store,
            None if store else connection,
            new_input,
            new_output,
            settings,
            meta,
            implicit=isinstance(previous_response_id, RefBinding) and previous_response_id.implicit,
        )
        cost = node.cost(self._config)
        if cost > self.memory_budget:
            raise CacheFull(f"The response needs {cost} bytes, over the budget.")
        if parent is not None and self._is_indexed(parent):
            self._touch(self._index[parent.id])
        self._evict_for_budget(extra=node, protected=self._nearest_indexed_ancestor(node))
        self._insert(node)
        return RefInfo.of(node, self._config)

    # -- tokens and prefix matching

    def items(self, items: Any) -> RefItems:
        batch = _items_arg(items, self.max_item_bytes)
        return RefItems(batch.items, self._config.tokens_of(batch.items))

    def _live_nodes(self) -> list[_Node]:
        roots = [e.node for e in self._index.values()]
        roots += [b.node for b in self._bindings if b.node is not None]
        live: dict[int, _Node] = {}
        for root in roots:
            for node in root.ancestors():
                live[id(node)] = node
        return list(live.values())

    def match(
        self, input: Any, *, owner: str, connection: int | None = None, tokenize: bool = True
    ) -> RefPrefixMatch:
        if isinstance(input, RefItems):
            values: list[Any] = [json.loads(item.json) for item in input.items]
        elif isinstance(input, bytes | str):
            try:
                values = json.loads(input)
            except (ValueError, UnicodeDecodeError) as e:
                raise ItemNotJson(f"Items are not a JSON array of objects: {e}.") from None
            if not isinstance(values, list):
                raise ItemNotJson("Items are not a JSON array of objects: expected an array.")
        else:
            values = [_check_json(obj, i) for i, obj in enumerate(input)]
        sent: list[bytes] = []
        for value in values:
            if not isinstance(value, dict):
                break
            sent.append(semantic_digest(value))
        best: tuple[int, _Node, int] | None = None  # (matched, node, own items)
        if self._config.prefix_index and sent:
            for node in self._live_nodes():
                scope = node.scope()
                if node.owner != owner or (scope is not None and scope != connection):
                    continue
                context = [item.digest for item in node.context()]
                shared = 0
                while shared < min(len(context), len(sent)) and context[shared] == sent[shared]:
                    shared += 1
                own = shared - (len(context) - len(node.own()))
                if own < 1:
                    continue
                rank = (shared, own == len(node.own()), node.serial)
                if best is None or rank > (best[0], best[2] == len(best[1].own()), best[1].serial):
                    best = (shared, node, own)
        matched = best[0] if best else 0
        rest = RefItems._build(values[matched:], self.max_item_bytes, offset=matched)
        if tokenize:
            rest = RefItems(rest.items, self._config.tokens_of(rest.items))
        if best is None:
            return RefPrefixMatch(None, 0, 0, len(values), None, rest)
        _, node, own = best
        if own < len(node.own()):
            node = self._prefix_node(node, own)
        entry = self._index.get(node.id)
        if entry is not None and entry.node is node:
            self._touch(entry)
            entry.pins += 1
        else:
            entry = None
        binding = RefBinding(self, node, entry, implicit=True)
        self._bindings.add(binding)
        tokens = self._config.tokens_of(node.context())
        return RefPrefixMatch(binding, matched, tokens, len(values), node.id, rest)

    def _prefix_node(self, node: _Node, own: int) -> _Node:
        n_input = len(node.input)
        if own <= n_input:
            new_input, new_output = RefItems(node.input.items[:own]), RefItems()
        else:
            new_input, new_output = node.input, RefItems(node.output.items[: own - n_input])
        return _Node(
            f"{node.id}#{own}",
            node.owner,
            node.parent,
            node.store,
            node.created_on,
            new_input,
            new_output,
            node.settings,
            node.meta,
            implicit=node.implicit,
        )

    def input_items(
        self, response_id: str, *, owner: str, connection: int | None = None
    ) -> RefItems:
        node = self._lookup_touch(response_id, owner, connection)
        if not node.implicit:
            return node.input
        parent = node.parent.context() if node.parent else []
        return RefItems((*parent, *node.input.items))

    def _insert(self, node: _Node) -> None:
        self._serial += 1
        self._tick += 1
        self._index[node.id] = _Entry(node, self._serial, self._tick)

    # -- removal

    def evict(self, response_id: str, *, owner: str, connection: int) -> bool:
        entry = self._index.get(response_id)
        if entry is None or entry.node.scope() != connection or entry.node.owner != owner:
            return False
        del self._index[response_id]
        return True

    def delete(self, response_id: str, *, owner: str) -> bool:
        entry = self._index.get(response_id)
        if entry is None or entry.node.scope() is not None or entry.node.owner != owner:
            return False
        del self._index[response_id]
        return True

    # -- the budget

    def _is_indexed(self, node: _Node) -> bool:
        entry = self._index.get(node.id)
        return entry is not None and entry.node is node

    def _nearest_indexed_ancestor(self, node: _Node) -> _Entry | None:
        for ancestor in list(node.ancestors())[1:]:
            if self._is_indexed(ancestor):
                return self._index[ancestor.id]
        return None

    def _is_candidate(self, entry: _Entry) -> bool:
        if entry.pins > 0:
            return False
        return not any(
            self._nearest_indexed_ancestor(e.node) is entry for e in self._index.values()
        )

    def _live_bytes(self, extra: _Node | None = None) -> int:
        roots = [e.node for e in self._index.values()]
        roots += [b.node for b in self._bindings if b.node is not None]
        if extra is not None:
            roots.append(extra)
        live: dict[int, _Node] = {}
        for root in roots:
            for node in root.ancestors():
                live[id(node)] = node
        return sum(node.cost(self._config) for node in live.values())

    def _evict_for_budget(self, extra: _Node | None, protected: _Entry | None) -> None:
        while self._live_bytes(extra) > self.memory_budget:
            candidates = [
                e for e in self._index.values() if e is not protected and self._is_candidate(e)
            ]
            if not candidates:
                return
            victim: _Entry | None = min(candidates, key=lambda e: e.tick)
            while victim is not None:
                del self._index[victim.node.id]
                self._evictions += 1
                anchor = self._nearest_indexed_ancestor(victim.node)
                victim = None
                if anchor is not None and anchor is not protected and self._is_candidate(anchor):
                    victim = anchor

    # -- stats

    def stats(self) -> RefStats:
        entries = list(self._index.values())
        stored = sum(1 for e in entries if e.node.scope() is None)
        return RefStats(
            entries=len(entries),
            stored_entries=stored,
            local_entries=len(entries) - stored,
            bytes=self._live_bytes(),
            memory_budget=self.memory_budget,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            connections=len(self._connections),
            pinned=sum(1 for e in entries if e.pins > 0),
        )

    # -- snapshots (the same msgpack format as the Rust cache)

    def snapshot(self) -> bytes:
        stored = sorted(
            (e for e in self._index.values() if e.node.scope() is None), key=lambda e: e.serial
        )
        indexed = {id(e.node) for e in stored}
        position: dict[int, int] = {}
        records: list[dict[str, Any]] = []
        for entry in stored:
            fresh = [n for n in entry.node.ancestors() if id(n) not in position]
            for node in reversed(fresh):
                parent = node.parent
                records.append(
                    {
                        "parent": position[id(parent)] if parent else None,
                        "indexed": id(node) in indexed,
                        "id": node.id,
                        "owner": node.owner,
                        "store": node.store,
                        "n_input": len(node.input),
                        "items": [i.json.decode() for i in node.input.items + node.output.items],
                        "settings": None
                        if parent and parent.settings == node.settings
                        else node.settings,
                        "meta": node.meta,
                    }
                )
                if node.implicit:
                    records[-1]["implicit"] = True
                position[id(node)] = len(records) - 1
        doc = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "nodes": records}
        return bytes(msgpack.packb(doc, use_bin_type=True))

    def restore(self, data: bytes) -> int:
        try:
            nodes = self._decode(data)
        except SnapshotError:
            raise
        except Exception as e:  # malformed input: wrong types, missing keys, bad items
            raise SnapshotError(f"Cannot restore the snapshot: {type(e).__name__}.") from None
        added = 0
        for node, indexed in nodes:
            if indexed and node.id not in self._index:
                self._insert(node)
                added += 1
        self._evict_for_budget(extra=None, protected=None)
        return added

    def _decode(self, data: bytes) -> list[tuple[_Node, bool]]:
        doc = msgpack.unpackb(data, raw=False)
        if doc["format"] != SNAPSHOT_FORMAT or doc["version"] != SNAPSHOT_VERSION:
            raise SnapshotError("Cannot restore the snapshot: unsupported format.")
        nodes: list[tuple[_Node, bool]] = []
        for i, r in enumerate(doc["nodes"]):
            if r["parent"] is not None and not 0 <= r["parent"] < i:
                raise SnapshotError(f"Cannot restore the snapshot: node {i}: bad parent.")
            parent = None if r["parent"] is None else nodes[r["parent"]][0]
            if not r["store"] or not r["id"] or r["n_input"] > len(r["items"]):
                raise SnapshotError(f"Cannot restore the snapshot: node {i}: bad record.")
            if r.get("implicit") and parent is None:
                raise SnapshotError(f"Cannot restore the snapshot: node {i}: bad record.")
            if r["settings"] is not None:
                settings = bytes(r["settings"])
            elif parent is not None:
                settings = parent.settings
            else:
                raise SnapshotError(f"Cannot restore the snapshot: node {i}: no settings.")
            text = "[" + ",".join(r["items"]) + "]"
            items = RefItems.parse(text, max_item_bytes=self.max_item_bytes).items
            n = r["n_input"]
            node = _Node(
                id=r["id"],
                owner=r["owner"],
                parent=parent,
                store=True,
                created_on=None,
                input=RefItems(items[:n]),
                output=RefItems(items[n:]),
                settings=settings,
                meta=bytes(r["meta"]),
                implicit=bool(r.get("implicit", False)),
            )
            nodes.append((node, bool(r["indexed"])))
        return nodes
