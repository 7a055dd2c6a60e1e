"""The wake section."""

from __future__ import annotations

import concurrent.futures
import socket
import sys
import threading
import time

from wpbench.common import Section, Target, http_status, in_subnet, process, quantile


class WakeSection:
    """The wake section of a benchmark run (a part of `core.Bench`)."""

    def wake(self) -> None:
        cycles = self.args.wake_cycles or (5 if self.quick else 10)
        net = self.network()
        host = f"wake.{self.domain}"
        site = self.client.containers.create(
            self.image.id, name=f"{self.run}-wake",
            command=["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www"],
            labels=self.labels(host), network=net.name,
        )
        cfg, ports = self.proxy_config("wake")
        self.note(f"docker create --name {self.run}-wake --network {net.name} --label wpbench.run={self.run} "
                  f"--label wakeproxy.host={host} --label wakeproxy.idle-timeout=0 {self.run}-img "
                  "sh -c 'mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www'")

        subnet = self.subnet()

        def ip() -> str:
            site.reload()
            return in_subnet(site.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"], subnet)

        def stop() -> None:
            site.stop(timeout=0)
            site.wait(timeout=10)
            # Until the proxy has seen the stop, a request would still be routed to the old address
            # (and a refused connect wakes the container again). Every worker must have seen it: 8
            # answers in a row, each on a new connection (the kernel spreads them over the workers).
            deadline = time.monotonic() + 10
            in_a_row = 0
            while in_a_row < 8 and time.monotonic() < deadline:
                in_a_row = in_a_row + 1 if http_status(ports["http"], host) == 503 else 0
                time.sleep(0.01)

        raw: list[float] = []
        proxied: list[float] = []
        log = self.tmp / "wake.log"
        argv = self.wakeproxy_cmd(cfg)
        self.cmd(argv)
        with process(argv, log, ready_line="wakeproxy ready"):
            # Raw and proxied cycles alternate, so both see the same (noisy) machine.
            for _ in range(cycles):
                t0 = time.perf_counter()
                site.start()
                addr = ip()
                while True:
                    try:
                        socket.create_connection((addr, 80), 0.2).close()
                        break
                    except OSError:
                        time.sleep(0.002)
                    if time.perf_counter() - t0 > 30:
                        raise RuntimeError("raw start never accepted a connection")
                raw.append(time.perf_counter() - t0)
                stop()
                t0 = time.perf_counter()
                status = first_byte(ports["http"], host)
                proxied.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"woken request answered {status}:\n{log.read_text()[-3000:]}")
                stop()
            # 200 concurrent requests arriving during one wake.
            t_burst = time.time()
            gate = threading.Barrier(200, timeout=30)

            def one(_: int) -> tuple[int, float]:
                gate.wait()
                t = time.perf_counter()
                st = first_byte(ports["http"], host)
                return st, time.perf_counter() - t

            with concurrent.futures.ThreadPoolExecutor(200) as pool:
                answers = list(pool.map(one, range(200)))
            events = list(self.client.events(
                decode=True, since=int(t_burst) - 1, until=int(time.time()) + 1,
                filters={"container": site.id, "event": "start"}))
            starts = sum(1 for ev in events if ev.get("timeNano", 0) >= t_burst * 1e9)
            print(f"  burst: t0 {t_burst:.3f}, start events at "
                  f"{[round(ev.get('timeNano', 0) / 1e9, 3) for ev in events]}", flush=True)
            waits = [w for _, w in answers]
            burst = {
                "errors": sum(1 for st, _ in answers if st != 200),
                "starts": starts,
                "p50": quantile(waits, 0.5) * 1000,
                "p90": quantile(waits, 0.9) * 1000,
                "max": max(waits) * 1000,
            }
            wake_lines = [ln for ln in log.read_text(errors="replace").splitlines() if "ready (" in ln][-1:]
        r50, r90 = quantile(raw, 0.5) * 1000, quantile(raw, 0.9) * 1000
        p50, p90 = quantile(proxied, 0.5) * 1000, quantile(proxied, 0.9) * 1000
        self.targets += [
            Target("wake: time to first byte p90", "≤ raw + 150 ms",
                   f"raw {r90:.0f} ms, wakeproxy {p90:.0f} ms ({p90 - r90:+.0f} ms)", p90 <= r90 + 150),
            Target("200 concurrent requests during one wake", "0 errors, 1 start",
                   f"{burst['errors']} errors, {burst['starts']} start(s)",
                   burst["errors"] == 0 and burst["starts"] == 1),
        ]

        def draw(fig, ax):
            labels = ["raw docker start\n+ first connect", "wakeproxy\nfirst byte", "200 concurrent\n(one wake)"]
            ax.bar([0, 1, 2], [r50, p50, burst["p50"]], 0.35, label="p50")
            ax.bar([0.35, 1.35, 2.35], [r90, p90, burst["p90"]], 0.35, label="p90")
            ax.set_xticks([0.175, 1.175, 2.175])
            ax.set_xticklabels(labels)
            ax.set_ylabel("ms (lower is better)")
            ax.set_title(f"Wake: {cycles} cycles")
            ax.legend()

        self.sections["wake"] = Section(
            "Wake: time to first byte for a sleeping container",
            f"""{cycles} cycles each, raw and proxied alternating. *raw*: `docker start` (API), then an inspect for
the container's IP on this run's bridge network, until the first TCP connect to its port succeeds. *wakeproxy*: a GET through the proxy for the
stopped container's host until the first byte of the app's answer (the proxy starts the container,
waits for readiness, forwards). busybox httpd; the container is stopped (`docker stop -t 0`) between
cycles.

| | p50 ms | p90 ms |
|---|---:|---:|
| raw docker start + first connect | {r50:.0f} | {r90:.0f} |
| through wakeproxy (first byte) | {p50:.0f} | {p90:.0f} |
| overhead | {p50 - r50:+.0f} | {p90 - r90:+.0f} |

200 concurrent requests (threads released together) arriving at the stopped container's host:
{burst['errors']} errors, {burst['starts']} `start` event(s), wait p50 {burst['p50']:.0f} ms,
p90 {burst['p90']:.0f} ms, max {burst['max']:.0f} ms.
{("Proxy log of the last wake: `" + wake_lines[0].split('wake ', 1)[-1] + "`") if wake_lines else ""}
""",
            chart=self.chart("wake", draw),
        )

    # --- 3: route convergence ------------------------------------------------------------------



def first_byte(port: int, host: str) -> int:
    """GET / for `host` through the proxy (no probe User-Agent: this one wakes); the status code."""
    with socket.create_connection(("127.0.0.1", port), 60) as s:
        s.settimeout(90)
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wpbench\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(64)
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if status >= 500:
        print(f"  {host}: {(head + rest).decode(errors='replace')[-400:]}", file=sys.stderr)
    return status


