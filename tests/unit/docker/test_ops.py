"""wakeproxy.docker.ops.DockerOps.recreate_network over a fake engine API: a removed `<project>_default`
network made again as Compose makes it, never one that exists, and undone when a connect fails."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import docker.errors
import pytest
from wakeproxy.docker.ops import DockerOpError, DockerOps
from wakeproxy.wake.orchestrator import Attachment

WEB, DB = Attachment("id-web", "p-web-1", "web"), Attachment("id-db", "p-db-1", "db")


def api_error(status: int, text: str) -> docker.errors.APIError:
    class Response:
        status_code = status
        reason = text

    return docker.errors.APIError(text, Response(), explanation=text)  # type: ignore[arg-type]


class NetAPI:
    """Networks by name; records every call; `exists`: names that are there already (not made by the ops)."""

    def __init__(self, exists: dict[str, str] | None = None, connect_fails: set[str] | None = None,
                 create_fails: str | None = None) -> None:
        self.nets: dict[str, str] = dict(exists or {})  # name → id
        self.calls: list[tuple[Any, ...]] = []
        self.connect_fails = connect_fails or set()
        self.connected: set[tuple[str, str]] = set()
        self.create_fails = create_fails

    def create_network(self, name: str, **kw: Any) -> dict[str, str]:
        self.calls.append(("create", name, kw))
        if self.create_fails:
            raise api_error(500, self.create_fails)
        if name in self.nets and kw.get("check_duplicate"):
            raise api_error(409, f"network with name {name} already exists")
        self.nets[name] = f"netid-{len(self.calls)}"
        return {"Id": self.nets[name], "Warning": ""}

    def connect_container_to_network(self, container: str, net_id: str, aliases: list[str] | None = None) -> None:
        self.calls.append(("connect", container, net_id, aliases))
        if (container, net_id) in self.connected:
            raise api_error(403, f"endpoint with name {container} already exists in network {net_id}")
        self.connected.add((container, net_id))
        if container == "id-gone":
            raise docker.errors.NotFound("No such container: id-gone")
        if container in self.connect_fails:
            raise api_error(500, f"cannot connect {container}")

    def disconnect_container_from_network(self, container: str, net_id: str, force: bool = False) -> None:
        self.calls.append(("disconnect", container, net_id, force))

    def remove_network(self, net_id: str) -> None:
        self.calls.append(("rm", net_id))
        self.nets = {n: i for n, i in self.nets.items() if i != net_id}

    def networks(self, names: list[str] | None = None) -> list[dict[str, str]]:
        return [{"Name": n, "Id": i} for n, i in self.nets.items() if not names or any(x in n for x in names)]


def ops_for(api: NetAPI) -> DockerOps:
    ops = DockerOps.__new__(DockerOps)
    ops._network_locks, ops._made, ops._made_lock = {}, {}, threading.Lock()
    ops._api = lambda: api  # type: ignore[method-assign]
    return ops


def recreate(ops: DockerOps, *attach: Attachment, network: str = "p_default") -> None:
    asyncio.run(ops.recreate_network(network, "p", attach))


def test_the_network_is_made_as_compose_makes_it_and_each_container_connected_under_its_service():
    api = NetAPI()
    recreate(ops_for(api), DB, WEB, Attachment("id-x", "x", ""))
    create, *connects = api.calls
    assert create == ("create", "p_default", {"driver": "bridge", "check_duplicate": True, "labels": {
        "com.docker.compose.project": "p", "com.docker.compose.network": "default"}})
    net = api.nets["p_default"]
    assert connects == [("connect", "id-db", net, ["db"]), ("connect", "id-web", net, ["web"]),
                        ("connect", "id-x", net, None)]


def test_an_existing_network_is_never_touched():
    api = NetAPI(exists={"p_default": "someone-elses"})
    with pytest.raises(DockerOpError) as e:
        recreate(ops_for(api), WEB)
    assert e.value.status == 502 and "docker network create p_default failed" in str(e.value)
    assert "already exists" in str(e.value)
    assert [c[0] for c in api.calls] == ["create"]  # no connect, no removal


def test_the_network_this_proxy_just_made_for_the_project_is_not_made_or_connected_twice():
    api = NetAPI()
    ops = ops_for(api)
    recreate(ops, WEB)
    # Another group of the project, from a snapshot that has not seen the network yet: not made twice; what
    # the first wake connected already stays as it is, and a container it did not have is connected now.
    recreate(ops, WEB, DB)
    assert [c[0] for c in api.calls] == ["create", "connect", "create", "connect", "connect"]
    assert ("id-db", "netid-1") in api.connected and not [c for c in api.calls if c[0] in ("rm", "disconnect")]
    api.nets["p_default"] = "made-by-someone-else-since"  # removed and made again by another hand
    with pytest.raises(DockerOpError, match="already exists"):
        recreate(ops, WEB)


def test_a_failed_connect_removes_the_network_again_and_names_the_container():
    api = NetAPI(connect_fails={"id-web"})
    with pytest.raises(DockerOpError) as e:
        recreate(ops_for(api), DB, WEB)
    assert "docker network connect p_default p-web-1 failed: cannot connect id-web" in str(e.value)
    net = "netid-1"
    assert api.calls[-2:] == [("disconnect", "id-db", net, True), ("rm", net)]
    assert "p_default" not in api.nets  # the next wake makes it again


def test_a_container_removed_meanwhile_is_skipped():
    api = NetAPI()
    recreate(ops_for(api), Attachment("id-gone", "gone", "x"), WEB)
    assert [c[:2] for c in api.calls] == [("create", "p_default"), ("connect", "id-gone"), ("connect", "id-web")]


def test_an_engine_out_of_addresses_is_a_503_naming_the_fix():
    api = NetAPI(create_fails="could not find an available, non-overlapping IPv4 address pool among the defaults")
    with pytest.raises(DockerOpError) as e:
        recreate(ops_for(api), WEB)
    assert e.value.status == 503 and "default-address-pools" in str(e.value)
