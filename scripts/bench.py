"""wakeproxy benchmarks: wakeproxy against its peers and its limits, measured in one run.

Run through `scripts/bench` (which installs wrk, h2load, nginx-light and the venv with the `bench`
extra). Everything listens on 127.0.0.1; containers live on a bridge network this run creates (or use
the host network), and every address is checked to be on a local bridge before it is contacted.
Every process, container, network and image is removed on exit, also on failure or Ctrl-C.

Sections:
  throughput   requests/s and latency (p50, p99): HTTP/1.1 keep-alive (wrk) and HTTP/2 over TLS
               (h2load), 100 B and 100 KB responses; direct nginx, nginx as a reverse proxy, stock
               mitmdump with a bare routing script, stock `mitmdump -s addons/wakeproxy.py`, `wakeproxy`
  wake         time to first byte for a sleeping container vs raw `docker start` + first connect,
               and 200 concurrent requests arriving during one wake
  convergence  container `start` → first 200 through the proxy for its host
  scale        1,000 labelled containers: resync time, memory, lookup cost, req/s vs 1 host
  soak         wrk for 60 s at 64 connections: errors and memory at start, middle, end
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import ipaddress
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SMALL = 100  # bytes
LARGE = 100 * 1024
PROBE_UA = "wpbench-probe"  # the proxies under test never wake anything for this User-Agent


# --- small helpers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def http_status(port: int, host: str, path: str = "/", timeout: float = 1.0, ua: str = PROBE_UA) -> int:
    """GET `path` for `host` on 127.0.0.1:`port`; the status code (0 on any failure)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {ua}\r\n"
                      f"Connection: close\r\n\r\n".encode())
            head = s.recv(64)
    except OSError:
        return 0
    parts = head.split(b" ", 2)
    return int(parts[1]) if head.startswith(b"HTTP/1.") and len(parts) > 1 and parts[1].isdigit() else 0


def answers_200(port: int, host: str) -> bool:
    return http_status(port, host) == 200


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its descendants so far (nginx: master + workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


def rss_mb(pid: int) -> float:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of `values` (any order)."""
    if not values:
        return float("nan")
    v = sorted(values)
    i = min(len(v) - 1, max(0, round(q * (len(v) - 1))))
    return v[i]


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


@contextlib.contextmanager
def process(cmd: list[str], log: Path, ready: tuple[int, str] | None = None, timeout: float = 30.0,
            ready_line: str | None = None, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run `cmd` in its own session; with `ready=(port, host)`, wait until a GET for that host through
    the port answers 200; with `ready_line`, until that text appears in its output. Stopped (SIGTERM,
    then SIGKILL) by PID on exit."""
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                             env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        if ready:
            while not answers_200(*ready):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.1)
        if ready_line:
            while ready_line not in log.read_text(errors="replace"):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.05)
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(8)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def in_subnet(addr: str, subnet: ipaddress.IPv4Network) -> str:
    if not addr or ipaddress.ip_address(addr) not in subnet:
        raise RuntimeError(f"container address {addr!r} is not on this run's bridge network {subnet}")
    return addr


def check_local_bridge(addr: str) -> str:
    """Refuse to contact an address that is not on a local Docker bridge (docker0 / br-…)."""
    route = subprocess.run(["ip", "route", "get", addr], capture_output=True, text=True, timeout=5).stdout
    if not re.search(r"dev (docker0|br-[0-9a-f]+)", route):
        raise RuntimeError(f"{addr} is not on a local bridge: {route}")
    return addr


# --- load generators --------------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    p50: float  # ms
    p99: float  # ms
    errors: int
    requests: int = 0
    upstream_conns: float | None = None  # new connections the backend accepted during the run
    cpu_ms: float = float("nan")  # CPU time of the server under test per request (incl. warm-up requests)
    requests_total: int = 0  # requests sent, warm-up included (what the CPU time was spent on)


def wrk_cmd(url: str, host: str, seconds: int, connections: int) -> list[str]:
    return ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"Host: {host}", url]


def wrk(url: str, host: str, seconds: int, connections: int) -> Load:
    out = subprocess.run(wrk_cmd(url, host, seconds, connections), capture_output=True, text=True,
                         check=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    n = int(total.group(1)) if total else 0
    return Load(rps, pct("50"), pct("99"), errors + (int(non2xx.group(1)) if non2xx else 0), n, requests_total=n)


def h2load_cmd(port: int, host: str, path: str, seconds: int, connections: int, h1: bool,
               log: Path | None = None, warm_up: str = "1s") -> list[str]:
    cmd = ["h2load", "-t2", f"-c{connections}", "-m1", f"-D{seconds}", f"--warm-up-time={warm_up}",
           f"--connect-to=127.0.0.1:{port}"]
    if h1:
        cmd.append("--h1")
    if log is not None:
        cmd.append(f"--log-file={log}")
    return cmd + [f"https://{host}{path}"]


def h2load(port: int, host: str, path: str, seconds: int, connections: int, h1: bool, log: Path,
           warm_up: str = "1s") -> Load:
    """h2load over TLS (SNI and :authority = `host`); percentiles from its per-request log."""
    log.unlink(missing_ok=True)
    out = subprocess.run(h2load_cmd(port, host, path, seconds, connections, h1, log, warm_up),
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    if not m:
        raise RuntimeError(f"h2load gave no result:\n{out[-2000:]}")
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    errors = (int(req.group(5)) + int(req.group(7)) if req else 0) + \
        (int(codes.group(3)) + int(codes.group(4)) if codes else 0)
    durations = []
    with contextlib.suppress(OSError), open(log) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3:
                durations.append(int(parts[2]) / 1000)
    log.unlink(missing_ok=True)
    done = int(req.group(3)) if req else 0
    # h2load counts only the main phase; the warm-up ran at about the same rate.
    warm = float(warm_up[:-2]) / 1000 if warm_up.endswith("ms") else float(warm_up.rstrip("s"))
    return Load(float(m.group(1)), quantile(durations, 0.5), quantile(durations, 0.99), errors,
                int(req.group(4)) if req else 0, requests_total=round(done * (1 + warm / seconds)))


# --- where the CPU goes ----------------------------------------------------------------------------

# A py-spy sample is charged to the first component whose pattern matches the file of its innermost
# frame (the code running when sampled). Order matters: specific before general.
COMPONENTS: list[tuple[str, re.Pattern[str] | None]] = [
    ("HTTP/2 codec (h2, hpack, hyperframe)", re.compile(r"(^|/)(h2|hpack|hyperframe)/")),
    ("mitmproxy HTTP/2 layer", re.compile(r"mitmproxy/proxy/layers/http/_http(2|_h2)\.py")),
    ("HTTP/1 parsing and serialising", re.compile(r"(^|/)h11/|mitmproxy/net/http/|layers/http/_http1\.py")),
    ("mitmproxy HTTP stream logic", re.compile(r"mitmproxy/proxy/layers/http/")),
    ("TLS (pyOpenSSL, mitmproxy TLS layer)", re.compile(r"(^|/)(OpenSSL|cryptography)/|layers/tls\.py|(^|/)ssl\.py")),
    ("hook dispatch (mitmproxy's, or wakeproxy's HookTable)",
     re.compile(r"mitmproxy/addonmanager\.py|mitmproxy/hooks\.py|(^|/)contextlib\.py|(^|/)addons/dispatch\.py")),
    ("mitmproxy's other addons", re.compile(r"mitmproxy/addons/")),
    ("wakeproxy addons", re.compile(r"^addons/|" + re.escape(str(REPO / "addons")) + "/")),  # py-spy shortens paths
    ("request/response objects (mitmproxy http.py, type checks)",
     re.compile(r"mitmproxy/(http\.py|utils/typecheck\.py|coretypes/)|(^|/)(dataclasses|typing|uuid)\.py")),
    ("mitmproxy proxy core (layers, server, tunnel)", re.compile(r"mitmproxy/")),
    ("asyncio, sockets", re.compile(r"(^|/)(asyncio/|selectors\.py|socket\.py)")),
    ("other", None),
]


def components(raw: Path) -> dict[str, float]:
    """py-spy `--format raw` output → share of samples per component (sums to 1)."""
    counts = dict.fromkeys((name for name, _ in COMPONENTS), 0)
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            leaf = stack.rsplit(";", 1)[-1]
            where = m.group(1) if (m := re.search(r"\((.*):\d+\)$", leaf)) else ""
            for name, pattern in COMPONENTS:
                if pattern is None or pattern.search(where):
                    counts[name] += int(n)
                    break
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


# --- the benchmark ------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    what: str
    achieved: str
    ok: bool | None  # None: not measured


@dataclass
class Section:
    title: str
    body: str
    commands: list[str] = field(default_factory=list)
    chart: str | None = None


class Bench:
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
        self.tmp.chmod(0o755)  # nginx's workers run as an unprivileged user
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

    def proxy_config(self, name: str, networks: list[str] | None = None) -> tuple[Path, dict[str, int]]:
        """A wakeproxy config on free 127.0.0.1 ports: only our network(s) (the host-network site names
        its own), nothing ever idles, no status endpoint, and the probe User-Agent never wakes."""
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

    def throughput(self) -> None:
        b, f = self.backend(), self.front()
        host = self.site()
        tmp = self.tmp
        seconds, conns, rounds = self.seconds, self.args.connections, self.rounds
        cfg, wp = self.proxy_config("throughput", networks=[])
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
            "stock mitmdump + bare routing script": ([
                mitmdump, "-q", "-s", str(route), "--mode", f"reverse:http://127.0.0.1:1@127.0.0.1:{bare_port}",
                "--set", "connection_strategy=lazy", "--set", "keep_host_header=true",
                "--set", "upstream_cert=false", "--set", f"confdir={tmp}/mitm-bare",
            ], bare_port, bare_port),
            "stock mitmdump -s addons/wakeproxy.py": ([
                mitmdump, "-q", "-s", str(REPO / "addons" / "wakeproxy.py"), "--set", f"wakeproxy_config={cfg_stock}",
            ], stock_ports["http"], stock_ports["https"]),
            "wakeproxy": (self.wakeproxy_cmd(cfg), wp["http"], wp["https"]),
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
        with contextlib.ExitStack() as st:
            # Every proxy runs from the start (idle ones cost nothing), so that for each scenario the
            # targets are measured back to back and see the same machine.
            for i, (name, (argv, port, _tls_port)) in enumerate(targets.items()):
                if argv is not None:
                    self.cmd(argv)
                    pids[name] = st.enter_context(process(argv, tmp / f"tp-{i}.log", ready=(port, host))).pid
                    wrk(f"http://127.0.0.1:{port}/small", host, 1, conns)  # warm-up, once per proxy
            # Rounds are the outer loop and every second round reverses the order of the targets:
            # each comparison is between runs close in time (the machine drifts), in both orders.
            for round_ in range(rounds):
                for key, (_, proto, path) in scenarios.items():
                    order = list(targets.items())
                    for name, (_argv, port, tls_port) in (order[::-1] if round_ % 2 else order):
                        before, cpu = self.backend_accepts(), cpu_seconds(pids[name])
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
                cpu_ms=statistics.median(r.cpu_ms for r in rs))

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
        self.targets += [
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
- **stock mitmdump -s addons/wakeproxy.py** and **wakeproxy**: the same config (but the ports), the same
  addons; the site is a host-network container labelled `wakeproxy.host=bench.<run>.test`.

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
            argv = [str(spy), "record", "--pid", str(pids[name]), "--duration", str(seconds), "--rate", "250",
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
            # Until the proxy has seen the stop, a request would still be routed to the old address.
            deadline = time.monotonic() + 10
            while http_status(ports["http"], host) != 503 and time.monotonic() < deadline:
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
            starts = sum(1 for ev in self.client.events(
                decode=True, since=int(t_burst) - 1, until=int(time.time()) + 1,
                filters={"container": site.id, "event": "start"},
            ) if ev.get("timeNano", 0) >= t_burst * 1e9)
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


SECTIONS = ("throughput", "wake", "convergence", "scale", "soak")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (≤ 2 minutes in all)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, action="extend", metavar="SECTION",
                    help=f"run only these sections ({', '.join(SECTIONS)})")
    ap.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"),
                    help="report path (charts are written next to it; default docs/benchmarks.md)")
    ap.add_argument("--seconds", type=int, default=None, help="seconds per throughput run (default 2, quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="throughput runs per target and scenario (default 5, quick 1)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--wake-cycles", type=int, default=None, help="default 10, quick 5")
    ap.add_argument("--convergence-containers", type=int, default=None, help="default 20, quick 10")
    ap.add_argument("--scale-containers", type=int, default=None, help="default 1000, quick 500")
    ap.add_argument("--soak-seconds", type=int, default=None, help="default 60, quick 15")
    args = ap.parse_args()

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    t_start = time.monotonic()
    failed: list[str] = []
    bench = Bench(args)
    elapsed: dict[str, float] = {}
    try:
        for name in args.only or SECTIONS:
            print(f"== {name}", flush=True)
            bench.commands = []
            t0 = time.monotonic()
            try:
                getattr(bench, name)()
            except Exception as e:  # report it, go on with the other sections
                import traceback

                traceback.print_exc()
                failed.append(name)
                bench.sections[name] = Section(name, f"**Failed:** `{type(e).__name__}: {str(e)[:500]}`\n")
            elapsed[name] = time.monotonic() - t0
            bench.sections[name].commands = bench.commands
            print(f"== {name}: {elapsed[name]:.0f} s\n{bench.sections[name].body}", flush=True)
        write_report(Path(args.output), bench, elapsed, time.monotonic() - t_start)
    finally:
        bench.close()
    print(f"total {time.monotonic() - t_start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def machine(bench: Bench) -> str:
    cpu = "unknown CPU"
    mem = "?"
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem = f"{int(m.group(1)) / 1024 / 1024:.0f} GB" if m else mem
    distro = "Linux"
    with contextlib.suppress(OSError):
        m = re.search(r'PRETTY_NAME="(.*)"', Path("/etc/os-release").read_text())
        distro = m.group(1) if m else distro
    import mitmproxy.version

    return (f"{os.cpu_count()} cores ({cpu}), {mem} RAM, {distro}, kernel {platform.release()}; "
            f"Python {platform.python_version()}, mitmproxy {mitmproxy.version.VERSION}; "
            f"Docker engine {bench.client.version().get('Version', '?')}; "
            f"{tool_version(['nginx', '-v']).replace('nginx version: ', '')}, "
            f"wrk {tool_version(['wrk', '-v']).split(' [')[0].replace('wrk ', '')}, "
            f"h2load {tool_version(['h2load', '--version']).split(' ')[-1]}.")


def write_report(path: Path, bench: Bench, elapsed: dict[str, float], total: float) -> None:
    argv = " ".join(sys.argv[1:])
    command = "scripts/bench" + (f" {argv}" if argv else "")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "addons"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    targets = ["| target | wanted | achieved | |", "|---|---|---|---|"]
    for t in bench.targets:
        mark = "✅" if t.ok else ("❌" if t.ok is not None else "—")
        targets.append(f"| {t.name} | {t.what} | {t.achieved} | {mark} |")
    parts = [f"""# Benchmarks

Produced by `{command}` on {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}
from commit {git or '?'}{' (with uncommitted changes in addons/)' if dirty else ''}, in {total / 60:.1f} minutes.

Machine: {machine(bench)}

The machine is shared and noisy, and the load generators run on the same 2 cores as the servers:
compare the ratios within one run, not absolute numbers across runs or machines. Reproduce with
`scripts/bench` (about 8 minutes) or `scripts/bench --quick` (under 2 minutes, shorter runs); it
installs Debian's `wrk`, `nghttp2-client` (h2load) and `nginx-light`, and the venv with the `bench` extra
(matplotlib, py-spy). Only 127.0.0.1 and the run's own containers are contacted. In the commands below,
`$TMP` is the run's temporary folder, `$RUN` its name (`wpbench-<random>`), and `$RUN-img` an image
built `FROM scratch` with Debian's busybox-static; every proxy listens on free 127.0.0.1 ports.

Profiling a miss: run the section's setup, put the load on, and attach py-spy to the proxy, e.g.
`.venv/bin/py-spy record --pid PID --duration 12 --rate 100 --threads --format raw --output p.raw`
(`--idle` to see the Docker thread's waits, `--native` for the interpreter's C frames such as the GC).

## Targets: achieved vs wanted

""" + "\n".join(targets) + "\n"]
    for name, sec in bench.sections.items():
        text = f"\n## {sec.title}\n\n{sec.body}"
        if sec.chart:
            text += f"\n![{sec.title}]({sec.chart})\n"
        if sec.commands:
            text += f"\nCommands ({elapsed.get(name, 0):.0f} s):\n\n```sh\n" + "\n".join(sec.commands) + "\n```\n"
        parts.append(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
