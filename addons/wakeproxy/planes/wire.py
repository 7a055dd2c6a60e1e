"""The channel's wire format: versioned, length-prefixed msgpack frames, and our values as plain data.

A frame is a 4-byte big-endian length and a msgpack array `[version, kind, body]`. `FrameReader`
takes bytes as they come and gives whole frames; a frame over `MAX_FRAME` or of another version is
a `WireError` (the connection is then closed: nothing half-understood is acted on).

Snapshots, config values and the like cross the channel as plain data: `to_plain` turns a frozen
dataclass (and the tuples, mappings, frozensets and optionals in it) into lists, dicts and scalars;
`from_plain(cls, data)` builds it again from the class's type hints. A dataclass becomes the list of
its init fields in order (fields computed in `__post_init__` are computed again), so both ends must
run the same version: the frame's version says so. No pickle: nothing in a frame can run code.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import msgpack

WIRE_VERSION = 1
MAX_FRAME = 64 * 1024 * 1024  # a snapshot of 10,000 containers is a few MB
_LEN = struct.Struct(">I")

T = TypeVar("T")


class WireError(Exception):
    """A frame that cannot be used: too large, another version, or not our format."""


def frame(kind: str, body: Any) -> bytes:
    """One message, ready to write."""
    data = msgpack.packb([WIRE_VERSION, kind, body], use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise WireError(f"a {kind} frame of {len(data)} bytes is over the {MAX_FRAME} allowed")
    return _LEN.pack(len(data)) + data


class FrameReader:
    """Bytes in (any chunks), whole frames out as (kind, body)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        self._buf += data
        out: list[tuple[str, Any]] = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self.max_frame:
                raise WireError(f"a frame of {n} bytes is over the {self.max_frame} allowed")
            if len(self._buf) < _LEN.size + n:
                break
            raw = bytes(self._buf[_LEN.size:_LEN.size + n])
            del self._buf[:_LEN.size + n]
            try:
                msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            except (ValueError, msgpack.UnpackException) as e:
                raise WireError(f"not a msgpack frame: {e}") from None
            if not (isinstance(msg, list) and len(msg) == 3 and isinstance(msg[1], str)):
                raise WireError("not a [version, kind, body] frame")
            if msg[0] != WIRE_VERSION:
                raise WireError(f"a frame of wire version {msg[0]!r}; this side speaks {WIRE_VERSION}")
            out.append((msg[1], msg[2]))
        return out


# --- values as plain data ----------------------------------------------------------------------


def to_plain(value: Any) -> Any:
    """A frozen dataclass value → lists, dicts and scalars (see the module docstring)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value) if isinstance(value, (frozenset, set)) else value
        return [to_plain(v) for v in items]
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    raise TypeError(f"{type(value).__name__} has no plain form")


_HINTS: dict[type, list[tuple[str, Any]]] = {}


def _fields(cls: type) -> list[tuple[str, Any]]:
    hints = _HINTS.get(cls)
    if hints is None:
        module = sys.modules[cls.__module__]
        resolved = typing.get_type_hints(cls, vars(module))
        hints = _HINTS[cls] = [(f.name, resolved[f.name]) for f in dataclasses.fields(cls) if f.init]
    return hints


def from_plain(tp: Any, data: Any) -> Any:
    """Build a value of type `tp` from `to_plain`'s output; WireError when the data does not fit."""
    try:
        return _build(tp, data)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise WireError(f"{getattr(tp, '__name__', tp)} does not fit the data: {e}") from None


def _build(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        fields = _fields(tp)
        if not isinstance(data, list) or len(data) != len(fields):
            raise ValueError(f"expected the {len(fields)} fields of {tp.__name__}")
        return tp(**{name: _build(ftp, v) for (name, ftp), v in zip(fields, data, strict=True)})
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        last: Exception | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _build(arg, data)
            except (TypeError, ValueError) as e:
                last = e
        raise ValueError(f"no member of {tp} fits: {last}")
    if origin in (Mapping, dict) or tp is dict:
        if not isinstance(data, dict):
            raise ValueError("expected a mapping")
        ktp, vtp = args or (Any, Any)
        return {_build(ktp, k): _build(vtp, v) for k, v in data.items()}
    if origin is tuple:
        if not isinstance(data, list):
            raise ValueError("expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v) for v in data)
        if len(args) != len(data):
            raise ValueError(f"expected {len(args)} items")
        return tuple(_build(a, v) for a, v in zip(args, data, strict=True))
    if origin is frozenset:
        if not isinstance(data, list):
            raise ValueError("expected a list")
        return frozenset(_build(args[0], v) for v in data)
    if tp is Any:
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ValueError("expected a number")
        return float(data)
    if tp in (str, int, bool, bytes):
        if not isinstance(data, tp) or (tp is int and isinstance(data, bool)):
            raise ValueError(f"expected {tp.__name__}")
        return data
    raise TypeError(f"no plain form for {tp}")


def roundtrip(value: T) -> T:
    """to_plain → msgpack → from_plain (what a value looks like on the other end)."""
    raw = msgpack.packb(to_plain(value), use_bin_type=True)
    out: T = from_plain(type(value), msgpack.unpackb(raw, raw=False, strict_map_key=False))
    return out
