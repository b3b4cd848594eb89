"""Names, addresses and ownership of the kernel objects the harness creates.

Address plan: 198.18.0.0/15 (RFC 2544 benchmarking range) is cut into /30
subnets; link number k uses 198.18.0.0 + 4k: `.1` is the server side (root
namespace), `.2` the client side (inside the client namespace).  The first
free /30 not already configured on a root-namespace interface is used.

Names: every object starts with `prefix` (default `ws-bench-`) followed by a
per-run random suffix: namespace `ws-bench-1a2b3`, veth ends `ws-bench-1a2b3s`
(server side) and `ws-bench-1a2b3c` (client side), 15 characters, the Linux
interface-name limit.  The server-side veth carries an alias recording the
owning process (`warmsocket-netem pid=<pid> start=<boot ticks>`) so a later
run can tell objects of a crashed run from those of a live one.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PREFIX = "ws-bench-"
NETWORK = ipaddress.IPv4Network("198.18.0.0/15")
SUBNET_PREFIXLEN = 30
_SUBNETS = NETWORK.num_addresses // 4
_IFNAMSIZ = 15  # usable characters in a Linux interface name
_SUFFIX_LEN = 5
_SUFFIX_RE = re.compile(f"[0-9a-f]{{{_SUFFIX_LEN}}}")
ALIAS_TAG = "warmsocket-netem"
_LOCK_NAME = "ws-bench-netem.lock"


@dataclass(frozen=True, slots=True)
class LinkPlan:
    """Everything needed to create (and find again) one emulated link."""

    prefix: str
    suffix: str
    subnet_index: int

    @property
    def netns(self) -> str:
        return f"{self.prefix}{self.suffix}"

    @property
    def veth_server(self) -> str:
        return f"{self.prefix}{self.suffix}s"

    @property
    def veth_client(self) -> str:
        return f"{self.prefix}{self.suffix}c"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        base = int(NETWORK.network_address) + 4 * self.subnet_index
        return ipaddress.IPv4Network((base, SUBNET_PREFIXLEN))

    @property
    def server_host(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def client_host(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def server_cidr(self) -> str:
        return f"{self.server_host}/{SUBNET_PREFIXLEN}"

    @property
    def client_cidr(self) -> str:
        return f"{self.client_host}/{SUBNET_PREFIXLEN}"


def validate_prefix(prefix: str) -> None:
    if not prefix or len(prefix) + _SUFFIX_LEN + 1 > _IFNAMSIZ:
        raise ValueError(
            f"prefix {prefix!r} must be 1..{_IFNAMSIZ - _SUFFIX_LEN - 1} characters "
            "(interface names are limited to 15)"
        )
    if not all(c.isalnum() or c in "-_." for c in prefix):
        raise ValueError(f"prefix {prefix!r} may only contain letters, digits, '-', '_', '.'")


def is_harness_netns(name: str, prefix: str) -> bool:
    """True if `name` is exactly how this harness names a client namespace.

    A mere prefix match is not enough: cleanup deletes what matches, and short
    prefixes (`veth`, `br-`, `d`) would catch other software's objects.
    """
    return name.startswith(prefix) and _SUFFIX_RE.fullmatch(name[len(prefix) :]) is not None


def is_harness_veth(name: str, prefix: str) -> bool:
    """True if `name` is exactly how this harness names a server-side veth end."""
    return name.endswith("s") and is_harness_netns(name[:-1], prefix)


def subnet_index_of(address: str) -> int | None:
    """Which /30 of the benchmarking range an address belongs to, if any."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if not isinstance(ip, ipaddress.IPv4Address) or ip not in NETWORK:
        return None
    return (int(ip) - int(NETWORK.network_address)) // 4


def new_plan(used_addresses: Iterable[str], *, prefix: str = DEFAULT_PREFIX) -> LinkPlan:
    """A plan with a fresh random suffix and the first /30 not in use."""
    validate_prefix(prefix)
    used = {i for a in used_addresses if (i := subnet_index_of(a)) is not None}
    index = next((i for i in range(_SUBNETS) if i not in used), None)
    if index is None:
        raise RuntimeError(f"no free /30 left in {NETWORK}")
    suffix = secrets.token_hex(3)[:_SUFFIX_LEN]
    return LinkPlan(prefix=prefix, suffix=suffix, subnet_index=index)


# -- ownership ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    start: int  # process start time in clock ticks since boot (/proc/pid/stat)


def _process_start(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after ')' are fixed.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # field 22: starttime
    except (IndexError, ValueError):
        return None


def current_owner() -> Owner:
    pid = os.getpid()
    return Owner(pid=pid, start=_process_start(pid) or 0)


def owner_alias(owner: Owner | None = None) -> str:
    owner = owner or current_owner()
    return f"{ALIAS_TAG} pid={owner.pid} start={owner.start}"


def parse_owner(alias: str | None) -> Owner | None:
    if not alias or not alias.startswith(ALIAS_TAG):
        return None
    values: dict[str, int] = {}
    for part in alias.split()[1:]:
        key, _, value = part.partition("=")
        if value.isdigit():
            values[key] = int(value)
    if "pid" not in values:
        return None
    return Owner(pid=values["pid"], start=values.get("start", 0))


def owner_alive(owner: Owner) -> bool:
    """True if the owning process still runs (same pid *and* start time)."""
    start = _process_start(owner.pid)
    if start is None:
        return False
    return owner.start == 0 or start == owner.start


# -- cross-process lock -------------------------------------------------------


def _lock_path() -> Path:
    for directory in ("/run/lock", "/run", tempfile.gettempdir()):
        if os.access(directory, os.W_OK):
            return Path(directory) / _LOCK_NAME
    return Path(tempfile.gettempdir()) / _LOCK_NAME


@contextlib.contextmanager
def harness_lock(timeout: float = 15.0) -> Iterator[None]:
    """Serialise link creation and stale cleanup between processes.

    Held while a link is being built, so a concurrent cleanup never mistakes a
    half-built link for debris of a crashed run.
    """
    path = _lock_path()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"could not lock {path} within {timeout:g} s "
                        "(another netem harness is setting up?)"
                    ) from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
