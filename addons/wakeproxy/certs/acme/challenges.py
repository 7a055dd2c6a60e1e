"""ACME: the TLS-ALPN-01 challenge certificate (see the package docstring). The answers are served
by `certs.challenges`, which the serving workers run without this package."""

from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from wakeproxy.certs.challenges import ChallengeTokens

__all__ = ["ChallengeTokens", "alpn_challenge_cert"]

ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # RFC 8737


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
