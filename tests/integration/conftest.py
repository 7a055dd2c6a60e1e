"""Fixtures for integration tests against real Docker and the real proxy.

Network rule: tests talk only to 127.0.0.0/8 (the proxy) and to containers on
bridge networks these tests created; `container_ip` checks the route before
handing out a container address.

Everything a run creates is named `wptest-<8 hex>-…` (see `run_id`) and is
removed at teardown, even on failure; a last sweep at session end removes
anything left with that prefix.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Callable

import docker
import docker.errors
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    PyBack,
    ContainerFactory,
    ProxyProcess,
    build_busybox_image,
    build_pyback_image,
    deep_merge,
    free_port,
    proxy_command,
    python_runtime,
    sweep_prefix,
    remove_network,
)


# --------------------------------------------------------------------------
# session-wide Docker state


@pytest.fixture(scope="session")
def run_id() -> str:
    """Unique prefix for everything this test session creates."""
    return f"wptest-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def prefix(run_id) -> str:
    return run_id


@pytest.fixture(scope="session")
def docker_client(run_id):
    """Docker SDK client for the main daemon. Fails loudly when unreachable.

    At session end, removes whatever is still left with this run's prefix
    (containers, then networks, then images).
    """
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"Docker daemon unreachable ({e!r}); scripts/test starts one when needed", pytrace=False)
    yield client
    sweep_prefix(client, run_id)
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client, run_id) -> str:
    tag = build_busybox_image(docker_client, f"{run_id}-busybox")
    yield tag
    try:
        docker_client.images.remove(tag, force=True)
    except docker.errors.APIError:
        pass


@pytest.fixture(scope="session")
def python_mounts() -> tuple[str, list[str]]:
    return python_runtime()


@pytest.fixture(scope="session")
def pyback_image(docker_client, run_id, busybox_image, python_mounts) -> PyBack:
    tag = build_pyback_image(docker_client, f"{run_id}-pyback", busybox_image)
    exe, mounts = python_mounts
    yield PyBack(tag, exe, mounts)
    try:
        docker_client.images.remove(tag, force=True)
    except docker.errors.APIError:
        pass


@pytest.fixture(scope="session")
def test_network(docker_client, run_id) -> str:
    """Bridge network `<prefix>-net` the proxy is allowed to reach."""
    net = docker_client.networks.create(f"{run_id}-net", driver="bridge")
    yield net.name
    remove_network(net)


@pytest.fixture(scope="session")
def other_network(docker_client, run_id) -> str:
    """A second bridge network the proxy is NOT configured for."""
    net = docker_client.networks.create(f"{run_id}-other", driver="bridge")
    yield net.name
    remove_network(net)


# --------------------------------------------------------------------------
# containers


@pytest.fixture
def backend_container(docker_client, run_id, pyback_image, busybox_image, test_network):
    """Function-scoped factory: backend_container("app", labels={...}, ...)."""
    factory = ContainerFactory(docker_client, run_id, pyback_image, busybox_image, test_network)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="module")
def module_containers(docker_client, run_id, pyback_image, busybox_image, test_network):
    """Module-scoped variant of backend_container, for containers shared by a module's tests."""
    factory = ContainerFactory(docker_client, run_id, pyback_image, busybox_image, test_network)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="session")
def host(run_id) -> Callable[[str], str]:
    """host("app") -> "app.<run id>.test": host names unique to this run."""
    return lambda name: f"{name}.{run_id}.test"


# --------------------------------------------------------------------------
# the proxy process


@pytest.fixture
def proxy(request, tmp_path, test_network):
    """Factory: proxy(overrides=None, launcher="module"|"mitmdump") -> running ProxyProcess.

    Writes the contract config (deep-merged with `overrides`) and starts the
    real proxy; stopped (SIGTERM, SIGKILL after 5 s) at teardown. On a test
    failure the proxy log is attached to the report.
    """
    started: list[ProxyProcess] = []
    request.node._wakeproxy_procs = started

    def start(overrides: dict | None = None, launcher: str = "module",
              ready_timeout: float = 20.0) -> ProxyProcess:
        n = len(started)
        workdir = tmp_path / f"proxy{n}"
        workdir.mkdir()
        http_port, https_port = free_port(), free_port()
        while https_port == http_port:
            https_port = free_port()
        config = {
            "listen": {"http": f"127.0.0.1:{http_port}", "https": f"127.0.0.1:{https_port}"},
            "docker": {"url": None, "networks": [test_network]},
            "state_dir": str(workdir / "state"),
            "default_host": None,
        }
        config = deep_merge(config, overrides or {})
        cfg_path = workdir / "wakeproxy.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        p = ProxyProcess(proxy_command(launcher, cfg_path), config, cfg_path,
                         workdir / "proxy.log", http_port, https_port)
        started.append(p)
        return p.start(ready_timeout)

    yield start
    failed = any(getattr(request.node, f"rep_{ph}", None) is not None
                 and getattr(request.node, f"rep_{ph}").failed for ph in ("setup", "call"))
    for p in started:
        p.stop()
        if failed:
            print(f"\n--- wakeproxy log (pid {p.pid}, {p.cmd[-1]}) ---\n{p.log()}", file=sys.stderr)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if report.when == "call" and report.failed:
        for p in getattr(item, "_wakeproxy_procs", []):
            if p.proc is not None:
                report.sections.append((f"wakeproxy log (pid {p.pid})", p.log()[-20000:]))
    return report
