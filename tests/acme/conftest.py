"""Fixtures for the ACME tests: a real pebble (Debian's `pebble` package) per test.

Each test starts what it needs and stops it by PID:
- `pebble-challtestsrv` as the DNS server pebble asks: every name → 127.0.0.1
  (no AAAA answers, so validation goes to the proxy's IPv4 listener);
- `pebble`, with `httpPort` = the proxy's HTTP port, `PEBBLE_VA_NOSLEEP=1` and
  nonce rejection at pebble's default (5 %: our badNonce handling runs);
  its API is served with a certificate generated here, trusted by the proxy
  through `acme.ca_bundle`;
- a TCP relay in front of pebble's API (`harness.tcp_relay`) that the test can close,
  so "the CA is unreachable" happens without pebble losing its state.
Only 127.0.0.1 is contacted.

The Docker fixtures (images, containers, the proxy launcher) come from tests/conftest.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # acme_harness, next to this file

from acme_harness import FixedPortLauncher, Pebble, ProxyProcess, free_port  # noqa: E402

TEST_BACKOFF = "1"  # seconds: the first backoff step in tests (WAKEPROXY_ACME_TEST_BACKOFF)


@pytest.fixture
def ports() -> tuple[int, int]:
    http_port = free_port()
    https_port = free_port()
    while https_port == http_port:
        https_port = free_port()
    return http_port, https_port


@pytest.fixture
def pebble_factory(tmp_path, ports, request):
    """pebble_factory(validity=None, eab=None, http_port=None) → a running Pebble for this test's proxy ports."""
    started: list[Pebble] = []

    def make(validity: int | None = None, eab: dict | None = None, http_port: int | None = None) -> Pebble:
        p = Pebble(tmp_path / f"pebble{len(started)}", http_port or ports[0], ports[1], validity, eab)
        started.append(p)
        return p

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for p in started:
        if failed:
            print(f"\n--- pebble log ---\n{p.log()[-8000:]}", file=sys.stderr)
        p.stop()


@pytest.fixture
def pebble(pebble_factory) -> Pebble:
    return pebble_factory()


@pytest.fixture
def acme_proxy(request, tmp_path, test_network, ports):
    """Factory like the integration `proxy`, on this test's fixed ports, with the test backoff."""
    launcher = FixedPortLauncher(tmp_path / "proxies", [test_network], *ports)
    request.node._wakeproxy_procs = launcher.started

    def start(overrides: dict | None = None, **kw) -> ProxyProcess:
        env = {"WAKEPROXY_ACME_TEST_BACKOFF": TEST_BACKOFF, **kw.pop("env", {})}
        return launcher(overrides, env=env, **kw)

    start.launcher = launcher
    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    launcher.stop_all(print_logs=failed)


