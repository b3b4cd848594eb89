"""`--owner-by-client-certificate`: with mutual TLS, a client certificate's names are part
of who owns a response, so that two clients with different certificates (on one API key,
or none) never see or continue each other's responses; a renewed certificate for the same
names keeps its owner. Without the flag the certificate only admits a client."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import trustme

from tests.support import WSClient, output_text, running_server
from tests.test_tls import ca, pems
from warmsocket.tls import client_identity, server_context

__all__ = ["ca", "pems"]  # fixtures

KEY = "sk-one-key-for-every-agent"


def test_the_identity_is_the_certificates_names_in_any_order() -> None:
    assert client_identity(None) is None and client_identity({}) is None
    one = {
        "subject": ((("organizationName", "acme"),), (("commonName", "agent-a"),)),
        "subjectAltName": (("DNS", "agent-a.acme.test"), ("URI", "spiffe://acme/agent-a")),
        "serialNumber": "01",
    }
    renewed = {
        "subject": ((("commonName", "agent-a"),), (("organizationName", "acme"),)),
        "subjectAltName": (("URI", "spiffe://acme/agent-a"), ("DNS", "agent-a.acme.test")),
        "serialNumber": "02",
    }
    assert client_identity(one) == client_identity(renewed)
    other = {**one, "subjectAltName": (("URI", "spiffe://acme/agent-b"),)}
    assert client_identity(other) != client_identity(one)
    # The same names from another CA of the bundle are another client.
    one["issuer"] = renewed["issuer"] = ((("commonName", "acme CA"),),)
    assert client_identity(one) == client_identity(renewed)
    impostor = {**one, "issuer": ((("commonName", "partner CA"),),)}
    assert client_identity(impostor) != client_identity(one)


class Agents:
    """Client TLS contexts, each with a certificate from the clients' CA."""

    def __init__(self, pems: dict[str, Path], tmp_path: Path) -> None:
        self.pems = pems
        self.ca = trustme.CA()
        self.bundle = tmp_path / "client-ca.pem"
        self.bundle.write_bytes(self.ca.cert_pem.bytes())

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.pems["cert"], self.pems["key"], client_ca=self.bundle)

    def context(self, name: str) -> ssl.SSLContext:
        """A new certificate (a new key too) for agent `name`: the same names each time."""
        own = ssl.create_default_context(cafile=str(self.pems["ca"]))
        self.ca.issue_cert(
            f"{name}.agents.test",
            common_name=name,
            organization_name="acme",
            organization_unit_name="agents",
        ).configure_cert(own)
        return own


def sdk(base: str, context: ssl.SSLContext, stack: list[Any]) -> openai.OpenAI:
    http = httpx.Client(verify=context, timeout=10)
    stack.append(http)
    return openai.OpenAI(base_url=base, api_key=KEY, http_client=http, max_retries=0)


def test_agents_with_different_certificates_do_not_see_each_others_responses(
    pems: dict[str, Path], tmp_path: Path
) -> None:
    agents = Agents(pems, tmp_path)
    opened: list[Any] = []
    with running_server(tls=agents.server_context(), owner_by_client_certificate=True) as srv:
        base = f"https://127.0.0.1:{srv.port}/v1"
        try:
            a = sdk(base, agents.context("agent-a"), opened)
            b = sdk(base, agents.context("agent-b"), opened)
            first = a.responses.create(model="m", input="secret plan")
            # Agent B, on the same API key: not found, not continuable.
            with pytest.raises(openai.NotFoundError):
                b.responses.retrieve(first.id)
            with pytest.raises(openai.BadRequestError, match="not found"):
                b.responses.create(model="m", input="go on", previous_response_id=first.id)
            # Agent A with a renewed certificate (new key, same names) continues it.
            renewed = sdk(base, agents.context("agent-a"), opened)
            assert renewed.responses.retrieve(first.id).output_text == "You said: secret plan"
            later = renewed.responses.create(
                model="m", input="go on", previous_response_id=first.id
            )
            assert later.output_text == "You said: go on"
            # WebSocket mode is owned the same way.
            ws_url = f"wss://127.0.0.1:{srv.port}/v1/responses"
            headers = {"Authorization": f"Bearer {KEY}"}
            with WSClient(ws_url, ssl=agents.context("agent-b"), additional_headers=headers) as ws:
                (error,) = ws.turn(model="m", input="x", previous_response_id=later.id)
                assert error["error"]["code"] == "previous_response_not_found"
            with WSClient(ws_url, ssl=agents.context("agent-a"), additional_headers=headers) as ws:
                events = ws.turn(model="m", input="more", previous_response_id=later.id)
                assert output_text(events) == "You said: more"
        finally:
            for client in opened:
                client.close()


def test_without_the_flag_the_certificate_only_admits(
    pems: dict[str, Path], tmp_path: Path
) -> None:
    agents = Agents(pems, tmp_path)
    opened: list[Any] = []
    with running_server(tls=agents.server_context()) as srv:
        base = f"https://127.0.0.1:{srv.port}/v1"
        try:
            a = sdk(base, agents.context("agent-a"), opened)
            b = sdk(base, agents.context("agent-b"), opened)
            first = a.responses.create(model="m", input="shared")
            assert b.responses.retrieve(first.id).output_text == "You said: shared"
        finally:
            for client in opened:
                client.close()
