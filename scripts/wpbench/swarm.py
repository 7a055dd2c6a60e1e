"""The swarm section: waking a Swarm service at 0 replicas, through the proxy vs by hand.

Everything that contacts a task address runs inside the network namespace of an "anchor" container on
this run's attachable overlay (`nsenter -t PID -n`): the proxy (listening on the anchor's port 8080,
published on 127.0.0.1) and the raw baseline's probe. A packet from the host's own namespace to an
overlay address would leave the machine. The engine is made a one-node Swarm only when it is in none,
and leaves it again at the end only then.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import docker
import docker.types

from wpbench.common import REPO, Section, Target, free_port, http_status, process, quantile
from wpbench.wake import first_byte

# Run inside the anchor's network namespace: `docker service scale SERVICE=1` (the API call), then the
# task listing every 10 ms until a task runs, then a GET to its address until the app answers 200.
RAW_PROBE = r"""
import json, socket, sys, time
import docker
sid = sys.argv[1]
api = docker.from_env().api
t0 = time.perf_counter()
svc = api.inspect_service(sid)
api.update_service(sid, svc["Version"]["Index"], mode=docker.types.ServiceMode("replicated", 1),
                   fetch_current_spec=True)
ip = None
while ip is None:
    for t in api.tasks(filters={"service": sid, "desired-state": "running"}):
        if t["Status"]["State"] == "running":
            for att in t.get("NetworksAttachments") or ():
                if att["Network"]["Spec"]["Name"] == sys.argv[2]:
                    ip = att["Addresses"][0].split("/")[0]
    if ip is None:
        time.sleep(0.01)
    if time.perf_counter() - t0 > 60:
        raise SystemExit("no running task after 60 s")
t_running = time.perf_counter() - t0
while True:
    try:
        with socket.create_connection((ip, 80), 0.5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if s.recv(16).startswith(b"HTTP/1.") :
                break
    except OSError:
        time.sleep(0.005)
print(json.dumps({"running": t_running, "first_byte": time.perf_counter() - t0}))
"""


class SwarmSection:
    """The swarm section of a benchmark run (a part of `core.Bench`)."""

    def swarm(self) -> None:
        cycles = self.args.wake_cycles or (5 if self.quick else 10)
        state = (self.client.info().get("Swarm") or {})
        created = False
        if state.get("LocalNodeState") == "inactive":
            self.note("docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377")
            self.client.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
            created = True
        elif not state.get("ControlAvailable"):
            raise RuntimeError("the engine is a Swarm worker: the swarm section needs a manager (or no swarm)")
        overlay = anchor = service = None
        try:
            overlay = self.client.networks.create(f"{self.run}-ov", driver="overlay", attachable=True,
                                                  labels={"wpbench.run": self.run})
            port = free_port()
            self.note(f"docker network create -d overlay --attachable {self.run}-ov")
            anchor = self.client.containers.run(
                self.image.id, ["sleep", "86400"], name=f"{self.run}-anchor", detach=True, network=overlay.name,
                ports={"8080/tcp": ("127.0.0.1", port)}, labels={"wpbench.run": self.run})
            self.note(f"docker run -d --name {self.run}-anchor --network {self.run}-ov -p 127.0.0.1:{port}:8080 "
                      f"{self.run}-img sleep 86400")
            host = f"swarm.{self.domain}"
            service = self.client.services.create(
                self.image.id, ["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www"],
                name=f"{self.run}-svc", networks=[overlay.name], init=True,
                mode=docker.types.ServiceMode("replicated", 0),
                labels={"wpbench.run": self.run, "wakeproxy.host": host, "wakeproxy.idle-timeout": "0"})
            self.note(f"docker service create --name {self.run}-svc --network {self.run}-ov --init --replicas 0 "
                      f"--label wakeproxy.host={host} --label wakeproxy.idle-timeout=0 {self.run}-img "
                      "sh -c 'mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www'")
            anchor.reload()
            pid = str(anchor.attrs["State"]["Pid"])
            cfg, _ = self.proxy_config("swarm", networks=[overlay.name])
            lines = cfg.read_text().splitlines()
            assert lines[0].startswith("listen:")
            lines[0] = 'listen: {http: "0.0.0.0:8080", https: null}'  # in the anchor's namespace
            cfg.write_text("\n".join(lines) + "\n")
            argv = ["nsenter", "-t", pid, "-n", "--", *self.wakeproxy_cmd(cfg)]
            self.cmd(argv)
            probe = self.tmp / "raw_probe.py"
            probe.write_text(RAW_PROBE)
            raw_argv = ["nsenter", "-t", pid, "-n", "--", sys.executable, str(probe), service.id, overlay.name]
            self.note(" ".join(raw_argv).replace(service.id, "$SERVICE_ID"))
            raw: list[float] = []
            raw_running: list[float] = []
            proxied: list[float] = []
            log = self.tmp / "swarm.log"

            def scale_down() -> None:
                service.reload()
                service.scale(0)
                deadline = time.monotonic() + 30
                while any(t["Status"]["State"] in ("running", "starting", "preparing", "assigned", "pending")
                          for t in service.tasks()) and time.monotonic() < deadline:
                    time.sleep(0.1)
                # Until the proxy has seen it (8 probe answers in a row that are not the app's).
                in_a_row = 0
                while in_a_row < 8 and time.monotonic() < deadline:
                    in_a_row = in_a_row + 1 if http_status(port, host) != 200 else 0
                    time.sleep(0.01)

            with process(argv, log, ready_line="wakeproxy ready", timeout=60):
                for _ in range(cycles):  # raw and proxied alternate: both see the same (noisy) machine
                    out = subprocess.run(raw_argv, capture_output=True, text=True, timeout=120, cwd=REPO)
                    if out.returncode != 0:
                        raise RuntimeError(f"raw probe failed: {out.stderr[-2000:]}")
                    got = json.loads(out.stdout.strip().splitlines()[-1])
                    raw.append(got["first_byte"])
                    raw_running.append(got["running"])
                    scale_down()
                    t0 = time.perf_counter()
                    status = first_byte(port, host)
                    proxied.append(time.perf_counter() - t0)
                    if status != 200:
                        raise RuntimeError(f"woken request answered {status}:\n{log.read_text()[-3000:]}")
                    scale_down()
                wake_lines = [ln for ln in log.read_text(errors="replace").splitlines() if "ready (" in ln][-1:]
        finally:
            for thing in (service, anchor):
                if thing is not None:
                    try:
                        thing.remove(force=True) if thing is anchor else thing.remove()
                    except docker.errors.APIError:
                        pass
            if overlay is not None:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        overlay.remove()
                        break
                    except docker.errors.APIError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.5)
            if created:
                self.client.swarm.leave(force=True)
        r50, r90 = quantile(raw, 0.5) * 1000, quantile(raw, 0.9) * 1000
        run50 = quantile(raw_running, 0.5) * 1000
        p50, p90 = quantile(proxied, 0.5) * 1000, quantile(proxied, 0.9) * 1000
        self.targets.append(Target("Swarm wake: time to first byte p90", "≤ raw + 300 ms",
                                   f"raw {r90:.0f} ms, wakeproxy {p90:.0f} ms ({p90 - r90:+.0f} ms)",
                                   p90 <= r90 + 300))
        self.sections["swarm"] = Section(
            "Swarm: time to first byte for a service at 0 replicas",
            f"""{cycles} cycles each, raw and proxied alternating, on a one-node Swarm (`--init`, busybox httpd,
scaled back to 0 between cycles). *raw*: `docker service scale SVC=1` (the version-checked API update),
the task listing every 10 ms until a task runs, then a GET to the task's overlay address until the app
answers — run inside the overlay's network namespace, as the proxy is. *wakeproxy*: a GET through the
proxy (itself in that namespace, its port published on 127.0.0.1) for the sleeping service's host until
the first byte of the app's answer: the proxy scales, lists the tasks every 0.05 s in the first 5 s after
the scale, probes each task's port, forwards.

| | p50 ms | p90 ms |
|---|---:|---:|
| raw: scale + task running (the listing) | {run50:.0f} | |
| raw: scale + first answer | {r50:.0f} | {r90:.0f} |
| through wakeproxy (first byte) | {p50:.0f} | {p90:.0f} |
| overhead | {p50 - r50:+.0f} | {p90 - r90:+.0f} |

{("Proxy log of the last wake: `" + wake_lines[0].split('wake ', 1)[-1] + "`") if wake_lines else ""}
""")
