"""observe/page.py: the status page shows the report, escapes what tenants wrote, and refreshes itself."""

from __future__ import annotations

import time

from wakeproxy.observe import page


def report() -> dict:
    return {
        "docker": {"state": "connected", "swarm": "manager"}, "hosts": 2,
        "counts": {"groups": 2, "running": 1, "asleep": 1},
        "groups": [
            {"group": "shop", "state": "running", "hosts": ["shop.test"], "inflight": 1, "open": 0,
             "containers": [{"name": "shop-web-1", "state": "running", "health": "healthy"},
                            {"name": "shop_api", "state": "running", "kind": "service", "replicas": 2,
                             "running_tasks": 2}],
             "last_activity": "2026-12-01T17:00:00+00:00", "idle_timeout": 1800, "stops_in": 1500,
             "last_wake": {"at": "2026-12-01T16:59:00+00:00", "result": "ok", "timing": "port ready 600 ms"}},
            {"group": "<script>alert(1)</script>", "state": "asleep", "hosts": ["x.test\"><img src=x>"],
             "inflight": 0, "open": 0, "containers": [{"name": "x", "state": "exited"}],
             "last_activity": None, "idle_timeout": 0, "stops_in": None},
        ],
        "certificates": {"shop.test": {"state": "valid", "not_after": "2027-03-01T00:00:00+00:00"}},
        "conflicts": [{"name": "shop.test", "group": "evil", "containers": ["evil-1"], "owner": "shop"}],
        "refused": [],
        "workers": [{"slot": "0", "pid": 7, "requests": 12, "connections": 1, "last_report": time.time() - 1}],
    }


def test_the_page_shows_the_report_and_escapes_tenant_text() -> None:
    text = page.render(report(), time.time())
    assert "<meta http-equiv=refresh content=5>" in text and "width=device-width" in text
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<img" not in text and "x.test&quot;&gt;&lt;img src=x&gt;" in text
    assert "class='st running'>running<" in text and "class='st asleep'>asleep<" in text
    assert "shop-web-1" in text and "2/2 tasks" in text and "port ready 600 ms" in text
    assert "2027-03-01" in text and "evil-1" in text and "Swarm manager" in text
    assert "never" in text  # the asleep group's idle timeout 0
    assert "@media (max-width:600px)" in text  # one column on a phone
