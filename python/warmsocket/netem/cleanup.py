"""Finding and removing `ws-bench-*` namespaces and links (e.g. of a crashed run).

Only objects named exactly as the harness names them (prefix + 5 hex digits,
plus `s` for the root-side veth) are ever touched, and a link only if it has
no alias or the harness's owner alias: cleanup runs on every link setup, and
a bare prefix match would delete other software's interfaces and namespaces.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from warmsocket.netem.commands import CommandError, CommandRunner, Tools, run_command
from warmsocket.netem.plan import (
    ALIAS_TAG,
    DEFAULT_PREFIX,
    harness_lock,
    is_harness_netns,
    is_harness_veth,
    owner_alive,
    parse_owner,
)

log = logging.getLogger("warmsocket.netem")


@dataclass(frozen=True, slots=True)
class LinkInfo:
    name: str
    alias: str | None
    addresses: tuple[str, ...] = ()


@dataclass(slots=True)
class Inventory:
    """Harness objects currently present in the root namespace."""

    netns: list[str] = field(default_factory=list)
    links: list[LinkInfo] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.netns and not self.links


@dataclass(slots=True)
class CleanupReport:
    removed_netns: list[str] = field(default_factory=list)
    removed_links: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # owned by a live process
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.removed_netns:
            parts.append(f"removed namespaces: {', '.join(self.removed_netns)}")
        if self.removed_links:
            parts.append(f"removed links: {', '.join(self.removed_links)}")
        if self.kept:
            parts.append(f"kept (owner still running): {', '.join(self.kept)}")
        if self.errors:
            parts.append(f"errors: {'; '.join(self.errors)}")
        return "; ".join(parts) if parts else "nothing to clean up"


def _json_list(runner: CommandRunner, argv: list[str]) -> list[dict[str, object]]:
    out = runner(argv).stdout.strip()
    if not out:
        return []
    data = json.loads(out)
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def list_netns(runner: CommandRunner, tools: Tools, prefix: str = DEFAULT_PREFIX) -> list[str]:
    rows = _json_list(runner, [tools.ip, "-j", "netns", "list"])
    names = [str(r.get("name", "")) for r in rows]
    return sorted(n for n in names if is_harness_netns(n, prefix))


def list_addresses(runner: CommandRunner, tools: Tools) -> list[LinkInfo]:
    """Every root-namespace interface with its IPv4 addresses and alias."""
    rows = _json_list(runner, [tools.ip, "-j", "-d", "addr", "show"])  # -d: with ifalias
    links = []
    for row in rows:
        infos = row.get("addr_info")
        addrs = tuple(
            str(a["local"])
            for a in (infos if isinstance(infos, list) else [])
            if isinstance(a, dict) and a.get("family") == "inet" and "local" in a
        )
        alias = row.get("ifalias")
        links.append(
            LinkInfo(
                name=str(row.get("ifname", "")),
                alias=alias if isinstance(alias, str) else None,
                addresses=addrs,
            )
        )
    return links


def is_harness_link(link: LinkInfo, prefix: str) -> bool:
    """A root-side veth of this harness: its exact name, and our alias or none.

    No alias still counts: a crash between `ip link add` and setting the alias
    leaves exactly that.  Another alias means the name is someone else's.
    """
    if not is_harness_veth(link.name, prefix):
        return False
    return link.alias is None or link.alias.startswith(ALIAS_TAG)


def inventory(runner: CommandRunner, tools: Tools, prefix: str = DEFAULT_PREFIX) -> Inventory:
    links = [i for i in list_addresses(runner, tools) if is_harness_link(i, prefix)]
    return Inventory(netns=list_netns(runner, tools, prefix), links=links)


def _owned_by_live_process(alias: str | None) -> bool:
    owner = parse_owner(alias)
    return owner is not None and owner_alive(owner)


def cleanup(
    tools: Tools,
    *,
    runner: CommandRunner = run_command,
    prefix: str = DEFAULT_PREFIX,
    include_live: bool = False,
    lock_timeout: float = 15.0,
) -> CleanupReport:
    """Remove harness namespaces/links whose owning process is gone.

    A namespace belongs to the server-side veth with the same name plus `s`;
    a namespace without that veth is debris (links are built under a lock, so
    no live harness is ever caught half-way).  With include_live=True, every
    harness object with the prefix is removed, even those of a running harness.
    Objects that merely start with the prefix are never touched.
    """
    report = CleanupReport()
    with harness_lock(lock_timeout):
        inv = inventory(runner, tools, prefix)
        live: set[str] = set()
        for link in inv.links:
            if not include_live and _owned_by_live_process(link.alias):
                live.add(link.name)
                report.kept.append(link.name)
                continue
            try:
                runner([tools.ip, "link", "del", "dev", link.name])
                report.removed_links.append(link.name)
            except CommandError as exc:
                report.errors.append(str(exc))
        for ns in inv.netns:
            if f"{ns}s" in live:
                continue
            try:
                runner([tools.ip, "netns", "del", ns])
                report.removed_netns.append(ns)
            except CommandError as exc:
                report.errors.append(str(exc))
    if report.removed_links or report.removed_netns:
        log.info("netem cleanup: %s", report.summary())
    return report
