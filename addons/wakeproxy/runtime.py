"""The state our addons share: the loaded config, the current snapshot, and
notifications when either Docker's view or a container changes.

One `Runtime` is created per proxy and handed to every addon of the bundle;
the addons hold a reference to it, not copies, so a new snapshot published by
the Docker view is seen by the next request at once.  Everything here is used
on the event loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wakeproxy.config import Config
from wakeproxy.routing.snapshot import Snapshot
from wakeproxy.routing.watch import Watch


@dataclass(frozen=True)
class ContainerEvent:
    """A Docker event about one container, as far as waking and idling care."""

    action: str  # start | die | health_status | pause | unpause | stop | destroy …
    container_id: str
    name: str
    exit_code: int | None = None  # for die
    health: str | None = None  # for health_status


@dataclass(frozen=True)
class EngineState:
    """Whether the proxy can see the Docker engine (shown by `wakeproxy status` and in pages)."""

    state: str = "connecting"  # connecting | connected | retrying
    url: str = ""
    since: float = 0.0  # wall clock of the last change of `state`
    last_error: str | None = None
    ever_connected: bool = False
    swarm: str = ""  # the engine's Swarm role when last connected: manager | worker | none | off

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state, "url": self.url, "since": self.since, "last_error": self.last_error,
                "ever_connected": self.ever_connected, "swarm": self.swarm}


@dataclass
class Runtime:
    config: Config = field(default_factory=Config)
    snapshot: Snapshot = field(default_factory=Snapshot)
    engine: EngineState = field(default_factory=EngineState)
    manage: bool = True  # False in a debugging copy (`wakeproxy web`): no start, stop, pause, ACME order
    watch: Watch = field(default_factory=Watch)  # what goes through the debug UI (routing/watch.py)
    listeners: list[Callable[[ContainerEvent], None]] = field(default_factory=list)
    # Groups being put to sleep by the idle keeper: a request for one waits for the stop, then wakes it.
    stopping: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    _changed: asyncio.Future[None] | None = None

    def publish(self, snapshot: Snapshot) -> None:
        """Install a new snapshot and wake everyone waiting in `changed()`."""
        self.snapshot = snapshot
        fut, self._changed = self._changed, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def emit(self, event: ContainerEvent) -> None:
        for listener in list(self.listeners):
            listener(event)

    async def changed(self, timeout: float) -> None:
        """Return when the next snapshot is published, or after `timeout` seconds."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._changed), timeout)
        except TimeoutError:
            pass
