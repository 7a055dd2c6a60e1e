"""The serving worker's side of the split: what it learns from the controller, and what it tells it.

A worker is a mitmproxy master with the request-path addons. It holds no Docker client and no
ACME account key, and imports nothing from `docker/` or `certs/acme/`. From the controller it gets
the snapshot (decoded in a thread: the event loop is never blocked on the channel), certificates,
challenge tokens, the engine state and which groups are waking anywhere; it asks the controller to
wake a group (`RemoteWakes`) and reports the activity per group every `REPORT_INTERVAL`, only the
groups that changed. Before the controller stops a group it asks every worker to hold new requests
for it and say what it still has in flight (`quiesce`); the hold ends with `release`.

If the controller goes away, the worker keeps routing with its last snapshot and answers wakes
with a 503 until it is back; it reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import os
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http

from wakeproxy.certs.challenges import ChallengeTokens
from wakeproxy.certs.store import Certificates, LoadedCert, load_cert, repair_mitmproxy_confdir
from wakeproxy.config import Config
from wakeproxy.core import WakeProxy, proxy_options
from wakeproxy.files import write_private
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.observe.metrics import RequestMetrics
from wakeproxy.planes import channel
from wakeproxy.planes.wire import from_plain, loaded
from wakeproxy.routing.snapshot import Site, Snapshot
from wakeproxy.routing.watch import Watch
from wakeproxy.runtime import ContainerEvent, EngineState, Runtime
from wakeproxy.wake.idle import IdleKeeper
from wakeproxy.wake.orchestrator import Attachment, Orchestrator, Wake, WakeFailed

logger = get_logger(__name__)

FAILED_GRACE = 1.0  # seconds a group whose wake just failed is held back from forwarding (RemoteWakes.failed)
REPORT_INTERVAL = 0.25  # seconds between activity reports (only groups that changed)
FULL_REPORT_EVERY = 8  # every 8th report (2 s) carries every group
RECONNECT_MIN, RECONNECT_MAX = 0.05, 1.0
ENV_SLOT = "WAKEPROXY_SLOT"
ENV_READY_FD = "WAKEPROXY_READY_FD"
ENV_DIR = "WAKEPROXY_WORKER_DIR"
ENV_CHANNEL = "WAKEPROXY_CHANNEL"

_UNAVAILABLE = ("Site asleep", "the wakeproxy controller is not running, so sleeping sites cannot be started "
                "right now (running sites are still served)")


class _NoOps:
    async def start(self, container_id: str, name: str) -> None:
        raise AssertionError("a worker never starts containers")

    async def unpause(self, container_id: str, name: str) -> None:
        raise AssertionError("a worker never unpauses containers")

    async def scale(self, service_id: str, name: str, replicas: int) -> None:
        raise AssertionError("a worker never scales services")

    async def recreate_network(self, network: str, project: str, attach: tuple[Attachment, ...]) -> None:
        raise AssertionError("a worker never creates networks")


class RemoteWakes(Orchestrator):
    """The orchestrator of a worker: a wake is a question to the controller, asked once per group
    (single flight here, and across all workers in the controller)."""

    remote_budget = True
    log_outcomes = False

    def __init__(self, runtime: Runtime, plane: WorkerPlane) -> None:
        super().__init__(runtime, _NoOps())
        self.plane = plane
        self.elsewhere: frozenset[str] = frozenset()  # groups waking anywhere (the controller says)
        self.failed_at: dict[str, float] = {}  # group → when the controller said its wake failed

    def is_waking(self, group: str) -> bool:
        return group in self._wakes or group in self.elsewhere

    def busy(self, site: Site) -> bool:
        if not self._wakes and not self.elsewhere and not self.runtime.stopping and not self.failed_at:
            return False
        now = time.monotonic()
        if self.failed_at and all(now - t >= FAILED_GRACE for t in self.failed_at.values()):
            self.failed_at.clear()  # past their grace: the common case's fast path again
        return any(g in self._wakes or g in self.elsewhere or g in self.runtime.stopping
                   or now - self.failed_at.get(g, -FAILED_GRACE) < FAILED_GRACE for g in site.groups)

    def failed(self, group: str, seconds: float, failure: WakeFailed) -> None:
        """The controller says a wake of `group` failed: cool down as it does. For FAILED_GRACE the group
        also counts as busy, whatever the snapshot says: the snapshot that shows its container dead
        can arrive after the failure, and until then a request would be sent to the dead address."""
        self.cool_down(group, seconds, failure)
        self.failed_at[group] = time.monotonic()

    async def _run(self, wake: Wake) -> None:
        await self.plane.ask_wake(wake)


class WorkerPlane:
    """The worker's end of the channel (an addon of the worker's master)."""

    def __init__(self, runtime: Runtime, certificates: Certificates, tokens: ChallengeTokens,
                 path: str | None = None, directory: Path | None = None) -> None:
        self.runtime = runtime
        self.certificates = certificates
        self.tokens = tokens
        self.idle: IdleKeeper | None = None  # set by the bundle (it needs the waker, which needs `wakes`)
        self.metrics: RequestMetrics | None = None  # set by the bundle: sent with every full report
        self.wakes = RemoteWakes(runtime, self)
        self.path = path or os.environ.get(ENV_CHANNEL, "")
        self.directory = directory or Path(os.environ.get(ENV_DIR, "."))
        self.slot = os.environ.get(ENV_SLOT, "0")
        self.peer: channel.Peer | None = None
        self.requests = 0
        self.synced = asyncio.Event()  # a snapshot and the certificates are in: the listeners may open
        self.docker_synced = asyncio.Event()  # … and a snapshot of a completed Docker listing
        self._have_snapshot = self._have_certs = False
        self._ids = itertools.count(1)
        self._asked: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._held: dict[str, asyncio.Event] = {}  # groups held for a stop → released when it ends
        self._reported: dict[str, tuple[int, int, float]] = {}
        self._reports = 0  # activity reports sent (every FULL_REPORT_EVERY-th carries every group)
        self._snapshot_body: Any = None
        self._decoding: asyncio.Task[None] | None = None
        self._certs: dict[str, LoadedCert] = {}  # digest → loaded
        self._cert_task: asyncio.Task[None] | None = None
        self._cert_body: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle --------------------------------------------------------------------------

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._connect_forever(), name="channel to the controller"),
                       loop.create_task(self._report_forever(), name="activity reports")]

    def done(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.peer is not None:
            self.peer.close()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.requests += 1

    async def _connect_forever(self) -> None:
        delay = RECONNECT_MIN
        said = False
        while True:
            try:
                peer = await channel.connect(self.path)
            except OSError as e:
                if not said:
                    logger.warning(f"worker {self.slot}: cannot reach the controller at {self.path} ({e}); "
                                   "serving running sites with the last snapshot, retrying")
                    said = True
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX, delay * 2)
                continue
            delay, said = RECONNECT_MIN, False
            self.peer = peer
            self._reported = {}
            peer.send("hello", {"pid": os.getpid(), "slot": self.slot, "uid": os.getuid()})
            try:
                async for kind, body in peer.messages():
                    try:
                        self._handle(kind, body)
                    except Exception:  # a message we cannot act on ends this connection, never the worker's
                        logger.exception(f"worker {self.slot}: a {kind!r} message from the controller failed")
                        peer.close()
                        break
            finally:
                self.peer = None
                self._lost()
            logger.warning(f"worker {self.slot}: the controller went away; serving running sites with the "
                           "last snapshot until it is back")

    def _lost(self) -> None:
        for fut in self._asked.values():
            if not fut.done():
                fut.set_result({"ok": False, "status": 503, "title": _UNAVAILABLE[0], "message": _UNAVAILABLE[1],
                                "retry": 10})
        self._asked.clear()
        self.wakes.elsewhere = frozenset()
        self.runtime.watch = Watch()  # the controller's debug UI ends with it: route directly
        for name in list(self._held):
            self._release(name)

    # --- from the controller ------------------------------------------------------------------

    def _handle(self, kind: str, body: Any) -> None:
        if kind not in ("snapshot", "certs"):
            body = loaded(body)  # (large bodies of other kinds are unexpected: unpacked here)
        if kind == "snapshot":
            self._snapshot_body = body
            if self._decoding is None or self._decoding.done():
                self._decoding = asyncio.get_running_loop().create_task(self._decode())
        elif kind == "certs":
            self._cert_body = body
            if self._cert_task is None or self._cert_task.done():
                self._cert_task = asyncio.get_running_loop().create_task(self._install_certs())
        elif kind == "tokens":
            self.tokens.replace(body)
        elif kind == "engine":
            self.runtime.engine = EngineState(**body)
        elif kind == "manage":
            self.runtime.manage = bool(body)
        elif kind == "watch":
            self.runtime.watch = from_plain(Watch, body)
        elif kind == "quiesce":
            self._quiesce(int(body["id"]), str(body["group"]))
        elif self._decoding is not None and not self._decoding.done():
            # About the state a snapshot still being decoded shows: acted on once it is installed.
            self._decoding.add_done_callback(functools.partial(self._after_decode, kind, body))
        else:
            self._in_order(kind, body)

    def _after_decode(self, kind: str, body: Any, _task: asyncio.Task[None]) -> None:
        self._in_order(kind, body)

    def _in_order(self, kind: str, body: Any) -> None:
        if kind == "wakes":
            self.wakes.elsewhere = frozenset(str(g) for g in body)
        elif kind == "cooling":
            for group, (left, status, title, message) in dict(body).items():
                self.wakes.failed(str(group), float(left), WakeFailed(int(status), str(title), str(message)))
        elif kind == "woke":
            fut = self._asked.pop(int(body["id"]), None)
            if fut is not None and not fut.done():
                fut.set_result(body)
        elif kind == "release":
            self._release(str(body["group"]))
        elif kind == "event":
            self.runtime.emit(ContainerEvent(**body))

    async def _decode(self) -> None:
        # Only the newest snapshot is decoded: those that arrive meanwhile replace each other.
        while self._snapshot_body is not None:
            body, self._snapshot_body = self._snapshot_body, None
            try:
                snap = await asyncio.to_thread(_decode_snapshot, body)
            except Exception:  # a bug: keep the last good snapshot, say so, take the next one
                logger.exception(f"worker {self.slot}: a snapshot from the controller could not be decoded")
                continue
            self.runtime.publish(snap)
            self._have_snapshot = True
            if snap.synced:
                self.docker_synced.set()
            self._check_synced()

    async def _install_certs(self) -> None:
        while self._cert_body is not None:
            body, self._cert_body = self._cert_body, None
            try:
                table = await asyncio.to_thread(self._load_certs, body)
            except Exception:
                logger.exception(f"worker {self.slot}: certificates from the controller could not be installed")
                continue
            self.certificates.install_table(table)
            self._have_certs = True
            self._check_synced()

    def _load_certs(self, raw: Any) -> dict[str, LoadedCert]:
        """Write each new certificate (key and chain) to a private file of ours and load it (a thread)."""
        body = loaded(raw)
        fresh = 0
        for digest, pem in dict(body.get("pem") or {}).items():
            if digest in self._certs:
                continue
            fresh += 1
            if hashlib.sha256(pem).hexdigest() != digest:
                raise ValueError("a certificate from the controller does not match its digest")
            path = self.directory / "certs" / f"{digest[:32]}.pem"
            write_private(path, pem)
            self._certs[digest] = load_cert(path, None, "pushed")
        table: dict[str, LoadedCert] = {}
        wanted = set()
        for name, (source, digest) in dict(body["table"]).items():
            cert = self._certs.get(digest)
            if cert is not None:
                table[str(name)] = dataclasses.replace(cert, source=str(source))
                wanted.add(digest)
        for digest in [d for d in self._certs if d not in wanted]:
            self._certs.pop(digest).path.unlink(missing_ok=True)
        if fresh:
            logger.info(f"worker {self.slot}: {fresh} new certificate(s) in service ({len(table)} names)")
        return table

    def _check_synced(self) -> None:
        if self._have_snapshot and self._have_certs and not self.synced.is_set():
            self.synced.set()

    def _quiesce(self, qid: int, group: str) -> None:
        # From now on a request for `group` is held (busy → it asks for a wake, which the controller
        # starts once its stop is over); then say what is still in flight here.
        if group not in self._held:
            event = self._held[group] = asyncio.Event()
            self.runtime.stopping[group] = asyncio.get_running_loop().create_task(event.wait())
        act = self.idle.activity.get(group) if self.idle is not None else None
        counts = (act.inflight, act.open, act.last) if act is not None else (0, 0, 0.0)
        if self.peer is not None:
            self.peer.send("quiesced", {"id": qid, "group": group, "inflight": counts[0], "open": counts[1],
                                        "last": counts[2]})

    def _release(self, group: str) -> None:
        event = self._held.pop(group, None)
        if event is not None:
            event.set()
            self.runtime.stopping.pop(group, None)

    # --- to the controller ----------------------------------------------------------------------

    async def ask_wake(self, wake: Wake) -> None:
        """Ask the controller to wake `wake.group`; return when it is ready, raise WakeFailed otherwise."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        qid = next(self._ids)
        if self.peer is None or not self.peer.send("wake", {"id": qid, "group": wake.group, "client": wake.client}):
            raise WakeFailed(503, *_UNAVAILABLE, retry_after=10)
        self._asked[qid] = fut
        try:
            answer = await asyncio.wait_for(fut, max(1.0, wake.deadline - time.monotonic() + 5.0))
        except TimeoutError:
            raise WakeFailed(504, "Wake-up timed out", f"no answer from the controller about '{wake.group}'") from None
        finally:
            self._asked.pop(qid, None)
        if answer.get("ok"):
            return
        retry = answer.get("retry")
        raise WakeFailed(int(answer.get("status", 502)), str(answer.get("title", "Wake-up failed")),
                         str(answer.get("message", "")), float(retry) if retry is not None else None)

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            try:
                self._report()
            except Exception:  # a bug must not end the reports: the controller would think us idle
                logger.exception(f"worker {self.slot}: activity report failed")

    def _report(self) -> None:
        peer = self.peer
        if peer is None or self.idle is None:
            return
        # Every FULL_REPORT_EVERY-th report carries every group, not only the changed ones: a report the
        # controller could not apply (a group its snapshot did not hold at that moment) heals by itself.
        self._reports += 1
        full = self._reports % FULL_REPORT_EVERY == 0
        changed: dict[str, list[Any]] = {}
        for name, act in self.idle.activity.items():
            now = (act.inflight, act.open, act.last)
            if full or self._reported.get(name) != now:
                self._reported[name] = now
                changed[name] = list(now)
        body: dict[str, Any] = {"groups": changed, "requests": self.requests, "connections": _open_connections()}
        if full and self.metrics is not None:
            body["metrics"] = self.metrics.counts.wire()  # cumulative: the controller keeps the last one
        peer.send("activity", body)


def _decode_snapshot(body: Any) -> Snapshot:
    snap: Snapshot = from_plain(Snapshot, loaded(body))
    return snap


def _open_connections() -> int:
    try:
        server = ctx.master.addons.get("proxyserver")
    except AttributeError:  # no master (unit tests)
        return 0
    return len(getattr(server, "connections", ()))


# --- the worker's root addon and process ---------------------------------------------------------


class WorkerCore(WakeProxy):
    """The worker's root addon: the config and mitmproxy's options as in one process, but no Docker
    view (snapshots come from the controller), mitmproxy's own store in the worker's folder, and the
    listeners opened only once the first snapshot and the certificates are in — a worker that has
    not heard from the controller yet never answers a request with "unknown site"."""

    watches_docker = False

    def __init__(self, runtime: Runtime, plane: WorkerPlane) -> None:
        super().__init__(runtime)
        self.plane = plane
        self.listening = False
        self._modes: list[str] = []
        self._opening: asyncio.Task[None] | None = None

    def options_for(self, config: Config, known: set[str]) -> dict[str, Any]:
        opts = proxy_options(config, "", known)
        confdir = self.plane.directory / "mitmproxy"
        repair_mitmproxy_confdir(confdir)
        opts["confdir"] = str(confdir)
        opts["certs"] = []  # "*" and every other name: the controller's table (Certificates.install_table)
        if "ssl_verify_upstream_trusted_ca" in known:
            # mitmproxy loads this bundle (certifi's by default) for every upstream TLS context, after
            # this worker has given up root, when the install may be out of its reach: our own copy.
            import certifi

            bundle = self.plane.directory / "upstream-ca.pem"
            write_private(bundle, Path(certifi.where()).read_bytes())
            opts["ssl_verify_upstream_trusted_ca"] = str(bundle)
        self._modes = list(opts.pop("mode", []))
        opts["mode"] = self._modes if self.listening else []
        return opts

    def running(self) -> None:
        super().running()
        self._opening = asyncio.get_running_loop().create_task(self._open_when_synced(), name="open listeners")

    async def _open_when_synced(self) -> None:
        await self.plane.synced.wait()
        self.listening = True
        ctx.options.update(mode=self._modes)
        server = ctx.master.addons.get("proxyserver")
        for _ in range(1000):
            instances = list(getattr(server, "servers", ()))
            if instances and all(s.is_running for s in instances):
                break
            await asyncio.sleep(0.01)
        logger.info(f"worker {self.plane.slot}: serving")
        # To the supervisor: "listening" (a reload may retire the worker this one replaces), then
        # "synced" once the snapshot is of a complete Docker listing (it announces "wakeproxy ready").
        fd = os.environ.pop(ENV_READY_FD, None)
        if not fd:
            return
        try:
            os.write(int(fd), b"listening\n")
            await self.plane.docker_synced.wait()
            os.write(int(fd), b"synced\n")
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.close(int(fd))


# Modules a worker may import lazily after it has given up root (Python's own files may then be
# out of its reach, e.g. under /root): imported before the drop.
_PRELOAD = ("encodings.idna", "encodings.punycode", "encodings.ascii", "encodings.latin_1", "stringprep",
            "concurrent.futures.thread", "json.decoder", "json.encoder", "email.utils", "http.cookies",
            "urllib.parse", "ipaddress", "hmac", "secrets", "ssl", "zlib", "gzip", "brotli", "zstandard",
            "mitmproxy.net.http.url", "mitmproxy.net.encoding", "h11", "h2.connection", "wsproto",
            "wsproto.extensions", "mitmproxy.proxy.layers.websocket", "mitmproxy.proxy.layers.http._http2",
            "mitmproxy.proxy.layers.http._http1", "mitmproxy.proxy.layers.tls", "mitmproxy.proxy.layers.tcp",
            "mitmproxy.addons.tlsconfig", "mitmproxy.http", "mitmproxy.websocket", "mitmproxy.net.tls")


def drop_privileges(uid: int, gid: int, directory: Path) -> None:
    """Become `uid`:`gid` for good (no supplementary groups): after this no path back to root.
    What the worker made in its folder so far (mitmproxy's store) is handed to it first."""
    import importlib

    from wakeproxy.mitm import upstream

    upstream.shape_ok()  # reads mitmproxy's source once, while it can
    for path in [directory, *directory.rglob("*")]:
        os.chown(path, uid, gid)
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise SystemExit(f"wakeproxy worker: could not become uid {uid}, gid {gid}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise SystemExit("wakeproxy worker: root could be regained after dropping privileges; refusing to serve")
