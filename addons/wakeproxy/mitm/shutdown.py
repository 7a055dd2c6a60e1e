"""A graceful stop: SIGTERM closes the listeners, lets requests in flight finish, then stops.

Phases, one log line each: the listeners close (new connections are refused by the
kernel, or, under the `wakeproxy` command, go to the other workers); every HTTP/1.1 answer
from then on says `Connection: close`, so a busy keep-alive client finishes its request and
opens the next one elsewhere; a connection with nothing in flight is closed once it has been
quiet for `IDLE_GRACE` (a client that sends on it meanwhile gets its answer, with the close);
when no request is in flight and no connection is left, or after `shutdown.drain`, whatever
is left is closed and mitmproxy stops. A second signal stops at once.

Closing the listeners uses the Proxyserver addon's `servers.update([])` (its own way of
removing listeners); when that is not there, the drain still waits for requests in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

TICK = 0.05
IDLE_GRACE = 1.0  # seconds a connection with nothing in flight stays open while draining


class GracefulStop:
    def __init__(self, master: Any, drain: float) -> None:
        self.master = master
        self.drain = drain
        self._task: asyncio.Task[None] | None = None
        self._drain_started = 0.0

    def signal(self, name: str) -> None:
        """The signal handler: the first signal drains, a second one stops at once."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(name), name="graceful stop")
        else:
            logger.warning(f"wakeproxy: {name} again: stopping now")
            self.master.shutdown()

    def _limits(self) -> Any:
        return self.master.addons.get("connectionlimits")

    def _open(self) -> int:
        limits = self._limits()
        return len(limits.conns) if limits is not None else 0

    def _inflight(self) -> int:
        limits = self._limits()
        return sum(c.inflight for c in limits.conns.values()) if limits is not None else 0

    def _close_idle(self, everything: bool = False, quiet_since: float | None = None) -> int:
        """Close the connections with nothing in flight (that have been quiet since `quiet_since`)."""
        limits = self._limits()
        if limits is None:
            return 0
        closed = 0
        for cid, c in list(limits.conns.items()):
            if not everything and c.inflight:
                continue
            if not everything and quiet_since is not None:
                since = limits.idle.get(cid, limits.fresh.get(cid, limits.heading.get(cid, quiet_since)))
                if max(since, self._drain_started) > quiet_since:
                    continue
            closed += bool(limits._close(cid))
        return closed

    async def _run(self, name: str) -> None:
        t0 = self._drain_started = time.monotonic()
        limits = self._limits()
        if limits is not None:
            limits.draining = True
        proxyserver = self.master.addons.get("proxyserver")
        servers = getattr(proxyserver, "servers", None)
        if servers is not None and callable(getattr(servers, "update", None)):
            try:
                await servers.update([])
            except Exception as e:  # noqa: BLE001 - the drain goes on
                logger.warning(f"wakeproxy: closing the listeners failed: {e}")
        logger.info(f"wakeproxy: {name}: listeners closed; {self._inflight()} request(s) in flight get up to "
                    f"{self.drain:g} s (shutdown.drain)")
        deadline = t0 + self.drain
        while (self._inflight() or self._open()) and time.monotonic() < deadline:
            self._close_idle(quiet_since=time.monotonic() - IDLE_GRACE)
            await asyncio.sleep(TICK)
        left = self._inflight()
        if left:
            logger.warning(f"wakeproxy: drain time is up: {left} request(s) still in flight are cut")
        else:
            logger.info(f"wakeproxy: every request in flight was answered ({time.monotonic() - t0:.2f} s)")
        self._close_idle(everything=True)
        await asyncio.sleep(TICK)  # let the connections see their end before the loop stops
        logger.info("wakeproxy: stopped")
        self.master.shutdown()
