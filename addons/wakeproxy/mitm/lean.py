"""What the lean `wakeproxy` Master changes in mitmproxy that stock mitmdump/mitmweb keep.

mitmproxy type-checks every field of every `Request`/`Response` it builds, in
`MessageData.__post_init__` — a check it defines only under `__debug__`, i.e. one that
`python -O` removes. Under load that check was the largest single item in the proxy's CPU
profile (~0.3 ms of ~1.6 ms per request, docs/benchmarks.md "Where the CPU goes"). The lean
Master builds messages only with mitmproxy's own parsers and with our addons (which use
`Response.make`), and runs no user scripts, so it does what `-O` would do for this one check
and keeps every other assertion. Debugging under mitmdump/mitmweb keeps the check.
"""

from __future__ import annotations

from collections.abc import Callable

from wakeproxy.mitm.guard import Fallback
from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)

_original: Callable[..., None] | None = None  # mitmproxy's check, while replaced
FALLBACK = Fallback("mitmproxy's debug-only type check stays (a little slower, same behaviour)")


def _no_check(self: object) -> None:
    """MessageData without its debug-only type check (what `python -O` gives)."""


def shape_problem() -> str | None:
    """None when this mitmproxy has what `drop_message_type_checks` replaces, else what it lacks.

    Exactly what is replaced: MessageData's own __post_init__, which only type-checks its fields
    (it calls typecheck.check_option_type), and no subclass with one of its own."""
    from mitmproxy import http

    own = http.MessageData.__dict__.get("__post_init__")
    if own is _no_check:
        own = _original
    code = getattr(own, "__code__", None)
    if own is None or code is None or "check_option_type" not in code.co_names \
            or "__post_init__" in http.RequestData.__dict__ or "__post_init__" in http.ResponseData.__dict__:
        return "MessageData.__post_init__ that only type-checks the fields"
    return None


def drop_message_type_checks() -> bool:
    """Replace the debug-only check with a no-op (once); False if mitmproxy's shape is not as expected."""
    from mitmproxy import http

    own = http.MessageData.__dict__.get("__post_init__")
    if own is _no_check:
        return True
    problem = shape_problem()
    if problem is not None:
        return FALLBACK.decline(problem)
    global _original
    _original = own
    # Not deleted: the dataclass __init__ of RequestData/ResponseData calls __post_init__.
    setattr(http.MessageData, "__post_init__", _no_check)
    return True


def restore_message_type_checks() -> None:
    """Undo `drop_message_type_checks` (for tests that build a lean Master in-process)."""
    global _original
    from mitmproxy import http

    if _original is not None:
        setattr(http.MessageData, "__post_init__", _original)
        _original = None
