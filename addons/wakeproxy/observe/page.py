"""The status page: `wakeproxy status`'s report as HTML that refreshes itself and reads on a phone.

Plain HTML and inline CSS (the status listener's Content-Security-Policy allows nothing else: no
script, no outside request); every value is escaped — group, host and container names come from
labels that tenants write.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable
from typing import Any

REFRESH = 5  # seconds

_CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#1d2230}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:18px 0 6px}
.meta{color:#555;margin:0 0 10px}.wrap{overflow-x:auto;background:#fff;border-radius:8px;
box-shadow:0 1px 2px #0002}table{border-collapse:collapse;width:100%;min-width:560px}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e6e8ec;vertical-align:top}
th{font-size:12px;text-transform:uppercase;color:#666;background:#fafbfc}
.st{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.running{background:#d8f5e0;color:#135c2a}.asleep{background:#e6e8ec;color:#3b4150}
.waking,.stopping,.removing{background:#fff1c9;color:#6b4d00}.paused{background:#dfe9ff;color:#1d3f8f}
.bad{background:#ffe0e0;color:#8f1d1d}.small{font-size:12px;color:#666}
@media (max-width:600px){body{padding:6px;font-size:14px}table{min-width:0}thead{display:none}
tr{display:block;border-bottom:1px solid #e6e8ec;padding:6px 0}td{display:block;border:0;padding:2px 8px}
td[data-k]::before{content:attr(data-k) ": ";color:#666;font-size:12px}}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _ago(iso: str | None, now: float) -> str:
    if not iso:
        return "—"
    try:
        then = datetime.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return _e(iso)
    return _duration(max(0.0, now - then)) + " ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _member(c: dict[str, Any]) -> str:
    if c.get("kind") == "service":
        replicas = c.get("replicas")
        return f"{_e(c.get('name'))} <span class=small>{_e(c.get('running_tasks', 0))}/{_e(replicas if replicas is not None else 'global')} tasks</span>"
    health = f" ({_e(c['health'])})" if c.get("health") else ""
    return f"{_e(c.get('name'))} <span class=small>{_e(c.get('state'))}{health}</span>"


def _table(head: Iterable[str], rows: list[list[str]], empty: str) -> str:
    head = list(head)
    if not rows:
        return f"<p class=small>{_e(empty)}</p>"
    out = ["<div class=wrap><table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td data-k=\"{_e(h)}\">{cell}</td>" for h, cell in zip(head, row, strict=True))
                   + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def render(report: dict[str, Any], now: float) -> str:
    """The page for one status report (as `StatusServer.report()` makes it)."""
    engine = report.get("docker") or {}
    counts = report.get("counts") or {}
    states = ", ".join(f"{counts[k]} {k}" for k in ("running", "asleep", "paused", "waking", "stopping", "removing")
                       if counts.get(k))
    docker = ("connected" if engine.get("state") == "connected" else
              f"<span class='st bad'>{_e(engine.get('state'))}</span> {_e(engine.get('last_error') or '')}")
    swarm = " · Swarm manager" if engine.get("swarm") == "manager" else (
        " · <span class='st bad'>Swarm worker: services not routed</span>" if engine.get("swarm") == "worker" else "")
    groups = []
    for g in report.get("groups") or []:
        last = g.get("last_wake") or {}
        wake = (f"{_e(last.get('result'))} {_ago(last.get('at'), now)}<br><span class=small>{_e(last.get('timing'))}</span>"
                if last else "—")
        stops = "never" if (g.get("idle_timeout") or 0) <= 0 else _duration(g.get("stops_in"))
        groups.append([
            f"<b>{_e(g.get('group'))}</b>",
            f"<span class='st {_e(g.get('state'))}'>{_e(g.get('state'))}</span>",
            "<br>".join(_e(h) for h in g.get("hosts") or []) or "—",
            "<br>".join(_member(c) for c in g.get("containers") or []) or "—",
            f"{_e(g.get('inflight', 0))} / {_e(g.get('open', 0))}",
            _ago(g.get("last_activity"), now),
            stops,
            wake,
        ])
    certs = []
    for name, c in sorted((report.get("certificates") or {}).items()):
        if not isinstance(c, dict):
            continue
        certs.append([_e(name), _e(c.get("state") or c.get("phase")), _e(c.get("not_after") or "—"),
                      _e(c.get("last_error") or "")])
    conflicts = [[_e(c.get("name")), _e(c.get("group")), _e(", ".join(c.get("containers") or [])),
                  _e(c.get("owner") or c.get("reason") or "")]
                 for c in [*(report.get("conflicts") or []), *(report.get("refused") or [])]]
    workers = [[_e(w.get("slot")), _e(w.get("pid")), _e(w.get("requests")), _e(w.get("connections")),
                _duration(now - float(w["last_report"])) + " ago" if w.get("last_report") else "—"]
               for w in report.get("workers") or [] if isinstance(w, dict)]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<meta http-equiv=refresh content={REFRESH}><title>wakeproxy status</title><style>{_CSS}</style></head><body>",
        "<h1>wakeproxy</h1>",
        f"<p class=meta>Docker: {docker}{swarm} · {_e(report.get('hosts', 0))} hosts · "
        f"{_e(counts.get('groups', 0))} groups{(' (' + _e(states) + ')') if states else ''} · "
        f"refreshes every {REFRESH} s</p>",
        "<h2>Sandboxes</h2>",
        _table(["group", "state", "hosts", "containers", "in flight / open", "last activity", "sleeps in",
                "last wake"], groups, "No sandbox declares a host yet."),
        "<h2>Certificates</h2>",
        _table(["name", "state", "valid until", "last error"], certs, "No ordered certificate."),
        "<h2>Conflicts and refused names</h2>",
        _table(["name", "group", "containers", "owner or reason"], conflicts, "None."),
    ]
    if workers:
        parts += ["<h2>Workers</h2>", _table(["worker", "pid", "requests", "connections", "last report"], workers, "")]
    parts.append("</body></html>")
    return "".join(parts)
