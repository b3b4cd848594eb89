"""The `warmsocket` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from warmsocket import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warmsocket", description=__doc__)
    parser.add_argument("--version", action="version", version=f"warmsocket {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    return 0
