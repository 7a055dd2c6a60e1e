"""The proxy survives the Docker daemon going away and coming back.

Uses a private dockerd (never the shared one): own data/exec roots, socket
/tmp/<prefix>/docker.sock, its own bridge, --iptables=false, --live-restore so
containers outlive the daemon. The proxy is pointed at it with docker.url.
"""

from __future__ import annotations

import time

import pytest
from harness import (
    ContainerFactory,
    PrivateDockerd,
    PyBack,
    backend_of,
    build_busybox_image,
    build_pyback_image,
    container_ip,
    proxied,
    wait_for,
)


@pytest.fixture
def private_docker(run_id, docker_client, python_mounts):
    d = PrivateDockerd(run_id, docker_client)
    try:
        d.setup()
        d.start()
        client = d.client()
        bb = build_busybox_image(client, f"{run_id}-busybox")
        py = build_pyback_image(client, f"{run_id}-pyback", bb)
        net = client.networks.create(
            f"{run_id}-pnet", driver="bridge",
            ipam={"Driver": "default", "Config": [{"Subnet": d.net_subnet, "Gateway": d.net_gateway}]})
        exe, mounts = python_mounts
        d.network = net.name
        d.pyback = PyBack(py, exe, mounts)
        d.busybox_tag = bb
        yield d
    finally:
        d.cleanup()


def test_proxy_survives_dockerd_restart(private_docker, proxy, host):
    d = private_docker
    ha, hb = host("restart-a"), host("restart-b")

    def factory():  # a fresh client each time: the daemon restarts in between
        return ContainerFactory(d.client(), d.run_id, d.pyback, d.busybox_tag, d.network)

    a = factory()("restart-a", labels={"wakeproxy.host": ha})
    container_ip(a, d.network)  # routed via our own br-… bridge
    p = proxy({"docker": {"url": d.url, "networks": [d.network]}})
    wait_for(lambda: backend_of(proxied(p, ha)) == "restart-a", 10, 0.1, "route to restart-a")

    # Daemon goes away (SIGTERM by PID); with --live-restore the container keeps running.
    t_stop = time.monotonic()
    d.stop()
    print(f"dockerd stopped in {time.monotonic() - t_stop:.2f}s")
    assert not d.running()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # bounded: ~15 requests
        r = proxied(p, ha, timeout=5)
        assert backend_of(r) == "restart-a", (r.status_code, r.text[:300])
        time.sleep(0.2)
    assert p.alive(), p.log()

    # Daemon comes back; a new container is picked up from the resync / new event stream.
    t_start = time.monotonic()
    d.start()
    print(f"dockerd restarted in {time.monotonic() - t_start:.2f}s")
    b = factory()("restart-b", labels={"wakeproxy.host": hb})
    t0 = time.monotonic()
    wait_for(lambda: backend_of(proxied(p, hb, timeout=5)) == "restart-b", 15, 0.1,
             "route to restart-b after the daemon restart")
    picked_up = time.monotonic() - t0
    assert backend_of(proxied(p, ha)) == "restart-a"
    assert p.alive()
    assert picked_up < 10, f"new container routed only after {picked_up:.1f}s"
    print(f"new container routed {picked_up:.2f}s after start")
    b.remove(force=True)
    wait_for(lambda: proxied(p, hb, timeout=5).status_code == 404, 5, 0.1, "route to restart-b to go")
