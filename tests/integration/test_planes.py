"""The control/data split of the `wakeproxy` command, against the real Docker engine.

One supervisor, one controller (Docker, ACME, wakes, idle decisions, status) and `workers: 2`
serving processes. What is shown here: requests spread over both workers; the workers run as
`nobody` and hold no connection to the Docker socket (the controller does); a worker killed under
load costs at most the connections it held and is replaced within 2 s; with the controller killed,
running sites keep answering and a wake gets a 503 until it is back; `wakeproxy reload` under load
fails no request; 200 concurrent requests over all workers cause one start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from harness import REPO, backend_of, proxied, wait_for

WAKEPROXY = REPO / ".venv" / "bin" / "wakeproxy"
NOBODY = 65534


def status(p) -> dict:
    url = f"http://{p.config['status']['listen']}/status"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def docker_socket_peers() -> set[str]:
    """Inodes of the client ends of every connection to the Docker socket (from dockerd's side)."""
    out = subprocess.run(["ss", "-xpnH"], capture_output=True, text=True, check=True).stdout
    peers = set()
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 8 and f[4].endswith("docker.sock"):
            peers.add(f[7])
    return peers


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


class Load:
    """`threads` clients, each on one keep-alive connection, for as long as it runs; every outcome kept."""

    def __init__(self, p, host: str, threads: int = 8) -> None:
        self.p, self.host = p, host
        self.results: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(threads)
        self.futures = [self.pool.submit(self._client) for _ in range(threads)]

    def _client(self) -> None:
        deadline = time.monotonic() + 60  # bounded whatever the test does
        with httpx.Client(timeout=10, trust_env=False) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    r = client.get(f"{self.p.http_url}/", headers={"Host": self.host})
                    outcome = str(r.status_code)
                except httpx.HTTPError as e:
                    outcome = f"ERR {type(e).__name__}: {e}"
                with self.lock:
                    self.results.append((time.monotonic(), outcome))

    def finish(self) -> list[tuple[float, str]]:
        self.stop.set()
        for f in self.futures:
            f.result()
        self.pool.shutdown()
        return self.results

    def failures(self) -> list[str]:
        return [o for _, o in self.results if o != "200"]


@pytest.fixture
def split(proxy, backend_container, host):
    """A two-worker proxy and one running site on it."""
    backend_container("pl-up", labels={"wakeproxy.host": host("pl-up")})
    p = proxy({"workers": 2})
    wait_for(lambda: backend_of(proxied(p, host("pl-up"), timeout=5)) == "pl-up", 10, 0.1, "routed")
    return p


def test_two_workers_share_the_requests_as_nobody_without_the_docker_socket(split, host):
    p = split
    workers, [controller] = p.children("worker"), p.children("controller")
    assert len(workers) == 2
    for _ in range(60):  # new connections: the kernel spreads them over the two listeners
        assert proxied(p, host("pl-up"), timeout=5).status_code == 200
    rows = wait_for(lambda: (w := status(p)["workers"]) and sum(r["requests"] for r in w) >= 61 and w, 5, 0.1,
                    "activity reports")
    print("requests per worker:", {r["pid"]: r["requests"] for r in rows})
    assert sorted(r["pid"] for r in rows) == workers
    assert all(r["requests"] > 0 for r in rows), rows
    peers = docker_socket_peers()
    assert socket_inodes(controller) & peers, "the controller should hold the Docker connection (control)"
    for pid in workers:
        assert uids(pid) == [NOBODY] * 4, uids(pid)
        assert not socket_inodes(pid) & peers, f"worker {pid} has a connection to the Docker socket"
    assert uids(controller)[0] == os.getuid()
    out = subprocess.run([str(WAKEPROXY), "status", "--config", str(p.config_path)], capture_output=True, text=True,
                         timeout=20)
    assert "WORKER" in out.stdout and str(workers[0]) in out.stdout, out.stdout


def test_a_killed_worker_costs_only_its_connections_and_is_back_within_2_s(split, host):
    p = split
    load = Load(p, host("pl-up"), threads=8)
    try:
        time.sleep(1.5)
        victim = p.children("worker")[0]
        held = next(r["connections"] for r in status(p)["workers"] if r["pid"] == victim)
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        serving = p.log().count("serving")
        back = wait_for(lambda: p.log().count("serving") > serving and time.monotonic(), 5, 0.02, "a new worker")
        time.sleep(1.5)
    finally:
        results = load.finish()
    failures = load.failures()
    after = [o for t, o in results if t > t_kill + 0.5]
    print(f"killed worker {victim} holding {held} connection(s); {len(results)} requests, failures {failures}; "
          f"the new worker served {back - t_kill:.2f} s after the kill")
    assert len(failures) <= held, failures
    assert back - t_kill < 2.0
    assert after and all(o == "200" for o in after[-20:]), after[-20:]
    assert victim not in p.children("worker") and len(p.children("worker")) == 2


def test_controller_killed_running_sites_serve_and_wakes_get_503_until_it_is_back(proxy, backend_container, host,
                                                                                   docker_client):
    backend_container("pl-run", labels={"wakeproxy.host": host("pl-run")})
    sleeper = backend_container("pl-sleep", labels={"wakeproxy.host": host("pl-sleep")}, start=False)
    p = proxy({"workers": 2, "debug_clients": []})
    wait_for(lambda: backend_of(proxied(p, host("pl-run"), timeout=5)) == "pl-run", 10, 0.1, "routed")
    [controller] = p.children("controller")
    os.kill(controller, signal.SIGKILL)
    t_kill = time.monotonic()
    codes = []
    for _ in range(10):  # while the supervisor brings a new controller up
        codes.append(proxied(p, host("pl-run"), timeout=5).status_code)
    assert codes == [200] * 10, codes
    r = proxied(p, host("pl-sleep"), headers={"Accept": "application/json"}, timeout=10)
    if r.status_code == 503:  # answered before the new controller was up: clear, and no internals
        assert "controller" not in r.text.lower() and "retry-after" in r.headers, r.text
    else:  # the supervisor was quicker than this request: the wake simply worked
        assert r.status_code == 200, r.text
    wait_for(lambda: (c := p.children("controller")) and c[0] != controller, 5, 0.05, "a new controller")
    wait_for(lambda: len(status(p)["workers"]) == 2, 10, 0.1, "both workers reconnected")
    print(f"controller back and both workers connected {time.monotonic() - t_kill:.2f} s after the kill")
    r = proxied(p, host("pl-sleep"), headers={"Accept": "application/json"}, timeout=20)
    assert r.status_code == 200 and backend_of(r) == "pl-sleep", r.text
    sleeper.reload()
    assert sleeper.status == "running"


def test_wakes_answer_503_while_no_controller_runs(proxy, backend_container, host):
    """With the controller stopped (SIGSTOP: it cannot answer, and is not restarted), a wake is a 503."""
    backend_container("pl-run2", labels={"wakeproxy.host": host("pl-run2")})
    backend_container("pl-sleep2", labels={"wakeproxy.host": host("pl-sleep2")}, start=False)
    p = proxy({"workers": 2, "debug_clients": []})
    wait_for(lambda: backend_of(proxied(p, host("pl-run2"), timeout=5)) == "pl-run2", 10, 0.1, "routed")
    [controller] = p.children("controller")
    os.kill(controller, signal.SIGKILL)
    # The supervisor restarts it at once; freeze the new one as soon as it appears, so the workers
    # see a controller that is gone (their connection was reset) and not yet back.
    new = wait_for(lambda: (c := p.children("controller")) and c[0] != controller and c[0], 5, 0.005, "restart")
    os.kill(new, signal.SIGSTOP)
    try:
        time.sleep(0.5)
        assert proxied(p, host("pl-run2"), timeout=5).status_code == 200
        t0 = time.monotonic()
        r = proxied(p, host("pl-sleep2"), headers={"Accept": "application/json"}, timeout=15)
        took = time.monotonic() - t0
        assert r.status_code == 503, (r.status_code, r.text)
        assert "retry-after" in r.headers and took < 5, (took, r.headers)
        assert "controller" not in r.text.lower(), r.text
        print(f"wake with no controller: {r.status_code} in {took:.2f} s: {r.text.strip()[:200]}")
    finally:
        os.kill(new, signal.SIGCONT)
    wait_for(lambda: len(status(p)["workers"]) == 2, 10, 0.1, "both workers reconnected")
    r = proxied(p, host("pl-sleep2"), headers={"Accept": "application/json"}, timeout=20)
    assert r.status_code == 200, r.text


def test_reload_under_load_fails_no_request(split, host):
    p = split
    before = p.children("worker")
    load = Load(p, host("pl-up"), threads=8)
    try:
        time.sleep(1.0)
        out = subprocess.run([str(WAKEPROXY), "reload", "--config", str(p.config_path)], capture_output=True,
                             text=True, timeout=20)
        assert out.returncode == 0, out
        wait_for(lambda: "reload done" in p.log(), 30, 0.1, "the reload")
        assert "reloaded" in p.log()  # the controller re-read the config
        time.sleep(1.5)
    finally:
        results = load.finish()
    after = p.children("worker")
    print(f"reload: {len(results)} requests, failures {load.failures()}; workers {before} → {after}")
    assert load.failures() == []
    assert len(results) > 100
    assert len(after) == 2 and not set(after) & set(before)


def test_200_concurrent_requests_over_all_workers_start_the_group_once(proxy, backend_container, host,
                                                                          docker_client):
    c = backend_container("pl-crowd", labels={"wakeproxy.host": host("pl-crowd")}, start=False)
    p = proxy({"workers": 2, "wake": {"strategy": "hold"}})
    wait_for(lambda: status(p)["synced"] and len(status(p)["workers"]) == 2, 10, 0.1, "two workers")
    since = time.time()

    def one(_: int) -> int:
        return proxied(p, host("pl-crowd"), timeout=30).status_code

    with ThreadPoolExecutor(200) as pool:
        codes = list(pool.map(one, range(200)))
    until = time.time() + 1
    assert codes == [200] * 200, sorted(set(codes))
    events = docker_client.events(since=since, until=until, decode=True,
                                  filters={"container": c.id, "event": "start"})
    assert len(list(events)) == 1
    rows = wait_for(lambda: (w := status(p)["workers"]) and sum(r["requests"] for r in w) >= 200 and w, 5, 0.1,
                    "reports")
    print("requests per worker during the wake:", {r["pid"]: r["requests"] for r in rows})
    assert all(r["requests"] > 0 for r in rows), rows
