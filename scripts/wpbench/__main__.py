"""scripts/bench: run the sections, write the report."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from wpbench.common import REPO, Section
from wpbench.core import Bench
from wpbench.report import write_report

SECTIONS = ("throughput", "wake", "convergence", "scale", "soak", "swarm", "metrics", "debug")


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=sys.modules["wpbench"].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (≤ 2 minutes in all)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, action="extend", metavar="SECTION",
                    help=f"run only these sections ({', '.join(SECTIONS)})")
    ap.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"),
                    help="report path (charts are written next to it; default docs/benchmarks.md)")
    ap.add_argument("--seconds", type=int, default=None, help="seconds per throughput run (default 2, quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="throughput runs per target and scenario (default 5, quick 1)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--wake-cycles", type=int, default=None, help="default 10, quick 5")
    ap.add_argument("--convergence-containers", type=int, default=None, help="default 20, quick 10")
    ap.add_argument("--scale-containers", type=int, default=None, help="default 1000, quick 500")
    ap.add_argument("--soak-seconds", type=int, default=None, help="default 60, quick 15")
    args = ap.parse_args()

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    t_start = time.monotonic()
    failed: list[str] = []
    bench = Bench(args)
    elapsed: dict[str, float] = {}
    try:
        for name in args.only or SECTIONS:
            print(f"== {name}", flush=True)
            bench.commands = []
            t0 = time.monotonic()
            try:
                getattr(bench, name)()
            except Exception as e:  # report it, go on with the other sections
                import traceback

                traceback.print_exc()
                failed.append(name)
                bench.sections[name] = Section(name, f"**Failed:** `{type(e).__name__}: {str(e)[:500]}`\n")
            elapsed[name] = time.monotonic() - t0
            bench.sections[name].commands = bench.commands
            print(f"== {name}: {elapsed[name]:.0f} s\n{bench.sections[name].body}", flush=True)
        write_report(Path(args.output), bench, elapsed, time.monotonic() - t_start)
    finally:
        bench.close()
    print(f"total {time.monotonic() - t_start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0




if __name__ == "__main__":
    raise SystemExit(main())
