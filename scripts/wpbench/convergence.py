"""The convergence section."""

from __future__ import annotations

import socket
import threading
import time

from wpbench.common import Section, Target, http_status, in_subnet, process, quantile


class ConvergenceSection:
    """The convergence section of a benchmark run (a part of `core.Bench`)."""

    def convergence(self) -> None:
        n = self.args.convergence_containers or (10 if self.quick else 20)
        net = self.network()
        cfg, ports = self.proxy_config("convergence")
        self.note(f"for i in $(seq 0 {n - 1}); do docker create --name {self.run}-conv-$i --network {net.name} "
                  f"--label wpbench.run={self.run} --label wpbench.kind=conv --label wakeproxy.host=conv-$i.{self.domain} "
                  f"--label wakeproxy.idle-timeout=0 {self.run}-img "
                  "sh -c 'mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www'; done")
        ids = []
        for i in range(n):
            ids.append(self.client.api.create_container(
                self.image.id, name=f"{self.run}-conv-{i}",
                command=["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www"],
                labels=self.labels(f"conv-{i}.{self.domain}", **{"wpbench.kind": "conv"}),
                host_config=self.client.api.create_host_config(network_mode=net.name),
            )["Id"])
        from_return: list[float] = []
        from_event: list[float] = []
        raw: list[float] = []  # reference: inspect + direct GET to the container's IP, no proxy
        subnet = self.subnet()

        def direct(cid: str, t0: float) -> None:
            addr = in_subnet(self.client.api.inspect_container(cid)["NetworkSettings"]["Networks"][net.name]
                             ["IPAddress"], subnet)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection((addr, 80), 1) as s:
                        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        if s.recv(16).startswith(b"HTTP/1.1 200"):
                            raw.append(time.perf_counter() - t0)
                            return
                except OSError:
                    pass
                time.sleep(0.003)
        log = self.tmp / "convergence.log"
        argv = self.wakeproxy_cmd(cfg)
        self.cmd(argv)
        with process(argv, log, ready_line="wakeproxy ready"):
            t_begin = time.time()
            done_at: dict[str, float] = {}
            for i, cid in enumerate(ids):
                host = f"conv-{i}.{self.domain}"
                # The proxy knows the container (stopped): the probe User-Agent gets 503 and wakes nothing.
                deadline = time.monotonic() + 10
                while http_status(ports["http"], host) != 503:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the proxy never saw {host}:\n{log.read_text()[-3000:]}")
                    time.sleep(0.01)
                self.client.api.start(cid)
                t0 = time.perf_counter()
                reference = threading.Thread(target=direct, args=(cid, t0), daemon=True)
                reference.start()
                deadline = time.monotonic() + 10
                while http_status(ports["http"], host, timeout=2) != 200:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{host} never answered 200 through the proxy:\n{log.read_text()[-3000:]}")
                    time.sleep(0.003)
                from_return.append(time.perf_counter() - t0)
                done_at[cid] = time.time()
                reference.join(12)
            for ev in self.client.events(decode=True, since=int(t_begin) - 1, until=int(time.time()) + 1,
                                         filters={"label": f"wpbench.run={self.run}", "event": "start"}):
                cid = ev.get("id") or (ev.get("Actor") or {}).get("ID")
                if cid in done_at and ev.get("timeNano", 0) >= t_begin * 1e9:
                    from_event.append(done_at[cid] - ev["timeNano"] / 1e9)
        ms = lambda v, q: quantile(v, q) * 1000  # noqa: E731
        self.targets.append(Target(f"route convergence p99 ({n} containers, from `docker start` returning)",
                                   "≤ 250 ms", f"{ms(from_return, 0.99):.0f} ms (p50 {ms(from_return, 0.5):.0f} ms)",
                                   ms(from_return, 0.99) <= 250))

        def draw(fig, ax):
            qs = [0.5, 0.9, 0.99]
            ax.bar([0, 1, 2], [ms(from_return, q) for q in qs], 0.25, label="from `docker start` returning")
            if from_event:
                ax.bar([0.25, 1.25, 2.25], [ms(from_event, q) for q in qs], 0.25, label="from the `start` event")
            if raw:
                ax.bar([0.5, 1.5, 2.5], [ms(raw, q) for q in qs], 0.25, label="reference: direct to the container")
            ax.set_xticks([0.25, 1.25, 2.25])
            ax.set_xticklabels(["p50", "p90", "p99"])
            ax.set_ylabel("ms to the first 200 (lower is better)")
            ax.set_title(f"Route convergence, {n} containers")
            ax.legend()

        raw_row = (f"| reference: inspect + GET to the container's IP directly | {ms(raw, 0.5):.0f} | {ms(raw, 0.9):.0f} "
                   f"| {ms(raw, 0.99):.0f} | {max(raw) * 1000:.0f} |") if raw else ""
        ev_row = (f"| from the `start` event (daemon's timestamp) | {ms(from_event, 0.5):.0f} | {ms(from_event, 0.9):.0f} "
                  f"| {ms(from_event, 0.99):.0f} | {max(from_event) * 1000:.0f} |") if from_event else ""
        self.sections["convergence"] = Section(
            "Route convergence: container start → first 200 through the proxy",
            f"""{n} containers (busybox httpd on this run's bridge network), created before the proxy starts, then
started one at a time (`docker start` through the API). For each, GETs through the proxy every ~3 ms
(a new connection each) until the first `200`; before the start they answer `503` (the probe's
User-Agent is in `wake.ignore_user_agents`, so no request wakes anything). The time includes busybox
httpd's own start.

| | p50 ms | p90 ms | p99 ms | max ms |
|---|---:|---:|---:|---:|
| from `docker start` returning | {ms(from_return, 0.5):.0f} | {ms(from_return, 0.9):.0f} | {ms(from_return, 0.99):.0f} | {max(from_return) * 1000:.0f} |
{ev_row}
{raw_row}
""",
            chart=self.chart("convergence", draw),
        )

    # --- 4: scale ------------------------------------------------------------------------------

