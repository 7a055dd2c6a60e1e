"""wakeproxy benchmarks: side-by-side ratios measured in one run.

Run through `scripts/bench` (which installs wrk and nginx-light and the venv).
Every server it starts listens on 127.0.0.1; the one container it creates uses
the host network, so no traffic leaves loopback.  Everything is cleaned up on
exit, including on failure.

Section "throughput": HTTP/1.1 keep-alive requests/s and latency (wrk) for a
100-byte response, through:
  direct     nginx serving the file (the physical limit)
  mitmdump   stock `mitmdump -s addons/wakeproxy.py` with the same config
  wakeproxy  the `wakeproxy` command (lean master, same addons)
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
def process(cmd: list[str], log: Path, ready: tuple[int, str] | None = None, timeout: float = 20.0) -> Iterator[subprocess.Popen]:
    """Run `cmd`; with `ready=(port, host)`, wait until a GET for that host through the port answers 200."""
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        if ready:
            deadline = time.monotonic() + timeout
            while not answers_200(*ready):
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (5 s per measurement)")
    ap.add_argument("--seconds", type=int, default=None, help="seconds per wrk run (default 15, quick 5)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    seconds = args.seconds or (5 if args.quick else 15)

    run = f"wpbench-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{run}-"))
    tmp.chmod(0o755)  # nginx's workers run as an unprivileged user
    client = docker.from_env()
    container = None
    results: dict[str, dict[str, float]] = {}
    try:
        # Backend: nginx on loopback serving a 100-byte file with keep-alive.
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
        busybox = shutil.which("busybox") or "/bin/busybox"
        build = tmp / "image"
        build.mkdir()
        shutil.copy(busybox, build / "busybox")
        (build / "Dockerfile").write_text('FROM scratch\nCOPY busybox /bin/busybox\nCMD ["/bin/busybox","sleep","86400"]\n')
        image, _ = client.images.build(path=str(build), tag=f"{run}-img", rm=True)
        container = client.containers.run(
            image.id, name=f"{run}-site", detach=True, network_mode="host",
            labels={"wakeproxy.host": "bench.test", "wakeproxy.port": str(nginx_port)},
        )
        http_port, https_port = free_port(), free_port()
        cfg = tmp / "wakeproxy.yaml"
        cfg.write_text(
            f'listen: {{http: "127.0.0.1:{http_port}", https: "127.0.0.1:{https_port}"}}\n'
            f'state_dir: "{tmp}/state"\n'
        )
        with process(["nginx", "-c", str(tmp / "nginx.conf")], tmp / "nginx.log"):
            wait_port(nginx_port)
            results["direct (nginx)"] = wrk(f"http://127.0.0.1:{nginx_port}/small", "bench.test", seconds, args.connections)
            variants = {
                "stock mitmdump -s addons/wakeproxy.py": [
                    str(VENV_BIN / "mitmdump"), "-q", "-s", str(REPO / "addons" / "wakeproxy.py"),
                    "--set", f"wakeproxy_config={cfg}",
                ],
                "wakeproxy": [str(VENV_BIN / "wakeproxy"), "--config", str(cfg)],
            }
            for name, cmd in variants.items():
                with process(cmd, tmp / f"{len(results)}.log", ready=(http_port, "bench.test")):
                    wrk(f"http://127.0.0.1:{http_port}/small", "bench.test", 2, args.connections)  # warm-up
                    results[name] = wrk(f"http://127.0.0.1:{http_port}/small", "bench.test", seconds, args.connections)
    finally:
        if container is not None:
            container.remove(force=True)
        with contextlib.suppress(Exception):
            client.images.remove(f"{run}-img", force=True)
        shutil.rmtree(tmp, ignore_errors=True)

    base = results["wakeproxy"]["rps"]
    lines = [
        "| target | req/s | p50 ms | p99 ms | errors | wakeproxy ÷ target |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errors']:.0f} | {base / r['rps']:.2f}× |"
        )
    table = "\n".join(lines)
    print(table)
    write_report(Path(args.output), table, seconds, args.connections)
    return 0


def write_report(path: Path, table: str, seconds: int, connections: int) -> None:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1) if m else cpu
    import mitmproxy.version

    body = f"""# Benchmarks

Produced by `scripts/bench{' --quick' if seconds <= 5 else ''}` on {datetime.date.today().isoformat()}.
Machine: {os.cpu_count()} cores, {cpu}; Python {platform.python_version()}; mitmproxy {mitmproxy.version.VERSION}.
The machine is shared and noisy: compare the ratios within one run, not absolute numbers across runs.

## Throughput: HTTP/1.1 keep-alive, 100-byte response

`wrk -t2 -c{connections} -d{seconds}s --latency`, after a 2 s warm-up, against nginx on 127.0.0.1
(`direct`) and through each proxy (mitmdump with `-q`, so it prints no flows) routing `Host: bench.test` to that nginx (a host-network container
labelled `wakeproxy.host=bench.test`). The same config and the same addons in both proxies.

{table}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
