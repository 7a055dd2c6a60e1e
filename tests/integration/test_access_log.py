"""The access log of the real proxy (two serving workers appending to one file), in both formats,
parsed back field by field."""

from __future__ import annotations

import json

import pytest
from harness import proxied, wait_for
from wakeproxy.observe.access import COMBINED_LINE as COMBINED


@pytest.mark.parametrize("fmt", ["combined", "json"])
def test_every_request_is_one_line_with_every_field(proxy, backend_container, host, tmp_path, run_id, fmt):
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)  # the workers write it, as `user` (nobody), not as root
    path = logs / "access.log"
    h = host(f"acc-{fmt}")
    backend_container(f"acc-{fmt}", labels={"wakeproxy.host": h})
    p = proxy({"log": {"access": str(path), "access_format": fmt}, "workers": 2})
    for i in range(6):
        assert proxied(p, h, f"/x/{i}?q={i}", headers={"User-Agent": f"ua-{i}", "Referer": "https://r.test/"}
                       ).status_code == 200
    assert proxied(p, host("acc-nobody")).status_code == 404
    lines = wait_for(lambda: (t := path.read_text().splitlines() if path.exists() else []) and len(t) >= 7 and t,
                     10, 0.1, "7 lines")
    assert len(lines) == 7
    rows = [json.loads(line) for line in lines] if fmt == "json" else [COMBINED.match(line) for line in lines]
    assert all(r is not None for r in rows), lines
    ours = [r for r in rows if (r["host"] == h)]
    assert len(ours) == 6
    for r in ours:
        if fmt == "json":
            i = int(r["path"].split("/")[2].split("?")[0])
            assert r["path"] == f"/x/{i}?q={i}" and r["method"] == "GET" and r["status"] == 200
            assert r["user_agent"] == f"ua-{i}" and r["referer"] == "https://r.test/"
            assert r["group"] == f"{run_id}-acc-{fmt}" and r["container"] == f"{run_id}-acc-{fmt}"
            assert r["client"] == "127.0.0.1" and r["bytes"] > 0 and r["duration_ms"] >= 0
            assert r["protocol"] == "http1" and r["tls"] is False and r["held"] is False
        else:
            method, target, version = r["request"].split(" ")
            i = int(target.split("/")[2].split("?")[0])
            assert (method, target, version) == ("GET", f"/x/{i}?q={i}", "HTTP/1.1") and r["status"] == "200"
            assert r["ua"] == f"ua-{i}" and r["referer"] == "https://r.test/"
            assert r["group"] == f"{run_id}-acc-{fmt}" and r["container"] == f"{run_id}-acc-{fmt}"
            assert r["client"] == "127.0.0.1" and int(r["bytes"]) > 0 and r["protocol"] == "http1"
            assert r["tls"] == "-" and r["held"] == "-"
    other = next(r for r in rows if r["host"] != h)
    assert (other["status"] == 404) if fmt == "json" else other["status"] == "404"


def test_json_logs_are_one_object_a_line_with_the_wakes_phases(proxy, backend_container, host, run_id):
    h = host("jl-wake")
    backend_container("jl-wake", start=False, labels={"wakeproxy.host": h})
    p = proxy({"log": {"format": "json"}, "workers": 2})
    assert proxied(p, h, timeout=60).status_code == 200

    def lines() -> list[dict]:
        out = []
        for line in p.log().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    ready = wait_for(lambda: [d for d in lines() if d.get("event") == "wake" and d.get("result") == "ready"], 10, 0.1,
                     "the wake's line")
    d = ready[0]
    assert d["group"] == f"{run_id}-jl-wake" and d["role"] == "controller" and d["level"] == "info"
    assert d["ms"]["port_ready"] >= d["ms"]["start_calls"] >= 0
    roles = {d["role"] for d in lines()}
    assert {"controller", "worker"} <= roles, roles
    text_lines = [line for line in p.log().splitlines() if line.strip() and not line.startswith("{")]
    assert all(line.startswith(("wakeproxy: ", "wakeproxy ready")) for line in text_lines), text_lines[:5]
