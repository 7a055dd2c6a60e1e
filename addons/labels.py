"""One container's labels and environment → the routes it declares.

Pure functions, no Docker calls: `docker_view` feeds them a `ContainerInfo`
and they answer with `Route`s or raise `LabelError` with a message that names
the offending label.  Four conventions are understood so that users can move
over without relabelling: ours (`wakeproxy.*`), Docksal's
(`io.docksal.virtual-*`), nginx-proxy's (`VIRTUAL_*` environment variables)
and Traefik's Host rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .config import SourcesConfig, parse_duration
from .hostnames import is_host_pattern, normalize_host


# Every environment variable the proxy reads. `docker_view` keeps only these of a container's
# environment (the rest, often secrets, is never held in memory or written to the state dir).
NGINX_PROXY_ENV = ("VIRTUAL_HOST", "VIRTUAL_PORT", "VIRTUAL_PROTO")  # read by _nginx_proxy below
LETSENCRYPT_ENV = "LETSENCRYPT_HOST"  # read by settings_for
ACME_LABEL = "wakeproxy.acme"
CERT_NAME_LABELS = ("wakeproxy.cert-name", "io.docksal.cert-name")
REDIRECT_LABEL = "wakeproxy.https-redirect"
_CERT_BASE = re.compile(r"[a-z0-9_*][a-z0-9_.*-]{0,253}")
USED_ENV: frozenset[str] = frozenset({*NGINX_PROXY_ENV, LETSENCRYPT_ENV})


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


_TRAEFIK_HOST_CALL = re.compile(r"\bHost\s*\(([^)]*)\)")
_TRAEFIK_ARG = re.compile(r"`([^`]*)`|\"([^\"]*)\"")
_FALSE = {"false", "0", "no", "off"}
_TRUE = {"true", "1", "yes", "on"}


def parse_hosts(value: str, what: str) -> list[str]:
    """A comma/space separated host list → validated, normalised hostnames."""
    hosts: list[str] = []
    for part in re.split(r"[,\s]+", value):
        if not part:
            continue
        h = normalize_host(part)
        if not is_host_pattern(h):
            raise LabelError(f"{what}: {part!r} is not a hostname or a *.domain wildcard")
        if h not in hosts:
            hosts.append(h)
    if not hosts:
        raise LabelError(f"{what}: no hostname given")
    return hosts


def parse_port(value: str, what: str) -> int:
    try:
        port = int(value.strip())
    except ValueError:
        raise LabelError(f"{what}: {value!r} is not a port number") from None
    if not 0 < port < 65536:
        raise LabelError(f"{what}: port {port} is out of range 1-65535")
    return port


def parse_scheme(value: str, what: str) -> str:
    scheme = value.strip().lower()
    if scheme not in ("http", "https"):
        raise LabelError(f"{what}: {value!r} is not a supported backend scheme (use http or https)")
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
    raise LabelError(f"{what}: {value!r} is not true or false")


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
    if "~" in raw or re.search(r"(^|,)\s*[^,]*\.\*", raw):
        raise LabelError(
            f"env VIRTUAL_HOST: {raw!r} uses a regular expression or a trailing wildcard, "
            "which wakeproxy does not support (use exact names or *.domain)"
        )
    hosts = parse_hosts(raw, "env VIRTUAL_HOST")
    port = parse_port(env["VIRTUAL_PORT"], "env VIRTUAL_PORT") if env.get("VIRTUAL_PORT") else _default_port(info)
    scheme = parse_scheme(env["VIRTUAL_PROTO"], "env VIRTUAL_PROTO") if env.get("VIRTUAL_PROTO") else "http"
    return [Route(h, port, scheme, None, "nginx-proxy") for h in hosts]


def _traefik_hosts(rule: str, what: str) -> list[str]:
    hosts: list[str] = []
    for call in _TRAEFIK_HOST_CALL.finditer(rule):
        args = [a or b for a, b in _TRAEFIK_ARG.findall(call.group(1))]
        if not args:
            raise LabelError(f"{what}: Host() without a quoted hostname in {rule!r}")
        for a in args:
            hosts.extend(h for h in parse_hosts(a, what) if h not in hosts)
    return hosts


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


def routes_for(info: ContainerInfo, sources: SourcesConfig) -> list[Route]:
    """Every route `info` declares through the enabled conventions.

    A host declared by several conventions keeps the first (ours, Docksal,
    nginx-proxy, Traefik).  Raises LabelError for a malformed declaration, so
    the caller can skip this one container and keep every other site up.
    """
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
    return routes


WAKE_STRATEGIES = ("auto", "hold", "page")
_DEP_CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")


def parse_depends_on(value: str, what: str) -> tuple[Dependency, ...]:
    """Compose's `service:condition[:restart]` comma list → Dependency values."""
    deps: list[Dependency] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        service = parts[0]
        condition = parts[1] if len(parts) > 1 and parts[1] else "service_started"
        if not service or condition not in _DEP_CONDITIONS:
            raise LabelError(f"{what}: {item!r} is not service:condition (conditions: {', '.join(_DEP_CONDITIONS)})")
        deps.append(Dependency(service, condition))
    return tuple(deps)


def _duration_label(labels: Mapping[str, str], key: str) -> float | None:
    if key not in labels:
        return None
    try:
        return parse_duration(labels[key].strip())
    except ValueError as e:
        raise LabelError(f"label {key}: {e}") from None


def settings_for(info: ContainerInfo) -> ContainerSettings:
    """The container's wake settings; raises LabelError naming a malformed label."""
    labels = info.labels
    strategy = labels.get("wakeproxy.wake-strategy")
    if strategy is not None:
        strategy = strategy.strip().lower()
        if strategy not in WAKE_STRATEGIES:
            raise LabelError(f"label wakeproxy.wake-strategy: {labels['wakeproxy.wake-strategy']!r} is not one of auto, hold, page")
    timeout = _duration_label(labels, "wakeproxy.wake-timeout")
    if timeout is not None and timeout <= 0:
        raise LabelError("label wakeproxy.wake-timeout: must be more than 0")
    ready_path = labels.get("wakeproxy.ready-path")
    if ready_path is not None:
        ready_path = ready_path.strip()
        if not ready_path.startswith("/") or not ready_path.isascii() or not ready_path.isprintable() \
                or " " in ready_path or len(ready_path) > 1024:
            raise LabelError(f"label wakeproxy.ready-path: {ready_path!r} must be a path starting with /")
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
            raise LabelError(f"label wakeproxy.idle-action: {labels['wakeproxy.idle-action']!r} is not stop or pause")
    return ContainerSettings(strategy, timeout, ready_path, labels.get("com.docker.compose.service"), deps,
                             idle_timeout, idle_action, acme, letsencrypt, cert_name, redirect)
