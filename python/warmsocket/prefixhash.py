"""Prompts as token blocks with chained hashes, as inference engines key their KV caches.

A prompt is the instructions (rendered as a `system` message), the tools (rendered
as one item of type `tools` carrying their JSON), then the context's items, each
tokenised with the Rust tokenizer's item template (`_core.Tokenizer.encode_item`,
docs/tokens.md) and cut into blocks whose hashes each cover their parent
(`_core.BlockHasher`). Two prompts share a cached prefix exactly as far as their
leading block hashes are equal.

Used by the router (`new_chain_key`: which replica a new chain goes to) and by the
simulated upstream's prefix cache (`PromptHasher`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from json.scanner import make_scanner
from typing import Any

from warmsocket._core import BlockHasher, Tokenizer

HASH_BYTES = 8
DEFAULT_ENCODING = "o200k_base"

_canonical = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode
_scan = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


@functools.cache
def tokenizer(encoding: str = DEFAULT_ENCODING) -> Tokenizer:
    """One shared tokenizer per encoding (building one costs about 0.2 s the first time)."""
    return Tokenizer.builtin(encoding)


def tools_item(tools: Sequence[Any]) -> bytes:
    """The tools as one item of the prompt (the item template renders its JSON text)."""
    return _canonical({"type": "tools", "tools": list(tools)}).encode()


def context_items(context_json: bytes) -> Iterator[bytes]:
    """The items of a JSON array (as the session cache gives them), one by one, lazily."""
    text = context_json.decode()
    position = text.find("[") + 1
    size = len(text)
    while position < size:
        while position < size and text[position] in " \t\r\n,":
            position += 1
        if position >= size or text[position] == "]":
            return
        _value, end = _scan(text, position)
        yield text[position:end].encode()
        position = end


def new_chain_key(
    instructions: str | None,
    tools: Sequence[Any],
    items: Iterable[bytes],
    *,
    block_tokens: int = 16,
    max_blocks: int = 4,
) -> bytes:
    """A key for the first `max_blocks` token blocks of a prompt.

    It is the hash of the last full block among them, so prompts that agree on their
    first `max_blocks * block_tokens` tokens (a shared system prompt and tools) get the
    same key. A prompt shorter than one block is keyed by a hash of all its tokens.
    """
    tok = tokenizer()
    state = BlockHasher(block_tokens)
    hashes = b""
    limit = block_tokens * max_blocks
    pieces: list[bytes] = []
    if instructions is not None:
        state, hashes = state.extend_instructions(tok, instructions)
    if tools and state.tokens < limit:
        state, more = state.extend_item(tok, tools_item(tools))
        hashes += more
    for item in items:
        if state.tokens >= limit:
            break
        state, more = state.extend_item(tok, item)
        hashes += more
        pieces.append(item)
    full = min(len(hashes) // HASH_BYTES, max_blocks)
    if full:
        return hashes[(full - 1) * HASH_BYTES : full * HASH_BYTES]
    digest = hashlib.blake2b(digest_size=HASH_BYTES)
    digest.update((instructions or "").encode())
    digest.update(tools_item(tools))
    for piece in pieces:
        digest.update(piece)
    return digest.digest()


class PromptHasher:
    """Block hashes of whole prompts, remembering recent ones.

    A prompt that extends a remembered one (the next turn of a conversation sent as a
    full request) is tokenised and hashed only for its new items. Items are JSON bytes.
    """

    def __init__(self, block_tokens: int = 16, *, memory: int = 64) -> None:
        self.block_tokens = block_tokens
        self.memory = memory
        # (instructions, tools) -> recent (items, state, block hashes), most recent last
        self._recent: OrderedDict[
            tuple[str | None, bytes], list[tuple[list[bytes], BlockHasher, list[bytes]]]
        ] = OrderedDict()

    def hash(
        self, instructions: str | None, tools: Sequence[Any], items: list[bytes]
    ) -> tuple[int, list[bytes]]:
        """(prompt tokens, the hash of each full block, 8 bytes each)."""
        tools_json = tools_item(tools) if tools else b""
        key = (instructions, tools_json)
        entries = self._recent.setdefault(key, [])
        self._recent.move_to_end(key)
        best: tuple[list[bytes], BlockHasher, list[bytes]] | None = None
        for entry in reversed(entries):
            known = entry[0]
            longer = best is None or len(known) > len(best[0])
            if longer and len(known) <= len(items) and items[: len(known)] == known:
                best = entry
        tok = tokenizer()
        more = b""
        if best is not None:
            start, state, blocks = len(best[0]), best[1], best[2]
        else:
            start, state, blocks = 0, BlockHasher(self.block_tokens), []
            if instructions is not None:
                state, more = state.extend_instructions(tok, instructions)
            if tools_json:
                state, extra = state.extend_item(tok, tools_json)
                more += extra
        for item in items[start:]:
            state, extra = state.extend_item(tok, item)
            more += extra
        if more:
            blocks = blocks + [more[i : i + HASH_BYTES] for i in range(0, len(more), HASH_BYTES)]
        entries.append((items, state, blocks))
        if len(entries) > 8:
            del entries[0]
        while len(self._recent) > self.memory:
            self._recent.popitem(last=False)
        return state.tokens, blocks


def count_tokens(text: str) -> int:
    return tokenizer().count(text)
