"""The debug section: what a request of a watched sandbox costs (through the debug UI's mitmweb), and
that the other sandboxes are not slowed while one is watched."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from wpbench.common import VENV_BIN, Section, Target, free_port, process, quantile
from wpbench.load import wrk, wrk_cmd


class DebugSection:
    """The debug section of a benchmark run (a part of `core.Bench`)."""

    def debug(self) -> None:
        rounds = 1 if self.quick else 3
        seconds, conns = max(self.seconds, 3), self.args.connections
        watched, other = self.site(), self._second_site()
        cfg, ports = self.proxy_config("debug")
        cfg.write_text(cfg.read_text() + f'debug: {{listen: "127.0.0.1:{free_port()}"}}\n')
        argv = self.wakeproxy_cmd(cfg)
        self.cmd(argv)
        url = f"http://127.0.0.1:{ports['http']}/small"
        rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in (
            "plain", "other_plain", "watched", "other_watched", "one_plain", "one_watched", "both_plain",
            "both_watched")}
        rss: list[int] = []
        try:
            with process(argv, self.tmp / "debug.log", ready=(ports["http"], watched), timeout=60):
                wrk(url, watched, 1, conns)  # warm-up
                for _ in range(rounds):
                    for tag, host in (("plain", watched), ("other_plain", other)):
                        r = wrk(url, host, seconds, conns)
                        rows[tag].append((r.rps, r.p50, r.p99))
                    rows["one_plain"].append(_one_connection(ports["http"], watched))
                    rows["both_plain"].append(_at_once(url, watched, other, seconds, conns))
                    self._debug_cmd(cfg, watched)
                    self.cmd(wrk_cmd(url, watched, seconds, conns))
                    for tag, host in (("watched", watched), ("other_watched", other)):
                        r = wrk(url, host, seconds, conns)
                        rows[tag].append((r.rps, r.p50, r.p99))
                    rows["one_watched"].append(_one_connection(ports["http"], watched))
                    rows["both_watched"].append(_at_once(url, watched, other, seconds, conns))
                    rss.append(_ui_rss())
                    self._debug_cmd(cfg, "--off")
        finally:
            self.remove_containers({"wpbench.kind": "debug"})

        def med(tag: str, i: int) -> float:
            return quantile([row[i] for row in rows[tag]], 0.5)

        ratio_other = med("other_watched", 0) / med("other_plain", 0)
        ratio_watched = med("watched", 0) / med("plain", 0)
        added = med("one_watched", 1) - med("one_plain", 1)
        self.targets.append(Target("debug: another sandbox while one is watched: req/s", "not slowed",
                                   f"ratio {ratio_other:.3f}", ratio_other >= 0.9))
        self.note("PYTHONPATH=scripts .venv/bin/python -m wpbench --only debug")
        self.sections["debug"] = Section(
            "Debug UI: the cost of a watched request, and the others while one is watched",
            f"""Two sites on one backend (nginx, host network), the proxy with its default workers;
`wakeproxy debug {watched}` between the runs (`--off` after), `wrk -c{conns}` for {seconds} s a run and
{ONE_CONNECTION} requests one after the other on one keep-alive connection for the latency, {rounds} round(s), medians. A watched request goes from the
worker through the UI's mitmweb (CONNECT on loopback, then a second HTTP parse and its flow kept, at
most `debug.max_flows`) to the backend.

| what | req/s | p50 ms | p99 ms |
|---|---:|---:|---:|
| the site, not watched | {med('plain', 0):.0f} | {med('plain', 1):.2f} | {med('plain', 2):.2f} |
| the site, watched | {med('watched', 0):.0f} | {med('watched', 1):.2f} | {med('watched', 2):.2f} |
| another site, nothing watched | {med('other_plain', 0):.0f} | {med('other_plain', 1):.2f} | {med('other_plain', 2):.2f} |
| another site, while the first is watched | {med('other_watched', 0):.0f} | {med('other_watched', 1):.2f} | {med('other_watched', 2):.2f} |
| another site, loaded at the same time as the first, nothing watched | {med('both_plain', 0):.0f} | {med('both_plain', 1):.2f} | {med('both_plain', 2):.2f} |
| another site, loaded at the same time as the first, which is watched | {med('both_watched', 0):.0f} | {med('both_watched', 1):.2f} | {med('both_watched', 2):.2f} |
| one connection, not watched | {med('one_plain', 0):.0f} | {med('one_plain', 1):.2f} | {med('one_plain', 2):.2f} |
| one connection, watched | {med('one_watched', 0):.0f} | {med('one_watched', 1):.2f} | {med('one_watched', 2):.2f} |

- A watched request costs **+{added:.2f} ms** (p50, one connection), and the watched site serves
  **{ratio_watched:.2f}×** its unwatched rate under load: mitmweb is one Python process for every watched
  request (debugging traffic, not load).
- Another site while nothing is watched vs while the first is watched: ratio **{ratio_other:.3f}**: its
  requests take the same path as before (one set lookup more).
- Both sites loaded at once, the first watched vs not: the other site's rate is
  **{med('both_watched', 0) / med('both_plain', 0):.2f}×**. On this 2-core machine the UI's process takes CPU
  the workers would otherwise have; nothing of the other site goes through it.
- The UI process after each watched run ({', '.join(f'{r / 1024 / 1024:.0f}' for r in rss)} MiB RSS):
  flows are capped at `debug.max_flows` (500), bodies over `debug.max_body` (1 MiB) are not kept.
""")

    def _second_site(self) -> str:
        host = f"bench2.{self.domain}"
        b = self.backend()
        self.client.containers.run(
            self.image.id, name=f"{self.run}-site2", detach=True, network_mode="host",
            labels=self.labels(host, **{"wakeproxy.port": str(b["http"]), "wakeproxy.network": "host",
                                        "wpbench.kind": "debug"}),
        )
        self.note(f"docker run -d --name {self.run}-site2 --network host --label wakeproxy.host={host} "
                  f"--label wakeproxy.port={b['http']} --label wakeproxy.network=host {self.run}-img")
        return host

    def _debug_cmd(self, cfg: Path, *args: str) -> None:
        argv = [str(VENV_BIN / "wakeproxy"), "debug", "--config", str(cfg), *args]
        self.cmd(argv)
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
        time.sleep(0.5)


ONE_CONNECTION = 300


def _at_once(url: str, first: str, other: str, seconds: int, conns: int) -> tuple[float, float, float]:
    """wrk on both sites at the same time: the other site's (req/s, p50, p99)."""
    import threading

    load = threading.Thread(target=wrk, args=(url, first, seconds + 1, conns), daemon=True)
    load.start()
    time.sleep(0.5)
    r = wrk(url, other, seconds, conns)
    load.join(seconds + 40)
    return r.rps, r.p50, r.p99


def _one_connection(port: int, host: str) -> tuple[float, float, float]:
    """(req/s, p50 ms, p99 ms) of ONE_CONNECTION GETs, one after the other, on one keep-alive connection."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    t_all = time.perf_counter()
    try:
        for _ in range(ONE_CONNECTION):
            t0 = time.perf_counter()
            conn.request("GET", "/small", headers={"Host": host})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{host}: {resp.status}")
            times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    total = time.perf_counter() - t_all
    return ONE_CONNECTION / total, quantile(times, 0.5) * 1000, quantile(times, 0.99) * 1000


def _ui_rss() -> int:
    """The resident memory of the debug UI process (there is one while something is watched)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"wakeproxy.debug.web" not in (entry / "cmdline").read_bytes().split(b"\0"):
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0
