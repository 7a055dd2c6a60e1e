"""wakeproxy.router: Host → backend, forwarded headers, error answers, hand-over to the waker,
streaming, WebSocket history."""

from __future__ import annotations

import asyncio
from ipaddress import ip_network

import pytest
import wakeproxy.routing.router as router_mod
from mitmproxy import http, websocket
from mitmproxy.test import taddons, tflow
from mitmproxy.test.tutils import treq, tresp
from wakeproxy.config import Config, ForwardedConfig, SourcesConfig, parse_config
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.router import WEBSOCKET_HISTORY, WEBSOCKET_HISTORY_BYTES, Router
from wakeproxy.routing.snapshot import Policy, Snapshot, build_snapshot
from wakeproxy.routing.watch import Watch
from wakeproxy.runtime import Runtime
from wakeproxy.wake.waker import CONTROL_PREFIX, Waker

CLIENT = ("192.0.2.7", 5555)
TRUSTED = ForwardedConfig(trusted_proxies=(ip_network("192.0.2.0/24"),))


def c(name, host, state="running", networks=None, labels=None, project=None) -> ContainerInfo:
    labels = {"wakeproxy.host": host, **(labels or {})}
    if project:
        labels["com.docker.compose.project"] = project
    if networks is None:
        networks = {"bridge": "172.17.0.2"} if state == "running" else {"bridge": ""}
    return ContainerInfo(id=f"id-{name}", name=name, state=state, labels=labels, networks=networks)


class FakeWaker:
    """Stands in for the Waker: records what the router hands over, never touches Docker."""

    def __init__(self, hold=None, busy_groups=()) -> None:
        self.calls: list[tuple] = []
        self.hold = hold  # an async function(flow, site, host, forward) to return from asleep()
        self.busy_groups = set(busy_groups)  # groups "waking or stopping"
        self.runtime = None

    def busy(self, site):
        stopping = self.runtime.stopping if self.runtime is not None else {}
        return any(g in self.busy_groups or g in stopping for g in site.groups)

    def asleep(self, flow, site, host, forward):
        self.calls.append(("asleep", flow, site, host, forward))
        return self.hold(flow, site, host, forward) if self.hold else None

    def control(self, flow, site, host):
        self.calls.append(("control", flow, site, host))
        flow.response = http.Response.make(200, b"control")
        return None


def snap(*containers, allowed=(), synced=True, drivers=None) -> Snapshot:
    return build_snapshot(containers, SourcesConfig(), tuple(allowed), drivers or {}, synced=synced)


def make_router(*containers, allowed=(), config=None, synced=True, snapshot=None, waker=None, drivers=None) -> Router:
    config = config or Config()
    if snapshot is None:
        snapshot = snap(*containers, allowed=allowed, synced=synced, drivers=drivers)
    waker = waker or FakeWaker()
    runtime = Runtime(config=config, snapshot=snapshot)
    if isinstance(waker, FakeWaker):
        waker.runtime = runtime
    return Router(runtime, waker)


def plain_router() -> Router:
    return Router(Runtime(), FakeWaker())


def make_flow(host: str | None = "a.test", headers=(), peer=CLIENT, sock=("127.0.0.1", 8080), tls=False,
              http2=False) -> http.HTTPFlow:
    hdrs = http.Headers([(k.encode(), v.encode()) for k, v in headers])
    if http2:
        req = treq(http_version=b"HTTP/2.0", authority=(host or "").encode(), headers=hdrs, host="placeholder", port=1)
    else:
        if host is not None:
            hdrs.insert(0, "Host", host)
        req = treq(headers=hdrs, host="placeholder", port=1)
    f = tflow.tflow(req=req)
    f.client_conn.peername = peer
    f.client_conn.sockname = sock
    f.client_conn.timestamp_tls_setup = 946681201.0 if tls else None
    return f


def route(router: Router, flow: http.HTTPFlow) -> http.HTTPFlow:
    router.requestheaders(flow)
    return flow


WEB = c("web", "a.test", labels={"wakeproxy.port": "8080"}, project="proj")


# --- routing ----------------------------------------------------------------------------------


def test_tls_helper_is_what_the_router_reads():
    assert make_flow(tls=True).client_conn.tls_established
    assert not make_flow(tls=False).client_conn.tls_established


def test_upstream_becomes_the_backend_and_host_is_kept():
    f = route(make_router(WEB), make_flow("A.test:8080"))
    assert f.response is None
    assert (f.request.scheme, f.request.host, f.request.port) == ("http", "172.17.0.2", 8080)
    assert f.request.headers.get_all("Host") == ["A.test:8080"]
    assert f.request.host_header == "A.test:8080"
    assert f.metadata["wakeproxy.container"] == "web"
    assert f.metadata["wakeproxy.group"] == "proj"


def test_https_backend():
    router = make_router(c("web", "a.test", labels={"wakeproxy.scheme": "https", "wakeproxy.port": "443"}))
    f = route(router, make_flow("a.test"))
    assert (f.request.scheme, f.request.host, f.request.port) == ("https", "172.17.0.2", 443)
    assert f.request.headers["Host"] == "a.test"


def test_http2_authority_is_kept_and_no_host_header_added():
    f = route(make_router(WEB), make_flow("a.test", http2=True))
    assert f.response is None
    assert (f.request.host, f.request.port) == ("172.17.0.2", 8080)
    assert f.request.authority == "a.test"
    assert "Host" not in f.request.headers
    assert f.request.host_header == "a.test"
    assert f.request.headers["X-Forwarded-Host"] == "a.test"


def test_http2_with_a_host_header_too():
    f = make_flow("a.test", http2=True, headers=[("Host", "a.test")])
    route(make_router(WEB), f)
    assert f.request.authority == "a.test"
    assert f.request.headers["Host"] == "a.test"


def test_wildcard_site_routes():
    router = make_router(c("wild", "*.example.com", networks={"bridge": "172.17.0.9"}))
    f = route(router, make_flow("Deep.Sub.example.com"))
    assert f.request.host == "172.17.0.9"
    assert f.request.headers["Host"] == "Deep.Sub.example.com"


def test_forwarded_headers_plain_http():
    f = route(make_router(WEB), make_flow("a.test:8080"))
    h = f.request.headers
    assert h["X-Forwarded-For"] == "192.0.2.7"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Forwarded-Host"] == "a.test:8080"
    assert h["X-Forwarded-Port"] == "8080"
    assert h["X-Real-IP"] == "192.0.2.7"


def test_forwarded_headers_tls():
    f = route(make_router(WEB), make_flow("a.test", tls=True, sock=("10.0.0.1", 443)))
    assert f.request.headers["X-Forwarded-Proto"] == "https"
    assert f.request.headers["X-Forwarded-Port"] == "443"


def test_ipv4_mapped_client_address():
    f = route(make_router(WEB), make_flow(peer=("::ffff:192.0.2.7", 5555, 0, 0)))
    assert f.request.headers["X-Forwarded-For"] == "192.0.2.7"
    assert f.request.headers["X-Real-IP"] == "192.0.2.7"


def test_ipv6_client_address():
    f = route(make_router(WEB), make_flow(peer=("2001:db8::5", 5555, 0, 0)))
    assert f.request.headers["X-Forwarded-For"] == "2001:db8::5"


SPOOFED = [
    ("X-Forwarded-For", "198.51.100.1"),
    ("x-forwarded-for", "198.51.100.2"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.test"),
    ("X-Forwarded-Port", "1"),
    ("X-Real-IP", "198.51.100.9"),
]


def test_untrusted_client_forwarded_headers_are_replaced():
    f = route(make_router(WEB), make_flow("a.test", headers=SPOOFED))
    h = f.request.headers
    assert h.get_all("X-Forwarded-For") == ["192.0.2.7"]
    assert h.get_all("X-Forwarded-Proto") == ["http"]
    assert h.get_all("X-Forwarded-Host") == ["a.test"]
    assert h.get_all("X-Forwarded-Port") == ["8080"]
    assert h.get_all("X-Real-IP") == ["192.0.2.7"]


def test_untrusted_client_cannot_pass_other_x_forwarded_headers():
    f = route(make_router(WEB), make_flow("a.test", headers=[("X-Forwarded-Ssl", "on"), ("X-Forwarded-Scheme", "https"),
                                                             ("X-Forwarded-Prefix", "/admin")]))
    h = f.request.headers
    assert "X-Forwarded-Ssl" not in h
    assert "X-Forwarded-Scheme" not in h
    assert "X-Forwarded-Prefix" not in h


def test_trusted_proxy_forwarded_headers_are_kept_and_xff_appended():
    router = make_router(WEB, config=Config(forwarded=TRUSTED))
    f = route(router, make_flow("a.test", headers=SPOOFED))
    h = f.request.headers
    assert h.get_all("X-Forwarded-For") == ["198.51.100.1, 198.51.100.2, 192.0.2.7"]
    assert h["X-Forwarded-Proto"] == "https"
    assert h["X-Forwarded-Host"] == "evil.test"
    assert h["X-Forwarded-Port"] == "1"
    assert h["X-Real-IP"] == "198.51.100.9"


def test_trusted_proxy_without_forwarded_headers_gets_ours():
    router = make_router(WEB, config=Config(forwarded=TRUSTED))
    f = route(router, make_flow("a.test", tls=True, sock=("10.0.0.1", 443)))
    h = f.request.headers
    assert h["X-Forwarded-For"] == "192.0.2.7"
    assert h["X-Forwarded-Proto"] == "https"
    assert h["X-Forwarded-Host"] == "a.test"
    assert h["X-Forwarded-Port"] == "443"
    assert h["X-Real-IP"] == "192.0.2.7"


def test_trusted_range_does_not_cover_other_peers():
    router = make_router(WEB, config=Config(forwarded=TRUSTED))
    f = route(router, make_flow("a.test", headers=SPOOFED, peer=("198.18.0.1", 1)))
    assert f.request.headers.get_all("X-Forwarded-For") == ["198.18.0.1"]
    assert f.request.headers["X-Forwarded-Proto"] == "http"


def test_round_robin_over_ready_backends():
    router = make_router(
        c("w1", "a.test", networks={"bridge": "10.0.0.1"}, project="p"),
        c("w2", "a.test", networks={"bridge": "10.0.0.2"}, project="p"),
        c("w0", "a.test", state="exited", project="p"),
    )
    seen = [route(router, make_flow("a.test")).request.host for _ in range(4)]
    assert seen == ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"]


def test_round_robin_is_per_site():
    router = make_router(
        c("a1", "a.test", networks={"bridge": "10.0.0.1"}, project="p"),
        c("a2", "a.test", networks={"bridge": "10.0.0.2"}, project="p"),
        c("b1", "b.test", networks={"bridge": "10.0.1.1"}, project="p"),
        c("b2", "b.test", networks={"bridge": "10.0.1.2"}, project="p"),
    )
    assert route(router, make_flow("a.test")).request.host == "10.0.0.1"
    assert route(router, make_flow("b.test")).request.host == "10.0.1.1"
    assert route(router, make_flow("a.test")).request.host == "10.0.0.2"
    assert route(router, make_flow("b.test")).request.host == "10.0.1.2"


def test_new_snapshot_is_seen_by_the_next_request():
    router = make_router(WEB)
    router.runtime.publish(snap(c("web", "a.test", networks={"bridge": "172.17.0.99"})))
    assert route(router, make_flow("a.test")).request.host == "172.17.0.99"


# --- unknown hosts, startup, default host ---------------------------------------------------


def body(f: http.HTTPFlow) -> str:
    return f.response.get_text()


def test_unknown_host_plain_text_404():
    f = route(make_router(WEB), make_flow("nope.test", headers=[("Accept", "*/*")]))
    assert f.response.status_code == 404
    assert f.response.headers["Content-Type"].startswith("text/plain")
    text = body(f)
    assert text.endswith("\n") and text.count("\n") == 1
    assert text.startswith("wakeproxy: 404 ")
    assert "'nope.test'" in text
    assert f.request.host == "placeholder"  # not routed anywhere


def test_unknown_host_html_404():
    f = route(make_router(WEB), make_flow("nope.test", headers=[("Accept", "text/html,application/xhtml+xml;q=0.9")]))
    assert f.response.status_code == 404
    assert f.response.headers["Content-Type"].startswith("text/html")
    text = body(f)
    assert text.lstrip().lower().startswith("<!doctype html")
    assert "Unknown site" in text and "nope.test" in text


def test_missing_host_header_404():
    f = route(make_router(WEB), make_flow(None))
    assert f.response.status_code == 404
    assert "(no Host header)" in body(f)


def test_before_the_first_listing_a_request_is_held_then_routed():
    async def run():
        router = make_router(snapshot=Snapshot())
        f = make_flow("a.test")
        held = router.requestheaders(f)
        assert held is not None and f.response is None
        task = asyncio.ensure_future(held)
        await asyncio.sleep(0.05)
        assert not task.done()
        router.runtime.publish(snap(WEB))
        await asyncio.wait_for(task, 2)
        return f

    f = asyncio.run(run())
    assert f.response is None and f.request.host == "172.17.0.2"


def test_not_synced_after_the_hold_503_with_retry_after(monkeypatch):
    monkeypatch.setattr(router_mod, "STARTUP_HOLD", 0.1)

    async def run(router, host):
        f = make_flow(host)
        held = router.requestheaders(f)
        assert held is not None
        await asyncio.wait_for(held, 2)
        return f

    f = asyncio.run(run(make_router(snapshot=Snapshot()), "a.test"))
    assert f.response.status_code == 503
    assert f.response.headers["Retry-After"] == "5"
    assert body(f).count("\n") == 1
    # A partial snapshot (never the case today, but cheap to get right): what it knows is routed.
    f = asyncio.run(run(make_router(c("other", "b.test"), synced=False), "b.test"))
    assert f.response is None and f.request.host == "172.17.0.2"
    f = asyncio.run(run(make_router(c("other", "b.test"), synced=False), "a.test"))
    assert f.response.status_code == 503 and "Retry-After" in f.response.headers


def test_default_host_answers_unknown_hosts():
    router = make_router(WEB, c("fb", "fallback.test", networks={"bridge": "172.17.0.50"}),
                         config=Config(default_host="fallback.test"))
    f = route(router, make_flow("unknown.test"))
    assert f.response is None
    assert f.request.host == "172.17.0.50"
    assert f.request.headers["Host"] == "unknown.test"
    assert f.request.headers["X-Forwarded-Host"] == "unknown.test"
    # a known host still goes to its own site
    assert route(router, make_flow("a.test")).request.host == "172.17.0.2"
    # and so does a request without a Host header
    assert route(router, make_flow(None)).request.host == "172.17.0.50"


def test_default_host_that_nobody_declares_is_404():
    router = make_router(WEB, config=Config(default_host="fallback.test"))
    assert route(router, make_flow("unknown.test")).response.status_code == 404


# --- sites without a usable backend ------------------------------------------------------------


ASLEEP = c("web", "a.test", state="exited", labels={"wakeproxy.port": "8080"})


def test_asleep_site_is_handed_to_the_waker():
    waker = FakeWaker()
    router = make_router(ASLEEP, waker=waker)
    f = make_flow("A.test:80")
    assert router.requestheaders(f) is None  # what the waker returned
    assert len(waker.calls) == 1
    kind, flow, site, host, forward = waker.calls[0]
    assert (kind, flow, host) == ("asleep", f, "a.test")
    assert site is router.runtime.snapshot.lookup("a.test")
    assert f.response is None
    assert f.request.host == "placeholder"  # not routed yet
    assert "X-Forwarded-For" not in f.request.headers


def test_the_wakers_coroutine_is_returned_for_mitmproxy_to_await():
    async def hold(flow, site, host, forward):
        pass

    router = make_router(ASLEEP, waker=FakeWaker(hold))
    coro = router.requestheaders(make_flow("a.test"))
    assert asyncio.iscoroutine(coro)
    asyncio.run(coro)


NETS = {"proxy": "bridge", "other": "bridge"}


@pytest.mark.parametrize("state", ["exited", "paused", "created"])
def test_any_wakeable_backend_goes_to_the_waker(state):
    waker = FakeWaker()
    router = make_router(c("web", "a.test", state=state, networks={"proxy": ""}, project="p"),
                         c("api", "a.test", networks={"other": "172.20.0.2"}, project="p"),  # running, but unreachable
                         allowed=("proxy",), drivers=NETS, waker=waker)
    router.requestheaders(make_flow("a.test"))
    assert [call[0] for call in waker.calls] == ["asleep"]


def test_stopped_container_on_a_foreign_network_is_unreachable_not_woken():
    waker = FakeWaker()
    router = make_router(c("web", "a.test", state="exited", networks={"other": ""}),
                         allowed=("proxy",), drivers=NETS, waker=waker, config=DEBUG)
    f = route(router, make_flow("a.test"))
    assert waker.calls == []
    assert f.response.status_code == 503
    assert "cannot be reached" in body(f) and "other" in body(f)


def test_a_group_being_put_to_sleep_goes_to_the_waker_although_ready():
    waker = FakeWaker()
    router = make_router(WEB, waker=waker)
    router.runtime.stopping["proj"] = None  # type: ignore[assignment]  # the idle keeper's task
    f = make_flow("a.test")
    router.requestheaders(f)
    assert [call[0] for call in waker.calls] == ["asleep"]
    assert f.request.host == "placeholder"
    router.runtime.stopping.clear()
    assert route(router, make_flow("a.test")).request.host == "172.17.0.2"


def test_forward_after_wake_routes_to_the_fresh_snapshot():
    waker = FakeWaker()
    router = make_router(ASLEEP, waker=waker)
    f = make_flow("a.test")
    router.requestheaders(f)
    _, _, site, _, forward = waker.calls[0]
    router.runtime.publish(snap(c("web", "a.test", labels={"wakeproxy.port": "8080"},
                                  networks={"bridge": "172.17.0.42"})))
    forward(f, site)
    assert f.response is None
    assert (f.request.host, f.request.port) == ("172.17.0.42", 8080)
    assert f.request.headers["Host"] == "a.test"
    assert f.request.headers["X-Forwarded-For"] == "192.0.2.7"


def test_forward_after_wake_without_a_ready_backend_is_502():
    waker = FakeWaker()
    router = make_router(ASLEEP, waker=waker)
    f = make_flow("a.test")
    router.requestheaders(f)
    _, _, site, _, forward = waker.calls[0]
    forward(f, site)  # the snapshot still says exited
    assert f.response.status_code == 502
    assert "'a.test'" in body(f)
    assert f.request.host == "placeholder"


def test_held_request_is_forwarded_through_mitmproxy():
    async def hold(flow, site, host, forward):
        await asyncio.sleep(0)
        router.runtime.publish(snap(c("web", "a.test", labels={"wakeproxy.port": "8080"},
                                      networks={"bridge": "172.17.0.43"})))
        forward(flow, site)

    router = make_router(ASLEEP, waker=FakeWaker(hold))
    with taddons.context(router) as tctx:
        f = make_flow("a.test")
        asyncio.run(tctx.cycle(router, f))
    assert f.response is None
    assert (f.request.host, f.request.port) == ("172.17.0.43", 8080)


def test_real_waker_refuses_ignored_user_agents_without_docker():
    config = parse_config('wake:\n  ignore_user_agents: ["bot"]\n')
    runtime = Runtime(config=config, snapshot=snap(ASLEEP))
    waker = Waker(runtime)
    router = Router(runtime, waker)
    f = make_flow("a.test", headers=[("User-Agent", "Mozilla/5.0 (compatible; Googlebot/2.1)")])
    assert router.requestheaders(f) is None
    assert f.response.status_code == 503
    assert "Retry-After" in f.response.headers
    assert "'a.test'" in body(f)
    assert not waker.is_waking("web")  # no wake was started


def test_control_path_goes_to_the_waker_even_for_a_ready_site():
    waker = FakeWaker()
    router = make_router(WEB, waker=waker)
    f = make_flow("a.test")
    f.request.path = CONTROL_PREFIX + "wait"
    router.requestheaders(f)
    assert [call[0] for call in waker.calls] == ["control"]
    assert waker.calls[0][3] == "a.test"
    assert f.request.host == "placeholder"


def test_control_path_of_an_unknown_host_is_404():
    waker = FakeWaker()
    f = make_flow("nope.test")
    f.request.path = CONTROL_PREFIX + "wait"
    make_router(WEB, waker=waker).requestheaders(f)
    assert f.response.status_code == 404
    assert waker.calls == []


DEBUG = Config(debug_clients=(ip_network("192.0.2.0/24"),))  # CLIENT is a debug client


def test_unreachable_503_tells_an_anonymous_client_nothing_internal():
    router = make_router(c("web", "a.test", networks={"other": "172.20.0.2"}), allowed=("proxy",))
    for accept in ("*/*", "text/html"):
        f = route(router, make_flow("a.test", headers=[("Accept", accept)]))
        assert f.response.status_code == 503
        text = body(f)
        assert "a.test" in text
        for secret in ("web", "other", "172.20", "proxy may only use"):
            assert secret not in text, (secret, text)


def test_unreachable_503_with_the_problem():
    waker = FakeWaker()
    router = make_router(c("web", "a.test", networks={"other": "172.20.0.2"}), allowed=("proxy",), waker=waker,
                         config=DEBUG)
    f = route(router, make_flow("a.test"))
    assert waker.calls == []  # running: nothing to wake
    assert f.response.status_code == 503
    problem = router.runtime.snapshot.lookup("a.test").backends[0].problem
    assert problem
    text = body(f)
    assert problem in text
    assert text.count("\n") == 1
    assert f.request.host == "placeholder"


def test_unreachable_html_escapes_the_problem():
    router = make_router(c("web", "a.test", networks={"other": "172.20.0.2"}), allowed=("proxy",), config=DEBUG)
    f = route(router, make_flow("a.test", headers=[("Accept", "text/html")]))
    assert f.response.status_code == 503
    assert "container &#x27;web&#x27; cannot be reached" in body(f)


# --- a flow that is already answered ------------------------------------------------------------


def test_flow_with_a_response_is_left_alone():
    f = make_flow("a.test")
    f.response = tresp(status_code=200, content=b"acme")
    before = (f.request.host, f.request.port, f.request.scheme, f.request.headers.copy())
    route(make_router(WEB), f)
    assert f.response.status_code == 200 and f.response.content == b"acme"
    assert (f.request.host, f.request.port, f.request.scheme, f.request.headers) == before
    assert "X-Forwarded-For" not in f.request.headers


def test_flow_with_a_response_is_left_alone_even_for_unknown_hosts():
    f = make_flow("nope.test")
    f.response = tresp(status_code=204)
    route(make_router(WEB), f)
    assert f.response.status_code == 204


# --- responseheaders: streaming -------------------------------------------------------------------


def response_flow(**headers) -> http.HTTPFlow:
    f = tflow.tflow(resp=True)
    f.response.headers.clear()
    for k, v in headers.items():
        f.response.headers[k.replace("_", "-")] = v
    return f


@pytest.mark.parametrize(
    "headers, streamed",
    [
        ({"Content-Type": "text/event-stream"}, True),
        ({"Content-Type": "text/event-stream; charset=utf-8"}, True),
        ({"Content-Type": "text/html", "X-Accel-Buffering": "no"}, True),
        ({"Content-Type": "text/html", "X-Accel-Buffering": "No"}, True),
        ({"Content-Type": "text/html", "X-Accel-Buffering": "yes"}, False),
        ({"Content-Type": "text/html"}, False),
        ({"Content-Type": "application/json"}, False),
        ({}, False),
    ],
)
def test_responseheaders_streams_sse_and_unbuffered(headers, streamed):
    f = response_flow(**headers)
    plain_router().responseheaders(f)
    assert f.response.stream is streamed


def test_responseheaders_keeps_an_existing_stream_setting():
    f = response_flow(Content_Type="text/event-stream")

    def chunked(data: bytes) -> bytes:
        return data

    f.response.stream = chunked
    plain_router().responseheaders(f)
    assert f.response.stream is chunked


def test_responseheaders_without_response():
    f = tflow.tflow()
    plain_router().responseheaders(f)
    assert f.response is None


# --- websocket history ----------------------------------------------------------------------------


def ws_messages(n: int) -> list[websocket.WebSocketMessage]:
    return [websocket.WebSocketMessage(1, i % 2 == 0, f"m{i}".encode()) for i in range(n)]


def test_websocket_history_is_trimmed_to_the_last_100():
    assert WEBSOCKET_HISTORY == 100
    f = tflow.twebsocketflow()
    f.websocket.messages = ws_messages(150)
    plain_router().websocket_message(f)
    assert len(f.websocket.messages) == 100
    assert [m.content for m in f.websocket.messages] == [f"m{i}".encode() for i in range(50, 150)]


def test_websocket_history_keeps_at_most_a_mebibyte_of_sent_messages():
    f = tflow.twebsocketflow()
    big = [websocket.WebSocketMessage(2, True, bytes([i]) * 300_000) for i in range(10)]
    f.websocket.messages = list(big)
    plain_router().websocket_message(f)
    assert f.websocket.messages[-1] is big[-1]  # the one being sent stays, whatever its size
    sent = f.websocket.messages[:-1]
    assert sum(len(m.content) for m in sent) <= WEBSOCKET_HISTORY_BYTES and sent == big[-4:-1]


def test_websocket_history_counted_as_messages_come_holds_both_bounds():
    import random

    rnd = random.Random(7)
    f = tflow.twebsocketflow()
    f.websocket.messages = []
    r = plain_router()
    for i in range(400):
        f.websocket.messages.append(websocket.WebSocketMessage(2, True, b"x" * rnd.choice([1, 500, 40_000, 300_000])))
        r.websocket_message(f)
        sent = f.websocket.messages[:-1]
        assert len(f.websocket.messages) <= WEBSOCKET_HISTORY
        assert sum(len(m.content) for m in sent) <= WEBSOCKET_HISTORY_BYTES
        assert f.metadata["wakeproxy.ws_history_bytes"] == sum(len(m.content) for m in sent), i


@pytest.mark.parametrize("n", [0, 1, 99, 100])
def test_websocket_history_short_is_untouched(n):
    f = tflow.twebsocketflow()
    msgs = ws_messages(n)
    f.websocket.messages = list(msgs)
    plain_router().websocket_message(f)
    assert f.websocket.messages == msgs


# --- through mitmproxy's addon machinery -----------------------------------------------------------


def test_hooks_run_through_mitmproxy():
    router = make_router(WEB)
    with taddons.context(router) as tctx:
        f = make_flow("a.test")
        asyncio.run(tctx.cycle(router, f))
        assert f.request.host == "172.17.0.2" and f.request.port == 8080
        assert f.request.headers["Host"] == "a.test"

        f = make_flow("nope.test")
        asyncio.run(tctx.cycle(router, f))
        assert f.response.status_code == 404

        f = tflow.twebsocketflow()  # already answered (101): only the message hook acts
        f.websocket.messages = ws_messages(250)
        asyncio.run(tctx.cycle(router, f))
        assert len(f.websocket.messages) == 100
        assert f.websocket.messages[-1].content == b"m249"


def test_sse_streams_through_mitmproxy():
    router = make_router(WEB)
    with taddons.context(router) as tctx:
        f = response_flow(Content_Type="text/event-stream")
        asyncio.run(tctx.cycle(router, f))
        assert f.response.stream is True


def test_requests_for_a_waking_group_join_the_wake_even_when_docker_says_running():
    """Running in Docker's view is not ready: while a wake is on, requests join it."""
    waker = FakeWaker(busy_groups={"proj"})
    router = make_router(WEB, waker=waker)
    f = make_flow("a.test")
    router.requestheaders(f)
    assert [c[0] for c in waker.calls] == ["asleep"]
    assert f.request.host != "172.17.0.2"


# --- paths ---------------------------------------------------------------------------------------


def at(host: str, path: str, **kw) -> http.HTTPFlow:
    f = make_flow(host, **kw)
    f.request.path = path
    return f


def api(name: str, ip: str, path: str = "/api", state: str = "running", **kw) -> ContainerInfo:
    return c(name, "a.test", state=state, networks={"bridge": ip} if state == "running" else None,
             labels={"wakeproxy.path": path}, project="p", **kw)


PATHS = (c("web", "a.test", networks={"bridge": "10.0.0.1"}, project="p"), api("api", "10.0.0.2"),
         ContainerInfo(id="id-health", name="health", state="running", networks={"bridge": "10.0.0.3"},
                       labels={"traefik.http.routers.h.rule": "Host(`a.test`) && Path(`/api/health`)",
                               "com.docker.compose.project": "p"}))


@pytest.mark.parametrize(
    "path, ip",
    [("/", "10.0.0.1"), ("/apix", "10.0.0.1"), ("/index.html?api", "10.0.0.1"),
     ("/api", "10.0.0.2"), ("/api/", "10.0.0.2"), ("/api?q=1", "10.0.0.2"), ("/api/v1/users", "10.0.0.2"),
     ("/api/health", "10.0.0.3"), ("/api/health?full", "10.0.0.3"), ("/api/health/x", "10.0.0.2")],
)
def test_the_longest_matching_path_chooses_the_container(path, ip):
    f = route(make_router(*PATHS), at("a.test", path))
    assert f.response is None
    assert f.request.host == ip
    assert f.request.path == path  # forwarded unchanged


def test_round_robin_is_per_path():
    router = make_router(c("w1", "a.test", networks={"bridge": "10.0.0.1"}, project="p"),
                         c("w2", "a.test", networks={"bridge": "10.0.0.2"}, project="p"),
                         api("a1", "10.0.1.1"), api("a2", "10.0.1.2"))
    seen = [route(router, at("a.test", p)).request.host for p in ("/", "/api/x", "/api", "/x", "/", "/api")]
    assert seen == ["10.0.0.1", "10.0.1.1", "10.0.1.2", "10.0.0.2", "10.0.0.1", "10.0.1.1"]


def test_a_path_no_container_declares_is_404():
    router = make_router(api("api", "10.0.0.2"))
    f = route(router, at("a.test", "/", headers=[("Accept", "*/*")]))
    assert f.response.status_code == 404
    assert "has no container for this path" in body(f)
    assert f.request.host == "placeholder"
    assert route(router, at("a.test", "/api/x")).request.host == "10.0.0.2"


def test_a_sleeping_path_wakes_the_group_though_another_path_is_up():
    waker = FakeWaker()
    router = make_router(c("web", "a.test", networks={"bridge": "10.0.0.1"}, project="p"),
                         api("api", "", state="exited"), waker=waker)
    assert route(router, at("a.test", "/")).request.host == "10.0.0.1"
    assert waker.calls == []
    f = at("a.test", "/api/x")
    router.requestheaders(f)
    kind, _, site, _, forward = waker.calls[0]
    assert kind == "asleep" and site.groups == ("p",)
    router.runtime.publish(snap(c("web", "a.test", networks={"bridge": "10.0.0.1"}, project="p"),
                                api("api", "10.0.0.2")))
    forward(f, site)  # after the wake: the path's route in the fresh snapshot
    assert f.request.host == "10.0.0.2"


def test_an_unreachable_path_says_why_for_that_path_only():
    router = make_router(c("web", "a.test", networks={"proxy": "10.0.0.1"}, project="p"),
                         c("api", "a.test", networks={"other": "172.20.0.2"}, project="p",
                           labels={"wakeproxy.path": "/api"}),
                         allowed=("proxy",), drivers=NETS, config=DEBUG)
    f = route(router, at("a.test", "/api"))
    assert f.response.status_code == 503 and "container 'api' cannot be reached" in body(f)
    assert "'web'" not in body(f)
    assert route(router, at("a.test", "/")).request.host == "10.0.0.1"


# --- misconfigured hosts -------------------------------------------------------------------------

BROKEN = c("web", "a.test", labels={"wakeproxy.port": "http"}, project="p")


def test_misconfigured_host_tells_an_anonymous_client_nothing_internal():
    router = make_router(BROKEN, c("b", "b.test"))
    for accept in ("*/*", "text/html"):
        f = route(router, make_flow("a.test", headers=[("Accept", accept)]))
        assert f.response.status_code == 503
        text = body(f)
        assert "misconfigured" in text.lower() and "a.test" in text
        for secret in ("web", "wakeproxy.port", "'http'"):
            assert secret not in text, (secret, text)
        assert f.request.host == "placeholder"
    assert route(router, make_flow("b.test")).response is None


def test_misconfigured_host_shows_the_bad_labels_to_debug_clients():
    f = route(make_router(BROKEN, config=DEBUG), make_flow("a.test"))
    assert f.response.status_code == 503
    assert "container 'web': label wakeproxy.port: 'http' is not a port number" in body(f)
    assert body(f).count("\n") == 1


def test_misconfigured_wildcard_and_it_beats_the_default_host():
    config = parse_config('default_host: www.test\nnames: {reserved: {www.test: home}, allow: ["*.w.test", www.test]}')
    policy = Policy.from_config(config)
    snapshot = build_snapshot([c("w", "*.w.test", labels={"wakeproxy.scheme": "gopher"}, project="p"),
                               c("home", "www.test", project="home", networks={"bridge": "10.9.9.9"})],
                              SourcesConfig(), (), {}, policy=policy)
    assert set(snapshot.misconfigured) == {"*.w.test"}
    router = make_router(snapshot=snapshot, config=config)
    assert route(router, make_flow("x.w.test")).response.status_code == 503
    assert route(router, make_flow("unknown.test")).request.host == "10.9.9.9"  # the default host still


def test_an_unknown_host_is_still_unknown():
    f = route(make_router(BROKEN), make_flow("other.test"))
    assert f.response.status_code == 404 and "Unknown site" in body(f)


# --- the debug UI (routing/watch.py) -----------------------------------------------------------


def _watched_router(watch: Watch) -> Router:
    r = make_router(WEB, c("other", "b.test", project="other"))
    r.runtime.watch = watch
    return r


def test_a_watched_site_goes_through_the_debug_ui_and_the_rest_directly():
    r = _watched_router(Watch(hosts=frozenset({"a.test"}), proxy=("127.0.0.1", 4321), key="k"))
    shared = make_flow("a.test").server_conn
    f = route(r, make_flow("a.test"))
    assert f.server_conn.via == ("http", ("127.0.0.1", 4321))
    assert f.server_conn is not shared and (f.request.host, f.request.port) == ("172.17.0.2", 8080)
    assert f.server_conn.address == ("172.17.0.2", 8080)
    other = route(r, make_flow("b.test"))
    assert other.server_conn.via is None
    assert other.request.host_header == "b.test"


def test_a_watched_group_covers_its_sites_and_a_ui_that_is_not_up_watches_nothing():
    r = _watched_router(Watch(groups=frozenset({"proj"}), proxy=("127.0.0.1", 4321), key="k"))
    assert route(r, make_flow("a.test")).server_conn.via is not None
    assert route(r, make_flow("b.test")).server_conn.via is None
    down = _watched_router(Watch(hosts=frozenset({"a.test"}), proxy=None, key="k"))
    assert route(down, make_flow("a.test")).server_conn.via is None


def test_the_connect_to_the_debug_ui_carries_the_workers_key_and_no_other_connect_does():
    r = _watched_router(Watch(hosts=frozenset({"a.test"}), proxy=("127.0.0.1", 4321), key="sekrit"))
    f = tflow.tflow()
    f.server_conn.address = ("127.0.0.1", 4321)
    r.http_connect_upstream(f)
    assert f.request.headers["Proxy-Authorization"] == "Bearer sekrit"
    g = tflow.tflow()
    g.server_conn.address = ("203.0.113.9", 3128)
    r.http_connect_upstream(g)
    assert "Proxy-Authorization" not in g.request.headers


def test_the_watch_crosses_the_channel_as_it_is():
    from wakeproxy.planes.wire import roundtrip

    w = Watch(frozenset({"a.test", "*.b.test"}), frozenset({"proj"}), ("127.0.0.1", 1), "k")
    assert roundtrip(w) == w
