"""The load generators: wrk (HTTP/1.1) and h2load (HTTP/2, HTTP/1.1 over TLS)."""

from __future__ import annotations

import contextlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from wpbench.common import quantile

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
    controller_ms: float = 0.0  # of that, the wakeproxy controller's (workers > 0)


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


