"""Network emulation harness for benchmarks: namespaces, tbf rate limits, delay proxy.

Typical use (inside an asyncio program that runs the real server on loopback)::

    from warmsocket.netem import WAN, EmulatedLink, measure_link

    async with EmulatedLink(WAN) as link:             # falls back to loopback
        proxy = await link.start_proxy("127.0.0.1", server_port)
        print(link.describe(), (await measure_link(link)).summary())
        proc = link.run_in_client_ns(
            [sys.executable, "-m", "loadgen", f"ws://{proxy.host}:{proxy.port}/"]
        )
        ...

See docs/netem.md.
"""

from warmsocket.netem.cleanup import CleanupReport, Inventory, cleanup, inventory
from warmsocket.netem.commands import (
    CommandError,
    CommandResult,
    CommandRunner,
    Tools,
    find_tools,
    run_command,
)
from warmsocket.netem.link import EmulatedLink, LinkUnavailable
from warmsocket.netem.measure import (
    LinkMeasurement,
    MeasureServer,
    measure_download,
    measure_link,
    measure_path,
    measure_rtt,
    measure_upload,
)
from warmsocket.netem.plan import DEFAULT_PREFIX, NETWORK, LinkPlan
from warmsocket.netem.profiles import (
    BUILTIN_PROFILES,
    LAN,
    LOOPBACK,
    WAN,
    NetworkProfile,
    TbfParams,
    get_profile,
)
from warmsocket.netem.proxy import DelayProxy, ProxyStats

__all__ = [
    "BUILTIN_PROFILES",
    "DEFAULT_PREFIX",
    "LAN",
    "LOOPBACK",
    "NETWORK",
    "WAN",
    "CleanupReport",
    "CommandError",
    "CommandResult",
    "CommandRunner",
    "DelayProxy",
    "EmulatedLink",
    "Inventory",
    "LinkMeasurement",
    "LinkPlan",
    "LinkUnavailable",
    "MeasureServer",
    "NetworkProfile",
    "ProxyStats",
    "TbfParams",
    "Tools",
    "cleanup",
    "find_tools",
    "get_profile",
    "inventory",
    "measure_download",
    "measure_link",
    "measure_path",
    "measure_rtt",
    "measure_upload",
    "run_command",
]
