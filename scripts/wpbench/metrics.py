"""The metrics section: what a scrape costs with 1,000 groups' own series, and what counting costs a request."""

from __future__ import annotations

import time

from wpbench.common import Section, Target, quantile


class MetricsSection:
    """The metrics section of a benchmark run (a part of `core.Bench`)."""

    def metrics(self) -> None:
        from mitmproxy.test import tflow
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import generate_latest
        from wakeproxy.observe import metrics as m

        groups = 1000
        rm = m.RequestMetrics(per_group=True, max_groups=2000)
        flows = []
        for i in range(20_000):
            f = tflow.tflow(resp=True)
            f.metadata["wakeproxy.group"] = f"g{i % groups}"
            flows.append(f)
        t0 = time.perf_counter()
        for f in flows:
            rm.requestheaders(f)
            rm.responseheaders(f)
            rm.response(f)
        per_request_on = (time.perf_counter() - t0) / len(flows) * 1e6
        off = m.RequestMetrics()
        for f in flows:
            f.metadata.pop("wakeproxy.t0", None)
        t0 = time.perf_counter()
        for f in flows:
            off.requestheaders(f)
            off.responseheaders(f)
            off.response(f)
        per_request_off = (time.perf_counter() - t0) / len(flows) * 1e6
        wakes = m.WakeCounts()
        for i in range(groups):
            wakes.wake(f"g{i}", "container", "ok", 0.5 + i % 7, per_group=True, max_groups=2000)
        sample = m.Sample(rm.counts, wakes, {"wakeproxy_sites": float(groups)},
                          {"wakeproxy_group_last_activity_timestamp_seconds":
                               (("group",), tuple(((f"g{i}",), 1.7e9 + i) for i in range(groups))),
                           "wakeproxy_tls_certificate_not_after_timestamp_seconds":
                               (("name",), tuple(((f"g{i}.example.com",), 1.8e9) for i in range(groups)))},
                          {}, {}, m.build_info(), time.time())

        class One:
            def collect(self):  # noqa: ANN201
                yield from m.families(sample)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(One())  # type: ignore[arg-type]
        renders, size = [], 0
        for _ in range(7):
            t0 = time.perf_counter()
            size = len(generate_latest(registry))
            renders.append(time.perf_counter() - t0)
        r50, rmax = quantile(renders, 0.5) * 1000, max(renders) * 1000
        self.targets.append(Target("metrics: a scrape with 1,000 groups' series", "< 300 ms",
                                   f"{r50:.0f} ms (p50), {rmax:.0f} ms (max)", rmax < 300))
        self.note("PYTHONPATH=scripts .venv/bin/python -m wpbench --only metrics")
        self.sections["metrics"] = Section(
            "Metrics: a scrape with 1,000 groups, and the cost per request",
            f"""A sample with `metrics.per_group` series for {groups} groups (requests, wakes, last activity) and
{groups} certificates, rendered by prometheus_client as a scrape renders it (in the exporter's thread,
never on the event loop): {size / 1024:.0f} KiB, **{r50:.0f} ms** p50, {rmax:.0f} ms max over 7 renders.

Counting one request (the RequestMetrics hooks: requestheaders, responseheaders, response), over
{len(flows):,} prepared flows: **{per_request_off:.1f} µs** with per-group series off,
{per_request_on:.1f} µs with them on. At the throughput section's rate of requests, that is the
share of a core the counting takes.
""")
