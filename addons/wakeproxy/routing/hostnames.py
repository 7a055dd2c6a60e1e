"""What a hostname is: one definition for labels, the config and the Host header.

Pure functions, no regular expression with nested repetition: every check is a
split plus a bounded per-label match, so the cost is linear in the input and
capped by the length limits (253 characters a name, 63 a label) before any
matching starts.
"""

from __future__ import annotations

import ipaddress
import re

MAX_NAME = 253  # RFC 1035: a name in text form, without the trailing dot
MAX_LABEL = 63
MAX_AUTHORITY = MAX_NAME + 6  # name + ":65535"; IPv6 literals are shorter than a long name

# One DNS label. Underscores are accepted (Docker service names and some internal names use
# them); a label neither starts nor ends with a hyphen.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")


def normalize_host(host: str) -> str:
    """Lower-case, drop a trailing dot and any `:port`; IPv6 literals keep their brackets.

    Only for values that were validated (or are about to be looked up, where an
    invalid name simply matches nothing)."""
    h = host.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[: end + 1] if end != -1 else h
    h = h.split(":", 1)[0]
    return h.rstrip(".")


def is_hostname(name: str) -> bool:
    """A lower-case DNS name (`a.example.com`, `localhost`, `10.0.0.1`), no trailing dot."""
    if not name or len(name) > MAX_NAME:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def is_host_pattern(name: str) -> bool:
    """A hostname, or `*.` followed by a hostname (a wildcard for the names under it)."""
    return is_hostname(name[2:]) if name.startswith("*.") else is_hostname(name)


def parse_authority(value: str) -> tuple[str, int | None] | None:
    """A Host header / `:authority` → (normalised host, port or None); None when it is not
    `hostname[:port]`, `IPv4[:port]` or `[IPv6][:port]` (no user info, no path, no spaces)."""
    if not value or len(value) > MAX_AUTHORITY:
        return None
    v = value.lower()
    port_s: str | None = None
    if v.startswith("["):
        end = v.find("]")
        if end == -1:
            return None
        literal, rest = v[1:end], v[end + 1:]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return None
        host = v[: end + 1]
        if rest:
            if not rest.startswith(":"):
                return None
            port_s = rest[1:]
    else:
        host, sep, port_s_ = v.partition(":")
        if sep:
            port_s = port_s_
        if host.endswith("."):
            host = host[:-1]
        if not is_hostname(host):
            return None
    if port_s is None:
        return host, None
    if not _PORT.fullmatch(port_s) or not 0 < int(port_s) < 65536:
        return None
    return host, int(port_s)


def is_under(name: str, domain: str) -> bool:
    """Is `name` strictly below `domain` (`a.b.example.com` is under `example.com`)?"""
    return len(name) > len(domain) + 1 and name.endswith(domain) and name[-len(domain) - 1] == "."
