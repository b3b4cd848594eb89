"""`--upstream-api responses`: each turn as one streamed `POST /responses`, stateless.

The body carries the full context with `store: false`: the settings the client set,
then `"input":` and the context exactly as the session cache holds it (canonical
item JSON, concatenated in Rust), so building it is a copy, and each turn's body
starts with the previous turn's. The answer's events are re-emitted under
warmsocket's own response and item ids.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

from warmsocket.backends.base import TurnContext
from warmsocket.backends.http_upstream import Decoder, HTTPUpstreamBackend
from warmsocket.backends.responses_events import ResponsesSSEDecoder
from warmsocket.response_stream import dumps
from warmsocket.upstream import RESPONSES_FORWARDED, explicit_settings

MEMO_ENTRIES = 4096


def request_head(
    settings: dict[str, Any], model: str, *, first: dict[str, Any], extra: dict[str, Any]
) -> bytes:
    """The body up to the value of `input` (the input comes last)."""
    fields = {**first, "model": model, **explicit_settings(settings, RESPONSES_FORWARDED), **extra}
    return dumps(fields)[:-1] + b',"input":'


class HeadCache:
    """Request heads by response id, reused while the model and settings stay the same.

    Settings compare as their canonical JSON bytes, so a continuation with unchanged
    settings never decodes them.
    """

    def __init__(self, extra: dict[str, Any], *, first: dict[str, Any] | None = None) -> None:
        self.first = first or {}
        self.extra = extra
        self._heads: OrderedDict[str, tuple[str, bytes, bytes]] = OrderedDict()

    def head(self, turn: TurnContext, model: str) -> bytes:
        parent = self._heads.get(turn.previous_response_id) if turn.previous_response_id else None
        settings = turn.settings_json
        if parent is not None and parent[0] == model and parent[1] == settings:
            head = parent[2]
        else:
            head = request_head(turn.settings, model, first=self.first, extra=self.extra)
        heads = self._heads
        heads[turn.response_id] = (model, settings, head)
        while len(heads) > MEMO_ENTRIES:
            heads.popitem(last=False)
        return head


class ResponsesHTTPBackend(HTTPUpstreamBackend):
    name = "upstream-responses"
    api: ClassVar[str] = "responses"
    path: ClassVar[str] = "/responses"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._body_heads = HeadCache({"stream": True, "store": False})

    def build_body(self, turn: TurnContext, model: str) -> list[bytes]:
        return [self._body_heads.head(turn, model), turn.view.json(), b"}"]

    def new_decoder(self) -> Decoder:
        return ResponsesSSEDecoder()
