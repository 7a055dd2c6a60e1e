"""The list of our addons, in hook order, sharing one Runtime."""

from __future__ import annotations

from typing import Any

from wakeproxy.certs.acme.manager import AcmeManager
from wakeproxy.certs.challenges import ChallengeAnswers, ChallengeTokens
from wakeproxy.certs.https import HttpsPolicy
from wakeproxy.certs.store import Certificates
from wakeproxy.core import WakeProxy
from wakeproxy.mitm import earlyanswer, errorpages, h2reuse, headbound
from wakeproxy.mitm.limits import ConnectionLimits
from wakeproxy.mitm.upstream import Upstream
from wakeproxy.observe.status import StatusServer
from wakeproxy.routing.hygiene import Hygiene
from wakeproxy.routing.router import Router
from wakeproxy.runtime import Runtime
from wakeproxy.wake.idle import IdleKeeper
from wakeproxy.wake.waker import Waker


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
    tokens = ChallengeTokens()
    acme = AcmeManager(runtime, certificates, tokens)
    tls_addons = [certificates, ChallengeAnswers(tokens), acme, HttpsPolicy(runtime, certificates)]
    status = StatusServer(runtime, waker, idle, extra={"certificates": acme.status})
    # Hygiene right after the config: its requestheaders runs before every other addon's.
    return [WakeProxy(runtime), Hygiene(runtime), ConnectionLimits(runtime), *tls_addons, waker,
            Router(runtime, waker), idle, status, Upstream(runtime, waker), errorpages.UpstreamErrors(runtime)]
