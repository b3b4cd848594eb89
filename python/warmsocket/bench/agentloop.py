"""The agent-loop benchmark: N tool calls through warmsocket in four modes, over a real link.

Set-up (one run of `run_agent_loop`):

    client namespace                    root namespace (loopback servers)
    agent (its own process)  --link-->  delay proxy --> warmsocket serve --upstream ...
                                        delay proxy --> agentic-server  --.
                                                                           v
                                                      warmsocket simulate-upstream
                                                      (prefill/decode latency model,
                                                       prefix cache, /stats)

For each network profile (an `EmulatedLink`: namespace, veth, tbf, delay proxy; or the
loopback fallback, said loudly), each repetition and each size N, the modes run one
after the other in a fresh shuffled order, every run a new agent process and a new
conversation (a run nonce keeps runs out of each other's prefix cache; the shared
system prompt and tools are warmed first, as across real sessions). Every run is
checked turn by turn (`agent.check_turn`), the agent must have run in the client
namespace when the link is emulated, and the upstream must have seen one request per
turn with the same prompt in every warmsocket mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from warmsocket.bench import MODES, procs
from warmsocket.bench.agent import Job, network_namespace
from warmsocket.bench.machine import load_average
from warmsocket.bench.timeline import SEGMENTS, TimelineError, TurnBreakdown, WriteLog, breakdown
from warmsocket.bench.workload import Workload, WorkloadSpec
from warmsocket.netem import EmulatedLink, get_profile, measure_link
from warmsocket.netem.measure import LinkMeasurement

BASELINE = "http-replay"


@dataclass(frozen=True, slots=True)
class LatencyConfig:
    """The simulated upstream's latency model (see docs/benchmarks.md)."""

    prefill_tokens_per_second: float = 50_000.0
    decode_tokens_per_second: float = 1_000.0
    overhead_ms: float = 0.0

    def flags(self) -> list[str]:
        return [
            "--prefill-tokens-per-second", f"{self.prefill_tokens_per_second:g}",
            "--decode-tokens-per-second", f"{self.decode_tokens_per_second:g}",
            "--overhead-ms", f"{self.overhead_ms:g}",
        ]  # fmt: skip


@dataclass(slots=True)
class AgentLoopConfig:
    sizes: list[int] = field(default_factory=lambda: [8, 20, 50])
    profiles: list[str] = field(default_factory=lambda: ["wan", "lan"])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    reps: int = 3
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec(tool_calls=1))
    """Everything but `tool_calls`, which comes from `sizes`."""
    seed: int = 1
    measure_link: bool = True

    def runnable_modes(self) -> list[str]:
        """The modes that will run: agentic-api only when it is installed (one that does
        not start is found out later)."""
        installed = procs.agentic_server_binary() is not None
        return [m for m in self.modes if m in MODES and (m != "agentic-api" or installed)]

    def steps(self) -> int:
        """Progress steps: a warm-up per profile, then every measured run."""
        runs = self.reps * len(self.sizes) * len(self.runnable_modes())
        return len(self.profiles) * (1 + runs)


@dataclass(slots=True)
class Run:
    profile: str
    mode: str
    tool_calls: int
    rep: int
    e2e: float
    connect: float
    turns: list[TurnBreakdown]
    load: float
    """The machine's 1-minute load average when the run started."""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["turns"] = [t.as_dict() for t in self.turns]
        return out


class RunFailed(RuntimeError):
    pass


Progress = Callable[[str], None]


@dataclass(slots=True)
class _Env:
    upstream: procs.Process
    gateways: dict[str, procs.Process]
    """'warmsocket' and, when available, 'agentic-api'."""
    agentic_reason: str | None


@contextlib.contextmanager
def _servers(config: AgentLoopConfig) -> Iterator[_Env]:
    with (
        procs.simulated_upstream(*config.latency.flags()) as upstream,
        procs.warmsocket_server(
            "--upstream", upstream.http_url, "--upstream-api", "responses"
        ) as warm,
    ):
        gateways = {"warmsocket": warm}
        if "agentic-api" not in config.modes:
            yield _Env(upstream, gateways, "not requested")
            return
        if procs.agentic_server_binary() is None:
            yield _Env(upstream, gateways, "agentic-api is not installed")
            return
        with contextlib.ExitStack() as stack:
            reason = None
            try:
                gateways["agentic-api"] = stack.enter_context(procs.agentic_api(upstream.port))
            except (RuntimeError, OSError) as exc:  # skips that mode only, not the others
                reason = f"agentic-api did not start: {exc}"
            yield _Env(upstream, gateways, reason)


def _gateway(mode: str) -> str:
    return "agentic-api" if mode == "agentic-api" else "warmsocket"


def _url(mode: str, host: str, port: int) -> str:
    if mode in {"websocket", "agentic-api"}:
        return f"ws://{host}:{port}/v1/responses"
    return f"http://{host}:{port}/v1"


def _run_timeout(spec: WorkloadSpec, latency: LatencyConfig, rtt_s: float) -> float:
    """A generous bound on one run: 3x the modelled time plus 60 s."""
    decode = spec.call_tokens / max(latency.decode_tokens_per_second, 1.0)
    prefill = (spec.output_tokens_max + spec.system_tokens) / max(
        latency.prefill_tokens_per_second, 1.0
    )
    per_turn = decode + prefill + spec.tool_ms / 1000 + 2 * rtt_s + 0.05
    return 3 * (spec.tool_calls + 1) * per_turn + 60


class _Harness:
    def __init__(
        self,
        config: AgentLoopConfig,
        env: _Env,
        link: EmulatedLink,
        workloads: dict[int, Workload],
        nonces: random.Random,
    ) -> None:
        self.config = config
        self.env = env
        self.link = link
        self.workloads = workloads
        self.log = WriteLog()
        self.proxies: dict[str, tuple[str, int]] = {}
        self.nonces = nonces
        """One source for the whole benchmark: no two runs share a conversation."""

    async def start(self) -> None:
        for name, process in self.env.gateways.items():
            proxy = await self.link.start_proxy("127.0.0.1", process.port, on_write=self.log.record)
            self.proxies[name] = proxy.address

    def _stats_count(self) -> int:
        report = procs.get_json(f"http://127.0.0.1:{self.env.upstream.port}/stats?since=1000000000")
        return int(report["requests_total"])

    def _records(self, since: int) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.env.upstream.port}/stats?since={since}"
        records: list[dict[str, Any]] = procs.get_json(url)["requests"]
        return [r for r in records if r["api"] in {"responses", "chat"}]

    async def run(self, mode: str, tool_calls: int, rep: int) -> Run:
        workload = self.workloads[tool_calls]
        spec = workload.spec
        host, port = self.proxies[_gateway(mode)]
        timeout = _run_timeout(spec, self.config.latency, self.link.profile.rtt_ms / 1000)
        job = Job(
            mode=mode,
            url=_url(mode, host, port),
            task=workload.task(f"{self.nonces.randrange(10**12):012d}"),
            settings=workload.settings(),
            arguments=workload.arguments,
            outputs=[o.text for o in workload.outputs],
            tool_ms=spec.tool_ms,
            timeout_s=timeout,
        )
        since = await asyncio.to_thread(self._stats_count)
        load = load_average()[0] if load_average() else float("nan")
        self.log.clear()
        process = self.link.run_in_client_ns(
            [sys.executable, "-m", "warmsocket.bench.agent"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=procs.child_env(),
        )
        payload = json.dumps(asdict(job)).encode()
        try:
            out, err = await asyncio.to_thread(process.communicate, payload, timeout + 30)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.communicate)
            raise RunFailed(f"{mode} N={tool_calls}: the agent did not finish in time") from None
        try:
            result = json.loads(out)
        except ValueError:
            raise RunFailed(f"{mode}: the agent failed: {err.decode()[-2000:]}") from None
        if result.get("error"):
            raise RunFailed(f"{mode} N={tool_calls} on {self.link.profile.name}: {result['error']}")
        if self.link.emulated and result.get("netns") == network_namespace():
            raise RunFailed(f"{mode}: the agent did not run in the client network namespace")
        records = await asyncio.to_thread(self._records, since)
        try:
            turns = breakdown(result["turns"], records, self.log)
        except TimelineError as exc:
            raise RunFailed(f"{mode} N={tool_calls}: {exc}") from None
        return Run(
            profile=self.link.profile.name,
            mode=mode,
            tool_calls=tool_calls,
            rep=rep,
            e2e=float(result["turns"][-1]["done"]) - float(result["start"]),
            connect=float(result["connected"]) - float(result["start"]),
            turns=turns,
            load=load,
        )


TIME_LIMIT_REACHED = "the time limit was reached"
INTERRUPTED = "interrupted"


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _schedule(
    config: AgentLoopConfig, modes: list[str], shuffle: Callable[[list[str]], None]
) -> Iterator[tuple[int, int, str]]:
    """(repetition, size, mode) of every measured run: the modes in a fresh shuffled
    order for each repetition and size."""
    for rep in range(config.reps):
        for size in config.sizes:
            order = list(modes)
            shuffle(order)
            for mode in order:
                yield rep, size, mode


RTT_SLACK_MS = 5.0
RATE_SHARE = 0.85


def link_ok(measured: LinkMeasurement) -> bool:
    """Whether a measured link is the profile it stands for: emulated, its RTT at most
    RTT_SLACK_MS over the nominal one, its rate at least RATE_SHARE of the nominal rate
    each way (a rate too fast to time counts as met). A target judged over a link
    that is not would say nothing of the profile."""
    nominal = measured.nominal_rate_mbit
    rate_ok = nominal is None or all(
        rate is None or rate >= RATE_SHARE * nominal
        for rate in (measured.down_mbit, measured.up_mbit)
    )
    rtt_ok = measured.rtt_ms <= measured.nominal_rtt_ms + RTT_SLACK_MS
    return measured.emulated and rtt_ok and rate_ok


WARM_UP = -1
"""The repetition number of the warm-up runs (not measured)."""


async def _attempt(
    harness: _Harness, mode: str, size: int, rep: int, failed: list[dict[str, Any]]
) -> Run | None:
    """One run; None when it failed, recorded in `failed`: one failed run (a timeout, a
    wrong answer) loses that run, not the profile's other runs and profiles."""
    try:
        return await harness.run(mode, size, rep)
    except RunFailed as exc:
        failed.append(
            {
                "profile": harness.link.profile.name,
                "mode": mode,
                "tool_calls": size,
                "rep": rep,
                "warm_up": rep == WARM_UP,
                "reason": str(exc),
            }
        )
        return None


async def run_agent_loop(
    config: AgentLoopConfig,
    progress: Progress,
    *,
    deadline: float | None = None,
    out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the `agent_loop` section of the result file. `out`,
    when given, is that section, filled as runs finish: a caller keeps the finished
    runs when the loop is interrupted (cancelled)."""
    modes = [m for m in config.modes if m in MODES]
    workloads = {
        n: WorkloadSpec(**{**config.workload.as_dict(), "tool_calls": n}).build()
        for n in sorted(set(config.sizes))
    }
    largest = workloads[max(workloads)]
    out = {} if out is None else out
    out |= {
        "config": {
            "sizes": config.sizes,
            "modes": modes,
            "reps": config.reps,
            "latency": asdict(config.latency),
            "workload": {**config.workload.as_dict(), "tool_calls": None},
        },
        "workload": largest.summary(),
        "profiles": {},
        "skipped": {},
    }
    shuffle = random.Random(config.seed).shuffle
    nonces = random.Random(config.seed + 1)
    with _servers(config) as env:
        if env.agentic_reason is not None and "agentic-api" in modes:
            modes.remove("agentic-api")
            out["skipped"]["agentic-api"] = env.agentic_reason
        for name in config.profiles:
            profile = get_profile(name)
            section: dict[str, Any] = {"runs": []}
            out["profiles"][profile.name] = section
            if _past(deadline):  # not even the link and the warm-up
                section["truncated"] = TIME_LIMIT_REACHED
                continue
            async with EmulatedLink(profile) as link:
                section["link"] = {
                    "describe": link.describe(),
                    "emulated": link.emulated,
                    "fallback_reason": link.fallback_reason,
                    "netns": link.netns,
                    "link_ok": None,  # not measured (smoke size)
                }
                if config.measure_link:
                    measured = await measure_link(link, rtt_samples=10)
                    section["link"]["measured"] = measured.as_dict()
                    section["link"]["link_ok"] = link_ok(measured)
                harness = _Harness(config, env, link, workloads, nonces)
                await harness.start()
                progress(f"{profile.name}: warm-up")
                smallest = min(workloads)
                failed: list[dict[str, Any]] = []
                section["failed"] = failed
                for mode in modes:  # warms the upstream's cache of the shared prompt
                    await _attempt(harness, mode, smallest, WARM_UP, failed)
                runs: list[Run] = []
                try:
                    for rep, size, mode in _schedule(config, modes, shuffle):
                        if _past(deadline):
                            section["truncated"] = TIME_LIMIT_REACHED
                            break
                        progress(f"{profile.name} N={size} {mode} rep {rep + 1}")
                        if (run := await _attempt(harness, mode, size, rep, failed)) is not None:
                            runs.append(run)
                except (asyncio.CancelledError, KeyboardInterrupt):
                    section["truncated"] = INTERRUPTED
                    raise
                finally:  # also when interrupted: the finished runs are results
                    section["runs"] = [r.as_dict() for r in runs]
                    section["summary"] = summarize(runs, modes, config.sizes)
                    section["checks"] = check_runs(runs)
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[Run], modes: list[str], sizes: list[int]) -> dict[str, Any]:
    """Per size that ran: each mode that ran's median end-to-end time, mean segments per
    turn, bytes, and the reduction against HTTP full replay (when that ran too)."""
    out: dict[str, Any] = {}
    for size in sizes:
        per_mode: dict[str, Any] = {}
        for mode in modes:
            chosen = [r for r in runs if r.mode == mode and r.tool_calls == size]
            if not chosen:
                continue
            turns = [t for r in chosen for t in r.turns]
            prompt = sum(t.prompt_tokens for t in turns)
            entry: dict[str, Any] = {
                "runs": len(chosen),
                "e2e_s": _median([r.e2e for r in chosen]),
                "e2e_all_s": [r.e2e for r in chosen],
                "connect_s": _median([r.connect for r in chosen]),
                "turn_s": statistics.mean(t.total for t in turns),
                "segments_s": {
                    name: statistics.mean(t.segments()[name] for t in turns) for name in SEGMENTS
                },
                "client_ttft_s": statistics.mean(t.client_ttft for t in turns),
                "wire_up_per_turn": statistics.mean(t.wire_up for t in turns),
                "wire_down_per_turn": statistics.mean(t.wire_down for t in turns),
                "wire_up_last_turn": statistics.mean(r.turns[-1].wire_up for r in chosen),
                "cached_token_share": sum(t.cached_tokens for t in turns) / prompt if prompt else 0,
                "input_output_ratio": prompt / max(1, sum(t.output_tokens for t in turns)),
                "context_tokens_last_turn": _median([r.turns[-1].prompt_tokens for r in chosen]),
                "turn_latency_by_index_s": [
                    _median([r.turns[i].total for r in chosen if i < len(r.turns)])
                    for i in range(max(len(r.turns) for r in chosen))
                ],
                "segments_by_index_s": {
                    name: [
                        _median([r.turns[i].segments()[name] for r in chosen if i < len(r.turns)])
                        for i in range(max(len(r.turns) for r in chosen))
                    ]
                    for name in SEGMENTS
                },
            }
            per_mode[mode] = entry
        if not per_mode:  # cut by the time limit or an interrupt before any run
            continue
        base = per_mode.get(BASELINE)
        if base is not None:
            for entry in per_mode.values():
                entry["e2e_reduction_vs_http_replay"] = 1 - entry["e2e_s"] / base["e2e_s"]
        out[str(size)] = per_mode
    return out


ID_TOKENS = 12
"""Prompts of the same turn may differ by this many tokens per earlier turn across
modes: item and call ids are random hex per run, and different hex strings of the same
length take a few tokens more or less."""


def check_runs(runs: list[Run]) -> dict[str, Any]:
    """Every mode sent the upstream the same context, turn by turn: the same number of
    items, and the same prompt length up to the ids."""
    mismatches = []
    groups: dict[tuple[int, int], dict[str, list[tuple[int, int]]]] = {}
    for run in runs:
        key = (run.tool_calls, run.rep)
        groups.setdefault(key, {})[run.mode] = [
            (t.upstream_items, t.prompt_tokens) for t in run.turns
        ]
    for (size, rep), by_mode in groups.items():
        same = len({len(v) for v in by_mode.values()}) == 1
        for index, turn in enumerate(zip(*by_mode.values(), strict=False)):
            items = {i for i, _tokens in turn}
            tokens = [t for _items, t in turn]
            same = same and len(items) == 1 and max(tokens) - min(tokens) <= 4 + ID_TOKENS * index
        if not same:
            mismatches.append({"tool_calls": size, "rep": rep, "items_and_tokens": by_mode})
    return {"same_prompts_in_every_mode": not mismatches, "mismatches": mismatches}
