"""The soak section."""

from __future__ import annotations

import threading
import time

from wpbench.common import Section, Target, process, rss_mb
from wpbench.load import Load, wrk, wrk_cmd


class SoakSection:
    """The soak section of a benchmark run (a part of `core.Bench`)."""

    def soak(self) -> None:
        seconds = self.args.soak_seconds or (15 if self.quick else 60)
        conns = 64
        host = self.site()
        cfg, ports = self.proxy_config("soak", networks=[])
        url = f"http://127.0.0.1:{ports['http']}/small"
        argv = self.wakeproxy_cmd(cfg)
        self.cmd(argv)
        samples: list[tuple[float, float]] = []
        with process(argv, self.tmp / "soak.log", ready=(ports["http"], host)) as p:
            wrk(url, host, 1 if self.quick else 2, conns)  # warm-up
            result: list[Load] = []
            runner = threading.Thread(target=lambda: result.append(wrk(url, host, seconds, conns)), daemon=True)
            self.cmd(wrk_cmd(url, host, seconds, conns))
            t0 = time.monotonic()
            runner.start()
            while runner.is_alive() and time.monotonic() - t0 < seconds + 40:
                samples.append((time.monotonic() - t0, rss_mb(p.pid)))
                runner.join(1.0)
            samples.append((time.monotonic() - t0, rss_mb(p.pid)))
            runner.join(5)
        if not result:
            raise RuntimeError("wrk did not finish")
        r = result[0]
        loaded = [s for s in samples if 1.0 <= s[0] <= seconds]
        start = loaded[0][1] if loaded else samples[0][1]
        mid = min(loaded or samples, key=lambda s: abs(s[0] - seconds / 2))[1]
        end = (loaded or samples)[-1][1]
        peak = max(s[1] for s in samples)
        growth = (end - start) / start * 100
        self.targets += [
            Target(f"soak {seconds} s × {conns} connections: errors", "0", f"{r.errors} of {r.requests:,} requests",
                   r.errors == 0),
            Target("soak: memory flat", "within 10 %", f"{start:.1f} → {mid:.1f} → {end:.1f} MB ({growth:+.1f} %)",
                   abs(growth) <= 10 and (peak - start) / start <= 0.10),
        ]

        def draw(fig, ax):
            ax.bar(["start", "middle", "end", "peak"], [start, mid, end, peak], 0.5)
            ax.set_ylabel("RSS MB")
            ax.set_title(f"Soak: {seconds} s at {conns} connections, {r.rps:.0f} req/s, {r.errors} errors")

        self.sections["soak"] = Section(
            "Soak",
            f"""`wakeproxy`, {seconds} s of `wrk -c{conns}` (100 B responses) after a {1 if self.quick else 2} s warm-up. RSS sampled every
second from `/proc/PID/status`; *start* is the first sample after 1 s of the run.

| requests | req/s | p50 ms | p99 ms | errors | RSS start MB | middle | end | peak | growth |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| {r.requests:,} | {r.rps:.0f} | {r.p50:.2f} | {r.p99:.2f} | {r.errors} | {start:.1f} | {mid:.1f} | {end:.1f} | {peak:.1f} | {growth:+.1f} % |
""",
            chart=self.chart("soak", draw),
        )


