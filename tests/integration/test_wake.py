"""On-demand wake, against the real Docker engine and the real proxy process.

All sleeping containers of this module are prepared at once (in parallel) by
the `sleepers` fixture, before any proxy starts, so every proxy reads them in
its first listing and no test races the proxy's event stream.  Each test uses
its own containers (its own wake group).  Tests that need another `wake:`
config start their own proxy; the rest share `wp` (auto strategy, 60 s
timeout, retry_after 5 s, UptimeRobot ignored).

Docker's own event log is the witness for what the proxy did: `start`,
`unpause` and `health_status` events are read back for a time window and for
the test's container ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import docker.errors
import httpx
import pytest
from harness import backend_of, proxied, wait_for

NAV = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
       "Upgrade-Insecure-Requests": "1",
       "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36"}
JSON = {"Accept": "application/json"}
BOT_UA = "Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)"


# --------------------------------------------------------------------------
# helpers


def docker_events(client, since: float, until: float | None = None, **filters) -> list[dict]:
    """Docker's recorded container events in [since, until] (sub-second precision), oldest first."""
    until = time.time() if until is None else until
    stream = client.events(decode=True, since=f"{since:.6f}", until=f"{until:.6f}",
                           filters={"type": "container", **filters})
    try:
        return list(stream)
    finally:
        stream.close()


def actions(events: list[dict], action: str) -> list[dict]:
    return [e for e in events if e.get("Action") == action]


def starts(client, container, since: float) -> list[dict]:
    return docker_events(client, since, container=container.id, event="start")


def state_of(container) -> str:
    container.reload()
    return container.attrs["State"]["Status"]


def timed(fn, *args, **kwargs) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = fn(*args, **kwargs)
    return r, time.monotonic() - t0


def wake_lines(proxy, group: str) -> list[str]:
    return [ln for ln in proxy.log().splitlines() if f"wake {group}:" in ln]


def assert_wake_logged(proxy, group: str, phases=("starting", "ready (", "first response (")) -> None:
    """The wake's log lines are there (and printed, for the timings)."""
    def all_there():
        lines = "\n".join(wake_lines(proxy, group))
        return all(f"wake {group}: {ph}" in lines for ph in phases)
    wait_for(all_there, 3, 0.05, f"wake log lines {phases} of {group}")
    for ln in wake_lines(proxy, group):
        print(ln)


# --------------------------------------------------------------------------
# the sleeping containers of this module

HEALTH_CGI = """#!/bin/sh
if [ -f /tmp/ok ]; then
  printf 'Status: 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\nhealthy\\n'
else
  printf 'Status: 503 Service Unavailable\\r\\nContent-Type: text/plain\\r\\n\\r\\nnot yet\\n'
fi
"""

APP_CGI = """#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
if [ -f /tmp/ok ]; then echo "app: health was ok"; else echo "app: health was NOT ok"; fi
"""


def make_cgi_www(directory: Path) -> Path:
    """/www for busybox httpd: /cgi-bin/health answers 503 until /tmp/ok exists, /cgi-bin/app says which."""
    www = directory / "www"
    (www / "cgi-bin").mkdir(parents=True)
    (www / "index.html").write_text("<html><body>index</body></html>\n")
    for name, text in (("health", HEALTH_CGI), ("app", APP_CGI)):
        f = www / "cgi-bin" / name
        f.write_text(text)
        f.chmod(0o755)
    for d in (directory, www, www / "cgi-bin"):
        d.chmod(0o755)
    return www


@pytest.fixture(scope="module")
def sleepers(module_containers, busybox_image, host, run_id, tmp_path_factory):
    """name → container, each put to sleep (created / exited / paused) as its test needs."""
    mk = module_containers
    bb = busybox_image
    H = host
    www = make_cgi_www(tmp_path_factory.mktemp("cgi"))
    project = f"{run_id}-proj"

    def created(name, env=None, **kw):
        return lambda: mk(name, labels={"wakeproxy.host": H(name), **kw.pop("labels", {})}, env=env,
                          start=False, **kw)

    def exited(name, env=None, **kw):
        def make():
            c = mk(name, labels={"wakeproxy.host": H(name), **kw.pop("labels", {})}, env=env, **kw)
            c.stop(timeout=5)
            return c
        return make

    def paused(name):
        def make():
            c = mk(name, labels={"wakeproxy.host": H(name)})
            # The cgroup freezer can fail transiently ("unable to freeze") while the container's
            # process is mid-syscall on a loaded machine: retry a few times.
            for attempt in range(5):
                try:
                    c.pause()
                    break
                except docker.errors.APIError:
                    if attempt == 4:
                        raise
                    time.sleep(0.3)
            return c
        return make

    def busybox(name, command, **labels):
        return lambda: mk(name, image=bb, command=command, start=False,
                          labels={"wakeproxy.host": H(name), "wakeproxy.port": "80", **labels})

    def compose_pair():
        db = mk("w-db", image=bb,
                command=["sh", "-c", "rm -f /tmp/ok; mkdir -p /tmp; sleep 1; touch /tmp/ok; exec sleep 3600"],
                labels={"com.docker.compose.project": project, "com.docker.compose.service": "db"},
                healthcheck={"test": ["CMD", "sh", "-c", "test -f /tmp/ok"], "interval": 200_000_000,
                             "timeout": 1_000_000_000, "retries": 3,
                             "start_period": 10_000_000_000},  # failures before /tmp/ok do not count
                start=False)
        web = mk("w-web", labels={"wakeproxy.host": H("w-web"), "com.docker.compose.project": project,
                                  "com.docker.compose.service": "web",
                                  "com.docker.compose.depends_on": "db:service_healthy:false"})
        db.start()
        db.kill()
        web.stop(timeout=5)
        return {"w-db": db, "w-web": web}

    def compose_oneshot():
        labels = {"com.docker.compose.project": f"{project}2"}
        mig = mk("w-mig", image=bb, command=["sh", "-c", "sleep 0.5; exit 0"], start=False,
                 labels={**labels, "com.docker.compose.service": "migrate"})
        cache = mk("w-cache", image=bb, command=["sleep", "3600"], start=False,
                   labels={**labels, "com.docker.compose.service": "cache"})
        web2 = mk("w-web2", start=False, labels={
            **labels, "wakeproxy.host": H("w-web2"), "com.docker.compose.service": "web",
            "com.docker.compose.depends_on": "migrate:service_completed_successfully:false,"
                                             "cache:service_started:false"})
        return {"w-mig": mig, "w-cache": cache, "w-web2": web2}

    def own_group():
        # wakeproxy.group splits the Compose project: g1 and g2 wake together, g3 (project only) does not.
        g = {"wakeproxy.group": f"{run_id}-grp", "com.docker.compose.project": f"{project}3"}
        return {
            "w-g1": mk("w-g1", start=False, labels={**g, "wakeproxy.host": H("w-g1")}),
            "w-g2": mk("w-g2", image=bb, command=["sleep", "3600"], start=False, labels=g),
            "w-g3": mk("w-g3", image=bb, command=["sleep", "3600"], start=False,
                       labels={"com.docker.compose.project": f"{project}3"}),
        }

    slow = {"SLEEP_BEFORE_LISTEN": "2"}
    half = {"SLEEP_BEFORE_LISTEN": "0.5"}
    jobs: dict[str, Callable] = {
        "w-created": created("w-created"),
        "w-exited": exited("w-exited"),
        "w-paused": paused("w-paused"),
        "w-slow": created("w-slow", slow),
        "w-slow2": created("w-slow2", slow),
        "w-many": created("w-many", {"SLEEP_BEFORE_LISTEN": "1"}),
        "w-post-small": exited("w-post-small", half),
        "w-post-big": created("w-post-big", half),
        "compose": compose_pair,
        "compose2": compose_oneshot,
        "group": own_group,
        "w-h2": created("w-h2"),
        "w-crash": busybox("w-crash", ["sh", "-c", "exit 3"]),
        "w-deaf": busybox("w-deaf", ["sleep", "3600"]),
        "w-lbltimeout": busybox("w-lbltimeout", ["sleep", "3600"], **{"wakeproxy.wake-timeout": "1s"}),
        "w-ready": lambda: mk(
            "w-ready", image=bb,
            command=["sh", "-c", "rm -f /tmp/ok; mkdir -p /tmp; (sleep 2; touch /tmp/ok) & "
                                 "exec httpd -f -p 80 -h /www"],
            labels={"wakeproxy.host": H("w-ready"), "wakeproxy.port": "80",
                    "wakeproxy.ready-path": "/cgi-bin/health"},
            volumes={str(www): {"bind": "/www", "mode": "ro"}}, start=False),
        "w-bot": exited("w-bot"),
        "w-known": exited("w-known"),
        "w-page": exited("w-page", {"SLEEP_BEFORE_LISTEN": "1"}),
        "w-waitbug": created("w-waitbug", slow),
        "w-api": created("w-api", half),
        "w-cors": created("w-cors", half),
        "w-nav": created("w-nav", half),
        "w-holdlbl": exited("w-holdlbl", half, labels={"wakeproxy.wake-strategy": "hold"}),
    }
    out: dict = {}
    with ThreadPoolExecutor(8) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        for name, fut in futures.items():
            c = fut.result()
            out.update(c if isinstance(c, dict) else {name: c})
    for name, c in out.items():
        st = state_of(c)
        want = {"w-paused": "paused"}.get(name, ("created", "exited"))
        assert st in want, f"{name} is {st}, want {want}"
    yield SimpleNamespace(c=out, H=H, project=project)
    # Remove in parallel (the factory's own cleanup then finds nothing left).
    def remove(c):
        try:
            c.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(remove, out.values()))


@pytest.fixture(scope="module")
def wp(sleepers, module_proxy):
    """The shared proxy: strategy auto, timeout 60 s, retry_after 5 s, UptimeRobot ignored."""
    return module_proxy({"wake": {"retry_after": "5s", "ignore_user_agents": ["UptimeRobot"]}})


@pytest.fixture(scope="module")
def page_proxy(sleepers, module_proxy):
    """A proxy with `wake: {strategy: page}`."""
    return module_proxy({"wake": {"strategy": "page"}})


# --------------------------------------------------------------------------
# 1-3: whatever the sleeping state, a plain GET is held and answered


@pytest.mark.parametrize("name", ["w-created", "w-exited"])
def test_sleeping_container_is_woken_and_answers(sleepers, wp, docker_client, name):
    c = sleepers.c[name]
    since = time.time()
    r, elapsed = timed(proxied, wp, sleepers.H(name), "/hello?x=1")
    assert r.status_code == 200, r.text
    assert backend_of(r) == name
    assert r.json()["path"] == "/hello?x=1"
    assert state_of(c) == "running"
    assert len(starts(docker_client, c, since)) == 1
    assert_wake_logged(wp, c.name)
    print(f"{name}: answered after {elapsed:.2f}s")


def test_held_over_https_and_http2(sleepers, wp):
    r = proxied(wp, sleepers.H("w-h2"), "/over-h2", https=True, http2=True, timeout=15)
    assert r.status_code == 200, r.text
    assert r.http_version == "HTTP/2"
    assert backend_of(r) == "w-h2"
    assert r.json()["headers"]["x-forwarded-proto"] == "https"


def test_wakeproxy_group_label_wakes_its_members_only(sleepers, wp, docker_client, run_id):
    g1, g2, g3 = sleepers.c["w-g1"], sleepers.c["w-g2"], sleepers.c["w-g3"]
    r = proxied(wp, sleepers.H("w-g1"), timeout=15)
    assert r.status_code == 200 and backend_of(r) == "w-g1", r.text
    assert state_of(g1) == "running" and state_of(g2) == "running"
    assert state_of(g3) == "created"
    assert_wake_logged(wp, f"{sleepers.project}3/{run_id}-grp")


def test_paused_container_is_unpaused(sleepers, wp, docker_client):
    c = sleepers.c["w-paused"]
    since = time.time()
    r = proxied(wp, sleepers.H("w-paused"))
    assert r.status_code == 200, r.text
    assert backend_of(r) == "w-paused"
    assert state_of(c) == "running"
    ev = docker_events(docker_client, since, container=c.id)
    assert len(actions(ev, "unpause")) == 1, ev
    assert actions(ev, "start") == [], ev
    assert_wake_logged(wp, c.name)


# --------------------------------------------------------------------------
# 4-6: holding


def test_slow_starter_is_held_not_502(sleepers, wp):
    c = sleepers.c["w-slow"]
    r, elapsed = timed(proxied, wp, sleepers.H("w-slow"), timeout=15)
    assert r.status_code == 200, r.text
    assert backend_of(r) == "w-slow"
    assert elapsed >= 1.9, f"answered after {elapsed:.2f}s: not held through the 2 s sleep"
    assert b"sleeping 2" in c.logs()
    assert "Bad Gateway" not in "\n".join(wake_lines(wp, c.name))
    assert_wake_logged(wp, c.name)


def test_requests_arriving_mid_wake_join_it_not_502(sleepers, wp, docker_client):
    """Requests that come while the container already runs but does not listen yet are held too."""
    c = sleepers.c["w-slow2"]
    h = sleepers.H("w-slow2")
    since = time.time()

    def late(delay: float):
        time.sleep(delay)
        return timed(proxied, wp, h, timeout=15)

    # The first request starts the wake; later ones arrive while the app still sleeps 2 s.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(late, [0, 0.4, 1.0, 1.6]))
    got = [(r.status_code, round(t, 2), r.text[:300]) for r, t in results]
    assert [r.status_code for r, _ in results] == [200] * 4, got
    assert all(backend_of(r) == "w-slow2" for r, _ in results)
    assert len(starts(docker_client, c, since)) == 1


def test_concurrent_requests_share_one_wake(sleepers, wp, docker_client):
    n = 200
    c = sleepers.c["w-many"]
    h = sleepers.H("w-many")
    since = time.time()

    async def all_at_once():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:
            async def one(i: int):
                return await client.get(f"{wp.http_url}/n/{i}", headers={"Host": h})
            return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)

    t0 = time.monotonic()
    results = asyncio.run(all_at_once())
    took = time.monotonic() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    bad = [(r.status_code, r.text[:200]) for r in results if r.status_code != 200]
    assert not bad, f"{len(bad)} of {n} not 200: {bad[:3]}"
    assert sorted(r.json()["path"] for r in results) == sorted(f"/n/{i}" for i in range(n))
    assert len(starts(docker_client, c, since)) == 1
    assert len([ln for ln in wake_lines(wp, c.name) if ": starting" in ln]) == 1, wake_lines(wp, c.name)
    assert c.logs().decode().count("REQ GET /n/") == n
    assert_wake_logged(wp, c.name)
    print(f"{n} concurrent requests answered in {took:.2f}s")


@pytest.mark.parametrize("name,size", [("w-post-small", 100 * 1024), ("w-post-big", 3 * 1024 * 1024)],
                         ids=["100KB", "3MB-streamed"])
def test_post_body_and_headers_arrive_intact_after_wake(sleepers, wp, name, size):
    c = sleepers.c[name]
    h = sleepers.H(name)
    body = os.urandom(size)
    custom = {"X-Custom-Thing": "keep me", "Content-Type": "application/octet-stream",
              "Authorization": "Bearer t0k"}

    def upload():
        return proxied(wp, h, "/upload", method="POST", content=body, headers=custom, timeout=20)

    def echo():
        return proxied(wp, h, "/echo?q=1", method="PUT", content=b"small body", headers=custom, timeout=20)

    # Both are held by the same wake.
    with ThreadPoolExecutor(2) as pool:
        fu, fe = pool.submit(upload), pool.submit(echo)
        ru, re_ = fu.result(), fe.result()
    assert ru.status_code == 200, ru.text
    assert ru.json()["size"] == size
    assert ru.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert re_.status_code == 200, re_.text
    e = re_.json()
    assert e["method"] == "PUT" and e["path"] == "/echo?q=1"
    assert e["headers"]["x-custom-thing"] == "keep me"
    assert e["headers"]["authorization"] == "Bearer t0k"
    assert e["headers"]["content-type"] == "application/octet-stream"
    assert e["headers"]["content-length"] == "10"
    assert e["headers"]["host"] == h
    logs = c.logs().decode()
    assert logs.count("REQ POST /upload") == 1 and logs.count("REQ PUT /echo?q=1") == 1, logs
    assert len([ln for ln in wake_lines(wp, c.name) if ": starting" in ln]) == 1


# --------------------------------------------------------------------------
# 7: Compose group, depends_on service_healthy


def test_compose_group_starts_in_depends_on_order(sleepers, wp, docker_client):
    db, web = sleepers.c["w-db"], sleepers.c["w-web"]
    since = time.time()
    r, elapsed = timed(proxied, wp, sleepers.H("w-web"), timeout=20)
    assert r.status_code == 200, r.text
    assert backend_of(r) == "w-web"
    ev = docker_events(docker_client, since, container=[db.id, web.id])
    db_start = [e for e in actions(ev, "start") if e["id"] == db.id]
    web_start = [e for e in actions(ev, "start") if e["id"] == web.id]
    db_healthy = [e for e in ev if e["id"] == db.id and e["Action"] == "health_status: healthy"]
    assert len(db_start) == 1 and len(web_start) == 1, ev
    assert db_healthy, f"db never reported healthy: {[e['Action'] for e in ev]}"
    t = {k: v[0]["timeNano"] / 1e9 for k, v in
         (("db start", db_start), ("db healthy", db_healthy), ("web start", web_start))}
    print("compose wake:", {k: round(v - since, 3) for k, v in t.items()}, f"answered after {elapsed:.2f}s")
    assert t["db start"] < t["db healthy"] <= t["web start"], t
    assert t["db healthy"] - t["db start"] >= 0.9, t  # its health check really needed ~1 s
    assert docker_client.api.inspect_container(db.id)["State"]["Health"]["Status"] == "healthy"
    assert_wake_logged(wp, sleepers.project)
    db.kill()  # stop its health checks (exec events every 200 ms) for the rest of the module


def test_compose_group_waits_for_one_shot_and_started_dependencies(sleepers, wp, docker_client):
    """depends_on `migrate:service_completed_successfully` and `cache:service_started`."""
    mig, cache, web = sleepers.c["w-mig"], sleepers.c["w-cache"], sleepers.c["w-web2"]
    since = time.time()
    r = proxied(wp, sleepers.H("w-web2"), timeout=20)
    assert r.status_code == 200, r.text
    assert backend_of(r) == "w-web2"
    ev = docker_events(docker_client, since, container=[mig.id, cache.id, web.id])

    def when(cid, action):
        found = [e["timeNano"] / 1e9 for e in ev if e["id"] == cid and e["Action"] == action]
        assert len(found) == 1, (cid[:12], action, [(e["id"][:12], e["Action"]) for e in ev])
        return found[0]
    mig_die = [e for e in ev if e["id"] == mig.id and e["Action"] == "die"]
    assert mig_die and mig_die[0]["Actor"]["Attributes"].get("exitCode") == "0", mig_die
    t = {"migrate start": when(mig.id, "start"), "migrate exit 0": when(mig.id, "die"),
         "cache start": when(cache.id, "start"), "web start": when(web.id, "start")}
    print("one-shot compose wake:", {k: round(v - since, 3) for k, v in t.items()})
    assert t["migrate start"] < t["migrate exit 0"] <= t["web start"], t
    assert t["cache start"] <= t["web start"], t
    assert state_of(mig) == "exited" and state_of(cache) == "running"
    assert_wake_logged(wp, f"{sleepers.project}2")


# --------------------------------------------------------------------------
# 8-9: failures


def test_container_that_exits_gets_502_and_cool_down(sleepers, wp, docker_client):
    c = sleepers.c["w-crash"]
    h = sleepers.H("w-crash")
    since = time.time()
    r, elapsed = timed(proxied, wp, h, timeout=20)
    failed_at = time.monotonic()
    assert r.status_code == 502, r.text
    assert elapsed < 5, f"502 after {elapsed:.2f}s: not at once"
    assert c.name in r.text and re.search(r"\b3\b", r.text), r.text
    assert len(starts(docker_client, c, since)) == 1

    # Within retry_after (5 s): 502 again, at once, and Docker is left alone.
    since2 = time.time()
    for hd in ({}, NAV):
        r2, elapsed2 = timed(proxied, wp, h, headers=hd)
        assert r2.status_code == 502, r2.text
        assert elapsed2 < 0.5, elapsed2
        assert c.name in r2.text and re.search(r"\b3\b", r2.text), r2.text
    w = proxied(wp, h, "/__wakeproxy/wait", headers=JSON)  # the waking page's long poll
    assert w.status_code == 200 and w.json()["state"] == "failed", w.text
    assert c.name in w.json().get("message", ""), w.json()
    time.sleep(0.3)
    assert docker_events(docker_client, since2, container=c.id) == []

    # After the cool-down the next request tries again: exactly one more start.
    time.sleep(max(0.0, failed_at + 5.2 - time.monotonic()))
    since3 = time.time()
    r3 = proxied(wp, h, timeout=20)
    assert r3.status_code == 502, r3.text
    assert len(starts(docker_client, c, since3)) == 1
    assert len(starts(docker_client, c, since)) == 2


def test_wake_timeout_504_names_what_is_missing(sleepers, proxy):
    c = sleepers.c["w-deaf"]
    p = proxy({"wake": {"timeout": "2s"}})
    r, elapsed = timed(proxied, p, sleepers.H("w-deaf"), timeout=15)
    assert r.status_code == 504, r.text
    assert 1.8 <= elapsed < 4.5, elapsed
    assert "not yet accepting connections on port 80" in r.text, r.text
    assert c.name in r.text, r.text
    assert state_of(c) == "running"


def test_label_wake_timeout(sleepers, wp):
    """wakeproxy.wake-timeout=1s beats the config's 60 s."""
    c = sleepers.c["w-lbltimeout"]
    r, elapsed = timed(proxied, wp, sleepers.H("w-lbltimeout"), timeout=15)
    assert r.status_code == 504, r.text
    assert 0.8 <= elapsed < 3.5, elapsed
    # Within 1 s it may still be starting (docker start alone can take that long), or not listening.
    assert re.search(rf"not ready after 1 s\. Still missing: {re.escape(c.name)}: "
                     r"(starting|running, not yet accepting connections on port 80)", r.text), r.text


# --------------------------------------------------------------------------
# 10-11: requests that must not wake anything


def test_ignored_user_agent_does_not_wake(sleepers, wp, docker_client):
    c = sleepers.c["w-bot"]
    h = sleepers.H("w-bot")
    since = time.time()
    for hd in ({}, NAV):
        r = proxied(wp, h, headers={**hd, "User-Agent": BOT_UA})
        assert r.status_code == 503, r.text
        assert r.headers.get("retry-after", "").isdigit(), r.headers
    time.sleep(0.5)
    assert state_of(c) == "exited"
    assert docker_events(docker_client, since, container=c.id) == []
    assert wake_lines(wp, c.name) == []
    # Any other client still wakes it: only the bot is exempt.
    r = proxied(wp, h, headers={"User-Agent": "curl/8.0"})
    assert r.status_code == 200, r.text


def test_unknown_host_never_touches_docker(sleepers, wp, docker_client, run_id):
    c = sleepers.c["w-known"]
    h = sleepers.H("w-known")
    since = time.time()
    for unknown in (sleepers.H("w-nobody"), f"sub.{h}", "localhost", "127.0.0.1"):
        for hd in ({}, NAV):
            r = proxied(wp, unknown, headers=hd)
            assert r.status_code == 404, (unknown, r.status_code, r.text)
    time.sleep(0.3)
    ev = docker_events(docker_client, since)
    mine = [e for e in ev if e.get("id") == c.id]
    woken = [e for e in ev if e.get("Action") in ("start", "unpause", "restart")
             and e.get("Actor", {}).get("Attributes", {}).get("name", "").startswith(run_id)]
    assert mine == [] and woken == [], (mine, woken)
    assert state_of(c) == "exited"
    assert wake_lines(wp, c.name) == []


# --------------------------------------------------------------------------
# 12-13: strategies, the waking page and its long poll, per-group labels


def wait_until_not_waking(proxy, h: str, rounds: int = 4) -> list[dict]:
    """Long-poll /__wakeproxy/wait like the waking page does; the states seen."""
    states = []
    for _ in range(rounds):
        w = proxied(proxy, h, "/__wakeproxy/wait", headers=JSON, timeout=30)
        assert w.status_code == 200, w.text
        assert w.headers["content-type"].startswith("application/json")
        states.append(w.json())
        if w.json()["state"] != "waking":
            break
    return states


def test_page_strategy_and_wait_endpoint(sleepers, page_proxy):
    c = sleepers.c["w-page"]
    h = sleepers.H("w-page")
    r, elapsed = timed(proxied, page_proxy, h, headers=NAV)
    assert r.status_code == 503, r.text
    assert elapsed < 1, f"the waking page took {elapsed:.2f}s"
    assert r.headers["x-wakeproxy"] == "waking"
    assert r.headers["retry-after"].isdigit()
    assert "no-store" in r.headers["cache-control"]
    assert r.headers["content-type"].startswith("text/html")
    assert "Waking up" in r.text and "/__wakeproxy/wait" in r.text
    # The page started the wake; its long poll says when the app is up.
    states = wait_until_not_waking(page_proxy, h)
    assert states[-1]["state"] == "ready", states
    r = proxied(page_proxy, h, headers=NAV)
    assert r.status_code == 200 and backend_of(r) == "w-page", r.text
    assert_wake_logged(page_proxy, c.name, ("starting", "ready ("))


def test_wait_endpoint_says_ready_only_when_the_app_answers(sleepers, page_proxy):
    """A long poll that arrives while the container runs but its app does not listen yet."""
    c = sleepers.c["w-waitbug"]
    h = sleepers.H("w-waitbug")
    r = proxied(page_proxy, h, headers=NAV)
    assert r.status_code == 503 and r.headers["x-wakeproxy"] == "waking", r.text
    wait_for(lambda: state_of(c) == "running", 5, 0.05, "container to run")
    time.sleep(0.3)  # the proxy has seen the `start` event by now
    assert b"listening on" not in c.logs()  # still in its 2 s sleep
    states = wait_until_not_waking(page_proxy, h)
    assert states[-1]["state"] == "ready", states
    r = proxied(page_proxy, h, headers=NAV)  # what the page's reload does
    assert r.status_code == 200 and backend_of(r) == "w-waitbug", (states, r.status_code, r.text[:500])


def test_auto_strategy_holds_non_navigations(sleepers, wp):
    H = sleepers.H
    with ThreadPoolExecutor(3) as pool:
        api = pool.submit(proxied, wp, H("w-api"), headers=JSON, timeout=15)  # an API call
        cors = pool.submit(proxied, wp, H("w-cors"), headers={**NAV, "Sec-Fetch-Mode": "cors"},
                           timeout=15)  # fetch() from a page: not a navigation
        nav = pool.submit(proxied, wp, H("w-nav"), headers={**NAV, "Sec-Fetch-Mode": "navigate"})
        api, cors, nav = api.result(), cors.result(), nav.result()
    assert api.status_code == 200 and backend_of(api) == "w-api", api.text
    assert cors.status_code == 200 and backend_of(cors) == "w-cors", cors.text
    assert nav.status_code == 503 and nav.headers["x-wakeproxy"] == "waking", nav.text
    assert "Waking up" in nav.text


def test_label_wake_strategy_hold_holds_navigations(sleepers, page_proxy):
    """wakeproxy.wake-strategy=hold beats the config's `page`."""
    r = proxied(page_proxy, sleepers.H("w-holdlbl"), headers=NAV)
    assert r.status_code == 200, r.text
    assert backend_of(r) == "w-holdlbl"


def test_label_ready_path_waits_for_health(sleepers, wp):
    """httpd listens at once, but its ready-path /cgi-bin/health answers 503 for the first 2 s."""
    c = sleepers.c["w-ready"]
    h = sleepers.H("w-ready")
    r, elapsed = timed(proxied, wp, h, "/cgi-bin/app", timeout=15)
    assert r.status_code == 200, r.text
    assert r.text.strip() == "app: health was ok", r.text
    assert elapsed >= 1.9, elapsed
    assert state_of(c) == "running"
    r = proxied(wp, h, "/cgi-bin/health")
    assert r.status_code == 200 and r.text.strip() == "healthy", r.text
    assert_wake_logged(wp, c.name)
