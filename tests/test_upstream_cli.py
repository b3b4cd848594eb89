"""The upstream command line: flags, environment defaults, and real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2 as httpx
import pytest

from warmsocket.cli import build_parser
from warmsocket.upstream_cli import config_from_args

WARMSOCKET = os.path.join(os.path.dirname(sys.executable), "warmsocket")


def subcommand(name: str) -> object:
    parser = build_parser()
    return next(
        action.choices[name]
        for action in parser._actions
        if getattr(action, "choices", None) and name in action.choices
    )


def test_simulate_upstream_help_documents_every_flag_with_its_env_var() -> None:
    sim = subcommand("simulate-upstream")
    result = subprocess.run(
        [WARMSOCKET, "simulate-upstream", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for action in sim._actions:  # type: ignore[attr-defined]
        for flag in action.option_strings:
            if flag in {"-h", "--help"}:
                continue
            assert flag in text
            assert "WARMSOCKET_SIM_" + flag.lstrip("-").replace("-", "_").upper() in text
    assert "GET /stats" in text and "prefix cache" in text


def test_upstream_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMSOCKET_UPSTREAM", "http://a:1/v1,http://b:2/v1")
    monkeypatch.setenv("WARMSOCKET_UPSTREAM_MODEL_MAP", "gpt-4o=qwen,*=llama")
    args = build_parser().parse_args(["serve", "--upstream-api", "responses-ws"])
    config = config_from_args(args)
    assert config.urls == ("http://a:1/v1", "http://b:2/v1")
    assert config.api == "responses-ws"
    assert config.context_window is None  # learned from the upstream's model list
    assert config.upstream_model("gpt-4o") == "qwen" and config.upstream_model("x") == "llama"
    args = build_parser().parse_args(
        [
            "serve",
            "--upstream",
            "http://c:3/v1",
            "--upstream-retries",
            "0",
            "--affinity-cooldown",
            "1",
            "--upstream-context-window",
            "32768",
        ]
    )
    config = config_from_args(args)
    assert config.urls == ("http://c:3/v1",) and config.retries == 0
    assert config.context_window == 32768
    assert config.router.cooldown == 1.0
    monkeypatch.delenv("WARMSOCKET_UPSTREAM_MODEL_MAP")
    bad = build_parser().parse_args(
        ["serve", "--upstream", "http://a:1/v1", "--upstream-model-map", "nope"]
    )
    with pytest.raises(SystemExit, match="CLIENT=UPSTREAM"):
        config_from_args(bad)
    bad = build_parser().parse_args(["serve", "--upstream", "ftp://x"])
    with pytest.raises(SystemExit, match="http"):
        config_from_args(bad)


@pytest.mark.parametrize(
    "flags",
    [
        ["--upstream-model-map", "gpt-4o=qwen"],
        ["--upstream-api", "responses"],
        ["--upstream-api-key", "k"],
        ["--upstream-ws-warm", "2"],
        ["--upstream-retries=0"],
        ["--affinity-cooldown", "1"],
    ],
)
def test_upstream_flags_without_upstream_are_a_usage_error(flags: list[str]) -> None:
    # They would be silently ignored: the built-in model answers without --upstream.
    result = subprocess.run(
        [WARMSOCKET, "serve", *flags], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    flag = flags[0].split("=")[0]
    assert f"warmsocket serve: error: {flag} needs --upstream" in result.stderr


@pytest.mark.parametrize("flag", ["--mock-ttft-ms", "--mock-tokens-per-second"])
def test_built_in_model_flags_with_an_upstream_are_a_usage_error(
    flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The upstream answers, so they would be silently ignored.
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--upstream", "http://a:1/v1", flag, "5"])
    assert info.value.code == 2
    assert f"{flag} has no effect with --upstream" in capsys.readouterr().err
    monkeypatch.setenv("WARMSOCKET_UPSTREAM", "http://a:1/v1")  # from the environment too
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", flag, "5"])
    assert build_parser().parse_args(["serve"]).mock_ttft_ms == 0.0  # no flag: fine
    monkeypatch.delenv("WARMSOCKET_UPSTREAM")
    assert getattr(build_parser().parse_args(["serve", flag, "5"]), flag[2:].replace("-", "_")) == 5


def test_upstream_flags_with_upstream_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WARMSOCKET_UPSTREAM", "http://a:1/v1")
    args = build_parser().parse_args(["serve", "--upstream-model-map", "x=y"])
    assert config_from_args(args).upstream_model("x") == "y"
    # Environment defaults of upstream flags stay allowed without an upstream (one
    # set of variables often configures several processes), but are still checked.
    monkeypatch.delenv("WARMSOCKET_UPSTREAM")
    monkeypatch.setenv("WARMSOCKET_UPSTREAM_API", "responses")
    assert build_parser().parse_args(["serve"]).upstream_api == "responses"
    monkeypatch.setenv("WARMSOCKET_UPSTREAM_API", "bogus")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])
    assert "WARMSOCKET_UPSTREAM_API: invalid choice: 'bogus'" in capsys.readouterr().err


def test_models_listed_in_front_of_an_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /v1/models lists what a client can send that the operator named: not the
    built-in model's name, which does not answer with an upstream."""
    from warmsocket.serve import config_from_args as server_config

    def listed(*flags: str) -> tuple[str, ...] | None:
        return server_config(build_parser().parse_args(["serve", *flags])).listed_models

    up = ("--upstream", "http://a:1/v1")
    assert listed() is None  # the built-in model: its --model names, as before
    assert listed(*up) == ()  # names go upstream unchanged; warmsocket knows none
    mapped = (*up, "--upstream-model-map", "gpt-4o=qwen", "--upstream-model-map", "*=llama")
    assert listed(*mapped) == ("gpt-4o", "llama")
    assert listed(*mapped, "--model", "mine", "--model", "gpt-4o") == ("mine", "gpt-4o", "llama")
    # The tokenizer still follows the first --model name.
    assert server_config(build_parser().parse_args(["serve", *mapped])).models == (
        "warmsocket-mock",
    )
    monkeypatch.setenv("WARMSOCKET_MODEL", "from-env")
    assert listed(*up) == ("from-env",)


@contextmanager
def process(*args: str, listening: list[dict[str, object]] | None = None) -> Iterator[int]:
    """A warmsocket subcommand on a free port; yields the port it listens on (and
    adds its `listening` log record to `listening`)."""
    proc = subprocess.Popen(
        [WARMSOCKET, *args, "--port", "0", "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        while True:
            line = proc.stderr.readline()
            assert line, "the process exited before listening"
            record = json.loads(line)
            if record.get("message") == "listening":
                if listening is not None:
                    listening.append(record)
                yield int(record["url"].rsplit(":", 1)[1].split("/")[0])
                break
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_serve_in_front_of_simulate_upstream_processes() -> None:
    listening: list[dict[str, object]] = []
    with (
        process("simulate-upstream", "--overhead-ms", "1") as sim_port,
        process(
            "serve",
            "--upstream",
            f"http://127.0.0.1:{sim_port}/v1",
            "--upstream",  # a replica's URL as someone may write it: never logged so
            f"http://user:hunter2@127.0.0.1:{sim_port}/v1/?api_key=sk-secret",
            "--upstream-api",
            "chat",
            "--upstream-model-map",
            "m=warmsocket-sim",
            "--memory-budget",
            "256M",
            listening=listening,
        ) as port,
    ):
        # The start-up line says what this process talks to and with what.
        (record,) = listening
        assert record["upstream"] == [f"http://127.0.0.1:{sim_port}/v1"] * 2
        assert (record["upstream_api"], record["backend"]) == ("chat", "upstream-chat")
        assert (record["tokenizer"], record["memory_budget"]) == ("o200k_base", 256 << 20)
        assert record["models"] == ["m"]
        assert "hunter2" not in json.dumps(record) and "sk-secret" not in json.dumps(record)
        base = f"http://127.0.0.1:{port}/v1"
        with httpx.Client(timeout=10) as client:
            models = client.get(f"{base}/models").json()["data"]
            assert [card["id"] for card in models] == ["m"]
            body = client.post(f"{base}/responses", json={"model": "m", "input": "hi"}).json()
            assert body["output"][0]["content"][0]["text"] == "You said: hi"
            metrics = client.get(f"http://127.0.0.1:{port}/metrics").text
            assert 'warmsocket_upstream_requests_total{api="chat",outcome="200"} 1' in metrics
            stats = client.get(f"http://127.0.0.1:{sim_port}/stats").json()
            assert stats["requests"][0]["api"] == "chat"
