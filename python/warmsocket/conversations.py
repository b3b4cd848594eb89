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
(a message's content as parts, a `status`). Conversations are kept in this process,
private to the owner (the bearer token) that made them, within `budget_bytes` of item
JSON: an addition that would pass it is refused (503), nothing already kept is
dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from warmsocket import errors, ids
from warmsocket._core import InvalidItems, Items
from warmsocket.client_events import normalize_input, validate_metadata
from warmsocket.errors import APIError
from warmsocket.pages import cursor_page

DEFAULT_CONVERSATION_BUDGET = 256 * 1024 * 1024
"""Item bytes all conversations may hold (`--conversation-budget`)."""

MAX_ITEMS_PER_ADD = 20
"""Items one request may add (the API's limit)."""

ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "reasoning": "rs",
}
"""The prefix of a new item id, by item type (`item` for the others)."""


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

    def object(self) -> dict[str, Any]:
        """The Conversation object."""
        return {
            "id": self.id,
            "object": "conversation",
            "created_at": self.created_at,
            "metadata": self.metadata,
        }

    def listed_items(self) -> list[dict[str, Any]]:
        """The items as the API lists them, oldest first."""
        return [
            listed({**item, "id": item_id})
            for item, item_id in zip(self.items.to_objects(), self.item_ids, strict=True)
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


def not_found(what: str, found_id: str) -> APIError:
    shown = found_id if len(found_id) <= 64 else found_id[:64] + "..."
    return APIError(
        None,
        f"{what.capitalize()} with id '{shown}' not found.",
        param=f"{what}_id",
        status=404,
    )


def conversation_id() -> str:
    return ids.new_id("conv")


class Conversations:
    """Every conversation of this process."""

    def __init__(self, *, budget_bytes: int, max_item_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.max_item_bytes = max_item_bytes
        self._by_id: dict[str, Conversation] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._by_id)

    # -- conversations ----------------------------------------------------------------------

    def create(self, owner: str, body: Any) -> Conversation:
        """`POST /v1/conversations`: `{items?, metadata?}`. Raises APIError."""
        if not isinstance(body, dict):
            raise errors.invalid_type("body", "a JSON object")
        metadata = body.get("metadata")
        metadata = {} if metadata is None else metadata
        validate_metadata(metadata)
        items = self.validated_items(body.get("items"), param="items")
        conversation = Conversation(conversation_id(), owner, int(time.time()), dict(metadata))
        self.append(conversation, items)
        self._by_id[conversation.id] = conversation
        return conversation

    def get(self, owner: str, conv_id: str, *, param: str = "conversation_id") -> Conversation:
        """Raises APIError (404, on `param`) unless the owner has this conversation."""
        conversation = self._by_id.get(conv_id)
        if conversation is None or conversation.owner != owner:
            error = not_found("conversation", conv_id)
            error.param = param
            raise error
        return conversation

    def update(self, owner: str, conv_id: str, body: Any) -> Conversation:
        """`POST /v1/conversations/{id}`: `{metadata}` replaces the metadata."""
        conversation = self.get(owner, conv_id)
        if not isinstance(body, dict):
            raise errors.invalid_type("body", "a JSON object")
        if "metadata" not in body:
            raise errors.missing_parameter("metadata")
        metadata = body["metadata"]
        metadata = {} if metadata is None else metadata
        validate_metadata(metadata)
        conversation.metadata = dict(metadata)
        return conversation

    def delete(self, owner: str, conv_id: str) -> None:
        conversation = self.get(owner, conv_id)
        del self._by_id[conv_id]
        self.nbytes -= conversation.items.nbytes

    # -- items ------------------------------------------------------------------------------

    def validated_items(self, value: Any, *, param: str) -> Items:
        """Items to add, validated as a create's input is. Raises APIError."""
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
        try:
            return Items.from_objects(normalized, max_item_bytes=self.max_item_bytes)
        except InvalidItems as exc:
            raise errors.invalid_value(param, f"Invalid '{param}': {exc}") from None

    def add_items(self, owner: str, conv_id: str, body: Any) -> list[dict[str, Any]]:
        """`POST /v1/conversations/{id}/items`: `{items}`; the items added, as listed."""
        conversation = self.get(owner, conv_id)
        if not isinstance(body, dict):
            raise errors.invalid_type("body", "a JSON object")
        if "items" not in body:
            raise errors.missing_parameter("items")
        items = self.validated_items(body["items"], param="items")
        first = len(conversation.item_ids)
        self.append(conversation, items)
        return conversation.listed_items()[first:]

    def check_room(self, nbytes: int) -> None:
        """Raises APIError (503) when `nbytes` more would pass the budget."""
        if self.nbytes + nbytes > self.budget_bytes:
            raise errors.server_overloaded(
                "The conversations on this server hold all the item bytes they may "
                f"({self.budget_bytes} bytes, --conversation-budget): delete conversations "
                "or items you no longer need, or raise the budget."
            )

    def append(self, conversation: Conversation, items: Items) -> None:
        """Add items at the end (a create's input and output, too), each with its own id
        or a new one. Raises APIError (503) when they would pass the budget."""
        self.check_room(items.nbytes)
        for index in range(len(items)):
            meta = items.item_meta(index)
            prefix = ID_PREFIXES.get(meta.type, "item")
            conversation.item_ids.append(meta.id or ids.new_id(prefix))
        conversation.items = conversation.items.concat(items)
        self.nbytes += items.nbytes

    def extend(self, conversation: Conversation, items: Items) -> None:
        """A response that continued `conversation` ended: its input and output go at
        the end, unless the conversation was deleted meanwhile (then nowhere)."""
        if self._by_id.get(conversation.id) is conversation:
            self.append(conversation, items)

    def delete_item(self, owner: str, conv_id: str, item_id: str) -> Conversation:
        conversation = self.get(owner, conv_id)
        position = conversation.position(item_id)
        before = conversation.items.nbytes
        items = conversation.items
        conversation.items = items.slice(0, position).concat(items.slice(position + 1))
        del conversation.item_ids[position]
        self.nbytes -= before - conversation.items.nbytes
        return conversation

    def list_items(
        self, owner: str, conv_id: str, *, after: str | None, limit: int, order: str
    ) -> dict[str, Any]:
        """A page of items, as `GET /v1/conversations/{id}/items` answers it."""
        conversation = self.get(owner, conv_id)
        return cursor_page(conversation.listed_items(), after=after, limit=limit, order=order)


def listed(item: dict[str, Any]) -> dict[str, Any]:
    """An item with its id, as a conversation lists it: a message's content as parts,
    and a `status` for the items that have one."""
    if item.get("type") in ("function_call", "function_call_output"):
        item.setdefault("status", "completed")
    return with_content_parts(item)


def with_content_parts(item: dict[str, Any]) -> dict[str, Any]:
    """A listed item (changed in place): a message's string content as one part (an
    assistant's `output_text`, with its `annotations`; else `input_text`), and its
    `status`."""
    if item.get("type") == "message":
        content = item.get("content")
        if isinstance(content, str):
            part_type = "output_text" if item.get("role") == "assistant" else "input_text"
            part: dict[str, Any] = {"type": part_type, "text": content}
            if part_type == "output_text":
                part["annotations"] = []
            item["content"] = [part]
        item.setdefault("status", "completed")
    return item
