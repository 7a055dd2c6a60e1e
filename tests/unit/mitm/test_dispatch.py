"""wakeproxy.dispatch: the lean Master's per-hook handler table keeps mitmproxy's hook contract."""

from __future__ import annotations

import asyncio
import logging
import types

import pytest
from mitmproxy import addonmanager, exceptions, hooks, http
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.test import taddons, tflow
from wakeproxy.mitm import dispatch


class Recorder:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    def requestheaders(self, f: http.HTTPFlow) -> None:
        self.calls.append(f"{self.name}.requestheaders")


class AsyncRecorder(Recorder):
    async def requestheaders(self, f: http.HTTPFlow) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}.requestheaders")


class Parent(Recorder):
    def __init__(self, name: str, calls: list[str], children: list) -> None:
        super().__init__(name, calls)
        self.addons = children


class Boom:
    name = "boom"

    def requestheaders(self, f: http.HTTPFlow) -> None:
        raise RuntimeError("kaboom")


class Halt:
    name = "halt"

    def requestheaders(self, f: http.HTTPFlow) -> None:
        raise exceptions.AddonHalt()


class BadOption:
    name = "badoption"

    def requestheaders(self, f: http.HTTPFlow) -> None:
        raise exceptions.OptionsError("nope")


class Updates:
    name = "updates"

    def __init__(self) -> None:
        self.seen: list = []

    def update(self, flows) -> None:
        self.seen.append(list(flows))


def table(tctx: taddons.context) -> dispatch.HookTable:
    return dispatch.HookTable(tctx.master)


def test_compatible_with_the_installed_mitmproxy() -> None:
    assert dispatch.compatible()


def test_hook_args_match_upstream() -> None:
    f = tflow.tflow()
    for event in (hooks.UpdateHook([f]), server_hooks.ClientConnectedHook(f.client_conn)):
        assert dispatch.hook_args(event) == event.args()


def test_handlers_run_in_chain_order_sync_and_async_and_sub_addons() -> None:
    async def run() -> None:
        calls: list[str] = []
        with taddons.context() as tctx:
            t = table(tctx)
            t.add(Recorder("a", calls), Parent("p", calls, [AsyncRecorder("child", calls)]), AsyncRecorder("b", calls))
            f = tflow.tflow()
            await t.handle_lifecycle(HttpRequestHeadersHook(f))
            assert calls == ["a.requestheaders", "p.requestheaders", "child.requestheaders", "b.requestheaders"]
            assert [a.name for a, _ in t.handlers("requestheaders")] == ["a", "p", "child", "b"]

    asyncio.run(run())


def test_an_error_is_logged_and_the_other_handlers_still_run(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        calls: list[str] = []
        with taddons.context() as tctx:
            t = table(tctx)
            t.add(Recorder("a", calls), Boom(), Recorder("b", calls))
            with caplog.at_level(logging.ERROR):
                await t.trigger_event(HttpRequestHeadersHook(tflow.tflow()))
            assert calls == ["a.requestheaders", "b.requestheaders"]
            assert "Addon error: kaboom" in caplog.text

    asyncio.run(run())


def test_addon_halt_ends_the_hook_and_options_error_propagates() -> None:
    async def run() -> None:
        calls: list[str] = []
        with taddons.context() as tctx:
            t = table(tctx)
            t.add(Recorder("a", calls), Halt(), Recorder("b", calls))
            await t.trigger_event(HttpRequestHeadersHook(tflow.tflow()))
            assert calls == ["a.requestheaders"]
            t2 = table(tctx)
            t2.add(BadOption())
            with pytest.raises(exceptions.OptionsError):
                await t2.trigger_event(HttpRequestHeadersHook(tflow.tflow()))

    asyncio.run(run())


def test_update_runs_only_when_someone_listens() -> None:
    async def run() -> None:
        with taddons.context() as tctx:
            t = table(tctx)
            t.add(Recorder("a", []))
            f = tflow.tflow()
            await t.handle_lifecycle(HttpRequestHeadersHook(f))
            assert t.handlers("update") == ()
            u = Updates()
            t.add(u)  # adding drops the table
            await t.handle_lifecycle(HttpRequestHeadersHook(f))
            assert u.seen == [[f]]
            # a hook whose argument is not a flow gets no update pass (as upstream)
            await t.handle_lifecycle(server_hooks.ClientConnectedHook(f.client_conn))
            assert u.seen == [[f]]

    asyncio.run(run())


def test_the_table_follows_add_and_remove() -> None:
    async def run() -> None:
        calls: list[str] = []
        with taddons.context() as tctx:
            t = table(tctx)
            a, b = Recorder("a", calls), Recorder("b", calls)
            t.add(a)
            await t.trigger_event(HttpRequestHeadersHook(tflow.tflow()))
            t.add(b)
            await t.trigger_event(HttpRequestHeadersHook(tflow.tflow()))
            t.remove(a)
            await t.trigger_event(HttpRequestHeadersHook(tflow.tflow()))
            assert calls == ["a.requestheaders", "a.requestheaders", "b.requestheaders", "b.requestheaders"]
            t.clear()
            assert t.handlers("requestheaders") == ()

    asyncio.run(run())


def test_a_module_named_like_a_hook_is_not_a_handler() -> None:
    class WithModule:
        name = "withmodule"
        response = types.ModuleType("response")

    with taddons.context() as tctx:
        t = table(tctx)
        t.add(WithModule())
        assert t.handlers("response") == ()


def test_the_lean_master_dispatches_like_stock_mitmproxy(tmp_path) -> None:
    """Every hook of mitmproxy's: the lean Master's table lists exactly the handlers, in exactly the
    order, that mitmproxy's own AddonManager would call."""
    async def run() -> None:
        from wakeproxy import cli

        cfg = tmp_path / "wakeproxy.yaml"
        cfg.write_text(f'state_dir: "{tmp_path}/state"\nstatus: {{listen: null}}\n')
        m = cli.build_master(str(cfg), "warn")  # not run: nothing starts before `running`
        assert isinstance(m.addons, dispatch.HookTable)
        stock = addonmanager.AddonManager.__new__(addonmanager.AddonManager)
        for name, event_cls in hooks.all_hooks.items():
            expected = [pair for top in m.addons.chain
                        for pair in addonmanager.AddonManager._iter_hooks(stock, top, _named(event_cls))]
            assert [(id(a), f) for a, f in m.addons.handlers(name)] == [(id(a), f) for a, f in expected], name
        assert len(m.addons.handlers("requestheaders")) >= 4  # the bundle's, not an empty table

    try:
        asyncio.run(run())
    finally:
        from wakeproxy.mitm import lean

        lean.restore_message_type_checks()  # build_master dropped it for the whole process


def _named(event_cls: type) -> hooks.Hook:
    """An instance of a hook class without running its dataclass __init__ (only `.name` is read)."""
    return object.__new__(event_cls)


@pytest.mark.parametrize("attr", ["_configure_all", "trigger_event", "handle_lifecycle", "register"])
def test_each_attribute_the_lean_master_relies_on_is_checked(monkeypatch, attr) -> None:
    from mitmproxy import addonmanager

    monkeypatch.delattr(addonmanager.AddonManager, attr)
    assert not dispatch.compatible()  # build_master then keeps the stock dispatch, with a warning
