"""Slow, obvious reference versions of `rust/blocks.rs` and `rust/token/render.rs`.

The oracle of the hypothesis tests and the baseline of the benchmarks; see
docs/tokens.md for the definitions written out. Not imported by `warmsocket`.

The chaining, splitting and rendering here are plain Python. The XXH3 primitive
is python-xxhash (a binding of the reference C implementation, in the `test`
extra), not a re-implementation.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import xxhash

HASH_BYTES = 8
ROOT_PARENT = bytes(HASH_BYTES)


def hash_block(parent: bytes, block: Sequence[int], seed: int = 0) -> bytes:
    """XXH3-64 of the parent hash followed by the block's tokens as little-endian u32."""
    return xxhash.xxh3_64_digest(parent + struct.pack(f"<{len(block)}I", *block), seed=seed)


def block_hashes(tokens: Sequence[int], block_size: int = 16, seed: int = 0) -> bytes:
    """Hashes of every full block, 8 bytes each, computed from scratch."""
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    out = []
    parent = ROOT_PARENT
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start : start + block_size], seed)
        out.append(parent)
    return b"".join(out)


def shared_prefix_blocks(a: bytes, b: bytes) -> int:
    """Number of equal leading 8-byte hashes."""
    n = 0
    for i in range(0, min(len(a), len(b)) - HASH_BYTES + 1, HASH_BYTES):
        if a[i : i + HASH_BYTES] != b[i : i + HASH_BYTES]:
            break
        n += 1
    return n


# ---------------------------------------------------------------- rendering


def _canonical(value: Any) -> str:
    """The JSON text of a value as the cache stores it (compact, sorted keys)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _marker(kind: str, value: Any) -> str:
    return f"<{kind} {xxhash.xxh3_64_intdigest(_canonical(value).encode()):016x}>"


def _part(part: Any) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return _marker("part", part)
    if isinstance(part.get("text"), str):
        return part["text"]  # type: ignore[no-any-return]
    if isinstance(part.get("refusal"), str):
        return part["refusal"]  # type: ignore[no-any-return]
    kind = part.get("type")
    return _marker(kind if isinstance(kind, str) else "part", part)


def _parts(content: Any) -> list[str] | None:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [_part(p) for p in content]
    return None


def _known(item: dict[str, Any]) -> tuple[str, list[str]] | None:
    kind = item.get("type")
    if kind is not None and not isinstance(kind, str):
        return None
    if kind == "message" or (kind is None and item.get("role") is not None):
        role = item.get("role")
        parts = _parts(item.get("content"))
        if not isinstance(role, str) or parts is None:
            return None
        return role, parts
    if kind == "function_call":
        name, call_id, arguments = item.get("name"), item.get("call_id"), item.get("arguments")
        if not (isinstance(name, str) and isinstance(call_id, str) and isinstance(arguments, str)):
            return None
        return "assistant", [f"{name} {call_id}\n", arguments]
    if kind == "function_call_output":
        call_id = item.get("call_id")
        parts = _parts(item.get("output"))
        if not isinstance(call_id, str) or parts is None:
            return None
        return "tool", [f"{call_id}\n", *parts]
    if kind == "compaction":
        return _compaction(item.get("encrypted_content"))
    if kind == "reasoning":
        segments: list[str] = []
        for field in ("summary", "content"):
            if item.get(field) is not None:
                parts = _parts(item[field])
                if parts is None:
                    return None
                segments += parts
        encrypted = item.get("encrypted_content")
        if encrypted is not None:
            if not isinstance(encrypted, str):
                return None
            segments.append(_marker("encrypted_content", encrypted))
        return "reasoning", segments
    return None


def _compaction(content: Any) -> tuple[str, list[str]] | None:
    """A compaction item made by warmsocket: the segments of what it stands for."""
    if not isinstance(content, str) or not content.startswith("wsc1."):
        return None
    # As strict as the Rust reader: the exact base64url `encode_content` writes, and
    # JSON without NaN, BOM, lone surrogates or nesting past 512 (the decoder itself
    # is the server's, `client_events.decode_json`: what is checked here is rendering).
    from warmsocket.client_events import decode_json
    from warmsocket.errors import APIError

    encoded = content[len("wsc1.") :]
    try:
        raw = base64.urlsafe_b64decode(encoded)
    except (ValueError, binascii.Error):
        return None
    if base64.urlsafe_b64encode(raw).decode("ascii") != encoded:
        return None
    try:
        payload = decode_json(raw)
    except APIError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("summary"), str):
        return None
    nested: dict[str, list[str]] = {}
    for name in ("before", "after"):
        items = payload.get(name, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return None
        nested[name] = [
            segment for i in items for segment in render_item(_canonical(i).encode())[1]
        ]
    return "user", [*nested["before"], payload["summary"], *nested["after"]]


def render_item(item_json: bytes) -> tuple[str, list[str]]:
    """(role, segments) of one item given as canonical JSON bytes."""
    text = item_json.decode()
    item = json.loads(text)
    if not isinstance(item, dict):
        raise ValueError("item is not a JSON object")
    known = _known(item)
    if known is not None:
        return known
    kind = item.get("type")
    return (kind if isinstance(kind, str) else "item"), [text]


def render_instructions(instructions: str) -> tuple[str, list[str]]:
    return "system", [instructions]


def render_tools(tools_json: bytes) -> tuple[str, list[str]] | None:
    """(role, segments) of a request's tools, a JSON array: each tool's JSON text,
    exactly as given, is a segment. None for an empty array."""
    text = tools_json.decode()
    tools = json.loads(text)
    if not isinstance(tools, list):
        raise ValueError("tools are not a JSON array")
    decoder = json.JSONDecoder()
    segments: list[str] = []
    at = text.index("[") + 1
    for _tool in tools:
        while text[at] in " \t\n\r,":
            at += 1
        _value, end = decoder.raw_decode(text, at)
        segments.append(text[at:end])
        at = end
    return ("system", segments) if segments else None


def framed_tokens(
    rendered: tuple[str, list[str]],
    encode: Callable[[str], Iterable[int]],
    framing: tuple[int, int, int],
) -> list[int]:
    """`start enc(role) sep enc(segment)... end`, each piece encoded on its own."""
    start, sep, end = framing
    role, segments = rendered
    out = [start, *encode(role), sep]
    for segment in segments:
        out += encode(segment)
    out.append(end)
    return out
