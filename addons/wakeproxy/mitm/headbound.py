"""Bound what mitmproxy buffers of a client's HTTP/1 request head (a guarded adaptation).

mitmproxy's `Http1Server` appends every byte a client sends to one `ReceiveBuffer`
(`proxy/layers/http/_http1.py`: `Http1Connection._handle_event` does `self.buf += data`)
and, while it waits for the blank line that ends a request head, does nothing about its
size (`read_headers`: "FIXME: protect against header size DoS"). 25 MB of unfinished
headers cost 25 MB of memory, per connection. It does the same while a request is in
flight (`wait`): bytes pipelined behind it pile up in the buffer.

This module wraps two methods of `Http1Server`:

- `read_headers`: after mitmproxy's own parse, a buffer still waiting for its head that is
  longer than the limit gets our 431 page and the connection is closed. The buffer is then
  at most the limit plus one read (64 KiB). The first bytes of a head are reported to the
  registered listener (the connection limits time a slow head from its first byte).
- `wait`: more than the limit pipelined behind a request in flight closes the connection.

The limit is the option `wakeproxy_max_header_bytes` of the connection's own options (the
ConnectionLimits addon sets it from the config), else `DEFAULT_LIMIT`.

Guarded like h2reuse: `install()` checks every attribute it relies on and, when this
mitmproxy is not the shape expected, logs ONE warning and leaves mitmproxy as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from wakeproxy import pages
from wakeproxy.mitm.guard import Fallback
from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

DEFAULT_LIMIT = 32768
OPTION = "wakeproxy_max_header_bytes"
_MARK = "_wakeproxy_headbound"
_ORIGINALS: dict[str, Any] = {}
# Called with the client Connection when the first bytes of a request head arrive on an
# HTTP/1 connection (the ConnectionLimits addon registers itself in `running`).
_listeners: list[Callable[[Any], None]] = []
FALLBACK = Fallback("unfinished HTTP/1 request heads are not "
                "bounded (the 431 for oversized headers still applies once a head is complete)")


def add_listener(fn: Callable[[Any], None]) -> None:
    if fn not in _listeners:
        _listeners.append(fn)


def remove_listener(fn: Callable[[Any], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def compatible() -> str | None:
    """None when this mitmproxy has what the wrappers use; else what is missing."""
    try:
        from h11._receivebuffer import ReceiveBuffer
        from mitmproxy.proxy import commands, events
        from mitmproxy.proxy.layers.http import _http1
        from mitmproxy.proxy.layers.http._base import ReceiveHttp  # noqa: F401
    except ImportError as e:
        return f"import: {e}"
    server = getattr(_http1, "Http1Server", None)
    if server is None:
        return "mitmproxy.proxy.layers.http._http1.Http1Server"
    for name in ("read_headers", "wait", "done", "state", "ReceiveProtocolError"):
        if not hasattr(server, name):
            return f"Http1Server.{name}"
    if "buf" not in getattr(_http1.Http1Connection, "__annotations__", {}):
        return "Http1Connection.buf"
    for name in ("__len__", "__bool__"):
        if not hasattr(ReceiveBuffer, name):
            return f"ReceiveBuffer.{name}"
    for mod, names in ((commands, ("SendData", "CloseConnection")), (events, ("DataReceived",))):
        for name in names:
            if not hasattr(mod, name):
                return f"{mod.__name__}.{name}"
    return None


def installed() -> bool:
    from mitmproxy.proxy.layers.http import _http1

    return getattr(_http1.Http1Server.read_headers, _MARK, False)


def install() -> bool:
    """Wrap Http1Server (idempotent). False (and one warning) when mitmproxy is not the shape expected."""
    missing = compatible()
    if missing is not None:
        return FALLBACK.decline(missing)
    from mitmproxy.proxy.layers.http import _http1

    if installed():
        return True
    server = _http1.Http1Server
    _ORIGINALS["read_headers"] = server.read_headers
    _ORIGINALS["wait"] = server.wait
    setattr(server, "read_headers", _wrap_read_headers(server.read_headers))
    setattr(server, "wait", _wrap_wait(server.wait))
    return True


def uninstall() -> None:
    from mitmproxy.proxy.layers.http import _http1

    if installed():
        setattr(_http1.Http1Server, "read_headers", _ORIGINALS.pop("read_headers"))
        setattr(_http1.Http1Server, "wait", _ORIGINALS.pop("wait"))


def limit_of(layer: Any) -> int:
    value = getattr(layer.context.options, OPTION, None)
    return value if isinstance(value, int) and value > 0 else DEFAULT_LIMIT


def too_large_response() -> bytes:
    from mitmproxy.net.http import http1

    resp = pages.plain_response(
        431, "Request header fields too large",
        "The request line and headers are longer than this server accepts.",
        "Send fewer or shorter headers (cookies are the usual cause).")
    resp.headers["Connection"] = "close"
    return http1.assemble_response(resp)


def _wrap_read_headers(original: Any) -> Any:
    from mitmproxy.proxy import commands, events

    @functools.wraps(original)
    def read_headers(self: Any, event: Any):
        fresh = isinstance(event, events.DataReceived) and not getattr(self, "_wakeproxy_head_seen", False)
        yield from original(self, event)
        if not isinstance(event, events.DataReceived) or self.state != self.read_headers:
            self._wakeproxy_head_seen = False  # the head is complete (or the connection is done)
            return
        if not self.buf:
            return
        if fresh:
            self._wakeproxy_head_seen = True
            for listener in _listeners:
                listener(self.conn)
        if len(self.buf) > limit_of(self):
            self.buf = type(self.buf)()  # drop it now, not when the connection ends
            self.state = self.done
            yield commands.SendData(self.conn, too_large_response())
            yield commands.CloseConnection(self.conn)

    setattr(read_headers, _MARK, True)
    return read_headers


def _client_gone_code() -> Any:
    """The code mitmproxy gives "the client went away": an ErrorCode in 12, an int in 11."""
    try:
        from mitmproxy.proxy.layers.http._events import ErrorCode  # type: ignore[attr-defined]  # mitmproxy 12+
    except ImportError:
        from mitmproxy.net.http import status_codes

        return status_codes.CLIENT_CLOSED_REQUEST
    return ErrorCode.CLIENT_DISCONNECTED


def _wrap_wait(original: Any) -> Any:
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers.http._base import ReceiveHttp

    gone = _client_gone_code()

    @functools.wraps(original)
    def wait(self: Any, event: Any):
        if isinstance(event, events.DataReceived) and len(self.buf) > limit_of(self):
            # More pipelined behind a request in flight than one request head may be: not a client
            # we keep buffering for. Close as mitmproxy does when the client goes away here.
            self.buf = type(self.buf)()
            self.state = self.done
            yield commands.CloseConnection(self.conn)
            yield ReceiveHttp(self.ReceiveProtocolError(
                self.stream_id, "pipelined data beyond max_header_bytes", code=gone))
            return
        yield from original(self, event)

    setattr(wait, _MARK, True)
    return wait
