"""How many wakes one client may cause: a token bucket per client (IPv4 address or IPv6 /64).

Joining a wake that is already under way is free; only starting one spends a
token.  The table is bounded: the least recently seen clients are forgotten
first (a forgotten client starts again with a full bucket, which is the
generous side of the error).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict

from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

MAX_CLIENTS = 10_000
WINDOW = 60.0  # per_client is counted per this many seconds
LOG_INTERVAL = 10.0  # refusals are summed up in one log line per this long


def client_key(ip: str) -> str:
    """The unit a budget belongs to: the IPv4 address, or the /64 of an IPv6 address (one site)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class WakeBudget:
    def __init__(self, per_window: int, window: float = WINDOW, max_clients: int = MAX_CLIENTS) -> None:
        self.per_window = per_window
        self.rate = per_window / window if per_window else 0.0
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (tokens, at)
        self._refused = 0
        self._logged_at = -LOG_INTERVAL

    def spend(self, key: str, now: float) -> float | None:
        """`take`, and refusals summed up in one warning per LOG_INTERVAL (never one per request)."""
        retry = self.take(key, now)
        if retry is not None:
            self._refused += 1
            if now - self._logged_at >= LOG_INTERVAL:
                logger.warning(f"wake budget: {self._refused} wake(s) refused in the last {LOG_INTERVAL:.0f} s "
                               f"(wake.per_client = {self.per_window} a minute; latest from {key})")
                self._logged_at, self._refused = now, 0
        return retry

    def take(self, key: str, now: float) -> float | None:
        """Spend one wake for `key`: None when allowed, else the seconds until one is available."""
        if self.per_window <= 0:
            return None
        tokens, at = self._buckets.pop(key, (float(self.per_window), now))
        tokens = min(float(self.per_window), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            retry = None
        else:
            retry = math.ceil((1.0 - tokens) / self.rate)
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return retry
