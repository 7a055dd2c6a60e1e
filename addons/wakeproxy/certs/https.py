"""HTTPS policy: plain HTTP → 308 to https for hosts with a real certificate; HSTS on HTTPS answers."""

from __future__ import annotations

from mitmproxy import http

from wakeproxy.certs.store import Certificates
from wakeproxy.routing.hostnames import normalize_host
from wakeproxy.runtime import Runtime

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


class HttpsPolicy:
    """Plain HTTP → 308 https for hosts with a real certificate; HSTS on HTTPS answers.

    The self-signed default certificate never triggers either: sending a
    browser to https:// for a name we cannot prove would lock its users out.
    """

    def __init__(self, runtime: Runtime, certificates: Certificates) -> None:
        self.runtime = runtime
        self.certificates = certificates

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.client_conn.tls_established:
            return
        config = self.runtime.config
        if not config.tls.redirect or config.listen.https is None:
            return
        req = flow.request
        if req.path.startswith(CHALLENGE_PREFIX):
            return
        host = normalize_host(req.host_header or "")
        if not host or self.runtime.snapshot.lookup(host) is None:
            return  # no site: its 404 (or the default host) over plain HTTP too, as a visitor typed it
        if self.certificates.valid_for(host) is None or self._opted_out(host):
            return
        port = config.listen.https.port
        authority = host if port == 443 else f"{host}:{port}"
        location = f"https://{authority}{req.path}"
        flow.response = http.Response.make(
            308, b"", {"Location": location, "Content-Length": "0", "Cache-Control": "no-store"})

    def _opted_out(self, host: str) -> bool:
        """Did the host's owner turn the redirect off (wakeproxy.https-redirect=false, where trusted)?"""
        snapshot = self.runtime.snapshot
        if not snapshot.no_redirect:
            return False
        site = snapshot.lookup(host)
        return site is not None and site.host in snapshot.no_redirect

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        max_age = int(self.runtime.config.tls.hsts)
        if max_age <= 0 or flow.response is None or not flow.client_conn.tls_established:
            return
        host = normalize_host(flow.request.host_header or flow.client_conn.sni or "")
        if host and self.certificates.valid_for(host) is not None:
            flow.response.headers["Strict-Transport-Security"] = f"max-age={max_age}"

    def response(self, flow: http.HTTPFlow) -> None:
        # Answers made by addons (error pages, the waking page) skip `responseheaders`.
        if flow.response is not None and "strict-transport-security" not in flow.response.headers:
            self.responseheaders(flow)
