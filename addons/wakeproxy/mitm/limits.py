"""Limits that keep the proxy alive: deadlines for slow and idle clients, a connection cap.

Every client connection is tracked from `client_connected` to `client_disconnected`, with
the requests it has in flight (`requestheaders` until `response` / `error`; a WebSocket
until `websocket_end`, a streamed response until its `response` hook at the end). A
connection with nothing in flight is closed at its deadline:

- `header_timeout` from connect while it has not sent its first request's headers (a TLS
  handshake that stalls, slowloris, a flooder that sends nothing);
- `header_timeout` from the first byte of a keep-alive request's head (HTTP/1, reported by
  headbound) until the head is complete;
- `idle_timeout` after the end of its last request otherwise.

A request in flight is never timed here: a request held during a wake (up to wake.timeout
inside an async hook), a WebSocket or a long stream stays open. mitmproxy's own watchdog
(`proxy/server.py` TimeoutWatchdog: 10 minutes without any event, disarmed while a hook
runs) stays as it is; our deadlines are shorter, so they come first.

At start the soft RLIMIT_NOFILE is raised to the hard limit, and the cap `max_connections`
(auto: half of what the file limit leaves after `connection_reserve`, since a busy client may
hold an upstream connection too) keeps asyncio's accept loop from ever reaching EMFILE
(which logs a traceback per attempt). At the cap, a new connection evicts the oldest
connection with nothing in flight, else it is refused (closed at once, before any byte is
read). Floods are logged once per 10 s, with counts.

Closing a connection from an addon uses mitmproxy internals, guarded: in `client_connected`
setting `client.error` makes mitmproxy close it (`proxy/server.py` handle_client); any other
connection is found in the Proxyserver addon's `connections` (client id → connection
handler) and closed as mitmproxy's own watchdog does (`on_timeout`: cancel the handler task of
`transports[client]`). When those are not there, deadlines and eviction are off (one warning);
refusing at the cap still works.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mitmproxy import ctx, http

from wakeproxy.mitm import headbound
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.runtime import Runtime

logger = get_logger(__name__)

FLOOD_LOG_INTERVAL = 10.0
_FLOW_KEY = "wakeproxy.limits"


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            logger.warning(f"wakeproxy: cannot raise the file limit from {soft} to {hard}: {e}")
    return soft


AUTO_CAP_MAX = 10_000  # auto never goes beyond this: each idle connection costs memory too


def connection_cap(nofile: int, reserve: int, configured: int | None) -> int:
    """How many client connections may be open at once with `nofile` file descriptors."""
    auto = max(1, min(AUTO_CAP_MAX, (nofile - reserve) // 2))
    if configured is None:
        return auto
    if configured > nofile - reserve:
        logger.warning(f"wakeproxy: limits.max_connections {configured} does not fit the file limit {nofile} "
                       f"with connection_reserve {reserve}; using {max(1, nofile - reserve)}")
        return max(1, nofile - reserve)
    return configured


def _default_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    loop.default_exception_handler(context)


def connection_handler(client_id: str) -> Any:
    """mitmproxy's handler of the client connection `client_id` (the Proxyserver addon's
    `connections[id]`, with `transports` and `client`), or None when it is not there or not of
    that shape. The one place that reaches into mitmproxy for a live connection."""
    proxyserver = ctx.master.addons.get("proxyserver")
    connections = getattr(proxyserver, "connections", None)
    handler = connections.get(client_id) if isinstance(connections, dict) else None
    if handler is not None and isinstance(getattr(handler, "transports", None), dict) and hasattr(handler, "client"):
        return handler
    return None


@dataclass
class _Conn:
    client: Any
    inflight: int = 0
    requests: int = 0


class ConnectionLimits:
    """Deadlines and a cap on client connections (see the module docstring)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        limits = runtime.config.limits
        self.header_timeout = limits.header_timeout
        self.idle_timeout = limits.idle_timeout
        self.cap = limits.max_connections or AUTO_CAP_MAX  # until configure() knows the file limit
        self.conns: dict[str, _Conn] = {}
        # Connections with nothing in flight, by the time their deadline counts from (oldest first):
        self.fresh: OrderedDict[str, float] = OrderedDict()  # no request yet: header_timeout from connect
        self.heading: OrderedDict[str, float] = OrderedDict()  # keep-alive head started: header_timeout
        self.idle: OrderedDict[str, float] = OrderedDict()  # keep-alive: idle_timeout
        self.refused = self.evicted = self.timed_out = 0
        self._nofile: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned_no_close = False
        self._previous_handler: Any = None
        self.accept_errors = 0
        self._sweep_failed = False
        self.draining = False  # a graceful stop: every HTTP/1 answer closes its connection (shutdown.py)

    # --- options and lifecycle --------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(headbound.OPTION, int, headbound.DEFAULT_LIMIT,
                          "Bytes of an unfinished HTTP/1 request head mitmproxy buffers (wakeproxy limits).")

    def configure(self, updated: set[str]) -> None:
        if "wakeproxy_config" not in updated or not ctx.options.wakeproxy_config:
            return
        limits = self.runtime.config.limits
        if self._nofile is None:
            self._nofile = raise_nofile_limit()
        self.header_timeout = limits.header_timeout
        self.idle_timeout = limits.idle_timeout
        self.cap = connection_cap(self._nofile, limits.connection_reserve, limits.max_connections)
        if getattr(ctx.options, headbound.OPTION) != limits.max_header_bytes:
            ctx.options.update(**{headbound.OPTION: limits.max_header_bytes})

    def running(self) -> None:
        headbound.add_listener(self.head_started)
        loop = asyncio.get_running_loop()
        if self._previous_handler is None:
            self._previous_handler = loop.get_exception_handler() or _default_handler
            loop.set_exception_handler(self._loop_exception)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sweep_forever())
        logger.debug(f"connection cap {self.cap} (file limit {self._nofile})")

    def done(self) -> None:
        headbound.remove_listener(self.head_started)
        if self._previous_handler is not None:
            try:
                asyncio.get_running_loop().set_exception_handler(
                    None if self._previous_handler is _default_handler else self._previous_handler)
            except RuntimeError:
                pass
            self._previous_handler = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # --- connections --------------------------------------------------------------------------

    def client_connected(self, client: Any) -> None:
        if len(self.conns) >= self.cap:
            victim = self._oldest_idle()
            if victim is None or not self._close(victim):
                self.refused += 1
                client.error = "wakeproxy: at the connection cap"  # mitmproxy closes it at once
                return
            self.evicted += 1
        self.conns[client.id] = _Conn(client)
        self.fresh[client.id] = time.monotonic()

    def client_disconnected(self, client: Any) -> None:
        cid = client.id
        if self.conns.pop(cid, None) is not None:
            self._unqueue(cid)

    def head_started(self, client: Any) -> None:
        """The first bytes of an HTTP/1 keep-alive request arrived (from headbound)."""
        cid = client.id
        if self.idle.pop(cid, None) is not None:
            self.heading[cid] = time.monotonic()

    # --- flows ----------------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        conn = self.conns.get(flow.client_conn.id)
        if conn is None or _FLOW_KEY in flow.metadata:
            return
        flow.metadata[_FLOW_KEY] = True
        conn.inflight += 1
        conn.requests += 1
        if conn.inflight == 1:
            self._unqueue(flow.client_conn.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # While draining, "Connection: close" on each HTTP/1.1 answer: the client reads it whole and
        # opens its next request elsewhere, instead of sending it on a connection we are about to close.
        if self.draining and flow.response is not None and flow.request.http_version == "HTTP/1.1" \
                and flow.websocket is None and flow.response.status_code != 101:
            flow.response.headers["connection"] = "close"

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:  # a WebSocket stays in flight until websocket_end
            self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def _end(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.pop(_FLOW_KEY, None) is None:
            return
        cid = flow.client_conn.id
        conn = self.conns.get(cid)
        if conn is None:
            return
        conn.inflight -= 1
        if conn.inflight <= 0:
            conn.inflight = 0
            self.idle[cid] = time.monotonic()

    # --- deadlines and eviction ------------------------------------------------------------------

    def _unqueue(self, cid: str) -> None:
        self.fresh.pop(cid, None)
        self.heading.pop(cid, None)
        self.idle.pop(cid, None)

    def _oldest_idle(self) -> str | None:
        fronts = [(next(iter(q.items()))[1], next(iter(q))) for q in (self.fresh, self.heading, self.idle) if q]
        return min(fronts)[1] if fronts else None

    def sweep(self, now: float | None = None) -> int:
        """Close every connection past its deadline; return how many."""
        now = time.monotonic() if now is None else now
        closed = 0
        for queue, timeout in ((self.fresh, self.header_timeout), (self.heading, self.header_timeout),
                               (self.idle, self.idle_timeout)):
            limit = now - timeout
            while queue:
                cid, since = next(iter(queue.items()))
                if since > limit:
                    break
                if self._close(cid):
                    closed += 1
                else:
                    queue.pop(cid, None)
        self.timed_out += closed
        return closed

    def _close(self, cid: str) -> bool:
        """Close client connection `cid` as mitmproxy's watchdog does; False when we cannot."""
        self._unqueue(cid)
        handler = self._handler(cid)
        if handler is None:
            return False
        io = handler.transports.get(handler.client)
        writer = getattr(io, "writer", None)
        task = getattr(io, "handler", None)
        if writer is None and task is None:
            return False
        # Both: the writer, because a handler task cancelled before its first step never closes
        # it (mitmproxy's handle_connection does that on its way out: the socket would stay open),
        # and the task, so mitmproxy tears the connection down as after its own timeout.
        if writer is not None:
            writer.close()
        if task is not None:
            task.cancel("wakeproxy: connection limit")
        return True

    def _handler(self, cid: str) -> Any:
        handler = connection_handler(cid)
        if handler is not None:
            return handler
        connections = getattr(ctx.master.addons.get("proxyserver"), "connections", None)
        if not self._warned_no_close and (not isinstance(connections, dict) or cid in connections):
            self._warned_no_close = True
            logger.warning("wakeproxy: this mitmproxy's Proxyserver connections are not the shape expected "
                           "(connections[id].transports[client].handler): slow and idle connections are not "
                           "closed early, and none is evicted at the cap")
        return None

    async def _sweep_forever(self) -> None:
        tick = max(0.05, min(0.5, self.header_timeout / 4))
        next_report = time.monotonic() + FLOOD_LOG_INTERVAL
        while True:
            await asyncio.sleep(tick)
            try:
                self.sweep()
                now = time.monotonic()
                if now >= next_report:
                    next_report = now + FLOOD_LOG_INTERVAL
                    self.report()
            except Exception:  # keep sweeping; one traceback, not one per tick
                if not self._sweep_failed:
                    self._sweep_failed = True
                    logger.exception("wakeproxy: connection sweep failed")

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio logs a traceback for every accept() that fails for lack of file descriptors;
        count them instead, for the flood line (the cap should keep this from happening)."""
        if context.get("message") == "socket.accept() out of system resource":
            self.accept_errors += 1
            return
        self._previous_handler(loop, context)

    def report(self) -> None:
        """One line per interval about refused and evicted connections, if there were any."""
        if self.accept_errors:
            logger.warning(f"out of file descriptors: accept() failed {self.accept_errors} times in the last "
                           f"{FLOOD_LOG_INTERVAL:.0f} s (raise the file limit or limits.connection_reserve)")
            self.accept_errors = 0
        if self.refused or self.evicted:
            logger.warning(
                f"connection flood: refused {self.refused}, evicted {self.evicted} idle connections "
                f"in the last {FLOOD_LOG_INTERVAL:.0f} s: at the cap of {self.cap} "
                f"(limits.max_connections; file limit {self._nofile})")
        self.refused = self.evicted = 0
