"""Constants and small helpers of the benchmarks."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SMALL = 100  # bytes
LARGE = 100 * 1024
PROBE_UA = "wpbench-probe"  # the proxies under test never wake anything for this User-Agent

# The tests' helpers, shared rather than copied: free ports, and the guard that no address off a
# local Docker bridge is ever contacted.
sys.path.insert(0, str(REPO / "tests" / "integration"))
from harness import assert_bridge_route  # noqa: E402
from harness import free_port as free_port  # noqa: E402  (re-exported for the sections)

# --- small helpers ---------------------------------------------------------------------------


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
    """Resident memory of `pid` and its descendants (the `wakeproxy` command: supervisor, controller,
    workers), in MB."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text(), re.M)
            total += int(m.group(1)) / 1024 if m else 0.0
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


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
    """Refuse to contact an address that is not on a local Docker bridge (the tests' own check)."""
    assert_bridge_route(addr)
    return addr




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
