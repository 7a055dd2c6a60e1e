"""wakeproxy.earlyanswer: an answer set in `requestheaders` for a request with a large body is
sent at once, and the body is dropped — not one traceback per chunk (mitmproxy's
NotImplementedError "Can't set a response and enable streaming at the same time")."""

from __future__ import annotations

from collections import deque

import h2.config
import h2.connection
import h2.events
import pytest
from mitmproxy import connection, http, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from wakeproxy.mitm import earlyanswer


@pytest.fixture
def patched():
    was = earlyanswer.installed()
    assert earlyanswer.install()
    yield
    if not was:
        earlyanswer.uninstall()


@pytest.fixture
def unpatched():
    was = earlyanswer.installed()
    earlyanswer.uninstall()
    yield
    if was:
        assert earlyanswer.install()


class Sim:
    def __init__(self, http2: bool = False) -> None:
        opts = options.Options()
        Proxyserver().load(opts)
        opts.update(http2_ping_keepalive=0, stream_large_bodies="1m")
        self.client = connection.Client(peername=("192.0.2.7", 5555), sockname=("127.0.0.1", 80),
                                        state=ConnectionState.OPEN)
        self.client.alpn = b"h2" if http2 else b"http/1.1"
        self.layer = http_layers.HttpLayer(Context(self.client, opts), http_layers.HTTPMode.regular)
        self.out = b""
        self.opened = 0
        self.hooks: list[str] = []
        self.h2 = None
        self.h2_got: dict = {}
        self.feed(events.Start())
        if http2:
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            self.h2.initiate_connection()
            self.feed(events.DataReceived(self.client, self.h2.data_to_send()))

    def feed(self, first) -> None:
        queue = deque([first])
        while queue:
            for cmd in self.layer.handle_event(queue.popleft()):
                queue.extend(self._run(cmd))

    def _run(self, cmd) -> list:
        if isinstance(cmd, commands.OpenConnection):
            self.opened += 1
            return [events.OpenConnectionCompleted(cmd, "refused")]
        if isinstance(cmd, commands.SendData) and cmd.connection is self.client:
            if self.h2 is not None:
                for ev in self.h2.receive_data(cmd.data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        self.h2_got["status"] = dict(ev.headers)[":status"]
                    elif isinstance(ev, h2.events.StreamEnded):
                        self.h2_got["ended"] = True
                    elif isinstance(ev, h2.events.DataReceived):
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                data = self.h2.data_to_send()
                return [events.DataReceived(self.client, data)] if data else []
            self.out += cmd.data
        if isinstance(cmd, commands.StartHook):
            self.hooks.append(cmd.name)
            if isinstance(cmd, http_layers.HttpRequestHeadersHook):
                cmd.flow.response = http.Response.make(404, b"not here", {"Content-Type": "text/plain"})
            return [events.HookCompleted(cmd)] if cmd.blocking else []
        return []


BODY = 3_000_000


def test_http1_large_body_gets_the_early_answer_and_the_body_is_dropped(patched, caplog):
    sim = Sim()
    sim.feed(events.DataReceived(sim.client, b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n" % BODY))
    assert sim.out.startswith(b"HTTP/1.1 404 ") and sim.out.endswith(b"not here")
    for _ in range(BODY // 65536 + 1):
        sim.feed(events.DataReceived(sim.client, b"x" * 65536))
    assert sim.opened == 0
    assert sim.hooks.count("response") == 1 and "error" not in sim.hooks
    # The connection is ready for the next request.
    sim.out = b""
    sim.feed(events.DataReceived(sim.client, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"))
    assert sim.out.startswith(b"HTTP/1.1 404 ")


def test_http2_large_body_gets_the_early_answer(patched):
    sim = Sim(http2=True)
    sid = sim.h2.get_next_available_stream_id()
    sim.h2.send_headers(sid, [(":method", "POST"), (":scheme", "https"), (":path", "/"), (":authority", "a.test"),
                              ("content-length", str(BODY))])
    sim.feed(events.DataReceived(sim.client, sim.h2.data_to_send()))
    assert sim.h2_got == {"status": "404", "ended": True}
    assert sim.opened == 0


def test_without_the_patch_mitmproxy_raises(unpatched):
    sim = Sim()
    with pytest.raises(NotImplementedError):
        sim.feed(events.DataReceived(sim.client,
                                     b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n" % BODY))


def test_missing_attribute_falls_back_with_one_warning(unpatched, monkeypatch, caplog):
    monkeypatch.setattr(earlyanswer.FALLBACK, "warned", False)
    monkeypatch.delattr(http_layers.HttpStream, "state_errored")
    with caplog.at_level("WARNING"):
        assert earlyanswer.install() is False
        assert earlyanswer.install() is False
    msgs = [r.getMessage() for r in caplog.records if "early answer" in r.getMessage()]
    assert len(msgs) == 1 and "state_errored" in msgs[0]
