"""Runs the benchmark suites, writes the JSON result file and the plots.

Sizes:

* `smoke`: everything once, small (a 2-call agent run with a small workload, 0.5 s
  throughput points, 100 idle connections, 20k cached tokens): about a minute;
* `full`: the issue's sizes (N = 8, 20, 50, three repetitions; 1, 16, 64, 256
  connections for 10 s each; 1,000 idle connections; 1M cached tokens).

A time limit bounds the whole run: suites that have not started when it passes are
skipped, and the agent loop stops between runs; the result file says what was cut.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmsocket.bench import SUITES, machine, procs, targets
from warmsocket.bench.agentloop import AgentLoopConfig, run_agent_loop
from warmsocket.bench.memory import MemoryConfig, run_memory
from warmsocket.bench.progress import Progress
from warmsocket.bench.throughput import ThroughputConfig, run_throughput
from warmsocket.bench.workload import WorkloadSpec

SCHEMA = "warmsocket-bench/1"
INTERRUPTED = "interrupted before it finished"


@dataclass(slots=True)
class BenchOptions:
    size: str = "smoke"
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    agent_loop: AgentLoopConfig = field(default_factory=AgentLoopConfig)
    throughput: ThroughputConfig = field(default_factory=ThroughputConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    time_limit: float = 600.0
    output_dir: Path = Path("bench-results")
    plots: bool = True
    progress: bool = True


def options_for(size: str) -> BenchOptions:
    """The default options of a size."""
    if size == "full":
        return BenchOptions(size="full", time_limit=5400.0)
    if size != "smoke":
        raise ValueError(f"unknown size {size!r} (smoke or full)")
    smoke_workload = WorkloadSpec(
        tool_calls=1,
        system_tokens=400,
        output_tokens_min=100,
        output_tokens_max=400,
        call_tokens=30,
        tool_ms=5.0,
    )
    return BenchOptions(
        size="smoke",
        agent_loop=AgentLoopConfig(sizes=[2], reps=1, workload=smoke_workload, measure_link=False),
        throughput=ThroughputConfig(connections=[1, 16], seconds=0.5, warmup=0.2),
        memory=MemoryConfig(connections=100, tokens=20_000, text_tokens=200, chains=4),
        time_limit=600.0,
    )


def _steps(options: BenchOptions) -> int:
    steps = 1
    if "agent-loop" in options.suites:
        steps += options.agent_loop.steps()
    if "throughput" in options.suites:
        steps += options.throughput.steps()
    if "memory" in options.suites:
        steps += options.memory.steps()
    return steps


def _run_suite(
    suite: str,
    options: BenchOptions,
    progress: Progress,
    deadline: float,
    results: dict[str, Any],
) -> None:
    """Run one suite into `results`."""
    from warmsocket.cli import run_async

    if suite == "agent-loop":
        # Filled as runs finish, so an interrupted loop keeps the runs it finished.
        section: dict[str, Any] = {}
        results["agent_loop"] = section
        run_async(run_agent_loop(options.agent_loop, progress, deadline=deadline, out=section))
    elif suite == "throughput":
        results["throughput"] = run_throughput(options.throughput, progress)
    elif suite == "memory":
        results["memory"] = run_memory(options.memory, progress)


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the selected suites; the result document (also when a suite fails, and with
    `"interrupted": true` and what finished when interrupted)."""
    progress = Progress(_steps(options), enabled=options.progress)
    deadline = time.monotonic() + options.time_limit
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "size": options.size,
        "machine": machine.describe(),
        # Not passed on to the servers (see procs.child_env); named so a reader of
        # the file knows they were set and had no effect.
        "ignored_environment": procs.ignored_environment(),
        "errors": {},
        "skipped": {},
    }
    finished: list[str] = []
    try:
        for suite in options.suites:
            if time.monotonic() > deadline:
                results["skipped"][suite] = "the time limit was reached"
                continue
            try:
                _run_suite(suite, options, progress, deadline, results)
            except Exception as exc:  # reported in the result file, and the run goes on
                results["errors"][suite] = f"{type(exc).__name__}: {exc}"
                progress.note(f"{suite} failed: {exc}")
            finished.append(suite)
    except KeyboardInterrupt:
        # Ctrl-C, or SIGTERM/SIGHUP made into one by the command: the servers are
        # stopped by now; what finished (agent-loop runs included) is kept and written.
        results["interrupted"] = True
        for suite in options.suites:
            if suite not in finished:
                results["skipped"].setdefault(suite, INTERRUPTED)
        progress.note("interrupted: keeping the results of what finished")
    finally:
        results["machine"]["load_average_end"] = machine.load_average()
        results["targets"] = [t.as_dict() for t in targets.evaluate(results)]
        progress.close()
    return results


def check_output_dir(directory: Path) -> None:
    """Make the output directory and check that a file can be written in it, before
    the suites run. Raises OSError."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
        pass


def write(results: dict[str, Any], options: BenchOptions) -> list[Path]:
    """Write `results.json` (and the plots) into the output directory."""
    directory = options.output_dir
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "results.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    written = [path]
    if options.plots:
        from warmsocket.bench.plots import draw_all

        written += draw_all(results, directory)
    return written


UNTIMED = "-"
"""A measured rate that is None: the transfer was too quick to time (it counts as
meeting the nominal rate)."""


def _mbit(rate: float | None) -> str:
    return UNTIMED if rate is None else f"{rate:.1f}"


def _link_line(measured: dict[str, Any], ok: bool | None) -> str:
    """The link as measured next to its profile's nominal values."""
    nominal_rate = measured["nominal_rate_mbit"]
    rate = "unlimited" if nominal_rate is None else f"{nominal_rate:g}"
    rates = (measured["down_mbit"], measured["up_mbit"])
    untimed = f"; {UNTIMED} too quick to time" if None in rates else ""
    return (
        f"  link measured: RTT {measured['rtt_ms']:.1f} ms (nominal "
        f"{measured['nominal_rtt_ms']:g}), {_mbit(rates[0])} down / "
        f"{_mbit(rates[1])} up Mbit/s (nominal {rate}{untimed}): "
        f"{'as nominal' if ok else 'OFF NOMINAL: targets not judged'}"
    )


def failed_runs(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The agent-loop runs that failed, by profile (profiles without failures left out)."""
    profiles = (results.get("agent_loop") or {}).get("profiles", {})
    return {name: sec["failed"] for name, sec in profiles.items() if sec.get("failed")}


def summary_lines(results: dict[str, Any]) -> list[str]:
    """A short human-readable summary of a result document."""
    lines = []
    loop = results.get("agent_loop") or {}
    for name, section in loop.get("profiles", {}).items():
        link = section.get("link", {})
        lines.append(f"agent loop, {link.get('describe', name)}")
        if measured := link.get("measured"):
            lines.append(_link_line(measured, link.get("link_ok")))
        for size, per_mode in section.get("summary", {}).items():
            for mode, entry in per_mode.items():
                reduction = entry.get("e2e_reduction_vs_http_replay")
                # Without http-replay at this size there is nothing to compare with;
                # http-replay itself is the baseline, not compared with itself.
                compared = reduction is not None and mode != "http-replay"
                versus = f" ({-reduction:+.1%} vs http-replay)" if compared else ""
                lines.append(
                    f"  N={size:>3} {mode:<13} e2e {entry['e2e_s']:7.3f} s{versus}, "
                    f"turn {entry['turn_s'] * 1e3:6.1f} ms, "
                    f"{entry['wire_up_per_turn'] / 1024:7.1f} KiB up/turn"
                )
    for point in (results.get("throughput") or {}).get("points", []):
        ws, echo = point["warmsocket"], point["echo"]
        lines.append(
            f"throughput {point['connections']:>4} conns: {ws['ops_per_second']:8.0f} turns/s "
            f"(p50 {ws['p50_s'] * 1e3:.1f} ms, p99 {ws['p99_s'] * 1e3:.1f} ms), echo "
            f"{echo['ops_per_second']:8.0f}/s, ratio {point['turns_per_echo']:.3f}"
        )
    for name, failed in failed_runs(results).items():
        which = ", ".join(f"{f['mode']} N={f['tool_calls']}" for f in failed)
        lines.append(f"agent loop, {name}: {len(failed)} run(s) FAILED ({which}; see results.json)")
    for suite, error in results.get("errors", {}).items():
        lines.append(f"{suite} FAILED: {error}")
    lines += [targets.Target(**t).line() for t in results.get("targets", [])]
    return lines
