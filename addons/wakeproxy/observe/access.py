"""The access log: one line per answered request, off unless `log.access` names a file (or "-").

Formats (`log.access_format`):

- `combined`: Apache's and nginx's combined format, then our fields, quoted where they are text:
  `IP - - [01/Dec/2026:17:05:05 +0000] "GET /path HTTP/1.1" 200 1234 "referer" "user agent"
  "host" "group" "container" 12.3 - http1 tls`. Duration in ms; the `-` after it is the time the
  request was held by a wake (ms), when it was. Inside quotes `"` and `\\` are written `\\x22` and
  `\\x5c`, and control characters `\\xHH` (nginx's escaping): a client cannot end a field or a line.
- `json`: one object per line with the same fields, named.

Lines are made on the request path (a few string operations) and written by a thread of this addon
(never on the event loop), through a bounded queue: when the disk cannot keep up, lines are dropped
and counted (and said once a minute), the proxy never waits. The file is opened for appending; a file
moved away by logrotate (or removed) is noticed within a second and a new one opened, and a config
reload opens it again. Every text field is cut to a bound, so a line stays under 4 KiB — each one
`write()` of an O_APPEND file: lines of several workers never interleave.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import re
import sys
import threading
import time
from typing import IO, Any

from mitmproxy import http

from wakeproxy.observe.logsafe import get_logger
from wakeproxy.pages import client_ip

logger = get_logger(__name__)

# The grammar of a combined line (for log shippers and the tests): named groups, one per field.
COMBINED_LINE = re.compile(
    r'^(?P<client>\S+) - - \[(?P<when>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}|-) (?P<bytes>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<ua>[^"]*)" "(?P<host>[^"]*)" "(?P<group>[^"]*)" "(?P<container>[^"]*)" '
    r'(?P<duration>[\d.]+) (?P<held>[\d.]+|-) (?P<protocol>http1|h2|websocket) (?P<tls>tls|-)$')
QUEUE_MAX = 10_000  # lines waiting for the writer at most; beyond: dropped (and counted)
CHECK_EVERY = 1.0  # seconds between checks that the file is still the one at the path (logrotate)
DROP_LOG_EVERY = 60.0
LIMITS = {"path": 2048, "host": 256, "referer": 512, "user_agent": 512, "group": 128, "container": 128}
_REOPEN = object()
_STOP = object()


def _escape(text: str, limit: int) -> str:
    """nginx's escaping inside a quoted field, after cutting to `limit` characters."""
    text = text[:limit]
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if ch == '"' or ch == "\\" or o < 0x20 or 0x7F <= o < 0xA0 or not ch.isprintable():
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def fields(flow: http.HTTPFlow) -> dict[str, Any]:
    """The access log's fields of a finished flow (plain JSON values)."""
    req, resp = flow.request, flow.response
    start = req.timestamp_start
    end = (resp.timestamp_end or resp.timestamp_start) if resp is not None else time.time()
    held = None
    if "wakeproxy.wake" in flow.metadata and resp is not None and resp.timestamp_start:
        held = max(0.0, resp.timestamp_start - (req.timestamp_end or start))
    tls = flow.client_conn.tls_established
    return {
        "time": datetime.datetime.fromtimestamp(start, datetime.UTC).isoformat(timespec="milliseconds"),
        "client": client_ip(flow),
        "host": (req.host_header or "")[: LIMITS["host"]],
        "group": str(flow.metadata.get("wakeproxy.group") or "")[: LIMITS["group"]],
        "container": str(flow.metadata.get("wakeproxy.container") or "")[: LIMITS["container"]],
        "method": req.method[:32],
        "path": req.path[: LIMITS["path"]],
        "http_version": req.http_version[:16],
        "status": resp.status_code if resp is not None else 0,
        "bytes": len(resp.raw_content) if resp is not None and resp.raw_content is not None else 0,
        "duration_ms": round(max(0.0, end - start) * 1000, 1),
        "held": held is not None,
        "held_ms": round(held * 1000, 1) if held is not None else None,
        "protocol": "websocket" if flow.websocket is not None else "h2" if req.http_version == "HTTP/2.0" else "http1",
        "tls": bool(tls),
        "tls_version": (flow.client_conn.tls_version or "") if tls else "",
        "referer": req.headers.get("referer", "")[: LIMITS["referer"]],
        "user_agent": req.headers.get("user-agent", "")[: LIMITS["user_agent"]],
        "error": (flow.error.msg[:200] if flow.error is not None else ""),
    }


def combined(f: dict[str, Any]) -> str:
    """One line in the combined format, then our fields (see the module's doc)."""
    when = datetime.datetime.fromisoformat(f["time"]).strftime("%d/%b/%Y:%H:%M:%S %z")
    q = _escape
    request = f"{f['method']} {f['path']} {f['http_version']}"
    return (f"{f['client'] or '-'} - - [{when}] \"{q(request, LIMITS['path'] + 64)}\" {f['status'] or '-'} "
            f"{f['bytes']} \"{q(f['referer'], LIMITS['referer'])}\" \"{q(f['user_agent'], LIMITS['user_agent'])}\" "
            f"\"{q(f['host'], LIMITS['host'])}\" \"{q(f['group'], LIMITS['group'])}\" "
            f"\"{q(f['container'], LIMITS['container'])}\" {f['duration_ms']} "
            f"{f['held_ms'] if f['held_ms'] is not None else '-'} {f['protocol']} {'tls' if f['tls'] else '-'}")


def json_line(f: dict[str, Any]) -> str:
    return json.dumps(f, ensure_ascii=True, separators=(",", ":"))


class AccessLog:
    """The access log addon (a serving process's)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.dropped = 0
        self._target: str | None = None
        self._format = "combined"
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._dropped_said = 0.0

    def configure(self, updated: set[str]) -> None:
        cfg = self.runtime.config.log
        self._format = cfg.access_format
        if cfg.access != self._target or "wakeproxy_config" in updated:
            self._target = cfg.access
            if self._target is not None:
                self._ensure_thread()
                self._put(_REOPEN)  # also on every reload: a new file after a rotation

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._write_forever, name="wakeproxy-access-log", daemon=True)
            self._thread.start()

    def response(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            self._log(flow)

    def _log(self, flow: http.HTTPFlow) -> None:
        if self._target is None or flow.metadata.get("wakeproxy.logged"):
            return
        flow.metadata["wakeproxy.logged"] = True
        f = fields(flow)
        self._put(json_line(f) if self._format == "json" else combined(f))

    def _put(self, item: Any) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            now = time.monotonic()
            if now - self._dropped_said >= DROP_LOG_EVERY:
                self._dropped_said = now
                logger.warning(f"access log: the writer cannot keep up; {self.dropped} line(s) dropped so far")

    def done(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=1)
            except queue.Full:
                pass
            self._thread.join(timeout=2)

    # --- the writer thread ---------------------------------------------------------------------

    def _write_forever(self) -> None:
        out: IO[str] | None = None
        path: str | None = None
        inode: tuple[int, int] | None = None
        checked = 0.0
        failed_at = 0.0
        while True:
            try:
                item = self._queue.get(timeout=CHECK_EVERY)
            except queue.Empty:
                item = None
            lines: list[str] = []
            stop = False
            reopen = False
            for it in [item, *self._drain()]:
                if it is None:
                    continue
                if it is _STOP:
                    stop = True
                elif it is _REOPEN:
                    reopen = True
                else:
                    lines.append(it)
            now = time.monotonic()
            if path is not None and path != "-" and now - checked >= CHECK_EVERY:
                checked = now
                try:
                    st = os.stat(path)
                    if (st.st_dev, st.st_ino) != inode:
                        reopen = True  # moved away (logrotate) or replaced
                except FileNotFoundError:
                    reopen = True
                except OSError:
                    pass
            if reopen or (out is None and lines and now - failed_at >= CHECK_EVERY):
                if out is not None and out is not sys.stdout:
                    out.close()
                out, path, inode = None, self._target, None
                if path == "-":
                    out = sys.stdout
                elif path is not None:
                    try:
                        out = open(path, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115 - kept open
                        st = os.fstat(out.fileno())
                        inode = (st.st_dev, st.st_ino)
                    except OSError as e:
                        failed_at = now
                        logger.warning(f"access log: cannot open {path} ({e}); lines are dropped until it can be")
            if out is not None and lines:
                try:
                    # One write per line: with O_APPEND, each lands whole after the others' (several workers).
                    for line in lines:
                        out.write(line + "\n")
                        out.flush()
                except OSError as e:
                    logger.warning(f"access log: cannot write to {path} ({e})")
                    out = None
            elif lines:
                self.dropped += len(lines)
            if stop:
                if out is not None and out is not sys.stdout:
                    out.close()
                return

    def _drain(self) -> list[Any]:
        items: list[Any] = []
        while len(items) < 1000:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items
