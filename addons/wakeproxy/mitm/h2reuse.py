"""HTTP/2 clients → HTTP/1.1 backends: reuse idle upstream connections.

mitmproxy gives every request of an HTTP/2 client a new upstream connection when
the backend speaks HTTP/1.1, in two places of its HTTP layer:

- `Http1Connection.mark_done` closes an `Http1Client` connection after any request
  that arrived over HTTP/2 (or HTTP/3), whatever the response said;
- `HttpLayer.get_connection` never hands an HTTP/2 stream a connected HTTP/1
  connection (the "tricky multiplexing edge case": a response that is delimited
  by the server closing the connection cannot share it).

That costs a TCP (and maybe TLS) handshake per request and leaves a socket in
TIME_WAIT for each. `install()` adapts mitmproxy as follows, for HTTP/2 clients only:

- `Http1Client.mark_done` (wrapped): when a request that came over HTTP/2
  finishes, the original decides with the request as it was sent upstream —
  HTTP/1.1 — so its keep-alive rules (read-until-EOF, `Connection: close` on
  either side, an HTTP/1.0 response, upgrades) apply unchanged, and only the
  "HTTP/2 ⇒ close" rule does not. The flow's request object is not modified.
  A connection whose last answer was an informational 1xx (which mitmproxy takes for
  the response) is still closed: the real response may follow on it.
- `HttpLayer.get_connection` (wrapped): walk the connections in mitmproxy's own
  order; take one to the same address whose `Http1Client` is *idle* — it finished
  the previous request and response, kept the connection, holds no unread bytes —
  and went idle at most `REUSE_WITHIN_SECONDS` ago. Otherwise the original runs
  (a new connection; or a connection being opened, an error, an HTTP/2 backend:
  all as before). Busy connections are never shared (HTTP/1.1 has no multiplexing;
  we never pipeline), so concurrent streams still get a connection each. Idle
  connections older than `REUSE_WITHIN_SECONDS` are closed when met, not reused: a
  backend's keep-alive timer (gunicorn 2 s, Node 5 s) may be closing them right now.
- mitmproxy's proxy server opens at most `Semaphore(5)` connections per upstream
  address and client connection; an extra one waits until one of them *closes*.
  Before, they closed after every response; idle connections we keep would block
  such a waiter for good. So a stream that would need a connection beyond that
  limit waits in a queue on the HttpLayer instead, and `HttpLayer._handle_event`
  (wrapped) serves the queue after every event: the next connection that goes
  idle takes the first waiting stream, or a new connection is opened once one
  has closed.

HTTP/1 clients, HTTP/2 backends and HTTP/3 are untouched.

`install()` first checks that mitmproxy's code has the shape this was written
against (11.0.x and 12.x: names, signatures, and the source lines it works
around). On any other shape it logs one warning and patches nothing: the proxy
then keeps mitmproxy's behaviour (one upstream connection per request).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import inspect
import re
import time
from typing import Any

from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

# An idle upstream connection is reused only this soon after its last response ended.
REUSE_WITHIN_SECONDS = 1.0

_MARK = "_wakeproxy_h2reuse"  # set on our wrappers: installed, even by another copy of this module
_IDLE_SINCE = "_wakeproxy_idle_since"  # set on an Http1Client when it goes idle (time.monotonic())
_QUEUE = "_wakeproxy_waiting"  # on an HttpLayer: GetHttpConnection commands waiting for a free connection

_result: bool | None = None  # install()'s answer, once it has been given
_limit = 5  # mitmproxy's connections per upstream address and client connection (read by the shape check)


def install() -> bool:
    """Patch mitmproxy (once); True if the reuse is active, False if mitmproxy was left as it is."""
    global _result
    targets = _targets()
    if targets is not None and _is_patched(targets):
        _result = True
        return True
    if _result is not None:
        return _result
    try:
        problem = shape_problem()
    except Exception as e:  # noqa: BLE001 - whatever a future mitmproxy does, the proxy must start
        problem = f"the shape check failed: {e!r}"
    if problem is not None:
        from mitmproxy import version

        logger.warning(
            f"h2reuse: mitmproxy {version.VERSION} is not the shape it was written for ({problem}); "
            "HTTP/2 clients get a new upstream connection per request to HTTP/1.1 backends"
        )
        _result = False
        return False
    assert targets is not None
    http_layer, h1_client = targets
    original_get_connection = http_layer.get_connection
    http_layer.get_connection = _wrap_get_connection(original_get_connection)
    http_layer._handle_event = _wrap_handle_event(http_layer._handle_event, original_get_connection)
    wrapper = _wrap_mark_done(h1_client.mark_done)
    setattr(wrapper, "_wakeproxy_own", h1_client.__dict__.get("mark_done"))  # Http1Client's own, or None
    h1_client.mark_done = wrapper
    logger.debug("h2reuse: HTTP/2 streams reuse idle HTTP/1.1 upstream connections")
    _result = True
    return True


def uninstall() -> None:
    """Undo `install()` (for tests); the next `install()` checks and patches again."""
    global _result
    _result = None
    targets = _targets()
    if targets is None:
        return
    http_layer, h1_client = targets
    for name in ("get_connection", "_handle_event"):
        if getattr(getattr(http_layer, name), _MARK, False):
            setattr(http_layer, name, getattr(http_layer, name).__wrapped__)
    wrapper = h1_client.__dict__.get("mark_done")
    if getattr(wrapper, _MARK, False):
        own = getattr(wrapper, "_wakeproxy_own", None)
        if own is None:
            del h1_client.mark_done
        else:
            h1_client.mark_done = own


def installed() -> bool:
    targets = _targets()
    return targets is not None and _is_patched(targets)


# --- the shape check --------------------------------------------------------------


def _targets() -> tuple[Any, Any] | None:
    try:
        from mitmproxy.proxy.layers import http as http_layers
        from mitmproxy.proxy.layers.http import _http1
    except ImportError:
        return None
    http_layer = getattr(http_layers, "HttpLayer", None)
    h1_client = getattr(_http1, "Http1Client", None)
    if not isinstance(http_layer, type) or not isinstance(h1_client, type):
        return None
    return http_layer, h1_client


def _is_patched(targets: tuple[Any, Any]) -> bool:
    http_layer, h1_client = targets
    return bool(getattr(http_layer.get_connection, _MARK, False)
                and getattr(http_layer._handle_event, _MARK, False)
                and getattr(h1_client.__dict__.get("mark_done"), _MARK, False))


def _squeezed_source(fn: Any) -> str:
    """The function's source without any whitespace (formatting changes do not matter)."""
    return "".join(inspect.getsource(fn).split())


def _params(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def shape_problem() -> str | None:
    """None if mitmproxy's HTTP layer looks as expected, else what differs."""
    global _limit
    targets = _targets()
    if targets is None:
        return "no HttpLayer or Http1Client"
    http_layer, h1_client = targets
    from mitmproxy import connection, http
    from mitmproxy.proxy import commands, context, server
    from mitmproxy.proxy.layers import http as http_layers
    from mitmproxy.proxy.layers.http import _http1

    kw = inspect.Parameter.KEYWORD_ONLY
    pos = inspect.Parameter.POSITIONAL_OR_KEYWORD
    empty = inspect.Parameter.empty
    get_connection = getattr(http_layer, "get_connection", None)
    handle_event = getattr(http_layer, "_handle_event", None)
    mark_done = getattr(h1_client, "mark_done", None)
    if any(getattr(f, _MARK, False) for f in (get_connection, handle_event, mark_done)):
        return "half patched already"
    if get_connection is None or handle_event is None or mark_done is None \
            or not all(callable(f) for f in (get_connection, handle_event, mark_done)):
        return "get_connection, _handle_event or mark_done missing"
    try:
        if _params(get_connection) != [("self", pos, empty), ("event", pos, empty), ("reuse", kw, True)]:
            return f"HttpLayer.get_connection{inspect.signature(get_connection)}"
        if _params(handle_event) != [("self", pos, empty), ("event", pos, empty)] \
                or not inspect.isgeneratorfunction(handle_event):
            return f"HttpLayer._handle_event{inspect.signature(handle_event)}"
        if _params(mark_done) != [("self", pos, empty), ("request", kw, False), ("response", kw, False)]:
            return f"Http1Client.mark_done{inspect.signature(mark_done)}"
        get_src, mark_src = _squeezed_source(get_connection), _squeezed_source(mark_done)
        handler_src = _squeezed_source(server.ConnectionHandler.__init__)
    except (OSError, TypeError, ValueError, AttributeError) as e:
        return f"cannot read the source: {e}"
    # get_connection: still refuses connected HTTP/1 connections to HTTP/2 clients, and hands a
    # connection over the way we do (pop the stream's command, send it the completion).
    for needle in ('self.context.client.alpn==b"h2"', 'connection.alpn!=b"h2"', "self.waiting_for_establishment",
                   "self.command_sources.pop(event)", "GetHttpConnectionCompleted(event,(connection,None))"):
        if needle not in get_src:
            return f"get_connection has no {needle!r}"
    # mark_done: still closes after HTTP/2 requests, and resets the client for the next request.
    for needle in ("self.request.is_http2", "isinstance(self,Http1Client)", "http1.connection_close(",
                   "self.stream_id=None", "self.state=self.read_headers"):
        if needle not in mark_src:
            return f"mark_done has no {needle!r}"
    # The proxy server's limit of connections per upstream address, which the queue respects.
    m = re.search(r"self\.max_conns=collections\.defaultdict\(lambda:asyncio\.Semaphore\((\d+)\)\)", handler_src)
    if not m or int(m.group(1)) < 1:
        return "no per-address connection limit (max_conns Semaphore) in ConnectionHandler"
    _limit = int(m.group(1))
    # What the wrappers read or call.
    for owner, names in (
        (http_layer, ("connections", "waiting_for_establishment", "command_sources", "event_to_child", "context")),
        (h1_client, ("stream_id", "request", "response", "request_done", "response_done", "state", "buf",
                     "read_headers", "conn")),
        (context.Context, ("layers", "client")),
    ):
        known = set(dir(owner))
        for base in getattr(owner, "__mro__", ()):
            known |= set(getattr(base, "__annotations__", {}))
        missing = [n for n in names if n not in known]
        if missing:
            return f"{owner.__name__} has no {', '.join(missing)}"
    if not issubclass(h1_client, getattr(_http1, "Http1Connection", ())):
        return "Http1Client is not an Http1Connection"
    for name in ("GetHttpConnection", "GetHttpConnectionCompleted"):
        if not isinstance(getattr(http_layers, name, None), type):
            return f"no {name}"
    if not hasattr(getattr(http_layers, "GetHttpConnection"), "connection_spec_matches"):
        return "no GetHttpConnection.connection_spec_matches"
    if not hasattr(commands, "CloseConnection") or not hasattr(connection.Connection, "connected"):
        return "no CloseConnection or Connection.connected"
    if not dataclasses.is_dataclass(http.RequestData) or "http_version" not in {
            f.name for f in dataclasses.fields(http.RequestData)}:
        return "RequestData is not a dataclass with http_version"
    try:  # the view mark_done decides with: HTTP/1.1, same method and headers, the original untouched
        sample = http.Request.make("POST", "http://example.com/", b"body", http.Headers(Connection="close"))
        sample.http_version = "HTTP/2.0"
        view = _as_sent_upstream(sample)
        ok = (view.http_version == "HTTP/1.1" and not view.is_http2 and sample.is_http2
              and view.method == "POST" and view.headers is sample.headers and view.raw_content == b"body")
    except Exception as e:  # noqa: BLE001 - any failure means "another shape"
        return f"cannot make an HTTP/1.1 view of a request: {e!r}"
    if not ok:
        return "an HTTP/1.1 view of a request does not behave as expected"
    return None


# --- get_connection and the queue --------------------------------------------------------


def _h1_client_of(http_layer: Any, conn: Any) -> Any:
    """The Http1Client that drives upstream connection `conn`, if that is what drives it."""
    from mitmproxy.proxy.layers.http._http1 import Http1Client

    stack = http_layer.connections.get(conn)
    layers = getattr(getattr(stack, "context", None), "layers", None)
    h1 = layers[-1] if layers else None
    return h1 if isinstance(h1, Http1Client) and h1.conn is conn else None


def _idle(h1: Any) -> bool:
    """Finished its last request and response, kept the connection, and holds no unread bytes."""
    return (
        h1.stream_id is None and h1.request is None and h1.response is None
        and not h1.request_done and not h1.response_done
        and h1.state == h1.read_headers and not h1.buf
    )


def _walk(layer: Any, event: Any, reuse: bool):
    """Look through `layer`'s connections for `event` (a GetHttpConnection), in mitmproxy's order.

    A generator (it may close stale idle connections); returns ("idle", conn) for a connection to
    reuse, ("original", None) when mitmproxy's own get_connection knows what to do (the first match
    is being opened, has failed, or is HTTP/2), ("new", None) when only a new connection will do.
    With reuse=False (mitmproxy's "not the one just opened") only idle connections count.
    """
    from mitmproxy.proxy import commands

    now = time.monotonic()
    for conn in list(layer.connections):
        if not event.connection_spec_matches(conn):
            continue
        if conn in layer.waiting_for_establishment or conn.error:
            if reuse:
                return "original", None
            continue
        if not conn.connected:
            continue
        h1 = _h1_client_of(layer, conn)
        if h1 is None:
            if reuse and conn.alpn == b"h2":
                return "original", None  # multiplexed: mitmproxy reuses it
            continue
        if not _idle(h1):
            continue  # busy: HTTP/1.1 carries one request at a time
        since = getattr(h1, _IDLE_SINCE, None)
        if since is None or now - since > REUSE_WITHIN_SECONDS:
            yield commands.CloseConnection(conn)  # too old to trust; do not keep an unused socket
            continue
        return "idle", conn
    return "new", None


def _slots_taken(layer: Any, address: Any) -> int:
    """Connections to `address` that hold one of the proxy server's slots for it (open or opening)."""
    from mitmproxy.connection import ConnectionState, Server

    return sum(
        1 for c in layer.connections
        if isinstance(c, Server) and c.address == address
        and (c in layer.waiting_for_establishment or c.state is not ConnectionState.CLOSED)
    )


def _hand_over(layer: Any, event: Any, conn: Any):
    from mitmproxy.proxy.layers.http import GetHttpConnectionCompleted

    stream = layer.command_sources.pop(event)
    yield from layer.event_to_child(stream, GetHttpConnectionCompleted(event, (conn, None)))


def _wrap_get_connection(original: Any) -> Any:
    @functools.wraps(original)
    def get_connection(self: Any, event: Any, *, reuse: bool = True):
        if self.context.client.alpn != b"h2":
            yield from original(self, event, reuse=reuse)
            return
        verdict, conn = yield from _walk(self, event, reuse)
        if verdict == "idle":
            yield from _hand_over(self, event, conn)
        elif verdict == "new" and _slots_taken(self, event.address) >= _limit:
            self.__dict__.setdefault(_QUEUE, collections.deque()).append(event)
        else:
            yield from original(self, event, reuse=reuse)

    setattr(get_connection, _MARK, True)
    return get_connection


def _wrap_handle_event(original: Any, original_get_connection: Any) -> Any:
    from mitmproxy.connection import ConnectionState
    from mitmproxy.proxy.layers.http import GetHttpConnectionCompleted

    @functools.wraps(original)
    def _handle_event(self: Any, event: Any):
        yield from original(self, event)
        queue = self.__dict__.get(_QUEUE)
        if queue:
            waiting = list(queue)
            queue.clear()
            if not self.context.client.state & ConnectionState.CAN_READ:
                # The client is gone: answer the waiting streams as mitmproxy answers streams whose
                # connection was still being opened, so every flow ends with an error hook.
                for ev in waiting:
                    stream = self.command_sources.pop(ev)
                    yield from self.event_to_child(stream, GetHttpConnectionCompleted(ev, (None, "client disconnected")))
                return
            # Serve streams waiting for a connection: an idle one, or a new one now that a slot is free.
            for ev in waiting:
                verdict, conn = yield from _walk(self, ev, False)
                if verdict == "idle":
                    yield from _hand_over(self, ev, conn)
                elif _slots_taken(self, ev.address) < _limit:
                    yield from original_get_connection(self, ev, reuse=False)
                else:
                    queue.append(ev)

    setattr(_handle_event, _MARK, True)
    return _handle_event


# --- mark_done -------------------------------------------------------------------------


def _as_sent_upstream(request: Any) -> Any:
    """A shallow copy of an HTTP/2 request that says HTTP/1.1, as Http1Client sent it (headers and
    body are shared, not copied; the flow's request is not touched)."""
    view = copy.copy(request)
    # copy + assignment, not dataclasses.replace: replace re-runs RequestData's field type checks,
    # which cost more than the rest of this wrapper (0.19 ms a request, cProfile).
    view.data = copy.copy(request.data)
    view.data.http_version = b"HTTP/1.1"
    return view


def _wrap_mark_done(original: Any) -> Any:
    @functools.wraps(original)
    def mark_done(self: Any, *, request: bool = False, response: bool = False):
        sent = self.request
        finishing = (request or self.request_done) and (response or self.response_done)
        if (finishing and sent is not None and self.response is not None and sent.is_http2
                and not 100 <= self.response.status_code < 200):
            # The original closes after every HTTP/2 request; let it decide on what went upstream.
            # (Not after a 1xx taken for the answer: the final response may still be on its way.)
            view = self.request = _as_sent_upstream(sent)
            try:
                yield from original(self, request=request, response=response)
            finally:
                if self.request is view:  # kept (connection closed, or upgraded): put the real one back
                    self.request = sent
        else:
            yield from original(self, request=request, response=response)
        if _idle(self):
            setattr(self, _IDLE_SINCE, time.monotonic())

    setattr(mark_done, _MARK, True)
    return mark_done
