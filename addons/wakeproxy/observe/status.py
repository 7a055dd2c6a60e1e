"""A small read-only status endpoint (`GET /status`, JSON) for `wakeproxy status`, and the same
data as a page that refreshes itself (`GET /` or `/status` from a browser: observe/page.py).

It listens on `status.listen` (127.0.0.1:8099 by default), separately from the
proxy's listeners, so it never mixes with sandbox traffic and is not exposed
unless configured so.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Callable
from typing import Any

from wakeproxy.observe import page
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.runtime import Runtime
from wakeproxy.wake.idle import IdleKeeper
from wakeproxy.wake.waker import Waker

logger = get_logger(__name__)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


class StatusServer:
    def __init__(self, runtime: Runtime, waker: Waker, idle: IdleKeeper,
                 extra: dict[str, Callable[[], Any]] | None = None) -> None:
        self.runtime = runtime
        self.waker = waker
        self.idle = idle
        self.extra = extra or {}  # more sections, e.g. "certificates" from the ACME addon
        self._server: asyncio.AbstractServer | None = None

    async def running(self) -> None:
        addr = self.runtime.config.status.listen
        if addr is None:
            return
        try:
            self._server = await asyncio.start_server(self._serve, addr.host, addr.port)
        except OSError as e:
            logger.warning(f"status endpoint: cannot listen on {addr}: {e}; `wakeproxy status` will not work")
            return
        logger.info(f"status endpoint on http://{addr}/status")

    async def done(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def groups(self) -> list[dict[str, Any]]:
        snap = self.runtime.snapshot
        hosts: dict[str, list[str]] = {}
        for site in [*snap.exact.values(), *snap.wildcards.values()]:
            for g in site.groups:
                hosts.setdefault(g, []).append(site.host)
        now = time.time()
        out = []
        for name, group in sorted(snap.groups.items()):
            members = [snap.containers[c] for c in group.members if c in snap.containers]
            act = self.idle.activity.get(name)
            if name in self.idle.retiring:
                state = "removing"
            elif name in self.runtime.stopping:
                state = "stopping"
            elif self.waker.is_waking(name):
                state = "waking"
            elif any(m.state == "running" for m in members):
                state = "running"
            elif members and all(m.state == "paused" for m in members if m.id in group.routed):
                state = "paused"
            else:
                state = "asleep"
            timeout = self.idle.timeout_of(group)
            idle_in = None  # no countdown while asleep, in use, or never stopped
            if state == "running" and timeout > 0 and act is not None and not (act.inflight or act.open):
                idle_in = max(0.0, timeout - (now - act.last))
            out.append({
                "group": name,
                "state": state,
                "hosts": sorted(hosts.get(name, [])),
                "containers": [
                    {"name": m.name, "state": m.state, "health": m.health} if not m.is_service else
                    {"name": m.name, "state": m.state, "health": None, "kind": "service", "replicas": m.replicas,
                     "running_tasks": len(m.running_tasks)}
                    for m in members
                ],
                "inflight": act.inflight if act else 0,
                "open": act.open if act else 0,
                "last_activity": _iso(act.last if act else self.idle.saved_clock(name)),
                "idle_timeout": timeout,
                "permanent": group.permanent,  # io.docksal.permanent: never removed as abandoned
                "stops_in": idle_in,
                "removed_in": self.idle.removes_in(group, now),  # idle.remove_after; None: never
                "last_wake": self._last_wake(name),
            })
        return out

    def _last_wake(self, group: str) -> dict[str, Any] | None:
        recent = getattr(getattr(self.waker, "core", None), "recent", {}).get(group)
        if recent is None:
            return None
        at, result, timing = recent
        return {"at": _iso(at), "result": result, "timing": timing}

    @staticmethod
    def counts(groups: list[dict[str, Any]]) -> dict[str, int]:
        out = {"groups": len(groups), "running": 0, "asleep": 0, "paused": 0, "waking": 0, "stopping": 0,
               "removing": 0, "permanent": 0, "never_sleeps": 0, "removed_within_a_day": 0}
        for g in groups:
            out[g["state"]] = out.get(g["state"], 0) + 1
            out["permanent"] += bool(g.get("permanent"))
            out["never_sleeps"] += g["idle_timeout"] <= 0
            out["removed_within_a_day"] += g.get("removed_in") is not None and g["removed_in"] < 86400
        return out

    def report(self) -> dict[str, Any]:
        snap = self.runtime.snapshot
        groups = self.groups()
        report: dict[str, Any] = {
            "synced": snap.synced,
            "docker": self.runtime.engine.as_dict(),
            "containers": len(snap.containers),
            "hosts": len(snap.exact) + len(snap.wildcards),
            "skipped": dict(snap.skipped),
            # Hosts declared only by skipped containers (their owner's): they answer "misconfigured".
            "misconfigured": sorted(snap.misconfigured),
            "groups": groups,
            # Docksal's `proxyctl stats`: how many projects run, sleep, are paused, never sleep.
            "counts": self.counts(groups),
            # Claims that do not stand: on a name another group owns, and outside the operator's policy.
            "conflicts": [r.as_dict() for r in snap.refused if r.owner is not None],
            "refused": [r.as_dict() for r in snap.refused if r.owner is None],
        }
        for key, fn in self.extra.items():
            try:
                report[key] = fn()
            except Exception as e:  # a broken section must not hide the rest
                report[key] = {"error": str(e)}
        return report

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            accept = ""
            for _ in range(100):  # at most 100 header lines, each read within 5 s
                header = await asyncio.wait_for(reader.readline(), 5)
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.decode("latin-1").partition(":")
                if name.strip().lower() == "accept":
                    accept = value.strip()[:500]
            parts = line.decode("latin-1").split()
            path, _, query = parts[1].partition("?") if len(parts) >= 2 else ("", "", "")
            if len(parts) >= 2 and parts[0] == "GET" and path in ("/status", "/"):
                html = "format=html" in query or ("format=json" not in query and "text/html" in accept)
                if html:
                    ctype, body = "text/html; charset=utf-8", page.render(self.report(), time.time()).encode()
                else:
                    ctype, body = "application/json", json.dumps(self.report(), indent=1).encode()
                status = "200 OK"
            else:
                status, ctype, body = "404 Not Found", "application/json", b'{"error": "GET /status"}'
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                f"Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n"
                f"Connection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, OSError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
