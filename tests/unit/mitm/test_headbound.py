"""wakeproxy.headbound: mitmproxy's HTTP/1 server buffers at most max_header_bytes of an
unfinished request head (and of data pipelined behind a request in flight).

The tests drive mitmproxy's real Http1Server without sockets and look at the commands it
yields and at the size of its receive buffer."""

from __future__ import annotations

import pytest
from mitmproxy import connection, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import RequestHeaders
from wakeproxy.mitm import headbound


@pytest.fixture
def patched():
    was = headbound.installed()
    assert headbound.install()
    yield
    if not was:
        headbound.uninstall()


@pytest.fixture
def unpatched():
    was = headbound.installed()
    headbound.uninstall()
    yield
    if was:
        assert headbound.install()


class H1:
    def __init__(self, limit: int | None = None) -> None:
        opts = options.Options()
        Proxyserver().load(opts)
        if limit is not None:
            opts.add_option(headbound.OPTION, int, limit, "test")
        self.client = connection.Client(peername=("192.0.2.7", 5555), sockname=("127.0.0.1", 80),
                                        state=ConnectionState.OPEN)
        self.layer = _http1.Http1Server(Context(self.client, opts))
        self.cmds: list = []
        self.feed(events.Start())

    def feed(self, event) -> list:
        out = list(self.layer.handle_event(event))
        self.cmds += out
        return out

    def send(self, data: bytes) -> list:
        return self.feed(events.DataReceived(self.client, data))

    def sent(self) -> bytes:
        return b"".join(c.data for c in self.cmds if isinstance(c, commands.SendData))

    def closed(self) -> bool:
        return any(isinstance(c, commands.CloseConnection) for c in self.cmds)

    def heads(self) -> list:
        return [c.event for c in self.cmds if isinstance(c, ReceiveHttp) and isinstance(c.event, RequestHeaders)]


def test_unfinished_head_over_the_limit_gets_431_and_is_dropped(patched):
    h = H1(limit=4096)
    h.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n")
    for _ in range(10):
        h.send(b"X-Junk: " + b"a" * 1000 + b"\r\n")
        if h.closed():
            break
    assert h.sent().startswith(b"HTTP/1.1 431 ")
    assert b"server: mitmproxy" not in h.sent().lower()
    assert h.closed() and not h.heads()
    assert len(h.layer.buf) == 0
    # What the client sends after that is neither buffered nor parsed.
    h.send(b"b" * 100_000)
    assert len(h.layer.buf) <= 100_000 and not h.heads()


def test_buffer_never_grows_beyond_limit_plus_one_read(patched):
    h = H1(limit=32768)
    sizes = []
    for _ in range(400):  # 25 MB in 64 KiB reads
        h.send(b"x" * 65535)
        sizes.append(len(h.layer.buf))
        if h.closed():
            break
    assert h.closed() and max(sizes) <= 32768 + 65535


def test_complete_head_with_a_large_body_in_the_same_read_passes(patched):
    h = H1(limit=4096)
    body = b"z" * 60000
    h.send(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 60000\r\n\r\n" + body)
    assert len(h.heads()) == 1 and not h.closed()


def test_default_limit_without_the_option(patched):
    h = H1()
    assert headbound.limit_of(h.layer) == headbound.DEFAULT_LIMIT


def test_first_bytes_of_a_head_are_reported_once(patched):
    seen = []
    headbound.add_listener(seen.append)
    try:
        h = H1(limit=4096)
        h.send(b"GET / HT")
        h.send(b"TP/1.1\r\n")
        assert seen == [h.client]
        h.send(b"Host: a.test\r\n\r\n")
        assert len(h.heads()) == 1
    finally:
        headbound.remove_listener(seen.append)


def test_pipelined_flood_behind_a_request_in_flight_closes(patched):
    h = H1(limit=4096)
    h.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert len(h.heads()) == 1 and h.layer.state == h.layer.wait
    for _ in range(5):
        h.send(b"p" * 2000)
        if h.closed():
            break
    assert h.closed()
    h.send(b"p" * 2000)
    # Dropped at the close; a real proxy server reads nothing after it (the handler is cancelled),
    # here the last read (2000 bytes) lands in the buffer of the closed connection.
    assert len(h.layer.buf) <= 2000


def test_without_the_patch_the_buffer_grows(unpatched):
    h = H1(limit=4096)
    for _ in range(20):
        h.send(b"x" * 65535)
    assert len(h.layer.buf) == 20 * 65535 and not h.closed()


def test_missing_attribute_falls_back_with_one_warning(unpatched, monkeypatch, caplog):
    monkeypatch.setattr(headbound.FALLBACK, "warned", False)
    monkeypatch.delattr(_http1.Http1Server, "wait", raising=False)
    monkeypatch.delattr(_http1.Http1Connection, "wait")
    with caplog.at_level("WARNING"):
        assert headbound.install() is False
        assert headbound.install() is False
    assert not headbound.installed()
    warnings = [r for r in caplog.records if "headbound" in r.name or "unfinished HTTP/1" in r.getMessage()]
    assert len(warnings) == 1 and "Http1Server.wait" in warnings[0].getMessage()
