"""Cursor pages: the range a page covers, found from ids alone, is the page the
whole list would give."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmsocket.errors import APIError
from warmsocket.pages import cursor_page, page_params, page_range


def whole_list_page(
    items: list[dict[str, Any]], after: str | None, limit: int, order: str
) -> dict[str, Any]:
    """The page as it was made before: the whole list ordered, then cut."""
    if order == "desc":
        items = items[::-1]
    if after is not None:
        # An id listed twice is taken where it is listed last (`page_range`).
        positions = [i for i, item in enumerate(items) if item["id"] == after]
        items = items[positions[-1] + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


@given(
    ids=st.lists(st.sampled_from("abcdef"), max_size=12),
    limit=st.integers(1, 5),
    order=st.sampled_from(["asc", "desc"]),
    after=st.one_of(st.none(), st.sampled_from("abcdef")),
)
def test_a_page_from_ids_is_the_whole_lists_page(
    ids: list[str], limit: int, order: str, after: str | None
) -> None:
    items = [{"id": item_id, "n": n} for n, item_id in enumerate(ids)]  # ids may repeat
    if after is not None and after not in ids:
        with pytest.raises(APIError):
            page_range(ids, after, limit, order)
        return
    assert cursor_page(items, after=after, limit=limit, order=order) == whole_list_page(
        items, after, limit, order
    )
    start, end, _ = page_range(ids, after, limit, order)
    assert 0 <= start <= end <= len(ids) and end - start <= limit


@given(
    ids=st.lists(st.sampled_from("abcdef"), max_size=12),
    limit=st.integers(1, 5),
    order=st.sampled_from(["asc", "desc"]),
)
def test_following_last_id_always_ends(ids: list[str], limit: int, order: str) -> None:
    """A client following `last_id` while `has_more` (as the SDK's auto-pagination
    does) reaches the end, and never sees an item twice: with ids x, y, x, z it was
    sent x, y, x, y, x, ... forever. Ids that do not repeat give every item once."""
    items = [{"id": item_id, "n": n} for n, item_id in enumerate(ids)]  # ids may repeat
    seen: list[int] = []
    after = None
    for _ in range(len(ids) + 1):
        page = cursor_page(items, after=after, limit=limit, order=order)
        seen += [item["n"] for item in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    else:
        pytest.fail(f"still more pages after {len(ids) + 1}: {seen}")
    assert len(seen) == len(set(seen))
    if len(set(ids)) == len(ids):
        assert seen == sorted(range(len(ids)), reverse=order == "desc")


class Query:
    """The query of a list request."""

    def __init__(self, **values: str) -> None:
        self.values = values

    def query_value(self, name: str) -> str | None:
        return self.values.get(name)


@pytest.mark.parametrize(
    "text", ["1_0", " 5", "5 ", "+5", "\uff15", "\u0665", "5.0", "x", "--5", "-"]
)
def test_a_limit_is_ascii_digits(text: str) -> None:
    """`int()` reads "1_0", " 5", "+5" and other scripts' digits: the API's `limit` is an
    integer written in ASCII digits, anything else a 400 `invalid_type`."""
    with pytest.raises(APIError) as info:
        page_params(Query(limit=text))  # type: ignore[arg-type]
    assert (info.value.status, info.value.param) == (400, "limit")
    assert page_params(Query(limit="7"))[0] == 7  # type: ignore[arg-type]
    assert page_params(Query())[0] == 20  # type: ignore[arg-type]
