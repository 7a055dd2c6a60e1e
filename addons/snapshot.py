"""The routing table: an immutable value built from Docker's state.

`build_snapshot` turns the containers the Docker view knows into a `Snapshot`;
the request path only ever calls `Snapshot.lookup`, which costs one dict probe
for an exact name plus one per label of the name for wildcards — independent
of how many sites exist.  Snapshots are plain frozen data, so a later control
plane could ship them to other processes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .labels import ContainerInfo, ContainerSettings, LabelError, Route, normalize_host, routes_for, settings_for
from .config import SourcesConfig

logger = logging.getLogger(__name__)

# Network drivers whose container IPs the host can reach directly through a local bridge.
# Overlay (Swarm) IPs are not local: traffic to them would leave the machine.
ROUTABLE_DRIVERS = frozenset({"bridge", "host"})


@dataclass(frozen=True)
class Backend:
    """One container behind a site."""

    container_id: str
    container_name: str
    group: str
    state: str
    scheme: str
    port: int
    address: str | None  # where to connect; None when not running or not reachable
    problem: str | None = None  # why `address` is None although the container runs
    ready_path: str | None = None  # wakeproxy.ready-path: GET it (< 500) before calling a woken site ready

    @property
    def ready(self) -> bool:
        return self.state == "running" and self.address is not None


@dataclass(frozen=True)
class Site:
    """Everything the proxy needs to answer one declared host (or wildcard)."""

    host: str
    backends: tuple[Backend, ...]

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

    def stop_order(self, snapshot: "Snapshot") -> list[list[str]]:
        """Members in layers, dependents before their dependencies (reverse `depends_on`)."""
        return list(reversed(self.start_order(snapshot)))

    def start_order(self, snapshot: "Snapshot") -> list[list[str]]:
        """Members in layers: each layer only depends on earlier ones (Compose `depends_on`)."""
        service_of = {cid: snapshot.settings[cid].service for cid in self.members if cid in snapshot.settings}
        by_service = {svc: cid for cid, svc in service_of.items() if svc}
        deps = {
            cid: {by_service[d.service] for d in snapshot.settings[cid].depends_on
                  if d.service in by_service and by_service[d.service] != cid}
            for cid in self.members if cid in snapshot.settings
        }
        layers: list[list[str]] = []
        placed: set[str] = set()
        while len(placed) < len(deps):
            layer = [c for c in deps if c not in placed and deps[c] <= placed]
            if not layer:  # a cycle: put the rest together rather than never
                layer = [c for c in deps if c not in placed]
            layers.append(layer)
            placed.update(layer)
        return layers


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

    def lookup(self, host: str) -> Site | None:
        """Exact name first; else the longest `*.suffix` that matches (any depth)."""
        h = normalize_host(host)
        site = self.exact.get(h)
        if site is not None or not self.wildcards:
            return site
        i = h.find(".")
        while i != -1:
            site = self.wildcards.get(h[i + 1:])
            if site is not None:
                return site
            i = h.find(".", i + 1)
        return None

    @property
    def hosts(self) -> list[str]:
        return sorted(self.exact) + sorted(f"*.{w}" for w in self.wildcards)


def _choose_address(
    info: ContainerInfo,
    route: Route,
    allowed: tuple[str, ...],
    drivers: Mapping[str, str],
) -> tuple[str | None, str | None]:
    """(address, problem): the container's IP on a network the proxy may use.

    A stopped container has no IP but keeps its network attachments: it is ours
    to wake (and to put to sleep) only when one of them is a network we may use.
    """
    if route.network:
        candidates = [route.network]
    elif allowed:
        candidates = [n for n in allowed if n in info.networks]
    else:
        candidates = sorted(info.networks)
    for net in candidates:
        if net not in info.networks:
            continue
        ip = info.networks.get(net)
        driver = drivers.get(net, "bridge" if net == "bridge" else "")
        if net == "host" or driver == "host":
            return ("127.0.0.1" if info.running else None), None
        if driver in ROUTABLE_DRIVERS and (ip or not info.running):
            return (ip if info.running else None), None
    on = ", ".join(sorted(info.networks)) or "no network"
    if route.network:
        why = f"it asks to be reached on network '{route.network}' but is on: {on}"
        if route.network in info.networks and drivers.get(route.network) not in ROUTABLE_DRIVERS:
            why = f"network '{route.network}' ({drivers.get(route.network) or 'unknown'} driver) is not reachable from this host"
    elif allowed:
        why = f"it is on {on}, and the proxy may only use: {', '.join(allowed)}"
    else:
        why = f"it has no IP on a local bridge network (it is on: {on})"
    return None, f"container '{info.name}' cannot be reached: {why}"


def build_snapshot(
    containers: Iterable[ContainerInfo],
    sources: SourcesConfig,
    allowed_networks: tuple[str, ...],
    network_drivers: Mapping[str, str],
    synced: bool = True,
    route_cache: dict[str, tuple[ContainerInfo, tuple[list[Route], ContainerSettings] | str]] | None = None,
) -> Snapshot:
    """Index every container's routes by host.

    `route_cache` (id → (info, routes or error)) lets the Docker view skip
    re-parsing labels of containers whose labels and env did not change; label
    errors are logged only when first seen.
    """
    by_host: dict[str, list[Backend]] = {}
    all_containers: dict[str, ContainerInfo] = {}
    skipped: dict[str, str] = {}
    settings: dict[str, ContainerSettings] = {}
    members: dict[str, list[ContainerInfo]] = {}
    routed: set[str] = set()
    for info in containers:
        all_containers[info.id] = info
        cached = route_cache.get(info.id) if route_cache is not None else None
        if cached is not None and cached[0].labels == info.labels and cached[0].env == info.env \
                and cached[0].exposed_ports == info.exposed_ports:
            parsed = cached[1]
        else:
            try:
                parsed = (routes_for(info, sources), settings_for(info))
            except LabelError as e:
                parsed = str(e)
                logger.warning(f"container '{info.name}' skipped: {e}")
            if route_cache is not None:
                route_cache[info.id] = (info, parsed)
        if isinstance(parsed, str):
            skipped[info.name] = parsed
            continue
        routes, settings[info.id] = parsed
        members.setdefault(info.group, []).append(info)
        for route in routes:
            address, problem = _choose_address(info, route, allowed_networks, network_drivers)
            if problem is None:
                routed.add(info.id)  # only containers we may reach are ever started or stopped
            by_host.setdefault(route.host, []).append(
                Backend(info.id, info.name, info.group, info.state, route.scheme, route.port, address, problem,
                        settings[info.id].ready_path)
            )
    exact: dict[str, Site] = {}
    wildcards: dict[str, Site] = {}
    for host, backends in by_host.items():
        backends.sort(key=lambda b: b.container_name)
        site = Site(host, tuple(backends))
        if host.startswith("*."):
            wildcards[host[2:]] = site
        else:
            exact[host] = site
    endpoints: dict[str, list[Backend]] = {}
    for backends in by_host.values():
        for b in backends:
            if b not in endpoints.setdefault(b.container_id, []):
                endpoints[b.container_id].append(b)
    groups: dict[str, Group] = {}
    for name, infos in members.items():
        infos.sort(key=lambda i: i.name)
        ids = tuple(i.id for i in infos)
        group_routed = frozenset(i for i in ids if i in routed)
        if not group_routed:
            continue  # nothing routes to it, so no request may ever start it
        strategies = [settings[i].wake_strategy for i in ids if settings[i].wake_strategy]
        timeouts = [settings[i].wake_timeout for i in ids if settings[i].wake_timeout]
        idle = [settings[i].idle_timeout for i in ids if settings[i].idle_timeout is not None]
        actions = [settings[i].idle_action for i in ids if settings[i].idle_action]
        groups[name] = Group(name, ids, group_routed, strategies[0] if strategies else None,
                             max(timeouts) if timeouts else None,
                             (0.0 if 0.0 in idle else max(idle)) if idle else None,
                             actions[0] if actions else None)
    if route_cache is not None:
        for gone in set(route_cache) - set(all_containers):
            del route_cache[gone]
    return Snapshot(exact, wildcards, all_containers, settings, groups,
                    {cid: tuple(bs) for cid, bs in endpoints.items()}, skipped, synced)
