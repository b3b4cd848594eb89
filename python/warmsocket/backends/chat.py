"""`--upstream-api chat`: each turn as one streamed Chat Completions request.

The full context is translated into messages (`warmsocket.backends.chat_translate`).
Translating it from scratch every turn would cost time in proportion to the
conversation, so the rendered messages of each response's request are remembered
(by warmsocket response id, least recently used first out): a turn that continues a
remembered response renders only its parent's output and its own new input, and
reuses the parent's message bytes. Rendering is per item and deterministic, so the
result is byte for byte what a full translation gives, and each request's body
starts with the previous turn's body (an upstream prefix cache depends on that).
Whenever the shortcut cannot be proven right (item counts differ, a cancelled or
steered parent, another `truncation` cut), the whole context is translated again.

A request with `truncation: "auto"` whose context would not fit the model's window
goes without its oldest turns (`warmsocket.backends.truncation`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from warmsocket.backends.base import TurnContext
from warmsocket.backends.chat_translate import (
    LOGPROBS,
    ChatChunkDecoder,
    chat_messages,
    request_head,
    system_message,
)
from warmsocket.backends.http_upstream import Decoder, HTTPUpstreamBackend
from warmsocket.backends.truncation import (
    ContextWindows,
    Cut,
    PromptTokens,
    asks_for_truncation,
    choose_cut,
    context_budget,
)
from warmsocket.prefixhash import tokenizer
from warmsocket.response_stream import dumps
from warmsocket.upstream_probe import probe

MEMO_ENTRIES = 4096
MEMO_BYTES = 256 * 1024 * 1024
"""What the rendered messages the memo keeps may add up to (a continuation shares its
parent's message bytes but is counted with them: an over-estimate)."""


@dataclass(slots=True)
class _Rendered:
    model: str
    settings: bytes
    """The request's settings as canonical JSON (equal bytes = equal settings)."""
    logprobs: bool
    """The request asked for log probabilities (`include`)."""
    given_defaults: tuple[str, ...]
    """`CreateRequest.given_defaults`: settings sent at the API's default."""
    head: bytes
    system: bytes | None
    messages: list[bytes]
    items: int
    """Items of the request context these messages render."""
    last_role: str | None
    cut: Cut | None = None
    """The `truncation` cut these messages were rendered with."""
    output: list[dict[str, Any]] | None = None
    """The response's output items, once the upstream finished it."""
    message_bytes: int = 0
    """The bytes of `messages` (those shared with the parent too)."""
    nbytes: int = 0
    """`message_bytes`, `head` and `system`: what the memo counts for it."""


def render(items: list[dict[str, Any]]) -> tuple[list[bytes], str | None]:
    messages = chat_messages(items)
    return [dumps(m) for m in messages], (messages[-1]["role"] if messages else None)


def _opened_by_a_call(messages: list[dict[str, Any]]) -> bool:
    """Whether the first message is one a `function_call` item started (`content:
    null`; a message item's content is never null). Rendered after an assistant
    message, that call would have joined it: only a full render gives that. Items
    with no chat form (reasoning) may come before the call, so the items cannot
    tell."""
    return bool(messages) and messages[0]["role"] == "assistant" and messages[0]["content"] is None


class ChatBackend(HTTPUpstreamBackend):
    name = "upstream-chat"
    api: ClassVar[str] = "chat"
    path: ClassVar[str] = "/chat/completions"
    records_output: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._memo: OrderedDict[str, _Rendered] = OrderedDict()
        """First out first: the oldest, and parents a turn continued."""
        self._memo_bytes = 0
        self.full_renders = 0
        """Turns whose whole context was translated (not continued from a remembered parent)."""
        self.windows = ContextWindows(self.config.context_window)
        self._openai = self.config.at_openai
        self._prompt_tokens: PromptTokens | None = None

    async def request_body(self, turn: TurnContext, model: str) -> list[bytes | bytearray]:
        if not asks_for_truncation(turn):
            return self.build_body(turn, model)
        window = await self.windows.window(model, self._context_windows)
        if window is None:
            return self.build_body(turn, model)
        if self._prompt_tokens is None:
            self._prompt_tokens = PromptTokens(tokenizer())
        counter = self._prompt_tokens
        budget = context_budget(window, turn.request.max_output_tokens, counter.count(turn))
        parent = self._memo.get(turn.previous_response_id) if turn.previous_response_id else None
        cut = await choose_cut(
            turn.view,
            budget,
            counter.tokenizer,
            new=turn.input,
            kept=parent.cut if parent is not None else None,
        )
        if cut is not None:
            self.stats.truncated_turns += 1
        return self.build_body(turn, model, cut)

    async def _context_windows(self) -> dict[str, int]:
        """The context windows the first replica's model list gives (`max_model_len`)."""
        finding = await probe(self.origins[0], self.config.api_key, self.config.connect_timeout)
        return finding.windows

    def build_body(
        self, turn: TurnContext, model: str, cut: Cut | None = None
    ) -> list[bytes | bytearray]:
        parent = self._memo.get(turn.previous_response_id) if turn.previous_response_id else None
        messages: list[bytes] | None = None
        last_role: str | None = None
        message_bytes = 0
        continued = False
        if (
            parent is not None
            and parent.cut == cut
            and parent.output is not None
            and turn.input is not None
            and parent.items + len(parent.output) + turn.new_items == turn.view.items
        ):
            batch = chat_messages(parent.output + turn.input.to_objects())
            if not (parent.last_role == "assistant" and _opened_by_a_call(batch)):
                new = [dumps(m) for m in batch]
                messages = parent.messages + new
                last_role = batch[-1]["role"] if batch else parent.last_role
                message_bytes = parent.message_bytes + sum(map(len, new))
                continued = True
        if messages is None:
            self.full_renders += 1
            items = turn.view.objects()
            if cut is not None:
                items = items[: cut.head] + items[cut.start :]
            messages, last_role = render(items)
            message_bytes = sum(map(len, messages))
        settings = turn.settings_json
        logprobs = LOGPROBS in turn.request.include
        given = turn.request.given_defaults
        if parent is not None and (
            parent.model,
            parent.settings,
            parent.logprobs,
            parent.given_defaults,
        ) == (model, settings, logprobs, given):
            # The parent's objects: a chain holds its settings and head once.
            settings, head, system = parent.settings, parent.head, parent.system
        else:
            head = request_head(
                turn.settings,
                model,
                logprobs=logprobs,
                given_defaults=given,
                openai=self._openai,
            )
            instructions = turn.instructions
            system = system_message(instructions) if instructions is not None else None
        self._remember(
            turn,
            _Rendered(
                model,
                settings,
                logprobs,
                given,
                head,
                system,
                messages,
                turn.view.items,
                last_role,
                cut,
                message_bytes=message_bytes,
                nbytes=message_bytes
                + len(head)
                + len(settings)
                + (len(system) if system is not None else 0),
            ),
            continued=continued,
        )
        parts = [system, *messages] if system is not None else messages
        return [head, b",".join(parts), b"]}"]

    def _remember(self, turn: TurnContext, rendered: _Rendered, *, continued: bool) -> None:
        """Keep `rendered` for the turns that continue this one, within `MEMO_ENTRIES`
        and `MEMO_BYTES`. A parent the turn `continued` is the first to go when they
        are reached: the chain's next turn starts from the new entry, and only a fork
        or a retry would start from the parent (rendering in full without it)."""
        memo = self._memo
        replaced = memo.pop(turn.response_id, None)
        if replaced is not None:
            self._memo_bytes -= replaced.nbytes
        memo[turn.response_id] = rendered
        self._memo_bytes += rendered.nbytes
        parent_id = turn.previous_response_id
        if continued and parent_id is not None and parent_id in memo:
            memo.move_to_end(parent_id, last=False)
        while len(memo) > 1 and (len(memo) > MEMO_ENTRIES or self._memo_bytes > MEMO_BYTES):
            _id, dropped = memo.popitem(last=False)
            self._memo_bytes -= dropped.nbytes

    def forget(self, response_ids: Iterable[str]) -> None:
        """Drop what is kept of these responses (`Engine.forget`)."""
        memo = self._memo
        for response_id in response_ids:
            dropped = memo.pop(response_id, None)
            if dropped is not None:
                self._memo_bytes -= dropped.nbytes

    def new_decoder(self) -> Decoder:
        return ChatChunkDecoder()

    def completed(self, turn: TurnContext, output: list[dict[str, Any]] | None) -> None:
        entry = self._memo.get(turn.response_id)
        if entry is not None:
            entry.output = output
