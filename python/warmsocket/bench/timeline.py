"""Per-turn latency split from three clocks that agree: the agent, the link, the upstream.

All three record `time.monotonic()` (CLOCK_MONOTONIC, one clock per machine, whatever
the network namespace), so their timestamps line up without any synchronisation:

* the agent (`warmsocket.bench.agent`): when it started writing a request (`send`),
  when the terminal event was parsed (`done`), when the tool's output was ready;
* the link's delay proxy (`DelayProxy(on_write=...)`): when each piece of data was
  delivered to the server, so when the request's last byte reached the gateway;
* the simulated upstream (`GET /stats`): when it had read the gateway's request
  (`received`), when it wrote its first output after the prefill time
  (`first_token`), and when it finished (`finished`).

A turn is then cut at those instants into consecutive segments that add up to the
turn's wall time exactly:

    upload  = request's last byte at the gateway - send     (serialisation at the link
                                                             rate + one-way delay)
    server  = upstream received - last byte at the gateway  (the gateway's context work:
                                                             parse, validate, rebuild,
                                                             write the upstream request)
    ttft    = upstream first token - upstream received      (upstream parse + prefill of
                                                             uncached tokens + overhead)
    decode  = upstream finished - upstream first token      (output tokens at the decode
                                                             rate, streamed as they come)
    return  = agent done - upstream finished                (the gateway relays the last
                                                             events + one-way delay + parse)
    tool    = tool output ready - agent done                 (the agent runs the tool)
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

SEGMENTS = ("upload", "server", "ttft", "decode", "return", "tool")


class WriteLog:
    """Timestamps of a proxy's deliveries: pass `record` as `DelayProxy(on_write=...)`."""

    __slots__ = ("down", "times", "up")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.up: list[int] = []
        """Bytes delivered client -> server at each time (0 for the other direction)."""
        self.down: list[int] = []

    def record(self, upstream: bool, nbytes: int) -> None:
        self.times.append(time.monotonic())
        self.up.append(nbytes if upstream else 0)
        self.down.append(0 if upstream else nbytes)

    def clear(self) -> None:
        self.times.clear()
        self.up.clear()
        self.down.clear()

    def last_up_between(self, start: float, end: float) -> float | None:
        """The time of the last client -> server delivery in [start, end]."""
        index = bisect.bisect_right(self.times, end) - 1
        while index >= 0 and self.times[index] >= start:
            if self.up[index]:
                return self.times[index]
            index -= 1
        return None

    def bytes_between(self, start: float, end: float) -> tuple[int, int]:
        """(bytes up, bytes down) delivered in [start, end)."""
        low = bisect.bisect_left(self.times, start)
        high = bisect.bisect_left(self.times, end)
        return sum(self.up[low:high]), sum(self.down[low:high])


@dataclass(frozen=True, slots=True)
class TurnBreakdown:
    index: int
    total: float
    """send -> done (the turn, without the tool)."""
    upload: float
    server: float
    ttft: float
    decode: float
    ret: float
    tool: float
    client_ttft: float
    """send -> the first event carrying output, as the agent saw it."""
    wire_up: int
    """Bytes the link carried client -> server during the turn (HTTP/WebSocket framing
    included)."""
    wire_down: int
    request_bytes: int
    upstream_bytes: int
    """Size of the request the upstream received."""
    upstream_items: int
    """Items in the context the upstream's model saw."""
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int

    def segments(self) -> dict[str, float]:
        return {
            "upload": self.upload,
            "server": self.server,
            "ttft": self.ttft,
            "decode": self.decode,
            "return": self.ret,
            "tool": self.tool,
        }

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["return"] = out.pop("ret")
        return out


class TimelineError(ValueError):
    """The three records do not line up (a request missing, or out of order)."""


def _check_order(index: int, **instants: float) -> None:
    """The instants of a turn, in the order given, must not go backwards. The segments
    are their differences, so they add up to the turn whatever the clocks say; a
    negative one (a record matched to the wrong turn, a clock read in the wrong place)
    is what shows a measurement gone wrong. Raises TimelineError."""
    names = list(instants)
    for earlier, later in itertools.pairwise(names):
        if instants[later] < instants[earlier]:
            raise TimelineError(f"turn {index}: {later} before {earlier}: events out of order")


def breakdown(
    turns: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], log: WriteLog
) -> list[TurnBreakdown]:
    """Split each turn. `turns`: the agent's TurnTiming dicts; `records`: the upstream's
    request records of this run, in order, one per turn."""
    if len(records) != len(turns):
        raise TimelineError(f"{len(turns)} turns but the upstream saw {len(records)} requests")
    out = []
    for position, (turn, record) in enumerate(zip(turns, records, strict=True)):
        send, done = float(turn["send"]), float(turn["done"])
        received = float(record["received"])
        first = record.get("first_token")
        finished = record.get("finished")
        if first is None or finished is None or not send <= received <= done:
            raise TimelineError(f"turn {turn['index']}: the upstream's times do not fit")
        arrived = log.last_up_between(send, received)
        if arrived is None:
            raise TimelineError(f"turn {turn['index']}: no request bytes crossed the link")
        _check_order(
            int(turn["index"]),
            send=send,
            arrived=arrived,
            received=received,
            first_token=float(first),
            finished=float(finished),
            done=done,
            tool_done=float(turn["tool_done"]),
        )
        following = turns[position + 1]["send"] if position + 1 < len(turns) else float("inf")
        up, down = log.bytes_between(send, float(following))
        out.append(
            TurnBreakdown(
                index=int(turn["index"]),
                total=done - send,
                upload=arrived - send,
                server=received - arrived,
                ttft=float(first) - received,
                decode=float(finished) - float(first),
                ret=done - float(finished),
                tool=float(turn["tool_done"]) - done,
                client_ttft=float(turn["first_output"] or done) - send,
                wire_up=up,
                wire_down=down,
                request_bytes=int(turn["request_bytes"]),
                upstream_bytes=int(record["bytes"]),
                upstream_items=int(record["items"]),
                prompt_tokens=int(record["prompt_tokens"]),
                cached_tokens=int(record["cached_tokens"]),
                output_tokens=int(turn.get("output_tokens", 0)),
            )
        )
    return out
