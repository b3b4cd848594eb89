"""Small memos of what an agent sends on every turn (its instructions, its tools), kept
bounded by their keys' size as well as their count.

An agent sends the same instructions and tools on every turn, so what is computed
from them (token counts, a digest) is remembered by their content. The content can
be as large as a message (`--max-message-bytes`, 32 MiB): a memo bounded by entries
alone could be made to hold hundreds of such strings by requests that each send
other instructions. So a `Memo` also bounds the bytes its keys' strings take in
memory (`str_bytes`: a string of 4-byte characters takes four times one of ASCII):
a key larger than a quarter of that is not kept (computed each time, as its
request's parsing costs in any case), and the oldest entries go to make room.

A memo is used from worker threads (token counts are computed off the event loop,
by a tokenizer that releases the GIL): its bookkeeping is under a lock, `compute`
is not (two threads may compute one key at once; it is kept, and counted, once).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from sys import getsizeof
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

ENTRIES = 256
KEY_BYTES = 8 * 1024 * 1024
"""Bytes of string keys a memo keeps at most (8 MiB: 256 ASCII prompts of 32 KiB)."""


def str_bytes(text: str | None) -> int:
    """The bytes a string takes in memory (0 for None): what keeping it costs, which
    its length does not say (Python stores a string in 1, 2 or 4 bytes a character,
    by its widest)."""
    return 0 if text is None else getsizeof(text)


class Memo(Generic[K, V]):
    """`get(key, size, compute)`: `compute()` once per key while it is kept. `size`:
    the bytes of the key's strings (`str_bytes`; 0 for a digest)."""

    def __init__(self, entries: int = ENTRIES, key_bytes: int = KEY_BYTES) -> None:
        self.entries = entries
        self.key_bytes = key_bytes
        self._values: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __contains__(self, key: K) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    @property
    def held_bytes(self) -> int:
        """Bytes of the keys kept."""
        return self._bytes

    def get(self, key: K, size: int, compute: Callable[[], V]) -> V:
        with self._lock:
            found = self._values.get(key)
        if found is not None:
            return found[0]
        value = compute()  # not under the lock: it may take long, and other keys wait not
        if size > self.key_bytes // 4:
            return value  # too large to keep
        with self._lock:
            self._keep(key, value, size)
        return value

    def _keep(self, key: K, value: V, size: int) -> None:
        """Keep `key` (under the lock), the oldest entries dropped to make room."""
        values = self._values
        if key in values:
            return  # another thread computed it meanwhile: its size is counted already
        while values and (len(values) >= self.entries or self._bytes + size > self.key_bytes):
            _key, (_value, dropped) = values.popitem(last=False)
            self._bytes -= dropped
        values[key] = (value, size)
        self._bytes += size
