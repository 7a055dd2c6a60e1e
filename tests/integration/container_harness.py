"""The proxy as a container of its own image (scripts/image), for tests/integration/test_container.py.

`ProxyContainer` mirrors `harness.ProxyProcess` where the ACME helpers need it (`http_url`,
`https_url`, `https_port`, `log()`, `children("worker")`), so the same client helpers work on it.
Only 127.0.0.1 and the tests' own bridges are contacted: in bridge mode the ports are published
on 127.0.0.1; with host networking the proxy listens on 127.0.0.1 itself.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import docker.errors
import docker.types
import httpx
import pytest
import yaml
from harness import READY_LINE, REPO, children_of, free_port, remove_network, wait_for

SOCKET = "/var/run/docker.sock"
CONFIG_DIR = "/etc/wakeproxy"


def image_tag() -> str:
    """The image under test: WPTEST_IMAGE (scripts/test builds it first), else built now by scripts/image."""
    tag = os.environ.get("WPTEST_IMAGE")
    if tag:
        return tag
    out = subprocess.run([str(REPO / "scripts" / "image"), "--print-tag"], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        pytest.fail(f"scripts/image failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}",
                    pytrace=False)
    return out.stdout.strip().splitlines()[-1]


class ProxyContainer:
    """One proxy container: `mode` "bridge" (its own test network, ports published on 127.0.0.1)
    or "host" (`--network host`, listening on 127.0.0.1 ports of its own)."""

    def __init__(self, client: Any, image: str, name: str, mode: str, workdir: Path, config: dict,
                 network: str | None = None, env: dict | None = None, files: dict[str, str] | None = None,
                 http_port: int | None = None, https_port: int | None = None,
                 also_publish: tuple[str, ...] = (), volumes: dict[str, dict] | None = None) -> None:
        """`also_publish`: more host addresses the bridge mode publishes the ports on (the same port numbers)."""
        self.client, self.image, self.name, self.mode = client, image, name, mode
        self.also_publish = also_publish
        self.extra_volumes = dict(volumes or {})
        self.external: Any = None  # test_container's ExternalClient, in bridge mode
        self.http_port = http_port or free_port()
        self.https_port = https_port or free_port()
        self.config = dict(config)
        self.env = dict(env or {})
        self.network = network
        self.volume = f"{name}-state"
        self.config_dir = workdir / "etc"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)
        os.chmod(self.config_dir, 0o755)
        for fname, text in (files or {}).items():
            (self.config_dir / fname).write_text(text)
        if mode == "host":
            self.status_port = free_port()
            self.env.setdefault("WAKEPROXY_HTTP", f"127.0.0.1:{self.http_port}")
            self.env.setdefault("WAKEPROXY_HTTPS", f"127.0.0.1:{self.https_port}")
            self.env.setdefault("WAKEPROXY_STATUS_LISTEN", f"127.0.0.1:{self.status_port}")
        (self.config_dir / "wakeproxy.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.container: Any = None
        self._log_mark = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def get(self, host: str, path: str = "/", timeout: float = 30.0) -> httpx.Response:
        """GET http://<proxy>/path with `Host: host`, plain HTTP/1.1."""
        with httpx.Client(timeout=timeout, trust_env=False) as c:
            return c.get(f"{self.http_url}{path}", headers={"Host": host})

    def start(self, ready_timeout: float = 60.0) -> ProxyContainer:
        kw: dict[str, Any] = {
            "name": self.name, "detach": True, "environment": self.env,
            "volumes": {SOCKET: {"bind": SOCKET, "mode": "rw"},
                        self.volume: {"bind": "/var/lib/wakeproxy", "mode": "rw"},
                        str(self.config_dir): {"bind": CONFIG_DIR, "mode": "ro"}, **self.extra_volumes},
            "stop_signal": "SIGTERM",
        }
        if self.mode == "host":
            kw["network_mode"] = "host"
        else:
            kw["network"] = self.network
            kw["ports"] = {"80/tcp": [(a, self.http_port) for a in ("127.0.0.1", *self.also_publish)],
                           "443/tcp": [(a, self.https_port) for a in ("127.0.0.1", *self.also_publish)]}
        self.container = self.client.containers.run(self.image, **kw)
        self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float = 60.0, after: int = 0) -> None:
        def ready() -> bool:
            self.container.reload()
            if self.container.status in ("exited", "dead"):
                pytest.fail(f"proxy container exited ({self.container.attrs['State'].get('ExitCode')}):\n"
                            f"{self.log()}", pytrace=False)
            return READY_LINE in self.log()[after:]
        wait_for(ready, timeout, 0.1, f"'{READY_LINE}' from container {self.name}")

    def log(self) -> str:
        if self.container is None:
            return ""
        try:
            return self.container.logs(stdout=True, stderr=True).decode(errors="replace")
        except docker.errors.NotFound:
            return ""

    def pid(self) -> int:
        self.container.reload()
        return int(self.container.attrs["State"]["Pid"])

    def children(self, role: str) -> list[int]:
        """Host pids of the container's `role` processes (children of its supervisor, PID 1 inside)."""
        pid = self.pid()
        return children_of(pid, f"_{role}") if pid else []

    def networks(self) -> set[str]:
        self.container.reload()
        return set(self.container.attrs["NetworkSettings"]["Networks"])

    def exec(self, *cmd: str) -> tuple[int, str]:
        code, out = self.container.exec_run(list(cmd), demux=False)
        return code, out.decode(errors="replace")

    def restart(self, timeout: float = 60.0) -> float:
        """`docker restart`; returns the seconds until it is ready again."""
        mark = len(self.log())
        t0 = time.monotonic()
        self.container.restart(timeout=20)
        self.wait_ready(timeout, after=mark)
        return time.monotonic() - t0

    def remove(self) -> None:
        if self.container is not None:
            try:
                self.container.remove(force=True)
            except docker.errors.NotFound:
                pass
        try:
            self.client.volumes.get(self.volume).remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            print(f"warning: could not remove volume {self.volume}: {e}")


class RecordedProxyContainer(ProxyContainer):
    """A `ProxyContainer` whose /var/run/docker.sock is `socket_path` on the host (e.g. a recording relay
    to the real socket, tests/integration/test_docker_api_calls.py) instead of the host's own socket.
    Everything else is `ProxyContainer.start()`'s: only the socket's bind mount is swapped."""

    def __init__(self, *args: Any, socket_path: str | Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socket_path = str(socket_path)

    def start(self, ready_timeout: float = 60.0) -> RecordedProxyContainer:
        client = self.client
        self.client = _SocketSwap(client, self.socket_path)
        try:
            super().start(ready_timeout)
        finally:
            self.client = client
        return self


class _SocketSwap:
    """Stands in for the Docker client during `ProxyContainer.start()`: `containers.run` with the host's
    SOCKET bind mount replaced by `socket_path`."""

    def __init__(self, client: Any, socket_path: str) -> None:
        self._client, self._socket_path = client, socket_path
        self.containers = self

    def run(self, image: str, **kw: Any) -> Any:
        volumes = dict(kw.get("volumes") or {})
        volumes[self._socket_path] = volumes.pop(SOCKET)
        return self._client.containers.run(image, **{**kw, "volumes": volumes})


class Sandboxes:
    """Compose-shaped projects: `<prefix>-<name>_default` networks holding the project's containers."""

    def __init__(self, client, run_id: str, factory) -> None:
        self.client, self.run_id, self.factory = client, run_id, factory
        self.networks: list = []

    def project(self, name: str, host: str, labels: dict | None = None, subnet: str | None = None, **kw):
        project = f"{self.run_id}-{name}"
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)]) if subnet else None
        net = self.client.networks.create(f"{project}_default", driver="bridge", ipam=ipam, labels={
            "com.docker.compose.project": project, "com.docker.compose.network": "default"})
        self.networks.append(net)
        c = self.factory(f"{name}-web", network=net.name, labels={
            "com.docker.compose.project": project, "com.docker.compose.service": "web",
            "wakeproxy.host": host, **(labels or {})}, **kw)
        return net, c

    def cleanup(self) -> None:
        self.factory.cleanup()
        for net in self.networks:
            remove_network(net)
