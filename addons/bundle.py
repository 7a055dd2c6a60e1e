"""The list of our addons, in hook order, sharing one Runtime."""

from __future__ import annotations

from typing import Any

from .acme import AcmeManager
from .core import WakeProxy
from .router import Router
from .idle import IdleKeeper
from .runtime import Runtime
from .status import StatusServer
from .tls import Certificates, HttpsPolicy
from .waker import Waker


def make_addons(runtime: Runtime | None = None) -> list[Any]:
    runtime = runtime or Runtime()
    waker = Waker(runtime)
    idle = IdleKeeper(runtime, waker)
    # TLS before routing: certificates, ACME challenge answers, then the https redirect.
    certificates = Certificates(runtime)
    tls_addons = [certificates, AcmeManager(runtime, certificates), HttpsPolicy(runtime, certificates)]
    return [WakeProxy(runtime), *tls_addons, waker, Router(runtime, waker), idle, StatusServer(runtime, waker, idle)]
