"""Helpers shared by the integration tests and their fixtures (no fixtures here)."""

from __future__ import annotations

import contextlib
import copy
import glob
import importlib.util
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BACKEND_PY = HERE / "backend.py"
READY_LINE = "wakeproxy ready"


# --------------------------------------------------------------------------
# small helpers


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
             message: str = "") -> Any:
    """Poll `predicate` until it returns a truthy value; return that value.

    Exceptions raised by the predicate count as "not yet"; on timeout the last
    value or exception is part of the AssertionError.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001 - polled condition
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate!r}; last: {last!r}")
        time.sleep(interval)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port free on every address now, outside the kernel's ephemeral range.

    Ports from the ephemeral range (what `bind(0)` gives) can be taken meanwhile as
    the source port of any outgoing connection, before dockerd's userland proxy or
    the proxy binds them (seen in CI: "bind: address already in use"). Ports below
    that range are only ever taken by an explicit bind. Never the same port twice in
    one run.
    """
    low, _ = _ephemeral_range()
    first, last = 20000, min(low, 65536) - 1
    if last - first < 1000:
        first, last = 1024, 65535
    with _ports_lock:
        for _ in range(2000):
            port = first + secrets.randbelow(last - first + 1)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    raise RuntimeError("no free TCP port found")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_ROUTE_DEV = re.compile(r"\bdev (docker0|br-[0-9a-f]+)\b")


def assert_bridge_route(ip: str) -> None:
    """Refuse to contact `ip` unless the host routes it via a Docker bridge."""
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback:
        return
    out = subprocess.run(["ip", "route", "get", ip], capture_output=True, text=True, check=True).stdout
    assert _ROUTE_DEV.search(out), f"refusing to contact {ip}: route is not via a docker bridge: {out!r}"


# The host's own addresses ("local … dev lo") and the tests' bridges; docker_gwbridge is Swarm's local bridge.
_LOCAL_ROUTE = re.compile(r"^(local\s|\S+\s.*\bdev (lo|docker0|docker_gwbridge|br-[0-9a-f]+)\b)")


class OffMachineConnection(ConnectionRefusedError):
    """The route guard refused a connection that would leave this machine."""


def route_is_local(ip: str) -> tuple[bool, str]:
    """Is `ip` loopback, one of this host's own addresses, or behind a local Docker bridge? (and the route)"""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False, f"{ip!r} is not an IP address"
    if addr.is_loopback or (isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None
                            and addr.ipv4_mapped.is_loopback):
        return True, "loopback"
    now = time.monotonic()
    if _local_until.get(str(addr), 0.0) > now:
        return True, "local (checked just now)"
    out = subprocess.run(["ip", "route", "get", str(addr)], capture_output=True, text=True).stdout.strip()
    ok = bool(_LOCAL_ROUTE.search(out))
    if ok:
        _local_until[str(addr)] = now + 2.0  # a load loop to a bridge IP does not run `ip` per connect
    return ok, out


_local_until: dict[str, float] = {}


_guard_installed = False


def install_route_guard() -> None:
    """Make every TCP/UDP connect of this (test) process check its route first: an address whose
    `ip route get` is not loopback, the host's own, or a local Docker bridge is refused with
    OffMachineConnection. Overlay (Swarm) task IPs have no local route — a packet to one would leave
    the machine through the default gateway — so only processes inside an overlay's network namespace
    (the proxy's container) may contact them. Unix sockets (the Docker socket) are not touched."""
    global _guard_installed
    if _guard_installed:
        return
    _guard_installed = True
    plain_connect = socket.socket.connect
    plain_connect_ex = socket.socket.connect_ex

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and address:
            ok, route = route_is_local(str(address[0]))
            if not ok:
                raise OffMachineConnection(f"test route guard: refusing to connect to {address[0]} from the "
                                           f"host's network namespace (route: {route!r}): it would leave "
                                           "this machine")

    def connect(self: socket.socket, address: Any) -> None:
        check(self, address)
        plain_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self, address)
        return plain_connect_ex(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]


def container_ip(container, network: str) -> str:
    """The container's IP on `network`, after checking it is routed via a Docker bridge."""
    container.reload()
    nets = container.attrs["NetworkSettings"]["Networks"]
    assert network in nets, f"{container.name} is not on {network}: {list(nets)}"
    ip = nets[network]["IPAddress"]
    assert ip, f"{container.name} has no IP on {network} (not running?)"
    assert_bridge_route(ip)
    return ip


def _load_backend_module():
    spec = importlib.util.spec_from_file_location("wptest_backend", BACKEND_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


backend_module = _load_backend_module()
pattern_sha256 = backend_module.pattern_sha256


# --------------------------------------------------------------------------
# the host Python, bind-mounted read-only into FROM-scratch containers


def _ldd_paths(files: list[str]) -> set[str]:
    """Absolute library paths (as the loader names them) that `files` need."""
    out = subprocess.run(["ldd", *files], capture_output=True, text=True).stdout
    paths = set()
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(", line)
        if m:
            paths.add(m.group(1))
            continue
        m = re.match(r"(/\S+) \(", line)  # the loader itself
        if m:
            paths.add(m.group(1))
    return paths


def _link_chain_dirs(path: str) -> set[str]:
    """Directories of `path` and of every symlink hop it takes (literal paths)."""
    dirs = set()
    cur = path
    for _ in range(40):
        dirs.add(os.path.dirname(cur))
        if not os.path.islink(cur):
            break
        cur = os.path.normpath(os.path.join(os.path.dirname(cur), os.readlink(cur)))
    return dirs


def python_runtime() -> tuple[str, list[str]]:
    """(interpreter path, directories to bind-mount read-only at the same path).

    Derived from the running interpreter: its base prefix, libdir, stdlib and
    lib-dynload, plus the directories of every shared library that `ldd`
    names for the interpreter and its extension modules (following symlink
    hops such as /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...).
    Directories under an already-mounted one are dropped.
    """
    exe = os.path.realpath(sys.executable)
    candidates = {os.path.realpath(sys.base_prefix)}
    for var in ("LIBDIR", "DESTSHARED"):
        v = sysconfig.get_config_var(var)
        if v and os.path.isdir(v):
            candidates.add(os.path.realpath(v))
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})
    for key in ("stdlib", "platstdlib"):
        if os.path.isdir(paths[key]):
            candidates.add(os.path.realpath(paths[key]))
    candidates.add(os.path.dirname(exe))
    dynload = sysconfig.get_config_var("DESTSHARED") or ""
    binaries = [exe] + sorted(glob.glob(os.path.join(dynload, "*.so")))
    for lib in _ldd_paths(binaries):
        candidates |= _link_chain_dirs(lib)
    # Keep the minimal set: a dir mounted at its own path covers its subtree.
    result: list[str] = []
    for d in sorted(candidates, key=len):
        if d in ("/", "") or not os.path.isdir(d):
            continue
        if any(d == r or d.startswith(r.rstrip("/") + "/") for r in result):
            continue
        result.append(d)
    return exe, sorted(result)



# --------------------------------------------------------------------------
# Docker objects


def sweep_prefix(client, run_id: str) -> None:
    for c in client.containers.list(all=True, filters={"name": run_id}):
        if c.name.startswith(run_id):
            try:
                c.remove(force=True, v=True)
            except docker.errors.APIError:
                pass
    for n in client.networks.list():
        if n.name.startswith(run_id):
            try:
                n.remove()
            except docker.errors.APIError:
                pass
    for img in client.images.list():
        for tag in img.tags:
            if tag.startswith(run_id):
                try:
                    client.images.remove(tag, force=True)
                except docker.errors.APIError:
                    pass


def _busybox_binary() -> str:
    for cand in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        if cand and os.path.exists(cand):
            return cand
    pytest.fail("busybox not found: install busybox-static (scripts/test does)", pytrace=False)


def build_busybox_image(client, tag: str) -> str:
    """Build a FROM-scratch image holding Debian's static busybox."""
    with tempfile.TemporaryDirectory(prefix="wptest-bb-") as ctx:
        shutil.copy2(_busybox_binary(), os.path.join(ctx, "busybox"))
        Path(ctx, "Dockerfile").write_text(
            "FROM scratch\n"
            "COPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        )
        client.images.build(path=ctx, tag=tag, rm=True, forcerm=True)
    return tag


@contextlib.contextmanager
def exposed_image(client, base: str, tag: str, port: int) -> Iterator[str]:
    """`base` + `EXPOSE port` (one exposed port, no label) as `tag`; removed on exit, after the
    containers made from it (removing an image still in use only untags it: a dangling image)."""
    with tempfile.TemporaryDirectory(prefix="wptest-exp-") as ctx:
        Path(ctx, "Dockerfile").write_text(f"FROM {base}\nEXPOSE {port}\n")
        client.images.build(path=ctx, tag=tag, rm=True, forcerm=True)
    try:
        yield tag
    finally:
        try:
            for c in client.containers.list(all=True, filters={"ancestor": tag}):
                c.remove(force=True)
            client.images.remove(tag, force=True)
        except Exception:  # noqa: BLE001
            pass


def build_pyback_image(client, tag: str, busybox_tag: str) -> str:
    """busybox image + tests/integration/backend.py at /app/backend.py."""
    with tempfile.TemporaryDirectory(prefix="wptest-py-") as ctx:
        shutil.copy2(BACKEND_PY, os.path.join(ctx, "backend.py"))
        Path(ctx, "Dockerfile").write_text(
            f"FROM {busybox_tag}\n"
            "COPY backend.py /app/backend.py\n"
        )
        client.images.build(path=ctx, tag=tag, rm=True, forcerm=True)
    return tag


@dataclass
class PyBack:
    image: str
    python: str
    mounts: list[str]

    def volumes(self) -> dict:
        return {d: {"bind": d, "mode": "ro"} for d in self.mounts}

    def command(self) -> list[str]:
        return [self.python, "-u", "/app/backend.py"]


def remove_network(net, timeout: float = 10.0) -> None:
    """Disconnect whatever is on `net`, then remove it; again while "active endpoints" remain (a proxy in a
    container leaves its sandboxes' networks by itself, and its disconnect may be half done)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            net.reload()
            for c in net.containers:
                try:
                    net.disconnect(c, force=True)
                except docker.errors.APIError:
                    pass
            net.remove()
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as e:
            if "active endpoints" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --------------------------------------------------------------------------
# containers


class ContainerFactory:
    """Creates `<prefix>-<suffix>` containers and force-removes them on cleanup()."""

    def __init__(self, client, run_id: str, pyback: PyBack, busybox: str, default_network: str):
        self.client = client
        self.run_id = run_id
        self.pyback = pyback
        self.busybox = busybox
        self.default_network = default_network
        self.created: list = []

    def __call__(self, name_suffix: str, labels: dict | None = None, env: dict | None = None,
                 network: str | None | bool = True, image: str | None = None, start: bool = True,
                 command: list[str] | str | None = None, wait_ready: bool = True,
                 ready_timeout: float = 15.0, keep_awake: bool = True, **kwargs):
        """Create (and by default start) a container.

        image=None means the Python backend (backend.py); `network=True` means
        the session's test network, a string names another network, None/False
        leaves Docker's default. With the Python backend and start=True the call
        returns once the backend logs that it listens (unless wait_ready=False).
        keep_awake adds `wakeproxy.idle-timeout=0` unless the labels set one.
        """
        name = f"{self.run_id}-{name_suffix}"
        env = dict(env or {})
        labels = dict(labels or {})
        if keep_awake:
            # No wakeproxy instance on this daemon (ours, or anyone's with a short
            # idle timeout) may put a test container to sleep behind the test's back.
            labels.setdefault("wakeproxy.idle-timeout", "0")
        is_pyback = image is None or image == self.pyback.image
        create_kw: dict[str, Any] = dict(kwargs)
        if is_pyback:
            image = self.pyback.image
            env.setdefault("BACKEND_NAME", name_suffix)
            create_kw["volumes"] = {**self.pyback.volumes(), **create_kw.get("volumes", {})}
            if command is None:
                command = self.pyback.command()
        if network is True:
            network = self.default_network
        if network:
            create_kw["network"] = network
        container = self.client.containers.create(
            image, command=command, name=name, labels=labels, environment=env,
            detach=True, **create_kw)
        self.created.append(container)
        if start:
            container.start()
            if is_pyback and wait_ready:
                self.wait_listening(container, ready_timeout)
        return container

    @staticmethod
    def wait_listening(container, timeout: float = 15.0) -> None:
        def ready():
            container.reload()
            if container.status == "exited":
                raise AssertionError(f"{container.name} exited: {container.logs().decode(errors='replace')}")
            return b"listening on" in container.logs()
        wait_for(ready, timeout, 0.05, f"{container.name} to listen")

    def cleanup(self) -> None:
        def remove(c):
            try:
                c.remove(force=True, v=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                print(f"warning: could not remove {c.name}: {e}", file=sys.stderr)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(remove, reversed(self.created)))
        self.created.clear()


# --------------------------------------------------------------------------
# the proxy process


@dataclass
class ProxyProcess:
    cmd: list[str]
    config: dict
    config_path: Path
    log_path: Path
    http_port: int
    https_port: int
    proc: subprocess.Popen | None = None
    _log_file: Any = field(default=None, repr=False)
    killed: bool = False  # needed SIGKILL at stop()
    stop_seconds: float | None = None  # how long a graceful stop took

    @property
    def status_port(self) -> int | None:
        listen = (self.config.get("status") or {}).get("listen")
        return int(str(listen).rsplit(":", 1)[1]) if listen else None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self, role: str) -> list[int]:
        """Pids of this proxy's processes of `role` ("worker", "controller") under the `wakeproxy`
        command's supervisor; [] for a one-process proxy."""
        return children_of(self.proc.pid, f"_{role}") if self.proc is not None else []

    def serving_pids(self) -> list[int]:
        """The processes that read client traffic: the workers, or the proxy itself."""
        return self.children("worker") or [self.pid]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, ready_timeout: float = 20.0) -> ProxyProcess:
        self._log_file = open(self.log_path, "ab")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while READY_LINE not in self.log():
            if self.proc.poll() is not None:
                self._close_log()
                pytest.fail(f"proxy exited with {self.proc.returncode} before '{READY_LINE}':\n"
                            f"cmd: {self.cmd}\n--- log ---\n{self.log()}", pytrace=False)
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"proxy not ready within {ready_timeout}s (no '{READY_LINE}'):\n"
                            f"cmd: {self.cmd}\n--- log ---\n{self.log()}", pytrace=False)
            time.sleep(0.05)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            t0 = time.monotonic()
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
                self.stop_seconds = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                self.killed = True
                print(f"warning: proxy pid {self.proc.pid} ignored SIGTERM for {timeout}s; SIGKILL",
                      file=sys.stderr)
                try:
                    os.kill(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def children_of(pid: int, marker: str) -> list[int]:
    """Direct children of `pid` whose command line holds `marker`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and marker.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


def traversable(path: Path) -> None:
    """Let the workers' unprivileged user pass through `path` and its parents up to /tmp (pytest makes
    them 0700); nothing becomes readable, only traversable."""
    for p in [path, *path.parents]:
        if str(p) in ("/", "/tmp"):
            break
        mode = p.stat().st_mode
        if not mode & 0o001:
            os.chmod(p, mode | 0o001)


def venv_bin(name: str) -> Path | None:
    p = REPO / ".venv" / "bin" / name
    return p if p.exists() else None


def proxy_command(launcher: str, cfg_path: Path) -> list[str]:
    if launcher == "module":
        py = venv_bin("python") or Path(sys.executable)
        return [str(py), "-m", "wakeproxy", "--config", str(cfg_path)]
    if launcher in ("mitmdump", "mitmweb"):
        tool = venv_bin(launcher) or Path(sys.executable).with_name(launcher)
        extra = ["--no-web-open-browser", "--web-host", "127.0.0.1", "--web-port", str(free_port())] \
            if launcher == "mitmweb" else []
        return [str(tool), *extra, "-s", str(REPO / "addons" / "wakeproxy.py"),
                "--set", f"wakeproxy_config={cfg_path}"]
    raise ValueError(f"unknown launcher {launcher!r}")


class ProxyLauncher:
    """Starts proxies with the contract config under `workdir`; stop_all() ends them."""

    def __init__(self, workdir: Path, networks: list[str]):
        self.workdir = Path(workdir)
        self.networks = list(networks)
        self.started: list[ProxyProcess] = []

    def base_config(self, workdir: Path, http_port: int, https_port: int) -> dict:
        return {
            "listen": {"http": f"127.0.0.1:{http_port}", "https": f"127.0.0.1:{https_port}"},
            "docker": {"url": None, "networks": list(self.networks)},
            "state_dir": str(workdir / "state"),
            "default_host": None,
            # Not part of the routing contract, but its default is a fixed port
            # (127.0.0.1:8099) that two proxies of one test would share.
            "status": {"listen": f"127.0.0.1:{free_port()}"},
            "metrics": {"listen": None},  # likewise (127.0.0.1:9180); tests of the metrics set their own
            # Every test client is 127.0.0.1: one wake budget would be shared by the whole suite.
            # The tests of the budget set their own.
            "wake": {"per_client": 0},
        }

    def __call__(self, overrides: dict | None = None, launcher: str = "module",
                 ready_timeout: float = 20.0, extra_args: list[str] | None = None,
                 wrapper: list[str] | None = None) -> ProxyProcess:
        """`wrapper` runs the proxy under another command, e.g. ["prlimit", "--nofile=1024:1024", "--"]."""
        workdir = self.workdir / f"proxy{len(self.started)}"
        workdir.mkdir(parents=True)
        traversable(workdir)
        http_port = free_port()
        https_port = free_port()
        while https_port == http_port:
            https_port = free_port()
        config = deep_merge(self.base_config(workdir, http_port, https_port), overrides or {})
        cfg_path = workdir / "wakeproxy.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = list(wrapper or []) + proxy_command(launcher, cfg_path) + list(extra_args or [])
        if os.environ.get("WPTEST_PROXY_VERBOSE") and launcher == "module":
            cmd.append("--verbose")
        p = ProxyProcess(cmd, config, cfg_path,
                         workdir / "proxy.log", http_port, https_port)
        self.started.append(p)
        return p.start(ready_timeout)

    def stop_all(self, print_logs: bool = False) -> None:
        for p in self.started:
            p.stop()
            if print_logs:
                print(f"\n--- wakeproxy log (pid {p.pid}, {p.config_path}) ---\n{p.log()}", file=sys.stderr)


# --------------------------------------------------------------------------
# HTTP through the proxy


def proxied(proxy: ProxyProcess, host: str, path: str = "/", *, method: str = "GET",
            https: bool = False, headers: dict | None = None, http2: bool = False,
            timeout: float = 10.0, **kwargs) -> httpx.Response:
    """One request through `proxy` with `Host: host` (and SNI host on https)."""
    base = proxy.https_url if https else proxy.http_url
    hdrs = {"Host": host, **(headers or {})}
    ext = {"sni_hostname": host.split(":")[0]} if https else None
    with httpx.Client(verify=False, timeout=timeout, http2=http2, trust_env=False) as client:
        return client.request(method, base + path, headers=hdrs, extensions=ext, **kwargs)


def backend_of(resp: httpx.Response) -> str | None:
    """The backend name from a backend.py JSON answer (None for proxy pages)."""
    if resp.status_code != 200 or not resp.headers.get("content-type", "").startswith("application/json"):
        return None
    return resp.json().get("backend")


def make_self_signed(directory: Path, cn: str = "backend.test") -> tuple[Path, Path]:
    """Self-signed cert + key (PEM) for TLS backends; world-readable."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    for f in (directory, cert_path, key_path):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
    return cert_path, key_path



# --------------------------------------------------------------------------
# a private Docker daemon (for daemon-restart tests)


def _existing_ipv4_networks(main_client=None) -> list[ipaddress.IPv4Network]:
    nets = []
    out = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("default", "broadcast", "local", "unreachable", "blackhole", "prohibit"):
            first = line.split()[1] if len(line.split()) > 1 else ""
        try:
            nets.append(ipaddress.ip_network(first, strict=False))
        except ValueError:
            continue
    if main_client is not None:
        for n in main_client.api.networks():
            for cfg in (n.get("IPAM") or {}).get("Config") or []:
                try:
                    nets.append(ipaddress.ip_network(cfg.get("Subnet", ""), strict=False))
                except ValueError:
                    pass
    return [n for n in nets if n.version == 4 and n.prefixlen > 0]


def choose_free_block(main_client=None, tries: int = 200) -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that overlaps no route and no Docker network here."""
    taken = _existing_ipv4_networks(main_client)
    rng = secrets.SystemRandom()
    for _ in range(tries):
        block = ipaddress.ip_network(f"10.213.{rng.randrange(1, 255)}.0/24")
        if not any(block.overlaps(t) for t in taken):
            return block
    raise RuntimeError(f"no free /24 in 10.213.0.0/16 (taken: {taken})")


class PrivateDockerd:
    """A second dockerd with its own roots, socket and bridge, started and
    stopped by PID. Containers survive its restart (--live-restore).

    Not `--bridge=none`: dockerd then deletes the host's docker0 interface at
    start (removeDefaultBridgeInterface), breaking the main daemon's default
    network. It gets its own pre-created bridge `wpb<hex>` instead.
    """

    def __init__(self, run_id: str, main_client=None):
        self.run_id = run_id
        self.dir = Path(f"/tmp/{run_id}")
        self.sock = self.dir / "docker.sock"
        self.url = f"unix://{self.sock}"
        self.bridge = f"wpb{run_id[-8:]}"
        block = choose_free_block(main_client)
        hosts = list(block.hosts())
        self.bridge_cidr = f"{hosts[0]}/29"              # x.x.x.1/29 on the default bridge
        self.net_subnet = str(ipaddress.ip_network(f"{block.network_address + 16}/28"))
        self.net_gateway = str(ipaddress.ip_address(block.network_address + 17))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "dockerd.log"
        self._client = None
        self.starts = 0

    def setup(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "exec").mkdir(parents=True, exist_ok=True)
        (self.dir / "daemon.json").write_text("{}\n")
        subprocess.run(["ip", "link", "add", "name", self.bridge, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", self.bridge_cidr, "dev", self.bridge], check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)

    def start(self, timeout: float = 30.0) -> None:
        dockerd = shutil.which("dockerd")
        assert dockerd, "dockerd not installed (scripts/test installs docker.io)"
        cmd = [dockerd,
               "--config-file", str(self.dir / "daemon.json"),
               "--data-root", str(self.dir / "data"),
               "--exec-root", str(self.dir / "exec"),
               "--pidfile", str(self.dir / "docker.pid"),
               "-H", self.url,
               "--bridge", self.bridge,
               "--iptables=false", "--ip-forward=false", "--ip-masq=false",
               "--live-restore"]
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n=== start #{self.starts}: {' '.join(cmd)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"private dockerd exited {self.proc.returncode}:\n{self.log()}")
            self.client().ping()
            return True
        try:
            wait_for(up, timeout, 0.1, "private dockerd to answer")
        except Exception:
            print(self.log()[-5000:], file=sys.stderr)
            raise

    def stop(self, timeout: float = 30.0) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self):
        if self._client is None:
            self._client = docker.DockerClient(base_url=self.url, timeout=30)
        return self._client

    def children(self, role: str) -> list[int]:
        """Pids of this proxy's processes of `role` ("worker", "controller") under the `wakeproxy`
        command's supervisor; [] for a one-process proxy."""
        return children_of(self.proc.pid, f"_{role}") if self.proc is not None else []

    def serving_pids(self) -> list[int]:
        """The processes that read client traffic: the workers, or the proxy itself."""
        return self.children("worker") or [self.pid]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Remove everything, even after a failure half-way."""
        try:
            if not self.running() and self.starts:
                try:
                    self.start()
                except Exception as e:  # noqa: BLE001
                    print(f"warning: could not restart private dockerd for cleanup: {e}", file=sys.stderr)
            if self.running():
                client = self.client()
                for c in client.containers.list(all=True):
                    try:
                        c.remove(force=True, v=True)
                    except docker.errors.APIError as e:
                        print(f"warning: {e}", file=sys.stderr)
                for n in client.networks.list():
                    if n.name.startswith(self.run_id):
                        try:
                            n.remove()
                        except docker.errors.APIError as e:
                            print(f"warning: {e}", file=sys.stderr)
        finally:
            self.stop()
            self._kill_leftover_shims()
            self._unmount_all()
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_leftover_shims(self) -> None:
        """containerd shims of our private daemon (found by our exec-root), by PID."""
        marker = str(self.dir / "exec")
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "containerd" in cmdline and marker in cmdline:
                print(f"warning: killing leftover {pid_dir.name}: {cmdline[:120]}", file=sys.stderr)
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _unmount_all(self) -> None:
        root = str(self.dir)
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mp = line.split()[4].replace("\\040", " ")
            if mp == root or mp.startswith(root + "/"):
                mounts.append(mp)
        for mp in sorted(set(mounts), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)


# --------------------------------------------------------------------------
# a relay that a test can cut: "the CA is unreachable", "the Docker engine went away"


class Relay:
    """Forwards every connection it accepts to a target, until `close()`: then new connections are
    refused and the open ones are cut (a client's keep-alive and a streaming reply too). `open()`
    listens again on the same address. Threads only; tests use it on 127.0.0.1 and unix sockets."""

    def __init__(self, bind: Callable[[], socket.socket], connect: Callable[[], socket.socket],
                 tap: Callable[[], Callable[[bytes], None]] | None = None) -> None:
        """`tap`: called once per accepted connection; what it returns sees every byte the client sends
        (after it has been forwarded), e.g. to record the requests."""
        self._bind = bind
        self._connect = connect
        self._tap = tap
        self._sock: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        if self._sock is not None:
            return
        s = self._bind()
        s.listen(64)
        self._sock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def close(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(); close() alone does not
            except OSError:
                pass
            s.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                client, _ = s.accept()
            except OSError:
                return
            try:
                upstream = self._connect()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            tap = self._tap() if self._tap is not None else None
            for a, b, t in ((client, upstream, tap), (upstream, client, None)):
                threading.Thread(target=self._pipe, args=(a, b, t), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, tap: Callable[[bytes], None] | None = None) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if tap is not None:
                    tap(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def tcp_relay(target_port: int) -> tuple[Relay, int]:
    """A relay 127.0.0.1:PORT → 127.0.0.1:target_port, open; (relay, PORT)."""
    port = free_port()

    def bind() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return s

    relay = Relay(bind, lambda: socket.create_connection(("127.0.0.1", target_port), timeout=5))
    relay.open()
    return relay, port


def unix_relay(path: Path, target: str) -> Relay:
    """A relay from the unix socket `path` to the unix socket `target` (not opened yet)."""
    def bind() -> socket.socket:
        if path.exists():
            path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        return s

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(target)
        return s

    return Relay(bind, connect)
