"""The benchmark run: what it owns (containers, networks, nginx, the proxies) and removes."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import ipaddress
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker

from wpbench.common import (
    LARGE,
    PROBE_UA,
    REPO,
    SMALL,
    VENV_BIN,
    Section,
    Target,
    check_local_bridge,
    free_port,
    process,
    wait_port,
)
from wpbench.convergence import ConvergenceSection
from wpbench.debugui import DebugSection
from wpbench.metrics import MetricsSection
from wpbench.scale import ScaleSection
from wpbench.soak import SoakSection
from wpbench.swarm import SwarmSection
from wpbench.throughput import ThroughputSection
from wpbench.wake import WakeSection

# --- the benchmark ------------------------------------------------------------------------------



class Bench(ThroughputSection, WakeSection, ConvergenceSection, ScaleSection, SoakSection, SwarmSection,
            MetricsSection, DebugSection):
    """Owns everything one benchmark run starts; `close()` removes it all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.seconds = args.seconds or (1 if args.quick else 2)
        self.rounds = args.rounds or (1 if args.quick else 5)
        self.warm_up = "500ms"  # h2load's, before each TLS run (the proxies are warm; this is for handshakes)
        self.run = f"wpbench-{uuid.uuid4().hex[:8]}"
        self.domain = f"{self.run}.test"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.run}-"))
        self.tmp.chmod(0o755)  # nginx's and wakeproxy's workers run as an unprivileged user
        self.client = docker.from_env(timeout=60)
        self.stack = contextlib.ExitStack()  # long-lived processes (the nginx instances)
        self.sections: dict[str, Section] = {}
        self.targets: list[Target] = []
        self.charts_dir = Path(args.output).resolve().parent
        self._backend: dict[str, int] | None = None
        self.pids: dict[str, int] = {}  # the nginx instances' master PIDs
        self._front: dict[str, int] | None = None
        self._site = False
        self._network = None
        self.commands: list[str] = []  # of the section being run
        busybox = shutil.which("busybox") or "/bin/busybox"
        build = self.tmp / "image"
        build.mkdir()
        shutil.copy(busybox, build / "busybox")
        (build / "Dockerfile").write_text(
            'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox","--install","-s","/bin"]\n'
            'CMD ["/bin/busybox","sleep","86400"]\n'
        )
        self.image, _ = self.client.images.build(path=str(build), tag=f"{self.run}-img", rm=True)

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stack.close()
        self.remove_containers()
        with contextlib.suppress(Exception):
            for net in self.client.networks.list(filters={"label": f"wpbench.run={self.run}"}):
                net.remove()
        with contextlib.suppress(Exception):
            self.client.images.remove(f"{self.run}-img", force=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def remove_containers(self, extra_filter: dict[str, str] | None = None) -> float:
        """Remove this run's containers (in parallel); the seconds it took."""
        t0 = time.perf_counter()
        labels = [f"wpbench.run={self.run}"] + [f"{k}={v}" for k, v in (extra_filter or {}).items()]
        try:
            ids = [c["Id"] for c in self.client.api.containers(all=True, filters={"label": labels})]
        except Exception:
            return 0.0
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: self._remove(i), ids))
        return time.perf_counter() - t0

    def _remove(self, cid: str) -> None:
        with contextlib.suppress(Exception):
            self.client.api.remove_container(cid, force=True)

    def labels(self, host: str, **extra: str) -> dict[str, str]:
        # idle-timeout=0: no proxy on this engine (ours or anyone's) ever stops a benchmark container.
        return {"wpbench.run": self.run, "wakeproxy.host": host, "wakeproxy.idle-timeout": "0", **extra}

    def cmd(self, argv: list[str]) -> None:
        """Record a command line for the report (paths of the run's temp dir shortened to $TMP), preceded
        by the files it reads that this run wrote (configs, the routing script)."""
        for a in argv:
            for path in re.findall(rf"{re.escape(str(self.tmp))}/[\w.-]+\.(?:yaml|conf|py)", a):
                self.file(Path(path))
        text = " ".join(a if re.fullmatch(r"[\w@%+=:,./$-]+", a) else f"'{a}'" for a in argv)
        self.note(text)

    def file(self, path: Path) -> None:
        self.note(f"cat > {path} <<'EOF'\n{path.read_text().strip()}\nEOF")

    def note(self, text: str) -> None:
        text = text.replace(str(self.tmp), "$TMP").replace(str(REPO) + "/", "").replace(self.run, "$RUN")
        if text not in self.commands:
            self.commands.append(text)

    # --- shared fixtures ----------------------------------------------------------------------

    def network(self):
        if self._network is None:
            self.note(f"docker network create --label wpbench.run={self.run} {self.run}-net")
            self._network = self.client.networks.create(
                f"{self.run}-net", driver="bridge", labels={"wpbench.run": self.run})
        return self._network

    def subnet(self) -> ipaddress.IPv4Network:
        """This run's bridge network's subnet, once checked to be routed through a local bridge."""
        net = self.network()
        net.reload()
        subnet = ipaddress.ip_network(net.attrs["IPAM"]["Config"][0]["Subnet"])
        check_local_bridge(str(subnet[2]))
        return subnet

    def cert(self) -> tuple[Path, Path]:
        crt, key = self.tmp / "tls.crt", self.tmp / "tls.key"
        if not crt.exists():
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID

            k = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.test")])
            now = datetime.datetime.now(datetime.UTC)
            c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
                 .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                 .not_valid_after(now + datetime.timedelta(days=2))
                 .add_extension(x509.SubjectAlternativeName([x509.DNSName("*.test"), x509.DNSName(f"*.{self.domain}")]),
                                critical=False)
                 .sign(k, hashes.SHA256()))
            crt.write_bytes(c.public_bytes(serialization.Encoding.PEM))
            key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
            key.chmod(0o644)  # read by nginx's master (root) only, but keep it simple
        return crt, key

    def backend(self) -> dict[str, int]:
        """The backend every proxy forwards to: nginx, one worker, plain HTTP/1.1 (and an h2 TLS
        listener for the `direct` rows), plus a stub_status port that counts accepted connections."""
        if self._backend is None:
            tmp = self.tmp
            www = tmp / "www"
            www.mkdir(exist_ok=True)
            (www / "small").write_bytes(b"x" * (SMALL - 1) + b"\n")
            (www / "large").write_bytes(b"y" * (LARGE - 1) + b"\n")
            (www / "index.html").write_bytes(b"ok\n")
            crt, key = self.cert()
            ports = {"http": free_port(), "https": free_port(), "status": free_port()}
            conf = tmp / "backend.conf"
            conf.write_text(f"""
worker_processes 1; daemon off; pid {tmp}/backend.pid; error_log {tmp}/backend-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s; default_type text/plain;
  server {{
    listen 127.0.0.1:{ports['http']} reuseport; listen 127.0.0.1:{ports['https']} ssl http2;
    ssl_certificate {crt}; ssl_certificate_key {key};
    root {www};
  }}
  server {{ listen 127.0.0.1:{ports['status']}; location / {{ stub_status; }} }}
}}
""")
            argv = ["nginx", "-c", str(conf), "-e", str(tmp / "backend-error.log")]
            self.cmd(argv)
            self.pids["direct (nginx)"] = self.stack.enter_context(process(argv, tmp / "backend.log")).pid
            for p in ports.values():
                wait_port(p)
            self._backend = ports
        return self._backend

    def backend_accepts(self) -> int:
        """Connections the backend nginx has accepted so far (this request's own included)."""
        with socket.create_connection(("127.0.0.1", self.backend()["status"]), 5) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: status\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        m = re.search(rb"\n\s*(\d+) (\d+) (\d+)", data)
        if not m:
            raise RuntimeError(f"unexpected stub_status answer: {data!r}")
        return int(m.group(1))

    def front(self) -> dict[str, int]:
        """nginx as a reverse proxy to the backend: the physical-limit reference."""
        if self._front is None:
            tmp = self.tmp
            b = self.backend()
            crt, key = self.cert()
            ports = {"http": free_port(), "https": free_port()}
            conf = tmp / "front.conf"
            conf.write_text(f"""
worker_processes 1; daemon off; pid {tmp}/front.pid; error_log {tmp}/front-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  upstream backend {{ server 127.0.0.1:{b['http']}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{ports['http']}; listen 127.0.0.1:{ports['https']} ssl http2;
    ssl_certificate {crt}; ssl_certificate_key {key};
    location / {{
      proxy_pass http://backend; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_buffers 32 8k;
    }}
  }}
}}
""")
            argv = ["nginx", "-c", str(conf), "-e", str(tmp / "front-error.log")]
            self.cmd(argv)
            self.pids["nginx reverse proxy"] = self.stack.enter_context(process(argv, tmp / "front.log")).pid
            for p in ports.values():
                wait_port(p)
            self._front = ports
        return self._front

    def caddy(self) -> dict[str, int] | None:
        """Caddy (Debian's caddy) as a plain reverse proxy to the backend, one process with GOMAXPROCS=1
        (one core, as the nginx reverse proxy has one worker); None when caddy is not installed."""
        if getattr(self, "_caddy", None) is None:
            exe = shutil.which("caddy")
            if exe is None:
                return None
            tmp, b = self.tmp, self.backend()
            crt, key = self.cert()
            ports = {"http": free_port(), "https": free_port()}
            conf = tmp / "Caddyfile"
            conf.write_text(f"""{{
  admin off
  auto_https off
}}
http://:{ports['http']} {{
  bind 127.0.0.1
  reverse_proxy 127.0.0.1:{b['http']}
}}
https://:{ports['https']} {{
  bind 127.0.0.1
  tls {crt} {key}
  reverse_proxy 127.0.0.1:{b['http']}
}}
""")
            argv = [exe, "run", "--config", str(conf), "--adapter", "caddyfile"]
            self.cmd(["GOMAXPROCS=1", *argv])
            env = {"GOMAXPROCS": "1", "HOME": str(tmp), "XDG_DATA_HOME": str(tmp / "caddy-data"),
                   "XDG_CONFIG_HOME": str(tmp / "caddy-config")}
            self.pids["caddy reverse proxy"] = self.stack.enter_context(
                process(argv, tmp / "caddy.log", env=env)).pid
            for port in ports.values():
                wait_port(port)
            self._caddy = ports
        return self._caddy

    def site(self) -> str:
        """A host-network container labelled with `bench.<run>.test` → the backend nginx. Its address
        is therefore 127.0.0.1: proxied traffic stays on loopback."""
        host = f"bench.{self.domain}"
        if not self._site:
            b = self.backend()
            self.note(f"docker run -d --name {self.run}-site --network host --label wpbench.run={self.run} "
                      f"--label wakeproxy.host={host} --label wakeproxy.port={b['http']} "
                      f"--label wakeproxy.network=host --label wakeproxy.idle-timeout=0 {self.run}-img")
            self.client.containers.run(
                self.image.id, name=f"{self.run}-site", detach=True, network_mode="host",
                labels=self.labels(host, **{"wakeproxy.port": str(b["http"]), "wakeproxy.network": "host"}),
            )
            self._site = True
        return host

    def proxy_config(self, name: str, networks: list[str] | None = None,
                     workers: int | None = None) -> tuple[Path, dict[str, int]]:
        """A wakeproxy config on free 127.0.0.1 ports: only our network(s) (the host-network site names
        its own), nothing ever idles, no status endpoint, and the probe User-Agent never wakes.
        `workers`: serving processes (None: the default, one per core; 0: everything in one process)."""
        ports = {"http": free_port(), "https": free_port()}
        nets = ", ".join(f'"{n}"' for n in (networks if networks is not None else [self.network().name]))
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(
            f'listen: {{http: "127.0.0.1:{ports["http"]}", https: "127.0.0.1:{ports["https"]}"}}\n'
            f'state_dir: "{self.tmp}/state-{name}"\n'
            f'docker: {{networks: [{nets}]}}\n'
            f'idle: {{timeout: 0}}\n'
            f'status: {{listen: null}}\n'
            f'wake: {{ignore_user_agents: ["{PROBE_UA}"], per_client: 0}}\n'
            # The host-network site names its own network (outside docker.networks): a single-tenant
            # setting. The wake section wakes far more than 10 sites a minute from one client.
            f'labels: {{network: true}}\n'
            + (f'workers: {workers}\n' if workers is not None else '')
        )
        return cfg, ports

    def wakeproxy_cmd(self, cfg: Path) -> list[str]:
        return [str(VENV_BIN / "wakeproxy"), "--config", str(cfg)]

    def chart(self, name: str, draw, panels: int = 1) -> str | None:
        """Draw a chart with matplotlib (the `bench` extra) into <output dir>/benchmarks-<name>.png."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("  (matplotlib missing: no chart; install the `bench` extra)", file=sys.stderr)
            return None
        fig, ax = plt.subplots(1, panels, figsize=(9, 4.5), dpi=100)
        draw(fig, ax)
        fig.tight_layout()
        path = self.charts_dir / f"benchmarks-{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path.name

    # --- 1: throughput -------------------------------------------------------------------------

