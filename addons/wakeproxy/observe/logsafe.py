"""Log lines say what happened, and nothing a tenant or a client wrote can add a line to them.

Every logger of the package is made by `get_logger`, which escapes control
characters (newlines, carriage returns, escape sequences, NUL) in the final
message: a label value or a Host header appears as `a\\nb`, never as a forged
line of its own.  One place for it, so no message has to remember.
"""

from __future__ import annotations

import logging

_ESCAPES = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape(text: str) -> str:
    """`text` with every control character written as an escape (printable text is unchanged)."""
    return text if text.isprintable() else text.translate(_ESCAPES)


class _EscapeControl(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.isprintable():
            record.msg, record.args = escape(msg), ()
        return True


_FILTER = _EscapeControl()


def get_logger(name: str) -> logging.Logger:
    """`logging.getLogger(name)` whose messages have their control characters escaped."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
