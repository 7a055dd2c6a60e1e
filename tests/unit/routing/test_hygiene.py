"""wakeproxy.hygiene: malformed requests get our 400/431 page and are never forwarded; what is
forwarded loses hop-by-hop headers, headers named in Connection and look-alikes of ours."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow
from mitmproxy.test.tutils import treq
from wakeproxy.config import parse_config
from wakeproxy.routing.hygiene import Hygiene, check, clean
from wakeproxy.runtime import Runtime


def h1(headers: list[tuple[bytes, bytes]], path: bytes = b"/", method: bytes = b"GET",
       authority: bytes = b"", version: bytes = b"HTTP/1.1") -> http.HTTPFlow:
    f = tflow.tflow()
    f.request = treq(method=method, path=path, authority=authority, http_version=version,
                     headers=http.Headers(headers), scheme=b"http" if authority else b"http")
    return f


def h2(headers: list[tuple[bytes, bytes]], authority: bytes = b"a.test", path: bytes = b"/") -> http.HTTPFlow:
    f = tflow.tflow()
    f.request = treq(path=path, authority=authority, http_version=b"HTTP/2.0", headers=http.Headers(headers),
                     scheme=b"https")
    return f


def run(flow: http.HTTPFlow, config: str = "") -> http.HTTPFlow:
    runtime = Runtime(config=parse_config(config))
    addon = Hygiene(runtime)
    with taddons.context(addon):
        addon.max_header_bytes = runtime.config.limits.max_header_bytes
        addon.requestheaders(flow)
    return flow


def status(flow: http.HTTPFlow) -> int | None:
    return flow.response.status_code if flow.response else None


HOST = (b"Host", b"a.test")


@pytest.mark.parametrize("headers", [
    [HOST, (b"X-A", b"one\rtwo")],  # bare CR
    [HOST, (b"X-A", b"one\ntwo")],
    [HOST, (b"X-A", b"one\x00two")],
    [HOST, (b"X-A", b"folded\r\n continued")],  # obs-fold, as mitmproxy's HTTP/1 reader joins it
    [HOST, (b"X\rA", b"v")],
    [HOST, (b"X A", b"v")],  # not a token
    [HOST, (b"X:A", b"v")],
    [HOST, (b"", b"v")],
    [HOST, (b"X-\xe9", b"v")],
    [(b"Host", b"a.test:abc@evil")],
    [(b"Host", b"a.test/evil")],
    [(b"Host", b"a test")],
    [(b"Host", b"a" * 254)],
    [(b"Host", b"a.test:99999")],
    [(b"Host", b"a.test"), (b"Host", b"b.test")],
    [(b"X-Other", b"v")],  # HTTP/1.1 without Host
])
def test_bad_http1_requests_get_400(headers):
    f = run(h1(headers))
    assert status(f) == 400
    assert f.response.headers["Connection"] == "close"
    assert b"mitmproxy" not in f.response.content


def test_http10_without_host_passes():
    assert status(run(h1([(b"X-A", b"b")], version=b"HTTP/1.0"))) is None
    assert status(run(h1([], version=b"HTTP/1.0"))) is None


def test_connection_keep_alive_alone_leaves_the_fields_alone():
    f = h1([HOST, (b"Connection", b"Keep-Alive")])
    before = f.request.headers.fields
    clean(f.request)
    assert f.request.headers.fields is before


@pytest.mark.parametrize("method,path", [
    (b"GET", b"/a\r\nb"), (b"GET", b"/a\x00"), (b"GET", b"/a b"), (b"G\rET", b"/"), (b"G ET", b"/"), (b"", b"/"),
])
def test_bad_method_or_path(method, path):
    assert status(run(h1([HOST], path=path, method=method))) == 400


def test_absolute_form_must_match_host():
    assert status(run(h1([(b"Host", b"a.test")], authority=b"evil.test"))) == 400
    assert status(run(h1([(b"Host", b"a.test")], authority=b"a.test:abc@evil"))) == 400
    assert status(run(h1([], authority=b"a.test"))) == 400
    assert status(run(h1([(b"Host", b"A.test:80")], authority=b"a.test"))) is None


@pytest.mark.parametrize("authority,headers", [
    (b"a.test\r\nx: y", []),
    (b"a.test\x00", []),
    (b"a.test:abc@evil", []),
    (b"", []),
    (b"a.test", [(b"host", b"b.test")]),
    (b"a.test", [(b"x-a", b"1\n2")]),
])
def test_bad_http2_requests_get_400_without_connection_header(authority, headers):
    f = run(h2(headers, authority=authority))
    assert status(f) == 400
    assert "Connection" not in f.response.headers


def test_http2_with_host_only_passes():
    assert status(run(h2([(b"host", b"a.test")], authority=b""))) is None


def test_too_many_header_bytes_431():
    f = run(h1([HOST] + [(b"X-%d" % i, b"v" * 1000) for i in range(40)]))
    assert status(f) == 431
    f = run(h1([HOST] + [(b"X-%d" % i, b"v" * 1000) for i in range(3)]), "limits: {max_header_bytes: 2048}")
    assert status(f) == 431
    assert status(run(h1([HOST] + [(b"X-%d" % i, b"v" * 1000) for i in range(20)]))) is None


def test_error_page_echo_is_bounded():
    f = run(h1([HOST, (b"X" * 5000 + b" ", b"v")]))
    assert status(f) == 400 and len(f.response.content) < 1000


def test_an_earlier_answer_is_kept():
    f = h1([HOST, (b"X-A", b"a\rb")])
    f.response = http.Response.make(200, b"acme")
    run(f)
    assert f.response.content == b"acme"


# --- clean ------------------------------------------------------------------------------


def names(flow: http.HTTPFlow) -> list[str]:
    return [n.decode() for n, _ in flow.request.headers.fields]


def test_hop_by_hop_and_proxy_headers_are_removed():
    f = run(h1([HOST, (b"Proxy", b"http://evil:1"), (b"Keep-Alive", b"timeout=5"), (b"Proxy-Connection", b"x"),
                (b"Proxy-Authorization", b"Basic x"), (b"Proxy-Authenticate", b"x"), (b"TE", b"gzip"),
                (b"Trailer", b"X-T"), (b"Upgrade", b"h2c"), (b"Connection", b"keep-alive, Upgrade, X-Secret"),
                (b"X-Secret", b"s"), (b"Content-Length", b"0"), (b"Accept", b"*/*")]))
    assert status(f) is None
    assert names(f) == ["Host", "Content-Length", "Accept", "Connection"]
    assert f.request.headers["Connection"] == "keep-alive"


def test_connection_close_is_kept_and_framing_headers_survive_being_named():
    f = run(h1([HOST, (b"Connection", b"close, transfer-encoding, content-length, host"),
                (b"Transfer-Encoding", b"chunked")], method=b"POST"))
    assert names(f) == ["Host", "Transfer-Encoding", "Connection"]
    assert f.request.headers["Connection"] == "close"


def test_websocket_handshake_keeps_upgrade():
    f = run(h1([HOST, (b"Connection", b"Upgrade, X-Drop"), (b"Upgrade", b"websocket"), (b"X-Drop", b"1"),
                (b"Sec-WebSocket-Key", b"k"), (b"Sec-WebSocket-Version", b"13")]))
    assert names(f) == ["Host", "Upgrade", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Connection"]
    assert f.request.headers["Connection"] == "upgrade"


@pytest.mark.parametrize("name", [b"X_Forwarded_For", b"X-Real_IP", b"x_real_ip", b"X-Forwarded_Proto",
                                  b"x_forwarded_ssl", b"proxy", b"PROXY"])
def test_lookalikes_of_our_headers_are_removed(name):
    f = run(h1([HOST, (name, b"1.2.3.4"), (b"X_Custom_App", b"kept")]))
    assert names(f) == ["Host", "X_Custom_App"]


def test_te_trailers_is_kept():
    f = run(h2([(b"te", b"trailers")]))
    assert names(f) == ["te"]


def test_nothing_to_clean_leaves_the_fields_alone():
    f = h1([HOST, (b"Accept", b"*/*")])
    before = f.request.headers.fields
    clean(f.request)
    assert f.request.headers.fields is before


def test_check_is_cheap_for_a_normal_request():
    import time
    req = h1([HOST] + [(b"X-H%d" % i, b"value-%d" % i) for i in range(20)]).request
    t0 = time.perf_counter()
    for _ in range(2000):
        check(req, 32768)
    assert (time.perf_counter() - t0) / 2000 < 100e-6
