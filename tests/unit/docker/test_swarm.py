"""Swarm services as sites (docker/swarm.py, the service side of routing/snapshot.py, ops.scale, and the
orchestrator's service wake), with fake engine answers shaped like API 1.41's. No Docker here."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from typing import Any

import docker.errors
import pytest
from wakeproxy.config import Config, SourcesConfig, WakeConfig
from wakeproxy.docker import ops as ops_mod
from wakeproxy.docker import swarm
from wakeproxy.docker.ops import DockerOpError, DockerOps
from wakeproxy.routing.labels import SERVICE, SWARM_SERVICE_LABEL, SWARM_TASK_LABEL, ContainerInfo, TaskInfo
from wakeproxy.routing.snapshot import INGRESS, Policy, build_snapshot
from wakeproxy.runtime import Runtime
from wakeproxy.wake.orchestrator import Orchestrator, WakeFailed

NETS = {"netid-app": "app", "netid-other": "other", "netid-ing": "ingress"}
DRIVERS = {"app": "overlay", "other": "overlay", "ingress": INGRESS, "bridge": "bridge"}


def raw_service(sid: str, name: str, labels: dict[str, str], replicas: int | None = 0,
                networks: tuple[str, ...] = ("netid-app",), env: tuple[str, ...] = (),
                created: str = "2026-12-01T10:00:00.123456789Z") -> dict[str, Any]:
    mode: dict[str, Any] = {"Replicated": {"Replicas": replicas}} if replicas is not None else {"Global": {}}
    return {"ID": sid, "Version": {"Index": 10}, "CreatedAt": created, "Spec": {
        "Name": name, "Labels": labels, "Mode": mode,
        "TaskTemplate": {"ContainerSpec": {"Image": "img:1@sha256:abc", "Env": list(env)},
                         "Networks": [{"Target": n} for n in networks]}}}


def raw_task(tid: str, sid: str, slot: int, state: str, ip: str | None, err: str = "") -> dict[str, Any]:
    atts = [{"Network": {"ID": "netid-app", "Spec": {"Name": "app"}}, "Addresses": [f"{ip}/24"]},
            {"Network": {"ID": "netid-ing", "Spec": {"Name": "ingress"}}, "Addresses": ["10.0.0.9/24"]}] if ip else []
    return {"ID": tid, "ServiceID": sid, "Slot": slot, "NodeID": "node1", "DesiredState": "running",
            "Status": {"State": state, "Err": err}, "NetworksAttachments": atts}


class FakeAPI:
    """services / tasks / inspect_image, with the engine's filter semantics that matter (a substring
    `name` match is never used; `id` and `service` filters are honoured)."""

    def __init__(self, services: list[dict[str, Any]], tasks: list[dict[str, Any]],
                 images: dict[str, dict[str, Any]] | None = None) -> None:
        self.svc, self.tsk, self.images = services, tasks, images or {}
        self.calls: list[str] = []

    def services(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        self.calls.append(f"services {filters}")
        wanted = (filters or {}).get("id")
        # The engine's id filter matches ID prefixes: answer more than asked, as it may.
        return [s for s in self.svc if wanted is None or s["ID"].startswith(wanted[:3])]

    def tasks(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        self.calls.append(f"tasks {filters}")
        sid = (filters or {}).get("service")
        return [t for t in self.tsk if sid is None or t["ServiceID"] == sid]

    def inspect_image(self, ref: str) -> dict[str, Any]:
        self.calls.append(f"image {ref}")
        if ref not in self.images:
            raise docker.errors.ImageNotFound(ref)
        return self.images[ref]


def test_the_role_comes_from_docker_info() -> None:
    assert swarm.swarm_role({"Swarm": {"LocalNodeState": "inactive"}}) == "none"
    assert swarm.swarm_role({"Swarm": {"LocalNodeState": "active", "ControlAvailable": True}}) == "manager"
    assert swarm.swarm_role({"Swarm": {"LocalNodeState": "active", "ControlAvailable": False}}) == "worker"
    assert swarm.swarm_role({}) == "none"


def test_a_service_is_read_from_its_spec_and_its_tasks() -> None:
    raw = raw_service("s1", "shop_web", {"wakeproxy.host": "shop.test"}, replicas=2,
                      env=("VIRTUAL_HOST=v.test", "SECRET=x"))
    tasks = [swarm.task_from(raw_task("t1", "s1", 1, "running", "10.0.1.5"), "shop_web", NETS),
             swarm.task_from(raw_task("t2", "s1", 2, "pending", "10.0.1.6", err="no suitable node"), "shop_web", NETS)]
    info = swarm.service_from(raw, tasks, NETS, exposed=(8080,))
    assert info is not None and info.is_service and info.kind == SERVICE
    assert info.state == "running" and info.replicas == 2
    assert info.env == {"VIRTUAL_HOST": "v.test"}  # only what the proxy reads
    assert info.networks == {"app": ""}  # network IDs of the spec, by name
    assert [t.name for t in info.tasks] == ["shop_web.1", "shop_web.2"]
    assert info.tasks[0].networks == {"app": "10.0.1.5", "ingress": "10.0.0.9"}  # no prefix length
    assert info.tasks[1].error == "no suitable node"
    assert [t.id for t in info.running_tasks] == ["t1"]
    assert info.created == datetime.datetime(2026, 12, 1, 10, tzinfo=datetime.UTC).timestamp()
    assert not swarm.settled(info)
    asleep = swarm.service_from(raw_service("s2", "b", {}, replicas=0), [], NETS)
    assert asleep is not None and asleep.state == "exited" and swarm.settled(asleep)
    job = raw_service("s3", "j", {})
    job["Spec"]["Mode"] = {"ReplicatedJob": {}}
    assert swarm.service_from(job, [], NETS) is None  # jobs run to an end: nothing to route to


def test_the_state_follows_events_with_exact_ids_and_polls_fast_only_while_unsettled() -> None:
    api = FakeAPI([raw_service("s1", "web", {"wakeproxy.host": "w.test"}),
                   raw_service("s1x", "web2", {"wakeproxy.host": "w2.test"})], [],
                  images={"img:1": {"Config": {"ExposedPorts": {"8080/tcp": {}}}}})
    state = swarm.SwarmState(resync=10.0)
    state.net_names = NETS
    assert state.resync_all(api)
    assert set(state.services) == {"s1", "s1x"}
    assert state.services["s1"].exposed_ports == (8080,)  # the digest-less reference was found
    now = time.monotonic()
    due = state.poll_due(now)
    assert due is not None and due - now > 30  # everything asleep: a rare safety-net listing
    # scaled up (an event): re-read by exact ID — the engine's prefix match also answers s1x
    api.svc[0] = raw_service("s1", "web", {"wakeproxy.host": "w.test"}, replicas=1)
    api.tsk = [raw_task("t1", "s1", 1, "starting", "10.0.1.5")]
    assert state.refresh_service(api, "s1")
    assert state.services["s1"].replicas == 1 and state.services["s1x"].replicas == 0
    due = state.poll_due(time.monotonic())
    assert due is not None and due - time.monotonic() <= swarm.FASTEST_POLL
    api.tsk = [raw_task("t1", "s1", 1, "running", "10.0.1.5")]
    assert state.poll(api)
    assert state.services["s1"].running_tasks
    due = state.poll_due(time.monotonic())
    assert due is not None and swarm.FAST_POLL < due - time.monotonic() <= 10.0  # up and settled: the resync
    assert not state.poll(api)  # nothing changed
    assert state.remove("s1") and "s1" not in state.services
    api.svc = [s for s in api.svc if s["ID"] != "s1x"]
    assert state.refresh_service(api, "s1x") and state.services == {}


def service(name: str, labels: dict[str, str], replicas: int | None = 0, tasks: tuple[TaskInfo, ...] = (),
            networks: tuple[str, ...] = ("app",), created: float = 100.0) -> ContainerInfo:
    up = replicas > 0 if replicas is not None else bool(tasks)
    return ContainerInfo(f"sid-{name}", name, "running" if up else "exited", labels=labels,
                         networks={n: "" for n in networks}, created=created, kind=SERVICE, replicas=replicas,
                         tasks=tasks)


def task(name: str, ip: str, state: str = "running") -> TaskInfo:
    return TaskInfo(f"tid-{name}", name, state, {"app": ip, "ingress": "10.0.0.5"})


def snap(infos: list[ContainerInfo], overlays: frozenset[str] | None = frozenset({"app"}), **kw: Any):
    return build_snapshot(infos, SourcesConfig(), (), DRIVERS, overlays=overlays, **kw)


def test_a_service_at_zero_keeps_its_site_and_a_running_one_has_a_backend_per_task() -> None:
    s = snap([service("web", {"wakeproxy.host": "w.test", "wakeproxy.port": "8080"})])
    site = s.lookup("w.test")
    assert site is not None and not site.ready_backends
    (b,) = site.backends
    assert b.address is None and b.problem is None and b.state == "exited"  # asleep: a request wakes it
    assert "web" in s.groups and s.groups["web"].members == ("sid-web",)
    up = snap([service("web", {"wakeproxy.host": "w.test", "wakeproxy.port": "8080"}, replicas=3,
                       tasks=(task("web.1", "10.0.1.2"), task("web.2", "10.0.1.3"), task("web.3", "10.0.1.4", "starting")))])
    site = up.lookup("w.test")
    assert site is not None
    assert [(b.container_name, b.address, b.port, b.network) for b in site.ready_backends] == [
        ("web.1", "10.0.1.2", 8080, "app"), ("web.2", "10.0.1.3", 8080, "app")]  # never the mesh's address


def test_a_service_is_reached_only_on_a_network_the_proxy_is_on_and_never_the_mesh() -> None:
    labels = {"wakeproxy.host": "w.test", "wakeproxy.port": "80"}
    running = (task("web.1", "10.0.1.2"),)
    nowhere = snap([service("web", labels, 1, running)], overlays=None).lookup("w.test")
    assert nowhere is not None and "not in a container on a Swarm network" in (nowhere.backends[0].problem or "")
    elsewhere = snap([service("web", labels, 1, running)], overlays=frozenset({"other"})).lookup("w.test")
    assert elsewhere is not None and "attach the proxy" in (elsewhere.backends[0].problem or "")
    mesh = snap([service("web", {**labels, "wakeproxy.network": "ingress"}, 1, running, networks=("app", "ingress"))],
                overlays=frozenset({"app", "ingress"})).lookup("w.test")
    assert mesh is not None and "routing mesh" in (mesh.backends[0].problem or "")
    s = snap([service("web", labels, 1, running)], overlays=None)
    assert "web" not in s.groups  # unreachable: never woken nor put to sleep


def test_groups_come_from_the_stack_and_never_merge_with_a_compose_project_or_a_container() -> None:
    stack = {"com.docker.stack.namespace": "shop"}
    infos = [
        service("shop_web", {**stack, "wakeproxy.host": "shop.test"}),
        service("shop_db", stack),
        service("lone", {"wakeproxy.host": "lone.test"}),
        ContainerInfo("cid-shop", "shopc", "exited", networks={"bridge": ""},
                      labels={"com.docker.compose.project": "shop", "wakeproxy.host": "c.test"}),
        ContainerInfo("cid-lone", "lone", "exited", networks={"bridge": ""}, labels={"wakeproxy.host": "lc.test"}),
    ]
    s = snap(infos)
    assert set(s.groups["stack:shop"].members) == {"sid-shop_web", "sid-shop_db"}  # the stack, db included
    assert s.groups["shop"].members == ("cid-shop",)  # the Compose project keeps its name
    assert s.groups["service:lone"].members == ("sid-lone",)
    assert s.groups["lone"].members == ("cid-lone",)


def test_task_containers_are_not_sites_and_labels_are_bounded() -> None:
    task_container = ContainerInfo("cid-t", "web.1.abc", "running", networks={"app": "10.0.1.2"},
                                   labels={SWARM_SERVICE_LABEL: "sid-web", SWARM_TASK_LABEL: "tid-1",
                                           "wakeproxy.host": "t.test"})
    s = snap([task_container, service("web", {"wakeproxy.host": "w.test", "wakeproxy.replicas": "50"})],
             policy=Policy(max_replicas=10))
    assert s.lookup("t.test") is None and "cid-t" not in s.containers
    assert s.settings["sid-web"].replicas == 10  # capped at docker.max_replicas
    bad = snap([service("web", {"wakeproxy.host": "w.test", "wakeproxy.replicas": "1000"})])
    assert "web" in bad.skipped and "replica count" in bad.skipped["web"]
    mixed = snap([service("g", {"wakeproxy.host": "g.test", "wakeproxy.group": "m", "wakeproxy.idle-timeout": "0"},
                          replicas=None, tasks=(task("g.n1", "10.0.1.9"),)),
                  service("r", {"wakeproxy.host": "r.test", "wakeproxy.group": "m", "wakeproxy.idle-timeout": "5m"})])
    assert mixed.groups["m"].idle_timeout == 300.0  # a global service has no say in when the rest sleeps
    sablier = snap([service("s", {"wakeproxy.host": "s.test", "sablier.active.replicas": "2"})])
    assert sablier.settings["sid-s"].replicas == 2


def test_a_later_service_cannot_take_an_earlier_ones_host() -> None:
    s = snap([service("victim", {"wakeproxy.host": "v.test"}, created=100.0),
              service("attacker", {"wakeproxy.host": "v.test"}, created=200.0)])
    site = s.lookup("v.test")
    assert site is not None and site.groups == ("victim",)
    assert any(r.group == "attacker" for r in s.refused)


class ScaleAPI:
    """inspect_service plus the SDK's request helpers that ops.scale posts the update with."""

    def __init__(self, replicas: int, conflicts: int = 0, mode: str = "Replicated") -> None:
        self.replicas, self.conflicts, self.mode = replicas, conflicts, mode
        self.version = 5
        self.updates: list[tuple[int, int]] = []
        self.template = {"ContainerSpec": {"Image": "tenant.example/app:1"}, "ForceUpdate": 0}

    def inspect_service(self, sid: str) -> dict[str, Any]:
        mode = {"Replicated": {"Replicas": self.replicas}} if self.mode == "Replicated" else {"Global": {}}
        return {"ID": sid, "Version": {"Index": self.version},
                "Spec": {"Name": "web", "Mode": mode, "TaskTemplate": self.template, "Labels": {"a": "b"}}}

    def _url(self, fmt: str, *args: str) -> str:
        return fmt.format(*args)

    def _post_json(self, url: str, data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        assert url == "/services/sid/update"
        assert params["registryAuthFrom"] == "spec"  # no credentials of this host go along
        assert data["TaskTemplate"] == self.template and data["Labels"] == {"a": "b"}  # only the count changes
        if self.conflicts:
            self.conflicts -= 1
            self.version += 1  # someone else's update came first
            raise docker.errors.APIError("500", explanation="rpc error: code = Unknown desc = update out of sequence")
        assert params["version"] == self.version
        self.updates.append((params["version"], data["Mode"]["Replicated"]["Replicas"]))
        self.replicas = data["Mode"]["Replicated"]["Replicas"]
        self.version += 1
        return {"Warnings": None}

    def _result(self, response: dict[str, Any], json: bool = False) -> dict[str, Any]:
        return response


def scale(api: ScaleAPI, replicas: int, up_only: bool = True) -> None:
    ops = DockerOps.__new__(DockerOps)
    ops._api = lambda: api  # type: ignore[method-assign]
    asyncio.run(ops.scale("sid", "web", replicas, up_only=up_only))


def test_scale_is_version_checked_retried_out_of_sequence_and_never_lowers_on_a_wake() -> None:
    api = ScaleAPI(0, conflicts=2)
    scale(api, 2)
    assert api.updates == [(7, 2)] and api.replicas == 2  # read again after each conflict
    scale(api, 1)  # a wake: the operator's 2 stay
    assert api.replicas == 2 and len(api.updates) == 1
    scale(api, 0, up_only=False)  # idle
    assert api.replicas == 0
    forever = ScaleAPI(0, conflicts=99)
    with pytest.raises(DockerOpError, match="out of sequence"):
        scale(forever, 1)
    assert ops_mod.SCALE_ATTEMPTS == 99 - forever.conflicts
    with pytest.raises(DockerOpError, match="not a replicated service"):
        scale(ScaleAPI(0, mode="Global"), 1)


class FakeSwarm:
    """ContainerOps for services: a scale makes `replicas` tasks in the next snapshots — first pending, then
    running at `addresses` (one failing first when `flaky`)."""

    def __init__(self, runtime: Runtime, addresses: list[str], flaky: bool = False) -> None:
        self.runtime, self.addresses, self.flaky = runtime, addresses, flaky
        self.calls: list[tuple[str, str, int]] = []

    async def start(self, cid: str, name: str) -> None:
        raise AssertionError("a service is scaled, not started")

    async def unpause(self, cid: str, name: str) -> None:
        raise AssertionError("a service is scaled, not unpaused")

    async def scale(self, sid: str, name: str, replicas: int) -> None:
        self.calls.append(("scale", name, replicas))
        asyncio.get_running_loop().create_task(self._tasks(sid, replicas))

    def _publish(self, sid: str, replicas: int, tasks: tuple[TaskInfo, ...]) -> None:
        infos = [dataclasses.replace(i, state="running", replicas=replicas, tasks=tasks) if i.id == sid else i
                 for i in self.runtime.snapshot.containers.values()]
        self.runtime.publish(snap(infos))

    async def _tasks(self, sid: str, replicas: int) -> None:
        self._publish(sid, replicas, tuple(TaskInfo(f"t{n}", f"web.{n}", "pending", {}) for n in range(replicas)))
        await asyncio.sleep(0.05)
        if self.flaky:
            self._publish(sid, replicas, (TaskInfo("t-bad", "web.1", "failed", {"app": "127.0.0.1"},
                                                   "task: non-zero exit (3)"),))
            await asyncio.sleep(0.2)
        self._publish(sid, replicas, tuple(TaskInfo(f"t{n}", f"web.{n}", "running", {"app": ip})
                                           for n, ip in enumerate(self.addresses[:replicas])))


def test_a_service_wake_scales_once_to_its_replicas_and_waits_for_every_task_to_listen() -> None:
    async def run() -> tuple[list[Any], float]:
        servers = [await asyncio.start_server(lambda r, w: w.close(), f"127.0.0.{n}", 0) for n in (1, 2)]
        port = servers[0].sockets[0].getsockname()[1]
        servers[1].close()
        rt = Runtime(config=Config(wake=WakeConfig(timeout=5.0)),
                     snapshot=snap([service("web", {"wakeproxy.host": "w.test", "wakeproxy.port": str(port),
                                                    "wakeproxy.replicas": "2"})]))
        engine = FakeSwarm(rt, ["127.0.0.1", "127.0.0.2"])
        o = Orchestrator(rt, engine)
        group = rt.snapshot.groups["web"]
        t0 = asyncio.get_running_loop().time()

        async def listen_later() -> None:
            await asyncio.sleep(0.4)  # the second task listens only now
            servers[1] = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.2", port)

        later = asyncio.ensure_future(listen_later())
        await asyncio.wait_for(asyncio.gather(*(o.wake_until_ready(group) for _ in range(10))), 5)
        took = asyncio.get_running_loop().time() - t0
        await later
        for s in servers:
            s.close()
        return engine.calls, took

    calls, took = asyncio.run(run())
    assert calls == [("scale", "web", 2)]  # ten waiters, one scale
    assert took >= 0.4  # ready only once both tasks accept connections


def test_a_failing_task_is_followed_and_a_timeout_names_the_tasks() -> None:
    async def run() -> WakeFailed:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rt = Runtime(config=Config(wake=WakeConfig(timeout=5.0)),
                     snapshot=snap([service("web", {"wakeproxy.host": "w.test", "wakeproxy.port": str(port)})]))
        o = Orchestrator(rt, FakeSwarm(rt, ["127.0.0.1"], flaky=True))
        await asyncio.wait_for(o.wake_until_ready(rt.snapshot.groups["web"]), 5)  # the replacement answers
        server.close()
        rt2 = Runtime(config=Config(wake=WakeConfig(timeout=0.5)),
                      snapshot=snap([service("web", {"wakeproxy.host": "w.test", "wakeproxy.port": str(port)})]))
        engine = FakeSwarm(rt2, [], flaky=True)  # never a running task
        o2 = Orchestrator(rt2, engine)
        with pytest.raises(WakeFailed) as e:
            await o2.wake_until_ready(rt2.snapshot.groups["web"])
        return e.value

    failure = asyncio.run(run())
    assert failure.status == 504 and "web: 0 of 1 task(s) running" in failure.message


def test_a_crash_looping_service_is_listed_slowly_and_a_missing_image_is_looked_for_again(monkeypatch) -> None:
    api = FakeAPI([raw_service("s1", "web", {"wakeproxy.host": "w.test"}, replicas=1)],
                  [raw_task("t1", "s1", 1, "starting", "10.0.1.5")])
    state = swarm.SwarmState(resync=10.0)
    state.net_names = NETS
    state.resync_all(api)
    assert state.services["s1"].exposed_ports == ()  # the manager does not have the image yet
    now = time.monotonic()
    assert state.poll_due(now) == state._last_poll + swarm.FASTEST_POLL  # just seen: followed closely
    assert state.poll_due(now + swarm.FASTEST_FOR + 1) == state._last_poll + swarm.FAST_POLL
    later = now + swarm.FAST_FOR + 1  # its spec did not change since, its tasks keep failing
    assert state.poll_due(later) == state._last_poll + swarm.SLOW_UNSETTLED
    api.images["img:1"] = {"Config": {"ExposedPorts": {"3000/tcp": {}}}}
    monkeypatch.setattr(swarm.time, "monotonic", lambda: later)
    api.tsk = [raw_task("t2", "s1", 1, "running", "10.0.1.6")]
    assert state.poll(api)
    assert state.services["s1"].exposed_ports == (3000,)  # pulled meanwhile: looked for again


def test_a_failing_swarm_listing_keeps_the_services_and_backs_off() -> None:
    api = FakeAPI([raw_service("s1", "web", {"wakeproxy.host": "w.test"}, replicas=1)],
                  [raw_task("t1", "s1", 1, "running", "10.0.1.5")])
    state = swarm.SwarmState(resync=10.0)
    state.net_names = NETS
    state.resync_all(api)
    now = time.monotonic()
    waits = [state.failed(now) for _ in range(7)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert state.poll_due(now) == now + 30.0 and "s1" in state.services
    assert state.recovered() and not state.recovered()

    class Gone(FakeAPI):
        def tasks(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
            if filters and "service" in filters:
                raise docker.errors.NotFound("service s1 not found")  # what the engine says once it is gone
            return []

    assert state.refresh_tasks(Gone([], []), ["s1"]) and "s1" not in state.services


def test_a_service_on_its_own_overlay_is_reached_once_the_proxy_joins_it() -> None:
    from wakeproxy.docker.networks import Refusals, not_attachable

    labels = {"wakeproxy.host": "w.test", "wakeproxy.port": "80"}
    running = (TaskInfo("t1", "web.1", "running", {"priv": "10.0.7.2"}),)
    drivers = {**DRIVERS, "priv": "overlay", "closed": "overlay"}
    s = build_snapshot([service("web", labels, 1, running, networks=("priv",))], SourcesConfig(), (), drivers,
                       overlays=frozenset({"app"}), overlay_join=True, unreachable=Refusals())
    site = s.lookup("w.test")
    # The joiner joins `priv` for it ("starting" is a state it joins for); no address until it has: a packet
    # to an overlay the proxy is not on would leave the machine.
    assert site is not None and [(b.address, b.network, b.state) for b in site.backends] == [(None, "priv", "starting")]
    assert "web" in s.groups
    joined = build_snapshot([service("web", labels, 1, running, networks=("priv",))], SourcesConfig(), (), drivers,
                            overlays=frozenset({"app", "priv"}), overlay_join=True, unreachable=Refusals())
    site = joined.lookup("w.test")
    assert site is not None and [(b.address, b.network) for b in site.ready_backends] == [("10.0.7.2", "priv")]
    closed = build_snapshot([service("web", labels, 1, (TaskInfo("t1", "web.1", "running", {"closed": "10.0.8.2"}),),
                                     networks=("closed",))], SourcesConfig(), (), drivers,
                            overlays=frozenset({"app"}), overlay_join=True,
                            unreachable=Refusals(static=lambda n: not_attachable(n) if n == "closed" else None))
    site = closed.lookup("w.test")
    assert site is not None and "not attachable" in (site.backends[0].problem or "")


def test_a_one_shot_helper_of_a_stack_is_scaled_but_not_waited_for() -> None:
    raw = raw_service("s9", "shop_migrate", {"com.docker.stack.namespace": "shop"})
    raw["Spec"]["TaskTemplate"]["RestartPolicy"] = {"Condition": "none"}
    info = swarm.service_from(raw, [], NETS)
    assert info is not None and info.one_shot

    async def run() -> list[Any]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stack = {"com.docker.stack.namespace": "shop"}
        web = service("shop_web", {**stack, "wakeproxy.host": "w.test", "wakeproxy.port": str(port)})
        migrate = dataclasses.replace(service("shop_migrate", stack), one_shot=True)
        rt = Runtime(config=Config(wake=WakeConfig(timeout=3.0)), snapshot=snap([web, migrate]))

        class OnlyWebRuns(FakeSwarm):
            async def scale(self, sid: str, name: str, replicas: int) -> None:
                self.calls.append(("scale", name, replicas))
                if name == "shop_web":
                    asyncio.get_running_loop().create_task(self._tasks(sid, replicas))

        engine = OnlyWebRuns(rt, ["127.0.0.1"])
        await asyncio.wait_for(Orchestrator(rt, engine).wake_until_ready(rt.snapshot.groups["shop"]), 3)
        server.close()
        return engine.calls

    assert sorted(asyncio.run(run())) == [("scale", "shop_migrate", 1), ("scale", "shop_web", 1)]
