"""One end of the channel between the controller and a serving worker (a Unix socket).

`Peer.send` never waits: a frame goes into the transport's buffer, and a peer whose buffer grows
past `MAX_BUFFER` (it stopped reading) is disconnected rather than let to hold the sender's memory.
`Peer.messages()` yields (kind, body) as whole frames arrive; a frame that is not ours ends the
connection (nothing half-understood is acted on).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

from wakeproxy.observe.logsafe import get_logger
from wakeproxy.planes.wire import LAZY_OVER, MAX_FRAME, FrameReader, WireError, frame

logger = get_logger(__name__)

MAX_BUFFER = 256 * 1024 * 1024  # unsent bytes for one peer before it counts as stuck
READ_CHUNK = 256 * 1024
SOCKET_NAME = "control.sock"


FROM_WORKER_MAX_FRAME = 8 * 1024 * 1024  # what a worker sends is small: wake asks, activity reports


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str,
                 max_frame: int | None = None, lazy_over: int | None = None) -> None:
        self.reader, self.writer, self.name = reader, writer, name
        self.max_frame = max_frame
        self.lazy_over = lazy_over  # bodies of frames over this many bytes come as wire.Deferred
        self.closed = False

    def send(self, kind: str, body: Any) -> bool:
        return self.send_raw(frame(kind, body))

    def send_raw(self, data: bytes) -> bool:
        """False when the peer is gone (or was just dropped for not reading)."""
        if self.closed or self.writer.is_closing():
            self.closed = True
            return False
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > MAX_BUFFER:
            logger.warning(f"channel: {self.name} reads nothing ({MAX_BUFFER} bytes unsent); disconnecting it")
            self.close()
            return False
        return True

    async def messages(self) -> AsyncIterator[tuple[str, Any]]:
        frames = FrameReader(self.max_frame or MAX_FRAME, self.lazy_over)
        try:
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    return
                for message in frames.feed(data):
                    yield message
        except WireError as e:
            logger.warning(f"channel: {self.name} sent a bad frame ({e}); disconnecting it")
        except (ConnectionError, OSError):
            return
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        if not self.writer.is_closing():
            self.writer.close()


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The uid of the process on the other end of a Unix socket (SO_PEERCRED), or None."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


async def connect(path: str) -> Peer:
    reader, writer = await asyncio.open_unix_connection(path, limit=READ_CHUNK)
    # A worker's end: a large snapshot is unpacked in a thread, with the rest of its decoding.
    return Peer(reader, writer, f"controller ({path})", lazy_over=LAZY_OVER)


def socket_path(state_dir: os.PathLike[str] | str) -> str:
    return os.path.join(os.fspath(state_dir), SOCKET_NAME)
