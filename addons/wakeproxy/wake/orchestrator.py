"""The wake core: bring a group up, once, and learn the moment it is ready (no mitmproxy here).

Single flight: one `Wake` per group, shared by every request that arrives while it runs.
Members start in the group's order (`Group.start_order`: Compose `depends_on`, waiting for
`service_started` / `service_healthy` / `service_completed_successfully`; members that depend
on each other start together). Readiness is pushed, not polled slowly: each new snapshot (every
Docker event) re-evaluates the group at once, and between snapshots the backend ports are probed
every 50 ms (`readiness`). A member that dies or turns unhealthy fails the wake at once and the
group gets a cool-down instead of a restart loop.

The containers are changed only through a `ContainerOps` (start, unpause): `docker.ops` in the
proxy, a fake in the unit tests. What the client sees (pages, holding, the wait endpoint) is the
`waker` addon's business.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.labels import PROJECT_LABEL, SERVICE_LABEL, ContainerInfo
from wakeproxy.routing.snapshot import Backend, Group, Site, Snapshot
from wakeproxy.runtime import ContainerEvent, Runtime
from wakeproxy.wake import readiness

logger = get_logger(__name__)

RECENT_MAX = 5000  # groups whose last wake is remembered (for the status page)
PROBE_INTERVAL = 0.05  # seconds between readiness checks when no Docker event arrives
PROBE_INTERVAL_MAX = 0.2


class OpError(Exception):
    """A container operation failed; the message names the container and the engine's explanation.
    `status`: the answer a wake gets for it (502; 503 when the engine is out of something: try later)."""

    def __init__(self, message: str, status: int = 502, title: str = "Wake-up failed") -> None:
        super().__init__(message)
        self.status, self.title = status, title


@dataclass(frozen=True)
class Attachment:
    """A container to connect to a network made again, under its Compose service's name (its alias)."""

    container_id: str
    name: str
    alias: str  # "" : none


class ContainerOps(Protocol):
    """What a wake needs from the engine (docker.ops.DockerOps in the proxy)."""

    async def start(self, container_id: str, name: str) -> None: ...

    async def unpause(self, container_id: str, name: str) -> None: ...

    async def scale(self, service_id: str, name: str, replicas: int) -> None:
        """A Swarm service to at least `replicas` (never fewer than it has)."""
        ...

    async def recreate_network(self, network: str, project: str, attach: tuple[Attachment, ...]) -> None:
        """Create the removed network `network` of Compose project `project` (a bridge with Compose's
        labels) and connect `attach` to it; never a network that exists."""
        ...


class Member(enum.Enum):
    """Where one member of a waking group is (readiness is decided on this, never on a text)."""

    NOT_RUNNING = "not running yet"
    HEALTH = "waiting for its health check"
    ADDRESS = "waiting for its network address"
    PORT = "not yet accepting connections"
    READY = "ready"


class WakeFailed(Exception):
    """A wake that cannot succeed: the HTTP status, a title and a message (with internal detail)."""

    def __init__(self, status: int, title: str, message: str, retry_after: float | None = None,
                 public: tuple[str, str, str] | None = None, cools: bool | None = None) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message
        self.retry_after = retry_after  # seconds, for a Retry-After header (429, 503)
        self.public = public  # (title, message with {host}, hint) for anonymous clients, else the status's own
        # Not tried again before wake.retry_after: a failed start (502), or anything the engine refused.
        self.cools = status == 502 if cools is None else cools


# wake.autostart: false (Docksal's PROJECT_AUTOSTART=0): not a failure that passes, so no Retry-After.
AUTOSTART_OFF = WakeFailed(
    503, "Sandbox stopped",
    "This server does not start sleeping sites on request (wake.autostart is false, or PROJECT_AUTOSTART=0). "
    "Start its containers by hand: docker compose start, fin project start, docker start NAME.",
    public=("Sandbox stopped", "The site '{host}' is stopped, and this server does not start it on request.",
            "Ask the people who run this site to start it."))


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
    port_ready: set[tuple[str, str, int]] = field(default_factory=set)  # (member, address, port) that answered
    status: dict[str, str] = field(default_factory=dict)  # member name → what it is doing
    marks: dict[str, float] = field(default_factory=dict)  # phase → seconds since t0
    failure: WakeFailed | None = None
    client: str = ""  # whose request started it (the controller spends that client's wake budget)
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



def _reachable_endpoints(snap: Snapshot, member: str) -> tuple[Backend, ...]:
    """A routed member's backends; a 502 WakeFailed when the snapshot says it cannot be reached."""
    endpoints = snap.endpoints.get(member, ())
    problem = next((b.problem for b in endpoints if b.problem), None)
    if problem:
        raise WakeFailed(502, "Site unreachable", problem)
    return endpoints


async def _attached(snap: Snapshot, remade: dict[str, str]) -> bool:
    """Does the snapshot show each member (that still exists) on the network made for it (member → network)?"""
    return all(net in info.networks for cid, net in remade.items() if (info := snap.containers.get(cid)) is not None)


def replicas_of(snap: Snapshot, service_id: str) -> int:
    """How many replicas a service is woken to: its replicas label (capped by the policy), else 1."""
    st = snap.settings.get(service_id)
    return st.replicas if st is not None and st.replicas else 1


def wake_fields(wake: Wake, result: str, status: int | None = None) -> dict[str, Any]:
    """A wake's line as structured fields (log.format json): its group, result and each phase in ms."""
    out: dict[str, Any] = {"event": "wake", "group": wake.group, "result": result,
                           "ms": {k.replace(" ", "_"): round(v * 1000) for k, v in wake.marks.items()}}
    if status is not None:
        out["status"] = status
    return {"wakeproxy": out}


def members_text(snap: Snapshot, group: Group) -> str:
    """"3 container(s)", "1 service(s)", or "2 container(s) and 1 service(s)": what a group is made of."""
    services = sum(1 for cid in group.members if (i := snap.containers.get(cid)) is not None and i.is_service)
    containers = len(group.members) - services
    if not services:
        return f"{containers} container(s)"
    return f"{services} service(s)" if not containers else f"{containers} container(s) and {services} service(s)"


class Orchestrator:
    """Single-flight wakes of groups, from the runtime's snapshots and container events."""

    remote_budget = False  # True where the wake budget is spent elsewhere (a worker: the controller's)
    log_outcomes = True

    def __init__(self, runtime: Runtime, ops: ContainerOps) -> None:
        self.runtime = runtime
        self.ops = ops
        self._wakes: dict[str, Wake] = {}
        self._cooldown: dict[str, tuple[float, WakeFailed]] = {}
        self.watchers: list[Callable[[], None]] = []  # told when a wake starts or ends
        self.outcomes: list[Callable[[Wake, str, float], None]] = []  # (wake, "ok" | "timeout" | "error", seconds)
        self.recent: dict[str, tuple[float, str, str]] = {}  # group → (when, result, timing) of its last wake
        runtime.listeners.append(self._on_event)

    def _tell(self) -> None:
        for watcher in self.watchers:
            watcher()

    def cancel_all(self) -> None:
        for wake in self._wakes.values():
            if wake.task is not None:
                wake.task.cancel()

    def is_waking(self, group: str) -> bool:
        return group in self._wakes

    def busy(self, site: Site) -> bool:
        """Is a group behind `site` waking or being put to sleep? Then requests join the wake:
        "running" in Docker's view does not yet mean the app answers."""
        if not self._wakes and not self.runtime.stopping:
            return False  # the common case, checked on every request
        return any(g in self._wakes or g in self.runtime.stopping for g in site.groups)

    def wake(self, group: Group, client: str = "") -> Wake:
        """The running wake of `group`, or a new one (`client`: whose request starts it)."""
        wake = self._wakes.get(group.name)
        if wake is not None:
            return wake
        timeout = group.wake_timeout or self.runtime.config.wake.timeout
        wake = Wake(group.name, group.members, time.monotonic() + timeout, client=client)
        wake.task = asyncio.get_running_loop().create_task(self._run(wake), name=f"wake {group.name}")
        wake.task.add_done_callback(functools.partial(self._finished, wake))
        self._wakes[group.name] = wake
        if self.log_outcomes:
            logger.info(f"wake {group.name}: starting {members_text(self.runtime.snapshot, group)}")
        self._tell()
        return wake

    async def wake_until_ready(self, group: Group) -> None:
        """Wake `group` (or join its wake) and return when it is ready; raises WakeFailed. For
        requests already on their way to a container that stopped under them (upstream.py)."""
        failure = self.cooling([group])
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
        try:
            self._conclude(wake, task)
        finally:
            if self._wakes.get(wake.group) is wake:
                del self._wakes[wake.group]
                self._tell()  # (after the cool-down is set: watchers see both)

    def _conclude(self, wake: Wake, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        result = "ok" if exc is None else "timeout" if isinstance(exc, WakeFailed) and exc.status == 504 else "error"
        for told in self.outcomes:
            told(wake, result, time.monotonic() - wake.t0)
        self.recent.pop(wake.group, None)
        self.recent[wake.group] = (time.time(), result, wake.timing())
        if len(self.recent) > RECENT_MAX:
            del self.recent[next(iter(self.recent))]  # the oldest
        if exc is None:
            if self.log_outcomes:
                logger.info(f"wake {wake.group}: ready ({wake.timing()})", extra=wake_fields(wake, "ready"))
            return
        if not isinstance(exc, WakeFailed):
            logger.error(f"wake {wake.group}: internal error", exc_info=exc)
            exc = WakeFailed(502, "Wake-up failed", f"wakeproxy could not start '{wake.group}': {exc}")
        wake.fail(exc)
        if self.log_outcomes:
            logger.warning(f"wake {wake.group}: {exc.message} ({wake.timing()})",
                           extra=wake_fields(wake, "timeout" if exc.status == 504 else "failed", exc.status))
        if exc.cools:  # a failed start, or an engine that refused (out of addresses): not again at once
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
        remade = await self._recreate_networks(wake, snap)
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
        if remade:
            # Docker tells of a stopped container's connect by no event: only the start's inspect shows it,
            # and until then the member looks unreachable (its network exists, it is not on it).
            await self._until(wake, lambda s: _attached(s, remade))
        await self._until(wake, lambda s: self._group_ready(wake, s))

    async def _recreate_networks(self, wake: Wake, snap: Snapshot) -> dict[str, str]:
        """Make the removed `<project>_default` networks the group needs again (Docksal's stop removes
        them) and connect the project's stopped containers to them. Returns member → network made."""
        remade: dict[str, str] = {}
        for net, cids in snap.networks_to_recreate(wake.members).items():
            infos = [i for c in cids if (i := snap.containers.get(c)) is not None]
            if not infos:
                continue
            project = infos[0].labels.get(PROJECT_LABEL) or ""
            attach = tuple(Attachment(i.id, i.name, i.labels.get(SERVICE_LABEL) or "") for i in infos)
            wake.status["network"] = f"creating network {net} (it was removed)"
            try:
                await self.ops.recreate_network(net, project, attach)
            except OpError as e:
                raise WakeFailed(e.status, e.title, str(e), cools=True) from None
            logger.info(f"wake {wake.group}: network {net} did not exist; created it and connected "
                        f"{', '.join(i.name for i in infos)}")
            del wake.status["network"]
            wake.mark("network")
            remade.update((i.id, net) for i in infos if i.id in wake.members)
        return remade

    async def _start(self, wake: Wake, cid: str) -> None:
        info = self.runtime.snapshot.containers.get(cid)
        if info is None:
            raise WakeFailed(502, "Wake-up failed", f"container {cid[:12]} was removed while waking")
        wake.starting.add(cid)
        try:
            if info.is_service:
                if info.replicas is not None:  # a global service runs where it runs: nothing to scale
                    target = replicas_of(self.runtime.snapshot, cid)
                    wake.status[info.name] = f"scaling to {target} replica(s)"
                    await self.ops.scale(cid, info.name, target)
            elif info.state == "paused":
                wake.status[info.name] = "unpausing"
                try:
                    await self.ops.unpause(cid, info.name)
                except OpError as e:
                    if "not paused" not in str(e):
                        raise
                    await self.ops.start(cid, info.name)  # someone unpaused it since the snapshot
            else:
                # Also when the snapshot says "running": it may lag a stop by a few ms, and
                # starting a running container is a no-op for Docker.
                wake.status[info.name] = "starting"
                await self.ops.start(cid, info.name)
        except OpError as e:
            raise WakeFailed(e.status, e.title, str(e), cools=True) from None

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
        if all((len(i.running_tasks) >= replicas_of(snap, i.id) if i.is_service else i.state == "running")
               or i.id in wake.completed for i in infos):
            wake.mark("running")
            if all(i.health in (None, "healthy") for i in infos):
                wake.mark("healthy")
        states = {i.id: self._member_status(wake, i, i.id in group.routed, snap) for i in infos}
        probes = [
            self._probe(wake, cid, b)
            for cid, (st, _) in states.items() if st is Member.PORT
            for b in snap.endpoints.get(cid, ()) if b.address and (cid, b.address, b.port) not in wake.port_ready
        ]
        if probes:
            await asyncio.gather(*probes)
        ready = True
        for info in infos:
            st, text = states[info.id]
            if st is Member.PORT:
                waiting = [b for b in snap.endpoints.get(info.id, ())
                           if (info.id, b.address, b.port) not in wake.port_ready]
                if not waiting:
                    st, text = Member.READY, Member.READY.value
                elif info.is_service:
                    text = (f"{len(waiting)} task(s) running, not yet accepting connections on port {waiting[0].port}"
                            f" ({', '.join(sorted(b.container_name for b in waiting)[:5])})")
                else:
                    text = f"running, not yet accepting connections on port {waiting[0].port}"
            wake.status[info.name] = text
            ready = ready and st is Member.READY
        if ready:
            wake.mark("port ready")
        return ready

    def _member_status(self, wake: Wake, info: ContainerInfo, routed: bool, snap: Snapshot) -> tuple[Member, str]:
        """Where this member is, and how to say it (for the waking page and a 504's message).
        Member.PORT: only its port probes remain."""
        if info.is_service:
            return self._service_status(info, routed, snap)
        if not routed and info.id in wake.completed:
            return Member.READY, "ready"  # a one-shot helper (migrations, setup) that finished with exit code 0
        if info.state != "running":
            return Member.NOT_RUNNING, f"{info.state}, not running yet"
        if info.health == "unhealthy":
            raise WakeFailed(502, "Wake-up failed", f"container '{info.name}' is unhealthy")
        if info.health not in (None, "healthy"):
            return Member.HEALTH, f"running, health: {info.health}"
        if not routed:
            return Member.READY, "ready"
        endpoints = _reachable_endpoints(snap, info.id)
        if not endpoints or any(b.address is None for b in endpoints):
            return Member.ADDRESS, "running, waiting for its network address"
        return Member.PORT, "running, not yet accepting connections"

    def _service_status(self, info: ContainerInfo, routed: bool, snap: Snapshot) -> tuple[Member, str]:
        """A Swarm service: its running tasks reach the replicas it is woken to (a failing task is
        replaced by Swarm with a new one and a new address: followed, never counted as ready)."""
        running = info.running_tasks
        target = replicas_of(snap, info.id) if info.replicas is not None else max(1, len(info.tasks))
        if not routed and info.one_shot:
            # A one-shot helper (restart_policy: none / on-failure: a migration): scaled up, not waited for.
            # A stack has no depends_on to say "after it completed", and its task may be gone already.
            return Member.READY, "ready (one-shot: not waited for)"
        if len(running) < target:
            text = f"{len(running)} of {target} task(s) running"
            failing = next((t for t in info.tasks if t.error), None)
            starting = [t for t in info.tasks if t.state == "starting"]
            if failing is not None:
                text += f"; task {failing.name} {failing.state}: {failing.error}"
            elif starting:
                text += f"; {len(starting)} starting (health check, when it has one)"
                return Member.HEALTH, text
            return Member.NOT_RUNNING, text
        if not routed:
            return Member.READY, "ready"
        endpoints = _reachable_endpoints(snap, info.id)
        if len([b for b in endpoints if b.address]) < min(target, len(running)):
            return Member.ADDRESS, "tasks running, waiting for their network addresses"
        return Member.PORT, "tasks running, not yet accepting connections"

    async def _probe(self, wake: Wake, cid: str, backend: Backend) -> None:
        assert backend.address is not None
        if await readiness.ready(backend):
            wake.port_ready.add((cid, backend.address, backend.port))

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

    def groups_of(self, site: Site) -> list[Group]:
        snap = self.runtime.snapshot
        return [snap.groups[g] for g in site.groups if g in snap.groups]

    def cool_down(self, group: str, seconds: float, failure: WakeFailed) -> None:
        """Refuse wakes of `group` for `seconds` with `failure` (a worker: as the controller says)."""
        self._cooldown[group] = (time.monotonic() + seconds, failure)

    def cooling_now(self) -> dict[str, tuple[float, WakeFailed]]:
        """Groups in their cool-down: seconds left and the failure."""
        now = time.monotonic()
        return {g: (until - now, f) for g, (until, f) in self._cooldown.items() if until > now}

    def cooling(self, groups: list[Group]) -> WakeFailed | None:
        """Why `groups` may not be woken now, if they may not: wake.autostart is off, or a recent wake failed."""
        if not self.runtime.config.wake.autostart:
            return AUTOSTART_OFF
        now = time.monotonic()
        for g in groups:
            entry = self._cooldown.get(g.name)
            if entry is not None:
                if entry[0] > now:
                    return entry[1]
                del self._cooldown[g.name]
        return None
