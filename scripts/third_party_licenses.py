#!/usr/bin/env python3
"""Write python/warmsocket/THIRD_PARTY_LICENSES.txt: the licences of the Rust crates
the extension module links (MIT and Apache-2.0 ask that their notices travel with the
binary, and the wheel is one). Run it after changing Cargo.toml or Cargo.lock;
tests/test_third_party_licenses.py fails while the file is out of date.

    python3 scripts/third_party_licenses.py          # rewrite the file
    python3 scripts/third_party_licenses.py --check  # exit 1 if it is out of date
                                                     # (2: crate sources not fetched)

The crates are those of `cargo metadata` reached from warmsocket through normal
(not build or dev) dependencies with the default features, on the `TARGETS`
platforms; each crate's licence files are read from its source in Cargo's
registry, so cargo must have fetched them (a build for those platforms has).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("x86_64-unknown-linux-gnu",)
"""The platforms whose wheels the notices are for (the crates each links; what a
build for it fetches, so the check needs nothing more)."""
OUTPUT = ROOT / "python" / "warmsocket" / "THIRD_PARTY_LICENSES.txt"
LICENCE_FILE_STEMS = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "UNLICENSE")

# Crates that publish no licence file: what their manifests and repositories say.
NO_FILE_NOTES = {
    "tiktoken-rs": (
        "The published crate has no licence file; its manifest declares MIT.\n"
        "Copyright (c) 2023 Roger Zurawicki. It embeds OpenAI's tiktoken encodings\n"
        "and code ported from OpenAI's tiktoken: Copyright (c) 2022 OpenAI, Shantanu\n"
        "Jain, MIT. The MIT licence text follows under 'MIT licence text'."
    ),
    "r-efi": (
        "The published crate has no licence file; its manifest declares\n"
        "MIT OR Apache-2.0 OR LGPL-2.1-or-later (used here under MIT or Apache-2.0).\n"
        "It is linked only on UEFI targets."
    ),
}
"""(Notes for crates of other platforms too, for when `TARGETS` grows.)"""

MIT_TEXT = """\
Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify,
merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
permit persons to whom the Software is furnished to do so, subject to the following
conditions:

The above copyright notice and this permission notice shall be included in all copies
or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A
PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT
HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


class SourcesMissing(RuntimeError):
    """cargo has not fetched every crate's source (and this script fetches nothing)."""


def metadata() -> dict[str, Any]:
    platforms = [f"--filter-platform={target}" for target in TARGETS]
    result = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--offline", *platforms],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SourcesMissing(
            "cargo metadata --offline failed; fetch the crates first (`cargo fetch "
            f"--target {TARGETS[0]}`): {result.stderr.strip()[-500:]}"
        )
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def linked_packages(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The packages reached from the root through normal dependencies, by name."""
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    seen: set[str] = set()
    stack = [root]
    while stack:
        package_id = stack.pop()
        if package_id in seen:
            continue
        seen.add(package_id)
        for dep in nodes[package_id]["deps"]:
            if any(kind["kind"] is None for kind in dep["dep_kinds"]):
                stack.append(dep["pkg"])
    seen.discard(root)
    return sorted((packages[i] for i in seen), key=lambda p: (p["name"], p["version"]))


def licence_files(package: dict[str, Any]) -> list[Path]:
    source = Path(package["manifest_path"]).parent
    return sorted(
        path
        for path in source.iterdir()
        if path.is_file() and path.name.upper().startswith(LICENCE_FILE_STEMS)
    )


def render(packages: list[dict[str, Any]]) -> str:
    texts: dict[str, tuple[str, list[str]]] = {}
    """digest -> (text, the crates whose file it is)"""
    lines = [
        "Third-party software linked into warmsocket's extension module (warmsocket._core)",
        "=" * 82,
        "",
        "warmsocket itself is MIT-licensed (LICENSE). Its Rust extension links the crates",
        f"below (built for {', '.join(TARGETS)}). Each crate's licence files follow the",
        "list, each distinct text once, with the crates it comes from.",
        "Generated by scripts/third_party_licenses.py from Cargo.lock.",
        "",
        "Crates",
        "------",
    ]
    notes = []
    for package in packages:
        label = f"{package['name']} {package['version']}"
        lines.append(f"{label}: {package.get('license') or 'see its licence file'}")
        files = licence_files(package)
        if not files:
            note = NO_FILE_NOTES.get(package["name"])
            if note is None:
                raise SystemExit(
                    f"{label} publishes no licence file: add a note for it to NO_FILE_NOTES"
                )
            notes.append(f"{label}\n{note}")
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace").strip() + "\n"
            digest = hashlib.sha256(text.encode()).hexdigest()
            texts.setdefault(digest, (text, []))[1].append(f"{label} ({path.name})")
    lines += ["", "Crates without a licence file", "-----------------------------", ""]
    lines += [f"{note}\n" for note in notes]
    lines += ["MIT licence text", "----------------", "", MIT_TEXT]
    lines += ["Licence texts", "-------------", ""]
    for text, owners in sorted(texts.values(), key=lambda entry: entry[1][0]):
        lines.append("~" * 82)
        lines += [f"From: {owner}" for owner in owners]
        lines += ["", text]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        meta = metadata()
    except SourcesMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    text = render(linked_packages(meta))
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(
                f"{OUTPUT.relative_to(ROOT)} is out of date: run scripts/third_party_licenses.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(text)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
