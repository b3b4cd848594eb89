"""Prefix-affinity routing over replicas of one model.

An inference engine's prefix (KV) cache holds the prompts it served recently, so a
turn is cheapest on the replica that served its chain's parent: the router
remembers, per warmsocket response id, which replica produced it, and sends the
child there (an affinity *hit*). A new chain goes to the replica chosen by
rendezvous hashing of its first token blocks (`warmsocket.prefixhash.new_chain_key`),
so chains that share a system prompt and tools land together and removing a replica
moves only its own chains.

The router moves a turn away from its preferred replica (an affinity *miss*) when
that replica is failing (`fail_threshold` consecutive failures park it for
`cooldown` seconds) or much busier than the rest (at least `busy_min` requests in
flight and more than `busy_ratio` times the least busy healthy replica's, plus one),
and on a retry after a failure. It is not thread-safe: the server's event loop owns it.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from warmsocket.metrics import UpstreamMetrics

Outcome = Literal["ok", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class RouterConfig:
    block_tokens: int = 16
    """Tokens per block of the new-chain key (as the engine's KV cache blocks)."""
    prefix_blocks: int = 4
    """How many leading blocks key a new chain (`prefixhash.new_chain_key`)."""
    busy_ratio: float = 2.0
    busy_min: int = 4
    fail_threshold: int = 2
    cooldown: float = 10.0
    max_chains: int = 200_000
    """Response ids whose replica is remembered (least recently used are forgotten)."""


class Replica:
    __slots__ = ("down_until", "failures", "in_flight", "index", "label", "salt", "served")

    def __init__(self, index: int, label: str) -> None:
        self.index = index
        self.label = label
        self.salt = b"\0" + label.encode()
        self.in_flight = 0
        self.failures = 0
        self.down_until = 0.0
        self.served = 0

    def healthy(self, now: float) -> bool:
        return self.down_until <= now

    def __repr__(self) -> str:
        return f"Replica({self.index}, {self.label!r}, in_flight={self.in_flight})"


class Router:
    def __init__(
        self,
        labels: Sequence[str],
        config: RouterConfig | None = None,
        *,
        metrics: UpstreamMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not labels:
            raise ValueError("a router needs at least one replica")
        self.config = config or RouterConfig()
        self.replicas = [Replica(i, label) for i, label in enumerate(labels)]
        self.metrics = metrics
        self.clock = clock
        self._chains: OrderedDict[str, int] = OrderedDict()

    def route(
        self,
        parent_id: str | None,
        key: Callable[[], bytes],
        *,
        exclude: Collection[int] = (),
    ) -> Replica:
        """The replica for a turn whose parent is `parent_id` (None: a new chain).

        `key` gives the prompt's new-chain key (`prefixhash.new_chain_key` of its first
        token blocks); it is called only when needed. `exclude` holds replicas that just
        failed this turn (a retry).
        """
        replicas = self.replicas
        if len(replicas) == 1:
            return replicas[0]
        now = self.clock()
        preferred: Replica | None = None
        result, reason = "new", "prefix"
        if parent_id is not None:
            # `<id>#<n>` is the first n items of response <id> (a prefix-diffing
            # match ending inside it): that response's replica holds it too.
            parent_id = parent_id.partition("#")[0]
            index = self._chains.get(parent_id)
            if index is not None:
                self._chains.move_to_end(parent_id)
                preferred = replicas[index]
                result, reason = "hit", "parent"
            else:
                result, reason = "miss", "unknown_parent"
        candidates = [r for r in replicas if r.index not in exclude] or replicas
        healthy = [r for r in candidates if r.healthy(now)] or candidates
        chain_key: bytes | None = None
        if preferred is None:
            chain_key = key()
            preferred = _rendezvous(chain_key, replicas)
        choice = preferred
        if preferred.index in exclude:
            choice, reason = _rendezvous(chain_key or key(), healthy), "retry"
        elif not preferred.healthy(now):
            choice, reason = _rendezvous(chain_key or key(), healthy), "failing"
        elif self._much_busier(preferred, healthy):
            choice, reason = min(healthy, key=lambda r: (r.in_flight, r.index)), "busy"
        if choice is not preferred and result == "hit":
            result = "miss"
        if self.metrics is not None:
            self.metrics.affinity[(result, reason)] += 1
        return choice

    def begin(self, replica: Replica) -> None:
        replica.in_flight += 1

    def end(self, replica: Replica, outcome: Outcome) -> None:
        replica.in_flight -= 1
        if outcome == "ok":
            replica.failures = 0
            replica.down_until = 0.0
            replica.served += 1
        elif outcome == "failed":
            replica.failures += 1
            if replica.failures >= self.config.fail_threshold:
                replica.down_until = self.clock() + self.config.cooldown

    def remember(self, response_id: str, replica: Replica) -> None:
        """`response_id` was produced on `replica`: its children should go there."""
        if len(self.replicas) == 1:
            return
        chains = self._chains
        chains[response_id] = replica.index
        chains.move_to_end(response_id)
        while len(chains) > self.config.max_chains:
            chains.popitem(last=False)

    def replica_of(self, response_id: str) -> Replica | None:
        index = self._chains.get(response_id)
        return None if index is None else self.replicas[index]

    # -- internals --------------------------------------------------------------------------

    def _much_busier(self, replica: Replica, healthy: list[Replica]) -> bool:
        config = self.config
        if replica.in_flight < config.busy_min:
            return False
        others = [r.in_flight for r in healthy if r is not replica]
        if not others:
            return False
        return replica.in_flight > config.busy_ratio * (min(others) + 1)


def _rendezvous(key: bytes, replicas: Sequence[Replica]) -> Replica:
    """Highest-random-weight choice: stable, and only a removed replica's keys move."""
    best = replicas[0]
    best_score = b""
    for replica in replicas:
        digest = hashlib.blake2b(key + replica.salt, digest_size=8).digest()
        if digest > best_score:
            best, best_score = replica, digest
    return best
