"""Router addon: Host header and path → a backend container, forwarded headers, error pages.

Runs in `requestheaders` (not `request`): with streamed uploads mitmproxy opens
the upstream connection before the `request` hook, so the destination must be
known as soon as the headers are in.  It reads only the current snapshot —
never Docker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from mitmproxy import connection, http

from wakeproxy import pages
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.labels import normalize_host
from wakeproxy.routing.snapshot import Backend, PathRoute, Site
from wakeproxy.runtime import Runtime
from wakeproxy.wake.orchestrator import wake_fields
from wakeproxy.wake.waker import CONTROL_PREFIX, Wake, Waker

logger = get_logger(__name__)

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE", "CONNECT"})

# A request that arrives before the first Docker listing is held this long for it (then routed).
STARTUP_HOLD = 10.0

# How many WebSocket messages a flow keeps for mitmweb (`mitmweb -s`), and how many bytes of those
# already sent; mitmproxy would keep all of them for the life of the connection.
WEBSOCKET_HISTORY = 100
WEBSOCKET_HISTORY_BYTES = 1024 * 1024
_WS_BYTES = "wakeproxy.ws_history_bytes"


class Router:
    """Chooses the upstream for every request from the runtime's snapshot."""

    def __init__(self, runtime: Runtime, waker: Waker) -> None:
        self.runtime = runtime
        self.waker = waker
        self._turn: dict[tuple[str, str, bool], int] = {}  # (host, path, exact) → next replica

    # --- hooks ------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """Route at once; return a coroutine (which mitmproxy awaits) only to hold a request during a wake."""
        if flow.response is not None:
            return None  # already answered by an earlier addon (e.g. an ACME challenge)
        if not self.runtime.snapshot.synced:
            return self._after_first_listing(flow)
        return self._route(flow)

    async def _after_first_listing(self, flow: http.HTTPFlow) -> None:
        """The listeners open before Docker has been read: hold the request (at most STARTUP_HOLD)
        instead of answering for a routing table that is not there yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_HOLD
        while not self.runtime.snapshot.synced and loop.time() < deadline:
            await self.runtime.changed(deadline - loop.time())
        held = self._route(flow)
        if held is not None:
            await held

    def _route(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        host_header = flow.request.host_header or ""
        host = normalize_host(host_header)
        snapshot = self.runtime.snapshot
        site = snapshot.lookup(host) if host else None
        if site is None:
            why = snapshot.misconfiguration(host) if host else None
            if why is not None:
                flow.response = self._misconfigured(flow, host, why)
                return None
            site = self._default_site()
        if site is None:
            flow.response = self._no_site(flow, host)
            return None
        if flow.request.path.startswith(CONTROL_PREFIX):
            return self.waker.control(flow, site, host)
        route = site.route_for(flow.request.path)
        if route is None:
            flow.response = self._no_route(flow, host)
            return None
        backends = route.ready_backends
        if backends and not self.waker.busy(site):
            self.route_to(flow, self._pick(site, route, backends), host_header, site.host)
            return None
        # A sleeping route wakes the site's group as a whole (every path of a host is one group's).
        if self.waker.busy(site) or any(b.state != "running" and b.problem is None for b in route.backends):
            return self.waker.asleep(flow, site, host, self._forward_after_wake)
        flow.response = self._unreachable(flow, host, route)
        return None

    def _forward_after_wake(self, flow: http.HTTPFlow, site: Site) -> None:
        host_header = flow.request.host_header or ""
        fresh = self.lookup(normalize_host(host_header)) or site
        route = fresh.route_for(flow.request.path)
        backends = route.ready_backends if route is not None else ()
        if route is None or not backends:
            flow.response = pages.error_response(
                flow.request, 502, "Wake-up failed", f"'{site.host}' started but has no reachable container.",
                "Check the containers' networks and logs.", site.host)
            return
        self.route_to(flow, self._pick(fresh, route, backends), host_header, fresh.host)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Stream what must arrive as it is produced: server-sent events, and responses
        # whose app asked proxies not to buffer (the X-Accel-Buffering convention).
        resp = flow.response
        wake: Wake | None = flow.metadata.get("wakeproxy.wake")
        if wake is not None and not wake.first_byte_logged:
            wake.first_byte_logged = True
            wake.mark("first byte")
            logger.info(f"wake {wake.group}: first response ({wake.timing()})", extra=wake_fields(wake, "first_byte"))
        if resp is None or resp.stream:
            return
        if resp.headers.get("content-type", "").startswith("text/event-stream") or (
            resp.headers.get("x-accel-buffering", "").lower() == "no"
        ):
            resp.stream = True

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """The CONNECT to the debug UI's proxy listener carries the key it admits workers by."""
        watch = self.runtime.watch
        if watch.proxy is not None and tuple(flow.server_conn.address or ()) == watch.proxy:
            flow.request.headers["Proxy-Authorization"] = f"Bearer {watch.key}"

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Keep at most WEBSOCKET_HISTORY messages and WEBSOCKET_HISTORY_BYTES of those sent (the last one is
        being sent: never touched). The bytes kept are counted as messages come, not summed each time."""
        messages = flow.websocket.messages if flow.websocket is not None else []
        sent = flow.metadata.get(_WS_BYTES)
        if sent is None:
            sent = sum(len(m.content) for m in messages[:-1])
        elif len(messages) > 1:
            sent += len(messages[-2].content)  # sent since the previous call
        drop = 0
        while drop < len(messages) - 1 and (len(messages) - drop > WEBSOCKET_HISTORY or sent > WEBSOCKET_HISTORY_BYTES):
            sent -= len(messages[drop].content)
            drop += 1
        if drop:
            del messages[:drop]
        flow.metadata[_WS_BYTES] = sent

    # --- routing ----------------------------------------------------------------

    def lookup(self, host: str) -> Site | None:
        """The site of `host`, else the default_host's (if any)."""
        site = self.runtime.snapshot.lookup(host) if host else None
        return site if site is not None else self._default_site()

    def _default_site(self) -> Site | None:
        default = self.runtime.config.default_host
        return self.runtime.snapshot.lookup(default) if default else None

    def _pick(self, site: Site, route: PathRoute, backends: tuple[Backend, ...]) -> Backend:
        """Round robin over the ready replicas of one path of one site."""
        if len(backends) == 1:
            return backends[0]
        key = (site.host, route.path, route.exact)
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        return backends[turn % len(backends)]

    def route_to(self, flow: http.HTTPFlow, backend: Backend, host_header: str, site_host: str) -> None:
        """Point `flow` at `backend`, keeping the client's Host and adding X-Forwarded-*; through the
        debug UI's proxy listener when the site is watched (`wakeproxy debug`)."""
        assert backend.address is not None
        self._forwarded_headers(flow, host_header)
        req = flow.request
        if (req.is_http2 or req.is_http3) and backend.scheme == "http" and "content-length" not in req.headers \
                and req.method not in _BODYLESS:
            # An HTTP/2 body without a length goes to an HTTP/1.1 backend: it must be chunked,
            # or the backend reads an empty body and the rest as a broken next request.
            req.headers["transfer-encoding"] = "chunked"
        req.scheme = backend.scheme
        req.host = backend.address  # this setter rewrites Host/:authority …
        req.port = backend.port
        req.host_header = host_header or None  # … so put the client's back
        via = self.runtime.watch.via(site_host, backend.group)
        if via is not None:
            # mitmproxy tunnels to the backend through the UI (CONNECT, see http_connect_upstream).
            # A Server of the flow's own: the one it holds is shared by the connection's other streams.
            flow.server_conn = connection.Server(address=(req.host, req.port), via=("http", via),
                                                 transport_protocol=flow.server_conn.transport_protocol)
        flow.metadata["wakeproxy.container"] = backend.container_name
        flow.metadata["wakeproxy.group"] = backend.group

    def _forwarded_headers(self, flow: http.HTTPFlow, host_header: str) -> None:
        headers = flow.request.headers
        client_ip = pages.client_ip(flow)
        trusted = self.runtime.config.forwarded.trusts(client_ip)
        prior_xff = headers.get("x-forwarded-for", "") if trusted else ""
        if not trusted:
            # Nothing an untrusted client says about the original request reaches the app:
            # X-Forwarded-Ssl, -Scheme, -Prefix… are believed by some frameworks.
            for name in [n for n in headers if n.lower().startswith("x-forwarded-") or n.lower() == "forwarded"]:
                del headers[name]
        headers["X-Forwarded-For"] = f"{prior_xff}, {client_ip}" if prior_xff else client_ip
        own = {
            "X-Forwarded-Proto": "https" if flow.client_conn.tls_established else "http",
            "X-Forwarded-Host": host_header,
            "X-Forwarded-Port": str(flow.client_conn.sockname[1]) if flow.client_conn.sockname else "",
            "X-Real-IP": client_ip,
        }
        for name, value in own.items():
            if not (trusted and headers.get(name)):
                headers[name] = value

    # --- answers without a backend ------------------------------------------------

    def _no_site(self, flow: http.HTTPFlow, host: str) -> http.Response:
        if not self.runtime.snapshot.synced:
            engine = self.runtime.engine
            message = "The proxy has not been able to read its list of sites from the Docker engine yet."
            if engine.state == "retrying":
                message = "The proxy cannot reach the Docker engine, so it does not know this site yet."
                if self.runtime.config.shows_detail(pages.client_ip(flow)):
                    message += f" ({engine.url}: {engine.last_error})"
            return pages.error_response(flow.request, 503, "Starting up", message, "Try again in a moment.",
                                        host, {"Retry-After": "5"})
        return pages.error_response(
            flow.request, 404, "Unknown site",
            f"No container declares the host '{host or '(no Host header)'}'.",
            "Label a container with wakeproxy.host (or VIRTUAL_HOST, io.docksal.virtual-host, "
            "a Traefik Host rule) and start it; routes update without a restart.",
            host,
        )

    def _no_route(self, flow: http.HTTPFlow, host: str) -> http.Response:
        return pages.error_response(
            flow.request, 404, "Not found",
            f"The site '{pages.bounded(host)}' has no container for this path.",
            "Its containers declare paths (wakeproxy.path, VIRTUAL_PATH, a Traefik Path or PathPrefix rule); "
            "this one is under none of them.",
            host,
        )

    def _misconfigured(self, flow: http.HTTPFlow, host: str, why: str) -> http.Response:
        """A host whose only declarations come from containers skipped for bad labels."""
        logger.debug(f"{host}: misconfigured: {why}")
        if not self.runtime.config.shows_detail(pages.client_ip(flow)):
            return pages.error_response(
                flow.request, 503, "Site misconfigured",
                f"The site '{pages.bounded(host)}' is declared by a container whose labels the proxy cannot use.",
                "If you run this site: `wakeproxy status` and the proxy's log say which labels.", host)
        return pages.error_response(
            flow.request, 503, "Site misconfigured", why + ".",
            "Fix the labels and recreate the container; routes update without a restart.", host)

    def _unreachable(self, flow: http.HTTPFlow, host: str, route: PathRoute) -> http.Response:
        problems = [b.problem for b in route.backends if b.problem]
        logger.debug(f"{host}: {'; '.join(problems)}")
        if not self.runtime.config.shows_detail(pages.client_ip(flow)):
            return pages.error_response(
                flow.request, 503, "Site unreachable", f"The site '{host}' exists, but the proxy cannot reach it.",
                "If you run this site: `wakeproxy status` and the proxy's log say why.", host)
        return pages.error_response(
            flow.request, 503, "Site unreachable", "; ".join(problems) + ".",
            "Connect the container to a network the proxy uses (docker.networks in the config, "
            "or the wakeproxy.network label).",
            host,
        )
