"""observe/access.py: every field of both formats parsed back, a client cannot forge a field or a line,
lines reach the file from the writer thread, and a file moved away by logrotate is followed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

from mitmproxy.test import tflow
from wakeproxy.config import LogConfig
from wakeproxy.observe import access

COMBINED = access.COMBINED_LINE


def flow(**kw):
    f = tflow.tflow(resp=True)
    f.request.method = "POST"
    f.request.path = kw.get("path", "/a?b=1")
    f.request.headers["host"] = kw.get("host", "shop.test")
    f.request.headers["referer"] = kw.get("referer", "https://ref.test/")
    f.request.headers["user-agent"] = kw.get("ua", "curl/8")
    f.request.timestamp_start, f.request.timestamp_end = 1796119505.0, 1796119505.01
    f.response.status_code = 201
    f.response.content = b"x" * 42
    f.response.timestamp_start, f.response.timestamp_end = 1796119505.5, 1796119505.52
    f.metadata["wakeproxy.group"] = "shop"
    f.metadata["wakeproxy.container"] = "shop-web-1"
    if kw.get("held"):
        f.metadata["wakeproxy.wake"] = object()
    return f


def test_both_formats_carry_every_field() -> None:
    fl = flow(held=True)
    f = access.fields(fl)
    back = json.loads(access.json_line(f))
    assert back == f
    assert back["status"] == 201 and back["bytes"] == 42 and back["method"] == "POST" and back["path"] == "/a?b=1"
    assert back["host"] == "shop.test" and back["group"] == "shop" and back["container"] == "shop-web-1"
    assert back["duration_ms"] == 520.0 and back["held"] is True and back["held_ms"] == 490.0
    assert back["protocol"] == "http1" and back["time"].startswith("2026-12-01T")
    m = COMBINED.match(access.combined(f))
    assert m is not None, access.combined(f)
    assert m["client"] == f["client"] and m["request"] == "POST /a?b=1 HTTP/1.1" and m["status"] == "201"
    assert m["bytes"] == "42" and m["referer"] == "https://ref.test/" and m["ua"] == "curl/8"
    assert m["host"] == "shop.test" and m["group"] == "shop" and m["container"] == "shop-web-1"
    assert m["duration"] == "520.0" and m["held"] == "490.0" and m["protocol"] == "http1"
    assert m["tls"] == ("tls" if f["tls"] else "-") and m["when"].endswith("+0000")


def test_a_client_cannot_end_a_field_or_a_line() -> None:
    f = access.fields(flow(ua='evil" "x\n1.2.3.4 - - [forged]', path='/"\\\r\n'))
    line = access.combined(f)
    assert "\n" not in line and "\r" not in line
    m = COMBINED.match(line)
    assert m is not None, line
    assert m["ua"] == 'evil\\x22 \\x22x\\x0a1.2.3.4 - - [forged]' and m["host"] == "shop.test"
    assert "\n" not in access.json_line(f)
    long = access.fields(flow(path="/" + "a" * 10_000, ua="b" * 10_000))
    assert len(access.combined(long)) < 4096 and len(access.json_line(long)) < 4096


def test_the_writer_appends_and_follows_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    runtime = SimpleNamespace(config=SimpleNamespace(log=LogConfig(access=str(path), access_format="json")))
    log = access.AccessLog(runtime)
    log.configure({"wakeproxy_config"})
    log.response(flow())
    log.response(flow())  # the same flow object twice would be one line; these are two flows
    deadline = time.monotonic() + 5
    while (not path.exists() or len(path.read_text().splitlines()) < 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(path.read_text().splitlines()) == 2
    path.rename(tmp_path / "access.log.1")  # logrotate's move
    time.sleep(access.CHECK_EVERY + 0.2)
    log.response(flow())
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    log.done()
    assert len(path.read_text().splitlines()) == 1
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 2
    assert all(json.loads(line)["status"] == 201 for line in path.read_text().splitlines())
