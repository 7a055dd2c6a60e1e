"""Idle stop/pause against the real Docker engine and the real proxy process.

Isolation: a proxy with a short idle timeout puts EVERY group it manages to sleep, i.e. every routed
container on a network in its `docker.networks`.  So this module creates its own bridge network
(`<prefix>-idle-net`), every proxy here is told to use only that network (and its own status port),
and only this module's containers are attached to it.  Containers are function-scoped (each test sees
only its own); nothing is shared between tests.

Docker's event log is the witness of when a container actually stopped (`die`), paused or was started
again; the proxy's log and its status endpoint tell what the proxy decided.  The measured delays
(stop after the idle timeout ran out) are printed; run with `-s` (or `-rP`) to see them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from harness import REPO, ContainerFactory, backend_of, free_port, proxied, remove_network, wait_for
from websockets.sync.client import connect as ws_connect

WAKEPROXY = REPO / ".venv" / "bin" / "wakeproxy"
MEASURED: list[str] = []  # "what: delay" lines, printed again at the end of the module


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def idle_net(docker_client, run_id):
    """This module's own bridge network: the only one its proxies manage."""
    net = docker_client.networks.create(f"{run_id}-idle-net", driver="bridge")
    yield net.name
    remove_network(net)
    if MEASURED:
        print("\n=== idle stop delays measured in test_idle.py ===\n" + "\n".join(MEASURED))


@pytest.fixture
def mk(docker_client, run_id, pyback_image, busybox_image, idle_net):
    """Containers of one test, on `idle_net`, removed at the end of the test."""
    factory = ContainerFactory(docker_client, run_id, pyback_image, busybox_image, idle_net)
    yield factory
    factory.cleanup()


@pytest.fixture
def idle_proxy(proxy, idle_net):
    """idle_proxy({"timeout": "2s", …}, state_dir=None) → a proxy that manages only `idle_net`."""

    def start(idle: dict, state_dir: Path | None = None, **overrides):
        cfg = {
            "docker": {"networks": [idle_net]},
            "status": {"listen": f"127.0.0.1:{free_port()}"},
            "idle": {"stop_timeout": "1s", **idle},
            **overrides,
        }
        if state_dir is not None:
            cfg["state_dir"] = str(state_dir)
        return proxy(cfg)

    return start


# --------------------------------------------------------------------------
# helpers


def record(line: str) -> None:
    MEASURED.append(line)
    print(line)


def make_all(jobs: dict) -> dict:
    """Create containers in parallel: {name: callable} → {name: container}."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: fut.result() for name, fut in futures.items()}


def pyback(mk, name: str, host: str, env: dict | None = None, **labels):
    """A Python backend that exits at once on SIGTERM; no keep-awake label unless given."""
    return lambda: mk(name, labels={"wakeproxy.host": host, **labels}, env=env, keep_awake=False)


def slow_stopper(mk, name: str, host: str, **labels):
    """busybox httpd as PID 1: ignores SIGTERM, so `docker stop -t N` takes N seconds."""
    return lambda: mk(
        name, image=mk.busybox, keep_awake=False,
        command=["sh", "-c", f"mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 80 -h /www"],
        labels={"wakeproxy.host": host, "wakeproxy.port": "80", **labels})


def state(c) -> dict:
    c.reload()
    return c.attrs["State"]


def is_stopped(c) -> bool:
    return state(c)["Status"] in ("exited", "dead")


def events(client, c, since: float, action: str | None = None, until: float | None = None) -> list[dict]:
    """Docker's recorded events of container `c` in [since, until], oldest first."""
    until = time.time() + 0.05 if until is None else until
    filters = {"type": "container", "container": c.id}
    if action:
        filters["event"] = action
    stream = client.events(decode=True, since=f"{since:.6f}", until=f"{until:.6f}", filters=filters)
    try:
        return list(stream)
    finally:
        stream.close()


def event_time(e: dict) -> float:
    return e["timeNano"] / 1e9


def die_time(client, c, since: float) -> float:
    """When `c` died (the first `die` since `since`), by Docker's clock (= this host's)."""
    dies = wait_for(lambda: events(client, c, since, "die"), 5, 0.1, f"a die event of {c.name}")
    return event_time(dies[0])


def get(p, host: str, path: str = "/", **kw) -> tuple[httpx.Response, float]:
    """One request through the proxy; (response, time.time() when it was complete)."""
    r = proxied(p, host, path, **kw)
    return r, time.time()


def status(p) -> dict[str, dict]:
    """The proxy's status endpoint: group → its entry."""
    r = httpx.get(f"http://127.0.0.1:{p.status_port}/status", timeout=5, trust_env=False)
    r.raise_for_status()
    return {g["group"]: g for g in r.json()["groups"]}


def cli_status(p, as_json: bool = False):
    """`wakeproxy status --config CFG [--json]`, as a user runs it."""
    cmd = [str(WAKEPROXY), "status", "--config", str(p.config_path)] + (["--json"] if as_json else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    assert out.returncode == 0, f"{cmd}: {out.returncode}\n{out.stdout}\n{out.stderr}"
    if as_json:
        return {g["group"]: g for g in json.loads(out.stdout)["groups"]}
    return out.stdout


def cli_row(text: str, group: str) -> list[str]:
    rows = [ln.split() for ln in text.splitlines() if ln.split()[:1] == [group]]
    assert len(rows) == 1, f"no single row for {group} in:\n{text}"
    return rows[0]


def idle_lines(p, group: str) -> list[str]:
    return [ln for ln in p.log().splitlines() if f"idle {group}:" in ln]


def stays_up(containers: list, until: float, interval: float = 0.2) -> None:
    """Assert every container stays running (not paused) until time.time() >= until."""
    while True:
        for c in containers:
            st = state(c)
            assert st["Running"] and not st["Paused"], f"{c.name} went to sleep at {time.time():.2f}: {st}"
        if time.time() >= until:
            return
        time.sleep(interval)


def measure_stop(client, c, p, what: str, since_activity: float, timeout: float, wait: float = 6.0,
                 slack: float = 0.25) -> float:
    """Wait for `c` to stop; check it did not stop before `since_activity + timeout` (less `slack`: the
    client's clock of the last activity may be a little later than the proxy's) nor much later; return
    the delay after the timeout ran out (and record it, with the proxy's own idea of the idle time)."""
    wait_for(lambda: is_stopped(c), timeout + wait, 0.1, f"{c.name} to be stopped by the idle keeper")
    died = die_time(client, c, since_activity - 1)
    delay = died - (since_activity + timeout)
    decided = [ln for ln in idle_lines(p, c.name) if "no activity for" in ln]
    stopped = [ln for ln in idle_lines(p, c.name) if "stopped in" in ln]
    record(f"{what}: timeout {timeout:g} s, stopped {delay:+.2f} s after it ran out "
           f"(proxy: {decided[-1].split(': ', 1)[-1] if decided else '?'}; "
           f"{stopped[-1].split(': ', 1)[-1] if stopped else '?'})")
    assert delay >= -slack, f"{c.name} stopped {-delay:.2f} s BEFORE its idle timeout ran out"
    assert delay <= 3.0, f"{c.name} stopped {delay:.2f} s after its idle timeout ran out"
    return delay


# --------------------------------------------------------------------------
# 1. a quiet group stops in time (config timeout, and a label's own timeout)


def test_quiet_group_stops_in_time(mk, idle_proxy, docker_client, host):
    cs = make_all({
        "quiet": pyback(mk, "idle-quiet", host("idle-quiet")),
        "label": pyback(mk, "idle-label", host("idle-label"), **{"wakeproxy.idle-timeout": "4s"}),
    })
    p = idle_proxy({"timeout": "2s"})
    since = time.time()
    r, t_quiet = get(p, host("idle-quiet"))
    assert backend_of(r) == "idle-quiet"
    r, t_label = get(p, host("idle-label"))
    assert backend_of(r) == "idle-label"

    d1 = measure_stop(docker_client, cs["quiet"], p, "quiet group (config 2s)", t_quiet, 2.0)
    assert state(cs["label"])["Running"], "the group with its own 4s label stopped at the config's 2s"
    d2 = measure_stop(docker_client, cs["label"], p, "quiet group (label 4s)", t_label, 4.0)
    for d in (d1, d2):
        # The contract is timeout + 5 s; typical is well under 1 s (printed above for the record).
        assert d <= 5.0, f"stopped {d:.2f} s after the timeout (the contract: within 5 s)"
    for c, timeout in ((cs["quiet"], 2.0), (cs["label"], 4.0)):  # the decision: within ~0.5 s (one check)
        line = next(ln for ln in idle_lines(p, c.name) if "no activity for" in ln)
        idle_for = float(line.split("no activity for ")[1].split(" s")[0])
        assert timeout <= idle_for <= timeout + 5.0, line
    for c in cs.values():  # stopped, not paused, by one `docker stop` each, and never started again
        ev = [e["Action"] for e in events(docker_client, c, since)]
        assert "pause" not in ev and "start" not in ev, ev
        assert "stop" in ev, ev


# --------------------------------------------------------------------------
# 2. an open WebSocket keeps its group up


def test_open_websocket_keeps_group_up_until_closed(mk, idle_proxy, docker_client, host):
    c = make_all({"ws": pyback(mk, "idle-ws", host("idle-ws"))})["ws"]
    timeout = 2.0
    p = idle_proxy({"timeout": "2s"})
    sock = socket.create_connection(("127.0.0.1", p.http_port), timeout=10)
    with ws_connect(f"ws://{host('idle-ws')}/ws", sock=sock, ping_interval=None, proxy=None,
                    open_timeout=10, close_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        t_msg = time.time()
        g = wait_for(lambda: (g := status(p)[c.name])["open"] == 1 and g, 3, 0.1, "open == 1 in the status")
        assert g["stops_in"] is None  # in use: no countdown
        stays_up([c], t_msg + 2.5 * timeout)  # nothing sent for 2.5 × the timeout
        ws.send("still there")
        assert ws.recv(timeout=10) == "still there"
    t_close = time.time()
    wait_for(lambda: status(p)[c.name]["open"] == 0, 3, 0.05, "open == 0 after the close")
    record(f"websocket: group stayed up {t_close - t_msg:.1f} s with the socket open (timeout {timeout:g} s)")
    measure_stop(docker_client, c, p, "websocket closed", t_close, timeout)


# --------------------------------------------------------------------------
# 3. an open streamed response (a long download read slowly) keeps its group up


DL_SIZE = 64 * 1024 * 1024  # far more than all the socket buffers between client and backend
HOLD = 4.5  # seconds of slow reading; the idle timeout is 2 s


def slow_download(p, host_: str, abort: bool, out: dict) -> None:
    """Read ~640 KB/s for HOLD seconds; then either read the rest fast (normal end) or hang up."""
    try:
        with httpx.Client(timeout=30, trust_env=False) as client, \
                client.stream("GET", f"{p.http_url}/download?size={DL_SIZE}", headers={"Host": host_}) as r:
            out["status"] = r.status_code
            t0 = time.time()
            got = 0
            it = r.iter_raw(64 * 1024)
            for chunk in it:
                got += len(chunk)
                if time.time() - t0 >= HOLD:
                    break
                time.sleep(0.1)
            out["slow_bytes"] = got
            if not abort:
                for chunk in it:
                    got += len(chunk)
            out["bytes"] = got
        out["end"] = time.time()
    except Exception as e:  # noqa: BLE001 - reported by the test
        out["error"] = repr(e)
        out["end"] = time.time()


def test_streaming_response_keeps_group_up_until_it_ends(mk, idle_proxy, docker_client, host):
    cs = make_all({
        "dl": pyback(mk, "idle-dl", host("idle-dl")),
        "abort": pyback(mk, "idle-dlabort", host("idle-dlabort")),
    })
    timeout = 2.0
    p = idle_proxy({"timeout": "2s"})
    results = {"dl": {}, "abort": {}}
    threads = [threading.Thread(target=slow_download, args=(p, host("idle-dl"), False, results["dl"])),
               threading.Thread(target=slow_download, args=(p, host("idle-dlabort"), True, results["abort"]))]
    t_start = time.time()
    for t in threads:
        t.start()
    try:
        def both_in_flight():
            s = status(p)
            return all(s[c.name]["inflight"] == 1 and s[c.name]["stops_in"] is None for c in cs.values())
        wait_for(both_in_flight, 5, 0.1, "both downloads in flight in the proxy's status")
        stays_up(list(cs.values()), t_start + HOLD - 0.3)
    finally:
        for t in threads:
            t.join(60)
    for res in results.values():
        assert "error" not in res, res
        assert res["status"] == 200, res
    assert results["dl"]["bytes"] == DL_SIZE, results["dl"]
    assert results["abort"]["bytes"] < DL_SIZE / 2, results["abort"]  # hung up early, mid-stream
    record(f"streamed download: group stayed up {results['dl']['end'] - t_start:.1f} s while it was open")
    # the proxy's clock stops when the backend's last byte went out, a moment before the client has read
    # what the sockets still hold; hence the slack
    measure_stop(docker_client, cs["dl"], p, "download ended normally", results["dl"]["end"], timeout, slack=1.0)
    measure_stop(docker_client, cs["abort"], p, "download aborted by the client", results["abort"]["end"], timeout)


# --------------------------------------------------------------------------
# 4. permanent groups are never stopped


def test_permanent_groups_are_never_stopped(mk, idle_proxy, docker_client, host):
    cs = make_all({
        "docksal": pyback(mk, "idle-permanent", host("idle-permanent"), **{"io.docksal.permanent": "true"}),
        "zero": pyback(mk, "idle-zero", host("idle-zero"), **{"wakeproxy.idle-timeout": "0"}),
        "control": pyback(mk, "idle-control", host("idle-control")),
    })
    timeout = 2.0
    p = idle_proxy({"timeout": "2s"})
    since = time.time()
    for c in cs.values():
        assert backend_of(proxied(p, host(c.name.split("-", 2)[-1]))) == c.name.split("-", 2)[-1]
    t_last = time.time()
    s = status(p)
    for name in ("docksal", "zero"):
        assert s[cs[name].name]["idle_timeout"] == 0 and s[cs[name].name]["stops_in"] is None, s[cs[name].name]
    # meanwhile: the control group (same proxy, no label) does stop, so the keeper is working; and
    # `wakeproxy status` (slow to start) says "never"
    control = threading.Thread(target=lambda: wait_for(lambda: is_stopped(cs["control"]), 8, 0.1, "control"))
    control.start()
    cli: dict = {}
    cli_thread = threading.Thread(target=lambda: cli.update(text=cli_status(p)))
    cli_thread.start()
    stays_up([cs["docksal"], cs["zero"]], t_last + 2.5 * timeout)
    cli_thread.join(30)
    for name in ("docksal", "zero"):
        assert cli_row(cli["text"], cs[name].name)[-1] == "never", cli["text"]
    control.join(10)
    assert is_stopped(cs["control"]), "the control group was never stopped: the observation proves nothing"
    for name in ("docksal", "zero"):
        ev = [e["Action"] for e in events(docker_client, cs[name], since)]
        assert not {"kill", "stop", "die", "pause"} & set(ev), (name, ev)
        assert idle_lines(p, cs[name].name) == []
    record(f"permanent groups: still up {time.time() - t_last:.1f} s after their last request (config timeout 2 s)")


# --------------------------------------------------------------------------
# 5. pause mode


def test_pause_mode_pauses_and_the_next_request_unpauses(mk, idle_proxy, docker_client, host):
    c = make_all({"p": pyback(mk, "idle-pause", host("idle-pause"), **{"wakeproxy.idle-action": "pause"})})["p"]
    p = idle_proxy({"timeout": "2s", "action": "stop"})  # the label wins over the config
    since = time.time()
    r, t_last = get(p, host("idle-pause"))
    assert backend_of(r) == "idle-pause"
    wait_for(lambda: state(c)["Paused"], 2 + 4, 0.1, f"{c.name} to be paused")
    paused = [e for e in events(docker_client, c, since) if e["Action"] == "pause"]
    assert len(paused) == 1
    record(f"pause: paused {event_time(paused[0]) - (t_last + 2):+.2f} s after the 2 s timeout ran out")
    st = state(c)
    assert st["Running"] and st["Paused"] and st["Status"] == "paused", st
    wait_for(lambda: status(p)[c.name]["state"] == "paused", 2, 0.05, "state paused (the pause event seen)")
    assert cli_status(p, as_json=True)[c.name]["state"] == "paused"

    t0 = time.monotonic()
    r = proxied(p, host("idle-pause"), "/after-pause", headers={"Accept": "application/json"})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert backend_of(r) == "idle-pause" and r.json()["path"] == "/after-pause"
    st = state(c)
    assert st["Running"] and not st["Paused"], st
    ev = [e["Action"] for e in events(docker_client, c, since)]
    assert ev.count("unpause") == 1 and "start" not in ev and "die" not in ev, ev
    record(f"pause: the next request was answered 200 after {elapsed:.2f} s (unpause)")


# --------------------------------------------------------------------------
# 6. a request that lands during a (slow) stop waits and is answered after a re-wake


def test_request_during_a_stop_is_answered_after_a_rewake(mk, idle_proxy, docker_client, host):
    c = make_all({"s": slow_stopper(mk, "idle-slowstop", host("idle-slowstop"))})["s"]
    p = idle_proxy({"timeout": "2s", "stop_timeout": "3s"})
    since = time.time()
    r = wait_for(lambda: (r := proxied(p, host("idle-slowstop"))).status_code == 200 and r, 5, 0.1, "httpd up")
    assert r.text.strip() == "idle-slowstop"
    wait_for(lambda: status(p)[c.name]["state"] == "stopping", 2 + 3, 0.05, "state stopping")
    t_send = time.time()
    assert state(c)["Running"], "the container is already down: the request would not land during the stop"
    assert any("no activity for" in ln for ln in idle_lines(p, c.name)), p.log()
    t0 = time.monotonic()
    r = proxied(p, host("idle-slowstop"), "/", timeout=30, headers={"Accept": "*/*"})
    elapsed = time.monotonic() - t0
    t_answer = time.time()
    assert r.status_code == 200, f"{r.status_code}: {r.text[:500]}"
    assert r.text.strip() == "idle-slowstop"
    ev = events(docker_client, c, since)
    acts = [e["Action"] for e in ev]
    die = [event_time(e) for e in ev if e["Action"] == "die"]
    start = [event_time(e) for e in ev if e["Action"] == "start" and event_time(e) > t_send]
    assert len(die) == 1 and len(start) == 1, acts
    assert t_send < die[0] < start[0] < t_answer, (t_send, die, start, t_answer)
    # docker stop waited for its timeout: SIGTERM was ignored, SIGKILL after 3 s
    kills = [e for e in ev if e["Action"] == "kill"]
    assert [k["Actor"]["Attributes"].get("signal") for k in kills] == ["15", "9"], kills
    log = p.log()
    # the wake (created by the request) waited for the stop to finish before it started anything
    assert log.index(f"idle {c.name}: stopped in") < log.index(f"wake {c.name}: ready"), log
    record(f"request during a stop: answered 200 after {elapsed:.2f} s "
           f"(stop finished {die[0] - t_send:.2f} s after it was sent, restarted {start[0] - die[0]:.2f} s later)")


# --------------------------------------------------------------------------
# 7. a proxy restart keeps the idle clocks


def test_restart_keeps_the_idle_clocks(mk, idle_proxy, docker_client, host, tmp_path):
    c = make_all({"r": pyback(mk, "idle-restart", host("idle-restart"))})["r"]
    timeout = 8.0
    shared = tmp_path / "shared-state"
    p1 = idle_proxy({"timeout": "8s"}, state_dir=shared)
    state_file = shared / "idle-state.json"

    # Traffic for 2 s, watching the state file: written at most once (it is saved every 10 s at most)
    versions = set()
    t_end = time.time() + 2.0
    while time.time() < t_end:
        r, t_last = get(p1, host("idle-restart"))
        assert backend_of(r) == "idle-restart"
        for _ in range(5):
            try:
                st = state_file.stat()
                versions.add((st.st_ino, st.st_mtime_ns))
            except FileNotFoundError:
                pass
            time.sleep(0.02)
    assert len(versions) <= 1, f"the state file was rewritten {len(versions)} times in 2 s of traffic"

    p1.stop()  # SIGTERM: the clocks are saved on shutdown
    saved = json.loads(state_file.read_text())["last_activity"]
    assert abs(saved[c.name] - t_last) < 0.5, (saved, t_last)
    assert state(c)["Running"]

    wait_for(lambda: time.time() >= t_last + 2.5, 5, 0.05)  # restart + timeout must be well after T + timeout
    p2 = idle_proxy({"timeout": "8s"}, state_dir=shared)
    t_ready = time.time()
    assert t_ready < t_last + timeout - 1, f"the restart took {t_ready - t_last:.1f} s: too slow to tell"
    delay = measure_stop(docker_client, c, p2, "after a proxy restart (clock from the state file)", t_last, timeout)
    died = t_last + timeout + delay
    record(f"restart: traffic at T, restart ready at T+{t_ready - t_last:.1f} s, stopped at T+{died - t_last:.1f} s "
           f"(restart + timeout would be T+{t_ready - t_last + timeout:.1f} s)")
    assert delay <= 5.0
    assert died < t_ready + timeout - 1.5, "the clock restarted with the proxy"


def test_group_started_after_a_restart_gets_a_full_timeout(mk, idle_proxy, docker_client, host, tmp_path):
    c = make_all({"s": pyback(mk, "idle-later", host("idle-later"))})["s"]
    shared = tmp_path / "shared-state"
    p1 = idle_proxy({"timeout": "2s"}, state_dir=shared)
    assert backend_of(proxied(p1, host("idle-later"))) == "idle-later"
    wait_for(lambda: is_stopped(c), 2 + 5, 0.1, "first idle stop")
    wait_for(lambda: any("stopped in" in ln for ln in idle_lines(p1, c.name)), 5, 0.05, "the stop to be done")
    p1.stop()
    slept_at = json.loads((shared / "idle-state.json").read_text())["last_activity"][c.name]
    p2 = idle_proxy({"timeout": "2s"}, state_dir=shared)
    wait_for(lambda: time.time() > slept_at + 2.5, 5, 0.1)
    c.start()  # `docker start` by someone else, no request through the proxy
    t_start = time.time()
    wait_for(lambda: state(c)["Running"], 5, 0.05)
    try:
        stays_up([c], t_start + 2.0 - 0.3, 0.1)  # a full timeout from when it is seen running
    finally:
        print("\n".join(idle_lines(p2, c.name)))


# --------------------------------------------------------------------------
# 8. a corrupt state file is survived


@pytest.mark.parametrize("content", [
    pytest.param(b"{\"last_activity\": {\"x\": 1.0,,,\n garbage", id="bad-json"),
    pytest.param(b"\xff\xfe\x00\x81 garbage \x80\x00\xc3\x28", id="garbage-bytes"),
])
def test_corrupt_state_file_is_survived(mk, idle_proxy, docker_client, host, tmp_path, content):
    c = make_all({"c": pyback(mk, "idle-corrupt", host("idle-corrupt"))})["c"]
    state_dir = tmp_path / "corrupt-state"
    state_dir.mkdir()
    (state_dir / "idle-state.json").write_bytes(content)
    t_launch = time.time()
    p = idle_proxy({"timeout": "3s"}, state_dir=state_dir)
    t_ready = time.time()
    warnings = [ln for ln in p.log().splitlines() if "idle-state.json" in ln]
    assert any("active now" in ln for ln in warnings), p.log()
    assert "Traceback" not in p.log(), p.log()
    wait_for(lambda: is_stopped(c), 3 + 4, 0.1, f"{c.name} to be stopped after a full timeout")
    died = die_time(docker_client, c, t_launch)
    record(f"corrupt state file ({content[:12]!r}…): stopped {died - t_launch:.2f} s after the proxy was launched, "
           f"{died - t_ready:.2f} s after it was ready (timeout 3 s)")
    assert died >= t_launch + 3.0 - 0.1, "stopped before a full timeout: the group did not count as active"
    assert died <= t_ready + 3.0 + 2.0
    # the proxy replaced the garbage with a valid file
    p.stop()
    data = json.loads((state_dir / "idle-state.json").read_text())
    assert c.name in data["last_activity"], data


# --------------------------------------------------------------------------
# 9. `wakeproxy status`


def test_wakeproxy_status_shows_the_states(mk, idle_proxy, docker_client, host):
    """`wakeproxy status` starts slowly (it imports mitmproxy: 2-5 s on a busy machine), so every
    transient state it must show lasts far longer than that: a 10 s docker stop (ended early by a
    `docker kill` once seen), a 7 s wake."""
    cs = make_all({
        "run": pyback(mk, "idle-st-run", host("idle-st-run"), **{"wakeproxy.idle-timeout": "60s"}),
        "stop": slow_stopper(mk, "idle-st-stop", host("idle-st-stop")),
        "asleep": pyback(mk, "idle-st-asleep", host("idle-st-asleep")),
        "pause": pyback(mk, "idle-st-pause", host("idle-st-pause"), **{"wakeproxy.idle-action": "pause"}),
        "wake": lambda: mk("idle-st-wake", labels={"wakeproxy.host": host("idle-st-wake")},
                           env={"SLEEP_BEFORE_LISTEN": "7"}, keep_awake=False, start=False),
    })
    names = {k: c.name for k, c in cs.items()}
    H = {k: host(c.name.split("-", 2)[-1]) for k, c in cs.items()}
    p = idle_proxy({"timeout": "2s", "stop_timeout": "10s"})
    g = status(p)[names["wake"]]  # before any request: a never-started group is asleep, no clock
    assert g["state"] == "asleep" and g["last_activity"] is None, g

    for k in ("run", "stop", "asleep", "pause"):
        wait_for(lambda k=k: proxied(p, H[k]).status_code == 200, 5, 0.1, k)
    out = {}
    waker = threading.Thread(target=lambda: out.update(r=proxied(p, H["wake"], timeout=40)))
    waker.start()
    try:
        # running (with a countdown) and waking; first from the endpoint (fast), then through the CLI
        seen: list[dict] = []

        def counting_down() -> bool:
            seen.append(status(p))
            return 40 < (seen[-1][names["run"]]["stops_in"] or 0) <= 60
        try:
            wait_for(counting_down, 5, 0.1, "a countdown")
        except AssertionError:
            raise AssertionError(f"no countdown for {names['run']}: {json.dumps(seen[-1:], indent=1)}") from None
        js = cli_status(p, as_json=True)
        g = js[names["run"]]
        assert g["state"] == "running" and g["idle_timeout"] == 60 and 40 < (g["stops_in"] or 0) <= 60, \
            json.dumps(js, indent=1)  # a string: pytest shows it whole
        assert (g["inflight"], g["open"]) == (0, 0) and g["last_activity"] is not None, g
        assert g["hosts"] == [H["run"]] and g["containers"] == [
            {"name": names["run"], "state": "running", "health": None}], g
        assert js[names["wake"]]["state"] == "waking", js[names["wake"]]
        assert js[names["wake"]]["inflight"] == 0  # a held request is not in flight to the backend yet

        # stopping (the httpd ignores SIGTERM: a 10 s docker stop), asleep, paused: the plain-text table
        wait_for(lambda: status(p)[names["stop"]]["state"] == "stopping", 5, 0.05, "stopping")
        wait_for(lambda: state(cs["pause"])["Paused"] and is_stopped(cs["asleep"]), 5, 0.05, "paused, stopped")
        wait_for(lambda: status(p)[names["asleep"]]["state"] == "asleep", 2, 0.05, "asleep")
        text = cli_status(p)
        assert text.splitlines()[0].startswith("docker: connected to "), text  # the engine first
        # Then Docksal's `proxyctl stats` counts: 5 projects, "wake" waking, none without a timeout.
        counts = text.splitlines()[1]
        assert counts.startswith("projects: 5 (") and "1 stopping" in counts and "1 asleep" in counts \
            and "1 paused" in counts and counts.endswith("; 0 never put to sleep; 0 permanent (io.docksal.permanent)"), text
        assert text.splitlines()[2].split() == ["GROUP", "STATE", "HOSTS", "CONTAINERS", "IN", "FLIGHT", "OPEN",
                                                "LAST", "ACTIVITY", "STOPS", "IN"], text
        row = cli_row(text, names["stop"])
        assert row[1:4] == ["stopping", H["stop"], f"{names['stop']}:running"], text
        row = cli_row(text, names["asleep"])
        assert row[1:4] == ["asleep", H["asleep"], f"{names['asleep']}:exited"], text
        assert row[-1] == "-", text  # no countdown while asleep
        row = cli_row(text, names["pause"])
        assert row[1:4] == ["paused", H["pause"], f"{names['pause']}:paused"], text
        assert row[-1] == "-", text
        row = cli_row(text, names["run"])
        assert row[1] == "running" and row[-1].endswith("s") and row[-1] != "never", text
        assert state(cs["stop"])["Running"]
    finally:
        cs["stop"].kill()  # cut the 10 s stop short
        waker.join(40)

    # after the stop: asleep; the woken group answered and counts down from its request
    assert out["r"].status_code == 200 and backend_of(out["r"]) == "idle-st-wake", out
    # 7 s of waking with a 2 s idle timeout: a group mid-wake is never put to sleep
    log = p.log()
    assert f"idle {names['wake']}:" not in log[:log.index(f"wake {names['wake']}: ready")], log
    wait_for(lambda: status(p)[names["stop"]]["state"] == "asleep", 5, 0.05, "asleep after the stop")
    g = status(p)[names["wake"]]
    assert g["state"] in ("running", "stopping", "asleep") and g["last_activity"] is not None, g


def test_wakeproxy_status_without_a_proxy_fails_cleanly(tmp_path):
    cfg = tmp_path / "wp.yaml"
    cfg.write_text(f"status:\n  listen: \"127.0.0.1:{free_port()}\"\n")
    out = subprocess.run([str(WAKEPROXY), "status", "--config", str(cfg)], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 1
    assert "cannot read" in out.stderr and "Is the proxy running" in out.stderr
