"""wakeproxy.idle and wakeproxy.status without Docker: the IdleKeeper's activity counters, its idle
decisions (`check`), the stop/pause sequence over a fake DockerOps, the idle-state file,
Group.stop_order/start_order, and StatusServer.report().

(Not named test_idle.py: next to tests/integration/test_idle.py that name breaks collection, since
pytest imports test files without an __init__.py by their basename.)

`keeper._put_to_sleep` is replaced with a recorder wherever only the decision matters; where the
sequence itself is under test, `keeper.ops` is a fake that records calls and never touches Docker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from pathlib import Path

import pytest
import wakeproxy.wake.idle as idle_mod
from mitmproxy import http
from mitmproxy.test import taddons, tflow
from mitmproxy.test.tutils import tresp
from wakeproxy.config import Address, Config, IdleConfig, SourcesConfig, StatusConfig
from wakeproxy.docker.ops import DockerOpError
from wakeproxy.observe.status import StatusServer
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import Snapshot, build_snapshot
from wakeproxy.runtime import Runtime
from wakeproxy.wake.idle import STATE_FILE, Activity, IdleKeeper

TIMEOUT = 60.0


# --------------------------------------------------------------------------
# building blocks


def c(name, host=None, state="running", labels=None, project=None, service=None, depends_on=None) -> ContainerInfo:
    labels = dict(labels or {})
    if host:
        labels["wakeproxy.host"] = host
    if project:
        labels["com.docker.compose.project"] = project
    if service:
        labels["com.docker.compose.service"] = service
    if depends_on:
        labels["com.docker.compose.depends_on"] = depends_on
    ip = "172.17.0.2" if state == "running" else ""
    return ContainerInfo(id=f"id-{name}", name=name, state=state, labels=labels, networks={"bridge": ip})


def snap(*containers, synced=True) -> Snapshot:
    return build_snapshot(containers, SourcesConfig(), (), {}, synced=synced)


class FakeWaker:
    def __init__(self) -> None:
        self.waking: set[str] = set()

    def is_waking(self, group: str) -> bool:
        return group in self.waking


class FakeOps:
    """Records stop/pause calls as (what, name, arg) in the order they begin and end."""

    def __init__(self, fail: set[str] = frozenset(), delay: float = 0.01) -> None:
        self.calls: list[tuple] = []
        self.fail = set(fail)
        self.delay = delay

    async def _op(self, what: str, name: str, arg=None) -> None:
        self.calls.append(("begin", what, name, arg))
        await asyncio.sleep(self.delay)
        self.calls.append(("end", what, name, arg))
        if name in self.fail:
            raise DockerOpError(f"docker {what} {name} failed: boom")

    async def stop(self, cid, name, timeout):
        await self._op("stop", name, timeout)

    async def pause(self, cid, name):
        await self._op("pause", name)

    async def remove(self, cid, name, volumes):
        await self._op("rm", name, volumes)

    async def remove_network(self, name):
        await self._op("network rm", name)

    async def network_labels(self, name):  # every network "P_x" was made by Compose project P
        return {"com.docker.compose.project": name.split("_")[0]} if "_" in name else {}

    async def start(self, cid, name):  # never called by the keeper
        raise AssertionError("the idle keeper must never start anything")

    unpause = start


def config(tmp_path: Path | None = None, **idle) -> Config:
    cfg = dataclasses.replace(Config(), idle=IdleConfig(**{"timeout": TIMEOUT, **idle}))
    if tmp_path is not None:
        cfg = dataclasses.replace(cfg, state_dir=tmp_path)
    return cfg


def make_keeper(*containers, tmp_path=None, synced=True, record=True, **idle) -> IdleKeeper:
    runtime = Runtime(config=config(tmp_path, **idle), snapshot=snap(*containers, synced=synced))
    keeper = IdleKeeper(runtime, FakeWaker())
    keeper.slept = []  # (group, idle seconds) for every decision to put a group to sleep
    if record:
        def record(s: Snapshot, g, idle_for: float) -> None:
            keeper.slept.append((g.name, round(idle_for, 3)))
            keeper.runtime.stopping[g.name] = object()  # as the real one: "stopping" until it is done

        keeper._put_to_sleep = record
    keeper.ops = FakeOps()
    return keeper


def flow_for(group: str | None) -> http.HTTPFlow:
    f = tflow.tflow()
    if group is not None:
        f.metadata["wakeproxy.group"] = group
    return f


def ws_flow(group: str | None) -> http.HTTPFlow:
    f = tflow.twebsocketflow()
    if group is not None:
        f.metadata["wakeproxy.group"] = group
    return f


# --------------------------------------------------------------------------
# activity counters from flows


def test_request_counts_in_flight_until_its_response():
    k = make_keeper(c("a", "a.test"))
    f = flow_for("a")
    t0 = time.time()
    k.requestheaders(f)
    act = k.activity["a"]
    assert (act.inflight, act.open, act.running) == (1, 0, True)
    assert t0 <= act.last <= time.time()
    assert f.metadata["wakeproxy.idle"] == "a"
    # a second requestheaders on the same flow (e.g. re-invoked after a wake hold) is not counted twice
    k.requestheaders(f)
    assert act.inflight == 1
    act.last = 0.0
    f.response = tresp()
    k.response(f)
    assert act.inflight == 0
    assert act.last >= t0  # the last byte moved now
    assert "wakeproxy.idle" not in f.metadata
    k.response(f)  # a stray second end changes nothing
    assert act.inflight == 0


def test_error_ends_a_request_too():
    k = make_keeper(c("a", "a.test"))
    flows = [flow_for("a") for _ in range(3)]
    for f in flows:
        k.requestheaders(f)
    assert k.activity["a"].inflight == 3
    k.error(flows[0])
    flows[1].response = tresp()
    k.response(flows[1])
    assert k.activity["a"].inflight == 1
    k.error(flows[2])
    k.error(flows[2])
    assert k.activity["a"].inflight == 0


def test_flows_without_a_group_or_already_answered_are_not_counted():
    k = make_keeper(c("a", "a.test"))
    k.requestheaders(flow_for(None))  # unknown host, 404 page: no group
    answered = flow_for("a")
    answered.response = tresp()  # answered by the proxy itself (waking page, refusal)
    k.requestheaders(answered)
    assert k.activity == {}
    k.response(answered)
    k.error(flow_for("a"))
    assert k.activity == {}


def test_counters_never_go_negative():
    k = make_keeper(c("a", "a.test"))
    k.activity["a"] = Activity(last=1.0, inflight=0, open=0, running=True)
    f = flow_for("a")
    f.metadata["wakeproxy.idle"] = "a"
    k.response(f)
    w = ws_flow("a")
    w.metadata["wakeproxy.ws"] = "a"
    k.websocket_end(w)
    assert (k.activity["a"].inflight, k.activity["a"].open) == (0, 0)


def test_websocket_open_until_end_and_messages_move_the_clock():
    k = make_keeper(c("a", "a.test"))
    f = ws_flow("a")
    k.websocket_start(f)
    act = k.activity["a"]
    assert act.open == 1
    act.last = 5.0
    k.websocket_message(f)
    assert act.last > 5.0 and act.open == 1
    g = ws_flow("a")
    k.websocket_start(g)
    assert act.open == 2
    k.websocket_end(f)
    k.websocket_end(f)  # once only
    assert act.open == 1
    act.last = 5.0
    k.websocket_end(g)
    assert act.open == 0 and act.last > 5.0
    # messages and ends of a websocket the keeper never saw start are ignored
    h = ws_flow("a")
    act.last = 5.0
    k.websocket_message(h)
    k.websocket_end(h)
    assert act.last == 5.0


def test_whole_websocket_flow_through_mitmproxy_hooks():
    """The keeper as an addon: requestheaders → response (101) → websocket_* → end, via taddons."""
    k = make_keeper(c("a", "a.test"))
    f = ws_flow("a")
    response = f.response
    f.response = None  # the upgrade request is still in flight when its headers arrive
    with taddons.context(k) as tctx:
        tctx.master.addons.invoke_addon_sync(k, _hook("requestheaders", f))
        assert (k.activity["a"].inflight, k.activity["a"].open) == (1, 0)
        f.response = response
        tctx.master.addons.invoke_addon_sync(k, _hook("response", f))
        tctx.master.addons.invoke_addon_sync(k, _hook("websocket_start", f))
        assert (k.activity["a"].inflight, k.activity["a"].open) == (0, 1)
        tctx.master.addons.invoke_addon_sync(k, _hook("websocket_message", f))
        tctx.master.addons.invoke_addon_sync(k, _hook("websocket_end", f))
    assert (k.activity["a"].inflight, k.activity["a"].open) == (0, 0)


def _hook(name: str, f: http.HTTPFlow):
    from mitmproxy.proxy.layers import http as http_layer
    from mitmproxy.proxy.layers import websocket as ws_layer

    return {
        "requestheaders": http_layer.HttpRequestHeadersHook,
        "response": http_layer.HttpResponseHook,
        "websocket_start": ws_layer.WebsocketStartHook,
        "websocket_message": ws_layer.WebsocketMessageHook,
        "websocket_end": ws_layer.WebsocketEndHook,
    }[name](f)


# --------------------------------------------------------------------------
# check(): when a group is put to sleep


def test_quiet_running_group_is_put_to_sleep_after_its_timeout():
    k = make_keeper(c("a", "a.test"), c("b", "b.test"))
    now = 1_000_000.0
    k.check(now)  # first sight: both active now
    assert k.slept == []
    assert k.activity["a"].last == now and k.activity["a"].running
    k.check(now + TIMEOUT - 0.01)
    assert k.slept == []
    k.check(now + TIMEOUT)
    assert sorted(k.slept) == [("a", TIMEOUT), ("b", TIMEOUT)]


def test_traffic_pushes_the_deadline():
    k = make_keeper(c("a", "a.test"))
    now = time.time()
    k.check(now)
    f = flow_for("a")
    k.requestheaders(f)
    f.response = tresp()
    k.response(f)
    k.check(now + TIMEOUT - 0.5)
    assert k.slept == []
    k.check(k.activity["a"].last + TIMEOUT)
    assert k.slept == [("a", TIMEOUT)]


@pytest.mark.parametrize("what", ["inflight", "open", "stopping", "waking"])
def test_group_in_use_or_in_transition_is_never_stopped(what):
    k = make_keeper(c("a", "a.test"))
    now = time.time()
    k.check(now)
    if what == "inflight":
        k.activity["a"].inflight = 1
    elif what == "open":
        k.activity["a"].open = 1
    elif what == "stopping":
        k.runtime.stopping["a"] = object()  # a stop already under way
    else:
        k.waker.waking.add("a")
    k.check(now + 100 * TIMEOUT)
    assert k.slept == []


@pytest.mark.parametrize("labels", [{"io.docksal.permanent": "true"}, {"wakeproxy.idle-timeout": "0"}],
                         ids=["docksal-permanent", "idle-timeout-0"])
def test_permanent_group_is_never_stopped(labels):
    k = make_keeper(c("a", "a.test", labels=labels), c("b", "b.test"))
    now = time.time()
    k.check(now)
    k.check(now + 1e6)
    assert k.slept == [("b", 1e6)]
    assert k.timeout_of(k.runtime.snapshot.groups["a"]) == 0


def test_config_timeout_zero_means_never():
    k = make_keeper(c("a", "a.test"), timeout=0)
    k.check(1.0)
    k.check(1e9)
    assert k.slept == []


def test_label_timeout_overrides_the_config():
    k = make_keeper(c("short", "s.test", labels={"wakeproxy.idle-timeout": "5s"}),
                    c("long", "l.test", labels={"wakeproxy.idle-timeout": "2h"}),
                    c("default", "d.test"))
    k.check(0.0)
    k.check(5.0)
    assert k.slept == [("short", 5.0)]
    k.check(TIMEOUT)
    assert k.slept[1:] == [("default", TIMEOUT)]
    k.check(7200.0)
    assert k.slept[2:] == [("long", 7200.0)]


def test_nothing_happens_before_the_first_full_listing():
    k = make_keeper(c("a", "a.test"), synced=False)
    k.check(1.0)
    k.check(1e9)
    assert k.slept == [] and k.activity == {}


def test_group_that_is_not_running_is_left_alone():
    k = make_keeper(c("a", "a.test", state="exited"), c("p", "p.test", state="paused"))
    k.check(1.0)
    k.check(1e9)
    assert k.slept == []
    assert k.activity == {}


def test_group_started_by_someone_else_counts_from_when_it_is_seen_running():
    k = make_keeper(c("a", "a.test"))
    k.check(100.0)
    k.runtime.publish(snap(c("a", "a.test", state="exited")))
    k.check(200.0)
    assert k.activity["a"].running is False
    k.runtime.publish(snap(c("a", "a.test")))  # `docker start` behind the proxy's back
    k.check(10_000.0)
    assert k.slept == []
    assert k.activity["a"].last == 10_000.0
    k.check(10_000.0 + TIMEOUT)
    assert k.slept == [("a", TIMEOUT)]


def test_group_with_any_running_member_counts_as_running():
    k = make_keeper(c("web", "a.test", project="p"), c("db", state="exited", project="p"))
    k.check(0.0)
    k.check(TIMEOUT)
    assert k.slept == [("p", TIMEOUT)]


def test_saved_clock_is_used_for_a_group_running_at_first_sight():
    k = make_keeper(c("a", "a.test"), c("b", "b.test"))
    k._loaded = {"a": 1000.0 - TIMEOUT + 1}
    k.check(1000.0)
    assert k.slept == [] and k.activity["a"].last == 1000.0 - TIMEOUT + 1
    k.check(1001.0)
    assert k.slept == [("a", TIMEOUT)]
    assert k.activity["b"].last == 1000.0  # no saved clock: active now
    assert "a" not in k._loaded


def test_saved_clock_is_not_used_for_a_group_started_after_the_restart():
    k = make_keeper(c("a", "a.test", state="exited"))
    k._loaded = {"a": 1000.0 - 10 * TIMEOUT}  # it was last used long ago, then slept
    k.check(1000.0)  # asleep at the proxy's first look
    k.runtime.publish(snap(c("a", "a.test")))  # started by someone else
    k.check(1001.0)
    assert k.slept == []  # actual: [("a", 661.0)]


# --------------------------------------------------------------------------
# the sleep itself (fake DockerOps)


def compose_group(state="running"):
    return (
        c("p-web", "a.test", state, project="p", service="web", depends_on="api:service_started,cache"),
        c("p-api", None, state, project="p", service="api", depends_on="db:service_healthy"),
        c("p-db", None, state, project="p", service="db"),
        c("p-cache", None, state, project="p", service="cache", depends_on="cache"),  # self-dependency ignored
        c("p-once", None, "exited", project="p", service="once"),  # a finished one-shot: not stopped
    )


def test_stop_and_start_order_follow_depends_on():
    s = snap(*compose_group())
    g = s.groups["p"]
    def names(layers):
        return [sorted(s.containers[cid].name for cid in layer) for layer in layers]

    assert names(g.start_order(s)) == [["p-cache", "p-db", "p-once"], ["p-api"], ["p-web"]]
    assert names(g.stop_order(s)) == [["p-web"], ["p-api"], ["p-cache", "p-db", "p-once"]]


def test_stop_order_of_a_cycle_and_of_plain_containers():
    s = snap(c("x-a", "a.test", project="x", service="a", depends_on="b"),
             c("x-b", None, project="x", service="b", depends_on="a"),
             c("solo", "solo.test"))
    assert [sorted(layer) for layer in s.groups["x"].stop_order(s)] == [["id-x-a", "id-x-b"]]
    assert s.groups["solo"].stop_order(s) == [["id-solo"]]


def run_sleep(k: IdleKeeper, group: str, now: float) -> None:
    async def go():
        k.check(now)
        task = k.runtime.stopping.get(group)
        assert task is not None, f"{group} was not put to sleep"
        await task
        await asyncio.sleep(0)  # let the done callback run

    asyncio.run(go())


def test_stop_goes_layer_by_layer_dependents_first(caplog):
    k = make_keeper(*compose_group(), record=False, stop_timeout=3.0)
    k.activity["p"] = Activity(last=0.0, running=True)
    with caplog.at_level(logging.INFO, logger="wakeproxy.wake.idle"):
        run_sleep(k, "p", TIMEOUT + 1)
    calls = k.ops.calls
    assert {x[1] for x in calls} == {"stop"} and {x[3] for x in calls} == {3.0}
    order = [(x[0], x[2]) for x in calls]
    # web ends before api begins; api ends before db and cache begin; db and cache run together
    assert order[:4] == [("begin", "p-web"), ("end", "p-web"), ("begin", "p-api"), ("end", "p-api")]
    assert sorted(order[4:6]) == [("begin", "p-cache"), ("begin", "p-db")]
    assert sorted(order[6:]) == [("end", "p-cache"), ("end", "p-db")]
    assert "p-once" not in {x[2] for x in calls}
    # the stop is over: no longer "stopping", the clock restarted, not running
    assert "p" not in k.runtime.stopping
    act = k.activity["p"]
    assert act.running is False and act.last > TIMEOUT + 1 - 10 and k._dirty
    text = caplog.text
    assert "idle p: no activity for 61.0 s; stopping 5 container(s)" in text
    assert "idle p: stopped in" in text


def test_pause_action_from_the_label_pauses():
    k = make_keeper(c("a", "a.test", labels={"wakeproxy.idle-action": "pause"}), record=False)
    k.activity["a"] = Activity(last=0.0, running=True)
    run_sleep(k, "a", TIMEOUT)
    assert [(x[0], x[1], x[2]) for x in k.ops.calls] == [("begin", "pause", "a"), ("end", "pause", "a")]


def test_pause_action_from_the_config_pauses():
    k = make_keeper(c("a", "a.test"), record=False, action="pause")
    k.activity["a"] = Activity(last=0.0, running=True)
    run_sleep(k, "a", TIMEOUT)
    assert [x[1] for x in k.ops.calls] == ["pause", "pause"]


def test_a_failing_member_does_not_stop_the_others(caplog):
    k = make_keeper(*compose_group(), record=False)
    k.ops = FakeOps(fail={"p-web"})
    k.activity["p"] = Activity(last=0.0, running=True)
    with caplog.at_level(logging.WARNING, logger="wakeproxy.wake.idle"):
        run_sleep(k, "p", TIMEOUT)
    assert {x[2] for x in k.ops.calls} == {"p-web", "p-api", "p-db", "p-cache"}
    assert "docker stop p-web failed: boom" in caplog.text
    assert "p" not in k.runtime.stopping


def test_request_during_the_stop_does_not_start_a_second_stop():
    k = make_keeper(c("a", "a.test"), record=False)
    k.ops = FakeOps(delay=0.2)
    k.activity["a"] = Activity(last=0.0, running=True)

    async def go():
        k.check(TIMEOUT)
        first = k.runtime.stopping["a"]
        await asyncio.sleep(0.05)
        k.check(TIMEOUT + 1000)  # still stopping: no second stop
        assert k.runtime.stopping["a"] is first
        await first
        await asyncio.sleep(0)

    asyncio.run(go())
    assert [x[0] for x in k.ops.calls] == ["begin", "end"]


# --------------------------------------------------------------------------
# the idle-state file


def test_state_file_round_trip(tmp_path):
    k = make_keeper(c("a", "a.test"), c("b", "b.test"), tmp_path=tmp_path)
    k.activity["a"] = Activity(last=1234.5, running=True)
    k._loaded = {"b": 999.0, "gone": 5.0}  # a group that no longer exists is forgotten
    k._write(k._state())
    path = tmp_path / STATE_FILE
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert data["last_activity"] == {"a": 1234.5, "b": 999.0}
    assert (path.stat().st_mode & 0o777) == 0o600
    k2 = make_keeper(c("a", "a.test"), tmp_path=tmp_path)
    assert k2._load() == {"a": 1234.5, "b": 999.0}


def test_missing_state_file_is_empty_and_silent(tmp_path, caplog):
    k = make_keeper(c("a", "a.test"), tmp_path=tmp_path)
    with caplog.at_level(logging.WARNING):
        assert k._load() == {}
    assert caplog.text == ""


@pytest.mark.parametrize("content", [
    "{not json",
    "",
    "[1, 2]",
    '{"version": 1}',
    '{"last_activity": [1, 2]}',
    '{"last_activity": {"a": "yesterday"}}',
    '{"last_activity": {"a": null}}',
], ids=["syntax", "empty", "list", "no-clocks", "clocks-list", "clock-text", "clock-null"])
def test_corrupt_state_file_is_logged_and_ignored(tmp_path, caplog, content):
    (tmp_path / STATE_FILE).write_text(content)
    k = make_keeper(c("a", "a.test"), tmp_path=tmp_path)
    with caplog.at_level(logging.WARNING, logger="wakeproxy.wake.idle"):
        assert k._load() == {}
    assert "is corrupt" in caplog.text and "active now" in caplog.text


def test_garbage_bytes_state_file_is_logged_and_ignored(tmp_path, caplog):
    (tmp_path / STATE_FILE).write_bytes(b"\xff\xfe\x00\x81garbage\x80\x00")
    k = make_keeper(c("a", "a.test"), tmp_path=tmp_path)
    with caplog.at_level(logging.WARNING, logger="wakeproxy.wake.idle"):
        assert k._load() == {}
    assert "active now" in caplog.text


def test_unreadable_state_file_is_logged_and_ignored(tmp_path, caplog):
    (tmp_path / STATE_FILE).mkdir()  # reading a directory: IsADirectoryError (an OSError)
    k = make_keeper(c("a", "a.test"), tmp_path=tmp_path)
    with caplog.at_level(logging.WARNING, logger="wakeproxy.wake.idle"):
        assert k._load() == {}
    assert "cannot read" in caplog.text


def test_future_clocks_are_capped_at_now(tmp_path):
    now = time.time()
    (tmp_path / STATE_FILE).write_text(json.dumps(
        {"version": 1, "saved": now, "last_activity": {"future": now + 86400 * 365, "past": now - 50}}))
    k = make_keeper(c("future", "f.test"), c("past", "p.test"), tmp_path=tmp_path)
    loaded = k._load()
    assert loaded["past"] == now - 50
    assert now - 1 <= loaded["future"] <= time.time()
    future = loaded["future"]
    k._loaded = loaded
    k.check(time.time())
    assert k.slept == []
    # capped: the group from the future stops one timeout from now, not a year from now
    k.check(future + TIMEOUT)
    assert ("future", TIMEOUT) in k.slept


@pytest.mark.parametrize("clock", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_clock_counts_as_corrupt(tmp_path, caplog, clock):
    """json accepts NaN/Infinity; `now - nan < timeout` is False, so a NaN clock would stop the group at once."""
    (tmp_path / STATE_FILE).write_text(f'{{"version": 1, "last_activity": {{"a": {clock}, "b": 5.0}}}}')
    k = make_keeper(c("a", "a.test"), tmp_path=tmp_path)
    with caplog.at_level(logging.WARNING, logger="wakeproxy.wake.idle"):
        k._loaded = k._load()
    assert k._loaded == {}
    assert "is corrupt" in caplog.text
    k.check(time.time())
    assert k.slept == []


def test_done_saves_dirty_clocks(tmp_path):
    k = make_keeper(c("a", "a.test"), tmp_path=tmp_path)
    k.check(4321.0)
    assert k._dirty
    asyncio.run(k.done())
    assert json.loads((tmp_path / STATE_FILE).read_text())["last_activity"] == {"a": 4321.0}


def test_done_without_changes_writes_nothing(tmp_path):
    k = make_keeper(c("a", "a.test"), tmp_path=tmp_path)
    asyncio.run(k.done())
    assert not (tmp_path / STATE_FILE).exists()


def test_unwritable_state_dir_is_a_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    k = make_keeper(c("a", "a.test"), tmp_path=blocker / "sub")  # a file where a folder should be
    with caplog.at_level(logging.WARNING, logger="wakeproxy.wake.idle"):
        k._write(k._state())
    assert "cannot save the idle clocks" in caplog.text


def test_the_loop_saves_at_most_every_save_interval(tmp_path, monkeypatch):
    monkeypatch.setattr(idle_mod, "CHECK_INTERVAL", 0.01)
    monkeypatch.setattr(idle_mod, "SAVE_INTERVAL", 0.25)
    k = make_keeper(c("a", "a.test"), tmp_path=tmp_path)
    writes: list[float] = []
    k._write = lambda state: writes.append(time.monotonic())

    async def go():
        k.running()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.6:  # traffic all the time
            f = flow_for("a")
            k.requestheaders(f)
            k.error(f)
            await asyncio.sleep(0.005)
        await k.done()

    asyncio.run(go())
    # one save at once, then at most one per 0.25 s, plus the one on shutdown
    assert 2 <= len(writes) <= 5, writes
    gaps = [b - a for a, b in zip(writes, writes[1:-1])]
    assert all(g >= 0.24 for g in gaps), gaps


# --------------------------------------------------------------------------
# StatusServer.report()


def status_fixture():
    containers = (
        c("run", "run.test"),
        c("busy", "busy.test"),
        c("stopg", "stop.test"),
        c("wakeg", "wake.test", state="exited"),
        c("pausedg", "paused.test", state="paused"),
        c("asleep", "asleep.test", state="exited"),
        c("perm", "perm.test", labels={"io.docksal.permanent": "true"}),
        c("p-web", "web.test", project="proj"),
        c("p-db", None, project="proj"),
    )
    k = make_keeper(*containers)
    now = time.time()
    k.check(now)
    k.activity["run"].last = now - 20
    k.activity["busy"].inflight = 2
    k.activity["busy"].open = 1
    k.runtime.stopping["stopg"] = object()
    k.waker.waking.add("wakeg")
    extra = {"certificates": lambda: {"n": 1}, "broken": lambda: 1 / 0}
    return StatusServer(k.runtime, k.waker, k, extra), now


def test_status_report_states_and_clocks():
    server, now = status_fixture()
    report = server.report()
    assert report["synced"] is True
    assert report["containers"] == 9 and report["hosts"] == 8
    assert report["certificates"] == {"n": 1}
    assert "division" in report["broken"]["error"]
    groups = {g["group"]: g for g in report["groups"]}
    assert [g["group"] for g in report["groups"]] == sorted(groups)
    assert {n: g["state"] for n, g in groups.items()} == {
        "run": "running", "busy": "running", "stopg": "stopping", "wakeg": "waking", "pausedg": "paused",
        "asleep": "asleep", "perm": "running", "proj": "running"}
    run = groups["run"]
    assert run["hosts"] == ["run.test"]
    assert run["containers"] == [{"name": "run", "state": "running", "health": None}]
    assert (run["inflight"], run["open"], run["idle_timeout"]) == (0, 0, TIMEOUT)
    assert TIMEOUT - 21 <= run["stops_in"] <= TIMEOUT - 19
    assert run["last_activity"].endswith("+00:00")
    busy = groups["busy"]
    assert (busy["inflight"], busy["open"], busy["stops_in"]) == (2, 1, None)  # in use: no countdown
    assert groups["perm"]["idle_timeout"] == 0 and groups["perm"]["stops_in"] is None
    assert groups["stopg"]["stops_in"] is None
    for name in ("wakeg", "pausedg", "asleep"):  # never seen running: no clock
        assert groups[name]["last_activity"] is None and groups[name]["stops_in"] is None
    assert [m["name"] for m in groups["proj"]["containers"]] == ["p-db", "p-web"]
    assert groups["proj"]["hosts"] == ["web.test"]
    json.dumps(report)  # all of it is JSON


def test_status_countdown_never_negative():
    k = make_keeper(c("a", "a.test"))
    k.check(time.time() - 10 * TIMEOUT)
    groups = StatusServer(k.runtime, k.waker, k).groups()
    assert groups[0]["stops_in"] == 0.0


def test_status_endpoint_serves_the_report_over_http():
    k = make_keeper(c("a", "a.test"))
    k.check(time.time())

    async def go():
        server = StatusServer(k.runtime, k.waker, k)
        server.runtime.config = dataclasses.replace(
            k.runtime.config, status=StatusConfig(listen=Address("127.0.0.1", 0)))
        # port 0: ask the OS for one, then read it back from the server socket
        await server.running()
        port = server._server.sockets[0].getsockname()[1]
        try:
            async def get(path: str) -> tuple[bytes, bytes]:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                data = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                head, _, body = data.partition(b"\r\n\r\n")
                return head, body

            head, body = await get("/status")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert json.loads(body)["groups"][0]["group"] == "a"
            head, _ = await get("/nope")
            assert head.startswith(b"HTTP/1.1 404")
        finally:
            await server.done()

    asyncio.run(go())


# --------------------------------------------------------------------------
# retiring abandoned groups (idle.remove_after; Docksal's PROJECT_DANGLING_TIMEOUT)


def _net(info: ContainerInfo, *nets: str) -> ContainerInfo:
    return dataclasses.replace(info, networks={n: "" for n in nets})


def test_an_abandoned_group_is_removed_with_its_own_networks_only(tmp_path, caplog):
    made = -1e6  # long before the last use (a member's creation counts as use)
    old = [dataclasses.replace(_net(c("old-web", "old.test", state="exited", project="old"), "old_default", "shared"),
                               created=made),
           dataclasses.replace(_net(c("old-db", state="exited", project="old"), "old_default"), created=made)]
    other = _net(c("other", "other.test", state="exited", project="other"), "shared")
    keeper = make_keeper(*old, other, tmp_path=tmp_path, remove_after=3600.0)
    keeper.runtime.publish(build_snapshot([*old, other], SourcesConfig(), (), {"old_default": "bridge",
                                                                              "shared": "bridge"}))

    async def run():
        keeper.check(1000.0)  # first sight: a full remove_after from now
        assert keeper.removes_in(keeper.runtime.snapshot.groups["old"], 1000.0) == 3600.0
        keeper.used["old"] = 1000.0 - 3601  # unused for longer than remove_after
        with caplog.at_level(logging.INFO):
            keeper.check(1000.0)
            await asyncio.sleep(0.2)
    asyncio.run(run())
    removed = [(what, name, arg) for step, what, name, arg in keeper.ops.calls if step == "end"]
    assert ("rm", "old-web", False) in removed and ("rm", "old-db", False) in removed  # volumes kept
    assert ("network rm", "old_default", None) in removed
    assert all(name != "shared" for _, name, _ in removed)  # another group's container is on it
    assert all(name != "other" for _, name, _ in removed)
    assert "retire old: removed container(s) old-db, old-web; network(s) old_default; volumes kept" in caplog.text
    assert "old" not in keeper.runtime.stopping and keeper.retiring == set()


@pytest.mark.parametrize("case", ["permanent", "running", "recent", "off"])
def test_what_is_never_removed(tmp_path, case):
    labels = {"io.docksal.permanent": "true"} if case == "permanent" else None
    state = "running" if case == "running" else "exited"
    keeper = make_keeper(c("web", "web.test", state=state, project="p", labels=labels), tmp_path=tmp_path,
                         remove_after=0.0 if case == "off" else 3600.0)

    async def run():
        keeper.check(1000.0)
        keeper.used["p"] = 1000.0 - (10 if case == "recent" else 99999)
        keeper.check(1000.0)
        await asyncio.sleep(0.05)
    asyncio.run(run())
    assert not [call for call in keeper.ops.calls if call[1] in ("rm", "network rm")]
    # A running group is not abandoned: its clock counts from now (it is removed only after it stopped).
    expected = None if case in ("permanent", "off") else {"recent": 3590.0, "running": 3600.0}.get(case, 0.0)
    assert keeper.removes_in(keeper.runtime.snapshot.groups["p"], 1000.0) == expected


def test_the_last_use_survives_a_restart_and_a_never_used_group_counts_from_first_sight(tmp_path):
    k1 = make_keeper(c("web", "web.test", state="exited", project="p"), tmp_path=tmp_path, remove_after=3600.0)
    k1.check(1000.0)
    k1.used["p"] = 500.0
    k1._write(k1._state())
    k2 = make_keeper(c("web", "web.test", state="exited", project="p"), c("new", "new.test", state="exited"),
                     tmp_path=tmp_path, remove_after=3600.0)
    k2._loaded = k2._load()
    k2.check(2000.0)
    assert k2.used["p"] == pytest.approx(500.0, abs=1)  # a restart does not make it look used, nor abandoned
    assert k2.used["new"] == 2000.0


def test_status_shows_when_a_group_is_removed(tmp_path):
    keeper = make_keeper(c("web", "web.test", state="exited", project="p"), tmp_path=tmp_path, remove_after=7200.0)
    keeper.used["p"] = time.time() - 3600
    server = StatusServer(keeper.runtime, FakeWaker(), keeper)  # type: ignore[arg-type]
    report = server.report()
    g = next(g for g in report["groups"] if g["group"] == "p")
    assert 3500 < g["removed_in"] <= 3600
    assert report["counts"]["removed_within_a_day"] == 1


def test_a_group_the_names_policy_refuses_is_never_removed(tmp_path):
    """Only groups the proxy manages (routed, their names accepted) are ever retired."""
    from wakeproxy.config import NamesConfig
    from wakeproxy.routing.snapshot import Policy

    cfg = dataclasses.replace(config(tmp_path, remove_after=60.0), names=NamesConfig(allow=("*.ours.test",)))
    theirs = c("theirs", "x.elsewhere.test", state="exited", project="theirs")
    snapshot = build_snapshot([theirs], SourcesConfig(), (), {}, policy=Policy.from_config(cfg))
    assert snapshot.groups == {}  # refused by the names policy: not the proxy's to manage
    keeper = IdleKeeper(Runtime(config=cfg, snapshot=snapshot), FakeWaker())
    keeper.ops = FakeOps()

    async def run():
        keeper.check(1000.0)
        keeper.check(1000.0 + 10_000)
        await asyncio.sleep(0.05)
    asyncio.run(run())
    assert keeper.ops.calls == []


def _retire_p_now(keeper) -> None:
    """Group "p" seen, then unused since the epoch: its retirement runs (and gets 0.1 s to finish)."""
    async def run():
        keeper.check(1000.0)
        keeper.used["p"] = 0.0
        keeper.check(1000.0)
        await asyncio.sleep(0.1)
    asyncio.run(run())


def test_a_member_started_during_the_quiesce_keeps_the_group(tmp_path):
    web = _net(c("web", "web.test", state="exited", project="p"), "p_default")
    keeper = make_keeper(web, tmp_path=tmp_path, remove_after=60.0)
    keeper.runtime.publish(build_snapshot([web], SourcesConfig(), (), {"p_default": "bridge"}))

    async def quiesce(group: str) -> bool:  # meanwhile, its owner runs `docker compose start`
        started = dataclasses.replace(web, state="running", networks={"p_default": "10.9.0.2"})
        keeper.runtime.publish(build_snapshot([started], SourcesConfig(), (), {"p_default": "bridge"}))
        return True
    keeper.quiesce = quiesce

    _retire_p_now(keeper)
    assert not [call for call in keeper.ops.calls if call[1] in ("rm", "network rm")]
    assert keeper.used["p"] > 1000.0 - 1  # counted as used: a full remove_after again


def test_a_member_created_during_the_quiesce_keeps_the_group(tmp_path):
    """A CI job's `compose up` makes a new container (state created, not started yet) while the retire
    waits for the workers: asleep still, but new: nothing is removed."""
    web = _net(c("web", "web.test", state="exited", project="p"), "p_default")
    keeper = make_keeper(web, tmp_path=tmp_path, remove_after=60.0)
    keeper.runtime.publish(build_snapshot([web], SourcesConfig(), (), {"p_default": "bridge"}))

    async def quiesce(group: str) -> bool:
        made = _net(c("web2", "web.test", state="created", project="p"), "p_default")
        keeper.runtime.publish(build_snapshot([web, made], SourcesConfig(), (), {"p_default": "bridge"}))
        return True
    keeper.quiesce = quiesce

    _retire_p_now(keeper)
    assert not [call for call in keeper.ops.calls if call[1] in ("rm", "network rm")]
    assert keeper.used["p"] > 1000.0 - 1


def test_a_container_made_during_the_removals_keeps_its_network(tmp_path):
    """A CI job's `compose up` creates a container while the retire's `docker rm` calls run: created, not
    started, so Docker would let its network be removed (and its start would fail). The network stays."""
    web = _net(c("web", "web.test", state="exited", project="p"), "p_default")
    keeper = make_keeper(web, tmp_path=tmp_path, remove_after=60.0)
    keeper.runtime.publish(build_snapshot([web], SourcesConfig(), (), {"p_default": "bridge"}))
    remove = keeper.ops.remove

    async def remove_while_made(cid, name, volumes):
        await remove(cid, name, volumes)
        made = _net(c("job-web", "job.test", state="created", project="q"), "p_default")
        keeper.runtime.publish(build_snapshot([made], SourcesConfig(), (), {"p_default": "bridge"}))
    keeper.ops.remove = remove_while_made

    _retire_p_now(keeper)
    assert [call[1:3] for call in keeper.ops.calls if call[0] == "end"] == [("rm", "web")]  # no network rm


def test_only_the_projects_own_networks_are_removed(tmp_path):
    """An empty `external:` network, or one the operator made, stays: only networks labelled with the
    group's Compose project are removed."""
    web = _net(c("web", "web.test", state="exited", project="p"), "p_default", "operatornet", "q_default")
    keeper = make_keeper(web, tmp_path=tmp_path, remove_after=60.0)
    keeper.runtime.publish(build_snapshot([web], SourcesConfig(), (), {"p_default": "bridge"}))

    _retire_p_now(keeper)
    removed = [name for step, what, name, _ in keeper.ops.calls if step == "end" and what == "network rm"]
    assert removed == ["p_default"]


def test_permanent_sleeps_puts_a_permanent_group_to_sleep_and_never_removes_it(tmp_path):
    from wakeproxy.routing.snapshot import Policy

    containers = (c("web", "web.test", project="p", labels={"io.docksal.permanent": "true"}),
                  c("other", "other.test", project="o"))
    # Default (issue 4): permanent means never put to sleep.
    k = make_keeper(*containers, tmp_path=tmp_path, remove_after=3600.0)
    now = time.time()
    k.check(now)
    k.check(now + 1e6)
    assert k.slept == [("o", 1e6)]
    # idle.permanent_sleeps (Docksal's meaning): it sleeps like any other, and is never removed.
    k = make_keeper(*containers, tmp_path=tmp_path, remove_after=3600.0, permanent_sleeps=True)
    k.runtime.snapshot = build_snapshot(containers, SourcesConfig(), (), {}, policy=Policy(permanent_sleeps=True))
    k.check(now)
    k.check(now + 1e6)
    assert sorted(k.slept) == [("o", 1e6), ("p", 1e6)]
    groups = k.runtime.snapshot.groups
    assert groups["p"].permanent and not groups["o"].permanent
    assert k.removes_in(groups["p"], now) is None and k.removes_in(groups["o"], now) is not None


def test_remove_label_limits_retiring_to_the_groups_it_marks(tmp_path):
    docksal = {"io.docksal.project-root": "/projects/a"}
    k = make_keeper(c("a-web", "a.test", state="exited", project="a", labels=docksal),
                    c("a-db", None, state="exited", project="a"),
                    c("lone", "lone.test", state="exited"),
                    tmp_path=tmp_path, remove_after=3600.0, remove_label="io.docksal.project-root")
    groups = k.runtime.snapshot.groups
    assert k.removes_in(groups["a"], 1000.0) is not None  # one member carries it: the whole project
    assert k.removes_in(groups["lone"], 1000.0) is None


def test_clocks_belong_to_groups_not_names(tmp_path):
    """A tenant's Compose project named like an operator's lone container takes the bare name (and its clock)
    while it exists; when it goes, the container's group gets the name back with a fresh clock, not the
    project's stale one (it was removed as abandoned seconds after its last use)."""
    lone = c("landing", "landing.test", state="exited")
    k = make_keeper(lone, tmp_path=tmp_path, remove_after=3600.0)
    k.check(1000.0)
    assert k.runtime.snapshot.groups["landing"].gid == "container:landing"
    squatter = c("squat", "squat.test", state="exited", project="landing")
    k.runtime.snapshot = snap(lone, squatter)
    assert k.runtime.snapshot.groups["landing"].gid == "compose:landing"
    k.check(2000.0)
    assert k.used["landing"] == 2000.0  # the name means another group now: afresh
    k.used["landing"] = -1e9  # the project's clock goes stale
    k.runtime.snapshot = snap(lone)
    k.check(3000.0)
    assert k.used["landing"] == 3000.0
    assert k.removes_in(k.runtime.snapshot.groups["landing"], 3000.0) == 3600.0


def test_names_that_are_gone_are_forgotten_saved_ones_too(tmp_path):
    k = make_keeper(c("a", "a.test", state="exited"), tmp_path=tmp_path, remove_after=3600.0)
    k._loaded_used = {"a": 10.0, "gone": 10.0}
    k._loaded_identity = {"a": "container:a", "gone": "container:gone"}
    k.check(1000.0)
    assert k.used == {"a": 10.0}  # the same group as saved: its saved clock
    assert "gone" not in k._loaded_used and "gone" not in k._loaded_identity
    # A group made later under a forgotten name is new: a whole remove_after from first sight.
    k.runtime.snapshot = snap(c("a", "a.test", state="exited"), c("gone", "gone.test", state="exited"))
    k.check(2000.0)
    assert k.used["gone"] == 2000.0
    # A saved clock of another group under the same name is not taken over.
    k2 = make_keeper(c("b", "b.test", state="exited", project="b"), tmp_path=tmp_path, remove_after=3600.0)
    k2._loaded_used, k2._loaded_identity = {"b": 10.0}, {"b": "container:b"}
    k2.check(1000.0)
    assert k2.used["b"] == 1000.0


def test_the_identity_is_saved_with_the_clocks(tmp_path):
    k = make_keeper(c("a", "a.test", state="exited", project="p"), tmp_path=tmp_path, remove_after=3600.0)
    k.check(1000.0)
    k._write(k._state())
    k2 = make_keeper(c("a", "a.test", state="exited", project="p"), tmp_path=tmp_path, remove_after=3600.0)
    k2._loaded = k2._load()
    assert k2._loaded_identity == {"p": "compose:p"} and k2._loaded_used == {"p": pytest.approx(1000.0, abs=1)}


def test_a_permanent_label_is_the_operators_to_honour(tmp_path):
    from wakeproxy.config import LabelTrustConfig
    from wakeproxy.routing.snapshot import Policy

    perm = c("web", "web.test", state="exited", project="p", labels={"io.docksal.permanent": "true"})
    k = make_keeper(perm, tmp_path=tmp_path, remove_after=3600.0)
    k.runtime.snapshot = build_snapshot((perm,), SourcesConfig(), (), {},
                                        policy=Policy(trust=LabelTrustConfig(keep_awake=False), idle_timeout=60.0))
    group = k.runtime.snapshot.groups["p"]
    # labels.keep_awake: false: labels that keep a sandbox's resources are capped, this one too
    assert group.idle_timeout is None and not group.permanent  # the config's timeout applies
    assert k.removes_in(group, 1000.0) is not None
    k.runtime.snapshot = build_snapshot((perm,), SourcesConfig(), (), {}, policy=Policy(idle_timeout=60.0))
    assert k.removes_in(k.runtime.snapshot.groups["p"], 1000.0) is None  # honoured (the default)


def test_status_counts_permanent_apart_from_never_put_to_sleep(tmp_path):
    keeper = make_keeper(c("perm", "perm.test", project="p", labels={"io.docksal.permanent": "true"}),
                         c("zero", "zero.test", project="z", labels={"wakeproxy.idle-timeout": "0"}),
                         c("plain", "plain.test", project="n"), tmp_path=tmp_path)
    keeper.check(time.time())
    report = StatusServer(keeper.runtime, FakeWaker(), keeper).report()  # type: ignore[arg-type]
    by = {g["group"]: g for g in report["groups"]}
    assert (by["p"]["permanent"], by["z"]["permanent"], by["n"]["permanent"]) == (True, False, False)
    assert (report["counts"]["permanent"], report["counts"]["never_sleeps"]) == (1, 2)


def test_time_the_proxy_was_away_does_not_count_as_unused(tmp_path):
    """A proxy down for three days (or a host switched off) comes back: a group last used eight days ago
    has been unused for five days of the proxy's life, not eight, so idle.remove_after 7d does not remove
    every sleeping sandbox at once on start."""
    day = 86400.0
    now = time.time()
    (tmp_path / STATE_FILE).write_text(json.dumps({"version": 1, "saved": now - 3 * day, "last_activity": {},
                                                   "last_used": {"p": now - 8 * day}}))
    k = make_keeper(c("web", "web.test", state="exited", project="p"), tmp_path=tmp_path, remove_after=7 * day)
    k._loaded = k._load()
    k.check(now)
    assert k.used["p"] == pytest.approx(now - 5 * day, abs=5)
    assert k.removes_in(k.runtime.snapshot.groups["p"], now) == pytest.approx(2 * day, abs=5)


def test_a_container_just_made_counts_as_use(tmp_path):
    """A CI job's `docker compose up` recreates an old sandbox's containers: between create and start they
    are 'created', and the group must not be removed as abandoned with them."""
    k = make_keeper(c("web", "web.test", state="exited", project="p"), tmp_path=tmp_path, remove_after=3600.0)
    k.check(1000.0)
    k.used["p"] = -1e6  # long unused
    fresh = dataclasses.replace(c("web2", "web.test", state="created", project="p"), created=990.0)
    k.runtime.snapshot = snap(c("web", "web.test", state="exited", project="p"), fresh)
    k.check(1000.0)
    assert k.used["p"] == 990.0
    assert k.removes_in(k.runtime.snapshot.groups["p"], 1000.0) == 3590.0
