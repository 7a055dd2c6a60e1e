"""Fields of the engine's answers, read the same way for containers and Swarm services."""

from __future__ import annotations

import datetime
from typing import Any

from wakeproxy.routing.labels import USED_ENV


def parse_env(env: list[str] | None) -> dict[str, str]:
    """`KEY=value` strings → the variables wakeproxy reads (USED_ENV); every other one is dropped."""
    out: dict[str, str] = {}
    for item in env or ():
        key, sep, value = item.partition("=")
        if sep and key in USED_ENV:
            out[key] = value
    return out


def parse_exposed(exposed: dict[str, Any] | None) -> tuple[int, ...]:
    ports: list[int] = []
    for spec in exposed or {}:
        num, _, proto = spec.partition("/")
        if proto in ("", "tcp") and num.isdigit():
            ports.append(int(num))
    return tuple(sorted(set(ports)))


def created_time(value: Any) -> float:
    """Creation time in whole seconds, from the listing (an int) or inspect (RFC 3339 with ns)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(int(value))
    if isinstance(value, str) and value:
        text = value.rstrip("Z").split(".", 1)[0]
        try:
            dt = datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC)
        except ValueError:
            return 0.0
        return float(int(dt.timestamp()))
    return 0.0
