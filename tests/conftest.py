"""Fixtures shared by the integration and ACME tests: real Docker, the real proxy (helpers in
tests/integration/harness.py). Unit tests use none of them.

Network rule: tests talk only to 127.0.0.0/8 (the proxy) and to containers on
bridge networks these tests created; `container_ip` checks the route before
handing out a container address.

Everything a run creates is named `wptest-<8 hex>-…` (see `run_id`) and is
removed at teardown, even on failure; a last sweep at session end removes
anything left with that prefix.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import pytest

# The helpers the integration and ACME tests import by name (harness, backend).
sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))

from harness import (  # noqa: E402
    ContainerFactory,
    ProxyLauncher,
    ProxyProcess,
    PyBack,
    build_busybox_image,
    build_pyback_image,
    install_route_guard,
    make_self_signed,
    python_runtime,
    remove_network,
    sweep_prefix,
    traversable,
)

# Nothing this test process opens may leave the machine (Swarm overlay IPs would: harness.install_route_guard).
install_route_guard()


@pytest.fixture(autouse=True)
def _workers_can_pass(tmp_path: Path) -> None:
    """The `wakeproxy` command's workers run as `nobody`: they must be able to pass through the
    folders of a state_dir under tmp_path (pytest makes them 0700)."""
    traversable(tmp_path)

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


@pytest.fixture(scope="session")
def image() -> str:
    """The wakeproxy image under test (WPTEST_IMAGE from scripts/test, else built by scripts/image)."""
    from container_harness import image_tag

    return image_tag()


@pytest.fixture
def sandboxes(docker_client, run_id, backend_container):
    """Compose-shaped projects (container_harness.Sandboxes): a `<run_id>-<name>_default` network each."""
    from container_harness import Sandboxes

    s = Sandboxes(docker_client, run_id, backend_container)
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def module_containers(docker_client, run_id, pyback_image, busybox_image, test_network):
    """Module-scoped variant of backend_container, for containers shared by a module's tests."""
    factory = ContainerFactory(docker_client, run_id, pyback_image, busybox_image, test_network)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="session")
def tls_backend_files(tmp_path_factory) -> dict:
    """Cert/key for TLS backends: {"volumes": …, "env": …} to pass to the factory."""
    d = tmp_path_factory.mktemp("backend-tls")
    make_self_signed(d / "certs")
    return {
        "volumes": {str(d / "certs"): {"bind": "/certs", "mode": "ro"}},
        "env": {"TLS_CERT": "/certs/cert.pem", "TLS_KEY": "/certs/key.pem"},
    }


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
    failure the proxy log is attached to the report (and printed).
    """
    launcher = ProxyLauncher(tmp_path, [test_network])
    request.node._wakeproxy_procs = launcher.started
    yield launcher
    failed = any(getattr(request.node, f"rep_{ph}", None) is not None
                 and getattr(request.node, f"rep_{ph}").failed for ph in ("setup", "call"))
    launcher.stop_all(print_logs=failed)


@pytest.fixture(scope="module")
def module_proxy(tmp_path_factory, test_network):
    """Module-scoped variant of `proxy`, for a proxy shared by a module's tests."""
    workdir = tmp_path_factory.mktemp("mproxy")
    traversable(workdir)
    launcher = ProxyLauncher(workdir, [test_network])
    yield launcher
    launcher.stop_all()


def _procs_of(item) -> list[ProxyProcess]:
    procs: list[ProxyProcess] = list(getattr(item, "_wakeproxy_procs", []))
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, ProxyProcess):
            procs.append(value)
        elif isinstance(value, ProxyLauncher):
            procs.extend(value.started)
    seen, out = set(), []
    for p in procs:
        if id(p) not in seen and p.proc is not None:
            seen.add(id(p))
            out.append(p)
    return out


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if report.when == "call" and report.failed:
        for p in _procs_of(item):
            report.sections.append((f"wakeproxy log (pid {p.pid}, {p.config_path})", p.log()[-20000:]))
    return report


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (Debian's, driven by selenium) whose resolver maps every *.test name to 127.0.0.1."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for exe in (CHROMIUM, CHROMEDRIVER):
        assert os.access(exe, os.X_OK), f"{exe} missing: install Debian's chromium and chromium-driver"
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-proxy-server", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--host-resolver-rules=MAP *.test 127.0.0.1"):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
