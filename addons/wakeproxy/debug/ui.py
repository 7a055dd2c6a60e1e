"""The controller's side of `wakeproxy debug`: what is watched, the UI process, the admin socket.

- **What is watched:** names the operator gave `wakeproxy debug NAME [--for D]` (a host: the site
  that serves it; or a group: all its sites), each until its time is up, plus the hosts whose
  containers carry `wakeproxy.debug=true` where the operator trusts that label (`labels.debug`).
  The serving workers learn it as a `Watch` (routing/watch.py) and send only those requests
  through the UI; everything else is routed as before, never recorded.
- **The UI process** (debug/web.py, mitmweb) runs only while something is watched: started on
  demand, stopped when the last watch ends. It runs as the workers' account, without the Docker
  socket. When it exits on its own (a crash, a kill) the workers are told at once to route the
  watched sites directly again; it is started again after a pause (doubling up to five minutes),
  for as long as something is still watched.
- **The admin socket** `state_dir/run/admin.sock` (mode 0600, the peer's uid is checked) takes one
  JSON request a line from the `wakeproxy debug` command: only the operator who can reach the
  state directory may turn watching on, and only they are told the UI's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wakeproxy.config import format_duration
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.labels import normalize_host
from wakeproxy.routing.snapshot import Snapshot
from wakeproxy.routing.watch import Watch
from wakeproxy.runtime import Runtime

logger = get_logger(__name__)

ADMIN_SOCKET = "admin.sock"
MAX_REQUEST = 64 * 1024  # one line from `wakeproxy debug`
MAX_WATCHES = 100
START_TIMEOUT = 30.0  # for the UI to say it listens
STOP_TIMEOUT = 5.0  # after SIGTERM, before SIGKILL
FIRST_PAUSE, LONGEST_PAUSE = 5.0, 300.0  # before the UI is started again after it died
LOG_LINES = 20  # lines of the UI's own log passed on per LOG_WINDOW (the rest are counted)
LOG_WINDOW = 10.0
PING_EVERY, PING_TIMEOUT = 2.0, 8.0  # the UI answers a ping on its event loop; silent this long: killed
TOKEN_IN = re.compile(r"((?:token|Bearer)[=\s]+)[A-Za-z0-9_\-]+")  # never in our log, whatever the UI logs


@dataclass
class Watching:
    kind: str  # "host" (a site) | "group"
    target: str  # the site's host, or the group's key
    until: float  # time.time() when it ends
    asked: str  # the name as the operator gave it


class DebugUI:
    """An addon of the controller (and of the single process)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.watches: dict[tuple[str, str], Watching] = {}
        self.watchers: list[Callable[[], None]] = []  # told when runtime.watch changes (the plane)
        self.token = ""  # for the UI's users, new with every UI process (a leaked one ends with it)
        self.key = ""  # for the workers, likewise
        self.proc: asyncio.subprocess.Process | None = None
        self.proxy: tuple[str, int] | None = None
        self.state = "off"  # off | starting | ready | stopping | paused
        self.problem: str | None = None  # why the UI is not up, for `wakeproxy debug`
        self.pause_until = 0.0
        self.pause = FIRST_PAUSE
        self._ready: asyncio.Future[str | None] | None = None  # how the start ended (None: up)
        self._reported: asyncio.Future[str | None] | None = None  # what the UI process said
        self._allow_sent: frozenset[tuple[str, int]] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._path: str | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._log_window = (0.0, 0, 0)  # (start, lines passed, lines dropped)
        self._pinged = self._answered = 0.0  # monotonic: the last ping sent, the last pong heard

    # --- lifecycle --------------------------------------------------------------------------------

    async def running(self) -> None:
        if not self.runtime.manage:
            return  # a debugging copy (`wakeproxy web`) serves no admin socket: the real proxy does
        await self._listen()
        self._tasks.append(asyncio.get_running_loop().create_task(self._keep(), name="debug UI"))

    async def done(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
            if self._path and os.path.exists(self._path):
                os.unlink(self._path)
        await self._stop("the proxy stops")

    async def _keep(self) -> None:
        while True:
            await self.runtime.changed(1.0)
            try:
                self.tick()
            except Exception:  # a bug here must not end watching's clock
                logger.exception("debug UI: bookkeeping failed")

    def tick(self) -> None:
        """Expire watches, start or stop the UI, and tell the UI and the workers what changed."""
        now = time.time()
        for key, w in list(self.watches.items()):
            if w.until <= now:
                del self.watches[key]
                logger.info(f"debug: watching {w.asked} ended (its time was up)")
        hosts, groups = self.targets()
        wanted = bool(hosts or groups)
        if wanted and self.state == "paused" and now >= self.pause_until:
            self.state = "off"
        if wanted and self.state == "off":
            self.state = "starting"
            self._ready = asyncio.get_running_loop().create_future()
            self._tasks.append(asyncio.get_running_loop().create_task(self._start(), name="debug UI start"))
        elif not wanted and self.state in ("starting", "ready"):
            self.state = "stopping"
            self._tasks.append(asyncio.get_running_loop().create_task(self._stop("nothing is watched any more")))
        elif not wanted and self.state == "paused":
            self.state = "off"
        self._tasks = [t for t in self._tasks if not t.done()]
        if self.state == "ready":
            self._send_allow(hosts, groups)
            self._check_alive()
        self._publish(hosts, groups)

    def _check_alive(self) -> None:
        """A UI that stops answering (stopped, stuck) would hold the watched sites' requests: kill it, and its
        exit routes them directly again."""
        now = time.monotonic()
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return
        if now - self._answered > PING_TIMEOUT:
            logger.warning(f"debug: the UI has not answered for {now - self._answered:.0f} s; ending it")
            self._answered = now  # said once
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return
        if now - self._pinged >= PING_EVERY:
            self._pinged = now
            proc.stdin.write((json.dumps({"ping": int(now)}) + "\n").encode())

    def targets(self) -> tuple[frozenset[str], frozenset[str]]:
        hosts = {w.target for w in self.watches.values() if w.kind == "host"}
        groups = {w.target for w in self.watches.values() if w.kind == "group"}
        return frozenset(hosts | self.runtime.snapshot.debug_hosts), frozenset(groups)

    def _publish(self, hosts: frozenset[str], groups: frozenset[str]) -> None:
        watch = Watch(hosts, groups, self.proxy if self.state == "ready" else None, self.key)
        if watch != self.runtime.watch:
            self.runtime.watch = watch
            for tell in list(self.watchers):
                tell()

    # --- the UI process -----------------------------------------------------------------------------

    async def _start(self) -> None:
        self.problem, self._allow_sent = None, None
        loop = asyncio.get_running_loop()
        self._reported = loop.create_future()
        self.token, self.key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self._pinged = self._answered = time.monotonic()
        cfg = self.runtime.config
        confdir = self._confdir()
        account = _account()
        cmd = [sys.executable, "-m", "wakeproxy.debug.web", "--web-host", cfg.debug.listen.host,
               "--web-port", str(cfg.debug.listen.port), "--confdir", str(confdir),
               "--max-flows", str(cfg.debug.max_flows), "--max-body", str(cfg.debug.max_body),
               "--max-memory", str(cfg.debug.max_memory)]
        if account is not None:
            cmd += ["--user", f"{account[0]}:{account[1]}"]
        child_env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "TZ")}
        child_env["HOME"] = str(confdir)
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=child_env, cwd=str(confdir), start_new_session=True,
                limit=1024 * 1024)
        except OSError as e:
            self._failed(f"cannot start the debug UI: {e}")
            self._outcome(self.problem)
            return
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        hosts, groups = self.targets()
        proc.stdin.write((json.dumps({"token": self.token, "key": self.key,
                                      "allow": self._allow(hosts, groups)}) + "\n").encode())
        self._tasks.append(loop.create_task(self._read_reports(proc, proc.stdout)))
        self._tasks.append(loop.create_task(self._pass_log(proc.stderr)))
        self._tasks.append(loop.create_task(self._wait_exit(proc)))
        try:
            problem = await asyncio.wait_for(asyncio.shield(self._reported), START_TIMEOUT)
        except TimeoutError:
            problem = f"the debug UI did not start within {START_TIMEOUT:.0f} s"
            await self._stop(problem)
            self.state = "starting"
        if self.state != "starting":  # stopped meanwhile: nothing is watched any more
            if self.proc is proc and proc.returncode is None:
                await self._stop("nothing is watched any more")  # (asked to stop before it was running)
            self._outcome(problem or "the debug UI was stopped")
            return
        if problem is not None:
            self._failed(problem)
            self._outcome(problem)
            return
        self.state = "ready"
        self._outcome(None)
        logger.info(f"debug: the UI listens on http://{cfg.debug.listen}/ (`wakeproxy debug` prints its token)")
        self.tick()

    def _confdir(self) -> Path:
        run = self.runtime.config.state_dir / "run"
        run.mkdir(mode=0o750, parents=True, exist_ok=True)
        confdir = run / "debug-ui"
        confdir.mkdir(mode=0o700, exist_ok=True)
        return confdir

    async def _read_reports(self, proc: asyncio.subprocess.Process, out: asyncio.StreamReader) -> None:
        with contextlib.suppress(ValueError, OSError, KeyError, TypeError, IndexError):
            while line := await out.readline():
                try:
                    message = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if not isinstance(message, dict):
                    continue
                if "pong" in message and proc is self.proc:
                    self._answered = time.monotonic()
                elif "ready" in message and proc is self.proc:
                    proxy = message["ready"]["proxy"]
                    self.proxy = (str(proxy[0]), int(proxy[1]))
                    self._answered = time.monotonic()
                    self._resolve(None)
                elif "error" in message:
                    self._resolve(str(message["error"])[:500])

    async def _pass_log(self, err: asyncio.StreamReader) -> None:
        """The UI's own log lines into ours, at most LOG_LINES per LOG_WINDOW (a flood is counted)."""
        with contextlib.suppress(ValueError, OSError):
            while line := await err.readline():
                now = time.monotonic()
                start, passed, dropped = self._log_window
                if now - start > LOG_WINDOW:
                    if dropped:
                        logger.warning(f"debug UI: {dropped} more log lines not shown")
                    start, passed, dropped = now, 0, 0
                if passed < LOG_LINES:
                    text = TOKEN_IN.sub(r"\1…", line.decode(errors="replace").rstrip()[:500])
                    if text:
                        logger.warning(f"debug UI: {text}")
                    passed += 1
                else:
                    dropped += 1
                self._log_window = (start, passed, dropped)

    async def _wait_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is not self.proc:
            return
        self.proc, self.proxy = None, None
        if self.state == "stopping":
            self.state = "off"
            self._resolve("the debug UI was stopped")
            return
        self._resolve(f"the debug UI exited (code {code})")
        if self.state == "ready":
            hosts, groups = self.targets()
            self._failed(f"the debug UI exited (code {code}); the watched sandboxes are routed directly")
            self._publish(hosts, groups)

    def _resolve(self, problem: str | None) -> None:
        if self._reported is not None and not self._reported.done():
            self._reported.set_result(problem)

    def _outcome(self, problem: str | None) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(problem)

    def _failed(self, problem: str) -> None:
        self.problem = problem
        self.state, self.pause_until = "paused", time.time() + self.pause
        logger.warning(f"debug: {problem}; starting it again in {format_duration(self.pause)} "
                       f"while something is watched")
        self.pause = min(self.pause * 2, LONGEST_PAUSE)

    async def _stop(self, why: str) -> None:
        proc = self.proc
        if proc is None:
            if self.state != "paused":
                self.state = "off"
            return
        self.state = "stopping"
        self._resolve(f"the debug UI was stopped ({why})")
        self.runtime.watch = Watch()
        for tell in list(self.watchers):
            tell()
        if proc.stdin is not None:
            proc.stdin.close()  # the UI stops at the end of its input
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self.proc is proc:
            self.proc, self.proxy, self.state = None, None, "off"
        self.pause = FIRST_PAUSE
        logger.info(f"debug: the UI stopped ({why})")

    def _allow(self, hosts: frozenset[str], groups: frozenset[str]) -> list[list[Any]]:
        return sorted([a, p] for a, p in backends_of(self.runtime.snapshot, hosts, groups))

    def _send_allow(self, hosts: frozenset[str], groups: frozenset[str]) -> None:
        allow = frozenset(backends_of(self.runtime.snapshot, hosts, groups))
        if allow == self._allow_sent or self.proc is None or self.proc.stdin is None or self.proc.stdin.is_closing():
            return
        self._allow_sent = allow
        self.proc.stdin.write((json.dumps({"allow": sorted([a, p] for a, p in allow)}) + "\n").encode())

    # --- what the operator asks -----------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[str, str] | str:
        """(kind, target) for a host or a group name, else why not."""
        snap = self.runtime.snapshot
        raw = name.strip()
        host = normalize_host(raw)
        site = snap.lookup(host) if host else None
        if site is not None:  # a host first: a container may be named like another sandbox's host
            return "host", site.host
        if raw in snap.groups:
            return "group", raw
        return f"no site serves {raw!r} and no group is called that (`wakeproxy status` lists both)"

    async def command(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "list":
            return self.listing()
        if op == "off":
            return self._off(str(request.get("name") or ""))
        if op == "watch":
            return await self._watch(str(request.get("name") or ""), request.get("for"))
        return {"error": f"unknown request {op!r}"}

    async def _watch(self, name: str, seconds: Any) -> dict[str, Any]:
        cfg = self.runtime.config.debug
        try:
            length = float(seconds) if seconds is not None else cfg.default_for
        except (TypeError, ValueError):
            return {"error": "--for must be a duration"}
        if not 0 < length <= cfg.max_for:
            return {"error": f"--for must be more than 0 and at most {format_duration(cfg.max_for)} (debug.max_for)"}
        found = self.resolve(name)
        if isinstance(found, str):
            return {"error": found}
        kind, target = found
        if (kind, target) not in self.watches and len(self.watches) >= MAX_WATCHES:
            return {"error": f"{MAX_WATCHES} things are watched already; end some with --off"}
        self.watches[(kind, target)] = Watching(kind, target, time.time() + length, name.strip())
        logger.info(f"debug: watching {kind} {target} for {format_duration(length)}")
        if self.state == "paused":
            self.state, self.pause = "off", FIRST_PAUSE  # the operator asks again: try now
        self.tick()
        if self.state == "starting" and self._ready is not None:
            await asyncio.shield(self._ready)
        return self.listing()

    def _off(self, name: str) -> dict[str, Any]:
        if not name:
            ended = list(self.watches.values())
            self.watches.clear()
        else:
            found = self.resolve(name)
            keys = [k for k, w in self.watches.items()
                    if w.asked == name.strip() or (not isinstance(found, str) and k == found)]
            if not keys:
                return {"error": f"{name!r} is not watched", **self.listing()}
            ended = [self.watches.pop(k) for k in keys]
        for w in ended:
            logger.info(f"debug: watching {w.asked} ended (--off)")
        self.tick()
        return self.listing()

    def listing(self) -> dict[str, Any]:
        now = time.time()
        listen = self.runtime.config.debug.listen
        out: dict[str, Any] = {
            "state": self.state,
            "url": f"http://{listen}/?token={self.token}" if self.state == "ready" else None,
            "watches": [{"kind": w.kind, "target": w.target, "asked": w.asked, "until": w.until,
                         "left": max(0.0, w.until - now), "by": "command"}
                        for w in sorted(self.watches.values(), key=lambda w: w.until)],
            "labels": sorted(self.runtime.snapshot.debug_hosts),
        }
        if self.problem is not None and self.state != "ready":
            out["problem"] = self.problem
        return out

    def status(self) -> dict[str, Any]:
        """For `wakeproxy status` (a listener any local user may read): no token, no address of the UI's proxy."""
        out = self.listing()
        out.pop("url", None)
        return out

    # --- the admin socket -------------------------------------------------------------------------------

    async def _listen(self) -> None:
        run = self.runtime.config.state_dir / "run"
        path = str(run / ADMIN_SOCKET)
        try:
            run.mkdir(mode=0o750, parents=True, exist_ok=True)
            if os.path.exists(path):
                if _answers(path):
                    logger.warning(f"debug: {path} is served by another running proxy; `wakeproxy debug` talks to that one")
                    return
                os.unlink(path)  # left by a controller that died
            old = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(self._serve, path=path, limit=MAX_REQUEST)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
        except OSError as e:
            logger.warning(f"debug: cannot serve {path} ({e}); `wakeproxy debug` will not work")
            return
        self._path = path

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from wakeproxy.planes.channel import peer_uid

        try:
            uid = peer_uid(writer)
            if uid not in (0, os.geteuid()):
                logger.warning(f"debug: refused a request on the admin socket from uid {uid}")
                return
            try:
                line = await asyncio.wait_for(reader.readline(), 10.0)
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except (ValueError, TimeoutError, asyncio.LimitOverrunError, RecursionError) as e:
                answer: dict[str, Any] = {"error": f"a bad request ({e})"}
            else:
                answer = await self.command(request)
            writer.write((json.dumps(answer) + "\n").encode())
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def backends_of(snap: Snapshot, hosts: frozenset[str], groups: frozenset[str]) -> set[tuple[str, int]]:
    """The (address, port) of every backend of the watched sites and groups."""
    out: set[tuple[str, int]] = set()
    if not hosts and not groups:
        return out
    for site in [*snap.exact.values(), *snap.wildcards.values()]:
        for b in site.backends:
            if b.address and (site.host in hosts or b.group in groups):
                out.add((b.address, b.port))
    return out


def _account() -> tuple[int, int] | None:
    """The workers' account, for the UI, when the supervisor started us as root and made the state
    directory theirs to reach (in one process, `workers: 0`, the UI runs as that process does)."""
    if os.geteuid() != 0:
        return None
    from wakeproxy.planes.controller import ENV_WORKER_GID, ENV_WORKER_UID

    uid, gid = int(os.environ.get(ENV_WORKER_UID, "-1")), int(os.environ.get(ENV_WORKER_GID, "-1"))
    return (uid, gid) if uid >= 0 and gid >= 0 else None


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def ask(state_dir: Path, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """`wakeproxy debug`'s end: one request to the running proxy's admin socket."""
    path = str(state_dir / "run" / ADMIN_SOCKET)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data or b"{}")
    return answer if isinstance(answer, dict) else {"error": "a bad answer from the proxy"}
