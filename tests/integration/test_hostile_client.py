"""A hostile internet against the real proxy: malformed and oversized requests, slow and idle
connections, a connection flood above the file limit, a backend that cannot be reached.

The backend records every byte it reads (backend.py with RAW_CAPTURE=1), so each malformed
request is shown to reach it with NOTHING: after the bad request a good one with a unique
marker is sent, and the backend's bytes since before the bad request must be exactly the
good one. Only 127.0.0.1 and this run's containers on the test network are contacted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import resource
import secrets
import socket
import ssl
import time
from types import SimpleNamespace

import h2.config
import h2.connection
import h2.events
import pytest
import websockets
from harness import backend_of, proxied, wait_for

HEADER_TIMEOUT = 2.0
IDLE_TIMEOUT = 3.0
LIMITS = {"header_timeout": f"{HEADER_TIMEOUT}s", "idle_timeout": f"{IDLE_TIMEOUT}s"}


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(module_containers, module_proxy, host):
    h = host("raw")
    c = module_containers("raw", labels={"wakeproxy.host": h}, env={"RAW_CAPTURE": "1"})
    # Anonymous clients: debug_clients is empty, so even 127.0.0.1 sees no internal detail.
    p = module_proxy({"debug_clients": [], "limits": LIMITS})
    wait_for(lambda: backend_of(proxied(p, h)) == "raw", 10, 0.1, "raw site via proxy")
    return SimpleNamespace(proxy=p, host=h, container=c)


def received(container) -> bytes:
    """Every byte the backend has read so far, in order."""
    out = []
    for line in container.logs().decode("latin-1").splitlines():
        if line.startswith("RAW "):
            out.append(base64.b64decode(line[4:]))
    return b"".join(out)


def connections(container) -> int:
    return sum(1 for line in container.logs().decode("latin-1").splitlines() if line == "CONN")


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a new connection; read until the proxy closes it or `timeout`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and _complete(out):
                break
        return out


def _complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw[9:12])


def assert_nothing_reached_backend(site, send_bad) -> bytes:
    """Run `send_bad()`; then prove with a marked good request that the backend read none of it."""
    before = len(received(site.container))
    answer = send_bad()
    marker = f"/sentinel-{secrets.token_hex(4)}"
    good = exchange(site.proxy.http_port, f"GET {marker} HTTP/1.1\r\nHost: {site.host}\r\n"
                                          f"Connection: close\r\n\r\n".encode())
    assert status_of(good) == 200
    wait_for(lambda: marker.encode() in received(site.container), 5, 0.05, "the sentinel at the backend")
    new = received(site.container)[before:]
    assert new.startswith(f"GET {marker} HTTP/1.1\r\n".encode()), f"backend read more than the sentinel: {new[:300]!r}"
    assert new.count(b" HTTP/1.1\r\n") == 1, new[:500]
    return answer


def assert_our_page(raw: bytes, status: int) -> None:
    assert status_of(raw) == status, raw[:300]
    head = raw.partition(b"\r\n\r\n")[0].lower()
    assert b"x-wakeproxy: error" in head
    assert b"server:" not in head and b"mitmproxy" not in raw.lower()


# --- malformed HTTP/1.1 ------------------------------------------------------------------------

BAD_REQUESTS = {
    "cr in value": b"GET /a HTTP/1.1\r\nHost: {h}\r\nX-A: one\rtwo\r\n\r\n",
    "lf in value": b"GET /a HTTP/1.1\r\nHost: {h}\r\nX-A: one\ntwo\r\n\r\n",
    "nul in value": b"GET /a HTTP/1.1\r\nHost: {h}\r\nX-A: one\x00two\r\n\r\n",
    "obs-fold": b"GET /a HTTP/1.1\r\nHost: {h}\r\nX-A: one\r\n two\r\n\r\n",
    "bare cr in name": b"GET /a HTTP/1.1\r\nHost: {h}\r\nX\rA: one\r\n\r\n",
    "name not a token": b"GET /a HTTP/1.1\r\nHost: {h}\r\nX(A): one\r\n\r\n",
    "host with userinfo": b"GET /a HTTP/1.1\r\nHost: a.test:abc@evil\r\n\r\n",
    "host with path": b"GET /a HTTP/1.1\r\nHost: {h}/x\r\n\r\n",
    "two hosts": b"GET /a HTTP/1.1\r\nHost: {h}\r\nHost: other.test\r\n\r\n",
    "no host": b"GET /a HTTP/1.1\r\nX-A: b\r\n\r\n",
    "absolute-form mismatch": b"GET http://evil.test/a HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "bad request line": b"GET /a b c HTTP/1.1\r\nHost: {h}\r\n\r\n",
    "smuggling cl+te": b"POST /a HTTP/1.1\r\nHost: {h}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_malformed_http1_gets_400_and_reaches_nothing(site, name):
    raw = BAD_REQUESTS[name].replace(b"{h}", site.host.encode())
    answer = assert_nothing_reached_backend(site, lambda: exchange(site.proxy.http_port, raw))
    assert_our_page(answer, 400)
    assert b"evil" not in answer and b"\x00" not in answer.partition(b"\r\n\r\n")[2]


def test_absolute_form_with_matching_host_is_forwarded(site):
    raw = f"GET http://{site.host}/abs HTTP/1.1\r\nHost: {site.host}\r\nConnection: close\r\n\r\n".encode()
    assert status_of(exchange(site.proxy.http_port, raw)) == 200


def test_oversized_headers_get_431_and_memory_does_not_grow(site):
    def rss_mb() -> float:
        total = 0.0
        for pid in site.proxy.serving_pids():
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
        return total

    def flood() -> bytes:
        before = rss_mb()
        with socket.create_connection(("127.0.0.1", site.proxy.http_port), timeout=10) as s:
            s.sendall(f"GET /big HTTP/1.1\r\nHost: {site.host}\r\n".encode())
            line = b"X-Junk: " + b"a" * 65000 + b"\r\n"
            sent = 0
            try:
                while sent < 25_000_000:  # 25 MB of unfinished headers
                    s.sendall(line)
                    sent += len(line)
            except OSError:
                pass  # the proxy answered and closed
            out = b""
            try:
                while chunk := s.recv(65536):
                    out += chunk
            except OSError:
                pass
        grown = rss_mb() - before
        assert grown < 10, f"RSS grew {grown:.1f} MB for 25 MB of headers (sent {sent} bytes)"
        return out

    answer = assert_nothing_reached_backend(site, flood)
    assert status_of(answer) == 431 and b"431" in answer


def test_complete_but_too_large_head_gets_431(site):
    headers = "".join(f"X-H{i}: {'v' * 1000}\r\n" for i in range(40))
    raw = f"GET /a HTTP/1.1\r\nHost: {site.host}\r\n{headers}\r\n".encode()
    assert_our_page(assert_nothing_reached_backend(site, lambda: exchange(site.proxy.http_port, raw)), 431)


# --- what is forwarded -----------------------------------------------------------------------


def test_hop_by_hop_underscore_and_proxy_headers_are_stripped(site):
    raw = (f"GET /clean HTTP/1.1\r\nHost: {site.host}\r\n"
           "Proxy: http://evil.test:1\r\nX_Forwarded_For: 6.6.6.6\r\nX-Real_IP: 6.6.6.6\r\n"
           "X_Forwarded_Proto: https\r\nConnection: X-Secret, close\r\nX-Secret: s\r\nKeep-Alive: timeout=1\r\n"
           "TE: gzip\r\nProxy-Authorization: Basic eDp5\r\nX_Custom_App: kept\r\n\r\n").encode()
    answer = exchange(site.proxy.http_port, raw)
    assert status_of(answer) == 200
    seen = json.loads(answer.partition(b"\r\n\r\n")[2])["headers"]
    for gone in ("proxy", "x_forwarded_for", "x-real_ip", "x_forwarded_proto", "x-secret", "keep-alive", "te",
                 "proxy-authorization"):
        assert gone not in seen, (gone, seen)
    assert seen["x_custom_app"] == "kept"
    assert seen["connection"] == "close"
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-real-ip"] == "127.0.0.1"


def test_websocket_handshake_passes_and_outlives_the_idle_timeout(site):
    async def run() -> str:
        async with websockets.connect(f"ws://{site.host}/ws", host="127.0.0.1", port=site.proxy.http_port,
                                      proxy=None, open_timeout=10, close_timeout=5) as ws:
            await asyncio.sleep(IDLE_TIMEOUT + 1)  # in flight: not idle
            await ws.send("still here")
            return await asyncio.wait_for(ws.recv(), 5)

    assert asyncio.run(run()) == "still here"


def test_request_slower_than_every_deadline_is_answered(site):
    raw = f"GET /sleep?s={IDLE_TIMEOUT + 1.5} HTTP/1.1\r\nHost: {site.host}\r\nConnection: close\r\n\r\n".encode()
    t0 = time.monotonic()
    answer = exchange(site.proxy.http_port, raw, timeout=15)
    assert status_of(answer) == 200 and b'"slept": true' in answer
    assert time.monotonic() - t0 >= IDLE_TIMEOUT + 1.5


# --- HTTP/2 ----------------------------------------------------------------------------------


def h2_request(site, headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bytes, bool]:
    """One HTTP/2 request over TLS with `headers` sent as they are (no validation or normalisation).
    Returns (status or None, body, reset)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", site.proxy.https_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=site.host) as tls:
            assert tls.selected_alpn_protocol() == "h2"
            conn = h2.connection.H2Connection(h2.config.H2Configuration(
                client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, headers, end_stream=True)
            tls.sendall(conn.data_to_send())
            status, body, reset = None, b"", False
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                data = tls.recv(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        status = int(dict(ev.headers)[b":status"])
                    elif isinstance(ev, h2.events.DataReceived):
                        body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        reset = True
                    if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        return status, body, reset
                tls.sendall(conn.data_to_send())
            return status, body, reset


def _h2_base(site, path: bytes = b"/h2") -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"https"), (b":path", path), (b":authority", site.host.encode())]


H2_BAD = {
    "cr in value": lambda s: _h2_base(s) + [(b"x-a", b"one\rtwo")],
    "lf in value": lambda s: _h2_base(s) + [(b"x-a", b"one\r\nx-injected: 1")],
    "nul in value": lambda s: _h2_base(s) + [(b"x-a", b"one\x00two")],
    "crlf in :path": lambda s: _h2_base(s, b"/h2\r\nx-injected: 1"),
    "crlf in :authority": lambda s: [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                                     (b":authority", s.host.encode() + b"\r\nx-injected: 1")],
    "authority with userinfo": lambda s: [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                                          (b":authority", b"a.test:abc@evil")],
    "space in header name": lambda s: _h2_base(s) + [(b"x a", b"1")],
}


def test_valid_http2_request_is_forwarded(site):
    status, body, _ = h2_request(site, _h2_base(site))
    assert status == 200 and json.loads(body)["backend"] == "raw"


@pytest.mark.parametrize("name", list(H2_BAD))
def test_invalid_http2_headers_get_400_and_reach_nothing(site, name):
    status, body, reset = assert_nothing_reached_backend(site, lambda: h2_request(site, H2_BAD[name](site)))
    assert status == 400 and not reset, (status, body, reset)
    assert b"mitmproxy" not in body and b"evil" not in body and b"injected" not in body


# --- deadlines -------------------------------------------------------------------------------


def _closed_after(s: socket.socket, limit: float) -> float:
    """Seconds until the proxy closes `s` (reading and discarding), at most `limit`."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < limit:
        try:
            if not s.recv(65536):
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0
    return float("inf")


def test_slowloris_is_closed_at_the_header_timeout(site):
    """Headers sent one byte a second: closed at header_timeout, not kept open by the trickle."""
    head = f"GET /slow HTTP/1.1\r\nHost: {site.host}\r\nX-Slow: ".encode() + b"a" * 100
    before = len(received(site.container))
    with socket.create_connection(("127.0.0.1", site.proxy.http_port)) as s:
        t0 = time.monotonic()
        closed_at = float("inf")
        for byte in head[: int(HEADER_TIMEOUT) + 4]:  # a few bytes past the deadline at most
            try:
                s.send(bytes([byte]))
            except OSError:
                closed_at = time.monotonic() - t0
                break
            if _closed_after(s, 1.0) != float("inf"):  # one byte a second, watching for the close
                closed_at = time.monotonic() - t0
                break
    assert HEADER_TIMEOUT - 0.3 <= closed_at <= HEADER_TIMEOUT + 1.2, closed_at
    assert len(received(site.container)) == before


def test_connection_that_sends_nothing_is_closed_at_the_header_timeout(site):
    with socket.create_connection(("127.0.0.1", site.proxy.http_port)) as s:
        assert HEADER_TIMEOUT - 0.3 <= _closed_after(s, 10) <= HEADER_TIMEOUT + 1


def test_stalled_tls_handshake_is_closed_at_the_header_timeout(site):
    with socket.create_connection(("127.0.0.1", site.proxy.https_port)) as s:
        s.send(b"\x16\x03\x01\x00")  # the start of a ClientHello, then nothing
        assert HEADER_TIMEOUT - 0.3 <= _closed_after(s, 10) <= HEADER_TIMEOUT + 1


def test_idle_keep_alive_is_closed_at_the_idle_timeout(site):
    with socket.create_connection(("127.0.0.1", site.proxy.http_port)) as s:
        s.sendall(f"GET /ka HTTP/1.1\r\nHost: {site.host}\r\n\r\n".encode())
        s.settimeout(5)
        answer = b""
        while not _complete(answer):
            answer += s.recv(65536)
        assert status_of(answer) == 200
        # Longer than header_timeout: a keep-alive connection gets idle_timeout.
        assert IDLE_TIMEOUT - 0.3 <= _closed_after(s, 10) <= IDLE_TIMEOUT + 1


def test_slow_keep_alive_head_is_closed_at_the_header_timeout(site):
    with socket.create_connection(("127.0.0.1", site.proxy.http_port)) as s:
        s.sendall(f"GET /ka HTTP/1.1\r\nHost: {site.host}\r\n\r\n".encode())
        s.settimeout(5)
        answer = b""
        while not _complete(answer):
            answer += s.recv(65536)
        s.sendall(b"GET /half")  # and never the rest
        assert HEADER_TIMEOUT - 0.3 <= _closed_after(s, 10) <= HEADER_TIMEOUT + 1


# --- upstream failures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_port_site(module_containers, site, host):
    """A running container whose declared port has no listener: every connect is refused."""
    h = host("deadport")
    c = module_containers("deadport", labels={"wakeproxy.host": h, "wakeproxy.port": "81"})
    wait_for(lambda: proxied(site.proxy, h).status_code == 502, 10, 0.1, "the dead-port site")
    c.reload()
    ip = next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    return SimpleNamespace(host=h, ip=ip, container=c)


@pytest.mark.parametrize("http2", [False, True])
def test_unreachable_backend_is_our_502_without_internals(site, dead_port_site, http2):
    r = proxied(site.proxy, dead_port_site.host, https=http2, http2=http2,
                headers={"Accept": "text/html"})
    assert r.status_code == 502
    assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert "server" not in r.headers and "mitmproxy" not in r.text.lower()
    assert dead_port_site.ip not in r.text and "Errno" not in r.text and ":81" not in r.text
    assert r.headers["x-wakeproxy"] == "error" and "<html" in r.text.lower()


def test_debug_clients_see_the_upstream_detail(proxy, backend_container, host):
    h = host("deadport-debug")
    c = backend_container("deadport-debug", labels={"wakeproxy.host": h, "wakeproxy.port": "81"})
    p = proxy()  # debug_clients default: loopback
    wait_for(lambda: proxied(p, h).status_code == 502, 10, 0.1, "the dead-port site")
    c.reload()
    ip = next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    r = proxied(p, h)
    assert r.status_code == 502 and ip in r.text and "server" not in r.headers
    wait_for(lambda: "backend" in p.log() and "failed" in p.log(), 5, 0.1, "the failure in the log")


# --- connection flood ------------------------------------------------------------------------


def test_connection_flood_above_the_file_limit(proxy, site, host):
    """1500 idle connections against a proxy with 1024 file descriptors: a normal request is still
    answered within 1 s, and the proxy's log says so in a few lines, without tracebacks."""
    nofile = 1024
    p = proxy({"limits": {"header_timeout": "30s"}}, wrapper=["prlimit", f"--nofile={nofile}:{nofile}", "--"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1700
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the test itself needs {need} file descriptors (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    log_before = len(p.log().splitlines())
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while len(socks) < 1500 and time.monotonic() < deadline:
            try:
                socks.append(socket.create_connection(("127.0.0.1", p.http_port), timeout=5))
            except OSError:
                time.sleep(0.01)
        assert len(socks) == 1500
        time.sleep(0.5)
        t0 = time.monotonic()
        r = proxied(p, site.host, timeout=5)
        took = time.monotonic() - t0
        assert r.status_code == 200 and took < 1.0, took
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    wait_for(lambda: "connection flood" in p.log(), 15, 0.2, "the flood line")
    lines = p.log().splitlines()[log_before:]
    assert len(lines) < 20, "\n".join(lines[:40])
    assert not any("Traceback" in line or "Too many open files" in line for line in lines), "\n".join(lines[:40])
    assert p.alive()


# --- early answers to large bodies -----------------------------------------------------------


@pytest.mark.parametrize("case", ["bad header", "unknown host"])
def test_large_body_with_an_early_answer_is_answered_without_tracebacks(site, run_id, case):
    """A 3 MB upload that gets our answer in requestheaders (400, 404): answered at once, the body
    dropped; mitmproxy would log a traceback per chunk and never answer."""
    host = site.host if case == "bad header" else f"nobody.{run_id}.test"
    extra = "X-A: one\rtwo\r\n" if case == "bad header" else ""
    size = 3_000_000
    log_before = len(site.proxy.log())

    def upload() -> bytes:
        with socket.create_connection(("127.0.0.1", site.proxy.http_port), timeout=10) as s:
            s.sendall(f"POST /up HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: {size}\r\n\r\n".encode())
            sent = 0
            try:
                while sent < size:
                    s.sendall(b"u" * 65536)
                    sent += 65536
            except OSError:
                pass
            s.settimeout(5)
            out = b""
            try:
                while not _complete(out) and (chunk := s.recv(65536)):
                    out += chunk
            except OSError:
                pass
            return out

    answer = assert_nothing_reached_backend(site, upload)
    assert_our_page(answer, 400 if case == "bad header" else 404)
    new_log = site.proxy.log()[log_before:]
    assert "Traceback" not in new_log and "crashed" not in new_log, new_log[:2000]
