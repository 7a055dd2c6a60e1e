"""Path routing against the real proxy and real containers: one host's paths split between the
containers of one Compose project (Traefik rules, nginx-proxy's VIRTUAL_PATH, wakeproxy.path),
and a malformed rule that makes its host answer "misconfigured"."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from harness import backend_of, proxied, wait_for

REPEAT = 6  # every request of a path must reach its container, not one in two


@pytest.fixture(scope="module")
def paths(module_containers, module_proxy, host, run_id):
    H = host

    def project(name: str) -> dict:
        return {"com.docker.compose.project": f"{run_id}-{name}"}

    specs = {
        "t-api": dict(labels={"traefik.http.routers.api.rule": f"Host(`{H('tpaths')}`) && PathPrefix(`/api`)",
                              **project("tpaths")}),
        "t-web": dict(labels={"traefik.http.routers.web.rule": f"Host(`{H('tpaths')}`)", **project("tpaths")}),
        "t-health": dict(labels={"traefik.http.routers.h.rule": f"Host(`{H('tpaths')}`) && Path(`/api/health`)",
                                 **project("tpaths")}),
        "n-api": dict(env={"VIRTUAL_HOST": H("npaths"), "VIRTUAL_PATH": "/api"}, labels=project("npaths")),
        "n-web": dict(env={"VIRTUAL_HOST": H("npaths")}, labels=project("npaths")),
        "w-api": dict(labels={"wakeproxy.host": H("wpaths"), "wakeproxy.path": "/api, /v2/", **project("wpaths")}),
        "w-web": dict(labels={"wakeproxy.host": H("wpaths"), **project("wpaths")}),
        "broken": dict(labels={"traefik.http.routers.web.rule": f"Host(`{H('broken')}`", **project("broken")}),
        "plain": dict(labels={"wakeproxy.host": H("ppaths")}),
    }

    def make(item):
        suffix, kw = item
        return suffix, module_containers(suffix, wait_ready=False, **kw)

    with ThreadPoolExecutor(4) as pool:
        c = dict(pool.map(make, specs.items()))
    for container in c.values():
        module_containers.wait_listening(container)
    proxy = module_proxy()
    wait_for(lambda: backend_of(proxied(proxy, H("ppaths"))) == "plain", 10, 0.1, "plain site via proxy")
    return SimpleNamespace(proxy=proxy, c=c, H=H)


def served(paths, host: str, path: str) -> list[str | None]:
    return [backend_of(proxied(paths.proxy, paths.H(host), path)) for _ in range(REPEAT)]


@pytest.mark.parametrize(
    "path, backend",
    [("/api", "t-api"), ("/api/v1", "t-api"), ("/api/v1/users?q=1", "t-api"), ("/api?x=1", "t-api"),
     ("/", "t-web"), ("/apix", "t-web"), ("/index.html", "t-web"),
     ("/api/health", "t-health"), ("/api/health/deep", "t-api")],
)
def test_traefik_path_prefix_splits_a_host(paths, path, backend):
    assert served(paths, "tpaths", path) == [backend] * REPEAT


def test_the_backend_gets_the_path_unchanged(paths):
    r = proxied(paths.proxy, paths.H("tpaths"), "/api/v1/users?q=1")
    assert r.json()["path"] == "/api/v1/users?q=1"


@pytest.mark.parametrize("path, backend", [("/api", "n-api"), ("/api/v1", "n-api"), ("/", "n-web"),
                                           ("/apix", "n-web")])
def test_virtual_path_splits_a_host(paths, path, backend):
    assert served(paths, "npaths", path) == [backend] * REPEAT


@pytest.mark.parametrize("path, backend", [("/api/x", "w-api"), ("/v2/", "w-api"), ("/v2", "w-web"),
                                           ("/", "w-web")])
def test_wakeproxy_path_splits_a_host(paths, path, backend):
    assert served(paths, "wpaths", path) == [backend] * REPEAT


def test_malformed_rule_is_logged_and_its_host_is_misconfigured(paths):
    name = paths.c["broken"].name
    wait_for(lambda: name in paths.proxy.log(), 5, 0.1, "the skipped container in the proxy log")
    lines = [ln for ln in paths.proxy.log().splitlines() if name in ln]
    assert any("skipped" in ln and "label traefik.http.routers.web.rule: unbalanced '('" in ln for ln in lines), lines
    r = proxied(paths.proxy, paths.H("broken"), headers={"Accept": "text/html"})
    assert r.status_code == 503, r.text
    assert "Site misconfigured" in r.text and "Unknown site" not in r.text
    assert "traefik.http.routers.web.rule" in r.text  # the test client is on loopback: a debug client
    assert "REQ" not in paths.c["broken"].logs().decode()  # never forwarded


def test_misconfigured_page_tells_other_clients_nothing_internal(paths, proxy):
    # A second proxy whose debug_clients leaves out loopback: the anonymous page.
    p = proxy({"debug_clients": ["192.0.2.0/24"]})
    wait_for(lambda: backend_of(proxied(p, paths.H("ppaths"))) == "plain", 10, 0.1, "second proxy")
    r = proxied(p, paths.H("broken"))
    assert r.status_code == 503 and "misconfigured" in r.text
    assert "traefik" not in r.text and paths.c["broken"].name not in r.text, r.text
