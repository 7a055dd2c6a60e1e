"""The `wakeproxy` command.

    wakeproxy [--config FILE]          run the proxy (a lean mitmproxy Master)
    wakeproxy check [--config FILE]    validate the config and exit
    wakeproxy status [--config FILE] [--json]
                                       groups, their state and idle clocks, from the running proxy
    wakeproxy health [--config FILE]   exit 0 when the running proxy serves (the image's HEALTHCHECK)
    wakeproxy debug [HOST|GROUP] [--for 30m] [--off]
                                       one sandbox's live traffic in mitmweb, on the running proxy
    wakeproxy web [--config FILE] [MITMWEB ARGS…]
                                       the same proxy inside mitmweb, to watch live traffic
    wakeproxy --version                wakeproxy's, mitmproxy's and Python's versions

The lean Master holds only the built-in addons a reverse proxy needs (core,
proxyserver, next_layer, tlsconfig, errorcheck, termlog) plus ours, and dispatches
hooks through a per-hook handler table (dispatch.py), without mitmproxy's
debug-only message type check (lean.py); stock mitmdump walks 30+ addons on
every hook, roughly halving throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wakeproxy.config import ENV_CONFIG, ConfigError, format_duration, load_config

if TYPE_CHECKING:
    from mitmproxy import master

DEFAULT_CONFIG = "config/wakeproxy.yaml"  # unless WAKEPROXY_CONFIG names another (the image's /etc/wakeproxy/…)
HEALTH_STALE = 5.0  # `wakeproxy health`: a worker silent this long (it reports 4×/s) is not serving
EXIT_CONFIG = 2
EXIT_NO_DOCKER = 3  # `wakeproxy status`: the proxy runs but cannot see the Docker engine


def build_master(config_path: str, verbosity: str = "info", role: str = "single") -> master.Master:
    """A Master with just what a reverse proxy needs, configured from `config_path`.

    `role`: "single" (everything in one process), "controller" (Docker, ACME, decisions, status;
    no proxy listener at all) or "worker" (the request path). Must be called with a running event
    loop (mitmproxy's Master requires one).
    """
    # Imported here, not at the top: `wakeproxy status` and `check` should start in milliseconds.
    from mitmproxy import master, options
    from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, termlog, tlsconfig

    from wakeproxy import bundle
    from wakeproxy.mitm import dispatch, lean

    lean.drop_message_type_checks()
    opts = options.Options()
    m = master.Master(opts, with_termlog=False)
    if dispatch.compatible():
        # A handler table per hook instead of mitmproxy's walk over every addon per hook call.
        opts.changed.disconnect(m.addons._configure_all)
        m.addons = dispatch.HookTable(m)
    else:
        logging.getLogger(__name__).warning(
            "wakeproxy: this mitmproxy's AddonManager is not the shape wakeproxy.dispatch expects; "
            "using the stock hook dispatch (slower, same behaviour)")
    m._termlog_addon = termlog.TermLog()
    try:
        if load_config(config_path).log.format == "json":  # before the addons below log their first lines
            from wakeproxy.observe.jsonlog import use_json

            use_json(m._termlog_addon, role)
    except ConfigError:
        pass  # said when the option is set, below
    if role == "controller":
        m.addons.add(m._termlog_addon, core.Core(), errorcheck.ErrorCheck(), *bundle.make_controller_addons())
    else:
        ours = bundle.make_worker_addons() if role == "worker" else bundle.make_addons()
        m.addons.add(
            m._termlog_addon,
            core.Core(),
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            errorcheck.ErrorCheck(),
            *ours,
        )
    opts.update(termlog_verbosity=verbosity, wakeproxy_config=config_path)
    return m


async def _serve(config_path: str, verbosity: str, role: str = "single") -> None:
    logging.getLogger().setLevel(logging.DEBUG)
    for noisy in ("hpack", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbosity != "debug":
        # "client connect"/"client disconnect" for every connection: noise on a busy proxy.
        logging.getLogger("mitmproxy.proxy.server").setLevel(logging.WARNING)
    m = build_master(config_path, verbosity, role)
    loop = asyncio.get_running_loop()
    from wakeproxy.mitm.shutdown import GracefulStop

    config = load_config(config_path)
    stop = GracefulStop(m, config.shutdown.drain)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.signal, sig.name)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if role == "worker":
        from wakeproxy.mitm import listeners
        from wakeproxy.planes import worker

        if not listeners.install():
            raise SystemExit("wakeproxy worker: no listening sockets handed down (WAKEPROXY_LISTEN_FDS), or "
                             "this mitmproxy cannot serve them; use workers: 0")
        uid, gid = int(os.environ.get("WAKEPROXY_WORKER_UID", "-1")), int(os.environ.get("WAKEPROXY_WORKER_GID", "-1"))
        if os.geteuid() == 0 and uid > 0:
            worker.drop_privileges(uid, gid, Path(os.environ.get(worker.ENV_DIR, ".")))
    if role == "controller":
        loop.add_signal_handler(signal.SIGHUP, _reload_controller, m, config_path)
    await m.run()


def _reload_controller(m: master.Master, config_path: str) -> None:
    """SIGHUP in the controller: the config file again, applied as a live change (or refused whole)."""
    from mitmproxy import exceptions

    log = logging.getLogger("wakeproxy.cli")
    try:
        load_config(config_path)
        m.options.changed.send(updated={"wakeproxy_config"})
    except (ConfigError, exceptions.OptionsError) as e:
        log.error(f"wakeproxy: reload refused, keeping the running config: {e}")
        return
    log.info(f"controller: {config_path} reloaded")


def _check(path: str) -> int:
    """Parse the config and look at every file it names, as start-up would; exit 2 on a problem."""
    from wakeproxy import preflight

    cfg = load_config(path)  # main() has validated it already
    found = preflight.problems(cfg)
    for problem in found:
        print(f"wakeproxy: {cfg.source}: {problem}", file=sys.stderr)
    if found:
        return EXIT_CONFIG
    for taken in preflight.taken_ports(cfg):  # the running proxy itself may hold them: a note, not an error
        print(f"note: {taken}")
    for note in preflight.notes(cfg, os.environ):
        print(f"note: {note}")
    from mitmproxy import version

    from wakeproxy.mitm import shapes

    misfits = {name: why for name, why in shapes.report().items() if why}
    if misfits:  # the proxy still runs: each adaptation falls back to mitmproxy's own way, with a warning
        for name, why in misfits.items():
            print(f"note: mitmproxy {version.VERSION}: adaptation {name} does not fit ({why}); it falls back")
    else:
        print(f"mitmproxy {version.VERSION}: all {len(shapes.report())} adaptations fit")
    print(f"{path}: ok (http {cfg.listen.http}, https {cfg.listen.https}, state_dir {cfg.state_dir})")
    return 0


def _member(c: dict[str, Any]) -> str:
    """One member of a group in `wakeproxy status`: NAME:STATE, or NAME:RUNNING/REPLICAS for a service."""
    if c.get("kind") == "service":
        replicas = c.get("replicas")
        return f"{c['name']}:{c.get('running_tasks', 0)}/{replicas if replicas is not None else 'global'}"
    return f"{c['name']}:{c['state']}"


def _ago(iso: str | None) -> str:
    if not iso:
        return "-"
    delta = datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(iso)
    return _duration(delta.total_seconds()) + " ago"


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _status_url(config_path: str) -> str | None:
    listen = load_config(config_path).status.listen
    if listen is None:
        return None
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{listen.port}/status"


def _read_status(url: str, timeout: float) -> dict[str, Any] | str:
    """The status report, or why it cannot be read."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            report = json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"cannot read {url}: {e}"
    return report if isinstance(report, dict) else f"{url}: not a status report"


def _health(config_path: str) -> int:
    """0 when the controller answers and every serving worker has reported lately; 1 otherwise, saying why."""
    import time

    url = _status_url(config_path)
    if url is None:
        print("wakeproxy health: status.listen is null: nothing to ask (turn the status endpoint on)", file=sys.stderr)
        return 1
    report = _read_status(url, 3.0)
    if isinstance(report, str):
        print(f"wakeproxy health: {report}", file=sys.stderr)
        return 1
    if not report.get("synced"):
        print("wakeproxy health: starting (no complete Docker listing yet)", file=sys.stderr)
        return 1
    workers = report.get("workers")
    if isinstance(workers, list):  # the `wakeproxy` command's controller; absent when one process serves
        now = time.time()
        serving = [w for w in workers if w.get("connected") and now - float(w.get("last_report") or 0) < HEALTH_STALE]
        if not serving or len(serving) < len(workers):
            print(f"wakeproxy health: {len(serving)} of {len(workers)} worker(s) serving", file=sys.stderr)
            return 1
    engine = report.get("docker") or {}
    print(f"ok: {len(report.get('groups') or [])} group(s), docker {engine.get('state', 'unknown')}")
    return 0


def _status(config_path: str, url: str | None, as_json: bool) -> int:
    import json

    if url is None:
        url = _status_url(config_path)
        if url is None:
            print("wakeproxy: status.listen is null in the config: the status endpoint is off", file=sys.stderr)
            return 1
    report: Any = _read_status(url, 5.0)
    if isinstance(report, str):
        print(f"wakeproxy: {report}. Is the proxy running with this config?", file=sys.stderr)
        return 1
    engine = report.get("docker") or {}
    blind = engine.get("state") != "connected"  # the proxy cannot see Docker: say so, exit non-zero
    if as_json:
        print(json.dumps(report, indent=1))
        return EXIT_NO_DOCKER if blind else 0
    if engine:
        since = engine.get("since")
        iso = datetime.datetime.fromtimestamp(since, datetime.UTC).isoformat() if since else None
        if blind:
            print(f"docker: {engine.get('state')} since {_ago(iso)} — cannot reach {engine.get('url')}: "
                  f"{engine.get('last_error') or 'not connected yet'}")
        else:
            swarm = {"manager": "; a Swarm manager: services are routed too",
                     "worker": "; a Swarm WORKER: services are not routed (point docker.url at a manager)"}
            print(f"docker: connected to {engine.get('url')} (since {_ago(iso)})"
                  + swarm.get(str(engine.get("swarm") or ""), ""))
    own = report.get("container")
    if isinstance(own, dict):
        line = f"container: {own.get('container')} ({own.get('mode')} networking"
        if own.get("joining"):
            joined = own.get("joined") or []
            line += f", joined {len(joined)} network(s){': ' + ', '.join(joined) if joined else ''}"
        print(line + ")")
        for net, why in (own.get("cannot_join") or {}).items():
            print(f"  cannot join {net}: {why}")
    counts = report.get("counts")
    if isinstance(counts, dict):
        states = ", ".join(f"{counts[k]} {k}" for k in ("running", "asleep", "paused", "waking", "stopping",
                                                          "removing") if counts.get(k))
        retire = counts.get("removed_within_a_day")
        print(f"projects: {counts.get('groups', 0)}{f' ({states})' if states else ''}; "
              f"{counts.get('never_sleeps', 0)} never put to sleep; {counts.get('permanent', 0)} permanent "
              f"(io.docksal.permanent)" + (f"; {retire} removed within a day (unused)" if retire else ""))
    debug = report.get("debug")
    if isinstance(debug, dict) and (debug.get("watches") or debug.get("labels")):
        watched = [str(w["target"]) for w in debug.get("watches") or []] + [str(h) for h in debug.get("labels") or []]
        print(f"debug UI: {debug.get('state')}, watching {', '.join(watched)} (`wakeproxy debug` for its address)")
    removal = any(g.get("removed_in") is not None for g in report["groups"])  # idle.remove_after is on
    rows = [("GROUP", "STATE", "HOSTS", "CONTAINERS", "IN FLIGHT", "OPEN", "LAST ACTIVITY", "STOPS IN")
            + (("REMOVED IN",) if removal else ())]
    for g in report["groups"]:
        rows.append((
            g["group"], g["state"], ",".join(g["hosts"]),
            ",".join(_member(c) for c in g["containers"]),
            str(g["inflight"]), str(g["open"]), _ago(g["last_activity"]),
            "never" if g["idle_timeout"] <= 0 else _duration(g["stops_in"]),
        ) + (("never" if g.get("removed_in") is None else _duration(g["removed_in"]),) if removal else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    certs = report.get("certificates") or {}
    if certs:
        print()
        crows = [("CERTIFICATE", "STATE", "NOT AFTER", "RENEW AT", "LAST ERROR")]
        for name, c in certs.items():
            crows.append((name, c.get("state") or "-", (c.get("not_after") or "-")[:19],
                          (c.get("renew_at") or "-")[:19], (c.get("last_error") or "")[:80]))
        cw = [max(len(cr[i]) for cr in crows) for i in range(len(crows[0]))]
        for cr in crows:
            print("  ".join(col.ljust(w) for col, w in zip(cr, cw)).rstrip())
    workers = report.get("workers") or []
    if workers:
        print()
        wrows = [("WORKER", "PID", "UID", "CONNECTIONS", "REQUESTS", "LAST REPORT")]
        for w in workers:
            last = w.get("last_report")
            iso = datetime.datetime.fromtimestamp(last, datetime.UTC).isoformat() if last else None
            wrows.append((str(w["slot"]), str(w["pid"]), str(w["uid"]), str(w["connections"]), str(w["requests"]),
                          _ago(iso)))
        ww = [max(len(wr[i]) for wr in wrows) for i in range(len(wrows[0]))]
        for wr in wrows:
            print("  ".join(col.ljust(x) for col, x in zip(wr, ww)).rstrip())
    conflicts = report.get("conflicts") or []
    if conflicts:
        print("\nconflicts (claims on names another group owns; never routed, no certificate):")
        _table([("NAME", "CLAIMED BY", "CONTAINERS", "OWNER")] + [
            (c["name"], c["group"], ",".join(c["containers"]), c["owner"] or "-") for c in conflicts])
    refused = report.get("refused") or []
    if refused:
        print("\nrefused names (outside the names policy):")
        _table([("NAME", "GROUP", "CONTAINERS", "WHY")] + [
            (c["name"], c["group"], ",".join(c["containers"]), c["reason"]) for c in refused])
    if report.get("skipped"):
        print("\nskipped containers (bad labels):")
        for name, why in report["skipped"].items():
            print(f"  {name}: {why}")
    if report.get("misconfigured"):
        print("\nmisconfigured hosts (declared only by skipped containers):")
        print("  " + ", ".join(report["misconfigured"]))
    return EXIT_NO_DOCKER if blind else 0


def _debug(config: Any, name: str | None, length: str | None, off: bool, as_json: bool) -> int:
    """`wakeproxy debug`: ask the running proxy (its admin socket) to watch, stop watching, or list."""
    import json

    from wakeproxy.config import parse_duration
    from wakeproxy.debug.ui import ask

    request: dict[str, Any]
    if off:
        request = {"op": "off", "name": name or ""}
    elif name:
        request = {"op": "watch", "name": name}
        if length is not None:
            try:
                request["for"] = parse_duration(length)
            except ValueError as e:
                print(f"wakeproxy debug: --for {length}: {e}", file=sys.stderr)
                return EXIT_CONFIG
    else:
        request = {"op": "list"}
    try:
        answer = ask(config.state_dir, request)
    except FileNotFoundError:
        print(f"wakeproxy debug: no running proxy found ({config.state_dir}/run/admin.sock); is it started "
              f"with this config?", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"wakeproxy debug: {config.state_dir}/run/admin.sock is the operator's: run this as the user "
              f"the proxy runs as (or root; in a container: docker exec)", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"wakeproxy debug: the running proxy did not answer ({e})", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(answer, indent=2))
        return 1 if "error" in answer else 0
    if "error" in answer:
        print(f"wakeproxy debug: {answer['error']}", file=sys.stderr)
    watches = answer.get("watches") or []
    labels = answer.get("labels") or []
    if not watches and not labels:
        print("nothing is watched" + ("" if "error" in answer else " (the debug UI is stopped)"))
        return 1 if "error" in answer else 0
    if answer.get("url"):
        print(f"mitmweb: {answer['url']}")
        print("  (the token is the key to this traffic: share it only with who may see it)")
    else:
        why = answer.get("problem") or f"it is {answer.get('state')}"
        print(f"mitmweb: not up ({why}); the watched sandboxes are routed directly meanwhile")
    rows: list[tuple[str, ...]] = [("WATCHED", "WHAT", "ENDS IN", "BY")]
    rows += [(w["target"], w["kind"], format_duration(float(w["left"])), "wakeproxy debug") for w in watches]
    rows += [(h, "host", "-", "label wakeproxy.debug") for h in labels]
    _table(rows)
    return 1 if "error" in answer else 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


COMMANDS = {
    "run": "run the proxy (the default)",
    "reload": "re-read the config and replace the serving workers one by one, dropping no connection",
    "check": "validate the config and the files it names, then exit (status 2 on a problem)",
    "status": "groups, conflicts, certificates and the Docker engine, from the running proxy",
    "health": "exit 0 when the running proxy serves, 1 saying why not (for HEALTHCHECK)",
    "debug": "show one sandbox's live traffic in mitmweb, on the running proxy (no restart; others unrecorded)",
    "web": "the whole proxy inside mitmweb, by hand (starts, stops and orders nothing unless --manage)",
}


def _version() -> str:
    from importlib import metadata

    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return f"wakeproxy {v('wakeproxy')} (mitmproxy {v('mitmproxy')}, Python {sys.version.split()[0]})"


PROXYCTL_AUTOMATIC = {
    "stop": "wakeproxy stops idle projects by itself (idle.timeout, PROJECT_INACTIVITY_TIMEOUT)",
    "cleanup": "wakeproxy removes abandoned projects by itself (idle.remove_after, PROJECT_DANGLING_TIMEOUT)",
    "start": "wakeproxy starts a sleeping project on the first request for it",
}


def proxyctl(argv: list[str] | None = None) -> int:
    """`proxyctl`, for the habits of Docksal's vhost-proxy users (`docker exec … proxyctl stats`): `stats` is
    `wakeproxy status`; what Docksal's cron ran by hand, wakeproxy does by itself, and says so."""
    argv = list(sys.argv[1:] if argv is None else argv)
    what = argv[0] if argv else ""
    config = os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG
    if what == "stats":
        return _status(config, None, "--json" in argv[1:])
    if what in PROXYCTL_AUTOMATIC:
        print(f"proxyctl {what}: {PROXYCTL_AUTOMATIC[what]}; nothing to do. `wakeproxy status` shows what it "
              "does and when.")
        return 0
    print("usage: proxyctl stats   (wakeproxy's status; stop, start and cleanup happen by themselves)",
          file=sys.stderr)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "run"
    role = "single"
    if argv and argv[0] in ("_controller", "_worker"):  # started by the supervisor (planes/supervisor.py)
        role = argv.pop(0)[1:]
    elif argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    epilog = "commands:\n" + "\n".join(f"  {name:<8} {what}" for name, what in COMMANDS.items()) + \
        "\n\nwakeproxy COMMAND --help shows the options of one command."
    parser = argparse.ArgumentParser(
        prog=f"wakeproxy {command}" if command != "run" else "wakeproxy",
        description=COMMANDS[command] if command != "run" else "Reverse proxy for Docker sandboxes.",
        epilog=epilog if command == "run" else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_config = os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG
    parser.add_argument("--config", "-c", default=default_config,
                        help=f"YAML config (default: ${ENV_CONFIG}, else {DEFAULT_CONFIG}; now {default_config})")
    parser.add_argument("--version", action="version", version=_version())
    if command == "status":
        parser.add_argument("--json", action="store_true", help="print the raw JSON")
        parser.add_argument("--url", help="status endpoint (default: http://<status.listen>/status from the config)")
    if command == "debug":
        parser.add_argument("name", nargs="?", metavar="HOST|GROUP", help="what to watch (none: list what is watched)")
        parser.add_argument("--for", dest="length", metavar="DURATION", help="how long (default: debug.default_for, 30m)")
        parser.add_argument("--off", action="store_true", help="stop watching HOST|GROUP (without a name: everything)")
        parser.add_argument("--json", action="store_true", help="print the raw JSON")
    if command == "run":
        parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
        parser.add_argument("--quiet", "-q", action="store_true", help="log warnings and errors only")
    args, rest = parser.parse_known_args(argv)
    if rest and command != "web":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    # Validate before anything starts: a bad config names file, line and key, and exits 2.
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"wakeproxy: {e}", file=sys.stderr)
        return EXIT_CONFIG

    if command == "reload":
        from wakeproxy.planes.supervisor import reload

        return reload(config)
    if command == "debug":
        return _debug(config, args.name, args.length, args.off, args.json)
    if role != "single":
        verbosity = "debug" if args.verbose else "warn" if args.quiet else "info"
        try:
            asyncio.run(_serve(args.config, verbosity, role))
        except KeyboardInterrupt:
            pass
        return 0
    if command in ("check", "status", "health"):
        try:
            if command == "health":
                return _health(args.config)
            return _check(args.config) if command == "check" else _status(args.config, args.url, args.json)
        except BrokenPipeError:  # `wakeproxy status | head`: the reader left, nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    from wakeproxy import preflight

    found = preflight.problems(config) + preflight.taken_ports(config)
    for problem in found:
        print(f"wakeproxy: {config.source}: {problem}", file=sys.stderr)
    if found:
        return EXIT_CONFIG
    for note in preflight.notes(config, os.environ):
        print(f"wakeproxy: note: {note}", file=sys.stderr)
    if command == "web":
        script = Path(__file__).resolve().parent.parent / "wakeproxy.py"  # addons/wakeproxy.py
        mitmweb = Path(sys.executable).parent / "mitmweb"
        exe = str(mitmweb) if mitmweb.exists() else "mitmweb"
        manage = "--manage" in rest
        rest = [a for a in rest if a != "--manage"]
        os.execvp(exe, [exe, "-s", str(script), "--set", f"wakeproxy_config={args.config}",
                        "--set", f"wakeproxy_manage={'true' if manage else 'false'}", *rest])
    verbosity = "debug" if args.verbose else "warn" if args.quiet else "info"
    if config.worker_count() > 0:
        from wakeproxy.planes.supervisor import Supervisor

        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
        if config.log.format == "json":
            from wakeproxy.observe.jsonlog import JsonFormatter

            for handler in logging.getLogger().handlers:
                handler.setFormatter(JsonFormatter("supervisor"))
        try:
            return Supervisor(args.config, verbosity).run()
        except ConfigError as e:
            print(f"wakeproxy: {e}", file=sys.stderr)
            return EXIT_CONFIG
        except OSError as e:  # a listener taken since the preflight, a state_dir that cannot be written
            where = f" ({e.filename})" if e.filename else ""
            print(f"wakeproxy: {config.source}: {e.strerror or e}{where}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        asyncio.run(_serve(args.config, verbosity))
    except KeyboardInterrupt:
        pass
    return 0
