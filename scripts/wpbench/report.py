"""The report: docs/benchmarks.md and its charts."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from wpbench.common import REPO, tool_version
from wpbench.core import Bench


def machine(bench: Bench) -> str:
    cpu = "unknown CPU"
    mem = "?"
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem = f"{int(m.group(1)) / 1024 / 1024:.0f} GB" if m else mem
    distro = "Linux"
    with contextlib.suppress(OSError):
        m = re.search(r'PRETTY_NAME="(.*)"', Path("/etc/os-release").read_text())
        distro = m.group(1) if m else distro
    import mitmproxy.version

    return (f"{os.cpu_count()} cores ({cpu}), {mem} RAM, {distro}, kernel {platform.release()}; "
            f"Python {platform.python_version()}, mitmproxy {mitmproxy.version.VERSION}; "
            f"Docker engine {bench.client.version().get('Version', '?')}; "
            f"{tool_version(['nginx', '-v']).replace('nginx version: ', '')}, "
            f"wrk {tool_version(['wrk', '-v']).split(' [')[0].replace('wrk ', '')}, "
            f"h2load {tool_version(['h2load', '--version']).split(' ')[-1]}.")


def write_report(path: Path, bench: Bench, elapsed: dict[str, float], total: float) -> None:
    argv = " ".join(sys.argv[1:])
    command = "scripts/bench" + (f" {argv}" if argv else "")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "addons"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    targets = ["| target | wanted | achieved | |", "|---|---|---|---|"]
    for t in bench.targets:
        mark = "✅" if t.ok else ("❌" if t.ok is not None else "—")
        targets.append(f"| {t.name} | {t.what} | {t.achieved} | {mark} |")
    parts = [f"""# Benchmarks

Produced by `{command}` on {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}
from commit {git or '?'}{' (with uncommitted changes in addons/)' if dirty else ''}, in {total / 60:.1f} minutes.

Machine: {machine(bench)}

The machine is shared and noisy, and the load generators run on the same 2 cores as the servers:
compare the ratios within one run, not absolute numbers across runs or machines. Reproduce with
`scripts/bench` (about 8 minutes) or `scripts/bench --quick` (under 2 minutes, shorter runs); it
installs Debian's `wrk`, `nghttp2-client` (h2load) and `nginx-light`, and the venv with the `bench` extra
(matplotlib, py-spy). Only 127.0.0.1 and the run's own containers are contacted. In the commands below,
`$TMP` is the run's temporary folder, `$RUN` its name (`wpbench-<random>`), and `$RUN-img` an image
built `FROM scratch` with Debian's busybox-static; every proxy listens on free 127.0.0.1 ports.

Profiling a miss: run the section's setup, put the load on, and attach py-spy to the proxy, e.g.
`.venv/bin/py-spy record --pid PID --duration 12 --rate 100 --threads --format raw --output p.raw`
(`--idle` to see the Docker thread's waits, `--native` for the interpreter's C frames such as the GC).

## Targets: achieved vs wanted

""" + "\n".join(targets) + "\n"]
    for name, sec in bench.sections.items():
        text = f"\n## {sec.title}\n\n{sec.body}"
        if sec.chart:
            text += f"\n![{sec.title}]({sec.chart})\n"
        if sec.commands:
            text += f"\nCommands ({elapsed.get(name, 0):.0f} s):\n\n```sh\n" + "\n".join(sec.commands) + "\n```\n"
        parts.append(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
    print(f"wrote {path}")

