"""Throughput: turns per second and turn latency against concurrent connections.

`warmsocket serve` with the built-in model and no latency, and a bare `websockets`
echo server on uvloop as the baseline, each in its own process on loopback; the load
generator (`warmsocket.bench.loadgen`) in a third process. For each connection count
both servers are measured back to back, in alternating order, for the same time. A
warmsocket turn is one request and 12 events; an echo is one message each way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from warmsocket.bench import procs


@dataclass(slots=True)
class ThroughputConfig:
    connections: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    seconds: float = 10.0
    warmup: float = 2.0
    max_ops: int = 5_000_000

    def steps(self) -> int:
        return len(self.connections) * 2


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all threads (from /proc/<pid>/task/*/schedstat)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                total += int(stat.read().split()[0])
    except OSError:
        return 0.0
    return total / 1e9


def run_loadgen(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One load generator process; its JSON result."""
    process = subprocess.Popen(
        [sys.executable, "-m", "warmsocket.bench.loadgen"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=procs.child_env(),
    )
    try:
        out, err = process.communicate(json.dumps(job) + "\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RuntimeError(f"the load generator did not finish within {timeout:g} s") from None
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): leave no load generator behind
        process.kill()
        process.communicate()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed: {err[-2000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def run_throughput(config: ThroughputConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    timeout = config.warmup + config.seconds + 120
    limit = str(max(config.connections) + 64)  # all of them, as the echo server takes
    with (
        procs.warmsocket_server("--max-connections", limit) as server,
        procs.echo_server() as echo,
    ):
        targets = {"warmsocket": (server, "turns"), "echo": (echo, "echo")}
        for position, connections in enumerate(config.connections):
            order = ["warmsocket", "echo"] if position % 2 == 0 else ["echo", "warmsocket"]
            point: dict[str, Any] = {"connections": connections}
            for name in order:
                process, kind = targets[name]
                progress(f"throughput: {name}, {connections} connections")
                path = "/v1/responses" if name == "warmsocket" else "/"
                job = {
                    "kind": kind,
                    "url": f"ws://127.0.0.1:{process.port}{path}",
                    "connections": connections,
                    "seconds": config.seconds,
                    "warmup": config.warmup,
                    "max_ops": config.max_ops,
                }
                before = cpu_seconds(process.pid)
                result = run_loadgen(job, timeout)
                result["server_cpu_seconds"] = cpu_seconds(process.pid) - before
                point[name] = result
            echo_rate = point["echo"]["ops_per_second"]
            point["turns_per_echo"] = (
                point["warmsocket"]["ops_per_second"] / echo_rate if echo_rate else 0.0
            )
            points.append(point)
    return {"config": asdict(config), "points": points}
