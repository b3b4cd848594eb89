"""`small_json.loads`: what `json.loads` gives, and only ValueError for what is not
a JSON value it can decode (its callers catch ValueError alone)."""

from __future__ import annotations

import pytest

from warmsocket import small_json


def test_values_as_json_loads_gives_them() -> None:
    assert small_json.loads(b'{"a": [1, 2.5, "\\u00e9", null]} trailing') == {
        "a": [1, 2.5, "é", None]
    }
    assert small_json.loads(b'  ["leading space"]') == ["leading space"]
    deep = b"[" * 400 + b"]" * 400
    assert small_json.loads(deep) is not None


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b" " + b'{"a":' * 100_000,  # the slow path
        b"{nope",
        b'"\xff"',
    ],
    ids=["deep-unclosed", "deep", "deep-slow-path", "not-json", "not-utf8"],
)
def test_what_cannot_be_decoded_is_a_value_error(data: bytes) -> None:
    """Nesting too deep for the decoder too: it raised RecursionError, which an
    upstream's chunk decoder (catching ValueError) let through as a crash instead of
    the upstream's protocol error."""
    with pytest.raises(ValueError):
        small_json.loads(data)
