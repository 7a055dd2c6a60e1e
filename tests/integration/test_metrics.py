"""Prometheus metrics scraped by a real Prometheus (Debian's `prometheus`, on loopback, every second),
queried through its HTTP API after the test caused a wake and some requests; and `promtool check
metrics` on the endpoint's output. The proxy runs with its serving workers: the totals are the sums
of every worker's counts."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import free_port, proxied, wait_for


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """(its port, the port it scrapes, its log): Prometheus scraping 127.0.0.1:<metrics port> every 1 s."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus not found: install Debian's prometheus (scripts/test does)", pytrace=False)
    port, target = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: wakeproxy\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n")
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--web.enable-lifecycle"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/-/ready").startswith("Prometheus"), 30, 0.2, "Prometheus ready")
        yield port, target, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def query(port: int, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
    """An instant query through Prometheus's HTTP API → {sorted labels (without job, instance, __name__): value}."""
    data = json.loads(_get(f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"))
    assert data["status"] == "success", data
    out = {}
    for r in data["data"]["result"]:
        labels = tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("job", "instance", "__name__")))
        out[labels] = float(r["value"][1])
    return out


def test_a_real_prometheus_sees_the_wake_the_requests_and_the_groups(prometheus, proxy, backend_container, host):
    prom, metrics_port, _log = prometheus
    awake, asleep = host("m-awake"), host("m-asleep")
    backend_container("m-awake", labels={"wakeproxy.host": awake})
    sleeper = backend_container("m-asleep", start=False, labels={"wakeproxy.host": asleep})
    p = proxy({"metrics": {"listen": f"127.0.0.1:{metrics_port}"}, "workers": 2})
    for _ in range(5):
        assert proxied(p, awake).status_code == 200
    assert proxied(p, host("m-nobody")).status_code == 404
    r = proxied(p, asleep, timeout=60)  # a wake, held until ready
    assert r.status_code == 200
    sleeper.reload()
    assert sleeper.status == "running"

    def scraped() -> bool:  # the workers' counts reach the controller with their full reports (2 s)
        got = query(prom, 'sum(wakeproxy_http_requests_total{code="2xx",method="GET"})')
        return bool(got) and next(iter(got.values())) >= 6

    wait_for(scraped, 30, 0.5, "the requests in Prometheus")
    assert query(prom, 'wakeproxy_http_requests_total{code="2xx",method="GET"}') == {
        (("code", "2xx"), ("method", "GET")): 6.0}
    assert query(prom, 'wakeproxy_http_requests_total{code="4xx"}') == {(("code", "4xx"), ("method", "GET")): 1.0}
    assert query(prom, 'wakeproxy_pages_served_total{page="404"}') == {(("page", "404"),): 1.0}
    assert query(prom, "wakeproxy_wakes_total") == {(("kind", "container"), ("result", "ok")): 1.0}
    assert query(prom, "wakeproxy_wake_duration_seconds_count") == {(("result", "ok"),): 1.0}
    buckets = query(prom, 'wakeproxy_wake_duration_seconds_bucket{le="+Inf"}')
    assert buckets == {(("le", "+Inf"), ("result", "ok")): 1.0}
    assert query(prom, "wakeproxy_wake_held_seconds_count") == {(): 1.0}
    # The held request's clock started before the hold: it took as long as the wake (a container start).
    (held_sum,) = query(prom, "wakeproxy_wake_held_seconds_sum").values()
    (wake_sum,) = query(prom, "wakeproxy_wake_duration_seconds_sum").values()
    assert held_sum >= wake_sum * 0.9 and held_sum > 0.1, (held_sum, wake_sum)
    fast = query(prom, 'wakeproxy_http_request_duration_seconds_bucket{code="2xx",le="0.1"}')
    assert fast[(("code", "2xx"), ("le", "0.1"))] <= 5  # not the woken one
    groups = query(prom, "wakeproxy_groups")
    assert groups[(("state", "running"),)] >= 2  # ours (the session may hold other projects' too)
    assert query(prom, "wakeproxy_docker_connected") == {(): 1.0}
    assert query(prom, "wakeproxy_workers") == {(): 2.0}
    assert query(prom, "up") == {(): 1.0}


def test_promtool_checks_the_endpoints_output(proxy, backend_container, host, run_id):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus (scripts/test does)", pytrace=False)
    port = free_port()
    h = host("m-lint")
    backend_container("m-lint", labels={"wakeproxy.host": h})
    p = proxy({"metrics": {"listen": f"127.0.0.1:{port}", "per_group": True}, "workers": 0})
    assert proxied(p, h).status_code == 200
    text = wait_for(lambda: (t := _get(f"http://127.0.0.1:{port}/metrics")) and "wakeproxy_group_requests" in t and t,
                    10, 0.3, "per-group series")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f'wakeproxy_group_requests_total{{group="{run_id}-m-lint"}} 1.0' in text
    assert 'wakeproxy_build_info{' in text and "wakeproxy_process_cpu_seconds_total" in text
