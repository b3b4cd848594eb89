"""The simulated inference engine: prompt rendering, prefix cache, latency, replies.

Latency model of one request: `overhead_ms`, then prefill at
`prefill_tokens_per_second` for the prompt tokens not already in the prefix cache
(plus any `/sleep`), then one delta per `decode_tokens_per_second` token; a
non-streamed answer comes whole after that same decode time. A rate of 0 means
instant.

Prefix cache: the prompt (instructions, tools, then each item; chat messages are
turned back into items first) is tokenised with the item template and cut into
token blocks with chained hashes (`warmsocket.prefixhash`); the cache holds up to
`cache_blocks` block hashes and evicts the least recently used, one block for each
block added past that (no pass over the whole table). A block is marked as used
after its descendants, so eviction takes leaves first and the cached blocks of any
prompt always form a prefix (found by binary search), as in vLLM. A request
looks its prompt up when it arrives and adds its blocks only once its prefill has
run (`PrefixCache.fill`): a request refused or cut off before that adds nothing, and
an identical prompt arriving meanwhile pays its own prefill (vLLM would let it wait
for the blocks being computed; the simulator does not model that).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from json.scanner import make_scanner
from typing import Any

from warmsocket import mockmodel
from warmsocket.prefixhash import PromptHasher, count_tokens

_canonical = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode


@dataclass(frozen=True, slots=True)
class LatencyModel:
    overhead_ms: float = 0.0
    prefill_tokens_per_second: float = 0.0
    decode_tokens_per_second: float = 0.0

    def first_token_seconds(self, uncached_tokens: int, sleep_ms: int = 0) -> float:
        prefill = (
            uncached_tokens / self.prefill_tokens_per_second
            if self.prefill_tokens_per_second > 0
            else 0.0
        )
        return (self.overhead_ms + sleep_ms) / 1000.0 + prefill

    def decode_seconds(self, text: str) -> float:
        if self.decode_tokens_per_second <= 0:
            return 0.0
        return max(1, count_tokens(text)) / self.decode_tokens_per_second

    def output_seconds(self, output_tokens: int) -> float:
        """The decode time of a whole output, for an answer sent in one piece."""
        if self.decode_tokens_per_second <= 0:
            return 0.0
        return output_tokens / self.decode_tokens_per_second


@dataclass(frozen=True, slots=True)
class Prefill:
    prompt_tokens: int
    cached_tokens: int
    blocks: Sequence[bytes] = field(default=(), repr=False)
    """The prompt's block hashes, which `PrefixCache.fill` adds once the prefill is done."""


class PrefixCache:
    """Block hashes in least-recently-used order, at most `capacity` of them."""

    def __init__(self, capacity: int, block_tokens: int = 16) -> None:
        self.capacity = capacity
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, None] = OrderedDict()
        """Least recently used first; every block after (more recent than) its
        descendants, so the first block is always a leaf."""
        self._hasher = PromptHasher(block_tokens)
        self.hits = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: object) -> bool:
        """Whether this block hash (from `PromptHasher.hash`) is cached."""
        return block in self._blocks

    def clear(self) -> None:
        self._blocks.clear()
        self._hasher = PromptHasher(self.block_tokens)

    def prefill(
        self, instructions: str | None, tools: Sequence[Any], items: list[bytes]
    ) -> Prefill:
        """Look the prompt's blocks up, then cache them all (a prefill that runs at
        once). Returns token counts. `items` are the context's items as JSON."""
        found = self.lookup(instructions, tools, items)
        self.fill(found)
        return found

    def lookup(self, instructions: str | None, tools: Sequence[Any], items: list[bytes]) -> Prefill:
        """How much of the prompt is cached, without caching anything."""
        prompt_tokens, keys = self._hasher.hash(instructions, tools, items)
        blocks = self._blocks
        low, high = 0, len(keys)
        while low < high:
            mid = (low + high + 1) // 2
            if keys[mid - 1] in blocks:
                low = mid
            else:
                high = mid - 1
        self.lookups += 1
        self.hits += low > 0
        cached_tokens = min(prompt_tokens, low * self.block_tokens)
        return Prefill(prompt_tokens, cached_tokens, keys)

    def fill(self, prefill: Prefill) -> None:
        """Cache a looked-up prompt's blocks (its prefill has run), then evict the least
        recently used past the capacity: work for the blocks added, whatever the size
        of the table."""
        blocks = self._blocks
        # Mark every block used, the last first: each block ends up more recent than
        # its descendants (here and in any other prompt), so the least recent blocks
        # are always leaves and what is cached of a prompt stays a prefix.
        for key in reversed(prefill.blocks):
            blocks[key] = None
            blocks.move_to_end(key)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


class CallIds:
    """Deterministic call ids: the same conversation gets the same ids whoever sends it.

    The id is a digest of the instructions and of each item's canonical JSON (compact,
    sorted keys) without its `id` and `status`, which differ by who made the item, so
    neither the JSON's spacing nor item ids change it. Each item's digest is remembered
    by a hash of its bytes as sent, so a conversation's items are made canonical once,
    not again on every turn.
    """

    def __init__(self, memory: int = 1 << 16) -> None:
        self.memory = memory
        self._digests: OrderedDict[bytes, bytes] = OrderedDict()

    def first(
        self, instructions: str | None, items: Sequence[Mapping[str, Any]], encoded: list[bytes]
    ) -> str:
        """The id of a reply's first call (`encoded`: each item's JSON as sent)."""
        digest = hashlib.sha256(hashlib.sha256((instructions or "").encode()).digest())
        for item, sent in zip(items, encoded, strict=True):
            digest.update(self._item_digest(item, sent))
        return "call_" + digest.hexdigest()[:24]

    def _item_digest(self, item: Mapping[str, Any], sent: bytes) -> bytes:
        key = hashlib.sha256(sent).digest()
        digests = self._digests
        known = digests.get(key)
        if known is not None:
            digests.move_to_end(key)
            return known
        kept = {k: v for k, v in item.items() if k not in {"id", "status"}}
        known = digests[key] = hashlib.sha256(_canonical(kept).encode()).digest()
        if len(digests) > self.memory:
            digests.popitem(last=False)
        return known


def canonical_items(items: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """Each item as canonical JSON (compact, sorted keys), as the session cache keeps them."""
    return [_canonical(item).encode() for item in items]


_scan = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_WHITESPACE = " \t\n\r"


def parse_request(data: bytes) -> tuple[Any, list[bytes] | None]:
    """A JSON body, and the JSON text of each `input` item as sent (when it is an array).

    One pass: the items' text is what the prefix cache tokenises, so a full-context
    request is not serialised again item by item. Raises ValueError.
    """
    text = data.decode()
    try:
        return _object_with_input(text)
    except (ValueError, IndexError, StopIteration):
        return json.loads(text), None


def _skip(text: str, position: int) -> int:
    while text[position] in _WHITESPACE:
        position += 1
    return position


def _object_with_input(text: str) -> tuple[dict[str, Any], list[bytes] | None]:
    position = _skip(text, 0)
    if text[position] != "{":
        raise ValueError("not an object")
    position = _skip(text, position + 1)
    out: dict[str, Any] = {}
    raw: list[bytes] | None = None
    if text[position] == "}":
        return out, None
    while True:
        if text[position] != '"':
            raise ValueError("expected a key")
        key, position = _scanstring(text, position + 1)
        position = _skip(text, position)
        if text[position] != ":":
            raise ValueError("expected ':'")
        position = _skip(text, position + 1)
        if key == "input" and text[position] == "[":
            value, raw, position = _array_with_texts(text, position)
        else:
            value, position = _scan(text, position)
        out[key] = value
        position = _skip(text, position)
        if text[position] == ",":
            position = _skip(text, position + 1)
        elif text[position] == "}":
            return out, raw
        else:
            raise ValueError("expected ',' or '}'")


def _array_with_texts(text: str, position: int) -> tuple[list[Any], list[bytes] | None, int]:
    values: list[Any] = []
    texts: list[bytes] = []
    position = _skip(text, position + 1)
    if text[position] == "]":
        return values, texts, position + 1
    while True:
        start = position
        value, position = _scan(text, position)
        values.append(value)
        texts.append(text[start:position].encode())
        position = _skip(text, position)
        if text[position] == ",":
            position = _skip(text, position + 1)
        elif text[position] == "]":
            complete = all(isinstance(v, dict) for v in values)
            return values, texts if complete else None, position + 1
        else:
            raise ValueError("expected ',' or ']'")


def items_from_chat(messages: Sequence[Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """Chat messages -> (instructions, Responses items), for the model's rules."""
    instructions: str | None = None
    items: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        content = message.get("content")
        if role == "system" and index == 0 and isinstance(content, str):
            instructions = content
        elif role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": message.get("tool_call_id"),
                    "output": _chat_text(content),
                }
            )
        elif role == "assistant":
            text = _chat_text(content)
            if text:
                items.append({"type": "message", "role": "assistant", "content": text})
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                items.append(
                    {
                        "type": "function_call",
                        "call_id": call.get("id"),
                        "name": function.get("name"),
                        "arguments": function.get("arguments", ""),
                    }
                )
        else:
            items.append({"type": "message", "role": role, "content": _chat_text(content)})
    return instructions, items


def items_from_input(value: Any) -> list[dict[str, Any]]:
    """A Responses `input` (string or items) -> items."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        return []
    return [
        item if "type" in item else {"type": "message", **item}
        for item in value
        if isinstance(item, dict)
    ]


def function_names(tools: Any) -> list[str]:
    names: list[str] = []
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        name = tool.get("name")
        if name is None and isinstance(tool.get("function"), dict):
            name = tool["function"].get("name")
        if isinstance(name, str):
            names.append(name)
    return names


_SEAL_KEY = b"warmsocket-simulated-upstream"


def seal_reasoning(summary: str) -> str:
    """The `encrypted_content` of a reasoning item with this summary: opaque to
    clients, checked when it comes back (`unsealed_reasoning`), as OpenAI's is."""
    tag = hmac.new(_SEAL_KEY, summary.encode(), hashlib.sha256).hexdigest()[:32]
    return "wsim1." + base64.urlsafe_b64encode(summary.encode()).decode() + "." + tag


def unsealed_reasoning(items: Sequence[dict[str, Any]]) -> str | None:
    """The id (or position) of the first reasoning item whose `encrypted_content` is
    not one this upstream sealed for that item's summary; None when all are."""
    for index, item in enumerate(items):
        if item.get("type") != "reasoning" or item.get("encrypted_content") is None:
            continue
        summary = item.get("summary")
        parts = summary if isinstance(summary, list) else []
        text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        sealed = item["encrypted_content"]
        if not isinstance(sealed, str) or not hmac.compare_digest(sealed, seal_reasoning(text)):
            return str(item.get("id") or f"input[{index}]")
    return None


ENCRYPTED_REASONING = "reasoning.encrypted_content"
"""The `include` value that asks for reasoning items' `encrypted_content`: without it
OpenAI (and this upstream) leaves the content out."""


def wants_sealed_reasoning(body: dict[str, Any]) -> bool:
    """Whether a Responses request's `include` asks for `encrypted_content`."""
    include = body.get("include")
    return isinstance(include, list) and ENCRYPTED_REASONING in include


def unpersisted_reasoning(items: Sequence[dict[str, Any]]) -> str | None:
    """The id (or position) of the first reasoning item that comes without its
    `encrypted_content`: only its id, which OpenAI looks up among stored items, and
    this upstream stores none (nor does OpenAI with `store: false`). None when every
    reasoning item brings its content."""
    for index, item in enumerate(items):
        if item.get("type") == "reasoning" and item.get("encrypted_content") is None:
            return str(item.get("id") or f"input[{index}]")
    return None


def plan(
    items: Sequence[dict[str, Any]],
    *,
    tools: Any,
    instructions: str | None,
    choice: mockmodel.ToolChoice = mockmodel.AUTO,
) -> mockmodel.Reply:
    """The built-in model's reply to this context, within `choice` (the request's
    `tool_choice` and `parallel_tool_calls`)."""
    start = mockmodel.last_user_message(items) or 0
    return mockmodel.plan_reply(
        items[start:],
        function_names=function_names(tools),
        instructions=instructions,
        full_context=lambda: items,
        # Responses tools only: custom tools in a chat body are not at the top level.
        custom_names=lambda: mockmodel.custom_tool_names(tools),
        tool_types=lambda: mockmodel.tool_types(tools),
        choice=choice,
        parameters=lambda name: mockmodel.function_parameters(tools, name),
    )


def _chat_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""
