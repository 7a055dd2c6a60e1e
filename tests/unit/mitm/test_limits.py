"""wakeproxy.limits: deadlines for connections with nothing in flight, the connection cap
(evict the oldest idle connection, else refuse), one log line per flood interval."""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from mitmproxy import connection
from mitmproxy.test import taddons, tflow
from wakeproxy.config import parse_config
from wakeproxy.mitm import headbound, limits
from wakeproxy.mitm.limits import ConnectionLimits, connection_cap
from wakeproxy.runtime import Runtime


class FakeTask:
    def __init__(self) -> None:
        self.cancelled: str | None = None

    def cancel(self, msg: str | None = None) -> None:
        self.cancelled = msg or "cancelled"


@dataclass
class FakeIO:
    handler: Any = field(default_factory=FakeTask)
    writer: Any = None


class FakeHandler:
    def __init__(self, client) -> None:
        self.client = client
        self.transports = {client: FakeIO()}


class FakeProxyserver:
    def __init__(self) -> None:
        self.connections: dict[str, FakeHandler] = {}


def client() -> connection.Client:
    return connection.Client(peername=("192.0.2.7", 5555), sockname=("127.0.0.1", 80), timestamp_start=time.time())


class World:
    def __init__(self, config: str = "limits: {max_connections: 3, header_timeout: 2s, idle_timeout: 5s}") -> None:
        self.runtime = Runtime(config=parse_config(config))
        self.addon = ConnectionLimits(self.runtime)
        self.ps = FakeProxyserver()
        self.ps.name = "proxyserver"
        self.addon.cap = self.runtime.config.limits.max_connections or 3
        self.addon.header_timeout = self.runtime.config.limits.header_timeout
        self.addon.idle_timeout = self.runtime.config.limits.idle_timeout

    def connect(self) -> connection.Client:
        c = client()
        self.ps.connections[c.id] = FakeHandler(c)
        self.addon.client_connected(c)
        return c

    def closed(self, c) -> bool:
        return self.ps.connections[c.id].transports[c].handler.cancelled is not None

    def flow(self, c):
        f = tflow.tflow()
        f.client_conn = c
        return f


@pytest.fixture
def world():
    w = World()
    with taddons.context(w.addon) as tctx:
        tctx.master.addons.add(w.ps)
        yield w


def test_connection_without_a_request_is_closed_after_header_timeout(world):
    c = world.connect()
    now = time.monotonic()
    assert world.addon.sweep(now + 1.9) == 0
    assert world.addon.sweep(now + 2.1) == 1 and world.closed(c)


def test_request_in_flight_is_never_timed(world):
    c = world.connect()
    f = world.flow(c)
    world.addon.requestheaders(f)
    assert world.addon.sweep(time.monotonic() + 3600) == 0 and not world.closed(c)
    world.addon.response(f)
    now = time.monotonic()
    assert world.addon.sweep(now + 4.9) == 0  # keep-alive: idle_timeout now, not header_timeout
    assert world.addon.sweep(now + 5.1) == 1 and world.closed(c)


def test_websocket_is_in_flight_until_its_end(world):
    c = world.connect()
    f = tflow.twebsocketflow()
    f.client_conn = c
    world.addon.requestheaders(f)
    world.addon.response(f)
    assert world.addon.sweep(time.monotonic() + 3600) == 0
    world.addon.websocket_end(f)
    assert world.addon.sweep(time.monotonic() + 6) == 1


def test_a_flow_ends_once_even_with_response_and_error(world):
    c = world.connect()
    a, b = world.flow(c), world.flow(c)
    world.addon.requestheaders(a)
    world.addon.requestheaders(b)
    world.addon.response(a)
    world.addon.error(a)
    assert world.addon.conns[c.id].inflight == 1
    assert world.addon.sweep(time.monotonic() + 3600) == 0


def test_slow_keep_alive_head_gets_header_timeout_from_its_first_byte(world):
    c = world.connect()
    f = world.flow(c)
    world.addon.requestheaders(f)
    world.addon.response(f)
    world.addon.head_started(c)
    now = time.monotonic()
    assert world.addon.sweep(now + 2.1) == 1 and world.closed(c)


def test_at_the_cap_the_oldest_idle_connection_is_evicted(world):
    a, b, c = world.connect(), world.connect(), world.connect()
    for x in (b, c):
        world.addon.requestheaders(world.flow(x))  # busy
    d = world.connect()
    assert world.closed(a) and not d.error
    assert world.addon.evicted == 1
    world.addon.client_disconnected(a)
    assert len(world.addon.conns) == 3


def test_at_the_cap_with_everyone_busy_a_new_connection_is_refused(world):
    cs = [world.connect() for _ in range(3)]
    for x in cs:
        world.addon.requestheaders(world.flow(x))
    d = world.connect()
    assert d.error and world.addon.refused == 1
    assert not any(world.closed(x) for x in cs)
    world.addon.client_disconnected(d)  # mitmproxy still reports it
    assert len(world.addon.conns) == 3


def test_flood_is_logged_once_per_interval(world, caplog):
    cs = [world.connect() for _ in range(3)]
    for x in cs:
        world.addon.requestheaders(world.flow(x))
    with caplog.at_level(logging.WARNING):
        for _ in range(1000):
            world.connect()
        world.addon.report()
        world.addon.report()
    lines = [r.getMessage() for r in caplog.records if "connection flood" in r.getMessage()]
    assert len(lines) == 1 and "refused 1000" in lines[0] and "cap of 3" in lines[0]


def test_without_proxyserver_connections_one_warning_and_refusal_still_works(world, caplog):
    del world.ps.connections
    with caplog.at_level(logging.WARNING):
        a = client()
        world.addon.client_connected(a)
        world.addon.client_connected(client())
        world.addon.client_connected(client())
        for _ in range(5):
            assert world.addon.sweep(time.monotonic() + 100) == 0
        d = client()
        world.addon.client_connected(d)
    assert d.error
    warnings = [r for r in caplog.records if "not the shape expected" in r.getMessage()]
    assert len(warnings) == 1


def test_connection_cap_from_the_file_limit():
    assert connection_cap(1024, 128, None) == 448
    assert connection_cap(10**6, 512, None) == limits.AUTO_CAP_MAX
    assert connection_cap(200, 128, 10) == 10
    assert connection_cap(200, 128, 500) == 72
    assert connection_cap(100, 128, None) == 1


def test_nofile_soft_limit_is_raised_to_hard(monkeypatch):
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda _, v: calls.append(v))
    assert limits.raise_nofile_limit() == 4096 and calls == [(4096, 4096)]


def test_configure_sets_the_header_bound_option(tmp_path):
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"state_dir: {tmp_path}\nlimits: {{max_header_bytes: 2048, max_connections: 7}}\n")
    from wakeproxy.config import load_config
    runtime = Runtime(config=load_config(cfg))
    addon = ConnectionLimits(runtime)
    with taddons.context(addon) as tctx:
        tctx.options.add_option("wakeproxy_config", str, "", "")
        tctx.options.update(wakeproxy_config=str(cfg))
        assert getattr(tctx.options, headbound.OPTION) == 2048
        assert addon.cap == 7
