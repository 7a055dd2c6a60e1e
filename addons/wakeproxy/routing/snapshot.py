"""The routing table: an immutable value built from Docker's state.

`build_snapshot` turns the containers the Docker view knows into a `Snapshot`;
the request path only ever calls `Snapshot.lookup`, which costs one dict probe
for an exact name plus one per label of the name for wildcards — independent
of how many sites exist — and then `Site.route_for`, a scan over the host's
few path routes, sorted longest first when the snapshot is built.  Snapshots
are plain frozen data, so a later control plane could ship them to other
processes.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from wakeproxy.config import Config, LabelTrustConfig, SourcesConfig
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.labels import (
    PROJECT_LABEL,
    SWARM_SERVICE_LABEL,
    SWARM_TASK_LABEL,
    ContainerInfo,
    ContainerSettings,
    LabelError,
    Route,
    check_group_labels,
    docksal_note,
    group_of,
    normalize_host,
    path_matches,
    routes_for,
    settings_for,
)
from wakeproxy.routing.policy import Claim, GroupId, NamePolicy, Ownership, Refusal

logger = get_logger(__name__)

# Network drivers whose container IPs the host can reach directly through a local bridge.
# Overlay (Swarm) IPs are not local: traffic to them would leave the machine.
ROUTABLE_DRIVERS = frozenset({"bridge", "host"})
# A Swarm service's tasks are reached on an overlay the proxy's own container is attached to.
INGRESS = "ingress"  # the view's driver name for the routing mesh's network: never routed to
# A Compose project's own network is `<project>_default`; Docksal's stop removes it (README "Coming from Docksal").
COMPOSE_DEFAULT_NETWORK = "{project}_default"
_COMPOSE_PROJECT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # Compose's rule for a project name
_RECREATE_STATES = frozenset({"created", "exited"})  # stopped: the only states a network is made again for


@dataclass(frozen=True)
class Backend:
    """One container behind a site (for a Swarm service: one of its tasks; `container_id` is the
    service's, `container_name` the task's; a service without a running task has one backend
    without an address, so that its site stays)."""

    container_id: str
    container_name: str
    group: str
    state: str
    scheme: str
    port: int
    address: str | None  # where to connect; None when not running or not reachable
    problem: str | None = None  # why `address` is None although the container runs
    ready_path: str | None = None  # wakeproxy.ready-path: GET it (< 500) before calling a woken site ready
    network: str | None = None  # the Docker network `address` is on (the proxy's container joins it)

    @property
    def ready(self) -> bool:
        return self.state == "running" and self.address is not None


@dataclass(frozen=True)
class PathRoute:
    """The requests of a site under one path (`path_matches`), and the containers that serve them."""

    path: str  # "/" takes every path
    exact: bool
    backends: tuple[Backend, ...]  # replicas, by container name: requests are spread round robin

    @property
    def ready_backends(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.ready)

    def matches(self, path: str) -> bool:
        return path_matches(self.path, self.exact, path)


def route_order(route: PathRoute) -> tuple[int, bool]:
    """Sort key of a site's routes: longest path first, an exact path before a prefix as long."""
    return -len(route.path), not route.exact


@dataclass(frozen=True)
class Site:
    """Everything the proxy needs to answer one declared host (or wildcard).

    `routes` are in `route_order`, so the first that matches a path is the longest match.
    All of them belong to the group that owns the host (policy.py); the waker and idle
    keeper see the site as a whole: `backends` holds every route's containers, once."""

    host: str
    routes: tuple[PathRoute, ...]
    backends: tuple[Backend, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        backends = self.routes[0].backends if len(self.routes) == 1 else \
            tuple(dict.fromkeys(b for r in self.routes for b in r.backends))
        object.__setattr__(self, "backends", backends)

    @classmethod
    def of(cls, host: str, backends: tuple[Backend, ...]) -> Site:
        """A site whose containers all serve every path."""
        return cls(host, (PathRoute("/", False, backends),))

    def route_for(self, path: str) -> PathRoute | None:
        """The route of a request path (its query is ignored): the longest match, else None.
        A path that is not a path (`*` of `OPTIONS *`, an authority) counts as `/`."""
        if len(self.routes) == 1 and self.routes[0].path == "/" and not self.routes[0].exact:
            return self.routes[0]  # the common case: no paths declared
        path = path.split("?", 1)[0]
        if not path.startswith("/"):
            path = "/"
        for route in self.routes:
            if route.matches(path):
                return route
        return None

    @property
    def ready_backends(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.ready)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.group for b in self.backends))


@dataclass(frozen=True)
class Group:
    """Containers that wake and sleep together: a `wakeproxy.group`, a Compose project, or one container."""

    name: str
    members: tuple[str, ...]  # container ids, by name
    routed: frozenset[str]  # the members that declare at least one host
    wake_strategy: str | None = None  # from a member's label; None: the config decides
    wake_timeout: float | None = None
    idle_timeout: float | None = None  # the longest of the members' labels; 0 (any member) = never
    idle_action: str | None = None
    permanent: bool = False  # a member's io.docksal.permanent=true: never removed as abandoned
    gid: str = ""  # who the group is ("compose:NAME", "container:NAME", …): `name` can pass to another group

    def stop_order(self, snapshot: Snapshot) -> list[list[str]]:
        """Members in layers, dependents before their dependencies (reverse `depends_on`)."""
        return list(reversed(self.start_order(snapshot)))

    def start_order(self, snapshot: Snapshot) -> list[list[str]]:
        """Members in layers: each layer only depends on earlier ones (Compose `depends_on`)."""
        service_of = {cid: snapshot.settings[cid].service for cid in self.members if cid in snapshot.settings}
        by_service = {svc: cid for cid, svc in service_of.items() if svc}
        deps = {
            cid: {by_service[d.service] for d in snapshot.settings[cid].depends_on
                  if d.service in by_service and by_service[d.service] != cid}
            for cid in self.members if cid in snapshot.settings
        }
        # Members that depend on each other (a cycle, directly or through others) form one unit
        # and share a layer; everything else is ordered as Compose orders it. Groups are small:
        # the closure is computed by a walk from each member.
        reach: dict[str, set[str]] = {}
        for cid in deps:
            seen, todo = set(), list(deps[cid])
            while todo:
                d = todo.pop()
                if d not in seen:
                    seen.add(d)
                    todo.extend(deps.get(d, ()))
            reach[cid] = seen
        unit = {cid: frozenset({cid} | {d for d in reach[cid] if cid in reach[d]}) for cid in deps}
        layers: list[list[str]] = []
        placed: set[str] = set()
        while len(placed) < len(deps):
            layer = [c for c in deps if c not in placed and deps[c] - unit[c] <= placed]
            if not layer:  # cannot happen (units make the graph acyclic); never loop forever
                layer = [c for c in deps if c not in placed]
            layers.append(layer)
            placed.update(layer)
        return layers

    def cycles(self, snapshot: Snapshot) -> list[list[str]]:
        """The members that depend on each other, as groups of container ids (usually none)."""
        layers = self.start_order(snapshot)
        layer_of = {cid: n for n, layer in enumerate(layers) for cid in layer}
        by_service = {snapshot.settings[c].service: c for c in layer_of if snapshot.settings[c].service}
        out: dict[int, set[str]] = {}
        for cid, n in layer_of.items():
            for dep in snapshot.settings[cid].depends_on:
                d = by_service.get(dep.service)
                if d is not None and d != cid and layer_of.get(d) == n:
                    out.setdefault(n, set()).update((cid, d))
        return [sorted(v) for _, v in sorted(out.items())]


@dataclass(frozen=True)
class Policy:
    """Everything of the config that decides what labels may do (an immutable value)."""

    names: NamePolicy = field(default_factory=NamePolicy)
    trust: LabelTrustConfig = field(default_factory=LabelTrustConfig)
    idle_timeout: float = 1800.0  # the config's; labels may not exceed it unless trust.keep_awake
    acme_max: int = 10  # names one group may have certificates for
    max_replicas: int = 10  # docker.max_replicas: what a service's replicas label may ask for
    permanent_sleeps: bool = False  # idle.permanent_sleeps: io.docksal.permanent only keeps a group from removal

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(NamePolicy.from_config(config), config.labels, config.idle.timeout,
                   config.acme.max_names_per_group, config.docker.max_replicas, config.idle.permanent_sleeps)


@dataclass(frozen=True)
class Snapshot:
    exact: Mapping[str, Site] = field(default_factory=dict)
    wildcards: Mapping[str, Site] = field(default_factory=dict)  # "example.com" for "*.example.com"
    containers: Mapping[str, ContainerInfo] = field(default_factory=dict)
    settings: Mapping[str, ContainerSettings] = field(default_factory=dict)  # container id → its labels' settings
    groups: Mapping[str, Group] = field(default_factory=dict)  # only groups with a routed member
    endpoints: Mapping[str, tuple[Backend, ...]] = field(default_factory=dict)  # container id → its backends
    skipped: Mapping[str, str] = field(default_factory=dict)  # container name → why it was skipped
    synced: bool = False  # False until the first full listing has been read
    refused: tuple[Refusal, ...] = ()  # claims on names that do not stand (another owner, the policy)
    acme: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # name → (container, group) wanting a certificate
    cert_names: Mapping[str, str] = field(default_factory=dict)  # host → custom certificate file base (label)
    no_redirect: frozenset[str] = frozenset()  # site hosts whose owner turned the https redirect off (label)
    # Hosts (and "*.d" wildcards) with no site whose owner's only claims on them come from
    # skipped containers → why, per container ("container 'x': label …; …").
    misconfigured: Mapping[str, str] = field(default_factory=dict)
    debug_hosts: frozenset[str] = frozenset()  # site hosts shown in the debug UI by label (wakeproxy.debug)
    # Removed `<project>_default` networks (lost_network) → the stopped containers to connect to it, by name.
    lost_networks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    _misconfigured_under: Mapping[str, str] = field(init=False, repr=False, compare=False)  # "d" for "*.d"

    def __post_init__(self) -> None:
        object.__setattr__(self, "_misconfigured_under",
                           {k[2:]: v for k, v in self.misconfigured.items() if k.startswith("*.")})

    def lookup(self, host: str) -> Site | None:
        """Exact name first; else the longest `*.suffix` that matches (any depth)."""
        h = normalize_host(host)
        site = self.exact.get(h)
        if site is not None or not self.wildcards:
            return site
        return _wildcard(self.wildcards, h)

    def misconfiguration(self, host: str) -> str | None:
        """Why `host` (which has no site) is not served although a container declares it, else None.
        Exact name first, then the longest wildcard, like `lookup`."""
        if not self.misconfigured:
            return None
        h = normalize_host(host)
        why = self.misconfigured.get(h)
        if why is not None:
            return why
        return _wildcard(self._misconfigured_under, h)

    @property
    def hosts(self) -> list[str]:
        return sorted(self.exact) + sorted(f"*.{w}" for w in self.wildcards)

    def networks_to_recreate(self, members: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """The removed networks that some of `members` need to start → every container to connect to each."""
        if not self.lost_networks:
            return {}
        ids = frozenset(members)
        return {net: cids for net, cids in self.lost_networks.items() if ids.intersection(cids)}


_V = TypeVar("_V")


def _wildcard(by_domain: Mapping[str, _V], host: str) -> _V | None:
    """The value of the longest domain in `by_domain` that `host` is strictly under (one probe per label)."""
    i = host.find(".")
    while i != -1:
        found = by_domain.get(host[i + 1:])
        if found is not None:
            return found
        i = host.find(".", i + 1)
    return None


def lost_network(info: ContainerInfo, drivers: Mapping[str, str]) -> str | None:
    """The network a stopped container of Compose project P must be given again before it can start:
    `P_default`, named by its HostConfig.NetworkMode, when no network of that name exists and the
    container is not attached to it (Docksal's stop disconnects it and removes the network). Only that
    exact name, made of the container's own project label: never a network a label names otherwise,
    never one that exists (`drivers`: every network the engine has)."""
    net = info.network_mode
    if not net or net in drivers or net in info.networks or info.state not in _RECREATE_STATES or info.is_service:
        return None  # (the common case first: its network exists)
    project = info.labels.get(PROJECT_LABEL) or ""
    if not _COMPOSE_PROJECT.fullmatch(project) or net != COMPOSE_DEFAULT_NETWORK.format(project=project):
        return None
    return net


def _choose_address(
    info: ContainerInfo,
    route: Route,
    allowed: tuple[str, ...],
    drivers: Mapping[str, str],
    reach: frozenset[str] | None = None,
    unreachable: Mapping[str, str] | None = None,
) -> tuple[str | None, str | None, str | None]:
    """(address, network, problem): the container's IP on a network the proxy may use.

    A stopped container has no IP but keeps its network attachments: it is ours
    to wake (and to put to sleep) only when one of them is a network we may use.
    `reach`: the networks of the proxy's own container when it runs in one on a bridge network (it
    joins the others it needs by itself: docker/networks.py), preferred over the rest; None = the
    proxy is on the host's network and reaches every local bridge. `unreachable`: networks the proxy
    could not join → why.
    """
    if route.network:
        candidates = [route.network]
    elif allowed:
        candidates = [n for n in allowed if n in info.networks]
    else:
        candidates = sorted(info.networks)
    if reach:
        candidates.sort(key=lambda n: n not in reach)  # stable: the preference order stays within each part
    refused: list[str] = []
    refused_net: str | None = None  # the first network the proxy could not join: still the one it wants
    for net in candidates:
        if net not in info.networks:
            continue
        ip = info.networks.get(net)
        driver = drivers.get(net, "bridge" if net == "bridge" else "")
        if net == "host" or driver == "host":
            if reach is not None:
                refused.append("it uses the host's network, which the proxy's container is not on")
                continue
            return ("127.0.0.1" if info.running else None), net, None
        if driver in ROUTABLE_DRIVERS and (ip or not info.running):
            why = unreachable.get(net) if unreachable is not None and reach is not None and net not in reach else None
            if why is not None:
                refused.append(why)
                refused_net = refused_net or net
                continue
            return (ip if info.running else None), net, None
    on = ", ".join(sorted(info.networks)) or "no network"
    if refused:
        why = "; ".join(dict.fromkeys(refused))
    elif route.network:
        why = f"it asks to be reached on network '{route.network}' but is on: {on}"
        if route.network in info.networks and drivers.get(route.network) not in ROUTABLE_DRIVERS:
            why = f"network '{route.network}' ({drivers.get(route.network) or 'unknown'} driver) is not reachable from this host"
    elif allowed:
        why = f"it is on {on}, and the proxy may only use: {', '.join(allowed)}"
    else:
        why = f"it has no IP on a local bridge network (it is on: {on})"
    return None, refused_net, f"container '{info.name}' cannot be reached: {why}"


_Parsed = tuple[list[Route], ContainerSettings, tuple[str, ...]]  # routes, settings, notes (ignored labels)


@dataclass(frozen=True)
class _Skipped:
    """A container whose labels cannot be used: why, and the hosts it declares that could be read."""

    reason: str
    hosts: tuple[str, ...]


def _parse(info: ContainerInfo, sources: SourcesConfig, allowed: tuple[str, ...], policy: Policy) -> _Parsed:
    """One container's labels with the operator's label trust applied; raises one LabelError that
    names every bad label (routes and settings), with the hosts that could be read — unless the
    group labels are bad too: then the container's group is unknown, and so is who claims them."""
    errors: list[str] = []
    hosts: tuple[str, ...] = ()
    routes: list[Route] = []
    settings = ContainerSettings()
    try:
        routes = routes_for(info, sources)
    except LabelError as e:
        errors.extend(e.errors)
        hosts = e.hosts
    try:
        settings = settings_for(info)
    except LabelError as e:
        errors.extend(e.errors)
    if errors:
        try:
            check_group_labels(info.labels)
        except LabelError:
            hosts = ()
        raise LabelError(*dict.fromkeys(errors), hosts=hosts)  # (each part is at most MAX_ERRORS long)
    notes: list[str] = []
    trust = policy.trust
    if allowed and not trust.network:
        for i, r in enumerate(routes):
            if r.network and r.network not in allowed:
                notes.append(f"its network label '{r.network}' is ignored: not in docker.networks "
                             "(labels.network: true honours it)")
                routes[i] = dataclasses.replace(r, network=None)
    if sources.docksal and (note := docksal_note(info.labels)):
        notes.append(note)
    if settings.cert_name and not trust.cert_name:
        notes.append("its cert-name label is ignored (labels.cert_name: true honours it)")
    if settings.https_redirect is False and not trust.https_redirect:
        notes.append("its https-redirect=false label is ignored (labels.https_redirect: true honours it)")
    if settings.replicas is not None and settings.replicas > policy.max_replicas:
        notes.append(f"its replicas label is capped at docker.max_replicas ({policy.max_replicas})")
        settings = dataclasses.replace(settings, replicas=policy.max_replicas)
    if settings.permanent and not trust.keep_awake:
        # Like a never-sleep label: it spends the server's resources, so the operator's switch decides.
        notes.append("its io.docksal.permanent label is not honoured (labels.keep_awake: true honours it)")
        settings = dataclasses.replace(settings, permanent=False)
    if settings.permanent and not policy.permanent_sleeps:
        settings = dataclasses.replace(settings, idle_timeout=0.0)  # never put to sleep (idle.permanent_sleeps: false)
    t = settings.idle_timeout
    if t is not None and not trust.keep_awake and policy.idle_timeout > 0 and (t <= 0 or t > policy.idle_timeout):
        notes.append(f"its idle timeout is capped at idle.timeout ({policy.idle_timeout:g} s; "
                     "labels.keep_awake: true honours it)")
        settings = dataclasses.replace(settings, idle_timeout=policy.idle_timeout)
    return routes, settings, tuple(dict.fromkeys(notes))


def _group_keys(infos: Iterable[ContainerInfo]) -> dict[str, tuple[GroupId, str]]:
    """container id → (group identity, key in the snapshot).

    Keys are the group names users see. A Compose project keeps its own name; a `wakeproxy.group`
    outside Compose or a lone container whose name equals a project's (or a group's) is shown as
    `group:NAME` / `container:NAME`, so it never merges with it."""
    ids: dict[str, GroupId] = {}
    taken: dict[str, set[str]] = {"compose": set(), "stack": set(), "group": set(), "container": set(),
                                  "service": set()}
    for info in infos:
        kind, base, _key = group_of(info)
        ids[info.id] = GroupId(kind, base)
        taken[kind].add(base)
    # Who keeps the bare name when kinds share one: a project, then a stack, a group, a container, a service.
    before = {"compose": (), "stack": ("compose",), "group": ("compose", "stack"),
              "container": ("compose", "stack", "group"), "service": ("compose", "stack", "group", "container")}
    out: dict[str, tuple[GroupId, str]] = {}
    for cid, gid in ids.items():
        key = gid.base
        if any(key in taken[k] for k in before[gid.kind]):
            key = f"{gid.kind}:{key}"
        out[cid] = (gid, key)
    return out


WORKING_DIR_LABEL = "com.docker.compose.project.working_dir"  # Compose sets it; a service's labels cannot
MAX_FOLDER = 4096  # characters of a working_dir kept (the owners file keeps at most this)


def _made_elsewhere(infos: Iterable[ContainerInfo], ownership: Ownership, now: float,
                    release_after: float) -> dict[str, str]:
    """Container id → why, for containers of a Compose project made from another folder than the project's.

    A project is the folder (`working_dir` label) it was first seen with, held for `release_after` after
    its last container of that folder is gone, and kept across restarts (Ownership); else its oldest
    container's. Containers without the label, as the SDK makes them, count as one folder of their own."""
    def project_and_folder(info: ContainerInfo) -> tuple[str, str] | None:
        project = (info.labels.get(PROJECT_LABEL) or "").strip()
        if info.is_service or not _COMPOSE_PROJECT.fullmatch(project):
            return None
        # No label (a container the SDK made, not Compose) is a folder of its own: "".
        return project, (info.labels.get(WORKING_DIR_LABEL) or "")[:MAX_FOLDER]

    judged = [(info, pf) for info in infos if (pf := project_and_folder(info)) is not None]
    folders: dict[str, dict[str, tuple[float, str]]] = {}  # project → folder → (its oldest container)
    for info, (project, folder) in judged:
        seen = folders.setdefault(project, {})
        seen[folder] = min(seen.get(folder, (info.created, info.name)), (info.created, info.name))
    known = ownership.project_folders(folders, now, release_after)
    out: dict[str, str] = {}
    for info, (project, folder) in judged:
        if project in known and folder != known[project]:
            out[info.id] = (f"its Compose project '{project}' belongs to containers made from another folder: "
                            "another sandbox's project name (run each sandbox as its own project: "
                            "docker compose -p NAME)")
    return out


def _is_global(info: ContainerInfo) -> bool:
    return info.is_service and info.replicas is None


def _service_backends(info: ContainerInfo, route: Route, key: str, ready_path: str | None,
                      drivers: Mapping[str, str], overlays: frozenset[str] | None, join: bool = False,
                      unreachable: Mapping[str, str] | None = None) -> list[Backend]:
    """A service's backends for `route`: one per running task, by its IP on one network it shares with
    the proxy — the route's network label, else the first of its overlays (by name) the proxy is on,
    never the routing mesh; with `join` (the proxy joins networks by itself: docker/networks.py), else
    the first of them it may join (`unreachable`: those it may not, and why). None running: one
    backend without an address (the site stays)."""
    nets = [n for n in info.networks if drivers.get(n) != INGRESS and n != INGRESS]
    candidates = [route.network] if route.network else sorted(n for n in nets if drivers.get(n) == "overlay")
    on = ", ".join(sorted(nets)) or "no network"
    problem: str | None = None
    net: str | None = None
    if overlays is None:
        problem = (f"service '{info.name}' cannot be reached: the proxy is not in a container on a Swarm network "
                   f"(the service is on: {on}); run it in a container or service attached to one (README: Swarm)")
    elif route.network and route.network not in info.networks:
        problem = f"service '{info.name}' cannot be reached: it asks for network '{route.network}' but is on: {on}"
    elif route.network and drivers.get(route.network) == INGRESS:
        problem = f"service '{info.name}' cannot be reached: '{route.network}' is the routing mesh, not a network to route on"
    else:
        net = next((n for n in candidates if n in overlays), None)
        refusals = [why for n in candidates if unreachable is not None and (why := unreachable.get(n))]
        if net is None and join:
            net = next((n for n in candidates if unreachable is None or n not in unreachable), None)
        if net is None and refusals:
            problem = f"service '{info.name}' cannot be reached: {'; '.join(dict.fromkeys(refusals))}"
        elif net is None:
            mine = ", ".join(sorted(overlays)) or "none"
            problem = (f"service '{info.name}' cannot be reached: it is on {on}, and the proxy's container on {mine}: "
                       "attach the proxy to one of the service's networks (docker network connect NET PROXY, "
                       "or the stack's network in the proxy's compose file)")
    addresses = [(t.name, ip) for t in info.running_tasks if net is not None and (ip := t.networks.get(net))]
    if problem is None and addresses and overlays is not None and net not in overlays:
        # Not joined yet: no address until it is. A packet from the proxy to an overlay it is not on
        # leaves through its default route, off this machine: never probed, never routed to.
        return [Backend(info.id, info.name, key, "starting", route.scheme, route.port, None, None, ready_path, net)]
    if problem is None and addresses:
        return [Backend(info.id, name, key, "running", route.scheme, route.port, ip, None, ready_path, net)
                for name, ip in addresses]
    state = "starting" if info.running else info.state  # asked to run, no task running yet
    return [Backend(info.id, info.name, key, state, route.scheme, route.port, None, problem, ready_path,
                    net if problem is None else None)]


def _usable_networks(info: ContainerInfo, allowed: tuple[str, ...], drivers: Mapping[str, str]) -> set[str]:
    """The container's networks the proxy may use (a stopped container keeps its attachments)."""
    if info.is_service:
        return {n for n in info.networks if drivers.get(n) == "overlay"}
    nets = [n for n in info.networks if n in allowed] if allowed else list(info.networks)
    return {n for n in nets if drivers.get(n, "bridge" if n == "bridge" else "") in ROUTABLE_DRIVERS or n == "host"}


def build_snapshot(
    containers: Iterable[ContainerInfo],
    sources: SourcesConfig,
    allowed_networks: tuple[str, ...],
    network_drivers: Mapping[str, str],
    synced: bool = True,
    route_cache: dict[str, tuple[ContainerInfo, _Parsed | _Skipped]] | None = None,
    policy: Policy | None = None,
    ownership: Ownership | None = None,
    now: float | None = None,
    reach: frozenset[str] | None = None,
    unreachable: Mapping[str, str] | None = None,
    overlays: frozenset[str] | None = None,
    overlay_join: bool = False,
) -> Snapshot:
    """Index every container's routes by host and path, with one owner group per host.

    A skipped container (bad labels) routes nothing, but the hosts it declares that could
    be read are claims like any other: when its group owns one that no other of its
    containers serves, the host is `misconfigured` (a page says so) rather than unknown.
    `route_cache` (id → (info, parsed labels or why skipped)) lets the Docker view skip
    re-parsing labels of containers whose labels and env did not change; label
    errors and ignored labels are logged only when first seen.  `ownership`
    keeps who owns which name across snapshots (and restarts); without it,
    owners are decided by container creation time alone.
    Swarm services (kind "service") are sites like containers, reached on `overlays` (the Swarm
    networks the proxy's container is on; None: it is on none); the containers of their tasks are
    left out (their labels are not the service's, and they come and go).
    """
    policy = policy or Policy()
    ownership = ownership if ownership is not None else Ownership()
    all_containers: dict[str, ContainerInfo] = {}
    lost: dict[str, list[ContainerInfo]] = {}  # a removed <project>_default network → its stopped containers
    skipped: dict[str, str] = {}
    parsed: dict[str, tuple[ContainerInfo, _Parsed]] = {}
    broken: dict[str, tuple[ContainerInfo, _Skipped]] = {}
    for info in containers:
        if not info.is_service and SWARM_SERVICE_LABEL in info.labels and SWARM_TASK_LABEL in info.labels:
            continue  # a task's container: its service is the site
        all_containers[info.id] = info
        if (net := lost_network(info, network_drivers)) is not None:
            # Routed as if still attached (asleep, no address): a wake makes the network again first.
            lost.setdefault(net, []).append(info)
            info = dataclasses.replace(info, networks={**info.networks, net: ""})
        cached = route_cache.get(info.id) if route_cache is not None else None
        result: _Parsed | _Skipped
        if cached is not None and cached[0].labels == info.labels and cached[0].env == info.env \
                and cached[0].exposed_ports == info.exposed_ports:
            result = cached[1]
        else:
            try:
                result = _parse(info, sources, allowed_networks, policy)
            except LabelError as e:
                result = _Skipped(str(e), e.hosts)
                logger.warning(f"container '{info.name}' skipped: {e}")
            else:
                for note in result[2]:
                    logger.warning(f"container '{info.name}': {note}")
            if route_cache is not None:
                route_cache[info.id] = (info, result)
        if isinstance(result, _Skipped):
            skipped[info.name] = result.reason
            if result.hosts:
                broken[info.id] = (info, result)
            continue
        parsed[info.id] = (info, result)

    if lost:  # a removed network is a bridge again once made: routable while asleep
        network_drivers = {**network_drivers, **dict.fromkeys(lost, "bridge")}
    # A Compose project is one folder's: containers that say they are of it but were made from another
    # folder (a sandbox whose own file chose `name: <another sandbox>`) are skipped, not merged into it.
    clock = time.time() if now is None else now
    # Every container is judged, those with label errors too (they still claim names and would be connected).
    elsewhere = _made_elsewhere(all_containers.values(), ownership, clock, policy.names.release_after)
    for cid, why in elsewhere.items():
        parsed.pop(cid, None)
        broken.pop(cid, None)
        skipped[all_containers[cid].name] = why
    # Nothing is made or connected for them either: a removed network is the project's folder's to make.
    for net in list(lost):
        lost[net] = [i for i in lost[net] if i.id not in elsewhere]
        if not lost[net]:
            del lost[net]
    for name, why in ownership.say_new({all_containers[c].name: w for c, w in elsewhere.items()}):
        logger.warning(f"container '{name}' skipped: {why}")

    keys = _group_keys([*(i for i, _ in parsed.values()), *(i for i, _ in broken.values())])
    # Every routed host is a claim, and so is every LETSENCRYPT_HOST name: a certificate is as
    # much a part of a name as its traffic.  Paths do not matter here: a host has one owner.
    claims = [
        Claim(name, keys[cid][1], keys[cid][0], info.created, info.name)
        for cid, (info, (routes, st, _)) in parsed.items()
        for name in dict.fromkeys([*(r.host for r in routes), *(n for n in st.letsencrypt if not n.startswith("*."))])
    ]
    claims += [Claim(name, keys[cid][1], keys[cid][0], info.created, info.name)
               for cid, (info, skip) in broken.items() for name in skip.hosts]
    owners, refused = ownership.resolve(claims, policy.names, time.time() if now is None else now)

    by_host: dict[str, dict[tuple[str, bool], list[Backend]]] = {}  # host → (path, exact) → replicas
    settings: dict[str, ContainerSettings] = {}
    members: dict[str, list[ContainerInfo]] = {}
    routed: set[str] = set()
    own_hosts: dict[str, list[str]] = {}  # container id → the hosts it serves (accepted claims)
    for cid, (info, (routes, st, _)) in parsed.items():
        key = keys[cid][1]
        settings[cid] = st
        members.setdefault(key, []).append(info)
        for route in routes:
            if owners.get(route.host) != key:
                continue  # refused: another group owns the name, or the policy does not allow it
            mine = own_hosts.setdefault(cid, [])
            if route.host not in mine:
                mine.append(route.host)
            replicas = by_host.setdefault(route.host, {}).setdefault((route.path, route.exact), [])
            if info.is_service:
                backends = _service_backends(info, route, key, st.ready_path, network_drivers, overlays,
                                             overlay_join, unreachable)
                if backends[0].problem is None:
                    routed.add(cid)
                replicas.extend(backends)
                continue
            address, net, problem = _choose_address(info, route, allowed_networks, network_drivers, reach,
                                                    unreachable)
            if problem is None:
                routed.add(cid)  # only containers we may reach are ever started or stopped
            replicas.append(
                Backend(cid, info.name, key, info.state, route.scheme, route.port, address, problem, st.ready_path,
                        net)
            )
    exact: dict[str, Site] = {}
    wildcards: dict[str, Site] = {}
    for host, by_path in by_host.items():
        paths = [PathRoute(path, is_exact, tuple(sorted(backends, key=lambda b: b.container_name)))
                 for (path, is_exact), backends in by_path.items()]
        site = Site(host, tuple(sorted(paths, key=route_order)))
        if host.startswith("*."):
            wildcards[host[2:]] = site
        else:
            exact[host] = site
    endpoints: dict[str, list[Backend]] = {}
    for site in [*exact.values(), *wildcards.values()]:
        for b in site.backends:
            if b not in endpoints.setdefault(b.container_id, []):
                endpoints[b.container_id].append(b)
    groups: dict[str, Group] = {}
    for name, infos in members.items():
        group_routed = frozenset(i.id for i in infos if i.id in routed)
        if not group_routed:
            continue  # nothing routes to it, so no request may ever start it
        # Members the proxy may touch: on a network it may use, or on one of a routed member's networks.
        shared = {n for i in infos if i.id in group_routed for n in i.networks}
        infos = sorted((i for i in infos if i.id in group_routed or _usable_networks(i, allowed_networks, network_drivers)
                        or shared.intersection(i.networks)), key=lambda i: i.name)
        ids = tuple(i.id for i in infos)
        strategies = [settings[i].wake_strategy for i in ids if settings[i].wake_strategy]
        timeouts = [t for i in ids if (t := settings[i].wake_timeout)]
        # A global Swarm service cannot be scaled: it is never stopped, and has no say in when the rest is.
        idle = [t for i in ids if (t := settings[i].idle_timeout) is not None and not _is_global(all_containers[i])]
        actions = [settings[i].idle_action for i in ids if settings[i].idle_action]
        gid = keys[infos[0].id][0] if infos else None
        groups[name] = Group(name, ids, group_routed, strategies[0] if strategies else None,
                             max(timeouts) if timeouts else None,
                             (0.0 if 0.0 in idle else max(idle)) if idle else None,
                             actions[0] if actions else None, any(settings[i].permanent for i in ids),
                             f"{gid.kind}:{gid.base}" if gid else "")
    acme, acme_refused = _acme_names(parsed, keys, owners, own_hosts, policy)
    cert_names: dict[str, str] = {}
    no_redirect: set[str] = set()
    debug_hosts: set[str] = set()
    for cid, hosts in own_hosts.items():
        st = settings[cid]
        for host in hosts:
            if st.cert_name and policy.trust.cert_name:
                cert_names.setdefault(host, st.cert_name)
            if st.https_redirect is False and policy.trust.https_redirect:
                no_redirect.add(host)
            if st.debug and policy.trust.debug and host in by_host:
                debug_hosts.add(host)
    misconfigured: dict[str, list[str]] = {}
    for cid, (info, skip) in sorted(broken.items(), key=lambda kv: kv[1][0].name):
        for host in skip.hosts:
            if owners.get(host) == keys[cid][1] and host not in by_host:
                misconfigured.setdefault(host, []).append(f"container '{info.name}': {skip.reason}")
    if route_cache is not None:
        for gone in set(route_cache) - set(all_containers):
            del route_cache[gone]
    return Snapshot(exact, wildcards, all_containers, settings, groups,
                    {cid: tuple(bs) for cid, bs in endpoints.items()}, skipped, synced,
                    tuple(sorted([*refused, *acme_refused], key=lambda r: (r.name, r.group))),
                    acme, cert_names, frozenset(no_redirect),
                    {host: "; ".join(why) for host, why in misconfigured.items()}, frozenset(debug_hosts),
                    {net: tuple(i.id for i in sorted(infos, key=lambda i: i.name)) for net, infos in lost.items()})


def _acme_names(parsed: Mapping[str, tuple[ContainerInfo, _Parsed]], keys: Mapping[str, tuple[GroupId, str]],
                owners: Mapping[str, str], own_hosts: Mapping[str, list[str]],
                policy: Policy) -> tuple[dict[str, tuple[str, str]], list[Refusal]]:
    """name → (container, group), for the names a container wants certificates for that its group
    owns, at most `policy.acme_max` per group (HTTP-01 cannot prove wildcards: left out)."""
    wanted: dict[str, dict[str, list[str]]] = {}  # group → name → containers
    for cid, (info, (_, st, _)) in sorted(parsed.items(), key=lambda kv: kv[1][0].name):
        key = keys[cid][1]
        names = [h for h in own_hosts.get(cid, ()) if not h.startswith("*.")] if st.acme else []
        names += [n for n in st.letsencrypt if owners.get(n) == key]  # the others are refused claims
        for n in names:
            if "." in n and not n.rsplit(".", 1)[1].isdigit():  # a public name, not localhost or an IP
                wanted.setdefault(key, {}).setdefault(n, []).append(info.name)
    out: dict[str, tuple[str, str]] = {}
    refused: list[Refusal] = []
    for key, names_of_group in wanted.items():
        for i, (n, containers) in enumerate(sorted(names_of_group.items())):
            if i < policy.acme_max:
                out[n] = (containers[0], key)
            else:
                refused.append(Refusal(n, key, tuple(containers), f"no certificate: the group already has "
                                       f"{policy.acme_max} (acme.max_names_per_group)"))
    return out, refused
