"""The scale section."""

from __future__ import annotations

import concurrent.futures
import re
import time
import timeit
from pathlib import Path

from wpbench.common import Section, Target, cpu_seconds, process, rss_mb
from wpbench.load import wrk, wrk_cmd


class ScaleSection:
    """The scale section of a benchmark run (a part of `core.Bench`)."""

    def scale(self) -> None:
        n = self.args.scale_containers or (500 if self.quick else 1000)
        started = min(10, n)
        net = self.network()
        host = self.site()
        seconds, conns = self.seconds, self.args.connections
        cfg, ports = self.proxy_config("scale", networks=[net.name])
        url = f"http://127.0.0.1:{ports['http']}/small"
        argv = self.wakeproxy_cmd(cfg)
        self.cmd(argv)

        def measure(tag: str) -> dict[str, float]:
            log = self.tmp / f"scale-{tag}.log"
            with process(argv, log, ready=(ports["http"], host)) as p:
                text = ""
                deadline = time.monotonic() + 30
                while not (m := re.search(r"docker: synced (\d+) containers in (\d+) ms"
                                          r"(?: \((\d+) inspected, (\d+) cached\))?", text)):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no sync line:\n{text[-3000:]}")
                    time.sleep(0.05)
                    text = log.read_text(errors="replace")
                wrk(url, host, 1, conns)  # warm-up: buffers and caches allocated
                self.cmd(wrk_cmd(url, host, seconds, conns))
                cpu = cpu_seconds(p.pid)
                r = wrk(url, host, seconds, conns)
                cpu_ms = (cpu_seconds(p.pid) - cpu) * 1000 / max(1, r.requests)
                return {"containers": int(m.group(1)), "sync_ms": int(m.group(2)), "rss": rss_mb(p.pid),
                        "rps": r.rps, "errors": r.errors, "cpu_ms": cpu_ms,
                        "inspected": int(m.group(3) or 0), "cached": int(m.group(4) or 0)}

        empty = measure("empty")
        print(f"  empty proxy: {empty}", flush=True)
        self.note(f"seq 0 {n - 1} | xargs -P16 -I{{}} docker create --name {self.run}-scale-{{}} --network {net.name} "
                  f"--label wpbench.run={self.run} --label wpbench.kind=scale "
                  f"--label wakeproxy.host=sandbox-{{}}.{self.domain} --label wakeproxy.idle-timeout=0 "
                  f"{self.run}-img sleep 86400   # then {started} of them started")
        # Create n labelled containers in parallel; start a few of them.
        t0 = time.perf_counter()

        def create(i: int) -> str:
            return self.client.api.create_container(
                self.image.id, name=f"{self.run}-scale-{i}", command=["sleep", "86400"],
                labels=self.labels(f"sandbox-{i}.{self.domain}", **{"wpbench.kind": "scale"}),
                host_config=self.client.api.create_host_config(network_mode=net.name),
            )["Id"]

        try:
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                ids = list(pool.map(create, range(n)))
                list(pool.map(self.client.api.start, ids[:started]))
            create_s = time.perf_counter() - t0
            print(f"  created {n} containers in {create_s:.1f} s", flush=True)
            # Cold: no container cache (the empty run wrote one for the engine's other containers).
            state_dir = Path(re.search(r'^state_dir: "(.*)"$', cfg.read_text(), re.M).group(1))
            (state_dir / "containers.json").unlink(missing_ok=True)
            full = measure("full")
            print(f"  with {n}: {full}", flush=True)
            # Warm: a restart with the same state_dir, whose containers.json the first start wrote.
            warm = measure("restart")
            print(f"  with {n}, restarted: {warm}", flush=True)
        finally:
            remove_s = self.remove_containers({"wpbench.kind": "scale"})
        print(f"  removed them in {remove_s:.1f} s", flush=True)
        # Empty again: the machine drifts, so the empty proxy is measured before and after and averaged.
        empty_after = measure("empty-after")
        print(f"  empty proxy again: {empty_after}", flush=True)
        empty_before = empty
        empty = {k: (empty_before[k] + empty_after[k]) / 2 for k in empty_before}
        empty["containers"] = round(empty["containers"])

        lk = lookup_costs(n)
        rss_delta = full["rss"] - empty["rss"]
        self.targets += [
            Target(f"{n} containers: start-up resync", "≤ 3 s", f"{full['sync_ms'] / 1000:.2f} s",
                   full["sync_ms"] <= 3000),
            Target(f"{n} containers: resync on restart (cache warm)", "≤ 3 s",
                   f"{warm['sync_ms'] / 1000:.2f} s ({warm['inspected']} inspected, {warm['cached']} cached)",
                   warm["sync_ms"] <= 3000),
            Target(f"{n} containers: lookup cost vs 1 host (exact / wildcard-heavy)", "≤ 1.2×",
                   f"{lk['exact_ratio']:.2f}× / {lk['wild_ratio']:.2f}× in-process; end to end: "
                   f"{full['rps']:.0f} vs {empty['rps']:.0f} req/s, CPU per request {full['cpu_ms'] / empty['cpu_ms']:.2f}×",
                   max(lk["exact_ratio"], lk["wild_ratio"]) <= 1.2),
            Target(f"{n} containers: memory above an empty proxy", "≤ 60 MB",
                   f"{rss_delta:+.1f} MB ({empty['rss']:.0f} → {full['rss']:.0f} MB RSS)", rss_delta <= 60),
        ]

        def draw(fig, axes):
            names = ["empty", f"+{n:,}\nfirst start", f"+{n:,}\nrestart"]
            panels = [("resync ms", "sync_ms"), ("RSS MB", "rss"), ("req/s, one site", "rps")]
            for ax, (title, key) in zip(axes, panels):
                ax.bar(names, [empty[key], full[key], warm[key]], 0.5, color=["tab:blue", "tab:orange", "tab:green"])
                ax.set_title(title)
                ax.tick_params(axis="x", labelsize=7)
            ax = axes[3]
            ax.bar([0, 1], [lk["exact_1"], lk["wild_1"]], 0.35, label="1 host")
            ax.bar([0.35, 1.35], [lk["exact_n"], lk["wild_n"]], 0.35, label=f"{n} hosts")
            ax.set_xticks([0.175, 1.175])
            ax.set_xticklabels(["exact", "wildcard"])
            ax.set_title("lookup ns")
            ax.legend(fontsize=7)
            fig.suptitle(f"Scale: the proxy with and without {n:,} labelled containers")

        self.sections["scale"] = Section(
            f"Scale: {n:,} labelled containers",
            f"""{n:,} containers created in parallel (16 threads, {create_s:.1f} s) on this run's bridge network, each labelled
`wakeproxy.host=sandbox-N.<run>.test` and `wakeproxy.idle-timeout=0`; {started} of them started (`sleep`), the
rest never. Each row is a fresh `wakeproxy` start; *resync* is the proxy's own log line
(`docker: synced N containers in X ms (I inspected, C cached)`: one listing + one inspect, 4 threads, per
container not in `state_dir/containers.json`; the first start with the {n:,} has no such file, the restart
reuses the one it wrote), RSS is
`VmRSS` of the proxy after {seconds + 1} s of traffic, req/s is `wrk -c{conns}` for the one serving site
(`bench.<run>.test`). *Containers* counts everything on the shared engine, not only this run's.
Removal of the {n:,} took {remove_s:.1f} s.

| proxy | containers seen | resync ms | RSS MB | req/s | CPU ms/req | errors |
|---|---:|---:|---:|---:|---:|---:|
| empty (only the serving site), before | {empty_before['containers']} | {empty_before['sync_ms']} | {empty_before['rss']:.1f} | {empty_before['rps']:.0f} | {empty_before['cpu_ms']:.2f} | {empty_before['errors']} |
| empty, after the {n:,} were removed | {empty_after['containers']} | {empty_after['sync_ms']} | {empty_after['rss']:.1f} | {empty_after['rps']:.0f} | {empty_after['cpu_ms']:.2f} | {empty_after['errors']} |
| empty: mean of both | | {empty['sync_ms']:.0f} | {empty['rss']:.1f} | {empty['rps']:.0f} | {empty['cpu_ms']:.2f} | |
| with {n:,} labelled containers | {full['containers']} | {full['sync_ms']} | {full['rss']:.1f} | {full['rps']:.0f} | {full['cpu_ms']:.2f} | {full['errors']} |
| with {n:,}, restarted (cache warm: {warm['inspected']} inspected, {warm['cached']} cached) | {warm['containers']} | {warm['sync_ms']} | {warm['rss']:.1f} | {warm['rps']:.0f} | {warm['cpu_ms']:.2f} | {warm['errors']} |
| with {n:,} vs empty | | | {rss_delta:+.1f} | {full['rps'] / empty['rps']:.2f}× | {full['cpu_ms'] / empty['cpu_ms']:.2f}× | |

`Snapshot.lookup`, measured in-process (`timeit`, best of 7 rounds that alternate the cases) on snapshots built by
`wakeproxy.snapshot.build_snapshot` from `ContainerInfo` values:

| lookup | 1 host | {n:,} hosts | ratio |
|---|---:|---:|---:|
| exact name (`sandbox-N.example.com`) | {lk['exact_1']:.0f} ns | {lk['exact_n']:.0f} ns | {lk['exact_ratio']:.2f}× |
| wildcard-heavy (`*.sandbox-N.example.com`, lookup `app.sandbox-N.example.com`) | {lk['wild_1']:.0f} ns | {lk['wild_n']:.0f} ns | {lk['wild_ratio']:.2f}× |
| unknown name with {n:,} wildcards | {lk['miss_1']:.0f} ns | {lk['miss_n']:.0f} ns | {lk['miss_n'] / lk['miss_1']:.2f}× |

`build_snapshot` for {n:,} containers (what every Docker event batch costs the proxy's Docker thread; best of 3):
{lk['build_ms']:.1f} ms cold, {lk['build_cached_ms']:.1f} ms with the label cache.
""",
            chart=self.chart("scale", draw, panels=4),
        )

    # --- 5: soak ---------------------------------------------------------------------------------



def lookup_costs(n: int) -> dict[str, float]:
    """`Snapshot.lookup` with 1 vs `n` hosts (exact names and wildcards), in ns per call."""
    from wakeproxy.config import SourcesConfig
    from wakeproxy.routing.labels import ContainerInfo
    from wakeproxy.routing.snapshot import build_snapshot

    def infos(count: int, wildcard: bool) -> list[ContainerInfo]:
        return [ContainerInfo(
            id=f"{i:064x}", name=f"sandbox-{i}", state="running",
            labels={"wakeproxy.host": f"*.sandbox-{i}.example.com" if wildcard else f"sandbox-{i}.example.com",
                    "wakeproxy.port": "80"},
            networks={"sandboxes": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"},
        ) for i in range(count)]

    def snap(count: int, wildcard: bool):
        return build_snapshot(infos(count, wildcard), SourcesConfig(), ("sandboxes",), {"sandboxes": "bridge"})

    one, many, w_one, w_many = snap(1, False), snap(n, False), snap(1, True), snap(n, True)
    mid = n // 2
    cases = {
        "exact_1": (one, "sandbox-0.example.com"), "exact_n": (many, f"sandbox-{mid}.example.com"),
        "wild_1": (w_one, "app.sandbox-0.example.com"), "wild_n": (w_many, f"app.sandbox-{mid}.example.com"),
        "miss_1": (w_one, "nothing.example.org"), "miss_n": (w_many, "nothing.example.org"),
    }
    calls = 50_000
    best = {k: float("inf") for k in cases}
    for _ in range(7):  # rounds over all cases, so that noise hits each of them alike; best of each
        for k, (snapshot, host) in cases.items():
            t = timeit.timeit(lambda s=snapshot, h=host: s.lookup(h), number=calls)
            best[k] = min(best[k], t / calls * 1e9)
    out = dict(best)
    out["exact_ratio"] = out["exact_n"] / out["exact_1"]
    out["wild_ratio"] = out["wild_n"] / out["wild_1"]
    data = infos(n, False)
    out["build_ms"] = out["build_cached_ms"] = float("inf")
    for _ in range(3):  # best of 3
        cache: dict = {}
        t = time.perf_counter()
        build_snapshot(data, SourcesConfig(), ("sandboxes",), {"sandboxes": "bridge"}, route_cache=cache)
        out["build_ms"] = min(out["build_ms"], (time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        build_snapshot(data, SourcesConfig(), ("sandboxes",), {"sandboxes": "bridge"}, route_cache=cache)
        out["build_cached_ms"] = min(out["build_cached_ms"], (time.perf_counter() - t) * 1000)
    return out


