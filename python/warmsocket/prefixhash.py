"""Token blocks with chained hashes, as inference engines key their prefix (KV) caches.

A prompt is a sequence of tokens cut into fixed-size blocks; the hash of block *i*
covers block *i* and, through its parent's hash, every block before it. Two prompts
share a cached prefix exactly as far as their leading block hashes are equal.

TEMPORARY APPROXIMATION: until the Rust tokenizer (`_core.Tokenizer`,
`_core.BlockHasher`) is merged, "tokens" are `BYTES_PER_TOKEN` bytes of the rendered
prompt and a block is `block_tokens * BYTES_PER_TOKEN` bytes. `BlockHasher.extend` is
the only place that knows this; swapping in the real tokenizer changes only it (and
`token_count`), not its callers (the router's new-chain key and the simulated
upstream's prefix cache).
"""

from __future__ import annotations

import hashlib

BYTES_PER_TOKEN = 4
HASH_BYTES = 16


def token_count(nbytes: int) -> int:
    """Approximate tokens of `nbytes` bytes of rendered prompt (temporary approximation)."""
    return (nbytes + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


class BlockHasher:
    """Incremental chained block hashes of a byte stream (immutable, like `_core.BlockHasher`).

    `extend` costs O(new bytes): the state keeps the last full block's hash and the
    unfinished tail.
    """

    __slots__ = ("block_tokens", "blocks", "last_hash", "tail")

    def __init__(
        self,
        block_tokens: int = 16,
        *,
        blocks: int = 0,
        last_hash: bytes = b"",
        tail: bytes = b"",
    ) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.block_tokens = block_tokens
        self.blocks = blocks
        self.last_hash = last_hash
        self.tail = tail

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * BYTES_PER_TOKEN

    @property
    def tokens(self) -> int:
        """Tokens seen so far (full blocks and the tail)."""
        return self.blocks * self.block_tokens + token_count(len(self.tail))

    def extend(self, data: bytes) -> tuple[BlockHasher, bytes]:
        """The state after appending `data`, and the hashes of the blocks it completes."""
        size = self.block_bytes
        buffer = self.tail + data if self.tail else data
        full = len(buffer) - len(buffer) % size
        parent = self.last_hash
        out = bytearray()
        blake = hashlib.blake2b
        view = memoryview(buffer)
        for start in range(0, full, size):
            parent = blake(view[start : start + size], digest_size=HASH_BYTES, key=parent).digest()
            out += parent
        state = BlockHasher(
            self.block_tokens,
            blocks=self.blocks + full // size,
            last_hash=parent,
            tail=bytes(buffer[full:]),
        )
        return state, bytes(out)


def block_hashes(data: bytes, block_tokens: int = 16) -> bytes:
    """The hashes of every full block of `data`, from scratch (16 bytes each)."""
    return BlockHasher(block_tokens).extend(data)[1]


def prefix_key(data: bytes, block_tokens: int = 16, max_blocks: int = 4) -> bytes:
    """A key for the first `max_blocks` blocks of a prompt (the hash of the last of them).

    Prompts shorter than one block are keyed by a hash of all their bytes.
    """
    limit = block_tokens * BYTES_PER_TOKEN * max_blocks
    hashes = block_hashes(data[:limit], block_tokens)
    if hashes:
        return hashes[-HASH_BYTES:]
    return hashlib.blake2b(data[:limit], digest_size=HASH_BYTES).digest()
