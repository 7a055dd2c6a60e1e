"""The proxy as a container of its own image (Python 3.13, mitmproxy 12): `docker run` with the socket
mounted, on a bridge network (joining the sandboxes' networks by itself) and with `--network host`.

Each test runs in both modes against one proxy container per mode (module scope), with a real pebble
for its certificates. Sandboxes are Compose-shaped: a network `<project>_default` with Compose's
labels, and containers of that project on it only. The proxy's container is started on a network of
its own, so it reaches a sandbox only through the network it joined.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker.errors
import docker.types
import pytest
from container_harness import ProxyContainer
from harness import Relay, backend_of, children_of, choose_free_block, free_port, remove_network, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "acme"))
from acme_harness import Pebble, https_get, leaf_of, wait_issued  # noqa: E402

MODES = ["bridge", "host"]




class ExternalClient:
    """A client on another "machine": a network namespace of the test's own, joined to the host by a veth
    pair (host side HOST_IP, client side CLIENT_IP). Its connections to HOST_IP arrive as from another
    host would, through Docker's DNAT of published ports; only that /24, made here, is contacted."""

    def __init__(self, run_id: str, block) -> None:
        self.ns = f"{run_id}-ext"
        tag = run_id.split("-")[-1][:8]
        self.host_if, self.peer_if = f"wpx{tag}a", f"wpx{tag}b"
        hosts = list(block.hosts())
        self.host_ip, self.client_ip = str(hosts[0]), str(hosts[1])
        self.prefix = block.prefixlen

    def up(self) -> None:
        for cmd in (["ip", "netns", "add", self.ns],
                    ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if],
                    ["ip", "link", "set", self.peer_if, "netns", self.ns],
                    ["ip", "addr", "add", f"{self.host_ip}/{self.prefix}", "dev", self.host_if],
                    ["ip", "link", "set", self.host_if, "up"],
                    ["ip", "-n", self.ns, "addr", "add", f"{self.client_ip}/{self.prefix}", "dev", self.peer_if],
                    ["ip", "-n", self.ns, "link", "set", self.peer_if, "up"],
                    ["ip", "-n", self.ns, "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def get(self, port: int, host: str, path: str = "/") -> dict:
        """GET http://HOST_IP:port/path with Host: host, from inside the namespace: the backend's JSON."""
        code = ("import json,socket,sys\n"
                f"s=socket.create_connection(({self.host_ip!r},{port}),5)\n"
                f"s.sendall(b'GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n')\n"
                "d=b''\nwhile (c:=s.recv(65536)): d+=c\n"
                "sys.stdout.write(d.split(b'\\r\\n\\r\\n',1)[1].decode())\n")
        out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=20, check=True)
        return json.loads(out.stdout)

    def down(self) -> None:
        with contextlib.suppress(Exception):
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
        with contextlib.suppress(Exception):
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)


@pytest.fixture(scope="module", params=MODES)
def deployed(request, docker_client, run_id, image, tmp_path_factory):
    """(mode, proxy container, pebble): the image run as users run it, with ACME from pebble."""
    mode = request.param
    workdir = tmp_path_factory.mktemp(f"container-{mode}")
    http_port, https_port = free_port(), free_port()
    net = None
    api_ips: tuple[str, ...] = ()
    external = None
    if mode == "bridge":
        external = ExternalClient(run_id, choose_free_block(docker_client))
        external.up()
        # Named to sort before every sandbox network: on Docker < 28 the network that sorts first gives the
        # container its default route and published ports (docker/networks.py, README "In a container").
        net = docker_client.networks.create(f"{run_id}-0proxy", driver="bridge")
        net.reload()
        gateway = net.attrs["IPAM"]["Config"][0]["Gateway"]
        api_ips = (gateway,)
    pebble = Pebble(workdir / "pebble", http_port, https_port, api_ips=api_ips)
    relay = None
    directory = pebble.directory
    if mode == "bridge":
        # The proxy's container reaches the host only through its bridge's gateway: a relay there to pebble.
        port = free_port()

        def bind() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((gateway, port))
            return s

        relay = Relay(bind, lambda: socket.create_connection(("127.0.0.1", pebble.gate_port), timeout=5))
        relay.open()
        directory = f"https://{gateway}:{port}/dir"
    config = {
        "docker": {"networks": []},
        "wake": {"per_client": 0, "timeout": "30s"},
        "shutdown": {"drain": "15s"},
        "debug": {"listen": f"127.0.0.1:{free_port()}"},  # (with --network host: the host's loopback)
        "acme": {"enabled": True, "directory": directory, "ca_bundle": "/etc/wakeproxy/pebble-api.pem",
                 "email": "admin@example.test"},
    }
    proxy = ProxyContainer(docker_client, image, f"{run_id}-proxy-{mode}", mode, workdir, config,
                           network=net.name if net is not None else None,
                           env={"WAKEPROXY_ACME_TEST_BACKOFF": "1"},
                           files={"pebble-api.pem": pebble.api_cert.read_text()},
                           http_port=http_port, https_port=https_port,
                           also_publish=(external.host_ip,) if external is not None else ())
    proxy.external = external
    try:
        proxy.start()
        yield mode, proxy, pebble
    finally:
        failed = request.session.testsfailed
        if failed:
            print(f"\n--- proxy container {proxy.name} log ---\n{proxy.log()[-30000:]}", file=sys.stderr)
        proxy.remove()
        if relay is not None:
            relay.close()
        pebble.stop()
        if net is not None:
            remove_network(net)
        if external is not None:
            external.down()


def test_the_image_runs_mitmproxy_12_and_every_adaptation_fits(docker_client, image):
    version = docker_client.containers.run(image, ["--version"], remove=True).decode()
    assert "mitmproxy 12." in version and "Python 3.13" in version, version
    # `check` runs each adaptation's own shape check against the image's mitmproxy.
    out = docker_client.containers.run(image, ["check"], remove=True).decode()
    assert "adaptations fit" in out and "does not fit" not in out, out


def test_routes_to_a_sandbox_on_its_own_network_joined_then_left(deployed, sandboxes, host):
    mode, proxy, _ = deployed
    name = host(f"joined-{mode}")
    net, web = sandboxes.project(f"joined-{mode}", name)
    r = wait_for(lambda: (resp := proxy.get(name)).status_code == 200 and resp, 15, 0.1, f"{name} routed")
    assert backend_of(r) == f"joined-{mode}-web"
    if mode == "bridge":
        assert net.name in proxy.networks()
        assert f"docker: joined network {net.name}" in proxy.log()
    else:
        assert proxy.networks() == {"host"}  # nothing to join: the host's namespace reaches every bridge
    # `docker compose down`: the containers go, then the network. The proxy has left it by then.
    web.remove(force=True)
    if mode == "bridge":
        wait_for(lambda: net.name not in proxy.networks(), 10, 0.1, f"the proxy to leave {net.name}")
    net.remove()
    sandboxes.networks.remove(net)
    wait_for(lambda: proxy.get(name).status_code == 404, 10, 0.1, f"{name} gone from every worker")


def test_the_client_address_reaches_the_backend(deployed, sandboxes, host):
    """What X-Forwarded-For says in each mode (README "In a container": client addresses)."""
    mode, proxy, _ = deployed
    name = host(f"client-{mode}")
    sandboxes.project(f"client-{mode}", name)
    r = wait_for(lambda: (resp := proxy.get(name)).status_code == 200 and resp, 15, 0.1, f"{name} routed")
    xff = r.json()["headers"].get("x-forwarded-for") or r.json()["headers"].get("X-Forwarded-For")
    if mode == "host":
        assert xff == "127.0.0.1"  # the real client: nothing between it and the proxy
        return
    # Bridge: from the host itself, Docker's userland proxy connects for the client (its bridge's gateway)…
    gateway = proxy.container.attrs["NetworkSettings"]["Networks"][proxy.network]["Gateway"]
    assert xff == gateway
    # …while a client on another machine keeps its address (Docker's DNAT of the published port).
    seen = proxy.external.get(proxy.http_port, name)
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-forwarded-for"] == proxy.external.client_ip


def test_a_hostile_sandbox_cannot_make_the_proxy_join_another_projects_network(deployed, sandboxes, host):
    """A label naming another project's network (wakeproxy.network) gets a 503 and no join."""
    mode, proxy, _ = deployed
    if mode == "host":
        pytest.skip("with host networking nothing is joined")
    # The victim sleeps (created, not started): its network is not joined until it runs.
    victim_net, _ = sandboxes.project(f"victim-{mode}", host(f"victim-{mode}"), start=False)
    sandboxes.project(f"attacker-{mode}", host(f"attacker-{mode}"), labels={"wakeproxy.network": victim_net.name})
    r = wait_for(lambda: (resp := proxy.get(host(f"attacker-{mode}"))).status_code != 404 and resp, 15, 0.1,
                 "the attacker's site to be known")
    assert r.status_code == 503, r.text[:300]
    time.sleep(0.5)
    assert victim_net.name not in proxy.networks()
    assert f"joined network {victim_net.name}" not in proxy.log()


def test_a_sandbox_network_with_public_addresses_is_not_joined(deployed, sandboxes, host):
    """A Compose file chooses its network's subnet: a public range, once joined, would be a route of the
    proxy's container and take its traffic for those addresses (its ACME CA's, say)."""
    mode, proxy, _ = deployed
    if mode == "host":
        pytest.skip("with host networking nothing is joined")
    # 44.31.255.0/24: global unicast that no test traffic goes to; the bridge's route exists only meanwhile.
    net, _ = sandboxes.project(f"public-{mode}", host(f"public-{mode}"), subnet="44.31.255.0/24")
    r = wait_for(lambda: (resp := proxy.get(host(f"public-{mode}"))).status_code != 404 and resp, 15, 0.1,
                 "the site to be known")
    assert r.status_code == 503  # from the first snapshot that has the site: the subnet is known with it
    assert net.name not in proxy.networks()
    code, out = proxy.exec("wakeproxy", "status")
    assert code == 0 and f"cannot join {net.name}: network '{net.name}' uses public addresses" in out, out


def test_wakes_a_sleeping_sandbox_and_puts_an_idle_one_to_sleep(deployed, sandboxes, host):
    mode, proxy, _ = deployed
    name = host(f"sleepy-{mode}")
    net, web = sandboxes.project(f"sleepy-{mode}", name, labels={"wakeproxy.idle-timeout": "2s"},
                                 keep_awake=False)
    wait_for(lambda: proxy.get(name).status_code == 200, 15, 0.1, f"{name} routed")

    def exited() -> bool:
        web.reload()
        return web.status == "exited"
    wait_for(exited, 30, 0.2, f"{web.name} stopped by the idle keeper")
    if mode == "bridge":  # nothing runs on it: the proxy leaves (a sleeping sandbox costs no interface)
        wait_for(lambda: net.name not in proxy.networks(), 10, 0.1, f"the proxy to leave {net.name}")
    t0 = time.monotonic()
    r = proxy.get(name, "/api", timeout=60)  # not a browser navigation: held until the app answers
    woke = time.monotonic() - t0
    assert r.status_code == 200, r.text[:500]
    assert backend_of(r) == f"sleepy-{mode}-web"
    web.reload()
    assert web.status == "running"
    if mode == "bridge":
        assert net.name in proxy.networks()
    print(f"\n[{mode}] woken in {woke:.2f} s")


def test_tls_http2_pebble_certificate_and_idle_clocks_survive_docker_restart(deployed, sandboxes, host):
    mode, proxy, pebble = deployed
    name = host(f"tls-{mode}")
    sandboxes.project(f"tls-{mode}", name, labels={"wakeproxy.acme": "true"})
    wait_issued(proxy, name, timeout=60)
    root = pebble.root_pem()
    r = https_get(proxy, name, root)
    assert r.status_code == 200 and r.http_version == "HTTP/2"
    serial = leaf_of(proxy, name).serial_number
    orders = pebble.orders()
    group = f"{sandboxes.run_id}-tls-{mode}"

    def clock() -> str | None:
        code, out = proxy.exec("wakeproxy", "status", "--json")
        assert code == 0, out
        for g in json.loads(out)["groups"]:
            if g["group"] == group:
                return g["last_activity"]
        raise AssertionError(f"no group {group} in the status: {out[:3000]}")
    time.sleep(1.0)  # the last request's activity has reached the controller (workers report 4×/s)
    before = clock()
    assert before is not None
    seconds = proxy.restart()
    print(f"\n[{mode}] docker restart: ready again in {seconds:.1f} s")
    assert clock() == before  # the idle clock came back from the state volume (read before any request)
    assert leaf_of(proxy, name).serial_number == serial  # the same certificate, from the state volume
    assert wait_for(lambda: https_get(proxy, name, root).status_code == 200, 15, 0.2, "TLS after the restart")
    assert pebble.orders() == orders  # and no new order


def test_status_and_health_through_docker_exec(deployed, sandboxes, host):
    mode, proxy, _ = deployed
    name = host(f"status-{mode}")
    sandboxes.project(f"status-{mode}", name)
    wait_for(lambda: proxy.get(name).status_code == 200, 15, 0.1, f"{name} routed")
    code, out = proxy.exec("wakeproxy", "status")
    assert code == 0, out
    assert "GROUP" in out and f"{sandboxes.run_id}-status-{mode}" in out and "WORKER" in out
    # Workers dropped to the image's account; the supervisor and the controller stay root (socket, ports).
    workers = proxy.children("worker")
    assert workers
    for pid in workers:
        uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
        assert uids.split()[1:] == ["10001"] * 4, uids
    # The workers' account cannot use the Docker socket that is mounted into the same container.
    code, raw = proxy.container.exec_run(["python3.13", "-c", "import socket; s = socket.socket(socket.AF_UNIX); "
                                          "s.connect('/var/run/docker.sock')"], user="10001")
    assert code != 0 and b"PermissionError" in raw, raw
    code, out = proxy.exec("wakeproxy", "health")
    assert code == 0, out

    def healthy() -> bool:
        proxy.container.reload()
        return proxy.container.attrs["State"].get("Health", {}).get("Status") == "healthy"
    wait_for(healthy, 45, 0.5, "docker to call the container healthy (HEALTHCHECK)")
    # `wakeproxy reload` through docker exec: new workers replace the old ones, the site keeps answering.
    done_before = proxy.log().count("wakeproxy: reload done")
    code, out = proxy.exec("wakeproxy", "reload")
    assert code == 0, out
    wait_for(lambda: proxy.log().count("wakeproxy: reload done") > done_before, 60, 0.2, "the reload")
    # The old workers drain (shutdown.drain) and exit; their replacements serve meanwhile.
    wait_for(lambda: set(proxy.children("worker")).isdisjoint(workers), 30, 0.2, "the old workers to exit")
    assert proxy.get(name).status_code == 200


def test_debug_through_docker_exec_on_mitmproxy_12(deployed, sandboxes, host):
    """`wakeproxy debug` in the container: mitmweb 12 with its own token check, run as the image's account
    without the Docker socket; its API (asked from inside the container, where its loopback is) lists the
    watched sandbox's flow and none of the other's."""
    mode, proxy, _ = deployed
    watched, other = host(f"dbg-{mode}"), host(f"dbg-other-{mode}")
    sandboxes.project(f"dbg-{mode}", watched)
    sandboxes.project(f"dbg-other-{mode}", other)
    wait_for(lambda: proxy.get(watched).status_code == 200 and proxy.get(other).status_code == 200, 15, 0.1,
             "both routed")
    code, out = proxy.exec("wakeproxy", "debug", watched, "--for", "2m")
    assert code == 0, out
    m = re.search(r"mitmweb: (http://\S+)/\?token=(\S+)", out)
    assert m, out
    base, token = m.groups()
    assert proxy.get(watched, "/seen-by-mitmweb").status_code == 200
    assert proxy.get(other, "/not-recorded").status_code == 200
    ask = ("import json,sys,urllib.request\n"
           f"r=urllib.request.Request({base + '/flows'!r})\n"
           "r.add_header('Authorization','Bearer '+sys.argv[1])\n"
           "print(json.dumps([f['request']['path'] for f in json.load(urllib.request.urlopen(r,timeout=5))]))\n")

    def paths() -> list[str]:
        code, out = proxy.exec("python3.13", "-c", ask, token)
        assert code == 0, out
        return list(json.loads(out))
    wait_for(lambda: "/seen-by-mitmweb" in paths(), 10, 0.2, "the flow in mitmweb")
    assert "/not-recorded" not in paths()
    code, out = proxy.exec("python3.13", "-c", ask, "wrong-token")
    assert code != 0 and "403" in out, out
    def ui_pids() -> list[int]:
        return [pid for c in proxy.children("controller") for pid in children_of(c, "wakeproxy.debug.web")]
    (ui,) = ui_pids()
    uids = next(line for line in Path(f"/proc/{ui}/status").read_text().splitlines() if line.startswith("Uid:"))
    assert uids.split()[1:] == ["10001"] * 4, uids
    code, out = proxy.exec("wakeproxy", "debug", "--off")
    assert code == 0 and "nothing is watched" in out, out
    wait_for(lambda: not ui_pids(), 10, 0.1, "the UI stops")
    assert proxy.get(watched).status_code == 200


def test_sigterm_drains_and_docker_logs_show_the_proxys_lines(deployed, sandboxes, host):
    """Last in the module: it stops the proxy's container."""
    mode, proxy, _ = deployed
    name = host(f"drain-{mode}")
    sandboxes.project(f"drain-{mode}", name)
    wait_for(lambda: proxy.get(name).status_code == 200, 15, 0.1, f"{name} routed")
    result: dict = {}

    def slow() -> None:
        try:
            result["r"] = proxy.get(name, "/sleep?s=3")
        except Exception as e:  # noqa: BLE001
            result["e"] = e
    t = threading.Thread(target=slow)
    t.start()
    time.sleep(1.0)  # the request is in flight
    t0 = time.monotonic()
    proxy.container.stop(timeout=20)
    stopped = time.monotonic() - t0
    t.join(10)
    assert "e" not in result, result
    assert result["r"].status_code == 200  # not cut short by the stop
    proxy.container.reload()
    assert proxy.container.attrs["State"]["ExitCode"] == 0, proxy.log()[-3000:]
    assert stopped < 15, stopped
    logs = proxy.log()
    for line in ("controller ready", "wakeproxy ready:", "docker: synced"):
        assert line in logs, line
    assert "Traceback" not in logs, logs[-5000:]
    # mitmproxy 12: no adaptation fell back (each says so with one warning when it does).
    for fallback in ("is not the shape it was written for", "as expected;", "cannot serve them"):
        assert fallback not in logs, fallback
    try:
        proxy.container.start()  # back for the module's teardown (and the other mode's, unaffected)
    except docker.errors.APIError:
        pass
