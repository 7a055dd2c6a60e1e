"""The list of our addons, in hook order, sharing one Runtime."""

from __future__ import annotations

from typing import Any

from .core import WakeProxy
from .router import Router
from .idle import IdleKeeper
from .runtime import Runtime
from .status import StatusServer
from .waker import Waker


def make_addons(runtime: Runtime | None = None) -> list[Any]:
    runtime = runtime or Runtime()
    waker = Waker(runtime)
    idle = IdleKeeper(runtime, waker)
    return [WakeProxy(runtime), waker, Router(runtime, waker), idle, StatusServer(runtime, waker, idle)]
