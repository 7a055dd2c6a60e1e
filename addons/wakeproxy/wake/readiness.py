"""Is a woken container ready? Its backend port accepts a connection and, with the label
`wakeproxy.ready-path`, a GET there answers below 500. Plain asyncio; every probe closes what it
opened, also when the app never answers."""

from __future__ import annotations

import asyncio
import ssl

from wakeproxy.routing.snapshot import Backend

PROBE_CONNECT_TIMEOUT = 0.5
READY_PATH_TIMEOUT = 2.0


async def ready(backend: Backend) -> bool:
    """Does the backend accept a connection (and answer its ready-path below 500)?"""
    assert backend.address is not None
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(backend.address, backend.port),
                                           PROBE_CONNECT_TIMEOUT)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return not backend.ready_path or await ready_path_ok(backend)


async def ready_path_ok(backend: Backend) -> bool:
    """GET the container's wakeproxy.ready-path: anything below 500 counts as ready."""
    assert backend.address is not None and backend.ready_path is not None
    context = None
    if backend.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(backend.address, backend.port, ssl=context), READY_PATH_TIMEOUT
        )
    except (TimeoutError, OSError, ssl.SSLError):
        return False
    try:
        writer.write(
            f"GET {backend.ready_path} HTTP/1.1\r\nHost: {backend.address}\r\nConnection: close\r\n"
            f"User-Agent: wakeproxy-readiness\r\n\r\n".encode()
        )
        line = await asyncio.wait_for(reader.readline(), READY_PATH_TIMEOUT)
        parts = line.split()
        return len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) < 500
    except (TimeoutError, OSError, ssl.SSLError, ValueError):
        return False
    finally:
        writer.close()  # also when the app never answers: no half-open probe is left behind
