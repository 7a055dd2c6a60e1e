"""Docker away, said plainly: at start-up and in the middle of a run (issue 11, part 3).

The engine is reached through a unix-socket relay that this test starts, kills and starts again, so
the real engine keeps running for everyone else. Only unix sockets and 127.0.0.1 are used.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from harness import REPO, ProxyProcess, deep_merge, free_port, proxied, proxy_command, unix_relay, wait_for

WAKEPROXY = REPO / ".venv" / "bin" / "wakeproxy"
DOCKER_SOCK = "/var/run/docker.sock"


def start_proxy(tmp_path: Path, docker_url: str, networks: list[str], wait_line: str) -> ProxyProcess:
    workdir = tmp_path / f"proxy-{time.monotonic_ns()}"
    workdir.mkdir()
    http_port, https_port = free_port(), free_port()
    config = deep_merge({
        "listen": {"http": f"127.0.0.1:{http_port}", "https": f"127.0.0.1:{https_port}"},
        "docker": {"url": docker_url, "networks": networks},
        "state_dir": str(workdir / "state"),
        "status": {"listen": f"127.0.0.1:{free_port()}"},
        "wake": {"per_client": 0},
    }, {})
    cfg = workdir / "wakeproxy.yaml"
    cfg.write_text(yaml.safe_dump(config))
    p = ProxyProcess(proxy_command("module", cfg), config, cfg, workdir / "proxy.log", http_port, https_port)
    p._log_file = open(p.log_path, "ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p.proc = subprocess.Popen(p.cmd, stdout=p._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              cwd=REPO, env=env, start_new_session=True)
    wait_for(lambda: wait_line in p.log() or p.proc.poll() is not None, 20, 0.05, wait_line)
    assert p.proc.poll() is None, p.log()
    return p


def cli_status(p: ProxyProcess, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(WAKEPROXY), "status", "--config", str(p.config_path), *extra],
                          capture_output=True, text=True, timeout=20, cwd=REPO)


@pytest.fixture
def relay(tmp_path):
    """The engine as this test sees it: a unix socket relayed to Docker's, cut and restored at will."""
    path = Path(f"/tmp/wptest-relay-{os.getpid()}-{time.monotonic_ns()}.sock")
    r = unix_relay(path, DOCKER_SOCK)
    r.path = path  # type: ignore[attr-defined]
    yield r
    r.close()
    path.unlink(missing_ok=True)


def test_docker_unreachable_at_start_is_said_plainly_then_recovers(tmp_path, relay, backend_container, host,
                                                                   test_network):
    url = f"unix://{relay.path}"
    backend_container("away", labels={"wakeproxy.host": host("away")})
    p = start_proxy(tmp_path, url, [test_network], "cannot reach the Docker engine")
    try:
        line = next(ln for ln in p.log().splitlines() if "cannot reach the Docker engine" in ln)
        assert url in line and "retrying every" in line, line
        assert "lost the engine" not in p.log()
        # The status command says so and exits non-zero.
        out = cli_status(p)
        assert out.returncode == 3, out
        assert "cannot reach" in out.stdout and url in out.stdout, out.stdout
        out = cli_status(p, "--json")
        assert out.returncode == 3 and '"state": "retrying"' in out.stdout
        # A request is held (at most 10 s) and then told that Docker cannot be reached.
        t0 = time.monotonic()
        r = proxied(p, host("away"), timeout=20)
        assert r.status_code == 503 and "Docker engine" in r.text, r.text
        assert 9 <= time.monotonic() - t0 < 15
        # The engine comes (back): the proxy finds it by itself and serves.
        t0 = time.monotonic()
        relay.open()
        wait_for(lambda: proxied(p, host("away"), timeout=5).status_code == 200, 15, 0.1, "routed after Docker")
        print(f"recovered {time.monotonic() - t0:.2f} s after the engine came")
        assert "synced" in p.log() and "attempts" in p.log()
        assert cli_status(p).returncode == 0
    finally:
        p.stop()
    # Retries are logged with a backoff, not once per attempt.
    retry_lines = [ln for ln in p.log().splitlines() if "docker:" in ln and "reach" in ln]
    assert len(retry_lines) <= 3, retry_lines


def test_docker_lost_mid_run_serves_the_last_routes_and_comes_back(tmp_path, relay, backend_container, host,
                                                                   test_network):
    relay.open()
    backend_container("midrun", labels={"wakeproxy.host": host("midrun")})
    p = start_proxy(tmp_path, f"unix://{relay.path}", [test_network], "wakeproxy ready")
    try:
        wait_for(lambda: proxied(p, host("midrun")).status_code == 200, 10, 0.1, "routed")
        assert cli_status(p).returncode == 0
        relay.close()
        wait_for(lambda: "lost the engine" in p.log(), 10, 0.1, "the loss to be logged")
        assert proxied(p, host("midrun")).status_code == 200  # the last known routes keep serving
        out = cli_status(p)
        assert out.returncode == 3 and "cannot reach" in out.stdout, out
        # A container started meanwhile is routed once the engine is back.
        backend_container("midrun-late", labels={"wakeproxy.host": host("midrun-late")})
        t0 = time.monotonic()
        relay.open()
        wait_for(lambda: proxied(p, host("midrun-late"), timeout=5).status_code == 200, 15, 0.1, "late routed")
        print(f"resynced {time.monotonic() - t0:.2f} s after the engine came back")
        assert cli_status(p).returncode == 0
    finally:
        p.stop()


def test_status_of_a_proxy_that_is_not_running_fails(tmp_path):
    cfg = tmp_path / "wakeproxy.yaml"
    cfg.write_text(yaml.safe_dump({"status": {"listen": f"127.0.0.1:{free_port()}"}, "state_dir": str(tmp_path)}))
    out = subprocess.run([str(WAKEPROXY), "status", "--config", str(cfg)], capture_output=True, text=True,
                         timeout=20, cwd=REPO)
    assert out.returncode == 1 and "Is the proxy running" in out.stderr
