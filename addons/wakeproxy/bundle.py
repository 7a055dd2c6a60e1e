"""The lists of our addons, in hook order, sharing one Runtime.

`make_addons`: everything in one process (mitmdump/mitmweb -s, and `workers: 0`).
`make_controller_addons`: the `wakeproxy` command's controller (Docker, ACME, wake and idle
decisions, status; no proxy listener). `make_worker_addons`: a serving worker (the request path;
no Docker, no ACME account), which imports nothing from `docker/` or `certs/acme/`.
"""

from __future__ import annotations

from typing import Any

from wakeproxy.certs.challenges import ChallengeAnswers, ChallengeTokens
from wakeproxy.certs.https import HttpsPolicy
from wakeproxy.certs.store import Certificates
from wakeproxy.core import WakeProxy
from wakeproxy.debug.ui import DebugUI
from wakeproxy.mitm import earlyanswer, errorpages, h2reuse, headbound
from wakeproxy.mitm.limits import ConnectionLimits
from wakeproxy.mitm.upstream import Upstream
from wakeproxy.observe.access import AccessLog
from wakeproxy.observe.metrics import Metrics, RequestMetrics
from wakeproxy.routing.hygiene import Hygiene
from wakeproxy.routing.router import Router
from wakeproxy.runtime import Runtime
from wakeproxy.wake.idle import IdleKeeper
from wakeproxy.wake.waker import Waker


def _install_adaptations() -> None:
    h2reuse.install()  # HTTP/2 clients reuse idle HTTP/1.1 upstream connections (idempotent)
    headbound.install()  # at most max_header_bytes buffered of an unfinished HTTP/1 request head
    errorpages.install()  # our page, not mitmproxy's, when a backend fails
    earlyanswer.install()  # an answer set in requestheaders for a request with a body over 1 MB


def make_addons(runtime: Runtime | None = None) -> list[Any]:
    from wakeproxy.certs.acme.manager import AcmeManager
    from wakeproxy.observe.status import StatusServer

    _install_adaptations()
    runtime = runtime or Runtime()
    waker = Waker(runtime)
    idle = IdleKeeper(runtime, waker)
    # TLS before routing: certificates, ACME challenge answers, then the https redirect.
    certificates = Certificates(runtime)
    tokens = ChallengeTokens()
    acme = AcmeManager(runtime, certificates, tokens)
    tls_addons = [certificates, ChallengeAnswers(tokens), acme, HttpsPolicy(runtime, certificates)]
    core = WakeProxy(runtime)
    debug = DebugUI(runtime)
    status = StatusServer(runtime, waker, idle, extra={"certificates": acme.status, "container": core.container_status,
                                                       "debug": debug.status})
    requests = RequestMetrics()
    metrics = Metrics(runtime, status, waker.core, idle, certificates, core, acme, requests=requests)
    # The request metrics first: a request's clock starts before the router may hold it for a wake (an
    # addon's async hook delays every later addon's). Hygiene next: its requestheaders runs before the
    # rest's.
    return [core, requests, Hygiene(runtime), ConnectionLimits(runtime), *tls_addons, waker,
            Router(runtime, waker), idle, status, Upstream(runtime, waker), errorpages.UpstreamErrors(runtime),
            metrics, AccessLog(runtime), debug]


def make_controller_addons(runtime: Runtime | None = None) -> list[Any]:
    from wakeproxy.certs.acme.manager import AcmeManager
    from wakeproxy.observe.status import StatusServer
    from wakeproxy.planes.controller import ControllerPlane

    runtime = runtime or Runtime()
    waker = Waker(runtime)  # here only the owner of the orchestrator: no request reaches the controller
    idle = IdleKeeper(runtime, waker)
    certificates = Certificates(runtime)
    tokens = ChallengeTokens()
    acme = AcmeManager(runtime, certificates, tokens)
    plane = ControllerPlane(runtime, waker.core, idle, certificates, tokens)
    core = WakeProxy(runtime, announce="controller ready")
    debug = DebugUI(runtime)
    debug.watchers.append(plane.watch_changed)
    status = StatusServer(runtime, waker, idle, extra={"certificates": acme.status, "workers": plane.status,
                                                       "container": core.container_status, "debug": debug.status})
    metrics = Metrics(runtime, status, waker.core, idle, certificates, core, acme, plane=plane)
    return [core, certificates, acme, waker, idle, plane, status, metrics, debug]


class _WorkerMetricsConfig:
    """Tells a worker's RequestMetrics the config's metrics.per_group (the worker exports nothing itself)."""

    def __init__(self, runtime: Runtime, requests: RequestMetrics) -> None:
        self.runtime, self.requests = runtime, requests

    def configure(self, updated: set[str]) -> None:
        cfg = self.runtime.config.metrics
        self.requests.configure_from(cfg.per_group, cfg.max_groups)


def make_worker_addons(runtime: Runtime | None = None) -> list[Any]:
    from wakeproxy.planes.worker import WorkerCore, WorkerPlane

    _install_adaptations()
    runtime = runtime or Runtime()
    certificates = Certificates(runtime, pushed=True)
    tokens = ChallengeTokens()
    plane = WorkerPlane(runtime, certificates, tokens)
    waker = Waker(runtime, plane.wakes)
    idle = IdleKeeper(runtime, waker, decides=False)
    plane.idle = idle
    requests = RequestMetrics()
    plane.metrics = requests
    tls_addons = [certificates, ChallengeAnswers(tokens), HttpsPolicy(runtime, certificates)]
    return [WorkerCore(runtime, plane), requests, Hygiene(runtime), ConnectionLimits(runtime), *tls_addons, waker,
            Router(runtime, waker), idle, Upstream(runtime, waker), errorpages.UpstreamErrors(runtime), plane,
            _WorkerMetricsConfig(runtime, requests), AccessLog(runtime)]
