"""Does every adaptation of mitmproxy's internals fit the installed mitmproxy? One list, read by
`wakeproxy check` (and the image's tests): each entry's own shape check, nothing patched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _checks() -> dict[str, Callable[[], str | None]]:
    from wakeproxy.mitm import dispatch, earlyanswer, errorpages, h2reuse, headbound, lean, listeners, upstream

    def ok(fit: bool, what: str) -> str | None:
        return None if fit else what

    def unless_installed(module: Any, check: Callable[[], str | None]) -> Callable[[], str | None]:
        return lambda: None if module.installed() else check()  # in place already: it fitted when patched

    return {
        "dispatch": lambda: ok(dispatch.compatible(), "AddonManager is not the shape the hook table was written for"),
        "lean": lean.shape_problem,
        "h2reuse": unless_installed(h2reuse, h2reuse.shape_problem),
        "headbound": unless_installed(headbound, headbound.compatible),
        "earlyanswer": unless_installed(earlyanswer, earlyanswer.compatible),
        "errorpages": unless_installed(errorpages, errorpages.compatible),
        "listeners": lambda: ok(listeners.shape_ok(), "mode_servers does not call asyncio.start_server"),
        "upstream": lambda: ok(upstream.shape_ok(), "ConnectionHandler.open_connection does not call "
                                                    "asyncio.open_connection"),
    }


def report() -> dict[str, str | None]:
    """Adaptation → None when it fits, else what this mitmproxy lacks (it then falls back when used)."""
    out: dict[str, str | None] = {}
    for name, check in _checks().items():
        try:
            out[name] = check()
        except Exception as e:  # noqa: BLE001 - a check that breaks is a misfit, not a crash of `check`
            out[name] = f"the shape check failed: {e!r}"
    return out
