"""Prometheus metrics: counted where requests are served, summed where they are exported.

- `Counts` is the request side of one serving process (a worker, or the single process of
  `mitmdump -s` / `workers: 0`): plain numbers under fixed label sets (code class, a bounded method
  list, our pages, protocols), so the label space never grows with what clients send. Per-group
  request counts only with `metrics.per_group`, at most `metrics.max_groups` of them.
- `RequestMetrics` is the addon that fills a `Counts` from the request hooks (a few dict updates per
  request; no prometheus_client on the request path).
- Workers send their `Counts` with every full activity report (planes/worker.py); the controller keeps
  the last one per worker and adds a departed worker's counters to `retired`, so totals never go down
  when a worker is replaced (`Aggregate`).
- `MetricsExporter` (controller, or the single process) samples everything once a second on the event
  loop into an immutable `Sample` and serves `GET /metrics` from prometheus_client's HTTP server in a
  thread of its own, rendering only that sample: a scrape never runs on the event loop, and never
  reads state the loop is changing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, http

from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "none")  # none: no response (the client went, an error)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other")
PAGES = ("400", "404", "408", "413", "421", "429", "431", "502", "503", "504", "waking", "other")
PROTOCOLS = ("http1", "h2", "websocket")
# Request latency: the default buckets, and a tail for requests held while a sandbox wakes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
WAKE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
SAMPLE_INTERVAL = 1.0  # seconds between samples of the controller's state (what a scrape shows)
OTHER = "other"
_METHODS = frozenset(METHODS)


@dataclass
class Histogram:
    """Cumulative bucket counts (the last one is +Inf) and the sum of what was observed."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            return
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs as Prometheus wants them, +Inf last."""
        out, running = [], 0
        for bound, n in zip([*map(_le, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out

    def wire(self) -> list[Any]:
        return [list(self.counts), self.total]

    @classmethod
    def from_wire(cls, bounds: tuple[float, ...], data: Any) -> Histogram:
        counts, total = data
        if not isinstance(counts, list) or len(counts) != len(bounds) + 1:
            raise ValueError("a histogram of another shape")
        values = [int(c) for c in counts]
        if any(c < 0 for c in values) or not math.isfinite(float(total)) or float(total) < 0:
            raise ValueError("a histogram with negative or infinite values")
        return cls(bounds, values, float(total))


def _le(bound: float) -> str:
    return f"{bound:g}"


def code_class(status: int | None) -> str:
    return f"{status // 100}xx" if status is not None and 100 <= status <= 599 else "none"


def method_label(method: str) -> str:
    return method if method in _METHODS else OTHER


def page_label(response: http.Response) -> str | None:
    """Which of our pages a response is (X-Wakeproxy: error | waking), else None (the app's answer)."""
    kind = response.headers.get("x-wakeproxy")
    if kind is None:
        return None
    if kind == "waking":
        return "waking"
    code = str(response.status_code)
    return code if code in PAGES else OTHER


@dataclass
class Counts:
    """The cumulative request metrics of one serving process (counters) and its gauges now."""

    requests: dict[str, int] = field(default_factory=dict)  # "2xx GET" → requests
    durations: dict[str, Histogram] = field(default_factory=dict)  # code class → latency
    held: Histogram = field(default_factory=lambda: Histogram(WAKE_BUCKETS))  # held by a wake: first byte after
    pages: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)  # group → requests (metrics.per_group only)
    inflight: int = 0
    connections: dict[str, int] = field(default_factory=dict)  # protocol → open now

    def add_counters(self, other: Counts) -> None:
        """Add `other`'s counters (not its gauges): a departed worker's totals stay in the sums."""
        for mine, theirs in ((self.requests, other.requests), (self.pages, other.pages), (self.groups, other.groups)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for k, h in other.durations.items():
            self.durations.setdefault(k, Histogram(DURATION_BUCKETS)).add(h)
        self.held.add(other.held)

    def add(self, other: Counts) -> None:
        self.add_counters(other)
        self.inflight += other.inflight
        for k, v in other.connections.items():
            self.connections[k] = self.connections.get(k, 0) + v

    def copy(self) -> Counts:
        return Counts.from_wire(self.wire(), max_groups=len(self.groups) + 1)

    def wire(self) -> dict[str, Any]:
        return {"requests": dict(self.requests), "durations": {k: h.wire() for k, h in self.durations.items()},
                "held": self.held.wire(), "pages": dict(self.pages), "groups": dict(self.groups),
                "inflight": self.inflight, "connections": dict(self.connections)}

    @classmethod
    def from_wire(cls, data: Any, max_groups: int) -> Counts:
        """From a worker's report: only the label values this module makes; raises ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError("metrics are not a mapping")
        valid_requests = {f"{c} {m}" for c in CODE_CLASSES for m in METHODS}
        out = cls(
            requests=_counter(data.get("requests"), valid_requests.__contains__, "requests"),
            durations={str(k): Histogram.from_wire(DURATION_BUCKETS, v)
                       for k, v in _mapping(data.get("durations"), CODE_CLASSES.__contains__, "durations").items()},
            held=Histogram.from_wire(WAKE_BUCKETS, data.get("held") or [[0] * (len(WAKE_BUCKETS) + 1), 0.0]),
            pages=_counter(data.get("pages"), PAGES.__contains__, "pages"),
            groups=_counter(data.get("groups"), lambda k: isinstance(k, str) and len(k) <= 200, "groups"),
            inflight=max(0, int(data.get("inflight") or 0)),
            connections=_counter(data.get("connections"), PROTOCOLS.__contains__, "connections"),
        )
        if len(out.groups) > max_groups + 1:
            raise ValueError(f"{len(out.groups)} groups in the metrics, more than metrics.max_groups")
        return out


def _mapping(value: Any, valid: Callable[[Any], bool], what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"metrics {what} are not a mapping")
    bad = [k for k in value if not valid(k)]
    if bad:
        raise ValueError(f"metrics {what}: unknown label {str(bad[0])[:40]!r}")
    return dict(value)


def _counter(value: Any, valid: Callable[[Any], bool], what: str) -> dict[str, int]:
    out = {str(k): int(v) for k, v in _mapping(value, valid, what).items()}
    if any(v < 0 for v in out.values()):
        raise ValueError(f"metrics {what}: a negative count")
    return out


class RequestMetrics:
    """Counts every request this process serves (an addon; the request path's only metrics work)."""

    def __init__(self, per_group: bool = False, max_groups: int = 2000) -> None:
        self.counts = Counts()
        self.per_group, self.max_groups = per_group, max_groups
        self._conns: dict[str, str] = {}  # client connection id → its protocol, once it sent a request

    def configure_from(self, per_group: bool, max_groups: int) -> None:
        self.per_group, self.max_groups = per_group, max_groups

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if "wakeproxy.t0" in flow.metadata:
            return
        flow.metadata["wakeproxy.t0"] = time.monotonic()
        self.counts.inflight += 1
        cid = flow.client_conn.id
        if cid not in self._conns:
            proto = "h2" if flow.request.http_version == "HTTP/2.0" else "http1"
            self._conns[cid] = proto
            self.counts.connections[proto] = self.counts.connections.get(proto, 0) + 1

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        t0 = flow.metadata.get("wakeproxy.t0")
        if t0 is not None and "wakeproxy.wake" in flow.metadata and "wakeproxy.held" not in flow.metadata:
            flow.metadata["wakeproxy.held"] = True
            self.counts.held.observe(time.monotonic() - t0)

    def response(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self.counts.connections["websocket"] = self.counts.connections.get("websocket", 0) + 1

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.counts.connections["websocket"] = max(0, self.counts.connections.get("websocket", 0) - 1)

    def client_disconnected(self, client: connection.Client) -> None:
        proto = self._conns.pop(client.id, None)
        if proto is not None:
            self.counts.connections[proto] = max(0, self.counts.connections.get(proto, 0) - 1)

    def _done(self, flow: http.HTTPFlow) -> None:
        t0 = flow.metadata.pop("wakeproxy.t0", None)
        if t0 is None:
            return  # counted already (a response after an error), or never started here
        c = self.counts
        c.inflight = max(0, c.inflight - 1)
        response = flow.response
        cls = code_class(response.status_code if response is not None else None)
        key = f"{cls} {method_label(flow.request.method)}"
        c.requests[key] = c.requests.get(key, 0) + 1
        hist = c.durations.get(cls)
        if hist is None:
            hist = c.durations[cls] = Histogram(DURATION_BUCKETS)
        hist.observe(time.monotonic() - t0)
        if response is not None:
            page = page_label(response)
            if page is not None:
                c.pages[page] = c.pages.get(page, 0) + 1
        if self.per_group:
            group = flow.metadata.get("wakeproxy.group")
            if isinstance(group, str):
                if group not in c.groups and len(c.groups) >= self.max_groups:
                    group = OTHER
                c.groups[group] = c.groups.get(group, 0) + 1


@dataclass
class WakeCounts:
    """The controller's (or the single process's) wakes and idle stops, cumulative."""

    wakes: dict[str, int] = field(default_factory=dict)  # "container ok", "service timeout", …
    durations: dict[str, Histogram] = field(default_factory=dict)  # result → wake duration
    stops: dict[str, int] = field(default_factory=dict)  # "stop idle", "pause idle", "scale0 idle", "remove unused"
    group_wakes: dict[str, int] = field(default_factory=dict)  # per_group only

    def wake(self, group: str, kind: str, result: str, seconds: float, per_group: bool, max_groups: int) -> None:
        key = f"{kind} {result}"
        self.wakes[key] = self.wakes.get(key, 0) + 1
        self.durations.setdefault(result, Histogram(WAKE_BUCKETS)).observe(seconds)
        if per_group:
            if group not in self.group_wakes and len(self.group_wakes) >= max_groups:
                group = OTHER
            self.group_wakes[group] = self.group_wakes.get(group, 0) + 1

    def stop(self, action: str, reason: str) -> None:
        key = f"{action} {reason}"
        self.stops[key] = self.stops.get(key, 0) + 1


@dataclass(frozen=True)
class Sample:
    """Everything a scrape shows, taken on the event loop; rendered in the exporter's thread."""

    counts: Counts
    wakes: WakeCounts
    gauges: Mapping[str, float]  # name → value (no labels)
    labelled: Mapping[str, tuple[tuple[str, ...], tuple[tuple[tuple[str, ...], float], ...]]]  # gauges with labels
    counters: Mapping[str, float]
    labelled_counters: Mapping[str, tuple[tuple[str, ...], tuple[tuple[tuple[str, ...], float], ...]]]
    build: Mapping[str, str]
    taken: float


def build_info() -> dict[str, str]:
    import mitmproxy.version

    try:
        import importlib.metadata

        version = importlib.metadata.version("wakeproxy")
    except Exception:  # noqa: BLE001 - run from a checkout without an install
        version = "unknown"
    return {"version": version, "mitmproxy": mitmproxy.version.VERSION, "python": platform.python_version()}


def families(sample: Sample) -> Iterator[Any]:
    """The metric families of a sample (prometheus_client's core types), for the collector."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    def counter(name: str, doc: str, labels: list[str], rows: Iterable[tuple[str, float]]) -> Any:
        """A counter whose label values are the row keys split at spaces ("2xx GET")."""
        fam = CounterMetricFamily(name, doc, labels=labels)
        for key, n in rows:
            fam.add_metric(key.split(" ", len(labels) - 1), n)
        return fam

    def histogram(name: str, doc: str, label: str | None, rows: Iterable[tuple[str, Histogram]]) -> Any:
        fam = HistogramMetricFamily(name, doc, labels=[label] if label else [])
        for key, h in rows:
            fam.add_metric([key] if label else [], h.cumulative(), h.total)
        return fam

    c, w = sample.counts, sample.wakes
    yield counter("wakeproxy_http_requests", "Requests answered, by status class and method", ["code", "method"],
                  sorted(c.requests.items()))
    yield histogram("wakeproxy_http_request_duration_seconds",
                    "Time from the request's head to the end of the answer, by status class", "code",
                    sorted(c.durations.items()))
    yield histogram("wakeproxy_wake_held_seconds",
                    "Requests that waited for a wake: time until the first byte of the answer", None, [("", c.held)])
    yield GaugeMetricFamily("wakeproxy_http_requests_in_flight", "Requests being answered now", value=c.inflight)
    conns = GaugeMetricFamily("wakeproxy_open_connections", "Client connections open now, by protocol",
                              labels=["protocol"])
    for proto in PROTOCOLS:
        conns.add_metric([proto], c.connections.get(proto, 0))
    yield conns
    yield counter("wakeproxy_pages_served", "The proxy's own pages (errors, the waking page)", ["page"],
                  [(p, c.pages.get(p, 0)) for p in PAGES])
    if c.groups:
        yield counter("wakeproxy_group_requests", "Requests routed to a group (metrics.per_group)", ["group"],
                      sorted(c.groups.items()))
    yield counter("wakeproxy_wakes", "Wakes of sleeping groups, by kind and result", ["kind", "result"],
                  sorted(w.wakes.items()))
    yield histogram("wakeproxy_wake_duration_seconds",
                    "From the first request to a sleeping group until it is ready, by result", "result",
                    sorted(w.durations.items()))
    yield counter("wakeproxy_idle_stops", "Groups put to sleep, by action and reason", ["action", "reason"],
                  sorted(w.stops.items()))
    if w.group_wakes:
        yield counter("wakeproxy_group_wakes", "Wakes per group (metrics.per_group)", ["group"],
                      sorted(w.group_wakes.items()))
    for name, value in sorted(sample.gauges.items()):
        yield GaugeMetricFamily(name, _HELP.get(name, name), value=value)
    for name, value in sorted(sample.counters.items()):
        yield CounterMetricFamily(name, _HELP.get(name, name), value=value)
    for kind, table in ((GaugeMetricFamily, sample.labelled), (CounterMetricFamily, sample.labelled_counters)):
        for name, (labels, rows) in sorted(table.items()):
            fam = kind(name, _HELP.get(name, name), labels=list(labels))
            for values, value in rows:
                fam.add_metric(list(values), value)
            yield fam
    info = GaugeMetricFamily("wakeproxy_build_info", "wakeproxy's version, and mitmproxy's and Python's",
                             labels=sorted(sample.build))
    info.add_metric([sample.build[k] for k in sorted(sample.build)], 1)
    yield info


_HELP = {
    "wakeproxy_sites": "Hosts (and wildcards) with a site",
    "wakeproxy_groups": "Groups by state",
    "wakeproxy_name_conflicts": "Claims on a name another group owns",
    "wakeproxy_names_refused": "Claims the operator's policy refuses",
    "wakeproxy_containers_skipped": "Containers skipped for bad labels",
    "wakeproxy_docker_connected": "1 while the proxy sees the Docker engine",
    "wakeproxy_docker_events": "Docker events read",
    "wakeproxy_docker_resyncs": "Full listings of the engine (start, reconnects)",
    "wakeproxy_docker_api_errors": "Engine calls that failed (connection lost, refused listings)",
    "wakeproxy_tls_certificate_not_after_timestamp_seconds": "When each certificate in service expires",
    "wakeproxy_acme_orders": "ACME orders, by result",
    "wakeproxy_config_reloads": "Config reloads, by result",
    "wakeproxy_config_last_reload_success_timestamp_seconds": "When the config was last loaded",
    "wakeproxy_workers": "Serving workers connected to the controller",
    "wakeproxy_group_last_activity_timestamp_seconds": "Last request or byte of a group (metrics.per_group)",
}


class _Collector:
    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Any]:
        sample = self.exporter.sample
        if sample is not None:
            yield from families(sample)


class MetricsExporter:
    """`GET /metrics` on metrics.listen: samples on the loop, renders in prometheus_client's thread.

    `sources`: callables the owner registers, each returning plain data for the sample: "counts" (the
    serving processes' Counts, summed), "wakes" (WakeCounts), "gauges", "labelled", "counters"."""

    def __init__(self, sources: dict[str, Callable[[], Any]]) -> None:
        self.sources = sources
        self.sample: Sample | None = None
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._listen: Any = None
        self._build = build_info()

    def start(self, listen: Any) -> None:
        """Serve on `listen` (an Address; None: off). A port that cannot be bound is one warning."""
        if listen == self._listen and (self._server is not None or listen is None):
            return
        self.stop_server()
        self._listen = listen
        if listen is None:
            return
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import start_http_server
        from prometheus_client.process_collector import ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        ProcessCollector(registry=registry, namespace="wakeproxy")
        try:
            self._server, _thread = start_http_server(listen.port, addr=listen.host, registry=registry)
        except OSError as e:
            logger.warning(f"metrics: cannot listen on {listen.host}:{listen.port} ({e}); no metrics "
                           "(metrics.listen)")
            self._server = None
            return
        logger.info(f"metrics on http://{listen.host}:{listen.port}/metrics")

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def running(self) -> None:
        self.take()
        self._task = asyncio.get_running_loop().create_task(self._sample_forever(), name="metrics samples")

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.stop_server()

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            try:
                self.take()
            except Exception:  # noqa: BLE001 - a broken source must not end the samples
                logger.exception("metrics: sampling failed")

    def take(self) -> Sample:
        def get(name: str, default: Any) -> Any:
            fn = self.sources.get(name)
            return fn() if fn is not None else default

        sample = Sample(get("counts", Counts()), get("wakes", WakeCounts()), dict(get("gauges", {})),
                        dict(get("labelled", {})), dict(get("counters", {})), dict(get("labelled_counters", {})),
                        self._build, time.time())
        self.sample = sample
        return sample


def copy_wakes(w: WakeCounts) -> WakeCounts:
    return WakeCounts(dict(w.wakes), {k: dataclasses.replace(h, counts=list(h.counts)) for k, h in w.durations.items()},
                      dict(w.stops), dict(w.group_wakes))


def summed(parts: Iterable[Counts]) -> Counts:
    out = Counts()
    for part in parts:
        out.add(part)
    return out


Rows = tuple[tuple[tuple[str, ...], float], ...]


class Metrics:
    """The metrics addon of the controller (or of the single process): what it samples, and the exporter.

    `requests`: this process's RequestMetrics (single process); `plane`: the controller's plane, whose
    `metrics_counts()` sums the workers' reports."""

    def __init__(self, runtime: Any, status: Any, orchestrator: Any, idle: Any, certificates: Any, core: Any,
                 acme: Any = None, plane: Any = None, requests: RequestMetrics | None = None) -> None:
        self.runtime, self.status, self.idle, self.certificates = runtime, status, idle, certificates
        self.core, self.acme, self.plane, self.requests = core, acme, plane, requests
        self.wakes = WakeCounts()
        self._started = False
        orchestrator.outcomes.append(self._wake)
        idle.stops.append(self._stop)
        self.exporter = MetricsExporter({
            "counts": self._counts, "wakes": lambda: copy_wakes(self.wakes), "gauges": self._gauges,
            "labelled": self._labelled, "counters": self._counters, "labelled_counters": self._labelled_counters,
        })

    def configure(self, updated: set[str]) -> None:
        cfg = self.runtime.config.metrics
        if self.requests is not None:
            self.requests.configure_from(cfg.per_group, cfg.max_groups)
        if self._started:
            self.exporter.start(cfg.listen)

    def running(self) -> None:
        self._started = True
        self.exporter.start(self.runtime.config.metrics.listen)
        self.exporter.running()

    async def done(self) -> None:
        await self.exporter.done()

    # --- what is counted here -------------------------------------------------------------------

    def _wake(self, wake: Any, result: str, seconds: float) -> None:
        snap = self.runtime.snapshot
        members = [c for m in wake.members if (c := snap.containers.get(m)) is not None]
        services = sum(1 for c in members if c.is_service)
        kind = "service" if members and services == len(members) else "container" if not services else "mixed"
        cfg = self.runtime.config.metrics
        self.wakes.wake(wake.group, kind, result, seconds, cfg.per_group, cfg.max_groups)

    def _stop(self, group: str, action: str, reason: str) -> None:
        self.wakes.stop(action, reason)

    # --- the sources of a sample (on the loop, once a second) --------------------------------------

    def _counts(self) -> Counts:
        if self.plane is not None:
            return self.plane.metrics_counts()
        return self.requests.counts.copy() if self.requests is not None else Counts()

    def _gauges(self) -> dict[str, float]:
        snap = self.runtime.snapshot
        out = {
            "wakeproxy_sites": float(len(snap.exact) + len(snap.wildcards)),
            "wakeproxy_name_conflicts": float(sum(1 for r in snap.refused if r.owner is not None)),
            "wakeproxy_names_refused": float(sum(1 for r in snap.refused if r.owner is None)),
            "wakeproxy_containers_skipped": float(len(snap.skipped)),
            "wakeproxy_docker_connected": 1.0 if self.runtime.engine.state == "connected" else 0.0,
        }
        if getattr(self.core, "loaded_at", 0.0):
            out["wakeproxy_config_last_reload_success_timestamp_seconds"] = float(self.core.loaded_at)
        if self.plane is not None:
            out["wakeproxy_workers"] = float(len(self.plane.workers))
        return out

    def _labelled(self) -> dict[str, tuple[tuple[str, ...], Rows]]:
        counts = self.status.counts(self.status.groups())
        states = ("running", "asleep", "paused", "waking", "stopping", "removing")
        out: dict[str, tuple[tuple[str, ...], Rows]] = {
            "wakeproxy_groups": (("state",), tuple(((st,), float(counts.get(st, 0))) for st in states)),
        }
        expiries = self.certificates.expiries()
        if expiries:
            out["wakeproxy_tls_certificate_not_after_timestamp_seconds"] = (
                ("name",), tuple(((n,), t) for n, t in sorted(expiries.items())))
        cfg = self.runtime.config.metrics
        if cfg.per_group:
            clocks = sorted((name, act.last) for name, act in self.idle.activity.items())[: cfg.max_groups]
            out["wakeproxy_group_last_activity_timestamp_seconds"] = (
                ("group",), tuple(((g,), float(t)) for g, t in clocks))
        return out

    def _counters(self) -> dict[str, float]:
        view = getattr(self.core, "view", None)
        stats = dict(view.stats) if view is not None else {}
        return {"wakeproxy_docker_events": float(stats.get("events", 0)),
                "wakeproxy_docker_resyncs": float(stats.get("resyncs", 0)),
                "wakeproxy_docker_api_errors": float(stats.get("errors", 0))}

    def _labelled_counters(self) -> dict[str, tuple[tuple[str, ...], Rows]]:
        out: dict[str, tuple[tuple[str, ...], Rows]] = {}
        reloads = getattr(self.core, "reloads", None)
        if reloads is not None:
            out["wakeproxy_config_reloads"] = (("result",), tuple(((k,), float(v)) for k, v in sorted(reloads.items())))
        if self.acme is not None:
            out["wakeproxy_acme_orders"] = (("result",), tuple(((k,), float(v))
                                                               for k, v in sorted(self.acme.orders.items())))
        return out

