"""Agent loops over an emulated network: WebSocket mode against HTTP full replay.

A scripted coding agent makes N tool calls through `warmsocket serve --upstream` in
front of the simulated upstream, in each mode of `warmsocket.bench.MODES` (and vLLM's
agentic-api when installed), in a fresh shuffled order per repetition, over each
network profile (client network namespace + veth + tbf + delay proxy; the loopback
fallback is reported when namespaces cannot be made). Every turn of every run is
checked; every mode must send the upstream the same prompts; the per-turn split
(upload, server, TTFT, decode, return, tool) must add up to the measured time.

Without `--benchmark-enable`: one small run per mode on the LAN profile (a smoke
test, about 20 s). With it: the full sizes (N = 8, 20, 50, three repetitions, WAN and
LAN; about 25 minutes) and the target: WebSocket mode at least 40% less end-to-end
time than HTTP full replay at N = 20 and 50 on WAN. `WARMSOCKET_BENCH_PROFILES`
(e.g. `wan`) and `WARMSOCKET_BENCH_REPS` change the profiles and repetitions. The
same run is `warmsocket bench --size full --suites agent-loop` (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import pytest

from benches.servers import require_release_build, timing_enabled
from warmsocket.bench import procs, runner, targets
from warmsocket.bench.agentloop import run_agent_loop
from warmsocket.cli import run_async
from warmsocket.netem import find_tools, inventory, run_command


def _config(timed: bool) -> Any:
    config = runner.options_for("full" if timed else "smoke").agent_loop
    if not timed:
        config = replace(config, profiles=["lan"])
    if profiles := os.environ.get("WARMSOCKET_BENCH_PROFILES"):
        config = replace(config, profiles=profiles.split(","))
    if reps := os.environ.get("WARMSOCKET_BENCH_REPS"):
        config = replace(config, reps=int(reps))
    return config


def _check_link_was_removed(link: dict[str, Any]) -> None:
    """The link was emulated, or says why not; an emulated one left nothing behind."""
    assert link["emulated"] or link["fallback_reason"], link
    if not link["emulated"]:
        return
    tools = find_tools()
    assert not isinstance(tools, str)
    found = inventory(run_command, tools)
    assert link["netns"] not in found.netns, link
    assert not [x.name for x in found.links if x.name.startswith(link["netns"])], link


def _check_section(section: dict[str, Any]) -> None:
    agentic_installed = procs.agentic_server_binary() is not None
    if not agentic_installed:
        assert "not installed" in section["skipped"]["agentic-api"], section["skipped"]
    for name, profile in section["profiles"].items():
        _check_link_was_removed(profile["link"])
        assert profile["failed"] == [], profile["failed"]  # (kept out of the summary)
        assert profile["checks"]["same_prompts_in_every_mode"], profile["checks"]
        for run in profile["runs"]:
            assert len(run["turns"]) == run["tool_calls"] + 1, (name, run["mode"])
            for turn in run["turns"]:
                parts = [turn[s] for s in ("upload", "server", "ttft", "decode", "return")]
                assert min(parts) >= 0, (name, run["mode"], turn)
                # (Holds by construction: the segments are differences of consecutive
                # instants. Their order, which can fail, is checked by breakdown();
                # a run out of order would be listed under failed, asserted empty.)
                assert abs(sum(parts) - turn["total"]) < 1e-6, turn
        for size, per_mode in profile["summary"].items():
            # Every mode ran: agentic-api too when it is installed.
            expected = {"websocket", "http-replay", "http-chained"}
            assert set(per_mode) == expected | ({"agentic-api"} if agentic_installed else set())
            replay = per_mode["http-replay"]
            # The point of WebSocket mode (and of previous_response_id over HTTP): the
            # agent stops resending its context.
            for mode in set(per_mode) - {"http-replay"}:
                sent = per_mode[mode]["wire_up_last_turn"]
                assert sent < replay["wire_up_last_turn"], (name, size, mode)
            # Byte-stable upstream requests in every warmsocket mode: the upstream's
            # prefix cache serves most of every prompt.
            for mode in ("websocket", "http-replay", "http-chained"):
                assert per_mode[mode]["cached_token_share"] > 0.5, (name, size, mode)


@pytest.mark.timeout(7200)
@pytest.mark.benchmark(group="agent-loop")
def test_agent_loop_websocket_vs_http_replay(benchmark: Any, capsys: Any) -> None:
    require_release_build(benchmark)
    timed = timing_enabled(benchmark)
    config = _config(timed)
    result: dict[str, Any] = {}

    def run() -> None:
        result.update(run_async(run_agent_loop(config, lambda _label: None)))

    benchmark.pedantic(run, rounds=1, iterations=1)
    _check_section(result)
    rows = targets.agent_loop_targets(result)
    benchmark.extra_info["targets"] = [t.as_dict() for t in rows]
    benchmark.extra_info["summary"] = {
        name: profile["summary"] for name, profile in result["profiles"].items()
    }
    if not timed:
        return
    with capsys.disabled():
        print()
        for line in runner.summary_lines({"agent_loop": result}):
            print(line)
        print(json.dumps([t.line() for t in rows], indent=1))
    failed = [t.line() for t in rows if t.met is False]
    assert not failed, "targets not met:\n" + "\n".join(failed)
