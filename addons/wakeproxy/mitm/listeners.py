"""Listening sockets handed down by the supervisor, instead of mitmproxy binding its own.

Under the `wakeproxy` command the supervisor binds every listener once (as root, for 80/443),
one SO_REUSEPORT socket per worker slot, and passes each worker its slot's sockets (file
descriptors named in `WAKEPROXY_LISTEN_FDS`, "port=fd,…"). The worker never binds, so it never
needs root; a restarted or replacement worker takes over the very same sockets, so the
connections waiting in their accept queues are served, not reset; and the kernel spreads new
connections over the slots.

mitmproxy's listener (`proxy/mode_servers.py`, `AsyncioServerInstance.listen`) calls
`asyncio.start_server(handler, host, port)`: we give that module an asyncio whose
`start_server` serves our socket for a port we were handed, and binds as usual otherwise.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from wakeproxy.mitm.guard import AsyncioWith, Fallback, calls_asyncio

ENV = "WAKEPROXY_LISTEN_FDS"
BACKLOG = 4096
FALLBACK = Fallback("workers bind their own listeners and need the privileges for it")


def encode(fds: dict[int, int]) -> str:
    return ",".join(f"{port}={fd}" for port, fd in sorted(fds.items()))


def decode(text: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for part in filter(None, text.split(",")):
        port, _, fd = part.partition("=")
        out[int(port)] = int(fd)
    return out


class _Handed:
    """The sockets we were given, by port."""

    def __init__(self, fds: dict[int, int]) -> None:
        self.socks = {port: socket.socket(fileno=fd) for port, fd in fds.items()}

    async def start_server(self, handler: Any, host: Any = None, port: Any = None, **kwargs: Any) -> asyncio.Server:
        # Each handed socket is served once, and closing the server closes it: a draining worker then
        # holds no listening socket, so new connections go to the other workers, or are refused once
        # every holder has closed (as with one process), never queued where nobody accepts.
        sock = self.socks.pop(port, None) if isinstance(port, int) else None
        if sock is None:
            return await asyncio.start_server(handler, host, port, **kwargs)
        return await asyncio.start_server(handler, sock=sock, backlog=BACKLOG, **kwargs)


def shape_ok() -> bool:
    return calls_asyncio("mitmproxy.proxy.mode_servers", "AsyncioServerInstance", "listen", "start_server")


def install(environ: dict[str, str] | None = None) -> bool:
    """Serve the sockets named in WAKEPROXY_LISTEN_FDS; False (with one warning) if mitmproxy differs."""
    text = (os.environ if environ is None else environ).get(ENV, "")
    if not text:
        return False
    if not shape_ok():
        return FALLBACK.decline("AsyncioServerInstance.listen calling proxy/mode_servers.py's asyncio.start_server")
    from mitmproxy.proxy import mode_servers

    handed = _Handed(decode(text))
    setattr(mode_servers, "asyncio", AsyncioWith(asyncio, start_server=handed.start_server))
    return True


def uninstall() -> None:
    try:
        from mitmproxy.proxy import mode_servers
    except ImportError:
        return
    if isinstance(getattr(mode_servers, "asyncio", None), AsyncioWith):
        setattr(mode_servers, "asyncio", asyncio)


def bind(host: str, port: int) -> socket.socket:
    """A listening SO_REUSEPORT socket for one worker slot (the supervisor's side)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
