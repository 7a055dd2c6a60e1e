"""The controller's side of the split: the channel's server, in the process that holds Docker and ACME.

The controller opens no internet-facing port. It listens on a Unix socket in `state_dir/run/`
(group-readable by the workers' account only; SO_PEERCRED must name root, our own uid or the
workers' uid) and, to every worker that connects, sends the snapshot whole (encoded in a thread,
once per snapshot, whatever the number of workers), the certificate table (each certificate's PEM
once per worker), the challenge tokens, the engine state and the set of waking groups.

What workers send is checked like any input: a wake is for a group the snapshot knows, spends the
client's wake budget here (one budget across all workers), and joins the running wake if there is
one; activity reports are bounded; a malformed message ends that worker's connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization

from wakeproxy.certs.challenges import ChallengeTokens
from wakeproxy.certs.store import Certificates, LoadedCert
from wakeproxy.mitm.upstream import DEATH
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.observe.metrics import Counts
from wakeproxy.planes import channel
from wakeproxy.planes.wire import frame, to_plain
from wakeproxy.routing.snapshot import Snapshot
from wakeproxy.runtime import ContainerEvent, EngineState, Runtime
from wakeproxy.wake.budget import WakeBudget
from wakeproxy.wake.idle import IdleKeeper
from wakeproxy.wake.orchestrator import Orchestrator, WakeFailed

logger = get_logger(__name__)

QUIESCE_TIMEOUT = 2.0  # a worker that does not answer a quiesce within this long vetoes the stop
MAX_REPORT_GROUPS = 100_000
MAX_ASKS = 10_000  # wake questions one worker may have open
ENV_WORKER_UID = "WAKEPROXY_WORKER_UID"
ENV_WORKER_GID = "WAKEPROXY_WORKER_GID"


@dataclass
class WorkerInfo:
    pid: int = 0
    slot: str = "?"
    uid: int = -1
    connected: float = field(default_factory=time.time)
    last_report: float = 0.0
    requests: int = 0
    connections: int = 0
    asks: int = 0
    sent_certs: set[str] = field(default_factory=set)
    snapshot: Snapshot | None = None  # the last one sent
    quiesce: dict[int, asyncio.Future[tuple[int, int, float]]] = field(default_factory=dict)
    metrics: Counts | None = None  # its request metrics, from its last full report

    @property
    def name(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"


class ControllerPlane:
    """The controller's end of the channel (an addon of the controller's master)."""

    def __init__(self, runtime: Runtime, orchestrator: Orchestrator, idle: IdleKeeper,
                 certificates: Certificates, tokens: ChallengeTokens, path: str | None = None) -> None:
        self.runtime = runtime
        self.orchestrator = orchestrator
        self.idle = idle
        self.certificates = certificates
        self.tokens = tokens
        self.path = path
        self.workers: dict[channel.Peer, WorkerInfo] = {}
        self.retired = Counts()  # the counters of workers that have gone (metrics: totals never go down)
        self.budget = WakeBudget(runtime.config.wake.per_client)
        self._server: asyncio.AbstractServer | None = None
        self._snapshot_frame: tuple[Snapshot, bytes] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._pem: dict[tuple[str, int], tuple[str, bytes]] = {}  # (chain file, serial) → (digest, key + chain)
        self._cert_push: asyncio.Handle | None = None
        self._token_push: asyncio.Handle | None = None
        self._qids = 0
        self._waking: tuple[str, ...] = ()
        self._cooling_sent: dict[str, WakeFailed] = {}
        idle.quiesce = self.quiesce
        runtime.listeners.append(self._event)
        orchestrator.watchers.append(self._wakes_changed)
        certificates.watchers.append(self._certs_changed)

    # --- lifecycle ------------------------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        if "wakeproxy_config" in updated:
            self.budget = WakeBudget(self.runtime.config.wake.per_client)

    async def running(self) -> None:
        loop = asyncio.get_running_loop()
        path = self.path or channel.socket_path(self.runtime.config.state_dir / "run")
        self.path = path
        run_dir = os.path.dirname(path)
        os.makedirs(run_dir, mode=0o750, exist_ok=True)
        gid = int(os.environ.get(ENV_WORKER_GID, "-1"))
        if os.geteuid() == 0 and gid >= 0:
            os.chown(run_dir, 0, gid)
        os.chmod(run_dir, 0o750)
        if os.path.exists(path):
            os.unlink(path)  # a socket left by a controller that died
        self._server = await asyncio.start_unix_server(self._serve, path=path, limit=channel.READ_CHUNK)
        os.chmod(path, 0o660)
        if os.geteuid() == 0 and gid >= 0:
            os.chown(path, 0, gid)
        def tokens_changed() -> None:  # (called from the ACME client's threads)
            loop.call_soon_threadsafe(self._tokens_changed)

        self.tokens.listener = tokens_changed
        self._tasks.append(loop.create_task(self._follow(), name="snapshots to workers"))
        logger.info(f"controller: waiting for workers on {path}")

    def done(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        for peer in list(self.workers):
            peer.close()
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)

    # --- connections ----------------------------------------------------------------------------

    def _allowed(self, uid: int | None) -> bool:
        worker_uid = int(os.environ.get(ENV_WORKER_UID, "-1"))
        return uid is not None and uid in (0, os.geteuid(), worker_uid)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = channel.peer_uid(writer)
        if not self._allowed(uid):
            logger.warning(f"controller: refused a connection on the channel from uid {uid}")
            writer.close()
            return
        peer = channel.Peer(reader, writer, "a worker", channel.FROM_WORKER_MAX_FRAME)
        info = WorkerInfo(uid=uid if uid is not None else -1)
        self.workers[peer] = info
        try:
            await self._welcome(peer, info)
            async for kind, body in peer.messages():
                try:
                    self._handle(peer, info, kind, body)
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    logger.warning(f"controller: {info.name} sent a malformed {kind!r} message ({e}); disconnecting it")
                    break
        finally:
            peer.close()
            self.workers.pop(peer, None)
            self.idle.forget(info.name)
            if info.metrics is not None:
                self.retired.add_counters(info.metrics)  # its totals stay in the sums
            for fut in info.quiesce.values():
                if not fut.done():
                    fut.set_result((0, 0, 0.0))  # a worker that is gone holds no request any more
            if info.pid:
                logger.info(f"controller: {info.name} disconnected")

    async def _welcome(self, peer: channel.Peer, info: WorkerInfo) -> None:
        peer.send("engine", self.runtime.engine.as_dict())
        peer.send("manage", self.runtime.manage)
        peer.send("wakes", list(self._waking))
        peer.send("cooling", self._cooling_body(self.orchestrator.cooling_now()))
        peer.send("tokens", self.tokens.export())
        peer.send("watch", to_plain(self.runtime.watch))
        self._send_certs(peer, info)
        # Even before the first sync: the worker then holds requests and says the engine is away.
        await self._sync(peer, info)

    def _handle(self, peer: channel.Peer, info: WorkerInfo, kind: str, body: Any) -> None:
        if kind == "hello":
            info.pid, info.slot = int(body["pid"]), str(body["slot"])[:16]
            logger.info(f"controller: {info.name} connected (uid {info.uid})")
        elif kind == "activity":
            groups = dict(body["groups"])
            if len(groups) > MAX_REPORT_GROUPS:
                raise ValueError(f"{len(groups)} groups in one report")
            known = self.runtime.snapshot.groups
            counts = {str(g): (max(0, int(c[0])), max(0, int(c[1])), float(c[2])) for g, c in groups.items()
                      if g in known}
            if not all(math.isfinite(c[2]) for c in counts.values()):
                raise ValueError("a last-activity time that is not a finite number")
            self.idle.report(info.name, counts)
            info.requests, info.connections = int(body["requests"]), int(body["connections"])
            if body.get("metrics") is not None:
                info.metrics = Counts.from_wire(body["metrics"], self.runtime.config.metrics.max_groups)
            info.last_report = time.time()
        elif kind == "wake":
            self._wake(peer, info, int(body["id"]), str(body["group"]), str(body.get("client", ""))[:64])
        elif kind == "quiesced":
            fut = info.quiesce.pop(int(body["id"]), None)
            if fut is not None and not fut.done():
                fut.set_result((int(body["inflight"]), int(body["open"]), float(body["last"])))
        else:
            raise ValueError(f"unknown message kind {kind!r}")

    # --- wakes ------------------------------------------------------------------------------------

    async def _sync(self, peer: channel.Peer, info: WorkerInfo) -> None:
        """Send `peer` the current snapshot unless it has it. Frames on one connection stay in order,
        so what is sent after this (a "ready") never overtakes the snapshot that made it true."""
        snap = self.runtime.snapshot
        if info.snapshot is snap:
            return
        data = await self._encoded(snap)
        if info.snapshot is not snap and self.runtime.snapshot is snap:
            info.snapshot = snap
            peer.send_raw(data)

    async def _ready_after_sync(self, peer: channel.Peer, info: WorkerInfo, qid: int) -> None:
        await self._sync(peer, info)
        peer.send("woke", {"id": qid, "ok": True})

    def _wake(self, peer: channel.Peer, info: WorkerInfo, qid: int, name: str, client: str) -> None:
        def answer(failure: WakeFailed | None) -> None:
            if failure is None:
                task = asyncio.get_running_loop().create_task(self._ready_after_sync(peer, info, qid))
                self._tasks.append(task)
                task.add_done_callback(self._tasks.remove)
            else:
                peer.send("woke", {"id": qid, "ok": False, "status": failure.status, "title": failure.title,
                                   "message": failure.message, "retry": failure.retry_after})

        group = self.runtime.snapshot.groups.get(name)
        if group is None:
            return answer(WakeFailed(502, "Wake-up failed", f"'{name}' is not a group wakeproxy knows (any more)"))
        if not self.runtime.manage:
            return answer(WakeFailed(503, "Site asleep", "this proxy does not wake sites", 60))
        failure = self.orchestrator.cooling([group])
        if failure is not None:
            return answer(failure)
        if info.asks >= MAX_ASKS:
            return answer(WakeFailed(503, "Site asleep", "too many wakes asked at once", 5))
        if not self.orchestrator.is_waking(name):
            retry = self.budget.spend(client, time.monotonic())
            if retry is not None:
                return answer(WakeFailed(429, "Too many wake-ups", f"Try again in {retry:.0f} s.", retry))
        wake = self.orchestrator.wake(group, client)
        assert wake.task is not None
        info.asks += 1

        def finished(task: asyncio.Task[None]) -> None:
            info.asks -= 1
            if task.cancelled():
                return answer(WakeFailed(503, "Site asleep", "the wake was cancelled (the proxy is stopping)", 5))
            exc = task.exception()
            if exc is None:
                return answer(None)
            answer(exc if isinstance(exc, WakeFailed) else WakeFailed(502, "Wake-up failed", str(exc)))

        wake.task.add_done_callback(finished)

    def _event(self, event: ContainerEvent) -> None:
        # Workers cut their connections to a container that died or stopped (mitm/upstream) at once.
        if event.action in DEATH:
            self._broadcast("event", dataclasses.asdict(event))

    def _wakes_changed(self) -> None:
        waking = tuple(sorted(self.orchestrator._wakes))
        if waking != self._waking:
            self._waking = waking
            self._broadcast("wakes", list(waking))
        cooling = self.orchestrator.cooling_now()
        fresh = {g: v for g, v in cooling.items() if self._cooling_sent.get(g) is not v[1]}
        if fresh:
            self._broadcast("cooling", self._cooling_body(fresh))
        self._cooling_sent = {g: f for g, (_, f) in cooling.items()}

    @staticmethod
    def _cooling_body(cooling: dict[str, tuple[float, WakeFailed]]) -> dict[str, list[Any]]:
        return {g: [left, f.status, f.title, f.message] for g, (left, f) in cooling.items()}

    # --- stops ------------------------------------------------------------------------------------

    async def quiesce(self, group: str) -> bool:
        """Before a stop: every worker holds new requests for `group` (until `release`, sent when this
        stop task ends either way) and answers with what it still has there. True when nothing."""
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(lambda _t: self._broadcast("release", {"group": group}))
        self._qids += 1
        qid = self._qids
        futures: dict[str, asyncio.Future[tuple[int, int, float]]] = {}
        for peer, info in list(self.workers.items()):
            fut: asyncio.Future[tuple[int, int, float]] = asyncio.get_running_loop().create_future()
            if peer.send("quiesce", {"id": qid, "group": group}):
                info.quiesce[qid] = fut
                futures[info.name] = fut
        if not futures:
            return True
        done, pending = await asyncio.wait(futures.values(), timeout=QUIESCE_TIMEOUT)
        if pending:
            late = [name for name, f in futures.items() if f in pending]
            logger.warning(f"idle {group}: {', '.join(late)} did not answer within {QUIESCE_TIMEOUT:.0f} s; "
                           "not stopping it now")
            return False
        act = self.idle.activity.get(group)
        seen = act.last if act is not None else 0.0
        # Busy: a request or stream in flight, or a byte moved since the reports the decision was made on.
        busy = {name: f.result() for name, f in futures.items()
                if f.result()[0] or f.result()[1] or f.result()[2] > seen + 0.001}
        if busy:
            self.idle.report_busy(group, {name: c for name, c in busy.items()})
            logger.info(f"idle {group}: still in use on {', '.join(busy)}; not stopping it")
            return False
        return True

    # --- what every worker gets -----------------------------------------------------------------

    def _broadcast(self, kind: str, body: Any) -> None:
        data = frame(kind, body)
        for peer in list(self.workers):
            peer.send_raw(data)

    async def _encoded(self, snap: Snapshot) -> bytes:
        cached = self._snapshot_frame
        if cached is not None and cached[0] is snap:
            return cached[1]
        data = await asyncio.to_thread(lambda: frame("snapshot", to_plain(snap)))
        self._snapshot_frame = (snap, data)
        return data

    async def _follow(self) -> None:
        sent: Snapshot | None = None
        engine = self.runtime.engine
        while True:
            await self.runtime.changed(1.0)
            try:
                engine, sent = await self._push_changes(engine, sent)
            except Exception:  # a bug must not end the pushes: workers would route on a stale table
                logger.exception("controller: pushing a snapshot to the workers failed")

    async def _push_changes(self, engine: EngineState, sent: Snapshot | None) -> tuple[EngineState, Snapshot | None]:
        if self.runtime.engine is not engine:
            engine = self.runtime.engine
            self._broadcast("engine", engine.as_dict())
        snap = self.runtime.snapshot
        if snap is sent:
            return engine, sent
        for peer, info in list(self.workers.items()):
            await self._sync(peer, info)
        return engine, snap

    def watch_changed(self) -> None:
        """What goes through the debug UI changed (debug/ui.py): every worker is told at once."""
        self._broadcast("watch", to_plain(self.runtime.watch))

    def _certs_changed(self) -> None:
        if self._cert_push is None:
            self._cert_push = asyncio.get_running_loop().call_soon(self._push_certs)

    def _push_certs(self) -> None:
        self._cert_push = None
        for peer, info in list(self.workers.items()):
            self._send_certs(peer, info)

    def _pem_of(self, cert: LoadedCert) -> tuple[str, bytes]:
        key = (str(cert.path), cert.serial)
        got = self._pem.get(key)
        if got is None:
            pem = cert.entry.privatekey.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            pem += b"".join(c.to_pem() for c in (cert.entry.chain_certs or [cert.entry.cert]))
            got = self._pem[key] = (hashlib.sha256(pem).hexdigest(), pem)
        return got

    def _send_certs(self, peer: channel.Peer, info: WorkerInfo) -> None:
        table: dict[str, list[str]] = {}
        pems: dict[str, bytes] = {}
        for name, cert in self.certificates.registry.table().items():
            digest, pem = self._pem_of(cert)
            table[name] = [cert.source, digest]
            if digest not in info.sent_certs:
                pems[digest] = pem
        peer.send("certs", {"table": table, "pem": pems})
        info.sent_certs.update(pems)

    def _tokens_changed(self) -> None:
        if self._token_push is None:
            self._token_push = asyncio.get_running_loop().call_soon(self._push_tokens)

    def _push_tokens(self) -> None:
        self._token_push = None
        self._broadcast("tokens", self.tokens.export())

    # --- for `wakeproxy status` -------------------------------------------------------------------

    def metrics_counts(self) -> Counts:
        """The request metrics of every worker there is and was, summed (observe/metrics.py)."""
        out = self.retired.copy()
        for info in list(self.workers.values()):
            if info.metrics is not None:
                out.add(info.metrics)
        return out

    def status(self) -> list[dict[str, Any]]:
        return [{"slot": i.slot, "pid": i.pid, "uid": i.uid, "connections": i.connections, "requests": i.requests,
                 "connected": i.connected, "last_report": i.last_report or None}
                for i in sorted(self.workers.values(), key=lambda i: (i.slot, i.pid))]
