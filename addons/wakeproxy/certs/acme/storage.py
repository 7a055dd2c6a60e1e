"""ACME: storage (see the package docstring)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import josepy as jose
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wakeproxy.certs.store import LoadedCert, load_cert
from wakeproxy.files import write_private
from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)





# --- storage -------------------------------------------------------------------------


def new_certificate_key(key_type: str) -> bytes:
    """A fresh private key for a certificate, PEM PKCS#8."""
    if key_type == "ec256":
        key: Any = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "ec384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif key_type in ("rsa2048", "rsa4096"):
        key = rsa.generate_private_key(65537, int(key_type[3:]))
    else:
        raise ValueError(f"unknown key type {key_type!r}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertStorage:
    """PEM files under `state_dir/acme`; every method blocks (call them in a thread)."""

    KEEP = 2  # issuances kept per name: the live one and the one before

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "acme"
        self.certs = self.root / "certs"

    def account_key(self) -> jose.JWKEC:
        """The account key, created once (EC P-256, mode 0600)."""
        path = self.root / "account.key"
        if not path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
            logger.info(f"acme: created account key {path}")
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        return jose.JWKEC(key=loaded)

    def save(self, name: str, key_pem: bytes, fullchain_pem: bytes) -> Path:
        """Write one issuance and switch `live` to it; returns the combined file's path."""
        leaf = x509.load_pem_x509_certificate(fullchain_pem)
        base = self.certs / name
        d = base / f"{leaf.serial_number:x}"
        d.mkdir(parents=True, exist_ok=True)
        write_private(d / "privkey.pem", key_pem)
        write_private(d / "fullchain.pem", fullchain_pem)
        os.chmod(d / "fullchain.pem", 0o644)
        chain = fullchain_pem if fullchain_pem.endswith(b"\n") else fullchain_pem + b"\n"
        write_private(d / "combined.pem", key_pem + chain)
        tmp = base / f".live.{os.getpid()}.{threading.get_ident()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(d.name)
        os.replace(tmp, base / "live")
        self._prune(base, d.name)
        return d / "combined.pem"

    def _prune(self, base: Path, live: str) -> None:
        dirs = sorted((p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and p.name != live),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        for old in dirs[self.KEEP - 1:]:
            shutil.rmtree(old, ignore_errors=True)

    def load_all(self) -> dict[str, LoadedCert]:
        """Every name's live certificate; unreadable ones are logged and left out (re-ordered)."""
        out: dict[str, LoadedCert] = {}
        if not self.certs.is_dir():
            return out
        for base in sorted(self.certs.iterdir()):
            live = base / "live"
            if not live.exists():
                continue
            try:
                out[base.name] = load_cert(live.resolve() / "combined.pem", None, "acme")
            except (OSError, ValueError) as e:
                logger.warning(f"acme: {base.name}: stored certificate unusable, will order again: {e}")
        return out


