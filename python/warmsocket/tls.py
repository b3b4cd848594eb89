"""Serving over TLS (`--tls-cert`, `--tls-key`): `https://` and `wss://` on the one port.

Agents that keep a WebSocket to a server across a network need `wss://`, as OpenAI's
own endpoint is. Without these flags warmsocket speaks plain HTTP and expects TLS to
end in front of it (a load balancer, an ingress, a mesh sidecar), or no network
between it and its clients (a sidecar on loopback).

The certificate is read again, into the context in use, on SIGHUP and when its
files change (`CertificateFiles`, looked at every `RELOAD_CHECK_SECONDS`): rotating a
certificate (cert-manager, certbot) must not need a restart, which would close every
warm WebSocket and lose the `store: false` state on it. New handshakes get the new
certificate; established connections keep theirs. Files that cannot be used are
logged and the certificate in use stays.

The context is the standard library's server defaults (TLS 1.2 or later, its cipher
choice) with ALPN offering `http/1.1` only: the one protocol the server speaks, so a
client that prefers HTTP/2 settles on HTTP/1.1 during the handshake.

With `--tls-client-ca` the handshake also requires a client certificate signed by one of
that bundle's CAs (mutual TLS): only those CAs are trusted for it, never the system's.
A reload adds the bundle's CAs again; a CA taken out of it stays trusted until restart
(OpenSSL's store only grows).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from pathlib import Path
from typing import Any

log = logging.getLogger("warmsocket")

RELOAD_CHECK_SECONDS = 60.0
"""How often the certificate files are looked at for changes."""


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message says what to fix (never the
    files' content)."""


def server_context(
    cert: Path, key: Path | None = None, client_ca: Path | None = None
) -> ssl.SSLContext:
    """A server context from a PEM certificate chain and its private key (`key`
    None: the key is in the certificate file), requiring client certificates signed
    by a CA in `client_ca` when given. Raises TLSConfigError."""
    # (CLIENT_AUTH: a server's context; it loads no CA, so none is trusted for clients.)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    # No TLS 1.3 session tickets. A ticket arrives after the handshake, and a client
    # that reads on one thread while it writes on another (the `websockets` sync
    # client, hence the openai SDK's sync `responses.connect()`) then races inside
    # OpenSSL: about 1 wss:// connection in 70 hung before its upgrade's answer
    # (tested). Resumption saves little for connections that stay open.
    context.num_tickets = 0
    # Each file is opened first: `load_cert_chain`'s own OSError names no file.
    _check_readable(cert, "--tls-cert")
    if key is not None:
        _check_readable(key, "--tls-key")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        # e.g. KEY_VALUES_MISMATCH, NO_START_LINE (not PEM), a key needing a password.
        reason = exc.reason or "not a PEM certificate chain and matching private key"
        raise TLSConfigError(
            f"cannot load the TLS certificate and key ({reason}); --tls-cert takes a PEM "
            "certificate chain (the server's certificate first), --tls-key its PEM private "
            "key without a password (or leave it out when the key is in the certificate file)"
        ) from None
    except OSError as exc:  # (not SSLError, which is one: changed since the check)
        raise TLSConfigError(f"cannot read --tls-cert / --tls-key: {exc.strerror or exc}") from None
    if client_ca is not None:
        require_client_certificates(context, client_ca)
    return context


def _check_readable(path: Path, flag: str) -> None:
    """Raises TLSConfigError naming `path` and saying what to do when it cannot be
    read (missing, not allowed, a directory)."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise TLSConfigError(f"cannot read {path}: no such file; fix {flag}") from None
    except PermissionError:
        raise TLSConfigError(
            f"cannot read {path}: permission denied; let this user read it ({flag})"
        ) from None
    except IsADirectoryError:
        raise TLSConfigError(f"cannot read {path}: a directory; give {flag} a file") from None
    except OSError as exc:
        raise TLSConfigError(f"cannot read {path}: {exc.strerror or exc} ({flag})") from None


def client_identity(peercert: Any) -> str | None:
    """What a verified client certificate names, as one string: its issuer, its
    subject and its subject alternative names (DNS, email, URI such as a SPIFFE ID,
    IP), each sorted, so that a renewed certificate for the same names from the same
    CA is the same client, and one of another CA of `--tls-client-ca`'s bundle with
    the same names is not. None without a certificate (`peercert`: the TLS
    transport's `get_extra_info("peercert")`)."""
    if not peercert:
        return None
    issuer, subject = (
        sorted(f"{name}={value}" for rdn in peercert.get(part, ()) for name, value in rdn)
        for part in ("issuer", "subject")
    )
    alternatives = sorted(f"{kind}:{value}" for kind, value in peercert.get("subjectAltName", ()))
    return json.dumps(
        {"issuer": issuer, "subject": subject, "names": alternatives}, separators=(",", ":")
    )


def require_client_certificates(context: ssl.SSLContext, client_ca: Path) -> None:
    """Mutual TLS: a handshake needs a client certificate signed by a CA of `client_ca`
    (a PEM bundle). Raises TLSConfigError."""
    _check_readable(client_ca, "--tls-client-ca")
    try:
        context.load_verify_locations(cafile=client_ca)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"cannot load --tls-client-ca ({exc.reason or 'not PEM'}); it takes a PEM bundle "
            "of the CA certificates that sign the clients' certificates"
        ) from None
    except OSError as exc:  # (not SSLError, which is one: changed since the check)
        raise TLSConfigError(f"cannot read --tls-client-ca: {exc.strerror or exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED


class CertificateFiles:
    """The files of a served context, read again into it when they change."""

    def __init__(
        self,
        context: ssl.SSLContext,
        cert: Path,
        key: Path | None = None,
        client_ca: Path | None = None,
    ) -> None:
        self.context = context
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self._stamp = self._files_stamp()

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...]:
        """What tells a file's new version from the old (a renamed-over or re-linked
        file has another inode; an edited one another time or size)."""
        stamps = []
        for path in (self.cert, self.key, self.client_ca):
            if path is None:
                continue
            try:
                info = os.stat(path)
            except OSError:
                stamps.append((0, 0, 0))
                continue
            stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def changed(self) -> bool:
        return self._files_stamp() != self._stamp

    def reload(self, reason: str) -> bool:
        """Read the files again into the context in use. They are checked in a context
        of their own first, so that a bad pair never replaces half of the good one.
        Returns whether the context now serves them; logs either way."""
        self._stamp = self._files_stamp()
        try:
            server_context(self.cert, self.key, self.client_ca)
            self.context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                self.context.load_verify_locations(cafile=self.client_ca)
        except (TLSConfigError, OSError, ssl.SSLError) as exc:
            log.error(
                "cannot reload the TLS certificate; the one in use stays",
                extra={
                    "reason": str(exc) if isinstance(exc, TLSConfigError) else type(exc).__name__,
                    "trigger": reason,
                },
            )
            return False
        log.info("TLS certificate reloaded", extra={"trigger": reason})
        return True

    def reload_if_changed(self) -> bool:
        return self.changed() and self.reload("files changed")
