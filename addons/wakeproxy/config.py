"""wakeproxy's YAML configuration, turned into frozen dataclasses.

Every error names the file, the line and the dotted key, so a user who made a
typo sees exactly where it is.  Nothing is half-applied: `load_config` either
returns a complete `Config` or raises `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wakeproxy.routing.hostnames import is_host_pattern, is_hostname


class ConfigError(Exception):
    """A configuration problem, already phrased for the user (file:line: key: what)."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ListenConfig:
    http: Address | None = Address("0.0.0.0", 80)
    https: Address | None = Address("0.0.0.0", 443)


@dataclass(frozen=True)
class DockerConfig:
    url: str | None = None
    networks: tuple[str, ...] = ()
    # In a container on a bridge network, connect the proxy's container to the networks of the sites
    # it serves (and leave them when no longer needed). Host networking and no container: nothing to do.
    join_networks: bool = True
    # Swarm services (docker/swarm.py): "auto" routes and wakes them when the engine is a Swarm
    # manager; "on" insists (a worker or a single engine is an error); "off" ignores services.
    swarm: str = "auto"
    swarm_resync: float = 10.0  # seconds between task listings while a service is up (rescheduling, node loss)
    max_replicas: int = 10  # a service's wakeproxy.replicas label is capped at this


@dataclass(frozen=True)
class SourcesConfig:
    """Which label conventions declare routes; each can be switched off."""

    wakeproxy: bool = True
    docksal: bool = True
    nginx_proxy: bool = True
    traefik: bool = True


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_in(ip: str, networks: tuple[Network, ...]) -> bool:
    """Is the client address `ip` (IPv4, IPv6, IPv4-mapped IPv6, with or without a zone) in `networks`?"""
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class ForwardedConfig:
    # Peers whose X-Forwarded-* headers are believed (CIDRs). Empty: nobody.
    trusted_proxies: tuple[Network, ...] = ()

    def trusts(self, ip: str) -> bool:
        return ip_in(ip, self.trusted_proxies)


@dataclass(frozen=True)
class NamesConfig:
    """Which names container labels may claim, and how ownership of a name is kept (see policy.py)."""

    # Patterns labels may claim; () = any name. "example.com": that name; "*.example.com": every
    # name under it (and wildcards under it); "{group}" stands for the claiming group's name.
    allow: tuple[str, ...] = ()
    wildcards: bool = True  # may labels declare `*.domain` at all
    max_per_group: int = 50  # names (hosts and wildcards) one group may own
    reserved: tuple[tuple[str, str], ...] = ()  # (name, group): names only that group may claim
    release_after: float = 60.0  # an owner keeps its name this long after its last claim is gone


@dataclass(frozen=True)
class LabelTrustConfig:
    """Labels that weaken the server's posture are honoured only when the operator allows them."""

    network: bool = False  # wakeproxy.network / traefik.docker.network outside docker.networks
    # wakeproxy.cert-name / io.docksal.cert-name; None (not set): off, and on with Docksal's /etc/certs/custom
    cert_name: bool | None = None
    https_redirect: bool = False  # wakeproxy.https-redirect=false
    keep_awake: bool = True  # io.docksal.permanent, wakeproxy.idle-timeout=0 or above idle.timeout
    debug: bool = False  # wakeproxy.debug=true: the container's traffic shown in the debug UI (`wakeproxy debug`)


@dataclass(frozen=True)
class WakeConfig:
    """How a request for a sleeping group is answered while the group starts."""

    strategy: str = "auto"  # auto: page for browser navigations, hold for the rest | hold | page
    timeout: float = 60.0  # a held request gets 504 after this long
    retry_after: float = 10.0  # cool-down after a failed wake before another is tried
    ignore_user_agents: tuple[re.Pattern[str], ...] = ()  # these never wake anything
    per_client: int = 10  # new wakes one client (IPv4 address or IPv6 /64) may cause per minute; 0 = no limit
    autostart: bool = True  # false: a request never starts a sleeping group (a page says so; Docksal's PROJECT_AUTOSTART=0)

    def ignores(self, user_agent: str) -> bool:
        return any(p.search(user_agent) for p in self.ignore_user_agents)


@dataclass(frozen=True)
class IdleConfig:
    """When an unused group is put to sleep, and how."""

    timeout: float = 1800.0  # seconds without a request in flight, an open stream or a byte moved; 0 = never
    action: str = "stop"  # stop | pause
    stop_timeout: float = 10.0  # `docker stop -t`
    remove_after: float = 0.0  # a sleeping group unused this long is removed (containers, its own networks); 0 = never
    remove_volumes: bool = False  # with remove_after: also the containers' anonymous volumes (never named ones)
    remove_label: str | None = None  # with remove_after: only groups with a member carrying this label
    permanent_sleeps: bool = False  # io.docksal.permanent=true only keeps a group from removal (Docksal's meaning)


@dataclass(frozen=True)
class StatusConfig:
    listen: Address | None = Address("127.0.0.1", 8099)  # read-only status endpoint; null turns it off


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics (observe/metrics.py), on a listener of their own, never the public ports."""

    listen: Address | None = Address("127.0.0.1", 9180)  # GET /metrics; null turns it off
    per_group: bool = False  # series per group (requests, wakes, last activity): bounded by max_groups
    max_groups: int = 2000  # groups with series of their own at most; the rest are summed as "other"


@dataclass(frozen=True)
class DebugConfig:
    """`wakeproxy debug`: one sandbox's live traffic in mitmweb (debug/), started only while something is watched."""

    listen: Address = Address("127.0.0.1", 8081)  # mitmweb's UI (token required); keep it on loopback
    max_flows: int = 500  # flows the UI keeps (the oldest finished ones go first)
    max_body: int = 1024 * 1024  # bodies above this are passed through, not kept (stream_large_bodies)
    max_memory: int = 128 * 1024 * 1024  # bytes of bodies and WebSocket messages it keeps in all
    default_for: float = 1800.0  # `wakeproxy debug NAME` without --for
    max_for: float = 86400.0  # the longest --for accepted


@dataclass(frozen=True)
class TlsConfig:
    certs_dir: Path | None = None  # <name>.crt + <name>.key; _wildcard.<domain>.crt for *.<domain>
    default_cert: Path | None = None  # served for names without a certificate of their own
    default_key: Path | None = None
    redirect: bool = True  # plain HTTP → 308 to https once the host has a valid certificate
    hsts: float = 0.0  # Strict-Transport-Security max-age in seconds; 0 = not sent


@dataclass(frozen=True)
class AcmeConfig:
    enabled: bool = False
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str | None = None
    ca_bundle: Path | None = None  # trust this CA for the ACME API (e.g. pebble's)
    eab_kid: str | None = None
    eab_hmac_key: str | None = None
    key_type: str = "ec256"  # ec256 | ec384 | rsa2048 | rsa4096
    concurrency: int = 2
    max_names_per_group: int = 10  # names one group may have certificates ordered for
    max_orders_per_group: int = 30  # orders (attempts) one group may cause per 24 hours


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may cost the proxy: time, header bytes, connections."""

    header_timeout: float = 10.0  # connect (or first byte of a keep-alive request) → request headers complete
    idle_timeout: float = 60.0  # keep-alive connection with nothing in flight
    max_header_bytes: int = 32768  # request line + headers; more → 431 and the connection is closed
    max_connections: int | None = None  # client connections at once; None (auto) = derived from the file limit
    connection_reserve: int = 512  # file descriptors kept free: upstreams, Docker, state files, accept bursts


@dataclass(frozen=True)
class UpstreamConfig:
    """Connections from the proxy to containers."""

    connect_timeout: float = 5.0  # a container that does not accept within this long: 504
    read_timeout: float = 300.0  # a response whose headers have not come this long after the request: 502
    keepalive: float = 15.0  # TCP keepalive: first probe after this long idle (0 = off)


@dataclass(frozen=True)
class LogConfig:
    """The access log (observe/access.py): one line per request."""

    access: str | None = None  # a file path, "-" for standard output; None: off
    access_format: str = "combined"  # combined (Apache/nginx's, plus our fields) | json
    format: str = "text"  # the proxy's own log lines: text | json (one object a line; set at start)


@dataclass(frozen=True)
class ShutdownConfig:
    drain: float = 10.0  # after SIGTERM, requests in flight get this long to finish


@dataclass(frozen=True)
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
    state_dir: Path = Path("/var/lib/wakeproxy")
    default_host: str | None = None
    # Clients (CIDRs) that see internal detail (container, group and network names, exit codes)
    # in error and waking pages; everyone else gets only what a visitor can act on.
    debug_clients: tuple[Network, ...] = LOOPBACK
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    names: NamesConfig = field(default_factory=NamesConfig)
    labels: LabelTrustConfig = field(default_factory=LabelTrustConfig)
    forwarded: ForwardedConfig = field(default_factory=ForwardedConfig)
    wake: WakeConfig = field(default_factory=WakeConfig)
    idle: IdleConfig = field(default_factory=IdleConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    # Serving processes of the `wakeproxy` command: None (auto) = one per core; 0 = everything in one
    # process, as under mitmdump -s. The controller (Docker, ACME, decisions) is always one process.
    workers: int | None = None
    user: str = "nobody"  # the workers' account when wakeproxy starts as root (name or uid[:gid])
    source: str = "<defaults>"

    def worker_count(self) -> int:
        return self.workers if self.workers is not None else max(1, len(os.sched_getaffinity(0)))

    def shows_detail(self, ip: str) -> bool:
        """May the client at `ip` see internal detail in pages (debug_clients)?"""
        return ip_in(ip, self.debug_clients)


# --- value parsers -----------------------------------------------------------

# `\s*+` (possessive): without it the two whitespace runs around an absent unit backtrack into each
# other, quadratic in the spaces of `1      x` (85 ms for 4 KB of them). Labels reach this (labels.py).
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*+(ms|s|m|h|d)?\s*$", re.ASCII)
# Go's compound form (`1h30m`, `10m0s`: Docksal's variables go to `docker logs --since`, which takes it).
_COMPOUND = re.compile(r"^\s*(?:\d+(?:\.\d+)?(?:ms|s|m|h|d)){2,8}\s*$", re.ASCII)
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`30s`, `5m`, `2h`, `1d`, `250ms` or plain seconds → seconds (float)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m, 2h or a number of seconds")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r} is not a duration (write 30s, 5m, 2h or a number of seconds)")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value) if len(value) <= 400 else None
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
            if seconds != float("inf"):  # 400 nines is a number, not a duration
                return seconds
        elif len(value) <= 100 and _COMPOUND.match(value):
            seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(value))
            if seconds != float("inf"):
                return seconds
    raise ValueError(f"{str(value)[:60]!r} is not a duration (write 30s, 5m, 2h, 1h30m or a number of seconds)")


def format_duration(seconds: float) -> str:
    """Seconds → `45s`, `2m05s`, `3h07m` (the inverse direction of parse_duration, for people)."""
    s = int(round(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def parse_address(value: Any) -> Address | None:
    """`host:port`, `[v6]:port` or a bare port → Address; null disables the listener."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        host, port_s = "0.0.0.0", str(value)
    elif isinstance(value, str):
        m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", value) or re.match(r"^([^:\[\]]*):(\d+)$", value)
        if not m:
            raise ValueError(f"{value!r} is not host:port (e.g. \"0.0.0.0:80\")")
        host, port_s = m.group(1) or "0.0.0.0", m.group(2)
    else:
        raise ValueError("expected \"host:port\" or null")
    port = int(port_s)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range 1-65535")
    return Address(host, port)


def _required_address(value: Any) -> Address:
    addr = parse_address(value)
    if addr is None:
        raise ValueError("expected \"host:port\" (this listener cannot be turned off)")
    return addr


def _hostname(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_hostname(value.lower().rstrip(".")):
        raise ValueError(f"{value!r} is not a hostname")
    return value.lower().rstrip(".")


def _hostname_or_wildcard(value: Any) -> str:
    if not isinstance(value, str) or not is_host_pattern(value.lower().rstrip(".")):
        raise ValueError(f"{value!r} is not a hostname or a *.domain wildcard")
    return value.lower().rstrip(".")


def _name_pattern(value: Any) -> str:
    """A names.allow pattern: a hostname or *.domain, where `{group}` may stand for labels."""
    if not isinstance(value, str):
        raise ValueError("expected a name pattern such as \"*.sandbox.example.com\" or \"{group}.example.com\"")
    v = value.lower().rstrip(".")
    if v.replace("{group}", "x").count("{") or v.replace("{group}", "x").count("}"):
        raise ValueError(f"{value!r}: the only placeholder is {{group}}")
    if not is_host_pattern(v.replace("{group}", "x")):
        raise ValueError(f"{value!r} is not a hostname or *.domain pattern")
    return v


def _group_ref(value: Any) -> str:
    """A group in names.reserved: `NAME`, or `KIND:NAME` with KIND compose, stack, group, container or service."""
    v = _str(value)
    kind, sep, name = v.partition(":")
    if sep and kind not in ("compose", "stack", "group", "container", "service") or not (name if sep else v):
        raise ValueError(f"{v!r} is not a group (NAME, or compose:NAME, stack:NAME, group:NAME, container:NAME, "
                         "service:NAME)")
    return v


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a whole number (0 or more)")
    return value


def _regex(value: Any) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise ValueError("expected a regular expression string")
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"{value!r} is not a valid regular expression: {e}") from None


def _positive_duration(value: Any) -> float:
    d = parse_duration(value)
    if d <= 0:
        raise ValueError("must be more than 0")
    return d


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)
    return parse


def _swarm_mode(value: Any) -> str:
    """docker.swarm: auto, or on / off (YAML reads a bare on/off/true/false as a boolean)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    if text in ("auto", "on", "off"):
        return text
    if text in ("true", "false"):
        return "on" if text == "true" else "off"
    raise ValueError(f"{value!r} is not one of auto, on, off")


def _opt_path(value: Any) -> Path | None:
    return None if value is None else Path(_str(value)).expanduser()


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _auto_or_positive_int(value: Any) -> int | None:
    if value == "auto" or value is None:
        return None
    return _positive_int(value)


def _auto_or_count(value: Any) -> int | None:
    if value == "auto" or value is None:
        return None
    return _count(value)


def _account(value: Any) -> str:
    text = _str(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}|\d{1,10}(:\d{1,10})?", text):
        raise ValueError("expected a user name or uid[:gid]")
    return text


def _int_at_least(minimum: int, unit: str) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected a whole number of {unit}, at least {minimum}")
        return value
    return parse


def _hsts(value: Any) -> float:
    if value is False or value is None:
        return 0.0
    return parse_duration(value)


def _url(value: Any) -> str:
    v = _str(value)
    if not re.match(r"^https?://[^\s/]+", v):
        raise ValueError(f"{v!r} is not an http(s) URL")
    return v


_DOCKER_URL = re.compile(r"(unix|tcp|ssh|http|https)://[^\s]+")


def _docker_url(value: Any) -> str | None:
    """`unix:///var/run/docker.sock`, `tcp://host:2375`, `ssh://user@host`, or null (DOCKER_HOST / the default)."""
    if value is None:
        return None
    v = _str(value)
    if not _DOCKER_URL.fullmatch(v) or (v.startswith("unix://") and not v[len("unix://"):].startswith("/")):
        raise ValueError(f"{v!r} is not a Docker engine URL (unix:///var/run/docker.sock, tcp://HOST:PORT, "
                         "ssh://USER@HOST)")
    return v


def _overlap(a: Address, b: Address) -> bool:
    """Would two listeners fight over one port?"""
    wildcard = ("0.0.0.0", "::", "")
    return a.port == b.port and (a.host == b.host or a.host in wildcard or b.host in wildcard)


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError("expected a CIDR string such as \"10.0.0.0/8\"")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network (CIDR)") from None


# --- YAML walking with line numbers --------------------------------------------


class _Reader:
    """Walks a composed YAML node tree, remembering lines for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: yaml.Node | None, key: str, msg: str) -> ConfigError:
        env = getattr(node, "env_var", None)
        if env:
            return ConfigError(f"environment variable {env}: {key}: {msg}")
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return ConfigError(f"{self.source}{line}: {key}: {msg}")

    def mapping(self, node: yaml.Node, key: str, allowed: set[str]) -> dict[str, yaml.Node]:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key or "(top level)", "expected a mapping of keys")
        out: dict[str, yaml.Node] = {}
        for knode, vnode in node.value:
            name = str(knode.value)
            full = f"{key}.{name}" if key else name
            if name not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.fail(knode, full, f"unknown key (known here: {known})")
            if name in out:
                raise self.fail(knode, full, "key given twice")
            out[name] = vnode
        return out

    def value(self, node: yaml.Node, key: str, parse: Callable[[Any], Any]) -> Any:
        raw = yaml.safe_load(yaml.serialize(node)) if not isinstance(node, yaml.ScalarNode) else _scalar(node)
        try:
            return parse(raw)
        except (ValueError, TypeError) as e:
            raise self.fail(node, key, str(e)) from None

    def pairs(self, node: yaml.Node, key: str, parse_key: Callable[[Any], Any],
              parse_value: Callable[[Any], Any]) -> tuple[tuple[Any, Any], ...]:
        """A mapping of free-form keys (e.g. hostname → group) → sorted (key, value) pairs."""
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return ()
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, "expected a mapping")
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            k = self.value(knode, f"{key}.{knode.value}", parse_key)
            if k in out:
                raise self.fail(knode, f"{key}.{knode.value}", "key given twice")
            out[k] = self.value(vnode, f"{key}.{knode.value}", parse_value)
        return tuple(sorted(out.items()))

    def list_of(self, node: yaml.Node, key: str, parse: Callable[[Any], Any]) -> tuple[Any, ...]:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return ()
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, key, "expected a list")
        return tuple(self.value(item, f"{key}[{i}]", parse) for i, item in enumerate(node.value))


def _scalar(node: yaml.ScalarNode) -> Any:
    return yaml.safe_load(yaml.serialize(node))


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _opt_bool(value: Any) -> bool | None:
    return None if value is None else _bool(value)


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _section(r: _Reader, node: yaml.Node | None, key: str, cls: type, parsers: dict[str, Callable[..., Any]]) -> Any:
    """Build dataclass `cls` from mapping `node`; `parsers` maps field → (reader, node, key) → value."""
    if node is None:
        return cls()
    fields = r.mapping(node, key, set(parsers))
    kwargs = {name: parsers[name](r, fields[name], f"{key}.{name}") for name in fields}
    return cls(**kwargs)


def _scalar_field(parse: Callable[[Any], Any]) -> Callable[[_Reader, yaml.Node, str], Any]:
    return lambda r, n, k: r.value(n, k, parse)


def _list_field(parse: Callable[[Any], Any]) -> Callable[[_Reader, yaml.Node, str], Any]:
    return lambda r, n, k: r.list_of(n, k, parse)


# Each config section: its dataclass and a parser per key (the keys are the public contract).
_SECTIONS: dict[str, tuple[type, dict[str, Callable[[_Reader, yaml.Node, str], Any]]]] = {
    "listen": (ListenConfig, {"http": _scalar_field(parse_address), "https": _scalar_field(parse_address)}),
    "docker": (DockerConfig, {"url": _scalar_field(_docker_url), "networks": _list_field(_str),
                              "join_networks": _scalar_field(_bool),
                              "swarm": _scalar_field(_swarm_mode),
                              "swarm_resync": _scalar_field(_positive_duration),
                              "max_replicas": _scalar_field(_positive_int)}),
    "sources": (SourcesConfig, {f.name: _scalar_field(_bool) for f in dataclasses.fields(SourcesConfig)}),
    "names": (NamesConfig, {
        "allow": _list_field(_name_pattern),
        "wildcards": _scalar_field(_bool),
        "max_per_group": _scalar_field(_positive_int),
        "reserved": lambda r, n, k: r.pairs(n, k, _hostname_or_wildcard, _group_ref),
        "release_after": _scalar_field(parse_duration),
    }),
    "labels": (LabelTrustConfig, {f.name: _scalar_field(_opt_bool if f.name == "cert_name" else _bool)
                                  for f in dataclasses.fields(LabelTrustConfig)}),
    "forwarded": (ForwardedConfig, {"trusted_proxies": _list_field(_network)}),
    "wake": (WakeConfig, {
        "strategy": _scalar_field(_choice("auto", "hold", "page")),
        "timeout": _scalar_field(_positive_duration),
        "retry_after": _scalar_field(parse_duration),
        "ignore_user_agents": _list_field(_regex),
        "per_client": _scalar_field(_count),
        "autostart": _scalar_field(_bool),
    }),
    "idle": (IdleConfig, {
        "timeout": _scalar_field(parse_duration),
        "action": _scalar_field(_choice("stop", "pause")),
        "stop_timeout": _scalar_field(parse_duration),
        "remove_after": _scalar_field(parse_duration),
        "remove_volumes": _scalar_field(_bool),
        "remove_label": _scalar_field(_opt_str),
        "permanent_sleeps": _scalar_field(_bool),
    }),
    "status": (StatusConfig, {"listen": _scalar_field(parse_address)}),
    "log": (LogConfig, {"access": _scalar_field(_opt_str), "access_format": _scalar_field(_choice("combined", "json")),
                        "format": _scalar_field(_choice("text", "json"))}),
    "metrics": (MetricsConfig, {"listen": _scalar_field(parse_address), "per_group": _scalar_field(_bool),
                                "max_groups": _scalar_field(_positive_int)}),
    "debug": (DebugConfig, {"listen": _scalar_field(_required_address), "max_flows": _scalar_field(_positive_int),
                            "max_body": _scalar_field(_int_at_least(1024, "bytes")),
                            "max_memory": _scalar_field(_int_at_least(1024 * 1024, "bytes")),
                            "default_for": _scalar_field(_positive_duration),
                            "max_for": _scalar_field(_positive_duration)}),
    "tls": (TlsConfig, {
        "certs_dir": _scalar_field(_opt_path),
        "default_cert": _scalar_field(_opt_path),
        "default_key": _scalar_field(_opt_path),
        "redirect": _scalar_field(_bool),
        "hsts": _scalar_field(_hsts),
    }),
    "acme": (AcmeConfig, {
        "enabled": _scalar_field(_bool),
        "directory": _scalar_field(_url),
        "email": _scalar_field(_opt_str),
        "ca_bundle": _scalar_field(_opt_path),
        "eab_kid": _scalar_field(_opt_str),
        "eab_hmac_key": _scalar_field(_opt_str),
        "key_type": _scalar_field(_choice("ec256", "ec384", "rsa2048", "rsa4096")),
        "concurrency": _scalar_field(_positive_int),
        "max_names_per_group": _scalar_field(_positive_int),
        "max_orders_per_group": _scalar_field(_positive_int),
    }),
    "shutdown": (ShutdownConfig, {"drain": _scalar_field(parse_duration)}),
    "upstream": (UpstreamConfig, {
        "connect_timeout": _scalar_field(_positive_duration),
        "read_timeout": _scalar_field(_positive_duration),
        "keepalive": _scalar_field(parse_duration),
    }),
    "limits": (LimitsConfig, {
        "header_timeout": _scalar_field(_positive_duration),
        "idle_timeout": _scalar_field(_positive_duration),
        "max_header_bytes": _scalar_field(_int_at_least(1024, "bytes")),
        "max_connections": _scalar_field(_auto_or_positive_int),
        "connection_reserve": _scalar_field(_int_at_least(16, "file descriptors")),
    }),
}


# --- environment variables -----------------------------------------------------
# The keys container users set most, as `docker run -e` / compose `environment:` (nginx-proxy and
# Docksal users configure their proxies this way). A variable wins over the file's key; its value
# is read as the key's type: lists are comma-separated, `off`/`null`/empty turns an optional key off.

ENV_PREFIX = "WAKEPROXY_"
ENV_CONFIG = "WAKEPROXY_CONFIG"  # the config file, when --config is not given
_ENV_KEYS: dict[str, tuple[str, str]] = {  # variable → (dotted key, kind: str | opt | list | bool | int | auto)
    "WAKEPROXY_HTTP": ("listen.http", "opt"),
    "WAKEPROXY_HTTPS": ("listen.https", "opt"),
    "WAKEPROXY_STATE_DIR": ("state_dir", "str"),
    "WAKEPROXY_WORKERS": ("workers", "auto"),
    "WAKEPROXY_USER": ("user", "str"),
    "WAKEPROXY_DEFAULT_HOST": ("default_host", "opt"),
    "WAKEPROXY_DEBUG_CLIENTS": ("debug_clients", "list"),
    "WAKEPROXY_DOCKER_URL": ("docker.url", "opt"),
    "WAKEPROXY_NETWORKS": ("docker.networks", "list"),
    "WAKEPROXY_JOIN_NETWORKS": ("docker.join_networks", "bool"),
    "WAKEPROXY_SWARM": ("docker.swarm", "str"),
    "WAKEPROXY_NAMES_ALLOW": ("names.allow", "list"),
    "WAKEPROXY_TRUSTED_PROXIES": ("forwarded.trusted_proxies", "list"),
    "WAKEPROXY_WAKE_STRATEGY": ("wake.strategy", "str"),
    "WAKEPROXY_WAKE_TIMEOUT": ("wake.timeout", "str"),
    "WAKEPROXY_WAKE_PER_CLIENT": ("wake.per_client", "int"),
    "WAKEPROXY_WAKE_AUTOSTART": ("wake.autostart", "bool"),
    "WAKEPROXY_IDLE_TIMEOUT": ("idle.timeout", "str"),
    "WAKEPROXY_IDLE_ACTION": ("idle.action", "str"),
    "WAKEPROXY_REMOVE_AFTER": ("idle.remove_after", "str"),
    "WAKEPROXY_PERMANENT_SLEEPS": ("idle.permanent_sleeps", "bool"),
    "WAKEPROXY_STATUS_LISTEN": ("status.listen", "opt"),
    "WAKEPROXY_METRICS_LISTEN": ("metrics.listen", "opt"),
    "WAKEPROXY_DEBUG_LISTEN": ("debug.listen", "str"),
    "WAKEPROXY_ACCESS_LOG": ("log.access", "opt"),
    "WAKEPROXY_ACCESS_LOG_FORMAT": ("log.access_format", "str"),
    "WAKEPROXY_LOG_FORMAT": ("log.format", "str"),
    "WAKEPROXY_CERTS_DIR": ("tls.certs_dir", "opt"),
    "WAKEPROXY_DEFAULT_CERT": ("tls.default_cert", "opt"),
    "WAKEPROXY_DEFAULT_KEY": ("tls.default_key", "opt"),
    "WAKEPROXY_HTTPS_REDIRECT": ("tls.redirect", "bool"),
    "WAKEPROXY_LABELS_CERT_NAME": ("labels.cert_name", "bool"),
    "WAKEPROXY_HSTS": ("tls.hsts", "str"),
    "WAKEPROXY_ACME": ("acme.enabled", "bool"),
    "WAKEPROXY_ACME_EMAIL": ("acme.email", "opt"),
    "WAKEPROXY_ACME_DIRECTORY": ("acme.directory", "str"),
    "WAKEPROXY_ACME_CA_BUNDLE": ("acme.ca_bundle", "opt"),
    "WAKEPROXY_DRAIN": ("shutdown.drain", "str"),
}
# Docksal's vhost-proxy variables, with their meaning (README "Coming from Docksal"). A WAKEPROXY_* variable
# for the same key wins. DEFAULT_CERT names a certificate in the certificate folder (below).
_DOCKSAL_KEYS: dict[str, tuple[str, str]] = {
    "PROJECT_INACTIVITY_TIMEOUT": ("idle.timeout", "str"),  # 0 = never, as in Docksal
    "PROJECT_AUTOSTART": ("wake.autostart", "bool"),
    "PROJECT_DANGLING_TIMEOUT": ("idle.remove_after", "str"),  # 0 = never; only Docksal projects (below)
    "ACCESS_LOG": ("log.access", "stdout"),  # 1 = the access log on standard output; 0 leaves log.access as it is
}
# Docksal removes only projects whose containers carry this label (`proxyctl cleanup`): so does
# PROJECT_DANGLING_TIMEOUT here, unless idle.remove_label or WAKEPROXY_REMOVE_AFTER says otherwise.
DOCKSAL_PROJECT_LABEL = "io.docksal.project-root"
DOCKSAL_DANGLING = "PROJECT_DANGLING_TIMEOUT"
DOCKSAL_UNUSED = ("DEBUG_LOG", "STATS_LOG")  # Docksal's variables with nothing to map to (preflight notes)
DOCKSAL_DEFAULT_CERT = "DEFAULT_CERT"
DOCKSAL_CERTS_DIR = Path("/etc/certs/custom")  # Docksal's custom certificate folder: used when it exists

# Set by wakeproxy itself for its own processes, by its scripts, or read elsewhere (not config keys).
_ENV_OTHER = frozenset({
    ENV_CONFIG, "WAKEPROXY_LISTEN_FDS", "WAKEPROXY_READY_FD", "WAKEPROXY_CHANNEL", "WAKEPROXY_SLOT",
    "WAKEPROXY_WORKER_DIR", "WAKEPROXY_WORKER_UID", "WAKEPROXY_WORKER_GID", "WAKEPROXY_ACME_TEST_BACKOFF",
    "WAKEPROXY_CACHE",
})
_MAX_ENV_VALUE = 4096
_TRUE, _FALSE, _OFF = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"", "off", "null", "none"}


def env_keys() -> dict[str, str]:
    """Environment variable → the config key it sets (for docs and `wakeproxy check`)."""
    return {name: key for name, (key, _) in _ENV_KEYS.items()}


def docksal_keys() -> dict[str, str]:
    """Docksal's variable → the config key it sets."""
    return {name: key for name, (key, _) in _DOCKSAL_KEYS.items()}


def _env_node(name: str, value: str, kind: str) -> yaml.Node:
    def scalar(tag: str, text: str) -> yaml.ScalarNode:
        node = yaml.ScalarNode(f"tag:yaml.org,2002:{tag}", text)
        setattr(node, "env_var", name)
        return node

    if len(value) > _MAX_ENV_VALUE:
        raise ConfigError(f"environment variable {name}: longer than {_MAX_ENV_VALUE} characters")
    text = value.strip()
    node: yaml.Node
    if kind == "list":
        node = yaml.SequenceNode("tag:yaml.org,2002:seq",
                                 [scalar("str", item.strip()) for item in text.split(",") if item.strip()])
        setattr(node, "env_var", name)
    elif kind == "bool":
        if text.lower() not in _TRUE | _FALSE:
            key = (_ENV_KEYS.get(name) or _DOCKSAL_KEYS[name])[0]
            raise ConfigError(f"environment variable {name}: {key}: expected true or false, got {text[:100]!r}")
        node = scalar("bool", "true" if text.lower() in _TRUE else "false")
    elif kind == "opt" and text.lower() in _OFF:
        node = scalar("null", "null")
    elif kind == "stdout":
        if text.lower() not in _TRUE | _FALSE:
            raise ConfigError(f"environment variable {name}: expected 1 or 0, got {text[:100]!r}")
        node = scalar("str", "-") if text.lower() in _TRUE else scalar("null", "null")
    elif kind in ("int", "auto") and re.fullmatch(r"-?\d{1,9}", text):
        node = scalar("int", text)
    else:
        node = scalar("str", text)
    return node


def _apply_env(root: yaml.Node | None, env: Mapping[str, str], source: str) -> yaml.Node | None:
    """`root` with the keys set by WAKEPROXY_* variables replaced (or added); unknown variables are errors."""
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in _ENV_KEYS and k not in _ENV_OTHER)
    if unknown:
        raise ConfigError(f"environment variable {unknown[0]}: unknown (known: {', '.join(sorted(_ENV_KEYS))})")
    # Docksal's first: a WAKEPROXY_* variable for the same key replaces it.
    # (ACCESS_LOG=0, which `fin` may pass, leaves a configured log.access alone: only 1 turns it on.)
    wanted = [(name, *_DOCKSAL_KEYS[name]) for name in sorted(_DOCKSAL_KEYS) if name in env
              and not (_DOCKSAL_KEYS[name][1] == "stdout" and env[name].strip().lower() in _FALSE)]
    wanted += [(name, *_ENV_KEYS[name]) for name in sorted(_ENV_KEYS) if name in env]
    if not wanted:
        return root
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
        root = yaml.MappingNode("tag:yaml.org,2002:map", [])
    if not isinstance(root, yaml.MappingNode):
        return root  # parse_config reports the file's shape
    for name, key, kind in wanted:
        node = _env_node(name, env[name], kind)
        parent: yaml.MappingNode = root
        *path, leaf = key.split(".")
        for part in path:
            found = next((v for k, v in parent.value if str(k.value) == part), None)
            if found is None or (isinstance(found, yaml.ScalarNode) and found.tag.endswith(":null")):
                child = yaml.MappingNode("tag:yaml.org,2002:map", [])
                parent.value = [(k, v) for k, v in parent.value if str(k.value) != part]
                parent.value.append((yaml.ScalarNode("tag:yaml.org,2002:str", part), child))
                found = child
            if not isinstance(found, yaml.MappingNode):
                raise ConfigError(f"environment variable {name}: {source}: {part} is not a mapping")
            parent = found
        parent.value = [(k, v) for k, v in parent.value if str(k.value) != leaf]
        parent.value.append((yaml.ScalarNode("tag:yaml.org,2002:str", leaf), node))
    return root


def parse_config(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> Config:
    """The config in `text`, with the WAKEPROXY_* variables of `env` (None: none) applied on top."""
    r = _Reader(source)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if env is not None:
        root = _apply_env(root, env, source)
    if root is None:
        return Config(source=source)
    top = r.mapping(root, "", {"state_dir", "default_host", "debug_clients", "workers", "user", *_SECTIONS})
    kwargs: dict[str, Any] = {"source": source}
    if "state_dir" in top:
        kwargs["state_dir"] = Path(r.value(top["state_dir"], "state_dir", _str)).expanduser()
    if "default_host" in top:
        kwargs["default_host"] = r.value(top["default_host"], "default_host", _hostname)
    if "debug_clients" in top:
        kwargs["debug_clients"] = r.list_of(top["debug_clients"], "debug_clients", _network)
    if "workers" in top:
        kwargs["workers"] = r.value(top["workers"], "workers", _auto_or_count)
    if "user" in top:
        kwargs["user"] = r.value(top["user"], "user", _account)
    for name, (cls, parsers) in _SECTIONS.items():
        if name in top:
            kwargs[name] = _section(r, top[name], name, cls, parsers)
    # Rules that span two keys of one section.
    pairs = (
        ("listen", lambda c: c.http is None and c.https is None, "listen",
         "at least one of http and https must be set"),
        ("tls", lambda c: (c.default_cert is None) != (c.default_key is None), "tls.default_cert",
         "default_cert and default_key must be given together"),
        ("acme", lambda c: (c.eab_kid is None) != (c.eab_hmac_key is None), "acme.eab_kid",
         "eab_kid and eab_hmac_key must be given together"),
    )
    for name, broken, key, message in pairs:
        if name in kwargs and broken(kwargs[name]):
            raise r.fail(top[name], key, message)
    listen = kwargs.get("listen", ListenConfig())
    if listen.http is not None and listen.https is not None and _overlap(listen.http, listen.https):
        raise r.fail(top.get("listen"), "listen.https", f"{listen.https} and listen.http {listen.http} use one port")
    status_addr = kwargs.get("status", StatusConfig()).listen
    for name, addr in (("http", listen.http), ("https", listen.https)):
        if status_addr is not None and addr is not None and _overlap(status_addr, addr):
            raise r.fail(top.get("status") or top.get("listen"), "status.listen",
                         f"{status_addr} is also listen.{name} ({addr})")
    default_host = kwargs.get("default_host")
    reserved = dict(kwargs["names"].reserved) if "names" in kwargs else {}
    if default_host and default_host not in reserved:
        # The site that answers every unknown name is the operator's choice, never a label's.
        raise r.fail(top["default_host"], "default_host",
                     f"name the group that serves it in names.reserved (e.g. names: {{reserved: "
                     f"{{{default_host}: my-landing-page}}}}): no label may claim the default host")
    return Config(**kwargs)


def _docksal_layout(cfg: Config, env: Mapping[str, str], base: Path) -> Config:
    """Docksal's certificate layout: /etc/certs/custom (NAME.crt + NAME.key) when no tls.certs_dir is set
    and that folder exists (its io.docksal.cert-name labels honoured then, unless WAKEPROXY_LABELS_CERT_NAME
    says otherwise), and DEFAULT_CERT=NAME as the default certificate from it; and Docksal's scope
    of PROJECT_DANGLING_TIMEOUT (its projects only: DOCKSAL_PROJECT_LABEL)."""
    tls, trust = cfg.tls, cfg.labels
    if tls.certs_dir is None and DOCKSAL_CERTS_DIR.is_dir():
        tls = dataclasses.replace(tls, certs_dir=DOCKSAL_CERTS_DIR)
        if trust.cert_name is None:  # Docksal's folder: its io.docksal.cert-name labels count, unless set
            trust = dataclasses.replace(trust, cert_name=True)
    if trust.cert_name is None:
        trust = dataclasses.replace(trust, cert_name=False)
    name = env.get(DOCKSAL_DEFAULT_CERT, "").strip()
    if name and tls.default_cert is None:
        if not re.fullmatch(r"[A-Za-z0-9_*][A-Za-z0-9_.*-]{0,252}", name) or ".." in name:
            raise ConfigError(f"environment variable {DOCKSAL_DEFAULT_CERT}: {name[:100]!r} is not a certificate "
                              "name (NAME for NAME.crt and NAME.key in the certificate folder)")
        folder = tls.certs_dir or DOCKSAL_CERTS_DIR
        # As Docksal does: a name without its two files (`docksal`, its image's default, names its own
        # built-in certificate) leaves the generated default in place; preflight.notes says so.
        if docksal_default_cert_missing(name, folder if folder.is_absolute() else base / folder) is None:
            tls = dataclasses.replace(tls, default_cert=folder / f"{name}.crt", default_key=folder / f"{name}.key")
    idle = cfg.idle
    if env.get(DOCKSAL_DANGLING, "").strip() and "WAKEPROXY_REMOVE_AFTER" not in env \
            and idle.remove_label is None:
        idle = dataclasses.replace(idle, remove_label=DOCKSAL_PROJECT_LABEL)
    if tls is cfg.tls and idle is cfg.idle and trust is cfg.labels:
        return cfg
    return dataclasses.replace(cfg, tls=tls, idle=idle, labels=trust)


def docksal_default_cert_missing(name: str, folder: Path) -> str | None:
    """Why DEFAULT_CERT=name gives no default certificate from `folder`, else None."""
    missing = [f"{name}.{ext}" for ext in ("crt", "key") if not (folder / f"{name}.{ext}").is_file()]
    if not missing:
        return None
    return (f"{DOCKSAL_DEFAULT_CERT}={name}: {' and '.join(missing)} not in {folder}; the proxy's generated default "
            "certificate is served instead")


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """The config file at `path` with the process's WAKEPROXY_* variables (or `env`'s) on top."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    cfg = parse_config(text, str(p), os.environ if env is None else env)
    # Relative paths are taken from the config file's folder, wherever the proxy is started.
    base = p.parent

    def absolute(path: Path | None) -> Path | None:
        return None if path is None or path.is_absolute() else (base / path).resolve()

    if not cfg.state_dir.is_absolute():
        cfg = dataclasses.replace(cfg, state_dir=(base / cfg.state_dir).resolve())
    cfg = _docksal_layout(cfg, os.environ if env is None else env, base)
    tls = cfg.tls
    cfg = dataclasses.replace(cfg, tls=dataclasses.replace(
        tls,
        certs_dir=absolute(tls.certs_dir) or tls.certs_dir,
        default_cert=absolute(tls.default_cert) or tls.default_cert,
        default_key=absolute(tls.default_key) or tls.default_key,
    ), acme=dataclasses.replace(cfg.acme, ca_bundle=absolute(cfg.acme.ca_bundle) or cfg.acme.ca_bundle))
    return cfg
