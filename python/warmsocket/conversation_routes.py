"""The Conversations API's HTTP routes, over `conversations.Conversations`.

`POST /v1/conversations`, `GET`/`POST`/`DELETE /v1/conversations/{id}`,
`POST`/`GET /v1/conversations/{id}/items`, `GET`/`DELETE
/v1/conversations/{id}/items/{item_id}`: the answers the `openai` SDK's
`client.conversations` reads. `include` is accepted and has nothing to add (items
are kept whole).
"""

from __future__ import annotations

from typing import Any

from warmsocket import errors
from warmsocket.client_events import decode_json
from warmsocket.conversations import Conversations
from warmsocket.http11 import Request
from warmsocket.pages import page_params


async def answer(
    conversations: Conversations, request: Request, owner: str, path: list[str]
) -> tuple[int, Any]:
    """(status, JSON value) for a request whose path is `/v1/conversations` + `path`
    (the parts after it). Raises APIError."""
    method = request.method
    if not path:
        if method != "POST":
            raise errors.method_not_allowed(method, request.path)
        return 200, (await conversations.create(owner, _body(request))).object()
    conv_id, rest = path[0], path[1:]
    if not rest:
        if method == "GET":
            return 200, (await conversations.fresh(owner, conv_id)).object()
        if method == "POST":
            return 200, (await conversations.update(owner, conv_id, _body(request))).object()
        if method == "DELETE":
            await conversations.delete(owner, conv_id)
            return 200, {"id": conv_id, "object": "conversation.deleted", "deleted": True}
        raise errors.method_not_allowed(method, request.path)
    if rest[0] != "items" or len(rest) > 2:
        raise errors.not_found_route(method, request.path)
    if len(rest) == 1:
        if method == "POST":
            added = await conversations.add_items(owner, conv_id, _body(request))
            return 200, {
                "object": "list",
                "data": added,
                "first_id": added[0]["id"] if added else None,
                "last_id": added[-1]["id"] if added else None,
                "has_more": False,
            }
        if method == "GET":
            limit, order = page_params(request)
            after = request.query_value("after")
            return 200, await conversations.list_items(
                owner, conv_id, after=after, limit=limit, order=order
            )
        raise errors.method_not_allowed(method, request.path)
    item_id = rest[1]
    if method == "GET":
        return 200, (await conversations.fresh(owner, conv_id)).listed_item(item_id)
    if method == "DELETE":
        return 200, (await conversations.delete_item(owner, conv_id, item_id)).object()
    raise errors.method_not_allowed(method, request.path)


def _body(request: Request) -> Any:
    return decode_json(request.body) if request.body else {}
