"""The wheel carries the licences of the Rust crates its extension links
(python/warmsocket/THIRD_PARTY_LICENSES.txt, written by
scripts/third_party_licenses.py from Cargo.lock)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "third_party_licenses.py"


@pytest.mark.skipif(shutil.which("cargo") is None, reason="needs cargo (cargo metadata)")
def test_the_notices_list_every_linked_crate_as_cargo_lock_has_it() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120
    )
    if result.returncode == 2:  # (nothing is downloaded while the tests run)
        pytest.skip(f"the crates' sources are not all fetched: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr


def test_the_notices_ship_in_the_package() -> None:
    notices = resources.files("warmsocket").joinpath("THIRD_PARTY_LICENSES.txt").read_text()
    # The crates the extension is built on, each with its licence text.
    for crate in ("pyo3 ", "serde_json ", "tiktoken-rs ", "regex-automata "):
        assert f"\n{crate}" in notices, crate
    assert "Apache License" in notices and "Permission is hereby granted" in notices
