"""observe/jsonlog.py: one JSON object a line, a wake's phases as fields, and mitmproxy's TermLog takes it."""

from __future__ import annotations

import io
import json
import logging

from mitmproxy.addons import termlog
from wakeproxy.observe.jsonlog import JsonFormatter, use_json
from wakeproxy.wake.orchestrator import Wake, wake_fields


def test_a_wake_line_carries_its_phases_as_fields() -> None:
    wake = Wake("shop", ("c1",), deadline=0.0)
    wake.marks = {"start calls": 0.007, "port ready": 0.5634}
    record = logging.LogRecord("wakeproxy.wake.orchestrator", logging.INFO, __file__, 1,
                               "wake shop: ready\nforged line", (), None)
    record.wakeproxy = wake_fields(wake, "ready")["wakeproxy"]
    line = JsonFormatter("controller").format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "info" and data["role"] == "controller" and data["logger"].endswith("orchestrator")
    assert data["message"] == "wake shop: ready\\nforged line"  # escaped, as in text
    assert data["event"] == "wake" and data["group"] == "shop" and data["result"] == "ready"
    assert data["ms"] == {"start_calls": 7, "port_ready": 563}
    assert data["time"].endswith("+00:00") and isinstance(data["pid"], int)


def test_mitmproxys_termlog_prints_json() -> None:
    out = io.StringIO()
    addon = termlog.TermLog(out)
    try:
        assert use_json(addon, "worker")
        logging.getLogger("wakeproxy.test").warning("hello %s", "there")
    finally:
        addon.uninstall()
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    assert any(d["message"] == "hello there" and d["level"] == "warning" and d["role"] == "worker" for d in lines)
