"""What a result was measured on: CPU, cores, kernel, Python, build, load average."""

from __future__ import annotations

import os
import platform
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def checkout_root(package_dir: Path) -> Path | None:
    """The root of the warmsocket source tree a package directory lies in: the nearest
    parent whose pyproject.toml names the project warmsocket. None for an installed
    package (site-packages), even one that lies inside some other git repository."""
    for parent in package_dir.parents:
        pyproject = parent / "pyproject.toml"
        if not pyproject.is_file():
            continue
        try:
            name = tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
        except (OSError, ValueError):
            continue
        if name == "warmsocket":
            return parent
    return None


def git_commit() -> str | None:
    """The commit of the warmsocket checkout the package runs from, None when it is not
    run from one (an installed package must not report the commit of a repository it
    merely sits in, such as a project's virtualenv)."""
    root = checkout_root(Path(__file__).resolve().parent)
    if root is None:
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    toplevel, commit = out.stdout.splitlines()
    if Path(toplevel).resolve() != root.resolve():  # not a repository of its own
        return None
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def describe() -> dict[str, Any]:
    from warmsocket import BUILD_PROFILE, __version__

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "warmsocket": __version__,
        "build": BUILD_PROFILE,
        "commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_start": load_average(),
    }
