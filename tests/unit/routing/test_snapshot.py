"""wakeproxy.snapshot: indexing containers by host, choosing addresses, lookup and the route cache."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import FrozenInstanceError

import pytest
import wakeproxy.routing.snapshot as snapshot_mod
from hypothesis import given, settings
from hypothesis import strategies as st
from wakeproxy.config import LabelTrustConfig, SourcesConfig
from wakeproxy.routing.labels import ContainerInfo, path_matches
from wakeproxy.routing.policy import NamePolicy, Ownership
from wakeproxy.routing.snapshot import Backend, PathRoute, Policy, Site, Snapshot, build_snapshot, route_order

ALL = SourcesConfig()
P = {"com.docker.compose.project": "p"}  # containers of one Compose project: one group


def c(name, host=None, state="running", networks=None, labels=None, env=None, exposed=(), cid=None,
      created=0.0) -> ContainerInfo:
    labels = dict(labels or {})
    if host is not None:
        labels["wakeproxy.host"] = host
    if networks is None:
        networks = {"bridge": "172.17.0.2"} if state == "running" else {"bridge": ""}
    return ContainerInfo(
        id=cid or f"id-{name}", name=name, state=state, labels=labels, env=env or {},
        exposed_ports=tuple(exposed), networks=networks, created=created,
    )


def build(*containers, allowed=(), drivers=None, **kw) -> Snapshot:
    return build_snapshot(containers, ALL, tuple(allowed), drivers or {}, **kw)


def only_backend(snap: Snapshot, host: str) -> Backend:
    site = snap.lookup(host)
    assert site is not None, host
    assert len(site.backends) == 1
    return site.backends[0]


# --- indexing and lookup ------------------------------------------------------------------


def test_backend_fields():
    snap = build(c("web", "a.test", labels={"wakeproxy.port": "8080", "wakeproxy.scheme": "https",
                                             "com.docker.compose.project": "proj"}))
    assert snap.synced is True
    b = only_backend(snap, "a.test")
    assert b == Backend("id-web", "web", "proj", "running", "https", 8080, "172.17.0.2", None, network="bridge")
    assert b.ready
    assert snap.lookup("a.test").host == "a.test"
    assert snap.lookup("a.test").ready_backends == (b,)
    assert snap.containers == {"id-web": snap.containers["id-web"]}
    assert snap.skipped == {}


def test_synced_flag_passes_through():
    assert build(c("web", "a.test"), synced=False).synced is False
    assert Snapshot().synced is False
    assert Snapshot().lookup("a.test") is None


@pytest.mark.parametrize("asked", ["a.test", "A.TEST", "a.test:8080", "A.Test.:443", "a.test."])
def test_exact_lookup_ignores_case_port_and_trailing_dot(asked):
    snap = build(c("web", "a.test"), c("other", "b.test"))
    assert snap.lookup(asked).host == "a.test"


def test_unknown_host():
    snap = build(c("web", "a.test"))
    assert snap.lookup("b.test") is None
    assert snap.lookup("test") is None
    assert snap.lookup("") is None
    assert snap.lookup("x.a.test") is None  # an exact name is not a wildcard


@pytest.mark.parametrize("asked", ["a.example.com", "A.Example.COM:80", "a.b.example.com", "x.y.z.example.com"])
def test_wildcard_matches_at_any_depth(asked):
    snap = build(c("wild", "*.example.com"))
    assert snap.lookup(asked).host == "*.example.com"


@pytest.mark.parametrize("asked", ["example.com", "badexample.com", "example.com.evil", "com", "xexample.com"])
def test_wildcard_does_not_match(asked):
    snap = build(c("wild", "*.example.com"))
    assert snap.lookup(asked) is None


def test_exact_beats_wildcard():
    snap = build(c("wild", "*.example.com", labels=P), c("www", "www.example.com", labels=P))
    assert only_backend(snap, "www.example.com").container_name == "www"
    assert only_backend(snap, "api.example.com").container_name == "wild"
    assert only_backend(snap, "a.www.example.com").container_name == "wild"


def test_longest_wildcard_suffix_wins():
    snap = build(c("wide", "*.example.com", labels=P), c("narrow", "*.b.example.com", labels=P),
                 c("tld", "*.co.example", labels=P))
    assert only_backend(snap, "a.b.example.com").container_name == "narrow"
    assert only_backend(snap, "x.a.b.example.com").container_name == "narrow"
    assert only_backend(snap, "b.example.com").container_name == "wide"
    assert only_backend(snap, "a.example.com").container_name == "wide"
    assert only_backend(snap, "x.co.example").container_name == "tld"


def test_hosts_listing():
    snap = build(c("a", "b.test, a.test"), c("w", "*.z.test, *.y.test"))
    assert snap.hosts == ["a.test", "b.test", "*.y.test", "*.z.test"]
    assert set(snap.exact) == {"a.test", "b.test"}
    assert set(snap.wildcards) == {"y.test", "z.test"}


def test_two_running_containers_on_one_host():
    snap = build(c("web2", "a.test", networks={"bridge": "172.17.0.3"}, labels=P), c("web1", "a.test", labels=P))
    site = snap.lookup("a.test")
    assert [b.container_name for b in site.backends] == ["web1", "web2"]  # sorted by name
    assert [b.address for b in site.ready_backends] == ["172.17.0.2", "172.17.0.3"]


def test_a_site_belongs_to_one_group():
    snap = build(
        c("a1", "a.test", labels={"com.docker.compose.project": "p"}, created=1),
        c("a2", "a.test", labels={"com.docker.compose.project": "p"}, created=3),
        c("b", "a.test", labels={"wakeproxy.group": "g"}, created=2),
    )
    assert snap.lookup("a.test").groups == ("p",)
    assert [b.container_name for b in snap.lookup("a.test").backends] == ["a1", "a2"]
    assert [(r.name, r.group, r.owner) for r in snap.refused] == [("a.test", "g", "p")]


def test_one_container_many_hosts_and_sources():
    snap = build(c("multi", "a.test", labels={"io.docksal.virtual-host": "b.test"}, env={"VIRTUAL_HOST": "c.test"}))
    for h in ("a.test", "b.test", "c.test"):
        assert only_backend(snap, h).container_name == "multi"
    assert len(snap.containers) == 1


def test_containers_without_routes_are_known_but_not_indexed():
    snap = build(c("db", None), c("web", "a.test"))
    assert set(snap.containers) == {"id-db", "id-web"}
    assert snap.hosts == ["a.test"]


# --- readiness and addresses -------------------------------------------------------------------


@pytest.mark.parametrize("state", ["exited", "created", "paused", "dead", "restarting"])
def test_not_running_container_is_not_ready_and_has_no_problem(state):
    nets = {"bridge": ""} if state != "paused" else {"bridge": "172.17.0.2"}
    b = only_backend(build(c("web", "a.test", state=state, networks=nets)), "a.test")
    assert b.state == state
    assert b.address is None
    assert b.problem is None
    assert not b.ready
    assert build(c("web", "a.test", state=state, networks=nets)).lookup("a.test").ready_backends == ()


def test_running_on_a_network_not_allowed():
    snap = build(c("web", "a.test", networks={"other": "172.20.0.2", "more": "172.21.0.2"}), allowed=("proxy", "edge"),
                 drivers={"other": "bridge", "more": "bridge", "proxy": "bridge", "edge": "bridge"})
    b = only_backend(snap, "a.test")
    assert b.address is None and not b.ready
    assert b.problem is not None
    assert "'web'" in b.problem
    assert "more, other" in b.problem  # where it is
    assert "proxy, edge" in b.problem  # where the proxy may go


def test_allowed_networks_are_tried_in_order():
    drivers = {"a": "bridge", "b": "bridge"}
    info = c("web", "a.test", networks={"a": "10.0.0.1", "b": "10.0.0.2"})
    assert only_backend(build(info, allowed=("b", "a"), drivers=drivers), "a.test").address == "10.0.0.2"
    assert only_backend(build(info, allowed=("a", "b"), drivers=drivers), "a.test").address == "10.0.0.1"
    assert only_backend(build(info, allowed=("x", "a"), drivers=drivers), "a.test").address == "10.0.0.1"


def test_without_allowed_networks_any_bridge_network():
    info = c("web", "a.test", networks={"zz": "10.0.0.9", "aa": "10.0.0.1"})
    assert only_backend(build(info, drivers={"zz": "bridge", "aa": "bridge"}), "a.test").address == "10.0.0.1"
    # the default bridge needs no driver entry
    assert only_backend(build(c("web", "a.test", networks={"bridge": "172.17.0.9"})), "a.test").address == "172.17.0.9"


def test_running_without_any_ip():
    b = only_backend(build(c("web", "a.test", networks={})), "a.test")
    assert b.address is None
    assert "no network" in b.problem


def test_network_label_selects_the_network():
    drivers = {"front": "bridge", "back": "bridge"}
    info = c("web", "a.test", labels={"wakeproxy.network": "back"}, networks={"front": "10.1.0.2", "back": "10.2.0.2"})
    assert only_backend(build(info, drivers=drivers), "a.test").address == "10.2.0.2"
    assert only_backend(build(info, allowed=("front", "back"), drivers=drivers), "a.test").address == "10.2.0.2"


def test_traefik_docker_network_label_selects_the_network():
    drivers = {"front": "bridge", "back": "bridge"}
    info = c("web", None, networks={"front": "10.1.0.2", "back": "10.2.0.2"},
             labels={"traefik.http.routers.r.rule": "Host(`a.test`)", "traefik.docker.network": "back"})
    assert only_backend(build(info, drivers=drivers), "a.test").address == "10.2.0.2"


def test_network_label_naming_a_network_the_container_is_not_on():
    info = c("web", "a.test", labels={"wakeproxy.network": "missing"}, networks={"front": "10.1.0.2"})
    b = only_backend(build(info, drivers={"front": "bridge"}), "a.test")
    assert b.address is None
    assert "'missing'" in b.problem and "front" in b.problem


def test_network_label_outside_allowed_networks_needs_the_operator(caplog):
    # A network outside docker.networks weakens the server's posture: honoured only with labels.network.
    info = c("web", "a.test", labels={"wakeproxy.network": "private"}, networks={"private": "10.9.0.2", "proxy": "10.1.0.2"})
    drivers = {"private": "bridge", "proxy": "bridge"}
    b = only_backend(build(info, allowed=("proxy",), drivers=drivers), "a.test")
    assert b.address == "10.1.0.2"
    assert "network label 'private' is ignored" in caplog.text
    trusting = Policy(trust=LabelTrustConfig(network=True))
    b = only_backend(build(info, allowed=("proxy",), drivers=drivers, policy=trusting), "a.test")
    assert b.address == "10.9.0.2"
    # Naming an allowed network is always fine.
    info = c("web", "a.test", labels={"wakeproxy.network": "proxy"}, networks={"private": "10.9.0.2", "proxy": "10.1.0.2"})
    assert only_backend(build(info, allowed=("private", "proxy"), drivers=drivers), "a.test").address == "10.1.0.2"


def test_overlay_network_is_never_chosen():
    info = c("svc", "a.test", networks={"ov": "10.0.9.5"})
    for allowed in ((), ("ov",)):
        b = only_backend(build(info, allowed=allowed, drivers={"ov": "overlay"}), "a.test")
        assert b.address is None, allowed
        assert not b.ready
        assert b.problem and "'svc'" in b.problem


def test_overlay_network_named_by_label_says_why():
    info = c("svc", "a.test", labels={"wakeproxy.network": "ov"}, networks={"ov": "10.0.9.5"})
    b = only_backend(build(info, drivers={"ov": "overlay"}), "a.test")
    assert b.address is None
    assert "overlay" in b.problem


def test_overlay_is_skipped_for_a_bridge_in_the_same_container():
    info = c("svc", "a.test", networks={"ov": "10.0.9.5", "zbr": "172.30.0.5"})
    assert only_backend(build(info, drivers={"ov": "overlay", "zbr": "bridge"}), "a.test").address == "172.30.0.5"


@pytest.mark.parametrize("driver", ["macvlan", "ipvlan", "null", ""])
def test_other_drivers_are_not_routable(driver):
    b = only_backend(build(c("web", "a.test", networks={"n": "10.0.0.5"}), drivers={"n": driver}), "a.test")
    assert b.address is None and b.problem


def test_host_network_mode_is_localhost():
    info = c("web", "a.test", networks={"host": ""}, labels={"wakeproxy.port": "8080"})
    b = only_backend(build(info, drivers={"host": "host"}), "a.test")
    assert (b.address, b.port, b.ready, b.problem) == ("127.0.0.1", 8080, True, None)
    # even without knowing the drivers
    assert only_backend(build(info), "a.test").address == "127.0.0.1"


def test_stopped_host_network_container_is_not_ready():
    b = only_backend(build(c("web", "a.test", state="exited", networks={"host": ""})), "a.test")
    assert b.address is None and not b.ready and b.problem is None


# --- malformed containers ---------------------------------------------------------------------


def test_malformed_container_is_skipped_others_indexed(caplog):
    with caplog.at_level(logging.WARNING, logger="wakeproxy.routing.snapshot"):
        snap = build(c("good1", "a.test"), c("bad", "ok.test", labels={"wakeproxy.port": "nope"}), c("good2", "b.test"))
    assert snap.hosts == ["a.test", "b.test"]
    assert snap.lookup("ok.test") is None  # nothing half-routed
    assert set(snap.skipped) == {"bad"}
    assert "wakeproxy.port" in snap.skipped["bad"]
    assert "id-bad" in snap.containers
    assert any("bad" in r.getMessage() and "wakeproxy.port" in r.getMessage() for r in caplog.records)


# --- route cache ------------------------------------------------------------------------------


@pytest.fixture
def counting(monkeypatch):
    calls: list[str] = []
    real = snapshot_mod.routes_for

    def wrapper(info, sources):
        calls.append(info.name)
        return real(info, sources)

    monkeypatch.setattr(snapshot_mod, "routes_for", wrapper)
    return calls


def test_route_cache_avoids_reparsing(counting):
    cache: dict = {}
    a, b = c("a", "a.test"), c("b", "b.test")
    first = build(a, b, route_cache=cache)
    assert sorted(counting) == ["a", "b"]
    assert set(cache) == {"id-a", "id-b"}
    counting.clear()
    # same labels, different runtime state: still no re-parse, but the new state is used
    a_stopped = c("a", "a.test", state="exited")
    second = build(a_stopped, b, route_cache=cache)
    assert counting == []
    assert first.lookup("a.test").backends[0].ready
    assert not second.lookup("a.test").backends[0].ready
    assert second.lookup("b.test").backends[0].ready


def test_route_cache_reparses_changed_labels_env_or_ports(counting):
    cache: dict = {}
    build(c("a", "a.test"), route_cache=cache)
    counting.clear()
    snap = build(c("a", "a2.test"), route_cache=cache)
    assert counting == ["a"]
    assert snap.hosts == ["a2.test"]
    snap = build(c("a", "a2.test", env={"VIRTUAL_HOST": "e.test"}), route_cache=cache)
    assert counting == ["a", "a"]
    assert snap.hosts == ["a2.test", "e.test"]
    snap = build(c("a", "a2.test", env={"VIRTUAL_HOST": "e.test"}, exposed=(3000,)), route_cache=cache)
    assert counting == ["a", "a", "a"]
    assert only_backend(snap, "a2.test").port == 3000


def test_without_cache_every_build_parses(counting):
    a = c("a", "a.test")
    build(a)
    build(a)
    assert counting == ["a", "a"]


def test_label_error_is_logged_once_with_cache(caplog, counting):
    cache: dict = {}
    bad = c("bad", "a..test")
    with caplog.at_level(logging.WARNING, logger="wakeproxy.routing.snapshot"):
        s1 = build(bad, c("ok", "ok.test"), route_cache=cache)
        s2 = build(bad, c("ok", "ok.test"), route_cache=cache)
    warnings = [r for r in caplog.records if "bad" in r.getMessage()]
    assert len(warnings) == 1
    assert counting.count("bad") == 1
    assert s1.skipped == s2.skipped and "bad" in s2.skipped
    assert s2.hosts == ["ok.test"]


def test_fixed_labels_unskip_the_container(caplog):
    cache: dict = {}
    s1 = build(c("x", "a..test"), route_cache=cache)
    s2 = build(c("x", "a.test"), route_cache=cache)
    assert "x" in s1.skipped and s2.skipped == {}
    assert s2.hosts == ["a.test"]


def test_removed_container_is_dropped_from_cache(counting):
    cache: dict = {}
    build(c("a", "a.test"), c("b", "b.test"), route_cache=cache)
    snap = build(c("b", "b.test"), route_cache=cache)
    assert set(cache) == {"id-b"}
    assert snap.hosts == ["b.test"]
    assert set(snap.containers) == {"id-b"}
    counting.clear()
    build(c("a", "a.test"), c("b", "b.test"), route_cache=cache)
    assert counting == ["a"]  # a comes back: parsed again


def test_cache_is_keyed_by_container_id(counting):
    cache: dict = {}
    build(c("a", "a.test", cid="1", labels=P), route_cache=cache)
    counting.clear()
    snap = build(c("a", "a.test", cid="1", labels=P), c("a-copy", "a.test", cid="2", labels=P), route_cache=cache)
    assert counting == ["a-copy"]
    assert [b.container_id for b in snap.lookup("a.test").backends] == ["1", "2"]


# --- scale ----------------------------------------------------------------------------------------


def test_lookup_is_correct_with_1000_sites():
    containers = [c(f"site{i:04d}", f"site{i}.test, *.w{i}.test", networks={"bridge": f"10.{i // 250}.{i % 250}.2"})
                  for i in range(1000)]
    snap = build(*containers)
    assert len(snap.exact) == 1000 and len(snap.wildcards) == 1000
    for i in range(1000):
        expected = f"10.{i // 250}.{i % 250}.2"
        assert only_backend(snap, f"SITE{i}.test").address == expected
        assert only_backend(snap, f"x.y.w{i}.test").address == expected
        assert snap.lookup(f"w{i}.test") is None
    assert snap.lookup("site1000.test") is None


def test_site_properties():
    b1 = Backend("1", "one", "g1", "running", "http", 80, "10.0.0.1")
    b2 = Backend("2", "two", "g2", "exited", "http", 80, None)
    b3 = Backend("3", "three", "g1", "running", "http", 80, None, "unreachable")
    site = Site.of("a.test", (b1, b2, b3))
    assert site.ready_backends == (b1,)
    assert site.groups == ("g1", "g2")
    assert not b3.ready and not b2.ready and b1.ready


# --- groups, settings and endpoints (for the waker) -----------------------------------------------


def test_groups_hold_every_member_but_only_routed_groups_exist():
    snap = build(
        c("p-web", "a.test", labels={"com.docker.compose.project": "p"}, cid="w"),
        c("p-db", None, labels={"com.docker.compose.project": "p"}, cid="d", state="exited"),
        c("p-api", "api.test", labels={"com.docker.compose.project": "p"}, cid="a"),
        c("lonely-db", None, cid="x"),  # routes nothing: no request may ever start it
        c("solo", "solo.test", cid="s"),
    )
    assert set(snap.groups) == {"p", "solo"}
    g = snap.groups["p"]
    assert g.name == "p"
    assert g.members == ("a", "d", "w")  # ids ordered by container name: p-api, p-db, p-web
    assert g.routed == frozenset({"w", "a"})
    assert snap.groups["solo"].members == ("s",)
    assert snap.lookup("a.test").groups == ("p",)


def test_group_label_splits_a_compose_project():
    snap = build(c("one", "a.test", labels={"com.docker.compose.project": "p", "wakeproxy.group": "g"}),
                 c("two", None, labels={"com.docker.compose.project": "p"}))
    assert set(snap.groups) == {"p/g"}
    assert snap.groups["p/g"].members == ("id-one",)


def test_group_wake_settings_from_members():
    snap = build(
        c("a", "a.test", labels={"wakeproxy.group": "g", "wakeproxy.wake-timeout": "30s"}),
        c("b", None, labels={"wakeproxy.group": "g", "wakeproxy.wake-timeout": "2m", "wakeproxy.wake-strategy": "hold"}),
        c("c", None, labels={"wakeproxy.group": "g", "wakeproxy.wake-strategy": "page"}),
        c("solo", "solo.test"),
    )
    g = snap.groups["g"]
    assert g.wake_strategy == "hold"  # the first member (by name) that sets one
    assert g.wake_timeout == 120.0  # the longest
    assert (snap.groups["solo"].wake_strategy, snap.groups["solo"].wake_timeout) == (None, None)


def test_settings_and_ready_path_reach_the_backends():
    snap = build(c("web", "a.test", labels={"wakeproxy.ready-path": "/up", "com.docker.compose.service": "web"}))
    assert snap.settings["id-web"].ready_path == "/up"
    assert snap.settings["id-web"].service == "web"
    assert only_backend(snap, "a.test").ready_path == "/up"


def test_endpoints_by_container():
    snap = build(
        c("web", "a.test, b.test", labels={"wakeproxy.port": "8080", "io.docksal.virtual-host": "d.test"}),
        c("other", "o.test"),
        c("db", None),
    )
    web = snap.endpoints["id-web"]
    assert sorted(b.port for b in web) == [80, 8080]  # a.test and b.test share one endpoint
    assert all(b.container_id == "id-web" for b in web)
    assert len(snap.endpoints["id-other"]) == 1
    assert "id-db" not in snap.endpoints


def test_bad_wake_label_skips_the_container():
    snap = build(c("web", "a.test", labels={"wakeproxy.wake-timeout": "soon"}), c("ok", "ok.test"))
    assert "wakeproxy.wake-timeout" in snap.skipped["web"]
    assert snap.lookup("a.test") is None
    assert "id-web" not in snap.settings
    assert set(snap.groups) == {"ok"}


def test_route_cache_keeps_settings(counting):
    cache: dict = {}
    build(c("web", "a.test", labels={"wakeproxy.ready-path": "/up"}), route_cache=cache)
    snap = build(c("web", "a.test", labels={"wakeproxy.ready-path": "/up"}, state="exited"), route_cache=cache)
    assert counting == ["web"]
    assert snap.settings["id-web"].ready_path == "/up"
    assert set(snap.groups) == {"web"}


# --- stopped containers keep their networks; idle settings; start/stop order ------------------------


def test_stopped_container_on_an_allowed_network_is_wakeable():
    info = c("web", "a.test", state="exited", networks={"proxy": ""})
    snap = build(info, allowed=("proxy",), drivers={"proxy": "bridge"})
    b = only_backend(snap, "a.test")
    assert (b.address, b.problem, b.ready) == (None, None, False)
    assert snap.groups["web"].routed == frozenset({"id-web"})


def test_stopped_container_on_a_foreign_network_is_never_ours():
    info = c("web", "a.test", state="exited", networks={"other": ""})
    snap = build(info, c("ok", "ok.test"), allowed=("proxy",), drivers={"proxy": "bridge", "other": "bridge"})
    b = only_backend(snap, "a.test")
    assert b.address is None and "'web'" in b.problem and "other" in b.problem
    assert "web" not in snap.groups  # so neither woken nor put to sleep


def test_stopped_container_on_an_overlay_network_is_never_ours():
    snap = build(c("svc", "a.test", state="exited", networks={"ov": ""}), drivers={"ov": "overlay"})
    assert only_backend(snap, "a.test").problem
    assert snap.groups == {}


def test_group_idle_settings():
    snap = build(
        c("a", "a.test", labels={"wakeproxy.group": "g", "wakeproxy.idle-timeout": "10m"}),
        c("b", None, labels={"wakeproxy.group": "g", "wakeproxy.idle-timeout": "1h", "wakeproxy.idle-action": "pause"}),
        c("p1", "p.test", labels={"wakeproxy.group": "perm", "wakeproxy.idle-timeout": "1h"}),
        c("p2", None, labels={"wakeproxy.group": "perm", "io.docksal.permanent": "true"}),
        c("solo", "solo.test"),
    )
    assert (snap.groups["g"].idle_timeout, snap.groups["g"].idle_action) == (3600.0, "pause")  # the longest
    assert snap.groups["perm"].idle_timeout == 0.0  # any member saying never wins
    assert (snap.groups["solo"].idle_timeout, snap.groups["solo"].idle_action) == (None, None)


def compose(name, service, depends_on="", host=None):
    labels = {"com.docker.compose.project": "p", "com.docker.compose.service": service}
    if depends_on:
        labels["com.docker.compose.depends_on"] = depends_on
    return c(name, host, labels=labels, cid=service)


def test_start_and_stop_order_follow_depends_on():
    snap = build(
        compose("p-web", "web", "api:service_started,cache", host="a.test"),
        compose("p-api", "api", "db:service_healthy,migrate:service_completed_successfully"),
        compose("p-migrate", "migrate", "db:service_healthy"),
        compose("p-db", "db"),
        compose("p-cache", "cache"),
        compose("p-other", "other", "gone:service_started"),  # a dependency outside the project is ignored
    )
    g = snap.groups["p"]
    layers = [sorted(layer) for layer in g.start_order(snap)]
    assert layers == [["cache", "db", "other"], ["migrate"], ["api"], ["web"]]
    assert [sorted(layer) for layer in g.stop_order(snap)] == list(reversed(layers))


def test_start_order_survives_a_cycle():
    snap = build(compose("p-a", "a", "b", host="a.test"), compose("p-b", "b", "a"), compose("p-c", "c"))
    layers = [sorted(layer) for layer in snap.groups["p"].start_order(snap)]
    # a and b depend on each other: one unit, ready at once, like c (which depends on nothing).
    assert layers == [["a", "b", "c"]]
    assert snap.groups["p"].cycles(snap) == [["a", "b"]]


def test_start_order_puts_dependents_of_a_cycle_after_it():
    snap = build(compose("p-web", "web", "a", host="a.test"), compose("p-a", "a", "b"), compose("p-b", "b", "a"),
                 compose("p-db", "db"), compose("p-mig", "mig", "db"))
    layers = [sorted(snap.containers[c].name for c in layer) for layer in snap.groups["p"].start_order(snap)]
    assert layers == [["p-a", "p-b", "p-db"], ["p-mig", "p-web"]]


# --- paths: a host's traffic split between containers of its owner --------------------------------


def T(rule: str, project: str = "p", port: str | None = None) -> dict:
    """Traefik labels of one router, in Compose project `project`."""
    labels = {"traefik.http.routers.r.rule": rule, "com.docker.compose.project": project}
    if port:
        labels["traefik.http.services.s.loadbalancer.server.port"] = port
    return labels


def served_by(snap: Snapshot, host: str, path: str) -> list[str] | None:
    site = snap.lookup(host)
    assert site is not None, host
    route = site.route_for(path)
    return None if route is None else [b.container_name for b in route.backends]


def test_longest_prefix_wins_and_segments_count():
    snap = build(
        c("web", labels=T("Host(`a.test`)"), networks={"bridge": "10.0.0.1"}),
        c("api", labels=T("Host(`a.test`) && PathPrefix(`/api`)"), networks={"bridge": "10.0.0.2"}),
        c("v2", labels=T("Host(`a.test`) && PathPrefix(`/api/v2`)"), networks={"bridge": "10.0.0.3"}),
    )
    site = snap.lookup("a.test")
    assert [(r.path, r.exact) for r in site.routes] == [("/api/v2", False), ("/api", False), ("/", False)]
    expect = {"/": "web", "/apix": "web", "/api": "api", "/api/": "api", "/api?q=1": "api", "/api/v1": "api",
              "/api/v2": "v2", "/api/v2/x?y": "v2", "/api/v20": "api", "*": "web"}
    for path, name in expect.items():
        assert served_by(snap, "a.test", path) == [name], path
    assert [b.container_name for b in site.backends] == ["v2", "api", "web"]  # every route's, once
    assert site.groups == ("p",)


def test_exact_path_beats_a_prefix_of_the_same_length_only_for_that_path():
    snap = build(
        c("prefix", labels=T("Host(`a.test`) && PathPrefix(`/x`)")),
        c("exact", labels=T("Host(`a.test`) && Path(`/x`)")),
    )
    assert [(r.path, r.exact) for r in snap.lookup("a.test").routes] == [("/x", True), ("/x", False)]
    assert served_by(snap, "a.test", "/x") == ["exact"]
    assert served_by(snap, "a.test", "/x?q") == ["exact"]
    assert served_by(snap, "a.test", "/x/") == ["prefix"]
    assert served_by(snap, "a.test", "/y") is None  # no route for "/": a 404 of the router


def test_trailing_slash_prefix_takes_only_what_is_below():
    snap = build(c("web", "a.test", labels=P), c("dir", labels={**T("Host(`a.test`) && PathPrefix(`/d/`)")}))
    assert served_by(snap, "a.test", "/d") == ["web"]
    assert served_by(snap, "a.test", "/d/") == ["dir"]
    assert served_by(snap, "a.test", "/d/x") == ["dir"]


def test_two_containers_of_one_group_on_one_host_and_path_are_replicas():
    snap = build(
        c("api2", labels=T("Host(`a.test`) && PathPrefix(`/api`)"), networks={"bridge": "10.0.0.3"}),
        c("api1", env={"VIRTUAL_HOST": "a.test", "VIRTUAL_PATH": "/api"}, labels=P, networks={"bridge": "10.0.0.2"}),
        c("web", "a.test, b.test", labels=P),
    )
    assert served_by(snap, "a.test", "/api/x") == ["api1", "api2"]
    assert served_by(snap, "a.test", "/") == ["web"]
    assert served_by(snap, "b.test", "/api") == ["web"]  # paths are per host


def test_one_container_on_several_paths_is_one_backend():
    snap = build(c("api", "a.test", labels={**P, "wakeproxy.path": "/api, /v2"}), c("web", "a.test", labels=P))
    site = snap.lookup("a.test")
    assert [r.path for r in site.routes] == ["/api", "/v2", "/"]
    assert [b.container_name for b in site.backends] == ["api", "web"]
    assert [b.container_name for b in snap.endpoints["id-api"]] == ["api"]


def test_every_path_of_a_host_belongs_to_the_hosts_owner():
    own = Ownership()
    first = build(c("owner-web", labels=T("Host(`a.test`)", project="owner"), created=1), ownership=own)
    assert served_by(first, "a.test", "/admin") == ["owner-web"]
    snap = build(
        c("owner-web", labels=T("Host(`a.test`)", project="owner"), created=1),
        c("owner-api", labels=T("Host(`a.test`) && PathPrefix(`/api`)", project="owner"), created=2),
        c("other-admin", labels=T("Host(`a.test`) && PathPrefix(`/admin`)", project="other"), created=0.5),
        c("other-api", env={"VIRTUAL_HOST": "a.test", "VIRTUAL_PATH": "/api"}, created=0.5,
          labels={"com.docker.compose.project": "other"}),
        ownership=own,
    )
    assert served_by(snap, "a.test", "/admin") == ["owner-web"]
    assert served_by(snap, "a.test", "/api") == ["owner-api"]
    assert snap.lookup("a.test").groups == ("owner",)
    assert {(r.name, r.group, r.owner) for r in snap.refused} == {("a.test", "other", "owner")}


def test_without_records_the_oldest_claim_on_the_host_takes_every_path():
    snap = build(
        c("a-api", labels=T("Host(`x.test`) && PathPrefix(`/api`)", project="a"), created=1),
        c("b-web", labels=T("Host(`x.test`)", project="b"), created=2),
    )
    assert served_by(snap, "x.test", "/api") == ["a-api"]
    assert served_by(snap, "x.test", "/") is None  # b's route is refused: the host is a's
    assert [(r.name, r.group) for r in snap.refused] == [("x.test", "b")]


# --- misconfigured hosts ---------------------------------------------------------------------------


def test_a_skipped_containers_readable_hosts_are_misconfigured_not_unknown():
    snap = build(
        c("bad", "a.test, *.w.test", labels={"wakeproxy.port": "nope", **P}),
        c("broken-rule", labels=T("Host(`b.test`", project="q")),
        c("unsupported", labels=T("Host(`c.test`) && Method(`GET`)", project="r")),
        c("good", "ok.test"),
    )
    assert snap.hosts == ["ok.test"]
    assert snap.lookup("a.test") is None
    assert set(snap.misconfigured) == {"a.test", "*.w.test", "b.test", "c.test"}
    assert snap.misconfiguration("A.test:80").startswith("container 'bad': label wakeproxy.port: ")
    assert snap.misconfiguration("x.y.w.test") == snap.misconfigured["*.w.test"]
    assert "unbalanced '('" in snap.misconfiguration("b.test")
    assert "Method(…) at character 19 is not supported" in snap.misconfiguration("c.test")
    assert snap.misconfiguration("ok.test") is None and snap.misconfiguration("nope.test") is None


def test_a_host_served_by_the_owner_is_not_misconfigured_by_its_broken_container():
    # As in Traefik, a router with a bad rule is left out and the others serve the host.
    snap = build(c("web", "a.test", labels=P), c("api", labels=T("Host(`a.test`) && Header(`X`, `1`)")))
    assert served_by(snap, "a.test", "/api") == ["web"]
    assert snap.misconfigured == {}
    assert "api" in snap.skipped


def test_a_broken_container_of_another_group_cannot_mark_an_owned_host():
    own = Ownership()
    build(c("victim", "a.test", labels={"com.docker.compose.project": "victim"}), ownership=own)
    snap = build(c("victim", "a.test", labels={"com.docker.compose.project": "victim"}),
                 c("evil", "a.test, b.test", labels={"com.docker.compose.project": "evil", "wakeproxy.port": "x"}),
                 ownership=own)
    assert only_backend(snap, "a.test").container_name == "victim"
    assert set(snap.misconfigured) == {"b.test"}
    assert [(r.name, r.group) for r in snap.refused] == [("a.test", "evil")]


def test_the_broken_containers_claim_keeps_the_name_for_its_group():
    # A typo in a label does not hand the name to the next group that asks.
    own = Ownership()
    build(c("mine", "a.test", labels={"com.docker.compose.project": "mine"}), ownership=own, now=0)
    snap = build(c("mine", "a.test", labels={"com.docker.compose.project": "mine", "wakeproxy.port": "x"}),
                 c("other", "a.test", labels={"com.docker.compose.project": "other"}), ownership=own, now=1000)
    assert snap.lookup("a.test") is None and "a.test" in snap.misconfigured
    assert [(r.name, r.group, r.owner) for r in snap.refused] == [("a.test", "other", "mine")]


def test_a_container_with_bad_group_labels_declares_no_hosts():
    snap = build(c("bad", "a.test", labels={"wakeproxy.group": "a b"}))
    assert "bad" in snap.skipped and snap.misconfigured == {}


def test_misconfigured_hosts_follow_the_policy():
    names = NamePolicy(allow=("*.ok.test",))
    snap = build(c("bad", "a.ok.test, a.elsewhere.test", labels={"wakeproxy.port": "x"}), policy=Policy(names=names))
    assert set(snap.misconfigured) == {"a.ok.test"}


def test_skipped_reason_names_every_bad_label_of_routes_and_settings():
    snap = build(c("bad", "a.test", labels={"wakeproxy.port": "x", "wakeproxy.idle-action": "kill",
                                            "traefik.http.routers.r.rule": "PathPrefix(`/`)"}))
    why = snap.skipped["bad"]
    for part in ("label wakeproxy.port", "label traefik.http.routers.r.rule", "label wakeproxy.idle-action"):
        assert part in why, why


def test_route_cache_keeps_the_hosts_of_a_skipped_container(counting):
    cache: dict = {}
    bad = c("bad", "a.test", labels={"wakeproxy.port": "x"})
    s1 = build(bad, route_cache=cache)
    s2 = build(bad, route_cache=cache)
    assert counting == ["bad"]
    assert s1.misconfigured == s2.misconfigured and "a.test" in s2.misconfigured


def test_snapshot_and_site_stay_plain_values():
    snap = build(c("web", "a.test"), c("bad", "b.test", labels={"wakeproxy.port": "x"}))
    with pytest.raises(FrozenInstanceError):
        snap.misconfigured = {}  # type: ignore[misc]
    site = snap.lookup("a.test")
    assert site == Site(site.host, site.routes) and hash(site.routes)


# --- the path choice, against a brute-force reading of the rules ------------------------------------

_segment = st.sampled_from(["a", "ab", "b", ""])
_path = st.lists(_segment, min_size=0, max_size=3).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_path, st.booleans()), min_size=1, max_size=6, unique=True), _path,
       st.sampled_from(["", "?q", "?a/b"]))
def test_route_for_is_the_longest_match_exact_first(declared, path, query):
    routes = tuple(sorted((PathRoute(p, exact, ()) for p, exact in declared), key=route_order))
    chosen = Site("a.test", routes).route_for(path + query)
    matching = [(p, exact) for p, exact in declared if path_matches(p, exact, path)]
    if not matching:
        assert chosen is None
        return
    best = max(matching, key=lambda m: (len(m[0]), m[1]))
    assert chosen is not None and (chosen.path, chosen.exact) == best


# --- the proxy in a container: the networks it is on (reach) come first -------------------------------


def test_reach_prefers_a_network_the_proxys_container_is_on():
    two = {"a_net": "10.1.0.2", "b_net": "10.2.0.2"}
    drivers = {"a_net": "bridge", "b_net": "bridge"}
    assert only_backend(build(c("web", "a.test", networks=two), drivers=drivers), "a.test").network == "a_net"
    b = only_backend(build(c("web", "a.test", networks=two), drivers=drivers, reach=frozenset({"b_net"})), "a.test")
    assert (b.address, b.network, b.problem) == ("10.2.0.2", "b_net", None)
    # Not on it yet: the address is still chosen (the proxy joins the network by itself).
    b = only_backend(build(c("web", "a.test", networks=two), drivers=drivers, reach=frozenset({"bridge"})), "a.test")
    assert (b.address, b.network, b.problem) == ("10.1.0.2", "a_net", None)


def test_a_network_that_cannot_be_joined_makes_the_site_say_why_and_stays_wanted():
    drivers = {"a_net": "bridge"}
    snap = build(c("web", "a.test", networks={"a_net": "10.1.0.2"}), drivers=drivers, reach=frozenset({"bridge"}),
                 unreachable={"a_net": "the proxy could not join network 'a_net': boom"})
    b = only_backend(snap, "a.test")
    assert b.address is None and b.network == "a_net"
    assert "could not join network 'a_net': boom" in b.problem
    assert snap.groups == {}  # never started or stopped while it cannot be reached


def test_a_host_network_container_is_not_loopback_of_the_proxys_container():
    host = c("web", "a.test", networks={"host": ""}, state="running")
    assert only_backend(build(host, drivers={"host": "host"}), "a.test").address == "127.0.0.1"
    b = only_backend(build(host, drivers={"host": "host"}, reach=frozenset({"bridge"})), "a.test")
    assert b.address is None and "host's network" in b.problem


def test_the_debug_label_names_its_own_hosts_only_where_the_operator_trusts_it():
    containers = (c("shown", "a.test, b.test", labels={"wakeproxy.debug": "true", **P}),
                  c("plain", "c.test", labels={"wakeproxy.debug": "false"}))
    assert build(*containers).debug_hosts == frozenset()  # labels.debug is off by default
    trusting = Policy(trust=LabelTrustConfig(debug=True))
    assert build(*containers, policy=trusting).debug_hosts == {"a.test", "b.test"}
    # A name the container claims but does not own (an earlier group's) is never watched for it.
    thief = c("thief", "a.test", labels={"wakeproxy.debug": "true"}, created=10.0)
    owner = c("owner", "a.test", created=1.0)
    assert build(owner, thief, policy=trusting).debug_hosts == frozenset()


def test_a_bad_debug_label_skips_the_container_with_a_reason():
    snap = build(c("bad", "a.test", labels={"wakeproxy.debug": "maybe"}))
    assert snap.lookup("a.test") is None
    assert "wakeproxy.debug" in snap.skipped["bad"]


def test_a_compose_project_name_taken_from_another_folder_is_not_merged_into_it(caplog, tmp_path):
    """A sandbox whose own file says `name: victim` (or COMPOSE_PROJECT_NAME in its .env) makes containers
    labelled as the victim's project; they were split 3/3 with the victim's traffic. Now skipped, said once."""
    from wakeproxy.routing.policy import Ownership

    def member(name, folder, created, host="victim.test"):
        return c(name, host, created=created, cid=f"id-{name}", labels={
            "com.docker.compose.project": "victim", "com.docker.compose.service": "web",
            "com.docker.compose.project.working_dir": folder})

    victim = member("victim-web-1", "/srv/sandboxes/victim", 1.0)
    db = member("victim-db-1", "/srv/sandboxes/victim", 2.0, host=None)
    evil = member("victim-web-2", "/srv/sandboxes/pr-666", 3.0)
    ownership = Ownership()
    with caplog.at_level("WARNING"):
        snap = build(victim, db, evil, ownership=ownership)
        again = build(victim, db, evil, ownership=ownership)
    assert [b.container_name for b in snap.lookup("victim.test").backends] == ["victim-web-1"]
    assert snap.groups["victim"].members == ("id-victim-db-1", "id-victim-web-1")
    assert "another sandbox's project name" in snap.skipped["victim-web-2"]
    assert again.skipped == snap.skipped
    said = [r for r in caplog.records if "victim-web-2" in r.getMessage()]
    assert len(said) == 1 and "/srv/sandboxes" not in said[0].getMessage()  # once; no folder named
    # The folder first seen keeps the project, even against an older container or a tie on the second
    # (creation times are whole seconds); a new proxy (no memory) goes by age.
    early = member("victim-web-0", "/srv/sandboxes/pr-666", 0.0)
    assert "victim-web-0" in build(victim, db, evil, early, ownership=ownership).skipped
    assert "victim-web-1" in build(victim, db, evil, early).skipped
    # A `down` and `up` of the victim (none of its containers for a while) does not hand the project over:
    # its folder is held for names.release_after (60 s), across a restart too (the owners file)...
    t = time.time()
    assert "victim-web-2" in build(evil, ownership=ownership, now=t).skipped
    assert "victim-web-2" in build(evil, ownership=ownership, now=t + 59).skipped
    (tmp_path / "owners.json").write_bytes(ownership.encode())
    restarted = Ownership()
    restarted.load(tmp_path / "owners.json")
    assert "victim-web-2" in build(evil, ownership=restarted, now=t + 30).skipped
    back = build(victim, db, evil, ownership=ownership, now=t + 59.5)
    assert "victim-web-2" in back.skipped and back.lookup("victim.test").backends[0].container_name == "victim-web-1"
    # ... and only a folder gone for longer gives the project to the other one (a project moved folders).
    build(evil, ownership=ownership, now=t + 100)
    assert build(evil, ownership=ownership, now=t + 161).skipped == {}
    # A container the SDK made (no working_dir label) is a folder of its own: it does not join a
    # project made by Compose, nor the other way round.
    plain = c("p", "victim.test", created=9.0, labels={"com.docker.compose.project": "victim"})
    assert "p" in build(victim, db, plain).skipped
    assert "victim-web-1" in build(dataclasses.replace(plain, created=0.5), victim).skipped
    # One folder's containers, SDK-made ones among themselves, are one project as before.
    plain2 = c("p2", None, labels={"com.docker.compose.project": "victim"})
    assert build(plain, plain2).skipped == {}


def test_a_squatter_with_a_label_error_is_judged_by_its_folder_too():
    """A container with a bad label is skipped for that, but its hosts are still claims, and it would be
    connected to a network made again: it is judged by its folder like the others."""
    folder = {"com.docker.compose.project.working_dir": "/srv/p"}
    web = gone("web", "a.test", **folder)
    squat = gone("db", "x1.test", **{"com.docker.compose.project.working_dir": "/srv/pr-666",
                                     "wakeproxy.port": "nope"})
    squat = dataclasses.replace(squat, created=5.0)
    snap = build(web, squat, drivers={"bridge": "bridge"})
    assert "another sandbox's project name" in snap.skipped["db"]
    assert snap.lost_networks == {"p_default": ("id-web",)}
    assert "x1.test" not in snap.misconfigured and snap.lookup("x1.test") is None


# --- a Compose project whose network Docksal's stop removed -------------------------------------------


def gone(name, host=None, project="p", mode=None, state="exited", networks=None, **labels) -> ContainerInfo:
    """A stopped member of Compose project `project` after Docksal's stop: on no network, its
    HostConfig.NetworkMode still `<project>_default`."""
    info = c(name, host, state=state, networks=networks or {},
             labels={"com.docker.compose.project": project, "com.docker.compose.service": name, **labels})
    return ContainerInfo(**{**info.__dict__, "network_mode": f"{project}_default" if mode is None else mode})


def test_a_stopped_project_without_its_network_stays_a_sleeping_site_and_names_the_network_to_make():
    web, db = gone("web", "a.test"), gone("db")
    snap = build(web, db, drivers={"bridge": "bridge"})
    b = only_backend(snap, "a.test")
    assert b.problem is None and b.address is None and b.network == "p_default" and b.state == "exited"
    assert snap.groups["p"].members == ("id-db", "id-web") and snap.groups["p"].routed == {"id-web"}
    assert snap.lost_networks == {"p_default": ("id-db", "id-web")}
    assert snap.networks_to_recreate(snap.groups["p"].members) == {"p_default": ("id-db", "id-web")}
    assert snap.containers["id-web"].networks == {}  # the container as Docker has it
    assert snap.networks_to_recreate(["id-other"]) == {}
    # docker.networks naming it: the same; naming only others: not the proxy's to use.
    assert only_backend(build(web, allowed=["p_default"]), "a.test").problem is None
    assert only_backend(build(web, allowed=["other"]), "a.test").problem is not None


@pytest.mark.parametrize("info", [
    gone("web", "a.test", mode="q_default"),  # another project's network
    gone("web", "a.test", mode="p_other"),  # a network the Compose file names otherwise
    gone("web", "a.test", mode="bridge"),
    gone("web", "a.test", mode="P_default", project="P"),  # not a Compose project name
    gone("web", "a.test", project="p/x", mode="p/x_default"),
    gone("web", "a.test", state="running"),
    gone("web", "a.test", state="paused"),
    gone("web", "a.test", state="dead"),
])
def test_no_network_is_made_for_any_other_name_or_state(info):
    snap = build(info)
    assert snap.lost_networks == {}
    site = snap.lookup("a.test")  # (none: a container whose project label is not a name is skipped)
    assert site is None or site.backends[0].problem is not None  # on no network: unreachable, as ever


def test_an_existing_network_is_never_made_again():
    snap = build(gone("web", "a.test"), drivers={"p_default": "bridge"})  # it exists; the container is not on it
    assert snap.lost_networks == {}
    assert "cannot be reached" in (only_backend(snap, "a.test").problem or "")
    on_it = gone("web", "a.test", networks={"p_default": ""})  # attached (a removed network is listed as gone)
    snap = build(on_it)
    assert snap.lost_networks == {}


def test_a_container_without_a_project_label_is_never_given_a_network():
    info = ContainerInfo("id-web", "web", "exited", labels={"wakeproxy.host": "a.test"}, network_mode="_default")
    assert build(info).lost_networks == {}


def test_a_removed_network_is_made_again_only_for_the_projects_own_folder():
    """Another folder's containers that say they are of the project (skipped) are never connected to the
    network a wake makes again: they would take the project's service names on it."""
    folder = {"com.docker.compose.project.working_dir": "/srv/p"}
    web = gone("web", "a.test", **folder)
    db = gone("db", **folder)
    squat = gone("squat", **{"com.docker.compose.project.working_dir": "/srv/pr-666"})
    squat = ContainerInfo(**{**squat.__dict__, "created": 5.0})
    snap = build(web, db, squat, drivers={"bridge": "bridge"})
    assert "squat" in snap.skipped
    assert snap.lost_networks == {"p_default": ("id-db", "id-web")}
