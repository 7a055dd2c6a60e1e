"""HTTPS (ALPN h2, our own default certificate), large bodies, SSE and WebSockets
through the real proxy, against one shared backend container."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import time
from types import SimpleNamespace

import httpx
import pytest
import websockets
from cryptography import x509
from cryptography.x509.oid import NameOID
from harness import backend_of, pattern_sha256, proxied, wait_for

SIZE = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def site(module_containers, module_proxy, host):
    h = host("stream")
    c = module_containers("stream", labels={"wakeproxy.host": h})
    p = module_proxy()
    wait_for(lambda: backend_of(proxied(p, h)) == "stream", 10, 0.1, "stream site via proxy")
    return SimpleNamespace(proxy=p, host=h, container=c)


class H2FirstContext(ssl.SSLContext):
    """SSL context that always offers ALPN ["h2", "http/1.1"] (h2 first).

    httpcore offers ["http/1.1", "h2"] (http/1.1 first) when http2=True; a server
    that follows the client's order then picks HTTP/1.1. The streaming tests
    want the h2 path exercised whatever the server's ALPN preference, which
    test_https_negotiates_http2 checks on its own.
    """

    def set_alpn_protocols(self, protocols):  # noqa: D401 - override
        super().set_alpn_protocols(["h2", "http/1.1"])


def h2_first_context() -> ssl.SSLContext:
    ctx = H2FirstContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client(https: bool) -> httpx.Client:
    """HTTP/1.1 for http; HTTP/2 for https (h2 offered first)."""
    if https:
        return httpx.Client(verify=h2_first_context(), http2=True, timeout=60, trust_env=False)
    return httpx.Client(timeout=60, trust_env=False)


def check_version(r: httpx.Response, https: bool) -> None:
    assert r.http_version == ("HTTP/2" if https else "HTTP/1.1")


def target(site, https: bool, path: str) -> tuple[str, dict, dict | None]:
    base = site.proxy.https_url if https else site.proxy.http_url
    ext = {"sni_hostname": site.host} if https else None
    return base + path, {"Host": site.host}, ext


# --- TLS -------------------------------------------------------------------------


def peer_cert(port: int, sni: str | None) -> tuple[x509.Certificate, str | None]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            der = tls.getpeercert(binary_form=True)
            return x509.load_der_x509_certificate(der), tls.selected_alpn_protocol()


def test_https_negotiates_http2(site):
    """httpx with http2=True (offers ALPN http/1.1 then h2) gets HTTP/2."""
    r = proxied(site.proxy, site.host, https=True, http2=True)
    assert r.status_code == 200, r.text
    assert r.http_version == "HTTP/2", (
        "server picked http/1.1 from the client's ALPN list ['http/1.1', 'h2']; "
        "it should prefer h2 (server preference, as nginx/Go do)")
    assert r.json()["backend"] == "stream"
    assert r.json()["headers"]["x-forwarded-proto"] == "https"


def test_client_preferring_h2_gets_http2(site):
    with client(True) as c:
        r = c.get(site.proxy.https_url + "/", headers={"Host": site.host},
                  extensions={"sni_hostname": site.host})
    assert r.status_code == 200 and r.http_version == "HTTP/2"
    assert r.json()["backend"] == "stream"


def test_default_certificate_is_ours_and_same_for_any_sni(site, run_id):
    certs = []
    for sni in (site.host, f"other.{run_id}.test", "localhost", None):
        cert, alpn = peer_cert(site.proxy.https_port, sni)
        assert alpn == "h2", (sni, alpn)
        issuer_cns = [a.value for a in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)]
        issuer_orgs = [a.value for a in cert.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        assert not any("mitmproxy" in v.lower() for v in issuer_cns + issuer_orgs), cert.issuer
        certs.append(cert)
    assert len({c.fingerprint(c.signature_hash_algorithm) for c in certs}) == 1, \
        [c.subject.rfc4514_string() for c in certs]


# --- big bodies --------------------------------------------------------------------


@pytest.mark.parametrize("https", [False, True], ids=["http1", "https-h2"])
def test_download_20mb(site, https):
    url, headers, ext = target(site, https, f"/download?size={SIZE}")
    h = hashlib.sha256()
    n = 0
    with client(https) as c, c.stream("GET", url, headers=headers, extensions=ext) as r:
        assert r.status_code == 200
        check_version(r, https)
        for chunk in r.iter_bytes():
            h.update(chunk)
            n += len(chunk)
    assert n == SIZE
    assert h.hexdigest() == pattern_sha256(SIZE)


@pytest.mark.parametrize("https", [False, True], ids=["http1", "https-h2"])
def test_upload_20mb(site, https):
    url, headers, ext = target(site, https, "/upload")
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    expected = hashlib.sha256()
    count = SIZE // len(block)
    for _ in range(count):
        expected.update(block)

    def body():  # streamed: chunked on HTTP/1.1, DATA frames on h2
        for _ in range(count):
            yield block

    with client(https) as c:
        r = c.post(url, headers=headers, extensions=ext, content=body())
    assert r.status_code == 200, r.text
    check_version(r, https)
    assert r.json()["size"] == SIZE
    assert r.json()["sha256"] == expected.hexdigest()


# --- server-sent events ------------------------------------------------------------


@pytest.mark.parametrize("https", [False, True], ids=["http1", "https-h2"])
def test_sse_events_arrive_as_produced(site, https):
    url, headers, ext = target(site, https, "/sse")
    events = []  # (received at, payload)
    with client(https) as c, c.stream("GET", url, headers={**headers, "Accept": "text/event-stream"},
                                      extensions=ext) as r:
        assert r.status_code == 200
        check_version(r, https)
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append((time.time(), json.loads(line[5:])))
    assert [e["n"] for _, e in events] == [1, 2, 3, 4, 5]
    first_received = events[0][0]
    third_generated = events[2][1]["t"]  # backend clock == host clock (same kernel)
    assert first_received < third_generated, (
        f"first event arrived {first_received - third_generated:+.3f}s after the third was generated: "
        "the proxy buffers the stream")


# --- WebSockets ---------------------------------------------------------------------


async def ws_echo(uri: str, port: int, **kw) -> None:
    async with websockets.connect(uri, host="127.0.0.1", port=port, proxy=None,
                                  open_timeout=10, close_timeout=5, **kw) as ws:
        await ws.send("hello ws")
        assert await asyncio.wait_for(ws.recv(), 10) == "hello ws"
        data = bytes(range(256)) * 400  # 100 KiB binary, > 64 KiB frame length
        await ws.send(data)
        assert await asyncio.wait_for(ws.recv(), 10) == data
        for i in range(20):
            await ws.send(f"msg {i}")
            assert await asyncio.wait_for(ws.recv(), 10) == f"msg {i}"
        pong = await ws.ping(b"p")
        await asyncio.wait_for(pong, 10)


def test_websocket_echo_ws(site):
    asyncio.run(ws_echo(f"ws://{site.host}:{site.proxy.http_port}/ws", site.proxy.http_port))


def test_websocket_echo_wss(site):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    asyncio.run(ws_echo(f"wss://{site.host}:{site.proxy.https_port}/ws", site.proxy.https_port, ssl=ctx))
