"""ACME: timing (see the package docstring)."""

from __future__ import annotations

import base64
import datetime
import email.utils
import random
import re
import time
from collections.abc import Mapping
from typing import Any

from cryptography import x509

from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

RENEW_FRACTION = 1 / 3  # renew when this much of the lifetime is left
BACKOFF_MIN = 60.0
BACKOFF_MAX = 6 * 3600.0




# --- timing (pure) -------------------------------------------------------------------


def renewal_time(not_before: datetime.datetime, not_after: datetime.datetime) -> datetime.datetime:
    """When a third of the lifetime is left."""
    return not_after - (not_after - not_before) * RENEW_FRACTION


def backoff_delay(failures: int, rng: random.Random, minimum: float = BACKOFF_MIN,
                  maximum: float = BACKOFF_MAX) -> float:
    """Seconds before attempt `failures + 1`: doubling from `minimum` up to `maximum`, ±20 % jitter.

    Jitter keeps many names that failed together (a CA outage) from
    returning together; the result stays inside [minimum, maximum].
    """
    base = min(maximum, minimum * 2 ** max(0, failures - 1))
    return max(minimum, min(maximum, base * rng.uniform(0.8, 1.2)))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) → seconds from now, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def ari_cert_id(cert: x509.Certificate) -> str:
    """The ARI certificate identifier: base64url(AKI keyIdentifier) "." base64url(serial DER)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    if aki is None:
        raise ValueError("certificate has no authority key identifier")
    serial = cert.serial_number
    raw = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # DER INTEGER bytes, with sign octet
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    return f"{b64(aki)}.{b64(raw)}"


def ari_pick(window: Mapping[str, Any], rng: random.Random) -> datetime.datetime:
    """A uniformly random moment inside an ARI `suggestedWindow` ({"start", "end"} RFC 3339)."""
    start = _rfc3339(window["start"])
    end = _rfc3339(window["end"])
    if end <= start:
        return start
    return start + (end - start) * rng.random()


def _rfc3339(value: str) -> datetime.datetime:
    v = value.strip().replace("Z", "+00:00")
    v = re.sub(r"(\.\d{6})\d+", r"\1", v)  # Python parses at most microseconds
    dt = datetime.datetime.fromisoformat(v)
    return dt if dt.tzinfo else dt.replace(tzinfo=datetime.UTC)


