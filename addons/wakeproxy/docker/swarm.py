"""The Swarm side of the Docker view: services and their tasks → `ContainerInfo` values of kind "service".

A service is a site's unit the way a container is: its labels are the *service's* (`deploy.labels` in a
stack file; the labels of task containers are never read: they exist only while a task runs, on its
node), its env is the service spec's (nginx-proxy's VIRTUAL_HOST), and its tasks are where requests go.
A service at 0 replicas keeps its routes: nothing here depends on a task existing.

Swarm emits no task events: service events say "look again" (they carry no labels, so the service is
re-read by ID; the `name` filter matches parts of names), the local node's container events of task
containers say "list this service's tasks again", and `poll_due` asks for a listing of every task
now and then (rescheduling, node loss and other nodes' tasks produce no event here): fast while a
service's running tasks differ from its replica count (a wake, a scale-down, a failing task), every
`docker.swarm_resync` while a service is up, rarely when all are asleep. Only the DockerView's
thread calls in here; every call is one listing (about 2 ms), never one per request.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Mapping
from typing import Any

import docker.errors

from wakeproxy.docker.fields import created_time, parse_env, parse_exposed
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.labels import SERVICE, ContainerInfo, TaskInfo

logger = get_logger(__name__)

FASTEST_POLL = 0.05  # seconds between task listings in the first FASTEST_FOR after a service's spec changed
FASTEST_FOR = 5.0  # (a wake: most tasks run within 1 s; each listing is ~2 ms)
FAST_POLL = 0.1  # … then this often while it is between states
FAST_FOR = 60.0  # … for at most this long after its spec last changed (a scale); then every SLOW_UNSETTLED
SLOW_UNSETTLED = 2.0
ASLEEP_POLL = 60.0  # every service at 0 replicas: only events can change that, this is a safety net
MAX_TASKS = 256  # tasks kept per service (a replicas label is capped far lower)
MAX_IMAGES = 512  # images whose exposed ports are remembered
IMAGE_MISS_AGAIN = 60.0  # an image the manager did not have is looked for again after this long
FAIL_BACKOFF_MAX = 30.0  # a Swarm listing that fails is tried again after 1, 2, 4 … up to this many seconds
_ERR_CHARS = 200


def swarm_role(info: Mapping[str, Any]) -> str:
    """`docker info` → "manager", "worker", or "none" (not in a swarm, or joining/leaving)."""
    swarm = info.get("Swarm") or {}
    if swarm.get("LocalNodeState") != "active":
        return "none"
    return "manager" if swarm.get("ControlAvailable") else "worker"


def _address(cidr: Any) -> str:
    try:
        return str(ipaddress.ip_interface(str(cidr)).ip)
    except ValueError:
        return ""


def task_from(data: Mapping[str, Any], service_name: str, net_names: Mapping[str, str]) -> TaskInfo:
    """One entry of `GET /tasks` → TaskInfo (addresses by network name)."""
    status = data.get("Status") or {}
    networks: dict[str, str] = {}
    for att in data.get("NetworksAttachments") or ():
        net = att.get("Network") or {}
        name = (net.get("Spec") or {}).get("Name") or net_names.get(net.get("ID") or "", "")
        addrs = [a for a in (_address(c) for c in att.get("Addresses") or ()) if a]
        if name and addrs:
            networks[name] = addrs[0]
    slot = data.get("Slot")
    suffix = str(slot) if slot else str(data.get("NodeID") or "")[:12]
    return TaskInfo(
        id=str(data.get("ID") or ""),
        name=f"{service_name}.{suffix}",
        state=str(status.get("State") or "unknown"),
        networks=networks,
        error=str(status.get("Err") or "")[:_ERR_CHARS],
    )


def service_networks(spec: Mapping[str, Any], net_names: Mapping[str, str]) -> dict[str, str]:
    """The networks a service's spec attaches its tasks to, by name (IDs translated) → "" (no IP here)."""
    return {net_names.get(t, t): "" for t in network_targets(spec)}


def network_targets(spec: Mapping[str, Any]) -> list[str]:
    """The spec's network targets as written: IDs (a stack's, a CLI's) or names."""
    template = spec.get("TaskTemplate") or {}
    targets = [str((att or {}).get("Target") or "") for att in template.get("Networks") or spec.get("Networks") or ()]
    return [t for t in targets if t]


def image_ref(spec: Mapping[str, Any]) -> str:
    return str(((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image") or "")


def service_from(data: Mapping[str, Any], tasks: Iterable[TaskInfo], net_names: Mapping[str, str],
                 exposed: tuple[int, ...] = ()) -> ContainerInfo | None:
    """One entry of `GET /services` → ContainerInfo of kind "service"; None for jobs (they run to an end)."""
    spec = data.get("Spec") or {}
    mode = spec.get("Mode") or {}
    if "Replicated" in mode:
        replicas: int | None = int((mode.get("Replicated") or {}).get("Replicas") or 0)
    elif "Global" in mode:
        replicas = None
    else:
        return None  # ReplicatedJob / GlobalJob: nothing to route to or to keep awake
    name = str(spec.get("Name") or data.get("ID") or "")[:128]
    kept = tuple(sorted(tasks, key=lambda t: t.name))[:MAX_TASKS]
    template = spec.get("TaskTemplate") or {}
    container = template.get("ContainerSpec") or {}
    restart = str((template.get("RestartPolicy") or {}).get("Condition") or "any")
    up = replicas > 0 if replicas is not None else any(t.running for t in kept)
    return ContainerInfo(
        id=str(data.get("ID") or ""),
        name=name,
        state="running" if up else "exited",
        labels=dict(spec.get("Labels") or {}),
        env=parse_env(container.get("Env")),
        exposed_ports=exposed,
        networks=service_networks(spec, net_names),
        created=created_time(data.get("CreatedAt")),
        kind=SERVICE,
        replicas=replicas,
        tasks=kept,
        one_shot=restart in ("none", "on-failure"),
    )


def settled(info: ContainerInfo) -> bool:
    """Do the service's tasks match its spec (as many running as it asks for, none on the way)?"""
    if info.replicas is None:
        return all(t.running for t in info.tasks)
    return len(info.tasks) == info.replicas and all(t.running for t in info.tasks)


class SwarmState:
    """The services of a Swarm manager and their tasks, kept current by the DockerView's thread."""

    def __init__(self, resync: float) -> None:
        self.resync = resync
        self.services: dict[str, ContainerInfo] = {}
        self._raw: dict[str, Mapping[str, Any]] = {}  # service id → its last `GET /services` entry
        self._tasks: dict[str, list[Mapping[str, Any]]] = {}  # service id → its raw tasks
        self._images: dict[str, tuple[tuple[int, ...], float]] = {}  # image reference → (exposed TCP ports, until)
        self._last_poll = 0.0
        self._spec_at: dict[str, tuple[int, float]] = {}  # service id → (spec version, monotonic time it was first seen)
        self.failing_until = 0.0  # monotonic: a listing failed; no other is tried before then
        self._fail_backoff = 0.0
        self.net_names: Mapping[str, str] = {}  # network id → name (from the view's network listing)
        self.api: Any = None  # the view's API client, for image inspects (set on each connect)

    # --- reading -------------------------------------------------------------------------------

    def resync_all(self, api: Any) -> bool:
        """Every service and every task meant to run, in two listings. True when something changed."""
        self.api = api
        self._images = {k: v for k, v in self._images.items() if v[0]}  # a reconnect looks for missed images again
        services = api.services()
        tasks = api.tasks(filters={"desired-state": "running"})
        self._raw = {s["ID"]: s for s in services if s.get("ID")}
        self._tasks = {}
        for t in tasks:
            sid = t.get("ServiceID")
            if sid in self._raw:
                self._tasks.setdefault(sid, []).append(t)
        self._last_poll = time.monotonic()
        return self._rebuild(set(self._raw) | set(self.services))

    def refresh_service(self, api: Any, service_id: str) -> bool:
        """After a service event: that service again (by exact ID), and its tasks."""
        found = [s for s in api.services(filters={"id": service_id}) if s.get("ID") == service_id]
        if found:
            try:
                tasks = list(api.tasks(filters={"service": service_id, "desired-state": "running"}))
            except docker.errors.NotFound:  # removed between the two calls
                found = []
        if not found:
            self._raw.pop(service_id, None)
            self._tasks.pop(service_id, None)
        else:
            self._raw[service_id] = found[0]
            self._tasks[service_id] = tasks
        return self._rebuild({service_id})

    def remove(self, service_id: str) -> bool:
        self._raw.pop(service_id, None)
        self._tasks.pop(service_id, None)
        return self._rebuild({service_id})

    def refresh_tasks(self, api: Any, service_ids: Iterable[str]) -> bool:
        """After container events of task containers on this node: those services' tasks."""
        ids = [s for s in dict.fromkeys(service_ids) if s in self._raw]
        for sid in ids:
            try:
                self._tasks[sid] = list(api.tasks(filters={"service": sid, "desired-state": "running"}))
            except docker.errors.NotFound:  # the service is gone (its remove event is on its way)
                self._raw.pop(sid, None)
                self._tasks.pop(sid, None)
        return self._rebuild(set(ids))

    def unknown_networks(self) -> bool:
        """Does a service name a network ID the last network listing did not have (made since)?"""
        names = set(self.net_names.values())
        return any(t not in self.net_names and t not in names
                   for raw in self._raw.values() for t in network_targets(raw.get("Spec") or {}))

    def rebuild_all(self) -> bool:
        """After the network listing changed (names of IDs): every service again, without a call."""
        return self._rebuild(set(self._raw))

    def poll_due(self, now: float) -> float | None:
        """Monotonic time of the next task listing (None: no service known)."""
        if not self._raw:
            return None
        unsettled = [sid for sid, s in self.services.items() if not settled(s)]
        since = min((now - self._spec_at.get(sid, (0, 0.0))[1] for sid in unsettled), default=FAST_FOR)
        if since < FASTEST_FOR:
            due = self._last_poll + FASTEST_POLL  # a service just scaled (a wake): follow its tasks closely
        elif since < FAST_FOR:
            due = self._last_poll + FAST_POLL
        elif unsettled:
            due = self._last_poll + SLOW_UNSETTLED  # e.g. one whose task fails over and over: no 10 Hz forever
        elif any(s.running for s in self.services.values()):
            due = self._last_poll + self.resync
        else:
            due = self._last_poll + ASLEEP_POLL
        return max(due, self.failing_until)

    def failed(self, now: float) -> float:
        """A listing failed (the manager lost its quorum, say): back off; the seconds until the next try."""
        self._fail_backoff = min(max(1.0, self._fail_backoff * 2), FAIL_BACKOFF_MAX)
        self.failing_until = now + self._fail_backoff
        self._last_poll = now
        return self._fail_backoff

    def recovered(self) -> bool:
        """A listing worked again; True when it had failed before."""
        was = self._fail_backoff > 0
        self._fail_backoff, self.failing_until = 0.0, 0.0
        return was

    def poll(self, api: Any) -> bool:
        """Every task meant to run, in one listing (services are known from events). True: changed."""
        tasks = api.tasks(filters={"desired-state": "running"})
        self._last_poll = time.monotonic()
        by_service: dict[str, list[Any]] = {sid: [] for sid in self._raw}
        for t in tasks:
            sid = t.get("ServiceID")
            if sid in by_service:
                by_service[sid].append(t)
        self._tasks = by_service
        return self._rebuild(set(self._raw))

    # --- building --------------------------------------------------------------------------------

    def _exposed(self, api: Any, ref: str) -> tuple[int, ...]:
        """The image's exposed TCP ports, when the manager has the image (best effort, remembered)."""
        if not ref:
            return ()
        now = time.monotonic()
        known = self._images.get(ref)
        if known is not None and (known[0] or known[1] > now):
            return known[0]
        ports: tuple[int, ...] = ()
        for candidate in dict.fromkeys((ref, ref.split("@", 1)[0])):
            try:
                data = api.inspect_image(candidate)
            except docker.errors.ImageNotFound:
                continue
            except docker.errors.APIError:
                continue
            ports = parse_exposed((data.get("Config") or {}).get("ExposedPorts"))
            break
        if len(self._images) >= MAX_IMAGES:
            self._images.clear()
        # Not there (a node pulls it only for a task): looked for again later, and on the next resync.
        self._images[ref] = (ports, now + IMAGE_MISS_AGAIN)
        return ports

    def _rebuild(self, ids: set[str]) -> bool:
        changed = False
        api = self.api
        for sid in ids:
            raw = self._raw.get(sid)
            if raw is None:
                changed = self.services.pop(sid, None) is not None or changed
                continue
            name = str((raw.get("Spec") or {}).get("Name") or sid)
            tasks = [task_from(t, name, self.net_names) for t in self._tasks.get(sid, ())]
            exposed = self._exposed(api, image_ref(raw.get("Spec") or {})) if api is not None else ()
            info = service_from(raw, tasks, self.net_names, exposed)
            if info is None:
                changed = self.services.pop(sid, None) is not None or changed
                continue
            version = int((raw.get("Version") or {}).get("Index") or 0)
            if self._spec_at.get(sid, (None, 0.0))[0] != version:
                self._spec_at[sid] = (version, time.monotonic())
            if self.services.get(sid) != info:
                self.services[sid] = info
                changed = True
        for gone in set(self._spec_at) - set(self._raw):
            del self._spec_at[gone]
        return changed
