"""wakeproxy.docker.networks: finding the proxy's own container, and which networks it joins and leaves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from wakeproxy.config import SourcesConfig
from wakeproxy.docker import networks as nw
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import build_snapshot

CID = "0123456789abcdef" * 4
OTHER = "fedcba9876543210" * 4

IN_CONTAINER = f"""\
1270 1100 0:120 / / rw,relatime master:400 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X
1290 1270 254:1 /var/lib/docker/containers/{CID}/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/vda1 rw
1291 1270 254:1 /var/lib/docker/containers/{CID}/hostname /etc/hostname rw,relatime - ext4 /dev/vda1 rw
1292 1270 254:1 /var/lib/docker/containers/{CID}/hosts /etc/hosts rw,relatime - ext4 /dev/vda1 rw
"""
ON_HOST = f"""\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
310 22 0:50 / /var/lib/docker/containers/{OTHER}/mounts/shm rw,nosuid - tmpfs shm rw,size=65536k
"""


def test_own_container_id_from_the_bind_mounted_etc_files():
    assert nw.container_id_from_mountinfo(IN_CONTAINER) == CID
    # The host's table lists other containers' shm mounts: those are not ours.
    assert nw.container_id_from_mountinfo(ON_HOST) is None
    assert nw.container_id_from_mountinfo("") is None
    assert nw.container_id_from_mountinfo("garbage\n1 2 3\n") is None


def test_own_container_id_reads_a_file_and_survives_none(tmp_path: Path):
    f = tmp_path / "mountinfo"
    f.write_text(IN_CONTAINER)
    assert nw.own_container_id(f) == CID
    assert nw.own_container_id(tmp_path / "missing") is None


def backend_snapshot(*containers: ContainerInfo, reach=frozenset({"proxy_net"})):
    return build_snapshot(containers, SourcesConfig(), (), {n: "bridge" for c in containers for n in c.networks},
                          reach=reach)


def ci(name: str, host: str, net: str, state: str = "running", project: str | None = None) -> ContainerInfo:
    labels = {"wakeproxy.host": host, "com.docker.compose.project": project or name}
    return ContainerInfo(id=f"id-{name}", name=name, state=state, labels=labels, env={}, exposed_ports=(),
                         networks={net: "10.0.0.2" if state == "running" else ""})


def test_wanted_networks_are_those_of_running_or_paused_sites():
    snap = backend_snapshot(ci("a", "a.test", "a_default"), ci("b", "b.test", "b_default", state="exited"),
                            ci("c", "c.test", "c_default", state="paused"), ci("d", "d.test", "a_default"))
    assert nw.wanted_networks(snap) == {"a_default": {"a", "d"}, "c_default": {"c"}}


def W(*nets: str) -> dict[str, frozenset[str]]:  # noqa: N802 - networks wanted, each by a group of its own name
    return {n: frozenset({f"g-{n}"}) for n in nets}


def test_plan_joins_what_is_wanted_and_leaves_only_its_own_networks():
    drivers = {n: "bridge" for n in ("a", "b", "c", "mine", "started")}
    join, leave, refused = nw.plan(W("a", "b"), on=frozenset({"started", "b", "c", "mine"}), ours=frozenset({"mine", "b"}),
                                   protected=frozenset({"started"}), drivers=drivers, failed={})
    assert join == ["a"]
    assert leave == ["mine"]  # "c": someone else connected it; "started": the proxy was started on it
    assert refused == {}


def test_plan_never_joins_other_drivers_or_recent_failures_and_caps_the_count():
    drivers = {"ov": "overlay", "mv": "macvlan", "x": "bridge", "bad": "bridge"}
    join, _, refused = nw.plan(W("ov", "mv", "x", "bad"), on=frozenset(), ours=frozenset(), protected=frozenset(),
                               drivers=drivers, failed={"bad": "the proxy could not join network 'bad': nope"})
    assert join == ["x"]
    assert "not attachable" in refused["ov"] and "macvlan driver" in refused["mv"]
    join2, _, refused2 = nw.plan(W("ov", "x"), on=frozenset(), ours=frozenset(), protected=frozenset(),
                                 drivers=drivers, failed={}, attachable=frozenset({"ov"}))
    assert join2 == ["ov", "x"] and refused2 == {}  # an attachable Swarm overlay is joined like a bridge
    assert refused["bad"].endswith("nope")
    many = [f"n{i:03}" for i in range(nw.MAX_JOINED + 3)]
    join, _, refused = nw.plan({n: frozenset({n}) for n in many}, on=frozenset(), ours=frozenset(), protected=frozenset(),
                               drivers=dict.fromkeys(many, "bridge"), failed={})
    assert len(join) == nw.MAX_JOINED and len(refused) == 3


def test_refusals_with_everything_name_any_network():
    r = nw.Refusals({"a": "why a"}, everything="not on '{network}'")
    assert r["a"] == "why a" and r.get("zzz") == "not on 'zzz'"
    assert list(r) == ["a"] and len(r) == 1
    assert nw.Refusals().get("a") is None


class FakeAPI:
    def __init__(self, mode: str, nets: list[str], fail: dict[str, str] | None = None) -> None:
        self.mode, self.nets, self.fail = mode, list(nets), fail or {}
        self.calls: list[tuple[str, str]] = []

    def inspect_container(self, cid: str) -> dict[str, Any]:
        if cid != CID:
            raise docker.errors.NotFound("no such container")
        return {"Name": "/proxy", "HostConfig": {"NetworkMode": self.mode},
                "NetworkSettings": {"Networks": {n: {} for n in self.nets}}}

    def connect_container_to_network(self, cid: str, net: str) -> None:
        self.calls.append(("connect", net))
        if net in self.fail:
            raise docker.errors.APIError(self.fail[net], explanation=self.fail[net])
        self.nets.append(net)

    def disconnect_container_from_network(self, cid: str, net: str) -> None:
        self.calls.append(("disconnect", net))
        self.nets.remove(net)


def test_joiner_joins_leaves_and_remembers_across_restarts(tmp_path: Path):
    api = FakeAPI("proxy_net", ["proxy_net"])
    j = nw.NetworkJoiner(tmp_path, enabled=True)
    own = j.detect(api, CID)
    assert own is not None and own.mode == "bridge" and own.protected == {"proxy_net"}
    drivers = {"proxy_net": "bridge", "a_default": "bridge", "b_default": "bridge"}
    snap = backend_snapshot(ci("a", "a.test", "a_default"), ci("b", "b.test", "b_default"))
    j.sync(api, snap, drivers, frozenset(api.nets))
    assert api.calls == [("connect", "a_default"), ("connect", "b_default")]
    assert json.loads((tmp_path / nw.STATE_FILE).read_text()) == {"container": CID, "joined": ["a_default", "b_default"]}

    # A restart of the proxy's container keeps its connections: a new joiner still knows they are its own.
    j2 = nw.NetworkJoiner(tmp_path, enabled=True)
    own2 = j2.detect(api, CID)
    assert own2 is not None and own2.protected == {"proxy_net"} and j2.ours == {"a_default", "b_default"}
    api.calls.clear()
    snap = backend_snapshot(ci("a", "a.test", "a_default"), ci("b", "b.test", "b_default", state="exited"))
    j2.sync(api, snap, drivers, frozenset(api.nets))
    assert api.calls == [("disconnect", "b_default")]
    assert json.loads((tmp_path / nw.STATE_FILE).read_text())["joined"] == ["a_default"]

    # Another container's file is not ours: everything it is on counts as "started on".
    (tmp_path / nw.STATE_FILE).write_text(json.dumps({"container": OTHER, "joined": ["a_default"]}))
    j3 = nw.NetworkJoiner(tmp_path, enabled=True)
    own3 = j3.detect(api, CID)
    assert own3 is not None and "a_default" in own3.protected and j3.ours == set()


def test_joiner_reports_a_failed_join_and_retries_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    api = FakeAPI("default", ["bridge"], fail={"a_default": "network a_default is not attachable"})
    j = nw.NetworkJoiner(tmp_path, enabled=True)
    j.detect(api, CID)
    drivers = {"bridge": "bridge", "a_default": "bridge"}
    snap = backend_snapshot(ci("a", "a.test", "a_default"), reach=frozenset(api.nets))
    assert j.sync(api, snap, drivers, frozenset(api.nets)) is True  # the view builds the snapshot again
    assert "not attachable" in j.refusals["a_default"]
    snap = build_snapshot([ci("a", "a.test", "a_default")], SourcesConfig(), (), drivers, reach=frozenset(api.nets),
                          unreachable=j.refusals)
    problem = snap.lookup("a.test").backends[0].problem
    assert problem is not None and "not attachable" in problem
    api.calls.clear()
    assert j.sync(api, snap, drivers, frozenset(api.nets)) is False  # no new attempt before RETRY_AFTER
    assert api.calls == []
    assert j.next_retry() is not None
    api.fail.clear()
    monkeypatch.setattr(nw.time, "monotonic", lambda: 1e12)
    assert j.sync(api, snap, drivers, frozenset(api.nets)) is True
    assert api.calls == [("connect", "a_default")] and dict(j.refusals) == {}


@pytest.mark.parametrize("mode", ["host", "none", "container:abc"])
def test_joiner_does_nothing_with_host_networking_or_a_shared_namespace(tmp_path: Path, mode: str):
    api = FakeAPI(mode, [] if mode != "host" else ["host"])
    j = nw.NetworkJoiner(tmp_path, enabled=True)
    own = j.detect(api, CID)
    assert own is not None
    snap = backend_snapshot(ci("a", "a.test", "a_default"))
    assert j.sync(api, snap, {"a_default": "bridge"}, frozenset()) is False
    assert api.calls == []
    if mode == "host":
        assert j.reach({}) is None and dict(j.refusals) == {}
    else:
        assert "network mode" in j.refusals["a_default"]


def test_joiner_off_names_the_command_that_connects_the_proxy(tmp_path: Path):
    api = FakeAPI("default", ["bridge"])
    j = nw.NetworkJoiner(tmp_path, enabled=False)
    j.detect(api, CID)
    assert "docker network connect a_default proxy" in j.refusals["a_default"]
    # An empty-looking Refusals still answers for every network: the site says so.
    snap = build_snapshot([ci("a", "a.test", "a_default")], SourcesConfig(), (), {"a_default": "bridge"},
                          reach=frozenset(api.nets), unreachable=j.refusals)
    assert "docker.join_networks is false" in snap.lookup("a.test").backends[0].problem
    assert j.sync(api, backend_snapshot(ci("a", "a.test", "a_default")), {"a_default": "bridge"}, frozenset()) is False
    assert api.calls == []


def test_not_in_a_container_or_unknown_to_the_engine(tmp_path: Path):
    j = nw.NetworkJoiner(tmp_path, enabled=True)
    assert j.detect(FakeAPI("default", []), None) is None and j.reach({}) is None
    assert j.detect(FakeAPI("default", []), OTHER) is None and j.reach({}) is None


class NewEngineAPI(FakeAPI):
    """An engine with API 1.48+ (Docker 28): the join goes out as a raw POST with a gateway priority."""

    api_version = "1.48"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.posts: list[tuple[str, dict]] = []

    def _url(self, pattern: str, *args: str) -> str:
        return pattern.format(*args)

    def _post_json(self, url: str, data: dict) -> str:
        self.posts.append((url, data))
        self.nets.append(url.split("/")[2])
        return "response"

    def _raise_for_status(self, res: str) -> None:
        assert res == "response"


def test_a_joined_network_never_takes_the_gateway_on_docker_28(tmp_path: Path):
    api = NewEngineAPI("zzz_proxy", ["zzz_proxy"])
    j = nw.NetworkJoiner(tmp_path, enabled=True)
    j.detect(api, CID)
    j.sync(api, backend_snapshot(ci("a", "a.test", "a_default")), {"a_default": "bridge", "zzz_proxy": "bridge"},
           frozenset(api.nets))
    assert api.posts == [("/networks/a_default/connect",
                          {"Container": CID, "EndpointConfig": {"GwPriority": -1}})]
    assert api.calls == []  # not the SDK's call, which cannot say so


def test_older_engines_get_one_warning_when_a_joined_network_sorts_first(tmp_path: Path, caplog):
    api = FakeAPI("zzz_proxy", ["zzz_proxy"])
    api.api_version = "1.41"  # type: ignore[attr-defined]
    j = nw.NetworkJoiner(tmp_path, enabled=True)
    j.detect(api, CID)
    drivers = {n: "bridge" for n in ("a_default", "b_default", "zzz_proxy")}
    with caplog.at_level("WARNING"):
        j.sync(api, backend_snapshot(ci("a", "a.test", "a_default"), ci("b", "b.test", "b_default")), drivers,
               frozenset(api.nets))
    assert api.calls == [("connect", "a_default"), ("connect", "b_default")]
    warnings = [r.getMessage() for r in caplog.records if "sorts before" in r.getMessage()]
    assert len(warnings) == 1 and "host networking" in warnings[0] and "API 1.41" in warnings[0]
    # A proxy network that sorts first: nothing to warn about.
    caplog.clear()
    api2 = FakeAPI("0-wakeproxy", ["0-wakeproxy"])
    j2 = nw.NetworkJoiner(tmp_path / "2", enabled=True)
    j2.detect(api2, CID)
    with caplog.at_level("WARNING"):
        j2.sync(api2, backend_snapshot(ci("a", "a.test", "a_default")), {"a_default": "bridge"}, frozenset(api2.nets))
    assert not [r for r in caplog.records if "sorts before" in r.getMessage()]


def test_one_group_gets_at_most_its_share_of_joins_and_a_shared_network_counts_for_all():
    nets = [f"t{i}" for i in range(nw.MAX_PER_GROUP + 2)]
    wanted = {n: frozenset({"tenant"}) for n in nets} | {"shared": frozenset({"tenant", "other"}),
                                                         "other_net": frozenset({"other"})}
    join, _, refused = nw.plan(wanted, on=frozenset(), ours=frozenset(), protected=frozenset(),
                               drivers=dict.fromkeys(wanted, "bridge"), failed={})
    tenant_joins = [n for n in join if "tenant" in wanted[n]]
    assert len(tenant_joins) == nw.MAX_PER_GROUP
    assert "shared" in join and "other_net" in join  # the other group is not crowded out
    assert sorted(refused) == sorted(set(nets) - set(join))
    assert all("the most per project" in why for why in refused.values())


def test_networks_joined_already_count_toward_the_share():
    """Containers of one project started one after another (depends_on): each new snapshot wants one more
    network, and the ones joined before count, so the project still gets MAX_PER_GROUP in all."""
    on: frozenset[str] = frozenset({"proxy_net"})
    ours: frozenset[str] = frozenset()
    wanted: dict[str, frozenset[str]] = {"mine": frozenset({"other"})}
    for i in range(nw.MAX_PER_GROUP + 2):
        wanted[f"t{i}"] = frozenset({"tenant"})
        join, _, refused = nw.plan(wanted, on=on, ours=ours, protected=frozenset({"proxy_net"}),
                                   drivers=dict.fromkeys([*wanted, "proxy_net"], "bridge"), failed={})
        on, ours = on | set(join), ours | set(join)
    tenant = sorted(n for n in on if n.startswith("t"))
    assert tenant == [f"t{i}" for i in range(nw.MAX_PER_GROUP)]
    assert "the most per project" in refused[f"t{nw.MAX_PER_GROUP + 1}"]
    assert "mine" in on  # the other project is not crowded out


@pytest.mark.parametrize(("subnet", "avoid", "fragment"), [
    ("8.8.8.0/24", (), "public addresses"),
    ("2001:4860::/32", (), "public addresses"),
    ("10.9.0.0/16", ("10.9.1.5",), "holds 10.9.1.5"),
    ("not-a-net", (), "cannot be read"),
    ("169.254.0.0/16", (), "link-local"),
    ("169.254.169.0/24", (), "link-local"),
    ("100.100.0.0/16", (), "carrier-grade NAT"),
    ("fe80::/64", (), "link-local"),
])
def test_a_network_whose_subnet_would_take_the_proxys_own_traffic_is_not_joined(subnet, avoid, fragment):
    import ipaddress

    ips = tuple(ipaddress.ip_address(a) for a in avoid)
    join, _, refused = nw.plan(W("evil"), on=frozenset(), ours=frozenset(), protected=frozenset(),
                               drivers={"evil": "bridge"}, failed={}, subnets={"evil": (subnet,)}, avoid=ips)
    assert join == [] and fragment in refused["evil"]
    ok, _, _ = nw.plan(W("fine"), on=frozenset(), ours=frozenset(), protected=frozenset(),
                       drivers={"fine": "bridge"}, failed={}, subnets={"fine": ("172.20.0.0/16", "fd00:1::/64")},
                       avoid=ips)
    assert ok == ["fine"]


def test_the_summary_for_status(tmp_path: Path):
    api = FakeAPI("proxy_net", ["proxy_net"])
    j = nw.NetworkJoiner(tmp_path, enabled=True)
    j.detect(api, CID)
    j.sync(api, backend_snapshot(ci("a", "a.test", "a_default")), {"a_default": "bridge"}, frozenset(api.nets))
    assert j.summary == {"container": "proxy", "mode": "bridge", "joining": True, "started_on": ["proxy_net"],
                         "joined": ["a_default"], "cannot_join": {}}


def test_a_public_subnet_is_refused_in_the_first_snapshot_before_any_join(tmp_path: Path):
    api = FakeAPI("proxy_net", ["proxy_net"])
    j = nw.NetworkJoiner(tmp_path, enabled=True)
    j.detect(api, CID)
    j.subnets = {"evil_default": ("44.31.255.0/24",), "fine_default": ("172.30.0.0/16",)}
    drivers = {"evil_default": "bridge", "fine_default": "bridge", "proxy_net": "bridge"}
    snap = build_snapshot([ci("e", "e.test", "evil_default"), ci("f", "f.test", "fine_default")], SourcesConfig(), (),
                          drivers, reach=frozenset(api.nets), unreachable=j.refusals)
    assert "public addresses" in snap.lookup("e.test").backends[0].problem
    assert snap.lookup("f.test").backends[0].problem is None


def test_a_project_split_by_wakeproxy_group_labels_still_gets_one_share():
    wanted = {f"n{i}": frozenset({f"evil/g{i}"}) for i in range(nw.MAX_PER_GROUP + 3)}
    join, _, refused = nw.plan(wanted, on=frozenset(), ours=frozenset(), protected=frozenset(),
                               drivers=dict.fromkeys(wanted, "bridge"), failed={})
    assert len(join) == nw.MAX_PER_GROUP and len(refused) == 3
    assert all("project 'evil'" in why for why in refused.values())


def test_a_network_named_like_an_id_is_never_joined():
    name = "ab" * 32  # Docker would resolve it as that other network's ID first
    join, _, refused = nw.plan(W(name), on=frozenset(), ours=frozenset(), protected=frozenset(),
                               drivers={name: "bridge"}, failed={})
    assert join == [] and "named like a network ID" in refused[name]


def test_the_proxys_dns_servers_are_never_routed_into_a_sandbox():
    import ipaddress

    conf = ("# Generated by Docker Engine.\nnameserver 127.0.0.11\noptions ndots:0\n\n"
            "# Based on host file: '/etc/resolv.conf' (internal resolver)\n# ExtServers: [host(10.255.255.53)]\n"
            "nameserver 192.168.65.7\nsearch example.com\n")
    found = nw.resolver_addresses(conf)
    assert found == (ipaddress.ip_address("10.255.255.53"), ipaddress.ip_address("192.168.65.7"))
    _, _, refused = nw.plan(W("dns_trap"), on=frozenset(), ours=frozenset(), protected=frozenset(),
                            drivers={"dns_trap": "bridge"}, failed={}, subnets={"dns_trap": ("10.255.255.0/24",)},
                            avoid=found)
    assert "its DNS server" in refused["dns_trap"]
    assert nw.resolver_addresses("garbage\nnameserver not-an-ip\n") == ()
