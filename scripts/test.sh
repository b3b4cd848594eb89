#!/usr/bin/env bash
# Installs everything the tests need (redis-server, a Python venv, the Rust
# extension built in release mode, the test dependencies) and runs every test: Rust
# lints and unit tests, Python lints and type checks, pytest (tests/ and benches/ as
# smoke tests; the tests start their own Redis server on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

# The openai SDK of the second run (below); the first uses the test extra's pin.
NEWER_OPENAI=3.63.0

# Disk: a run needs about 2 GB (the release build 0.3 GB, the debug build 0.45 GB,
# each venv 0.5 GB). A CI machine once had less: no incremental-compilation cache
# (0.3 GB, of no use to a run from a clean checkout) and no pip wheel cache.
export CARGO_INCREMENTAL=0
export PIP_NO_CACHE_DIR=1
free_mb() { df -Pm . | awk 'NR == 2 { print $4 }'; }

if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server (the shared-store tests start a real Redis)"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'

echo "== cargo fmt / clippy / test"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet

echo "== ruff / mypy / stubtest"
.venv/bin/ruff check python tests benches
.venv/bin/ruff format --check python tests benches
.venv/bin/mypy
.venv/bin/python -m mypy.stubtest warmsocket._core

echo "== pytest"
.venv/bin/pytest "$@"

# The newest other CPython this machine has (pyenv's, or on PATH): the tests (not
# the benchmarks) again under it, in its own venv, so that what changed in asyncio
# and json since 3.11 is tested too (3.12's wait_for broke upstream turns once).
newer=""
for version in 3.13 3.12; do
    for candidate in $(ls -d "$HOME"/.pyenv/versions/"$version".*/bin/python 2>/dev/null) \
        "$(command -v "python$version" || true)"; do
        # (pyenv's shims are on PATH for every version but run only the selected ones)
        if [ -n "$candidate" ] && "$candidate" --version >/dev/null 2>&1; then
            newer=$candidate
        fi
    done
    [ -n "$newer" ] && break
done
if [ -n "$newer" ] && [ "$#" -eq 0 ]; then
    echo "== pytest tests/ under $("$newer" --version)"
    venv=".venv-$("$newer" -c 'import sys; print("py%d%d" % sys.version_info[:2])')"
    if [ ! -x "$venv/bin/python" ] && [ "$(free_mb)" -lt 1500 ] && [ -d target/debug ]; then
        # Its venv needs 0.5 GB and its editable build some more; the debug build is
        # done with (cargo builds it again next run).
        echo "== only $(free_mb) MB free: removing the Rust debug build (target/debug)"
        cargo clean --profile dev
    fi
    if [ ! -x "$venv/bin/python" ]; then
        "$newer" -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet -e '.[test]'
    # With the newest openai SDK tested (the test extra pins the one the brief names):
    # the clients users install next to warmsocket are both covered.
    "$venv/bin/pip" install --quiet "openai[realtime]==$NEWER_OPENAI"
    echo "== (openai $("$venv/bin/python" -c 'import openai; print(openai.__version__)'))"
    "$venv/bin/pytest" -q -p no:cacheprovider tests
elif [ "$#" -eq 0 ]; then
    echo "== no Python 3.12 or 3.13 on this machine: the tests ran under $(.venv/bin/python --version) only"
fi
