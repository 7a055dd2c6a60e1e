"""The one way an adaptation of mitmproxy declines: when its shape check names what is missing,
it leaves mitmproxy alone and says so once, with what the user loses."""

from __future__ import annotations

from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)


class Fallback:
    """One per adaptation: `decline(missing)` logs a warning the first time and returns False."""

    def __init__(self, what_is_lost: str) -> None:
        self.what_is_lost = what_is_lost
        self.warned = False

    def decline(self, missing: str) -> bool:
        if not self.warned:
            self.warned = True
            logger.warning(f"wakeproxy: this mitmproxy has no {missing} as expected; {self.what_is_lost}")
        return False
