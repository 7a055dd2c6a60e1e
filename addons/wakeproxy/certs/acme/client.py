"""ACME: client (see the package docstring)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages

from wakeproxy.certs.acme.challenges import ChallengeTokens, alpn_challenge_cert
from wakeproxy.certs.acme.storage import CertStorage, new_certificate_key
from wakeproxy.certs.acme.timing import ari_cert_id, parse_retry_after
from wakeproxy.certs.store import LoadedCert
from wakeproxy.config import AcmeConfig
from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

INLINE_RETRY_MAX = 30.0  # a Retry-After up to this long is waited out inside the attempt
REQUEST_RETRIES = 4  # per request, for badNonce / 429 / 5xx
ORDER_TIMEOUT = 90.0
_TLSALPN01 = getattr(challenges, "TLSALPN01", None)  # gone in acme 5.x




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
        # The library types verify_ssl as bool; requests (which it hands it to) also takes a CA bundle path.
        return RetryingNetwork(self._key, account=self._account, alg=jose.ES256, verify_ssl=verify,  # type: ignore[arg-type]
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
                        self.tokens.add_alpn(ident, alpn_challenge_cert(ident, response.key_authorization))
                        alpn_names.append(ident)
                    acme.answer_challenge(chall, response)
                    logger.info(f"acme: {ident}: {chall.chall.typ} challenge answered, waiting for the CA")
                self._wait_authorizations(acme, order, deadline)
            finally:
                for token in tokens:
                    self.tokens.remove(token)
                for ident in alpn_names:
                    self.tokens.remove_alpn(ident)
            order = acme.begin_finalization(order)
            fullchain = self._wait_certificate(acme, order, deadline)
            net = acme.net
            return Issued(key_pem, fullchain.encode(), time.monotonic() - t0,
                          net.retries if isinstance(net, RetryingNetwork) else 0)
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


