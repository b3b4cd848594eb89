"""Which host names requests may be addressed to (`--allowed-host`): the defence against
DNS rebinding for a server on loopback.

A web page cannot read a loopback server's answers across origins, and every request
of a page that could do harm carries `Origin` (`warmsocket.origins` refuses those). DNS
rebinding gets round that: a site whose name its DNS server first resolves to itself,
then to 127.0.0.1, has its page's same-origin requests reach the loopback server as
requests for the site's own name, and a same-origin `GET` carries no `Origin`. The page
could then read a stored response or a conversation whose id it has. What gives such a
request away is its `Host` header: the attacker's name, which no local client uses.

So a server that listens on loopback only serves requests for `localhost`, names under
`.localhost` (RFC 6761 keeps them on loopback), IP addresses (no DNS involved), names
`--allowed-host` lists, and requests without `Host` (HTTP/1.0 clients; browsers always
send one); others get 403 `host_not_allowed`. A server listening on other interfaces is
reached by whatever names its network gives it (a DNS name, a Kubernetes service) and
serves any host unless `--allowed-host` lists some, as Jupyter and Vite do.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

MEMO_SIZE = 256
"""Host header values whose verdicts are kept (a server sees a handful)."""


def listens_on_loopback_only(host: str) -> bool:
    """Whether `--host` is a loopback address or `localhost` (a name or a wildcard
    address: reachable from elsewhere)."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """The host names requests may be addressed to.

    `allowed`: `--allowed-host` values (`not_host_names` tells the unusable ones); a
    name, `.example.com` (or `*.example.com`) for it and any name under it, `*` for
    any. `loopback_only`:
    whether the server listens on loopback only (`listens_on_loopback_only`), where
    other names are refused even when none is listed. `checked`: whether any is."""

    def __init__(self, allowed: Iterable[str] = (), *, loopback_only: bool) -> None:
        names = {_host_name(value) or "" for value in allowed if value.strip()}
        names.discard("")
        # `*.example.com`, the wildcard form, is `.example.com` here.
        names = {name[1:] if name.startswith("*.") else name for name in names}
        self.loopback_only = loopback_only
        self.checked = "*" not in names and (loopback_only or bool(names))
        self.names = frozenset(name for name in names if not name.startswith("."))
        self.suffixes = tuple(sorted(name for name in names if name.startswith(".")))
        self._memo: dict[str, bool] = {}

    def allows(self, host: str | None) -> bool:
        """Whether a request with this `Host` header (None: without one) is served."""
        if not self.checked or host is None:
            return True
        verdict = self._memo.get(host)
        if verdict is None:
            verdict = self._allows_name(_host_name(host))
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[host] = verdict
        return verdict

    def _allows_name(self, name: str | None) -> bool:
        if name is None:
            return False  # not a host (two of them, a path, spaces): no client sends that
        if name == "localhost" or name.endswith(".localhost") or _is_address(name):
            return True
        if name in self.names:
            return True
        return any(name.endswith(suffix) or name == suffix[1:] for suffix in self.suffixes)


def not_host_names(values: Iterable[str]) -> list[str]:
    """The `--allowed-host` values that are not host names (a URL, say)."""
    return [value for value in values if value.strip() and _host_name(value) is None]


def _host_name(host: str) -> str | None:
    """The name in a `Host` header (`name`, `name:port`, `[v6]:port`), lower case and
    without a trailing dot; None when it is not one."""
    value = host.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1 :] and not _is_port(value[end + 1 :])):
            return None
        return value[1:end] if _is_address(value[1:end]) else None
    name, colon, port = value.rpartition(":")
    if not colon:
        name = value
    elif not _is_port(colon + port) or ":" in name:
        return None
    name = name.rstrip(".")
    if not name or any(not (char.isalnum() or char in "-._*") for char in name):
        return None
    return name


def _is_port(text: str) -> bool:
    """`:8080` (or a bare `:`, which RFC 3986 allows)."""
    return text.startswith(":") and (text[1:].isdigit() or not text[1:])


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
