"""wakeproxy.mitm.shapes: every adaptation fits the installed mitmproxy (11.0.x in .venv, 12.x in the image's
test run): a release that changes what one of them touches shows up here first, by name."""

from __future__ import annotations

from mitmproxy import version
from wakeproxy.mitm import shapes


def test_every_adaptation_fits_this_mitmproxy():
    report = shapes.report()
    assert set(report) == {"dispatch", "lean", "h2reuse", "headbound", "earlyanswer", "errorpages", "listeners",
                           "upstream"}
    assert {name: why for name, why in report.items() if why} == {}, version.VERSION


def test_a_check_that_raises_is_a_misfit_not_a_crash(monkeypatch):
    def boom() -> str | None:
        raise RuntimeError("new shape")

    monkeypatch.setattr(shapes, "_checks", lambda: {"x": boom})
    assert shapes.report() == {"x": "the shape check failed: RuntimeError('new shape')"}
