"""The controller's side of `wakeproxy debug` without a UI process: what a name resolves to, the limits of a
request, the clock, what `wakeproxy status` may show, and the admin socket (its mode, bad and oversized
requests)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from pathlib import Path

from wakeproxy.config import Config, DebugConfig, SourcesConfig
from wakeproxy.debug import ui as ui_mod
from wakeproxy.debug.ui import DebugUI, Watching, ask, backends_of
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import build_snapshot
from wakeproxy.runtime import Runtime


def c(name: str, host: str, ip: str, project: str, port: str = "80") -> ContainerInfo:
    return ContainerInfo(id=f"id-{name}", name=name, state="running",
                         labels={"wakeproxy.host": host, "wakeproxy.port": port,
                                 "com.docker.compose.project": project},
                         networks={"bridge": ip})


def make_ui(tmp_path: Path) -> DebugUI:
    snap = build_snapshot((c("web", "a.test", "172.17.0.2", "proj"), c("api", "*.b.test", "172.17.0.3", "proj", "8080"),
                           c("other", "o.test", "172.17.0.9", "other")), SourcesConfig(), (), {}, synced=True)
    cfg = Config(state_dir=tmp_path, debug=DebugConfig(max_for=3600.0))
    return DebugUI(Runtime(config=cfg, snapshot=snap))


def test_a_name_is_a_group_or_the_site_that_serves_a_host(tmp_path: Path) -> None:
    ui = make_ui(tmp_path)
    assert ui.resolve("proj") == ("group", "proj")
    assert ui.resolve("A.test.") == ("host", "a.test")
    assert ui.resolve("x.b.test") == ("host", "*.b.test")  # the wildcard site: all of its names
    # A lone container named like another sandbox's host does not take that host's watch.
    named = c("o.test", "shadow.test", "172.17.0.10", "")
    ui.runtime.snapshot = build_snapshot((*ui.runtime.snapshot.containers.values(), named), SourcesConfig(), (), {},
                                         synced=True)
    assert ui.resolve("o.test") == ("host", "o.test")
    assert isinstance(ui.resolve("nobody.test"), str) and "wakeproxy status" in str(ui.resolve("nobody.test"))


def test_the_watched_backends_are_those_of_the_sites_and_groups_only(tmp_path: Path) -> None:
    snap = make_ui(tmp_path).runtime.snapshot
    assert backends_of(snap, frozenset({"a.test"}), frozenset()) == {("172.17.0.2", 80)}
    assert backends_of(snap, frozenset(), frozenset({"proj"})) == {("172.17.0.2", 80), ("172.17.0.3", 8080)}
    assert backends_of(snap, frozenset(), frozenset()) == set()


def test_requests_out_of_bounds_get_an_error_and_change_nothing(tmp_path: Path) -> None:
    ui = make_ui(tmp_path)

    async def go() -> None:
        assert "at most 60m00s" in (await ui.command({"op": "watch", "name": "a.test", "for": 7200}))["error"]
        assert "more than 0" in (await ui.command({"op": "watch", "name": "a.test", "for": 0}))["error"]
        assert "duration" in (await ui.command({"op": "watch", "name": "a.test", "for": "soon"}))["error"]
        assert "no site serves" in (await ui.command({"op": "watch", "name": "nope.test"}))["error"]
        assert "unknown request" in (await ui.command({"op": "rm -rf"}))["error"]
        assert "not watched" in (await ui.command({"op": "off", "name": "a.test"}))["error"]
    asyncio.run(go())
    assert ui.watches == {} and ui.state == "off"


def test_the_clock_ends_a_watch_and_status_shows_no_token(tmp_path: Path) -> None:
    ui = make_ui(tmp_path)

    async def go() -> None:
        ui.watches[("host", "a.test")] = Watching("host", "a.test", time.time() - 1, "a.test")
        ui.tick()
    asyncio.run(go())
    assert ui.watches == {} and ui.state == "off" and not ui.runtime.watch.active
    ui.state, ui.token = "ready", "a-token-of-the-ui"
    assert ui.listing()["url"] is not None and ui.token in ui.listing()["url"]
    assert "url" not in ui.status() and ui.token not in repr(ui.status())


def test_the_admin_socket_is_the_operators_and_survives_bad_requests(tmp_path: Path) -> None:
    ui = make_ui(tmp_path)

    async def go() -> None:
        await ui.running()
        path = tmp_path / "run" / ui_mod.ADMIN_SOCKET
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        loop = asyncio.get_running_loop()
        assert (await loop.run_in_executor(None, ask, tmp_path, {"op": "list"}))["watches"] == []

        def raw(data: bytes) -> bytes:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(path))
                out = b""
                try:
                    s.sendall(data)
                    while chunk := s.recv(65536):
                        out += chunk
                except (ConnectionResetError, BrokenPipeError):  # an oversized request: the proxy hung up
                    pass
                return out
        assert b"a bad request" in await loop.run_in_executor(None, raw, b"not json\n")
        assert b"a bad request" in await loop.run_in_executor(None, raw, b"[1, 2]\n")
        assert b"a bad request" in await loop.run_in_executor(None, raw, b"[" * 30000 + b"\n")
        big = await loop.run_in_executor(None, raw, b"x" * (ui_mod.MAX_REQUEST * 4) + b"\n")
        assert big == b"" or b"error" in big
        assert (await loop.run_in_executor(None, ask, tmp_path, {"op": "list"}))["state"] == "off"
        # A second proxy on the same state directory leaves the socket to the first one.
        second = make_ui(tmp_path)
        await second.running()
        assert second._server is None
        await second.done()
        await ui.done()
        assert not path.exists()
    asyncio.run(go())


def test_watching_ended_while_the_ui_starts_leaves_no_ui_behind(tmp_path: Path) -> None:
    ui = make_ui(tmp_path)

    async def go() -> None:
        task = asyncio.ensure_future(ui.command({"op": "watch", "name": "a.test"}))
        await asyncio.sleep(0)  # the start is under way …
        assert ui.state == "starting"
        off = await ui.command({"op": "off", "name": ""})  # … and nothing is watched any more
        assert off["watches"] == []
        await asyncio.wait_for(task, 60)
        for _ in range(100):
            if ui.proc is None and ui.state == "off":
                break
            await asyncio.sleep(0.1)
        assert ui.proc is None and ui.state == "off"
        await ui.done()
    asyncio.run(go())
