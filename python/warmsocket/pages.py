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
    # ASCII digits only: int() takes "1_0", " 5", "+5" and other scripts' digits too.
    digits = text.removeprefix("-")  # (one sign: "--5" is no number)
    if not (digits.isascii() and digits.isdigit()) or len(text) > 12:
        raise errors.invalid_type("limit", "an integer")
    limit = int(text)
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
    start, end, has_more = page_range([item["id"] for item in items], after, limit, order)
    return list_object(items[start:end], order=order, has_more=has_more)


def page_range(ids: list[str], after: str | None, limit: int, order: str) -> tuple[int, int, bool]:
    """Where the page of a list whose items (oldest first) have `ids` is: the items
    `[start, end)` (in `order`, reversed for `desc`) and whether more follow. Lets a
    long list convert only its page. Raises APIError for an `after` that names none.

    An id the list holds twice (kept before such items were refused) is taken where it
    appears last in `order`: a page that ended on either of them is then followed by
    items past both, so following `last_id` always moves on and ends (the items
    between the two are skipped); taken where it first appears, a client would be sent
    back to them, and round again, forever."""
    count = len(ids)
    if after is None:
        taken = 0  # items of the ordered list before the page
    else:
        try:
            at = count - 1 - ids[::-1].index(after) if order == "asc" else ids.index(after)
        except ValueError:
            raise errors.invalid_value(
                "after", "Invalid 'after': no such item in this list."
            ) from None
        taken = at + 1 if order == "asc" else count - at
    size = min(limit, count - taken)
    has_more = count - taken > limit
    if order == "asc":
        return taken, taken + size, has_more
    return count - taken - size, count - taken, has_more


def list_object(page: list[dict[str, Any]], *, order: str, has_more: bool) -> dict[str, Any]:
    """The list object of a page (its items oldest first) in `order`."""
    if order == "desc":
        page = page[::-1]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": has_more,
    }
