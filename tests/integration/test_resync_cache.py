"""The start-up resync takes what never changes (routing env, exposed ports) from state_dir/containers.json.

Real engine, real proxy: 30 labelled containers (created, never started, on this run's network) are
inspected by a proxy's first start and by none of its restarts with the same state_dir, and they
route exactly as before; a container created while the proxy is down is inspected on the next start.

The engine is shared with other tests and projects, whose containers come and go at any time, so
the counts asserted are the ones this test controls: "0 cached" on a fresh state_dir, and which of
*our* containers were inspected (the proxy's debug log names each container it inspects).
"""

from __future__ import annotations

import json
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from harness import backend_of, proxied, wait_for
from harness import exposed_image as build_exposed_image

N = 30
SYNC = re.compile(r"docker: synced (\d+) containers in (\d+) ms \((\d+) inspected, (\d+) cached\)")
INSPECTED = re.compile(r"docker: inspected (\S+) \(not in the container cache\)")


@pytest.fixture
def exposed_image(docker_client, pyback_image, run_id):
    """The backend image with `EXPOSE 8086`: its only exposed port is where it is routed."""
    with build_exposed_image(docker_client, pyback_image.image, f"{run_id}-pyback-exposed8086", 8086) as tag:
        yield tag


def sync_of(p) -> dict[str, int]:
    m = wait_for(lambda: SYNC.search(p.log()), 10, 0.05, "the proxy's sync line")
    return dict(zip(("containers", "ms", "inspected", "cached"), map(int, m.groups())))


def inspected_by(p) -> set[str]:
    return set(INSPECTED.findall(p.log()))


def groups(p, prefix: str) -> dict[str, list[str]]:
    """Our groups (one container each) → their hosts, from the status endpoint."""
    r = httpx.get(f"http://127.0.0.1:{p.status_port}/status", timeout=5, trust_env=False)
    r.raise_for_status()
    return {g["group"]: g["hosts"] for g in r.json()["groups"] if g["group"].startswith(prefix)}


def cached_ids(state: Path) -> set[str]:
    return set(json.loads((state / "containers.json").read_text())["containers"])


def test_restart_inspects_only_containers_it_has_not_seen(
    exposed_image, backend_container, proxy, host, run_id, docker_client, tmp_path
):
    # exposed_image first: set up before and torn down after the containers that use it (removing
    # an image that containers still use only untags it, and leaves it dangling).
    H = host
    secret = f"wptest-secret-{secrets.token_hex(8)}"
    pyback = backend_container.pyback
    specs: dict[str, dict] = {f"cache-{i:02d}": dict(labels={"wakeproxy.host": H(f"cache-{i:02d}")})
                              for i in range(N - 2)}
    # Routed only through what the cache holds: nginx-proxy env, and the image's one exposed port.
    specs["cache-env"] = dict(env={"VIRTUAL_HOST": H("cache-env"), "VIRTUAL_PORT": "8083", "PORT": "8083",
                                   "WPTEST_SECRET": secret})
    specs["cache-exposed"] = dict(image=exposed_image, labels={"wakeproxy.host": H("cache-exposed")},
                                  env={"PORT": "8086", "BACKEND_NAME": "cache-exposed"},
                                  command=pyback.command(), volumes=pyback.volumes())
    with ThreadPoolExecutor(8) as pool:  # created, never started; wakeproxy.idle-timeout=0 (keep_awake)
        made = dict(zip(specs, pool.map(lambda kv: backend_container(kv[0], start=False, **kv[1]),
                                        specs.items())))
    ours = {c.name for c in made.values()}
    our_ids = {c.id for c in made.values()}
    expected = {f"{run_id}-{s}": [H(s)] for s in specs}
    state = tmp_path / "shared-state"
    cfg = {"state_dir": str(state)}

    # 1. Fresh state_dir: nothing cached, every container on the engine inspected, ours among them.
    p1 = proxy(cfg, extra_args=["--verbose"])
    s1 = sync_of(p1)
    print(f"first start: {s1}")
    assert s1["cached"] == 0 and s1["inspected"] >= N, s1
    assert ours <= inspected_by(p1)
    assert groups(p1, run_id + "-cache-") == expected
    wait_for(lambda: our_ids <= cached_ids(state), 5, 0.05, "our containers in containers.json")
    p1.stop()
    raw = (state / "containers.json").read_text()
    assert secret not in raw and "WPTEST_SECRET" not in raw and "BACKEND_NAME" not in raw
    assert H("cache-env") in raw

    # 2. Restart, same state_dir, nothing of ours changed: none of ours inspected, same routes.
    # (Other tests and projects on this engine may create containers meanwhile, even ones gone
    # again before we could list them: only ours are asserted on.)
    p2 = proxy(cfg, extra_args=["--verbose"])
    s2 = sync_of(p2)
    print(f"restart: {s2}")
    assert not ours & inspected_by(p2), inspected_by(p2) & ours
    assert s2["cached"] >= N, s2
    assert groups(p2, run_id + "-cache-") == expected
    # A request wakes a container routed by its cached env, and one routed to its cached exposed port.
    for name in ("cache-env", "cache-exposed"):
        r = proxied(p2, H(name), timeout=60)
        assert backend_of(r) == name, (name, r.status_code, r.text[:300])
    p2.stop()

    # 3. While the proxy is down: one container created, one removed.
    late = backend_container("cache-late", labels={"wakeproxy.host": H("cache-late")}, start=False)
    removed = made["cache-00"]
    removed.remove(force=True)
    p3 = proxy(cfg, extra_args=["--verbose"])
    s3 = sync_of(p3)
    print(f"restart after a create and a remove: {s3}")
    assert inspected_by(p3) & (ours | {late.name}) == {late.name}, inspected_by(p3)
    assert s3["inspected"] >= 1 and s3["cached"] >= N - 1, s3
    expected3 = {**expected, late.name: [H("cache-late")]}
    del expected3[removed.name]
    assert groups(p3, run_id + "-cache-") == expected3
    r = proxied(p3, H("cache-late"), timeout=60)
    assert backend_of(r) == "cache-late", (r.status_code, r.text[:300])
    assert proxied(p3, H("cache-00")).status_code == 404
    wait_for(lambda: late.id in cached_ids(state) and removed.id not in cached_ids(state), 5, 0.05,
             "containers.json to gain the new container and drop the removed one")


def test_the_fast_inspector_reads_what_the_sdk_reads(docker_client, busybox_image, run_id, test_network) -> None:
    """`Inspector` skips the SDK's requests layer on a unix socket; its answer is the SDK's answer
    (the fields routing uses), and a removed container is None, as through the SDK."""
    from wakeproxy.docker.view import Inspector, _Static

    c = docker_client.containers.create(
        busybox_image, ["sleep", "60"], name=f"{run_id}-inspector", network=test_network,
        environment={"VIRTUAL_HOST": f"inspector.{run_id}.test", "NOT_READ": "secret"},
        ports={"8087/tcp": None}, labels={"wakeproxy.idle-timeout": "0"},
    )
    try:
        api = docker_client.api
        fast = Inspector(api)
        assert fast._pool is not None, "the engine is on a unix socket here: the fast path must be taken"
        slow = Inspector(api)
        slow._pool = None  # the SDK's own call, as for tcp/TLS/ssh engines
        a, b = fast(c.id), slow(c.id)
        assert a is not None and b is not None
        for key in ("Id", "Name", "Config", "State", "NetworkSettings"):
            assert a[key] == b[key], key
        static = _Static.from_config(a["Config"])
        assert static.env == {"VIRTUAL_HOST": f"inspector.{run_id}.test"}
        assert 8087 in static.exposed_ports
        # The SDK keeps one connection pool per URL, 25 at most, and closes those it drops: many
        # distinct listings (the Swarm view makes them) must not leave the fast path on a closed pool.
        for i in range(40):
            api.containers(filters={"name": f"{run_id}-nothing-{i}"})
        again = fast(c.id)
        assert again is not None and again["Id"] == c.id
    finally:
        c.remove(force=True)
    assert fast(c.id) is None
    assert slow(c.id) is None
