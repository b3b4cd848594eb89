"""Identifiers: opaque, prefixed, unguessable."""

from __future__ import annotations

import os

# 24 random bytes = 48 hex characters, close to the 50 the real service uses.
_RANDOM_BYTES = 24


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

    Derived, not stored, so `GET .../input_items` can page with `after=<id>`.
    """
    return f"msg_{response_id.removeprefix('resp_')}{index:04x}"
