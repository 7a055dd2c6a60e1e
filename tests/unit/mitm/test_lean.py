"""wakeproxy.lean: the lean Master drops mitmproxy's debug-only message type check, nothing else."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy import http
from mitmproxy.test.tutils import treq
from wakeproxy.mitm import lean


@pytest.fixture
def dropped():
    assert lean.drop_message_type_checks()
    yield
    lean.restore_message_type_checks()


def _bad_request() -> http.Request:
    # port must be an int: mitmproxy's check rejects a str
    return http.Request("example.test", "80", b"GET", b"http", b"", b"/", b"HTTP/1.1", http.Headers(), b"", None, 0.0, None)  # type: ignore[arg-type]


def test_mitmproxy_checks_message_fields_by_default() -> None:
    with pytest.raises(TypeError):
        _bad_request()


def test_dropped_and_restored(dropped) -> None:
    _bad_request()  # no check
    assert lean.drop_message_type_checks()  # idempotent
    req = treq()
    assert req.host == "address" and req.headers["header"] == "qvalue"  # messages still work
    lean.restore_message_type_checks()
    with pytest.raises(TypeError):
        _bad_request()


def test_only_the_lean_master_drops_it(tmp_path) -> None:
    """Importing the bundle (what mitmdump/mitmweb -s do) keeps the check; building the lean Master drops it."""
    from wakeproxy import bundle  # noqa: F401

    with pytest.raises(TypeError):
        _bad_request()

    async def run() -> None:
        from wakeproxy import cli

        cfg = tmp_path / "wakeproxy.yaml"
        cfg.write_text(f'state_dir: "{tmp_path}/state"\nstatus: {{listen: null}}\n')
        cli.build_master(str(cfg), "warn")

    try:
        asyncio.run(run())
        _bad_request()
    finally:
        lean.restore_message_type_checks()
    with pytest.raises(TypeError):
        _bad_request()


def test_another_post_init_is_left_alone_with_one_warning(monkeypatch, caplog) -> None:
    def own_post_init(self) -> None:  # not the type check: something a future mitmproxy might do
        self.extra = True

    monkeypatch.setattr(lean.FALLBACK, "warned", False)
    monkeypatch.setattr(http.MessageData, "__post_init__", own_post_init)
    with caplog.at_level("WARNING", logger="wakeproxy.mitm.guard"):
        assert lean.drop_message_type_checks() is False
        assert lean.drop_message_type_checks() is False
    assert http.MessageData.__dict__["__post_init__"] is own_post_init
    assert [r.levelname for r in caplog.records if r.name == "wakeproxy.mitm.guard"] == ["WARNING"]


def test_a_missing_check_is_left_alone(monkeypatch) -> None:
    monkeypatch.setattr(lean.FALLBACK, "warned", False)
    monkeypatch.delattr(http.MessageData, "__post_init__")
    assert lean.drop_message_type_checks() is False
