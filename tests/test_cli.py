"""The command line: version, help, environment defaults, a real serve process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from warmsocket import __version__
from warmsocket.cli import build_parser, parse_size

WARMSOCKET = os.path.join(os.path.dirname(sys.executable), "warmsocket")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def test_version_from_cargo_toml() -> None:
    with open("Cargo.toml") as manifest:
        version = next(line for line in manifest if line.startswith("version")).split('"')[1]
    assert __version__ == version
    for command in ([WARMSOCKET], [sys.executable, "-m", "warmsocket"]):
        result = run(*command, "--version")
        assert result.returncode == 0 and result.stdout.strip() == f"warmsocket {version}"


def test_serve_help_documents_every_flag_with_its_env_var() -> None:
    parser = build_parser()
    serve = next(
        action.choices["serve"]
        for action in parser._actions
        if getattr(action, "choices", None) and "serve" in action.choices
    )
    help_text = run(WARMSOCKET, "serve", "--help").stdout
    for action in serve._actions:
        for flag in action.option_strings:
            if flag in {"-h", "--help"}:
                continue
            assert flag in help_text
            env = "WARMSOCKET_" + flag.lstrip("-").replace("-", "_").upper()
            assert env in help_text.replace("\n", " ").replace("  ", " ") or env in help_text


def test_environment_defaults_and_command_line_precedence() -> None:
    env = {"WARMSOCKET_PORT": "9123", "WARMSOCKET_API_KEY": "a,b", "WARMSOCKET_MAX_LANES": "4"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        args = build_parser().parse_args(["serve", "--max-lanes", "8"])
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert (args.port, args.api_key, args.max_lanes) == (9123, ["a", "b"], 8)
    args = build_parser().parse_args(["serve", "--model", "x", "--model", "y"])
    assert args.model == ["x", "y"]


def test_bad_environment_value_is_explained() -> None:
    result = run(WARMSOCKET, "serve", "--help", env={"WARMSOCKET_PORT": "eighty"})
    assert result.returncode != 0 and "WARMSOCKET_PORT" in result.stderr


@pytest.mark.parametrize(
    ("text", "value"), [("1024", 1024), ("4K", 4096), ("64MiB", 64 << 20), ("1g", 1 << 30)]
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_serve_process_answers_and_stops_cleanly(tmp_path: object) -> None:
    proc = subprocess.Popen(
        [WARMSOCKET, "serve", "--port", "0", "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        record = json.loads(line)
        assert record["message"] == "listening"
        base = record["url"]
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = httpx.post(
                    f"{base}/responses", json={"model": "m", "input": "secret words"}
                )
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert reply.json()["output"][0]["content"][0]["text"] == "You said: secret words"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        logs = proc.stderr.read()
        assert "secret words" not in logs  # logs never carry conversation content
        for entry in logs.splitlines():
            json.loads(entry)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _start(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [WARMSOCKET, "serve", "--port", "0", "--log-format", "json", *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        record = json.loads(line)
        if record["message"] == "listening":
            return proc, record["url"]
    raise AssertionError("server exited before listening")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr is not None
    rest = proc.stderr.read()
    proc.stderr.close()
    return rest


def test_snapshot_keeps_stored_responses_across_a_restart(tmp_path: Path) -> None:
    snapshot = tmp_path / "state.msgpack"
    proc, base = _start("--snapshot", str(snapshot))
    try:
        kept = httpx.post(f"{base}/responses", json={"model": "m", "input": "keep"}).json()
        dropped = httpx.post(
            f"{base}/responses", json={"model": "m", "input": "zdr", "store": False}
        ).json()
    finally:
        logs = _stop(proc)
    assert "snapshot saved" in logs and snapshot.exists()
    proc, base = _start("--snapshot", str(snapshot))
    try:
        assert httpx.get(f"{base}/responses/{kept['id']}").json()["output"] == kept["output"]
        assert httpx.get(f"{base}/responses/{dropped['id']}").status_code == 404
        follow = httpx.post(
            f"{base}/responses",
            json={"model": "m", "input": "/transcript", "previous_response_id": kept["id"]},
        ).json()
        assert "user: keep" in follow["output"][0]["content"][0]["text"]
    finally:
        _stop(proc)


def test_deep_items_never_break_input_items_or_a_restart(tmp_path: Path) -> None:
    # Items nested up to the limit (100 levels, rust/item.rs `MAX_DEPTH`) are stored,
    # listed and restored; deeper ones are refused with a 400 before anything is stored
    # (they once passed the parser, then broke listing and every restart).
    def nested(levels: int) -> dict[str, object]:
        value: object = []
        for _ in range(levels - 2):
            value = [value]
        return {"type": "reasoning", "id": f"rs_{levels}", "summary": [], "x": value}

    snapshot = tmp_path / "state.msgpack"
    accepted: dict[int, str] = {}
    proc, base = _start("--snapshot", str(snapshot))
    try:
        for levels in (99, 100, 101, 127, 128):
            body = {"model": "m", "input": [nested(levels), {"role": "user", "content": "hi"}]}
            reply = httpx.post(f"{base}/responses", json=body)
            if reply.status_code == 200:
                accepted[levels] = reply.json()["id"]
                listed = httpx.get(f"{base}/responses/{accepted[levels]}/input_items?order=asc")
                assert listed.status_code == 200, listed.text
                assert listed.json()["data"][0] == nested(levels)
            else:
                error = reply.json()["error"]
                assert (reply.status_code, error["code"], error["param"]) == (
                    400,
                    "invalid_value",
                    "input",
                )
                assert error["message"] == (
                    "Invalid 'input': Item 0 is not valid JSON: nested deeper than 100 levels."
                )
    finally:
        _stop(proc)
    proc, base = _start("--snapshot", str(snapshot))
    try:
        for levels, rid in accepted.items():
            listed = httpx.get(f"{base}/responses/{rid}/input_items?order=asc")
            assert listed.status_code == 200, listed.text
            assert listed.json()["data"][0] == nested(levels)
    finally:
        _stop(proc)
    assert sorted(accepted) == [99, 100]


def test_corrupt_snapshot_is_refused_with_advice(tmp_path: Path) -> None:
    snapshot = tmp_path / "bad.msgpack"
    snapshot.write_bytes(b"not msgpack at all")
    result = run(WARMSOCKET, "serve", "--port", "0", "--snapshot", str(snapshot))
    assert result.returncode == 1
    assert "start without --snapshot" in result.stderr
