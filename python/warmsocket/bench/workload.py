"""The scripted coding agent's workload: deterministic (seeded), shaped like published traces.

One run of the agent is a conversation of N tool calls:

* a system prompt of `system_tokens` tokens (coding-agent rules) and a dozen function
  tools with JSON schemas (about 1,300 tokens together);
* a first user message that names the task and carries the built-in model's
  directive `/repeat N shell {...}`: the upstream then calls `shell` once per turn
  until N outputs have come back, and finally answers `done after N calls`;
* N tool outputs (file reads, test logs, grep results), each `output_tokens_min` to
  `output_tokens_max` tokens, drawn from a seeded RNG; the context reaches about
  80k tokens by turn 30 with the defaults;
* each call's arguments are `call_tokens` tokens (a command and a short
  justification): short outputs, so input:output is about 100:1 at N = 20.

Token counts are the project's tokenizer's (o200k_base). Two workloads with the same
parameters are identical, byte for byte, except for the run nonce in the first user
message, which keeps one run's conversation out of another run's prefix cache (the
shared system prompt and tools stay cached, as across real sessions).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from warmsocket.bench import MIN_CALL_TOKENS, MIN_SYSTEM_TOKENS
from warmsocket.prefixhash import count_tokens

TOOL_NAME = "shell"
MODEL = "warmsocket-sim"

_WORDS = [
    *("agent", "change", "check", "code", "commit", "context", "diff", "edit", "error"),
    *("file", "function", "import", "interface", "line", "module", "output", "patch"),
    *("path", "read", "repository", "request", "return", "review", "run", "source"),
    *("state", "test", "tool", "type", "update", "value", "workspace", "write"),
]
_IDENTS = [
    *("parse_request", "build_context", "session_cache", "encode_frame", "tokenize_block"),
    *("handle_turn", "stream_events", "validate_items", "apply_patch", "run_tests"),
    *("load_config", "write_snapshot"),
]


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """The parameters of a workload; `build()` makes the texts."""

    tool_calls: int
    seed: int = 20250601
    system_tokens: int = 5_000
    output_tokens_min: int = 300
    output_tokens_max: int = 4_000
    call_tokens: int = 250
    tool_ms: float = 20.0

    def __post_init__(self) -> None:
        if self.tool_calls < 1:
            raise ValueError("tool_calls must be >= 1")
        if not 0 < self.output_tokens_min <= self.output_tokens_max:
            raise ValueError("need 0 < output_tokens_min <= output_tokens_max")
        if (
            self.system_tokens < MIN_SYSTEM_TOKENS
            or self.call_tokens < MIN_CALL_TOKENS
            or self.tool_ms < 0
        ):
            raise ValueError(
                f"system_tokens >= {MIN_SYSTEM_TOKENS}, call_tokens >= {MIN_CALL_TOKENS}, "
                "tool_ms >= 0"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(self) -> Workload:
        return Workload(self)


@dataclass(frozen=True, slots=True)
class ToolOutput:
    kind: str
    text: str
    tokens: int


@dataclass
class Workload:
    """Texts of one workload. Built once per spec; cheap to reuse across runs."""

    spec: WorkloadSpec
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.spec.seed)

    @cached_property
    def instructions(self) -> str:
        rng = random.Random(self.spec.seed * 7 + 1)
        return _prose(rng, self.spec.system_tokens, heading="Coding agent rules")

    @cached_property
    def tools(self) -> list[dict[str, Any]]:
        return _tool_definitions()

    @cached_property
    def arguments(self) -> str:
        """The call's arguments: a command and a justification of `call_tokens` tokens."""
        rng = random.Random(self.spec.seed * 7 + 2)
        command = "pytest -x -q tests/test_session.py && rg -n 'previous_response_id' python"
        budget = self.spec.call_tokens - count_tokens(json.dumps({"command": command}))
        reason = _prose(rng, max(budget, 5), heading=None).replace("\n", " ").strip()
        return json.dumps({"command": command, "justification": reason})

    @cached_property
    def outputs(self) -> list[ToolOutput]:
        """The N tool outputs, in call order."""
        rng = random.Random(self.spec.seed * 7 + 3)
        spec = self.spec
        out = []
        for index in range(spec.tool_calls):
            target = rng.randint(spec.output_tokens_min, spec.output_tokens_max)
            kind = rng.choices(("file", "tests", "grep"), weights=(5, 3, 2))[0]
            text = _tool_text(rng, kind, index, target)
            out.append(ToolOutput(kind, text, count_tokens(text)))
        return out

    def task(self, nonce: str) -> str:
        """The first user message: a run nonce, the task, the directive for N calls.

        Use a 12-digit nonce: its token count is the same for every value, so every
        run's prompts have the same length."""
        return (
            f"run {nonce}\n"
            "The session cache drops a connection's responses too early when a lane "
            "is forked. Find the cause, fix it, and make the test suite pass.\n"
            f"/repeat {self.spec.tool_calls} {TOOL_NAME} {self.arguments}"
        )

    def settings(self) -> dict[str, Any]:
        return {"model": MODEL, "instructions": self.instructions, "tools": self.tools}

    def summary(self) -> dict[str, Any]:
        """Token counts of the workload (for the result file)."""
        outputs = [o.tokens for o in self.outputs]
        tools_tokens = count_tokens(json.dumps(self.tools))
        return {
            "system_tokens": count_tokens(self.instructions),
            "tools_tokens": tools_tokens,
            "call_tokens": count_tokens(self.arguments),
            "tool_output_tokens": outputs,
            "tool_output_tokens_mean": sum(outputs) / len(outputs),
        }


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 18))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), f"`{rng.choice(_IDENTS)}()`")
    return " ".join(words).capitalize() + "."


def _prose(rng: random.Random, tokens: int, *, heading: str | None) -> str:
    """Rule-book-like prose of about `tokens` tokens (counted as it grows)."""
    parts: list[str] = [f"# {heading}\n"] if heading else []
    count = count_tokens(parts[0]) if parts else 0
    section = 0
    while count < tokens:
        if heading and rng.random() < 0.08:
            section += 1
            piece = f"\n## Section {section}: {rng.choice(_WORDS)} {rng.choice(_WORDS)}\n"
        else:
            piece = ("- " if heading else "") + _sentence(rng) + ("\n" if heading else " ")
        parts.append(piece)
        count += count_tokens(piece)
    return "".join(parts)


def _tool_text(rng: random.Random, kind: str, index: int, tokens: int) -> str:
    """A file read, a test log or grep results of about `tokens` tokens."""
    lines: list[str] = []
    count = 0
    line_no = 0
    if kind == "tests":
        lines.append(f"$ pytest -x -q  # run {index}\n")
    while count < tokens:
        line_no += 1
        ident = rng.choice(_IDENTS)
        if kind == "file":
            indent = "    " * rng.randint(0, 3)
            line = f"{indent}{ident}_{rng.randint(0, 99)} = {rng.choice(_IDENTS)}(ctx, {line_no})\n"
        elif kind == "tests":
            status = "PASSED" if rng.random() < 0.9 else "FAILED"
            line = f"tests/test_{rng.choice(_WORDS)}.py::test_{ident}[{line_no}] {status}\n"
        else:
            line = (
                f"python/warmsocket/{rng.choice(_WORDS)}.py:{rng.randint(1, 900)}:    "
                f"{ident}(previous_response_id, {rng.choice(_WORDS)})\n"
            )
        lines.append(line)
        count += count_tokens(line)
    return "".join(lines)


def _tool_definitions() -> list[dict[str, Any]]:
    """A dozen function tools, as a coding agent declares them."""
    specs = [
        (TOOL_NAME, "Run a shell command in the workspace and return its output.",
         {"command": "The command line to run.", "justification": "Why it is needed."}),
        ("read_file", "Read a file, optionally a range of lines.",
         {"path": "Path relative to the workspace root.", "start": "First line.",
          "end": "Last line."}),
        ("write_file", "Create or overwrite a file.",
         {"path": "Path relative to the workspace root.", "content": "The new content."}),
        ("apply_patch", "Apply a unified diff to the workspace.",
         {"patch": "The diff, with file headers.", "check": "Only check it applies."}),
        ("list_directory", "List a directory.",
         {"path": "Directory path.", "depth": "How many levels to list."}),
        ("grep", "Search file contents with a regular expression.",
         {"pattern": "A regular expression.", "path": "Where to search.",
          "glob": "Only files matching this glob."}),
        ("run_tests", "Run the test suite or part of it.",
         {"selector": "A test id or keyword expression.", "timeout": "Seconds."}),
        ("git_status", "Show the working tree status.", {"path": "Limit to a path."}),
        ("git_diff", "Show changes.", {"path": "Limit to a path.", "staged": "Staged only."}),
        ("web_search", "Search the documentation index.",
         {"query": "Keywords.", "limit": "How many results."}),
        ("update_plan", "Record the plan and mark steps done.",
         {"steps": "The steps, in order.", "done": "Indices of finished steps."}),
        ("ask_user", "Ask the user a question and wait for the answer.",
         {"question": "The question."}),
    ]  # fmt: skip
    tools = []
    for name, description, properties in specs:
        tools.append(
            {
                "type": "function",
                "name": name,
                "description": description,
                "parameters": {
                    "type": "object",
                    "properties": {
                        key: {"type": "string", "description": text}
                        for key, text in properties.items()
                    },
                    "required": [next(iter(properties))],
                    "additionalProperties": False,
                },
                "strict": False,
            }
        )
    return tools
