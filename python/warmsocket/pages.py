"""Cursor-paginated lists (`input_items`, a conversation's items): the `limit` and
`order` a request asks for, and the page the API answers with."""

from __future__ import annotations

from typing import Any

from warmsocket import errors
from warmsocket.http11 import Request


def page_params(request: Request) -> tuple[int, str]:
    """`limit` (1 to 100, 20 by default) and `order` (`desc` by default). Raises
    APIError."""
    text = request.query_value("limit") or "20"
    try:
        limit = int(text)
    except ValueError:
        raise errors.invalid_type("limit", "an integer") from None
    if not 1 <= limit <= 100:
        raise errors.invalid_value("limit", "Invalid 'limit': expected 1 to 100.")
    order = request.query_value("order") or "desc"
    if order not in {"asc", "desc"}:
        raise errors.invalid_value("order", "Invalid 'order': expected 'asc' or 'desc'.")
    return limit, order


def cursor_page(
    items: list[dict[str, Any]], *, after: str | None, limit: int, order: str
) -> dict[str, Any]:
    """The list object of `items` (oldest first, each with an `id`) in `order`, from
    the one after `after`, at most `limit` of them. Raises APIError for an `after`
    that names none."""
    if order == "desc":
        items = items[::-1]
    if after is not None:
        positions = [i for i, item in enumerate(items) if item["id"] == after]
        if not positions:
            raise errors.invalid_value("after", "Invalid 'after': no such item in this list.")
        items = items[positions[0] + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
