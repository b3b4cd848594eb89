"""Small memos of what an agent sends on every turn (its instructions, its tools), kept
bounded by their keys' size as well as their count.

An agent sends the same instructions and tools on every turn, so what is computed
from them (token counts, a digest) is remembered by their content. The content can
be as large as a message (`--max-message-bytes`, 32 MiB): a memo bounded by entries
alone could be made to hold hundreds of such strings by requests that each send
other instructions. So a `Memo` also bounds the characters of its keys: one larger
than a quarter of that is not kept (computed each time, as its request's parsing
costs in any case), and the oldest entries go to make room.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

ENTRIES = 256
KEY_CHARS = 8 * 1024 * 1024
"""Characters of string keys a memo keeps at most (8 Mi: 256 prompts of 32 Ki)."""


class Memo(Generic[K, V]):
    """`get(key, chars, compute)`: `compute()` once per key while it is kept. `chars`:
    the size of the key's strings (0 for a digest)."""

    def __init__(self, entries: int = ENTRIES, key_chars: int = KEY_CHARS) -> None:
        self.entries = entries
        self.key_chars = key_chars
        self._values: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._chars = 0

    def __contains__(self, key: K) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    @property
    def chars(self) -> int:
        """Characters of the keys kept."""
        return self._chars

    def get(self, key: K, chars: int, compute: Callable[[], V]) -> V:
        found = self._values.get(key)
        if found is not None:
            return found[0]
        value = compute()
        if chars > self.key_chars // 4:
            return value  # too large to keep
        values = self._values
        while values and (len(values) >= self.entries or self._chars + chars > self.key_chars):
            _key, (_value, dropped) = values.popitem(last=False)
            self._chars -= dropped
        values[key] = (value, chars)
        self._chars += chars
        return value
