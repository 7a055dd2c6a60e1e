"""Which Docker Engine API endpoints the proxy calls: what a Docker socket proxy in front of it (one that
filters by endpoint) must let through.

The proxy runs as users run it (its image, bridge mode, joining the sandboxes' networks by itself), but its
/var/run/docker.sock is a recording relay to the real socket: every HTTP request on every connection
(keep-alive included) is parsed on its way to the engine and kept as `METHOD /path` with the API version
prefix stripped and IDs and names made `{id}`. The test then drives every kind of call the controller
makes: listing and inspecting, the event stream, joining and leaving a sandbox's network, pausing and
unpausing one sandbox, stopping and starting another, waking one whose network Docksal's stop removed
(the network made again, the container connected), and checks the calls against ALLOWED.

Other test sessions may run proxies on the same engine at the same time (test_container.py's see every
network). So the two sandboxes that go to sleep carry no `wakeproxy.idle-timeout` label: the 2 s timeout is
this proxy's `idle.timeout`, which no other proxy has, and this proxy may use only this test's networks
(`docker.networks`), so it puts nobody else's containers to sleep either.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from container_harness import RecordedProxyContainer
from harness import Relay, backend_of, free_port, remove_network, traversable, wait_for

# The endpoints the proxy may call, with what it calls each one for. The README's "Docker socket proxy"
# list comes from here: a socket proxy in front of wakeproxy must allow these (and may refuse the rest).
ALLOWED: dict[str, str] = {
    # The Docker SDK's API version negotiation, once per client it makes (unversioned path).
    "GET /version": "API version negotiation by the Docker SDK (docker.from_env / DockerClient)",
    # The view: the event stream first, then a full listing, then an inspect per new container.
    "GET /events": "the container and network event stream (filters type=container,network)",
    "GET /containers/json": "listing every container (all=1) at start and after every reconnect",
    "GET /containers/{id}/json": "inspecting a container: labels, networks, state; and its own container",
    "GET /networks": "listing the networks for their drivers (only bridge-like networks are joined)",
    "GET /info": "the engine's Swarm role, once per connection (not called with docker.swarm: off)",
    # The network joiner (bridge mode): join a running site's network, leave it when nothing runs there.
    "POST /networks/{id}/connect": "joining the network of a running site",
    "POST /networks/{id}/disconnect": "leaving a network no running site needs any more",
    # The waker and the idle keeper: the only calls that change a container.
    "POST /containers/{id}/start": "waking a stopped site",
    "POST /containers/{id}/unpause": "waking a paused site",
    "POST /containers/{id}/stop": "putting an idle site to sleep (wakeproxy.idle-action: stop, the default)",
    "POST /containers/{id}/pause": "putting an idle site to sleep (wakeproxy.idle-action: pause)",
    # A wake of a Compose project whose `<project>_default` Docksal's stop removed (connect: see above).
    "POST /networks/create": "making a removed <project>_default network again (then connecting its containers)",
}

# On a Swarm manager, besides ALLOWED (recorded by test_swarm.py, which drives each of SWARM_ESSENTIAL).
SWARM_ALLOWED: dict[str, str] = {
    "GET /services": "listing the services at start and after a reconnect; one service again (by ID) after its event",
    "GET /tasks": "listing the tasks meant to run: all of them now and then, one service's after a hint",
    "GET /images/{id}/json": "a service image's exposed ports, once per image (when the manager has it)",
    "GET /services/{id}": "reading a service's version and replicas before scaling it",
    "POST /services/{id}/update": "scaling a service: 0 → N to wake it, N → 0 to put it to sleep",
}
SWARM_ESSENTIAL = {"GET /info", "GET /services", "GET /tasks", "GET /services/{id}", "POST /services/{id}/update"}

# What every run must have seen: the test drives each of these.
ESSENTIAL = {
    "GET /containers/json", "GET /containers/{id}/json", "GET /events", "GET /networks",
    "POST /containers/{id}/start", "POST /containers/{id}/stop",
    "POST /containers/{id}/pause", "POST /containers/{id}/unpause",
    "POST /networks/{id}/connect", "POST /networks/{id}/disconnect", "POST /networks/create",
}

# This test's Compose projects (`<run_id>-<name>`, network `<run_id>-<name>_default`).
PROJECTS = ("api-awake", "api-nap", "api-doze", "api-gone")

# Resources whose second path segment is an ID or a name, except for these collection-level words.
_COLLECTION_WORDS = {
    "containers": {"json", "create", "prune"},
    "networks": {"create", "prune"},
    "images": {"json", "create", "search", "load", "get", "prune"},
    "volumes": {"create", "prune"},
    "exec": set(),
    "plugins": {"privileges", "pull", "create"},
    "services": {"create"},
    "secrets": {"create"},
    "configs": {"create"},
    "nodes": set(),
    "tasks": set(),
}
_VERSION = re.compile(r"^/v\d+(\.\d+)?(?=/)")


def endpoint_pattern(path: str) -> str:
    """`/v1.41/containers/3f2a…/json` → `/containers/{id}/json` (the path without its query)."""
    path = _VERSION.sub("", urllib.parse.unquote(path))
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] in _COLLECTION_WORDS and parts[2] not in _COLLECTION_WORDS[parts[1]]:
        parts[2] = "{id}"
    return "/".join(parts)


@dataclass(frozen=True)
class Call:
    conn: int
    method: str
    path: str  # as sent, without the query
    pattern: str
    query: tuple[tuple[str, str], ...]

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.pattern}"


class RecordingDockerRelay:
    """harness.Relay from a unix socket to the real Docker socket, whose tap parses the client → engine
    bytes of each connection as HTTP/1.1 requests (several per connection; bodies by Content-Length or
    chunked) and records every one. Responses (the event stream too) pass untouched and unparsed."""

    def __init__(self, path: str, target: str = "/var/run/docker.sock") -> None:
        self.path, self.target = path, target
        self.calls: list[Call] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._n = 0
        self._relay = Relay(self._bind, self._connect, tap=self._tap)

    def _bind(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o666)
        return s

    def _connect(self) -> socket.socket:
        engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            engine.connect(self.target)
        except OSError as e:
            self.errors.append(f"connect to {self.target}: {e}")
            engine.close()
            raise
        return engine

    def _tap(self) -> Callable[[bytes], None]:
        with self._lock:
            self._n += 1
            n = self._n
        parser = _RequestParser(lambda method, target: self._record(n, method, target))

        def feed(data: bytes) -> None:
            try:
                parser.feed(data)
            except ValueError as e:
                self.errors.append(f"connection {n}: {e}")
        return feed

    def open(self) -> RecordingDockerRelay:
        self._relay.open()
        return self

    def close(self) -> None:
        self._relay.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def _record(self, n: int, method: str, target: str) -> None:
        split = urllib.parse.urlsplit(target)
        query = tuple(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        call = Call(n, method, split.path, endpoint_pattern(split.path), query)
        with self._lock:
            self.calls.append(call)


class _RequestParser:
    """HTTP/1.1 requests from a byte stream; calls `on_request(method, target)` for each request head."""

    def __init__(self, on_request) -> None:
        self.on_request = on_request
        self.buf = b""
        self.body_left = 0  # bytes of a Content-Length body still to skip
        self.chunked = False
        self.raw = False  # after an Upgrade (attach, exec): no more HTTP on this connection

    def feed(self, data: bytes) -> None:
        if self.raw:
            return
        self.buf += data
        while True:
            if self.body_left:
                take = min(self.body_left, len(self.buf))
                self.buf, self.body_left = self.buf[take:], self.body_left - take
                if self.body_left:
                    return
            if self.chunked:
                if not self._skip_chunks():
                    return
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 1 << 20:
                    raise ValueError("a request head over 1 MiB")
                return
            head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4:]
            lines = head.split("\r\n")
            try:
                method, target, _ = lines[0].split(" ", 2)
            except ValueError:
                raise ValueError(f"not a request line: {lines[0][:200]!r}") from None
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            self.on_request(method, target)
            if "upgrade" in headers.get("connection", "").lower():
                self.raw = True
                return
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.chunked = True
            else:
                self.body_left = int(headers.get("content-length") or 0)

    def _skip_chunks(self) -> bool:
        """Drop whole chunks from the buffer; True once the last one (and its trailer) is gone."""
        while True:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(self.buf[:line_end].split(b";")[0].strip() or b"0", 16)
            if size == 0:
                trailer_end = self.buf.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return False
                self.buf = self.buf[trailer_end + 4:]
                self.chunked = False
                return True
            if len(self.buf) < line_end + 2 + size + 2:
                return False
            self.buf = self.buf[line_end + 2 + size + 2:]


def test_endpoint_pattern_and_parser():
    assert endpoint_pattern("/v1.41/containers/3f2a9c/json") == "/containers/{id}/json"
    assert endpoint_pattern("/v1.41/containers/json") == "/containers/json"
    assert endpoint_pattern("/version") == "/version"
    assert endpoint_pattern("/v1.48/networks/wptest-x_default/connect") == "/networks/{id}/connect"
    assert endpoint_pattern("/v1.41/containers/abc") == "/containers/{id}"
    seen: list[tuple[str, str]] = []
    p = _RequestParser(lambda m, t: seen.append((m, t)))
    stream = (b"GET /v1.41/containers/json?all=1 HTTP/1.1\r\nHost: x\r\n\r\n"
              b"POST /v1.41/networks/n/connect HTTP/1.1\r\nContent-Length: 15\r\n\r\n{\"Container\":1"
              b"}POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
              b"GET /v1.41/events HTTP/1.1\r\n\r\n")
    for i in range(0, len(stream), 7):  # split anywhere
        p.feed(stream[i:i + 7])
    assert seen == [("GET", "/v1.41/containers/json?all=1"), ("POST", "/v1.41/networks/n/connect"),
                    ("POST", "/x"), ("GET", "/v1.41/events")]


# --------------------------------------------------------------------------
# the recorded run




@pytest.fixture
def recorded(request, docker_client, run_id, image, tmp_path_factory, sandboxes):
    """(proxy container, relay): the image in bridge mode with the recording relay as its Docker socket.
    It asks for `sandboxes` only to be torn down first: no sandbox network is removed with the proxy still on it."""
    workdir = tmp_path_factory.mktemp("docker-api-calls")
    sockdir = workdir / "sock"
    sockdir.mkdir()
    for d in (workdir, sockdir):
        os.chmod(d, 0o755)
    traversable(workdir)
    relay = RecordingDockerRelay(str(sockdir / "docker.sock")).open()
    # Named to sort before every sandbox network (see test_container.py: on Docker < 28 the network that
    # sorts first gives the container its default route and published ports).
    net = docker_client.networks.create(f"{run_id}-0apiproxy", driver="bridge")
    config = {
        "docker": {"networks": [f"{run_id}-{p}_default" for p in PROJECTS]},
        "idle": {"timeout": "2s", "stop_timeout": "2s"},
        "wake": {"per_client": 0, "timeout": "30s"},
        "shutdown": {"drain": "15s"},
    }
    proxy = RecordedProxyContainer(docker_client, image, f"{run_id}-apiproxy", "bridge", workdir / "proxy", config,
                                   network=net.name, socket_path=sockdir / "docker.sock",
                                   http_port=free_port(), https_port=free_port())
    try:
        proxy.start()
        yield proxy, relay
    finally:
        if getattr(getattr(request.node, "rep_call", None), "failed", True):
            print(f"\n--- proxy container {proxy.name} log ---\n{proxy.log()[-30000:]}", file=sys.stderr)
        proxy.remove()
        relay.close()
        remove_network(net)


def _status(c) -> str:
    c.reload()
    return c.status


def test_the_proxy_calls_only_the_documented_docker_endpoints(recorded, sandboxes, host):
    proxy, relay = recorded
    t0 = time.monotonic()
    # 1. An always-on site: listed, inspected, its network joined, routed.
    awake = host("api-awake")
    awake_net, _ = sandboxes.project("api-awake", awake)
    # 2. A site paused when idle, 3. one stopped when idle (the default action); idle after the proxy's 2 s.
    napping, dozing = host("api-nap"), host("api-doze")
    _, nap = sandboxes.project("api-nap", napping, keep_awake=False, labels={"wakeproxy.idle-action": "pause"})
    doze_net, doze = sandboxes.project("api-doze", dozing, keep_awake=False)
    for name, backend in ((awake, "api-awake-web"), (napping, "api-nap-web"), (dozing, "api-doze-web")):
        r = wait_for(lambda n=name: (resp := proxy.get(n, "/api", timeout=60)).status_code == 200 and resp,
                     30, 0.1, f"{name} routed")
        assert backend_of(r) == backend
    assert awake_net.name in proxy.networks()

    # Idle: the keeper pauses one and stops the other; the stopped one's network is left.
    wait_for(lambda: _status(nap) == "paused", 40, 0.2, f"{nap.name} paused by the idle keeper")
    wait_for(lambda: _status(doze) == "exited", 40, 0.2, f"{doze.name} stopped by the idle keeper")
    wait_for(lambda: doze_net.name not in proxy.networks(), 20, 0.1, f"the proxy to leave {doze_net.name}")
    for what, project, c in (("pause", "api-nap", nap), ("stop", "api-doze", doze)):
        # Not by this proxy? Then another wakeproxy on this engine did it (one that sees this test's networks).
        assert any(call.method == "POST" and call.path.split("/")[-2:] in ([c.id, what], [c.name, what])
                   for call in relay.snapshot()), f"{c.name} was not put to sleep ({what}) by this test's proxy"
        assert f"idle {sandboxes.run_id}-{project}: no activity" in proxy.log()

    # A request wakes each: unpause, start (and the network joined again).
    for name, c in ((napping, nap), (dozing, doze)):
        r = proxy.get(name, "/api", timeout=60)
        assert r.status_code == 200, r.text[:500]
        assert backend_of(r) == c.name.removeprefix(f"{sandboxes.run_id}-")
    assert doze_net.name in proxy.networks()

    # 4. A project put to sleep Docksal's way (its network removed): the wake makes the network again.
    gone_net, gone = sandboxes.project("api-gone", host("api-gone"), keep_awake=False, start=False)
    gone_name = gone_net.name
    gone_net.disconnect(gone, force=True)
    gone_net.remove()
    r = wait_for(lambda: (resp := proxy.get(host("api-gone"), "/api", timeout=60)).status_code != 404 and resp,
                 20, 0.2, "the project without its network routed")
    assert r.status_code == 200 and backend_of(r) == "api-gone-web", r.text[:500]
    sandboxes.networks.append(sandboxes.client.networks.get(gone_name))  # removed with the others
    time.sleep(0.5)  # the calls that follow the wakes (inspects after their events) are in
    calls = relay.snapshot()
    elapsed = time.monotonic() - t0

    assert not relay.errors, relay.errors
    endpoints = sorted({c.endpoint for c in calls})
    keys: dict[str, set[str]] = {}
    for c in calls:
        keys.setdefault(c.endpoint, set()).update(k for k, _ in c.query)
    queries: dict[str, set[str]] = {}
    for c in calls:
        if c.query:
            queries.setdefault(c.endpoint, set()).add("&".join(f"{k}={v}" for k, v in c.query))
    counts = {e: sum(1 for c in calls if c.endpoint == e) for e in endpoints}
    print(f"\nDocker API calls recorded ({len(calls)} requests on {len({c.conn for c in calls})} connections, "
          f"{elapsed:.1f} s):")
    for e in endpoints:
        print(f"  {e:34} x{counts[e]:<4} query keys: {', '.join(sorted(keys[e])) or '-'}")
    for e, qs in sorted(queries.items()):
        for q in sorted(qs):
            print(f"  {e} ?{q}")
    print("  versions in paths:", sorted({m.group(0) for c in calls if (m := _VERSION.match(c.path))}))

    # Never anything that creates (but a removed project network), executes, deletes or touches images,
    # volumes or builds.
    for c in calls:
        assert c.method != "DELETE", c
        assert c.pattern == "/networks/create" or not re.search(
            r"/(create|exec|build|images|volumes|commit|archive|attach|kill|update|rename)\b", c.pattern), c
    assert not any(c.method == "POST" and c.pattern.startswith(("/containers/create", "/exec", "/images", "/build",
                                                                "/volumes"))
                   for c in calls)
    outside = sorted(set(endpoints) - set(ALLOWED))
    assert not outside, f"the proxy called endpoints outside ALLOWED: {outside}"
    missing = sorted(ESSENTIAL - set(endpoints))
    assert not missing, f"not seen (the test should have driven them): {missing}"
