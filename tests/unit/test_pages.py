"""wakeproxy.pages: error answers in HTML for browsers, one plain line for everyone else."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test.tutils import treq
from wakeproxy.pages import error_response, waking_response, wants_html

EVIL_HOST = '<script>alert("h")</script>.test'
EVIL_MSG = "No <b>container</b> & 'friends' for \"you\""
EVIL_HINT = "Try <i>later</i> & again"
EVIL_TITLE = "Unknown <site>"


def request(accept: str | None) -> http.Request:
    headers = http.Headers([(b"Accept", accept.encode())]) if accept is not None else http.Headers()
    return treq(headers=headers)


def html_page(status=404, host=EVIL_HOST, headers=None) -> http.Response:
    return error_response(request("text/html"), status, EVIL_TITLE, EVIL_MSG, EVIL_HINT, host, headers)


def test_wants_html():
    assert wants_html(request("text/html,application/xhtml+xml,*/*;q=0.8"))
    assert not wants_html(request("*/*"))
    assert not wants_html(request("application/json"))
    assert not wants_html(request(None))


def test_html_escapes_host_message_hint_and_title():
    text = html_page().get_text()
    for raw in ("<script>", "<b>", "<i>", "<site>", '"you"', "'friends'"):
        assert raw not in text, raw
    assert "&lt;script&gt;alert(&quot;h&quot;)&lt;/script&gt;.test" in text
    assert "No &lt;b&gt;container&lt;/b&gt; &amp; &#x27;friends&#x27; for &quot;you&quot;" in text
    assert "Try &lt;i&gt;later&lt;/i&gt; &amp; again" in text
    assert "Unknown &lt;site&gt;" in text


def test_html_page_is_complete():
    resp = html_page(503)
    text = resp.get_text()
    assert resp.status_code == 503
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert text.lstrip().lower().startswith("<!doctype html>")
    assert text.rstrip().endswith("</html>")
    assert "503 Service Unavailable" in text
    assert "$" not in text  # every template placeholder was filled


def test_html_without_host_says_none():
    assert "(none)" in html_page(host="").get_text()


@pytest.mark.parametrize("accept", ["text/html", "*/*", None])
def test_cache_control_no_store(accept):
    resp = error_response(request(accept), 404, "t", "m", "h", "a.test")
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["X-Wakeproxy"] == "error"


@pytest.mark.parametrize("accept", ["text/html", "*/*"])
def test_extra_headers(accept):
    resp = error_response(request(accept), 503, "t", "m", "h", "a.test", {"Retry-After": "5"})
    assert resp.headers["Retry-After"] == "5"
    assert resp.headers["Cache-Control"] == "no-store"


def test_plain_text_is_one_line_and_not_escaped():
    resp = error_response(request("application/json"), 502, EVIL_TITLE, EVIL_MSG, EVIL_HINT, EVIL_HOST)
    assert resp.status_code == 502
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    text = resp.get_text()
    assert text == f"wakeproxy: 502 {EVIL_TITLE}: {EVIL_MSG} {EVIL_HINT}\n"
    assert text.count("\n") == 1


@pytest.mark.parametrize("status, reason", [(404, "Not Found"), (502, "Bad Gateway"), (503, "Service Unavailable"),
                                            (504, "Gateway Timeout")])
def test_status_and_reason(status, reason):
    resp = html_page(status)
    assert resp.status_code == status
    assert f"{status} {reason}" in resp.get_text()


# --- the waking page ------------------------------------------------------------------------------


def test_waking_page():
    resp = waking_response(request("text/html"), EVIL_HOST, "<grp>&co", "/__wakeproxy/wait")
    text = resp.get_text()
    assert resp.status_code == 503
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Retry-After"] == "5"
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["X-Wakeproxy"] == "waking"
    assert "<script>alert" not in text and "<grp>" not in text
    assert "&lt;script&gt;alert(&quot;h&quot;)&lt;/script&gt;.test" in text
    assert "&lt;grp&gt;&amp;co" in text
    assert "/__wakeproxy/wait" in text
    assert "$host" not in text and "$groups" not in text and "$wait_path" not in text
