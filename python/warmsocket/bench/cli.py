"""`warmsocket bench`: the command line of the benchmark suite."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from warmsocket.bench import MIN_CALL_TOKENS, MIN_SYSTEM_TOKENS, MODES, PROFILES, SUITES


def _csv(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        values = [v.strip().lower() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join(choices)} (comma-separated); got {text!r}"
            )
        return values

    return parse


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"integers >= 1: {text!r}")
    return values


def _bounded(kind: Callable[[str], float], low: float, *, above: bool = False) -> Any:
    """An argparse type: a `kind` number >= `low` (> `low` with `above`), so that a bad
    value is a usage error at once, not a traceback from the workload or a run that
    measures nothing."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if math.isnan(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g}: {text}")
        if math.isinf(value):  # not a duration or a speed: sleeps and timeouts overflow
            raise argparse.ArgumentTypeError(f"must be a finite number: {text}")
        return value

    return parse


def add_command(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite (agent loops over an emulated network, throughput, "
        "memory) and write results.json and PNG plots",
        description="Run warmsocket's benchmark suite and write results.json plus PNG plots "
        "into the output directory. agent-loop: a scripted coding agent makes N tool calls "
        "through warmsocket (WebSocket mode, HTTP full replay, HTTP with "
        "previous_response_id, and vLLM's agentic-api when installed) against the "
        "simulated upstream, over an emulated network (a client network namespace, veth, "
        "tbf rate limit and a delay proxy; root is needed, else it falls back to "
        "loopback and says so). throughput: turns/s and p50/p99 latency against "
        "concurrent connections next to a websockets echo server. memory: resident bytes "
        "per idle connection and per cached token. See docs/benchmarks.md.",
        epilog="Ctrl-C, SIGTERM or SIGHUP stop the run cleanly (servers, the emulated "
        "link): what finished is still written, marked interrupted, and the exit status "
        "is 128 plus the signal's number. A failed run or suite makes it 1.",
    )
    bench.add_argument(
        "--size",
        choices=["smoke", "full"],
        default="smoke",
        help="smoke: everything once, small (about a minute); full: the documented sizes "
        "(about 30-45 minutes) (default: smoke)",
    )
    bench.add_argument(
        "--suites",
        type=_csv(SUITES),
        default=None,
        help=f"which suites, comma-separated (default: all of {','.join(SUITES)})",
    )
    bench.add_argument(
        "--profiles",
        type=_csv(PROFILES),
        default=None,
        help="network profiles of the agent loop: wan (40 ms RTT, 50 Mbit/s), lan (0.5 ms, "
        "1 Gbit/s), loopback (no emulation) (default: wan,lan)",
    )
    bench.add_argument(
        "--modes",
        type=_csv(MODES),
        default=None,
        help=f"agent-loop modes (default: all of {','.join(MODES)}; agentic-api is "
        "skipped, with the reason in the results, when it is not installed or does not "
        "start)",
    )
    bench.add_argument(
        "--tool-calls", type=_ints, default=None, help="agent-loop sizes N (full: 8,20,50)"
    )
    bench.add_argument(
        "--reps", type=_bounded(int, 1), default=None, help="agent-loop repetitions (full: 3)"
    )
    bench.add_argument(
        "--connections",
        type=_ints,
        default=None,
        help="throughput connection counts (full: 1,16,64,256)",
    )
    bench.add_argument(
        "--seconds",
        type=_bounded(float, 0, above=True),
        default=None,
        help="throughput: seconds per point (full: 10)",
    )
    work = bench.add_argument_group("workload and upstream latency model (agent loop)")
    work.add_argument(
        "--tool-ms", type=_bounded(float, 0), default=None, help="tool time per call (20)"
    )
    work.add_argument(
        "--call-tokens",
        type=_bounded(int, MIN_CALL_TOKENS),
        default=None,
        help=f"output tokens of each tool call, >= {MIN_CALL_TOKENS} (250)",
    )
    work.add_argument(
        "--system-tokens",
        type=_bounded(int, MIN_SYSTEM_TOKENS),
        default=None,
        help=f"system prompt tokens, >= {MIN_SYSTEM_TOKENS} (5000)",
    )
    work.add_argument(
        "--prefill-tps",
        type=_bounded(float, 0, above=True),
        default=None,
        help="upstream prefill speed for uncached tokens, tokens/s (50000)",
    )
    work.add_argument(
        "--decode-tps",
        type=_bounded(float, 0, above=True),
        default=None,
        help="upstream decode speed, tokens/s (1000)",
    )
    work.add_argument(
        "--overhead-ms",
        type=_bounded(float, 0),
        default=None,
        help="upstream fixed overhead per request (0)",
    )
    work.add_argument("--seed", type=int, default=None, help="workload and order seed")
    bench.add_argument(
        "--output-dir",
        type=Path,
        default=Path("bench-results"),
        help="where results.json and the PNGs go (default: ./bench-results)",
    )
    bench.add_argument(
        "--time-limit",
        type=_bounded(float, 0, above=True),
        default=None,
        help="seconds the whole run may take; later work is skipped and reported "
        "(smoke: 600, full: 5400)",
    )
    bench.add_argument("--no-plots", action="store_true", help="write results.json only")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")


UNWIND_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a run the way Ctrl-C does: `timeout`, a cancelled CI job or a
supervisor sends SIGTERM, a closed terminal SIGHUP."""


def _interrupt_like_ctrl_c(received: list[int]) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        # Whatever handles SIGINT right now: asyncio's while the agent loop runs (it
        # cancels the main task, so the links and servers are torn down by their
        # context managers), else Python's default, which raises KeyboardInterrupt.
        on_sigint = signal.getsignal(signal.SIGINT)
        if callable(on_sigint):
            on_sigint(signal.SIGINT, frame)
        else:  # SIGINT ignored (started in the background): unwind all the same
            raise KeyboardInterrupt

    return handler


@contextmanager
def _signals_unwind_like_ctrl_c() -> Iterator[list[int]]:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C while the suites run: without it they
    kill this process at once, skipping every `finally`, and leave the servers running
    and the emulated link (namespace, veth, tbf) behind. A signal that was ignored when
    the command started (`nohup` ignores SIGHUP) stays ignored. Yields the list of
    those signals received."""
    received: list[int] = []
    handler = _interrupt_like_ctrl_c(received)
    previous = {}
    for signum in UNWIND_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _exit_status(results: dict[str, Any], received: list[int], plots_failed: bool) -> int:
    """128 + the signal for an interrupted run (130 for Ctrl-C, 143 for SIGTERM, 129 for
    SIGHUP), as a shell reports a command killed by it; 1 when a suite or an agent-loop
    run failed or the plots asked for were not drawn (a failure a script should see);
    else 0."""
    from warmsocket.bench.runner import failed_runs

    if results.get("interrupted"):
        return 128 + (received[0] if received else signal.SIGINT)
    return 1 if results["errors"] or failed_runs(results) or plots_failed else 0


def bench_command(args: argparse.Namespace) -> int:
    from warmsocket.bench import runner

    options = runner.options_for(args.size)
    loop, workload = options.agent_loop, options.agent_loop.workload
    work_changes = {
        k: v
        for k, v in {
            "tool_ms": args.tool_ms,
            "call_tokens": args.call_tokens,
            "system_tokens": args.system_tokens,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    latency_changes = {
        k: v
        for k, v in {
            "prefill_tokens_per_second": args.prefill_tps,
            "decode_tokens_per_second": args.decode_tps,
            "overhead_ms": args.overhead_ms,
        }.items()
        if v is not None
    }
    loop = replace(
        loop,
        workload=replace(workload, **work_changes),
        latency=replace(loop.latency, **latency_changes),
    )
    if args.profiles:
        loop = replace(loop, profiles=args.profiles)
    if args.modes:
        loop = replace(loop, modes=args.modes)
    if args.tool_calls:
        loop = replace(loop, sizes=args.tool_calls)
    if args.reps is not None:
        loop = replace(loop, reps=args.reps)
    if args.seed is not None:
        loop = replace(loop, seed=args.seed)
    throughput = options.throughput
    if args.connections:
        throughput = replace(throughput, connections=args.connections)
    if args.seconds is not None:
        throughput = replace(throughput, seconds=args.seconds)
    options = replace(
        options,
        suites=args.suites or options.suites,
        agent_loop=loop,
        throughput=throughput,
        output_dir=args.output_dir,
        plots=not args.no_plots,
        progress=not args.quiet,
        time_limit=args.time_limit if args.time_limit is not None else options.time_limit,
    )
    try:
        # Checked first: a full run takes most of an hour, and its results would be
        # lost at the end for want of a place to write them.
        runner.check_output_dir(options.output_dir)
    except OSError as exc:
        print(
            f"warmsocket bench: cannot write to --output-dir {options.output_dir}: "
            f"{exc.strerror or exc}; give a directory this user can write",
            file=sys.stderr,
        )
        return 2
    with _signals_unwind_like_ctrl_c() as received:
        results = runner.run(options)
    if results.get("interrupted"):
        name = signal.Signals(received[0]).name if received else "SIGINT"
        results["interrupted_by"] = name
        print(
            f"warmsocket bench: interrupted ({name}); results.json keeps what finished",
            file=sys.stderr,
        )
    plots_failed = False
    try:
        written = runner.write(results, options)
    except Exception as exc:  # results.json must still be there
        print(
            f"warmsocket bench: writing plots failed: {exc} "
            "(results.json is written; --no-plots skips the plots)",
            file=sys.stderr,
        )
        plots_failed = True
        options = replace(options, plots=False)
        written = runner.write(results, options)
    for line in runner.summary_lines(results):
        print(line)
    for path in written:
        print(f"wrote {path}")
    return _exit_status(results, received, plots_failed)
