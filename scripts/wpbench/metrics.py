"""The metrics section: what a scrape costs with 1,000 groups' own series, and what counting costs a request."""

from __future__ import annotations

import concurrent.futures
import threading
import time
import urllib.request

from wpbench.common import Section, Target, free_port, process, quantile
from wpbench.load import wrk, wrk_cmd


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

        def per_request(counter: m.RequestMetrics) -> float:
            """µs of the three hooks a request calls, over every prepared flow."""
            for f in flows:
                f.metadata.pop("wakeproxy.t0", None)
            t0 = time.perf_counter()
            for f in flows:
                counter.requestheaders(f)
                counter.responseheaders(f)
                counter.response(f)
            return (time.perf_counter() - t0) / len(flows) * 1e6

        per_request_on = per_request(rm)
        per_request_off = per_request(m.RequestMetrics())
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
        multi = self._multiprocess_mode(len(flows))
        load = self._scrapes_under_load()
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

The alternative for totals across the serving workers, prometheus_client's multiprocess mode (every
process writes its values to mmap'd files in `PROMETHEUS_MULTIPROC_DIR`; a scrape reads them all),
measured the same way: the same three observations a request makes (a labelled counter, a labelled
histogram, the held histogram) cost **{multi['per_request']:.1f} µs**, and one scrape that merges 2
workers' files {multi['collect_ms']:.0f} ms. Chosen instead: plain counts in each worker, sent with its
activity reports (every 2 s) and summed by the controller — no shared writable directory between the
workers and the controller, and the controller validates every label a worker sends.

**Under load, with {load['sandboxes']:,} sandboxes:** {load['sandboxes']:,} labelled containers (created,
never started: sleeping sandboxes) on this run's network, one serving site, `wrk -c{load['conns']}` for
{load['seconds']} s a run, {load['rounds']} rounds alternating; the proxy with its default workers.
*scraped*: `metrics.per_group` on and `GET /metrics` twice a second during the run.

| proxy | req/s (median) | p50 ms | p99 ms |
|---|---:|---:|---:|
| metrics off (`metrics.listen: null`) | {load['off'][0]:.0f} | {load['off'][1]:.2f} | {load['off'][2]:.2f} |
| metrics on (the default), not scraped | {load['plain'][0]:.0f} | {load['plain'][1]:.2f} | {load['plain'][2]:.2f} |
| metrics on, per-group series, scraped 2×/s | {load['on'][0]:.0f} | {load['on'][1]:.2f} | {load['on'][2]:.2f} |
| ratio on (default) / off | {load['plain'][0] / load['off'][0]:.3f} | | |
| ratio on (per-group, scraped) / off | {load['on'][0] / load['off'][0]:.3f} | | |

Scrapes during the load: {load['scrapes']} ({load['scrape_kib']:.0f} KiB each: per-group series exist
for groups that had traffic, here the one site), **p50 {load['scrape_p50']:.0f} ms, max
{load['scrape_max']:.0f} ms** from the request to the last byte.
""")

    def _scrapes_under_load(self) -> dict:
        n = 500 if self.quick else 1000
        rounds = 1 if self.quick else 5
        seconds, conns = max(self.seconds, 3), self.args.connections
        net = self.network()
        host = self.site()

        def create(i: int) -> str:
            return self.client.api.create_container(
                self.image.id, name=f"{self.run}-msb-{i}", command=["sleep", "86400"],
                labels=self.labels(f"msb-{i}.{self.domain}", **{"wpbench.kind": "metrics"}),
                host_config=self.client.api.create_host_config(network_mode=net.name))["Id"]

        self.note(f"seq 0 {n - 1} | xargs -P16 -I{{}} docker create --name {self.run}-msb-{{}} --network {net.name} "
                  f"--label wpbench.run={self.run} --label wakeproxy.host=msb-{{}}.{self.domain} "
                  f"--label wakeproxy.idle-timeout=0 {self.run}-img sleep 86400")
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(n)))
        try:
            metrics_port = free_port()
            cfg_off, ports = self.proxy_config("metrics-off", networks=[net.name])
            cfg_on = self.tmp / "metrics-on.yaml"
            cfg_on.write_text(cfg_off.read_text().replace("metrics-off", "metrics-on")
                              + f'metrics: {{listen: "127.0.0.1:{metrics_port}", per_group: true}}\n')
            cfg_plain = self.tmp / "metrics-plain.yaml"
            cfg_plain.write_text(cfg_off.read_text().replace("metrics-off", "metrics-plain")
                                 + f'metrics: {{listen: "127.0.0.1:{metrics_port}"}}\n')
            cfg_off.write_text(cfg_off.read_text() + "metrics: {listen: null}\n")
            url = f"http://127.0.0.1:{ports['http']}/small"
            results: dict[str, list] = {"off": [], "plain": [], "on": []}
            scrape_times: list[float] = []
            size = 0
            for _ in range(rounds):
                for tag, cfg in (("off", cfg_off), ("plain", cfg_plain), ("on", cfg_on)):
                    argv = self.wakeproxy_cmd(cfg)
                    self.cmd(argv)
                    with process(argv, self.tmp / f"metrics-{tag}.log", ready=(ports["http"], host), timeout=60):
                        time.sleep(2.5)  # the workers' first full reports, the first samples
                        wrk(url, host, 1, conns)  # warm-up
                        stop = threading.Event()

                        def scrape(stop: threading.Event = stop) -> None:
                            nonlocal size
                            while not stop.wait(0.5):
                                t0 = time.perf_counter()
                                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                                            timeout=10) as r:
                                    size = len(r.read())
                                scrape_times.append(time.perf_counter() - t0)

                        scraper = threading.Thread(target=scrape, daemon=True) if tag == "on" else None
                        if scraper is not None:
                            scraper.start()
                        self.cmd(wrk_cmd(url, host, seconds, conns))
                        r = wrk(url, host, seconds, conns)
                        stop.set()
                        if scraper is not None:
                            scraper.join(15)
                        results[tag].append((r.rps, r.p50, r.p99))
        finally:
            self.remove_containers({"wpbench.kind": "metrics"})

        def median(rows: list, i: int) -> float:
            return quantile([row[i] for row in rows], 0.5)

        out = {tag: (median(rows, 0), median(rows, 1), median(rows, 2)) for tag, rows in results.items()}
        s50 = quantile(scrape_times, 0.5) * 1000 if scrape_times else float("nan")
        smax = max(scrape_times) * 1000 if scrape_times else float("nan")
        self.targets.append(Target("metrics on (1,000 sandboxes, scraped 2×/s) vs off: req/s", "no measurable cost",
                                   f"ratio {out['on'][0] / out['off'][0]:.3f}; scrape max {smax:.0f} ms",
                                   out["on"][0] / out["off"][0] >= 0.95 and smax < 300))
        return {"sandboxes": n, "rounds": rounds, "seconds": seconds, "conns": conns, "off": out["off"],
                "plain": out["plain"], "on": out["on"], "scrapes": len(scrape_times), "scrape_kib": size / 1024, "scrape_p50": s50,
                "scrape_max": smax}

    def _multiprocess_mode(self, n: int) -> dict:
        """prometheus_client's multiprocess mode, in a child process with its own PROMETHEUS_MULTIPROC_DIR."""
        import json
        import os
        import subprocess
        import sys

        folder = self.tmp / "multiproc"
        folder.mkdir(exist_ok=True)
        script = f"""
import json, os, time
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.exposition import generate_latest
b = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
c = Counter("r", "r", ["code", "method"]); h = Histogram("d", "d", ["code"], buckets=b)
held = Histogram("held", "h", buckets=b)
t0 = time.perf_counter()
for i in range({n}):
    c.labels("2xx", "GET").inc(); h.labels("2xx").observe(0.01); held.observe(0.5)
per = (time.perf_counter() - t0) / {n} * 1e6
if os.fork() == 0:  # a second worker's files
    c.labels("2xx", "POST").inc(); os._exit(0)
os.wait()
reg = CollectorRegistry(); multiprocess.MultiProcessCollector(reg)
t0 = time.perf_counter(); generate_latest(reg); collect = (time.perf_counter() - t0) * 1000
print(json.dumps({{"per_request": per, "collect_ms": collect}}))
"""
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

