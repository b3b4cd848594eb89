"""`POST /v1/responses/input_tokens`: a request's input tokens, counted without running it.

The body is a create body (the SDK's `client.responses.input_tokens.count(...)`) in
which `model` and `input` may be left out: without input, what is counted is the
previous response's context, the instructions and the tools. The count is the
`usage.input_tokens` the same `response.create` would report from warmsocket's own
accounting (`--tokenizer`): the context of `previous_response_id` (its tokens cached,
not counted again), the new input, and the instructions and tools, each as a system
message (docs/tokens.md). A history re-sent without `previous_response_id`
is matched against the cached chains as a create's would be, so only its new suffix
is tokenised. In front of an upstream a create reports the upstream's own usage,
which may count differently (its chat template, its tools).

Nothing is stored and no model runs; a `previous_response_id` that only another
process has is loaded from the shared store first, as for a create.
"""

from __future__ import annotations

import json

from warmsocket import errors
from warmsocket._core import CreateRequest, Rejection, parse_client_message

PLACEHOLDER_MODEL = "input-token-count"
"""The model a body without one is parsed with (the count does not depend on it)."""
_PLACEHOLDER_INPUT = "-"


def parse_count_request(
    body: bytes, *, max_item_bytes: int, require_model: bool = False
) -> tuple[CreateRequest, bool]:
    """The create request a count body stands for, and whether it has input of its
    own. Raises APIError for a body a create would refuse (other than for a missing
    input, or unless `require_model` a missing model)."""
    parsed = parse_client_message(body, websocket=False, max_item_bytes=max_item_bytes)
    if isinstance(parsed, CreateRequest):
        # (Empty input is taken with a `conversation`: the body has none of its own.)
        return parsed, len(parsed.input) > 0
    assert isinstance(parsed, Rejection)
    if parsed.param not in ("model", "input") or (require_model and parsed.param == "model"):
        raise _refused(parsed)
    # Only a body refused for its model or input is read again here: a missing model
    # gets a placeholder, missing or empty input one that is not counted.
    fields = json.loads(body)
    has_input = fields.get("input") not in (None, "", [])
    if parsed.param == "input" and has_input:
        raise _refused(parsed)  # input there, but not valid
    fields.setdefault("model", PLACEHOLDER_MODEL)
    if not has_input:
        fields["input"] = _PLACEHOLDER_INPUT
    again = parse_client_message(
        json.dumps(fields).encode(), websocket=False, max_item_bytes=max_item_bytes
    )
    if isinstance(again, Rejection):
        raise _refused(again)
    assert isinstance(again, CreateRequest)
    return again, has_input


def _refused(rejection: Rejection) -> errors.APIError:
    return errors.APIError(
        rejection.code,
        rejection.message,
        param=rejection.param,
        status=rejection.status,
        type=rejection.type,
    )
