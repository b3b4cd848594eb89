"""Serving over TLS (`--tls-cert`, `--tls-key`): `https://` and `wss://` on the one port.

Agents that keep a WebSocket to a server across a network need `wss://`, as OpenAI's
own endpoint is. Without these flags warmsocket speaks plain HTTP and expects TLS to
end in front of it (a load balancer, an ingress, a mesh sidecar), or no network
between it and its clients (a sidecar on loopback).

The context is the standard library's server defaults (TLS 1.2 or later, its cipher
choice) with ALPN offering `http/1.1` only: the one protocol the server speaks, so a
client that prefers HTTP/2 settles on HTTP/1.1 during the handshake.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message says what to fix (never the
    files' content)."""


def server_context(cert: Path, key: Path | None = None) -> ssl.SSLContext:
    """A server context from a PEM certificate chain and its private key (`key`
    None: the key is in the certificate file). Raises TLSConfigError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TLSConfigError(
            f"cannot read {exc.filename}: no such file; fix --tls-cert / --tls-key"
        ) from None
    except PermissionError as exc:
        raise TLSConfigError(
            f"cannot read {exc.filename}: permission denied; let this user read it"
        ) from None
    except ssl.SSLError as exc:
        # e.g. KEY_VALUES_MISMATCH, NO_START_LINE (not PEM), a key needing a password.
        reason = exc.reason or "not a PEM certificate chain and matching private key"
        raise TLSConfigError(
            f"cannot load the TLS certificate and key ({reason}); --tls-cert takes a PEM "
            "certificate chain (the server's certificate first), --tls-key its PEM private "
            "key without a password (or leave it out when the key is in the certificate file)"
        ) from None
    return context
