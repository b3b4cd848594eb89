"""Network profiles: the nominal characteristics a link should emulate."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Ethernet frame size on the veth pair (1500 MTU + 14 header bytes).
_FRAME_BYTES = 1514
# Never smaller than a handful of full frames (tbf splits GSO packets larger
# than the bucket into segments, which costs CPU but stays correct).
_MIN_BURST_BYTES = 16 * _FRAME_BYTES
# How much traffic the bucket lets through at line rate after an idle period.
# Current kernels meter tbf in nanoseconds, so the old "burst >= rate/HZ" rule
# does not bind; 4 ms keeps bursts short next to a 40 ms RTT.
_BURST_SECONDS = 0.004


@dataclass(frozen=True, slots=True)
class TbfParams:
    """Arguments for `tc qdisc add ... tbf rate R burst B latency L`."""

    rate_bit: int
    burst_bytes: int
    latency_ms: float

    def tc_args(self) -> list[str]:
        """The `tbf ...` part of a `tc qdisc add` command line."""
        return [
            "tbf",
            "rate",
            f"{self.rate_bit}bit",
            "burst",
            str(self.burst_bytes),
            "latency",
            f"{self.latency_ms:g}ms",
        ]


@dataclass(frozen=True, slots=True)
class NetworkProfile:
    """What a link should look like, in each direction.

    `delay_ms` is one way (a round trip costs twice that); `rate_mbit` is the
    bottleneck rate in each direction (None means unlimited); `jitter_ms` adds a
    uniformly distributed extra delay in [0, jitter_ms] per chunk, never
    reordering bytes.  `queue_ms` bounds how long a packet may wait in the tbf
    queue (the bottleneck's buffer); `burst_bytes` overrides the computed tbf
    bucket size.
    """

    name: str
    delay_ms: float
    rate_mbit: float | None
    jitter_ms: float = 0.0
    queue_ms: float = 50.0
    burst_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("profile name must not be empty")
        for field, value in (
            ("delay_ms", self.delay_ms),
            ("jitter_ms", self.jitter_ms),
            ("queue_ms", self.queue_ms),
        ):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
        if self.rate_mbit is not None and not (
            math.isfinite(self.rate_mbit) and self.rate_mbit > 0
        ):
            raise ValueError(f"rate_mbit must be > 0 or None, got {self.rate_mbit!r}")
        if self.burst_bytes is not None and self.burst_bytes < _FRAME_BYTES:
            raise ValueError(f"burst_bytes must be >= {_FRAME_BYTES}, got {self.burst_bytes}")

    @property
    def rtt_ms(self) -> float:
        """Nominal round-trip time (twice the one-way delay)."""
        return 2 * self.delay_ms

    @property
    def delay_s(self) -> float:
        return self.delay_ms / 1000

    @property
    def jitter_s(self) -> float:
        return self.jitter_ms / 1000

    @property
    def rate_bytes_per_s(self) -> float | None:
        return None if self.rate_mbit is None else self.rate_mbit * 1e6 / 8

    @property
    def is_noop(self) -> bool:
        """True when the profile asks for no emulation at all."""
        return self.delay_ms == 0 and self.jitter_ms == 0 and self.rate_mbit is None

    def tbf(self) -> TbfParams | None:
        """tbf parameters for this profile, or None if the rate is unlimited.

        burst: max(4 ms of line rate, 16 full frames) unless overridden
        (50 Mbit/s: 25 kB; 1 Gbit/s: 500 kB).  latency: `queue_ms`, which tbf
        turns into a queue limit of rate * latency + burst bytes.  The rate is
        the Ethernet-frame rate, so TCP goodput is ~95.6% of it (1448 payload
        bytes per 1514-byte frame).
        """
        rate = self.rate_bytes_per_s
        if rate is None:
            return None
        burst = self.burst_bytes
        if burst is None:
            burst = max(math.ceil(rate * _BURST_SECONDS), _MIN_BURST_BYTES)
        return TbfParams(
            rate_bit=round(rate * 8),
            burst_bytes=burst,
            latency_ms=self.queue_ms,
        )

    def describe(self) -> str:
        rate = "unlimited" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        jitter = f" +0..{self.jitter_ms:g} ms jitter" if self.jitter_ms else ""
        return f"{self.name}: RTT {self.rtt_ms:g} ms{jitter}, {rate} each way"


WAN = NetworkProfile(name="WAN", delay_ms=20.0, rate_mbit=50.0)
LAN = NetworkProfile(name="LAN", delay_ms=0.25, rate_mbit=1000.0)
LOOPBACK = NetworkProfile(name="LOOPBACK", delay_ms=0.0, rate_mbit=None)

BUILTIN_PROFILES: dict[str, NetworkProfile] = {p.name: p for p in (WAN, LAN, LOOPBACK)}


def get_profile(name: str) -> NetworkProfile:
    """A built-in profile by (case-insensitive) name."""
    try:
        return BUILTIN_PROFILES[name.upper()]
    except KeyError:
        known = ", ".join(BUILTIN_PROFILES)
        raise ValueError(f"unknown network profile {name!r} (known: {known})") from None
