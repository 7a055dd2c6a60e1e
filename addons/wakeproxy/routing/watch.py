"""Which requests go through the debug UI (`wakeproxy debug`): an immutable value the controller
sends to every worker, read by the router in O(1).

The controller (debug/ui.py) decides what is watched and runs the UI; a worker only reads this.
`proxy` is None while the UI is not listening (not started yet, restarting after a crash): then
watched sites are routed directly, as if nothing were watched.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Watch:
    hosts: frozenset[str] = frozenset()  # site hosts (Site.host: "a.example.com" or "*.example.com")
    groups: frozenset[str] = frozenset()  # group keys (every site of the group)
    proxy: tuple[str, int] | None = None  # the UI's proxy listener on loopback
    key: str = ""  # what the worker shows the UI's proxy listener (Proxy-Authorization: Bearer KEY)

    def via(self, site_host: str, group: str) -> tuple[str, int] | None:
        """The UI's proxy listener when requests of this site (of this group) are watched, else None."""
        if self.proxy is None or (site_host not in self.hosts and group not in self.groups):
            return None
        return self.proxy

    @property
    def active(self) -> bool:
        return self.proxy is not None
