"""HTTP/2 clients → HTTP/1.1 backend through the real proxy: upstream connections are reused
across the streams of one client connection (addons/h2reuse.py).

The backend here is a small stdlib server (run in the pyback image) that numbers its
connections: every answer says which connection carried it (X-Conn) and how many the
backend has accepted so far (X-Conns), so the tests count upstream connections exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from types import SimpleNamespace

import httpx
import pytest
from harness import container_ip, wait_for

BACKEND = r'''
import asyncio, hashlib, json, sys

total = 0

async def read_body(reader, headers):
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                return body
            body += await reader.readexactly(size)
            await reader.readline()
    return await reader.readexactly(int(headers.get("content-length", "0") or 0))

async def handle(reader, writer):
    global total
    total += 1
    conn = total
    print(f"CONN {conn}", flush=True)
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            headers = {}
            while (h := await reader.readline()) not in (b"\r\n", b""):
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            body = await read_body(reader, headers)
            path = target.split("?")[0]
            if path == "/slow":
                await asyncio.sleep(0.3)
            out = json.dumps({"conn": conn, "conns": total, "method": method, "path": target,
                              "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
            own = f"X-Conn: {conn}\r\nX-Conns: {total}\r\nContent-Type: application/json\r\n"
            if path == "/eof":  # HTTP/1.0 style: no length, the end of the body is the end of the connection
                writer.write(f"HTTP/1.0 200 OK\r\n{own}\r\n".encode() + out)
                await writer.drain()
                return
            if path == "/close":
                writer.write(f"HTTP/1.1 200 OK\r\n{own}Content-Length: {len(out)}\r\nConnection: close\r\n\r\n".encode() + out)
                await writer.drain()
                return
            writer.write(f"HTTP/1.1 200 OK\r\n{own}Content-Length: {len(out)}\r\n\r\n".encode() + out)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", 80)
    print("counting backend listening on 80", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''


@pytest.fixture(scope="module")
def site(module_containers, module_proxy, pyback_image, host):
    h = host("h2reuse")
    container = module_containers("h2reuse", labels={"wakeproxy.host": h},
                                  command=[pyback_image.python, "-u", "-c", BACKEND])
    p = module_proxy()

    def routed() -> bool:
        with httpx.Client(verify=False, trust_env=False, timeout=5) as c:
            return c.get(p.http_url + "/", headers={"Host": h}).headers.get("x-conn") is not None
    wait_for(routed, 15, 0.1, "h2reuse site via proxy")
    return SimpleNamespace(proxy=p, host=h, container=container)


def h2_client(site) -> httpx.Client:
    return httpx.Client(base_url=site.proxy.https_url, http2=True, verify=False, trust_env=False, timeout=20,
                        headers={"Host": site.host})


def get(c: httpx.Client, site, path: str = "/", **kw) -> httpx.Response:
    return c.request(kw.pop("method", "GET"), path, extensions={"sni_hostname": site.host}, **kw)


def accepted(site) -> int:
    """How many connections the backend has accepted so far (asked over HTTP/1.1, one new connection)."""
    with httpx.Client(trust_env=False, timeout=5) as c:
        r = c.get(site.proxy.http_url + "/", headers={"Host": site.host})
    return int(r.headers["x-conns"])


def test_sequential_requests_share_upstream_connections(site):
    before = accepted(site)
    with h2_client(site) as c:
        answers = [get(c, site, f"/seq/{i}") for i in range(50)]
    assert [r.status_code for r in answers] == [200] * 50
    assert {r.http_version for r in answers} == {"HTTP/2"}
    assert [r.json()["path"] for r in answers] == [f"/seq/{i}" for i in range(50)]
    used = {r.headers["x-conn"] for r in answers}
    opened = accepted(site) - before - 1  # minus the counting request
    assert len(used) <= 2 and opened <= 2, (used, opened)


def test_concurrent_streams_get_their_own_connections_then_reuse_them(site):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=site.proxy.https_url, http2=True, verify=False, trust_env=False,
                                     timeout=20, headers={"Host": site.host}) as c:
            ext = {"sni_hostname": site.host}
            warm = await c.get("/warm", extensions=ext)  # one client connection; 10 streams on it next
            burst = await asyncio.gather(*(c.get(f"/slow?i={i}", extensions=ext) for i in range(10)))
            after = [await c.get(f"/after/{i}", extensions=ext) for i in range(20)]
            return [warm, *burst, *after]

    before = accepted(site)
    answers = asyncio.run(run())
    warm, burst, after = answers[0], answers[1:11], answers[11:]
    assert [r.status_code for r in answers] == [200] * 31
    assert {r.http_version for r in answers} == {"HTTP/2"}
    # mitmproxy opens at most 5 connections per backend and client connection; further streams wait
    # for one of them to become free (one request at a time on each).
    assert 2 <= len({r.headers["x-conn"] for r in burst}) <= 10
    opened = accepted(site) - before - 1
    assert opened <= 10, opened  # the warm-up's connection serves one of the 10 streams
    # The sequential requests after the burst ride on connections that already exist.
    assert {r.headers["x-conn"] for r in after} <= {r.headers["x-conn"] for r in (warm, *burst)}


def test_read_until_eof_responses_still_work(site):
    with h2_client(site) as c:
        answers = []
        for i in range(4):
            answers.append(get(c, site, f"/eof?i={i}"))
            answers.append(get(c, site, f"/between/{i}"))
    assert [r.status_code for r in answers] == [200] * 8
    eofs = answers[0::2]
    assert [r.json()["path"] for r in eofs] == [f"/eof?i={i}" for i in range(4)]
    # each read-until-EOF answer ended its connection: never two on one connection
    assert len({r.headers["x-conn"] for r in eofs}) == 4


def test_post_with_body_between_gets(site):
    body = bytes(range(256)) * 400  # 100 KiB
    with h2_client(site) as c:
        g1 = get(c, site, "/g1")
        p = get(c, site, "/upload", method="POST", content=body)
        g2 = get(c, site, "/g2")
        p2 = get(c, site, "/upload2", method="POST", content=b"small")
        g3 = get(c, site, "/g3")
        big_body = bytes(range(256)) * 10_000  # 2.5 MB: streamed upstream (stream_large_bodies=1m)
        big = get(c, site, "/upload3", method="POST", content=big_body)
        g4 = get(c, site, "/g4")
        unsized = get(c, site, "/upload4", method="POST", content=iter([b"a" * 1000, b"b" * 1000]))  # no length
        g5 = get(c, site, "/g5")
    assert [r.status_code for r in (g1, p, g2, p2, g3, big, g4, unsized, g5)] == [200] * 9
    assert unsized.json()["size"] == 2000 and g5.json()["path"] == "/g5"
    assert big.json()["size"] == len(big_body) and big.json()["sha256"] == hashlib.sha256(big_body).hexdigest()
    assert g4.json()["method"] == "GET" and g4.json()["size"] == 0
    assert p.json()["size"] == len(body) and p.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert p2.json()["size"] == 5 and p2.json()["method"] == "POST"
    assert [r.json()["method"] for r in (g1, g2, g3)] == ["GET"] * 3
    assert len({r.headers["x-conn"] for r in (g1, p, g2, p2, g3)}) <= 2


def test_connection_close_from_backend(site):
    with h2_client(site) as c:
        answers = []
        for i in range(4):
            answers.append(get(c, site, f"/close?i={i}"))
            answers.append(get(c, site, f"/after-close/{i}"))
    assert [r.status_code for r in answers] == [200] * 8
    closes = answers[0::2]
    assert len({r.headers["x-conn"] for r in closes}) == 4  # the backend closed each of them


def test_proxy_log_is_clean(site):
    log = site.proxy.log()
    assert "not the shape it was written for" not in log  # h2reuse installed
    assert "Traceback" not in log and "has crashed" not in log


def test_mitmdump_script_reuses_too(site, proxy):
    """`mitmdump -s addons/wakeproxy.py` loads the same bundle, so it gets the patch as well."""
    p = proxy(launcher="mitmdump")
    wait_for(lambda: httpx.get(p.http_url + "/", headers={"Host": site.host}, trust_env=False).status_code == 200,
             15, 0.1, "site via mitmdump")
    before = accepted(SimpleNamespace(proxy=p, host=site.host))
    with httpx.Client(base_url=p.https_url, http2=True, verify=False, trust_env=False, timeout=20,
                      headers={"Host": site.host}) as c:
        answers = [c.get(f"/md/{i}", extensions={"sni_hostname": site.host}) for i in range(20)]
    assert [r.status_code for r in answers] == [200] * 20 and answers[0].http_version == "HTTP/2"
    assert len({r.headers["x-conn"] for r in answers}) <= 2
    assert int(answers[-1].headers["x-conns"]) - before <= 2
    assert "not the shape it was written for" not in p.log()


def _sockets(state: str, ip: str, port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", state, "dst", f"{ip}:{port}"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def test_tls_backend_reuses_too(module_containers, module_proxy, tls_backend_files, host, test_network):
    """wakeproxy.scheme=https (TLS to the backend, ALPN http/1.1): the same reuse, counted with ss."""
    h = host("h2reuse-tls")
    c = module_containers("h2reuse-tls", labels={"wakeproxy.host": h, "wakeproxy.scheme": "https",
                                                 "wakeproxy.port": "8443"},
                          env={**tls_backend_files["env"], "PORT": "8443"}, volumes=tls_backend_files["volumes"])
    ip = container_ip(c, test_network)
    p = module_proxy()
    wait_for(lambda: httpx.get(p.http_url + "/", headers={"Host": h}, trust_env=False).json()["tls"], 15, 0.1,
             "TLS site via proxy")
    time.sleep(0.2)
    waiting_before = _sockets("time-wait", ip, 8443)
    with httpx.Client(base_url=p.https_url, http2=True, verify=False, trust_env=False, timeout=20,
                      headers={"Host": h}) as client:
        answers = [client.get(f"/tls/{i}", extensions={"sni_hostname": h}) for i in range(30)]
        open_now = _sockets("established", ip, 8443)
    assert [r.status_code for r in answers] == [200] * 30 and answers[0].http_version == "HTTP/2"
    assert all(r.json()["tls"] for r in answers)
    assert open_now <= 2, open_now
    assert _sockets("time-wait", ip, 8443) - waiting_before <= 2
