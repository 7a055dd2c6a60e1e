"""ACME: challenges (see the package docstring)."""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy import http, tls
from OpenSSL import SSL, crypto

from wakeproxy.certs.https import CHALLENGE_PREFIX
from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

ACME_TLS_ALPN = b"acme-tls/1"
ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # RFC 8737




# --- HTTP-01 -------------------------------------------------------------------------


def alpn_challenge_cert(name: str, key_authorization: str) -> tuple[crypto.X509, crypto.PKey]:
    """The self-signed TLS-ALPN-01 certificate for `name` (RFC 8737 §3), as pyOpenSSL objects."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # acmeIdentifier: an OCTET STRING (0x04, length 32) holding SHA-256(key authorization).
        .add_extension(x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return crypto.X509.from_cryptography(cert), crypto.PKey.from_cryptography_key(key)


def _select_acme_alpn(conn: SSL.Connection, offers: Any) -> Any:
    """The ALPN callback of a TLS-ALPN-01 validation handshake: always `acme-tls/1` (RFC 8737)."""
    return ACME_TLS_ALPN


class ChallengeTokens:
    """Pending challenges: HTTP-01 tokens → key authorizations, TLS-ALPN-01 names → certificates.

    Written by order threads, read on the event loop: single dict operations,
    atomic under the GIL, are all either side does.
    """

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}
        self.alpn: dict[str, tuple[crypto.X509, crypto.PKey]] = {}
        self.answered = 0

    def add(self, token: str, key_authorization: str) -> None:
        self._tokens[token] = key_authorization

    def remove(self, token: str) -> None:
        self._tokens.pop(token, None)

    def __len__(self) -> int:
        return len(self._tokens)

    def alpn_connection(self, data: tls.TlsData) -> SSL.Connection | None:
        """A server connection presenting the challenge certificate, for a TLS-ALPN-01 validation."""
        client = data.conn
        if ACME_TLS_ALPN not in (client.alpn_offers or ()):
            return None
        pair = self.alpn.get((client.sni or "").lower())
        if pair is None:
            return None
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate(pair[0])
        ctx.use_privatekey(pair[1])
        ctx.set_alpn_select_callback(_select_acme_alpn)
        conn = SSL.Connection(ctx)
        conn.set_accept_state()
        self.answered += 1
        return conn

    def answer(self, flow: http.HTTPFlow) -> bool:
        path = flow.request.path
        if not path.startswith(CHALLENGE_PREFIX):
            return False
        token = path[len(CHALLENGE_PREFIX):].split("?", 1)[0]
        validation = self._tokens.get(token)
        if validation is None:
            return False  # not ours: a backend may run its own ACME client
        self.answered += 1
        flow.response = http.Response.make(200, validation.encode(), {"Content-Type": "text/plain"})
        return True


