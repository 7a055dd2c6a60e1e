"""Error and status pages: HTML for browsers, one plain line for everything else."""

from __future__ import annotations

import html
from importlib import resources
from string import Template

from mitmproxy import http

_REASONS = {400: "Bad Request", 405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large", 404: "Not Found", 429: "Too Many Requests", 431: "Request Header Fields Too Large", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


# Read once at import: no disk read on the request path, and a serving worker that has given up root
# may no longer reach Python's own files.
_TEMPLATES = {name: Template(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))
              for name in ("page.html", "waking.html")}


def _template(name: str) -> Template:
    return _TEMPLATES[name]


def client_ip(flow: http.HTTPFlow) -> str:
    """The address of the client that sent `flow` (IPv4-mapped IPv6 as plain IPv4)."""
    ip = str(flow.client_conn.peername[0]) if flow.client_conn.peername else ""
    return ip[7:] if ip.startswith("::ffff:") else ip


# Longest piece of client input (a Host header) a page repeats; longer input is cut with "…".
MAX_ECHO = 100


def bounded(text: str, limit: int = MAX_ECHO) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def wants_html(request: http.Request) -> bool:
    """Browsers ask for text/html; API clients, curl and webhooks do not."""
    return "text/html" in request.headers.get("accept", "")


def error_response(
    request: http.Request,
    status: int,
    title: str,
    message: str,
    hint: str,
    host: str,
    headers: dict[str, str] | None = None,
) -> http.Response:
    """A response that says what happened and what to do, in the form the client reads."""
    extra = {"Cache-Control": "no-store", "X-Wakeproxy": "error", **(headers or {})}
    if wants_html(request):
        body = _template("page.html").substitute(
            status=status,
            reason=_REASONS.get(status, ""),
            title=html.escape(title),
            message=html.escape(message),
            hint=html.escape(hint),
            host=html.escape(bounded(host) if host else "(none)"),
        )
        resp = http.Response.make(status, body, {"Content-Type": "text/html; charset=utf-8", **extra})
        resp.reason = resp.reason or _REASONS.get(status, "")
        return resp
    return plain_response(status, title, message, hint, extra)


def plain_response(status: int, title: str, message: str, hint: str,
                   headers: dict[str, str] | None = None) -> http.Response:
    """One plain line, for clients that did not ask for HTML (or whose request is not parsed yet)."""
    line = f"wakeproxy: {status} {title}: {message} {hint}\n"
    extra = {"Cache-Control": "no-store", "X-Wakeproxy": "error", **(headers or {})}
    resp = http.Response.make(status, line, {"Content-Type": "text/plain; charset=utf-8", **extra})
    resp.reason = resp.reason or _REASONS.get(status, "")  # mitmproxy's table has no 431
    return resp


def waking_response(request: http.Request, host: str, groups: str, wait_path: str) -> http.Response:
    """The "waking up" page: 503 so nothing caches or indexes it; it long-polls `wait_path`
    and reloads into the app as soon as the proxy says the group is ready."""
    body = _template("waking.html").substitute(
        host=html.escape(bounded(host)), groups=html.escape(f" · group {groups}") if groups else "", wait_path=wait_path,
    )
    return http.Response.make(503, body, {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        "Retry-After": "5",
        "X-Wakeproxy": "waking",
    })
