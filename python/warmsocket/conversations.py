"""The Conversations API's state: conversations and their items, by owner.

A conversation is an ordered list of items with ids, its metadata and its creation
time (`POST /v1/conversations`, `GET`/`POST`/`DELETE /v1/conversations/{id}`, and
`/items` to add, list, read and delete items). `openai-agents`'
`OpenAIConversationsSession` keeps an agent's history in one; a create with
`conversation` reads it as the context before its input and, when it ends
`completed` or `incomplete`, has its input and output added (`engine.py`).

Items are validated as a create's input is (`client_events.normalize_input`,
`Items.from_objects`) and kept as they came (canonical JSON), each with an id (its
own, else a new one): a create with the conversation reads them as its context byte
for byte as the previous response's chain holds them, so prefix diffing finds that
chain and only the new input is new work. They are listed as the API lists them
(a message's content as parts, a `status`). Conversations are private to the owner
(the bearer token) that made them.

Without Redis they live in this process, within `budget_bytes` of item JSON: an
addition that would pass it is refused (503), nothing already kept is dropped. With
`--redis-url` (a `ConversationBoard`, `shared_conversations.py`) Redis holds them
and this process keeps copies of those it used, the least recently used dropped to
stay within the budget; every use first checks (`fresh`) that the copy is the
conversation as Redis has it. Changes through the API are written to Redis before
they are answered, after the conversation's additions still written behind (a
retriable 503 when those are not written in time: Redis does not answer); a
response's input and output are added to the copy at once (the copy kept when it
ends: read again meanwhile, or kept again if it was dropped) and written behind it,
in order, tried again while Redis does not answer (`write_retry`;
`aclose` writes what is left). An addition Redis did not get (dropped from a full
queue, or given up with `--redis-write-retry`) is not left as a hole: the copy is
written whole once Redis answers (`_repair`), if no other process changed the
conversation since; if one did, the conversation is marked incomplete in Redis, and
a create refuses to continue it (409 `conversation_incomplete`) rather than answer
from a context that lacks items.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack  # type: ignore[import-untyped]

from warmsocket import errors, ids
from warmsocket._core import InvalidItems, Items
from warmsocket.client_events import COMPACTION_TRIGGER, normalize_input, validate_metadata
from warmsocket.compaction_items import check_sent
from warmsocket.conversation_holds import HoldBoard, SharedHolds
from warmsocket.errors import APIError
from warmsocket.logs import Tally
from warmsocket.pages import list_object, page_range
from warmsocket.write_retry import keep_trying

log = logging.getLogger("warmsocket.conversations")

DEFAULT_CONVERSATION_BUDGET = 256 * 1024 * 1024
"""Item bytes all conversations may hold (`--conversation-budget`)."""

SNAPSHOT_VERSION = 1
"""The format of `Conversations.snapshot`."""
CONVERSATION_OVERHEAD = 1024
"""Bytes a conversation counts against the budget besides its items (the object, its
id, owner and metadata's containers)."""
ITEM_OVERHEAD = 128
"""Bytes an item counts besides its JSON (its id, its place in the lists)."""
MAX_QUEUED_ADDITIONS = 100_000
"""Additions waiting to be written to Redis at most (it does not answer); more are
dropped from the shared conversation (kept in this process's copy), logged and
counted."""
MAX_QUEUED_ADDITION_BYTES = 256 * 1024 * 1024
"""What they may hold, besides their count."""
DELETED_KEPT = 4096
"""Conversations deleted through this process it remembers (`Conversations._deleted`)."""
MAX_ITEMS_PER_ADD = 20
"""Items one request may add (the API's limit)."""

ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "reasoning": "rs",
    "program": "cm",
    "program_output": "cmo",
    "additional_tools": "at",
}
"""The prefix of a new item id, by item type (`item` for the others)."""

Entries = list[tuple[str, bytes]]
"""Items as (id, canonical JSON), oldest first."""

Change = tuple[int, int]
"""(version before, version after) of a change written to Redis."""


class Stored(Protocol):
    """A conversation as Redis has it (`shared_conversations.Stored`)."""

    version: int
    created_at: int
    metadata: dict[str, str]
    entries: Entries
    incomplete: bool


class ConversationBoard(HoldBoard, Protocol):
    """Where conversations are shared with other processes (`shared_conversations`),
    and held by the one generating a response to them (`conversation_holds`). Every
    call raises `engine.SharedStoreUnavailable` when Redis does not answer."""

    async def create(
        self, owner: str, conv_id: str, created_at: int, metadata: bytes, entries: Entries
    ) -> None: ...
    async def version(self, owner: str, conv_id: str) -> int | None: ...
    async def read(self, owner: str, conv_id: str) -> Stored | None: ...
    async def append(self, owner: str, conv_id: str, entries: Entries) -> Change | None: ...
    async def set_metadata(self, owner: str, conv_id: str, metadata: bytes) -> Change | None: ...
    async def replace(
        self, owner: str, conv_id: str, version: int, entries: Entries
    ) -> Change | None: ...
    async def append_at(
        self, owner: str, conv_id: str, version: int, entries: Entries
    ) -> Change | None: ...
    async def mark_incomplete(self, owner: str, conv_id: str) -> Change | None: ...
    async def delete_item(self, owner: str, conv_id: str, item_id: str) -> Change | None: ...
    async def delete(self, owner: str, conv_id: str) -> bool: ...


@dataclass(slots=True)
class Conversation:
    id: str
    owner: str
    created_at: int
    metadata: dict[str, str]
    items: Items = field(default_factory=lambda: Items.from_objects([]))
    """Oldest first, each as it came (canonical JSON): the context a create with this
    conversation reads, byte for byte what the previous one's chain holds, so prefix
    diffing finds that chain."""
    item_ids: list[str] = field(default_factory=list)
    """The id of each of `items` (its own, else one given when it was added)."""
    version: int | None = None
    """With Redis: the version this copy is (None: to be read again)."""
    pending: int = 0
    """With Redis: additions of responses not written yet (the copy is ahead)."""
    drained: asyncio.Event | None = None
    """With Redis: set when `pending` falls back to 0, for the API changes waiting for
    that (`Conversations._written`; made by the first of them)."""
    charged: int = 0
    """What it counts against the budget now (`cost`, as of its last change)."""
    unshared: bool = False
    """With Redis: the copy holds items Redis lacks (an addition was dropped or given
    up): it is to be written whole (`Conversations._repair`)."""
    repair_queued: bool = False
    unsure: set[str] = field(default_factory=set)
    """The ids of the items whose addition was given up or dropped: Redis may lack
    them (a write given up may still have been done)."""
    incomplete: bool = False
    """Redis says items of it were lost: it is not continued."""
    deleted: bool = False
    """Known deleted (through this process, or Redis no longer has it): a response
    that continued it adds nothing (`Conversations.extend`)."""

    def cost(self) -> int:
        """What it counts against `--conversation-budget`: its items' bytes, and what
        the conversation and each item hold besides (an empty conversation is not
        free: many of them must fill the budget too)."""
        return CONVERSATION_OVERHEAD + _metadata_cost(self.metadata) + items_cost(self.items)

    def object(self) -> dict[str, Any]:
        """The Conversation object."""
        return {
            "id": self.id,
            "object": "conversation",
            "created_at": self.created_at,
            "metadata": self.metadata,
        }

    def listed_items(self, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
        """The items `[start, end)` as the API lists them, oldest first (only those
        are converted)."""
        end = len(self.item_ids) if end is None else end
        return [
            listed({**item, "id": item_id})
            for item, item_id in zip(
                self.items.slice(start, end).to_objects(), self.item_ids[start:end], strict=True
            )
        ]

    def listed_item(self, item_id: str) -> dict[str, Any]:
        position = self.position(item_id)
        (item,) = self.items.slice(position, position + 1).to_objects()
        return listed({**item, "id": item_id})

    def position(self, item_id: str) -> int:
        """The index of the item with this id. Raises APIError (404)."""
        try:
            return self.item_ids.index(item_id)
        except ValueError:
            raise not_found("item", item_id) from None

    def settle(self, change: Change, *, written_behind: bool = False) -> None:
        """A change this process wrote: the copy is Redis' conversation if nobody
        changed it in between, else it is to be read again. An API change also when a
        response of this process added to the copy while it was written (that
        addition, written behind, would come after it in Redis but before it here);
        the additions written behind (`written_behind`) are in the copy's order."""
        before, after = change
        current = self.version == before and (written_behind or not self.pending)
        self.version = after if current else None


def not_found(what: str, found_id: str, param: str | None = None) -> APIError:
    shown = found_id if len(found_id) <= 64 else found_id[:64] + "..."
    return APIError(
        None,
        f"{what.capitalize()} with id '{shown}' not found.",
        param=param or f"{what}_id",
        status=404,
    )


def conversation_id() -> str:
    return ids.new_id("conv")


def new_item_ids(items: Items) -> list[str]:
    """Each item's own id, else a new one with its type's prefix."""
    found = []
    for index in range(len(items)):
        meta = items.item_meta(index)
        found.append(meta.id or ids.new_id(ID_PREFIXES.get(meta.type, "item")))
    return found


def refuse_duplicate_ids(items: Items, *, param: str, kept: Collection[str] = ()) -> None:
    """Raises APIError (400, OpenAI's "Duplicate item found") for an id given twice in
    `items`, or one `kept` (the conversation's) holds: a list holding an id twice
    cannot be paged through by it (`pages.page_range`), nor an item read by it. Items
    without an id get new ones. One pass in Rust (a full replay re-sends hundreds of
    items with ids every turn); the conversation's ids are gathered only for a
    request whose items have ids."""
    taken = set(kept) if kept and any(items.ids()) else None
    duplicate = items.first_duplicate_id(taken)
    if duplicate is not None:
        raise errors.duplicate_item(duplicate, param)


def entries(items: Items, item_ids: list[str]) -> Entries:
    return [(item_id, items.item_json(i)) for i, item_id in enumerate(item_ids)]


def _metadata_cost(metadata: dict[str, str]) -> int:
    return sum(len(key) + len(value) for key, value in metadata.items())


def _metadata_json(metadata: dict[str, str]) -> bytes:
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode()


class Answering(Protocol):
    """A response being generated (`engine.Turn`)."""

    @property
    def finished(self) -> bool: ...


def let_go_of_nothing() -> None:
    """What `Conversations.take` answers without a board: nothing to let go of."""


class Conversations:
    """The conversations this process serves: all of them, or with a board the copies
    of those it used."""

    def __init__(
        self, *, budget_bytes: int, max_item_bytes: int, board: ConversationBoard | None = None
    ) -> None:
        self.budget_bytes = budget_bytes
        self.max_item_bytes = max_item_bytes
        self.board = board
        self.holds = None if board is None else SharedHolds(board)
        """With a board: this process's holds on conversations across processes."""
        self._by_id: OrderedDict[str, Conversation] = OrderedDict()
        """Least recently used first."""
        self.nbytes = 0
        self.write_errors = 0
        self._writes: asyncio.Queue[tuple[Conversation, Entries | None, int, bool]] | None = None
        """Additions to write (None: the whole copy, `_repair`), in order, and whether
        each holds its conversation (`holds`) until it is written."""
        self._writer: asyncio.Task[None] | None = None
        self._unwritten = 0
        """Additions queued or being written."""
        self._unwritten_bytes = 0
        """What they hold."""
        self._drops = Tally()
        self._deleted: OrderedDict[tuple[str, str], None] = OrderedDict()
        """(owner, id) of conversations deleted here lately (`DELETED_KEPT`): a response
        that continued one adds nothing, whichever copy of it it read."""
        self._answering: dict[tuple[str, str], weakref.ref[Answering]] = {}
        """(owner, id) -> the response being generated that will add to it (`take`)."""

    def __len__(self) -> int:
        return len(self._by_id)

    def stats(self) -> dict[str, int]:
        """For `/metrics`: conversations kept, their item bytes, failed writes, holds
        found taken by another process."""
        return {
            "conversations": len(self._by_id),
            "bytes": self.nbytes,
            "write_errors": self.write_errors,
            "hold_conflicts": 0 if self.holds is None else self.holds.conflicts,
        }

    # -- finding ----------------------------------------------------------------------------

    # -- one response at a time ------------------------------------------------------------

    def check_free(self, owner: str, conv_id: str) -> None:
        """Raises APIError (400 `conversation_locked`, as OpenAI answers) while a
        response that will add to the conversation is being generated here: a second
        one would read the conversation without the first's items, and add its own
        before them or between them."""
        held = self._answering.get((owner, conv_id))
        holder = None if held is None else held()
        if holder is not None and not holder.finished:
            raise errors.conversation_locked(conv_id)

    def take(self, owner: str, conv_id: str, response: Answering) -> Callable[[], None]:
        """`response` will add to the conversation when it ends (`check_free` first);
        it is free again once `response` is finished (`leave`), or gone. With a board
        the response holds it across processes (`SharedHolds.adopt`) until the
        callable returned is called (once `leave` was; or when `response` is gone)."""
        key = (owner, conv_id)
        answering = self._answering

        def gone(ref: weakref.ref[Answering]) -> None:
            if answering.get(key) is ref:
                del answering[key]

        answering[key] = weakref.ref(response, gone)
        holds = self.holds
        if holds is None:
            return let_go_of_nothing
        holds.adopt(owner, conv_id)
        let_go = weakref.finalize(response, holds.release, owner, conv_id)
        let_go.atexit = False  # (no loop then: the hold expires)
        return let_go

    def leave(self, owner: str, conv_id: str, response: Answering) -> None:
        held = self._answering.get((owner, conv_id))
        if held is not None and held() is response:
            del self._answering[(owner, conv_id)]

    async def claim(self, owner: str, conv_id: str) -> None:
        """With a board, before a create that will add to the conversation reads it
        (`fresh`): hold it across processes (`SharedHolds.claim`; `unclaim` once the
        create started or was refused). Raises APIError (400 `conversation_locked`:
        another process generates a response to it), SharedStoreUnavailable."""
        if self.holds is not None:
            await self.holds.claim(owner, conv_id)

    def unclaim(self, owner: str, conv_id: str) -> None:
        if self.holds is not None:
            self.holds.release(owner, conv_id)

    def get(self, owner: str, conv_id: str, *, param: str = "conversation_id") -> Conversation:
        """The conversation as this process has it (with a board: as `fresh` left it).
        Raises APIError (404, on `param`) unless the owner has it."""
        conversation = self._by_id.get(conv_id)
        if conversation is None or conversation.owner != owner:
            raise not_found("conversation", conv_id, param)
        self._by_id.move_to_end(conv_id)
        return conversation

    async def fresh(
        self, owner: str, conv_id: str, *, param: str = "conversation_id"
    ) -> Conversation:
        """`get`, first made the conversation as Redis has it when there is a board
        (one round trip when the copy is up to date; its additions still being
        written make it so). Raises APIError (404), SharedStoreUnavailable."""
        board = self.board
        if board is None:
            return self.get(owner, conv_id, param=param)
        kept = self._by_id.get(conv_id)
        if kept is not None and kept.owner == owner and kept.pending:
            return self.get(owner, conv_id, param=param)
        version = await board.version(owner, conv_id)
        kept = self._by_id.get(conv_id)  # (changed while waiting, perhaps)
        current = kept is not None and (kept.version == version or kept.pending > 0)
        if version is not None and kept is not None and kept.owner == owner and current:
            return self.get(owner, conv_id, param=param)
        stored = None if version is None else await board.read(owner, conv_id)
        if stored is None:
            if kept is not None and kept.owner == owner and not kept.pending:
                self._forget_deleted(kept)
            raise not_found("conversation", conv_id, param)
        kept = self._by_id.get(conv_id)
        if kept is not None and kept.owner == owner and kept.pending:
            return self.get(owner, conv_id, param=param)
        joined = b"[" + b",".join(item for _id, item in stored.entries) + b"]"
        copy = Conversation(
            conv_id,
            owner,
            stored.created_at,
            stored.metadata,
            Items.parse(joined, max_item_bytes=max(self.max_item_bytes, len(joined))),
            [item_id for item_id, _item in stored.entries],
            version=stored.version,
            incomplete=stored.incomplete,
        )
        if kept is not None:
            self._forget(kept)
        self._keep(copy)
        return copy

    # -- conversations ----------------------------------------------------------------------

    async def create(self, owner: str, body: Any) -> Conversation:
        """`POST /v1/conversations`: `{items?, metadata?}`. Raises APIError."""
        if not isinstance(body, dict):
            raise errors.invalid_type("body", "a JSON object")
        metadata = body.get("metadata")
        metadata = {} if metadata is None else metadata
        validate_metadata(metadata)
        items = self.validated_items(body.get("items"), param="items")
        item_ids = new_item_ids(items)
        conversation = Conversation(conversation_id(), owner, int(time.time()), dict(metadata))
        if self.board is None:
            self.check_room(conversation.cost() + items_cost(items))
        else:
            await self.board.create(
                owner,
                conversation.id,
                conversation.created_at,
                _metadata_json(conversation.metadata),
                entries(items, item_ids),
            )
            conversation.version = 1
        self._keep(conversation)
        self._append(conversation, items, item_ids)
        return conversation

    async def _changeable(self, owner: str, conv_id: str) -> Conversation:
        """`fresh`, after the additions of this process's responses to it are written:
        an API change then lands after them in Redis, as in the copy. Raises APIError
        (404), SharedStoreUnavailable."""
        conversation = await self.fresh(owner, conv_id)
        if conversation.pending:
            await self._written(conversation)
            conversation = await self.fresh(owner, conv_id)
        return conversation

    async def _written(self, conversation: Conversation) -> None:
        """Wait until the additions written behind of this conversation are written
        (not the other conversations' queued after them). Raises
        SharedStoreUnavailable (a retriable 503) when they are not within twice the
        shared store's socket timeout, as long as a call to Redis takes to fail
        (its timeout and redis-py's one retry): they are tried again for as long as
        Redis does not answer, and the client is not to hang meanwhile."""
        # (Imported here: both modules import engine, which imports this one.)
        from warmsocket import shared_store
        from warmsocket.engine import SharedStoreUnavailable

        try:
            async with asyncio.timeout(2 * shared_store.SOCKET_TIMEOUT):
                while conversation.pending:
                    if conversation.drained is None:
                        conversation.drained = asyncio.Event()
                    await conversation.drained.wait()
        except TimeoutError:
            log.warning(
                "a change to a shared conversation is refused: its responses' additions "
                "are not written yet (Redis does not answer)",
                extra={"conversation": conversation.id, "additions": conversation.pending},
            )
            raise SharedStoreUnavailable(conversation.id) from None

    async def update(self, owner: str, conv_id: str, body: Any) -> Conversation:
        """`POST /v1/conversations/{id}`: `{metadata}` replaces the metadata."""
        conversation = await self._changeable(owner, conv_id)
        if not isinstance(body, dict):
            raise errors.invalid_type("body", "a JSON object")
        if "metadata" not in body:
            raise errors.missing_parameter("metadata")
        metadata = body["metadata"]
        metadata = {} if metadata is None else metadata
        validate_metadata(metadata)
        grown = _metadata_cost(metadata) - _metadata_cost(conversation.metadata)
        if grown > 0:  # (else every conversation could pass the budget by its metadata)
            self.check_room(grown, used=conversation)
        if self.board is not None:
            change = await self.board.set_metadata(owner, conv_id, _metadata_json(metadata))
            if change is None:
                raise not_found("conversation", conv_id)
            conversation.settle(change)
        conversation.metadata = dict(metadata)
        self._charge(conversation)
        return conversation

    async def delete(self, owner: str, conv_id: str) -> None:
        kept = self._by_id.get(conv_id)
        mine = kept if kept is not None and kept.owner == owner else None
        if self.board is not None:
            if not await self.board.delete(owner, conv_id) and mine is None:
                raise not_found("conversation", conv_id)
        elif mine is None:
            raise not_found("conversation", conv_id)
        # Remembered by id: a response running on it may hold another copy (one read
        # again, or dropped to make room), which must not be kept again when it ends.
        self._deleted[(owner, conv_id)] = None
        if len(self._deleted) > DELETED_KEPT:
            self._deleted.popitem(last=False)
        if mine is not None:
            self._forget_deleted(mine)

    # -- items ------------------------------------------------------------------------------

    def validated_items(self, value: Any, *, param: str, kept: Collection[str] = ()) -> Items:
        """Items to add (to a conversation holding `kept`), validated as a create's
        input is. Raises APIError."""
        if value is None:
            value = []
        if not isinstance(value, list):
            raise errors.invalid_type(param, "an array of items")
        if len(value) > MAX_ITEMS_PER_ADD:
            raise errors.invalid_value(
                param,
                f"Invalid '{param}': at most {MAX_ITEMS_PER_ADD} items may be added at a time.",
            )
        normalized = normalize_input(value, param=param)
        for index, item in enumerate(normalized):
            if item.get("type") == "item_reference":
                raise errors.invalid_value(
                    f"{param}[{index}].type",
                    f"Invalid value for '{param}[{index}].type': a conversation holds items, "
                    "not references to them; send the item itself.",
                )
            if item.get("type") == COMPACTION_TRIGGER:
                # (In a conversation's items it would be in the middle of a context.)
                raise errors.invalid_value(
                    f"{param}[{index}].type",
                    f"Invalid value for '{param}[{index}].type': a compaction_trigger asks a "
                    "response for a compaction; send it as the last input item of a create "
                    "that continues the conversation.",
                )
        try:
            items = Items.from_objects(normalized, max_item_bytes=self.max_item_bytes)
        except InvalidItems as exc:
            raise errors.invalid_value(param, f"Invalid '{param}': {exc}") from None
        refuse_duplicate_ids(items, param=param, kept=kept)
        check_sent(items, param=param)
        return items

    async def add_items(self, owner: str, conv_id: str, body: Any) -> list[dict[str, Any]]:
        """`POST /v1/conversations/{id}/items`: `{items}`; the items added, as listed."""
        conversation = await self._changeable(owner, conv_id)
        if not isinstance(body, dict):
            raise errors.invalid_type("body", "a JSON object")
        if "items" not in body:
            raise errors.missing_parameter("items")
        items = self.validated_items(body["items"], param="items", kept=conversation.item_ids)
        item_ids = new_item_ids(items)
        if self.board is None:
            self.check_room(items_cost(items))
        else:
            change = await self.board.append(owner, conv_id, entries(items, item_ids))
            if change is None:
                raise not_found("conversation", conv_id)
            conversation.settle(change)
        first = len(conversation.item_ids)
        self._append(conversation, items, item_ids)
        return conversation.listed_items(first)

    async def delete_item(self, owner: str, conv_id: str, item_id: str) -> Conversation:
        conversation = await self._changeable(owner, conv_id)
        position = conversation.position(item_id)
        if self.board is not None:
            change = await self.board.delete_item(owner, conv_id, item_id)
            if change is None:
                raise not_found("conversation", conv_id)
            if change[0] == change[1]:  # gone from Redis meanwhile
                raise not_found("item", item_id)
            conversation.settle(change)
            position = conversation.position(item_id)  # (the copy may have moved on)
        items = conversation.items
        conversation.items = items.slice(0, position).concat(items.slice(position + 1))
        del conversation.item_ids[position]
        self._charge(conversation)
        return conversation

    async def list_items(
        self, owner: str, conv_id: str, *, after: str | None, limit: int, order: str
    ) -> dict[str, Any]:
        """A page of items, as `GET /v1/conversations/{id}/items` answers it."""
        conversation = await self.fresh(owner, conv_id)
        # Only the page's items are converted (a long conversation, paged through).
        start, end, has_more = page_range(conversation.item_ids, after, limit, order)
        return list_object(conversation.listed_items(start, end), order=order, has_more=has_more)

    # -- a response's input and output ------------------------------------------------------

    def check_room(self, nbytes: int, used: Conversation | None = None) -> None:
        """Raises APIError (503) when `nbytes` more would pass the budget. With a board,
        copies other than `used` are dropped to make room first (they are read again
        from Redis when used), and `used` itself may pass the budget: only copies with
        additions Redis has not taken yet (it does not answer) fill it, and then the
        additions to them wait too (they grew without bound)."""
        if self.nbytes + nbytes <= self.budget_bytes:
            return
        if self.board is None:
            raise errors.server_overloaded(
                "The conversations on this server hold all the item bytes they may "
                f"({self.budget_bytes} bytes, --conversation-budget): delete conversations "
                "or items you no longer need, or raise the budget."
            )
        self._make_room(used)
        held = self.nbytes
        settled = used is not None and not used.pending and not used.unshared
        if used is not None and settled and self._by_id.get(used.id) is used:
            held -= used.charged
        if held + nbytes > self.budget_bytes:
            raise errors.server_overloaded(
                "The conversations on this server hold all the item bytes they may "
                f"({self.budget_bytes} bytes, --conversation-budget) with additions "
                "Redis has not taken yet: it does not answer. Try again later."
            )

    def extend(self, joined: Conversation, items: Items) -> None:
        """A response that continued `joined` ended: its input and output go at the
        end of the conversation's copy kept now (with a board: written to Redis
        behind), unless the conversation was deleted meanwhile (then nowhere)."""
        conversation = self._copy_to_extend(joined)
        if conversation is None:
            return
        item_ids = new_item_ids(items)
        self._append(conversation, items, item_ids)
        if self.board is not None:
            if conversation.unshared:
                conversation.unsure.update(item_ids)
                self._queue_repair(conversation)  # it writes these items too
                return
            added = entries(items, item_ids)
            nbytes = sum(len(item_id) + len(data) for item_id, data in added)
            if (
                self._unwritten >= MAX_QUEUED_ADDITIONS
                or self._unwritten_bytes + nbytes > MAX_QUEUED_ADDITION_BYTES
            ):
                # Redis has not answered for long: this copy keeps the items, and is
                # written whole once Redis answers (as for a write given up).
                self.write_errors += 1
                if (unlogged := self._drops.count()) is not None:
                    log.error(
                        "responses' additions to shared conversations not queued: too "
                        "many while Redis does not answer; the conversations are written "
                        "whole once it does",
                        extra={"queued": self._unwritten, "dropped": unlogged},
                    )
                conversation.unshared = True
                conversation.unsure.update(item_ids)
                self._queue_repair(conversation)
                return
            conversation.pending += 1
            if self.holds is not None:
                # Held (across processes) until the addition is written: another
                # process reads the conversation with it.
                self.holds.adopt(conversation.owner, conversation.id)
            self._write_behind(conversation, added, nbytes, held=True)

    def _copy_to_extend(self, joined: Conversation) -> Conversation | None:
        """The copy a response that read `joined` adds to. With a board the copy
        kept may have changed while it ran: `fresh` read the conversation again
        (another process changed it: that copy has its items, the response's go
        after them, as in Redis), or it was dropped to make room (kept again: it
        holds the additions until they are written, then is read again if Redis
        moved on). None when the conversation was deleted."""
        kept = self._by_id.get(joined.id)
        if kept is not None:
            return kept if kept.owner == joined.owner else None
        deleted = joined.deleted or (joined.owner, joined.id) in self._deleted
        if self.board is None or deleted:
            return None  # (without a board copies are only ever dropped when deleted)
        self._keep(joined)
        return joined

    def _queue_repair(self, conversation: Conversation) -> None:
        """Queue the writing of the whole copy (once: it holds nothing but the copy,
        which it keeps from being dropped, so the queue takes it past its bounds)."""
        if conversation.repair_queued:
            return
        conversation.repair_queued = True
        conversation.pending += 1
        self._write_behind(conversation, None, 0)

    def _write_behind(
        self,
        conversation: Conversation,
        added: Entries | None,
        nbytes: int,
        *,
        held: bool = False,
    ) -> None:
        if self._writes is None:
            self._writes = asyncio.Queue()
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        self._writes.put_nowait((conversation, added, nbytes, held))
        self._unwritten += 1
        self._unwritten_bytes += nbytes

    async def _write_loop(self) -> None:
        queue = self._writes
        assert queue is not None
        while True:
            # (A call of its own: nothing of a write is held while the loop waits.)
            await self._write_one(queue, *await queue.get())

    async def _write_one(
        self,
        queue: asyncio.Queue[tuple[Conversation, Entries | None, int, bool]],
        conversation: Conversation,
        added: Entries | None,
        nbytes: int,
        held: bool,
    ) -> None:
        """Write one queued addition (`added`; None: the whole copy, `_repair`)."""
        assert self.board is not None
        try:
            if added is None:
                await self._repair(conversation)
                return
            if conversation.unshared:
                # Queued before an addition ahead of it was given up: written with
                # the whole copy (queued after it), not after the hole.
                conversation.unsure.update(item_id for item_id, _item in added)
                self._queue_repair(conversation)
                return
            change = await self._write_addition(conversation, added)
        except Exception as exc:
            # Logged by the board; this copy keeps the items, and is not read
            # again over them (its version stays): it is written whole later.
            self.write_errors += 1
            log.error(
                "a response's items could not be added to its shared conversation"
                if added is not None
                else "a shared conversation's items Redis lacks could not be written",
                extra={"conversation": conversation.id, "items": len(added or ())},
            )
            conversation.unshared = True
            if added is not None:
                conversation.unsure.update(item_id for item_id, _item in added)
            kept = self._by_id.get(conversation.id) is conversation
            # Given up (Redis did not answer for --redis-write-retry): written whole
            # later. Not another error (it would fail again at once).
            if kept and (added is not None or isinstance(exc, ConnectionError)):
                self._queue_repair(conversation)
        else:
            if change is None:
                self._forget_deleted(conversation)  # deleted elsewhere meanwhile
            else:
                conversation.settle(change, written_behind=True)
        finally:
            conversation.pending -= 1
            if not conversation.pending and conversation.drained is not None:
                conversation.drained.set()
                conversation.drained = None
            self._unwritten -= 1
            self._unwritten_bytes -= nbytes
            if held and self.holds is not None:
                self.holds.release(conversation.owner, conversation.id)
            queue.task_done()

    async def _repair(self, conversation: Conversation) -> None:
        """Put in Redis the items of the copy whose addition was given up or not
        queued (`unsure`: a write given up may still have been done). Those missing
        from Redis's end go after what it has, as any addition does (other processes'
        additions meanwhile before them). A hole (a later item there, an earlier one
        not) is filled by writing the whole copy, if no other process changed the
        conversation; else its items have no place left: the conversation is marked
        incomplete, and read again. Raises what the board raises (each call tried
        again while Redis does not answer)."""
        conversation.repair_queued = False
        if not conversation.unshared or self._by_id.get(conversation.id) is not conversation:
            return  # written meanwhile, or deleted or dropped
        conversation.unshared = False  # what is added from here on is queued after this
        board = self.board
        assert board is not None
        owner, conv_id = conversation.owner, conversation.id
        written = entries(conversation.items, conversation.item_ids)
        unsure = set(conversation.unsure)
        stored = await keep_trying(lambda: board.read(owner, conv_id), retriable=(ConnectionError,))
        if stored is None:
            self._forget_deleted(conversation)  # deleted elsewhere meanwhile
            return
        there = {item_id for item_id, _item in stored.entries}
        missing = [i for i, (item_id, _) in enumerate(written) if item_id not in there]
        lost = [i for i in missing if written[i][0] in unsure]
        version = stored.version
        change: Change | None = (-1, version)  # (no copy's version: read again)
        if stored.incomplete:
            conversation.incomplete = True
        elif lost:
            at_end = lost == list(range(lost[0], len(written)))
            # A hole: filled only if Redis has nothing the copy lacks, and lacks only
            # the copy's unsure items.
            fillable = len(missing) == len(lost) and [i for i, _ in stored.entries] == [
                item_id for item_id, _ in written if item_id in there
            ]
            if not (at_end or fillable):
                await self._lost_items(conversation, unsure, len(lost))
                return
            tail = written[lost[0] :]
            change = await keep_trying(
                (lambda: board.append_at(owner, conv_id, version, tail))
                if at_end
                else (lambda: board.replace(owner, conv_id, version, written)),
                retriable=(ConnectionError,),
            )
            if change is not None and change[0] == -2:  # changed since it was read
                conversation.unshared = True
                self._queue_repair(conversation)
                return
        conversation.unsure -= unsure
        if change is None:
            self._forget_deleted(conversation)  # deleted elsewhere meanwhile
            return
        conversation.settle(change, written_behind=True)
        if lost:
            log.info(
                "a shared conversation's items Redis lacked were written",
                extra={"conversation": conv_id, "items": len(lost)},
            )

    async def _lost_items(self, conversation: Conversation, unsure: set[str], count: int) -> None:
        """Mark the conversation incomplete in Redis (every process reads it again, and
        creates refuse to continue it)."""
        board = self.board
        assert board is not None
        owner, conv_id = conversation.owner, conversation.id
        marked = await keep_trying(
            lambda: board.mark_incomplete(owner, conv_id), retriable=(ConnectionError,)
        )
        self.write_errors += 1
        log.error(
            "a shared conversation lost items: another process changed it before they "
            "could be put back in their place; it is marked incomplete and cannot be "
            "continued",
            extra={"conversation": conv_id, "items": count},
        )
        conversation.unsure -= unsure
        conversation.incomplete = True
        conversation.version = None  # read again: as Redis has it, incomplete
        if marked is None:
            self._forget_deleted(conversation)

    async def _write_addition(self, conversation: Conversation, added: Entries) -> Change | None:
        """The board's append (done once however often it is tried), tried again
        while Redis does not answer (`write_retry`; the board logs each failure)."""
        board = self.board
        assert board is not None
        return await keep_trying(
            lambda: board.append(conversation.owner, conversation.id, added),
            retriable=(ConnectionError,),  # (engine.SharedStoreUnavailable)
        )

    async def aclose(self, timeout: float = 5.0) -> None:
        """Write the additions still queued (for at most `timeout` seconds; what is
        left then is logged, and lost), then let go of the holds (within what is left
        of `timeout`: those not let go of expire with their lease)."""
        deadline = time.monotonic() + timeout
        if self._writes is not None and self._unwritten:  # (see SharedStore.aclose)
            try:
                await asyncio.wait_for(self._writes.join(), timeout)
            except TimeoutError:
                log.error(
                    "responses' additions to shared conversations dropped at shutdown",
                    extra={"additions": self._unwritten},
                )
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self.holds is not None:
            # (at least a moment: a Redis that answers lets go of them in it)
            await self.holds.aclose(max(deadline - time.monotonic(), 0.05))

    # -- snapshots --------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Every conversation kept, as msgpack (`restore` reads it back): for
        `--snapshot` without Redis."""
        return bytes(
            msgpack.packb(
                {
                    "v": SNAPSHOT_VERSION,
                    "conversations": [
                        {
                            "id": c.id,
                            "owner": c.owner,
                            "created_at": c.created_at,
                            "metadata": c.metadata,
                            "items": entries(c.items, c.item_ids),
                        }
                        for c in self._by_id.values()
                    ],
                },
                use_bin_type=True,
            )
        )

    def restore(self, data: bytes) -> int:
        """Keep the conversations of a `snapshot`; how many. Raises ValueError for data
        that is not one (nothing kept then)."""
        try:
            parsed = msgpack.unpackb(data, raw=False)
            if not isinstance(parsed, dict) or parsed.get("v") != SNAPSHOT_VERSION:
                raise ValueError("not a conversations snapshot of this version")
            restored = []
            for c in parsed["conversations"]:
                item_ids = [str(item_id) for item_id, _json in c["items"]]
                joined = b"[" + b",".join(bytes(j) for _id, j in c["items"]) + b"]"
                items = Items.parse(joined, max_item_bytes=max(len(joined), 1))
                metadata = {str(k): str(v) for k, v in dict(c["metadata"]).items()}
                restored.append(
                    Conversation(
                        str(c["id"]),
                        str(c["owner"]),
                        int(c["created_at"]),
                        metadata,
                        items,
                        item_ids,
                    )
                )
        except (ValueError, KeyError, TypeError, InvalidItems, msgpack.UnpackException) as exc:
            raise ValueError(
                f"cannot read the conversations snapshot ({type(exc).__name__})"
            ) from None
        for conversation in restored:
            self._keep(conversation)
        return len(restored)

    # -- bookkeeping ------------------------------------------------------------------------

    def _append(self, conversation: Conversation, items: Items, item_ids: list[str]) -> None:
        conversation.item_ids.extend(item_ids)
        conversation.items = conversation.items.concat(items)
        self._charge(conversation)
        self._make_room(conversation)

    def _keep(self, conversation: Conversation) -> None:
        self._by_id[conversation.id] = conversation
        conversation.charged = 0
        self._charge(conversation)
        self._make_room(conversation)

    def _forget(self, conversation: Conversation) -> None:
        if self._by_id.get(conversation.id) is conversation:
            del self._by_id[conversation.id]
            self.nbytes -= conversation.charged
            conversation.charged = 0

    def _forget_deleted(self, conversation: Conversation) -> None:
        """`_forget` a conversation that no longer exists (not a copy dropped to make
        room or read again): a response that continued it adds nothing."""
        conversation.deleted = True
        self._forget(conversation)

    def _charge(self, conversation: Conversation) -> None:
        """Count what a kept conversation holds now against the budget."""
        if self._by_id.get(conversation.id) is not conversation:
            return
        cost = conversation.cost()
        self.nbytes += cost - conversation.charged
        conversation.charged = cost

    def _make_room(self, used: Conversation | None) -> None:
        """With a board: drop the least recently used copies (not `used`, none with
        additions still being written) while past the budget."""
        if self.board is None:
            return
        for conversation in list(self._by_id.values()):
            if self.nbytes <= self.budget_bytes:
                return
            if conversation is not used and not conversation.pending:
                self._forget(conversation)


def items_cost(items: Items) -> int:
    """What items count against the budget: their JSON and `ITEM_OVERHEAD` each."""
    return items.nbytes + ITEM_OVERHEAD * len(items)


def listed(item: dict[str, Any]) -> dict[str, Any]:
    """An item with its id, as a conversation lists it: a message's content as parts,
    and a `status` for the items that have one."""
    if item.get("type") in ("function_call", "function_call_output"):
        item.setdefault("status", "completed")
    return with_content_parts(item)


def with_content_parts(item: dict[str, Any]) -> dict[str, Any]:
    """A listed item (changed in place): a message's string content as one part (an
    assistant's `output_text`, else `input_text`), every `output_text` part with its
    `annotations` (which the SDK's types require: a client may leave them out), and
    its `status`."""
    if item.get("type") == "message":
        content = item.get("content")
        if isinstance(content, str):
            part_type = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part_type, "text": content}]
        for part in item["content"] if isinstance(item.get("content"), list) else ():
            if isinstance(part, dict) and part.get("type") == "output_text":
                part.setdefault("annotations", [])
        item.setdefault("status", "completed")
    return item
