"""wakeproxy.budget and its use by the Waker: a client may start only so many wakes a minute."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from ipaddress import ip_network

from mitmproxy import http
from mitmproxy.test import tflow
from mitmproxy.test.tutils import treq
from wakeproxy.config import Config, SourcesConfig, WakeConfig
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import build_snapshot
from wakeproxy.runtime import Runtime
from wakeproxy.wake.budget import WakeBudget, client_key
from wakeproxy.wake.waker import WAIT_PATH, WakeFailed, Waker


def test_bucket_refills_at_its_rate():
    b = WakeBudget(3, window=60)
    assert [b.take("a", 0.0) for _ in range(3)] == [None, None, None]
    assert b.take("a", 0.0) == 20  # one token every 20 s
    assert b.take("b", 0.0) is None  # per client
    assert b.take("a", 20.0) is None
    assert b.take("a", 21.0) == 19


def test_zero_means_no_limit():
    b = WakeBudget(0)
    assert all(b.take("a", 0.0) is None for _ in range(1000))


def test_the_table_is_bounded():
    b = WakeBudget(1, max_clients=100)
    for i in range(1000):
        b.take(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(b._buckets) == 100


def test_client_keys():
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("garbage") == "garbage"


class FakeOps:
    """Docker for the Waker: records calls; with `runtime`, a started container runs in the next snapshot."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.runtime = runtime

    async def start(self, cid: str, name: str) -> None:
        self.calls.append(("start", name))
        if self.runtime is not None:
            snap = self.runtime.snapshot
            infos = [dataclasses.replace(i, state="running", networks={"bridge": f"172.17.0.{n + 2}"})
                     if i.id == cid else i for n, i in enumerate(snap.containers.values())]
            self.runtime.publish(build_snapshot(infos, SourcesConfig(), (), {}))

    async def unpause(self, cid: str, name: str) -> None:
        self.calls.append(("unpause", name))


def _sleepers(n: int):
    return [ContainerInfo(f"id{i}", f"s{i}", "exited", labels={"wakeproxy.host": f"s{i}.test"},
                          networks={"bridge": ""}) for i in range(n)]


def _flow(host: str, path: str = "/", peer: str = "192.0.2.7", ua: str = "curl/8") -> http.HTTPFlow:
    f = tflow.tflow(req=treq(path=path.encode(), headers=http.Headers(host=host, accept="*/*", user_agent=ua)))
    f.client_conn.peername = (peer, 5555)
    return f


def _waker(config: Config, containers, docker_follows: bool = False) -> tuple[Waker, FakeOps]:
    rt = Runtime(config=config, snapshot=build_snapshot(containers, SourcesConfig(), (), {}))
    w = Waker(rt)
    ops = FakeOps(rt if docker_follows else None)
    w.ops = ops  # type: ignore[assignment]
    return w, ops


def test_over_the_budget_429_and_nothing_started():
    async def run():
        w, ops = _waker(Config(wake=WakeConfig(per_client=3, strategy="page")), _sleepers(6))
        answers = []
        for i in range(6):
            f = _flow(f"s{i}.test")
            site = w.runtime.snapshot.lookup(f"s{i}.test")
            held = w.asleep(f, site, f"s{i}.test", lambda flow, site: None)
            answers.append((f.response.status_code if f.response else "held", held))
        await asyncio.sleep(0.05)
        for _, h in answers:
            if h is not None:
                h.close()
        for wake in list(w._wakes.values()):
            wake.task.cancel()
        return answers, ops.calls, f

    answers, calls, last = asyncio.run(run())
    assert [a for a, _ in answers] == ["held", "held", "held", 429, 429, 429]
    assert sorted(n for _, n in calls) == ["s0", "s1", "s2"]
    assert last.response.headers["Retry-After"] == "20"


def test_joining_a_wake_costs_nothing():
    async def run():
        w, ops = _waker(Config(wake=WakeConfig(per_client=1)), _sleepers(1))
        site = w.runtime.snapshot.lookup("s0.test")
        statuses = []
        for _ in range(5):
            f = _flow("s0.test")
            held = w.asleep(f, site, "s0.test", lambda flow, site: None)
            statuses.append(f.response.status_code if f.response else "held")
            if held is not None:
                held.close()
        for wake in list(w._wakes.values()):
            wake.task.cancel()
        return statuses

    assert asyncio.run(run()) == ["held"] * 5


def _wait(w: Waker, host: str, **kw) -> http.HTTPFlow:
    f = _flow(host, WAIT_PATH, **kw)
    site = w.runtime.snapshot.lookup(host)

    async def run():
        coro = w.control(f, site, host)
        if coro is not None:
            task = asyncio.ensure_future(coro)
            await asyncio.sleep(0.05)
            for wake in list(w._wakes.values()):
                wake.fail(WakeFailed(502, "Wake-up failed", "container 's0' exited with code 3 while starting"))
            await asyncio.wait_for(task, 2)
        await asyncio.sleep(0)  # let the wakes finish (Waker._finished reads their outcome)

    asyncio.run(run())
    return f


def test_wait_endpoint_honours_ignored_user_agents_and_starts_nothing():
    import re

    w, ops = _waker(Config(wake=WakeConfig(ignore_user_agents=(re.compile("EvilBot", re.I),))), _sleepers(1))
    f = _wait(w, "s0.test", ua="EvilBot/1.0")
    assert json.loads(f.response.content) == {"state": "failed"}
    assert ops.calls == [] and w._wakes == {}


def test_wait_endpoint_spends_the_budget():
    w, ops = _waker(Config(wake=WakeConfig(per_client=1)), _sleepers(2))
    _wait(w, "s0.test")
    f = _wait(w, "s1.test")
    assert f.response.status_code == 429 and json.loads(f.response.content) == {"state": "failed"}
    assert [n for _, n in ops.calls] == ["s0"]


def test_wait_endpoint_tells_anonymous_clients_only_the_state():
    w, _ = _waker(Config(), _sleepers(1))
    f = _wait(w, "s0.test")
    assert json.loads(f.response.content) == {"state": "failed"}
    w, _ = _waker(Config(debug_clients=(ip_network("192.0.2.0/24"),)), _sleepers(1))
    body = json.loads(_wait(w, "s0.test").response.content)
    assert body["state"] == "failed" and "exited with code 3" in body["message"]


# --- the wake's order, with a fake Docker -----------------------------------------------------------


def _compose(name: str, service: str, depends: str = "", state: str = "exited") -> ContainerInfo:
    labels = {"com.docker.compose.project": "proj", "com.docker.compose.service": service}
    if depends:
        labels["com.docker.compose.depends_on"] = depends
    if service == "web":
        labels["wakeproxy.host"] = "web.test"
    return ContainerInfo(f"id-{name}", name, state, labels=labels, networks={"bridge": ""})


def test_services_that_depend_on_each_other_are_started_together(caplog):
    """A depends_on cycle (a ↔ b) used to deadlock: no `docker start` at all, then 504."""
    async def run():
        w, ops = _waker(Config(), [_compose("web", "web", "a:service_started"),
                                   _compose("a", "a", "b:service_started"), _compose("b", "b", "a:service_started")],
                        docker_follows=True)
        group = w.runtime.snapshot.groups["proj"]
        assert [sorted(w.runtime.snapshot.containers[c].name for c in layer)
                for layer in group.start_order(w.runtime.snapshot)] == [["a", "b"], ["web"]]
        wake = w.wake(group)
        await asyncio.sleep(0.3)
        wake.task.cancel()
        return ops.calls

    calls = asyncio.run(run())
    started = [n for _, n in calls]
    assert set(started[:2]) == {"a", "b"}, started  # the cycle first, together
    assert started[2:] == ["web"], started  # then what depends on it
    assert "depend on each other" in caplog.text


def test_autostart_off_answers_a_page_and_starts_nothing():
    """wake.autostart: false (Docksal's PROJECT_AUTOSTART=0): the request and the waking page's wait endpoint
    get a 503 that says the sandbox is stopped (no Retry-After: waiting does not help), and nothing starts."""
    async def run():
        w, ops = _waker(Config(wake=WakeConfig(autostart=False)), _sleepers(1))
        site = w.runtime.snapshot.lookup("s0.test")
        f = _flow("s0.test")
        held = w.asleep(f, site, "s0.test", lambda flow, site: None)
        return w, ops, f, held

    w, ops, f, held = asyncio.run(run())
    assert held is None and ops.calls == [] and w._wakes == {}
    assert f.response.status_code == 503 and "Retry-After" not in f.response.headers
    text = f.response.get_text()
    assert "Sandbox stopped" in text and "does not start it on request" in text
    assert "PROJECT_AUTOSTART" not in text  # internal detail only for debug clients
    w2, _ = _waker(Config(wake=WakeConfig(autostart=False), debug_clients=(ip_network("192.0.2.0/24"),)), _sleepers(1))
    g = _flow("s0.test")
    asyncio.run(_call_asleep(w2, g))
    assert "PROJECT_AUTOSTART=0" in g.response.get_text()
    body = json.loads(_wait(w, "s0.test").response.content)
    assert body == {"state": "failed"} and ops.calls == []


async def _call_asleep(w: Waker, f: http.HTTPFlow) -> None:
    site = w.runtime.snapshot.lookup(f.request.host_header or "")
    w.asleep(f, site, f.request.host_header or "", lambda flow, site: None)
