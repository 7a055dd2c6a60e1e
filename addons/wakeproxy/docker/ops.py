"""The one place that changes containers: start, unpause, stop, pause (and, for idle.remove_after,
removing a retired group's containers and its own networks; for a wake, making a Compose project's
removed `<project>_default` network again).

Each call runs the blocking SDK call in a worker thread (never on the event
loop) with a client of that thread's own, and turns Docker's errors into a
`DockerOpError` whose message a user can act on.  Only the Waker (start,
unpause) and, later, the idle keeper (stop, pause) call this.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import docker
import docker.errors

from wakeproxy.config import DockerConfig
from wakeproxy.docker.client import OPERATION_TIMEOUT, connect
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.labels import PROJECT_LABEL
from wakeproxy.wake.orchestrator import Attachment, OpError

logger = get_logger(__name__)


SCALE_ATTEMPTS = 4  # a scale that keeps meeting "update out of sequence" gives up after this many tries
COMPOSE_NETWORK_LABEL = "com.docker.compose.network"  # with PROJECT_LABEL: `docker compose up` takes the network


def compose_network_labels(project: str) -> dict[str, str]:
    """The labels Compose gives a project's default network (and checks on one it finds)."""
    return {PROJECT_LABEL: project, COMPOSE_NETWORK_LABEL: "default"}


def _post_update(api: Any, service_id: str, version: int, spec: dict[str, Any]) -> Any:
    """POST /services/{id}/update?version=V&registryAuthFrom=spec with `spec`, through the SDK's own
    request helpers (APIClient._url / _post_json / _result: there since docker-py 2, checked here)."""
    for helper in ("_url", "_post_json", "_result"):
        if not callable(getattr(api, helper, None)):
            raise DockerOpError(f"docker service scale failed: this Docker SDK has no APIClient.{helper}; "
                                "install the docker version pyproject.toml names")
    url = api._url("/services/{0}/update", service_id)
    response = api._post_json(url, data=spec, params={"version": version, "registryAuthFrom": "spec"})
    return api._result(response, json=True)


class DockerOpError(OpError):
    """A Docker call failed; the message names the container and Docker's explanation."""


# Docker's words when it has no address left for a network, and what to do about it (README "Networks at
# sandbox scale"): Docker's default pools hold about 30 bridge networks.
_OUT_OF_POOLS = ("could not find an available, non-overlapping ipv4 address pool",
                 "could not find an available, non-overlapping ipv6 address pool", "ipam: address pool exhausted")
OUT_OF_POOLS_FIX = ("Docker has no network addresses left: give it more with \"default-address-pools\" in "
                    "/etc/docker/daemon.json (README: Networks at sandbox scale), restart dockerd, and remove "
                    "unused networks (docker network prune)")
# One network full: every address of its subnet is taken (a Compose file's small `ipam` subnet, say).
_NETWORK_FULL = ("no available ipv4 addresses", "no available ipv6 addresses", "no available addresses")
NETWORK_FULL_FIX = ("a network of this container has no free address left: give it a bigger subnet (its Compose "
                    "file's ipam), or fewer containers on it")


def explain(what: str, name: str, detail: str) -> DockerOpError:
    """Docker's error for `docker WHAT NAME`, as a user reads it; 503 when it is out of network addresses."""
    text = detail.lower()
    if any(marker in text for marker in _OUT_OF_POOLS):
        return DockerOpError(f"docker {what} {name} failed: {detail}. {OUT_OF_POOLS_FIX}", 503,
                             "Out of network addresses")
    if any(marker in text for marker in _NETWORK_FULL):
        return DockerOpError(f"docker {what} {name} failed: {detail}. Docker's {NETWORK_FULL_FIX}", 503,
                             "Out of network addresses")
    return DockerOpError(f"docker {what} {name} failed: {detail}")


def _api_error(what: str, name: str, e: docker.errors.APIError) -> DockerOpError:
    detail = e.explanation or str(e)
    if isinstance(detail, bytes):
        detail = detail.decode(errors="replace")
    return explain(what, name, detail)


MAX_REMEMBERED = 256  # networks made again whose name and lock are kept (the rest is forgotten)


class DockerOps:
    def __init__(self, config: DockerConfig) -> None:
        self.config = config
        self._local = threading.local()
        self._network_locks: dict[str, asyncio.Lock] = {}
        self._made: dict[str, str] = {}  # network name → the ID of the one this proxy made last
        self._made_lock = threading.Lock()

    def _api(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = connect(self.config, OPERATION_TIMEOUT)
            self._local.client = client
        return client.api

    async def _call(self, what: str, name: str, fn: str, *args: Any, **kwargs: Any) -> None:
        def run() -> None:
            getattr(self._api(), fn)(*args, **kwargs)

        await self._run(what, name, run)

    async def _run(self, what: str, name: str, run: Callable[[], None]) -> None:
        try:
            await asyncio.to_thread(run)
        except DockerOpError:
            raise
        except docker.errors.APIError as e:
            raise _api_error(what, name, e) from None
        except Exception as e:  # the engine is unreachable, or the socket broke
            raise DockerOpError(f"docker {what} {name} failed: {type(e).__name__}: {e}") from None

    async def start(self, container_id: str, name: str) -> None:
        await self._call("start", name, "start", container_id)

    async def unpause(self, container_id: str, name: str) -> None:
        await self._call("unpause", name, "unpause", container_id)

    async def stop(self, container_id: str, name: str, timeout: float) -> None:
        await self._call("stop", name, "stop", container_id, timeout=int(timeout))

    async def pause(self, container_id: str, name: str) -> None:
        await self._call("pause", name, "pause", container_id)

    async def scale(self, service_id: str, name: str, replicas: int, up_only: bool = True) -> None:
        """`docker service scale NAME=replicas`, version-checked: read the service's spec as it was written
        (no defaults filled in), change only its replica count, and send it back with the version read;
        "update out of sequence" (someone updated it between) reads it again, up to SCALE_ATTEMPTS times.
        `up_only`: never fewer replicas than it has (a wake does not undo an operator's bigger count).

        Not the SDK's `update_service`: it re-reads the spec *with* defaults and sends those back (a
        changed task template makes Swarm replace running tasks), and it adds registry credentials of
        this host for the registry the (tenant-written) image names. The update here carries none
        (`registryAuthFrom=spec`: the service keeps what it had)."""
        def run() -> None:
            api = self._api()
            for attempt in range(1, SCALE_ATTEMPTS + 1):
                service = api.inspect_service(service_id)
                spec = dict(service.get("Spec") or {})
                mode = dict(spec.get("Mode") or {})
                if "Replicated" not in mode:
                    raise DockerOpError(f"docker service scale {name} failed: it is not a replicated service "
                                        "(a global service cannot be scaled)")
                current = int((mode.get("Replicated") or {}).get("Replicas") or 0)
                if current == replicas or (up_only and current > replicas):
                    return
                spec["Mode"] = {**mode, "Replicated": {**(mode.get("Replicated") or {}), "Replicas": replicas}}
                try:
                    answer = _post_update(api, service_id, service["Version"]["Index"], spec)
                except docker.errors.APIError as e:
                    if "update out of sequence" in str(e.explanation or e) and attempt < SCALE_ATTEMPTS:
                        logger.debug(f"docker: service {name} was updated meanwhile; scaling again ({attempt})")
                        continue
                    raise
                for warning in (answer or {}).get("Warnings") or ():
                    logger.warning(f"docker service scale {name}: {str(warning)[:300]}")
                return

        await self._run("service scale", f"{name}={replicas}", run)

    async def recreate_network(self, network: str, project: str, attach: tuple[Attachment, ...]) -> None:
        """`docker network create` NETWORK as Compose makes it (a bridge with Compose's labels), then
        `docker network connect --alias SERVICE` each of `attach`: the way Docksal's `proxyctl start`
        wakes a project whose stop removed its network. Never a network that exists: Docker refuses the
        name (check_duplicate), and that is a failure, unless it is the one this proxy just made for
        another wake of the same project (its containers were connected then). One at a time per name."""
        if len(self._network_locks) > MAX_REMEMBERED:  # one per name ever made: forget the idle ones
            for name in [n for n, lk in self._network_locks.items()
                         if not lk.locked() and not getattr(lk, "_waiters", None)]:  # (no one waits for it)
                del self._network_locks[name]
        lock = self._network_locks.setdefault(network, asyncio.Lock())
        async with lock:
            await self._run("network create", network, lambda: self._recreate(network, project, attach))

    def _recreate(self, network: str, project: str, attach: tuple[Attachment, ...]) -> None:
        """In a worker thread: create, connect; a connect that fails removes the network again."""
        api = self._api()
        try:
            made = api.create_network(network, driver="bridge", labels=compose_network_labels(project),
                                      check_duplicate=True)
        except docker.errors.APIError as e:
            if not (e.status_code == 409 and self._made.get(network) and self._made[network] == self._id_of(api, network)):
                raise _api_error("network create", network, e) from None
            # Made by this proxy for another group of the project a moment ago: connect what is not yet.
            made, ours = {"Id": self._made[network]}, False
        else:
            ours = True
        net_id = str(made.get("Id") or network)
        with self._made_lock:  # (worker threads, one per network name at a time)
            self._made.pop(network, None)
            self._made[network] = net_id
            while len(self._made) > MAX_REMEMBERED:
                del self._made[next(iter(self._made))]
        connected: list[Attachment] = []
        for a in attach:
            try:
                api.connect_container_to_network(a.container_id, net_id, aliases=[a.alias] if a.alias else None)
            except docker.errors.NotFound:
                logger.info(f"docker: {a.name} is gone; not connected to {network}")
                continue
            except docker.errors.APIError as e:
                if not ours and "already exists" in str(e.explanation or e):
                    continue  # connected by the wake that made it
                if ours:
                    self._undo(api, network, net_id, connected)
                raise _api_error("network connect", f"{network} {a.name}", e) from None
            connected.append(a)

    def _id_of(self, api: Any, network: str) -> str | None:
        """The ID of the network called exactly `network`, from the listing (None: there is none)."""
        return next((str(n.get("Id")) for n in api.networks(names=[network]) if n.get("Name") == network), None)

    def _undo(self, api: Any, network: str, net_id: str, connected: list[Attachment]) -> None:
        """Remove the network just made (after a connect failed), so that the next wake makes it again."""
        try:
            for a in connected:
                api.disconnect_container_from_network(a.container_id, net_id, force=True)
            api.remove_network(net_id)
            with self._made_lock:
                self._made.pop(network, None)
        except Exception as e:  # noqa: BLE001 - the wake fails anyway, with the connect's error
            logger.warning(f"docker: could not remove the network {network} made for this wake again: {e}")

    # Retiring an abandoned group (idle.remove_after): never a named volume, never a host folder.
    async def remove(self, container_id: str, name: str, volumes: bool) -> None:
        await self._call("rm", name, "remove_container", container_id, v=volumes)

    async def remove_network(self, name: str) -> None:
        await self._call("network rm", name, "remove_network", name)

    async def network_labels(self, name: str) -> dict[str, str] | None:
        """The labels of the network called exactly `name` (None: there is none), from the network listing."""
        def run() -> dict[str, str] | None:
            for n in self._api().networks(names=[name]):  # a name filter matches parts of names too
                if n.get("Name") == name:
                    return dict(n.get("Labels") or {})
            return None

        try:
            return await asyncio.to_thread(run)
        except Exception as e:  # noqa: BLE001 - the engine is away: nothing is removed
            raise DockerOpError(f"docker network ls {name} failed: {type(e).__name__}: {e}") from None
