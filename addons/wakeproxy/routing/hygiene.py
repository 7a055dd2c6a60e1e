"""Strict HTTP in, clean HTTP out: the first `requestheaders` hook of every request.

A malformed request gets our page (400, or 431 for too many header bytes) and never reaches
a backend: CR, LF or NUL in a header name or value, the method, the path or an HTTP/2
pseudo-header (mitmproxy's HTTP/1 reader joins obs-fold continuation lines with CRLF into
the value, so folded headers are caught by the same test); header names that are not
RFC 9110 tokens; a Host / `:authority` that is not `hostname[:port]`; two Host headers; an
HTTP/1.1 request without Host (RFC 9112 §3.2); an absolute-form target whose authority is
not the Host header's.

What is forwarded loses every header meant for this hop or that a backend would take for
ours: `Proxy` (httpoxy), the hop-by-hop headers (Connection, Keep-Alive, Proxy-Connection,
Proxy-Authorization, Proxy-Authenticate, TE, Trailer, Upgrade unless the request is a
WebSocket handshake), every header named in `Connection`, and names that a CGI/PHP backend
reads as one of the forwarded headers once `_` is turned into `-` (`X_Forwarded_For`,
`X-Real_IP`). Transfer-Encoding and Content-Length stay: mitmproxy frames the body with
them. `Connection` itself keeps only `close` / `keep-alive` (mitmproxy reads them for the
connection's fate) and `upgrade` for a WebSocket handshake.

The cost on the hot path is a loop over the header fields with `in` and `bytes.translate`
checks against precomputed tables; nothing is echoed beyond `pages.bounded`.
"""

from __future__ import annotations

import functools

from mitmproxy import ctx, http

from wakeproxy import pages
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.hostnames import normalize_host, parse_authority
from wakeproxy.runtime import Runtime

logger = get_logger(__name__)

# RFC 9110 §5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~"
# / DIGIT / ALPHA. `name.translate(None, _TCHAR)` is empty exactly when `name` is a token.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Control characters and space: never in a request target (and not in the method: it is a token).
_CTL_SP = bytes(range(0x21)) + b"\x7f"

_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
    b"te", b"trailer", b"upgrade", b"proxy",
})
# Never removed, even when Connection names them: mitmproxy frames the body with the first two,
# routing needs Host.
_NEVER_NAMED = frozenset({b"transfer-encoding", b"content-length", b"host"})
# Names a backend would read as ours once "_" is "-" (CGI turns both into HTTP_X_FORWARDED_FOR).
_OURS = frozenset({b"x-real-ip", b"forwarded", b"proxy", b"x-forwarded-for", b"x-forwarded-proto",
                   b"x-forwarded-host", b"x-forwarded-port"})
_CONNECTION_ONLY = frozenset({b"connection"})
_PLAIN_TOKENS = frozenset({b"keep-alive", b"close"})
_PSEUDO_CHECKED = ("scheme", "authority")  # (the method is a token, the path has no CTL: checked below)
DEFAULT_MAX_HEADER_BYTES = 32768


def _show(raw: bytes, limit: int = 40) -> str:
    """A header name as a page may name it: printable ASCII only, bounded."""
    text = raw.decode("latin-1")
    return pages.bounded("".join(c if " " < c < "\x7f" else "?" for c in text), limit)


class Rejection(Exception):
    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


# Validated Host values repeat: remember a bounded number of verdicts.
_authority = functools.lru_cache(maxsize=4096)(parse_authority)
_BAD_VALUE_BYTES = (b"\r", b"\n", b"\0")


def valid_authority(value: bytes) -> bool:
    """Is `value` (a Host header or `:authority`) `hostname[:port]`?"""
    return _authority(value.decode("latin-1")) is not None


def _bad_header(fields: tuple[tuple[bytes, bytes], ...]) -> Rejection:
    """The slow path: which header is wrong, for the page."""
    for name, value in fields:
        if not name or name.translate(None, _TCHAR):
            return Rejection(400, "Bad request", f"A header name is not a token: '{_show(name)}'.")
        if any(b in value for b in _BAD_VALUE_BYTES):
            return Rejection(400, "Bad request",
                             f"The header '{_show(name)}' contains CR, LF or NUL (or is folded over lines).")
    return Rejection(400, "Bad request", "A header is malformed.")  # pragma: no cover


def check(request: http.Request, max_header_bytes: int) -> list[bytes]:
    """Raise Rejection when `request` must not be forwarded; return the lower-case header names.

    The headers are checked as two joined blobs (names, values) with C-level `translate`,
    `in` and `count`: no Python work per header on the good path."""
    data = request.data
    method = data.method
    if not method or method.translate(None, _TCHAR):
        raise Rejection(400, "Bad request", "The request method is not a token.")
    for name in _PSEUDO_CHECKED:
        value: bytes = getattr(data, name)
        if b"\r" in value or b"\n" in value or b"\0" in value:
            raise Rejection(400, "Bad request", f"The request {name} contains CR, LF or NUL.")
    path = data.path
    if path.translate(None, _CTL_SP) != path:
        raise Rejection(400, "Bad request", "The request target contains control characters or spaces.")
    fields = data.headers.fields
    names = b"\n".join([f[0] for f in fields])
    values = b"\n".join([f[1] for f in fields])
    count = len(fields)
    if not count:
        names = values = b""
    # Names: tokens only, so what is left after deleting every tchar is the count-1 separators.
    if names.translate(None, _TCHAR) != b"\n" * (count - 1) or (count and not all([f[0] for f in fields])):
        raise _bad_header(fields)
    if (count and values.count(b"\n") != count - 1) or b"\r" in values or b"\0" in values:
        raise _bad_header(fields)
    if len(method) + len(path) + len(data.authority) + len(names) + len(values) + 4 * count > max_header_bytes:
        raise Rejection(431, "Request header fields too large",
                        "The request line and headers are longer than this server accepts.")
    lower = names.lower().split(b"\n") if count else []
    hosts = lower.count(b"host")
    if hosts > 1:
        raise Rejection(400, "Bad request", "The request has more than one Host header.")
    host_value = fields[lower.index(b"host")][1] if hosts else b""
    authority = data.authority
    if request.is_http2 or request.is_http3:
        if authority and hosts and normalize_host(authority.decode("latin-1")) != \
                normalize_host(host_value.decode("latin-1")):
            raise Rejection(400, "Bad request", "The :authority and Host of the request disagree.")
        host = authority or host_value
        if not host:
            raise Rejection(400, "Bad request", "The request has neither :authority nor Host.")
    else:
        if not hosts and data.http_version != b"HTTP/1.0":
            raise Rejection(400, "Bad request", "An HTTP/1.1 request needs a Host header.")
        host = host_value
        if authority and method != b"CONNECT":
            # absolute-form (GET http://a.test/ HTTP/1.1): its authority must be the Host's.
            target = _authority(authority.decode("latin-1"))
            if target is None or not hosts or target[0] != (_authority(host.decode("latin-1")) or ("",))[0]:
                raise Rejection(400, "Bad request", "The request target's host is not the Host header's.")
    if host and _authority(host.decode("latin-1")) is None:
        raise Rejection(400, "Bad request", "The Host header is not a hostname with an optional port.")
    return lower


def _looks_like_ours(lname: bytes) -> bool:
    """`x_forwarded_for`, `X-Real_IP`: a CGI/PHP backend reads them as the headers we set."""
    if b"_" not in lname:
        return False
    alias = lname.replace(b"_", b"-")
    return alias in _OURS or alias.startswith(b"x-forwarded-")


def clean(request: http.Request, lower: list[bytes] | None = None) -> None:
    """Remove hop-by-hop headers, headers named in Connection, and look-alikes of ours.

    `lower`: the lower-case header names, as `check` returns them."""
    fields = request.data.headers.fields
    if lower is None:
        lower = [f[0].lower() for f in fields]
    hop = _HOP_BY_HOP.intersection(lower)
    underscore = b"_" in b"".join(lower)
    if not underscore and (not hop or (hop == _CONNECTION_ONLY and lower.count(b"connection") == 1 and all(
            t.strip() in _PLAIN_TOKENS for t in fields[lower.index(b"connection")][1].lower().split(b",")))):
        return  # the common cases: nothing to remove, or only `Connection: keep-alive` / `close`
    tokens: set[bytes] = set()
    upgrade_websocket = False
    for name, value in fields:
        lname = name.lower()
        if lname == b"connection":
            tokens.update(t.strip() for t in value.lower().split(b","))
        elif lname == b"upgrade" and b"websocket" in value.lower():
            upgrade_websocket = True
    websocket = upgrade_websocket and b"upgrade" in tokens
    named = {t for t in tokens if t and t not in _NEVER_NAMED}
    out: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        lname = name.lower()
        if lname == b"connection":
            continue  # rebuilt below
        keep = (websocket and lname == b"upgrade") or (
            lname == b"te" and value.strip().lower() == b"trailers" and lname not in named
        ) or not (lname in _HOP_BY_HOP or lname in named or _looks_like_ours(lname))
        if keep:
            out.append((name, value))
    kept = [t for t in (b"close", b"keep-alive") if t in tokens] + ([b"upgrade"] if websocket else [])
    if kept:
        out.append((b"Connection", b", ".join(kept)))
    request.data.headers.fields = tuple(out)


class Hygiene:
    """Rejects malformed requests before any other addon sees them; cleans what is forwarded."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.max_header_bytes = DEFAULT_MAX_HEADER_BYTES

    def configure(self, updated: set[str]) -> None:
        if "wakeproxy_config" in updated and ctx.options.wakeproxy_config:
            self.max_header_bytes = self.runtime.config.limits.max_header_bytes

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        request = flow.request
        try:
            lower = check(request, self.max_header_bytes)
        except Rejection as r:
            flow.response = self._reject(flow, r)
            flow.metadata["wakeproxy.rejected"] = r.status
            return
        clean(request, lower)

    def _reject(self, flow: http.HTTPFlow, r: Rejection) -> http.Response:
        request = flow.request
        logger.debug(f"{r.status}: {r.message}")
        resp = pages.error_response(request, r.status, r.title, r.message,
                                    "Fix the client: this request is never forwarded.", "")
        if not (request.is_http2 or request.is_http3):
            resp.headers["Connection"] = "close"  # the stream may be out of step: do not read another
        return resp
