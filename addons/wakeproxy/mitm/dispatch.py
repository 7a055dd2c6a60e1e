"""Hook dispatch for the lean `wakeproxy` Master: a table of handlers per hook.

mitmproxy's AddonManager, for every hook of every flow, walks every addon: a
generator over the addon tree, a `getattr` per addon, a coroutine and a
`contextlib` context manager per addon, the hook's arguments rebuilt from its
dataclass fields per call, and then the whole walk again for the `update` hook
that no addon of ours implements. Under load that was about a fifth of the
proxy's CPU (profile in docs/benchmarks.md).

`HookTable` keeps the same contract and does the walk once per hook name:

- handlers run in chain order (an addon, then its sub-addons), sync or async;
- an exception in one handler is logged ("Addon error: …") and the others still
  run; `AddonHalt` ends the hook; `OptionsError` propagates;
- a hook nobody implements costs one dict lookup (the `update` pass included);
- the table is dropped whenever addons are added, removed or cleared.

What it does not follow: an addon that grows a hook method, or changes its
`addons` attribute, after it was registered. The lean Master's addons are fixed
at start-up (no script loader), so this never happens there; stock mitmdump and
mitmweb keep mitmproxy's own manager.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks

from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

Handler = tuple[Any, Callable[..., Any]]

# The AddonManager methods this class replaces or extends; checked before it is used.
# What HookTable overrides, and `_configure_all`, which the lean master disconnects from the
# options' change signal when it swaps in the table (cli.build_master).
_METHODS = ("register", "remove", "clear", "trigger_event", "handle_lifecycle", "_configure_all")


def compatible() -> bool:
    """Whether this mitmproxy's AddonManager has the shape HookTable was written against."""
    own = addonmanager.AddonManager.__dict__
    return all(callable(own.get(n)) for n in _METHODS) and hasattr(addonmanager, "traverse") \
        and hasattr(hooks, "UpdateHook")


_FIELDS: dict[type, tuple[str, ...]] = {}


def hook_args(event: hooks.Hook) -> list[Any]:
    """`event.args()` with the field names looked up once per hook class."""
    names = _FIELDS.get(type(event))
    if names is None:
        names = _FIELDS[type(event)] = tuple(f.name for f in dataclasses.fields(event))  # type: ignore[arg-type]
    return [getattr(event, n) for n in names]


class HookTable(addonmanager.AddonManager):
    """An AddonManager that dispatches each hook through a cached list of handlers."""

    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._table: dict[str, tuple[Handler, ...]] = {}

    # --- keeping the table honest ---------------------------------------------------------

    def register(self, addon: Any) -> Any:
        self._table = {}
        try:
            return super().register(addon)
        finally:
            self._table = {}

    def remove(self, addon: Any) -> None:
        self._table = {}
        try:
            super().remove(addon)
        finally:
            self._table = {}

    def clear(self) -> None:
        super().clear()
        self._table = {}

    def handlers(self, name: str) -> tuple[Handler, ...]:
        """The (addon, bound method) pairs that implement hook `name`, in chain order."""
        found = self._table.get(name)
        if found is None:
            pairs: list[Handler] = []
            for addon in addonmanager.traverse(self.chain):
                func = getattr(addon, name, None)
                if not func or isinstance(func, types.ModuleType):
                    continue  # a module imported under a hook's name is not a handler (as upstream)
                if not callable(func):
                    logger.error(f"Addon handler {name} ({addon}) not callable")
                    continue
                pairs.append((addon, func))
            found = self._table[name] = tuple(pairs)
        return found

    # --- dispatch ---------------------------------------------------------------------------

    async def trigger_event(self, event: hooks.Hook) -> None:
        found = self._table.get(event.name)
        if found is None:
            found = self.handlers(event.name)
        if not found:
            return
        args = hook_args(event)
        for _addon, func in found:
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:
                logger.error(f"Addon error: {e}", exc_info=True)

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        update = self._table.get("update")
        if update is None:
            update = self.handlers("update")
        if update:
            message = hook_args(event)[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))
