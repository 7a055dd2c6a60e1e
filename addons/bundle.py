"""The list of our addons, in hook order, sharing one Runtime."""

from __future__ import annotations

from typing import Any

from .core import WakeProxy
from .router import Router
from .runtime import Runtime
from .waker import Waker


def make_addons(runtime: Runtime | None = None) -> list[Any]:
    runtime = runtime or Runtime()
    waker = Waker(runtime)
    return [WakeProxy(runtime), waker, Router(runtime, waker)]
