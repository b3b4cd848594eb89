"""Running `ip` / `tc`: a small, replaceable command runner with clear errors."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Where iproute2 usually lives; non-root PATHs often lack the sbin directories.
_EXTRA_TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
DEFAULT_COMMAND_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandError(Exception):
    """A command could not run, timed out, or exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, detail: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.detail = detail.strip()
        super().__init__(self._message())

    def _message(self) -> str:
        cmd = shlex.join(self.argv)
        if self.returncode == 127:
            return f"`{cmd}`: command not found"
        if self.returncode < 0:
            return f"`{cmd}`: {self.detail}"
        detail = f": {self.detail}" if self.detail else ""
        return f"`{cmd}` failed (exit {self.returncode}){detail}"


class CommandRunner(Protocol):
    """Runs argv, bounded by `timeout` seconds; raises CommandError if `check` fails."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> CommandResult: ...


def run_command(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_COMMAND_TIMEOUT,
) -> CommandResult:
    """The default CommandRunner: subprocess.run with captured text output."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, str(exc)) from None
    except PermissionError as exc:
        raise CommandError(argv, 126, str(exc)) from None
    except subprocess.TimeoutExpired:
        raise CommandError(argv, -1, f"timed out after {timeout:g} s") from None
    result = CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr or proc.stdout)
    return result


def find_tool(name: str) -> str | None:
    """Absolute path of an executable, looking in PATH and then the sbin dirs."""
    found = shutil.which(name)
    if found:
        return found
    extra = os.pathsep.join(_EXTRA_TOOL_DIRS)
    return shutil.which(name, path=extra)


@dataclass(frozen=True, slots=True)
class Tools:
    """Resolved paths of the iproute2 tools the harness needs."""

    ip: str
    tc: str


def find_tools() -> Tools | str:
    """The iproute2 tools, or a human-readable reason why they are missing."""
    ip = find_tool("ip")
    tc = find_tool("tc")
    missing = [name for name, path in (("ip", ip), ("tc", tc)) if path is None]
    if missing or ip is None or tc is None:
        names = " and ".join(f"`{m}`" for m in missing)
        return f"{names} not found: install iproute2 (apt-get install -y iproute2)"
    return Tools(ip=ip, tc=tc)
