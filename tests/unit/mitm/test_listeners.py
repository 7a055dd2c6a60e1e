"""mitm/listeners: a worker serves the sockets the supervisor bound, through mitmproxy's own listener."""

from __future__ import annotations

import asyncio
import socket

import pytest
from mitmproxy.proxy import mode_servers
from wakeproxy.mitm import listeners
from wakeproxy.mitm.guard import AsyncioWith


@pytest.fixture(autouse=True)
def _restore():
    yield
    listeners.uninstall()


def test_fds_round_trip_through_the_environment():
    assert listeners.decode(listeners.encode({443: 7, 80: 5})) == {80: 5, 443: 7}
    assert listeners.decode("") == {}


def test_a_handed_socket_is_served_once_and_closing_the_server_closes_it():
    sock = listeners.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    fd = sock.detach()  # as inherited: the number alone

    async def go() -> None:
        assert listeners.install({listeners.ENV: listeners.encode({port: fd})})
        assert isinstance(mode_servers.asyncio, AsyncioWith)

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read(5))
            await writer.drain()
            writer.close()

        server = await mode_servers.asyncio.start_server(echo, "127.0.0.1", port)
        assert server.sockets[0].getsockname()[1] == port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        assert await reader.read(5) == b"hello"
        writer.close()
        server.close()
        await server.wait_closed()
        # Our copy is gone with the server: nothing listens any more (the supervisor would hold one).
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        # A port we were not handed binds as usual.
        other = await mode_servers.asyncio.start_server(echo, "127.0.0.1", 0)
        other.close()

    asyncio.run(go())


def test_reuseport_sockets_share_a_port():
    a = listeners.bind("127.0.0.1", 0)
    b = listeners.bind("127.0.0.1", a.getsockname()[1])
    assert a.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    a.close()
    b.close()


def test_nothing_handed_means_no_patch_and_another_shape_declines_once(monkeypatch, caplog):
    assert listeners.install({}) is False
    assert mode_servers.asyncio is asyncio
    monkeypatch.setattr(listeners, "shape_ok", lambda: False)
    monkeypatch.setattr(listeners.FALLBACK, "warned", False)
    assert listeners.install({listeners.ENV: "80=5"}) is False
    assert listeners.install({listeners.ENV: "80=5"}) is False
    assert mode_servers.asyncio is asyncio
    assert sum("AsyncioServerInstance.listen" in r.getMessage() for r in caplog.records) == 1
