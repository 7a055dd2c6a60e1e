"""Connections to containers: deadlines, keepalive, and what happens when a container dies.

mitmproxy opens every upstream TCP connection with `asyncio.open_connection` in
`proxy/server.py` (`ConnectionHandler.open_connection`), without a timeout.  A
guarded adaptation points that module's `asyncio` at a thin stand-in whose
`open_connection` is `Connector.open_connection`; everything else it uses from
asyncio is the real module.  The connector:

- gives up after `upstream.connect_timeout` (a stopped container's IP answers no
  SYN: without this a request waited ~70 s for the kernel to give up);
- turns on TCP keepalive (`upstream.keepalive`), so a peer that vanished is noticed;
- knows which container an address belongs to (from every snapshot it has seen) and,
  when Docker says that container died, stopped or was killed, ends its connections
  at once: a response in progress is cut (HTTP/1.1: the connection closes before the
  announced length; HTTP/2: the stream is reset), within a second, not after 600 s.
  Connects still under way to it are released at the same moment;
- treats a container that is stopping, stopped or restarted elsewhere like a
  sleeping site: the request waits while its group is woken (one wake, shared with
  every other request: the Waker's single flight), then goes to the container's new
  address.  Never retried in a loop: one wake, one connect; a container that is gone
  (removed) or a wake that fails gives the request our 502/504 page.

`ResponseDeadline` (an addon) ends an upstream connection whose response headers
have not come `upstream.read_timeout` after the request was sent (our 504 page).
"""

from __future__ import annotations

import asyncio
import socket
import time
import weakref
from collections import OrderedDict
from typing import Any

from mitmproxy import http

from wakeproxy.mitm.guard import AsyncioWith, Fallback, calls_asyncio
from wakeproxy.mitm.limits import connection_handler
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.snapshot import Snapshot
from wakeproxy.runtime import ContainerEvent, Runtime
from wakeproxy.wake.waker import WakeFailed, Waker

logger = get_logger(__name__)

KNOWN_ADDRESSES = 10_000  # address → container entries remembered (least recently seen forgotten)
DEATH = frozenset({"die", "stop", "kill", "destroy", "pause"})
LOG_INTERVAL = 10.0
DIE_GRACE = 1.0  # after a refused connect, how long Docker's `die` event may take to say it was a stop
_installed: Connector | None = None
FALLBACK = Fallback("no connect timeout, keepalive or cut on container death (stock behaviour)")


class Died(OSError):
    """The container behind a connect went away while we were connecting."""


class Connector:
    def __init__(self, runtime: Runtime, waker: Waker) -> None:
        self.runtime = runtime
        self.waker = waker
        self.known: OrderedDict[tuple[str, int], str] = OrderedDict()  # (ip, port) → container id
        self._indexed: Snapshot | None = None
        self._died: dict[str, asyncio.Event] = {}  # container id → set when Docker says it went away
        self._live: dict[str, weakref.WeakSet[asyncio.BaseTransport]] = {}
        self._logged: dict[str, float] = {}
        runtime.listeners.append(self.on_event)

    # --- what the proxy knows ------------------------------------------------------------------

    def _index(self) -> None:
        snap = self.runtime.snapshot
        if snap is self._indexed:
            return
        self._indexed = snap
        for cid, backends in snap.endpoints.items():
            for b in backends:
                if b.address:
                    key = (b.address, b.port)
                    self.known.pop(key, None)
                    self.known[key] = cid
        while len(self.known) > KNOWN_ADDRESSES:
            self.known.popitem(last=False)

    def container_at(self, host: str, port: int) -> str | None:
        self._index()
        return self.known.get((host, port))

    def _alive_at(self, cid: str, host: str, port: int) -> bool:
        """Does the current snapshot still route to the container at this address? (A host-network
        container's address is 127.0.0.1, which is on none of its networks: ask the routes.)"""
        snap = self.runtime.snapshot
        info = snap.containers.get(cid)
        return info is not None and info.state == "running" and any(
            b.address == host and b.port == port for b in snap.endpoints.get(cid, ()))

    def on_event(self, event: ContainerEvent) -> None:
        if event.action not in DEATH:
            return
        died = self._died.pop(event.container_id, None)
        if died is not None:
            died.set()
        live = self._live.pop(event.container_id, None)
        cut = 0
        for transport in list(live or ()):
            if not transport.is_closing():
                transport.abort()  # type: ignore[attr-defined]  # a socket transport: the reader sees the end at once
                cut += 1
        if cut:
            logger.info(f"upstream: {event.name} {event.action}: {cut} connection(s) to it ended")

    # --- the connect -----------------------------------------------------------------------------

    async def open_connection(self, host: Any = None, port: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        cid = self.container_at(host, port) if isinstance(host, str) and isinstance(port, int) else None
        if cid is not None and not self._alive_at(cid, host, port):
            host, port = await self._after_wake(cid, port, "is not running")
        try:
            reader, writer = await self._connect(host, port, cid, **kwargs)
        except Died:
            assert cid is not None
            host, port = await self._after_wake(cid, port, "went away while connecting")
            reader, writer = await self._connect(host, port, None, **kwargs)
            cid = self.container_at(host, port)
        except (ConnectionRefusedError, OSError) as e:
            # Refused or unreachable: a container that is being stopped refuses before Docker's
            # `die` event is here. Give that event a moment; if it comes, this is a wake.
            if cid is None or isinstance(e, TimeoutError) or not await self._dies_soon(cid, host, port):
                raise
            host, port = await self._after_wake(cid, port, "stopped")
            reader, writer = await self._connect(host, port, None, **kwargs)
            cid = self.container_at(host, port)
        self._keepalive(writer)
        if cid is not None:
            self._live.setdefault(cid, weakref.WeakSet()).add(writer.transport)
        return reader, writer

    async def _connect(self, host: Any, port: Any, cid: str | None, **kwargs: Any) -> tuple[Any, Any]:
        timeout = self.runtime.config.upstream.connect_timeout
        attempt = asyncio.ensure_future(asyncio.open_connection(host, port, **kwargs))
        died = None
        if cid is not None:
            event = self._died.setdefault(cid, asyncio.Event())
            died = asyncio.ensure_future(event.wait())
        waiting = {attempt} | ({died} if died is not None else set())
        try:
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waiting:
                if not t.done():
                    t.cancel()
        if attempt in done:
            result: tuple[Any, Any] = attempt.result()  # raises the connect's OSError
            return result
        if died is not None and died in done:
            raise Died(f"the container at {host}:{port} went away")
        raise TimeoutError(f"connect to {host}:{port} timed out after {timeout:g} s")

    async def _dies_soon(self, cid: str, host: str, port: int, within: float = DIE_GRACE) -> bool:
        """After a refused connect: does Docker say within `within` s that the container went away?"""
        if not self._alive_at(cid, host, port):
            return True
        event = self._died.setdefault(cid, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), within)
        except TimeoutError:
            return not self._alive_at(cid, host, port)
        return True

    async def _after_wake(self, cid: str, port: int, why: str) -> tuple[str, int]:
        """Wake the container's group (once, shared) and return its address for `port` now."""
        snap = self.runtime.snapshot
        info = snap.containers.get(cid)
        name = info.name if info is not None else cid[:12]
        if info is None:
            raise OSError(f"container {name} was removed")
        group = next((g for g in snap.groups.values() if cid in g.members), None)
        if group is None or not self.runtime.manage:
            raise OSError(f"container {name} {why}, and no wake may start it")
        self._log(group.name, f"upstream: {name} {why} under a request (stopped by someone else?); "
                              f"waking {group.name}")
        try:
            await self.waker.wake_until_ready(group)
        except WakeFailed as e:
            raise OSError(f"container {name} {why}; waking it failed: {e.message}") from None
        for b in self.runtime.snapshot.endpoints.get(cid, ()):
            if b.port == port and b.address:
                return b.address, port
        raise OSError(f"container {name} was woken but has no address for port {port}")

    def _log(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(key, 0.0) >= LOG_INTERVAL:
            self._logged[key] = now
            logger.warning(message)

    def _keepalive(self, writer: Any) -> None:
        idle = int(self.runtime.config.upstream.keepalive)
        sock = writer.get_extra_info("socket")
        if idle <= 0 or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        except OSError:
            pass


# --- the adaptation of mitmproxy --------------------------------------------------------------


def shape_ok() -> bool:
    return calls_asyncio("mitmproxy.proxy.server", "ConnectionHandler", "open_connection", "open_connection")


def install(connector: Connector) -> bool:
    """Route mitmproxy's upstream connects through `connector` (the latest bundle's); idempotent."""
    global _installed
    if not shape_ok():
        return FALLBACK.decline("ConnectionHandler.open_connection calling proxy/server.py's asyncio.open_connection")
    from mitmproxy.proxy import server

    if not isinstance(server.asyncio, AsyncioWith):
        setattr(server, "asyncio", AsyncioWith(asyncio, open_connection=_dispatch))
    _installed = connector
    return True


def uninstall() -> None:
    global _installed
    _installed = None
    try:
        from mitmproxy.proxy import server
    except ImportError:
        return
    if isinstance(getattr(server, "asyncio", None), AsyncioWith):
        setattr(server, "asyncio", asyncio)


async def _dispatch(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    connector = _installed
    if connector is None:
        return await asyncio.open_connection(*args, **kwargs)
    return await connector.open_connection(*args, **kwargs)


# --- the addon ------------------------------------------------------------------------------------


class Upstream:
    """Installs the connector while the proxy runs, and puts a deadline on response headers."""

    def __init__(self, runtime: Runtime, waker: Waker) -> None:
        self.runtime = runtime
        self.connector = Connector(runtime, waker)
        self._waiting: dict[str, tuple[float, http.HTTPFlow]] = {}  # flow id → (sent at, flow)
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        install(self.connector)
        self._task = asyncio.get_running_loop().create_task(self._sweep_forever(), name="upstream deadlines")

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if _installed is self.connector:
            uninstall()

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.websocket is None:
            self._waiting[flow.id] = (time.monotonic(), flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)

    def sweep(self, now: float) -> int:
        """End the upstream connection of every request whose response headers are overdue."""
        limit = now - self.runtime.config.upstream.read_timeout
        overdue = [fid for fid, (t, _) in self._waiting.items() if t <= limit]
        for fid in overdue:
            _, flow = self._waiting.pop(fid)
            handler = connection_handler(flow.client_conn.id)
            io = handler.transports.get(flow.server_conn) if handler is not None else None
            writer = getattr(io, "writer", None)
            if writer is not None:
                flow.metadata["wakeproxy.read_timeout"] = True
                writer.transport.abort()
        if overdue:
            logger.warning(f"upstream: {len(overdue)} response(s) did not start within "
                           f"{self.runtime.config.upstream.read_timeout:g} s (upstream.read_timeout); ended")
        return len(overdue)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._waiting:
                self.sweep(time.monotonic())
