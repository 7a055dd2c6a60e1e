"""wakeproxy benchmarks: side-by-side ratios measured in one run.

Run through `scripts/bench` (which installs wrk and nginx-light and the venv).
Every server it starts listens on 127.0.0.1; the one container it creates uses
the host network, so no traffic leaves loopback.  Everything is cleaned up on
exit, including on failure.

Sections:
  throughput  HTTP/1.1 keep-alive requests/s and latency (wrk), 100-byte response:
              direct nginx vs stock `mitmdump -s addons/wakeproxy.py` vs `wakeproxy`
  wake        time to first byte for a sleeping container vs raw `docker start` +
              first connect (p50/p90), and 200 concurrent requests during one wake
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


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


def answers_200(port: int, host: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@contextlib.contextmanager
def process(cmd: list[str], log: Path, ready: tuple[int, str] | None = None, timeout: float = 20.0,
            ready_line: str | None = None) -> Iterator[subprocess.Popen]:
    """Run `cmd`; with `ready=(port, host)`, wait until a GET for that host through the port answers 200;
    with `ready_line`, until that text appears in its output."""
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        if ready:
            deadline = time.monotonic() + timeout
            while not answers_200(*ready):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text(errors='replace')}")
                time.sleep(0.1)
        if ready_line:
            deadline = time.monotonic() + timeout
            while ready_line not in log.read_text(errors="replace"):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text(errors='replace')}")
                time.sleep(0.1)
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wrk(url: str, host: str, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"Host: {host}", url],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    return {"rps": rps, "p50": pct("50"), "p99": pct("99"),
            "errors": errors + (int(non2xx.group(1)) if non2xx else 0)}


class Bench:
    """Owns everything one benchmark run starts; `close()` removes it all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.seconds = args.seconds or (5 if args.quick else 15)
        self.run = f"wpbench-{uuid.uuid4().hex[:8]}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.run}-"))
        self.tmp.chmod(0o755)  # nginx's workers run as an unprivileged user
        self.client = docker.from_env()
        self.containers: list = []
        self.network = None
        self.sections: dict[str, str] = {}
        busybox = shutil.which("busybox") or "/bin/busybox"
        build = self.tmp / "image"
        build.mkdir()
        shutil.copy(busybox, build / "busybox")
        (build / "Dockerfile").write_text(
            'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox","--install","-s","/bin"]\n'
            'CMD ["/bin/busybox","sleep","86400"]\n'
        )
        self.image, _ = self.client.images.build(path=str(build), tag=f"{self.run}-img", rm=True)

    def close(self) -> None:
        for c in self.containers:
            with contextlib.suppress(Exception):
                c.remove(force=True)
        if self.network is not None:
            with contextlib.suppress(Exception):
                self.network.remove()
        with contextlib.suppress(Exception):
            self.client.images.remove(f"{self.run}-img", force=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def proxy_config(self, name: str, extra: str = "") -> tuple[Path, int]:
        http_port, https_port = free_port(), free_port()
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(
            f'listen: {{http: "127.0.0.1:{http_port}", https: "127.0.0.1:{https_port}"}}\n'
            f'state_dir: "{self.tmp}/state"\n{extra}'
        )
        return cfg, http_port

    # --- section 1 ------------------------------------------------------------------

    def throughput(self) -> None:
        tmp = self.tmp
        (tmp / "www").mkdir()
        (tmp / "www" / "small").write_bytes(b"x" * 99 + b"\n")
        (tmp / "www" / "index.html").write_bytes(b"ok\n")
        nginx_port = free_port()
        (tmp / "nginx.conf").write_text(f"""
worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{nginx_port}; root {tmp}/www; }} }}
""")
        # A host-network container declares the site; its address is therefore 127.0.0.1.
        self.containers.append(self.client.containers.run(
            self.image.id, name=f"{self.run}-site", detach=True, network_mode="host",
            labels={"wakeproxy.host": "bench.test", "wakeproxy.port": str(nginx_port)},
        ))
        cfg, http_port = self.proxy_config("throughput")
        results: dict[str, dict[str, float]] = {}
        seconds, conns = self.seconds, self.args.connections
        with process(["nginx", "-c", str(tmp / "nginx.conf")], tmp / "nginx.log"):
            wait_port(nginx_port)
            results["direct (nginx)"] = wrk(f"http://127.0.0.1:{nginx_port}/small", "bench.test", seconds, conns)
            variants = {
                "stock mitmdump -s addons/wakeproxy.py": [
                    str(VENV_BIN / "mitmdump"), "-q", "-s", str(REPO / "addons" / "wakeproxy.py"),
                    "--set", f"wakeproxy_config={cfg}",
                ],
                "wakeproxy": [str(VENV_BIN / "wakeproxy"), "--config", str(cfg)],
            }
            for name, cmd in variants.items():
                with process(cmd, tmp / f"tp-{len(results)}.log", ready=(http_port, "bench.test")):
                    wrk(f"http://127.0.0.1:{http_port}/small", "bench.test", 2, conns)  # warm-up
                    results[name] = wrk(f"http://127.0.0.1:{http_port}/small", "bench.test", seconds, conns)
        base = results["wakeproxy"]["rps"]
        lines = [
            "| target | req/s | p50 ms | p99 ms | errors | wakeproxy ÷ target |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in results.items():
            lines.append(
                f"| {name} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errors']:.0f} "
                f"| {base / r['rps']:.2f}× |"
            )
        self.sections["throughput"] = f"""## Throughput: HTTP/1.1 keep-alive, 100-byte response

`wrk -t2 -c{conns} -d{seconds}s --latency`, after a 2 s warm-up, against nginx on 127.0.0.1
(`direct`) and through each proxy (mitmdump with `-q`, so it prints no flows) routing `Host: bench.test`
to that nginx (a host-network container labelled `wakeproxy.host=bench.test`). The same config and the
same addons in both proxies.

""" + "\n".join(lines) + "\n"

    # --- section 2 ------------------------------------------------------------------------

    def wake(self) -> None:
        cycles = self.args.wake_cycles
        self.network = self.client.networks.create(f"{self.run}-net", driver="bridge")
        site = self.client.containers.create(
            self.image.id, name=f"{self.run}-wake", command=["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www"],
            labels={"wakeproxy.host": "wake.test"}, network=self.network.name,
        )
        self.containers.append(site)
        cfg, http_port = self.proxy_config("wake", f'docker: {{networks: ["{self.network.name}"]}}\n')

        def ip() -> str:
            site.reload()
            addr = site.attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"]
            route = subprocess.run(["ip", "route", "get", addr], capture_output=True, text=True).stdout
            if not re.search(r"dev (docker0|br-[0-9a-f]+)", route):
                raise RuntimeError(f"{addr} is not on a local bridge: {route}")
            return addr

        def stop() -> None:
            site.stop(timeout=0)
            site.wait(timeout=10)

        raw: list[float] = []
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

        proxied: list[float] = []
        burst: dict[str, float] = {}
        with process([str(VENV_BIN / "wakeproxy"), "--config", str(cfg)], self.tmp / "wake.log",
                     ready_line="wakeproxy ready"):
            for _ in range(cycles):
                t0 = time.perf_counter()
                status = first_byte(http_port, "wake.test")
                proxied.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"woken request answered {status}:\n{(self.tmp / 'wake.log').read_text()}")
                stop()
                time.sleep(0.5)  # let the proxy see the stop (a request within ms of it would still be routed)
            # 200 concurrent requests arriving during one wake.
            t_burst = time.time()
            import asyncio

            async def one() -> tuple[int, float]:
                t = time.perf_counter()
                st = await asyncio.to_thread(first_byte, http_port, "wake.test")
                return st, time.perf_counter() - t

            async def many() -> list[tuple[int, float]]:
                return await asyncio.gather(*(one() for _ in range(200)))

            import concurrent.futures
            asyncio.get_event_loop_policy()
            loop = asyncio.new_event_loop()
            loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=200))
            try:
                answers = loop.run_until_complete(many())
            finally:
                loop.close()
            starts = sum(1 for ev in self.client.events(
                decode=True, since=int(t_burst) - 1, until=int(time.time()) + 1,
                filters={"container": site.id, "event": "start"},
            ) if ev.get("timeNano", 0) >= t_burst * 1e9)
            waits = sorted(w for _, w in answers)
            burst = {
                "errors": sum(1 for st, _ in answers if st != 200),
                "starts": starts,
                "p50": quantile(waits, 0.5) * 1000,
                "p90": quantile(waits, 0.9) * 1000,
            }
        r50, r90 = quantile(sorted(raw), 0.5) * 1000, quantile(sorted(raw), 0.9) * 1000
        p50, p90 = quantile(sorted(proxied), 0.5) * 1000, quantile(sorted(proxied), 0.9) * 1000
        self.sections["wake"] = f"""## Wake: time to first byte for a sleeping container

{cycles} cycles each. *raw*: `docker start` (API) until the first TCP connect to the container's port
succeeds. *wakeproxy*: a GET through the proxy for the stopped container's host until the first byte of
the app's answer (the proxy starts the container, waits for readiness, forwards). busybox httpd on a
bridge network; the container is stopped (`docker stop -t 0`) between cycles.

| | p50 ms | p90 ms |
|---|---:|---:|
| raw docker start + first connect | {r50:.0f} | {r90:.0f} |
| through wakeproxy (first byte) | {p50:.0f} | {p90:.0f} |
| overhead | {p50 - r50:+.0f} | {p90 - r90:+.0f} |

Target: p90 overhead ≤ 150 ms.

200 concurrent requests during one wake: {burst['errors']} errors, {burst['starts']} `start` event(s),
wait p50 {burst['p50']:.0f} ms, p90 {burst['p90']:.0f} ms.
"""


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    i = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[i]


def first_byte(port: int, host: str) -> int:
    """GET / for `host` through the proxy; the status code once the first bytes arrive."""
    with socket.create_connection(("127.0.0.1", port), 60) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(64)
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if status >= 500:
        print(f"  {host}: {(head + rest).decode(errors='replace')[-400:]}", file=sys.stderr)
    return status


SECTIONS = ("throughput", "wake")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (5 s per measurement)")
    ap.add_argument("--seconds", type=int, default=None, help="seconds per wrk run (default 15, quick 5)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--wake-cycles", type=int, default=10)
    ap.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    ap.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    bench = Bench(args)
    try:
        for name in args.only or SECTIONS:
            print(f"== {name}", flush=True)
            getattr(bench, name)()
            print(bench.sections[name], flush=True)
    finally:
        bench.close()
    write_report(Path(args.output), bench)
    return 0


def write_report(path: Path, bench: Bench) -> None:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1) if m else cpu
    import mitmproxy.version

    command = "scripts/bench" + (" --quick" if bench.quick else "")
    body = f"""# Benchmarks

Produced by `{command}` on {datetime.date.today().isoformat()}.
Machine: {os.cpu_count()} cores, {cpu}; Python {platform.python_version()}; mitmproxy {mitmproxy.version.VERSION};
Docker engine {bench.client.version().get("Version", "?")}.
The machine is shared and noisy: compare the ratios within one run, not absolute numbers across runs.

""" + "\n".join(bench.sections.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
