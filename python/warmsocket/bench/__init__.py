"""The benchmark suite behind `warmsocket bench` and `benches/` (docs/benchmarks.md).

Modules, in the order a run uses them:

* `workload`: the scripted coding agent's deterministic workload;
* `agent`: the agent itself (a process in the client network namespace), per mode;
* `agentloop`: runs the agent in every mode over each network profile, against
  `warmsocket serve --upstream` (and agentic-api) in front of the simulated upstream;
* `timeline`: splits each turn into upload, server, upstream TTFT, decode, return, tool;
* `throughput`, `loadgen`, `leanws`: turns per second against connections, next to an
  echo server;
* `memory`: resident bytes per idle connection and per cached token;
* `procs`: the server processes; `machine`: what a result was measured on;
* `targets`, `runner`, `progress`, `plots`, `cli`: the command and its outputs.

Importing this package imports nothing else: the command line stays fast.
"""

MODES = ("websocket", "http-replay", "http-chained", "agentic-api")
"""Agent-loop modes: WebSocket mode; HTTP full replay (store=false); HTTP with
previous_response_id (store=true); vLLM's agentic-api in WebSocket mode."""
SUITES = ("agent-loop", "throughput", "memory")
PROFILES = ("wan", "lan", "loopback")
MIN_SYSTEM_TOKENS = 100
MIN_CALL_TOKENS = 10
"""The smallest workload the agent loop can build (`--system-tokens`, `--call-tokens`)."""
