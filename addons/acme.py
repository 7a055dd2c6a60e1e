"""ACME (Let's Encrypt) certificates: which names, orders (HTTP-01, TLS-ALPN-01), storage, renewal.

Names: every non-wildcard host of a container labelled `wakeproxy.acme=true`,
and the names in a container's `LETSENCRYPT_HOST` environment variable
(acme-companion's convention).  Stopped containers count, so a sleeping
sandbox has its certificate before anyone wakes it.  Names are ordered as soon
as a snapshot shows them — not on the first handshake, which would fail.

Challenges: HTTP-01, answered by the proxy itself on the HTTP listener for any
host before routing (nothing is woken).  When `listen.http` is off, TLS-ALPN-01
(RFC 8737) on the HTTPS listener instead: a handshake offering only
`acme-tls/1` for a name with a pending challenge gets the challenge
certificate.  (TLS-ALPN-01 needs the acme library's `TLSALPN01` class: acme
3.x has it, acme 5.x does not.)

One certificate per name.  Everything that blocks (the `acme` library, key
generation, disk) runs in threads; the event loop only schedules, and the
request path only reads a dict (`ChallengeTokens`) and mitmproxy's store.

Renewal: when a third of the lifetime is left, or earlier inside the window
the CA's ARI (`renewalInfo`) suggests.  A failed attempt is logged once with
the CA's problem detail, keeps the old certificate in service, and is retried
with exponential backoff and jitter (1 min → 6 h).  Within one attempt,
`badNonce` is retried at once and 429/5xx after the CA's `Retry-After`
(RFC 8555 §6.5, §6.6); a longer `Retry-After` ends the attempt and sets the
next one.

Storage, under `state_dir/acme/`:

    account.key                         the account's EC P-256 key (0600), created once
    certs/<name>/<serial>/privkey.pem   the certificate's key (0600)
    certs/<name>/<serial>/fullchain.pem leaf + intermediates
    certs/<name>/<serial>/combined.pem  key + chain (0600): the file mitmproxy serves
    certs/<name>/live -> <serial>       switched atomically once all three are written

A restart loads `live` for every name and orders nothing that is still good.

Test-only knob (documented here and in the README, not in the config): the
environment variable `WAKEPROXY_ACME_TEST_BACKOFF` (seconds) replaces the
1-minute first backoff step, so a test can watch a failure and the recovery.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import hashlib
import logging
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from mitmproxy import http, tls
from OpenSSL import SSL, crypto

from .logsafe import get_logger
from .config import AcmeConfig
from .runtime import Runtime
from .tls import CHALLENGE_PREFIX, Certificates, LoadedCert, load_cert, write_private

logger = get_logger(__name__)

RENEW_FRACTION = 1 / 3  # renew when this much of the lifetime is left
BACKOFF_MIN = 60.0
BACKOFF_MAX = 6 * 3600.0
ARI_RECHECK = 6 * 3600.0  # how often a certificate's renewalInfo is asked again
INLINE_RETRY_MAX = 30.0  # a Retry-After up to this long is waited out inside the attempt
REQUEST_RETRIES = 4  # per request, for badNonce / 429 / 5xx
ORDER_TIMEOUT = 90.0
ORDER_WINDOW = 24 * 3600.0  # acme.max_orders_per_group counts orders in this window
TEST_BACKOFF_ENV = "WAKEPROXY_ACME_TEST_BACKOFF"
ACME_TLS_ALPN = b"acme-tls/1"
ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # RFC 8737
_TLSALPN01 = getattr(challenges, "TLSALPN01", None)  # gone in acme 5.x


# --- timing (pure) -------------------------------------------------------------------


def renewal_time(not_before: datetime.datetime, not_after: datetime.datetime) -> datetime.datetime:
    """When a third of the lifetime is left."""
    return not_after - (not_after - not_before) * RENEW_FRACTION


def backoff_delay(failures: int, rng: random.Random, minimum: float = BACKOFF_MIN,
                  maximum: float = BACKOFF_MAX) -> float:
    """Seconds before attempt `failures + 1`: doubling from `minimum` up to `maximum`, ±20 % jitter.

    Jitter keeps many names that failed together (a CA outage) from
    returning together; the result stays inside [minimum, maximum].
    """
    base = min(maximum, minimum * 2 ** max(0, failures - 1))
    return max(minimum, min(maximum, base * rng.uniform(0.8, 1.2)))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) → seconds from now, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def ari_cert_id(cert: x509.Certificate) -> str:
    """The ARI certificate identifier: base64url(AKI keyIdentifier) "." base64url(serial DER)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    if aki is None:
        raise ValueError("certificate has no authority key identifier")
    serial = cert.serial_number
    raw = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # DER INTEGER bytes, with sign octet
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    return f"{b64(aki)}.{b64(raw)}"


def ari_pick(window: Mapping[str, Any], rng: random.Random) -> datetime.datetime:
    """A uniformly random moment inside an ARI `suggestedWindow` ({"start", "end"} RFC 3339)."""
    start = _rfc3339(window["start"])
    end = _rfc3339(window["end"])
    if end <= start:
        return start
    return start + (end - start) * rng.random()


def _rfc3339(value: str) -> datetime.datetime:
    v = value.strip().replace("Z", "+00:00")
    v = re.sub(r"(\.\d{6})\d+", r"\1", v)  # Python parses at most microseconds
    dt = datetime.datetime.fromisoformat(v)
    return dt if dt.tzinfo else dt.replace(tzinfo=datetime.timezone.utc)


# --- HTTP-01 -------------------------------------------------------------------------


def alpn_challenge_cert(name: str, key_authorization: str) -> tuple[crypto.X509, crypto.PKey]:
    """The self-signed TLS-ALPN-01 certificate for `name` (RFC 8737 §3), as pyOpenSSL objects."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    now = datetime.datetime.now(datetime.timezone.utc)
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
        ctx.set_alpn_select_callback(lambda conn, offers: ACME_TLS_ALPN)
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


# --- the ACME protocol (blocking; runs in threads) ------------------------------------


class AcmeFailure(Exception):
    """One failed attempt, phrased for the log and `status()`; `retry_after` from the CA if any."""

    def __init__(self, message: str, retry_after: float | None = None, account_gone: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.account_gone = account_gone


def describe(exc: BaseException) -> str:
    """The CA's problem detail (RFC 7807) where there is one, else the exception's text."""
    if isinstance(exc, messages.Error):
        code = exc.code or (exc.typ or "").rsplit(":", 1)[-1]
        sub = "; ".join(f"{s.identifier.value if s.identifier else ''}: {s.detail}" for s in (exc.subproblems or ()))
        return f"{code}: {exc.detail or exc.title or ''}" + (f" ({sub})" if sub else "")
    if isinstance(exc, errors.ValidationError):
        details = []
        for authzr in exc.failed_authzrs:
            for ch in authzr.body.challenges:
                if ch.error is not None:
                    details.append(f"{authzr.body.identifier.value}: {describe(ch.error)}")
        return "validation failed: " + "; ".join(details)
    if isinstance(exc, errors.IssuanceError):
        return "issuance failed: " + describe(exc.error)
    if isinstance(exc, requests.exceptions.RequestException):
        return f"CA unreachable: {exc.__class__.__name__}: {exc}"
    if isinstance(exc, ValueError) and str(exc).startswith("Requesting "):
        return f"CA unreachable: {exc}"  # acme's rewording of a connection error
    return f"{exc.__class__.__name__}: {exc}"


class RetryingNetwork(client.ClientNetwork):
    """`ClientNetwork` that retries as RFC 8555 asks and remembers the last response.

    badNonce: at once, with a fresh nonce (§6.5).  429 and 5xx: after the
    server's Retry-After when it is short (§6.6); a long one raises
    `AcmeFailure` carrying it, so the scheduler waits at least that long.
    """

    last_response: requests.Response | None = None
    retries = 0  # badNonce / 429 / 5xx retries made by this network object

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_response = response
        return response

    def _retrying(self, call: Any) -> requests.Response:
        for attempt in range(REQUEST_RETRIES + 1):
            self.last_response = None
            try:
                return call()
            except (messages.Error, errors.ClientError) as e:
                resp = self.last_response
                status = resp.status_code if resp is not None else 0
                if isinstance(e, messages.Error) and e.code == "badNonce" and attempt < REQUEST_RETRIES:
                    self._nonces.clear()
                    self.retries += 1
                    continue
                if status == 429 or status >= 500:
                    wait = parse_retry_after(resp.headers.get("Retry-After") if resp is not None else None)
                    if attempt < REQUEST_RETRIES and (wait is None or wait <= INLINE_RETRY_MAX):
                        self.retries += 1
                        time.sleep(wait if wait is not None else min(INLINE_RETRY_MAX, 2.0 ** attempt))
                        continue
                    raise AcmeFailure(describe(e), wait) from e
                raise
        raise AssertionError("unreachable")

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        return self._retrying(lambda: self._post_once(*args, **kwargs))

    def get(self, url: str, content_type: str = client.ClientNetwork.JSON_CONTENT_TYPE,
            **kwargs: Any) -> requests.Response:
        return self._retrying(lambda: super(RetryingNetwork, self).get(url, content_type, **kwargs))


@dataclass
class Issued:
    key_pem: bytes
    fullchain_pem: bytes
    seconds: float
    retries: int = 0  # requests the CA asked us to repeat (badNonce, 429, 5xx)


class AcmeClient:
    """Talks to one ACME directory with one account; every method blocks.

    Several orders may run in parallel threads: each gets its own network
    object (nonces, session); the directory and the account are shared and
    set up once under a lock.
    """

    def __init__(self, cfg: AcmeConfig, storage: CertStorage, tokens: ChallengeTokens,
                 challenge_types: tuple[str, ...] = ("http-01",)) -> None:
        self.cfg = cfg
        self.storage = storage
        self.tokens = tokens
        self.challenge_types = challenge_types  # in order of preference
        self._lock = threading.Lock()
        self._key: jose.JWKEC | None = None
        self._directory: messages.Directory | None = None
        self._account: messages.RegistrationResource | None = None
        self.orders = 0  # orders created since start (tests and status)

    def _network(self) -> RetryingNetwork:
        assert self._key is not None
        verify: bool | str = str(self.cfg.ca_bundle) if self.cfg.ca_bundle else True
        return RetryingNetwork(self._key, account=self._account, alg=jose.ES256, verify_ssl=verify,
                               user_agent="wakeproxy (acme-python)", timeout=30)

    def _session(self) -> client.ClientV2:
        """A client with a registered account, registering it on first use."""
        with self._lock:
            if self._key is None:
                self._key = self.storage.account_key()
            if self._directory is None:
                self._directory = client.ClientV2.get_directory(self.cfg.directory, self._network())
            if self._account is None:
                net = self._network()
                acme = client.ClientV2(self._directory, net)
                eab = None
                if self.cfg.eab_kid and self.cfg.eab_hmac_key:
                    eab = messages.ExternalAccountBinding.from_data(
                        account_public_key=self._key.public_key(), kid=self.cfg.eab_kid,
                        hmac_key=self.cfg.eab_hmac_key, directory=self._directory)
                reg = messages.NewRegistration.from_data(
                    email=self.cfg.email, terms_of_service_agreed=True, external_account_binding=eab)
                try:
                    self._account = acme.new_account(reg)
                    logger.info(f"acme: account registered at {self._account.uri}")
                except errors.ConflictError as e:  # the key already has an account: use it
                    self._account = messages.RegistrationResource(body=messages.Registration(), uri=e.location)
            return client.ClientV2(self._directory, self._network())

    def forget_account(self) -> None:
        with self._lock:
            self._account = None

    def issue(self, name: str) -> Issued:
        """Order, prove (HTTP-01), finalize and download one certificate for `name`."""
        t0 = time.monotonic()
        deadline = t0 + ORDER_TIMEOUT
        try:
            acme = self._session()
            key_pem = new_certificate_key(self.cfg.key_type)
            csr = crypto_util.make_csr(key_pem, [name])
            order = acme.new_order(csr)
            self.orders += 1
            logger.info(f"acme: {name}: order created ({order.uri})")
            tokens: list[str] = []
            alpn_names: list[str] = []
            try:
                for authzr in order.authorizations:
                    if authzr.body.status == messages.STATUS_VALID:
                        continue  # reused authorization: nothing to prove
                    ident = authzr.body.identifier.value
                    chall = self._choose(authzr)
                    if chall is None:
                        raise AcmeFailure(f"the CA offers no {' or '.join(self.challenge_types)} challenge for {ident}")
                    if isinstance(chall.chall, challenges.HTTP01):
                        response, validation = chall.response_and_validation(self._key)
                        token = chall.chall.encode("token")
                        self.tokens.add(token, validation)
                        tokens.append(token)
                    else:
                        response = chall.chall.response(self._key)
                        self.tokens.alpn[ident] = alpn_challenge_cert(ident, response.key_authorization)
                        alpn_names.append(ident)
                    acme.answer_challenge(chall, response)
                    logger.info(f"acme: {ident}: {chall.chall.typ} challenge answered, waiting for the CA")
                self._wait_authorizations(acme, order, deadline)
            finally:
                for token in tokens:
                    self.tokens.remove(token)
                for ident in alpn_names:
                    self.tokens.alpn.pop(ident, None)
            order = acme.begin_finalization(order)
            fullchain = self._wait_certificate(acme, order, deadline)
            return Issued(key_pem, fullchain.encode(), time.monotonic() - t0, acme.net.retries)
        except AcmeFailure:
            raise
        except messages.Error as e:
            raise AcmeFailure(describe(e), account_gone=e.code == "accountDoesNotExist") from e
        except (errors.Error, requests.exceptions.RequestException, ValueError) as e:
            raise AcmeFailure(describe(e)) from e

    def _choose(self, authzr: messages.AuthorizationResource) -> messages.ChallengeBody | None:
        kinds = {"http-01": challenges.HTTP01, "tls-alpn-01": _TLSALPN01}
        for typ in self.challenge_types:
            cls = kinds.get(typ)
            found = next((c for c in authzr.body.challenges if cls is not None and isinstance(c.chall, cls)), None)
            if found is not None:
                return found
        return None

    def _post_as_get(self, acme: client.ClientV2, url: str) -> requests.Response:
        return acme.net.post(url, None, new_nonce_url=acme.directory["newNonce"])

    @staticmethod
    def _pause(response: requests.Response, step: float, deadline: float) -> float:
        wait = parse_retry_after(response.headers.get("Retry-After"))
        wait = step if wait is None else min(wait, 10.0)
        if time.monotonic() + wait > deadline:
            raise AcmeFailure("the CA did not finish the order in time")
        time.sleep(wait)
        return min(step * 2, 2.0)

    def _wait_authorizations(self, acme: client.ClientV2, order: messages.OrderResource, deadline: float) -> None:
        for authzr in order.authorizations:
            step = 0.1
            while True:
                authzr, response = acme.poll(authzr)
                status = authzr.body.status
                if status == messages.STATUS_VALID:
                    break
                if status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                    raise errors.ValidationError([authzr])
                step = self._pause(response, step, deadline)

    def _wait_certificate(self, acme: client.ClientV2, order: messages.OrderResource, deadline: float) -> str:
        step = 0.1
        while True:
            response = self._post_as_get(acme, order.uri)
            body = messages.Order.from_json(response.json())
            if body.status == messages.STATUS_INVALID:
                raise errors.IssuanceError(body.error) if body.error else AcmeFailure("the order became invalid")
            if body.status == messages.STATUS_VALID and body.certificate:
                return self._post_as_get(acme, body.certificate).text
            step = self._pause(response, step, deadline)

    def renewal_window(self, cert: LoadedCert) -> Mapping[str, Any] | None:
        """The CA's ARI suggested window for `cert`, or None when the CA offers no ARI."""
        self._session_directory()
        assert self._directory is not None
        url = self._directory.to_partial_json().get("renewalInfo")
        if not url:
            return None
        resp = self._network().get(f"{url.rstrip('/')}/{ari_cert_id(cert.leaf)}")
        return resp.json().get("suggestedWindow")

    def _session_directory(self) -> None:
        with self._lock:
            if self._key is None:
                self._key = self.storage.account_key()
            if self._directory is None:
                self._directory = client.ClientV2.get_directory(self.cfg.directory, self._network())


# --- scheduling (event loop) ---------------------------------------------------------


@dataclass
class NameState:
    """What we know and plan for one name; `status()` shows it."""

    name: str
    container: str = ""
    group: str = ""
    cert: LoadedCert | None = None
    renew_at: datetime.datetime | None = None
    ari_checked: float = 0.0  # monotonic
    failures: int = 0
    next_attempt: float = 0.0  # wall clock; 0 = as soon as due
    last_error: str | None = None
    busy: bool = False
    phase: str = "pending"  # pending | ordering | valid | failed
    history: list[float] = field(default_factory=list)  # issuance seconds

    def due(self, now: float) -> float:
        """Wall-clock time of the next attempt."""
        if self.failures:
            return self.next_attempt
        if self.cert is None:
            return now
        assert self.renew_at is not None
        return self.renew_at.timestamp()

    def as_dict(self) -> dict[str, Any]:
        state = self.phase
        if self.phase != "ordering" and self.cert is not None:
            now = datetime.datetime.now(datetime.timezone.utc)
            state = "valid" if self.cert.valid_at(now) else "expired"
            if self.failures:
                state += " (renewal failing)"
        iso = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()  # noqa: E731
        next_attempt = self.due(time.time()) if not self.busy else None
        return {
            "state": state,
            "container": self.container,
            "not_after": self.cert.not_after.isoformat() if self.cert else None,
            "renew_at": self.renew_at.isoformat() if self.renew_at else None,
            "last_error": self.last_error,
            "failures": self.failures,
            "next_attempt": iso(next_attempt) if next_attempt else None,
            "last_issuance_seconds": round(self.history[-1], 3) if self.history else None,
        }


class AcmeManager:
    """The ACME addon: answers HTTP-01 challenges, orders and renews certificates."""

    def __init__(self, runtime: Runtime, certificates: Certificates) -> None:
        self.runtime = runtime
        self.certificates = certificates
        self.tokens = ChallengeTokens()
        self.states: dict[str, NameState] = {}
        self.client: AcmeClient | None = None
        self._orders: dict[str, list[float]] = {}  # group → times of its orders in the last 24 h
        self._capped: set[str] = set()  # groups whose cap was logged in the current window
        self._kick: asyncio.Event | None = None
        self._sem: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()
        self._backoff_min = BACKOFF_MIN

    @property
    def enabled(self) -> bool:
        return self.runtime.config.acme.enabled

    # --- hooks --------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """HTTP-01 answers come first: for any host, asleep or unknown, before routing."""
        if flow.response is None and len(self.tokens):
            self.tokens.answer(flow)

    def tls_start_client(self, data: tls.TlsData) -> None:
        """TLS-ALPN-01: take over a validation handshake (TlsConfig would refuse `acme-tls/1`).

        Runs after TlsConfig in the lean master (its connection is replaced
        before any byte is read) and before it under mitmdump (it then skips).
        """
        if self.tokens.alpn:
            conn = self.tokens.alpn_connection(data)
            if conn is not None:
                data.ssl_conn = conn

    def running(self) -> None:
        if not self.enabled:
            return
        config = self.runtime.config
        kinds: tuple[str, ...] = ("http-01", "tls-alpn-01") if config.listen.http else ("tls-alpn-01",)
        if config.listen.http is None and _TLSALPN01 is None:
            logger.warning("acme: listen.http is off and this acme library has no TLS-ALPN-01: "
                           "orders will fail unless another proxy forwards port 80")
        test_backoff = os.environ.get(TEST_BACKOFF_ENV)
        if test_backoff:
            self._backoff_min = float(test_backoff)
            logger.warning(f"acme: {TEST_BACKOFF_ENV}={test_backoff}: test-only backoff in effect")
        if not config.names.allow:
            logger.warning("acme: names.allow is empty, so a label may get a certificate ordered for any name "
                           "nobody else owns; on a shared server list your domains in names.allow")
        self.client = AcmeClient(config.acme, CertStorage(config.state_dir), self.tokens, kinds)
        self._kick = asyncio.Event()
        self._sem = asyncio.Semaphore(config.acme.concurrency)
        self._spawn(self._main())

    def done(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a CA problem (those are handled per attempt): make it visible.
            logger.error("acme: internal error, certificates are no longer managed", exc_info=task.exception())

    # --- the loop -----------------------------------------------------------------------

    async def _main(self) -> None:
        assert self.client is not None
        stored = await asyncio.to_thread(self.client.storage.load_all)
        for name, cert in stored.items():
            st = self.states.setdefault(name, NameState(name))
            self._installed(st, cert)
        if stored:
            logger.info(f"acme: {len(stored)} stored certificates loaded")
        self._spawn(self._follow_snapshots())
        await self._schedule()

    async def _follow_snapshots(self) -> None:
        assert self._kick is not None
        while True:
            self._apply_snapshot()
            await self.runtime.changed(60.0)

    def _apply_snapshot(self) -> None:
        """The names to manage: those the snapshot says a group owns and wants a certificate for."""
        assert self._kick is not None
        wanted = self.runtime.snapshot.acme
        new = [n for n in wanted if n not in self.states or not self.states[n].container]
        for name, (container, group) in wanted.items():
            st = self.states.setdefault(name, NameState(name))
            st.container, st.group = container, group
        for name, st in self.states.items():
            if name not in wanted:
                st.container = ""  # keep serving what we have; stop renewing
        if new:
            logger.debug(f"acme: names wanted: {', '.join(new)}")
            self._kick.set()

    async def _schedule(self) -> None:
        assert self._kick is not None
        while True:
            now = time.time()
            wake_at = now + 3600.0
            for st in list(self.states.values()):
                if not st.container or st.busy or not self.runtime.manage:
                    continue  # (a debugging copy serves the stored certificates and orders nothing)
                due = max(st.due(now), self._order_allowed_at(st.group, now))
                if due <= now:
                    st.busy = True
                    self._orders.setdefault(st.group, []).append(now)
                    self._spawn(self._attempt(st))
                else:
                    wake_at = min(wake_at, due)
                if st.cert is not None and not st.failures and time.monotonic() - st.ari_checked > ARI_RECHECK:
                    st.ari_checked = time.monotonic()
                    self._spawn(self._check_ari(st))
            self._kick.clear()
            try:
                await asyncio.wait_for(self._kick.wait(), max(0.05, wake_at - time.time()))
            except asyncio.TimeoutError:
                pass

    def _order_allowed_at(self, group: str, now: float) -> float:
        """When `group` may cause its next order: at most acme.max_orders_per_group per 24 hours,
        so one sandbox cannot spend the CA's rate limits that every other sandbox shares."""
        times = [t for t in self._orders.get(group, ()) if t > now - ORDER_WINDOW]
        self._orders[group] = times
        cap = self.runtime.config.acme.max_orders_per_group
        if len(times) < cap:
            self._capped.discard(group)
            return now
        if group not in self._capped:
            self._capped.add(group)
            logger.warning(f"acme: group '{group}' made {len(times)} orders in 24 h "
                           f"(acme.max_orders_per_group); its next order waits until "
                           f"{datetime.datetime.fromtimestamp(times[0] + ORDER_WINDOW, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
        return times[0] + ORDER_WINDOW

    async def _attempt(self, st: NameState) -> None:
        assert self.client is not None and self._sem is not None and self._kick is not None
        try:
            async with self._sem:
                st.phase = "ordering"
                what = "renewing" if st.cert is not None else "ordering"
                logger.info(f"acme: {st.name}: {what} a certificate (for container '{st.container}')")
                try:
                    issued = await asyncio.to_thread(self.client.issue, st.name)
                    path = await asyncio.to_thread(self.client.storage.save, st.name, issued.key_pem,
                                                   issued.fullchain_pem)
                    cert = await asyncio.to_thread(load_cert, path, None, "acme")
                except AcmeFailure as e:
                    self._failed(st, str(e), e.retry_after)
                    if e.account_gone:
                        self.client.forget_account()
                except Exception as e:  # noqa: BLE001 - one name's failure must not stop the others
                    self._failed(st, describe(e), None)
                else:
                    st.failures, st.last_error, st.next_attempt = 0, None, 0.0
                    st.history.append(issued.seconds)
                    self._installed(st, cert)
                    n = issued.retries
                    retried = f", {n} request{'s' if n != 1 else ''} retried" if n else ""
                    logger.info(f"acme: {st.name}: certificate issued in {issued.seconds:.2f} s "
                                f"(serial {cert.serial:x}, valid until {cert.not_after:%Y-%m-%d %H:%M:%S} UTC, "
                                f"renewal at {st.renew_at:%Y-%m-%d %H:%M:%S} UTC{retried})")
        finally:
            st.busy = False
            self._kick.set()

    def _installed(self, st: NameState, cert: LoadedCert) -> None:
        st.cert = cert
        st.phase = "valid"
        st.renew_at = renewal_time(cert.not_before, cert.not_after)
        st.ari_checked = 0.0
        self.certificates.set_acme(st.name, cert)

    def _failed(self, st: NameState, message: str, retry_after: float | None) -> None:
        st.failures += 1
        delay = backoff_delay(st.failures, self._rng, self._backoff_min, max(BACKOFF_MAX, self._backoff_min))
        if retry_after is not None:
            delay = max(delay, retry_after)
        st.next_attempt = time.time() + delay
        st.last_error = message
        st.phase = "failed" if st.cert is None else "valid"
        keep = " (the current certificate stays in service)" if st.cert is not None else ""
        logger.warning(f"acme: {st.name}: attempt {st.failures} failed: {message}; "
                       f"next attempt in {_human(delay)}{keep}")

    async def _check_ari(self, st: NameState) -> None:
        assert self.client is not None and self._kick is not None
        cert = st.cert
        if cert is None:
            return
        try:
            window = await asyncio.to_thread(self.client.renewal_window, cert)
        except Exception as e:  # noqa: BLE001 - ARI is advice; our own schedule stands
            logger.debug(f"acme: {st.name}: renewalInfo unavailable: {describe(e)}")
            return
        if window and st.cert is cert and st.renew_at is not None:
            suggested = ari_pick(window, self._rng)
            if suggested < st.renew_at:
                st.renew_at = suggested
                logger.info(f"acme: {st.name}: the CA suggests renewal at {suggested:%Y-%m-%d %H:%M:%S} UTC")
                self._kick.set()

    # --- for `wakeproxy status` and tests ------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        """Per name: state, not_after, last_error, next_attempt (JSON-able)."""
        return {name: st.as_dict() for name, st in sorted(self.states.items())}


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
