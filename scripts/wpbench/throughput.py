"""The throughput section."""

from __future__ import annotations

import contextlib
import statistics
import subprocess

from wpbench.common import REPO, VENV_BIN, Section, Target, cpu_seconds, free_port, process
from wpbench.load import Load, h2load, h2load_cmd, wrk, wrk_cmd
from wpbench.profile import COMPONENTS, components

ONE_PROCESS = "wakeproxy, one process (workers: 0)"
TWO_WORKERS = "wakeproxy, 2 workers"


def child_of(pid: int, role: str) -> int | None:
    """The `role` ("_controller", "_worker") process under a `wakeproxy` supervisor (None for one process)."""
    from pathlib import Path

    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if role.encode() in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                return int(child)
    return None


class ThroughputSection:
    """The throughput section of a benchmark run (a part of `core.Bench`)."""

    def throughput(self) -> None:
        b, f, caddy = self.backend(), self.front(), self.caddy()
        host = self.site()
        tmp = self.tmp
        seconds, conns, rounds = self.seconds, self.args.connections, self.rounds
        # "wakeproxy": the `wakeproxy` command with one serving worker (+ its controller); the same
        # with two workers, and everything in one process (workers: 0, as before the split).
        cfg, wp = self.proxy_config("throughput", networks=[], workers=1)
        cfg2, wp2 = self.proxy_config("throughput-2w", networks=[], workers=2)
        cfg0, wp0 = self.proxy_config("throughput-1p", networks=[], workers=0)
        cfg_stock, stock_ports = self.proxy_config("throughput-stock", networks=[])  # the same, other ports
        bare_port = free_port()
        route = tmp / "route.py"
        route.write_text(f'''"""Bare routing for stock mitmdump: every request goes to the backend nginx."""
from mitmproxy import http


def requestheaders(flow: http.HTTPFlow) -> None:
    host_header = flow.request.host_header
    flow.request.scheme = "http"
    flow.request.host = "127.0.0.1"  # this setter rewrites Host …
    flow.request.port = {b['http']}
    flow.request.host_header = host_header  # … so put the client's back
''')
        mitmdump = str(VENV_BIN / "mitmdump")
        # name → (argv or None, plain-HTTP port, TLS port)
        targets: dict[str, tuple[list[str] | None, int, int]] = {
            "direct (nginx)": (None, b["http"], b["https"]),
            "nginx reverse proxy": (None, f["http"], f["https"]),
            **({"caddy reverse proxy": (None, caddy["http"], caddy["https"])} if caddy else {}),
            "stock mitmdump + bare routing script": ([
                mitmdump, "-q", "-s", str(route), "--mode", f"reverse:http://127.0.0.1:1@127.0.0.1:{bare_port}",
                "--set", "connection_strategy=lazy", "--set", "keep_host_header=true",
                "--set", "upstream_cert=false", "--set", f"confdir={tmp}/mitm-bare",
            ], bare_port, bare_port),
            "stock mitmdump -s addons/wakeproxy.py": ([
                mitmdump, "-q", "-s", str(REPO / "addons" / "wakeproxy.py"), "--set", f"wakeproxy_config={cfg_stock}",
            ], stock_ports["http"], stock_ports["https"]),
            ONE_PROCESS: (self.wakeproxy_cmd(cfg0), wp0["http"], wp0["https"]),
            "wakeproxy": (self.wakeproxy_cmd(cfg), wp["http"], wp["https"]),
            TWO_WORKERS: (self.wakeproxy_cmd(cfg2), wp2["http"], wp2["https"]),
        }
        scenarios = {
            "h1-small": ("HTTP/1.1, 100 B", "h1", "/small"),
            "h1-large": ("HTTP/1.1, 100 KB", "h1", "/large"),
            "h1tls-small": ("HTTP/1.1 over TLS, 100 B", "h1tls", "/small"),
            "h2-small": ("HTTP/2 over TLS, 100 B", "h2", "/small"),
            "h2-large": ("HTTP/2 over TLS, 100 KB", "h2", "/large"),
        }
        results: dict[str, dict[str, Load]] = {s: {} for s in scenarios}
        runs: dict[tuple[str, str], list[Load]] = {}

        def ratio(a: tuple[str, str], b: tuple[str, str], what: str = "rps") -> float:
            """Median over the rounds of a's value ÷ b's in the same round."""
            pairs = [getattr(x, what) / getattr(y, what) for x, y in zip(runs[a], runs[b]) if getattr(y, what) > 0]
            return statistics.median(pairs) if pairs else float("nan")

        pids = dict(self.pids)
        controllers: dict[str, int] = {}
        controller_totals: dict[str, list[float]] = {}  # target → [controller CPU s, requests], all runs
        with contextlib.ExitStack() as st:
            # Every proxy runs from the start (idle ones cost nothing), so that for each scenario the
            # targets are measured back to back and see the same machine.
            for i, (name, (argv, port, _tls_port)) in enumerate(targets.items()):
                if argv is not None:
                    self.cmd(argv)
                    pids[name] = st.enter_context(process(argv, tmp / f"tp-{i}.log", ready=(port, host))).pid
                    wrk(f"http://127.0.0.1:{port}/small", host, 1, conns)  # warm-up, once per proxy
                    ctl = child_of(pids[name], "_controller")
                    if ctl:
                        controllers[name] = ctl
            # Rounds are the outer loop and every second round reverses the order of the targets:
            # each comparison is between runs close in time (the machine drifts), in both orders.
            for round_ in range(rounds):
                for key, (_, proto, path) in scenarios.items():
                    order = list(targets.items())
                    for name, (_argv, port, tls_port) in (order[::-1] if round_ % 2 else order):
                        before, cpu = self.backend_accepts(), cpu_seconds(pids[name])
                        ctl = controllers.get(name)
                        ctl_cpu = cpu_seconds(ctl) if ctl else 0.0
                        if proto == "h1":
                            url = f"http://127.0.0.1:{port}{path}"
                            self.cmd(wrk_cmd(url, host, seconds, conns))
                            r = wrk(url, host, seconds, conns)
                        else:
                            h1 = proto == "h1tls"
                            self.cmd(h2load_cmd(tls_port, host, path, seconds, conns, h1, warm_up=self.warm_up))
                            r = h2load(tls_port, host, path, seconds, conns, h1, tmp / "h2load.log", self.warm_up)
                        if name != "direct (nginx)":
                            r.upstream_conns = self.backend_accepts() - before - 1
                        r.cpu_ms = (cpu_seconds(pids[name]) - cpu) * 1000 / max(1, r.requests_total)
                        if ctl:
                            used = cpu_seconds(ctl) - ctl_cpu
                            r.controller_ms = used * 1000 / max(1, r.requests_total)
                            totals = controller_totals.setdefault(name, [0.0, 0])
                            totals[0] += used
                            totals[1] += r.requests_total
                        runs.setdefault((key, name), []).append(r)
                        print(f"  {key} {name} #{round_ + 1}: {r.rps:.0f} req/s p50 {r.p50:.2f} p99 {r.p99:.2f} ms, "
                              f"{r.errors} errors, upstream conns {r.upstream_conns}, CPU {r.cpu_ms:.3f} ms/req",
                              flush=True)
            # Where the CPU goes, for the targets' scenarios: py-spy samples of the proxy under load.
            profiles = self._profile_components(pids, targets, scenarios, host, stock_name="stock mitmdump -s addons/wakeproxy.py")
        for (key, name), rs in runs.items():
            results[key][name] = Load(
                statistics.median(r.rps for r in rs), statistics.median(r.p50 for r in rs),
                statistics.median(r.p99 for r in rs), sum(r.errors for r in rs), sum(r.requests for r in rs),
                None if rs[0].upstream_conns is None else sum(r.upstream_conns or 0 for r in rs) / len(rs),
                cpu_ms=statistics.median(r.cpu_ms for r in rs),
                controller_ms=statistics.median(r.controller_ms for r in rs))

        lines = ["| scenario | target | req/s | p50 ms | p99 ms | errors | new upstream conns | CPU ms/req "
                 "| wakeproxy ÷ target (req/s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, (title, _, _) in scenarios.items():
            for name, r in results[key].items():
                up = "" if r.upstream_conns is None else f"{r.upstream_conns:.0f}"
                lines.append(f"| {title} | {name} | {r.rps:.0f} | {r.p50:.2f} | {r.p99:.2f} | {r.errors} | {up} "
                             f"| {r.cpu_ms:.3f} | {ratio((key, 'wakeproxy'), (key, name)):.2f}× |")
        ratio_rows = ["| wakeproxy ÷ target (req/s) | " + " | ".join(t for t, _, _ in scenarios.values()) + " |",
                 "|---|" + "---:|" * len(scenarios)]
        for name in targets:
            if name == "wakeproxy":
                continue
            ratio_rows.append(f"| {name} | " + " | ".join(
                f"{ratio((k, 'wakeproxy'), (k, name)):.2f}×" for k in scenarios) + " |")
        cpu_ratio = ["| target's CPU per request ÷ wakeproxy's | " + " | ".join(t for t, _, _ in scenarios.values())
                     + " |", "|---|" + "---:|" * len(scenarios)]
        for name in targets:
            if name != "wakeproxy":
                cpu_ratio.append(f"| {name} | " + " | ".join(
                    f"{ratio((k, name), (k, 'wakeproxy'), 'cpu_ms'):.2f}×" for k in scenarios) + " |")

        wpr = {k: results[k]["wakeproxy"] for k in scenarios}
        stock, bare = "stock mitmdump -s addons/wakeproxy.py", "stock mitmdump + bare routing script"
        vs_stock, vs_bare = ratio(("h1-small", "wakeproxy"), ("h1-small", stock)), \
            ratio(("h1-small", "wakeproxy"), ("h1-small", bare))
        h2_vs_h1 = ratio(("h2-small", "wakeproxy"), ("h1tls-small", "wakeproxy"))
        w2_h1 = ratio(("h1-small", TWO_WORKERS), ("h1-small", "wakeproxy"))
        w2_h2 = ratio(("h2-small", TWO_WORKERS), ("h2-small", "wakeproxy"))
        w1_vs_1p = ratio(("h1-small", "wakeproxy"), ("h1-small", ONE_PROCESS))
        w1_vs_1p_h2 = ratio(("h2-small", "wakeproxy"), ("h2-small", ONE_PROCESS))
        ctl_cpu_s, ctl_requests = controller_totals.get(TWO_WORKERS, [0.0, 0])
        split_targets = [
            Target("workers: 2 vs workers: 1, HTTP/1.1 (100 B)", "≥ 1.5×",
                   f"{w2_h1:.2f}× ({results['h1-small'][TWO_WORKERS].rps:.0f} vs {wpr['h1-small'].rps:.0f} req/s)",
                   w2_h1 >= 1.5),
            Target("workers: 2 vs workers: 1, HTTP/2 over TLS (100 B)", "measured",
                   f"{w2_h2:.2f}× ({results['h2-small'][TWO_WORKERS].rps:.0f} vs {wpr['h2-small'].rps:.0f} req/s)",
                   True),
            Target("workers: 1 (controller + 1 worker) vs one process (workers: 0)", "≥ 0.95×",
                   f"HTTP/1.1 {w1_vs_1p:.2f}× ({wpr['h1-small'].rps:.0f} vs "
                   f"{results['h1-small'][ONE_PROCESS].rps:.0f} req/s), HTTP/2 over TLS {w1_vs_1p_h2:.2f}×",
                   w1_vs_1p >= 0.95),
            Target("controller CPU per request with 2 workers", "small (activity aggregated)",
                   f"{ctl_cpu_s * 1000:.0f} ms of CPU for {ctl_requests:,.0f} requests over every scenario: "
                   f"{ctl_cpu_s * 1e6 / max(1, ctl_requests):.2f} µs per request (CPU clock ticks are 10 ms)",
                   ctl_cpu_s * 1000 / max(1, ctl_requests) < 0.02),
        ]
        self.split = (results, scenarios)
        self.targets += split_targets + [
            Target(f"req/s vs {stock} (HTTP/1.1, 100 B)", "≥ 1.6×",
                   f"{vs_stock:.2f}× ({wpr['h1-small'].rps:.0f} vs {results['h1-small'][stock].rps:.0f} req/s); "
                   f"CPU per request {ratio(('h1-small', stock), ('h1-small', 'wakeproxy'), 'cpu_ms'):.2f}× less",
                   vs_stock >= 1.6),
            Target(f"req/s vs {bare} (HTTP/1.1, 100 B)", "≥ 0.90× (within 10 %)",
                   f"{vs_bare:.2f}× ({wpr['h1-small'].rps:.0f} vs {results['h1-small'][bare].rps:.0f} req/s); "
                   f"CPU per request {ratio(('h1-small', bare), ('h1-small', 'wakeproxy'), 'cpu_ms'):.2f}× less",
                   vs_bare >= 0.9),
            Target("HTTP/2 over TLS vs HTTP/1.1 over TLS through wakeproxy (100 B)", "≥ 1.0×",
                   f"{h2_vs_h1:.2f}× ({wpr['h2-small'].rps:.0f} vs {wpr['h1tls-small'].rps:.0f} req/s; CPU "
                   f"{wpr['h2-small'].cpu_ms:.2f} vs {wpr['h1tls-small'].cpu_ms:.2f} ms/request)", h2_vs_h1 >= 1.0),
            Target("new upstream connections in the HTTP/2 run (100 B)", f"≤ 2 × {conns} client connections",
                   f"{wpr['h2-small'].upstream_conns:.0f} per run ({wpr['h2-small'].upstream_conns / conns:.1f}× "
                   f"clients)", wpr["h2-small"].upstream_conns <= 2 * conns),
        ]

        def draw(fig, ax):
            names = list(targets)
            keys = list(scenarios)
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                ax.bar([k + i * width for k in range(len(keys))], [results[k][name].rps for k in keys], width,
                       label=name)
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))])
            ax.set_xticklabels([scenarios[k][0] for k in keys], fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("requests/s (log scale)")
            ax.set_title(f"Throughput, {conns} connections (higher is better)")
            ax.legend(fontsize=7)

        self.sections["throughput"] = Section(
            "Throughput and latency",
            f"""{conns} connections; {rounds} round(s) of {seconds} s per target and scenario. A round runs every
scenario for every target back to back, every second round in reverse order of targets; req/s, p50, p99
and CPU are the medians of the rounds, *ratios* the medians of the per-round ratios (so each compares
runs a few seconds apart), new upstream connections the mean per run. Each Python proxy gets a 1 s
`wrk` warm-up after it starts.
HTTP/1.1 (plain, keep-alive): `wrk -t2`. Over TLS: `h2load -t2 -m1` (one request at a time per
connection) with `--warm-up-time={self.warm_up}`,
SNI and `:authority` set to the site's name; `--h1` for the HTTP/1.1-over-TLS rows. p50/p99 come from
wrk's latency distribution and from h2load's per-request log.

- **direct (nginx)**: the backend itself, nginx with one worker serving static files from disk.
- **nginx reverse proxy**: a second nginx (one worker), `proxy_pass` to the backend with an upstream
  keep-alive pool, plus an HTTP/2 TLS listener with a self-signed certificate: the reference for what a
  proxy can do on this machine.
- **stock mitmdump + bare routing script**: `mitmdump -q` in reverse mode with `connection_strategy=lazy`,
  `keep_host_header`, `upstream_cert=false` and a five-line script that points every request at the
  backend in `requestheaders`. No wakeproxy code.
- **caddy reverse proxy**: Debian's Caddy 2.6, `reverse_proxy` to the backend, one process with
  `GOMAXPROCS=1` (one core, like the nginx reverse proxy's one worker), TLS with the same self-signed
  certificate.
- **stock mitmdump -s addons/wakeproxy.py** and the **wakeproxy** rows: the same config (but the ports
  and `workers`), the same addons; the site is a host-network container labelled
  `wakeproxy.host=bench.<run>.test`. **wakeproxy** is the `wakeproxy` command with `workers: 1` (a
  supervisor, the controller, one serving worker), **wakeproxy, 2 workers** the same with `workers: 2`,
  and **wakeproxy, one process** `workers: 0` (everything in one process, as before the split). Their
  CPU per request counts every process of the proxy; the controller's share is a target of its own.

All proxies run during the whole section (idle while another is measured); for each scenario the
targets are measured back to back.

*new upstream conns*: connections the backend accepted during the run (its `stub_status` counter), i.e.
connections the proxy opened; the client side always has {conns}. *CPU ms/req*: user + system CPU time of
the server under test (for nginx: master and worker; for the reverse proxy without its backend) during
the run, per request (TLS runs: h2load's warm-up requests estimated at the main phase's rate). On this
shared machine no proxy gets a whole core for itself, so req/s is bounded by the scheduler as much as by
the proxy; CPU per request is the steadier measure of what each proxy costs.

""" + "\n".join(lines) + "\n\n" + "\n".join(ratio_rows) + "\n\n" + "\n".join(cpu_ratio) + "\n"
            + profiles,
            chart=self.chart("throughput", draw),
        )

    def _profile_components(self, pids: dict[str, int], targets: dict, scenarios: dict, host: str,
                            stock_name: str) -> str:
        """Sample the proxies with py-spy under load; a markdown table of CPU ms per request by component."""
        if self.quick:  # keeps --quick under 2 minutes
            return "\n(No CPU breakdown with `--quick`: a full run measures where the CPU goes.)\n"
        spy = VENV_BIN / "py-spy"
        if not spy.exists():
            return "\n(py-spy missing: no CPU breakdown; install the `bench` extra)\n"
        seconds = 5
        runs = [("wakeproxy", "h1-small"), (stock_name, "h1-small"), ("wakeproxy", "h1tls-small"),
                ("wakeproxy", "h2-small")]
        columns: list[tuple[str, dict[str, float], float]] = []
        for name, key in runs:
            _, port, tls_port = targets[name]
            _, proto, path = scenarios[key]
            raw = self.tmp / "profile.raw"
            raw.unlink(missing_ok=True)
            argv = [str(spy), "record", "--pid", str(child_of(pids[name], "_worker") or pids[name]), "--duration", str(seconds), "--rate", "250",
                    "--format", "raw", "--output", str(raw), "--nonblocking"]
            self.cmd(argv)
            sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cpu = cpu_seconds(pids[name])
            if proto == "h1":
                r = wrk(f"http://127.0.0.1:{port}{path}", host, seconds, self.args.connections)
            else:
                r = h2load(tls_port, host, path, seconds, self.args.connections, proto == "h1tls",
                           self.tmp / "h2load.log", self.warm_up)
            cpu_ms = (cpu_seconds(pids[name]) - cpu) * 1000 / max(1, r.requests_total)
            try:
                sampler.wait(seconds + 30)
                shares = components(raw)
            except (subprocess.TimeoutExpired, OSError):
                sampler.kill()
                shares = {}
            if not shares:
                return "\n(py-spy gave no samples: no CPU breakdown)\n"
            columns.append((f"{name}, {scenarios[key][0]}", shares, cpu_ms))
            print(f"  profile {name} {key}: {cpu_ms:.3f} ms/req", flush=True)
        head = "| component | " + " | ".join(c[0] for c in columns) + " |"
        rows = [head, "|---|" + "---:|" * len(columns)]
        for comp, _ in COMPONENTS:
            rows.append(f"| {comp} | " + " | ".join(f"{c[1].get(comp, 0) * c[2]:.3f}" for c in columns) + " |")
        rows.append("| **total (CPU ms per request)** | " + " | ".join(f"**{c[2]:.3f}**" for c in columns) + " |")
        return f"""
### Where the CPU goes

CPU milliseconds per request by component: each proxy sampled by py-spy (250 Hz, {seconds} s, the
innermost frame of each sample decides the component) under the same load as above, one run each, its
shares multiplied by the CPU per request measured during that run (so ±10 % or so). The columns explain
two targets: wakeproxy vs stock `mitmdump -s` (hook dispatch: mitmproxy walks every addon for every
hook, the `wakeproxy` command calls only the handlers a hook has; request/response objects: the
`wakeproxy` command skips mitmproxy's debug-only type check of their fields), and HTTP/2 vs HTTP/1.1 over TLS
through wakeproxy (the difference is the pure-Python HTTP/2 stack: h2/hpack/hyperframe and mitmproxy's
HTTP/2 layer).

""" + "\n".join(rows) + "\n"

    # --- 2: wake -------------------------------------------------------------------------------

