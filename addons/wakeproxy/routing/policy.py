"""Which group may claim which name: one owner per name, the operator's allow-list.

Pure logic plus a small JSON file; no Docker, no mitmproxy.  `build_snapshot`
collects every name the containers' labels claim and asks `Ownership.resolve`
which claims stand.  The rules (README, "Running a shared sandbox server"):

- Every exact name and every `*.domain` wildcard has at most one owner, a group.
  A second group's claim on an owned name is refused: never routed to, never
  given a certificate, a TLS or a redirect setting.
- A wildcard `*.d` owned by a group covers every name under `d`: only that
  group may claim names under `d` (exact names or narrower wildcards).  A new
  wildcard `*.d` is refused while another group owns any name under `d`.
  So a new claim never takes traffic that already flows to another group.
- Ownership is kept in `state_dir/owners.json`: the owner keeps a name while
  any of its containers (running or not) claims it, and for
  `names.release_after` after the last such container is gone.  Claims that
  compete for a free name are decided by the creation time of the claiming
  container, then by group name, so the winner does not depend on the order
  in which Docker lists containers or sends events.
- The operator's policy (`names:` in the config): an allow-list of patterns
  (`{group}` stands for the claiming group), whether wildcards may be declared,
  a cap on names per group, names reserved for one group.  The `default_host`
  can be served only by the group it is reserved for, and no wildcard may cover
  it or (when it is set) take unknown names from it unless the allow-list names
  the wildcard's domain.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wakeproxy.config import Config
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.hostnames import is_host_pattern, is_under

logger = get_logger(__name__)

OWNERS_FILE = "owners.json"
OWNERS_VERSION = 1


@dataclass(frozen=True)
class GroupId:
    """Who a group is, as far as ownership goes: a kind no label can forge, and its base name.

    kind: "compose" (the Compose project label), "stack" (a Swarm stack: `docker stack deploy` sets its
    label on every service, over the file's), "group" (a `wakeproxy.group` label outside both),
    "container" (a lone container) or "service" (a lone Swarm service)."""

    kind: str
    base: str


@dataclass(frozen=True)
class Claim:
    name: str  # "a.example.com" or "*.example.com"
    group: str  # the group's key in the snapshot
    gid: GroupId
    created: float  # creation time of the claiming container (seconds)
    container: str  # its name, for messages


@dataclass(frozen=True)
class Refusal:
    """A claim that does not stand, and why (shown by `wakeproxy status`)."""

    name: str
    group: str
    containers: tuple[str, ...]
    reason: str
    owner: str | None = None  # the group that owns the name, when that is the reason

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "containers": list(self.containers),
                "reason": self.reason, "owner": self.owner}


@dataclass
class ProjectFolder:
    folder: str
    gone: float | None = None  # since when no container of the folder is left


@dataclass
class _Record:
    group: str  # the owner's key (as last seen)
    gid: GroupId
    since: float  # when it became the owner
    gone: float | None = None  # since when no container of the owner claims it (release_after counts from here)


@dataclass(frozen=True)
class NamePolicy:
    """The operator's rules for names, from the config (an immutable value)."""

    allow: tuple[str, ...] = ()
    wildcards: bool = True
    max_per_group: int = 50
    reserved: Mapping[str, str] = field(default_factory=dict)  # name → "[kind:]group name"
    default_host: str | None = None
    release_after: float = 60.0

    @classmethod
    def from_config(cls, config: Config) -> NamePolicy:
        n = config.names
        return cls(n.allow, n.wildcards, n.max_per_group, dict(n.reserved), config.default_host, n.release_after)

    def allowed(self, name: str, gid: GroupId) -> bool:
        """Does names.allow let the group claim `name`? (An empty list allows every name.)

        `{group}` stands for a Compose project's or a Swarm stack's name (also when a wakeproxy.group
        label splits it): a project (a stack) is the unit a tenant controls, so a pattern with `{group}` never lets a
        lone container or a `wakeproxy.group` outside Compose pre-claim the names of a project that
        does not exist yet. Their names come from patterns without `{group}`."""
        if not self.allow:
            return True
        if gid.kind not in ("compose", "stack"):
            return any(_pattern_covers(p, name) for p in self.allow if "{group}" not in p)
        own = gid.base.split("/", 1)[0].lower()
        return any(_pattern_covers(p.replace("{group}", own), name) for p in self.allow)

    def reserved_for(self, name: str, gid: GroupId) -> str | None:
        """The names.reserved entry that `gid` does not match, or None (not reserved, or its group).
        An entry is `NAME` (any kind of group of that name) or `KIND:NAME` (compose, stack, group,
        container, service)."""
        entry = self.reserved.get(name)
        if entry is None:
            return None
        kind, sep, base = entry.partition(":")
        if not sep:
            kind, base = "", entry
        return None if base == gid.base and kind in ("", gid.kind) else entry

    def refuse(self, name: str, gid: GroupId) -> str | None:
        """Why the policy (not another owner) refuses the group's claim on `name`, else None."""
        other = self.reserved_for(name, gid)
        if other is not None:
            return f"reserved for group '{other}' (names.reserved)"
        reserved_for = self.reserved.get(name)
        if name == self.default_host and reserved_for is None:
            return "it is the default_host, which labels may claim only when names.reserved assigns it to a group"
        if name.startswith("*."):
            domain = name[2:]
            if not self.wildcards:
                return "labels may not declare wildcards (names.wildcards is false)"
            if "." not in domain:
                return "a wildcard must name at least two labels (*.example.com, not *.com)"
            if self.default_host and is_under(self.default_host, domain) and \
                    self.reserved_for(self.default_host, gid) is not None:
                return f"it covers the default_host {self.default_host}"
            if self.default_host and not self.allow:
                return ("with a default_host, a wildcard would take unknown names from it: list its domain "
                        "in names.allow")
        if not self.allowed(name, gid):
            return "outside names.allow"
        return None


def _pattern_covers(pattern: str, name: str) -> bool:
    if not pattern.startswith("*."):
        return name == pattern
    domain = pattern[2:]
    if name.startswith("*."):
        inner = name[2:]
        return inner == domain or is_under(inner, domain)
    return is_under(name, domain)


def parents(domain: str) -> Iterable[str]:
    """`a.b.c` → `b.c`, `c` (the strict parents of a name)."""
    i = domain.find(".")
    while i != -1:
        yield domain[i + 1:]
        i = domain.find(".", i + 1)


class _Table:
    """Accepted names, with the indexes the conflict checks need (each check O(labels of the name))."""

    def __init__(self) -> None:
        self.owner: dict[str, GroupId] = {}
        self.wild: dict[str, GroupId] = {}  # "example.com" for an owned "*.example.com"
        self.below: dict[str, set[GroupId]] = {}  # domain → groups owning a name strictly under it
        self.count: dict[GroupId, int] = {}

    def conflict(self, name: str, gid: GroupId) -> GroupId | None:
        """The other group whose ownership this claim would cut into, else None."""
        other = self.owner.get(name)
        if other is not None and other != gid:
            return other
        bare = name[2:] if name.startswith("*.") else name
        for parent in parents(bare):
            w = self.wild.get(parent)
            if w is not None and w != gid:
                return w
        if name.startswith("*."):  # (`*.d` does not match `d` itself: the owner of `d` is no conflict)
            for g in self.below.get(bare, ()):
                if g != gid:
                    return g
        return None

    def add(self, name: str, gid: GroupId) -> None:
        if self.owner.get(name) == gid:
            return
        self.owner[name] = gid
        self.count[gid] = self.count.get(gid, 0) + 1
        bare = name[2:] if name.startswith("*.") else name
        if name.startswith("*."):
            self.wild[bare] = gid
        for parent in parents(bare):
            self.below.setdefault(parent, set()).add(gid)


class Ownership:
    """Who owns which name, kept across restarts; only the Docker view thread uses it."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._logged: set[tuple[str, str, str]] = set()
        self._said: set[tuple[str, str]] = set()  # (container, reason) of containers skipped by build_snapshot
        # A Compose project's folder (its working_dir label), as first seen: the project is that folder's,
        # and stays so for release_after once no container of that folder is left (a `down` and `up`).
        self._folders: dict[str, ProjectFolder] = {}
        self.dirty = False

    def project_folders(self, seen: Mapping[str, Mapping[str, tuple[float, str]]], now: float,
                        release_after: float) -> dict[str, str]:
        """Compose project → the folder it belongs to, given the folders each project's containers come from
        now (project → folder → (created, name) of its oldest container there): the folder seen first,
        while it has a container or was left less than release_after ago; else the oldest container's.
        Projects with no container left are held as long, then forgotten."""
        out: dict[str, str] = {}
        for project in [*seen, *(p for p in self._folders if p not in seen)]:
            folders = seen.get(project, {})
            rec = self._folders.get(project)
            if rec is not None and rec.folder not in folders:
                if rec.gone is None:
                    rec.gone, self.dirty = now, True
                if now - rec.gone >= release_after:
                    del self._folders[project]
                    rec, self.dirty = None, True
            elif rec is not None and rec.gone is not None:
                rec.gone, self.dirty = None, True  # its folder is back
            if rec is None and folders:
                rec = self._folders[project] = ProjectFolder(min(folders, key=lambda f: folders[f]))
                self.dirty = True
            if rec is not None and project in seen:
                out[project] = rec.folder  # (held: every other folder's containers are skipped meanwhile)
        return out

    def say_new(self, skipped: Mapping[str, str]) -> list[tuple[str, str]]:
        """Of these skipped containers (name → why), those not skipped for that reason last time."""
        current = set(skipped.items())
        new = sorted(current - self._said)
        self._said = current
        return new

    # --- the decision -------------------------------------------------------------------

    def resolve(self, claims: Iterable[Claim], policy: NamePolicy,
                now: float) -> tuple[dict[str, str], list[Refusal]]:
        """Which claims stand: (name → owner group key, refusals). Updates the records."""
        by_name: dict[str, dict[GroupId, list[Claim]]] = {}
        for c in claims:
            by_name.setdefault(c.name, {}).setdefault(c.gid, []).append(c)
        table = _Table()
        owners: dict[str, str] = {}
        refusals: list[Refusal] = []
        keys: dict[GroupId, str] = {}

        def refuse(name: str, cs: list[Claim], reason: str, owner: GroupId | None = None) -> None:
            refusals.append(Refusal(name, cs[0].group, tuple(sorted({c.container for c in cs})), reason,
                                    keys.get(owner, owner.base) if owner is not None else None))

        # 1. The policy; what passes competes below.
        candidates: list[tuple[tuple[int, float, str, str], str, GroupId, list[Claim]]] = []
        for name, groups in by_name.items():
            for gid, cs in groups.items():
                keys[gid] = cs[0].group
                why = policy.refuse(name, gid)
                if why is not None:
                    refuse(name, cs, why)
                    continue
                rec = self._records.get(name)
                if rec is not None and rec.gid == gid:
                    order = (0, rec.since, cs[0].group, name)  # the owner keeps what it has
                else:
                    order = (1, min(c.created for c in cs), cs[0].group, name)
                candidates.append((order, name, gid, cs))
        # 2. Names held for an owner whose claim is gone (within release_after) block the others.
        for name, rec in list(self._records.items()):
            if rec.gid in by_name.get(name, {}):
                continue
            if rec.gone is None:  # the first snapshot without the owner's claim: the clock starts
                rec.gone = now
                self.dirty = True
            if now - rec.gone >= policy.release_after:
                del self._records[name]
                self.dirty = True
                continue
            if table.conflict(name, rec.gid) is None:
                table.add(name, rec.gid)
                keys.setdefault(rec.gid, rec.group)
        # 3. Current owners first (by age), then new claims by container creation time and group.
        candidates.sort(key=lambda c: c[0])
        for _, name, gid, cs in candidates:
            other = table.conflict(name, gid)
            if other is not None:
                who = keys.get(other, other.base)
                if table.owner.get(name) != other:
                    why = f"it overlaps names of group '{who}' (a wildcard covers the other's names)"
                elif other not in by_name.get(name, {}):
                    why = (f"still held for group '{who}' (released {policy.release_after:g} s after its "
                           "last container claiming it is removed)")
                else:
                    why = f"owned by group '{who}'"
                refuse(name, cs, why, other)
                continue
            if table.count.get(gid, 0) >= policy.max_per_group:
                refuse(name, cs, f"the group already has {policy.max_per_group} names (names.max_per_group)")
                continue
            table.add(name, gid)
            owners[name] = cs[0].group
            rec = self._records.get(name)
            if rec is None or rec.gid != gid:
                self._records[name] = _Record(cs[0].group, gid, now)
                self.dirty = True
            elif rec.gone is not None or rec.group != cs[0].group:
                rec.gone, rec.group = None, cs[0].group  # claimed again (e.g. recreated within release_after)
                self.dirty = True
        for name, rec in list(self._records.items()):
            if rec.gid in by_name.get(name, {}) and table.owner.get(name) != rec.gid:
                del self._records[name]  # its owner still claims it, but the policy no longer lets it
                self.dirty = True
        refusals.sort(key=lambda r: (r.name, r.group))
        self._log(refusals)
        return owners, refusals

    def next_release(self, release_after: float) -> float | None:
        """When the earliest name held for a vanished claim becomes free (wall clock), if any."""
        held = [r.gone for r in self._records.values() if r.gone is not None]
        return min(held) + release_after if held else None

    def _log(self, refusals: list[Refusal]) -> None:
        current = {(r.name, r.group, r.reason) for r in refusals}
        for r in refusals:
            if (r.name, r.group, r.reason) not in self._logged:
                logger.warning(f"names: {r.name} claimed by group '{r.group}' "
                               f"({', '.join(r.containers)}) refused: {r.reason}")
        self._logged = current

    # --- the file -------------------------------------------------------------------------

    def encode(self) -> bytes:
        data = {
            "version": OWNERS_VERSION,
            "owners": {
                name: {"group": r.group, "kind": r.gid.kind, "base": r.gid.base, "since": r.since, "gone": r.gone}
                for name, r in sorted(self._records.items())
            },
            "projects": {p: {"folder": f.folder, "gone": f.gone} for p, f in sorted(self._folders.items())},
        }
        return json.dumps(data, indent=1, sort_keys=True).encode()

    def load(self, path: Path) -> None:
        """Read the records; a missing file means no owner yet, a corrupt one is logged and ignored
        (ownership is then decided by creation time again, which gives the same owners in practice)."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            logger.warning(f"names: cannot read {path} ({e}); owners are decided by creation time")
            return
        try:
            self._records = _decode(raw)
            self._folders = _decode_folders(raw)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            logger.warning(f"names: {path} is corrupt ({type(e).__name__}: {e}); ignored, owners are "
                           "decided by creation time")
            self._records, self._folders = {}, {}


def _decode_folders(raw: bytes) -> dict[str, ProjectFolder]:
    data = json.loads(raw.decode("utf-8"))
    out: dict[str, ProjectFolder] = {}
    for project, f in (data.get("projects") or {}).items():
        folder, gone = f["folder"], f.get("gone")
        if not (isinstance(project, str) and isinstance(folder, str) and len(project) <= 256 and len(folder) <= 4096):
            raise ValueError(f"the project entry {str(project)[:60]!r} is not {{folder, gone}}")
        if gone is not None and not math.isfinite(float(gone)):
            raise ValueError("a time is not a finite number")
        out[project] = ProjectFolder(folder, None if gone is None else float(gone))
    return out


def _decode(raw: bytes) -> dict[str, _Record]:
    data = json.loads(raw.decode("utf-8"))
    if not isinstance(data, dict) or data.get("version") != OWNERS_VERSION:
        raise ValueError(f"not an owners file of version {OWNERS_VERSION}")
    out: dict[str, _Record] = {}
    for name, r in data["owners"].items():
        if not isinstance(name, str) or not is_host_pattern(name):
            raise ValueError(f"{name!r} is not a name")
        since = float(r["since"])
        gone = None if r.get("gone") is None else float(r["gone"])
        if not (math.isfinite(since) and (gone is None or math.isfinite(gone))):
            raise ValueError("a time is not a finite number")
        group, kind, base = r["group"], r["kind"], r["base"]
        if not all(isinstance(v, str) for v in (group, kind, base)):
            raise ValueError(f"the entry of {name} is not {{group, kind, base, since, gone}}")
        out[name] = _Record(group, GroupId(kind, base), since, gone)
    return out
