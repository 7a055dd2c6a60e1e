"""The one way an adaptation of mitmproxy declines: when its shape check names what is missing,
it leaves mitmproxy alone and says so once, with what the user loses."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import types
from typing import Any

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


class AsyncioWith(types.ModuleType):
    """asyncio with some functions replaced, to put in place of one mitmproxy module's `asyncio`."""

    def __init__(self, real: types.ModuleType, **overrides: Any) -> None:
        super().__init__("asyncio")
        self._real = real
        for name, value in overrides.items():
            setattr(self, name, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def calls_asyncio(module_name: str, owner: str, function: str, call: str) -> bool:
    """Does `module_name`.`owner`.`function` still call `asyncio.<call>(` through the module's own
    `asyncio` name (plain, or already one of our AsyncioWith)? The shape check of an AsyncioWith patch."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    current = getattr(module, "asyncio", None)
    return (current is asyncio or isinstance(current, AsyncioWith)) and _source_calls(module_name, owner, function, call)


@functools.cache
def _source_calls(module_name: str, owner: str, function: str, call: str) -> bool:
    """Read once: a serving worker that has given up root may no longer reach mitmproxy's source files
    (planes.worker.drop_privileges asks before it drops)."""
    try:
        module = importlib.import_module(module_name)
        src = inspect.getsource(getattr(getattr(module, owner), function))
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return f"asyncio.{call}(" in src
