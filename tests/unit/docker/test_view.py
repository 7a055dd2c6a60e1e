"""wakeproxy.docker_view: the container cache (state_dir/containers.json) and the env filter.

The Docker API is a small in-memory stand-in here (listing, inspect, networks); the real engine
is exercised by tests/integration/test_resync_cache.py.
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors
import pytest
import wakeproxy.docker.view as dv
from wakeproxy.config import Config, SourcesConfig
from wakeproxy.docker.view import (
    CACHE_FILE,
    DockerView,
    _parse_env,
    _Static,
    _StreamEnd,
    decode_cache,
    encode_cache,
    info_from_inspect,
)
from wakeproxy.routing.labels import USED_ENV, routes_for, settings_for
from wakeproxy.routing.snapshot import Snapshot

ADDONS = Path(dv.__file__).resolve().parents[1]  # the package: addons/wakeproxy
SECRET = "DB_PASSWORD=hunter2-do-not-keep"


def cid(n: int) -> str:
    return f"{n:064x}"


class FakeAPI:
    """The four low-level calls DockerView makes, over a dict of containers; counts inspects."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}
        self.inspected: list[str] = []
        self._lock = threading.Lock()

    def add(self, n: int, env: list[str] | None = None, ports: tuple[str, ...] = ("8080/tcp",)) -> str:
        i = cid(n)
        self.data[i] = {
            "Id": i,
            "Name": f"/c{n}",
            "Config": {
                "Env": [SECRET, "PATH=/bin", *(env or [])],
                "ExposedPorts": {p: {} for p in ports},
                "Labels": {"wakeproxy.host": f"c{n}.test"},
            },
            "State": {"Status": "created"},
            "NetworkSettings": {"Networks": {"net": {"IPAddress": ""}}},
        }
        return i

    def networks(self) -> list[dict[str, str]]:
        return [{"Name": "net", "Driver": "bridge"}]

    def containers(self, all: bool = False) -> list[dict[str, Any]]:
        return [
            {
                "Id": i,
                "Names": [d["Name"]],
                "State": "created",
                "Status": "Created",
                "Labels": d["Config"]["Labels"],
                "NetworkSettings": d["NetworkSettings"],
            }
            for i, d in self.data.items()
        ]

    def inspect_container(self, i: str) -> dict[str, Any]:
        with self._lock:
            self.inspected.append(i)
        if i not in self.data:
            raise docker.errors.NotFound(f"no such container {i}")
        return self.data[i]


class FakeClient:
    def __init__(self, api: FakeAPI) -> None:
        self.api = api


class DirectLoop:
    """Stands in for the event loop: runs what the thread hands over at once."""

    def call_soon_threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
        fn(*args)


def make_view(state_dir: Path, published: list[Snapshot] | None = None) -> DockerView:
    sink = published if published is not None else []
    return DockerView(Config(state_dir=state_dir), DirectLoop(), sink.append, own_id=None)  # type: ignore[arg-type]


def start(view: DockerView, api: FakeAPI) -> tuple[int, int]:
    """What the thread does before it follows events: load the cache, resync, save."""
    view._load_cache()
    result = view._resync(FakeClient(api))  # type: ignore[arg-type]
    if view._unsaved_since is not None:
        view._save_cache()
    return result


def cache_ids(state_dir: Path) -> set[str]:
    return set(json.loads((state_dir / CACHE_FILE).read_text())["containers"])


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "container cache" in r.getMessage()]


# --- only the variables wakeproxy reads ------------------------------------------------------


def test_parse_env_keeps_only_the_variables_wakeproxy_reads():
    env = _parse_env([
        "VIRTUAL_HOST=a.test,b.test", "VIRTUAL_PORT=8080", "VIRTUAL_PROTO=https",
        "LETSENCRYPT_HOST=a.test", SECRET, "PATH=/bin", "NO_EQUALS_SIGN", "VIRTUAL_HOST_X=1",
    ])
    assert env == {"VIRTUAL_HOST": "a.test,b.test", "VIRTUAL_PORT": "8080", "VIRTUAL_PROTO": "https",
                   "LETSENCRYPT_HOST": "a.test"}
    assert _parse_env(None) == {}


def test_every_env_variable_the_code_reads_is_kept():
    """A new `env.get("X")` / `env["X"]` anywhere in the package must be added to USED_ENV."""
    read = set()
    for path in ADDONS.rglob("*.py"):
        read |= set(re.findall(r"\benv(?:\.get\(|\[)\s*[\"']([A-Z][A-Z0-9_]*)[\"']", path.read_text()))
    assert {"VIRTUAL_HOST", "VIRTUAL_PORT", "VIRTUAL_PROTO"} <= read
    assert read <= USED_ENV
    assert "LETSENCRYPT_HOST" in USED_ENV


def test_consumers_still_see_their_variables():
    data = FakeAPI()
    i = data.add(1, env=["VIRTUAL_HOST=nginx.test", "VIRTUAL_PORT=8443", "VIRTUAL_PROTO=https",
                         "LETSENCRYPT_HOST=nginx.test,www.nginx.test"])
    info = info_from_inspect(data.data[i])
    assert "DB_PASSWORD" not in info.env and "PATH" not in info.env
    routes = {r.host: r for r in routes_for(info, SourcesConfig())}
    assert routes["nginx.test"].port == 8443 and routes["nginx.test"].scheme == "https"
    assert routes["nginx.test"].source == "nginx-proxy"
    assert settings_for(info).letsencrypt == ("nginx.test", "www.nginx.test")


# --- the file format ------------------------------------------------------------------------


def test_encode_decode_round_trip():
    static = {cid(1): _Static({"VIRTUAL_HOST": "a.test"}, (80, 443)), cid(2): _Static({}, ())}
    raw = encode_cache(static)
    assert decode_cache(raw) == static
    data = json.loads(raw)
    assert data["version"] == 1 and data["env_keys"] == sorted(USED_ENV)
    assert encode_cache(decode_cache(raw)) == raw  # stable: an unchanged cache is never rewritten


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"\xff\xfe\x00", b"[]", b"null", b"[" * 100_000,
    b'{"version": 2, "containers": {}}',
    b'{"version": 1, "containers": {}}',  # no env_keys
    b'{"version": 1, "env_keys": "VIRTUAL_HOST", "containers": {}}',
    b'{"version": 1, "env_keys": %s, "containers": []}',
    b'{"version": 1, "env_keys": %s, "containers": {"x": []}}',
    b'{"version": 1, "env_keys": %s, "containers": {"x": {"env": [], "exposed_ports": []}}}',
    b'{"version": 1, "env_keys": %s, "containers": {"x": {"env": {"VIRTUAL_HOST": 1}, "exposed_ports": []}}}',
    b'{"version": 1, "env_keys": %s, "containers": {"x": {"env": {"PATH": "/bin"}, "exposed_ports": []}}}',
    b'{"version": 1, "env_keys": %s, "containers": {"x": {"env": {}, "exposed_ports": ["80"]}}}',
    b'{"version": 1, "env_keys": %s, "containers": {"x": {"env": {}, "exposed_ports": [true]}}}',
    b'{"version": 1, "env_keys": %s, "containers": {"x": {"env": {}}}}',
])
def test_decode_rejects_wrong_shapes(raw: bytes):
    if b"%s" in raw:
        raw = raw % json.dumps(sorted(USED_ENV)).encode()
    with pytest.raises(ValueError):
        decode_cache(raw)


# --- load, save, prune ----------------------------------------------------------------------


def test_first_start_inspects_and_saves_then_a_restart_inspects_nothing(tmp_path: Path):
    api = FakeAPI()
    ids = [api.add(n, env=[f"VIRTUAL_PORT=80{n:02d}"]) for n in range(5)]
    first: list[Snapshot] = []
    view = make_view(tmp_path, first)
    assert start(view, api) == (5, 0)
    assert sorted(api.inspected) == sorted(ids)
    assert cache_ids(tmp_path) == set(ids)
    raw = (tmp_path / CACHE_FILE).read_bytes()
    assert b"hunter2" not in raw and b"\"PATH\"" not in raw  # no other variable ever reaches the disk

    api.inspected.clear()
    again: list[Snapshot] = []
    view2 = make_view(tmp_path, again)
    assert start(view2, api) == (0, 5)
    assert api.inspected == []
    assert view2._containers == view._containers  # the same ContainerInfo values: same routes
    assert set(again[-1].exact) == set(first[-1].exact) == {f"c{n}.test" for n in range(5)}
    assert (tmp_path / CACHE_FILE).read_bytes() == raw


def test_an_unchanged_cache_is_not_rewritten(tmp_path: Path):
    api = FakeAPI()
    for n in range(3):
        api.add(n)
    start(make_view(tmp_path), api)
    ino = (tmp_path / CACHE_FILE).stat().st_ino  # an atomic replace makes a new inode
    start(make_view(tmp_path), api)
    assert (tmp_path / CACHE_FILE).stat().st_ino == ino


def test_new_containers_are_inspected_and_gone_ones_dropped(tmp_path: Path):
    api = FakeAPI()
    ids = [api.add(n) for n in range(4)]
    start(make_view(tmp_path), api)
    del api.data[ids[0]]
    new = api.add(9)
    api.inspected.clear()
    view = make_view(tmp_path)
    assert start(view, api) == (1, 3)
    assert api.inspected == [new]
    assert cache_ids(tmp_path) == {*ids[1:], new}
    assert set(view._static) == {*ids[1:], new}


def test_a_container_removed_between_listing_and_inspect_is_skipped(tmp_path: Path):
    api = FakeAPI()
    keep = api.add(1)
    gone = api.add(2)
    listing = api.containers(all=True)
    del api.data[gone]
    api.containers = lambda all=False: listing  # type: ignore[method-assign]
    view = make_view(tmp_path)
    assert start(view, api) == (2, 0)
    assert set(view._containers) == {keep}
    assert cache_ids(tmp_path) == {keep}


@pytest.mark.parametrize("content", [b"{corrupt", b'{"version": 1, "env_keys": %s, "containers": []}',
                                     b'{"version": 1, "env_keys": %s, "containers": {"x": 1}}'])
def test_a_corrupt_cache_is_logged_once_ignored_and_replaced(tmp_path: Path, caplog, content: bytes):
    content = content.replace(b"%s", json.dumps(sorted(USED_ENV)).encode())
    (tmp_path / CACHE_FILE).write_bytes(content)
    api = FakeAPI()
    ids = [api.add(n) for n in range(3)]
    caplog.set_level(logging.INFO, logger="wakeproxy.docker.view")
    view = make_view(tmp_path)
    assert start(view, api) == (3, 0)
    assert sorted(api.inspected) == sorted(ids)
    assert len(cache_warnings(caplog)) == 1, caplog.text
    assert cache_ids(tmp_path) == set(ids)  # replaced by a good one
    api.inspected.clear()
    assert start(make_view(tmp_path), api) == (0, 3)
    assert len(cache_warnings(caplog)) == 1


def test_a_cache_for_other_variables_is_ignored_without_a_warning(tmp_path: Path, caplog):
    (tmp_path / CACHE_FILE).write_text(json.dumps({
        "version": 1, "env_keys": ["VIRTUAL_HOST"], "containers": {cid(1): {"env": {}, "exposed_ports": []}}}))
    api = FakeAPI()
    api.add(1)
    caplog.set_level(logging.INFO, logger="wakeproxy.docker.view")
    assert start(make_view(tmp_path), api) == (1, 0)
    assert cache_warnings(caplog) == []
    assert "from another version" in caplog.text


def test_a_missing_cache_is_not_a_warning(tmp_path: Path, caplog):
    api = FakeAPI()
    api.add(1)
    caplog.set_level(logging.INFO, logger="wakeproxy.docker.view")
    assert start(make_view(tmp_path / "new"), api) == (1, 0)
    assert cache_warnings(caplog) == []
    assert cache_ids(tmp_path / "new") == {cid(1)}


def test_an_unwritable_state_dir_is_logged_once_and_the_view_goes_on(tmp_path: Path, caplog, monkeypatch):
    def read_only(path: Path, data: bytes) -> None:  # tests run as root: permission bits would not stop it
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(dv, "write_private", read_only)
    api = FakeAPI()
    api.add(1)
    caplog.set_level(logging.INFO, logger="wakeproxy.docker.view")
    published: list[Snapshot] = []
    view = make_view(tmp_path, published)
    assert start(view, api) == (1, 0)
    assert published and "c1.test" in published[-1].exact
    api.add(2)
    client = FakeClient(api)
    assert view._resync(client) == (1, 1)  # a resync after reconnecting: known containers stay known
    view._save_cache()
    view._apply(client, [destroy_event(cid(1))])  # type: ignore[arg-type]
    view._save_cache()
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and "cannot write" in warnings[0], warnings
    assert view._unsaved_since is None


# --- events: throttled writes ---------------------------------------------------------------


def create_event(i: str) -> dict[str, Any]:
    return {"Type": "container", "Action": "create", "Actor": {"ID": i, "Attributes": {"name": i[-4:]}}}


def destroy_event(i: str) -> dict[str, Any]:
    return {"Type": "container", "Action": "destroy", "Actor": {"ID": i, "Attributes": {"name": i[-4:]}}}


def test_a_burst_of_creates_is_a_few_writes_not_one_per_container(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(dv, "CACHE_SAVE_DELAY", 0.1)
    writes: list[int] = []
    real_write = dv.write_private

    def counting_write(path: Path, data: bytes) -> None:
        if path.name != "containers.json":
            return  # owners.json is written on the same schedule
        writes.append(len(json.loads(data)["containers"]))
        real_write(path, data)

    monkeypatch.setattr(dv, "write_private", counting_write)
    api = FakeAPI()
    view = make_view(tmp_path)
    start(view, api)  # nothing on the engine: nothing to write
    assert writes == []

    n = 300
    inbox: queue.Queue[Any] = queue.Queue()
    ids = [api.add(k) for k in range(n)]

    def feed() -> None:  # one event at a time: most become batches of their own
        for i in ids:
            inbox.put(create_event(i))
            time.sleep(0.002)
        inbox.put(destroy_event(ids[0]))
        time.sleep(0.3)  # longer than the delay: the last changes are written before the stream ends
        inbox.put(_StreamEnd(ConnectionError("end of test")))

    t0 = time.monotonic()
    feeder = threading.Thread(target=feed)
    feeder.start()
    with pytest.raises(ConnectionError):
        view._follow(FakeClient(api), inbox)  # type: ignore[arg-type]
    feeder.join()
    elapsed = time.monotonic() - t0
    assert 1 <= len(writes) <= elapsed / 0.1 + 2, (writes, elapsed)
    assert writes[-1] == n - 1
    assert cache_ids(tmp_path) == set(ids[1:])
    assert view._unsaved_since is None


def test_events_that_change_nothing_static_do_not_write(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(dv, "CACHE_SAVE_DELAY", 0.0)
    api = FakeAPI()
    i = api.add(1)
    view = make_view(tmp_path)
    start(view, api)
    ino = (tmp_path / CACHE_FILE).stat().st_ino
    view._apply(FakeClient(api), [{"Type": "container", "Action": "start", "Actor": {"ID": i}}])  # type: ignore[arg-type]
    assert view._unsaved_since is None
    assert (tmp_path / CACHE_FILE).stat().st_ino == ino


def test_the_thread_writes_pending_changes_when_it_stops(tmp_path: Path, monkeypatch):
    """_run's last act: whatever is unsaved (within CACHE_SAVE_DELAY of a change) is written."""
    api = FakeAPI()
    view = make_view(tmp_path)
    start(view, api)
    i = api.add(1)
    view._apply(FakeClient(api), [create_event(i)])  # type: ignore[arg-type]
    assert view._unsaved_since is not None and not (tmp_path / CACHE_FILE).exists()
    view._stop.set()
    monkeypatch.setattr(view, "_load_cache", lambda: None)
    view._run()  # returns at once: stopped
    assert cache_ids(tmp_path) == {i}


class _TcpApi:
    """An APIClient stand-in whose transport is not a unix socket (tcp, TLS, ssh)."""

    base_url = "https://docker.example:2376"
    api_version = "1.41"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def get_adapter(self, url: str) -> object:
        return object()

    def inspect_container(self, cid: str) -> dict:
        self.calls.append(cid)
        if cid == "gone":
            import docker.errors

            raise docker.errors.NotFound("no such container")
        return {"Id": cid}


def test_inspector_uses_the_sdk_for_other_transports() -> None:
    from wakeproxy.docker.view import Inspector

    api = _TcpApi()
    inspect = Inspector(api)
    assert inspect("abc") == {"Id": "abc"}
    assert inspect("gone") is None
    assert api.calls == ["abc", "gone"]


class SwarmInfoAPI:
    def __init__(self, swarm: dict[str, Any]) -> None:
        self._swarm = swarm

    def info(self) -> dict[str, Any]:
        return {"Swarm": self._swarm}


@pytest.mark.parametrize(("mode", "swarm", "role", "said"), [
    ("auto", {"LocalNodeState": "active", "ControlAvailable": True}, "manager", "services are routed"),
    ("auto", {"LocalNodeState": "active", "ControlAvailable": False}, "worker", "point docker.url at a manager"),
    ("on", {"LocalNodeState": "active", "ControlAvailable": False}, "worker", "point docker.url at a manager"),
    ("on", {"LocalNodeState": "inactive"}, "none", "docker.swarm is on, but the engine is not in a swarm"),
    ("auto", {"LocalNodeState": "inactive"}, "none", None),
    ("off", {"LocalNodeState": "active", "ControlAvailable": True}, "off", None),
])
def test_the_swarm_view_runs_only_on_a_manager_and_a_worker_is_told_clearly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str, swarm: dict[str, Any], role: str,
        said: str | None) -> None:
    from wakeproxy.config import DockerConfig

    view = DockerView(Config(state_dir=tmp_path, docker=DockerConfig(swarm=mode)), DirectLoop(),  # type: ignore[arg-type]
                      lambda s: None, own_id=None)
    with caplog.at_level("INFO"):
        view._detect_swarm(SwarmInfoAPI(swarm))
        view._detect_swarm(SwarmInfoAPI(swarm))  # each reconnect asks again: said once
    assert view.swarm_role == role
    assert (view._swarm is not None) == (role == "manager")
    lines = [r.getMessage() for r in caplog.records if "Swarm" in r.getMessage() or "swarm" in r.getMessage()]
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1 and said in lines[0], lines
        if role == "worker":
            assert caplog.records[-1].levelname == "ERROR"


def test_a_swarm_listing_that_fails_does_not_stop_the_containers_from_being_served(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A manager without quorum refuses service listings (503); the container view goes on."""

    class NoQuorum(FakeAPI):
        def info(self) -> dict[str, Any]:
            return {"Swarm": {"LocalNodeState": "active", "ControlAvailable": True}}

        def services(self, filters: Any = None) -> list[Any]:
            raise docker.errors.APIError("503", explanation="rpc error: code = Unknown desc = The swarm does "
                                                            "not have a leader")

    api = NoQuorum()
    api.add(1)
    published: list[Snapshot] = []
    view = make_view(tmp_path, published)
    view._detect_swarm(api)
    with caplog.at_level("WARNING"):
        start(view, api)
    assert published and published[-1].lookup("c1.test") is not None
    assert any("Swarm listing failed" in r.getMessage() and "not have a leader" in r.getMessage()
               for r in caplog.records)
    assert view._swarm is not None and view._swarm.failing_until > 0


def test_a_swarm_made_after_the_start_is_noticed_within_a_minute(tmp_path: Path) -> None:
    import queue

    from wakeproxy.docker.view import ROLE_AGAIN, _RoleChanged

    class Engine(FakeAPI):
        role: dict[str, Any] = {"LocalNodeState": "inactive"}

        def info(self) -> dict[str, Any]:
            return {"Swarm": self.role}

    api = Engine()
    view = make_view(tmp_path)
    view._detect_swarm(api)
    start(view, api)
    assert view.swarm_role == "none"
    api.role = {"LocalNodeState": "active", "ControlAvailable": True}  # `docker swarm init` meanwhile
    view._role_at -= ROLE_AGAIN
    with pytest.raises(_RoleChanged, match="from none to manager"):
        view._follow(FakeClient(api), queue.Queue())  # type: ignore[arg-type]


def test_the_network_mode_is_read_from_the_listing_and_from_inspect():
    data = FakeAPI()
    i = data.add(1)
    data.data[i]["HostConfig"] = {"NetworkMode": "p_default"}
    assert info_from_inspect(data.data[i]).network_mode == "p_default"
    from wakeproxy.docker.view import _Static, info_from_listing

    entry = {"Id": i, "Names": ["/x"], "State": "exited", "HostConfig": {"NetworkMode": "p_default"}}
    assert info_from_listing(entry, _Static({}, ())).network_mode == "p_default"
    assert info_from_listing({"Id": i, "HostConfig": None}, _Static({}, ())).network_mode == ""
