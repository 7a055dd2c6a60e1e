"""The debug UI process: mitmweb for the watched sandboxes only (`python -m wakeproxy.debug.web`).

Started by the controller (debug/ui.py) while something is watched, as the workers' unprivileged
account, never with the Docker socket. The serving workers send it only the watched sites' requests:
their upstream connection is a CONNECT to this process's proxy listener on loopback, which then
talks to the real backend, so the flows show in mitmweb with every feature of it.

Talking to the controller: one JSON object a line.
- stdin: first `{"token", "key", "allow"}`, later `{"allow": [[ip, port], …]}` (the watched
  backends) and `{"ping": N}`; end of input: the process stops (a controller that dies never leaves a
  UI behind);
- stdout: `{"ready": {"proxy": [host, port], "web": [host, port]}}` or `{"error": "…"}`, `{"pong": N}`;
  mitmproxy's own log goes to stderr.

Who may use it (the `Gate`):
- the proxy listener admits a CONNECT only with `Proxy-Authorization: Bearer KEY` (the workers'
  key) and only to a backend of a watched sandbox; any other request on it gets 403: it is not an
  open proxy into the sandboxes' networks;
- an upstream connection goes only to the target of the worker's CONNECT it serves, or (a replay,
  a flow edited or made in the UI) to a backend of a watched sandbox: the UI cannot reach another
  tenant's containers, the Docker host or anything else;
- the web UI wants the token (`?token=`, once, then a session cookie; or `Authorization: Bearer`) and a Host
  header that is an IP address or `localhost` (DNS rebinding). mitmproxy ≥ 11.1 checks the token
  itself (`web_password`, set to the token's argon2 hash); on 11.0, whose UI accepts anyone, the gate
  checks it in front of every handler (`Application.find_handler`: one place every request, page,
  API call and WebSocket of tornado passes). When that cannot be installed the UI does not start;
- the UI may change only view-side options (intercept, filters, order), checked before mitmweb applies
  anything, and run only the commands its own buttons use (export, replay, resume, kill, a new flow):
  no scripts, listeners, files.

Bounded: at most `max_flows` flows and `max_memory` bytes of bodies and messages in all (the oldest
finished flows are dropped first), bodies over `max_body` pass through without being kept, and a
WebSocket keeps at most its last `MAX_MESSAGES` messages and 4 × `max_body` bytes of them (only its
last message while the UI is over `max_memory`). The controller pings it every few seconds: a UI that
stops answering is killed, and the watched sites are routed directly again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from mitmproxy import ctx, exceptions, http

logger = logging.getLogger("wakeproxy.debug")

COOKIE = "wakeproxy_debug"
MAX_MESSAGES = 500  # WebSocket messages a flow keeps
MAX_INPUT_LINE = 4 * 1024 * 1024
MAX_TUNNEL_TARGETS = 10_000
NICE = 10  # the UI's CPU priority below the workers' (debugging traffic yields to serving)
SWEEP_EVERY = 1.0  # seconds: how often quiet WebSockets' large last messages are shrunk
ALLOW_WAIT = 3.0  # a worker's CONNECT to a backend not (yet) in the controller's list waits this long for it
# What the UI may change, and run, once the process is up (everything else is fixed at start).
UI_OPTIONS = frozenset({"intercept", "intercept_active", "view_filter", "view_order", "view_order_reversed",
                        "showhost", "web_columns", "content_view_lines_cutoff", "anticache", "anticomp"})
UI_COMMANDS = frozenset({"export", "replay.client", "flow.resume", "flow.kill", "view.flows.create",
                         "commands.history.get", "commands.history.add", "flow.mark", "flow.mark.toggle"})
REFUSED_PATHS = ("/options/save", "/processes", "/executable-icon")
Address = tuple[str, int]


def _address(value: Any) -> Address:
    host, port = value
    return str(host), int(port)


def ui_host_allowed(host_header: str) -> bool:
    """An IP address or localhost (with any port): a name that DNS rebinding could point here is not."""
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def command_of(path: str) -> str | None:
    """`/commands/NAME` → NAME (the UI's command API), else None."""
    if path.startswith("/commands/"):
        return path[len("/commands/"):].split("/", 1)[0]
    return None


class Gate:
    """The addon in the UI's mitmweb: who may use it, and how much it keeps (see the module docstring)."""

    def __init__(self, max_flows: int, report: Callable[[dict[str, Any]], None], max_body: int = 1024 * 1024,
                 max_memory: int = 128 * 1024 * 1024) -> None:
        self.max_flows = max_flows
        self.max_body = max_body
        self.max_memory = max_memory  # bytes of bodies and messages kept in all
        self.ws_budget = 4 * max_body  # bytes of messages one WebSocket keeps
        self.report = report
        self.token = ""
        self.key = ""
        self.session = secrets.token_urlsafe(24)  # the browser's cookie (never the token itself)
        self.allow: frozenset[Address] = frozenset()
        self._allow_changed = asyncio.Event()
        self.tunnels: dict[str, Address] = {}  # client connection id → its authorised CONNECT target
        self.order: collections.deque[str] = collections.deque()  # flow ids as they came
        self.kept: dict[str, int] = {}  # flow id → bytes of its bodies and messages
        self.total = 0
        self.live: set[str] = set()  # flows whose request or response may still be buffered
        self.sockets: set[str] = set()  # flows with an open WebSocket
        self.sealed = False  # once running: options outside UI_OPTIONS are fixed
        self._sweeper: asyncio.Task[None] | None = None
        self.own_auth = False  # mitmweb checks the token itself (mitmproxy ≥ 11.1)

    # --- what the controller says ---------------------------------------------------------------

    def take(self, message: dict[str, Any]) -> None:
        if "token" in message:
            self.token = str(message["token"])
            self.key = str(message["key"])
        if "allow" in message:
            self.allow = frozenset(_address(a) for a in message["allow"])
            self._allow_changed.set()
            self._allow_changed = asyncio.Event()
        if "ping" in message:
            self.report({"pong": message["ping"]})

    # --- options ----------------------------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        # The second line: the UI's option API is checked before anything changes (install_gate).
        if self.sealed and updated - UI_OPTIONS:
            raise exceptions.OptionsError(
                f"wakeproxy debug UI: {', '.join(sorted(updated - UI_OPTIONS))} cannot be changed here")

    def running(self) -> None:
        master: Any = ctx.master
        why = install_gate(master.app, self)
        if why is not None:
            self.report({"error": f"the debug UI cannot be protected on this mitmproxy ({why}); not started"})
            master.shutdown()
            return
        proxy = [a for s in master.addons.get("proxyserver").servers for a in s.listen_addrs]
        if not proxy:
            self.report({"error": "the debug UI's proxy listener did not open"})
            master.shutdown()
            return
        self.sealed = True
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        self.report({"ready": {"proxy": list(proxy[0][:2]),
                               "web": [ctx.options.web_host, ctx.options.web_port]}})

    def done(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    # --- the proxy listener -------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        given = flow.request.headers.get("proxy-authorization", "")
        if not self.key or not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
            flow.response = http.Response.make(407, b"wakeproxy debug UI: not a proxy\n",
                                               {"Proxy-Authenticate": "Bearer", "Content-Type": "text/plain"})
            return
        del flow.request.headers["proxy-authorization"]
        target = (flow.request.host, flow.request.port)
        if not await self._allowed(target):
            flow.response = http.Response.make(403, b"wakeproxy debug UI: not a watched sandbox\n",
                                               {"Content-Type": "text/plain"})
            return
        if len(self.tunnels) >= MAX_TUNNEL_TARGETS:
            flow.response = http.Response.make(503, b"wakeproxy debug UI: too many connections\n")
            return
        self.tunnels[flow.client_conn.id] = target

    async def _allowed(self, target: Address) -> bool:
        """Is `target` a watched backend? A container that just started may reach the worker's table a
        moment before the controller's list reaches us: wait for that list, briefly."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ALLOW_WAIT
        while target not in self.allow:
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._allow_changed.wait(), left)
        return True

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.method == "CONNECT":
            return
        if not flow.is_replay and flow.client_conn.id not in self.tunnels:
            flow.response = http.Response.make(403, b"wakeproxy debug UI: not a proxy\n",
                                               {"Content-Type": "text/plain"})
            return
        self.live.add(flow.id)
        if self._pressed():
            flow.request.stream = True  # passed through, not kept: the UI is at its memory budget

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and self._pressed():
            flow.response.stream = True

    def _pressed(self) -> bool:
        """Would the bodies that flows in progress may still buffer (up to max_body each way) take the UI
        over max_memory?"""
        return self.total + 2 * len(self.live) * self.max_body > self.max_memory

    def server_connect(self, data: Any) -> None:
        address = data.server.address
        if address is None:
            return
        target = (str(address[0]), int(address[1]))
        if target in self.allow or self.tunnels.get(data.client.id) == target:
            return
        data.server.error = "the debug UI connects only to the watched sandboxes' containers"

    def client_disconnected(self, client: Any) -> None:
        self.tunnels.pop(client.id, None)

    # --- bounds -----------------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        self.order.append(flow.id)
        self._trim()

    def response(self, flow: http.HTTPFlow) -> None:
        self.live.discard(flow.id)
        self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.live.discard(flow.id)
        self.sockets.discard(flow.id)
        self._count(flow)

    def _count(self, flow: http.HTTPFlow, messages: int = 0) -> None:
        size = len(flow.request.raw_content or b"") + messages
        if flow.response is not None:
            size += len(flow.response.raw_content or b"")
        self.total += size - self.kept.get(flow.id, 0)
        self.kept[flow.id] = size
        self._trim()

    def _trim(self) -> None:
        view: Any = ctx.master.view  # type: ignore[attr-defined]
        kept: list[str] = []
        while self.order and (len(self.order) > self.max_flows or self.total > self.max_memory):
            fid = self.order.popleft()
            f = view.get_by_id(fid)
            if f is not None and f.live:
                kept.append(fid)  # in progress or intercepted: dropped once it is done
                continue
            self.total -= self.kept.pop(fid, 0)
            self.live.discard(fid)
            if f is not None:
                view.remove([f])
        self.order.extendleft(reversed(kept))

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self.sockets.add(flow.id)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        ws = flow.websocket
        assert ws is not None
        if len(ws.messages) > 1:
            _shrink(ws.messages[-2], self.max_body)  # the previous one is sent by now
        budget = self.ws_budget if self.total <= self.max_memory else 0
        kept = sum(len(m.content) for m in ws.messages[:-1])
        drop = 0
        while drop < len(ws.messages) - 1 and (kept > budget or len(ws.messages) - drop > MAX_MESSAGES):
            kept -= len(ws.messages[drop].content)
            drop += 1
        if drop:
            del ws.messages[:drop]
        self._count(flow, kept + len(ws.messages[-1].content))  # the one being sent is held too, for now

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.sockets.discard(flow.id)
        if flow.websocket is not None and flow.websocket.messages:
            _shrink(flow.websocket.messages[-1], self.max_body)
            self._count(flow, sum(len(m.content) for m in flow.websocket.messages))

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            self.sweep(time.time())

    def sweep(self, now: float) -> None:
        """The last message of a WebSocket that has gone quiet is sent by now: shrink it when it is large
        (mitmproxy holds it until the next message, which may never come)."""
        view: Any = ctx.master.view  # type: ignore[attr-defined]
        for fid in list(self.sockets):
            f = view.get_by_id(fid)
            if f is None or f.websocket is None:
                self.sockets.discard(fid)
                continue
            messages = f.websocket.messages
            if messages and len(messages[-1].content) > self.max_body and messages[-1].timestamp < now - SWEEP_EVERY:
                _shrink(messages[-1], self.max_body)
                self._count(f, sum(len(m.content) for m in messages))


def _shrink(message: Any, most: int) -> None:
    if len(message.content) > most:
        message.content = f"[{len(message.content)} bytes, not kept by the debug UI]".encode()


def install_gate(app: Any, gate: Gate) -> str | None:
    """Put the gate in front of every request of mitmweb's tornado Application; None when done, else what
    is missing (then the UI must not start)."""
    import tornado.web

    if not callable(getattr(app, "find_handler", None)) or not callable(getattr(app, "get_handler_delegate", None)):
        return "tornado Application.find_handler/get_handler_delegate"
    why = _guard_options_api()
    if why is not None:
        return why
    gate.own_auth = "is_valid_password" in getattr(app, "settings", {})

    class Refused(tornado.web.RequestHandler):
        def initialize(self, status: int, text: str, cookie: str | None = None, location: str | None = None) -> None:
            self.status, self.text, self.cookie, self.location = status, text, cookie, location

        def check_xsrf_cookie(self) -> None:
            return None

        def prepare(self) -> None:
            self.set_status(self.status)
            self.set_header("Cache-Control", "no-store")
            if self.cookie is not None:
                self.set_cookie(COOKIE, self.cookie, httponly=True, samesite="Strict")
            if self.location is not None:
                self.set_header("Location", self.location)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(self.text)

    original = app.find_handler

    def find_handler(request: Any, **kwargs: Any) -> Any:
        def answer(status: int, text: str, **extra: Any) -> Any:
            return app.get_handler_delegate(request, Refused, {"status": status, "text": text, **extra})

        if not ui_host_allowed(request.headers.get("Host", "")):
            return answer(403, "wakeproxy debug UI: open it by IP address (http://127.0.0.1:PORT/), not by name\n")
        if not gate.own_auth:
            if not _authorised(request, gate):
                return answer(403, "wakeproxy debug UI: the token is missing or wrong; `wakeproxy debug` "
                                   "prints the address with its token\n")
            if request.method == "GET" and "token" in request.query_arguments and request.path == "/":
                rest = {k: v for k, v in request.query_arguments.items() if k != "token"}
                query = urlencode([(k, x.decode(errors="replace")) for k, vs in rest.items() for x in vs])
                return answer(302, "", cookie=gate.session, location="/" + (f"?{query}" if query else ""))
        cmd = command_of(request.path)
        if (cmd is not None and cmd not in UI_COMMANDS) or request.path in REFUSED_PATHS or \
                (request.path == "/flows/dump" and request.method != "GET"):
            return answer(403, "wakeproxy debug UI: not available here\n")
        return original(request, **kwargs)

    app.find_handler = find_handler
    return None


def _authorised(request: Any, gate: Gate) -> bool:
    """The token (`Authorization: Bearer`, `?token=`), or the session cookie given for it: a cookie of an
    IP address goes to every port of it, so it holds a value of this UI process only, never the token."""
    def same(given: str, expected: str) -> bool:
        return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())

    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return same(auth[len("Bearer "):].strip(), gate.token)
    values = request.query_arguments.get("token")
    if values:
        return same(values[-1].decode(errors="replace"), gate.token)
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and same(str(cookie.value), gate.session)


_OPTIONS_MARK = "_wakeproxy_view_options_only"


def _guard_options_api() -> str | None:
    """mitmweb's `PUT /options` applies any option, and its addons act on a new value before an addon that
    vetoes it in `configure` could roll it back (files written, the proxy listener moved). Check the keys
    first: only UI_OPTIONS pass. (A guarded adaptation: None when in place, else what is missing.)"""
    import tornado.web

    try:
        from mitmproxy.tools.web import app as web_app
    except ImportError as e:
        return f"mitmproxy.tools.web.app ({e})"
    handler = getattr(web_app, "Options", None)
    put = getattr(handler, "put", None)
    if handler is None or not callable(put):
        return "mitmweb's Options.put"
    if getattr(put, _OPTIONS_MARK, False):
        return None

    def guarded_put(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            update = json.loads(self.request.body or b"{}")
        except (ValueError, RecursionError):
            raise tornado.web.HTTPError(400) from None
        if not isinstance(update, dict) or set(update) - UI_OPTIONS:
            self.set_status(403)
            self.finish("wakeproxy debug UI: only the view's options (intercept, filters, order) can be changed here\n")
            return None
        return put(self, *args, **kwargs)

    setattr(guarded_put, _OPTIONS_MARK, True)
    handler.put = guarded_put
    return None


# --- the process -------------------------------------------------------------------------------------


_QUERY = re.compile(r"\?\S*")


def _no_queries(record: logging.LogRecord) -> bool:
    """tornado's warnings name the request (`403 POST /path?query`): never its query, which may hold the token."""
    record.msg, record.args = _QUERY.sub("?…", record.getMessage()), None
    return True


def _write(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_INPUT_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _follow_stdin(reader: asyncio.StreamReader, gate: Gate, master: Any) -> None:
    try:
        while line := await reader.readline():
            try:
                message = json.loads(line)
                gate.take(message)
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                logger.warning(f"wakeproxy debug UI: a bad line from the controller ({e}); ignored")
    except (ValueError, OSError):
        pass
    master.shutdown()  # the controller is gone (or said nothing more): so is the UI


def _options(args: argparse.Namespace, known: set[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "mode": ["regular@127.0.0.1:0"],
        "web_host": args.web_host, "web_port": args.web_port, "web_open_browser": False,
        "confdir": args.confdir, "ssl_insecure": True, "stream_large_bodies": f"{max(1, args.max_body // 1024)}k",
        "termlog_verbosity": "warn", "command_history": False, "connection_strategy": "lazy",
    }
    return {k: v for k, v in opts.items() if k in known}


async def serve(args: argparse.Namespace) -> int:
    from mitmproxy import options
    from mitmproxy.addons import termlog
    from mitmproxy.tools.web.master import WebMaster

    from wakeproxy.config import Config
    from wakeproxy.mitm import errorpages
    from wakeproxy.mitm.limits import ConnectionLimits, connection_cap, raise_nofile_limit
    from wakeproxy.runtime import Runtime

    with contextlib.suppress(OSError):
        os.nice(NICE)  # the serving workers come first when the machine is busy
    errorpages.install()  # a backend that fails gets our bare page, never mitmproxy's (addresses, Server)
    logging.getLogger("tornado.access").setLevel(logging.CRITICAL)  # its lines hold request URIs (`?token=`)
    for name in ("tornado.application", "tornado.general"):  # and its warnings may (a request's summary)
        logging.getLogger(name).addFilter(_no_queries)
    reader = await _stdin()
    gate = Gate(args.max_flows, _write, args.max_body, args.max_memory)
    try:
        gate.take(json.loads(await reader.readline()))
    except (ValueError, KeyError, TypeError):
        _write({"error": "no secrets from the controller"})
        return 2
    opts = options.Options()
    master = WebMaster(opts, with_termlog=False)
    master.addons.add(termlog.TermLog(out=sys.stderr))
    limits = ConnectionLimits(Runtime())  # the workers' deadlines for idle and slow clients, and a cap
    limits.cap = connection_cap(raise_nofile_limit(), Config().limits.connection_reserve, None)
    master.addons.add(limits, gate)
    known = set(opts.keys())
    opts.update(**_options(args, known))
    if "web_password" in known:  # mitmproxy ≥ 11.1: its own token check, with our token
        import argon2  # type: ignore[import-not-found,unused-ignore]  # (mitmproxy ≥ 11.1 depends on it)

        opts.update(web_password=argon2.PasswordHasher().hash(gate.token))
    if args.user:
        _become(args.user, args.confdir)
    stdin_task = asyncio.get_running_loop().create_task(_follow_stdin(reader, gate, master))
    try:
        await master.run()
    except OSError as e:  # the UI's port is taken
        _write({"error": str(e).splitlines()[0]})
        return 1
    finally:
        stdin_task.cancel()
    return 0


def _become(user: str, confdir: str) -> None:
    """Give up root for the workers' account, when it can read what mitmweb serves from disk (its
    pages and scripts, read per request); else stay, and say so once."""
    from pathlib import Path

    import mitmproxy.tools.web

    from wakeproxy.files import blocked_for
    from wakeproxy.planes.worker import drop_privileges

    uid_s, _, gid_s = user.partition(":")
    uid, gid = int(uid_s), int(gid_s)
    web = Path(mitmproxy.tools.web.__file__).parent
    blocked = next((b for p in [web, *sorted(web.rglob("*"))] if (b := blocked_for(p, uid, gid)) is not None), None)
    if blocked is not None:
        logger.warning(f"the debug UI runs as root: uid {uid} cannot read {blocked} (make the install "
                       f"readable to other users to run it unprivileged)")
        return
    drop_privileges(uid, gid, Path(confdir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wakeproxy.debug.web")
    parser.add_argument("--web-host", default="127.0.0.1")
    parser.add_argument("--web-port", type=int, default=8081)
    parser.add_argument("--confdir", required=True)
    parser.add_argument("--max-flows", type=int, default=500)
    parser.add_argument("--max-body", type=int, default=1024 * 1024)
    parser.add_argument("--max-memory", type=int, default=128 * 1024 * 1024)
    parser.add_argument("--user", help="uid:gid to become (when started as root)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
