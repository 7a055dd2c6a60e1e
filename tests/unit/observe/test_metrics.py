"""observe/metrics.py: counting on the request path, the wire form workers send, sums that never go
down, and the exposition prometheus_client renders from a sample (parsed back here)."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest
from mitmproxy import http
from mitmproxy.test import tflow
from prometheus_client.parser import text_string_to_metric_families
from wakeproxy.config import Address
from wakeproxy.observe import metrics as m


def families_of(sample: m.Sample) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    class One:
        def collect(self):  # noqa: ANN201
            yield from m.families(sample)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def sample_of(counts: m.Counts, wakes: m.WakeCounts | None = None) -> m.Sample:
    return m.Sample(counts, wakes or m.WakeCounts(), {"wakeproxy_sites": 3.0},
                    {"wakeproxy_groups": (("state",), ((("running",), 1.0), (("asleep",), 2.0)))},
                    {"wakeproxy_docker_events": 7.0}, {"wakeproxy_acme_orders": (("result",), ((("issued",), 1.0),))},
                    {"version": "1", "mitmproxy": "12", "python": "3"}, 0.0)


def served(rm: m.RequestMetrics, method: str = "GET", status: int | None = 200, http2: bool = False,
           page: str | None = None, group: str | None = None, held: bool = False) -> http.HTTPFlow:
    f = tflow.tflow(resp=status is not None)
    f.request.method = method
    if http2:
        f.request.http_version = "HTTP/2.0"
    if group is not None:
        f.metadata["wakeproxy.group"] = group
    rm.requestheaders(f)
    if held:
        f.metadata["wakeproxy.wake"] = object()
    if status is None:
        f.response = None
        rm.error(f)
        return f
    assert f.response is not None
    f.response.status_code = status
    if page is not None:
        f.response.headers["X-Wakeproxy"] = page
    rm.responseheaders(f)
    rm.response(f)
    return f


def test_requests_are_counted_under_bounded_labels() -> None:
    rm = m.RequestMetrics()
    served(rm)
    served(rm, "POST", 201)
    served(rm, "BREW", 418)  # a method nobody knows: "other", never a label of its own
    served(rm, status=503, page="error")
    served(rm, status=200, page="waking")
    served(rm, status=None)
    f = served(rm, http2=True, held=True)
    c = rm.counts
    assert c.requests == {"2xx GET": 3, "2xx POST": 1, "4xx other": 1, "5xx GET": 1, "none GET": 1}
    assert c.pages == {"503": 1, "waking": 1}
    assert c.inflight == 0 and c.held.count == 1
    assert sum(h.count for h in c.durations.values()) == 7
    assert c.connections == {"http1": 6, "h2": 1}  # tflow gives every flow a connection of its own
    rm.client_disconnected(f.client_conn)
    assert c.connections["h2"] == 0
    rm.response(f)  # a second end of the same flow is not counted again
    assert sum(c.requests.values()) == 7


def test_per_group_counts_are_opt_in_and_bounded() -> None:
    rm = m.RequestMetrics()
    served(rm, group="a")
    assert rm.counts.groups == {}
    rm.configure_from(per_group=True, max_groups=2)
    for g in ("a", "b", "c", "d", "a"):
        served(rm, group=g)
    assert rm.counts.groups == {"a": 2, "b": 1, "other": 2}


def test_the_wire_form_round_trips_and_refuses_what_a_worker_could_not_have_counted() -> None:
    rm = m.RequestMetrics(per_group=True)
    served(rm, group="g")
    served(rm, status=404, page="error")
    back = m.Counts.from_wire(rm.counts.wire(), max_groups=10)
    assert back == rm.counts
    for bad in ({"requests": {"2xx ATTACK": 1}}, {"pages": {"<script>": 1}}, {"requests": {"2xx GET": -1}},
                {"durations": {"2xx": [[1, 2], 0.0]}}, {"connections": {"gopher": 1}}, "nope",
                {"groups": {f"g{i}": 1 for i in range(20)}}):
        with pytest.raises((ValueError, TypeError)):
            m.Counts.from_wire(bad, max_groups=10)


def test_sums_keep_the_counters_of_a_worker_that_left() -> None:
    a, b = m.RequestMetrics(), m.RequestMetrics()
    served(a)
    served(b)
    served(b)
    retired = m.Counts()
    retired.add_counters(a.counts)  # worker a is gone
    total = retired.copy()
    total.add(b.counts)
    assert total.requests == {"2xx GET": 3}


def test_the_exposition_has_the_values_and_the_histogram_buckets() -> None:
    rm = m.RequestMetrics()
    served(rm)
    served(rm, status=503, page="error")
    w = m.WakeCounts()
    w.wake("g", "container", "ok", 0.7, per_group=False, max_groups=1)
    w.wake("g", "service", "timeout", 61.0, per_group=False, max_groups=1)
    w.stop("stop", "idle")
    fams = families_of(sample_of(rm.counts, w))
    assert fams["wakeproxy_http_requests_total"][(("code", "2xx"), ("method", "GET"))] == 1
    assert fams["wakeproxy_http_requests_total"][(("code", "5xx"), ("method", "GET"))] == 1
    assert fams["wakeproxy_pages_served_total"][(("page", "503"),)] == 1
    assert fams["wakeproxy_wakes_total"][(("kind", "service"), ("result", "timeout"))] == 1
    buckets = fams["wakeproxy_wake_duration_seconds_bucket"]
    assert buckets[(("le", "1"), ("result", "ok"))] == 1 and buckets[(("le", "60"), ("result", "timeout"))] == 0
    assert buckets[(("le", "+Inf"), ("result", "timeout"))] == 1
    assert fams["wakeproxy_idle_stops_total"][(("action", "stop"), ("reason", "idle"))] == 1
    assert fams["wakeproxy_groups"][(("state", "asleep"),)] == 2
    assert fams["wakeproxy_sites"][()] == 3 and fams["wakeproxy_docker_events_total"][()] == 7
    assert fams["wakeproxy_acme_orders_total"][(("result", "issued"),)] == 1
    assert fams["wakeproxy_build_info"][(("mitmproxy", "12"), ("python", "3"), ("version", "1"))] == 1


def test_the_exporter_serves_its_sample_on_its_own_listener_and_a_taken_port_is_a_warning(caplog) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rm = m.RequestMetrics()
    served(rm)
    exporter = m.MetricsExporter({"counts": lambda: rm.counts.copy()})

    async def run() -> str:
        exporter.start(Address("127.0.0.1", port))
        exporter.running()
        try:
            return await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        finally:
            await exporter.done()

    text = asyncio.run(run())
    assert 'wakeproxy_http_requests_total{code="2xx",method="GET"} 1.0' in text
    assert "wakeproxy_process_resident_memory_bytes" in text or "process" not in text
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        other = m.MetricsExporter({})
        other.start(Address("127.0.0.1", taken))
        assert other._server is None
        assert any("cannot listen" in r.getMessage() for r in caplog.records)


def test_a_requests_clock_starts_before_the_router_can_hold_it() -> None:
    """mitmproxy runs a flow's hooks addon by addon, awaiting each: the router's requestheaders holds a
    request for a wake, so the metrics must come before it (or the hold would not be in the durations)."""
    from wakeproxy import bundle
    from wakeproxy.routing.router import Router

    for make in (bundle.make_addons, bundle.make_worker_addons):
        addons = make()
        kinds = [type(a) for a in addons]
        assert kinds.index(m.RequestMetrics) < kinds.index(Router), make.__name__
