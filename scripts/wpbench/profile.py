"""Where the CPU goes: a py-spy profile of a miss, summed by component."""

from __future__ import annotations

import re
from pathlib import Path

from wpbench.common import REPO

# --- where the CPU goes ----------------------------------------------------------------------------

# A py-spy sample is charged to the first component whose pattern matches the file of its innermost
# frame (the code running when sampled). Order matters: specific before general.
COMPONENTS: list[tuple[str, re.Pattern[str] | None]] = [
    ("HTTP/2 codec (h2, hpack, hyperframe)", re.compile(r"(^|/)(h2|hpack|hyperframe)/")),
    ("mitmproxy HTTP/2 layer", re.compile(r"mitmproxy/proxy/layers/http/_http(2|_h2)\.py")),
    ("HTTP/1 parsing and serialising", re.compile(r"(^|/)h11/|mitmproxy/net/http/|layers/http/_http1\.py")),
    ("mitmproxy HTTP stream logic", re.compile(r"mitmproxy/proxy/layers/http/")),
    ("TLS (pyOpenSSL, mitmproxy TLS layer)", re.compile(r"(^|/)(OpenSSL|cryptography)/|layers/tls\.py|(^|/)ssl\.py")),
    ("hook dispatch (mitmproxy's, or wakeproxy's HookTable)",
     re.compile(r"mitmproxy/addonmanager\.py|mitmproxy/hooks\.py|(^|/)contextlib\.py|(^|/)addons/dispatch\.py")),
    ("mitmproxy's other addons", re.compile(r"mitmproxy/addons/")),
    ("wakeproxy addons", re.compile(r"^addons/|" + re.escape(str(REPO / "addons")) + "/")),  # py-spy shortens paths
    ("request/response objects (mitmproxy http.py, type checks)",
     re.compile(r"mitmproxy/(http\.py|utils/typecheck\.py|coretypes/)|(^|/)(dataclasses|typing|uuid)\.py")),
    ("mitmproxy proxy core (layers, server, tunnel)", re.compile(r"mitmproxy/")),
    ("asyncio, sockets", re.compile(r"(^|/)(asyncio/|selectors\.py|socket\.py)")),
    ("other", None),
]


def components(raw: Path) -> dict[str, float]:
    """py-spy `--format raw` output → share of samples per component (sums to 1)."""
    counts = dict.fromkeys((name for name, _ in COMPONENTS), 0)
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            leaf = stack.rsplit(";", 1)[-1]
            where = m.group(1) if (m := re.search(r"\((.*):\d+\)$", leaf)) else ""
            for name, pattern in COMPONENTS:
                if pattern is None or pattern.search(where):
                    counts[name] += int(n)
                    break
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


