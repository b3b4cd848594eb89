#!/usr/bin/env bash
# Installs everything the tests need (Python venv, the Rust extension built in
# release mode, the test dependencies) and runs every test: Rust lints and unit
# tests, Python lints and type checks, pytest (tests/ and benches/ as smoke tests).
set -euo pipefail
cd "$(dirname "$0")/.."

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
