"""The controller and two workers over a real Unix socket, in one event loop (no mitmproxy master,
no Docker: the orchestrator's container operations are a fake that makes the container run)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from wakeproxy.certs.challenges import ChallengeTokens
from wakeproxy.certs.store import Certificates
from wakeproxy.config import Config, SourcesConfig, WakeConfig
from wakeproxy.planes import channel
from wakeproxy.planes.controller import ControllerPlane
from wakeproxy.planes.wire import frame
from wakeproxy.planes.worker import WorkerPlane
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import build_snapshot
from wakeproxy.runtime import Runtime
from wakeproxy.wake.idle import IdleKeeper
from wakeproxy.wake.orchestrator import WakeFailed
from wakeproxy.wake.waker import Waker

REPO = Path(__file__).resolve().parents[3]


class StartingOps:
    """Docker for the controller: a started container runs, with an address, in the next snapshot."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.starts: list[str] = []

    async def start(self, cid: str, name: str) -> None:
        self.starts.append(name)
        await asyncio.sleep(0.05)
        infos = [dataclasses.replace(i, state="running", networks={"bridge": "127.0.0.1"}) if i.id == cid else i
                 for i in self.runtime.snapshot.containers.values()]
        self.runtime.publish(build_snapshot(infos, SourcesConfig(), (), {}))

    async def unpause(self, cid: str, name: str) -> None:
        raise AssertionError


def sleepers(n: int, port: int) -> list[ContainerInfo]:
    return [ContainerInfo(f"id{i}", f"s{i}", "exited", labels={"wakeproxy.host": f"s{i}.test",
                                                                "wakeproxy.port": str(port)},
                          networks={"bridge": ""}) for i in range(n)]


@dataclasses.dataclass
class Worker:
    runtime: Runtime
    plane: WorkerPlane
    waker: Waker
    idle: IdleKeeper


class Planes:
    def __init__(self, tmp: Path, config: Config, n: int = 2) -> None:
        self.path = str(tmp / "c.sock")
        self.app = socket.socket()  # what the "started" containers listen on (readiness probes connect)
        self.app.bind(("127.0.0.1", 0))
        self.app.listen(64)
        self.runtime = Runtime(config=config, snapshot=build_snapshot(
            sleepers(3, self.app.getsockname()[1]), SourcesConfig(), (), {}))
        self.waker = Waker(self.runtime)
        self.ops = StartingOps(self.runtime)
        self.waker.core.ops = self.ops
        self.idle = IdleKeeper(self.runtime, self.waker)
        self.plane = ControllerPlane(self.runtime, self.waker.core, self.idle, Certificates(self.runtime),
                                     ChallengeTokens(), path=self.path)
        self.workers: list[Worker] = []
        for i in range(n):
            rt = Runtime(config=config)
            wp = WorkerPlane(rt, Certificates(rt, pushed=True), ChallengeTokens(), path=self.path,
                             directory=tmp / f"w{i}")
            wk = Waker(rt, wp.wakes)
            wi = IdleKeeper(rt, wk, decides=False)
            wp.idle = wi
            self.workers.append(Worker(rt, wp, wk, wi))

    async def __aenter__(self) -> Planes:
        await self.plane.running()
        for w in self.workers:
            w.plane.running()
        await asyncio.wait_for(asyncio.gather(*(w.plane.synced.wait() for w in self.workers)), 5)
        await self._until(lambda: len(self.plane.workers) == len(self.workers))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self.workers:
            w.plane.done()
            w.waker.done()
        self.plane.done()
        self.app.close()
        await asyncio.sleep(0.05)

    @staticmethod
    async def _until(check, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not check():
            assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
            await asyncio.sleep(0.01)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


def test_workers_get_the_snapshot_and_two_asks_are_one_start(tmp_path):
    async def go():
        async with Planes(tmp_path, Config(state_dir=tmp_path)) as p:
            a, b = p.workers
            assert a.runtime.snapshot.lookup("s0.test") is not None
            group = a.runtime.snapshot.groups["s0"]
            wa = a.waker.core.wake(group, "192.0.2.1")
            wb = b.waker.core.wake(b.runtime.snapshot.groups["s0"], "192.0.2.2")
            await asyncio.gather(wa.task, wb.task)
            assert p.ops.starts == ["s0"]
            # "ready" never overtakes the snapshot that shows it: each worker sees the container running.
            for w in (a, b):
                assert w.runtime.snapshot.containers["id0"].state == "running"
    run(go())


def test_the_wake_budget_is_one_across_all_workers(tmp_path):
    async def go():
        async with Planes(tmp_path, Config(state_dir=tmp_path, wake=WakeConfig(per_client=1))) as p:
            a, b = p.workers
            first = a.waker.core.wake(a.runtime.snapshot.groups["s0"], "192.0.2.9")
            second = b.waker.core.wake(b.runtime.snapshot.groups["s1"], "192.0.2.9")  # same client, other worker
            await first.task
            with pytest.raises(WakeFailed) as e:
                await second.task
            assert e.value.status == 429 and e.value.retry_after and e.value.retry_after > 0
            assert p.ops.starts == ["s0"]
    run(go())


def test_a_stop_waits_for_every_worker_and_is_vetoed_by_one_in_use(tmp_path):
    async def go():
        async with Planes(tmp_path, Config(state_dir=tmp_path)) as p:
            a, b = p.workers
            b.idle._touch("s1").inflight += 1  # a request in flight on worker b only
            held: list[tuple[str, bool]] = []
            for w in (a, b):
                original = w.plane._quiesce

                def spy(qid, group, w=w, original=original):
                    original(qid, group)
                    held.append((group, group in w.runtime.stopping))  # new requests are held from here on
                w.plane._quiesce = spy
            assert await asyncio.ensure_future(p.plane.quiesce("s1")) is False
            assert held == [("s1", True), ("s1", True)]
            await p._until(lambda: not a.runtime.stopping and not b.runtime.stopping)  # released
            assert p.idle.activity["s1"].inflight == 1  # what b answered
            ok = await asyncio.ensure_future(p.plane.quiesce("s2"))
            assert ok is True
    run(go())


def test_no_controller_means_a_503_at_once(tmp_path):
    async def go():
        async with Planes(tmp_path, Config(state_dir=tmp_path)) as p:
            a = p.workers[0]
            p.plane.done()
            await p._until(lambda: a.plane.peer is None)
            wake = a.waker.core.wake(a.runtime.snapshot.groups["s0"], "192.0.2.1")
            with pytest.raises(WakeFailed) as e:
                await wake.task
            assert e.value.status == 503 and e.value.retry_after
            assert a.runtime.snapshot.lookup("s0.test") is not None  # the last snapshot still routes
    run(go())


def test_a_malformed_message_ends_only_that_workers_connection(tmp_path):
    async def go():
        async with Planes(tmp_path, Config(state_dir=tmp_path)) as p:
            peer = await channel.connect(p.path)
            await p._until(lambda: len(p.plane.workers) == 3)
            peer.send_raw(frame("wake", {"group": "s0"}))  # no id
            await p._until(lambda: len(p.plane.workers) == 2)
            peer.close()
            assert all(w.plane.peer is not None for w in p.workers)
    run(go())


def test_a_worker_imports_nothing_of_docker_or_acme():
    code = ("import sys; from wakeproxy.bundle import make_worker_addons; make_worker_addons(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('docker', 'acme', 'josepy') "
            "or m.startswith(('wakeproxy.docker', 'wakeproxy.certs.acme'))]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO / "addons"), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
