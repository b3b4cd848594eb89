"""Identifiers: opaque, prefixed, unguessable."""

from __future__ import annotations

import os

# 24 random bytes = 48 hex characters, close to the 50 the real service uses.
_RANDOM_BYTES = 24
_INPUT_ITEM_PREFIX = "msg_"
_MAX_INPUT_INDEX_DIGITS = 8
"""Hex digits of an input item's index (`input_item_id`): far more than any input has."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(_RANDOM_BYTES).hex()}"


def response_id() -> str:
    return new_id("resp")


def message_id() -> str:
    return new_id("msg")


def function_call_id() -> str:
    return new_id("fc")


def call_id() -> str:
    return new_id("call")


def steer_id() -> str:
    return new_id("steer")


def request_id() -> str:
    return new_id("req")


def input_item_id(response_id: str, index: int) -> str:
    """A stable id for the index-th input item of a stored response that came without one.

    Derived, not stored, so `GET .../input_items` can page with `after=<id>`, and an
    `item_reference` can name the item (`input_item_of`).
    """
    return f"{_INPUT_ITEM_PREFIX}{response_id.removeprefix('resp_')}{index:04x}"


def input_item_of(item_id: str) -> tuple[str, int] | None:
    """The (response id, index) an `input_item_id` was made from; None for an id of
    another form.

    The form has no separator (the ids already given out keep working), so it is
    read by length: a response id's random part, then the index in hex."""
    digits = item_id.removeprefix(_INPUT_ITEM_PREFIX)
    stem, index = digits[: 2 * _RANDOM_BYTES], digits[2 * _RANDOM_BYTES :]
    if digits == item_id or not 4 <= len(index) <= _MAX_INPUT_INDEX_DIGITS:
        return None
    if not all(c in "0123456789abcdef" for c in digits):
        return None
    response_id = "resp_" + stem
    named = (response_id, int(index, 16))
    # Only the form `input_item_id` writes (no extra leading zeros): one id per item.
    return named if input_item_id(*named) == item_id else None
