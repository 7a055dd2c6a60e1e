"""DockerView: one listing plus the event stream → a fresh Snapshot after every change.

All blocking Docker SDK calls happen in one daemon thread owned by this class.
The event loop only receives finished `Snapshot` values through
`loop.call_soon_threadsafe`, so the request path never waits for Docker.

When the event stream breaks (daemon restart, socket gone) the thread
reconnects with backoff and resyncs from a full listing; until then the last
snapshot keeps serving.

The listing lacks two things routing needs: the environment (only `USED_ENV`
is kept) and the exposed ports, which cost one inspect per container (~0.9 ms
each through `Inspector`, no faster in parallel).  Both are fixed at `docker create`, so they are
kept per container ID in `state_dir/containers.json`: a restart inspects only
the containers created since the file was last written.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors

from wakeproxy.config import Config
from wakeproxy.docker.client import LISTING_TIMEOUT, connect
from wakeproxy.docker.fields import created_time as _created
from wakeproxy.docker.fields import parse_env as _parse_env
from wakeproxy.docker.fields import parse_exposed as _parse_exposed
from wakeproxy.docker.networks import RESOLV_CONF, NetworkJoiner, own_container_id, resolver_addresses
from wakeproxy.docker.swarm import SwarmState, swarm_role
from wakeproxy.files import write_private
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.labels import SWARM_SERVICE_LABEL, USED_ENV, ContainerInfo
from wakeproxy.routing.policy import OWNERS_FILE, Ownership
from wakeproxy.routing.snapshot import INGRESS, Policy, Snapshot, build_snapshot
from wakeproxy.runtime import ContainerEvent, EngineState

logger = get_logger(__name__)

# Container actions that can change routing; others (exec_*, attach, top, …) are ignored.
_CONTAINER_ACTIONS = {
    "create", "start", "restart", "die", "stop", "kill", "pause", "unpause",
    "destroy", "rename", "update", "oom", "health_status",
}


MAX_BATCH = 1000  # events applied as one snapshot at most
BACKOFF_MAX = 5.0  # seconds between attempts to reach the engine, at most
RETRY_LOG_INTERVAL = 60.0  # during an outage, one "still cannot reach" line per this long
ROLE_AGAIN = 60.0  # the engine's Swarm role is asked again this often (a `swarm init`, a join, a promotion)
NETWORKS_AGAIN = 2.0  # a service on a network the listing lacks: the networks are listed again, at most this often


def engine_url(config: Config) -> str:
    """Where the engine is expected, for messages: the config's URL, DOCKER_HOST, or the default socket."""
    return config.docker.url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _engine_addresses(config: Config) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """The Docker engine's address when `docker.url` (or DOCKER_HOST) names one over TCP as an IP literal."""
    url = urllib.parse.urlsplit(engine_url(config))
    if url.scheme not in ("tcp", "http", "https") or not url.hostname:
        return ()
    try:
        return (ipaddress.ip_address(url.hostname),)
    except ValueError:
        return ()  # a name: resolved per connection by the SDK; not pinned here


def _resolvers() -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    try:
        return resolver_addresses(RESOLV_CONF.read_text(errors="replace")[:65536])
    except OSError:
        return ()


def _reason(e: BaseException) -> str:
    """A one-line reason for a failed engine call (the SDK nests the socket error deep inside)."""
    text = str(e)
    for marker in ("FileNotFoundError", "ConnectionRefusedError", "PermissionError", "TimeoutError"):
        if marker in text:
            inner = text[text.index(marker):].split(")", 1)[0]
            return inner.replace("(", ": ", 1).replace("'", "")[:200]
    return f"{type(e).__name__}: {text}"[:200]
CACHE_FILE = "containers.json"  # in state_dir: the _Static parts per container ID
CACHE_VERSION = 1
CACHE_SAVE_DELAY = 2.0  # after events that added/removed containers, the cache is written at most this often


class _RoleChanged(Exception):
    """The engine's Swarm role changed since the connection was made: connect again (other events, other listings)."""


@dataclass(frozen=True)
class _StreamEnd:
    """Put in the inbox when the event stream ends or breaks."""

    error: Exception


@dataclass(frozen=True)
class _Static:
    """The parts of a container that never change after `docker create`."""

    env: dict[str, str]  # only the USED_ENV variables
    exposed_ports: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> _Static:
        """From the `Config` of `docker inspect`."""
        return cls(_parse_env(cfg.get("Env")), _parse_exposed(cfg.get("ExposedPorts")))


class OtherEnvKeys(ValueError):
    """The cache was written by a version that kept other environment variables."""


def encode_cache(static: Mapping[str, _Static]) -> bytes:
    """The container cache file's content for `static` (container ID → its static parts)."""
    data = {
        "version": CACHE_VERSION,
        "env_keys": sorted(USED_ENV),
        "containers": {
            cid: {"env": s.env, "exposed_ports": list(s.exposed_ports)} for cid, s in static.items()
        },
    }
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def decode_cache(raw: bytes) -> dict[str, _Static]:
    """The inverse of `encode_cache`; raises ValueError (OtherEnvKeys: stale, not corrupt) saying what is wrong."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("version") != CACHE_VERSION:
        raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
    keys = data.get("env_keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError("'env_keys' is not a list of names")
    if keys != sorted(USED_ENV):
        raise OtherEnvKeys(f"it keeps the variables {keys}, this version reads {sorted(USED_ENV)}")
    containers = data.get("containers")
    if not isinstance(containers, dict):
        raise ValueError("'containers' is not an object")
    out: dict[str, _Static] = {}
    for cid, entry in containers.items():
        env = entry.get("env") if isinstance(entry, dict) else None
        ports = entry.get("exposed_ports") if isinstance(entry, dict) else None
        if not (
            isinstance(env, dict)
            and all(k in USED_ENV and isinstance(v, str) for k, v in env.items())
            and isinstance(ports, list)
            and all(type(p) is int and p >= 0 for p in ports)
        ):
            raise ValueError(f"the entry of container {cid[:12]} is not {{env: {{…}}, exposed_ports: […]}}")
        out[cid] = _Static(dict(env), tuple(sorted(set(ports))))
    return out


def info_from_inspect(data: dict[str, Any]) -> ContainerInfo:
    """`docker inspect` output → ContainerInfo."""
    cfg = data.get("Config") or {}
    state = data.get("State") or {}
    nets = (data.get("NetworkSettings") or {}).get("Networks") or {}
    health = (state.get("Health") or {}).get("Status") or None
    status = state.get("Status") or "unknown"
    return ContainerInfo(
        id=data["Id"],
        name=(data.get("Name") or data["Id"][:12]).lstrip("/"),
        state=status,
        labels=dict(cfg.get("Labels") or {}),
        env=_parse_env(cfg.get("Env")),
        exposed_ports=_parse_exposed(cfg.get("ExposedPorts")),
        networks={name: (n or {}).get("IPAddress") or "" for name, n in nets.items()},
        health=health if status == "running" else None,
        exit_code=state.get("ExitCode") if status in ("exited", "dead") else None,
        created=_created(data.get("Created")),
        network_mode=_network_mode(data),
    )


def _network_mode(data: Mapping[str, Any]) -> str:
    """HostConfig.NetworkMode, in the listing and in `docker inspect` alike ("" when absent)."""
    mode = (data.get("HostConfig") or {}).get("NetworkMode")
    return mode if isinstance(mode, str) else ""


def _health_from_status(status: str) -> str | None:
    for word in ("healthy", "unhealthy", "health: starting"):
        if f"({word})" in status:
            return "starting" if word == "health: starting" else word
    return None


def info_from_listing(entry: dict[str, Any], static: _Static) -> ContainerInfo:
    """One entry of the low-level container listing (plus cached static parts) → ContainerInfo."""
    nets = (entry.get("NetworkSettings") or {}).get("Networks") or {}
    state = entry.get("State") or "unknown"
    names = entry.get("Names") or []
    return ContainerInfo(
        id=entry["Id"],
        name=(names[0] if names else entry["Id"][:12]).lstrip("/"),
        state=state,
        labels=dict(entry.get("Labels") or {}),
        env=static.env,
        exposed_ports=static.exposed_ports,
        networks={name: (n or {}).get("IPAddress") or "" for name, n in nets.items()},
        health=_health_from_status(entry.get("Status") or "") if state == "running" else None,
        created=_created(entry.get("Created")),
        network_mode=_network_mode(entry),
    )


class Inspector:
    """`docker inspect CONTAINER` → its JSON, or None when the container is gone.

    With the engine on a unix socket (the usual case) the request goes straight to the Docker SDK's
    own urllib3 connection pool for that socket, skipping the SDK's `requests` layer: that layer
    costs ~2 ms of CPU per call here (it scans the environment for proxy and netrc settings on every
    request), the engine answers in ~0.5 ms, and a resync inspects every new container (1,000
    containers: ~0.9 s instead of ~2.5 s). Any other transport (tcp, TLS, ssh), or a Docker SDK
    whose adapter does not look as expected, goes through `APIClient.inspect_container`.
    """

    def __init__(self, api: Any) -> None:
        self.api = api
        self._pool: Any = None
        try:
            from docker.transport import UnixHTTPAdapter

            adapter = api.get_adapter(api.base_url)
            if isinstance(adapter, UnixHTTPAdapter):
                # Asked for on every call, never kept: the adapter keeps one pool per URL in a small LRU
                # (25) and closes the ones it drops, and the Swarm view's listings are many URLs.
                self._adapter = adapter
                self._pool = adapter.get_connection(api.base_url)
                self._prefix = f"/v{api.api_version}/containers/"
                self._timeout = getattr(api, "timeout", 30)
        except Exception as e:  # noqa: BLE001 - an SDK of another shape: the SDK's own call is fine
            logger.debug(f"docker: inspecting through the SDK ({type(e).__name__}: {e})")
            self._pool = None

    def __call__(self, cid: str) -> dict[str, Any] | None:
        if self._pool is None:
            try:
                return self.api.inspect_container(cid)
            except docker.errors.NotFound:
                return None  # removed between the listing and now
        r = self._adapter.get_connection(self.api.base_url).urlopen(
            "GET", self._prefix + urllib.parse.quote(cid, safe="") + "/json",
            retries=False, timeout=self._timeout, preload_content=True,
        )
        if r.status == 404:
            return None
        if r.status != 200:
            raise docker.errors.APIError(f"inspect {cid[:12]}: HTTP {r.status}: {r.data[:300]!r}")
        data: dict[str, Any] = json.loads(r.data)
        return data


class DockerView:
    """Keeps a `Snapshot` of the Docker engine current and hands each new one to `publish`."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        publish: Callable[[Snapshot], None],
        emit: Callable[[ContainerEvent], None] | None = None,
        report: Callable[[EngineState], None] | None = None,
        own_id: str | None | bool = True,
    ) -> None:
        """`own_id`: the proxy's own container ID (None: not in one); True: found in /proc/self/mountinfo."""
        self.config = config
        self.loop = loop
        self.publish = publish
        self.emit = emit
        self.report = report
        self.engine = EngineState(url=engine_url(config))
        self._containers: dict[str, ContainerInfo] = {}
        self._static: dict[str, _Static] = {}
        self._cache_path = config.state_dir / CACHE_FILE
        self._cache_on = True  # False once the file could not be written: no retries, no more warnings
        self._cache_saved: bytes | None = None  # what the file holds, as far as we know
        self._unsaved_since: float | None = None  # monotonic time of the first change not yet written
        self._drivers: dict[str, str] = {}
        self._inspector: Inspector | None = None
        self._route_cache: dict[str, Any] = {}
        self._policy = Policy.from_config(config)
        self._ownership = Ownership()
        self._owners_path = config.state_dir / OWNERS_FILE
        self._owners_on = True  # False once the file could not be written
        self._joiner = NetworkJoiner(config.state_dir, config.docker.join_networks,
                                     _engine_addresses(config) + _resolvers())
        self._subnets: dict[str, tuple[str, ...]] = {}
        self._net_names: dict[str, str] = {}  # network id → name
        self._swarm: SwarmState | None = None  # set while the engine is a Swarm manager (docker.swarm)
        self.swarm_role = "unknown"  # manager | worker | none | off, for `wakeproxy status`
        self._swarm_said = ""  # the role last logged about (said once per change)
        self._swarm_warned = 0.0  # monotonic time of the last "Swarm listing failed" line
        self._networks_read_at = 0.0  # monotonic time of the last network listing
        self._role_at = 0.0  # monotonic time the Swarm role was last asked
        # For metrics (read from the loop: plain ints, each replaced whole): events read, full listings,
        # engine calls that failed (a lost connection, a refused Swarm listing).
        self.stats: dict[str, int] = {"events": 0, "resyncs": 0, "errors": 0}
        self._last: Snapshot | None = None
        self._own_id = own_container_id() if own_id is True else own_id or None
        self._api: Any = None  # the connected client's API, for the joiner (this thread only)
        self._stop = threading.Event()
        self._events: Any = None
        self._thread = threading.Thread(target=self._run, name="wakeproxy-docker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        events = self._events
        if events is not None:
            try:
                events.close()
            except Exception:  # closing a half-broken stream may raise; we are leaving anyway
                pass
        self._thread.join(timeout=5)

    # --- the thread -----------------------------------------------------------

    def _connect(self) -> docker.DockerClient:
        return connect(self.config.docker, LISTING_TIMEOUT)

    def _run(self) -> None:
        self._load_cache()
        self._ownership.load(self._owners_path)
        try:
            self._run_connected()
        finally:
            if self._unsaved_since is not None:
                self._save_cache()

    def _set_engine(self, state: str, error: str | None = None) -> None:
        e = self.engine
        connected = e.ever_connected or state == "connected"
        since = e.since if state == e.state and e.since else time.time()
        self.engine = EngineState(state, e.url, since, error if error is not None else e.last_error, connected,
                                  self.swarm_role)
        if self.report is not None:
            self._call(self.report, self.engine)

    def _run_connected(self) -> None:
        backoff = 0.25
        outage_logged = False
        attempts = 0
        last_line = 0.0
        while not self._stop.is_set():
            try:
                attempts += 1
                client = self._connect()
                self._detect_swarm(client.api)
                # Subscribe first, then list: nothing that happens in between is missed.
                types = ["container", "network"] + (["service"] if self._swarm is not None else [])
                self._events = client.api.events(decode=True, filters={"type": types})
                inbox: queue.Queue[Any] = queue.Queue()
                threading.Thread(
                    target=self._read, args=(self._events, inbox), name="wakeproxy-docker-events", daemon=True
                ).start()
                t0 = time.monotonic()
                inspected, cached = self._resync(client)
                logger.info(
                    f"docker: synced {len(self._containers)} containers"
                    + (f" and {len(self._swarm.services)} services" if self._swarm is not None else "") + " in "
                    f"{(time.monotonic() - t0) * 1000:.0f} ms ({inspected} inspected, {cached} cached)"
                    + (f" (after {attempts} attempts)" if outage_logged else "")
                )
                self._set_engine("connected")
                if self._unsaved_since is not None:
                    self._save_cache()
                backoff, outage_logged, attempts = 0.25, False, 0
                self._follow(client, inbox)
            except _RoleChanged as e:
                logger.info(f"docker: {e}; reading everything again")
                backoff = 0.25
            except Exception as e:
                if self._stop.is_set():
                    return
                self.stats["errors"] += 1
                reason = _reason(e)
                next_in = min(backoff * 2, BACKOFF_MAX)
                if not outage_logged:
                    if self.engine.ever_connected:
                        logger.warning(f"docker: lost the engine at {self.engine.url} ({reason}); serving the "
                                       f"last known routes; retrying every {backoff:g}–{BACKOFF_MAX:g} s")
                    else:
                        logger.warning(f"docker: cannot reach the Docker engine at {self.engine.url}: {reason}; "
                                       f"retrying every {backoff:g}–{BACKOFF_MAX:g} s (no site is known until then)")
                    outage_logged, last_line = True, time.monotonic()
                elif time.monotonic() - last_line >= RETRY_LOG_INTERVAL:
                    logger.warning(f"docker: still cannot reach {self.engine.url} after {attempts} attempts "
                                   f"({reason}); next attempt in {next_in:g} s")
                    last_line = time.monotonic()
                else:
                    logger.debug(f"docker: attempt {attempts} failed ({reason}); next in {next_in:g} s")
                self._set_engine("retrying", reason)
            finally:
                events, self._events = self._events, None
                if events is not None:
                    try:
                        events.close()
                    except Exception:
                        pass
            self._stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _detect_swarm(self, api: Any) -> None:
        """Route and wake Swarm services when the engine is a manager (docker.swarm: auto / on)."""
        mode = self.config.docker.swarm
        role = "off" if mode == "off" else swarm_role(api.info())
        self._role_at = time.monotonic()
        self.swarm_role = role
        if role == "manager":
            if self._swarm is None:
                self._swarm = SwarmState(self.config.docker.swarm_resync)
        else:
            self._swarm = None
        if role == self._swarm_said:
            return
        self._swarm_said = role
        if role == "manager":
            logger.info("docker: the engine is a Swarm manager: services are routed and woken too "
                        "(labels under deploy.labels)")
        elif role == "worker":
            logger.error("docker: the engine is a Swarm worker: services can only be listed and scaled on a "
                         "manager; point docker.url at a manager (or run the proxy on one). Containers are "
                         "served as usual")
        elif role == "none" and mode == "on":
            logger.error("docker: docker.swarm is on, but the engine is not in a swarm: no service is routed "
                         "(docker swarm init, or docker.swarm: auto)")

    @staticmethod
    def _read(events: Any, inbox: queue.Queue[Any]) -> None:
        """Move events from the blocking stream into `inbox`; end with a _StreamEnd."""
        try:
            for event in events:
                inbox.put(event)
            inbox.put(_StreamEnd(ConnectionError("the event stream ended")))
        except Exception as e:
            inbox.put(_StreamEnd(e))

    def _follow(self, client: docker.DockerClient, inbox: queue.Queue[Any]) -> None:
        """Apply events in batches: everything that queued up while the previous batch was
        applied becomes one new snapshot (a `docker compose up` of 20 containers is not 20).
        Between batches, the container cache is written once CACHE_SAVE_DELAY has passed since
        its first unsaved change (a burst of 1000 creates is a few writes, not 1000)."""
        while not self._stop.is_set():
            wait = self._cache_wait(time.monotonic())
            if wait == 0.0:
                self._save_cache()
                wait = None
            retry = self._joiner.next_retry()
            if retry is not None:
                due = max(0.0, retry - time.monotonic())
                if due == 0.0:
                    self._publish()  # a network that could not be joined: try it again
                    self._sync_networks()
                    continue
                wait = due if wait is None else min(wait, due)
            if self._swarm is not None:
                due_at = self._swarm.poll_due(time.monotonic())
                if due_at is not None:
                    due = max(0.0, due_at - time.monotonic())
                    if due == 0.0:
                        if self._swarm_do("task listing", functools.partial(self._swarm.poll, client.api)):
                            self._publish()
                            self._sync_networks()
                        continue
                    wait = due if wait is None else min(wait, due)
            if self.config.docker.swarm != "off" and self._role_at:
                due = self._role_at + ROLE_AGAIN - time.monotonic()
                if due <= 0:
                    self._role_at = time.monotonic()
                    role = swarm_role(client.api.info())
                    if role != self.swarm_role:
                        raise _RoleChanged(f"the engine's Swarm role changed from {self.swarm_role} to {role}")
                    continue
                wait = due if wait is None else min(wait, due)
            release = self._ownership.next_release(self._policy.names.release_after)
            if release is not None:
                due = max(0.0, release - time.time())
                if due == 0.0:
                    self._publish()  # a held name is free now: the next claimant gets it
                    self._sync_networks()
                    continue
                wait = due if wait is None else min(wait, due)
            try:
                batch = [inbox.get(timeout=wait)]
            except queue.Empty:
                continue  # the cache or a name release is due: handled at the top of the loop
            while len(batch) < MAX_BATCH and not isinstance(batch[-1], _StreamEnd):
                try:
                    batch.append(inbox.get_nowait())
                except queue.Empty:
                    break
            end = batch.pop() if isinstance(batch[-1], _StreamEnd) else None
            if batch and not self._stop.is_set():
                self._apply(client, batch)
            if end is not None:
                raise end.error

    def _resync(self, client: docker.DockerClient) -> tuple[int, int]:
        """Rebuild everything from one listing; inspect only containers whose static parts are
        unknown. Returns (inspected, cached): how many listed containers were inspected now and
        how many were known (from the cache file or an earlier sync)."""
        api = client.api
        self._api = api
        self.stats["resyncs"] += 1
        self._inspector = Inspector(api)
        self._read_networks(api)
        self._joiner.detect(api, self._own_id)
        listing = api.containers(all=True)
        missing = [e["Id"] for e in listing if e["Id"] not in self._static]
        if missing:
            with ThreadPoolExecutor(max_workers=4) as pool:  # more workers: no faster (engine-bound)
                for cid, data in zip(missing, pool.map(lambda i: self._inspect(api, i), missing)):
                    if data is not None:
                        self._static[cid] = _Static.from_config(data.get("Config") or {})
                        self._mark_unsaved()
                        name = (data.get("Name") or cid[:12]).lstrip("/")
                        logger.debug(f"docker: inspected {name} (not in the container cache)")
        if self._swarm is not None:
            swarm = self._swarm
            swarm.net_names = self._net_names
            self._swarm_do("listing", lambda: swarm.resync_all(api))
        containers: dict[str, ContainerInfo] = {}
        for entry in listing:
            static = self._static.get(entry["Id"])
            if static is not None:
                containers[entry["Id"]] = info_from_listing(entry, static)
        self._containers = containers
        for gone in set(self._static) - set(containers):
            del self._static[gone]
            self._mark_unsaved()
        self._publish()
        self._sync_networks()
        return len(missing), len(listing) - len(missing)

    def _read_networks(self, api: Any) -> None:
        """Every network's driver (which ones are routable) and subnets (which ones may be joined)."""
        listing = api.networks()
        self._networks_read_at = time.monotonic()
        # The routing mesh's network is an overlay that nothing may be routed on (it has no task IPs to
        # use, and no IPVS on many kernels): its driver is called INGRESS here.
        self._drivers = {n["Name"]: INGRESS if n.get("Ingress") else n.get("Driver") or "" for n in listing}
        self._net_names = {n["Id"]: n["Name"] for n in listing if n.get("Id") and n.get("Name")}
        if self._swarm is not None:
            self._swarm.net_names = self._net_names
            self._swarm.rebuild_all()
        self._subnets = {n["Name"]: tuple(str(c.get("Subnet") or "") for c in ((n.get("IPAM") or {}).get("Config") or ())
                                          if isinstance(c, dict) and c.get("Subnet")) for n in listing}
        self._joiner.subnets = self._subnets  # read by the snapshot's refusals (a whole new dict: no lock needed)
        self._joiner.overlays = {n["Name"]: bool(n.get("Attachable")) for n in listing
                                 if n.get("Driver") == "overlay" and not n.get("Ingress")}

    def networks_status(self) -> dict[str, Any] | None:
        """The proxy's own container and the networks it joined, for `wakeproxy status` (None: not in one)."""
        return self._joiner.summary

    def _inspect(self, api: Any, cid: str) -> dict[str, Any] | None:
        if self._inspector is None or self._inspector.api is not api:
            self._inspector = Inspector(api)
        return self._inspector(cid)

    def _apply(self, client: docker.DockerClient, batch: list[dict[str, Any]]) -> None:
        """Update the containers from a batch of events, publish one snapshot, then pass the
        container events on (after the snapshot, so listeners see the state they produced)."""
        self.stats["events"] += len(batch)
        last_action: dict[str, str] = {}  # container id → its last action in this batch
        emits: list[ContainerEvent] = []
        refresh_networks = False
        services: dict[str, str] = {}  # service id → its last action in this batch
        task_services: list[str] = []  # services whose task containers had events on this node
        for event in batch:
            kind = event.get("Type")
            raw_action = event.get("Action") or event.get("status") or ""
            action = raw_action.split(":", 1)[0]
            actor = event.get("Actor") or {}
            attrs = actor.get("Attributes") or {}
            if kind == "service":
                sid = actor.get("ID")
                if sid and action in ("create", "update", "remove"):
                    services[sid] = action
                continue
            if kind == "container" and attrs.get(SWARM_SERVICE_LABEL) and action in _CONTAINER_ACTIONS:
                task_services.append(attrs[SWARM_SERVICE_LABEL])
            if kind == "network":
                if action in ("create", "destroy"):
                    refresh_networks = True
                    continue
                if action not in ("connect", "disconnect") or not attrs.get("container"):
                    continue
                last_action[attrs["container"]] = action
            elif kind == "container" and action in _CONTAINER_ACTIONS:
                cid = actor.get("ID") or event.get("id")
                if not cid:
                    continue
                last_action[cid] = action
                code = attrs.get("exitCode")
                emits.append(ContainerEvent(
                    action=action,
                    container_id=cid,
                    name=attrs.get("name") or cid[:12],
                    exit_code=int(code) if code is not None and str(code).lstrip("-").isdigit() else None,
                    health=raw_action.split(":", 1)[1].strip() if action == "health_status" and ":" in raw_action else None,
                ))
        changed = False
        if refresh_networks:
            self._read_networks(client.api)
            changed = True
        swarm = self._swarm
        if swarm is not None:
            for sid, action in services.items():
                if action == "remove":
                    changed = swarm.remove(sid) or changed
                else:
                    read = functools.partial(swarm.refresh_service, client.api, sid)
                    changed = self._swarm_do("service read", read) or changed
            pending = [s for s in task_services if s not in services]
            if pending:
                changed = self._swarm_do("task listing", lambda: swarm.refresh_tasks(client.api, pending)) or changed
        for cid, action in last_action.items():
            data = None if action == "destroy" else self._inspect(client.api, cid)
            if data is None:  # destroyed, or removed before we could look
                changed = self._containers.pop(cid, None) is not None or changed
                if self._static.pop(cid, None) is not None:
                    self._mark_unsaved()
                continue
            info = info_from_inspect(data)
            static = _Static(dict(info.env), info.exposed_ports)
            if self._static.get(cid) != static:
                self._static[cid] = static
                self._mark_unsaved()
            changed = changed or self._containers.get(cid) != info
            self._containers[cid] = info
        if changed:
            self._publish()
        if self.emit is not None:
            for ev in emits:
                self._call(self.emit, ev)
        if changed:
            self._sync_networks()

    # --- the container cache (only ever touched by the thread) ------------------------

    def _load_cache(self) -> None:
        """Take the static parts of containers from the cache file; any problem: inspect as usual."""
        path = self._cache_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            logger.info(f"docker: no container cache {path} yet; every container is inspected once")
            return
        except OSError as e:
            logger.warning(f"docker: cannot read the container cache {path} ({e}); every container is inspected")
            return
        try:
            loaded = decode_cache(raw)
        except OtherEnvKeys as e:
            logger.info(f"docker: the container cache {path} is from another version ({e}); every container is inspected")
            return
        except ValueError as e:
            logger.warning(
                f"docker: the container cache {path} is corrupt ({type(e).__name__}: {e}); ignored, every "
                "container is inspected"
            )
            return
        self._static.update(loaded)
        self._cache_saved = raw

    def _mark_unsaved(self) -> None:
        if self._unsaved_since is None:
            self._unsaved_since = time.monotonic()

    def _cache_wait(self, now: float) -> float | None:
        """Seconds until the cache is due to be written (0.0: now); None when nothing is unsaved."""
        if self._unsaved_since is None:
            return None
        return max(0.0, self._unsaved_since + CACHE_SAVE_DELAY - now)

    def _save_cache(self) -> None:
        """Write the cache file atomically if its content changed; give up for good when it cannot be written."""
        self._unsaved_since = None
        if self._ownership.dirty:
            self._save_owners()
        if not self._cache_on:
            return
        data = encode_cache(self._static)
        if data == self._cache_saved:
            return
        try:
            write_private(self._cache_path, data)
        except OSError as e:
            self._cache_on = False
            logger.warning(
                f"docker: cannot write the container cache {self._cache_path} ({e}); going on without it "
                "(a restart inspects every container)"
            )
            return
        self._cache_saved = data

    def _swarm_do(self, what: str, call: Callable[[], bool]) -> bool:
        """A Swarm listing; when the engine refuses it (a manager without quorum answers 503, a demoted one
        refuses), the services keep their last known state, containers are served as before, and the
        listing is tried again with a backoff. A broken connection is not this: it reconnects, as ever."""
        swarm = self._swarm
        assert swarm is not None
        try:
            changed = call()
            if swarm.unknown_networks() and swarm.api is not None \
                    and time.monotonic() - self._networks_read_at >= NETWORKS_AGAIN:
                # A stack's network is made with its services; its event may come later than theirs.
                self._read_networks(swarm.api)
                changed = True
        except docker.errors.APIError as e:
            self.stats["errors"] += 1
            now = time.monotonic()
            wait = swarm.failed(now)
            if now - self._swarm_warned >= RETRY_LOG_INTERVAL:
                self._swarm_warned = now
                logger.warning(f"docker: Swarm {what} failed ({_reason(e)}); services keep their last known "
                               f"state; trying again in {wait:g} s")
            return False
        if swarm.recovered():
            self._swarm_warned = 0.0
            logger.info("docker: Swarm listings work again")
        return changed

    def _overlays(self) -> frozenset[str] | None:
        """The Swarm networks the proxy reaches tasks on: its own container's overlays; when it is not
        in a container (a process put into a network namespace by hand), the docker.networks the
        operator names; None: none (services are not reachable)."""
        if self._swarm is None:
            return None
        own = self._containers.get(self._own_id) if self._own_id else None
        if own is not None:
            return frozenset(n for n in own.networks if self._drivers.get(n) == "overlay")
        if self.config.docker.networks:
            return frozenset(n for n in self.config.docker.networks if self._drivers.get(n) == "overlay")
        return None

    def _publish(self) -> Snapshot:
        services = list(self._swarm.services.values()) if self._swarm is not None else []
        snap = build_snapshot(
            [*self._containers.values(), *services],
            self.config.sources,
            self.config.docker.networks,
            self._drivers,
            synced=True,
            route_cache=self._route_cache,
            policy=self._policy,
            ownership=self._ownership,
            reach=self._joiner.reach(self._containers),
            unreachable=self._joiner.refusals,
            overlays=self._overlays(),
            overlay_join=self._joiner.joins(),
        )
        if self._ownership.dirty:
            self._mark_unsaved()  # written with the container cache, at most every CACHE_SAVE_DELAY
        self._call(self.publish, snap)
        self._last = snap
        return snap

    def _sync_networks(self) -> None:
        """Join and leave networks for the last snapshot (networks.py). After the snapshot and its
        container events are out: a join takes ~150 ms, and no event may wait for it (the wake of a
        group must not see the `die` of the stop that put it to sleep after its own `start`)."""
        snap, reach = self._last, self._joiner.reach(self._containers)
        if snap is None or reach is None or self._api is None:
            return
        try:
            if self._joiner.sync(self._api, snap, self._drivers, reach, self._subnets):
                self._publish()  # a network that cannot be joined: its sites say why
        except Exception as e:  # the engine went away mid-call: the next resync tries again
            logger.warning(f"docker: joining networks failed: {_reason(e)}")

    def _save_owners(self) -> None:
        """Who owns which name, written atomically whenever it changed (rare: a new name, a release)."""
        self._ownership.dirty = False
        if not self._owners_on:
            return
        try:
            write_private(self._owners_path, self._ownership.encode())
        except OSError as e:
            self._owners_on = False
            logger.warning(f"names: cannot write {self._owners_path} ({e}); owners are kept in memory only "
                           "(after a restart they are decided by container creation time)")

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: the proxy is shutting down
