"""Test backend: a small HTTP/1.1 + WebSocket server using only the stdlib.

It runs inside a FROM-scratch container that bind-mounts the host's Python
read-only (see conftest.py), so it must not import anything outside the
standard library.

Environment:
  PORT                 port to listen on (default 80)
  BACKEND_NAME         name echoed in JSON answers (default: hostname)
  SLEEP_BEFORE_LISTEN  seconds to sleep before binding (default 0)
  TLS_CERT, TLS_KEY    PEM files: serve HTTPS instead of plain HTTP

Endpoints (HTTP/1.1, keep-alive):
  GET  /                 200 JSON {"backend", "method", "path", "headers"}
  GET  /download?size=N  N bytes of pattern_chunk() data, Content-Length, 64 KiB chunks
  POST /upload           body (Content-Length or chunked) -> {"size", "sha256"}
  GET  /sse              text/event-stream, 5 events 200 ms apart
  GET  /ws               WebSocket echo (text, binary, ping, close)
  GET  /sleep?s=N        answers after N seconds (at most 30)
  anything else          same as GET /

Every request is printed to stdout ("REQ <method> <target> host=<host>") so a
test can prove from `docker logs` whether the container was contacted. With
RAW_CAPTURE=1 every accepted connection prints "CONN" and every byte read from
it is printed too ("RAW <base64>"), so a test can prove that nothing of a
request reached the backend.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
_PATTERN_PERIOD = 251  # prime, so chunk boundaries do not line up with it
_PATTERN = bytes(i % _PATTERN_PERIOD for i in range(_PATTERN_PERIOD * 263))
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def pattern_chunk(offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the download stream (byte i == i % 251)."""
    assert length <= CHUNK
    start = offset % _PATTERN_PERIOD
    return _PATTERN[start:start + length]


def pattern_sha256(size: int) -> str:
    """sha256 of the first `size` bytes of the download stream (used by tests)."""
    h = hashlib.sha256()
    off = 0
    while off < size:
        n = min(CHUNK, size - off)
        h.update(pattern_chunk(off, n))
        off += n
    return h.hexdigest()


NAME = os.environ.get("BACKEND_NAME") or socket.gethostname()


def log(*args: object) -> None:
    print(*args, flush=True)


class BadRequest(Exception):
    pass


async def read_headers(reader: asyncio.StreamReader) -> tuple[str, str, str, list[tuple[str, str]]] | None:
    line = await reader.readline()
    if not line:
        return None
    while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between requests
        line = await reader.readline()
        if not line:
            return None
    try:
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    except ValueError:
        raise BadRequest(f"bad request line {line!r}") from None
    headers: list[tuple[str, str]] = []
    while True:
        hl = await reader.readline()
        if not hl:
            raise BadRequest("eof in headers")
        if hl in (b"\r\n", b"\n"):
            break
        name, _, value = hl.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return method, target, version, headers


async def iter_body(reader: asyncio.StreamReader, hdrs: dict[str, str]):
    """Yield the request body in pieces (Content-Length or chunked)."""
    te = hdrs.get("transfer-encoding", "").lower()
    if "chunked" in te:
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise BadRequest("eof in chunked body")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                # trailers until empty line
                while True:
                    tl = await reader.readline()
                    if tl in (b"\r\n", b"\n", b""):
                        return
            remaining = size
            while remaining:
                data = await reader.read(min(remaining, CHUNK))
                if not data:
                    raise BadRequest("eof in chunk")
                remaining -= len(data)
                yield data
            await reader.readline()  # CRLF after the chunk
    else:
        remaining = int(hdrs.get("content-length", "0") or 0)
        while remaining:
            data = await reader.read(min(remaining, CHUNK))
            if not data:
                raise BadRequest("eof in body")
            remaining -= len(data)
            yield data


def response_head(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send_json(writer: asyncio.StreamWriter, obj: object, status: int = 200,
                    reason: str = "OK", keep_alive: bool = True) -> None:
    body = json.dumps(obj).encode()
    writer.write(response_head(status, reason, [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("X-Backend", NAME),
        ("Connection", "keep-alive" if keep_alive else "close"),
    ]) + body)
    await writer.drain()


async def handle_download(writer: asyncio.StreamWriter, query: dict[str, list[str]]) -> None:
    size = int(query.get("size", ["0"])[0])
    writer.write(response_head(200, "OK", [
        ("Content-Type", "application/octet-stream"),
        ("Content-Length", str(size)),
        ("X-Backend", NAME),
    ]))
    off = 0
    while off < size:
        n = min(CHUNK, size - off)
        writer.write(pattern_chunk(off, n))
        off += n
        await writer.drain()
    await writer.drain()


async def handle_upload(reader, writer, hdrs) -> None:
    h = hashlib.sha256()
    n = 0
    async for piece in iter_body(reader, hdrs):
        h.update(piece)
        n += len(piece)
    await send_json(writer, {"backend": NAME, "size": n, "sha256": h.hexdigest()})


async def handle_sse(writer: asyncio.StreamWriter) -> None:
    writer.write(response_head(200, "OK", [
        ("Content-Type", "text/event-stream"),
        ("Cache-Control", "no-cache"),
        ("Transfer-Encoding", "chunked"),
        ("X-Backend", NAME),
    ]))
    await writer.drain()
    for i in range(1, 6):
        if i > 1:
            await asyncio.sleep(0.2)
        data = json.dumps({"n": i, "t": time.time(), "backend": NAME})
        event = f"id: {i}\nevent: tick\ndata: {data}\n\n".encode()
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


# --- WebSocket (RFC 6455) --------------------------------------------------

async def ws_read_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
    b1, b2 = await reader.readexactly(2)
    fin = bool(b1 & 0x80)
    opcode = b1 & 0x0F
    masked = bool(b2 & 0x80)
    length = b2 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4) if masked else b""
    payload = await reader.readexactly(length) if length else b""
    if masked:
        # XOR with the 4-byte key, done on big ints for speed.
        key = (mask * (length // 4 + 1))[:length]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
    return fin, opcode, payload


def ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload  # server frames are never masked


async def handle_ws(reader, writer, hdrs) -> None:
    key = hdrs.get("sec-websocket-key")
    if "websocket" not in hdrs.get("upgrade", "").lower() or not key:
        await send_json(writer, {"error": "not a websocket handshake"}, 400, "Bad Request", keep_alive=False)
        return
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    writer.write(response_head(101, "Switching Protocols", [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept),
        ("X-Backend", NAME),
    ]))
    await writer.drain()
    msg_opcode = None
    parts: list[bytes] = []
    while True:
        try:
            fin, opcode, payload = await ws_read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        if opcode == 0x8:  # close: echo the status code back, then hang up
            writer.write(ws_frame(0x8, payload[:2]))
            await writer.drain()
            return
        if opcode == 0x9:  # ping
            writer.write(ws_frame(0xA, payload))
            await writer.drain()
            continue
        if opcode == 0xA:  # pong
            continue
        if opcode in (0x1, 0x2):
            msg_opcode, parts = opcode, [payload]
        elif opcode == 0x0 and msg_opcode is not None:
            parts.append(payload)
        else:
            writer.write(ws_frame(0x8, struct.pack("!H", 1002)))
            await writer.drain()
            return
        if fin:
            writer.write(ws_frame(msg_opcode, b"".join(parts)))
            await writer.drain()
            msg_opcode, parts = None, []


# --- connection loop ---------------------------------------------------------

RAW_CAPTURE = os.environ.get("RAW_CAPTURE") == "1"


class RecordingReader:
    """A StreamReader that prints every byte it hands out (RAW_CAPTURE=1)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    @staticmethod
    def _log(data: bytes) -> bytes:
        if data:
            log("RAW " + base64.b64encode(data).decode())
        return data

    async def readline(self) -> bytes:
        return self._log(await self._reader.readline())

    async def read(self, n: int = -1) -> bytes:
        return self._log(await self._reader.read(n))

    async def readexactly(self, n: int) -> bytes:
        try:
            return self._log(await self._reader.readexactly(n))
        except asyncio.IncompleteReadError as e:
            self._log(e.partial)
            raise


async def handle_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    if RAW_CAPTURE:
        log("CONN")
        reader = RecordingReader(reader)  # type: ignore[assignment]
    try:
        while True:
            req = await read_headers(reader)
            if req is None:
                return
            method, target, version, header_list = req
            hdrs: dict[str, str] = {}
            for k, v in header_list:
                lk = k.lower()
                hdrs[lk] = f"{hdrs[lk]}, {v}" if lk in hdrs else v
            log(f"REQ {method} {target} host={hdrs.get('host', '')} peer={peer[0] if peer else '?'}")
            url = urlsplit(target)
            path = url.path or "/"
            query = parse_qs(url.query)
            keep_alive = version == "HTTP/1.1" and "close" not in hdrs.get("connection", "").lower()

            if path == "/ws" and method == "GET":
                await handle_ws(reader, writer, hdrs)
                return
            if path == "/download" and method == "GET":
                await handle_download(writer, query)
            elif path == "/upload" and method == "POST":
                await handle_upload(reader, writer, hdrs)
            elif path == "/sse" and method == "GET":
                await handle_sse(writer)
            elif path == "/sleep":
                await asyncio.sleep(min(30.0, float(query.get("s", ["1"])[0])))
                await send_json(writer, {"backend": NAME, "slept": True}, keep_alive=keep_alive)
            else:
                # Drain any body so keep-alive stays in sync.
                async for _ in iter_body(reader, hdrs):
                    pass
                await send_json(writer, {
                    "backend": NAME,
                    "method": method,
                    "path": target,
                    "headers": hdrs,
                    "tls": writer.get_extra_info("ssl_object") is not None,
                }, keep_alive=keep_alive)
            if not keep_alive:
                return
    except BadRequest as e:
        log(f"ERR bad request: {e}")
        try:
            await send_json(writer, {"error": str(e)}, 400, "Bad Request", keep_alive=False)
        except Exception:
            pass
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main() -> None:
    port = int(os.environ.get("PORT", "80"))
    delay = float(os.environ.get("SLEEP_BEFORE_LISTEN", "0") or 0)
    if delay > 0:
        log(f"sleeping {delay}s before listening")
        await asyncio.sleep(delay)
    ssl_ctx = None
    if os.environ.get("TLS_CERT"):
        import ssl
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(os.environ["TLS_CERT"], os.environ.get("TLS_KEY") or None)
        ssl_ctx.set_alpn_protocols(["http/1.1"])
    server = await asyncio.start_server(handle_conn, host="0.0.0.0", port=port,
                                        reuse_address=True, ssl=ssl_ctx)
    log(f"backend {NAME} listening on {port}{' (tls)' if ssl_ctx else ''}")
    # As PID 1 in a container SIGTERM has no default action: handle it so
    # `docker stop` is quick.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    log("backend stopping")
    os._exit(0)  # do not wait for open streams


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
