"""Waker addon: a request for a sleeping group starts it, once, and learns the
moment it is ready.

Single flight: one `Wake` per group, shared by every request that arrives
while it runs.  Members start in Compose `depends_on` order (waiting for
`service_started` / `service_healthy` / `service_completed_successfully`),
the rest together.  Readiness is pushed, not polled slowly: each new snapshot
(every Docker event) re-evaluates the group at once, and between snapshots the
backend ports are probed every 50 ms.  A member that dies or turns unhealthy
fails the wake at once (502 with its name and exit code) and the group gets a
cool-down instead of a restart loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from wakeproxy import pages
from wakeproxy.docker.ops import DockerOpError, DockerOps
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import Backend, Group, Site, Snapshot
from wakeproxy.runtime import ContainerEvent, Runtime
from wakeproxy.wake.budget import WakeBudget, client_key

logger = get_logger(__name__)

CONTROL_PREFIX = "/__wakeproxy/"
WAIT_PATH = CONTROL_PREFIX + "wait"
PROBE_INTERVAL = 0.05  # seconds between readiness checks when no Docker event arrives
PROBE_INTERVAL_MAX = 0.2
PROBE_CONNECT_TIMEOUT = 0.5
LONG_POLL = 20.0  # the waking page's readiness request is answered within this long (at most wake.timeout)
BUDGET_LOG_INTERVAL = 10.0  # refusals by the wake budget are summed up in one log line per this long

# What an anonymous visitor is told when a wake fails (the detail goes to debug_clients and the log).
_PUBLIC_FAILURE = {
    502: ("Wake-up failed", "The site '{host}' could not be started.",
          "Try again in a minute. If it keeps failing, tell the people who run this site."),
    504: ("Wake-up timed out", "The site '{host}' did not become ready in time.",
          "Reload the page to try again."),
}


class WakeFailed(Exception):
    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


@dataclass
class Wake:
    """One attempt to bring a group up; every waiting request awaits `task`."""

    group: str
    members: tuple[str, ...]
    deadline: float  # monotonic
    t0: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    starting: set[str] = field(default_factory=set)  # members we issued start/unpause for
    started: set[str] = field(default_factory=set)  # … whose start/unpause event has arrived since
    completed: set[str] = field(default_factory=set)  # one-shot members that exited 0
    port_ready: set[tuple[str, int]] = field(default_factory=set)
    status: dict[str, str] = field(default_factory=dict)  # member name → what it is doing
    marks: dict[str, float] = field(default_factory=dict)  # phase → seconds since t0
    failure: WakeFailed | None = None
    failed_event: asyncio.Event = field(default_factory=asyncio.Event)
    first_byte_logged: bool = False

    def mark(self, phase: str) -> None:
        self.marks.setdefault(phase, time.monotonic() - self.t0)

    def fail(self, failure: WakeFailed) -> None:
        if self.failure is None:
            self.failure = failure
            self.failed_event.set()

    def timing(self) -> str:
        return ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.marks.items())


def is_navigation(request: http.Request) -> bool:
    """A browser loading a page (not fetch/XHR, not an API client)."""
    if request.method != "GET":
        return False
    mode = request.headers.get("sec-fetch-mode")
    if mode is not None and mode != "navigate":
        return False
    return "text/html" in request.headers.get("accept", "")


class Waker:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.ops = DockerOps(runtime.config.docker)
        self._wakes: dict[str, Wake] = {}
        self._cooldown: dict[str, tuple[float, WakeFailed]] = {}
        self.budget = WakeBudget(runtime.config.wake.per_client)
        self._budget_refused = 0
        self._budget_logged_at = 0.0
        runtime.listeners.append(self._on_event)

    # --- addon hooks ------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        if "wakeproxy_config" in updated:
            self.ops = DockerOps(self.runtime.config.docker)
            self.budget = WakeBudget(self.runtime.config.wake.per_client)

    def done(self) -> None:
        for wake in self._wakes.values():
            if wake.task is not None:
                wake.task.cancel()

    # --- what the router calls ----------------------------------------------------

    def asleep(self, flow: http.HTTPFlow, site: Site, host: str, forward: Any) -> Coroutine[Any, Any, None] | None:
        """Answer a request for `site`, whose backends are all asleep.

        Returns None when `flow.response` is set at once (page, refusal), or a
        coroutine that holds the request until the group is up and then calls
        `forward(flow, site)`.
        """
        config = self.runtime.config.wake
        request = flow.request
        groups = self._groups(site)
        if not self.runtime.manage:
            flow.response = pages.error_response(
                request, 503, "Site asleep", f"'{host}' is asleep, and this debugging copy of the proxy does not "
                "wake sites.", "Open it through the proxy that serves it.", host, {"Retry-After": "60"})
            return None
        if not groups:
            flow.response = pages.error_response(
                request, 503, "Site asleep", f"No container behind '{host}' can be started.",
                "Start its containers by hand (docker start).", host, {"Retry-After": "5"})
            return None
        ua = request.headers.get("user-agent", "")
        if config.ignore_user_agents and config.ignores(ua):
            flow.response = pages.error_response(
                request, 503, "Site asleep",
                f"'{host}' is asleep, and this client's User-Agent is configured not to wake it.",
                "Open the site in a browser to wake it.", host, {"Retry-After": "60"})
            return None
        failure = self._cooling(groups)
        if failure is not None:
            flow.response = self._failure_response(flow, failure, host)
            return None
        retry = self._spend_budget(flow, groups)
        if retry is not None:
            flow.response = self._budget_response(flow, host, retry)
            return None
        strategy = next((g.wake_strategy for g in groups if g.wake_strategy), config.strategy)
        wakes = [self.wake(g) for g in groups]
        if strategy != "hold" and is_navigation(request):
            flow.response = self._waking_page(flow, host, wakes)
            return None
        return self._hold(flow, site, host, wakes, forward)

    def _spend_budget(self, flow: http.HTTPFlow, groups: list[Group]) -> float | None:
        """Starting a wake costs the client one of wake.per_client per minute; joining one is free.
        Returns None when allowed, else the seconds until the client may start one."""
        if all(g.name in self._wakes for g in groups):
            return None
        ip = pages.client_ip(flow)
        if self.runtime.config.forwarded.trusts(ip):
            # Behind a trusted proxy the budget belongs to the client it names, not to the proxy.
            xff = flow.request.headers.get("x-forwarded-for", "")
            ip = xff.rsplit(",", 1)[-1].strip() or ip
        retry = self.budget.take(client_key(ip), time.monotonic())
        if retry is not None:
            self._budget_refused += 1
            now = time.monotonic()
            if now - self._budget_logged_at >= BUDGET_LOG_INTERVAL:
                logger.warning(f"wake budget: {self._budget_refused} wake(s) refused in the last "
                               f"{BUDGET_LOG_INTERVAL:.0f} s (wake.per_client = {self.budget.per_window} a minute; "
                               f"latest from {client_key(ip)})")
                self._budget_logged_at, self._budget_refused = now, 0
        return retry

    def _budget_response(self, flow: http.HTTPFlow, host: str, retry: float) -> http.Response:
        return pages.error_response(
            flow.request, 429, "Too many wake-ups",
            f"This client has started too many sleeping sites in the last minute; '{host}' was not started.",
            f"Try again in {retry:.0f} s.", host, {"Retry-After": f"{retry:.0f}"})

    def control(self, flow: http.HTTPFlow, site: Site, host: str) -> Coroutine[Any, Any, None] | None:
        """The reserved path the waking page long-polls: `/__wakeproxy/wait`."""
        if flow.request.path.split("?", 1)[0] != WAIT_PATH:
            flow.response = http.Response.make(404, b"unknown wakeproxy control path\n", {"Content-Type": "text/plain"})
            return None
        return self._wait_endpoint(flow, site, host)

    def is_waking(self, group: str) -> bool:
        return group in self._wakes

    def busy(self, site: Site) -> bool:
        """Is a group behind `site` waking or being put to sleep? Then requests join the wake:
        "running" in Docker's view does not yet mean the app answers."""
        if not self._wakes and not self.runtime.stopping:
            return False  # the common case, checked on every request
        return any(g in self._wakes or g in self.runtime.stopping for g in site.groups)

    # --- waking ------------------------------------------------------------------------

    def wake(self, group: Group) -> Wake:
        """The running wake of `group`, or a new one."""
        wake = self._wakes.get(group.name)
        if wake is not None:
            return wake
        timeout = group.wake_timeout or self.runtime.config.wake.timeout
        wake = Wake(group.name, group.members, time.monotonic() + timeout)
        wake.task = asyncio.get_running_loop().create_task(self._run(wake), name=f"wake {group.name}")
        wake.task.add_done_callback(functools.partial(self._finished, wake))
        self._wakes[group.name] = wake
        logger.info(f"wake {group.name}: starting {len(group.members)} container(s)")
        return wake

    async def wake_until_ready(self, group: Group) -> None:
        """Wake `group` (or join its wake) and return when it is ready; raises WakeFailed. For
        requests already on their way to a container that stopped under them (upstream.py)."""
        failure = self._cooling([group])
        if failure is not None:
            raise failure
        wake = self.wake(group)
        assert wake.task is not None
        try:
            await asyncio.shield(wake.task)
        except WakeFailed:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:  # an internal error, logged by _finished
            raise WakeFailed(502, "Wake-up failed", str(e)) from None

    def _finished(self, wake: Wake, task: asyncio.Task[None]) -> None:
        if self._wakes.get(wake.group) is wake:
            del self._wakes[wake.group]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            logger.info(f"wake {wake.group}: ready ({wake.timing()})")
            return
        if not isinstance(exc, WakeFailed):
            logger.error(f"wake {wake.group}: internal error", exc_info=exc)
            exc = WakeFailed(502, "Wake-up failed", f"wakeproxy could not start '{wake.group}': {exc}")
        wake.fail(exc)
        logger.warning(f"wake {wake.group}: {exc.message} ({wake.timing()})")
        if exc.status == 502:
            self._cooldown[wake.group] = (time.monotonic() + self.runtime.config.wake.retry_after, exc)

    async def _run(self, wake: Wake) -> None:
        remaining = wake.deadline - time.monotonic()
        body = asyncio.ensure_future(self._bring_up(wake))
        failed = asyncio.ensure_future(wake.failed_event.wait())
        try:
            done, _ = await asyncio.wait({body, failed}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (body, failed):
                if not t.done():
                    t.cancel()
        if wake.failure is not None:
            raise wake.failure
        if body in done:
            body.result()  # re-raises a WakeFailed from inside
            return
        missing = "; ".join(f"{n}: {s}" for n, s in wake.status.items() if s != "ready") or "unknown"
        raise WakeFailed(
            504, "Wake-up timed out",
            f"'{wake.group}' was not ready after {wake.deadline - wake.t0:.0f} s. Still missing: {missing}.",
        )

    async def _bring_up(self, wake: Wake) -> None:
        stopping = self.runtime.stopping.get(wake.group)
        if stopping is not None:
            # The idle keeper is putting this group to sleep: let it finish, then start it again.
            wake.status = {"group": "finishing an idle stop before starting again"}
            await asyncio.wait([stopping])
            await self.runtime.changed(0.2)  # let the stop's events reach the snapshot
            wake.status = {}
        snap = self.runtime.snapshot
        infos = [snap.containers[c] for c in wake.members if c in snap.containers]
        by_service = {
            snap.settings[i.id].service: i.id for i in infos if i.id in snap.settings and snap.settings[i.id].service
        }
        # The order is the group's (Group.start_order): a dependency counts only when it is in an
        # earlier layer. Members that depend on each other (a cycle) share a layer: started together.
        group = snap.groups.get(wake.group)
        layers = group.start_order(snap) if group is not None else [list(wake.members)]
        layer_of = {cid: n for n, layer in enumerate(layers) for cid in layer}
        for cycle in group.cycles(snap) if group is not None else ():
            names = ", ".join(snap.containers[c].name for c in cycle if c in snap.containers)
            logger.warning(f"wake {wake.group}: {names} depend on each other (depends_on has a cycle); "
                           "starting them together")
        started: dict[str, asyncio.Future[None]] = {}

        async def bring(info: ContainerInfo) -> None:
            for dep in snap.settings[info.id].depends_on if info.id in snap.settings else ():
                dep_id = by_service.get(dep.service)
                if dep_id is None or dep_id == info.id or layer_of.get(dep_id, -1) >= layer_of.get(info.id, 0):
                    continue
                await started[dep_id]
                wake.status[info.name] = f"waiting for {dep.service} ({dep.condition.replace('service_', '')})"
                await self._until(wake, lambda s, d=dep_id, c=dep.condition: self._condition(wake, s, d, c))
            await self._start(wake, info.id)

        for info in infos:
            started[info.id] = asyncio.get_running_loop().create_future()

        async def bring_and_signal(info: ContainerInfo) -> None:
            try:
                await bring(info)
            finally:
                if not started[info.id].done():
                    started[info.id].set_result(None)

        await asyncio.gather(*(bring_and_signal(i) for i in infos))
        wake.mark("start calls")
        await self._until(wake, lambda s: self._group_ready(wake, s))

    async def _start(self, wake: Wake, cid: str) -> None:
        info = self.runtime.snapshot.containers.get(cid)
        if info is None:
            raise WakeFailed(502, "Wake-up failed", f"container {cid[:12]} was removed while waking")
        wake.starting.add(cid)
        try:
            if info.state == "paused":
                wake.status[info.name] = "unpausing"
                try:
                    await self.ops.unpause(cid, info.name)
                except DockerOpError as e:
                    if "not paused" not in str(e):
                        raise
                    await self.ops.start(cid, info.name)  # someone unpaused it since the snapshot
            else:
                # Also when the snapshot says "running": it may lag a stop by a few ms, and
                # starting a running container is a no-op for Docker.
                wake.status[info.name] = "starting"
                await self.ops.start(cid, info.name)
        except DockerOpError as e:
            raise WakeFailed(502, "Wake-up failed", str(e)) from None

    async def _until(self, wake: Wake, check: Any) -> None:
        """Re-evaluate `check(snapshot)` on every new snapshot and every probe interval until it holds."""
        interval = PROBE_INTERVAL
        while True:
            if await check(self.runtime.snapshot):
                return
            await self.runtime.changed(interval)
            interval = min(interval * 1.25, PROBE_INTERVAL_MAX)

    async def _condition(self, wake: Wake, snap: Snapshot, cid: str, condition: str) -> bool:
        info = snap.containers.get(cid)
        if info is None:
            raise WakeFailed(502, "Wake-up failed", f"dependency {cid[:12]} was removed while waking")
        if condition == "service_completed_successfully":
            return cid in wake.completed  # set by its `die` event with exit code 0
        if info.state != "running":
            return False
        return condition == "service_started" or info.health in (None, "healthy")

    async def _group_ready(self, wake: Wake, snap: Snapshot) -> bool:
        group = snap.groups.get(wake.group)
        if group is None:
            raise WakeFailed(502, "Wake-up failed", f"the containers of '{wake.group}' were removed while waking")
        infos = [i for cid in wake.members if (i := snap.containers.get(cid)) is not None]
        if all(i.state == "running" or i.id in wake.completed for i in infos):
            wake.mark("running")
            if all(i.health in (None, "healthy") for i in infos):
                wake.mark("healthy")
        status = {i.id: self._member_status(wake, i, i.id in group.routed, snap) for i in infos}
        probes = [
            self._probe(wake, cid, b)
            for cid, st in status.items() if st is None
            for b in snap.endpoints.get(cid, ()) if (cid, b.port) not in wake.port_ready
        ]
        if probes:
            await asyncio.gather(*probes)
        ready = True
        for info in infos:
            st = status[info.id]
            if st is None:
                waiting = [b.port for b in snap.endpoints.get(info.id, ()) if (info.id, b.port) not in wake.port_ready]
                st = f"running, not yet accepting connections on port {waiting[0]}" if waiting else "ready"
            wake.status[info.name] = st
            ready = ready and st == "ready"
        if ready:
            wake.mark("port ready")
        return ready

    def _member_status(self, wake: Wake, info: ContainerInfo, routed: bool, snap: Snapshot) -> str | None:
        """What keeps this member from being ready; None when only its port probes remain."""
        if not routed and info.id in wake.completed:
            return "ready"  # a one-shot helper (migrations, setup) that finished with exit code 0
        if info.state != "running":
            return f"{info.state}, not running yet"
        if info.health == "unhealthy":
            raise WakeFailed(502, "Wake-up failed", f"container '{info.name}' is unhealthy")
        if info.health not in (None, "healthy"):
            return f"running, health: {info.health}"
        if not routed:
            return "ready"
        endpoints = snap.endpoints.get(info.id, ())
        problem = next((b.problem for b in endpoints if b.problem), None)
        if problem:
            raise WakeFailed(502, "Site unreachable", problem)
        if not endpoints or any(b.address is None for b in endpoints):
            return "running, waiting for its network address"
        return None

    async def _probe(self, wake: Wake, cid: str, backend: Backend) -> None:
        assert backend.address is not None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(backend.address, backend.port), PROBE_CONNECT_TIMEOUT
            )
        except (TimeoutError, OSError):
            return
        try:
            if backend.ready_path and not await self._ready_path_ok(backend):
                return
            wake.port_ready.add((cid, backend.port))
        finally:
            writer.close()

    async def _ready_path_ok(self, backend: Backend) -> bool:
        """GET the container's wakeproxy.ready-path: anything below 500 counts as ready."""
        assert backend.address is not None and backend.ready_path is not None
        context = None
        if backend.scheme == "https":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(backend.address, backend.port, ssl=context), 2
            )
        except (TimeoutError, OSError, ssl.SSLError):
            return False
        try:
            writer.write(
                f"GET {backend.ready_path} HTTP/1.1\r\nHost: {backend.address}\r\nConnection: close\r\n"
                f"User-Agent: wakeproxy-readiness\r\n\r\n".encode()
            )
            line = await asyncio.wait_for(reader.readline(), 2)
            parts = line.split()
            return len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) < 500
        except (TimeoutError, OSError, ssl.SSLError, ValueError):
            return False
        finally:
            writer.close()  # also when the app never answers: no half-open probe is left behind

    def _on_event(self, event: ContainerEvent) -> None:
        for wake in self._wakes.values():
            if event.container_id not in wake.members:
                continue
            if event.action in ("start", "unpause") and event.container_id in wake.starting:
                wake.started.add(event.container_id)
            # A `die` counts only after this wake's own start: the event of the stop that put the
            # group to sleep can still be on its way when the next wake begins.
            elif event.action == "die" and event.container_id in wake.started:
                routed = event.container_id in self.runtime.snapshot.groups.get(wake.group, Group("", (), frozenset())).routed
                if event.exit_code == 0 and not routed:
                    wake.completed.add(event.container_id)
                    continue
                wake.fail(WakeFailed(
                    502, "Wake-up failed",
                    f"container '{event.name}' exited with code {event.exit_code} while starting",
                ))
            elif event.action == "health_status" and event.health == "unhealthy":
                wake.fail(WakeFailed(502, "Wake-up failed", f"container '{event.name}' turned unhealthy while starting"))

    # --- helpers -----------------------------------------------------------------------

    def _groups(self, site: Site) -> list[Group]:
        snap = self.runtime.snapshot
        return [snap.groups[g] for g in site.groups if g in snap.groups]

    def _cooling(self, groups: list[Group]) -> WakeFailed | None:
        now = time.monotonic()
        for g in groups:
            entry = self._cooldown.get(g.name)
            if entry is not None:
                if entry[0] > now:
                    return entry[1]
                del self._cooldown[g.name]
        return None

    def _failure_response(self, flow: http.HTTPFlow, failure: WakeFailed, host: str) -> http.Response:
        request = flow.request
        if not self.runtime.config.shows_detail(pages.client_ip(flow)):
            title, message, hint = _PUBLIC_FAILURE.get(failure.status, _PUBLIC_FAILURE[502])
            return pages.error_response(request, failure.status, title, message.format(host=pages.bounded(host)),
                                        hint, host)
        hint = {
            502: "Look at the container's logs (docker logs NAME). wakeproxy tries again after a "
                 f"cool-down of {self.runtime.config.wake.retry_after:.0f} s.",
            504: "The app may need longer to start: raise wake.timeout or the wakeproxy.wake-timeout label, "
                 "or check the container's logs.",
        }.get(failure.status, "")
        return pages.error_response(request, failure.status, failure.title, failure.message, hint, host)

    async def _hold(self, flow: http.HTTPFlow, site: Site, host: str, wakes: list[Wake], forward: Any) -> None:
        try:
            await asyncio.gather(*(asyncio.shield(w.task) for w in wakes if w.task is not None))
        except WakeFailed as e:
            flow.response = self._failure_response(flow, e, host)
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # an internal error has been logged by _finished
            flow.response = self._failure_response(flow, WakeFailed(502, "Wake-up failed", str(e)), host)
            return
        flow.metadata["wakeproxy.wake"] = wakes[0]  # the router logs the first byte's timing
        forward(flow, site)

    def _waking_page(self, flow: http.HTTPFlow, host: str, wakes: list[Wake]) -> http.Response:
        detail = self.runtime.config.shows_detail(pages.client_ip(flow))
        names = ", ".join(w.group for w in wakes) if detail else ""
        return pages.waking_response(flow.request, host, names, WAIT_PATH)

    async def _wait_endpoint(self, flow: http.HTTPFlow, site: Site, host: str) -> None:
        """Long-poll for the waking page: "waking", "ready" or "failed". Anonymous clients learn
        only that; debug_clients also get what each container is doing and why a wake failed."""
        config = self.runtime.config
        detail = config.shows_detail(pages.client_ip(flow))

        def answer(state: str, status: int = 200, headers: dict[str, str] | None = None, **extra: Any) -> None:
            body = {"state": state, **(extra if detail else {})}
            flow.response = http.Response.make(
                status, json.dumps(body),
                {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})},
            )

        if site.ready_backends and not self.busy(site):
            return answer("ready")
        groups = self._groups(site)
        if not groups or not self.runtime.manage or (config.wake.ignore_user_agents and config.wake.ignores(flow.request.headers.get("user-agent", ""))):
            return answer("failed", 503, {"Retry-After": "60"}, title="Site asleep",
                          message=f"No container behind '{host}' may be started by this client.")
        failure = self._cooling(groups)
        if failure is not None:
            return answer("failed", title=failure.title, message=failure.message)
        retry = self._spend_budget(flow, groups)
        if retry is not None:
            return answer("failed", 429, {"Retry-After": f"{retry:.0f}"}, title="Too many wake-ups",
                          message=f"Try again in {retry:.0f} s.")
        wakes = [self.wake(g) for g in groups]
        tasks = [w.task for w in wakes if w.task is not None]
        poll = min(LONG_POLL, min((w.deadline - time.monotonic() for w in wakes), default=LONG_POLL))
        # (asyncio.wait never cancels what it waits for, and the tasks' outcome is read below or by
        # Waker._finished: no shield, whose unread copy of a failure would be logged at exit.)
        done, _ = await asyncio.wait(tasks, timeout=max(0.0, poll))
        for w in wakes:
            if w.failure is not None:
                f = w.failure
                return answer("failed", title=f.title, message=f.message)
        if len(done) == len(tasks):
            failed = [t for t in tasks if not t.cancelled() and t.exception() is not None]
            if not failed:
                return answer("ready")
            return answer("failed", title="Wake-up failed", message=str(failed[0].exception()))
        return answer("waking", containers={n: s for w in wakes for n, s in w.status.items()})
