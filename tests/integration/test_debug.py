"""`wakeproxy debug`: one sandbox's live traffic in mitmweb, on the running proxy, against real Docker.

The proxy runs with two serving workers; the command talks to it over its admin socket. mitmweb's own
HTTP API (with the token the command prints) is what is checked: the watched host's flows are there,
with method, path, status and body; the other sandbox's are not; a WebSocket message shows in its
flow; a replay from mitmweb reaches the backend. `--off`, the end of `--for` and a killed UI process
all leave both sandboxes answering. A screenshot of mitmweb in headless Chromium shows the flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from harness import ProxyProcess, children_of, free_port, proxied, wait_for

ARTIFACTS = Path(os.environ.get("WPTEST_ARTIFACTS", "/tmp/wakeproxy-test-artifacts"))


def debug_cmd(p: ProxyProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "wakeproxy", "debug", "--config", str(p.config_path), *args],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, (r.stdout, r.stderr)
    return r


def listing(p: ProxyProcess) -> dict[str, Any]:
    return json.loads(debug_cmd(p, "--json", check=False).stdout)


def url_of(out: str) -> tuple[str, str]:
    m = re.search(r"mitmweb: (http://[^/\s]+)/\?token=(\S+)", out)
    assert m, out
    return m.group(1), m.group(2)


class UI:
    """mitmweb's HTTP API, as a script would use it: the token as a Bearer header."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token
        self.client = httpx.Client(base_url=base, timeout=10, trust_env=False,
                                   headers={"Authorization": f"Bearer {token}"})
        r = self.client.get("/")
        assert r.status_code == 200, r.text
        for path in ("/", "/updates"):  # mitmproxy 11 sets the XSRF cookie with the page, 12 with the WebSocket
            self.client.get(path)
            xsrf = next((v for k, v in self.client.cookies.items() if "xsrf" in k), None)
            if xsrf:
                break
        assert xsrf, dict(self.client.cookies)
        self.client.headers["X-XSRFToken"] = xsrf

    def flows(self) -> list[dict[str, Any]]:
        r = self.client.get("/flows")
        assert r.status_code == 200, r.text
        return r.json()

    def body(self, flow_id: str, part: str = "response") -> bytes:
        r = self.client.get(f"/flows/{flow_id}/{part}/content.data")
        assert r.status_code == 200, r.text
        return r.content

    def close(self) -> None:
        self.client.close()


def ui_pids(p: ProxyProcess) -> list[int]:
    out = []
    for pid in children_of(p.pid, "wakeproxy") + [p.pid]:
        out += children_of(pid, "wakeproxy.debug.web")
    return sorted(set(out))


def host_of(flow: dict[str, Any]) -> str:
    req = flow["request"]
    hdr = next((v for k, v in req["headers"] if k.lower() == "host"), "")
    return hdr or req.get("pretty_host", "")


@pytest.fixture
def two(backend_container, host):
    watched, other = host("dbg-watched"), host("dbg-other")
    a = backend_container("dbg-watched", labels={"wakeproxy.host": watched})
    b = backend_container("dbg-other", labels={"wakeproxy.host": other})
    return watched, other, a, b


def start(proxy, **extra: Any) -> ProxyProcess:
    return proxy({"workers": extra.pop("workers", 2),
                  "debug": {"listen": f"127.0.0.1:{free_port()}", **extra.pop("debug", {})}, **extra})


@pytest.mark.parametrize("workers", [2, 0], ids=["workers", "one-process"])
def test_watching_one_sandbox_shows_its_flows_only(proxy, two, workers):
    watched, other, a, b = two
    p = start(proxy, workers=workers)
    assert "nothing is watched" in debug_cmd(p).stdout
    assert proxied(p, watched).status_code == 200  # before: not recorded
    out = debug_cmd(p, watched, "--for", "5m").stdout
    base, token = url_of(out)
    ui = UI(base, token)
    try:
        r = proxied(p, watched, "/hello?who=debug", headers={"X-Test": "1"})
        assert r.status_code == 200 and r.json()["backend"] == "dbg-watched"
        r = proxied(p, watched, "/form", method="POST", content=b"name=value&x=1",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200
        assert proxied(p, watched, "/h2", https=True, http2=True).status_code == 200
        for _ in range(3):
            assert proxied(p, other, "/secret-of-other").status_code == 200
        wait_for(lambda: len(ui.flows()) >= 3, 10, 0.1, "the watched flows in mitmweb")
        flows = ui.flows()
        assert {host_of(f) for f in flows} == {watched}, [host_of(f) for f in flows]
        assert not any("secret-of-other" in f["request"]["path"] for f in flows)
        by_path = {f["request"]["path"]: f for f in flows}
        hello = by_path["/hello?who=debug"]
        assert hello["request"]["method"] == "GET" and hello["response"]["status_code"] == 200
        assert json.loads(ui.body(hello["id"]))["backend"] == "dbg-watched"
        form = by_path["/form"]
        assert form["request"]["method"] == "POST"
        assert ui.body(form["id"], "request") == b"name=value&x=1"
        assert "/h2" in by_path  # an HTTP/2 client's request is recorded as well
        # The UI's token is required, and only an IP address or localhost may name it.
        assert httpx.get(f"{base}/flows", trust_env=False).status_code == 403
        assert httpx.get(f"{base}/flows", headers={"Authorization": "Bearer wrong"}, trust_env=False).status_code == 403
        assert httpx.get(f"{base}/flows", headers={"Authorization": f"Bearer {token}", "Host": "rebind.example"},
                         trust_env=False).status_code == 403
        # A mistyped address with the token in it: never in the proxy's log.
        assert httpx.get(f"{base}/no-such-page?token={token}", trust_env=False).status_code in (403, 404)
        # A browser: the address with its token once, then a cookie.
        with httpx.Client(trust_env=False, follow_redirects=True) as browser:
            assert browser.get(f"{base}/?token={token}").status_code == 200
            assert browser.get(f"{base}/flows").status_code == 200
    finally:
        ui.close()
    if workers:
        # The UI runs as the workers' account (when it can read mitmweb's files; else as root, said once).
        (pid,) = ui_pids(p)
        uids = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
        assert uids.split()[1:] == ["65534"] * 4 or "runs as root" in p.log(), uids
    # The proxy's status (readable by any local user) says what is watched, without the token.
    status = httpx.get(f"http://127.0.0.1:{p.status_port}/status", trust_env=False).text
    assert token not in status and watched in status
    assert token not in p.log()
    shown = subprocess.run([sys.executable, "-m", "wakeproxy", "status", "--config", str(p.config_path)],
                           capture_output=True, text=True, timeout=30).stdout
    assert f"debug UI: ready, watching {watched}" in shown, shown
    # --off: the UI stops; both sandboxes answer, and nothing more is recorded.
    assert "nothing is watched" in debug_cmd(p, "--off", watched).stdout
    wait_for(lambda: not ui_pids(p), 10, 0.1, "the UI process ends after --off")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/flows", trust_env=False, timeout=2)
    for h in (watched, other):
        assert proxied(p, h).status_code == 200


def test_websocket_replay_and_the_proxy_listener(proxy, two):
    watched, other, a, b = two
    p = start(proxy)
    base, token = url_of(debug_cmd(p, watched).stdout)
    ui = UI(base, token)
    try:
        async def talk() -> None:
            async with websockets.connect(f"ws://{watched}/ws", host="127.0.0.1", port=p.http_port, proxy=None,
                                          open_timeout=10, close_timeout=5) as ws:
                await ws.send("hello from the watched sandbox")
                assert await asyncio.wait_for(ws.recv(), 10) == "hello from the watched sandbox"

        asyncio.run(talk())

        def ws_flow() -> dict[str, Any] | None:
            return next((f for f in ui.flows() if f.get("websocket")), None)

        wait_for(ws_flow, 10, 0.1, "the WebSocket flow")
        flow = ws_flow()
        assert flow is not None
        messages = ui.client.get(f"/flows/{flow['id']}/messages/content/Auto.json")
        assert messages.status_code == 200, messages.text
        assert "hello from the watched sandbox" in messages.text

        # Replay from mitmweb: the backend gets the request a second time.
        assert proxied(p, watched, "/replay-me").status_code == 200
        wait_for(lambda: any(f["request"]["path"] == "/replay-me" for f in ui.flows()), 10, 0.1, "the flow")
        fid = next(f["id"] for f in ui.flows() if f["request"]["path"] == "/replay-me")
        assert a.logs().decode().count("REQ GET /replay-me") == 1
        r = ui.client.post(f"/flows/{fid}/replay")
        assert r.status_code == 200, r.text
        wait_for(lambda: a.logs().decode().count("REQ GET /replay-me") == 2, 10, 0.1, "the replay at the backend")

        # The same flow edited to point at the other sandbox's container: the UI does not go there.
        b.reload()
        other_ip = next(iter(b.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
        r = ui.client.put(f"/flows/{fid}", json={"request": {"host": other_ip, "path": "/via-edit"}})
        assert r.status_code == 200, r.text
        assert ui.client.post(f"/flows/{fid}/replay").status_code == 200
        wait_for(lambda: any(f["id"] == fid and f.get("error") for f in ui.flows()), 10, 0.1, "the refusal")
        assert "/via-edit" not in b.logs().decode()
        # Export as curl, as the UI's menu does it.
        r = ui.client.post("/commands/export", json={"arguments": ["curl", f"@{fid}"]})
        assert r.status_code == 200 and "curl" in r.json()["value"] and watched in r.json()["value"], r.text
        # Intercept and edit: the request waits in mitmweb, is changed there, and goes on when resumed.
        assert ui.client.put("/options", json={"intercept": "~u /intercept-me"}).status_code == 200
        answer: dict[str, Any] = {}

        def held() -> None:
            answer["r"] = proxied(p, watched, "/intercept-me", timeout=30)
        t = threading.Thread(target=held)
        t.start()
        wait_for(lambda: any(f["request"]["path"] == "/intercept-me" and f.get("intercepted") for f in ui.flows()),
                 10, 0.1, "the intercepted flow")
        iid = next(f["id"] for f in ui.flows() if f["request"]["path"] == "/intercept-me")
        assert ui.client.put(f"/flows/{iid}", json={"request": {"path": "/edited-in-mitmweb"}}).status_code == 200
        assert ui.client.post(f"/flows/{iid}/resume").status_code == 200
        t.join(30)
        assert answer["r"].status_code == 200 and answer["r"].json()["path"] == "/edited-in-mitmweb"
        assert ui.client.put("/options", json={"intercept": ""}).status_code == 200
        state = ui.client.get("/options").json()
        assert "scripts" in state
        r = ui.client.put("/options", json={"scripts": ["/tmp/x.py"]})
        assert r.status_code == 403, r.text
        r = ui.client.post("/commands/script.run", json={"arguments": []})
        assert r.status_code == 403, r.text
    finally:
        ui.close()
    # The UI's proxy listener is no open proxy: a client without the workers' key gets 407 / 403.
    proxy_port = next(int(x) for x in re.findall(r"127\.0\.0\.1:(\d+)", _listening_of(ui_pids(p)))
                      if int(x) != int(base.rsplit(":", 1)[1]))
    with httpx.Client(proxy=f"http://127.0.0.1:{proxy_port}", trust_env=False, timeout=5) as c:
        assert c.get(f"http://{watched}/").status_code == 403
    raw = _raw(proxy_port, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 407"), raw


def _listening_of(pids: list[int]) -> str:
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=10).stdout
    return "\n".join(line for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids))


def _raw(port: int, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        return s.recv(4096)


def test_the_time_is_up_and_a_killed_ui(proxy, two):
    watched, other, _, _ = two
    p = start(proxy)
    debug_cmd(p, watched, "--for", "3s")
    assert ui_pids(p)
    wait_for(lambda: not listing(p)["watches"], 10, 0.2, "the watch ends after --for")
    wait_for(lambda: not ui_pids(p), 10, 0.1, "the UI stops once nothing is watched")
    for h in (watched, other):
        assert proxied(p, h).status_code == 200

    debug_cmd(p, watched, "--for", "5m")
    pids = ui_pids(p)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: listing(p)["state"] == "paused", 10, 0.05, "the controller sees the UI die")
    t0 = time.monotonic()
    codes = []
    while time.monotonic() - t0 < 2:
        codes += [proxied(p, watched).status_code, proxied(p, other).status_code]
    assert set(codes) == {200}, codes
    assert "routed directly" in p.log()
    # Started again after its pause; then a UI that hangs (stopped) is found out by its pings and ended.
    wait_for(lambda: listing(p)["state"] == "ready", 30, 0.2, "the UI started again")
    (pid,) = ui_pids(p)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: listing(p)["state"] == "paused", 20, 0.2, "the controller ends a UI that does not answer")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert "has not answered" in p.log()
    for h in (watched, other):
        assert proxied(p, h).status_code == 200


def test_the_label_is_honoured_only_where_the_operator_trusts_it(proxy, backend_container, host):
    labelled = host("dbg-label")
    backend_container("dbg-label", labels={"wakeproxy.host": labelled, "wakeproxy.debug": "true"})
    p = start(proxy)  # labels.debug is off by default: a tenant's label records nothing
    assert proxied(p, labelled).status_code == 200
    assert listing(p)["labels"] == [] and not ui_pids(p)
    p.stop()
    p = start(proxy, labels={"debug": True})
    wait_for(lambda: listing(p)["state"] == "ready", 20, 0.2, "the UI started for the label")
    out = debug_cmd(p).stdout
    assert "label wakeproxy.debug" in out
    ui = UI(*url_of(out))
    try:
        assert proxied(p, labelled, "/by-label").status_code == 200
        wait_for(lambda: any(f["request"]["path"] == "/by-label" for f in ui.flows()), 10, 0.1, "the flow")
    finally:
        ui.close()


def test_a_screenshot_of_mitmweb_with_the_watched_flow(proxy, two, browser):
    watched, _, _, _ = two
    p = start(proxy)
    base, token = url_of(debug_cmd(p, watched).stdout)
    assert proxied(p, watched, "/shown-in-mitmweb").status_code == 200
    driver = browser
    driver.set_window_size(1400, 900)
    driver.get(f"{base}/?token={token}")
    wait_for(lambda: "/shown-in-mitmweb" in driver.page_source, 20, 0.2, "the flow in mitmweb's list")
    driver.find_element("xpath", "//*[contains(text(), '/shown-in-mitmweb')]").click()
    time.sleep(0.5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "mitmweb-watched-flow.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    assert watched in driver.page_source
