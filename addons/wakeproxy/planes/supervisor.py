"""The `wakeproxy` command's first process: binds the listeners, runs the controller and the workers,
and restarts whichever dies. It imports neither mitmproxy nor the Docker SDK, holds no Docker client,
and reads no request.

- Listeners: bound here once (as root, so 80/443 need nothing else), one SO_REUSEPORT socket per
  worker slot; each worker is handed its slot's sockets (mitm/listeners). The kernel spreads new
  connections over the slots, and a slot's accept queue outlives its worker: a worker that dies
  loses only the connections it had accepted, its replacement serves the queue.
- Workers start as root only to read Python's files, and become `user` (config) before they open a
  listener or the channel; the controller keeps the Docker socket and the ACME account.
- SIGHUP (`wakeproxy reload`): the config is checked, the controller re-reads it, then each worker is
  replaced in turn: the new one serves before the old one is asked to drain (SIGTERM).
- SIGTERM/SIGINT: workers drain (shutdown.drain), then the controller stops.
"""

from __future__ import annotations

import logging
import os
import pwd
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from wakeproxy.config import Config, ConfigError, load_config
from wakeproxy.files import blocked_for
from wakeproxy.mitm import listeners

logger = logging.getLogger("wakeproxy.supervisor")

PID_FILE = "wakeproxy.pid"
READY_TIMEOUT = 30.0  # a new worker that is not serving after this long is given up (reload aborted)
BACKOFF_MAX = 10.0
STABLE_AFTER = 5.0  # a child that lived this long is restarted at once when it dies


@dataclass
class Child:
    role: str  # controller | worker
    slot: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    ready_fd: int | None = None
    ready: bool = False  # listening (a worker) or started (the controller)
    synced: bool = False  # serving from a complete Docker listing
    retiring: bool = False  # asked to drain (reload or shutdown): not restarted

    @property
    def name(self) -> str:
        return "controller" if self.role == "controller" else f"worker {self.slot}"


def _die_with_parent() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def resolve_user(spec: str) -> tuple[int, int]:
    """`name`, `uid` or `uid:gid` → (uid, gid)."""
    if spec[0].isdigit():
        uid_s, _, gid_s = spec.partition(":")
        uid = int(uid_s)
        if gid_s:
            return uid, int(gid_s)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, uid
    entry = pwd.getpwnam(spec)
    return entry.pw_uid, entry.pw_gid


class Supervisor:
    def __init__(self, config_path: str, verbosity: str) -> None:
        self.config_path = config_path
        self.verbosity = verbosity
        self.config: Config = load_config(config_path)
        self.children: list[Child] = []
        self.sockets: dict[int, dict[int, socket.socket]] = {}  # slot → port → socket
        self.backoff: dict[str, float] = {}
        self.restart_at: dict[str, float] = {}
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.reload_asked = False
        self.uid, self.gid = os.getuid(), os.getgid()

    # --- set-up -----------------------------------------------------------------------------------

    def _prepare(self) -> None:
        cfg = self.config
        if os.geteuid() == 0:
            try:
                self.uid, self.gid = resolve_user(cfg.user)
            except KeyError:
                raise ConfigError(f"{cfg.source}: user: no account '{cfg.user}' on this machine") from None
            if self.uid == 0:
                logger.warning("wakeproxy: user is root: the serving workers keep root (set user: to an account "
                               "of their own)")
        state = cfg.state_dir
        state.mkdir(parents=True, exist_ok=True)
        run = state / "run"
        run.mkdir(mode=0o750, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(run, 0, self.gid)
            mode = state.stat().st_mode
            if not mode & 0o001:
                os.chmod(state, mode | 0o001)  # traversal only: the workers reach run/ and workers/
            blocked = blocked_for(state, self.uid, self.gid, read=False)
            if blocked is not None:
                raise ConfigError(f"{cfg.source}: state_dir {state}: the workers' user ({cfg.user}) cannot reach it: "
                                  f"{blocked} is closed to other users (chmod o+x, or another state_dir)")
        for slot in range(cfg.worker_count()):
            self._worker_dir(slot)
        (state / PID_FILE).write_text(f"{os.getpid()}\n")

    def _worker_dir(self, slot: int) -> Path:
        path = self.config.state_dir / "workers" / str(slot)
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(path.parent, 0, self.gid)
            os.chmod(path.parent, 0o750)
            for p in [path, *path.rglob("*")]:
                os.chown(p, self.uid, self.gid)
        os.chmod(path, 0o700)
        return path

    def _bind(self, slot: int) -> dict[int, socket.socket]:
        got = self.sockets.get(slot)
        if got is None:
            got = {}
            for addr in (self.config.listen.http, self.config.listen.https):
                if addr is not None:
                    try:
                        got[addr.port] = listeners.bind(addr.host, addr.port)
                    except OSError as e:
                        raise OSError(e.errno, f"cannot listen on {addr}: {e.strerror}") from None
            self.sockets[slot] = got
        return got

    # --- children --------------------------------------------------------------------------------

    def _command(self, role: str, slot: int) -> list[str]:
        cmd = [sys.executable, "-m", "wakeproxy", f"_{role}", "--config", self.config_path]
        if self.verbosity == "debug":
            cmd.append("--verbose")
        elif self.verbosity == "warn":
            cmd.append("--quiet")
        return cmd

    def _spawn(self, role: str, slot: int = 0) -> Child:
        child_env = dict(os.environ)
        child_env.update(WAKEPROXY_WORKER_UID=str(self.uid), WAKEPROXY_WORKER_GID=str(self.gid),
                         WAKEPROXY_CHANNEL=str(self.config.state_dir / "run" / "control.sock"))
        pass_fds: list[int] = []
        ready_r = None
        if role == "worker":
            socks = self._bind(slot)
            pass_fds = [s.fileno() for s in socks.values()]
            ready_r, ready_w = os.pipe()
            pass_fds.append(ready_w)
            child_env[listeners.ENV] = listeners.encode({port: s.fileno() for port, s in socks.items()})
            child_env.update(WAKEPROXY_READY_FD=str(ready_w), WAKEPROXY_SLOT=str(slot),
                       WAKEPROXY_WORKER_DIR=str(self._worker_dir(slot)))
        # Their own process group: a terminal's Ctrl-C (or a group kill) reaches the supervisor alone,
        # which then drains the workers in order. If the supervisor itself dies, they get SIGTERM.
        proc = subprocess.Popen(self._command(role, slot), env=child_env, pass_fds=pass_fds, process_group=0,
                                preexec_fn=_die_with_parent)
        child = Child(role, slot, proc, ready_fd=ready_r)
        if role == "worker":
            os.close(ready_w)
            assert ready_r is not None
            os.set_blocking(ready_r, False)
            self.selector.register(ready_r, selectors.EVENT_READ, child)
        else:
            child.ready = child.synced = True
        self.children.append(child)
        logger.info(f"wakeproxy: {child.name} started (pid {proc.pid})")
        return child

    def _ready_events(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            child: Child = key.data
            try:
                data = os.read(key.fd, 64)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            child.ready = child.ready or b"listening" in data or b"synced" in data
            child.synced = child.synced or b"synced" in data
            if not data or child.synced:
                self.selector.unregister(key.fd)
                os.close(key.fd)
                child.ready_fd = None

    def _reap(self) -> None:
        for child in list(self.children):
            code = child.proc.poll()
            if code is None:
                continue
            self.children.remove(child)
            if child.ready_fd is not None:
                self.selector.unregister(child.ready_fd)
                os.close(child.ready_fd)
                child.ready_fd = None
            if child.retiring or self.stopping:
                logger.info(f"wakeproxy: {child.name} (pid {child.proc.pid}) ended")
                continue
            lived = time.monotonic() - child.started
            key = f"{child.role}:{child.slot}"
            delay = 0.0 if lived >= STABLE_AFTER else min(BACKOFF_MAX, max(0.2, self.backoff.get(key, 0.1) * 2))
            self.backoff[key] = delay
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            logger.warning(f"wakeproxy: {child.name} (pid {child.proc.pid}) died ({how}); "
                           f"restarting it{f' in {delay:.1f} s' if delay else ''}")
            self.restart_at[key] = time.monotonic() + delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for key, at in list(self.restart_at.items()):
            if at <= now:
                del self.restart_at[key]
                role, slot = key.split(":")
                self._spawn(role, int(slot))

    def _wait_ready(self, child: Child, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not child.ready and time.monotonic() < deadline:
            if child.proc.poll() is not None:
                return False
            self._ready_events(0.05)
        return child.ready

    # --- reload and stop ---------------------------------------------------------------------------

    def _reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            logger.error(f"wakeproxy: reload refused, the running proxy keeps its config: {e}")
            return
        if (new.listen, new.state_dir, new.user) != (self.config.listen, self.config.state_dir, self.config.user):
            logger.warning("wakeproxy: listen, state_dir and user apply at the next start, not on reload")
        count = new.worker_count()
        self.config = new
        for c in self.children:
            if c.role == "controller" and not c.retiring:
                c.proc.send_signal(signal.SIGHUP)
        old = [c for c in self.children if c.role == "worker" and not c.retiring]
        logger.info(f"wakeproxy: reload: replacing {len(old)} worker(s) one by one")
        for slot in range(count):
            fresh = self._spawn("worker", slot)
            if not self._wait_ready(fresh, READY_TIMEOUT):
                logger.error(f"wakeproxy: reload: the new worker {slot} did not start serving; keeping the old ones")
                fresh.retiring = True
                fresh.proc.kill()
                return
            for c in old:
                if c.slot == slot:
                    c.retiring = True
                    c.proc.send_signal(signal.SIGTERM)
            self._reap()
        for slot in [s for s in self.sockets if s >= count]:
            for sock in self.sockets.pop(slot).values():
                sock.close()  # the kernel stops giving this slot connections once its worker closes too
        for c in old:
            if c.slot >= count:
                c.retiring = True
                c.proc.send_signal(signal.SIGTERM)
        logger.info("wakeproxy: reload done")

    def _stop(self) -> None:
        self.stopping = True
        drain = self.config.shutdown.drain
        # Our copies first: once the workers close theirs, new connections are refused (as by one
        # process), not queued on a socket nobody serves any more.
        for socks in self.sockets.values():
            for s in socks.values():
                s.close()
        self.sockets.clear()
        for role in ("worker", "controller"):
            group = [c for c in self.children if c.role == role]
            for c in group:
                c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + drain + 5.0
            for c in group:
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning(f"wakeproxy: {c.name} did not stop; killing it")
                    c.proc.kill()
                    c.proc.wait()
        try:
            (self.config.state_dir / PID_FILE).unlink()
        except OSError:
            pass

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        self._prepare()
        for slot in range(self.config.worker_count()):
            self._bind(slot)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        self._spawn("controller")
        for slot in range(self.config.worker_count()):
            self._spawn("worker", slot)
        announced = False
        try:
            while not self.stopping:
                if not announced and all(c.synced for c in self.children):
                    announced = True
                    listen = self.config.listen
                    urls = " ".join(u for u in (f"http://{listen.http}" if listen.http else "",
                                                f"https://{listen.https}" if listen.https else "") if u)
                    workers = [c for c in self.children if c.role == "worker"]
                    logger.info(f"wakeproxy ready: {urls}; {len(workers)} worker(s) "
                                f"(pids {', '.join(str(c.proc.pid) for c in workers)}), "
                                f"controller pid {next(c.proc.pid for c in self.children if c.role == 'controller')}")
                self._ready_events(0.05)
                self._reap()
                self._restart_due()
                if self.reload_asked:
                    self.reload_asked = False
                    self._reload()
        finally:
            self._stop()
        return 0

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_reload(self, signum: int, frame: object) -> None:
        self.reload_asked = True


def reload(config: Config) -> int:
    """`wakeproxy reload`: SIGHUP to the running supervisor of this config."""
    path = config.state_dir / PID_FILE
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        print(f"wakeproxy: no running proxy found ({path}); is it started with this config?", file=sys.stderr)
        return 1
    if b"wakeproxy" not in cmdline:
        print(f"wakeproxy: pid {pid} in {path} is not wakeproxy (a stale file)", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"wakeproxy: asked pid {pid} to reload (new workers replace the old ones one by one)")
    return 0
