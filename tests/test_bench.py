"""The benchmark suite's parts: workload, turn split, lean client, targets, plots, CLI.

The benchmarks themselves run (smoke-sized) from `benches/`; these tests check the
pieces they are built from, mostly without servers.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from warmsocket.bench import procs, targets
from warmsocket.bench.leanws import connect, encode_frame
from warmsocket.bench.progress import Progress
from warmsocket.bench.timeline import TimelineError, WriteLog, breakdown
from warmsocket.bench.workload import WorkloadSpec
from warmsocket.prefixhash import count_tokens


def test_workload_is_deterministic_and_shaped_like_agent_traces() -> None:
    one, two = WorkloadSpec(tool_calls=30).build(), WorkloadSpec(tool_calls=30).build()
    assert one.instructions == two.instructions and one.arguments == two.arguments
    assert [o.text for o in one.outputs] == [o.text for o in two.outputs]
    summary = one.summary()
    assert 4_000 <= summary["system_tokens"] + summary["tools_tokens"] <= 8_000
    assert all(250 <= t <= 4_100 for t in summary["tool_output_tokens"])
    # Context by turn 30: system, tools, every call and output so far (about 80k).
    context = summary["system_tokens"] + summary["tools_tokens"]
    context += sum(summary["tool_output_tokens"]) + 30 * summary["call_tokens"]
    assert 70_000 <= context <= 90_000, context
    assert 240 <= summary["call_tokens"] <= 270
    # Input:output around 100:1 at N = 20: each turn's prompt is the whole context so
    # far, each output one call (and a short final answer).
    twenty = WorkloadSpec(tool_calls=20).build().summary()
    context, prompt = twenty["system_tokens"] + twenty["tools_tokens"], 0
    for tokens in twenty["tool_output_tokens"]:
        prompt += context
        context += twenty["call_tokens"] + tokens
    prompt += context
    assert 75 <= prompt / (20 * twenty["call_tokens"] + 5) <= 150
    # A shorter run is the start of a longer one.
    short = WorkloadSpec(tool_calls=8).build()
    assert [o.text for o in short.outputs] == [o.text for o in one.outputs[:8]]


def test_task_nonce_never_changes_the_prompt_length() -> None:
    workload = WorkloadSpec(tool_calls=3, system_tokens=200).build()
    lengths = {count_tokens(workload.task(f"{n:012d}")) for n in (0, 7, 10**11 + 3, 10**12 - 1)}
    assert len(lengths) == 1
    assert workload.task("000000000001").splitlines()[-1].startswith("/repeat 3 shell {")


def _turn(index: int, send: float, done: float, tool: float = 0.0) -> dict[str, Any]:
    return {
        "index": index,
        "send": send,
        "first_event": send + 0.01,
        "first_output": send + 0.02,
        "done": done,
        "tool_done": done + tool,
        "request_bytes": 100,
    }


def _record(received: float, first: float, finished: float) -> dict[str, Any]:
    return {
        "received": received,
        "first_token": first,
        "finished": finished,
        "bytes": 1000,
        "items": 3,
        "prompt_tokens": 500,
        "cached_tokens": 400,
    }


def test_breakdown_segments_add_up_to_the_turn() -> None:
    log = WriteLog()
    log.times = [10.02, 10.05, 10.20, 11.02]
    log.up = [300, 200, 0, 50]
    log.down = [0, 0, 900, 0]
    turns = [_turn(0, 10.0, 10.3, tool=0.5), _turn(1, 11.0, 11.2)]
    records = [_record(10.06, 10.10, 10.25), _record(11.03, 11.05, 11.15)]
    first, second = breakdown(turns, records, log)
    assert first.upload == pytest.approx(0.05) and first.server == pytest.approx(0.01)
    assert first.ttft == pytest.approx(0.04) and first.decode == pytest.approx(0.15)
    assert first.ret == pytest.approx(0.05) and first.tool == pytest.approx(0.5)
    assert sum(first.segments().values()) == pytest.approx(first.total + first.tool)
    assert (first.wire_up, first.wire_down) == (500, 900)
    assert (second.wire_up, second.upload) == (50, pytest.approx(0.02))
    with pytest.raises(TimelineError, match="saw 1 requests"):
        breakdown(turns, records[:1], log)
    with pytest.raises(TimelineError, match="no request bytes"):
        breakdown(turns, records, WriteLog())


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (_record(10.06, 10.26, 10.25), "turn 0: finished before first_token"),
        (_record(10.06, 10.10, 10.31), "turn 0: done before finished"),
        (_record(10.06, 10.05, 10.25), "turn 0: first_token before received"),
    ],
    ids=["first-token-after-finish", "finished-after-done", "token-before-request"],
)
def test_breakdown_refuses_a_timeline_out_of_order(record: dict[str, Any], message: str) -> None:
    """Segments that add up by construction prove nothing: a turn whose events are out
    of order (an upstream record matched to the wrong turn) is refused, not reported
    with a negative segment."""
    log = WriteLog()
    log.times, log.up, log.down = [10.02, 10.05], [300, 200], [0, 0]
    with pytest.raises(TimelineError, match=f"{message}: events out of order"):
        breakdown([_turn(0, 10.0, 10.3)], [record], log)


def test_lean_client_frames_and_exchanges() -> None:
    assert encode_frame(1, b"")[:2] == b"\x81\x80"
    assert len(encode_frame(1, b"x" * 200)) == 2 + 2 + 4 + 200
    assert len(encode_frame(1, b"x" * 70_000)) == 2 + 8 + 4 + 70_000

    async def main(port: int) -> None:
        conn = await connect(f"ws://127.0.0.1:{port}/")
        for size in (5, 300, 70_000):
            message = (b"0123456789abcdef" * (size // 16 + 1))[:size]
            reply, count = await conn.exchange(message, lambda _data: True)
            assert (reply, count) == (message, 1)
        conn.close()

    with procs.echo_server() as echo:
        asyncio.run(asyncio.wait_for(main(echo.port), 30))


def test_progress_prints_a_line_per_step_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(3, stream=stream)
    progress("first")
    progress("second")
    progress.note("a note")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[") and lines[0].endswith("0/3  first")
    assert "1/3" in lines[1] and "left" in lines[1]
    assert lines[2] == "a note" and "done in" in lines[-1]
    # Finished: a full bar, every step counted, however many steps were announced.
    assert lines[-1].startswith("[" + "#" * 24 + "] 3/3  done in") and "left" not in lines[-1]


def _results() -> dict[str, Any]:
    def mode(e2e: float, upload: float) -> dict[str, Any]:
        segments = {"upload": upload, "server": 0.001, "ttft": 0.02, "decode": 0.2}
        segments |= {"return": 0.02, "tool": 0.02}
        return {
            "runs": 3,
            "e2e_s": e2e,
            "turn_s": 0.3,
            "wire_up_per_turn": 4096.0,
            "turn_latency_by_index_s": [0.3, 0.31, 0.32],
            "segments_by_index_s": {k: [v, v, v] for k, v in segments.items()},
        }

    summary = {
        size: {"websocket": mode(6.0, 0.02), "http-replay": mode(10.0, 0.09)}
        for size in ("8", "20", "50")
    }
    for per_mode in summary.values():
        for entry in per_mode.values():
            entry["e2e_reduction_vs_http_replay"] = 1 - entry["e2e_s"] / 10.0
    point = {
        "connections": 64,
        "turns_per_echo": 0.12,
        "warmsocket": {"ops_per_second": 1200.0, "p50_s": 0.02, "p99_s": 0.06},
        "echo": {"ops_per_second": 10_000.0, "p50_s": 0.005, "p99_s": 0.01},
    }
    link = {"emulated": True, "fallback_reason": None, "link_ok": True}
    return {
        "agent_loop": {
            "config": {"reps": 3},
            "profiles": {"WAN": {"summary": summary, "link": link, "failed": []}},
        },
        "throughput": {"points": [{**point, "connections": 1}, point]},
        "memory": {
            "idle": {"bytes_per_connection": 9000.0, "connections": 1000},
            "cache": {"overhead_vs_item_bytes": 1.7, "tokens": 10**6, "bytes_per_token": 7.0},
        },
    }


def test_targets_report_met_unmet_and_unmeasured() -> None:
    rows = {t.name: t for t in targets.evaluate(_results())}
    wan20 = rows["agent loop WAN N=20: end-to-end reduction, WebSocket vs HTTP full replay"]
    assert wan20.met is True and wan20.value == pytest.approx(0.4)
    wan8 = rows["agent loop WAN N=8: end-to-end reduction, WebSocket vs HTTP full replay"]
    assert wan8.met is None  # reported, not a target
    lan = rows["agent loop LAN N=50: end-to-end reduction, WebSocket vs HTTP full replay"]
    assert lan.value is None and lan.met is None
    assert rows["throughput at 64 connections: turns/s over echo round trips/s"].met is True
    assert rows["throughput at 64 connections: p99 turn latency (s)"].met is False
    assert rows["memory: resident bytes per idle connection"].met is True
    cache = rows["memory: resident growth over raw item bytes of cached context"]
    assert cache.met is False and "NOT met" in cache.line()


def test_plots_are_drawn_from_a_result_document(tmp_path: Path) -> None:
    from warmsocket.bench.plots import draw_all

    written = draw_all(_results(), tmp_path)
    names = sorted(p.name for p in written)
    assert names == [
        "agent_breakdown.png",
        "agent_e2e.png",
        "agent_turn_latency.png",
        "throughput.png",
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _warmsocket(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "warmsocket", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def _why(result: subprocess.CompletedProcess[str], output_dir: Path) -> str:
    """What a failed `warmsocket bench` said (the summary, with FAILED lines, goes to
    stdout) and the failures its results.json records."""
    recorded = ""
    path = output_dir / "results.json"
    if path.exists():
        document = json.loads(path.read_text())
        profiles = (document.get("agent_loop") or {}).get("profiles", {})
        failed = {name: section.get("failed") for name, section in profiles.items()}
        recorded = json.dumps({"errors": document.get("errors"), "failed": failed})[:4000]
    return f"stderr:\n{result.stderr}\nstdout:\n{result.stdout}\nrecorded: {recorded}"


def test_bench_help_lists_every_option() -> None:
    result = _warmsocket("bench", "--help")
    assert result.returncode == 0
    for flag in ("--size", "--suites", "--profiles", "--modes", "--output-dir", "--time-limit"):
        assert flag in result.stdout
    assert "smoke" in result.stdout and "full" in result.stdout
    bad = _warmsocket("bench", "--profiles", "moon")
    assert bad.returncode == 2 and "choose from wan, lan, loopback" in bad.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--system-tokens", "50", "must be >= 100"),
        ("--call-tokens", "5", "must be >= 10"),
        ("--tool-ms", "-1", "must be >= 0"),
        ("--seconds", "-1", "must be > 0"),
        ("--reps", "0", "must be >= 1"),
        ("--decode-tps", "0", "must be > 0"),
        ("--time-limit", "nan", "must be > 0"),
        ("--tool-ms", "inf", "must be a finite number"),
        ("--seconds", "inf", "must be a finite number"),
        ("--overhead-ms", "inf", "must be a finite number"),
    ],
)
def test_bad_workload_flags_are_usage_errors(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    """Refused at once with a usage error, not a traceback from building the workload,
    nor accepted and then run as something else (--reps 0 ran once; `--tool-ms inf`
    ended in an OverflowError)."""
    result = _warmsocket("bench", flag, value, "--suites", "memory", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert f"argument {flag}: {message}" in result.stderr and "usage:" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_command_writes_results_and_plots(tmp_path: Path) -> None:
    result = _warmsocket(
        "bench", "--suites", "throughput", "--connections", "1,2", "--seconds", "0.2",
        "--output-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2/5" in result.stderr  # the progress bar, one line per step off a terminal
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["schema"] == "warmsocket-bench/1"
    assert [p["connections"] for p in document["throughput"]["points"]] == [1, 2]
    assert document["machine"]["cores"] and document["machine"]["load_average_end"]
    assert (tmp_path / "throughput.png").exists()
    assert "throughput    1 conns" in result.stdout


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_run(
    tmp_path: Path,
) -> None:
    # Not after 30-45 minutes of a full run, with its results lost.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    started = time.monotonic()
    result = _warmsocket("bench", "--output-dir", str(blocked / "out"))
    assert result.returncode == 2
    assert f"cannot write to --output-dir {blocked / 'out'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30  # (no suite ran)


def test_plots_that_cannot_be_drawn_fail_the_command_after_writing_results(
    tmp_path: Path,
) -> None:
    # A matplotlib that cannot be imported (as when the bench extra is missing).
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    out = tmp_path / "out"
    result = _warmsocket(
        "bench", "--suites", "throughput", "--connections", "1", "--seconds", "0.2",
        "--output-dir", str(out), env={"PYTHONPATH": str(tmp_path / "site")},
    )  # fmt: skip
    assert result.returncode == 1
    assert "writing plots failed" in result.stderr and "--no-plots" in result.stderr
    assert json.loads((out / "results.json").read_text())["throughput"]["points"]
    assert not list(out.glob("*.png"))
    skipped = _warmsocket(
        "bench", "--suites", "throughput", "--connections", "1", "--seconds", "0.2",
        "--output-dir", str(out), "--no-plots", env={"PYTHONPATH": str(tmp_path / "site")},
    )  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr


_TASK = "run 000000000001\nFix the cache.\n/repeat 3 shell {}"
_ARGUMENTS = json.dumps({"command": "ls", "justification": "look"})


def _call_item(index: int) -> dict[str, Any]:
    """The `shell` call the scripted model makes in turn `index`."""
    return {
        "type": "function_call",
        "id": f"fc_{index}",
        "call_id": f"call_{index}",
        "name": "shell",
        "arguments": _ARGUMENTS,
    }


def _new_items(index: int) -> list[dict[str, Any]]:
    """What the agent adds to the conversation in turn `index`."""
    if index == 0:
        return [{"type": "message", "role": "user", "content": _TASK}]
    output = f"output {index - 1}"
    return [{"type": "function_call_output", "call_id": f"call_{index - 1}", "output": output}]


class _ScriptedModel:
    """Answers an agent's turns as the workload's upstream does (a `shell` call per turn
    until N outputs are back, then `done after N calls`); records every request."""

    def __init__(self, tool_calls: int) -> None:
        self.tool_calls = tool_calls
        self.requests: list[dict[str, Any]] = []

    def answer(self, request: dict[str, Any]) -> list[bytes]:
        index = len(self.requests)
        self.requests.append(request)
        item: dict[str, Any] = _call_item(index)
        if index == self.tool_calls:
            text = f"done after {self.tool_calls} calls"
            content = [{"type": "output_text", "text": text}]
            item = {"type": "message", "role": "assistant", "content": content}
        response = {"id": f"resp_{index}", "output": [item], "usage": {"output_tokens": 9}}
        events = [
            {"type": "response.output_item.added", "item": item},
            {"type": "response.completed", "response": response},
        ]
        return [json.dumps(e).encode() for e in events]


class _FakeWebSocket:
    def __init__(self, model: _ScriptedModel) -> None:
        self.model = model
        self.pending: list[bytes] = []

    async def send(self, message: bytes, text: bool = False) -> None:
        assert text
        self.pending += self.model.answer(json.loads(message))

    async def recv(self, decode: bool = True) -> bytes:
        return self.pending.pop(0)

    async def close(self) -> None:
        pass


class _FakeStream:
    status = 200

    def __init__(self, events: list[bytes]) -> None:
        self.body = b"".join(b"data: " + e + b"\n\n" for e in events)

    async def chunks(self) -> Any:
        yield self.body

    def close(self) -> None:
        pass


def _run_agent(mode: str, monkeypatch: pytest.MonkeyPatch) -> tuple[_ScriptedModel, Any]:
    """Run the benchmark's agent in `mode` against a scripted model, without sockets: its
    WebSocket connection and HTTP pool are fakes that record the requests."""
    from warmsocket.bench import agent

    model = _ScriptedModel(tool_calls=3)

    async def fake_connect(url: str, **_options: Any) -> _FakeWebSocket:
        assert url == "ws://gateway/v1/responses"
        return _FakeWebSocket(model)

    class FakePool:
        def __init__(self, origin: Any, max_idle: int) -> None:
            pass

        async def request(self, parts: list[bytes], timeout: float) -> _FakeStream:
            head, body = parts
            assert head.startswith(b"POST /v1/responses HTTP/1.1\r\n")
            assert f"Content-Length: {len(body)}\r\n".encode() in head
            return _FakeStream(model.answer(json.loads(body)))

        def close(self) -> None:
            pass

    monkeypatch.setattr(agent, "connect", fake_connect)
    monkeypatch.setattr(agent, "HTTPPool", FakePool)
    websocket = mode in {"websocket", "agentic-api"}
    job = agent.Job(
        mode=mode,
        url="ws://gateway/v1/responses" if websocket else "http://gateway/v1",
        task=_TASK,
        settings={"model": "m", "instructions": "rules", "tools": []},
        arguments=_ARGUMENTS,
        outputs=[f"output {i}" for i in range(3)],
        tool_ms=0.0,
        timeout_s=10,
    )
    result = asyncio.run(agent.run(job))
    assert result.error is None, result.error
    assert result.final_text == "done after 3 calls"
    assert [t.response_id for t in result.turns] == ["resp_0", "resp_1", "resp_2", "resp_3"]
    return model, result


@pytest.mark.parametrize("mode", ["websocket", "agentic-api"])
def test_agent_websocket_modes_send_new_items_and_previous_response_id(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _result = _run_agent(mode, monkeypatch)
    assert len(model.requests) == 4
    for index, request in enumerate(model.requests):
        assert request["type"] == "response.create" and request["store"] is False
        assert request["instructions"] == "rules"
        assert request["input"] == _new_items(index)
        assert request.get("previous_response_id") == (f"resp_{index - 1}" if index else None)


def test_agent_http_replay_resends_the_whole_conversation_unstored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, result = _run_agent("http-replay", monkeypatch)
    assert len(model.requests) == 4
    conversation: list[dict[str, Any]] = []
    for index, request in enumerate(model.requests):
        assert request["store"] is False and request["stream"] is True
        assert "previous_response_id" not in request
        if index:  # the model's call, then its output
            conversation.append(_call_item(index - 1))
        conversation += _new_items(index)
        assert request["input"] == conversation, index
    sizes = [t.request_bytes for t in result.turns]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]


def test_agent_http_chained_sends_new_items_with_previous_response_id_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _result = _run_agent("http-chained", monkeypatch)
    assert len(model.requests) == 4
    for index, request in enumerate(model.requests):
        assert request["store"] is True and request["stream"] is True
        assert request["input"] == _new_items(index)
        assert request.get("previous_response_id") == (f"resp_{index - 1}" if index else None)


@pytest.mark.timeout(120)
def test_agent_loop_falls_back_to_loopback_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dataclasses import replace

    from warmsocket.bench import runner
    from warmsocket.bench.agentloop import run_agent_loop
    from warmsocket.cli import run_async
    from warmsocket.netem import link

    reason = "not running as root (simulated)"
    monkeypatch.setattr(link, "_preflight", lambda: reason)
    config = replace(
        runner.options_for("smoke").agent_loop,
        profiles=["wan"],
        modes=["websocket", "http-replay"],
    )
    steps: list[str] = []
    with caplog.at_level("WARNING", logger="warmsocket.netem"):
        section = run_async(run_agent_loop(config, steps.append))
    wan = section["profiles"]["WAN"]
    assert wan["link"]["emulated"] is False and wan["link"]["fallback_reason"] == reason
    assert wan["link"]["netns"] is None
    assert f"loopback fallback ({reason})" in wan["link"]["describe"]
    assert "rate by proxy" in wan["link"]["describe"]  # the proxy limits the rate instead
    assert any("falling back to loopback" in r.getMessage() for r in caplog.records)
    assert any(f"loopback fallback ({reason})" in line for line in runner.summary_lines(
        {"agent_loop": section}))  # fmt: skip
    # The benchmark still ran, over loopback.
    assert {r["mode"] for r in wan["runs"]} == {"websocket", "http-replay"}
    assert wan["checks"]["same_prompts_in_every_mode"]
    assert steps[0] == "WAN: warm-up" and len(steps) == 3
    # The proxy still holds each chunk for the one-way delay: a turn is a round trip.
    assert min(t["total"] for r in wan["runs"] for t in r["turns"]) >= 0.040


def test_plots_show_each_mode_each_segment_and_both_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    from warmsocket.bench.plots import SEGMENT_LABELS, draw_all

    figures: dict[str, Any] = {}
    save = Figure.savefig

    def record(self: Figure, path: Any, **kwargs: Any) -> None:
        figures[Path(path).name] = self
        save(self, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    results = _results()
    draw_all(results, tmp_path)
    modes = {"websocket", "http-replay"}
    summary = results["agent_loop"]["profiles"]["WAN"]["summary"]

    # Turn latency by turn index: a panel per size, a line per mode with its values.
    panels = [ax for ax in figures["agent_turn_latency.png"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["WAN, N=8", "WAN, N=20", "WAN, N=50"]
    for ax, size in zip(panels, ("8", "20", "50"), strict=True):
        lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert set(lines) == modes
        for mode in modes:
            expected = [v * 1e3 for v in summary[size][mode]["turn_latency_by_index_s"]]
            assert lines[mode] == pytest.approx(expected)

    # The stacked breakdown: a panel per mode at the largest size, a layer per segment.
    panels = [ax for ax in figures["agent_breakdown.png"].axes if ax.get_visible()]
    assert {ax.get_title() for ax in panels} == {f"WAN, N=50: {m}" for m in modes}
    for ax in panels:
        assert len(ax.collections) == len(SEGMENT_LABELS)
    legend = panels[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(SEGMENT_LABELS.values())

    # End to end: a bar per mode and size, WebSocket mode's change written above it.
    (ax,) = figures["agent_e2e.png"].axes
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [6.0] * 3 + [10.0] * 3
    assert [t.get_text() for t in ax.texts] == ["-40%"] * 3

    # Throughput against connections: warmsocket and the echo server, per point.
    left, _right = figures["throughput.png"].axes
    lines = {line.get_label(): line for line in left.get_lines()}
    assert set(lines) == {"warmsocket turns/s", "websockets echo round trips/s"}
    assert list(lines["warmsocket turns/s"].get_xdata()) == [1, 64]
    assert list(lines["websockets echo round trips/s"].get_ydata()) == [10_000.0, 10_000.0]


def test_full_size_runs_the_issues_sizes() -> None:
    from warmsocket.bench import MODES, runner

    full = runner.options_for("full")
    loop = full.agent_loop
    assert loop.sizes == [8, 20, 50] and loop.profiles == ["wan", "lan"] and loop.reps >= 3
    assert loop.modes == list(MODES) and "agentic-api" in MODES
    assert loop.latency.decode_tokens_per_second == 1_000  # the fast-inference regime
    assert full.throughput.connections == [1, 16, 64, 256]
    assert (full.memory.connections, full.memory.tokens) == (1_000, 1_000_000)
    assert set(full.suites) == {"agent-loop", "throughput", "memory"}


def test_the_default_test_run_smokes_the_benchmarks_untimed() -> None:
    """`pytest` collects benches/ and runs each bench once, small and untimed (targets
    are asserted only with --benchmark-enable)."""
    import tomllib

    from warmsocket.bench import runner

    root = Path(__file__).resolve().parent.parent
    ini = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "benches" in ini["testpaths"]
    assert "--benchmark-disable" in ini["addopts"].split()
    smoke = runner.options_for("smoke")
    assert smoke.agent_loop.sizes == [2] and smoke.agent_loop.reps == 1
    assert smoke.throughput.seconds <= 1 and smoke.memory.connections <= 100


def test_docs_show_the_plots_the_bench_draws(tmp_path: Path) -> None:
    from warmsocket.bench.plots import draw_all

    root = Path(__file__).resolve().parent.parent
    drawn = {p.name for p in draw_all(_results(), tmp_path)}
    readme = (root / "README.md").read_text()
    assert "](docs/img/agent_e2e.png)" in readme  # the headline plot
    benchmarks = (root / "docs" / "benchmarks.md").read_text()
    for name in drawn:
        assert f"](img/{name})" in benchmarks, name
        assert (root / "docs" / "img" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(120)
def test_agent_loop_past_its_time_limit_sets_up_no_link_and_runs_nothing() -> None:
    import time
    from dataclasses import replace

    from warmsocket.bench import runner
    from warmsocket.bench.agentloop import run_agent_loop
    from warmsocket.cli import run_async

    config = replace(
        runner.options_for("smoke").agent_loop, profiles=["lan", "wan"], modes=["websocket"]
    )
    steps: list[str] = []
    deadline = time.monotonic() - 1
    section = run_async(run_agent_loop(config, steps.append, deadline=deadline))
    assert steps == []  # not even a warm-up run
    for name in ("LAN", "WAN"):
        profile = section["profiles"][name]
        assert profile["truncated"] == "the time limit was reached"
        assert profile["runs"] == [] and "link" not in profile


@pytest.mark.timeout(180)
def test_bench_command_runs_the_agent_loop_into_results_and_plots(tmp_path: Path) -> None:
    result = _warmsocket(
        "bench", "--suites", "agent-loop", "--profiles", "lan",
        "--modes", "websocket,http-replay", "--output-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, _why(result, tmp_path)
    assert "done in" in result.stderr
    document = json.loads((tmp_path / "results.json").read_text())
    lan = document["agent_loop"]["profiles"]["LAN"]
    assert set(lan["summary"]["2"]) == {"websocket", "http-replay"}
    for entry in lan["summary"]["2"].values():
        assert entry["wire_up_per_turn"] > 0 and set(entry["segments_s"]) == {
            "upload", "server", "ttft", "decode", "return", "tool",
        }  # fmt: skip
    reported = [t for t in document["targets"] if t["name"].startswith("agent loop LAN N=")]
    assert len(reported) == 3  # beside WAN's, whatever they are
    assert {p.name for p in tmp_path.glob("agent_*.png")} == {
        "agent_e2e.png", "agent_turn_latency.png", "agent_breakdown.png",
    }  # fmt: skip
    assert "agent loop, LAN" in result.stdout


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children, their children, ...)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _links_owned_by(pid: int) -> list[str]:
    """Names of the emulated links (server-side veths) a process made, if any."""
    from warmsocket.netem import find_tools, inventory, run_command
    from warmsocket.netem.plan import parse_owner

    tools = find_tools()
    if isinstance(tools, str):
        return []
    owned = []
    for link in inventory(run_command, tools).links:
        owner = parse_owner(link.alias)
        if owner is not None and owner.pid == pid:
            owned.append(link.name)
    return owned


def _bench_until(label: str, *args: str) -> subprocess.Popen[str]:
    """`warmsocket bench` in the background, returned once its progress shows `label`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "warmsocket", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:  # (the test's timeout bounds this)
        if label in line:
            return process
    process.kill()
    raise AssertionError(f"the bench ended before {label!r}: {process.communicate()}")


@pytest.mark.timeout(120)
def test_sigterm_stops_every_server_and_removes_the_link(tmp_path: Path) -> None:
    """`timeout`, a cancelled CI job or a supervisor sends SIGTERM: the bench must
    stop the servers it started and remove its network namespace, as Ctrl-C does,
    not die at once and leave them behind."""
    process = _bench_until(
        "LAN N=30 websocket", "--suites", "agent-loop", "--profiles", "lan",
        "--modes", "websocket", "--tool-calls", "30", "--tool-ms", "200",
        "--time-limit", "100", "--output-dir", str(tmp_path),
    )  # fmt: skip
    children = _descendants(process.pid)
    links = _links_owned_by(process.pid)
    with process:  # (closes its pipes)
        try:
            names = [Path(f"/proc/{pid}/cmdline").read_text() for pid in children]
            assert any("simulate-upstream" in n for n in names) and any("serve" in n for n in names)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)  # (not its pipes: orphans would hold them open)
            time.sleep(0.5)  # (killed children of a gone parent are reaped by init)
            survivors = [
                Path(f"/proc/{pid}/cmdline").read_text() for pid in children if _running(pid)
            ]
            assert survivors == []
            if links:  # the link was emulated (root): nothing of it may stay behind
                assert _links_owned_by(process.pid) == []
            assert process.returncode == 128 + signal.SIGTERM  # it unwound instead of dying
            document = json.loads((tmp_path / "results.json").read_text())
            assert document["interrupted"] is True and document["interrupted_by"] == "SIGTERM"
        except BaseException:  # leave nothing running for the next test
            for pid in [process.pid, *children]:
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)
            raise


@pytest.mark.timeout(120)
def test_an_interrupted_bench_writes_what_finished(tmp_path: Path) -> None:
    """Ctrl-C part-way keeps the finished suites and agent-loop runs in results.json,
    marked interrupted, and exits 130 as a shell reports an interrupted command."""
    process = _bench_until(
        "LAN N=30 websocket", "--suites", "throughput,agent-loop,memory",
        "--connections", "1", "--seconds", "0.2", "--profiles", "lan", "--modes", "websocket",
        "--tool-calls", "1,30", "--tool-ms", "200", "--reps", "1", "--time-limit", "100",
        "--output-dir", str(tmp_path),
    )  # fmt: skip
    with process:
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted (SIGINT); results.json keeps what finished" in err
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["interrupted"] is True and document["interrupted_by"] == "SIGINT"
    assert [p["connections"] for p in document["throughput"]["points"]] == [1]
    lan = document["agent_loop"]["profiles"]["LAN"]
    assert lan["truncated"] == "interrupted"
    assert [(r["mode"], r["tool_calls"]) for r in lan["runs"]] == [("websocket", 1)]
    assert list(lan["summary"]) == ["1"] and lan["summary"]["1"]["websocket"]["runs"] == 1
    assert (tmp_path / "agent_e2e.png").exists()  # the plots of what finished
    assert document["skipped"] == {
        "agent-loop": "interrupted before it finished",
        "memory": "interrupted before it finished",
    }
    assert "memory" not in document and document["errors"] == {}


def test_bench_servers_ignore_the_callers_warmsocket_variables(tmp_path: Path) -> None:
    """A WARMSOCKET_* variable left in the shell (an API key, a mock latency) must not
    reach the servers the bench measures: with WARMSOCKET_API_KEY set every throughput
    handshake failed with 401, with WARMSOCKET_MOCK_TTFT_MS=20 the rate fell 60-fold,
    and results.json did not say why. The file names the variables it ignored."""
    result = _warmsocket(
        "bench", "--suites", "throughput", "--connections", "1", "--seconds", "0.2",
        "--no-plots", "--output-dir", str(tmp_path),
        env={"WARMSOCKET_API_KEY": "secret", "WARMSOCKET_MOCK_TTFT_MS": "20"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["errors"] == {}
    (point,) = document["throughput"]["points"]
    assert point["warmsocket"]["ops_per_second"] > 100  # not 1 turn per 20 ms or more
    assert document["ignored_environment"] == ["WARMSOCKET_API_KEY", "WARMSOCKET_MOCK_TTFT_MS"]
    assert "secret" not in (tmp_path / "results.json").read_text()


def test_every_bench_process_starts_without_warmsocket_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WARMSOCKET_SIM_OVERHEAD_MS", "500")
    monkeypatch.setenv("WARMSOCKET_MAX_LANES", "1")

    def variables(pid: int) -> set[str]:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return {v.split(b"=", 1)[0].decode() for v in environ.read().split(b"\0") if v}

    with (
        procs.simulated_upstream() as upstream,
        procs.warmsocket_server(env={"WARMSOCKET_LOG_LEVEL": "info"}) as server,
        procs.echo_server() as echo,
    ):
        assert not {v for v in variables(upstream.pid) if v.startswith("WARMSOCKET_")}
        assert not {v for v in variables(echo.pid) if v.startswith("WARMSOCKET_")}
        # What the harness sets on purpose still gets through.
        assert {v for v in variables(server.pid) if v.startswith("WARMSOCKET_")} == {
            "WARMSOCKET_LOG_LEVEL"
        }


def _run(mode: str, tool_calls: int, e2e: float) -> Any:
    from warmsocket.bench.agentloop import Run
    from warmsocket.bench.timeline import TurnBreakdown

    turn = TurnBreakdown(
        index=0, total=0.3, upload=0.05, server=0.001, ttft=0.02, decode=0.2, ret=0.029,
        tool=0.02, client_ttft=0.1, wire_up=4096, wire_down=2048, request_bytes=4000,
        upstream_bytes=5000, upstream_items=3, prompt_tokens=500, cached_tokens=400,
        output_tokens=30,
    )  # fmt: skip
    turns = [turn] * (tool_calls + 1)
    return Run("LAN", mode, tool_calls, 0, e2e, 0.01, turns, 0.5)


def test_a_time_limit_leaves_sizes_out_of_the_summary_and_the_plots_draw(
    tmp_path: Path,
) -> None:
    """`--tool-calls 1,10,20 --time-limit ...` cut short: N=10 ran in one mode only and
    N=20 not at all. The summary has no entry for N=20, and the plots draw what ran
    instead of failing ("writing plots failed", exit 1, no PNG)."""
    from warmsocket.bench.agentloop import summarize
    from warmsocket.bench.plots import draw_all

    runs = [_run("websocket", 1, 0.6), _run("http-replay", 1, 0.7), _run("http-replay", 10, 5.6)]
    summary = summarize(runs, ["websocket", "http-replay"], [1, 10, 20])
    assert list(summary) == ["1", "10"]
    assert set(summary["10"]) == {"http-replay"}
    written = draw_all({"agent_loop": {"profiles": {"LAN": {"summary": summary}}}}, tmp_path)
    assert {p.name for p in written} == {
        "agent_e2e.png", "agent_turn_latency.png", "agent_breakdown.png",
    }  # fmt: skip
    # A result file written before the fix, with an empty entry for N=20, draws too.
    summary["20"] = {}
    written = draw_all({"agent_loop": {"profiles": {"LAN": {"summary": summary}}}}, tmp_path)
    assert len(written) == 3


@pytest.mark.timeout(120)
def test_one_failed_run_keeps_the_other_runs_and_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails (a timeout, a wrong answer) is recorded with its mode, size and
    reason; the profile's other runs and its summary are kept, not the whole agent-loop
    section thrown away. agentic-api failing to start skips that mode only."""
    from contextlib import contextmanager
    from dataclasses import replace

    from warmsocket.bench import agentloop, runner
    from warmsocket.cli import run_async

    real_run = agentloop._Harness.run
    calls: list[tuple[str, int]] = []

    async def third_measured_run_fails(
        self: Any, mode: str, tool_calls: int, rep: int
    ) -> agentloop.Run:
        calls.append((mode, rep))
        if len(calls) == 5:  # two warm-up runs, then the third measured one
            raise agentloop.RunFailed(f"{mode} N={tool_calls}: simulated failure")
        return await real_run(self, mode, tool_calls, rep)

    @contextmanager
    def agentic_does_not_start(_port: int) -> Any:
        raise RuntimeError("agentic-server exited before listening")
        yield

    monkeypatch.setattr(agentloop._Harness, "run", third_measured_run_fails)
    monkeypatch.setattr(procs, "agentic_server_binary", lambda: "/usr/bin/agentic-server")
    monkeypatch.setattr(procs, "agentic_api", agentic_does_not_start)
    config = replace(
        runner.options_for("smoke").agent_loop,
        profiles=["lan"],
        modes=["websocket", "http-replay", "agentic-api"],
        reps=2,
    )
    section = run_async(agentloop.run_agent_loop(config, lambda _label: None))
    assert section["skipped"] == {
        "agentic-api": "agentic-api did not start: agentic-server exited before listening"
    }
    lan = section["profiles"]["LAN"]
    assert len(calls) == 6 and len(lan["runs"]) == 3
    (failed,) = lan["failed"]
    failed_mode = calls[4][0]
    assert failed == {
        "profile": "LAN", "mode": failed_mode, "tool_calls": 2, "rep": 1, "warm_up": False,
        "reason": f"{failed_mode} N=2: simulated failure",
    }  # fmt: skip
    assert lan["summary"]["2"][failed_mode]["runs"] == 1
    assert {mode: e["runs"] for mode, e in lan["summary"]["2"].items()} == {
        failed_mode: 1,
        ({"websocket", "http-replay"} - {failed_mode}).pop(): 2,
    }
    lines = runner.summary_lines({"agent_loop": section, "errors": {}})
    assert f"agent loop, LAN: 1 run(s) FAILED ({failed_mode} N=2; see results.json)" in lines


_SILENT = "import time; time.sleep(30)"
_CHATTY = (
    "import sys, time\nwhile True: print('starting', file=sys.stderr, flush=True); time.sleep(0.01)"
)


@pytest.mark.parametrize(
    ("server", "child"),
    [("simulated_upstream", _SILENT), ("echo_server", _SILENT), ("simulated_upstream", _CHATTY)],
    ids=["silent-json-log", "silent-echo", "chatty"],
)
def test_a_server_that_never_listens_is_killed_after_the_start_timeout(
    monkeypatch: pytest.MonkeyPatch, server: str, child: str
) -> None:
    """Every start waits a bounded time: a child that hangs before listening is killed
    after START_TIMEOUT, with a message that says so, not waited for as long as it
    likes and then reported as having "exited before listening (status None)"."""
    monkeypatch.setattr(procs, "START_TIMEOUT", 1.0)
    monkeypatch.setattr(procs, "warmsocket_command", lambda *_args: [sys.executable, "-c", child])
    monkeypatch.setattr(procs, "ECHO_SERVER", child)
    started = time.monotonic()
    with (
        pytest.raises(RuntimeError, match="did not start listening within 1 s"),
        getattr(procs, server)(),
    ):
        pass
    assert time.monotonic() - started < 5
    children = [Path(f"/proc/{pid}/cmdline").read_text() for pid in _descendants(os.getpid())]
    assert not [c for c in children if child in c.replace("\0", " ")]


def test_summary_compares_with_http_replay_only_where_it_ran() -> None:
    """`--modes websocket` printed "(+0.0% vs http-replay)" though http-replay never
    ran: a comparison that was not made."""
    from warmsocket.bench import runner

    summary = _results()["agent_loop"]["profiles"]["WAN"]["summary"]
    summary["8"].pop("http-replay")
    for entry in summary["8"].values():
        entry.pop("e2e_reduction_vs_http_replay")
    lines = runner.summary_lines({"agent_loop": {"profiles": {"WAN": {"summary": summary}}}})
    (n8,) = [line for line in lines if line.startswith("  N=  8")]
    assert "websocket" in n8 and "vs http-replay" not in n8 and "e2e   6.000 s, turn" in n8
    (n20,) = [line for line in lines if line.startswith("  N= 20 websocket")]
    assert "(-40.0% vs http-replay)" in n20
    # The baseline is not compared with itself (it printed "(-0.0% vs http-replay)").
    (baseline,) = [line for line in lines if line.startswith("  N= 20 http-replay")]
    assert "vs http-replay" not in baseline


def test_progress_counts_only_the_agent_loop_modes_that_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """agentic-api, skipped when not installed, is not counted in the progress bar's
    total (it never reached 100 % before "done", and the time left was overestimated)."""
    from dataclasses import replace

    from warmsocket.bench import MODES, runner

    config = replace(runner.options_for("smoke").agent_loop, profiles=["lan"], modes=list(MODES))
    monkeypatch.setattr(procs, "agentic_server_binary", lambda: None)
    assert config.steps() == 1 + 3  # the warm-up, then one run in each of three modes
    monkeypatch.setattr(procs, "agentic_server_binary", lambda: "/usr/bin/agentic-server")
    assert config.steps() == 1 + 4


def test_targets_are_not_met_from_a_smoke_run_or_a_link_that_is_not_the_profile() -> None:
    """A smoke run's memory (100 connections, an 88 KB fill: below what the resident
    set size resolves) and a WAN result measured over the loopback fallback, an
    unmeasured link or one off its nominal RTT or rate are reported, never "met"."""
    results = _results()
    results["memory"]["idle"]["connections"] = 100
    results["memory"]["cache"]["tokens"] = 19_536
    rows = {t.name: t for t in targets.evaluate(results)}
    idle = rows["memory: resident bytes per idle connection"]
    assert idle.met is None and idle.value == 9000.0
    assert idle.line().endswith("not measured (smoke size: 100 connections; judged at 1,000)")
    cache = rows["memory: resident growth over raw item bytes of cached context"]
    assert cache.met is None and "judged at 1,000,000 tokens" in cache.note

    wan20 = "agent loop WAN N=20: end-to-end reduction, WebSocket vs HTTP full replay"
    link = results["agent_loop"]["profiles"]["WAN"]["link"]
    for change, note in [
        ({"emulated": False, "fallback_reason": "not root"}, "fell back to loopback (not root)"),
        ({"link_ok": None}, "the link was not measured"),
        ({"link_ok": False}, "measured RTT or rate is off the profile's"),
    ]:
        results["agent_loop"]["profiles"]["WAN"]["link"] = {**link, **change}
        target = {t.name: t for t in targets.evaluate(results)}[wan20]
        assert target.met is None and target.value == pytest.approx(0.4)
        assert note in target.note


def test_targets_are_not_judged_from_partial_agent_loop_runs() -> None:
    """An interrupted WAN profile with one run per mode (the other http-replay run
    failed) read "0.45 (goal >= 40%): met", a median of one run each. A profile cut
    short, or a size with fewer runs of a compared mode than --reps (failed, or lost
    to an error part-way through), is reported, not judged."""
    wan20 = "agent loop WAN N=20: end-to-end reduction, WebSocket vs HTTP full replay"
    failed = {"mode": "http-replay", "tool_calls": 20, "rep": 1, "warm_up": False}
    cases: list[tuple[dict[str, Any], dict[str, int], str]] = [
        (
            {"truncated": "interrupted", "failed": [failed]},
            {"websocket": 1, "http-replay": 1},
            "not judged: interrupted",
        ),
        ({"truncated": "the time limit was reached"}, {}, "not judged: the time limit was reached"),
        (
            {"failed": [failed]},
            {"http-replay": 2},
            "not judged: 2 of 3 http-replay runs (1 failed)",
        ),
        ({}, {"websocket": 1}, "not judged: 1 of 3 websocket runs"),  # an error part-way
    ]
    for change, runs, note in cases:
        results = _results()
        wan = results["agent_loop"]["profiles"]["WAN"]
        wan |= change
        for mode, count in runs.items():
            wan["summary"]["20"][mode]["runs"] = count
        target = {t.name: t for t in targets.evaluate(results)}[wan20]
        assert target.met is None and target.value == pytest.approx(0.4), note
        assert target.note == note
        assert target.line().endswith(f"not measured ({note})")


def test_link_is_ok_within_5_ms_and_85_percent_of_its_profile() -> None:
    from warmsocket.bench import runner
    from warmsocket.bench.agentloop import link_ok
    from warmsocket.netem.measure import LinkMeasurement

    def measured(rtt: float, down: float, emulated: bool = True) -> LinkMeasurement:
        return LinkMeasurement(
            profile="WAN", emulated=emulated, rate_limiter="tbf", fallback_reason=None,
            nominal_rtt_ms=40.0, nominal_rate_mbit=50.0, connect_rtt_ms=rtt * 2, rtt_ms=rtt,
            rtt_min_ms=rtt, rtt_max_ms=rtt, down_mbit=down, up_mbit=48.0, bulk_bytes=1 << 21,
        )  # fmt: skip

    assert link_ok(measured(40.3, 47.9))  # the documented WAN run
    assert not link_ok(measured(46.0, 47.9))  # RTT too long
    assert not link_ok(measured(40.3, 40.0))  # rate under 85 %
    assert not link_ok(measured(40.3, 47.9, emulated=False))
    line = runner._link_line(measured(46.0, 47.9).as_dict(), False)
    assert line == (
        "  link measured: RTT 46.0 ms (nominal 40), 47.9 down / 48.0 up Mbit/s (nominal 50): "
        "OFF NOMINAL: targets not judged"
    )


def test_the_summary_shows_a_link_rate_too_quick_to_time() -> None:
    """A transfer too quick to time has no rate (None, which counts as nominal). The
    summary printed after a whole run raised TypeError on it: results.json was
    written, but no summary, and the command ended in a traceback."""
    from warmsocket.bench import runner
    from warmsocket.bench.agentloop import link_ok
    from warmsocket.netem.measure import LinkMeasurement

    measured = LinkMeasurement(
        profile="LAN", emulated=True, rate_limiter="tbf", fallback_reason=None,
        nominal_rtt_ms=0.5, nominal_rate_mbit=1000.0, connect_rtt_ms=0.3, rtt_ms=0.4,
        rtt_min_ms=0.3, rtt_max_ms=0.6, down_mbit=None, up_mbit=940.2, bulk_bytes=1 << 21,
    )  # fmt: skip
    assert link_ok(measured)
    line = runner._link_line(measured.as_dict(), True)
    assert line == (
        "  link measured: RTT 0.4 ms (nominal 0.5), - down / 940.2 up Mbit/s "
        "(nominal 1000; - too quick to time): as nominal"
    )


def test_the_commit_recorded_is_warmsocket_s_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed (non-editable) warmsocket inside another project's git repository
    (its virtualenv in that repository) recorded that project's commit as the commit
    measured; only a warmsocket checkout's commit is recorded."""
    from warmsocket.bench import machine

    def repository(root: Path, project: str, package: str) -> Path:
        (root / package).mkdir(parents=True)
        (root / "pyproject.toml").write_text(f'[project]\nname = "{project}"\n')
        (root / package / "machine.py").write_text("")
        git = ["git", "-C", str(root), "-c", "user.email=x@x", "-c", "user.name=x"]
        subprocess.run([*git, "init", "-q"], check=True)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", "one"], check=True)
        return root / package / "machine.py"

    installed = repository(
        tmp_path / "other", "someapp", ".venv/lib/python3.11/site-packages/warmsocket/bench"
    )
    monkeypatch.setattr(machine, "__file__", str(installed))
    assert machine.git_commit() is None
    checkout = repository(tmp_path / "warmsocket", "warmsocket", "python/warmsocket/bench")
    monkeypatch.setattr(machine, "__file__", str(checkout))
    head = subprocess.run(
        ["git", "-C", str(tmp_path / "warmsocket"), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert machine.git_commit() == head
