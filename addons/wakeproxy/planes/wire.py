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


LAZY_OVER = 256 * 1024  # frames larger than this: only the kind is read at once, the body on `load()`


class Deferred:
    """The body of a large frame, not yet unpacked: `load()` it off the event loop (a thread)."""

    def __init__(self, unpacker: msgpack.Unpacker) -> None:
        self._unpacker = unpacker

    def load(self) -> Any:
        try:
            return self._unpacker.unpack()
        except (ValueError, msgpack.UnpackException) as e:
            raise WireError(f"not a msgpack frame: {e}") from None


def loaded(body: Any) -> Any:
    """The body, unpacked if it was deferred."""
    return body.load() if isinstance(body, Deferred) else body


class FrameReader:
    """Bytes in (any chunks), whole frames out as (kind, body). The body of a frame over
    `lazy_over` bytes is a `Deferred`, so that unpacking a large snapshot never holds up the caller."""

    def __init__(self, max_frame: int = MAX_FRAME, lazy_over: int | None = None) -> None:
        self.max_frame = max_frame
        self.lazy_over = lazy_over
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
            if self.lazy_over is not None and n > self.lazy_over:
                out.append(self._deferred(raw))
                continue
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


    @staticmethod
    def _deferred(raw: bytes) -> tuple[str, Any]:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(raw) + 1)
        unpacker.feed(raw)
        try:
            if unpacker.read_array_header() != 3:
                raise WireError("not a [version, kind, body] frame")
            version, kind = unpacker.unpack(), unpacker.unpack()
        except (ValueError, msgpack.UnpackException) as e:
            raise WireError(f"not a msgpack frame: {e}") from None
        if version != WIRE_VERSION:
            raise WireError(f"a frame of wire version {version!r}; this side speaks {WIRE_VERSION}")
        if not isinstance(kind, str):
            raise WireError("not a [version, kind, body] frame")
        return kind, Deferred(unpacker)


# --- values as plain data ----------------------------------------------------------------------


def to_plain(value: Any) -> Any:
    """A frozen dataclass value → lists, dicts and scalars (see the module docstring)."""
    cls = type(value)
    if cls in _SCALARS or value is None:
        return value
    names = _INIT_FIELDS.get(cls)
    if names is None and dataclasses.is_dataclass(cls):
        names = _INIT_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls) if f.init)
    if names is not None:
        return [to_plain(getattr(value, n)) for n in names]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, (frozenset, set)):
        return [to_plain(v) for v in sorted(value)]
    raise TypeError(f"{cls.__name__} has no plain form")


_SCALARS = frozenset({str, int, float, bool, bytes})
_INIT_FIELDS: dict[type, tuple[str, ...]] = {}  # dataclass → its init fields, in order


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
        return _builder(tp)(data)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise WireError(f"{getattr(tp, '__name__', tp)} does not fit the data: {e}") from None


_BUILDERS: dict[Any, Any] = {}


def _builder(tp: Any) -> Any:
    """A function data → value for type `tp`, made once per type (decoding walks no type hints)."""
    built = _BUILDERS.get(tp)
    if built is None:
        built = _BUILDERS[tp] = _make_builder(tp)
    return built


def _make_builder(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        cls = tp
        fields = _fields(cls)
        names = [n for n, _ in fields]
        parts = [_builder(ftp) for _, ftp in fields]
        n = len(fields)

        def build_dataclass(data: Any) -> Any:
            if not isinstance(data, list) or len(data) != n:
                raise ValueError(f"expected the {n} fields of {cls.__name__}")
            return cls(**{name: part(v) for name, part, v in zip(names, parts, data, strict=True)})
        return build_dataclass
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        members = [_builder(a) for a in args if a is not type(None)]

        def build_union(data: Any) -> Any:
            if data is None and optional:
                return None
            last: Exception | None = None
            for member in members:
                try:
                    return member(data)
                except (TypeError, ValueError) as e:
                    last = e
            raise ValueError(f"no member of {tp} fits: {last}")
        return build_union
    if origin in (Mapping, dict) or tp is dict:
        kb, vb = (_builder(a) for a in (args or (Any, Any)))

        def build_mapping(data: Any) -> Any:
            if not isinstance(data, dict):
                raise ValueError("expected a mapping")
            return {kb(k): vb(v) for k, v in data.items()}
        return build_mapping
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _builder(args[0])

            def build_tuple(data: Any) -> Any:
                if not isinstance(data, list):
                    raise ValueError("expected a list")
                return tuple(item(v) for v in data)
            return build_tuple
        items = [_builder(a) for a in args]

        def build_fixed(data: Any) -> Any:
            if not isinstance(data, list) or len(data) != len(items):
                raise ValueError(f"expected {len(items)} items")
            return tuple(b(v) for b, v in zip(items, data, strict=True))
        return build_fixed
    if origin is frozenset:
        item = _builder(args[0])

        def build_frozenset(data: Any) -> Any:
            if not isinstance(data, list):
                raise ValueError("expected a list")
            return frozenset(item(v) for v in data)
        return build_frozenset
    if tp is Any:
        return lambda data: data
    if tp is float:
        def build_float(data: Any) -> float:
            if isinstance(data, bool) or not isinstance(data, (int, float)):
                raise ValueError("expected a number")
            return float(data)
        return build_float
    if tp in (str, int, bool, bytes):
        def build_scalar(data: Any) -> Any:
            if type(data) is not tp:
                raise ValueError(f"expected {tp.__name__}")
            return data
        return build_scalar
    raise TypeError(f"no plain form for {tp}")


def roundtrip(value: T) -> T:
    """to_plain → msgpack → from_plain (what a value looks like on the other end)."""
    raw = msgpack.packb(to_plain(value), use_bin_type=True)
    out: T = from_plain(type(value), msgpack.unpackb(raw, raw=False, strict_map_key=False))
    return out
