"""wakeproxy.wake.orchestrator: the wake state machine with a fake engine (no Docker, no mitmproxy)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from wakeproxy.config import Config, SourcesConfig, WakeConfig
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import build_snapshot
from wakeproxy.runtime import ContainerEvent, Runtime
from wakeproxy.wake import orchestrator as orch_mod
from wakeproxy.wake.orchestrator import OpError, Orchestrator, WakeFailed


class FakeEngine:
    """ContainerOps: records the calls; a started container runs in the next snapshot (unless `stays_down`)."""

    def __init__(self, runtime: Runtime, stays_down: set[str] | None = None, fails: set[str] | None = None) -> None:
        self.runtime = runtime
        self.calls: list[tuple[str, str]] = []
        self.stays_down = stays_down or set()
        self.fails = fails or set()

    async def start(self, cid: str, name: str) -> None:
        await self._change("start", cid, name)

    async def unpause(self, cid: str, name: str) -> None:
        await self._change("unpause", cid, name)

    async def _change(self, what: str, cid: str, name: str) -> None:
        self.calls.append((what, name))
        await asyncio.sleep(0)
        if name in self.fails:
            raise OpError(f"docker {what} {name} failed: no such image")
        if name in self.stays_down:
            return
        snap = self.runtime.snapshot
        infos = [dataclasses.replace(i, state="running", networks={"bridge": "127.0.0.1"}) if i.id == cid else i
                 for i in snap.containers.values()]
        self.runtime.publish(build_snapshot(infos, SourcesConfig(), (), {}))
        self.runtime.emit(ContainerEvent(what, cid, name))


def sleeper(name: str, port: int, project: str = "p", **labels: str) -> ContainerInfo:
    return ContainerInfo(f"id-{name}", name, "exited", networks={"bridge": ""}, labels={
        "com.docker.compose.project": project, "com.docker.compose.service": name,
        "wakeproxy.host": f"{name}.test", "wakeproxy.port": str(port), **labels})


@pytest.fixture
def listening():
    """A local port that accepts connections: the 'app' of a woken container (127.0.0.1 only)."""
    async def start():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]
    return start


def setup(containers, **engine_kw):
    rt = Runtime(config=Config(wake=WakeConfig(timeout=2.0, retry_after=30.0)),
                 snapshot=build_snapshot(containers, SourcesConfig(), (), {}))
    engine = FakeEngine(rt, **engine_kw)
    return rt, engine, Orchestrator(rt, engine)


def test_single_flight_and_ready_once_the_port_answers(listening):
    async def run():
        server, port = await listening()
        rt, engine, o = setup([sleeper("web", port)])
        group = rt.snapshot.groups["p"]
        waits = [asyncio.ensure_future(o.wake_until_ready(group)) for _ in range(20)]
        await asyncio.sleep(0)
        assert o.is_waking("p") and o.wake(group) is o.wake(group)
        await asyncio.wait_for(asyncio.gather(*waits), 5)
        server.close()
        return engine.calls, o

    calls, o = asyncio.run(run())
    assert calls == [("start", "web")]  # twenty waiters, one start
    assert not o.is_waking("p")


def test_timeout_names_what_is_missing():
    async def run():
        rt, engine, o = setup([sleeper("web", 9)], stays_down={"web"})  # the container never runs
        with pytest.raises(WakeFailed) as e:
            await o.wake_until_ready(rt.snapshot.groups["p"])
        return e.value

    failure = asyncio.run(run())
    assert failure.status == 504 and "web: exited, not running yet" in failure.message


def test_a_member_that_dies_fails_the_wake_at_once_and_cools_down(listening, monkeypatch):
    async def run():
        rt, engine, o = setup([sleeper("web", 9)], stays_down={"web"})
        group = rt.snapshot.groups["p"]
        wake = o.wake(group)
        await asyncio.sleep(0.05)
        rt.emit(ContainerEvent("start", "id-web", "web"))  # it started …
        rt.emit(ContainerEvent("die", "id-web", "web", exit_code=3))  # … and exited at once
        with pytest.raises(WakeFailed) as e:
            await asyncio.wait_for(o.wake_until_ready(group), 1)
        again = o.cooling([group])
        with pytest.raises(WakeFailed):
            await o.wake_until_ready(group)  # within retry_after: no new start
        return e.value, again, engine.calls, wake

    failure, again, calls, wake = asyncio.run(run())
    assert failure.status == 502 and "exited with code 3" in failure.message
    assert again is not None and calls == [("start", "web")]


def test_a_failing_start_is_a_502_with_the_engines_explanation():
    async def run():
        rt, engine, o = setup([sleeper("web", 9)], fails={"web"})
        with pytest.raises(WakeFailed) as e:
            await o.wake_until_ready(rt.snapshot.groups["p"])
        return e.value

    failure = asyncio.run(run())
    assert failure.status == 502 and "no such image" in failure.message


def test_order_follows_depends_on(listening, monkeypatch):
    monkeypatch.setattr(orch_mod, "PROBE_INTERVAL", 0.01)

    async def run():
        server, port = await listening()
        db = ContainerInfo("id-db", "db", "exited", networks={"bridge": ""},
                           labels={"com.docker.compose.project": "p", "com.docker.compose.service": "db"})
        rt, engine, o = setup([db, sleeper("web", port, **{"com.docker.compose.depends_on": "db:service_started"})])
        await asyncio.wait_for(o.wake_until_ready(rt.snapshot.groups["p"]), 5)
        server.close()
        return engine.calls

    assert asyncio.run(run()) == [("start", "db"), ("start", "web")]


def test_the_wake_core_imports_neither_mitmproxy_nor_the_docker_sdk():
    import subprocess
    import sys

    code = ("import sys, wakeproxy.wake.orchestrator, wakeproxy.wake.readiness; "
            "print(sorted(m for m in ('mitmproxy', 'docker') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_an_engine_out_of_network_addresses_is_a_503_naming_the_fix(monkeypatch):
    from wakeproxy.docker import ops as ops_mod

    err = ops_mod.explain("start", "web", "failed to create network p_default: could not find an available, "
                                          "non-overlapping IPv4 address pool among the defaults to assign to the network")
    assert err.status == 503 and "default-address-pools" in str(err)
    assert ops_mod.explain("start", "web", "no such image").status == 502
    full = ops_mod.explain("start", "web", "no available IPv4 addresses on this network's address pools: p_default")
    assert full.status == 503 and "bigger subnet" in str(full)

    async def run():
        rt, engine, o = setup([sleeper("web", 9)])

        async def out_of_addresses(cid: str, name: str) -> None:
            raise err
        monkeypatch.setattr(engine, "start", out_of_addresses)
        with pytest.raises(WakeFailed) as e:
            await o.wake_until_ready(rt.snapshot.groups["p"])
        return e.value, o.cooling([rt.snapshot.groups["p"]])

    failure, cooling = asyncio.run(run())
    assert failure.status == 503 and failure.title == "Out of network addresses"
    assert "daemon.json" in failure.message
    assert cooling is not None and cooling.status == 503  # not tried again at once


def test_only_failed_starts_and_engine_refusals_cool_down():
    assert WakeFailed(502, "Wake-up failed", "x").cools
    assert not WakeFailed(503, "Site asleep", "the controller is not there").cools  # passes: ask again soon
    assert not WakeFailed(504, "Wake-up timed out", "x").cools
    assert WakeFailed(503, "Out of network addresses", "x", cools=True).cools


class NetworkEngine(FakeEngine):
    """A FakeEngine whose containers lost their `p_default` (Docksal's stop): recreate_network makes it
    (the next snapshot has it, but not the connects: Docker has no event for a stopped container's
    connect), and a start puts the container on it."""

    def __init__(self, runtime: Runtime, fails_with: OpError | None = None) -> None:
        super().__init__(runtime)
        self.fails_with = fails_with
        self.attached: list[orch_mod.Attachment] = []

    async def recreate_network(self, network: str, project: str, attach: tuple[orch_mod.Attachment, ...]) -> None:
        self.calls.append(("network", f"{project}:{network}"))
        await asyncio.sleep(0)
        if self.fails_with is not None:
            raise self.fails_with
        self.attached.extend(attach)
        self.runtime.publish(build_snapshot(list(self.runtime.snapshot.containers.values()), SourcesConfig(), (),
                                            {network: "bridge"}))

    async def _change(self, what: str, cid: str, name: str) -> None:
        self.calls.append((what, name))
        await asyncio.sleep(0.02)  # the start's event comes a moment later
        infos = [dataclasses.replace(i, state="running", networks={"p_default": "127.0.0.1"}) if i.id == cid else i
                 for i in self.runtime.snapshot.containers.values()]
        self.runtime.publish(build_snapshot(infos, SourcesConfig(), (), {"p_default": "bridge"}))
        self.runtime.emit(ContainerEvent(what, cid, name))


def helper(name: str) -> ContainerInfo:
    """A member of project p that serves no host (a database)."""
    return ContainerInfo(f"id-{name}", name, "exited", labels={
        "com.docker.compose.project": "p", "com.docker.compose.service": name})


def lost(info: ContainerInfo) -> ContainerInfo:
    return dataclasses.replace(info, networks={}, network_mode="p_default")


def test_a_removed_project_network_is_made_once_before_the_members_start(listening):
    async def run():
        server, port = await listening()
        rt = Runtime(config=Config(wake=WakeConfig(timeout=2.0, retry_after=30.0)),
                     snapshot=build_snapshot([lost(sleeper("web", port)), lost(helper("db"))],
                                             SourcesConfig(), (), {}))
        engine = NetworkEngine(rt)
        o = Orchestrator(rt, engine)
        group = rt.snapshot.groups["p"]
        await asyncio.wait_for(asyncio.gather(*(o.wake_until_ready(group) for _ in range(5))), 5)
        server.close()
        return engine, o

    engine, o = asyncio.run(run())
    assert engine.calls[0] == ("network", "p:p_default") and sorted(engine.calls[1:]) == [("start", "db"),
                                                                                         ("start", "web")]
    assert [(a.container_id, a.alias) for a in engine.attached] == [("id-db", "db"), ("id-web", "web")]
    assert "network" in o.recent["p"][2]  # the wake's timing names the step


def test_a_network_that_cannot_be_made_fails_the_wake_with_the_engines_status_and_starts_nothing():
    async def run():
        rt = Runtime(config=Config(wake=WakeConfig(timeout=2.0, retry_after=30.0)),
                     snapshot=build_snapshot([lost(sleeper("web", 9))], SourcesConfig(), (), {}))
        engine = NetworkEngine(rt, fails_with=OpError("docker network create p_default failed: out of pools", 503,
                                                      "Out of network addresses"))
        o = Orchestrator(rt, engine)
        with pytest.raises(WakeFailed) as e:
            await o.wake_until_ready(rt.snapshot.groups["p"])
        return engine, o, e.value

    engine, o, failure = asyncio.run(run())
    assert failure.status == 503 and failure.title == "Out of network addresses"
    assert "docker network create p_default failed" in failure.message
    assert engine.calls == [("network", "p:p_default")] and o.cooling_now()
