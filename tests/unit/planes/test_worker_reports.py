"""planes.worker: activity reports: only what changed, and every FULL_REPORT_EVERY-th report everything, so a
report the controller could not apply (its snapshot lacked the group at that moment) heals by itself."""

from __future__ import annotations

from typing import Any

from wakeproxy.certs.challenges import ChallengeTokens
from wakeproxy.certs.store import Certificates
from wakeproxy.planes import worker
from wakeproxy.runtime import Runtime
from wakeproxy.wake.idle import Activity


class FakePeer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def send(self, kind: str, body: Any) -> bool:
        self.sent.append((kind, body))
        return True


class Idle:
    def __init__(self) -> None:
        self.activity = {"g": Activity(100.0, 0, 0, running=True), "h": Activity(100.0, 0, 0, running=True)}


def test_reports_carry_changes_and_now_and_then_everything():
    runtime = Runtime()
    plane = worker.WorkerPlane(runtime, Certificates(runtime, pushed=True), ChallengeTokens())
    plane.peer = FakePeer()  # type: ignore[assignment]
    plane.idle = Idle()  # type: ignore[assignment]
    plane._report()
    assert set(plane.peer.sent[-1][1]["groups"]) == {"g", "h"}  # first sight: both changed
    plane.idle.activity["g"].inflight = 1
    plane._report()
    assert plane.peer.sent[-1][1]["groups"] == {"g": [1, 0, 100.0]}
    groups = [plane.peer.sent[-1][1]["groups"]]
    for _ in range(worker.FULL_REPORT_EVERY):
        plane._report()
        groups.append(plane.peer.sent[-1][1]["groups"])
    # Nothing changed since, yet one report in FULL_REPORT_EVERY says everything again.
    assert {"g": [1, 0, 100.0], "h": [0, 0, 100.0]} in groups
    assert groups.count({}) == worker.FULL_REPORT_EVERY - 1
