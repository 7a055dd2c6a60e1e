"""A Compose project whose services depend on each other (a depends_on cycle) is woken: both are
started together (it used to deadlock: no `docker start` at all, then 504 "still missing: unknown")."""

from __future__ import annotations

import time

from harness import backend_of, proxied


def test_services_that_depend_on_each_other_wake_together(backend_container, proxy, host, run_id, docker_client):
    project = f"{run_id}-cycle"
    common = {"com.docker.compose.project": project}
    web = backend_container("cyc-web", start=False, labels={
        **common, "com.docker.compose.service": "web", "wakeproxy.host": host("cyc-web"),
        "com.docker.compose.depends_on": "api:service_started:false"})
    api = backend_container("cyc-api", start=False, labels={
        **common, "com.docker.compose.service": "api", "com.docker.compose.depends_on": "web:service_started:false"})
    p = proxy({"wake": {"timeout": "20s"}})
    t0 = time.monotonic()
    r = proxied(p, host("cyc-web"), headers={"Accept": "application/json"}, timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == 200 and backend_of(r) == "cyc-web", r.text
    for c in (web, api):
        c.reload()
        assert c.status == "running", c.name
    assert "depend on each other" in p.log()
    print(f"woken in {took:.2f} s")
