"""Routing contract, against the real proxy process and real containers.

One set of containers and one proxy are shared by the module (`sites`); tests
that need their own proxy config or their own containers start them.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from harness import backend_of, proxied, wait_for
from harness import exposed_image as build_exposed_image

# Stopped containers are woken on request since the Waker landed; the routing
# tests check the "asleep" answer itself, so their client is one the proxy is
# configured never to wake for (and the shared stopped containers stay stopped).
NO_WAKE_UA = "wptest-no-wake/1.0"
NO_WAKE = {"wake": {"ignore_user_agents": ["^wptest-no-wake"]}}


@pytest.fixture(scope="module")
def exposed_image(docker_client, pyback_image, run_id):
    """pyback image with `EXPOSE 8082` (one exposed port, no label)."""
    with build_exposed_image(docker_client, pyback_image.image, f"{run_id}-pyback-exposed", 8082) as tag:
        yield tag


@pytest.fixture(scope="module")
def sites(module_containers, module_proxy, host, run_id, docker_client, test_network,
          other_network, exposed_image, tls_backend_files):
    """All routing cases as containers, then one proxy that reads them at start."""
    H = host
    tls = tls_backend_files

    def project(name: str) -> dict:
        return {"com.docker.compose.project": f"{run_id}-{name}"}

    pyback = module_containers.pyback
    specs = {
        "plain": dict(labels={"wakeproxy.host": H("plain")}),
        "multi": dict(labels={"wakeproxy.host": f"{H('m1')},{H('m2')}"}),
        # One Compose project: names under a wildcard belong to the wildcard's owner.
        "wild": dict(labels={"wakeproxy.host": f"*.wild.{run_id}.test", **project("wild")}),
        "exactwild": dict(labels={"wakeproxy.host": f"exact.wild.{run_id}.test", **project("wild")}),
        "deepwild": dict(labels={"wakeproxy.host": f"*.deep.wild.{run_id}.test", **project("wild")}),
        "port": dict(labels={"wakeproxy.host": H("port"), "wakeproxy.port": "8081"}, env={"PORT": "8081"}),
        # pyback + EXPOSE 8082: command and mounts given explicitly for the derived image.
        "exposed": dict(image=exposed_image, labels={"wakeproxy.host": H("exposed")},
                        env={"PORT": "8082", "BACKEND_NAME": "exposed"},
                        command=pyback.command(), volumes=pyback.volumes()),
        "tls": dict(labels={"wakeproxy.host": H("tls"), "wakeproxy.scheme": "https", "wakeproxy.port": "8443"},
                    env={"PORT": "8443", **tls["env"]}, volumes=tls["volumes"]),
        "nginx": dict(env={"VIRTUAL_HOST": H("nginx"), "VIRTUAL_PORT": "8083", "PORT": "8083"}),
        "nginxtls": dict(env={"VIRTUAL_HOST": H("nginxtls"), "VIRTUAL_PORT": "8444", "VIRTUAL_PROTO": "https",
                              "PORT": "8444", **tls["env"]}, volumes=tls["volumes"]),
        "docksal": dict(labels={"io.docksal.virtual-host": H("docksal"), "io.docksal.virtual-port": "8084"},
                        env={"PORT": "8084"}),
        "traefik": dict(labels={
            "traefik.enable": "true",
            "traefik.http.routers.web.rule": f"Host(`{H('t1')}`, `{H('t2')}`)",
            "traefik.http.services.web.loadbalancer.server.port": "8085",
        }, env={"PORT": "8085"}),
        "disabled": dict(labels={"wakeproxy.host": H("disabled"), "wakeproxy.enable": "false"}),
        "rr1": dict(labels={"wakeproxy.host": H("rr"), **project("rr")}),  # replicas of one project
        "rr2": dict(labels={"wakeproxy.host": H("rr"), **project("rr")}),
        "isolated": dict(labels={"wakeproxy.host": H("isolated")}, network=other_network),
        "multinet": dict(labels={"wakeproxy.host": H("multinet"), "wakeproxy.network": test_network},
                         network=other_network, start=False),
        "exited": dict(labels={"wakeproxy.host": H("exited")}, wait_ready=True),
        "created": dict(labels={"wakeproxy.host": H("created")}, start=False),
        "badport": dict(labels={"wakeproxy.host": H("badport"), "wakeproxy.port": "abc"}),
    }

    def make(item):
        suffix, kw = item
        kw.setdefault("wait_ready", False)  # started together, awaited together below
        return suffix, module_containers(suffix, **kw)

    with ThreadPoolExecutor(4) as pool:
        c = dict(pool.map(make, specs.items()))
    docker_client.networks.get(test_network).connect(c["multinet"])
    c["multinet"].start()
    c["exited"].stop(timeout=5)
    for k, spec in specs.items():
        if spec.get("start", True) and k != "exited":
            module_containers.wait_listening(c[k])
    proxy = module_proxy(NO_WAKE)
    # The proxy has read the containers once the plain site answers.
    wait_for(lambda: backend_of(proxied(proxy, H("plain"))) == "plain", 10, 0.1, "plain site via proxy")
    return SimpleNamespace(proxy=proxy, c=c, H=H)


def name(resp: httpx.Response) -> str | None:
    return backend_of(resp)


# --- label conventions ---------------------------------------------------------


def test_wakeproxy_host_label(sites):
    r = proxied(sites.proxy, sites.H("plain"), "/some/path?q=1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "plain"
    assert body["path"] == "/some/path?q=1"


def test_several_hosts_in_one_label_and_case_insensitive(sites):
    assert name(proxied(sites.proxy, sites.H("m1"))) == "multi"
    assert name(proxied(sites.proxy, sites.H("m2"))) == "multi"
    assert name(proxied(sites.proxy, sites.H("M2").upper())) == "multi"


def test_host_port_is_ignored(sites):
    assert name(proxied(sites.proxy, sites.H("plain") + ":12345")) == "plain"


def test_wildcards_exact_wins_longest_suffix_wins(sites, run_id):
    p = sites.proxy
    assert name(proxied(p, f"foo.wild.{run_id}.test")) == "wild"
    assert name(proxied(p, f"exact.wild.{run_id}.test")) == "exactwild"
    assert name(proxied(p, f"EXACT.Wild.{run_id}.test")) == "exactwild"
    assert name(proxied(p, f"x.deep.wild.{run_id}.test")) == "deepwild"


def test_port_label(sites):
    assert name(proxied(sites.proxy, sites.H("port"))) == "port"


def test_single_exposed_port_is_used(sites):
    assert name(proxied(sites.proxy, sites.H("exposed"))) == "exposed"


def test_scheme_https_label(sites):
    r = proxied(sites.proxy, sites.H("tls"))
    assert r.status_code == 200, r.text
    assert r.json()["backend"] == "tls"
    assert r.json()["tls"] is True


def test_nginx_proxy_env(sites):
    assert name(proxied(sites.proxy, sites.H("nginx"))) == "nginx"
    r = proxied(sites.proxy, sites.H("nginxtls"))
    assert r.status_code == 200, r.text
    assert r.json()["backend"] == "nginxtls" and r.json()["tls"] is True


def test_docksal_labels(sites):
    assert name(proxied(sites.proxy, sites.H("docksal"))) == "docksal"


def test_traefik_host_rule(sites):
    assert name(proxied(sites.proxy, sites.H("t1"))) == "traefik"
    assert name(proxied(sites.proxy, sites.H("t2"))) == "traefik"


def test_enable_false_is_ignored(sites):
    r = proxied(sites.proxy, sites.H("disabled"))
    assert r.status_code == 404
    assert "REQ" not in sites.c["disabled"].logs().decode()


def test_round_robin(sites):
    # On one connection (one serving worker): strict alternation.
    with httpx.Client(timeout=10, trust_env=False) as client:
        names = [name(client.get(f"{sites.proxy.http_url}/", headers={"Host": sites.H("rr")})) for _ in range(6)]
    assert set(names) == {"rr1", "rr2"}, names
    assert names.count("rr1") == names.count("rr2") == 3, names
    assert all(a != b for a, b in zip(names, names[1:])), f"not alternating: {names}"
    # Over new connections, which the kernel spreads over the workers (each alternates by itself):
    # both containers get a fair share.
    spread = [name(proxied(sites.proxy, sites.H("rr"))) for _ in range(24)]
    assert min(spread.count("rr1"), spread.count("rr2")) >= 6, spread


# --- networks --------------------------------------------------------------------


def test_container_on_other_network_is_503_and_never_contacted(sites, other_network):
    r = proxied(sites.proxy, sites.H("isolated"), headers={"Accept": "text/plain"})
    assert r.status_code == 503, r.text
    assert "network" in r.text.lower(), r.text
    r = proxied(sites.proxy, sites.H("isolated"), headers={"Accept": "text/html"})
    assert r.status_code == 503
    assert "network" in r.text.lower()
    logs = sites.c["isolated"].logs().decode()
    assert "listening on" in logs
    assert "REQ" not in logs, f"the isolated backend was contacted: {logs}"


def test_network_label_selects_allowed_network(sites):
    assert name(proxied(sites.proxy, sites.H("multinet"))) == "multinet"


# --- answers without a backend -------------------------------------------------


def test_unknown_host_404_html_for_browsers(sites, run_id):
    r = proxied(sites.proxy, f"nobody.{run_id}.test",
                headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/html"), r.headers
    assert "<html" in r.text.lower()


def test_unknown_host_404_one_plain_line_otherwise(sites, run_id):
    r = proxied(sites.proxy, f"nobody.{run_id}.test", headers={"Accept": "*/*"})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    assert len(r.text.strip().splitlines()) == 1, repr(r.text)


def test_exited_container_is_asleep_503(sites):
    r = proxied(sites.proxy, sites.H("exited"), headers={"User-Agent": NO_WAKE_UA})
    assert r.status_code == 503, r.text
    assert "asleep" in r.text.lower(), r.text
    sites.c["exited"].reload()
    assert sites.c["exited"].status == "exited"


def test_created_container_is_asleep_503(sites):
    r = proxied(sites.proxy, sites.H("created"), headers={"User-Agent": NO_WAKE_UA})
    assert r.status_code == 503, r.text
    assert "asleep" in r.text.lower(), r.text


def test_malformed_label_is_skipped_and_logged(sites):
    r = proxied(sites.proxy, sites.H("badport"))
    # Its wakeproxy.host could be read: the host says it is misconfigured (not "unknown site").
    assert r.status_code == 503 and "misconfigured" in r.text, r.text
    assert "wakeproxy.port" in r.text  # the test client is on loopback: a debug client
    assert "REQ" not in sites.c["badport"].logs().decode()
    log = sites.proxy.log()
    assert sites.c["badport"].name in log, f"skipped container not named in the log:\n{log[-3000:]}"
    assert name(proxied(sites.proxy, sites.H("plain"))) == "plain"


# --- forwarded headers -----------------------------------------------------------


def test_forwarded_headers_http(sites):
    h = sites.H("plain")
    r = proxied(sites.proxy, h, headers={"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9"})
    hd = r.json()["headers"]
    assert hd["host"] == h
    assert hd["x-forwarded-for"] == "127.0.0.1"
    assert hd["x-real-ip"] == "127.0.0.1"
    assert hd["x-forwarded-proto"] == "http"
    assert hd["x-forwarded-host"] == h
    assert hd["x-forwarded-port"] == str(sites.proxy.http_port)


def test_forwarded_headers_https(sites):
    h = sites.H("plain")
    r = proxied(sites.proxy, h, https=True)
    assert r.status_code == 200, r.text
    hd = r.json()["headers"]
    assert hd["host"] == h
    assert hd["x-forwarded-for"] == "127.0.0.1"
    assert hd["x-forwarded-proto"] == "https"
    assert hd["x-forwarded-host"] == h
    assert hd["x-forwarded-port"] == str(sites.proxy.https_port)


def test_trusted_proxy_keeps_and_appends_xff(sites, proxy):
    p = proxy({"forwarded": {"trusted_proxies": ["127.0.0.1/32"]}})
    h = sites.H("plain")
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        proxied(p, h, headers={"X-Forwarded-For": "203.0.113.9"})), 10, 0.1)
    assert r.json()["headers"]["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"


def test_default_host_serves_unknown_hosts(sites, proxy, run_id):
    # The default host's site is the operator's choice: its group is named in names.reserved.
    p = proxy({"default_host": sites.H("plain"), "names": {"reserved": {sites.H("plain"): sites.c["plain"].name}}})
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        proxied(p, f"nobody.{run_id}.test")), 10, 0.1)
    assert r.json()["backend"] == "plain"
    assert name(proxied(p, sites.H("m1"))) == "multi"


# --- live changes -------------------------------------------------------------------


def test_routes_follow_container_start_and_remove(sites, backend_container):
    """A started container is routed within 1 s, a removed one is gone within 1 s."""
    p, h = sites.proxy, sites.H("dyn")
    assert proxied(p, h).status_code == 404
    c = backend_container("dyn", labels={"wakeproxy.host": h}, start=False)
    c.start()
    t0 = time.monotonic()  # `docker start` has returned: the container runs
    # 502/503 while the backend is still binding also proves the route exists.
    wait_for(lambda: proxied(p, h, timeout=2).status_code != 404, 5, 0.05, "route to appear")
    appeared = time.monotonic() - t0
    backend_container.wait_listening(c)
    wait_for(lambda: name(proxied(p, h)) == "dyn", 5, 0.05)
    c.remove(force=True)
    t1 = time.monotonic()  # `docker rm -f` has returned: the container is gone (the call itself
    # can take seconds on a loaded machine; the proxy's part starts with Docker's destroy event)
    # (with the no-wake User-Agent: a request between the kill and the removal would otherwise
    # try to wake the dying container)
    wait_for(lambda: proxied(p, h, timeout=2, headers={"User-Agent": NO_WAKE_UA}).status_code == 404,
             5, 0.05, "route to go")
    gone = time.monotonic() - t1
    print(f"route appeared {appeared:.2f}s after start, gone {gone:.2f}s after remove")
    # Typically 0.02-0.1 s (docs/benchmarks.md, convergence); the bound leaves room for a loaded CI
    # machine (Docksal's own suite allows 2 s for a started project).
    assert appeared <= 2.0, f"route appeared after {appeared:.2f}s"
    assert gone <= 2.0, f"route removed after {gone:.2f}s"


# --- the same through mitmdump --------------------------------------------------------


def test_mitmweb_script_serves_the_same_routes(sites, proxy):
    """mitmweb -s addons/wakeproxy.py: the debugging view runs the same proxy."""
    w = proxy(NO_WAKE, launcher="mitmweb")
    assert name(wait_for(lambda: proxied(w, sites.H("plain")), 10, 0.1)) == "plain"
    assert proxied(w, sites.H("plain"), https=True).json()["headers"]["x-forwarded-proto"] == "https"
    assert proxied(w, f"nobody.{sites.H('plain')}").status_code == 404


def test_mitmdump_script_gives_same_answers(sites, proxy, run_id):
    if not shutil.which("mitmdump", path=os.pathsep.join([str(Path(__file__).resolve().parents[2] / ".venv" / "bin"),
                                                          os.environ.get("PATH", "")])):
        pytest.fail("mitmdump not installed")
    m = proxy(NO_WAKE, launcher="mitmdump")
    wait_for(lambda: name(proxied(m, sites.H("plain"))) == "plain", 10, 0.1)
    cases = [sites.H("plain"), sites.H("m2"), f"x.deep.wild.{run_id}.test", sites.H("t1"),
             sites.H("tls"), sites.H("isolated"), sites.H("exited"), f"nobody.{run_id}.test"]
    for h in cases:
        a = proxied(sites.proxy, h, headers={"User-Agent": NO_WAKE_UA})
        b = proxied(m, h, headers={"User-Agent": NO_WAKE_UA})
        assert (a.status_code, name(a)) == (b.status_code, name(b)), h
    hd = proxied(m, sites.H("plain"), https=True).json()["headers"]
    assert hd["x-forwarded-proto"] == "https"
    assert hd["x-forwarded-port"] == str(m.https_port)
    assert re.search(r"\bREQ\b", sites.c["plain"].logs().decode())
