"""Entry script for stock mitmproxy tools:

    mitmdump -s addons/wakeproxy.py --set wakeproxy_config=config/wakeproxy.yaml
    mitmweb  -s addons/wakeproxy.py --set wakeproxy_config=config/wakeproxy.yaml

gives the same proxy as the `wakeproxy` command (same listeners, same routes),
with mitmweb's live view of every flow.

mitmproxy puts this file's folder first on sys.path while loading it, where
`wakeproxy` would resolve to this very file and our `acme.py` would shadow the
`acme` library; so the folder is taken off sys.path for the imports, and the
package is bound to this folder explicitly (unless it is already imported,
e.g. by `wakeproxy web`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def _package() -> None:
    mod = sys.modules.get("wakeproxy")
    if mod is not None and hasattr(mod, "__path__"):
        return
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(
        "wakeproxy", here / "__init__.py", submodule_search_locations=[str(here)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["wakeproxy"] = module
    spec.loader.exec_module(module)


def _bundle() -> list:
    # While mitmproxy loads this script, this folder is first on sys.path: a module of ours
    # named like a library (acme.py) would shadow the library for every import made now.
    here = str(Path(__file__).resolve().parent)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    try:
        _package()
        return importlib.import_module("wakeproxy.bundle").make_addons()
    finally:
        sys.path[:] = saved


addons = _bundle()
