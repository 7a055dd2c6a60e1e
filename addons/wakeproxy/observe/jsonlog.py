"""`log.format: json`: every log line of the proxy as one JSON object (for Loki, Elasticsearch, jq).

Fields: `time` (UTC, ms), `level`, `logger`, `role` (supervisor, controller, worker, single), `pid`,
`message` (control characters escaped by logsafe, as in text), and the structured parts a line
carries in `extra={"wakeproxy": {...}}` — a wake's outcome and its timing per phase in ms, say.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any

from wakeproxy.observe.logsafe import escape, get_logger

logger = get_logger(__name__)


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": self.role,
            "pid": os.getpid(),
            "message": escape(record.getMessage()),
        }
        fields = getattr(record, "wakeproxy", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True, separators=(",", ":"), default=str)


def use_json(termlog: Any, role: str) -> bool:
    """Give mitmproxy's TermLog addon our formatter. Guarded: it must hold its handler as `.logger`
    (mitmproxy 11 and 12 do); otherwise the text format stays, with one warning."""
    handler = getattr(termlog, "logger", None)
    if not isinstance(handler, logging.Handler):
        logger.warning("log.format json: this mitmproxy's TermLog has no handler where wakeproxy expects one; "
                       "logging as text")
        return False
    handler.setFormatter(JsonFormatter(role))
    return True
