"""Waker addon: the request side of waking a sleeping group; the wake itself is orchestrator.py.

A request for a site whose containers sleep is held until the group is ready and then
forwarded unchanged, or (a browser navigating, per `wake.strategy`) answered with the waking
page, which long-polls `/__wakeproxy/wait`. Starting a wake spends the client's budget
(`budget`); joining one is free. Anonymous clients learn only the host and waking / ready /
failed; `debug_clients` also get the containers' progress and why a wake failed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from typing import Any

from mitmproxy import http

from wakeproxy import pages
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.snapshot import Group, Site
from wakeproxy.runtime import Runtime
from wakeproxy.wake.budget import WakeBudget, client_key
from wakeproxy.wake.orchestrator import ContainerOps, Orchestrator, Wake, WakeFailed

logger = get_logger(__name__)

CONTROL_PREFIX = "/__wakeproxy/"
WAIT_PATH = CONTROL_PREFIX + "wait"
LONG_POLL = 20.0  # the waking page's readiness request is answered within this long (at most wake.timeout)

# What an anonymous visitor is told when a wake fails (the detail goes to debug_clients and the log).
_PUBLIC_FAILURE = {
    502: ("Wake-up failed", "The site '{host}' could not be started.",
          "Try again in a minute. If it keeps failing, tell the people who run this site."),
    504: ("Wake-up timed out", "The site '{host}' did not become ready in time.",
          "Reload the page to try again."),
    429: ("Too many wake-ups", "This client has started too many sleeping sites in the last minute; "
          "'{host}' was not started.", "Try again in a minute."),
    503: ("Site asleep", "The site '{host}' is asleep and cannot be woken right now.",
          "Try again in a minute."),
}


def is_navigation(request: http.Request) -> bool:
    """A browser loading a page (not fetch/XHR, not an API client)."""
    if request.method != "GET":
        return False
    mode = request.headers.get("sec-fetch-mode")
    if mode is not None and mode != "navigate":
        return False
    return "text/html" in request.headers.get("accept", "")


class Waker:
    """The request side of waking: hold the request or serve the waking page, the wait endpoint,
    the wake budget per client, and the pages that say what happened. The wake itself is the
    orchestrator's."""

    def __init__(self, runtime: Runtime, core: Orchestrator | None = None) -> None:
        self.runtime = runtime
        # One process: our own orchestrator over Docker. A serving worker passes the one that asks
        # the controller (planes.worker), and never imports the Docker side.
        self._docker_ops = core is None
        if core is None:
            from wakeproxy.docker.ops import DockerOps

            core = Orchestrator(runtime, DockerOps(runtime.config.docker))
        self.core = core
        self.budget = WakeBudget(runtime.config.wake.per_client)

    # --- addon hooks ------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        if "wakeproxy_config" in updated:
            if self._docker_ops:
                from wakeproxy.docker.ops import DockerOps

                self.core.ops = DockerOps(self.runtime.config.docker)
            self.budget = WakeBudget(self.runtime.config.wake.per_client)

    def done(self) -> None:
        self.core.cancel_all()

    # --- the orchestrator's, for the router, the idle keeper, status and upstream ---------------

    @property
    def ops(self) -> ContainerOps:
        return self.core.ops

    @ops.setter
    def ops(self, ops: ContainerOps) -> None:
        self.core.ops = ops

    @property
    def _wakes(self) -> dict[str, Wake]:
        return self.core._wakes

    def is_waking(self, group: str) -> bool:
        return self.core.is_waking(group)

    def busy(self, site: Site) -> bool:
        return self.core.busy(site)

    def wake(self, group: Group, client: str = "") -> Wake:
        return self.core.wake(group, client)

    async def wake_until_ready(self, group: Group) -> None:
        await self.core.wake_until_ready(group)

    # --- what the router calls ----------------------------------------------------

    def asleep(self, flow: http.HTTPFlow, site: Site, host: str, forward: Any) -> Coroutine[Any, Any, None] | None:
        """Answer a request for `site`, whose backends are all asleep.

        Returns None when `flow.response` is set at once (page, refusal), or a
        coroutine that holds the request until the group is up and then calls
        `forward(flow, site)`.
        """
        config = self.runtime.config.wake
        request = flow.request
        groups = self.core.groups_of(site)
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
        failure = self.core.cooling(groups)
        if failure is not None:
            flow.response = self._failure_response(flow, failure, host)
            return None
        retry = self._spend_budget(flow, groups)
        if retry is not None:
            flow.response = self._budget_response(flow, host, retry)
            return None
        strategy = next((g.wake_strategy for g in groups if g.wake_strategy), config.strategy)
        client = self._client(flow)
        wakes = [self.core.wake(g, client) for g in groups]
        if strategy != "hold" and is_navigation(request):
            flow.response = self._waking_page(flow, host, wakes)
            return None
        return self._hold(flow, site, host, wakes, forward)

    def _client(self, flow: http.HTTPFlow) -> str:
        """Whose wake budget a request spends: its client, or behind a trusted proxy the client it names."""
        ip = pages.client_ip(flow)
        if self.runtime.config.forwarded.trusts(ip):
            xff = flow.request.headers.get("x-forwarded-for", "")
            ip = xff.rsplit(",", 1)[-1].strip() or ip
        return client_key(ip)

    def _spend_budget(self, flow: http.HTTPFlow, groups: list[Group]) -> float | None:
        """Starting a wake costs the client one of wake.per_client per minute; joining one is free.
        Returns None when allowed, else the seconds until the client may start one. (A worker's
        core spends it in the controller, across all workers.)"""
        if self.core.remote_budget or all(g.name in self._wakes for g in groups):
            return None
        return self.budget.spend(self._client(flow), time.monotonic())

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














    def _failure_response(self, flow: http.HTTPFlow, failure: WakeFailed, host: str) -> http.Response:
        request = flow.request
        retry = {"Retry-After": f"{failure.retry_after:.0f}"} if failure.retry_after is not None else None
        if not self.runtime.config.shows_detail(pages.client_ip(flow)):
            title, message, hint = failure.public or _PUBLIC_FAILURE.get(failure.status, _PUBLIC_FAILURE[502])
            return pages.error_response(request, failure.status, title, message.format(host=pages.bounded(host)),
                                        hint, host, retry)
        hint = {
            502: "Look at the container's logs (docker logs NAME). wakeproxy tries again after a "
                 f"cool-down of {self.runtime.config.wake.retry_after:.0f} s.",
            504: "The app may need longer to start: raise wake.timeout or the wakeproxy.wake-timeout label, "
                 "or check the container's logs.",
        }.get(failure.status, "")
        return pages.error_response(request, failure.status, failure.title, failure.message, hint, host, retry)

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
        groups = self.core.groups_of(site)
        if not groups or not self.runtime.manage or (config.wake.ignore_user_agents and config.wake.ignores(flow.request.headers.get("user-agent", ""))):
            return answer("failed", 503, {"Retry-After": "60"}, title="Site asleep",
                          message=f"No container behind '{host}' may be started by this client.")
        failure = self.core.cooling(groups)
        if failure is not None:
            return answer("failed", title=failure.title, message=failure.message)
        retry = self._spend_budget(flow, groups)
        if retry is not None:
            return answer("failed", 429, {"Retry-After": f"{retry:.0f}"}, title="Too many wake-ups",
                          message=f"Try again in {retry:.0f} s.")
        client = self._client(flow)
        wakes = [self.core.wake(g, client) for g in groups]
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
