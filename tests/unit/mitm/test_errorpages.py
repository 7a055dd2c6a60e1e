"""wakeproxy.errorpages: when a backend cannot be reached, the client gets our 502/504 page (no
internal address for anonymous clients, no Server header), over HTTP/1 and HTTP/2.

The tests drive mitmproxy's real HttpLayer without sockets: opening the upstream connection
fails with the error a real connect gives; hooks are answered by calling our addon."""

from __future__ import annotations

from collections import deque
from ipaddress import ip_network

import h2.config
import h2.connection
import h2.events
import pytest
from mitmproxy import connection, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1
from wakeproxy.config import Config
from wakeproxy.mitm import errorpages
from wakeproxy.runtime import Runtime

REFUSED = "[Errno 113] Connect call failed ('172.28.0.3', 80)"


@pytest.fixture
def patched():
    was = errorpages.installed()
    assert errorpages.install()
    yield
    errorpages.set_renderer(None)
    if not was:
        errorpages.uninstall()


@pytest.fixture
def unpatched():
    was = errorpages.installed()
    errorpages.uninstall()
    yield
    if was:
        assert errorpages.install()


class Sim:
    def __init__(self, http2: bool, peer: str = "203.0.113.9", error: str = REFUSED,
                 addon: errorpages.UpstreamErrors | None = None) -> None:
        opts = options.Options()
        Proxyserver().load(opts)
        opts.update(http2_ping_keepalive=0)
        self.client = connection.Client(peername=(peer, 5555), sockname=("127.0.0.1", 443),
                                        state=ConnectionState.OPEN)
        self.client.alpn = b"h2" if http2 else b"http/1.1"
        self.layer = http_layers.HttpLayer(Context(self.client, opts), http_layers.HTTPMode.regular)
        self.error = error
        self.addon = addon
        self.to_client = b""
        self.closed = False
        self.h2: h2.connection.H2Connection | None = None
        self.h2_status: dict[int, dict] = {}
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
            cmd.connection.error = self.error
            return [events.OpenConnectionCompleted(cmd, self.error)]
        if isinstance(cmd, commands.SendData) and cmd.connection is self.client:
            if self.h2 is not None:
                for ev in self.h2.receive_data(cmd.data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        self.h2_status[ev.stream_id] = {"headers": dict(ev.headers), "body": b""}
                    elif isinstance(ev, h2.events.DataReceived):
                        self.h2_status[ev.stream_id]["body"] += ev.data
                out = self.h2.data_to_send()
                return [events.DataReceived(self.client, out)] if out else []
            self.to_client += cmd.data
            return []
        if isinstance(cmd, commands.CloseConnection) and cmd.connection is self.client:
            self.closed = True
            return []
        if isinstance(cmd, commands.StartHook):
            if isinstance(cmd, http_layers.HttpErrorHook) and self.addon is not None:
                cmd.flow.metadata["wakeproxy.container"] = "web-1"
                self.addon.error(cmd.flow)
            if isinstance(cmd, http_layers.HttpRequestHeadersHook):
                cmd.flow.request.host, cmd.flow.request.port = "172.28.0.3", 80
            return [events.HookCompleted(cmd)] if cmd.blocking else []
        return []

    def h1_request(self, accept: str = "*/*") -> None:
        self.feed(events.DataReceived(
            self.client, f"GET / HTTP/1.1\r\nHost: a.test\r\nAccept: {accept}\r\n\r\n".encode()))

    def h2_request(self, accept: str = "*/*") -> int:
        assert self.h2 is not None
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                                   (":authority", "a.test"), ("accept", accept)], end_stream=True)
        self.feed(events.DataReceived(self.client, self.h2.data_to_send()))
        return sid


def addon(debug: bool = False) -> errorpages.UpstreamErrors:
    cfg = Config(debug_clients=(ip_network("203.0.113.0/24"),) if debug else ())
    a = errorpages.UpstreamErrors(Runtime(config=cfg))
    errorpages.set_renderer(a.render)
    return a


def test_h1_connect_failure_is_our_502_without_the_address(patched):
    sim = Sim(http2=False, addon=addon())
    sim.h1_request()
    raw = sim.to_client
    assert raw.startswith(b"HTTP/1.1 502 ")
    assert b"172.28.0.3" not in raw and b"Errno" not in raw
    assert b"server:" not in raw.lower() and b"mitmproxy" not in raw.lower()
    assert b"wakeproxy: 502 Bad gateway" in raw
    assert sim.closed


def test_h1_debug_client_sees_the_detail(patched):
    sim = Sim(http2=False, addon=addon(debug=True))
    sim.h1_request(accept="text/html")
    assert sim.to_client.startswith(b"HTTP/1.1 502 ")
    assert b"text/html" in sim.to_client and b"172.28.0.3" in sim.to_client


def test_h1_timeout_is_504(patched):
    sim = Sim(http2=False, addon=addon(), error="[Errno 110] Connect call failed ('172.28.0.3', 80)")
    sim.h1_request()
    assert sim.to_client.startswith(b"HTTP/1.1 504 ")


def test_h2_connect_failure_is_our_page_in_html_for_browsers(patched):
    sim = Sim(http2=True, addon=addon())
    sid = sim.h2_request(accept="text/html,*/*")
    got = sim.h2_status[sid]
    assert got["headers"][":status"] == "502"
    assert "server" not in got["headers"]
    assert got["headers"]["content-type"].startswith("text/html")
    assert b"172.28.0.3" not in got["body"] and b"Bad gateway" in got["body"]


def test_h2_plain_for_api_clients(patched):
    sim = Sim(http2=True, addon=addon())
    sid = sim.h2_request()
    assert sim.h2_status[sid]["headers"]["content-type"].startswith("text/plain")


def test_h2_bad_authority_is_a_400_on_its_stream_not_a_goaway(patched):
    sim = Sim(http2=True, addon=addon())
    assert sim.h2 is not None
    sid = sim.h2.get_next_available_stream_id()
    sim.h2.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                              (":authority", "a.test:abc@evil")], end_stream=True)
    sim.feed(events.DataReceived(sim.client, sim.h2.data_to_send()))
    assert sim.h2_status[sid]["headers"][":status"] == "400"
    assert b"evil" not in sim.h2_status[sid]["body"]
    # The connection is still usable.
    ok = sim.h2_request()
    assert sim.h2_status[ok]["headers"][":status"] == "502"


def test_unparseable_request_line_is_not_echoed(patched):
    sim = Sim(http2=False)
    sim.feed(events.DataReceived(sim.client, b"GET /" + b"<script>" * 100 + b" HTTP/1.1 extra\r\n\r\n"))
    assert sim.to_client.startswith(b"HTTP/1.1 400 ")
    assert b"<script>" not in sim.to_client and b"mitmproxy" not in sim.to_client.lower()


def test_without_the_patch_mitmproxy_shows_the_address(unpatched):
    sim = Sim(http2=False)
    sim.h1_request()
    assert b"172.28.0.3" in sim.to_client and b"Server: mitmproxy" in sim.to_client


def test_missing_attribute_falls_back_with_one_warning(unpatched, monkeypatch, caplog):
    monkeypatch.setattr(errorpages.FALLBACK, "warned", False)
    monkeypatch.delattr(_http1, "make_error_response")
    with caplog.at_level("WARNING"):
        assert errorpages.install() is False
        assert errorpages.install() is False
    assert not errorpages.installed()
    msgs = [r.getMessage() for r in caplog.records if "error pages" in r.getMessage()]
    assert len(msgs) == 1 and "make_error_response" in msgs[0]


def test_upstream_failures_are_logged_throttled(caplog):
    a = errorpages.UpstreamErrors(Runtime())
    from mitmproxy import flow as mflow
    from mitmproxy.test import tflow
    with caplog.at_level("WARNING"):
        for _ in range(50):
            f = tflow.tflow()
            f.metadata["wakeproxy.container"] = "web-1"
            f.error = mflow.Error(REFUSED)
            a.error(f)
    lines = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 1 and "web-1" in lines[0].getMessage()
