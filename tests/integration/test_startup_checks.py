"""What start-up would trip over is found first; our own broken files are repaired; the debugging
copy is harmless (issue 11, parts 4, 6 and 8). Every case runs the real `wakeproxy` command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from harness import REPO, free_port, proxied, wait_for

WAKEPROXY = REPO / ".venv" / "bin" / "wakeproxy"


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(WAKEPROXY), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def write(tmp_path: Path, config: dict) -> Path:
    base = {"listen": {"http": f"127.0.0.1:{free_port()}", "https": f"127.0.0.1:{free_port()}"},
            "state_dir": str(tmp_path / "state"), "status": {"listen": f"127.0.0.1:{free_port()}"}}
    for k, v in config.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    path = tmp_path / "wp.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize("config, key, fragment", [
    ({"listen": {"http": "127.0.0.1:8000", "https": "0.0.0.0:8000"}}, "listen.https", "use one port"),
    ({"listen": {"http": "127.0.0.1:8001"}, "status": {"listen": "127.0.0.1:8001"}}, "status.listen",
     "is also listen.http"),
    ({"docker": {"url": "tcp//localhost"}}, "docker.url", "not a Docker engine URL"),
    ({"tls": {"default_cert": "/nonexistent/c.pem", "default_key": "/nonexistent/k.pem"}}, "tls.default_cert",
     "cannot read"),
    ({"tls": {"certs_dir": "/nonexistent/certs"}}, "tls.certs_dir", "is not a folder"),
    ({"acme": {"ca_bundle": "/etc/hostname"}}, "acme.ca_bundle", "no PEM certificate"),
])
def test_check_catches_what_start_up_would_hit(tmp_path, config, key, fragment):
    path = write(tmp_path, config)
    for command in (("check",), ()):  # `check`, and the proxy itself before it opens a port
        out = run(*command, "--config", str(path))
        assert out.returncode == 2, (command, out)
        assert key in out.stderr and fragment in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_state_dir_below_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    path = write(tmp_path, {"state_dir": str(tmp_path / "file" / "state")})
    out = run("check", "--config", str(path))
    assert out.returncode == 2 and "state_dir" in out.stderr and "is a file" in out.stderr, out


def test_a_state_dir_the_workers_cannot_reach_is_a_config_error(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    path = write(tmp_path, {"state_dir": str(closed / "state"), "workers": 1, "user": "nobody"})
    out = run("--config", str(path))
    assert out.returncode == 2, out
    assert f"{closed} is closed to other users" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_broken_operator_certificate_is_a_config_error(tmp_path):
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    path = write(tmp_path, {"tls": {"default_cert": str(tmp_path / "c.pem"), "default_key": str(tmp_path / "k.pem")}})
    out = run("--config", str(path))
    assert out.returncode == 2 and "tls.default_cert" in out.stderr and "c.pem" in out.stderr, out
    assert "Traceback" not in out.stderr


def test_a_taken_port_names_the_port_and_its_holder(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        path = write(tmp_path, {"listen": {"http": f"127.0.0.1:{port}"}})
        out = run("--config", str(path))
        assert out.returncode == 2, out
        assert f"listen.http: cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr
        assert f"pid {os.getpid()}" in out.stderr, out.stderr  # this test process holds it
        # `check` only notes it (the running proxy itself holds its ports).
        out = run("check", "--config", str(path))
        assert out.returncode == 0 and "note:" in out.stdout, out
    finally:
        holder.close()


def test_help_lists_every_subcommand_and_version_prints_both_versions():
    out = run("--help")
    assert out.returncode == 0
    for command in ("run", "check", "status", "web"):
        assert f"  {command} " in out.stdout, out.stdout
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("wakeproxy ") and "mitmproxy 1" in out.stdout, out


def _start(path: Path, *extra: str, ready: str = "wakeproxy ready") -> tuple[subprocess.Popen, Path]:
    log = path.with_suffix(".log")
    proc = subprocess.Popen([str(WAKEPROXY), *extra, "--config", str(path)] if not extra or extra[0] != "web"
                            else [str(WAKEPROXY), *extra[:1], "--config", str(path), *extra[1:]],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        wait_for(lambda: ready in log.read_text(errors="replace") or proc.poll() is not None, 30, 0.05, ready)
    except AssertionError:
        _stop(proc)
        raise
    assert proc.poll() is None, log.read_text()
    return proc, log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_broken_own_files_are_moved_aside_and_made_again(tmp_path, test_network):
    state = tmp_path / "state"
    (state / "mitmproxy").mkdir(parents=True)
    (state / "default-cert.pem").write_bytes(b"")  # e.g. after a full disk
    (state / "mitmproxy" / "mitmproxy-ca.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\ntruncated")
    (state / "idle-state.json").write_bytes(b"{not json")
    (state / "containers.json").write_bytes(b"\x00\x01")
    (state / "owners.json").write_bytes(b"[]")
    path = write(tmp_path, {"docker": {"networks": [test_network]}})
    proc, log = _start(path)
    try:
        text = log.read_text()
        assert "Traceback" not in text, text
        assert "default-cert.pem is unusable" in text and "moved aside" in text, text
        assert "mitmproxy is unusable" in text, text
        assert list(state.glob("default-cert.pem.broken-*")) and list(state.glob("mitmproxy.broken-*"))
        assert (state / "default-cert.pem").stat().st_size > 0
        # mitmproxy's store: ours in one process, each serving worker's own under workers/ otherwise
        assert (state / "mitmproxy" / "mitmproxy-ca.pem").exists() or list(
            state.glob("workers/*/mitmproxy/mitmproxy-ca.pem"))
        # The state files are logged and ignored (the proxy serves).
        assert "idle-state.json is corrupt" in text and "containers.json is corrupt" in text, text
    finally:
        _stop(proc)


def test_status_into_a_closed_pipe_is_quiet(tmp_path, test_network):
    path = write(tmp_path, {"docker": {"networks": [test_network]}})
    proc, _ = _start(path)
    try:
        out = subprocess.run(f"{WAKEPROXY} status --config {path} --json | head -c 1", shell=True,
                             capture_output=True, text=True, timeout=30)
        assert out.stdout == "{" and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out
    finally:
        _stop(proc)


def test_the_debugging_copy_starts_stops_and_orders_nothing(tmp_path, backend_container, host, test_network,
                                                            docker_client):
    awake = backend_container("dbg-awake", labels={"wakeproxy.host": host("dbg-awake"),
                                                   "wakeproxy.idle-timeout": "1s"})
    asleep = backend_container("dbg-asleep", labels={"wakeproxy.host": host("dbg-asleep")}, start=False)
    path = write(tmp_path, {"docker": {"networks": [test_network]}, "idle": {"timeout": "1s"},
                            "acme": {"enabled": True, "directory": "https://127.0.0.1:1/directory"},
                            "wake": {"per_client": 0}})
    cfg = yaml.safe_load(path.read_text())
    proc, log = _start(path, "web", "--set", f"web_port={free_port()}", "--set", "web_open_browser=false",
                       ready="wakeproxy ready")
    try:
        text = log.read_text()
        assert "debugging copy" in text, text
        time.sleep(3)  # three idle timeouts
        awake.reload()
        assert awake.status == "running", "the debugging copy put a container to sleep"
        port = int(cfg["listen"]["http"].rsplit(":", 1)[1])

        class P:  # what `proxied` needs
            http_url = f"http://127.0.0.1:{port}"
        r = proxied(P, host("dbg-asleep"))  # type: ignore[arg-type]
        assert r.status_code == 503 and "debugging copy" in r.text, r.text
        asleep.reload()
        assert asleep.status == "created"
        assert "ordering a certificate" not in log.read_text()
    finally:
        _stop(proc)
