"""Our page, not mitmproxy's, when mitmproxy answers a request itself (a guarded adaptation).

When a backend cannot be reached or breaks off its answer (and when mitmproxy refuses a
request it cannot parse), mitmproxy's HTTP layer sends a `ResponseProtocolError` event to
the client's connection layer, which renders it there:

- HTTP/1 (`proxy/layers/http/_http1.py`): `Http1Server.send` → the module function
  `make_error_response(code, message)`, also called by `Http1Server.read_headers` for an
  unparseable request line. Its page echoes the message (`[Errno 113] Connect call failed
  ('172.28.0.3', 80)`, or the whole bad request line) under `Server: mitmproxy 11.0.2`.
- HTTP/2 (`_http2.py`): `Http2Connection._handle_event` sends `:status`, `server: mitmproxy …`
  and the same HTML inline.

This module replaces those answers with `pages.error_response`: 502 (504 when the message
says the connection timed out, mitmproxy's own code otherwise, e.g. 400), internal detail
(mitmproxy's message, with addresses) only for `debug_clients`, and never a Server header.

- `_http1.make_error_response` is replaced (a module global looked up at call time): a bare
  page without detail, for the places that know no client.
- `Http1Server.send` and `Http2Server._handle_event` are wrapped: a `ResponseProtocolError`
  that mitmproxy would answer with its page is answered with ours instead, under exactly
  mitmproxy's conditions (HTTP/2: the stream is open for us and no headers were sent yet).
- `Http2Server.handle_h2_event` is wrapped: an HTTP/2 request whose `:authority` is not
  `hostname[:port]` (CR/LF, user info…) gets our 400 on its stream. mitmproxy would fail to
  parse it and end the whole connection (GOAWAY) before any addon sees a request.

The `UpstreamErrors` addon renders the page (it knows the config) and logs upstream failures
throttled. `install()` checks every attribute used; when mitmproxy is not the shape expected,
it logs ONE warning and leaves mitmproxy alone.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, http

from wakeproxy import pages
from wakeproxy.mitm.guard import Fallback
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.runtime import Runtime

logger = get_logger(__name__)

_MARK = "_wakeproxy_errorpages"
_ORIGINALS: dict[str, Any] = {}
FALLBACK = Fallback("its own error pages (with internal "
                           "addresses and a Server header) are sent when a backend fails")
# Attribute on the client Connection: (error message, request) of the flow whose error hook ran
# last; the HTTP/2 layer, which keeps no requests, uses it to pick HTML or plain text.
FAILED = "_wakeproxy_failed"
MAX_DETAIL = 300

# (status, message, client Connection, request or None) → the response to send
Renderer = Callable[[int, str, Any, "http.Request | None"], http.Response]

_TITLES = {
    400: ("Bad request", "The request could not be understood.", "Fix the client: this request is never forwarded."),
    413: ("Request too large", "The request body is larger than this server accepts.", "Send less."),
    502: ("Bad gateway", "The site's server could not be reached or broke off its answer.",
          "Try again in a moment; if it persists, the site's container needs attention."),
    504: ("Gateway timeout", "The site's server did not answer in time.", "Try again in a moment."),
}


def http_status(code: Any) -> int | None:
    """The HTTP status mitmproxy would answer a protocol error with, None for none.

    mitmproxy 11 carries an int (444 NO_RESPONSE: send nothing); 12 an `ErrorCode` enum with
    `http_status_code()` (None: send nothing)."""
    to_status = getattr(code, "http_status_code", None)
    if to_status is not None:
        return to_status()
    from mitmproxy.net.http import status_codes

    return None if code == status_codes.NO_RESPONSE else int(code)


def status_for(code: int, message: str) -> int:
    lower = message.lower()
    if code == 502 and ("timed out" in lower or "timeout" in lower or "[errno 110]" in lower):
        return 504
    return code if 400 <= code < 600 else 502


def bare_page(code: int, message: str, client: Any = None, request: http.Request | None = None,
              detail: bool = False) -> http.Response:
    """Our page for `code`; mitmproxy's `message` only when `detail` (it holds internal addresses)."""
    status = status_for(code, message)
    title, text, hint = _TITLES.get(status, ("Error", "The request could not be completed.", ""))
    if detail and message:
        text = f"{text} ({pages.bounded(message, MAX_DETAIL)})"
    if request is not None:
        return pages.error_response(request, status, title, text, hint, "")
    return pages.plain_response(status, title, text, hint)


_renderer: Renderer = bare_page


def set_renderer(render: Renderer | None) -> None:
    global _renderer
    _renderer = render or bare_page


def compatible() -> str | None:
    try:
        import h2.events
        from mitmproxy.connection import ConnectionState
        from mitmproxy.net.http import http1, status_codes
        from mitmproxy.proxy import commands
        from mitmproxy.proxy.layers.http import _http1, _http2
        from mitmproxy.proxy.layers.http._events import ResponseProtocolError
    except ImportError as e:
        return f"import: {e}"
    checks: list[tuple[Any, str]] = [
        (_http1, "make_error_response"), (_http1, "Http1Server"), (_http1.Http1Server, "send"),
        (_http2, "Http2Server"), (_http2.Http2Server, "_handle_event"), (_http2.Http2Server, "is_closed"),
        (_http2.Http2Server, "is_open_for_us"), (_http2.Http2Server, "handle_h2_event"),
        (h2.events, "RequestReceived"), (http1, "assemble_response"), (status_codes, "NO_RESPONSE"),
        (ConnectionState, "CAN_WRITE"), (commands, "SendData"), (commands, "CloseConnection"),
        (ResponseProtocolError, "__init__"),
    ]
    for obj, name in checks:
        if not hasattr(obj, name):
            return f"{getattr(obj, '__name__', obj)}.{name}"
    for cls, names in ((_http1.Http1Connection, ("request", "response", "conn")),
                       (_http2.Http2Connection, ("h2_conn",))):
        annotated = {n for c in cls.__mro__ for n in getattr(c, "__annotations__", {})}
        for name in names:
            if name not in annotated and not hasattr(cls, name):
                return f"{cls.__name__}.{name}"
    return None


def installed() -> bool:
    from mitmproxy.proxy.layers.http import _http1

    return getattr(_http1.Http1Server.send, _MARK, False)


def install() -> bool:
    missing = compatible()
    if missing is not None:
        return FALLBACK.decline(missing)
    if installed():
        return True
    from mitmproxy.proxy.layers.http import _http1, _http2

    _ORIGINALS["make_error_response"] = _http1.make_error_response
    _ORIGINALS["h1_send"] = _http1.Http1Server.send
    _ORIGINALS["h2_handle"] = _http2.Http2Server._handle_event
    _http1.make_error_response = _make_error_response
    setattr(_http1.Http1Server, "send", _wrap_h1_send(_http1.Http1Server.send))
    setattr(_http2.Http2Server, "_handle_event", _wrap_h2_handle_event(_http2.Http2Server._handle_event))
    _ORIGINALS["h2_event"] = _http2.Http2Server.handle_h2_event
    setattr(_http2.Http2Server, "handle_h2_event", _wrap_h2_request_received(_http2.Http2Server.handle_h2_event))
    return True


def uninstall() -> None:
    from mitmproxy.proxy.layers.http import _http1, _http2

    if installed():
        _http1.make_error_response = _ORIGINALS.pop("make_error_response")
        setattr(_http1.Http1Server, "send", _ORIGINALS.pop("h1_send"))
        setattr(_http2.Http2Server, "_handle_event", _ORIGINALS.pop("h2_handle"))
        setattr(_http2.Http2Server, "handle_h2_event", _ORIGINALS.pop("h2_event"))


def _make_error_response(status_code: int, message: str = "") -> bytes:
    from mitmproxy.net.http import http1

    resp = bare_page(status_code, message)
    resp.headers["Connection"] = "close"
    return http1.assemble_response(resp)


def _failed_request(client: Any, message: str) -> http.Request | None:
    failed = getattr(client, FAILED, None)
    if failed is not None and failed[0] == message:
        setattr(client, FAILED, None)
        return failed[1]
    return None


def _wrap_h1_send(original: Any) -> Any:
    from mitmproxy.connection import ConnectionState
    from mitmproxy.net.http import http1
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers.http._events import ResponseProtocolError

    @functools.wraps(original)
    def send(self: Any, event: Any):
        status = http_status(event.code) if isinstance(event, ResponseProtocolError) else None
        if status is not None and self.conn.state & ConnectionState.CAN_WRITE and not self.response:
            request = _failed_request(self.context.client, event.message) or self.request
            resp = _renderer(status, event.message, self.context.client, request)
            resp.headers["Connection"] = "close"
            yield commands.SendData(self.conn, http1.assemble_response(resp))
            yield commands.CloseConnection(self.conn)
            return
        yield from original(self, event)

    setattr(send, _MARK, True)
    return send


def _wrap_h2_handle_event(original: Any) -> Any:
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers.http._events import ResponseProtocolError

    @functools.wraps(original)
    def _handle_event(self: Any, event: Any):
        status = http_status(event.code) if isinstance(event, ResponseProtocolError) else None
        if status is not None:
            sid = event.stream_id
            stream = self.h2_conn.streams.get(sid)
            if (stream is not None and not self.is_closed(sid) and self.is_open_for_us(sid)
                    and not stream.state_machine.headers_sent):
                request = _failed_request(self.context.client, event.message)
                resp = _renderer(status, event.message, self.context.client, request)
                _send_h2_page(self, sid, resp)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
                return
        yield from original(self, event)

    setattr(_handle_event, _MARK, True)
    return _handle_event


def _send_h2_page(layer: Any, sid: int, resp: http.Response) -> None:
    headers = [(b":status", b"%d" % resp.status_code)] + [
        (k.lower(), v) for k, v in resp.headers.fields if k.lower() != b"connection"]
    layer.h2_conn.send_headers(sid, headers)
    layer.h2_conn.send_data(sid, resp.content or b"", end_stream=True)


def _authority_of(headers: Any) -> bytes | None:
    """The `:authority` of an HTTP/2 header list (pseudo-headers come first), or None."""
    for name, value in headers:
        if name == b":authority":
            return value
        if not name.startswith(b":"):
            return None
    return None


def _wrap_h2_request_received(original: Any) -> Any:
    import h2.events
    from mitmproxy.proxy import commands

    from wakeproxy.routing.hygiene import valid_authority

    @functools.wraps(original)
    def handle_h2_event(self: Any, event: Any):
        if isinstance(event, h2.events.RequestReceived):
            authority = _authority_of(event.headers)
            if authority and not valid_authority(authority):
                resp = pages.plain_response(400, "Bad request",
                                            "The request's :authority is not a hostname with an optional port.",
                                            "Fix the client: this request is never forwarded.")
                _send_h2_page(self, event.stream_id, resp)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
                return False
        return (yield from original(self, event))

    setattr(handle_h2_event, _MARK, True)
    return handle_h2_event


class _Throttle:
    """At most one log line per `interval` seconds; the lines left out are counted in the next."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.left_out = 0

    def log(self, message: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.left_out += 1
            return
        more = f" (and {self.left_out} more in the last {self.interval:.0f} s)" if self.left_out else ""
        self.left_out = 0
        self.next_at = now + self.interval
        logger.warning(message + more)


class UpstreamErrors:
    """Renders mitmproxy's protocol-error answers as our pages; logs upstream failures (throttled)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.throttle = _Throttle()

    def running(self) -> None:
        set_renderer(self.render)

    def configure(self, updated: set[str]) -> None:
        if "wakeproxy_config" in updated and ctx.options.wakeproxy_config:
            set_renderer(self.render)

    def done(self) -> None:
        set_renderer(None)

    def render(self, code: int, message: str, client: Any, request: http.Request | None) -> http.Response:
        ip = str(client.peername[0]) if getattr(client, "peername", None) else ""
        ip = ip[7:] if ip.startswith("::ffff:") else ip
        return bare_page(code, message, client, request, detail=self.runtime.config.shows_detail(ip))

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.error is None:
            return
        setattr(flow.client_conn, FAILED, (flow.error.msg, flow.request))
        msg = flow.error.msg
        if flow.response is None and flow.metadata.get("wakeproxy.container") and "client" not in msg.lower() \
                and msg != flow.error.KILLED_MESSAGE:
            self.throttle.log(
                f"{pages.bounded(flow.request.host_header or '', 80)}: backend "
                f"{flow.metadata.get('wakeproxy.container')} failed: {pages.bounded(flow.error.msg, MAX_DETAIL)}")
