"""`item_reference` input items: replaced by the stored items they name.

A client that keeps `store: true` may send an earlier response's items back as
references, `{"type": "item_reference", "id": ...}` (the Vercel AI SDK does so for
every earlier assistant item by default). Before the context is built, each
reference becomes the item it names, so the model, the upstream and the prefix
matching of a re-sent history all see the items themselves.

The ids of the items a response makes name that response (`<prefix>_<the response
id after "resp_">_<output index>`, `ResponseEncoder`), so a reference leads to its
response, and that response's output holds the item. The ids `GET .../input_items`
gives the input items that came without one (`ids.input_item_id`: the response id and
the item's index there) name the response and the index, and the item is read from
that response's input as the listing has it. An item whose id warmsocket did not
make (an upstream's reasoning item, a client's own id) is looked for in the same
responses' outputs, then in the whole contexts of those responses and of
`previous_response_id`. Only the owner's responses are read: stored ones, and the
connection's own (`store: false`) ones in WebSocket mode. A reference nothing
resolves is the API's answer: 404, "Item with id '...' not found.".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from warmsocket import errors, ids
from warmsocket._core import Items, ResponseNotFound, SessionCache

REFERENCE = "item_reference"


def response_of_item(item_id: str) -> str | None:
    """The id of the response whose output an item id of warmsocket's names; None
    for an id of another form."""
    _prefix, separator, rest = item_id.partition("_")
    stem, separator2, index = rest.rpartition("_")
    if not (separator and separator2 and stem and index.isdigit()):
        return None
    return "resp_" + stem


def named_response(item_id: str) -> str | None:
    """The response an item id of warmsocket's names: one of its output items', or
    (`ids.input_item_of`) one of the input items its listing gave an id; None for an
    id of another form."""
    listed = ids.input_item_of(item_id)
    return listed[0] if listed is not None else response_of_item(item_id)


def referenced_responses(items: Iterable[dict[str, Any]]) -> list[str]:
    """The responses the references among `items` name, in order, each once."""
    named = (named_response(item["id"]) for item in items if item.get("type") == REFERENCE)
    return list(dict.fromkeys(r for r in named if r is not None))


def resolve(
    cache: SessionCache,
    items: Items,
    *,
    owner: str,
    connection: int | None,
    previous_response_id: str | None,
    max_item_bytes: int,
) -> Items:
    """`items` with every `item_reference` replaced by the item it names. Raises
    APIError (404) for a reference nothing resolves."""
    objects = items.to_objects()
    wanted = {item["id"] for item in objects if item.get("type") == REFERENCE}
    responses = referenced_responses(objects)
    found: dict[str, dict[str, Any]] = {}
    # Cheap first: the outputs of the responses the references name.
    for response_id in responses:
        _collect(found, _output(cache, response_id, owner, connection))
    # Listed input items, found by index: no search finds them, they have no id.
    for item_id in wanted - found.keys():
        listed = ids.input_item_of(item_id)
        item = None if listed is None else _input_item(cache, *listed, owner, connection)
        if item is not None:
            found[item_id] = item
    if not wanted <= found.keys():
        # Items warmsocket did not name: the whole contexts (the chain's items).
        chains = [previous_response_id] if previous_response_id is not None else []
        for response_id in [*chains, *reversed(responses)]:
            _collect(found, _context(cache, response_id, owner, connection))
            if wanted <= found.keys():
                break
    resolved: list[dict[str, Any]] = []
    for item in objects:
        if item.get("type") != REFERENCE:
            resolved.append(item)
            continue
        target = found.get(item["id"])
        if target is None:
            raise errors.item_not_found(item["id"])
        resolved.append(target)
    return Items.from_objects(resolved, max_item_bytes=max_item_bytes)


def _collect(found: dict[str, dict[str, Any]], items: list[dict[str, Any]]) -> None:
    for item in items:
        item_id = item.get("id")
        if isinstance(item_id, str) and item.get("type") != REFERENCE:
            found.setdefault(item_id, item)


def _output(
    cache: SessionCache, response_id: str, owner: str, connection: int | None
) -> list[dict[str, Any]]:
    """A response's own output items ([] when the owner has no such response)."""
    try:
        info = cache.get(response_id, owner=owner, connection=connection)
        view = cache.view(response_id, owner=owner, connection=connection, tokenize=False)
    except ResponseNotFound:
        return []
    if info.output_items == 0:
        return []
    tail = view.json_from(info.items - info.output_items).lstrip(b",")
    output: list[dict[str, Any]] = json.loads(b"[" + tail + b"]")
    return output


def _input_item(
    cache: SessionCache, response_id: str, index: int, owner: str, connection: int | None
) -> dict[str, Any] | None:
    """The `index`-th input item of a response, as `GET .../input_items` lists it,
    when it came without an id (only then did the listing give it
    `ids.input_item_id`); None otherwise, and when the owner has no such response."""
    # (The engine imports this module: the listing's reader is imported when used.)
    from warmsocket.engine import stored_input

    try:
        info = cache.get(response_id, owner=owner, connection=connection)
        sent = stored_input(info)  # a rebased or conversation response's request input
        if sent is None:
            items = cache.input_items(response_id, owner=owner, connection=connection)
            if index >= len(items):
                return None
            item: dict[str, Any] = json.loads(items.item_json(index))
        elif index < len(sent):
            item = sent[index]
        else:
            return None
    except ResponseNotFound:
        return None
    given = item.get("id")
    return None if isinstance(given, str) and given else item


def _context(
    cache: SessionCache, response_id: str, owner: str, connection: int | None
) -> list[dict[str, Any]]:
    """A response's whole context ([] when the owner has no such response)."""
    try:
        return cache.context_objects(response_id, owner=owner, connection=connection)
    except ResponseNotFound:
        return []
