"""The proxy's own container, and the Docker networks it joins by itself.

In a container on a bridge network the proxy reaches only the containers on the networks its own
container is on (Docker drops traffic between bridges). So, as Docksal's proxy does, it connects
its container to the network of every site it serves while a container of that site runs (or is
paused), and disconnects when none does any more; never from the networks it was started on.

- Joining only while something runs keeps the proxy off the networks of hundreds of sleeping
  sandboxes, and lets `docker compose down` remove a project's network: the proxy has left it
  when the containers stopped, before Compose gets to the network. A wake starts the containers,
  the proxy joins, and the readiness probe passes once the network is joined.
- The networks it joined are written to `state_dir/networks.json` with its container ID, so after
  `docker restart` (which keeps the connections) it still knows which ones are its own to leave.
- With host networking (`--network host`) or outside a container there is nothing to do: every
  local bridge is reachable from the host's network namespace.

All calls run in the Docker view's thread, after a snapshot is published; never on a request.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors

from wakeproxy.files import write_private
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.snapshot import Snapshot

logger = get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MOUNTINFO = Path("/proc/self/mountinfo")
STATE_FILE = "networks.json"
MAX_JOINED = 256  # networks joined at once, at most (each is an interface in the proxy's namespace)
MAX_PER_GROUP = 4  # networks joined for one group (Compose project), at most: no tenant takes the rest
RETRY_AFTER = 30.0  # a network that could not be joined is tried again after this long
# A site's network is needed while its container is so ("starting": a Swarm service that asks for tasks).
KEEP_STATES = frozenset({"running", "paused", "restarting", "starting"})
JOINABLE_DRIVERS = frozenset({"bridge"})  # and an overlay (Swarm) network created `attachable`
_ID_IN_ROOT = re.compile(r"/containers/([0-9a-f]{64})/")
_DOCKER_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")


def container_id_from_mountinfo(text: str) -> str | None:
    """The ID of the container whose mount table this is: Docker bind-mounts its /etc/hostname,
    /etc/hosts and /etc/resolv.conf from /var/lib/docker/containers/<ID>/ (any data-root). On the
    host those files are not such mounts (the host's table does list other containers' shm mounts,
    which is why the mount point must be one of those three files)."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4] in _DOCKER_FILES:
            m = _ID_IN_ROOT.search(fields[3])
            if m:
                return m.group(1)
    return None


def own_container_id(mountinfo: Path = MOUNTINFO) -> str | None:
    try:
        return container_id_from_mountinfo(mountinfo.read_text(errors="replace"))
    except OSError:
        return None


@dataclass(frozen=True)
class Own:
    """The proxy's container: how it is networked, and the networks it must never leave."""

    id: str
    name: str
    mode: str  # "bridge" (joins networks), "host" (reaches every bridge) or the raw NetworkMode ("none", "container:…")
    protected: frozenset[str]


class Refusals(Mapping[str, str]):
    """network → why the proxy cannot reach containers on it: read by `build_snapshot`. With
    `everything` set (joining is off), every network the proxy's container is not on."""

    def __init__(self, known: Mapping[str, str] | None = None, everything: str | None = None,
                 static: Callable[[str], str | None] | None = None) -> None:
        """`static`: why a network can never be joined whatever happens (its subnet), asked per network, so
        a site on one says so in the first snapshot that has it, not only after a join was tried."""
        self._known = dict(known or {})
        self._everything = everything
        self._static = static

    def __getitem__(self, network: str) -> str:
        if network in self._known:
            return self._known[network]
        if self._everything is not None:
            return self._everything.format(network=network)
        why = self._static(network) if self._static is not None else None
        if why is not None:
            return why
        raise KeyError(network)

    def __iter__(self) -> Iterator[str]:
        return iter(self._known)

    def __len__(self) -> int:
        return len(self._known)


_LOOKS_LIKE_AN_ID = re.compile(r"[0-9a-f]{64}")


def tenant_of(group: str) -> str:
    """The tenant a group key belongs to: a Compose project split by `wakeproxy.group` ("P/G") is P."""
    return group.split("/", 1)[0]


def wanted_networks(snapshot: Snapshot) -> dict[str, frozenset[str]]:
    """The networks of the sites' containers that run (or are paused) → the groups that want them."""
    groups: dict[str, set[str]] = {}
    for backends in snapshot.endpoints.values():
        for b in backends:
            if b.network and b.state in KEEP_STATES:
                groups.setdefault(b.network, set()).add(b.group)
    return {n: frozenset(g) for n, g in groups.items()}


RESOLV_CONF = Path("/etc/resolv.conf")
_IP_TOKEN = re.compile(r"[0-9a-fA-F:.]{3,45}")


def resolver_addresses(text: str) -> tuple[IPAddress, ...]:
    """The DNS servers a resolv.conf names: `nameserver` lines, and the upstream servers Docker's embedded
    resolver (127.0.0.11) forwards to, which newer engines note in a `# ExtServers: [host(10.0.0.2)]` line.
    A joined subnet holding one of them would answer the proxy's lookups (its ACME CA's, say)."""
    out: list[IPAddress] = []
    for line in text.splitlines()[:200]:
        words = line.strip()
        if not (words.startswith("nameserver") or "ExtServers" in words):
            continue
        for token in _IP_TOKEN.findall(words.removeprefix("nameserver")):
            try:
                ip = ipaddress.ip_address(token)
            except ValueError:
                continue
            if not ip.is_loopback and ip not in out:
                out.append(ip)
    return tuple(out)


# Not public, and still not a sandbox's to take: link-local (169.254.169.254 answers a cloud VM's metadata)
# and the shared address space of carrier-grade NAT and VPN overlays (100.64.0.0/10, Tailscale's).
_SPECIAL = tuple(ipaddress.ip_network(n) for n in ("169.254.0.0/16", "100.64.0.0/10", "fe80::/10"))


def subnet_problem(net: str, subnets: tuple[str, ...], avoid: tuple[IPAddress, ...]) -> str | None:
    """Why joining a network with these subnets would hand the proxy's own traffic to it, if it would.

    A container's Compose file chooses its network's subnet. Once joined, that subnet is a route of the
    proxy's container: a public range would send the proxy's traffic for those addresses (the ACME CA,
    say) into the sandbox, and one holding the Docker engine's address (`docker.url` over TCP) would let
    the sandbox answer for the engine."""
    for text in subnets:
        try:
            subnet = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return f"network '{net}' has a subnet that cannot be read ({text[:60]!r})"
        if subnet.is_global:
            return (f"network '{net}' uses public addresses ({subnet}): joining it would route the proxy's "
                    "traffic for them into the sandbox")
        if any(subnet.version == r.version and subnet.overlaps(r) for r in _SPECIAL):
            return (f"network '{net}' ({subnet}) overlaps link-local or carrier-grade NAT addresses (cloud "
                    "metadata, VPN overlays): joining it would route the proxy's traffic for them into the sandbox")
        for ip in avoid:
            if ip.version == subnet.version and ip in subnet:
                return (f"network '{net}' ({subnet}) holds {ip}, an address the proxy itself talks to "
                        "(its DNS server, or docker.url): joining it would route that traffic into the sandbox")
    return None


def not_attachable(net: str) -> str:
    return (f"network '{net}' is a Swarm overlay that is not attachable, so the proxy's container cannot join it: "
            "create it with `attachable: true` (stack file) / `--attachable`, or put the proxy on it")


def plan(wanted: Mapping[str, frozenset[str]], on: frozenset[str], ours: frozenset[str], protected: frozenset[str],
         drivers: Mapping[str, str], failed: Mapping[str, str],
         subnets: Mapping[str, tuple[str, ...]] | None = None,
         avoid: tuple[IPAddress, ...] = (), attachable: frozenset[str] = frozenset(),
         ) -> tuple[list[str], list[str], dict[str, str]]:
    """(join, leave, refused): which networks to connect to and leave, and why others cannot be joined.

    Only networks the proxy joined itself (`ours`) are ever left, never a `protected` one. One group
    gets at most MAX_PER_GROUP networks joined for it, all groups at most MAX_JOINED.
    """
    refused: dict[str, str] = {}
    # Per group: its networks in name order; the first MAX_PER_GROUP that need a join are its share.
    share: dict[str, int] = {}
    # What the proxy has joined already counts first: containers started one after another (depends_on)
    # would otherwise each get a share of their own.
    for net in wanted:
        if net in on and net in ours and net not in protected:
            for t in {tenant_of(g) for g in wanted[net]}:
                share[t] = share.get(t, 0) + 1
    allowed: set[str] = set()
    over: dict[str, str] = {}
    for net in sorted(wanted):
        if net in on:
            continue
        # Per tenant: a Compose project split by wakeproxy.group labels ("P/G") is still one project.
        tenants = sorted({tenant_of(g) for g in wanted[net]})
        fits = [t for t in tenants if share.get(t, 0) < MAX_PER_GROUP]
        if fits:
            allowed.add(net)
            for t in tenants:
                share[t] = share.get(t, 0) + 1
        else:
            over[net] = tenants[0]
    order = sorted(wanted, key=lambda n: (-len(wanted[n]), n))
    keep: list[str] = []
    for net in order:
        driver = drivers.get(net, "")
        if net in on:
            keep.append(net)
        elif driver == "overlay" and net not in attachable:
            refused[net] = not_attachable(net)
        elif driver not in JOINABLE_DRIVERS and driver != "overlay":
            refused[net] = f"network '{net}' ({driver or 'unknown'} driver) cannot be joined by the proxy's container"
        elif _LOOKS_LIKE_AN_ID.fullmatch(net):
            # Docker looks a full ID up before a name: a network named with another one's ID would make the
            # proxy join (and never leave) that other network.
            refused[net] = f"network '{net[:12]}…' is named like a network ID: the proxy joins it by no name"
        elif net in failed:
            refused[net] = failed[net]
        elif net in over:
            refused[net] = (f"project '{over[net]}' has {MAX_PER_GROUP} networks joined for it already (the most "
                            "per project): put its sites on fewer networks")
        elif (why := subnet_problem(net, (subnets or {}).get(net, ()), avoid)) is not None:
            refused[net] = why
        else:
            keep.append(net)
    extra = [n for n in keep if n not in on and n not in protected]
    joined_now = len([n for n in on if n not in protected])
    room = max(0, MAX_JOINED - joined_now)
    join = extra[:room]
    for net in extra[room:]:
        refused[net] = f"the proxy's container is on {MAX_JOINED} networks already (the most it joins)"
    leave = sorted(n for n in on if n in ours and n not in protected and n not in wanted)
    return join, leave, refused


class NetworkJoiner:
    """Keeps the proxy's container on the networks its sites need (see the module's doc)."""

    def __init__(self, state_dir: Path, enabled: bool, avoid: tuple[IPAddress, ...] = ()) -> None:
        """`avoid`: addresses the proxy itself talks to (the Docker engine's): never routed into a sandbox."""
        self.enabled = enabled
        self.avoid = avoid
        self.path = state_dir / STATE_FILE
        self.own: Own | None = None
        self.ours: set[str] = set()
        self._failed: dict[str, tuple[str, float]] = {}  # network → (why, monotonic time to retry)
        self.refusals: Refusals = Refusals()
        self._saved: bytes | None = None
        self._warned_gateway = False
        self.summary: dict[str, Any] | None = None  # for `wakeproxy status`: replaced whole, read from the loop
        self.subnets: Mapping[str, tuple[str, ...]] = {}  # network → subnets, set by the view from its listing
        self.overlays: Mapping[str, bool] = {}  # overlay network → attachable, set by the view from its listing

    # --- the proxy's own container, once per connection to the engine ---------------------------

    def detect(self, api: Any, own_id: str | None) -> Own | None:
        """Find out how the proxy's container (`own_id`, None: not in one) is networked."""
        if own_id is None:
            self.own = None
            return None
        try:
            data = api.inspect_container(own_id)
        except Exception as e:  # noqa: BLE001 - NotFound: another engine's container; anything else: say it
            logger.warning(f"docker: this process looks like it runs in container {own_id[:12]}, but the engine "
                           f"cannot tell about it ({type(e).__name__}: {str(e)[:200]}): no network joining")
            self.own = None
            return None
        mode = str(((data.get("HostConfig") or {}).get("NetworkMode")) or "default")
        nets = frozenset((data.get("NetworkSettings") or {}).get("Networks") or {})
        name = str(data.get("Name") or own_id[:12]).lstrip("/")
        recorded = self._load(own_id)
        self.ours = set(recorded & nets)
        started_on = {("bridge" if mode == "default" else mode)} | set(nets - recorded)
        kind = "host" if mode == "host" else mode if mode == "none" or mode.startswith("container:") else "bridge"
        self.own = Own(own_id, name, kind, frozenset(started_on))
        if kind == "host":
            logger.info(f"docker: running in container {name} with the host's network: every local bridge is reachable")
        elif kind == "bridge" and self.enabled:
            logger.info(f"docker: running in container {name} on {', '.join(sorted(nets)) or 'no network'}: it joins "
                        "the networks of running sites by itself" + (f" (joined before: {', '.join(sorted(self.ours))})"
                                                                     if self.ours else ""))
        elif kind == "bridge":
            logger.warning(f"docker: running in container {name} on {', '.join(sorted(nets))} with "
                           "docker.join_networks false: sites on other networks answer 503 until you connect it")
        else:
            logger.warning(f"docker: running in container {name} with network mode {mode!r}: only sites on its "
                           "own networks can be reached")
        self._refresh_refusals()
        self._summarize()
        return self.own

    def reach(self, containers: Mapping[str, Any]) -> frozenset[str] | None:
        """The networks the proxy can reach containers on; None = all local bridges (host networking)."""
        own = self.own
        if own is None or own.mode == "host":
            return None
        info = containers.get(own.id)
        return frozenset(info.networks) if info is not None else frozenset()

    def _refresh_refusals(self) -> None:
        own = self.own
        now = time.monotonic()
        failed = {n: why for n, (why, until) in self._failed.items() if until > now}
        if own is None or own.mode == "host" or (own.mode == "bridge" and self.enabled):
            self.refusals = Refusals(failed, static=self._static_refusal)
        elif own.mode == "bridge":
            self.refusals = Refusals(failed, everything=(
                "the proxy's container is not on network '{network}' (docker.join_networks is false: "
                "`docker network connect {network} " + own.name + "`)"))
        else:
            self.refusals = Refusals(failed, everything=(
                "the proxy's container (network mode " + own.mode + ") is not on network '{network}'"))

    def next_retry(self) -> float | None:
        """Monotonic time of the next failed network to try again, if any."""
        return min((until for _, until in self._failed.values()), default=None)

    # --- after every snapshot ------------------------------------------------------------------

    def sync(self, api: Any, snapshot: Snapshot, drivers: Mapping[str, str], on: frozenset[str],
             subnets: Mapping[str, tuple[str, ...]] | None = None) -> bool:
        """Join and leave what the snapshot calls for. True when the refusals changed (the view then
        builds the snapshot again, so the sites on a network that cannot be joined say why)."""
        own = self.own
        if own is None or own.mode != "bridge" or not self.enabled:
            return False
        now = time.monotonic()
        before = dict(self.refusals)
        for net in [n for n, (_, until) in self._failed.items() if until <= now]:
            del self._failed[net]
        failed = {n: why for n, (why, _) in self._failed.items()}
        if subnets is not None:
            self.subnets = subnets
        join, leave, refused = plan(wanted_networks(snapshot), on, frozenset(self.ours), own.protected, drivers, failed,
                                    self.subnets, self.avoid, frozenset(n for n, a in self.overlays.items() if a))
        for net in join:
            t0 = time.monotonic()
            try:
                self._connect(api, own, net)
            except docker.errors.APIError as e:
                detail = _explain(e)
                if "already exists" in detail or "already attached" in detail:  # joined by a call whose event is still on its way (bridge; overlay)
                    self.ours.add(net)
                    continue
                why = f"the proxy could not join network '{net}': {detail}"
                logger.warning(f"docker: {why}; trying again in {RETRY_AFTER:g} s")
                self._failed[net] = (why, time.monotonic() + RETRY_AFTER)
                refused[net] = why
                continue
            self.ours.add(net)
            logger.info(f"docker: joined network {net} ({(time.monotonic() - t0) * 1000:.0f} ms)")
        for net in leave:
            try:
                api.disconnect_container_from_network(own.id, net)
            except docker.errors.NotFound:
                pass  # the network (or our endpoint) is gone already
            except docker.errors.APIError as e:
                detail = _explain(e)
                if "is not connected" not in detail:
                    logger.warning(f"docker: could not leave network {net}: {detail}")
                    continue
            self.ours.discard(net)
            logger.info(f"docker: left network {net} (no running site on it)")
        if join or leave:
            self._save()
        self.refusals = Refusals(refused, static=self._static_refusal)
        self._summarize()
        return dict(self.refusals) != before

    def _static_refusal(self, net: str) -> str | None:
        if self.overlays.get(net) is False:
            return not_attachable(net)
        return subnet_problem(net, self.subnets.get(net, ()), self.avoid)

    def joins(self) -> bool:
        """Does the proxy join networks by itself (in a container on a bridge or overlay, joining on)?"""
        return self.own is not None and self.own.mode == "bridge" and self.enabled

    def _summarize(self) -> None:
        own = self.own
        self.summary = None if own is None else {
            "container": own.name, "mode": own.mode, "joining": self.enabled and own.mode == "bridge",
            "started_on": sorted(own.protected), "joined": sorted(self.ours),
            "cannot_join": dict(sorted(self.refusals.items())),
        }

    def _connect(self, api: Any, own: Own, net: str) -> None:
        """Connect without taking the container's default route. Docker picks the network that gives a
        container its gateway (and its published ports) by priority, then by name: joining a network
        whose name sorts first moves the published ports there and cuts every connection through them
        (measured on Docker 20.10), and again when the proxy leaves it. Docker 28 (API 1.48) has a
        per-endpoint gateway priority: joined networks get -1, below the networks the proxy was started on.
        Older engines have none: then the operator is told, once, what to do."""
        version = tuple(int(p) for p in re.findall(r"\d+", str(getattr(api, "api_version", "0")))[:2])
        if version >= (1, 48) and all(hasattr(api, n) for n in ("_url", "_post_json", "_raise_for_status")):
            res = api._post_json(api._url("/networks/{0}/connect", net),
                                 data={"Container": own.id, "EndpointConfig": {"GwPriority": -1}})
            api._raise_for_status(res)
            return
        api.connect_container_to_network(own.id, net)
        first = min((n for n in own.protected if n not in ("host", "none")), default=None)
        if first is not None and net < first and not self._warned_gateway:
            self._warned_gateway = True
            logger.warning(
                f"docker: network {net} sorts before {first}, the network this container was started on: this "
                f"Docker engine (API {'.'.join(map(str, version)) or '?'}, before 1.48) moves the container's "
                "default route and published ports to it, which cuts the connections through the published "
                "ports now and when the proxy leaves it. Run the proxy with host networking (recommended), "
                "on Docker 28 or newer, or on a network whose name sorts first (e.g. 0-wakeproxy)")

    # --- state_dir/networks.json ------------------------------------------------------------------

    def _load(self, own_id: str) -> frozenset[str]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return frozenset()
        except OSError as e:
            logger.warning(f"docker: cannot read {self.path} ({e}): the networks joined before are kept")
            return frozenset()
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("joined"), list):
                raise ValueError("not {container, joined: [...]}")
            joined = frozenset(str(n) for n in data["joined"] if isinstance(n, str))
        except (ValueError, RecursionError) as e:
            logger.warning(f"docker: {self.path} is corrupt ({e}); ignored: the networks joined before are kept")
            return frozenset()
        self._saved = raw
        return joined if data.get("container") == own_id else frozenset()  # another container's: not ours

    def _save(self) -> None:
        own = self.own
        if own is None:
            return
        raw = json.dumps({"container": own.id, "joined": sorted(self.ours)}, separators=(",", ":")).encode()
        if raw == self._saved:
            return
        try:
            write_private(self.path, raw)
        except OSError as e:
            logger.warning(f"docker: cannot write {self.path} ({e}); after a restart the proxy keeps the "
                           "networks it joined")
            return
        self._saved = raw


def _explain(e: docker.errors.APIError) -> str:
    detail = e.explanation or str(e)
    if isinstance(detail, bytes):
        detail = detail.decode(errors="replace")
    return str(detail)[:300]
