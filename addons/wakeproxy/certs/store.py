"""Certificates the proxy serves, chosen by SNI, and the HTTPS policy that follows from them.

Selection, in this order: an ACME certificate for the name; a custom
certificate from `tls.certs_dir` (`<name>.crt`/`.key`: the file base a container
names in `wakeproxy.cert-name` / `io.docksal.cert-name` for its hosts, else one
whose names cover the host, the closest file name first: `custom_table`); the default certificate
(`tls.default_cert`/`default_key`, else a self-signed one generated once into
`state_dir`).

mitmproxy picks the certificate itself (`TlsConfig.tls_start_client` →
`CertStore.get_cert`: the exact name, then `*.parent` forms, then `*`).  We
only keep its store filled: `CertRegistry` computes name → entry from what we
know, and `Certificates` writes that into the store.  TlsConfig throws its
store away whenever `certs`/`confdir` change (and once in its `running()`), so
the store's identity is checked before every handshake (`tls_clienthello`
runs before any `tls_start_client`) and everything is re-installed into a new
one.  Entries are file-based (the chain file is what makes OpenSSL send the
intermediates), and every issuance gets a new file name because mitmproxy
caches TLS contexts by chain-file path.  Because `*` is always ours,
mitmproxy's interception CA never signs anything we serve.

`HttpsPolicy` sends plain-HTTP requests of hosts with a real certificate to
https (308) and adds HSTS to HTTPS answers.  All disk reads happen at start,
on a rescan in a thread, or when ACME hands over a new certificate — never on
the request path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy import certs, ctx, exceptions, tls

from wakeproxy.config import Config
from wakeproxy.files import write_private
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.snapshot import Snapshot
from wakeproxy.runtime import Runtime

logger = get_logger(__name__)

DEFAULT_CERT_NAME = "default-cert.pem"
CUSTOM_RESCAN = 30.0  # seconds between looks at tls.certs_dir for changed files



def self_signed_pem(common_name: str = "wakeproxy default certificate", days: int = 3650) -> bytes:
    """A fresh ECDSA P-256 key and a self-signed certificate for it, as one PEM (key first)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wakeproxy")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + cert.public_bytes(serialization.Encoding.PEM)


def ensure_default_cert(state_dir: Path) -> Path:
    """The path of the default certificate (key + cert PEM), generating it on first use.

    The file is ours: when it cannot be used (empty after a full disk, truncated, edited), it is moved
    aside with a warning and a new one is generated, rather than failing every start."""
    from wakeproxy.preflight import move_aside

    path = state_dir / DEFAULT_CERT_NAME
    if path.exists():
        try:
            load_cert(path, None, "default")
            return path
        except (OSError, ValueError) as e:
            move_aside(path, str(e))
    write_private(path, self_signed_pem())
    return path


def repair_mitmproxy_confdir(confdir: Path) -> None:
    """mitmproxy's own store (its CA, which never signs what we serve) in our state_dir: a broken CA
    file would stop mitmproxy at start, so the folder is moved aside and mitmproxy makes a new one."""
    from wakeproxy.preflight import move_aside

    ca = confdir / "mitmproxy-ca.pem"
    if not ca.exists():
        return
    try:
        raw = ca.read_bytes()
        serialization.load_pem_private_key(raw, password=None)
        x509.load_pem_x509_certificate(raw)
    except (OSError, ValueError, TypeError) as e:
        move_aside(confdir, f"{ca.name}: {e}")


# --- one certificate ------------------------------------------------------------


def _utc(cert: x509.Certificate, attr: str) -> datetime.datetime:
    value = getattr(cert, f"{attr}_utc", None)
    if value is None:  # cryptography < 42
        value = getattr(cert, attr).replace(tzinfo=datetime.UTC)
    return value


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))


def name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 matching: exact, or `*.d` for exactly one label in front of `d`."""
    if pattern == host:
        return True
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


@dataclass(frozen=True)
class LoadedCert:
    """A certificate ready for mitmproxy's store, with what we need to reason about it."""

    entry: certs.CertStoreEntry
    names: tuple[str, ...]  # DNS SANs, lower case
    not_before: datetime.datetime
    not_after: datetime.datetime
    source: str  # acme | custom | default
    path: Path  # the chain file OpenSSL serves intermediates from
    leaf: x509.Certificate

    @property
    def serial(self) -> int:
        return self.entry.cert.serial

    def valid_at(self, now: datetime.datetime) -> bool:
        return self.not_before <= now < self.not_after

    def covers(self, host: str) -> bool:
        return any(name_matches(n, host) for n in self.names)


def load_cert(chain_path: Path, key_path: Path | None = None, source: str = "custom") -> LoadedCert:
    """Read a certificate (leaf first, then intermediates) and its key; blocking.

    The key is in `key_path`, or in the chain file itself when `key_path` is
    None (our combined ACME and default files).  Raises ValueError when the
    files cannot be used: the caller logs it and keeps whatever it served before.
    """
    raw = chain_path.read_bytes()
    key_raw = key_path.read_bytes() if key_path is not None else raw
    try:
        chain = x509.load_pem_x509_certificates(raw)
    except ValueError as e:
        raise ValueError(f"{chain_path}: no PEM certificate ({e})") from None
    try:
        key = serialization.load_pem_private_key(key_raw, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key_path or chain_path}: no usable unencrypted private key ({e})") from None
    leaf = chain[0]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise ValueError(f"{chain_path}: the private key does not belong to the certificate")
    entry = certs.CertStoreEntry(
        cert=certs.Cert(leaf), privatekey=key,  # type: ignore[arg-type]
        chain_file=chain_path, chain_certs=[certs.Cert(c) for c in chain],
    )
    return LoadedCert(entry, dns_names(leaf), _utc(leaf, "not_valid_before"), _utc(leaf, "not_valid_after"),
                      source, chain_path, leaf)


def scan_custom_dir(directory: Path, chain_dir: Path | None = None) -> dict[str, LoadedCert]:
    """`tls.certs_dir` → file base → certificate; blocking.  Broken pairs are logged and left out.

    With `chain_dir`, each chain is served from a copy named after its
    content: mitmproxy caches TLS contexts (which hold the intermediates) by
    chain-file path, so a `.crt` replaced in place by an outside renewal would
    otherwise keep sending its old intermediates.
    """
    found: dict[str, LoadedCert] = {}
    try:
        crts = sorted(directory.glob("*.crt"))
    except OSError as e:
        logger.warning(f"tls.certs_dir {directory}: cannot read: {e}")
        return found
    for crt in crts:
        key = crt.with_suffix(".key")
        if not key.exists():
            logger.warning(f"tls.certs_dir: {crt.name} has no {key.name}; skipped")
            continue
        try:
            cert = load_cert(crt, key, "custom")
            if chain_dir is not None:
                cert = dataclasses.replace(cert, entry=dataclasses.replace(
                    cert.entry, chain_file=_content_copy(crt, chain_dir)))
            found[crt.stem.lower()] = cert
        except (OSError, ValueError) as e:
            logger.warning(f"tls.certs_dir: {crt.name} skipped: {e}")
    if chain_dir is not None:
        keep = {c.entry.chain_file for c in found.values()}
        for old in chain_dir.glob("*.pem") if chain_dir.is_dir() else ():
            if old not in keep:
                old.unlink(missing_ok=True)
    return found


def custom_table(custom: Mapping[str, LoadedCert]) -> dict[str, LoadedCert]:
    """Custom certificates by the names they cover (their DNS SANs), not by their file names: a host gets
    only a certificate that is valid for it. Where several cover a name, the one whose file name is the
    closest match wins (as Docksal chooses): the file named for it (`example.com.crt` for `example.com`,
    `_wildcard.example.com.crt` for `*.example.com`), else the file sharing the most trailing labels with
    it (`example.com.crt`, covering `*.example.com`, for `project2.example.com`), else the first by name.
    mitmproxy's lookup then tries the exact name, then `*.parent`: `project2.example.com` finds
    `*.example.com`, one label deep, as the certificate itself allows."""
    candidates: dict[str, list[str]] = {}
    for base, cert in custom.items():
        for name in cert.names:
            candidates.setdefault(name, []).append(base)

    def closeness(name: str, base: str) -> tuple[int, int, str]:
        own = file_base_to_name(base)
        want, have = name.removeprefix("*.").split("."), own.removeprefix("*.").split(".")
        shared = 0
        while shared < min(len(want), len(have)) and want[-1 - shared] == have[-1 - shared]:
            shared += 1
        return (0 if own == name else 1, -shared, base)

    return {name: custom[min(bases, key=lambda b: closeness(name, b))] for name, bases in candidates.items()}


def _content_copy(path: Path, directory: Path) -> Path:
    """`path`'s certificates (no key) in `directory` under a name derived from their content."""
    certs_only = b"".join(c.public_bytes(serialization.Encoding.PEM)
                          for c in x509.load_pem_x509_certificates(path.read_bytes()))
    target = directory / f"{hashlib.sha256(certs_only).hexdigest()[:24]}.pem"
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(certs_only)
        os.replace(tmp, target)
    return target


def file_base_to_name(base: str) -> str:
    """`_wildcard.example.com` → `*.example.com`; anything else is the name itself."""
    return "*." + base[len("_wildcard."):] if base.startswith("_wildcard.") else base


def _dir_signature(directory: Path | None) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes of the .crt/.key files: a cheap change detector."""
    if directory is None:
        return ()
    out = []
    try:
        for p in sorted(directory.iterdir()):
            if p.suffix in (".crt", ".key"):
                st = p.stat()
                out.append((p.name, st.st_size, st.st_mtime_ns))
    except OSError:
        return ()
    return tuple(out)


# --- which certificate for which name ---------------------------------------------


@dataclass
class CertRegistry:
    """Everything we can serve, and the resulting name → certificate table (pure, no I/O).

    Later sources overwrite earlier ones in `table()`: custom files, then
    label-chosen custom files, then ACME certificates — so ACME wins for a
    name, as documented.  An exact name always beats a wildcard in
    mitmproxy's lookup, and `*` is the default.
    """

    default: LoadedCert | None = None
    custom: dict[str, LoadedCert] = field(default_factory=dict)  # file base → cert
    label_names: dict[str, str] = field(default_factory=dict)  # host → file base
    hosts: frozenset[str] = frozenset()  # the sites' exact names (a wildcard two labels up does not cover them)
    acme: dict[str, LoadedCert] = field(default_factory=dict)  # name → cert
    version: int = 0  # bumped on every change, so installers know to re-sync
    _said: set[tuple[str, str]] = field(default_factory=set, repr=False, compare=False)  # label misfits logged

    def changed(self) -> None:
        self.version += 1

    def table(self) -> dict[str, LoadedCert]:
        out: dict[str, LoadedCert] = {}
        if self.default is not None:
            out["*"] = self.default
        out.update(custom_table(self.custom))
        self._said &= set(self.label_names.items())  # (what is no longer labelled may be said again)
        for host, base in self.label_names.items():
            named = self.custom.get(base)
            # A label chooses among the certificates that cover its host, never one that does not (a tenant
            # naming the operator's bank.example.com file for its own host would serve a wrong certificate).
            if named is not None and named.covers(host):
                out[host] = named
            elif named is not None and (host, base) not in self._said:
                self._said.add((host, base))
                logger.warning(f"certificates: the cert-name label of {host} names {base}, which does not cover "
                               "it; its certificate is chosen by the names it covers instead")
        out.update(self.acme)
        # mitmproxy looks up `*.parent` at every level: a site two labels under a wildcard certificate
        # would get it, though it does not cover the site. Such a site gets the default instead.
        if self.default is not None:
            for host in self.hosts - out.keys():
                cert = self.choose(host, out)
                if cert is not None and cert is not self.default and not cert.covers(host):
                    out[host] = self.default
        return out

    def choose(self, host: str, table: Mapping[str, LoadedCert] | None = None) -> LoadedCert | None:
        """The certificate a handshake with SNI `host` gets (mitmproxy's lookup order)."""
        table = self.table() if table is None else table
        parts = host.split(".")
        for i in range(len(parts)):
            key = host if i == 0 else "*." + ".".join(parts[i:])
            if key in table:
                return table[key]
        return table.get("*")


class Certificates:
    """Keeps mitmproxy's certificate store filled from a `CertRegistry`.

    Also the owner of the default and custom certificates: loads them at
    start, rescans `tls.certs_dir` every `CUSTOM_RESCAN` seconds (in a
    thread), and follows `wakeproxy.cert-name` labels through new snapshots.
    `certs.acme.manager` hands its certificates over with `set_acme`.
    """

    def __init__(self, runtime: Runtime, pushed: bool = False) -> None:
        self.runtime = runtime
        # pushed: a serving worker's, filled only by `install_table` (the controller reads the files)
        self.pushed = pushed
        self.registry = CertRegistry()
        self.watchers: list[Callable[[], None]] = []  # told after every change of the table
        self._announced_version = -1
        self._table: dict[str, LoadedCert] = {}
        self._installed_into: Any = None  # the CertStore object we last filled
        self._installed_version = -1
        self._installed_names: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._custom_sig: tuple[tuple[str, int, int], ...] = ()
        self._loaded_for: Config | None = None

    # --- lifecycle ------------------------------------------------------------------

    def expiries(self) -> dict[str, float]:
        """Name → when the certificate in service for it expires (seconds since the epoch; for metrics)."""
        return {name: cert.not_after.timestamp() for name, cert in self._table.items()}

    def configure(self, updated: set[str]) -> None:
        config = self.runtime.config
        # Only once the real config is in (never the built-in defaults, whose state_dir is /var/lib).
        if ("wakeproxy_config" in updated and ctx.options.wakeproxy_config and config is not self._loaded_for
                and not self.pushed):
            self.load_static(config)
        if updated & {"certs", "confdir", "key_size", "cert_passphrase"}:
            self._installed_into = None  # TlsConfig made a new store (it configures before or after us)
        self.sync()

    def running(self) -> None:
        self._installed_into = None  # TlsConfig.running() rebuilds its store
        loop = asyncio.get_running_loop()
        loop.call_soon(self.sync)
        if self.pushed:
            return
        self._tasks.append(loop.create_task(self._follow_snapshots()))
        if self.runtime.config.tls.certs_dir is not None:
            self._tasks.append(loop.create_task(self._rescan_custom()))

    def done(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()

    def load_static(self, config: Config) -> None:
        """Default and custom certificates, read once when the config is (re)loaded (blocking)."""
        self._loaded_for = config
        tls_cfg = config.tls
        try:
            if tls_cfg.default_cert is not None:
                self.registry.default = load_cert(tls_cfg.default_cert, tls_cfg.default_key, "default")
            else:
                self.registry.default = load_cert(ensure_default_cert(config.state_dir), None, "default")
        except (OSError, ValueError) as e:
            raise exceptions.OptionsError(f"tls.default_cert: {e}") from None
        self.registry.custom = scan_custom_dir(tls_cfg.certs_dir, self._chain_dir()) if tls_cfg.certs_dir else {}
        self._custom_sig = _dir_signature(tls_cfg.certs_dir)
        if self.registry.custom:
            logger.info(f"tls: {len(self.registry.custom)} custom certificates from {tls_cfg.certs_dir}")
        self._update_labels(self.runtime.snapshot)
        self.registry.changed()

    def _chain_dir(self) -> Path:
        return self.runtime.config.state_dir / "custom-chains"

    # --- inputs -----------------------------------------------------------------------

    def set_acme(self, name: str, cert: LoadedCert) -> None:
        """Serve `cert` for `name` from the next handshake on (called on the event loop)."""
        self.registry.acme[name] = cert
        self.registry.changed()
        self.sync()

    def install_table(self, table: dict[str, LoadedCert]) -> None:
        """A worker: serve exactly `table` (name → certificate, "*" the default), as the controller computed it."""
        self.registry.default = table.get("*")
        self.registry.custom, self.registry.label_names = {}, {}
        self.registry.acme = {name: cert for name, cert in table.items() if name != "*"}
        self.registry.changed()
        self.sync()

    def _update_labels(self, snapshot: Snapshot) -> None:
        # host → file base, from the cert-name labels of each host's owner (when labels.cert_name allows)
        names = dict(snapshot.cert_names)
        hosts = frozenset(snapshot.exact)
        if names != self.registry.label_names or hosts != self.registry.hosts:
            self.registry.label_names = names
            self.registry.hosts = hosts
            self.registry.changed()

    async def _follow_snapshots(self) -> None:
        while True:
            await self.runtime.changed(60.0)
            self._update_labels(self.runtime.snapshot)
            self.sync()

    async def _rescan_custom(self) -> None:
        directory = self.runtime.config.tls.certs_dir
        assert directory is not None
        while True:
            await asyncio.sleep(CUSTOM_RESCAN)
            sig = await asyncio.to_thread(_dir_signature, directory)
            if sig == self._custom_sig:
                continue
            self._custom_sig = sig
            self.registry.custom = await asyncio.to_thread(scan_custom_dir, directory, self._chain_dir())
            logger.info(f"tls: reloaded {len(self.registry.custom)} custom certificates from {directory}")
            self.registry.changed()
            self.sync()

    # --- the store --------------------------------------------------------------------

    def _store(self) -> certs.CertStore | None:
        try:
            addon = ctx.master.addons.get("tlsconfig")
        except AttributeError:  # no master (unit tests without taddons)
            return None
        return getattr(addon, "certstore", None) if addon is not None else None

    def sync(self) -> None:
        """Make mitmproxy's store hold our table; cheap when nothing changed."""
        if self._announced_version != self.registry.version:
            self._announced_version = self.registry.version
            for watcher in self.watchers:
                watcher()
        store = self._store()
        if store is None:
            return
        if store is self._installed_into and self._installed_version == self.registry.version:
            return
        table = self.registry.table()
        if store is not self._installed_into:
            # A new store holds what TlsConfig added from the `certs` option, keyed also by that
            # certificate's CN and SANs ("localhost"…): only our table may answer.
            stale = [k for k in store.certs if isinstance(k, str) and k not in table]
        else:
            stale = [k for k in self._installed_names if k not in table]
        for name in stale:
            store.certs.pop(name, None)
        for name, cert in table.items():
            store.certs[name] = cert.entry
        self._installed_names = set(table)
        self._installed_into = store
        self._installed_version = self.registry.version
        self._table = table

    # Before every handshake: TlsConfig may have replaced its store since the last one.
    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        self.sync()

    def tls_start_client(self, data: tls.TlsData) -> None:
        self.sync()

    # --- questions from the request path ---------------------------------------------

    def valid_for(self, host: str) -> LoadedCert | None:
        """The ACME or custom certificate served for `host`, if it is currently valid and covers it."""
        cert = self.registry.choose(host, self._table or self.registry.table())
        if cert is None or cert.source == "default":
            return None
        if not cert.valid_at(datetime.datetime.now(datetime.UTC)) or not cert.covers(host):
            return None
        return cert
