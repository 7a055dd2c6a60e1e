"""wakeproxy.mitm.upstream: the connector (deadlines, death, wakes) and the guard of its adaptation."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy.proxy import server
from wakeproxy.config import Config, SourcesConfig, UpstreamConfig
from wakeproxy.mitm import guard, upstream
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import build_snapshot
from wakeproxy.runtime import ContainerEvent, Runtime
from wakeproxy.wake.waker import Waker


def _runtime(state: str = "running", ip: str = "127.0.0.1") -> Runtime:
    c = ContainerInfo("id-web", "web", state, labels={"wakeproxy.host": "web.test", "wakeproxy.port": "9"},
                      networks={"bridge": ip if state == "running" else ""})
    return Runtime(config=Config(upstream=UpstreamConfig(connect_timeout=0.2)),
                   snapshot=build_snapshot([c], SourcesConfig(), (), {}))


def test_the_shape_check_accepts_this_mitmproxy():
    assert upstream.shape_ok()


def test_another_shape_is_left_alone_with_one_warning(monkeypatch, caplog):
    async def open_connection(self, command):  # a future mitmproxy that connects another way
        return None

    monkeypatch.setattr(server.ConnectionHandler, "open_connection", open_connection)
    monkeypatch.setattr(upstream.FALLBACK, "warned", False)
    guard._source_calls.cache_clear()  # the source is read once per process: read this one
    rt = _runtime()
    connector = upstream.Connector(rt, Waker(rt))
    with caplog.at_level(logging.WARNING, logger="wakeproxy.mitm.guard"):
        assert upstream.install(connector) is False
        assert upstream.install(connector) is False
    assert server.asyncio is asyncio
    assert [r.levelname for r in caplog.records if r.name == "wakeproxy.mitm.guard"] == ["WARNING"]
    guard._source_calls.cache_clear()  # (and not its answer for the tests after this one)


def test_install_and_uninstall_touch_only_the_servers_asyncio():
    rt = _runtime()
    connector = upstream.Connector(rt, Waker(rt))
    try:
        assert upstream.install(connector)
        assert isinstance(server.asyncio, upstream.AsyncioWith)
        assert server.asyncio.sleep is asyncio.sleep  # everything else is the real module
        assert asyncio.open_connection is not upstream._dispatch
    finally:
        upstream.uninstall()
    assert server.asyncio is asyncio


def test_a_connect_that_hangs_times_out_with_a_message(monkeypatch):
    async def never(*args, **kwargs):
        await asyncio.sleep(60)

    async def run():
        rt = _runtime()
        c = upstream.Connector(rt, Waker(rt))
        monkeypatch.setattr(upstream.asyncio, "open_connection", never)
        with pytest.raises(TimeoutError, match="timed out after 0.2 s"):
            await c._connect("192.0.2.1", 80, None)

    asyncio.run(run())


def test_known_addresses_come_from_the_snapshots():
    rt = _runtime()
    c = upstream.Connector(rt, Waker(rt))
    assert c.container_at("127.0.0.1", 9) == "id-web"
    rt.publish(build_snapshot([], SourcesConfig(), (), {}))
    assert c.container_at("127.0.0.1", 9) == "id-web"  # remembered after it is gone from the snapshot
    assert c.container_at("127.0.0.1", 10) is None


def test_death_ends_the_containers_connections_and_releases_connects():
    class Transport:
        closing = False

        def is_closing(self) -> bool:
            return self.closing

        def abort(self) -> None:
            self.closing = True

    async def run():
        rt = _runtime()
        c = upstream.Connector(rt, Waker(rt))
        t = Transport()
        c._live.setdefault("id-web", upstream.weakref.WeakSet()).add(t)
        died = c._died.setdefault("id-web", asyncio.Event())
        rt.emit(ContainerEvent("die", "id-web", "web", exit_code=137))
        return t.closing, died.is_set()

    assert asyncio.run(run()) == (True, True)


def test_a_removed_container_is_an_error_not_a_wake():
    async def run():
        rt = _runtime()
        c = upstream.Connector(rt, Waker(rt))
        c.container_at("127.0.0.1", 9)
        rt.publish(build_snapshot([], SourcesConfig(), (), {}))  # removed
        with pytest.raises(OSError, match="was removed"):
            await c.open_connection("127.0.0.1", 9)

    asyncio.run(run())


def test_a_host_network_container_is_alive_at_loopback():
    c = ContainerInfo("id-h", "hostnet", "running", networks={"host": ""},
                      labels={"wakeproxy.host": "h.test", "wakeproxy.port": "8080", "wakeproxy.network": "host"})
    rt = Runtime(snapshot=build_snapshot([c], SourcesConfig(), (), {"host": "host"}))
    conn = upstream.Connector(rt, Waker(rt))
    assert conn.container_at("127.0.0.1", 8080) == "id-h"
    assert conn._alive_at("id-h", "127.0.0.1", 8080)  # no wake for a running host-network container
