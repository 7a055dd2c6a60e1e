"""IdleKeeper addon: puts groups nobody uses to sleep, never one that is in use.

Activity is measured in the proxy itself, per group: requests in flight
(including streamed uploads, downloads, server-sent events and long polls,
which stay "in flight" until their last byte), open WebSockets, and the time
the last byte moved.  A group is idle when nothing is in flight or open and no
byte moved for its timeout; then every member is stopped (dependents first)
or paused.  Only this addon stops groups, only the Waker starts them; a
request that arrives during a stop waits for it and then wakes the group.

The clocks survive restarts: they are saved under `state_dir` (atomically, at
most every few seconds); a missing or corrupt file means "active now".
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mitmproxy import http

from wakeproxy.config import format_duration
from wakeproxy.files import write_private
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.snapshot import Group, Snapshot
from wakeproxy.runtime import Runtime
from wakeproxy.wake.orchestrator import OpError, members_text

logger = get_logger(__name__)

CHECK_INTERVAL = 0.5  # seconds between idle checks: groups stop within timeout + this (+ the stop itself)
_ING = {"stop": "stopping", "pause": "pausing"}
_ED = {"stop": "stopped", "pause": "paused"}
SAVE_INTERVAL = 10.0  # the state file is written at most this often
# ... and at least this often while the proxy runs: its `saved` time then tells, at the next start, how long
# the proxy was away, and that time is not counted as a group unused (idle.remove_after).
HEARTBEAT = 600.0
STATE_FILE = "idle-state.json"


@dataclass
class Activity:
    last: float  # wall-clock time the last byte moved (or the group was first seen running)
    inflight: int = 0  # requests whose response has not ended
    open: int = 0  # open WebSockets
    running: bool = False  # as last observed; a not-running → running change restarts the clock


class WakeView(Protocol):
    def is_waking(self, group: str) -> bool: ...


class StopOps(Protocol):
    async def stop(self, container_id: str, name: str, timeout: float) -> None: ...

    async def pause(self, container_id: str, name: str) -> None: ...

    async def scale(self, service_id: str, name: str, replicas: int, up_only: bool = True) -> None: ...

    async def remove(self, container_id: str, name: str, volumes: bool) -> None: ...

    async def remove_network(self, name: str) -> None: ...

    async def network_labels(self, name: str) -> dict[str, str] | None: ...


class IdleKeeper:
    """Counts activity per group from the flows it sees and, where it `decides` (one process, or the
    controller), puts idle groups to sleep. A serving worker's keeper only counts: it reports to the
    controller (planes.worker), whose keeper adds the reports up (`report`) and, before a stop, asks
    every worker to hold new requests and confirm it has none (`quiesce`)."""

    def __init__(self, runtime: Runtime, waker: WakeView, decides: bool = True) -> None:
        self.runtime = runtime
        self.waker = waker
        self.decides = decides
        self.ops: StopOps | None = None
        if decides:
            from wakeproxy.docker.ops import DockerOps

            self.ops = DockerOps(runtime.config.docker)
        self.activity: dict[str, Activity] = {}
        # The controller: per worker, per group (in flight, open, last byte); summed into `activity`.
        self.remote: dict[str, dict[str, tuple[int, int, float]]] = {}
        self.quiesce: Callable[[str], Awaitable[bool]] | None = None
        self._loaded: dict[str, float] = {}
        self._loaded_used: dict[str, float] = {}  # last_used from the state file, until the group is first seen
        # Last real use per group (a request or a byte, wall clock), kept across sleeps and restarts: what
        # idle.remove_after counts from. A group never used since the proxy first saw it counts from then.
        self.used: dict[str, float] = {}
        # Who each name means (Group.gid): a name can pass to another group, and clocks belong to groups.
        self._identity: dict[str, str] = {}
        self._loaded_identity: dict[str, str] = {}
        self.retiring: set[str] = set()
        self._said_no_pause: set[str] = set()  # groups told once that services cannot be paused
        self.stops: list[Callable[[str, str, str], None]] = []  # told (group, action, reason) after a stop
        self._actions: dict[str, str] = {}  # group → the action of its stop in progress
        self._task: asyncio.Task[None] | None = None
        self._dirty = False
        self._saved_at = 0.0
        self._saving: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        if "wakeproxy_config" in updated and self.decides:
            from wakeproxy.docker.ops import DockerOps

            self.ops = DockerOps(self.runtime.config.docker)

    def running(self) -> None:
        if not self.decides:
            return
        self._loaded = self._load()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="idle keeper")

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self.runtime.stopping.values()):
            # A stop under way still counts: its containers get their stop, and the clock says so.
            await asyncio.wait([task], timeout=self.runtime.config.idle.stop_timeout + 5)
        if self._dirty and self.decides:
            await asyncio.to_thread(self._write, self._state())

    def saved_clock(self, group: str) -> float | None:
        """The clock read from the state file for `group`, until the group is first seen (then `activity`)."""
        return self._loaded.get(group)

    @property
    def state_path(self) -> Path:
        return self.runtime.config.state_dir / STATE_FILE

    # --- activity from flows ----------------------------------------------------------

    def _touch(self, group: str) -> Activity:
        act = self.activity.get(group)
        if act is None:
            act = self.activity[group] = Activity(time.time(), running=True)
        act.last = self.used[group] = time.time()
        self._dirty = True
        return act

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        group = flow.metadata.get("wakeproxy.group")
        if group is not None and flow.response is None and "wakeproxy.idle" not in flow.metadata:
            self._touch(group).inflight += 1
            flow.metadata["wakeproxy.idle"] = group

    def _end(self, flow: http.HTTPFlow) -> None:
        group = flow.metadata.pop("wakeproxy.idle", None)
        if group is not None:
            act = self._touch(group)
            act.inflight = max(0, act.inflight - 1)

    def response(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        group = flow.metadata.get("wakeproxy.group")
        if group is not None:
            self._touch(group).open += 1
            flow.metadata["wakeproxy.ws"] = group

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        group = flow.metadata.get("wakeproxy.ws")
        if group is not None:
            self._touch(group)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        group = flow.metadata.pop("wakeproxy.ws", None)
        if group is not None:
            act = self._touch(group)
            act.open = max(0, act.open - 1)

    # --- reports from serving workers (the controller) -----------------------------------

    def report(self, worker: str, groups: dict[str, tuple[int, int, float]]) -> None:
        """A worker's counts for the groups that changed there since its last report."""
        mine = self.remote.setdefault(worker, {})
        mine.update(groups)
        self._resum(groups)

    def report_busy(self, group: str, counts: dict[str, tuple[int, int, float]]) -> None:
        """What workers answered a quiesce with: newer than their last report."""
        for worker, c in counts.items():
            self.remote.setdefault(worker, {})[group] = c
        self._resum([group])

    def forget(self, worker: str) -> None:
        """A worker is gone, and with it every request and stream it held."""
        self._resum(self.remote.pop(worker, {}))

    def _resum(self, names: Any) -> None:
        now = time.time()
        for name in names:
            counts = [w[name] for w in self.remote.values() if name in w]
            act = self.activity.get(name)
            if act is None:
                act = self.activity[name] = Activity(now, running=True)
            act.inflight = sum(c[0] for c in counts)
            act.open = sum(c[1] for c in counts)
            act.last = min(now, max([act.last, *(c[2] for c in counts)]))
            reported = max((c[2] for c in counts), default=0.0)
            if reported > self.used.get(name, 0.0):  # a worker's last byte: real use
                self.used[name] = min(now, reported)
            self._dirty = True

    # --- the clock ----------------------------------------------------------------------

    def timeout_of(self, group: Group) -> float:
        return group.idle_timeout if group.idle_timeout is not None else self.runtime.config.idle.timeout

    def idle_for(self, name: str) -> float | None:
        act = self.activity.get(name)
        return None if act is None else time.time() - act.last

    async def _loop(self) -> None:
        while True:
            try:
                self.check(time.time())
                since = time.monotonic() - self._saved_at
                if (self._dirty and since >= SAVE_INTERVAL or since >= HEARTBEAT) and (
                    self._saving is None or self._saving.done()
                ):
                    self._saved_at = time.monotonic()
                    self._dirty = False
                    self._saving = asyncio.ensure_future(asyncio.to_thread(self._write, self._state()))
            except Exception:
                logger.exception("idle check failed")
            await asyncio.sleep(CHECK_INTERVAL)

    def check(self, now: float) -> None:
        """Start a stop for every running group that has been idle for its timeout."""
        snap = self.runtime.snapshot
        if not snap.synced or not self.runtime.manage:
            return  # (a debugging copy never puts anything to sleep)
        remove_after = self.runtime.config.idle.remove_after
        self._follow_identities(snap, now)
        for name, group in snap.groups.items():
            if name not in self.used:
                self.used[name] = self._loaded_used.pop(name, now)  # first sight: a full remove_after from now
                self._dirty = True
            # (A global Swarm service runs on every node and is never scaled: it does not keep a group up.)
            running = any(
                (c := snap.containers.get(cid)) is not None and c.state == "running"
                and not (c.is_service and c.replicas is None) for cid in group.members
            )
            if running:
                # A group that runs is not abandoned, used or not: idle.remove_after counts from when it
                # stopped at the latest (a Docker restart that stops a long-running group never makes it
                # look abandoned). Saved with the next change, not written for this alone.
                self.used[name] = max(self.used[name], now)
            else:
                # Nor is one whose containers were just made (a CI job's `docker compose up` between its
                # create and its start): a member's creation counts as use.
                newest = max((c.created for cid in group.members if (c := snap.containers.get(cid)) is not None),
                             default=0.0)
                if newest > self.used[name]:
                    self.used[name] = min(newest, now)
            if remove_after > 0 and not running and self._retirable(snap, group, now):
                self._retire(snap, group, now - self.used[name])
                continue
            act = self.activity.get(name)
            if act is None:
                if not running:
                    # Asleep at first sight: a saved clock no longer applies to a later start.
                    self._loaded.pop(name, None)
                    continue
                # First sight of a running group: its saved clock if there is one, else "active now".
                act = self.activity[name] = Activity(self._loaded.pop(name, now), running=True)
                self._dirty = True
            if not running:
                act.running = False
                continue
            if not act.running:  # started since we last looked (a wake, or `docker compose up`)
                act.running, act.last = True, now
                self._dirty = True
            timeout = self.timeout_of(group)
            if timeout <= 0 or act.inflight or act.open or name in self.runtime.stopping:
                continue
            if self.waker.is_waking(name):
                # A wake in progress is use: the group gets a whole timeout from the moment it is ready
                # (the held requests it was woken for are counted only once they are forwarded, and
                # under the `wakeproxy` command a worker's count reaches us up to a report later).
                act.last = now
                continue
            if now - act.last < timeout:
                continue
            self._put_to_sleep(snap, group, now - act.last)

    def _follow_identities(self, snap: Snapshot, now: float) -> None:
        """Clocks belong to groups, not names. A name can pass from one group to another (a Compose project
        named like a lone container takes the bare name, and gives it back when it goes): a name that now
        means another group starts afresh, as if first seen. Names that are gone are forgotten, saved ones
        included, so a sandbox made again later under the same name is a new one."""
        for name, group in snap.groups.items():
            before = self._identity.get(name) or self._loaded_identity.pop(name, None)
            if before is not None and group.gid and before != group.gid:
                if (act := self.activity.get(name)) is not None:
                    act.last = now  # (what is in flight or open stays counted: requests end later)
                self._loaded.pop(name, None)
                self._loaded_used.pop(name, None)
                self.used[name] = now
                self._dirty = True
            self._identity[name] = group.gid
        for table in (self._identity, self.used, self.activity, self._loaded, self._loaded_used,
                      self._loaded_identity):
            gone = [name for name in table if name not in snap.groups]
            for name in gone:
                del table[name]
            self._dirty |= bool(gone) and table is not self._loaded_identity

    # --- retiring abandoned groups (idle.remove_after; Docksal's "dangling" projects) -----------------

    def removes_in(self, group: Group, now: float) -> float | None:
        """Seconds until `group` is removed as abandoned; None when it never is (off, or permanent)."""
        remove_after = self.runtime.config.idle.remove_after
        if remove_after <= 0 or group.permanent or group.idle_timeout == 0.0:  # io.docksal.permanent, idle-timeout=0
            return None
        containers = self.runtime.snapshot.containers
        members = [c for cid in group.members if (c := containers.get(cid)) is not None]
        if any(c.is_service for c in members):
            return None  # a stack or service is removed with `docker stack rm` / `service rm`, never here
        label = self.runtime.config.idle.remove_label
        if label and not any(label in c.labels for c in members):
            return None  # idle.remove_label (Docksal's io.docksal.project-root): only the groups it marks
        return max(0.0, self.used.get(group.name, now) + remove_after - now)

    def _retirable(self, snap: Snapshot, group: Group, now: float) -> bool:
        left = self.removes_in(group, now)
        if left is None or left > 0 or group.name in self.runtime.stopping or self.waker.is_waking(group.name):
            return False
        return _asleep(snap, group)

    def _retire(self, snap: Snapshot, group: Group, unused: float) -> None:
        logger.info(f"retire {group.name}: unused for {format_duration(unused)} (idle.remove_after "
                    f"{format_duration(self.runtime.config.idle.remove_after)}); removing it")
        task = asyncio.get_running_loop().create_task(self._remove(snap, group), name=f"retire {group.name}")
        self.runtime.stopping[group.name] = task  # requests for it wait, as during a stop
        self.retiring.add(group.name)
        task.add_done_callback(functools.partial(self._retired, group.name))

    async def _remove(self, snap: Snapshot, group: Group) -> bool:
        if self.quiesce is not None and not await self.quiesce(group.name):
            return False  # a request came in after all: it is used
        # Docker as it is now, not as it was when this began (the quiesce takes up to 2 s): a member that
        # was started meanwhile means the group is in use. (`docker rm` without force would refuse it anyway.)
        snap = self.runtime.snapshot
        current = snap.groups.get(group.name)
        if current is None or not _asleep(snap, current):
            return False
        if not set(current.members) <= set(group.members) or current.gid != group.gid:
            # A member made meanwhile (a CI job's `compose up` between create and start) is use; another
            # group under the name is not the one decided on.
            self.used[group.name] = time.time()
            return False
        group = current
        assert self.ops is not None
        volumes = self.runtime.config.idle.remove_volumes
        members = [i for cid in group.members if (i := snap.containers.get(cid)) is not None]
        removed: list[str] = []
        for info in members:
            try:
                await self.ops.remove(info.id, info.name, volumes)
                removed.append(info.name)
            except OpError as e:
                logger.warning(f"retire {group.name}: {e}")
        # Its own networks: those of its members that no other container is on (any state, any group), and
        # that its Compose project made (labelled so): never an `external:` one or one the operator made.
        gone = {i.id for i in members}
        # Docker as it is after the removals: a container made meanwhile (a CI job's `compose up`) keeps its
        # network, which Docker would let go while the container is only created (its start then fails).
        snap = self.runtime.snapshot
        others = {n for c in snap.containers.values() if c.id not in gone for n in c.networks}
        nets = sorted({n for i in members for n in i.networks} - others - {"bridge", "host", "none"})
        project = group.name.split("/", 1)[0]  # a project split by wakeproxy.group labels: "P/G"
        left: list[str] = []
        for net in nets:
            try:
                labels = await self.ops.network_labels(net)
                if labels is None or labels.get("com.docker.compose.project") != project:
                    continue  # not the project's own network
                await self.ops.remove_network(net)
                left.append(net)
            except OpError as e:
                logger.warning(f"retire {group.name}: {e}")
        logger.info(f"retire {group.name}: removed container(s) {', '.join(removed) or 'none'}; network(s) "
                    f"{', '.join(left) or 'none'}; " + ("anonymous volumes removed, named volumes kept" if volumes
                                                        else "volumes kept"))
        return True

    def _retired(self, group: str, task: asyncio.Task[bool]) -> None:
        self.retiring.discard(group)
        if self.runtime.stopping.get(group) is task:
            del self.runtime.stopping[group]
        if not task.cancelled() and task.exception() is None and task.result():
            for told in self.stops:
                told(group, "remove", "unused")
        if not task.cancelled() and task.exception() is None and not task.result():
            self.used[group] = time.time()  # in use after all
            self._dirty = True
        elif not task.cancelled() and task.exception() is not None:
            logger.error(f"retire {group}: failed", exc_info=task.exception())

    def _put_to_sleep(self, snap: Snapshot, group: Group, idle: float) -> None:
        action = group.idle_action or self.runtime.config.idle.action
        members = [c for m in group.members if (c := snap.containers.get(m)) is not None]
        self._actions[group.name] = "scale0" if members and all(c.is_service for c in members) else action
        logger.info(f"idle {group.name}: no activity for {idle:.1f} s; {_ING[action]} {members_text(snap, group)}"
                    + (" (services: scaled to 0)" if any((c := snap.containers.get(m)) is not None and c.is_service
                                                         for m in group.members) else ""))
        task = asyncio.get_running_loop().create_task(self._sleep(snap, group, action), name=f"idle {action} {group.name}")
        self.runtime.stopping[group.name] = task
        task.add_done_callback(functools.partial(self._slept, group.name))

    async def _sleep(self, snap: Snapshot, group: Group, action: str) -> bool:
        if self.quiesce is not None and not await self.quiesce(group.name):
            return False  # a worker has a request or stream in it after all (logged by quiesce)
        assert self.ops is not None
        t0 = time.monotonic()
        stop_timeout = self.runtime.config.idle.stop_timeout
        for layer in group.stop_order(snap):
            calls = []
            for cid in layer:
                info = self.runtime.snapshot.containers.get(cid)
                if info is None or info.state != "running":
                    continue
                if info.is_service:
                    if info.replicas is None:
                        continue  # a global service cannot be scaled (the snapshot never lets one idle)
                    if action == "pause" and group.name not in self._said_no_pause:
                        self._said_no_pause.add(group.name)
                        logger.warning(f"idle {group.name}: Swarm services cannot be paused; service "
                                       f"{info.name} is scaled to 0 instead")
                    calls.append(self.ops.scale(cid, info.name, 0, up_only=False))
                elif action == "pause":
                    calls.append(self.ops.pause(cid, info.name))
                else:
                    calls.append(self.ops.stop(cid, info.name, stop_timeout))
            for result in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(result, OpError):
                    logger.warning(f"idle {group.name}: {result}")
                elif isinstance(result, BaseException):
                    raise result
        logger.info(f"idle {group.name}: {_ED[action]} in {(time.monotonic() - t0) * 1000:.0f} ms")
        return True

    def _slept(self, group: str, task: asyncio.Task[bool]) -> None:
        if self.runtime.stopping.get(group) is task:
            del self.runtime.stopping[group]
        act = self.activity.get(group)
        if not task.cancelled() and task.exception() is None and not task.result():
            self._actions.pop(group, None)
            return  # not stopped: the group runs on, its clock as the workers reported it
        if act is not None:
            act.running = False
            act.last = time.time()  # a failed stop is not retried before another full timeout
            self._dirty = True
        if not task.cancelled() and task.exception() is None:
            for told in self.stops:
                told(group, self._actions.pop(group, "stop"), "idle")
        if not task.cancelled() and task.exception() is not None:
            logger.error(f"idle {group}: stop failed", exc_info=task.exception())

    # --- persistence ------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        clocks = {**self._loaded, **{name: act.last for name, act in self.activity.items()}}
        used = {**self._loaded_used, **self.used}
        snap = self.runtime.snapshot
        if snap.synced:  # forget groups that no longer exist (one that comes back counts as used then)
            clocks = {name: t for name, t in clocks.items() if name in snap.groups}
            used = {name: t for name, t in used.items() if name in snap.groups}
            self.used = {name: t for name, t in self.used.items() if name in snap.groups}
        identity = {name: gid for name, gid in {**self._loaded_identity, **self._identity}.items() if name in used}
        return {"version": 1, "saved": time.time(), "last_activity": clocks, "last_used": used, "identity": identity}

    def _write(self, state: dict[str, Any]) -> None:
        try:
            write_private(self.state_path, json.dumps(state, indent=1, sort_keys=True).encode())
        except OSError as e:
            logger.warning(f"idle: cannot save the idle clocks to {self.state_path}: {e}")

    def _load(self) -> dict[str, float]:
        path = self.state_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            logger.warning(f"idle: cannot read {path} ({e}); every running group counts as active now")
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
            clocks = data["last_activity"]
            now = time.time()
            # A clock from the future (a wrong system time) would keep a group up forever: cap it.
            loaded = {str(k): float(v) for k, v in clocks.items()}
            used = {str(k): float(v) for k, v in (data.get("last_used") or {}).items()}
            if not all(math.isfinite(v) for v in [*loaded.values(), *used.values()]):
                raise ValueError("a clock is not a finite number")
            identity = {str(k): str(v)[:300] for k, v in (data.get("identity") or {}).items()}
            # While the proxy was away nobody could use a sandbox through it: that time does not count
            # toward idle.remove_after (the file is written at least every HEARTBEAT while it runs).
            saved = float(data.get("saved") or now)
            away = max(0.0, now - saved) if math.isfinite(saved) else 0.0
            self._loaded_used = {k: min(v + away, now) for k, v in used.items()}
            self._loaded_identity = identity
            return {k: min(v, now) for k, v in loaded.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning(f"idle: {path} is corrupt ({type(e).__name__}: {e}); every running group counts as active now")
            return {}


def _asleep(snap: Snapshot, group: Group) -> bool:
    """Nothing of `group` runs, is paused or restarting (a running group is put to sleep first, by its timeout)."""
    return all((c := snap.containers.get(cid)) is None or c.state in ("exited", "created", "dead")
               for cid in group.members)
