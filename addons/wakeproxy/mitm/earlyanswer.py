"""An answer set in `requestheaders` for a request with a large body (a guarded adaptation).

Our addons answer in `requestheaders` (a 400 from hygiene, a 404 for an unknown host, an ACME
challenge, a redirect). When the request has a body over `stream_large_bodies` (1 MB),
mitmproxy switches the request to streaming (`HttpStream.check_body_size` →
`start_request_stream`, `proxy/layers/http/__init__.py`), which raises
`NotImplementedError("Can't set a response and enable streaming at the same time.")`: a
traceback for every chunk of the body ("mitmproxy has crashed!"), and the client never gets
an answer. A 3 MB POST to an unknown host logged 110 tracebacks.

`HttpStream.start_request_stream` is wrapped: when the flow already has a response, that
response is sent at once (after the `responseheaders` hook, as mitmproxy does for answers set
in the `request` hook), the stream is finished, and the rest of the request body is read and
dropped (the stream's `state_errored` consumes every event; the HTTP/1 connection reads to the
end of the body before its next request, or closes when the answer says `Connection: close`).
Nothing of the body is kept in memory. When mitmproxy is not the shape expected: one warning
and mitmproxy's behaviour.
"""

from __future__ import annotations

import functools
from typing import Any

from wakeproxy.mitm.guard import Fallback
from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

_MARK = "_wakeproxy_earlyanswer"
_ORIGINALS: dict[str, Any] = {}
FALLBACK = Fallback("an early answer to a request with a "
                           "body over 1 MB makes mitmproxy log a traceback per chunk")


def compatible() -> str | None:
    try:
        from mitmproxy.proxy.layers import http as layers_http
        from mitmproxy.proxy.layers.http import _events
    except ImportError as e:
        return f"import: {e}"
    stream = getattr(layers_http, "HttpStream", None)
    if stream is None:
        return "HttpStream"
    for name in ("start_request_stream", "send_response", "state_errored"):
        if not callable(getattr(stream, name, None)):
            return f"HttpStream.{name}"
    for name in ("SendHttp", "DropStream", "HttpResponseHeadersHook"):
        if not hasattr(layers_http, name):
            return f"mitmproxy.proxy.layers.http.{name}"
    if not hasattr(_events, "ResponseEndOfMessage"):
        return "ResponseEndOfMessage"
    return None


def installed() -> bool:
    from mitmproxy.proxy.layers import http as layers_http

    return getattr(layers_http.HttpStream.start_request_stream, _MARK, False)


def install() -> bool:
    missing = compatible()
    if missing is not None:
        return FALLBACK.decline(missing)
    if installed():
        return True
    from mitmproxy.proxy.layers import http as layers_http

    _ORIGINALS["start_request_stream"] = layers_http.HttpStream.start_request_stream
    setattr(layers_http.HttpStream, "start_request_stream", _wrap(layers_http.HttpStream.start_request_stream))
    return True


def uninstall() -> None:
    from mitmproxy.proxy.layers import http as layers_http

    if installed():
        setattr(layers_http.HttpStream, "start_request_stream", _ORIGINALS.pop("start_request_stream"))


def _wrap(original: Any) -> Any:
    from mitmproxy.proxy.layers import http as layers_http
    from mitmproxy.proxy.layers.http._events import ResponseEndOfMessage

    @functools.wraps(original)
    def start_request_stream(self: Any):
        if self.flow.response is None:
            yield from original(self)
            return
        self.client_state = self.state_errored  # the rest of the body: consumed and dropped
        self.request_body_buf.clear()
        self.flow.request.stream = False
        yield layers_http.HttpResponseHeadersHook(self.flow)
        yield from self.send_response()  # the response hook, then the answer
        self.flow.live = False
        yield layers_http.DropStream(self.stream_id)
        yield layers_http.SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)

    setattr(start_request_stream, _MARK, True)
    return start_request_stream
