"""One container's labels and environment → the routes it declares.

Pure functions, no Docker calls: `docker_view` feeds them a `ContainerInfo`
and they answer with `Route`s or raise `LabelError` with a message that names
the offending label.  Four conventions are understood so that users can move
over without relabelling: ours (`wakeproxy.*`), Docksal's
(`io.docksal.virtual-*`), nginx-proxy's (`VIRTUAL_*` environment variables)
and Traefik's Host rules (syntax: `traefik_rule`).

The input is written by whoever writes a sandbox's docker-compose.yml, so
every parser here is linear in its input and the input is bounded first:
`check_limits` rejects a container whose labels or env values that the proxy
reads are over `MAX_VALUE_BYTES` (or whose label names are over
`MAX_KEY_BYTES`), with more than `MAX_ROUTERS` Traefik routers or more than
`MAX_HOSTS` hosts.  Error messages quote at most `_SHOWN` characters of a
value, and never a value that is over the limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .config import SourcesConfig, parse_duration
from .hostnames import is_host_pattern, normalize_host
from .traefik_rule import RuleError, parse_rule, positive_matchers


# Every environment variable the proxy reads. `docker_view` keeps only these of a container's
# environment (the rest, often secrets, is never held in memory or written to the state dir).
NGINX_PROXY_ENV = ("VIRTUAL_HOST", "VIRTUAL_PORT", "VIRTUAL_PROTO")  # read by _nginx_proxy below
LETSENCRYPT_ENV = "LETSENCRYPT_HOST"  # read by settings_for
ACME_LABEL = "wakeproxy.acme"
CERT_NAME_LABELS = ("wakeproxy.cert-name", "io.docksal.cert-name")
REDIRECT_LABEL = "wakeproxy.https-redirect"
_CERT_BASE = re.compile(r"[a-z0-9_*][a-z0-9_.*-]{0,253}")
USED_ENV: frozenset[str] = frozenset({*NGINX_PROXY_ENV, LETSENCRYPT_ENV})

# Limits on what a container may declare (see check_limits). Generous for real use: a host list
# of 100 long names fits in 4 KB, and no real Traefik rule comes near it.
MAX_VALUE_BYTES = 4096  # one label or env value the proxy reads, UTF-8 encoded
MAX_KEY_BYTES = 256  # the name of a label the proxy reads (Traefik router and service names are in it)
MAX_ROUTERS = 32  # traefik.http.routers.<name>.rule labels on one container
MAX_HOSTS = 100  # distinct hosts (and wildcards) one container declares, over all conventions
_SHOWN = 64  # characters of a value quoted in an error message

# The labels the proxy reads besides every `wakeproxy.*` one (some are read by acme.py and tls.py).
_ALWAYS_READ = frozenset({
    "io.docksal.permanent", "io.docksal.cert-name",
    "com.docker.compose.project", "com.docker.compose.service", "com.docker.compose.depends_on",
})
_DOCKSAL_READ = frozenset({"io.docksal.virtual-host", "io.docksal.virtual-port"})
_TRAEFIK_READ = frozenset({"traefik.enable", "traefik.docker.network"})
_ROUTERS = "traefik.http.routers."
_SERVICES = "traefik.http.services."  # the service names are read from every such label's name
_SERVER_KEYS = (".loadbalancer.server.port", ".loadbalancer.server.scheme")  # and these values


class LabelError(ValueError):
    """A container's routing labels cannot be understood; the message says which and why."""


@dataclass(frozen=True)
class ContainerInfo:
    """What the proxy knows about one container: a plain value, built from the Docker API."""

    id: str
    name: str
    state: str  # created | running | paused | restarting | removing | exited | dead
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)  # from Docker: only the USED_ENV variables
    exposed_ports: tuple[int, ...] = ()  # TCP ports from the image/container config
    networks: Mapping[str, str] = field(default_factory=dict)  # network name → IP ("" when stopped)
    health: str | None = None  # starting | healthy | unhealthy | None (no HEALTHCHECK)
    exit_code: int | None = None
    created: float = 0.0  # creation time, whole seconds since the epoch (as the listing gives it)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def group(self) -> str:
        """The unit that is woken and put to sleep together (see `group_of`)."""
        return group_of(self)[2]


GROUP_LABEL = "wakeproxy.group"
PROJECT_LABEL = "com.docker.compose.project"
_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def group_of(info: ContainerInfo) -> tuple[str, str, str]:
    """(kind, base name, key) of the container's group, from its own labels only.

    - A Compose project `P` is one group, `P`; a `wakeproxy.group=G` label inside it makes a
      group `P/G` (a project can be split, but never joined with another project's containers).
    - Outside Compose, `wakeproxy.group=G` makes a group `G` of the containers that say so.
    - A container with neither is a group of its own, named like the container.
    A label never pulls another project's (or an unlabelled) container into a group: the kind
    ("compose", "group", "container") is part of who the group is.
    """
    project = info.labels.get(PROJECT_LABEL) or ""
    own = (info.labels.get(GROUP_LABEL) or "").strip()
    if project:
        key = project if not own or own == project else f"{project}/{own}"
        return "compose", key, key
    if own:
        return "group", own, own
    return "container", info.name, info.name


def check_group_labels(labels: Mapping[str, str]) -> None:
    """The group labels must be plain names (they end up in logs, pages and the state files)."""
    for key in (PROJECT_LABEL, GROUP_LABEL):
        value = labels.get(key)
        if value is not None and value.strip() and not _GROUP_NAME.fullmatch(value.strip()):
            raise LabelError(f"label {key}: {value[:80]!r} is not a name (letters, digits, '_', '.', '-'; "
                             "at most 63 characters)")


@dataclass(frozen=True)
class Dependency:
    """A Compose `depends_on` entry: start `service` first and wait for `condition`."""

    service: str
    condition: str  # service_started | service_healthy | service_completed_successfully


@dataclass(frozen=True)
class ContainerSettings:
    """Per-container wake settings from labels (None: the config's default applies)."""

    wake_strategy: str | None = None
    wake_timeout: float | None = None
    ready_path: str | None = None
    service: str | None = None  # com.docker.compose.service
    depends_on: tuple[Dependency, ...] = ()
    idle_timeout: float | None = None  # wakeproxy.idle-timeout; 0 = never (io.docksal.permanent=true too)
    idle_action: str | None = None  # wakeproxy.idle-action: stop | pause
    acme: bool = False  # wakeproxy.acme=true: certificates for the container's own hosts
    letsencrypt: tuple[str, ...] = ()  # env LETSENCRYPT_HOST (acme-companion's convention)
    cert_name: str | None = None  # wakeproxy.cert-name / io.docksal.cert-name: a custom certificate file base
    https_redirect: bool | None = None  # wakeproxy.https-redirect


@dataclass(frozen=True)
class Route:
    """One hostname (or `*.suffix` wildcard) a container answers for, and how to reach it."""

    host: str
    port: int
    scheme: str = "http"
    network: str | None = None  # a network the container must be reached on (label), else any allowed
    source: str = "wakeproxy"


_FALSE = {"false", "0", "no", "off"}
_TRUE = {"true", "1", "yes", "on"}


def _shown(value: str) -> str:
    """`value` quoted for an error message, cut to `_SHOWN` characters."""
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")


def _size(value: str) -> int:
    """Bytes, UTF-8 encoded."""
    return len(value.encode("utf-8", "surrogatepass"))


def _over(value: str, limit: int) -> bool:
    """Is `value` more than `limit` bytes? (A character is at most 4 bytes: short values are not encoded.)"""
    return len(value) > limit // 4 and _size(value) > limit


def _reads_value(key: str, sources: SourcesConfig | None) -> bool:
    """Does the proxy read the value of label `key`? (`sources` None: the labels settings_for reads.)"""
    if key.startswith("wakeproxy.") or key in _ALWAYS_READ:
        return True
    if sources is None:
        return False
    if sources.docksal and key in _DOCKSAL_READ:
        return True
    if sources.traefik:
        if key in _TRAEFIK_READ:
            return True
        if key.startswith(_ROUTERS) and key.endswith((".rule", ".service")):
            return True
        if key.startswith(_SERVICES) and key.endswith(_SERVER_KEYS):
            return True
    return False


def check_limits(info: ContainerInfo, sources: SourcesConfig | None) -> None:
    """LabelError when a label or env value the proxy reads is over MAX_VALUE_BYTES, or a label
    name over MAX_KEY_BYTES; the message gives the size, never the value.  Linear in the size of
    the labels and env; a few prefix tests a label for the labels it does not read."""
    for key, value in info.labels.items():
        value_read = _reads_value(key, sources)
        if not value_read and not (sources is not None and sources.traefik and key.startswith(_SERVICES)):
            continue
        if _over(key, MAX_KEY_BYTES):
            raise LabelError(f"label {_shown(key)}: the label name is {_size(key)} bytes, "
                             f"more than the {MAX_KEY_BYTES} allowed")
        if value_read and _over(value, MAX_VALUE_BYTES):
            raise LabelError(f"label {key}: the value is {_size(value)} bytes, more than the {MAX_VALUE_BYTES} allowed")
    env_read = (*NGINX_PROXY_ENV, LETSENCRYPT_ENV) if sources is not None and sources.nginx_proxy else (LETSENCRYPT_ENV,)
    for name in env_read:
        value = info.env.get(name)
        if value is not None and _over(value, MAX_VALUE_BYTES):
            raise LabelError(f"env {name}: the value is {_size(value)} bytes, more than the {MAX_VALUE_BYTES} allowed")


def parse_host(value: str, what: str) -> str:
    """One hostname or `*.domain` wildcard → its normalised form (`hostnames` decides what is one)."""
    h = normalize_host(value)
    if not is_host_pattern(h):
        raise LabelError(f"{what}: {_shown(value.strip())} is not a hostname or a *.domain wildcard")
    return h


def parse_hosts(value: str, what: str) -> list[str]:
    """A comma/space separated host list → validated, normalised hostnames, each once.

    At most MAX_VALUE_BYTES of input and MAX_HOSTS hosts (acme.py calls this on
    LETSENCRYPT_HOST directly, so the bounds are checked here too)."""
    if _over(value, MAX_VALUE_BYTES):
        raise LabelError(f"{what}: the value is {_size(value)} bytes, more than the {MAX_VALUE_BYTES} allowed")
    hosts: dict[str, None] = {}
    for part in value.replace(",", " ").split():
        hosts[parse_host(part, what)] = None
        if len(hosts) > MAX_HOSTS:
            raise LabelError(f"{what}: more than {MAX_HOSTS} hosts")
    if not hosts:
        raise LabelError(f"{what}: no hostname given")
    return list(hosts)


def parse_port(value: str, what: str) -> int:
    v = value.strip()
    digits = v[1:] if v[:1] in ("+", "-") else v
    if not (digits.isascii() and digits.isdigit()):  # int() would also take "8_0" and non-ASCII digits
        raise LabelError(f"{what}: {_shown(value)} is not a port number")
    if len(digits) > 5 or not 0 < int(v) < 65536:
        raise LabelError(f"{what}: port {_shown(v)} is out of range 1-65535")
    return int(v)


def parse_scheme(value: str, what: str) -> str:
    scheme = value.strip().lower()
    if scheme not in ("http", "https"):
        raise LabelError(f"{what}: {_shown(value)} is not a supported backend scheme (use http or https)")
    return scheme


def _default_port(info: ContainerInfo) -> int:
    """The container's only exposed TCP port, else 80 (the nginx-proxy rule)."""
    return info.exposed_ports[0] if len(info.exposed_ports) == 1 else 80


def _flag(value: str | None, what: str) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise LabelError(f"{what}: {_shown(value)} is not true or false")


def _ours(info: ContainerInfo) -> list[Route]:
    labels = info.labels
    if "wakeproxy.host" not in labels:
        return []
    hosts = parse_hosts(labels["wakeproxy.host"], "label wakeproxy.host")
    port = parse_port(labels["wakeproxy.port"], "label wakeproxy.port") if "wakeproxy.port" in labels else _default_port(info)
    scheme = parse_scheme(labels["wakeproxy.scheme"], "label wakeproxy.scheme") if "wakeproxy.scheme" in labels else "http"
    network = labels.get("wakeproxy.network") or None
    return [Route(h, port, scheme, network, "wakeproxy") for h in hosts]


def _docksal(info: ContainerInfo) -> list[Route]:
    labels = info.labels
    if "io.docksal.virtual-host" not in labels:
        return []
    hosts = parse_hosts(labels["io.docksal.virtual-host"], "label io.docksal.virtual-host")
    port = (
        parse_port(labels["io.docksal.virtual-port"], "label io.docksal.virtual-port")
        if "io.docksal.virtual-port" in labels
        else 80
    )
    return [Route(h, port, "http", None, "docksal") for h in hosts]


def _nginx_proxy(info: ContainerInfo) -> list[Route]:
    env = info.env
    if not env.get("VIRTUAL_HOST"):
        return []
    raw = env["VIRTUAL_HOST"]
    # nginx-proxy's regex hosts start with "~"; its trailing wildcards (`foo.*`, `foo.example.*`) are
    # the only other way to write ".*" (no hostname contains it), so a substring test finds both.
    if "~" in raw or ".*" in raw:
        raise LabelError(
            f"env VIRTUAL_HOST: {_shown(raw)} uses a regular expression or a trailing wildcard, "
            "which wakeproxy does not support (use exact names or *.domain)"
        )
    hosts = parse_hosts(raw, "env VIRTUAL_HOST")
    port = parse_port(env["VIRTUAL_PORT"], "env VIRTUAL_PORT") if env.get("VIRTUAL_PORT") else _default_port(info)
    scheme = parse_scheme(env["VIRTUAL_PROTO"], "env VIRTUAL_PROTO") if env.get("VIRTUAL_PROTO") else "http"
    return [Route(h, port, scheme, None, "nginx-proxy") for h in hosts]


def _traefik_hosts(rule: str, what: str) -> list[str]:
    """The hosts of the rule's Host(…) matchers that are not negated, each once, in rule order.

    Other matchers (PathPrefix, HostRegexp, Header…) are syntax-checked and kept in the tree
    but add no host (yet): `Host(`a`) && PathPrefix(`/api`)` routes all of a."""
    try:
        tree = parse_rule(rule)
    except RuleError as e:
        raise LabelError(f"{what}: {e}") from None
    hosts: dict[str, None] = {}
    for matcher in positive_matchers(tree, "Host"):
        for arg in matcher.args:
            hosts[parse_host(arg, f"{what}: Host at character {matcher.pos + 1}")] = None
            if len(hosts) > MAX_HOSTS:
                raise LabelError(f"{what}: more than {MAX_HOSTS} hosts")
    return list(hosts)


def _traefik(info: ContainerInfo) -> list[Route]:
    labels = info.labels
    if _flag(labels.get("traefik.enable"), "label traefik.enable") is False:
        return []
    routers = {
        k[len("traefik.http.routers."): -len(".rule")]: v
        for k, v in labels.items()
        if k.startswith("traefik.http.routers.") and k.endswith(".rule")
    }
    if not routers:
        return []
    if len(routers) > MAX_ROUTERS:
        raise LabelError(f"labels {_ROUTERS}*.rule: {len(routers)} routers, more than the {MAX_ROUTERS} allowed")
    services = {
        k.split(".")[3]
        for k in labels
        if k.startswith("traefik.http.services.") and len(k.split(".")) > 4
    }
    network = labels.get("traefik.docker.network") or None
    routes: list[Route] = []
    for router, rule in sorted(routers.items()):
        what = f"label traefik.http.routers.{router}.rule"
        hosts = _traefik_hosts(rule, what)
        if not hosts:
            continue  # a rule without Host() (PathPrefix only, HostRegexp…) is not ours to route
        service = labels.get(f"traefik.http.routers.{router}.service")
        if service is None and len(services) == 1:
            service = next(iter(services))
        port = _default_port(info)
        scheme = "http"
        if service is not None:
            base = f"traefik.http.services.{service}.loadbalancer.server"
            if f"{base}.port" in labels:
                port = parse_port(labels[f"{base}.port"], f"label {base}.port")
            if f"{base}.scheme" in labels:
                scheme = parse_scheme(labels[f"{base}.scheme"], f"label {base}.scheme")
        routes.extend(Route(h, port, scheme, network, "traefik") for h in hosts)
    return routes


_SOURCES = (("wakeproxy", _ours), ("docksal", _docksal), ("nginx_proxy", _nginx_proxy), ("traefik", _traefik))
_DECLARED_BY = {"wakeproxy": "label wakeproxy.host", "docksal": "label io.docksal.virtual-host",
                "nginx_proxy": "env VIRTUAL_HOST", "traefik": f"labels {_ROUTERS}*.rule"}


def routes_for(info: ContainerInfo, sources: SourcesConfig) -> list[Route]:
    """Every route `info` declares through the enabled conventions.

    A host declared by several conventions keeps the first (ours, Docksal,
    nginx-proxy, Traefik).  Raises LabelError for a malformed declaration, so
    the caller can skip this one container and keep every other site up;
    also when the container is over one of the limits (check_limits, MAX_HOSTS).
    """
    check_limits(info, sources)
    if _flag(info.labels.get("wakeproxy.enable"), "label wakeproxy.enable") is False:
        return []
    routes: list[Route] = []
    seen: set[str] = set()
    for name, parse in _SOURCES:
        if not getattr(sources, name):
            continue
        for route in parse(info):
            if route.host not in seen:
                seen.add(route.host)
                routes.append(route)
        if len(seen) > MAX_HOSTS:
            raise LabelError(f"{_DECLARED_BY[name]}: brings the container to more than {MAX_HOSTS} hosts")
    return routes


WAKE_STRATEGIES = ("auto", "hold", "page")
_DEP_CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")


def parse_depends_on(value: str, what: str) -> tuple[Dependency, ...]:
    """Compose's `service:condition[:restart]` comma list → Dependency values."""
    deps: list[Dependency] = []
    for item in value.split(","):  # value is bounded (check_limits), so is the number of items
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        service = parts[0]
        condition = parts[1] if len(parts) > 1 and parts[1] else "service_started"
        if not service or condition not in _DEP_CONDITIONS:
            raise LabelError(f"{what}: {_shown(item)} is not service:condition (conditions: {', '.join(_DEP_CONDITIONS)})")
        deps.append(Dependency(service, condition))
    return tuple(deps)


def _duration_label(labels: Mapping[str, str], key: str) -> float | None:
    if key not in labels:
        return None
    value = labels[key].strip()
    try:
        return parse_duration(value)  # linear: config._DURATION has no backtracking between its \s runs
    except ValueError as e:
        reason = str(e) if len(value) <= _SHOWN else f"{_shown(value)} is not a duration (write 30s, 5m, 2h or a number of seconds)"
        raise LabelError(f"label {key}: {reason}") from None


def settings_for(info: ContainerInfo) -> ContainerSettings:
    """The container's wake settings; raises LabelError naming a malformed label (or one over
    the size limit: check_limits)."""
    check_limits(info, None)
    labels = info.labels
    strategy = labels.get("wakeproxy.wake-strategy")
    if strategy is not None:
        strategy = strategy.strip().lower()
        if strategy not in WAKE_STRATEGIES:
            raise LabelError(f"label wakeproxy.wake-strategy: {_shown(labels['wakeproxy.wake-strategy'])} is not one of auto, hold, page")
    timeout = _duration_label(labels, "wakeproxy.wake-timeout")
    if timeout is not None and timeout <= 0:
        raise LabelError("label wakeproxy.wake-timeout: must be more than 0")
    ready_path = labels.get("wakeproxy.ready-path")
    if ready_path is not None:
        ready_path = ready_path.strip()
        if not ready_path.startswith("/") or not ready_path.isascii() or not ready_path.isprintable() \
                or " " in ready_path:
            raise LabelError(f"label wakeproxy.ready-path: {_shown(ready_path)} must be a path starting with /")
    deps: tuple[Dependency, ...] = ()
    if labels.get("com.docker.compose.depends_on"):
        deps = parse_depends_on(labels["com.docker.compose.depends_on"], "label com.docker.compose.depends_on")
    idle_timeout = _duration_label(labels, "wakeproxy.idle-timeout")
    if _flag(labels.get("io.docksal.permanent"), "label io.docksal.permanent"):
        idle_timeout = 0.0
    check_group_labels(labels)
    acme = _flag(labels.get(ACME_LABEL), f"label {ACME_LABEL}") or False
    letsencrypt: tuple[str, ...] = ()
    if info.env.get(LETSENCRYPT_ENV, "").strip():
        letsencrypt = tuple(parse_hosts(info.env[LETSENCRYPT_ENV], f"env {LETSENCRYPT_ENV}"))
    cert_name = next((labels[k].strip().lower() for k in CERT_NAME_LABELS if labels.get(k, "").strip()), None)
    if cert_name is not None and not _CERT_BASE.fullmatch(cert_name):
        raise LabelError(f"label cert-name: {cert_name[:80]!r} is not a certificate file name")
    redirect = _flag(labels.get(REDIRECT_LABEL), f"label {REDIRECT_LABEL}")
    idle_action = labels.get("wakeproxy.idle-action")
    if idle_action is not None:
        idle_action = idle_action.strip().lower()
        if idle_action not in ("stop", "pause"):
            raise LabelError(f"label wakeproxy.idle-action: {_shown(labels['wakeproxy.idle-action'])} is not stop or pause")
    return ContainerSettings(strategy, timeout, ready_path, labels.get("com.docker.compose.service"), deps,
                             idle_timeout, idle_action, acme, letsencrypt, cert_name, redirect)
