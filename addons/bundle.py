"""The list of our addons, in hook order, sharing one Runtime."""

from __future__ import annotations

from typing import Any

from . import earlyanswer, errorpages, h2reuse, headbound
from .acme import AcmeManager
from .core import WakeProxy
from .hygiene import Hygiene
from .router import Router
from .idle import IdleKeeper
from .limits import ConnectionLimits
from .runtime import Runtime
from .status import StatusServer
from .tls import Certificates, HttpsPolicy
from .upstream import Upstream
from .waker import Waker


def make_addons(runtime: Runtime | None = None) -> list[Any]:
    h2reuse.install()  # HTTP/2 clients reuse idle HTTP/1.1 upstream connections (idempotent)
    headbound.install()  # at most max_header_bytes buffered of an unfinished HTTP/1 request head
    errorpages.install()  # our page, not mitmproxy's, when a backend fails
    earlyanswer.install()  # an answer set in requestheaders for a request with a body over 1 MB
    runtime = runtime or Runtime()
    waker = Waker(runtime)
    idle = IdleKeeper(runtime, waker)
    # TLS before routing: certificates, ACME challenge answers, then the https redirect.
    certificates = Certificates(runtime)
    acme = AcmeManager(runtime, certificates)
    tls_addons = [certificates, acme, HttpsPolicy(runtime, certificates)]
    status = StatusServer(runtime, waker, idle, extra={"certificates": acme.status})
    # Hygiene right after the config: its requestheaders runs before every other addon's.
    return [WakeProxy(runtime), Hygiene(runtime), ConnectionLimits(runtime), *tls_addons, waker,
            Router(runtime, waker), idle, status, Upstream(runtime, waker), errorpages.UpstreamErrors(runtime)]
