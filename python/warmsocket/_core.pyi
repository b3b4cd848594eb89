"""Type stubs for the Rust extension `warmsocket._core`.

Exception tree (all raised from Rust, never a panic)::

    WarmsocketError
     └── CacheError
          ├── ResponseNotFound (LookupError)    unknown id, wrong scope, evicted
          │    └── OwnerMismatch                the id exists but belongs to another owner
          ├── DuplicateResponseId (ValueError)
          ├── InvalidItems (ValueError)         base of the bad-input errors below
          │    ├── ItemNotJson                  not valid UTF-8 JSON / not a JSON array /
          │    │                                nested deeper than 100 levels
          │    ├── ItemNotObject                an array element is not a JSON object
          │    └── ItemTooLarge                 one item is larger than max_item_bytes
          ├── CacheFull (MemoryError)           an entry larger than the whole budget
          └── SnapshotError (ValueError)        a snapshot that cannot be restored
"""

import builtins
from array import array
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any, ClassVar, Final, Literal, TypeAlias, final

from typing_extensions import Buffer

__all__ = [
    "BUILD_PROFILE",
    "MAX_UPSTREAM_EVENT_BYTES",
    "Binding",
    "BlockHasher",
    "CacheError",
    "CacheFull",
    "CacheStats",
    "ChunkedBody",
    "ClientFrames",
    "ContextView",
    "CreateRequest",
    "DuplicateResponseId",
    "InvalidItemJson",
    "InvalidItems",
    "InvalidTokenizerFile",
    "ItemMeta",
    "ItemNotJson",
    "ItemNotObject",
    "ItemTooLarge",
    "Items",
    "ItemsLike",
    "OwnerMismatch",
    "PrefixMatch",
    "Rejection",
    "ResponseEncoder",
    "ResponseInfo",
    "ResponseNotFound",
    "ResponsesStreamDecoder",
    "SessionCache",
    "SnapshotError",
    "SteerRequest",
    "TokenizationFailed",
    "Tokenizer",
    "TokenizerError",
    "TokenizerFileUnreadable",
    "UnknownEncoding",
    "WarmsocketError",
    "__version__",
    "block_hashes",
    "encoding_for_model",
    "frame_event",
    "message_stream_id",
    "parse_client_message",
    "parse_response_head",
    "rust_heap",
    "shared_prefix_blocks",
    "shared_prefix_tokens",
]

__version__: Final[str]
BUILD_PROFILE: Final[Literal["release", "debug"]]
MAX_UPSTREAM_EVENT_BYTES: Final[int]
"""Largest upstream event accepted (an SSE event, a WebSocket message): what a broken
upstream can make the server buffer is bounded by it."""

class WarmsocketError(Exception): ...
class CacheError(WarmsocketError): ...
class ResponseNotFound(CacheError, LookupError): ...
class OwnerMismatch(ResponseNotFound): ...
class DuplicateResponseId(CacheError, ValueError): ...
class InvalidItems(CacheError, ValueError): ...
class ItemNotJson(InvalidItems): ...
class ItemNotObject(InvalidItems): ...
class ItemTooLarge(InvalidItems): ...
class CacheFull(CacheError, MemoryError): ...
class SnapshotError(CacheError, ValueError): ...

@final
class Items:
    """An immutable batch of validated items, each kept as canonical JSON bytes.

    Canonical form: compact JSON, object keys sorted, strings re-escaped minimally.
    Numbers are normalised: integers that fit 64 bits are kept exactly, any other
    number becomes the shortest float that round-trips. The fields the server needs
    (type, id, role, call_id, name, byte size) are extracted once, when the batch is
    built. Messages of the errors name the item index, never its content.
    """

    @staticmethod
    def parse(data: bytes | str, *, max_item_bytes: int = 33554432) -> Items:
        """Validate a JSON array of objects, each nested at most 100 levels (the item is
        level 1). Raises ItemNotJson, ItemNotObject, ItemTooLarge."""
    @staticmethod
    def from_objects(
        items: Sequence[Mapping[str, Any]], *, max_item_bytes: int = 33554432
    ) -> Items:
        """Build a batch from Python dicts, with the same canonical form as `parse`.

        Keys must be str; values str, int (64-bit), finite float, bool, None, list,
        tuple or mapping, nested at most 100 levels. Anything else raises ItemNotJson;
        a non-mapping element raises ItemNotObject.
        """
    def __len__(self) -> int:
        """Number of items."""
    @property
    def nbytes(self) -> int:
        """Total canonical JSON bytes of the items (without array brackets and commas)."""
    @property
    def tokens(self) -> int:
        """Tokens of the items when a tokenising cache built them (`SessionCache.items`),
        else 0."""
    def json(self) -> bytes:
        """The batch as one JSON array."""
    def to_objects(self) -> list[dict[str, Any]]:
        """The items decoded to Python dicts."""
    def item_json(self, index: int) -> bytes:
        """One item's canonical JSON (negative indexes count from the end). Raises IndexError."""
    def item_meta(self, index: int) -> ItemMeta:
        """One item's extracted fields. Raises IndexError."""
    def ids(self) -> list[str | None]:
        """Each item's `id` (None where it has none), in order, without converting
        the items."""
    def first_duplicate_id(self, taken: set[str] | None = None) -> str | None:
        """The first item `id` (in order) an earlier item has too, or that `taken`
        holds; None when there is none. Empty ids are not ids."""
    def last_of_type(self, kind: str) -> int | None:
        """The index of the last item whose `type` is `kind` (`message` for an item with a
        `role` and no `type`), None when there is none. O(items after it)."""
    def slice(self, start: int, end: int | None = None) -> Items:
        """The items `start` to `end` (the end when None), sharing this batch: no copy.
        IndexError outside the items."""
    def concat(self, other: Items) -> Items:
        """This batch's items followed by `other`'s (the items are shared, not copied)."""

@final
class ItemMeta:
    """The few fields the server needs, extracted from one item once."""

    @property
    def type(self) -> str:
        """The item's `type`; `"message"` when absent but `role` is present, else `""`."""
    @property
    def id(self) -> str | None:
        """The item's `id` when it is a string."""
    @property
    def role(self) -> str | None:
        """The item's `role` when it is a string."""
    @property
    def call_id(self) -> str | None:
        """The item's `call_id` when it is a string."""
    @property
    def name(self) -> str | None:
        """The item's `name` when it is a string."""
    @property
    def nbytes(self) -> int:
        """Size of the item's canonical JSON."""
    @property
    def tokens(self) -> int | None:
        """The item's tokens, framing included, when a tokenising cache built its batch."""
    @property
    def digest(self) -> builtins.bytes:
        """The item's semantic digest (16 bytes): XXH3-128 of its canonical JSON with
        the differences that do not change its meaning normalised away (top-level `id`,
        `status` and null members; an easy message's missing `type`; a lone
        `input_text`/`output_text` part vs a string; empty `annotations`/`logprobs`).
        Re-sent histories are matched by it (docs/architecture.md)."""

ItemsLike: TypeAlias = Items | bytes | str | Sequence[Mapping[str, Any]]
"""What `create` accepts as items: a built batch, a JSON array as text, or dicts."""

@final
class ResponseInfo:
    """What the cache knows about one cached response (a node of a chain)."""

    @property
    def id(self) -> str: ...
    @property
    def previous_response_id(self) -> str | None:
        """The `previous_response_id` the response was created with: the parent's id,
        or None for a root and for a response whose parent was found by prefix matching
        (`SessionCache.match`; the client sent none)."""
    @property
    def parent_id(self) -> str | None:
        """The id of the node this response continues, also when it was found by
        prefix matching (then it may be `<id>#<n>`: the first n own items of `<id>`).
        The parent may have left the index since."""
    @property
    def owner(self) -> str: ...
    @property
    def store(self) -> bool:
        """The `store` flag the response was created with."""
    @property
    def connection(self) -> int | None:
        """The connection whose lifetime bounds this entry, or None for a stored entry.

        An entry is connection-local when it was created with `store=False` or when any
        ancestor is connection-local (content sent with `store=false` never outlives
        its connection, even through a stored descendant).
        """
    @property
    def depth(self) -> int:
        """Number of responses in the chain, this one included."""
    @property
    def items(self) -> int:
        """Number of items in the full context (the whole chain)."""
    @property
    def bytes(self) -> int:
        """Size of the full context as one JSON array, in bytes."""
    @property
    def tokens(self) -> int:
        """Tokens of the full context (0 without a tokenizer): each item tokenised once,
        when it entered the cache, framing included (docs/tokens.md)."""
    @property
    def input_items(self) -> int:
        """Items this response was sent (its own, not its ancestors')."""
    @property
    def output_items(self) -> int:
        """Items this response produced."""
    @property
    def settings(self) -> builtins.bytes:
        """The bytes the response was created with as `settings` (as given)."""
    @property
    def meta(self) -> builtins.bytes:
        """The bytes the response was created with as `meta` (as given)."""

@final
class PrefixMatch:
    """What `SessionCache.match` found: the cached prefix and the new suffix."""

    @property
    def binding(self) -> Binding | None:
        """Holds the node whose context is the matched prefix (pinning it when it is a
        cached response); pass it as `previous_response_id` to `create`, then release
        it. None when nothing matched. When the prefix ends inside a response's own
        items, the node is made on the spot and shares those items (`<id>#<n>`)."""
    @property
    def items(self) -> int:
        """Leading items of the input that matched."""
    @property
    def tokens(self) -> int:
        """Tokens of the matched prefix (0 without a tokenizer)."""
    @property
    def sent(self) -> int:
        """Items of the input."""
    @property
    def parent_id(self) -> str | None:
        """The binding's node id (None when nothing matched)."""
    @property
    def new_items(self) -> Items:
        """The input after the matched prefix: validated and, with a tokenizer, counted."""

@final
class CacheStats:
    """Counters of a cache at one moment."""

    @property
    def entries(self) -> int:
        """Responses addressable by id."""
    @property
    def stored_entries(self) -> int:
        """Entries visible from any connection of their owner."""
    @property
    def local_entries(self) -> int:
        """Entries bound to a connection (`store=False`, or descendants of one)."""
    @property
    def bytes(self) -> int:
        """Estimated bytes held by live nodes: entries, the ancestors they need, and
        chains still held by bindings and views. Own item bytes, settings and meta,
        plus a fixed overhead per item and per node; settings shared with the parent
        are counted once."""
    @property
    def memory_budget(self) -> int:
        """The budget the LRU eviction keeps `bytes` under (pins permitting)."""
    @property
    def hits(self) -> int:
        """Lookups (get, bind, view, context, create's parent) that found their entry."""
    @property
    def misses(self) -> int:
        """Lookups that found nothing (including owner mismatches)."""
    @property
    def evictions(self) -> int:
        """Entries removed by the memory budget (not by evict/delete/close)."""
    @property
    def connections(self) -> int:
        """Open connections."""
    @property
    def pinned(self) -> int:
        """Entries with at least one live Binding."""
    def as_dict(self) -> dict[str, int]:
        """All the counters by name."""

@final
class ContextView:
    """The full context of a chain (optionally followed by new items), frozen at creation.

    Holds references to the chain's nodes, so it stays valid after the cache changes.
    """

    @property
    def items(self) -> int:
        """Number of items in the view."""
    @property
    def nbytes(self) -> int:
        """Size of `json()` in bytes."""
    @property
    def tokens(self) -> int:
        """Tokens of the view (0 without a tokenizer): a sum of cached counts, O(1)."""
    def unanswered_call_output(self) -> str | None:
        """The `call_id` of the first `function_call_output` among the view's new items
        that answers no `function_call` before it in the context (None when all do).
        Walks back from the end until every new output is matched, not the whole
        context."""
    def token_ids(self) -> array[int] | None:
        """The context's token ids as `array('I')` (None without a tokenizer).

        Concatenated from the kept ids when the cache keeps them (`keep_token_ids`);
        otherwise every item is tokenised again (O(context)).
        """
    def truncation(self, budget: int, tokenizer: Tokenizer | None = None) -> tuple[int, int] | None:
        """Where `truncation: "auto"` cuts the context to at most `budget` tokens:
        `(head, start)`, to keep the first `head` items (the system and developer
        messages it starts with) and the items from `start` on, `start` being the
        earliest user message from which they fit (whole turns go: no tool output
        loses its call). `start == head` when nothing need go; None when not even the
        last user message onward fits. Items count their cached tokens, else
        `tokenizer`'s count, else four bytes a token."""
    def count_tokens(self, tokenizer: Tokenizer) -> int:
        """Tokens of the context counted from scratch with `tokenizer`: every item
        tokenised again, O(context) (what a server without token caching pays per
        turn; `tokens` is the cached count)."""
    def block_hashes(self) -> builtins.bytes | None:
        """The block hashes of the context's tokens, 8 bytes per full block (None
        without a tokenizer): the chain's stored hashes, then those of the new items.
        The same as `block_hashes(self.token_ids(), block_size, seed=seed)`."""
    def shared_prefix_tokens(self, other: ContextView) -> int | None:
        """Tokens covered by the equal leading block hashes of two views; None unless
        both come from caches with the same tokenizer, block size and seed.
        O(shared blocks) plus hashing each view's new items."""
    def json(self) -> bytes:
        """The whole context as one JSON array: one allocation, one copy of each item.

        Results of 256 KiB or more are copied with the GIL released.
        """
    def json_from(self, start: int) -> bytes:
        """The bytes of `json()` between the first `start` items (with the `[` before
        them) and the closing `]`: `json()` less its `]` is `b"[" + json_from(0)`, and
        appending `json_from(k)` to that part of a view whose items are this view's
        first `k` gives this view's. ValueError when `start` is past the last item."""
    def objects(self) -> list[dict[str, Any]]:
        """The items decoded to Python dicts, oldest first."""
    def tail(self, *, from_last_role: str = "user") -> bytes:
        """JSON array from the last message with this role (inclusive) to the end.

        The whole context when there is no such message. Costs O(items returned).
        """

@final
class Binding:
    """A pin on one cached response, held while a request builds on it.

    A pinned response (and every ancestor it needs) is never evicted by the memory
    budget. The binding keeps the chain alive even if the entry is evicted or
    deleted meanwhile, so a running request can always finish and be stored.

    Releasing drops the pin and the chain. A binding of a connection-local response
    is released when its connection closes. A released binding raises
    ResponseNotFound from `info`, `view` and as a `previous_response_id`.
    """

    @property
    def response_id(self) -> str:
        """The bound response's id (`<id>#<n>` for a prefix of a response's items)."""
    @property
    def implicit(self) -> bool:
        """Made by `SessionCache.match`: a response created on it records no
        `previous_response_id`."""
    def info(self) -> ResponseInfo:
        """The bound response, as it was when bound."""
    def view(self, extra: Items | None = None, *, tokenize: bool = True) -> ContextView:
        """The bound response's context followed by `extra`, which is tokenised now
        (with a tokenizer) unless `tokenize` is false: then the view's `tokens`
        leave `extra` out until a tokenised copy (`SessionCache.items`) replaces it."""
    def release(self) -> None:
        """Drop the pin. Idempotent; also done when the binding is garbage-collected."""
    def __enter__(self) -> Binding: ...
    def __exit__(self, *exc_info: object) -> None:
        """Release the binding."""

@final
class SessionCache:
    """Response chains with structural sharing, scopes, owners and an LRU memory budget.

    Thread-safe: one instance may be shared by any number of threads.
    """

    def __new__(
        cls,
        memory_budget: int = 1073741824,
        *,
        max_item_bytes: int = 33554432,
        tokenizer: Tokenizer | None = None,
        block_size: int = 16,
        seed: int = 0,
        keep_token_ids: bool = False,
        prefix_index: bool = False,
    ) -> SessionCache:
        """A cache. With `tokenizer`, every item is tokenised once, when it enters
        (`items`, `match`, `create`), and each response stores its chain's token count
        and the block hashes (`block_size` tokens, XXH3 `seed`) its own tokens
        completed. `keep_token_ids` also keeps the ids (4 bytes per token, metered) so
        `ContextView.token_ids` concatenates instead of re-tokenising. `prefix_index`
        indexes every item position of every chain so `match` finds re-sent
        histories (about 85 bytes per item, metered as 96)."""
    @property
    def tokenizer(self) -> Tokenizer | None: ...
    @property
    def block_size(self) -> int | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def keep_token_ids(self) -> bool: ...
    @property
    def prefix_index(self) -> bool: ...
    @property
    def memory_budget(self) -> int:
        """Bytes the LRU eviction keeps the cache under (see `CacheStats.bytes`)."""
    @property
    def max_item_bytes(self) -> int:
        """The largest item accepted, as canonical JSON."""
    def open_connection(self) -> int:
        """A new connection id for connection-local entries."""
    def close_connection(self, connection: int) -> int:
        """Remove every entry local to the connection and release its bindings.

        Entries local to it include stored (`store=True`) descendants of its
        `store=False` responses. Returns the number of entries removed. Unknown ids
        are a no-op.
        """
    def create(
        self,
        response_id: str,
        *,
        owner: str,
        input: ItemsLike | None = None,
        output: ItemsLike | None = None,
        previous_response_id: str | Binding | None = None,
        settings: bytes = b"{}",
        meta: bytes = b"{}",
        store: bool = True,
        connection: int | None = None,
    ) -> ResponseInfo:
        """Add a response whose own items are `input` followed by `output`.

        `settings` and `meta` are the caller's bytes, kept and snapshotted as they
        are (warmsocket's server gives JSON objects; they are not parsed here).
        `previous_response_id` is a parent id (looked up like `get`) or a Binding of
        this cache (which must be visible from `connection`, like a lookup; one of
        another cache is a ValueError). `store=False`
        requires an open `connection` (ValueError otherwise). Raises ResponseNotFound /
        OwnerMismatch for the parent, DuplicateResponseId, InvalidItems subclasses,
        CacheFull. On any error the cache is unchanged (except the miss counter of a
        failed parent lookup). May evict least-recently-used entries to fit.
        """
    def get(self, response_id: str, *, owner: str, connection: int | None = None) -> ResponseInfo:
        """Look up a response: stored entries of `owner`, plus entries local to `connection`."""
    def items(self, items: ItemsLike) -> Items:
        """Validate items and, with a tokenizer, count their tokens (ids kept until they
        enter a chain, so `create` hashes them without tokenising again). Raises the
        InvalidItems subclasses, TokenizationFailed."""
    def match(
        self,
        input: ItemsLike,
        *,
        owner: str,
        connection: int | None = None,
        tokenize: bool = True,
    ) -> PrefixMatch:
        """Match a re-sent history against the cached chains of `owner` (stored ones,
        and those local to `connection`) by the items' semantic digests.

        Finds the longest cached prefix in O(items sent) hashing and O(log items)
        index lookups; only the unmatched suffix is validated and tokenised
        (`PrefixMatch.new_items`). With `tokenize=False` the suffix is validated only
        (`items` tokenises it later; `create` does, at the latest). Without
        `prefix_index` nothing ever matches. Raises the InvalidItems subclasses for
        the suffix, TokenizationFailed.
        """
    def input_items(self, response_id: str, *, owner: str, connection: int | None = None) -> Items:
        """The input the client sent for a response: its own input items, preceded by
        its parent's whole context when the parent was found by `match` (the client
        re-sent that history; listed as cached, i.e. the first form seen)."""
    def bind(self, response_id: str, *, owner: str, connection: int | None = None) -> Binding:
        """Look up a response like `get` and pin it (see `Binding`)."""
    def view(
        self,
        response_id: str | None,
        *,
        owner: str,
        connection: int | None = None,
        extra: Items | None = None,
        tokenize: bool = True,
    ) -> ContextView:
        """The context of `response_id` followed by `extra`; None gives just `extra`.

        `extra` is tokenised now (with a tokenizer) unless `tokenize` is false, as in
        `Binding.view`."""
    def context(self, response_id: str, *, owner: str, connection: int | None = None) -> bytes:
        """The full context of a response as one JSON array (`view(...).json()`)."""
    def context_objects(
        self, response_id: str, *, owner: str, connection: int | None = None
    ) -> list[dict[str, Any]]:
        """The full context of a response decoded to Python dicts."""
    def own_items(
        self, response_id: str, *, owner: str, connection: int | None = None
    ) -> tuple[Items, Items]:
        """This response's own (input, output) items."""
    def evict(self, response_id: str, *, owner: str, connection: int) -> bool:
        """Remove a connection-local entry of `connection` (the failed-continuation rule).

        Stored entries are left alone (they stay loadable). Descendants keep their
        context. Returns whether an entry was removed.
        """
    def delete(self, response_id: str, *, owner: str) -> bool:
        """Remove a stored entry (HTTP DELETE). Descendants keep their context.

        Returns whether an entry was removed (False for another owner's entry).
        """
    def take_evicted(self) -> list[str]:
        """The ids evicted for the memory budget since the last call (the first
        4,096; deletes and closed connections are not evictions), so that copies kept
        beside the cache can go too."""
    def stored_ids(self) -> list[tuple[str, str]]:
        """`(owner, response id)` of every stored entry (not local to a connection), in
        no order."""
    def apply_budget(self) -> int:
        """Evict for the memory budget now, as the next `create` would, and return how
        many entries went. The cache may be over its budget: a new response's parent
        is never evicted to make room for it, nor an entry a `Binding` pins, and
        nothing is evicted when those are released (e.g. before a `snapshot` that a
        cache with the same budget must restore whole)."""
    def sweep_prefix_index(self) -> None:
        """Drop the prefix index's positions of removed responses now, with the memory
        they keep. The index does so by itself once they pass a quarter of its live
        positions plus 4,096 (amortised); this is for a count of the heap with no
        slack in it (the steady-state test)."""
    def stats(self) -> CacheStats:
        """The cache's counters now."""
    def snapshot(self) -> bytes:
        """The stored entries (and the nodes their chains need) as msgpack bytes."""
    def restore(self, data: bytes) -> int:
        """Add the entries of a snapshot, skipping ids already present. Returns entries added.

        Everything is validated first (items against this cache's `max_item_bytes`);
        bad data raises SnapshotError and changes nothing. The memory budget applies
        afterwards, as for `create`.
        """

# Tokens and block hashes (rust/token, rust/blocks; docs/tokens.md).
#
# Exception tree of the tokenizer::
#
#     WarmsocketError
#      └── TokenizerError
#           ├── UnknownEncoding (LookupError)          Tokenizer.builtin() with an unknown name
#           ├── TokenizerFileUnreadable (OSError)      tokenizer.json missing or unreadable
#           ├── InvalidTokenizerFile (ValueError)      not a valid Hugging Face tokenizer.json
#           ├── InvalidItemJson (ValueError)           item JSON that is not UTF-8 JSON of an object
#           └── TokenizationFailed (ValueError)        a Hugging Face tokenizer failed on a text

class TokenizerError(WarmsocketError): ...
class UnknownEncoding(TokenizerError, LookupError): ...
class TokenizerFileUnreadable(TokenizerError, OSError): ...
class InvalidTokenizerFile(TokenizerError, ValueError): ...
class InvalidItemJson(TokenizerError, ValueError): ...
class TokenizationFailed(TokenizerError, ValueError): ...

_TokenIds: TypeAlias = Buffer | Sequence[int]
"""Token ids: a buffer of uint32 (`array('I')`, numpy uint32, memoryview cast to 'I') or ints."""

@final
class Tokenizer:
    """A tokenizer: a built-in OpenAI encoding or a Hugging Face tokenizer.json.

    Immutable and thread-safe; every method releases the GIL while it works.
    Text is encoded as ordinary text: special-token text such as
    `<|endoftext|>` in content is never a special token in the built-in
    encodings. Nothing is ever downloaded.
    """

    @staticmethod
    def builtin(name: str) -> Tokenizer:
        """`"o200k_base"` or `"cl100k_base"`. Raises UnknownEncoding.

        The first use of an encoding in a process builds its rank table
        (about 0.2 s); later calls share it.
        """
    @staticmethod
    def for_model(model: str) -> Tokenizer:
        """The encoding of a model by name (see `encoding_for_model`); `o200k_base` when unknown."""
    @staticmethod
    def from_file(path: str | PathLike[str]) -> Tokenizer:
        """A Hugging Face tokenizer from a local tokenizer.json.

        Truncation and padding set in the file are ignored. Raises
        TokenizerFileUnreadable, InvalidTokenizerFile.
        """
    @staticmethod
    def from_json(data: bytes | str, *, name: str = "<tokenizer.json>") -> Tokenizer:
        """A Hugging Face tokenizer from the contents of a tokenizer.json.

        Raises InvalidTokenizerFile.
        """
    @property
    def name(self) -> str:
        """`"o200k_base"`, `"cl100k_base"`, or the tokenizer.json path (or `name`)."""
    @property
    def framing(self) -> tuple[int, int, int]:
        """The (start, sep, end) token ids that frame each rendered message."""
    def count(self, text: str) -> int:
        """Number of tokens of `text`. Raises TokenizationFailed."""
    def encode(self, text: str) -> array[int]:
        """Token ids of `text` as `array('I')`. Raises TokenizationFailed."""
    def count_item(self, item_json: bytes | str) -> int:
        """Tokens of one Responses API item, framing included (docs/tokens.md).

        Raises InvalidItemJson, TokenizationFailed.
        """
    def encode_item(self, item_json: bytes | str) -> array[int]:
        """Token ids of one item, framing included: `start role sep content... end`."""
    def count_instructions(self, instructions: str) -> int:
        """Tokens of the instructions rendered as a `system` message, framing included."""
    def encode_instructions(self, instructions: str) -> array[int]:
        """Token ids of the instructions rendered as a `system` message, framing included."""
    def count_tools(self, tools_json: bytes | str) -> int:
        """Tokens of a request's tools (a JSON array) rendered as one `system` message
        whose segments are the tools' JSON texts, framing included; 0 for no tools.

        Raises InvalidItemJson (not a JSON array), TokenizationFailed.
        """

def rust_heap(*, settle: bool = False) -> tuple[int, int]:
    """What this library's Rust code holds on the heap now: `(bytes, blocks)`.

    Counted by its global allocator, as asked of the system allocator (its rounding
    not included); Python's own memory is not in it. The items of evicted, deleted
    and closed responses are freed by a background thread: with `settle`, first
    wait (at most 5 s, without the GIL) until what it was handed is freed.
    """

def encoding_for_model(model: str) -> str | None:
    """The built-in encoding for a model name, or None when the model is not known.

    Case-insensitive prefix match after dropping a provider prefix
    (`openai/gpt-4o`) and a fine-tune wrapper (`ft:gpt-4o-mini:org::id`):
    gpt-4o, gpt-4.1, gpt-4.5, gpt-5, gpt-oss, o1, o3, o4, codex → o200k_base;
    gpt-4, gpt-3.5, text-embedding-3 → cl100k_base.
    """

@final
class BlockHasher:
    """The incremental chained-block-hash state of a token sequence (immutable).

    Holds the last full block's hash, the block count and the tail (fewer than
    `block_size` tokens), so `extend` costs O(new tokens) however long the
    sequence is. Hashes are returned as bytes, 8 per block (XXH3-64,
    canonical big-endian form); see docs/tokens.md for the definition.
    """

    def __new__(cls, block_size: int = 16, *, seed: int = 0) -> BlockHasher:
        """`block_size` ≥ 1 (ValueError otherwise); `seed` is the XXH3 seed (0 ≤ seed < 2**64)."""
    @property
    def block_size(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def blocks(self) -> int:
        """Full blocks hashed so far."""
    @property
    def tokens(self) -> int:
        """Tokens seen so far (full blocks and tail)."""
    @property
    def block_tokens(self) -> int:
        """Tokens covered by full blocks (`blocks * block_size`)."""
    @property
    def tail(self) -> array[int]:
        """The tokens after the last full block."""
    @property
    def last_hash(self) -> bytes | None:
        """The last full block's hash, or None before the first block is full."""
    def extend(self, tokens: _TokenIds) -> tuple[BlockHasher, bytes]:
        """The state after appending `tokens`, and the hashes of the blocks they complete."""
    def extend_item(
        self, tokenizer: Tokenizer, item_json: bytes | str
    ) -> tuple[BlockHasher, bytes]:
        """`extend(tokenizer.encode_item(item_json))` in one call.

        The item's token count is `new.tokens - self.tokens`.
        """
    def extend_instructions(
        self, tokenizer: Tokenizer, instructions: str
    ) -> tuple[BlockHasher, bytes]:
        """`extend(tokenizer.encode_instructions(instructions))` in one call."""
    def __eq__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

def block_hashes(tokens: _TokenIds, block_size: int = 16, *, seed: int = 0) -> bytes:
    """The hashes of every full block of `tokens`, from scratch (8 bytes each)."""

def shared_prefix_blocks(a: bytes, b: bytes) -> int:
    """Number of equal leading block hashes of two hash buffers.

    ValueError if a length is not a multiple of 8.
    """

def shared_prefix_tokens(a: bytes, b: bytes, block_size: int = 16) -> int:
    """Tokens covered by the equal leading block hashes.

    That is `shared_prefix_blocks(a, b) * block_size`.
    """

# Message framing (rust/framing; docs/architecture.md "Framing").
#
# Client messages are decoded and validated in one call with the verdicts of
# warmsocket/client_events.py (its reference implementation): bad input is returned
# as a Rejection, never raised. Response events are encoded by a ResponseEncoder
# that returns every frame one call produced as one bytes object.

_Framing: TypeAlias = Literal["json", "websocket", "msgpack", "sse"]
"""How events are framed.

* ``"json"``: each event's JSON followed by ``\\n`` (JSON lines);
* ``"websocket"``: each event as an unmasked server text frame (FIN set);
* ``"msgpack"``: each event as msgpack in a binary frame (FIN set);
* ``"sse"``: ``event: <type>\\ndata: <json>\\n\\n``.
"""

def message_stream_id(data: bytes) -> str | None:
    """The valid `stream_id` at the top level of the JSON object `data`, read without
    parsing the rest (linear, no allocation until found); None when there is none or
    `data` is not such an object. For a message too large to parse: its error goes to
    its lane."""

def parse_client_message(
    data: bytes,
    *,
    websocket: bool = True,
    max_item_bytes: int = 33554432,
    format: Literal["json", "msgpack"] = "json",
) -> CreateRequest | SteerRequest | Rejection | None:
    """Decode and validate one client message; never raises on bad input.

    `websocket=True` reads a WebSocket message (`response.create`, `response.steer`,
    `response.processed`, which gives None); `websocket=False` reads an HTTP create
    body. Errors, messages and params are those of `client_events.py`; see
    `Rejection.stage` for when the session reports them. A create's input is
    converted to `Items` with `max_item_bytes`, after every other check.
    """

@final
class CreateRequest:
    """A valid `response.create` (or HTTP create body)."""

    @property
    def model(self) -> str: ...
    @property
    def stream_id(self) -> str | None:
        """The lane (WebSocket only)."""
    @property
    def previous_response_id(self) -> str | None: ...
    @property
    def generate(self) -> bool:
        """False for a warm-up (`generate: false` or `prompt_cache_options.prewarm`)."""
    @property
    def store(self) -> bool: ...
    @property
    def background(self) -> bool:
        """`background: true` (HTTP only): the response runs on after the request."""
    @property
    def stream(self) -> bool: ...
    @property
    def input(self) -> Items:
        """The new input items, normalised (a string or an "easy" message is a typed message)."""
    @property
    def settings_json(self) -> bytes:
        """The echoed Response fields and `model` as one canonical JSON object."""
    @property
    def settings(self) -> dict[str, Any]:
        """`settings_json` decoded, without `model` (decoded once, then shared)."""
    @property
    def instructions(self) -> str | None: ...
    @property
    def function_names(self) -> tuple[str, ...]:
        """Names of the `function` tools, in order."""
    @property
    def has_tools(self) -> bool: ...
    @property
    def tools_json(self) -> bytes | None:
        """The `tools` array as canonical JSON (as in `settings_json`); None when
        there is no tool."""
    @property
    def prompt_bytes(self) -> int:
        """Bytes of the instructions (UTF-8) and of `tools_json`: what the prompt
        starts with, for deciding where to tokenise it."""
    @property
    def tools_digest(self) -> int | None:
        """XXH3-64 of `tools_json` (to tell one set of tools from another without
        comparing them); None when there is no tool."""
    @property
    def compact_threshold(self) -> int | None:
        """Server-side compaction asked for (`context_management`, validated as the
        API's schema has it): the first entry's `compact_threshold` in tokens (at least
        1,000), else 100,000; None when none was asked for."""
    @property
    def has_item_references(self) -> bool:
        """The input has an `item_reference` item (`{"type": "item_reference", "id"}`),
        which the engine replaces with the stored item it names."""
    @property
    def max_output_tokens(self) -> int | None:
        """`max_output_tokens` (as in `settings`; at most 2**64 - 1), without decoding
        the settings."""
    @property
    def upstream_options_json(self) -> bytes | None:
        """The body fields only an upstream acts on, for a Responses upstream: `image`,
        `prompt` and `moderation` (`responses_only`), `access_programs`, and
        `prompt_cache_options` less `prewarm` (warmsocket's own) and
        `comparison_response_id` (a response id), null members left out, as one
        canonical JSON object; None when there is none."""
    @property
    def include(self) -> tuple[str, ...]:
        """`include` as sent (validated: an array of strings, or null), such as
        `("reasoning.encrypted_content",)`; empty when absent or null."""
    @property
    def responses_only(self) -> tuple[str, ...]:
        """Of `prompt` (a template stored at OpenAI) and `moderation` (moderated
        completions), in that order, those the body has: only a Responses upstream
        can honour them (they are in `upstream_options_json`), so another backend
        refuses them."""
    @property
    def conversation(self) -> str | None:
        """The `conversation`'s id (sent as it, or as an object's `id`): its items come
        before the input, and it gets this response's input and output."""
    @property
    def model_from_prompt(self) -> bool:
        """The body gave no `model` (its `prompt`'s template names one): `model` is
        `"default"`, and an upstream is sent none."""
    @property
    def given_defaults(self) -> tuple[str, ...]:
        """Of `temperature`, `top_p` and `service_tier` (in that order), those the
        client gave at the API's default value (1, 1, `"default"`), which `settings`
        cannot tell from leaving them out. They are still forwarded: an upstream's
        own default may differ (a model's sampling defaults; OpenAI's `auto` tier)."""
    @property
    def ignored_fields(self) -> tuple[str, ...]:
        """Body fields the API does not know (ignored), sorted."""
    def successor(self, input: Items, previous_response_id: str) -> CreateRequest:
        """The same request with new input, chained to `previous_response_id`, generating."""

@final
class SteerRequest:
    """A valid `response.steer`."""

    @property
    def previous_response_id(self) -> str: ...
    @property
    def input(self) -> Items:
        """The steering input as user messages."""
    @property
    def input_json(self) -> bytes:
        """The `input` field as sent (a string or an array), as JSON."""

@final
class Rejection:
    """A refused client message: the error to report and when to report it."""

    @property
    def code(self) -> str: ...
    @property
    def message(self) -> str:
        """Never holds conversation content."""
    @property
    def param(self) -> str | None: ...
    @property
    def status(self) -> int: ...
    @property
    def type(self) -> str: ...
    @property
    def stage(self) -> Literal["message", "create", "steer"]:
        """`message`: step 1 (JSON, type, stream_id), report at once; `create`: a create
        body error, reported on its lane when the request reaches the front; `steer`: an
        invalid `response.steer` (`response.steer.failed` with `invalid_input`)."""
    @property
    def stream_id(self) -> str | None:
        """The create's lane, once step 1 passed."""
    @property
    def previous_response_id(self) -> str | None:
        """The body's `previous_response_id` when it is a string."""
    @property
    def steer_input_json(self) -> bytes | None:
        """A refused steer's input as canonical JSON when the input itself is valid
        (another field was wrong), for `response.steer.failed` to give back."""

_Usage: TypeAlias = tuple[int, int, int] | tuple[int, int, int, int]
"""(input_tokens, cached_tokens, output_tokens[, reasoning_tokens]): reasoning tokens
are part of the output tokens (0 when not given)."""

@final
class ResponseEncoder:
    """The events of one response, encoded and framed the moment they are produced.

    Owns the `sequence_number` (from 0), `output_index` / `content_index`, item ids
    and the `stream_id` echo; keeps the output items as canonical `Items`. Every
    method returns the frames it produced as one bytes object (possibly empty).
    `settings` is a JSON object of the echoed fields and `model`
    (`CreateRequest.settings_json`). Not thread-safe: one response, one task.
    """

    def __new__(
        cls,
        response_id: str,
        *,
        settings: bytes,
        created_at: int,
        previous_response_id: str | None = None,
        store: bool = True,
        stream_id: str | None = None,
        framing: _Framing = "json",
        background: bool = False,
    ) -> ResponseEncoder:
        """ValueError when `settings` is not a JSON object or `framing` is unknown.
        `background`: a background response (HTTP `background: true`)."""
    def start(self) -> bytes:
        """`response.created` and `response.in_progress`; for a background response
        `response.created` and `response.queued` (status `queued` until `in_progress`)."""
    def in_progress(self) -> bytes:
        """A queued (background) response starts: `response.in_progress`."""
    def cancel(self) -> bytes:
        """A background response is cancelled: the open item's `.done` events; the
        status is `cancelled` (no terminal event: the API has none for it)."""
    def text_delta(self, text: str) -> bytes:
        """Assistant text (opens a message item when none is open)."""
    def text_deltas(self, texts: list[str]) -> bytes:
        """`text_delta` of each text, in order, in one call: one event per text."""
    def refusal_delta(self, text: str) -> bytes:
        """The model's refusal (`response.refusal.delta`): opens a message whose one
        content part is a `refusal` when none is open (closing the open item)."""
    def tool_call_start(self, call_id: str, name: str, *, custom: bool = False) -> bytes:
        """Close the open item and start a function_call item (with `custom`, a
        custom_tool_call item)."""
    def tool_arguments_delta(self, delta: str) -> bytes:
        """Arguments of the open function_call item, or input of the open custom tool
        call (nothing when neither is open)."""
    def close_item(self, *, incomplete: bool = False) -> bytes:
        """The open item's `.done` events, if an item is open; with `incomplete`, a
        message or function call is closed `status: incomplete` (cut short)."""
    def reasoning_start(self, item_id: str | None = None) -> bytes:
        """Close the open item and open a reasoning item (`output_item.added`) whose
        parts then come as `reasoning_delta`s; it ends with `output_item` (the whole
        item, adding what was not streamed) or when another item starts (built from
        its deltas). `item_id`: the upstream's (a new `rs_` id when None)."""
    def reasoning_delta(self, summary: bool, index: int, delta: str) -> bytes:
        """A delta of summary part `index` (`summary`) or of `reasoning_text` content
        part `index`; opens a reasoning item when none is open, and closes the last
        part when this is another."""
    def output_item(self, item: bytes) -> bytes:
        """A whole output item of a type not built from deltas (a JSON object): closes
        the open item. A `reasoning` item gives its events in OpenAI's order (added;
        per summary part and per `reasoning_text` content part: part added, one
        delta, text done, part done; done) and keeps `id` (a new `rs_` id when it has
        none), `summary`, `content` and `encrypted_content`; any other type (custom
        and hosted tool calls) is given as it is in `output_item.added` and
        `output_item.done`. ValueError, with nothing changed, for a `message`, a
        `function_call`, an object without a string `type`, or a malformed
        reasoning item. A reasoning item finishes the streamed one (`reasoning_start`)
        of its id: only the parts not streamed are given, then `output_item.done`; an
        item of the id of the hosted tool call under way (`item_start`) finishes it
        with only its `output_item.done`, and one of a call closed early replaces it
        (its `output_item.done` again, at its index)."""
    def text_logprobs(self, logprobs: bytes) -> None:
        """The log probabilities of the next text delta (a JSON array, as an upstream's
        `response.output_text.delta` carried them): written in that delta's event and
        kept with the message (`output_text.done`, and its text part, where each gets
        its token's `bytes` when it has none). ValueError for anything but an array."""
    def set_response_fields(self, fields: bytes) -> None:
        """Fields the upstream's Response gave about what it did (a JSON object, as
        `ResponsesStreamDecoder` returns them: `service_tier`, `moderation`, ...): the
        Response object has them from now on, each in place of the setting of its name
        or added, and `meta_json` and `terminal_meta` keep them (`response_fields`).
        ValueError for anything but an object."""
    def text_annotation(self, annotation: bytes) -> bytes:
        """An annotation of the message's text (a JSON object with a string `type`: a web
        search's `url_citation`, ...): `response.output_text.annotation.added` with its
        `annotation_index`, and kept in the text part. Opens a message first when none
        is open. ValueError, with nothing changed, for anything else."""
    def item_start(self, item: bytes) -> bytes:
        """A hosted tool call starts (web search, code interpreter, an MCP call...: any
        item type but message, function, custom tool call and reasoning): closes the
        open item and gives `output_item.added` with the item as it is. Its progress
        events then go through `item_event`, and `output_item` with the whole item of
        the same id finishes it; closed before that, it is kept as it started.
        ValueError, with nothing changed, without a non-empty string `id` or for a
        type built from deltas."""
    def item_event(self, event: bytes) -> bytes:
        """A progress event of the hosted tool call under way (a JSON object naming its
        `item_id`), given whole with this response's `sequence_number`, `stream_id`
        and the call's `output_index`; nothing when it names no call under way.
        ValueError when it is not a JSON object with a string `type`."""
    def complete(self, usage: _Usage, *, completed_at: int) -> bytes:
        """Close the open item; `response.completed`."""
    def fail(self, error: bytes, usage: _Usage | None = None) -> bytes:
        """Close the open item; `response.failed` with `error`, a JSON object (`{code,
        message}`, plus `type` and `param` for upstream errors). ValueError otherwise."""
    def incomplete(self, reason: str, usage: _Usage, *, completed_at: int) -> bytes:
        """Close the open item; `response.incomplete` with `incomplete_details.reason`."""
    def event(self, event: bytes) -> bytes:
        """Another event (a JSON object, e.g. steering) numbered in this response's
        sequence, with its `stream_id`. ValueError when it is not a JSON object."""
    @property
    def sequence_number(self) -> int:
        """The number the next event gets."""
    @property
    def status(
        self,
    ) -> Literal["queued", "in_progress", "completed", "failed", "incomplete", "cancelled"]: ...
    @property
    def open_kind(
        self,
    ) -> (
        Literal["message", "refusal", "function_call", "custom_tool_call", "reasoning", "hosted"]
        | None
    ): ...
    @property
    def open_item_id(self) -> str | None:
        """The id of the item under way, of any kind."""
    @property
    def framing(self) -> _Framing: ...
    @property
    def created_at(self) -> int: ...
    @property
    def completed_at(self) -> int | None: ...
    def output_items(self) -> Items:
        """The finished output items, ready for `SessionCache.create(output=...)`."""
    def response_json(self) -> bytes:
        """The Response object now (after a terminal event: the one it carried)."""
    def meta_json(self) -> bytes:
        """status, created_at, completed_at, usage, error, incomplete_details, and
        `response_fields` once `set_response_fields` gave any (JSON)."""
    def terminal_meta(
        self,
        usage: _Usage,
        *,
        completed_at: int,
        incomplete: str | None = None,
        instructions: str | None = None,
    ) -> bytes:
        """The `meta_json` this response will have once it ends `completed` (or,
        with `incomplete` as the reason, `incomplete`), plus `instructions` (the
        prompt's instructions key), last: what the cache stores before the terminal
        event is sent. Changes nothing."""

def frame_event(event: bytes, framing: _Framing) -> bytes:
    """Frame one stand-alone event (a JSON object) for a connection's framing."""

# An upstream's streamed Responses events (rust/framing/upstream.rs).

_DecodedEvent: TypeAlias = (
    tuple[Literal["text"], str]
    | tuple[Literal["args"], str]
    | tuple[Literal["call"], str, str, bool]
    | tuple[Literal["item"], bytes]
    | tuple[Literal["message"]]
    | tuple[Literal["annotation"], bytes]
    | tuple[Literal["item_start"], bytes]
    | tuple[Literal["item_event"], bytes]
    | tuple[Literal["reasoning"], str]
    | tuple[Literal["reasoning_delta"], bool, int, str]
    | tuple[Literal["usage"], int | None, int | None, int | None, int | None]
    | tuple[Literal["incomplete"], str]
    | tuple[Literal["logprobs"], bytes]
    | tuple[Literal["response_fields"], bytes]
    | tuple[Literal["failed"], bytes | None]
    | tuple[Literal["error"], bytes, int | None]
    | tuple[Literal["protocol"]]
)
"""What the model produced: `("text", delta)`, `("args", delta)` (or a custom tool
call's input), `("call", call_id, name, custom)`, `("item", item_json)` (a finished
item of another type: reasoning, custom or hosted tool call, whole),
`("message",)` (a message item starts: text after it is another message),
`("annotation", annotation_json)` (of the message's text: a web search's
`url_citation`, ...), `("item_start", item_json)` (a hosted tool call starts: its
`output_item.added` item), `("item_event", event_json)` (an event naming a hosted
tool call under way, whole: `response.web_search_call.searching` and the like),
`("reasoning", item_id)`
(a reasoning item starts), `("reasoning_delta", summary, index, delta)` (of a
summary part, else of a `reasoning_text` part), `("usage", input_tokens,
cached_tokens, output_tokens, reasoning_tokens)`, `("incomplete", reason)` (the
answer stopped short), `("logprobs", logprobs_json)` (of the text delta that
follows), `("response_fields", fields_json)` (of the terminal event's Response, the
fields that tell what the upstream did: `service_tier`, `moderation`, `tool_usage`,
`prompt_cache_diagnostics`, `prompt_cache_options`, `input_transformations`,
`image`, those present with their shape); or, last, why the stream stopped:
`("failed", error_json)` (`response.failed`, its Response's `error` object),
`("error", error_json, status)` (an `error` event: the nested object of the WebSocket
shape or the flat SSE event), `("protocol",)` (a message that is not a JSON
object)."""

@final
class ResponsesStreamDecoder:
    """One upstream response's Responses API events -> model events, one call per
    chunk of an SSE body or per WebSocket message.

    Only what the model produced is read: text and argument deltas, function calls,
    the terminal event's usage, id and the fields of its Response that tell what the
    upstream did (`response_fields`); text or arguments that came only in a `.done`
    event are emitted then. Lifecycle events that repeat the whole Response
    (`response.created`, `response.in_progress`, by SSE event name) are not parsed.
    Not thread-safe: one response, one task.
    """

    def __new__(cls) -> ResponsesStreamDecoder: ...
    def feed(self, data: bytes) -> list[_DecodedEvent]:
        """The events completed by a chunk of the SSE body."""
    def finish(self) -> list[_DecodedEvent]:
        """The events left when the SSE body ends without a final blank line."""
    def message(self, data: bytes) -> list[_DecodedEvent]:
        """One event as a JSON message (WebSocket mode). Its `type` is read first:
        `response.created` / `in_progress` (which repeat the whole Response) are not
        parsed, terminal events are read for their id, usage and relayed fields
        only; the GIL is released for a large message."""
    @property
    def done(self) -> bool:
        """A terminal event (`response.completed` / `response.incomplete`) arrived."""
    @property
    def started(self) -> bool:
        """An event other than an error arrived."""
    @property
    def response_id(self) -> str | None:
        """The upstream's id of the response, from its terminal event."""

def parse_response_head(data: bytes) -> tuple[int, int, bool, dict[str, str]] | None:
    """The HTTP/1.1 response head at the start of `data`: (its length in bytes, blank
    line included; the status; whether the version is HTTP/1.0; the headers, names
    lowercased, repeated ones joined with ", "), or None until the blank line has
    arrived. ValueError for an invalid status or header line, or a head over 64 KiB."""

@final
class ChunkedBody:
    """An HTTP/1.1 `Transfer-Encoding: chunked` body, decoded: one call per read,
    whatever the number of chunks in it. Extensions and trailers are dropped."""

    def __new__(cls) -> ChunkedBody: ...
    def feed(self, data: bytes) -> bytes:
        """The body bytes `data` completes. ValueError for an invalid chunk size line
        (hexadecimal digits only, at most 1 KiB with extensions), chunk data not
        followed by CRLF, or trailers over 64 KiB."""
    @property
    def chunk_left(self) -> int:
        """Data bytes of the current chunk not received yet (0 between chunks)."""
    def take_rest(self) -> bytes:
        """The bytes that came after the body in the read that ended it (once)."""
    @property
    def done(self) -> bool:
        """The last chunk and its trailers were read."""
    @property
    def trailing(self) -> bool:
        """Bytes came after the end of the body (do not reuse the connection)."""

@final
class ClientFrames:
    """A client's WebSocket frames split off its byte stream, one call per read.

    A final, unfragmented, uncompressed text or binary frame (a whole message) comes
    out as its unmasked payload. Every other frame (ping, pong, close, the pieces of a
    fragmented message) comes out as its raw bytes, whole, for the `websockets`
    protocol object, which so always sits at a frame boundary. A frame this reader
    does not accept (unmasked, RSV bits, unknown opcode, fragmented or long control
    frame, payload over `max_size`) hands the rest of the stream over to the protocol
    object for good, which then fails the connection with the right close code; an
    oversized frame is handed over from its header, its payload never buffered.
    Only for connections without extensions.
    """

    def __new__(cls, max_size: int | None = None) -> ClientFrames: ...
    def feed(self, data: bytes) -> list[tuple[bool, bool, bytes]]:
        """What `data` completes, in order: `(True, text, payload)` for a whole message
        (`text`: of a text frame), `(False, False, raw)` for bytes to pass to the
        protocol object's `receive_data` (adjacent raw frames joined). A partial
        frame at the end is kept."""
    @property
    def handed_over(self) -> bool:
        """The stream goes to the protocol object for good."""
    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held until the rest arrives."""
    def take_buffered(self) -> bytes:
        """The held bytes of an incomplete frame, taken out (for the protocol object
        when the caller stops using this reader)."""
