"""The debug UI process (wakeproxy.debug.web) for real, on the mitmproxy it runs with (11.0 on the host,
12 in the image): the token and Host checks of its web UI, its proxy listener that admits only the
workers' key, where it may connect, the options and commands it refuses, its flow bound, and that it
ends with its input."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from wakeproxy.debug.web import command_of, ui_host_allowed
from wakeproxy.files import blocked_for

TOKEN, KEY = "the-ui-token", "the-workers-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Hello(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        _Hello.seen.append(self.path)
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[str, int]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "127.0.0.1", int(server.server_address[1])
    server.shutdown()


class Child:
    def __init__(self, tmp: Path, max_flows: int = 3, allow: tuple[tuple[str, int], ...] = ()) -> None:
        self.web_port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wakeproxy.debug.web", "--web-port", str(self.web_port), "--confdir", str(tmp),
             "--max-flows", str(max_flows)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.send({"token": TOKEN, "key": KEY, "allow": [list(a) for a in allow]})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.ready = json.loads(line)["ready"]
        self.proxy_port = int(self.ready["proxy"][1])
        self.base = f"http://127.0.0.1:{self.web_port}"
        self.api = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {TOKEN}"}, trust_env=False,
                                timeout=10)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def flows(self) -> list[dict[str, Any]]:
        r = self.api.get("/flows")
        assert r.status_code == 200, r.text
        return list(r.json())

    def tunnel_get(self, target: tuple[str, int], path: str, key: str | None = KEY) -> bytes:
        """What a worker does: CONNECT with the key, then a plain HTTP request inside the tunnel."""
        with socket.create_connection(("127.0.0.1", self.proxy_port), timeout=10) as s:
            auth = f"Proxy-Authorization: Bearer {key}\r\n" if key else ""
            s.sendall(f"CONNECT {target[0]}:{target[1]} HTTP/1.1\r\nHost: {target[0]}:{target[1]}\r\n{auth}\r\n".encode())
            head = _read_head(s)
            if not head.startswith(b"HTTP/1.1 200"):
                return head
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    def close(self) -> int:
        self.api.close()
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the controller's end: the UI stops
        return self.proc.wait(15)


def take_xsrf(client: httpx.Client) -> None:
    """The XSRF cookie mitmweb wants echoed in a header on every POST/PUT (11 sets it with the page,
    12 when the UI's WebSocket opens)."""
    for path in ("/", "/updates"):
        client.get(path)
        xsrf = next((v for k, v in client.cookies.items() if "xsrf" in k), None)
        if xsrf:
            client.headers["X-XSRFToken"] = xsrf
            return
    raise AssertionError(f"no XSRF cookie: {dict(client.cookies)}")


def _read_head(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def child(tmp_path: Path, backend) -> Iterator[Child]:
    c = Child(tmp_path, allow=(backend,))
    try:
        yield c
    finally:
        if c.proc.poll() is None:
            c.close()


def test_the_ui_wants_the_token_and_an_ip_host(child: Child) -> None:
    plain = httpx.Client(trust_env=False, timeout=10)
    assert plain.get(f"{child.base}/flows").status_code == 403
    assert plain.get(f"{child.base}/flows", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert plain.get(f"{child.base}/flows?token=nope").status_code == 403
    assert child.api.get("/flows").status_code == 200
    assert child.api.get("/flows", headers={"Host": "rebound.example:8081"}).status_code == 403
    assert child.api.get("/flows", headers={"Host": f"localhost:{child.web_port}"}).status_code == 200
    with httpx.Client(trust_env=False, timeout=10, follow_redirects=True) as browser:
        assert browser.get(f"{child.base}/?token={TOKEN}").status_code == 200
        assert browser.get(f"{child.base}/flows").status_code == 200  # a cookie from here on
        # (on mitmproxy 11.0 ours: a session value, never the token, which a browser would send to every
        # port of 127.0.0.1)
        assert TOKEN not in repr(dict(browser.cookies))
    plain.close()


def test_the_proxy_listener_admits_only_the_workers_and_goes_only_where_they_asked(child: Child, backend) -> None:
    assert child.tunnel_get(backend, "/no-key", key=None).startswith(b"HTTP/1.1 407")
    assert child.tunnel_get(backend, "/bad-key", key="guess").startswith(b"HTTP/1.1 407")
    with httpx.Client(proxy=f"http://127.0.0.1:{child.proxy_port}", trust_env=False, timeout=10) as c:
        assert c.get(f"http://{backend[0]}:{backend[1]}/absolute-form").status_code == 403
    assert "/no-key" not in _Hello.seen and "/absolute-form" not in _Hello.seen
    got = child.tunnel_get(backend, "/through-the-ui")
    assert b" 200 " in got.split(b"\r\n", 1)[0] and b'"/through-the-ui"' in got
    (flow,) = [f for f in child.flows() if f["request"]["path"] == "/through-the-ui"]
    assert flow["response"]["status_code"] == 200
    # Even with the key, a CONNECT goes only to a backend the controller lists as watched.
    with socket.socket() as elsewhere:
        elsewhere.bind(("127.0.0.1", 0))
        elsewhere.listen()
        assert child.tunnel_get(elsewhere.getsockname(), "/x").startswith(b"HTTP/1.1 403")
    # A replay comes from the UI, not a worker: only to a backend the controller lists as watched.
    child.send({"allow": []})
    before = _Hello.seen.count("/through-the-ui")
    take_xsrf(child.api)
    assert child.api.post(f"/flows/{flow['id']}/replay").status_code == 200
    _wait(lambda: any(f["id"] == flow["id"] and f.get("error") for f in child.flows()))
    assert _Hello.seen.count("/through-the-ui") == before
    child.send({"allow": [list(backend)]})
    _wait(lambda: child.api.post(f"/flows/{flow['id']}/replay").status_code == 200
          and _Hello.seen.count("/through-the-ui") > before)


def test_options_and_commands_beyond_the_view_are_refused(child: Child, backend, tmp_path: Path) -> None:
    take_xsrf(child.api)
    precious = tmp_path / "precious"
    precious.write_text("data")
    for change in ({"scripts": ["/tmp/evil.py"]}, {"mode": ["regular@127.0.0.1:1"]}, {"confdir": str(tmp_path / "c")},
                   {"save_stream_file": str(precious)}, {"stream_large_bodies": None},
                   {"rfile": "/dev/null", "web_static_viewer": str(tmp_path / "static")},
                   {"view_filter": "~u x", "scripts": []}):
        r = child.api.put("/options", json=change)
        assert r.status_code == 403, (change, r.text)
    # Refused before mitmweb's addons acted on it: no file written or cut, the proxy listener where it was.
    assert precious.read_text() == "data"
    assert not (tmp_path / "c").exists() and not (tmp_path / "static").exists()
    assert b" 200 " in child.tunnel_get(backend, "/still-here").split(b"\r\n", 1)[0]
    assert child.api.put("/options", json={"view_filter": "~u hello"}).status_code == 200
    assert child.api.put("/options", json={"intercept": "~u hello"}).status_code == 200
    for cmd in ("script.run", "save.file", "export.file", "options.save", "set"):
        assert child.api.post(f"/commands/{cmd}", json={"arguments": []}).status_code == 403, cmd
    assert child.api.get("/executable-icon?path=/etc/shadow").status_code == 403
    r = child.api.post("/commands/commands.history.get", json={"arguments": []})
    assert r.status_code == 200, r.text


def test_the_ui_keeps_at_most_max_flows_and_ends_with_its_input(child: Child, backend) -> None:
    for i in range(6):
        assert b" 200 " in child.tunnel_get(backend, f"/n{i}").split(b"\r\n", 1)[0]
    paths = [f["request"]["path"] for f in child.flows()]
    assert paths == ["/n3", "/n4", "/n5"]
    assert child.close() == 0


def test_hosts_commands_and_permissions() -> None:
    assert ui_host_allowed("127.0.0.1:8081") and ui_host_allowed("[::1]:8081") and ui_host_allowed("localhost")
    assert not ui_host_allowed("evil.example:8081") and not ui_host_allowed("") and not ui_host_allowed("127.0.0.1.nip.io")
    assert command_of("/commands/script.run") == "script.run" and command_of("/flows") is None
    assert blocked_for("/", 65534, 65534) is None
    assert blocked_for("/root/.nonexistent", 65534, 65534) is not None


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_taken_ui_port_is_reported_not_hidden(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "wakeproxy.debug.web", "--web-port", str(port),
                                 "--confdir", str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"token": TOKEN, "key": KEY, "allow": []}) + "\n")
        proc.stdin.flush()
        report = json.loads(proc.stdout.readline())
        proc.stdin.close()
        assert proc.wait(15) != 0
    assert "error" in report and str(port) in report["error"], report


KIB = 1024


@contextlib.contextmanager
def gate_with_view(max_body: int) -> Iterator[tuple[Any, Any]]:
    """A Gate (1 MiB budget) in mitmproxy's test context, with the View mitmweb's master has: (gate, view)."""
    from mitmproxy.addons import view as view_addon
    from mitmproxy.test import taddons
    from wakeproxy.debug.web import Gate

    gate = Gate(max_flows=100, report=lambda m: None, max_body=max_body, max_memory=1024 * KIB)
    with taddons.context(gate) as tctx:
        v = view_addon.View()
        tctx.master.view = v  # type: ignore[attr-defined]
        yield gate, v


def test_bodies_and_websocket_messages_are_kept_within_their_budgets() -> None:
    from mitmproxy import websocket
    from mitmproxy.test import tflow

    kib = KIB
    with gate_with_view(300 * kib) as (gate, v):
        flows = []
        for _ in range(6):  # 6 finished flows of 250 KiB each: over the 1 MiB budget
            f = tflow.tflow(resp=True)
            f.response.content = b"x" * 250 * kib
            f.live = False
            v.add([f])
            gate.request(f)
            gate.response(f)
            flows.append(f)
        left = [f.id for f in v]
        assert left == [f.id for f in flows[-4:]] and gate.total <= 1024 * kib
        # A WebSocket: big messages shrunk once sent, at most 4 × max_body of messages kept.
        ws = tflow.twebsocketflow()
        ws.websocket.messages.clear()
        v.add([ws])
        gate.request(ws)
        for _ in range(20):
            ws.websocket.messages.append(websocket.WebSocketMessage(2, True, b"y" * 250 * kib))
            gate.websocket_message(ws)
        kept = sum(len(m.content) for m in ws.websocket.messages[:-1])
        assert kept <= 4 * 300 * kib
        huge = websocket.WebSocketMessage(2, True, b"z" * 400 * kib)
        ws.websocket.messages.append(huge)
        gate.websocket_message(ws)
        assert len(huge.content) == 400 * kib  # the message being sent is never changed …
        ws.websocket.messages.append(websocket.WebSocketMessage(2, True, b"small"))
        gate.websocket_message(ws)
        assert huge.content.startswith(b"[409600 bytes, not kept")  # … the sent one is shrunk
        assert gate.total <= 1024 * kib + 4 * 300 * kib


def test_under_memory_pressure_bodies_pass_through_and_a_quiet_sockets_last_message_shrinks() -> None:
    from mitmproxy import websocket
    from mitmproxy.test import tflow

    kib = KIB
    with gate_with_view(100 * kib) as (gate, v):
        stalled = []
        for _ in range(8):  # requests in progress: each may still buffer up to max_body either way
            f = tflow.tflow()
            f.is_replay = "request"
            gate.requestheaders(f)
            stalled.append(f)
        assert not stalled[0].request.stream and stalled[-1].request.stream  # past the budget: streamed
        late = tflow.tflow(resp=True)
        gate.live.add(late.id)
        gate.responseheaders(late)
        assert late.response.stream
        for f in stalled:
            f.response = tflow.tresp()
            gate.response(f)
        assert not gate.live - {late.id}
        # One huge message and then silence: it is counted while it is sent, and shrunk once quiet.
        ws = tflow.twebsocketflow()
        ws.websocket.messages.clear()
        v.add([ws])
        gate.websocket_start(ws)
        big = websocket.WebSocketMessage(2, True, b"q" * 500 * kib, timestamp=time.time() - 5)
        ws.websocket.messages.append(big)
        gate.websocket_message(ws)
        assert gate.kept[ws.id] >= 500 * kib and len(big.content) == 500 * kib
        gate.sweep(time.time())
        assert big.content.startswith(b"[512000 bytes, not kept") and gate.kept[ws.id] < kib


def test_tornado_warnings_lose_their_query() -> None:
    import logging

    from wakeproxy.debug.web import _no_queries

    record = logging.LogRecord("tornado.general", logging.WARNING, __file__, 1, "%d %s (%s): %s", (403,
                               "POST /flows/x/replay?%74oken=SECRET", "127.0.0.1", "'_xsrf' missing"), None)
    assert _no_queries(record)
    assert "SECRET" not in record.getMessage() and "/flows/x/replay?…" in record.getMessage()


def test_a_silent_connection_to_the_proxy_listener_is_closed(child: Child) -> None:
    with socket.create_connection(("127.0.0.1", child.proxy_port), timeout=30) as s:
        t0 = time.monotonic()
        assert s.recv(1) == b""  # closed by the UI (limits.header_timeout), not left open for good
        assert time.monotonic() - t0 < 25
