"""Memory: resident bytes per idle connection and per cached token of context.

Each measurement starts a fresh `warmsocket serve` (built-in model), warms it up with
a little of the same work, reads its resident set size from `/proc/<pid>/status`,
does the work from a load generator in its own process, and reads it again:

* idle connections: `connections` WebSocket connections opened (handshake done, no
  turn, nothing in flight) and held; bytes per connection = RSS growth / count;
* cached context: stored (`store: true`) chains filled until about `tokens` tokens of
  context are cached; the raw item bytes are the items' compact JSON as sent and
  received (what the cache must keep at the least); overhead = RSS growth / raw bytes.
  The warm-up fills as much first (other chains, kept): a fresh process holds memory
  it freed while starting (the tokenizer's tables are built from temporaries), which
  the first megabytes cached would reuse without growing the RSS, so only the second
  fill measures what caching costs.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from warmsocket.admission import raise_open_file_limit
from warmsocket.bench import procs
from warmsocket.bench.throughput import run_loadgen

_WORDS = [
    *("session", "cache", "frame", "token", "block", "chain", "lane", "turn", "item"),
    *("context", "response", "stream", "upstream", "replica", "prefix", "encode"),
    *("decode", "parse", "render", "snapshot", "budget"),
]


@dataclass(slots=True)
class MemoryConfig:
    connections: int = 1_000
    tokens: int = 1_000_000
    text_tokens: int = 500
    """Tokens of each turn's user message (the built-in model echoes it back)."""
    chains: int = 20

    def steps(self) -> int:
        return 2


def _metric(port: int, name: str) -> float:
    text = procs.get_text(f"http://127.0.0.1:{port}/metrics")
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def _settle(pid: int) -> int:
    """RSS once it has stopped moving (bounded: at most 2 s)."""
    last = procs.rss_bytes(pid)
    for _ in range(20):
        time.sleep(0.1)
        now = procs.rss_bytes(pid)
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


def measure_idle(config: MemoryConfig) -> dict[str, Any]:
    raise_open_file_limit()  # the server inherits it
    # Whatever the open-file limit makes the default (--max-connections 0): every one
    # of the bench's connections is taken (the bench needs that many files anyway).
    limit = str(config.connections + 64)
    with procs.warmsocket_server("--max-connections", limit) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/responses"
        # Warm-up: a batch of connections with a turn each, then closed.
        run_loadgen(
            {"kind": "turns", "url": url, "connections": 50, "seconds": 0.5, "warmup": 0},
            timeout=120,
        )
        before = _settle(server.pid)
        process = subprocess.Popen(
            [sys.executable, "-m", "warmsocket.bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=procs.child_env(),
        )
        try:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(
                json.dumps({"kind": "idle", "url": url, "connections": config.connections}) + "\n"
            )
            process.stdin.flush()
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("the load generator could not open its connections")
            open_now = _metric(server.port, 'warmsocket_connections{kind="websocket"}')
            after = _settle(server.pid)
            process.stdin.write("close\n")
            process.stdin.flush()
            process.wait(timeout=120)
        finally:
            procs.stop(process)
    growth = after - before
    return {
        "connections": config.connections,
        "server_open_connections": open_now,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_connection": growth / config.connections,
    }


def fill_text(tokens: int, seed: int = 5) -> str:
    """About `tokens` tokens in hyphenated groups (one streamed delta per group)."""
    from warmsocket.prefixhash import count_tokens

    rng = random.Random(seed)
    groups: list[str] = []
    count = 0
    while count < tokens:
        group = "-".join(f"{rng.choice(_WORDS)}{rng.randint(0, 99)}" for _ in range(6))
        groups.append(group)
        count += count_tokens(" " + group)
    return " ".join(groups)


def measure_cache(config: MemoryConfig) -> dict[str, Any]:
    from warmsocket.prefixhash import count_tokens

    text = fill_text(config.text_tokens)
    # A turn caches the message and its echo: about twice the text's tokens.
    per_turn = 2 * count_tokens(text)
    turns = max(1, round(config.tokens / per_turn / config.chains))
    with procs.warmsocket_server() as server:
        url = f"ws://127.0.0.1:{server.port}/v1/responses"
        job = {"kind": "fill", "url": url, "connections": config.chains, "turns": turns}
        run_loadgen({**job, "text": text}, timeout=1800)  # warm-up: see the module doc
        before = _settle(server.pid)
        cache_before = _metric(server.port, "warmsocket_cache_bytes")
        filled = run_loadgen({**job, "text": text}, timeout=1800)
        after = _settle(server.pid)
        cache_after = _metric(server.port, "warmsocket_cache_bytes")
    growth = after - before
    return {
        "chains": config.chains,
        "turns_per_chain": turns,
        "tokens": filled["tokens"],
        "item_bytes": filled["item_bytes"],
        "rss_before": before,
        "rss_after": after,
        "rss_growth": growth,
        "bytes_per_token": growth / filled["tokens"],
        "overhead_vs_item_bytes": growth / filled["item_bytes"],
        "cache_estimate_bytes": cache_after - cache_before,
    }


def run_memory(config: MemoryConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    progress(f"memory: {config.connections} idle connections")
    idle = measure_idle(config)
    progress(f"memory: {config.tokens:,} cached tokens")
    cache = measure_cache(config)
    return {"config": asdict(config), "idle": idle, "cache": cache}
