"""The command line: version, help, environment defaults, a real serve process."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from warmsocket import __version__
from warmsocket.cli import build_parser, parse_size
from warmsocket.logs import cannot_listen

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


def test_upstream_variables_without_an_upstream_are_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Allowed from the environment (shared configurations), but the built-in model
    then answers: the log says so, naming the variables (not their values)."""
    from warmsocket.backends.mock import MockBackend
    from warmsocket.serve import backend_from_args

    caplog.set_level(logging.WARNING, logger="warmsocket")
    for name in [n for n in os.environ if n.startswith("WARMSOCKET_")]:
        monkeypatch.delenv(name)
    assert isinstance(backend_from_args(build_parser().parse_args(["serve"])), MockBackend)
    assert not caplog.records
    monkeypatch.setenv("WARMSOCKET_UPSTREAM_API_KEY", "sk-upstream-secret")
    monkeypatch.setenv("WARMSOCKET_AFFINITY_COOLDOWN", "5")
    assert isinstance(backend_from_args(build_parser().parse_args(["serve"])), MockBackend)
    [warning] = caplog.records
    assert (
        warning.getMessage() == "upstream settings without an upstream: the built-in model answers"
    )
    assert warning.variables == ["WARMSOCKET_AFFINITY_COOLDOWN", "WARMSOCKET_UPSTREAM_API_KEY"]  # type: ignore[attr-defined]
    assert "sk-upstream-secret" not in str(warning.__dict__)


def test_http_timeouts_reach_the_server_config() -> None:
    from warmsocket.serve import config_from_args

    config = config_from_args(build_parser().parse_args(["serve"]))
    assert (config.http_idle_timeout, config.http_head_timeout) == (75.0, 30.0)
    assert config.http_body_timeout == 300.0
    args = ["serve", "--http-idle-timeout", "0", "--http-head-timeout", "2.5"]
    config = config_from_args(build_parser().parse_args(args))
    assert (config.http_idle_timeout, config.http_head_timeout) == (None, 2.5)  # 0: none
    for value, expected in [("0", None), ("12.5", 12.5)]:
        args = ["serve", "--http-body-timeout", value]
        assert config_from_args(build_parser().parse_args(args)).http_body_timeout == expected


@pytest.mark.parametrize(
    ("command", "variable", "value", "message"),
    [
        ("serve", "WARMSOCKET_PORT", "eighty", "not a port: 'eighty'"),
        ("serve", "WARMSOCKET_LOG_LEVEL", "verbose", "invalid choice: 'verbose' (choose from"),
        ("serve", "WARMSOCKET_LOG_FORMAT", "JSON", "invalid choice: 'JSON'"),
        ("serve", "WARMSOCKET_MODEL_BACKEND", "vllm", "invalid choice: 'vllm'"),
        ("serve", "WARMSOCKET_UPSTREAM_API", "bogus", "invalid choice: 'bogus'"),
        ("serve", "WARMSOCKET_MAX_LANES", "0", "must be > 0"),
        ("serve", "WARMSOCKET_MEMORY_BUDGET", "lots", "not a size: 'lots'"),
        ("serve", "WARMSOCKET_NO_PREFIX_DIFFING", "maybe", "invalid value: 'maybe'"),
        ("serve", "WARMSOCKET_HTTP_HEAD_TIMEOUT", "-1", "must be >= 0: -1"),
        ("serve", "WARMSOCKET_HTTP_BODY_TIMEOUT", "soon", "not a number: 'soon'"),
        ("serve", "WARMSOCKET_SHUTDOWN_TIMEOUT", "inf", "not a finite number: 'inf'"),
        ("serve", "WARMSOCKET_HTTP_IDLE_TIMEOUT", "1e999", "not a finite number: '1e999'"),
        ("simulate-upstream", "WARMSOCKET_SIM_LOG_LEVEL", "loud", "invalid choice: 'loud'"),
        ("simulate-upstream", "WARMSOCKET_SIM_RECORD_BODIES", "x", "not an integer: 'x'"),
        # "$K1,$K2" with both unset, or "$K" unset: no key at all would turn auth off.
        ("serve", "WARMSOCKET_API_KEY", ",", "an empty key (is the variable it was given"),
        ("serve", "WARMSOCKET_API_KEY", "k1,,k2", "an empty key"),
        ("serve", "WARMSOCKET_API_KEY", "", "an empty key"),
    ],
)
def test_bad_environment_value_is_a_usage_error(
    command: str, variable: str, value: str, message: str
) -> None:
    # Checked exactly as the flag's value would be: same type, same choices.
    result = run(WARMSOCKET, command, env={variable: value})
    assert result.returncode == 2
    assert f"warmsocket {command}: error: {variable}: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage:")


def test_bad_environment_value_only_matters_where_it_is_used() -> None:
    # The command line wins over a bad variable, and --help and other subcommands
    # still work.
    env = {"WARMSOCKET_PORT": "eighty", "WARMSOCKET_LOG_LEVEL": "verbose"}
    assert run(WARMSOCKET, "serve", "--help", env=env).returncode == 0
    assert run(WARMSOCKET, "simulate-upstream", "--help", env=env).returncode == 0
    os.environ.update(env)
    try:
        args = build_parser().parse_args(["serve", "--port", "1", "--log-level", "debug"])
    finally:
        for key in env:
            os.environ.pop(key)
    assert (args.port, args.log_level) == (1, "debug")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--max-lanes", "abc"], "argument --max-lanes: not an integer: 'abc'"),
        (["serve", "--close-grace", "nan"], "argument --close-grace: not a number: 'nan'"),
        (["serve", "--connection-lifetime", "x"], "--connection-lifetime: not a number: 'x'"),
        (
            ["serve", "--upstream", "http://a:1/v1", "--upstream-retries", "-1"],
            "argument --upstream-retries: must be >= 0: -1",
        ),
        (
            ["serve", "--upstream", "http://a:1/v1", "--upstream-ws-warm", "-1"],
            "argument --upstream-ws-warm: must be >= 0: -1",
        ),
        (["simulate-upstream", "--record-bodies", "-5"], "--record-bodies: must be >= 0: -5"),
    ],
)
def test_numbers_are_checked_not_clamped(args: list[str], message: str) -> None:
    # Negative counts used to be clamped to 0 silently; not-a-number gave
    # "invalid _positive_int value".
    result = run(WARMSOCKET, *args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        # An unset variable given as a value: `--api-key "$KEY"` left auth "on" while
        # requests without a key were served; `--host "$HOST"` listened everywhere.
        (["--api-key="], {}, "argument --api-key: an empty key"),
        (["--api-key", "  "], {}, "argument --api-key: an empty key"),
        (["--api-key", " sk-1"], {}, "argument --api-key: a key with spaces around it"),
        (["--host="], {}, "argument --host: an empty address; give 0.0.0.0"),
        ([], {"WARMSOCKET_HOST": ""}, "WARMSOCKET_HOST: an empty address"),
        (["--tls-cert="], {}, "argument --tls-cert: an empty path"),
        (["--tls-key="], {}, "argument --tls-key: an empty path"),
        (["--tls-client-ca="], {}, "argument --tls-client-ca: an empty path"),
    ],
)
def test_empty_values_that_would_change_the_server_quietly_are_refused(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = run(WARMSOCKET, "serve", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["serve", "simulate-upstream"])
@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_port_out_of_range_is_a_usage_error(command: str, port: str) -> None:
    # Not wrapped around modulo 65536 (99999 used to listen on 34463), not an errno.
    result = run(WARMSOCKET, command, f"--port={port}")
    assert result.returncode == 2
    assert f"argument --port: not a port: '{port}' (0 to 65535" in result.stderr


def test_port_range_includes_zero_and_65535() -> None:
    assert build_parser().parse_args(["serve", "--port", "0"]).port == 0
    assert build_parser().parse_args(["simulate-upstream", "--port", "65535"]).port == 65535


@pytest.mark.parametrize(
    ("text", "value"), [("1024", 1024), ("4K", 4096), ("64MiB", 64 << 20), ("1g", 1 << 30)]
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_a_size_too_large_is_a_usage_error() -> None:
    """Past 1 PiB no machine has the memory, and the Rust core's counters overflowed:
    a traceback (OverflowError), not a usage error."""
    assert parse_size("1024T") == 1 << 50
    for text in ("1025T", "99999999999999T", "9" * 400):
        with pytest.raises(argparse.ArgumentTypeError, match="too large"):
            parse_size(text)
    result = run(WARMSOCKET, "serve", "--memory-budget", "99999999999999T")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --memory-budget: too large" in result.stderr


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
        assert (record["backend"], record["models"]) == ("mock", ["warmsocket-mock"])
        assert (record["tokenizer"], record["memory_budget"]) == ("o200k_base", 1 << 30)
        assert "upstream" not in record
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
    proc, listening = start_serve(*args)
    return proc, listening["url"]


def start_serve(
    *args: str, preexec_fn: Callable[[], None] | None = None
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A `warmsocket serve` process, and its `listening` log record."""
    proc = subprocess.Popen(
        [WARMSOCKET, "serve", "--port", "0", "--log-format", "json", *args],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        record = json.loads(line)
        if record["message"] == "listening":
            return proc, record
    raise AssertionError("server exited before listening")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr is not None
    rest = proc.stderr.read()
    proc.stderr.close()
    return rest


def test_a_snapshot_larger_than_the_memory_budget_is_not_lost(tmp_path: Path) -> None:
    """Restarted with a smaller --memory-budget than the snapshot needs, the server
    refused nothing: the budget dropped what did not fit, silently, and the shutdown
    then saved the smaller cache over the file. It now refuses to start, saying what to
    do, and the file stays as it was."""
    snapshot = tmp_path / "state.msgpack"
    proc, base = _start("--snapshot", str(snapshot))
    try:
        for n in range(20):
            httpx.post(f"{base}/responses", json={"model": "m", "input": f"{n} " + "x" * 100_000})
    finally:
        _stop(proc)
    saved = snapshot.read_bytes()
    assert len(saved) > 2_000_000
    result = run(
        WARMSOCKET, "serve", "--port", "0", "--snapshot", str(snapshot), "--memory-budget", "1M"
    )
    assert result.returncode == 1
    assert "raise --memory-budget, or move the file" in result.stderr
    assert snapshot.read_bytes() == saved
    # A snapshot the flags refuse says why (it said only "SnapshotError").
    result = run(
        WARMSOCKET, "serve", "--port", "0", "--snapshot", str(snapshot), "--max-item-bytes", "1K"
    )
    assert result.returncode == 1
    (record,) = [json.loads(line) for line in result.stderr.splitlines() if "snapshot" in line]
    assert "bytes" in record["reason"] and "x" * 20 not in result.stderr


def test_a_server_over_its_budget_restarts_with_the_same_flags(tmp_path: Path) -> None:
    """A response's parent is never evicted to make room for it, so a chain can hold
    more than --memory-budget; the snapshot saved that, and the restart with the same
    flags refused it (a restart loop under an orchestrator). What the next write
    would evict is evicted before the snapshot."""
    snapshot = tmp_path / "state.msgpack"
    flags = ("--snapshot", str(snapshot), "--memory-budget", "1M")
    proc, base = _start(*flags)
    try:
        first = httpx.post(f"{base}/responses", json={"model": "m", "input": "a" * 300_000})
        second = httpx.post(
            f"{base}/responses",
            json={"model": "m", "input": "b" * 250_000, "previous_response_id": first.json()["id"]},
        )
        assert second.json()["status"] == "completed"
        metrics = httpx.get(f"{base}/metrics").text
        held = int(re.search(r"^warmsocket_cache_bytes (\d+)", metrics, re.M)[1])  # type: ignore[index]
        assert held > 1024 * 1024  # over the budget, nothing evicted
    finally:
        logs = _stop(proc)
    proc, base = _start(*flags)
    try:
        kept = httpx.post(f"{base}/responses", json={"model": "m", "input": "after"})
        assert kept.json()["status"] == "completed"
    finally:
        _stop(proc)
    assert "responses over --memory-budget evicted before the snapshot" in logs


def test_sighup_without_tls_does_not_end_the_server(tmp_path: Path) -> None:
    """SIGHUP reads the TLS files again; without TLS there is nothing to read, and its
    default action ended the process at once: no drain, no snapshot saved (every stored
    response since the start lost)."""
    snapshot = tmp_path / "state.msgpack"
    proc, base = _start("--snapshot", str(snapshot))
    try:
        kept = httpx.post(f"{base}/responses", json={"model": "m", "input": "keep"}).json()
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert proc.poll() is None
        assert httpx.get(f"{base}/responses/{kept['id']}").status_code == 200
    finally:
        logs = _stop(proc)
    assert "SIGHUP: nothing to read again" in logs and "snapshot saved" in logs


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


def test_snapshot_keeps_conversations_across_a_restart(tmp_path: Path) -> None:
    """Without Redis, `--snapshot PATH` keeps the conversations in `PATH.conversations`:
    after a restart they list the same items and a create continues them, its
    history found by prefix diffing in the restored chain. A bad file stops `serve`."""
    snapshot = tmp_path / "state.msgpack"
    auth = {"Authorization": "Bearer sk-test"}
    proc, base = _start("--snapshot", str(snapshot))
    try:
        with httpx.Client(base_url=base, headers=auth) as http:
            made = http.post("/conversations", json={"items": [{"role": "user", "content": "a"}]})
            conv = made.json()["id"]
            http.post("/responses", json={"model": "m", "input": "b", "conversation": conv})
            before = http.get(f"/conversations/{conv}/items?order=asc").json()["data"]
    finally:
        logs = _stop(proc)
    assert "conversations saved" in logs
    proc, base = _start("--snapshot", str(snapshot))
    try:
        with httpx.Client(base_url=base, headers=auth) as http:
            assert http.get(f"/conversations/{conv}/items?order=asc").json()["data"] == before
            body = {"model": "m", "input": "/transcript", "conversation": conv}
            answer = http.post("/responses", json=body).json()
            text = answer["output"][0]["content"][0]["text"]
            metrics = http.get("/metrics").text
    finally:
        _stop(proc)
    assert text.splitlines() == [
        "user: a",
        "user: b",
        "assistant: You said: b",
        "user: /transcript",
    ]
    assert 'warmsocket_prefix_matches_total{result="hit"} 1' in metrics
    # A budget now smaller than what the file holds stops `serve`, saying what to do.
    too_small = subprocess.run(
        [
            WARMSOCKET,
            "serve",
            "--port",
            "0",
            "--snapshot",
            str(snapshot),
            "--conversation-budget",
            "1K",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert too_small.returncode == 1
    assert "raise --conversation-budget, or move the file" in too_small.stderr
    (tmp_path / "state.msgpack.conversations").write_bytes(b"not msgpack")
    failed = subprocess.run(
        [WARMSOCKET, "serve", "--port", "0", "--snapshot", str(snapshot)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert failed.returncode == 1 and "cannot restore the conversations" in failed.stderr


def test_snapshot_keeps_failed_and_cancelled_background_responses(tmp_path: Path) -> None:
    """Without Redis, `--snapshot PATH` keeps the background responses that failed or
    were cancelled (they are not stored responses), the one shutdown cancelled too, in
    `PATH.background`: after a restart each is retrieved as it ended, its input listed,
    and it can be deleted. They were lost: a client polling one got a 404. A bad file
    stops `serve`."""
    snapshot = tmp_path / "state.msgpack"
    proc, base = _start("--snapshot", str(snapshot), "--shutdown-timeout", "0.3")
    try:
        with httpx.Client(base_url=base, timeout=10) as http:

            def background(text: str) -> str:
                body = {"model": "m", "input": text, "background": True}
                rid: str = http.post("/responses", json=body).json()["id"]
                return rid

            failed = background("/fail")
            cancelled = background("/sleep 30000 cancel me")
            assert http.post(f"/responses/{cancelled}/cancel").json()["status"] == "cancelled"
            cut = background("/sleep 30000 cut by the shutdown")
            deadline = time.monotonic() + 10
            while http.get(f"/responses/{failed}").json()["status"] != "failed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            before = {rid: http.get(f"/responses/{rid}").json() for rid in (failed, cancelled)}
    finally:
        logs = _stop(proc)
    assert "background responses saved" in logs
    proc, base = _start("--snapshot", str(snapshot))
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            after = {rid: http.get(f"/responses/{rid}").json() for rid in (failed, cancelled)}
            shut = http.get(f"/responses/{cut}").json()
            listed = http.get(f"/responses/{cut}/input_items").json()["data"]
            assert http.delete(f"/responses/{failed}").status_code == 200
            gone = http.get(f"/responses/{failed}").status_code
    finally:
        _stop(proc)
    assert after == before
    assert (after[failed]["status"], after[cancelled]["status"]) == ("failed", "cancelled")
    assert (shut["id"], shut["status"]) == (cut, "cancelled")
    assert [part["text"] for part in listed[0]["content"]] == ["/sleep 30000 cut by the shutdown"]
    assert gone == 404
    (tmp_path / "state.msgpack.background").write_bytes(b"not msgpack")
    refused = run(WARMSOCKET, "serve", "--port", "0", "--snapshot", str(snapshot))
    assert refused.returncode == 1
    assert "cannot restore the failed and cancelled background responses" in refused.stderr


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


@pytest.mark.parametrize("where", ["missing directory", "a directory", "under a file"])
def test_unwritable_snapshot_is_refused_at_start(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("")
    snapshot = {
        "missing directory": tmp_path / "nonexistent" / "x.snap",
        "a directory": tmp_path,
        "under a file": tmp_path / "file" / "x.snap",
    }[where]
    result = run(WARMSOCKET, "serve", "--port", "0", "--snapshot", str(snapshot))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["level"] == "error" and "--snapshot needs a file" in record["message"]
    assert record["path"] == str(snapshot) and record["reason"]
    assert sorted(os.listdir(tmp_path)) == ["file"]  # the probe left nothing behind


def test_snapshot_that_cannot_be_saved_at_shutdown_is_an_error(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    proc, base = _start("--snapshot", str(directory / "state.msgpack"))
    try:
        httpx.post(f"{base}/responses", json={"model": "m", "input": "secret words"})
        directory.rmdir()  # gone while serving
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 1
        assert proc.stderr is not None
        rest = proc.stderr.read()
        proc.stderr.close()
    assert "Traceback" not in rest and "secret words" not in rest
    records = [json.loads(line) for line in rest.splitlines()]
    (failure,) = [r for r in records if r["level"] == "error"]
    assert failure["message"].startswith("cannot save the snapshot")
    assert failure["reason"] == "No such file or directory"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        (
            "--memory-budget",
            "512",
            "too small: '512' is 512 bytes, under the minimum of 1M; did you mean 512M?",
        ),
        ("--memory-budget", "0", "under the minimum of 1M"),
        ("--max-message-bytes", "0", "under the minimum of 1K"),
        ("--max-item-bytes", "100", "under the minimum of 1K; did you mean 100K?"),
        ("--max-queued-bytes", "0.5K", "under the minimum of 1K"),
    ],
)
def test_sizes_too_small_to_work_are_refused(flag: str, value: str, message: str) -> None:
    result = run(WARMSOCKET, "serve", flag, value)
    assert result.returncode == 2
    assert f"argument {flag}: too small: '{value}' is" in result.stderr
    assert message in result.stderr
    assert "K, M, G = KiB, MiB, GiB" in result.stderr


def test_smallest_sizes_are_accepted() -> None:
    args = build_parser().parse_args(
        ["serve", "--memory-budget", "1M", "--max-message-bytes", "1024", "--max-item-bytes", "1k"]
    )
    assert (args.memory_budget, args.max_message_bytes, args.max_item_bytes) == (
        1 << 20,
        1024,
        1024,
    )


@pytest.mark.parametrize("via", ["flag", "env"])
def test_unknown_tokenizer_name_lists_the_valid_ones(via: str) -> None:
    if via == "flag":
        result = run(WARMSOCKET, "serve", "--tokenizer", "o200k")
        where = "argument --tokenizer"
    else:
        result = run(WARMSOCKET, "serve", env={"WARMSOCKET_TOKENIZER": "o200k"})
        where = "WARMSOCKET_TOKENIZER"
    assert result.returncode == 2
    assert f"{where}: 'o200k' is neither a tokenizer name nor an existing file" in result.stderr
    for name in ("'o200k_base'", "'cl100k_base'", "'none'", "tokenizer.json"):
        assert name in result.stderr


def test_unreadable_tokenizer_file_gives_the_os_reason(tmp_path: Path) -> None:
    result = run(WARMSOCKET, "serve", "--port", "0", "--tokenizer", str(tmp_path))
    assert result.returncode == 1
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["message"] == "cannot read the tokenizer file; fix --tokenizer"
    assert (record["reason"], record["errno"]) == ("Is a directory", 21)


def test_invalid_tokenizer_file_is_named_without_its_content(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": "secret words"}')
    result = run(WARMSOCKET, "serve", "--port", "0", "--tokenizer", str(bad))
    assert result.returncode == 1
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["error_type"] == "InvalidTokenizerFile"
    assert "o200k_base, cl100k_base, none" in record["message"]
    assert "secret words" not in result.stderr


def test_help_texts() -> None:
    top = run(WARMSOCKET, "--help").stdout
    assert "The `warmsocket` command line." not in top  # not the module docstring
    assert "WARMSOCKET_MAX_LANES=8" in top and "WARMSOCKET_SIM_" in top
    serve = " ".join(run(WARMSOCKET, "serve", "--help").stdout.split())
    assert "(default: warmsocket-mock)" in serve and "['warmsocket-mock']" not in serve
    for flag in (
        "--max-message-bytes",
        "--max-item-bytes",
        "--max-queued-bytes",
        "--memory-budget",
    ):
        help_text = serve.split(f"{flag} SIZE ", 1)[1].split("[env:", 1)[0]
        assert "binary unit (K = KiB, M = MiB, G = GiB)" in help_text, flag


@pytest.mark.parametrize("command", ["serve", "simulate-upstream"])
def test_port_in_use_says_what_to_do(command: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(WARMSOCKET, command, "--port", str(port), "--log-format", "json")
    assert result.returncode == 1
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["message"] == "cannot listen; pick another --port or --host"
    assert (record["host"], record["port"], record["errno"]) == ("127.0.0.1", port, 98)
    assert record["reason"] == "Address already in use"


def test_a_host_that_does_not_resolve_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # (Not "Unknown error -2": a resolver's error number is no errno. Made here, not
    # asked of a resolver: the tests send nothing off the machine.)
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with caplog.at_level(logging.ERROR):
        cannot_listen(logging.getLogger("warmsocket"), "no-such-host.invalid", 8080, error)
    (record,) = caplog.records
    assert record.getMessage() == "cannot listen; pick another --port or --host"
    assert record.__dict__["reason"] == "Name or service not known"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_host_is_in_brackets_in_the_listening_urls() -> None:
    proc, url = _start("--host", "::1")
    try:
        assert url.startswith("http://[::1]:") and url.endswith("/v1")
        reply = httpx.post(f"{url}/responses", json={"model": "m", "input": "six"})
        assert reply.json()["output"][0]["content"][0]["text"] == "You said: six"
    finally:
        _stop(proc)
