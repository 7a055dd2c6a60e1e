"""wakeproxy.planes.wire: frames and snapshots as plain data (the channel of the control/data split)."""

from __future__ import annotations

import time

import msgpack
import pytest
from wakeproxy.config import Config, SourcesConfig, parse_config
from wakeproxy.planes.wire import (
    MAX_FRAME,
    WIRE_VERSION,
    FrameReader,
    WireError,
    frame,
    from_plain,
    roundtrip,
    to_plain,
)
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import Snapshot, build_snapshot


def rich_snapshot(n: int = 1) -> Snapshot:
    """Every kind of value a snapshot holds: paths, wildcards, groups, depends_on, refusals, ACME names,
    a skipped container, a conflict."""
    cs = []
    for i in range(n):
        p = {"com.docker.compose.project": f"pr-{i}"}
        cs += [
            ContainerInfo(f"w{i}", f"pr-{i}-web-1", "running", networks={"bridge": f"172.17.{i // 250}.{i % 250 + 2}"},
                          labels={**p, "com.docker.compose.service": "web",
                                  "wakeproxy.host": f"pr-{i}.test,*.pr-{i}.test", "wakeproxy.acme": "true",
                                  "com.docker.compose.depends_on": "api:service_healthy"},
                          env={"LETSENCRYPT_HOST": f"www.pr-{i}.test"}, exposed_ports=(80,), created=float(i)),
            ContainerInfo(f"a{i}", f"pr-{i}-api-1", "exited", networks={"bridge": ""}, exit_code=3,
                          labels={**p, "com.docker.compose.service": "api",
                                  "traefik.http.routers.api.rule": f"Host(`pr-{i}.test`) && PathPrefix(`/api`)"}),
        ]
    cs += [
        ContainerInfo("x", "thief", "running", networks={"bridge": "172.18.0.2"},
                      labels={"wakeproxy.host": "pr-0.test"}, created=1e9),
        ContainerInfo("b", "broken", "running", labels={"wakeproxy.host": "b.test", "wakeproxy.port": "abc"}),
    ]
    return build_snapshot(cs, SourcesConfig(), (), {})


def test_a_snapshot_survives_the_wire_whole():
    snap = rich_snapshot(3)
    assert snap.refused and snap.skipped and snap.acme and snap.groups and snap.exact["pr-0.test"].routes
    back = roundtrip(snap)
    assert back == snap
    assert back.lookup("x.pr-1.test") == snap.lookup("x.pr-1.test")
    assert back.exact["pr-0.test"].route_for("/api/v1") == snap.exact["pr-0.test"].route_for("/api/v1")
    assert back.groups["pr-0"].start_order(back) == snap.groups["pr-0"].start_order(snap)


def test_a_config_survives_the_wire():
    cfg = parse_config("names: {allow: ['{group}.sb.test'], reserved: {www.sb.test: 'container:landing'}}\n"
                       "default_host: www.sb.test\nforwarded: {trusted_proxies: ['10.0.0.0/8']}\n")
    with pytest.raises(TypeError):  # ip networks and regexes have no plain form: configs travel as files
        to_plain(cfg)
    assert roundtrip(Config().names) == Config().names


def test_frames_in_any_chunks():
    data = frame("snapshot", to_plain(rich_snapshot(2))) + frame("tokens", {"t": "k"}) + frame("ping", None)
    reader = FrameReader()
    got = []
    for i in range(0, len(data), 7):
        got += reader.feed(data[i:i + 7])
    assert [k for k, _ in got] == ["snapshot", "tokens", "ping"]
    assert from_plain(Snapshot, got[0][1]) == rich_snapshot(2)


def test_bad_frames_are_refused():
    with pytest.raises(WireError, match="over"):
        FrameReader(max_frame=10).feed(frame("x", "y" * 100))
    other = msgpack.packb([WIRE_VERSION + 1, "x", None])
    with pytest.raises(WireError, match="wire version"):
        FrameReader().feed(len(other).to_bytes(4, "big") + other)
    junk = msgpack.packb({"not": "a frame"})
    with pytest.raises(WireError, match="frame"):
        FrameReader().feed(len(junk).to_bytes(4, "big") + junk)
    with pytest.raises(WireError):
        from_plain(Snapshot, [1, 2, 3])
    assert MAX_FRAME >= 16 * 1024 * 1024


def test_the_cost_of_a_whole_snapshot_of_1000_sandboxes(capsys):
    """Whole snapshots or diffs? Measured here (printed; docs/benchmarks.md quotes it): a few tens of
    ms for 1,000 sandboxes each way, a few hundred KB — whole snapshots on change are affordable."""
    snap = rich_snapshot(1000)
    t0 = time.perf_counter()
    data = frame("snapshot", to_plain(snap))
    t1 = time.perf_counter()
    (kind, body), = FrameReader().feed(data)
    back = from_plain(Snapshot, body)
    t2 = time.perf_counter()
    assert back == snap
    print(f"1000 sandboxes ({len(snap.containers)} containers): {len(data) / 1e6:.2f} MB, "
          f"encode {(t1 - t0) * 1000:.0f} ms, decode {(t2 - t1) * 1000:.0f} ms")
    assert len(data) < MAX_FRAME


def test_large_frames_are_unpacked_only_when_loaded():
    from wakeproxy.planes.wire import Deferred, loaded

    big = frame("snapshot", {"x": "y" * 300_000})
    small = frame("wakes", ["a"])
    reader = FrameReader(lazy_over=256 * 1024)
    (k1, b1), (k2, b2) = reader.feed(big + small)
    assert (k1, k2) == ("snapshot", "wakes")
    assert isinstance(b1, Deferred) and b2 == ["a"]
    assert loaded(b1) == {"x": "y" * 300_000} and loaded(b2) == ["a"]
    import struct

    import msgpack

    other = msgpack.packb([99, "snapshot", "z" * 100])
    with pytest.raises(WireError):  # another version is refused before the body is ever unpacked
        FrameReader(lazy_over=10).feed(struct.pack(">I", len(other)) + other)
