"""`truncation: "auto"` in front of a Chat Completions upstream.

OpenAI's API drops items from the start of a conversation that would not fit the
model's context window, when the request says `truncation: "auto"` (`disabled`, the
default, fails such a request). A Responses upstream gets the field and does it
itself; a Chat Completions server (vLLM, SGLang, llama.cpp, Ollama) has no such
field and refuses a prompt longer than its window with a 400. So in front of one,
warmsocket cuts the context it sends:

* the window: `--upstream-context-window`, else the `max_model_len` the upstream's
  `GET /models` lists for the model (vLLM, SGLang), asked on the first such turn
  (`ContextWindows`); without either, nothing is cut;
* the budget for the context: the window less the instructions and tools, less the
  output limit (`max_output_tokens`, else an eighth of the window), less a
  thirty-second of the window for the difference between warmsocket's token counts
  (`--tokenizer`) and the model's own chat template;
* the cut (`ContextView.truncation`, in Rust): the system and developer messages
  the context starts with stay, then whole turns go from the oldest, up to a user
  message, so no tool output loses its call;
* once it has to cut, it cuts down to three quarters of the budget, and later turns
  of the chain keep that cut while they fit: the request's start stays the same
  from turn to turn, so the upstream's prefix cache keeps hitting, instead of
  moving (and missing) every turn.

The stored chain keeps every item: the cut is the request's, as at OpenAI. A
context whose last user message onward does not fit goes whole, and the upstream's
400 says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from warmsocket._core import ContextView, Items, Tokenizer
from warmsocket.backends.base import TurnContext
from warmsocket.memo import Memo, str_bytes

OUTPUT_RESERVE = 8
"""Without `max_output_tokens`, a window's 1/8 is kept for the answer."""
MARGIN = 32
"""A window's 1/32 is kept for token counts that differ from the model's."""
REFILL = 0.75
"""A cut leaves the context at this fraction of its budget."""
RETRY_SECONDS = 60.0
MAX_MODELS = 4096
"""Upstream models whose window is kept at most."""
"""How long a model whose window could not be learned goes without asking again."""
OFF_LOOP_BYTES = 256 * 1024
"""Counting a context larger than this runs in a worker thread."""
_AUTO = b'"truncation":"auto"'


@dataclass(frozen=True, slots=True)
class Cut:
    """Keep the first `head` items and those from `start` on (`start > head`)."""

    head: int
    start: int


def asks_for_truncation(turn: TurnContext) -> bool:
    """The request's `truncation` is `auto` (its canonical settings JSON is searched
    first, so other turns never decode the settings)."""
    return _AUTO in turn.settings_json and turn.settings.get("truncation") == "auto"


def context_budget(window: int, max_output_tokens: int | None, prompt_tokens: int) -> int:
    """Tokens the context items may have in a window of `window` tokens."""
    reserve = max_output_tokens if max_output_tokens is not None else window // OUTPUT_RESERVE
    return max(0, window - reserve - window // MARGIN - prompt_tokens)


async def choose_cut(
    view: ContextView,
    budget: int,
    tokenizer: Tokenizer,
    *,
    new: Items | None = None,
    kept: Cut | None = None,
) -> Cut | None:
    """The cut that fits `view` into `budget` tokens; None when it fits whole, or
    when nothing fits (sent whole: the upstream refuses it). `new`: the turn's new
    items (not tokenised yet: estimated at two bytes a token, on the safe side);
    `kept`: the cut the chain's previous turn used, kept while it still fits."""
    estimate = view.tokens
    if estimate:
        if new is not None and new.tokens == 0:
            estimate += new.nbytes // 2
        if estimate <= budget:
            return None  # fits by the cached counts: nothing counted again
    fitting = await _truncation(view, budget, tokenizer)
    if fitting is None or fitting[0] == fitting[1]:
        return None
    head, start = fitting
    if kept is not None and kept.head == head and kept.start >= start:
        return kept  # fits still: the same start as the previous request
    refilled = await _truncation(view, int(budget * REFILL), tokenizer)
    if refilled is not None and refilled[1] > refilled[0]:
        head, start = refilled
    return Cut(head, start)


async def _truncation(
    view: ContextView, budget: int, tokenizer: Tokenizer
) -> tuple[int, int] | None:
    if view.nbytes > OFF_LOOP_BYTES:
        return await asyncio.to_thread(view.truncation, budget, tokenizer)
    return view.truncation(budget, tokenizer)


class PromptTokens:
    """Tokens of the instructions and tools a request starts with, remembered by
    their content (the tools by digest) for the requests that repeat them."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._counts: Memo[tuple[str | None, int | None], int] = Memo()

    def count(self, turn: TurnContext) -> int:
        request = turn.request

        def count() -> int:
            counted = 0
            if request.instructions is not None:
                counted += self.tokenizer.count_instructions(request.instructions)
            if request.tools_json is not None:
                counted += self.tokenizer.count_tools(request.tools_json)
            return counted

        key = (request.instructions, request.tools_digest)
        return self._counts.get(key, str_bytes(request.instructions), count)


class ContextWindows:
    """The context window of each upstream model: `configured` for all of them, else
    what the upstream's model list says (`fetch`: upstream model id -> its
    `max_model_len`; empty when it could not be asked), asked when a turn first
    needs it, and again no sooner than `RETRY_SECONDS` later when it did not say.

    One time of asking for all models, not one per model: clients name the model, and
    requests that each name another must neither grow this object nor make the
    upstream list its models on every turn."""

    def __init__(self, configured: int | None) -> None:
        self.configured = configured
        self._known: dict[str, int] = {}
        self._asked: float | None = None

    def learn(self, windows: dict[str, int]) -> None:
        """Windows found elsewhere (`serve`'s start-up probe), so no turn waits to ask."""
        self._known.update(windows)

    async def window(
        self, model: str, fetch: Callable[[], Awaitable[dict[str, int]]]
    ) -> int | None:
        if self.configured is not None:
            return self.configured
        known = self._known.get(model)
        if known is not None:
            return known
        now = time.monotonic()
        if self._asked is not None and now - self._asked < RETRY_SECONDS:
            return None
        self._asked = now
        self._known = {**self._known, **await fetch()}
        if len(self._known) > MAX_MODELS:  # (an upstream listing without end)
            self._known = dict(list(self._known.items())[-MAX_MODELS:])
        return self._known.get(model)
