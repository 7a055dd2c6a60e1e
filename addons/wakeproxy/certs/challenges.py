"""Answers to pending ACME challenges, on the request path: HTTP-01 tokens and TLS-ALPN-01 certificates.

The ACME client (`certs.acme`, in the controller) adds and removes challenges; this module only
answers them, so a serving worker, which has no ACME account, imports nothing from `certs.acme`.
In one process the client writes into the same `ChallengeTokens`; under the `wakeproxy` command the
controller pushes them to the workers (`planes`), which install them with `replace`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mitmproxy import http, tls
from OpenSSL import SSL, crypto

from wakeproxy.certs.https import CHALLENGE_PREFIX
from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

ACME_TLS_ALPN = b"acme-tls/1"


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
        # Called (from whichever thread changed them) after every change: the controller pushes them on.
        self.listener: Callable[[], None] | None = None

    def _changed(self) -> None:
        if self.listener is not None:
            self.listener()

    def add(self, token: str, key_authorization: str) -> None:
        self._tokens[token] = key_authorization
        self._changed()

    def remove(self, token: str) -> None:
        self._tokens.pop(token, None)
        self._changed()

    def add_alpn(self, name: str, pair: tuple[crypto.X509, crypto.PKey]) -> None:
        self.alpn[name] = pair
        self._changed()

    def remove_alpn(self, name: str) -> None:
        self.alpn.pop(name, None)
        self._changed()

    # --- as plain data, for the channel to the workers -----------------------------------

    def export(self) -> dict[str, Any]:
        alpn = {name: [crypto.dump_certificate(crypto.FILETYPE_PEM, c), crypto.dump_privatekey(crypto.FILETYPE_PEM, k)]
                for name, (c, k) in list(self.alpn.items())}
        return {"http": dict(self._tokens), "alpn": alpn}

    def replace(self, data: dict[str, Any]) -> None:
        """Install what `export` gave (a worker, on every push from the controller)."""
        tokens = {str(k): str(v) for k, v in dict(data.get("http") or {}).items()}
        alpn = {}
        for name, (cert, key) in dict(data.get("alpn") or {}).items():
            alpn[str(name)] = (crypto.load_certificate(crypto.FILETYPE_PEM, cert),
                               crypto.load_privatekey(crypto.FILETYPE_PEM, key))
        self._tokens, self.alpn = tokens, alpn

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




class ChallengeAnswers:
    """The addon: HTTP-01 answers before routing (for any host, asleep or unknown), and TLS-ALPN-01
    validation handshakes taken over (TlsConfig would refuse `acme-tls/1`)."""

    def __init__(self, tokens: ChallengeTokens) -> None:
        self.tokens = tokens

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and len(self.tokens):
            self.tokens.answer(flow)

    def tls_start_client(self, data: tls.TlsData) -> None:
        """Runs after TlsConfig in the lean master (its connection is replaced before any byte is
        read) and before it under mitmdump (it then skips)."""
        if self.tokens.alpn:
            conn = self.tokens.alpn_connection(data)
            if conn is not None:
                data.ssl_conn = conn
