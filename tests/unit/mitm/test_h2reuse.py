"""wakeproxy.h2reuse: HTTP/2 streams reuse idle HTTP/1.1 upstream connections.

The tests drive mitmproxy's real HttpLayer without sockets: `Sim` plays the
proxy server (answers hooks, "opens" and "closes" connections, records the
bytes sent on each), an h2 library client plays the browser, and the test
writes the backend's bytes.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque

import h2.config
import h2.connection
import h2.events
import pytest
from mitmproxy import connection, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, server
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1
from wakeproxy.mitm import h2reuse

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def patched():
    was = h2reuse.installed()
    assert h2reuse.install()
    yield
    if not was:
        h2reuse.uninstall()


@pytest.fixture
def unpatched():
    was = h2reuse.installed()
    h2reuse.uninstall()
    yield
    if was:
        assert h2reuse.install()


class Sim:
    """One client connection through mitmproxy's HttpLayer (regular mode), sans I/O."""

    def __init__(self, http2: bool = True) -> None:
        opts = options.Options()
        Proxyserver().load(opts)
        opts.update(http2_ping_keepalive=0)
        self.client = connection.Client(peername=("192.0.2.7", 5555), sockname=("127.0.0.1", 443),
                                        state=ConnectionState.OPEN)
        self.client.alpn = b"h2" if http2 else b"http/1.1"
        self.layer = http_layers.HttpLayer(Context(self.client, opts), http_layers.HTTPMode.regular)
        self.opened: list[connection.Server] = []
        self.wire: dict[connection.Connection, bytearray] = defaultdict(bytearray)
        self.flows: list = []
        self.refuse: str | None = None  # error for the next OpenConnection
        # mitmproxy's proxy server: at most 5 open connections per address; more wait for a close.
        self.limit = 5
        self.blocked: deque[commands.OpenConnection] = deque()
        self.h2: h2.connection.H2Connection | None = None
        self.responses: dict[int, dict] = defaultdict(lambda: {"status": None, "body": b"", "ended": False,
                                                               "reset": False})
        self.feed(events.Start())
        if http2:
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                          header_encoding="utf-8"))
            self.h2.initiate_connection()
            self.feed(events.DataReceived(self.client, self.h2.data_to_send()))

    # --- the proxy server's part ---------------------------------------------------

    def feed(self, first: events.Event) -> None:
        queue = deque([first])
        for _ in range(10_000):
            if not queue:
                return
            for cmd in self.layer.handle_event(queue.popleft()):
                queue.extend(self._run(cmd))
        raise AssertionError("event loop did not settle")

    def _run(self, cmd: commands.Command) -> list[events.Event]:
        if isinstance(cmd, commands.OpenConnection):
            if self.refuse:
                self.opened.append(cmd.connection)
                cmd.connection.error = self.refuse
                return [events.OpenConnectionCompleted(cmd, self.refuse)]
            if len(self.live(cmd.connection.address)) >= self.limit:
                self.blocked.append(cmd)
                return []
            return self._connect(cmd)
        if isinstance(cmd, commands.SendData):
            if cmd.connection is self.client and self.h2 is not None:
                return self._to_h2_client(cmd.data)
            self.wire[cmd.connection] += cmd.data
            return []
        if isinstance(cmd, commands.CloseTcpConnection) and cmd.half_close:
            cmd.connection.state &= ~ConnectionState.CAN_WRITE
            return []
        if isinstance(cmd, commands.CloseConnection):  # also CloseTcpConnection without half_close
            was = cmd.connection.state
            cmd.connection.state = ConnectionState.CLOSED
            if was is ConnectionState.CLOSED or cmd.connection is self.client:
                return []
            # A real proxy server reports the end of a connection it closed on command (unless the
            # peer's close was reported already), and lets a connection that waits for a slot go ahead.
            out: list[events.Event] = [events.ConnectionClosed(cmd.connection)] if was & ConnectionState.CAN_READ else []
            if self.blocked and len(self.live(self.blocked[0].connection.address)) < self.limit:
                out += self._connect(self.blocked.popleft())
            return out
        if isinstance(cmd, commands.StartHook):
            flow = getattr(cmd, "flow", None)
            if isinstance(cmd, (http_layers.HttpResponseHook, http_layers.HttpErrorHook)):
                self.flows.append(flow)
            return [events.HookCompleted(cmd)] if cmd.blocking else []
        return []  # Log, RequestWakeup

    def _connect(self, cmd: commands.OpenConnection) -> list[events.Event]:
        conn = cmd.connection
        self.opened.append(conn)
        conn.state = ConnectionState.OPEN
        conn.peername = conn.address
        return [events.OpenConnectionCompleted(cmd, None)]

    def live(self, address) -> list[connection.Server]:
        return [c for c in self.opened if c.address == address and c.state is not ConnectionState.CLOSED]

    # --- the HTTP/2 client --------------------------------------------------------------

    def _to_h2_client(self, data: bytes) -> list[events.Event]:
        assert self.h2 is not None
        for ev in self.h2.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                self.responses[ev.stream_id]["status"] = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                self.responses[ev.stream_id]["body"] += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.responses[ev.stream_id]["ended"] = True
            elif isinstance(ev, h2.events.StreamReset):
                self.responses[ev.stream_id]["reset"] = True
        out = self.h2.data_to_send()
        return [events.DataReceived(self.client, out)] if out else []

    def request(self, method: str = "GET", path: str = "/", body: bytes = b"") -> int:
        assert self.h2 is not None
        sid = self.h2.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "http"), (":path", path), (":authority", "app.test")]
        if body:
            headers.append(("content-length", str(len(body))))
        self.h2.send_headers(sid, headers, end_stream=not body)
        if body:
            self.h2.send_data(sid, body, end_stream=True)
        self.feed(events.DataReceived(self.client, self.h2.data_to_send()))
        return sid

    def answer(self, conn: connection.Server, raw: bytes = OK, close: bool = False) -> None:
        """The backend sends `raw` on `conn` (and then closes it)."""
        self.feed(events.DataReceived(conn, raw))
        if close and conn.state & ConnectionState.CAN_READ:
            conn.state &= ~ConnectionState.CAN_READ
            self.feed(events.ConnectionClosed(conn))

    def answer_all(self, raw: bytes = OK, rounds: int = 100) -> None:
        """The backend answers every request it has been sent (in rounds, as connections free up)."""
        answered: dict[connection.Server, int] = defaultdict(int)
        for _ in range(rounds):
            todo = [c for c in self.opened if c.state & ConnectionState.CAN_READ
                    and len(request_lines(self.sent(c))) > answered[c]]
            if not todo:
                return
            for c in todo:
                answered[c] += 1
                self.answer(c, raw)
        raise AssertionError("the backend kept getting requests")

    def sent(self, conn: connection.Server) -> bytes:
        return bytes(self.wire[conn])

    def status(self, sid: int) -> int | None:
        r = self.responses[sid]
        return r["status"] if r["ended"] else None


def request_lines(raw: bytes) -> list[bytes]:
    return [line for line in raw.split(b"\r\n") if line.endswith(b" HTTP/1.1") and b" /" in line]


# --- reuse ------------------------------------------------------------------------------


def test_sequential_h2_streams_share_one_upstream_connection(patched):
    sim = Sim()
    for i in range(5):
        sid = sim.request(path=f"/{i}")
        assert len(sim.opened) == 1
        sim.answer(sim.opened[0], b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nr%d!" % i)
        assert sim.status(sid) == 200 and sim.responses[sid]["body"] == b"r%d!" % i
    conn = sim.opened[0]
    assert conn.connected
    assert request_lines(sim.sent(conn)) == [b"GET /%d HTTP/1.1" % i for i in range(5)]
    # Each flow still names the connection it used.
    assert [f.server_conn for f in sim.flows] == [conn] * 5
    assert [f.request.http_version for f in sim.flows] == ["HTTP/2.0"] * 5


def test_without_the_patch_every_stream_gets_its_own_connection(unpatched):
    sim = Sim()
    for _ in range(3):
        sid = sim.request()
        sim.answer(sim.opened[-1])
        assert sim.status(sid) == 200
    assert len(sim.opened) == 3
    assert not any(c.connected for c in sim.opened)


def test_concurrent_streams_never_share_a_busy_connection(patched):
    sim = Sim()
    a, b = sim.request(path="/a"), sim.request(path="/b")
    assert len(sim.opened) == 2  # HTTP/1.1 carries one request at a time
    first, second = sim.opened
    assert request_lines(sim.sent(first)) == [b"GET /a HTTP/1.1"]
    assert request_lines(sim.sent(second)) == [b"GET /b HTTP/1.1"]
    # /b is answered; /c takes /b's connection while /a's is still busy.
    sim.answer(second)
    c = sim.request(path="/c")
    assert len(sim.opened) == 2
    assert request_lines(sim.sent(second)) == [b"GET /b HTTP/1.1", b"GET /c HTTP/1.1"]
    d = sim.request(path="/d")  # both busy now
    assert len(sim.opened) == 3
    for conn in sim.opened:
        sim.answer(conn)
    assert [sim.status(s) for s in (a, b, c, d)] == [200] * 4


def test_more_concurrent_streams_than_the_proxy_opens_connections(patched):
    """mitmproxy opens at most 5 connections per address and client connection; a 6th waits for one
    to close. Idle connections are kept now, so the 6th stream must take the next idle one."""
    sim = Sim()
    sids = [sim.request(path=f"/{i}") for i in range(12)]
    assert len(sim.opened) == 5 and not sim.blocked  # the rest wait in h2reuse's queue
    sim.answer_all()
    assert [sim.status(s) for s in sids] == [200] * 12
    assert len(sim.opened) == 5
    assert sorted(len(request_lines(sim.sent(c))) for c in sim.opened) == [2, 2, 2, 3, 3]


def test_queued_streams_get_a_new_connection_when_one_closes(patched):
    sim = Sim()
    sids = [sim.request(path=f"/{i}") for i in range(8)]
    assert len(sim.opened) == 5
    sim.answer_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert [sim.status(s) for s in sids] == [200] * 8
    assert len(sim.opened) == 8 and not any(c.connected for c in sim.opened)


def test_client_disconnect_ends_queued_streams_with_an_error(patched):
    """Every flow must end with a response or an error hook (the idle keeper counts requests in flight)."""
    sim = Sim()
    for i in range(8):
        sim.request(path=f"/{i}")
    assert len(sim.opened) == 5  # 3 streams wait in the queue
    sim.client.state = ConnectionState.CLOSED
    sim.feed(events.ConnectionClosed(sim.client))
    assert len(sim.flows) == 8 and all(f.error for f in sim.flows)
    assert len(sim.opened) == 5


def test_post_body_between_gets(patched):
    sim = Sim()
    g1 = sim.request(path="/one")
    sim.answer(sim.opened[0])
    p = sim.request("POST", "/upload", body=b"x" * 5000)
    sim.answer(sim.opened[0], b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
    g2 = sim.request(path="/two")
    sim.answer(sim.opened[0])
    assert len(sim.opened) == 1
    raw = sim.sent(sim.opened[0])
    post = raw[raw.index(b"POST /upload"):raw.index(b"GET /two")]
    assert b"content-length: 5000\r\n" in post.lower() and post.endswith(b"\r\n\r\n" + b"x" * 5000)
    assert [sim.status(s) for s in (g1, p, g2)] == [200, 201, 200]


# --- what still closes ---------------------------------------------------------------------


@pytest.mark.parametrize("response", [
    b"HTTP/1.0 200 OK\r\n\r\nuntil eof",  # HTTP/1.0, no length: read until EOF
    b"HTTP/1.1 200 OK\r\n\r\nuntil eof",  # HTTP/1.1 without length or chunking: the same
])
def test_read_until_eof_response_closes_and_the_next_stream_gets_a_new_connection(patched, response):
    sim = Sim()
    for i in range(3):
        sid = sim.request()
        sim.answer(sim.opened[-1], response, close=True)
        assert sim.status(sid) == 200 and sim.responses[sid]["body"] == b"until eof"
        assert len(sim.opened) == i + 1
    assert not any(c.connected for c in sim.opened)


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",  # HTTP/1.0 without keep-alive
])
def test_connection_close_is_honoured(patched, response):
    sim = Sim()
    s1 = sim.request()
    sim.answer(sim.opened[0], response)
    assert not sim.opened[0].connected
    s2 = sim.request()
    assert len(sim.opened) == 2
    sim.answer(sim.opened[1])
    assert sim.status(s1) == sim.status(s2) == 200


def test_http10_keep_alive_response_is_reused(patched):
    sim = Sim()
    for _ in range(2):
        sim.request()
        sim.answer(sim.opened[0], b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
    assert len(sim.opened) == 1


def test_backend_closing_an_idle_connection_is_not_reused(patched):
    sim = Sim()
    sim.request()
    sim.answer(sim.opened[0])
    sim.opened[0].state &= ~ConnectionState.CAN_READ
    sim.feed(events.ConnectionClosed(sim.opened[0]))  # keep-alive timeout on the backend
    sid = sim.request()
    assert len(sim.opened) == 2
    sim.answer(sim.opened[1])
    assert sim.status(sid) == 200


def test_stale_idle_connection_is_closed_not_reused(patched):
    sim = Sim()
    sim.request()
    sim.answer(sim.opened[0])
    h1 = h2reuse._h1_client_of(sim.layer, sim.opened[0])
    setattr(h1, h2reuse._IDLE_SINCE, time.monotonic() - h2reuse.REUSE_WITHIN_SECONDS - 0.1)
    sid = sim.request()
    assert len(sim.opened) == 2
    assert not sim.opened[0].connected  # closed instead of left open
    sim.answer(sim.opened[1])
    assert sim.status(sid) == 200


def test_backend_error_mid_response_reaches_the_stream(patched):
    sim = Sim()
    sim.request()
    sim.answer(sim.opened[0])
    sid = sim.request()
    assert len(sim.opened) == 1
    sim.answer(sim.opened[0], b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=True)
    assert sim.responses[sid]["reset"] or sim.status(sid) != 200
    assert sim.flows[-1].error is not None


def test_connect_error_propagates(patched):
    sim = Sim()
    sim.refuse = "Connection refused"
    sid = sim.request()
    assert sim.status(sid) == 502
    assert "Connection refused" in sim.flows[-1].error.msg


def test_http1_client_is_untouched(patched):
    sim = Sim(http2=False)
    for path in ("/a", "/b"):
        sim.feed(events.DataReceived(sim.client, f"GET http://app.test{path} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode()))
        sim.answer(sim.opened[0])
    assert len(sim.opened) == 1
    assert request_lines(sim.sent(sim.opened[0])) == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]
    assert sim.wire[sim.client].count(b"HTTP/1.1 200 OK") == 2


def test_flow_request_is_not_modified(patched):
    sim = Sim()
    sim.request()
    sim.answer(sim.opened[0], b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    flow = sim.flows[-1]
    assert flow.request.http_version == "HTTP/2.0" and flow.request.is_http2


# --- install -----------------------------------------------------------------------------------


def test_install_is_idempotent(unpatched):
    gc, md = http_layers.HttpLayer.get_connection, _http1.Http1Client.mark_done
    assert "mark_done" not in _http1.Http1Client.__dict__
    assert h2reuse.install() and h2reuse.install()
    assert h2reuse.installed()
    assert http_layers.HttpLayer.get_connection.__wrapped__ is gc  # wrapped once, not twice
    assert _http1.Http1Client.mark_done.__wrapped__ is md
    h2reuse.uninstall()
    assert http_layers.HttpLayer.get_connection is gc and "mark_done" not in _http1.Http1Client.__dict__


def test_shape_check_accepts_this_mitmproxy(unpatched):
    # (on an unpatched mitmproxy: the check refuses one it has patched already, on purpose)
    assert h2reuse.shape_problem() is None


def _fake_get_connection(self, event, reuse=True):  # reuse is not keyword-only: another shape
    yield from ()


def _fake_mark_done(self, *, request=False, response=False):
    # a mitmproxy that no longer closes after HTTP/2 requests
    yield from ()


def _fake_handler_init(self, context):  # a proxy server without the per-address connection limit
    self.client = context.client


@pytest.mark.parametrize("target,attr,fake,expect", [
    (http_layers.HttpLayer, "get_connection", _fake_get_connection, "get_connection"),
    (_http1.Http1Client, "mark_done", _fake_mark_done, "mark_done has no"),
    (server.ConnectionHandler, "__init__", _fake_handler_init, "connection limit"),
])
def test_shape_check_refuses_another_shape_and_leaves_mitmproxy_alone(unpatched, monkeypatch, caplog,
                                                                       target, attr, fake, expect):
    monkeypatch.setattr(target, attr, fake)
    assert expect in (h2reuse.shape_problem() or "")
    with caplog.at_level(logging.WARNING, logger="wakeproxy.mitm.h2reuse"):
        assert h2reuse.install() is False
        assert h2reuse.install() is False  # one warning, however often it is asked
    assert [r.levelname for r in caplog.records if r.name == "wakeproxy.mitm.h2reuse"] == ["WARNING"]
    assert "new upstream connection per request" in caplog.text
    assert getattr(target, attr) is fake
    assert not h2reuse.installed()
    assert not getattr(http_layers.HttpLayer.get_connection, h2reuse._MARK, False)
    assert not getattr(_http1.Http1Client.mark_done, h2reuse._MARK, False)
    h2reuse.uninstall()  # forget the answer before monkeypatch restores mitmproxy


def test_bundle_installs_it(unpatched):
    from wakeproxy.bundle import make_addons

    make_addons()
    assert h2reuse.installed()


def test_a_shape_check_that_raises_leaves_mitmproxy_alone(unpatched, monkeypatch, caplog):
    def boom():
        raise RuntimeError("surprise")
    monkeypatch.setattr(h2reuse, "shape_problem", boom)
    with caplog.at_level(logging.WARNING, logger="wakeproxy.mitm.h2reuse"):
        assert h2reuse.install() is False
    assert "surprise" in caplog.text and not h2reuse.installed()
    h2reuse.uninstall()
