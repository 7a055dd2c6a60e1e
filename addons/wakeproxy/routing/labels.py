"""One container's labels and environment → the routes it declares.

Pure functions, no Docker calls: `docker.view` feeds them a `ContainerInfo`
and they answer with `Route`s (a host, and the paths of it: `path_matches`) or
raise one `LabelError` that names every offending label.  Four conventions are
understood so that users can move over without relabelling: ours
(`wakeproxy.*`), Docksal's (`io.docksal.virtual-*`), nginx-proxy's (`VIRTUAL_*`
environment variables) and Traefik's Host/Path/PathPrefix rules (syntax:
`traefik_rule`; meaning: `traefik_routes`, which refuses what it cannot route
exactly).

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from wakeproxy.config import SourcesConfig, parse_duration
from wakeproxy.routing.hostnames import is_host_pattern, normalize_host
from wakeproxy.routing.traefik_rule import And, Expr, Matcher, Not, Or, RuleError, host_arguments, parse_rule

# Every environment variable the proxy reads. `docker.view` keeps only these of a container's
# environment (the rest, often secrets, is never held in memory or written to the state dir).
NGINX_PROXY_ENV = ("VIRTUAL_HOST", "VIRTUAL_PORT", "VIRTUAL_PROTO", "VIRTUAL_PATH", "VIRTUAL_DEST")  # _nginx_proxy
LETSENCRYPT_ENV = "LETSENCRYPT_HOST"  # read by settings_for
ACME_LABEL = "wakeproxy.acme"
CERT_NAME_LABELS = ("wakeproxy.cert-name", "io.docksal.cert-name")
REDIRECT_LABEL = "wakeproxy.https-redirect"
DEBUG_LABEL = "wakeproxy.debug"
_CERT_BASE = re.compile(r"[a-z0-9_*][a-z0-9_.*-]{0,253}")
USED_ENV: frozenset[str] = frozenset({*NGINX_PROXY_ENV, LETSENCRYPT_ENV})

# Limits on what a container may declare (see check_limits). Generous for real use: a host list
# of 100 long names fits in 4 KB, and no real Traefik rule comes near it.
MAX_VALUE_BYTES = 4096  # one label or env value the proxy reads, UTF-8 encoded
MAX_KEY_BYTES = 256  # the name of a label the proxy reads (Traefik router and service names are in it)
MAX_ROUTERS = 32  # traefik.http.routers.<name>.rule labels on one container
MAX_HOSTS = 100  # distinct hosts (and wildcards) one container declares, over all conventions
MAX_ROUTES = 256  # distinct (host, path) routes of one container, and alternatives of one Traefik rule
_SHOWN = 64  # characters of a value quoted in an error message
MAX_ERRORS = 10  # errors named in one container's LabelError (the rest are counted)

# The labels the proxy reads besides every `wakeproxy.*` one (their meaning for certificates and the redirect is in settings_for).
_ALWAYS_READ = frozenset({
    "io.docksal.permanent", "io.docksal.cert-name",
    "com.docker.compose.project", "com.docker.compose.service", "com.docker.compose.depends_on",
    "com.docker.stack.namespace", "sablier.active.replicas",
})
_DOCKSAL_READ = frozenset({"io.docksal.virtual-host", "io.docksal.virtual-port"})
_TRAEFIK_READ = frozenset({"traefik.enable", "traefik.docker.network", "traefik.swarm.network"})
_ROUTERS = "traefik.http.routers."
_SERVICES = "traefik.http.services."  # the service names are read from every such label's name
_SERVER_KEYS = (".loadbalancer.server.port", ".loadbalancer.server.scheme")  # and these values


class LabelError(ValueError):
    """A container's routing labels cannot be understood; the message says which and why.

    `errors` holds one message per bad label, each starting with the label's name (the message
    joins them with "; "); `hosts` the hosts the container declares that could still be read,
    so that they can answer "misconfigured" rather than "unknown site" (may be empty)."""

    MAX_MESSAGE = 500  # the joined message is logged and shown by `wakeproxy status`: bounded

    def __init__(self, *errors: str, hosts: Iterable[str] = ()) -> None:
        text = "; ".join(errors)
        if len(text) > self.MAX_MESSAGE:
            shown = text[:self.MAX_MESSAGE].rsplit("; ", 1)[0]
            rest = len(errors) - shown.count("; ") - 1
            text = f"{shown}; and {rest} more" if rest > 0 else shown[:self.MAX_MESSAGE] + "…"
        super().__init__(text)
        self.errors: tuple[str, ...] = errors
        self.hosts: tuple[str, ...] = tuple(hosts)


_T = TypeVar("_T")


class _Errors:
    """Collects the LabelErrors of one container, so that every bad label is reported at once."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, parse: Callable[..., _T], *args: object) -> _T | None:
        """`parse(*args)`, or None after recording its LabelError."""
        try:
            return parse(*args)
        except LabelError as e:
            self.messages.extend(e.errors)
            return None

    def add(self, message: str) -> None:
        self.messages.append(message)

    def raise_any(self, hosts: Iterable[str] = ()) -> None:
        """Raise the collected errors as one LabelError (each once, at most MAX_ERRORS named)."""
        messages = list(dict.fromkeys(self.messages))
        if len(messages) > MAX_ERRORS:
            messages[MAX_ERRORS:] = [f"and {len(messages) - MAX_ERRORS} more errors"]
        if messages:
            raise LabelError(*messages, hosts=hosts)


@dataclass(frozen=True)
class TaskInfo:
    """One task of a Swarm service whose desired state is `running` (the others are never kept)."""

    id: str
    name: str  # "SERVICE.SLOT" (replicated) or "SERVICE.NODE" (global)
    state: str  # new | pending | assigned | accepted | preparing | starting | running | failed | …
    networks: Mapping[str, str] = field(default_factory=dict)  # network name → IP (without the prefix length)
    error: str = ""  # the engine's Status.Err of a failing task (bounded)

    @property
    def running(self) -> bool:
        return self.state == "running"


SERVICE = "service"  # ContainerInfo.kind of a Swarm service


@dataclass(frozen=True)
class ContainerInfo:
    """What the proxy knows about one container, or one Swarm service (kind "service": its labels
    and env are the service spec's, `networks` the spec's networks (no IP: the tasks have those),
    `state` "running" when its spec asks for replicas, else "exited"): a plain value from the API."""

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
    kind: str = "container"  # or SERVICE
    replicas: int | None = None  # a service's replica count in its spec (None: a global service)
    tasks: tuple[TaskInfo, ...] = ()  # a service's tasks that are meant to run, by name
    one_shot: bool = False  # a service whose tasks are not started again after a clean exit (a migration)
    network_mode: str = ""  # HostConfig.NetworkMode: the network `docker create` put it on (its name), or bridge/host/…

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def is_service(self) -> bool:
        return self.kind == SERVICE

    @property
    def running_tasks(self) -> tuple[TaskInfo, ...]:
        return tuple(t for t in self.tasks if t.running)

    @property
    def group(self) -> str:
        """The unit that is woken and put to sleep together (see `group_of`)."""
        return group_of(self)[2]


GROUP_LABEL = "wakeproxy.group"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"  # the Compose service: its alias on the project's network
STACK_LABEL = "com.docker.stack.namespace"  # set by `docker stack deploy` on a stack's services
SWARM_SERVICE_LABEL = "com.docker.swarm.service.id"  # on the containers of a service's tasks
SWARM_TASK_LABEL = "com.docker.swarm.task.id"  # … together with this one
REPLICAS_LABELS = ("wakeproxy.replicas", "sablier.active.replicas")
MAX_REPLICAS = 100  # what a replicas label may ask for at most (docker.max_replicas caps it lower)
_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def group_of(info: ContainerInfo) -> tuple[str, str, str]:
    """(kind, base name, key) of the container's group, from its own labels only.

    - A Compose project `P` is one group, `P`; a `wakeproxy.group=G` label inside it makes a
      group `P/G` (a project can be split, but never joined with another project's containers).
    - Outside Compose, `wakeproxy.group=G` makes a group `G` of the containers that say so.
    - A container with neither is a group of its own, named like the container.
    A label never pulls another project's (or an unlabelled) container into a group: the kind
    ("compose", "group", "container") is part of who the group is.
    A Swarm service is grouped the same way by its own (spec) labels: its stack `S` plays the part
    of the project ("stack"), a lone service is a group of its own ("service").
    """
    own = (info.labels.get(GROUP_LABEL) or "").strip()
    if info.kind == SERVICE:
        parent, (parent_kind, alone) = (info.labels.get(STACK_LABEL) or "").strip(), ("stack", "service")
    else:
        parent, (parent_kind, alone) = info.labels.get(PROJECT_LABEL) or "", ("compose", "container")
    if parent:
        key = parent if not own or own == parent else f"{parent}/{own}"
        return parent_kind, key, key
    if own:
        return "group", own, own
    return alone, info.name, info.name


def check_group_labels(labels: Mapping[str, str]) -> None:
    """The group labels must be plain names (they end up in logs, pages and the state files)."""
    for key in (PROJECT_LABEL, GROUP_LABEL, STACK_LABEL):
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
    idle_timeout: float | None = None  # wakeproxy.idle-timeout; 0 = never
    idle_action: str | None = None  # wakeproxy.idle-action: stop | pause
    acme: bool = False  # wakeproxy.acme=true: certificates for the container's own hosts
    letsencrypt: tuple[str, ...] = ()  # env LETSENCRYPT_HOST (acme-companion's convention)
    cert_name: str | None = None  # wakeproxy.cert-name / io.docksal.cert-name: a custom certificate file base
    https_redirect: bool | None = None  # wakeproxy.https-redirect
    replicas: int | None = None  # a service's replicas when awake: wakeproxy.replicas / sablier.active.replicas
    debug: bool = False  # wakeproxy.debug=true: its hosts' traffic in the debug UI (honoured where labels.debug)
    permanent: bool = False  # io.docksal.permanent=true: never removed as abandoned (it still sleeps when idle)


@dataclass(frozen=True)
class Route:
    """One hostname (or `*.suffix` wildcard) a container answers for, and how to reach it."""

    host: str
    port: int
    scheme: str = "http"
    network: str | None = None  # a network the container must be reached on (label), else any allowed
    source: str = "wakeproxy"
    path: str = "/"  # the requests of `host` this route takes: paths under this prefix (see path_matches)
    exact: bool = False  # True: only the path `path` itself (Traefik's Path matcher)


def path_matches(prefix: str, exact: bool, path: str) -> bool:
    """Does the request path `path` (without its query) fall under a route's `prefix`?

    Exact routes take `prefix` only.  Prefixes match whole path segments: `/api` takes `/api`
    and `/api/x`, not `/apix`; a prefix that ends in `/` takes what is below it (`/api/` takes
    `/api/` and `/api/x`, not `/api`), so `/` takes every path.  Case-sensitive, and the path
    is compared as the client sent it (no percent-decoding, no `..` resolution)."""
    if exact:
        return path == prefix
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


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
        if key.startswith(_ROUTERS) and key.endswith((".rule", ".service", ".priority")):
            return True
        if key.startswith(_SERVICES) and key.endswith(_SERVER_KEYS):
            return True
    return False


def check_limits(info: ContainerInfo, sources: SourcesConfig | None) -> None:
    """LabelError when a label or env value the proxy reads is over MAX_VALUE_BYTES, or a label
    name over MAX_KEY_BYTES; the message gives the size, never the value.  Linear in the size of
    the labels and env; a few prefix tests a label for the labels it does not read.  Every
    label and variable over a limit is named in the one error."""
    errors = _Errors()
    for key, value in info.labels.items():
        value_read = _reads_value(key, sources)
        if not value_read and not (sources is not None and sources.traefik and key.startswith(_SERVICES)):
            continue
        if _over(key, MAX_KEY_BYTES):
            errors.add(f"label {_shown(key)}: the label name is {_size(key)} bytes, "
                       f"more than the {MAX_KEY_BYTES} allowed")
        elif value_read and _over(value, MAX_VALUE_BYTES):
            errors.add(f"label {key}: the value is {_size(value)} bytes, more than the {MAX_VALUE_BYTES} allowed")
    env_read = (*NGINX_PROXY_ENV, LETSENCRYPT_ENV) if sources is not None and sources.nginx_proxy else (LETSENCRYPT_ENV,)
    for name in env_read:
        env_value = info.env.get(name)
        if env_value is not None and _over(env_value, MAX_VALUE_BYTES):
            errors.add(f"env {name}: the value is {_size(env_value)} bytes, more than the {MAX_VALUE_BYTES} allowed")
    errors.raise_any()


def parse_host(value: str, what: str) -> str:
    """One hostname or `*.domain` wildcard → its normalised form (`hostnames` decides what is one)."""
    h = normalize_host(value)
    if not is_host_pattern(h):
        raise LabelError(f"{what}: {_shown(value.strip())} is not a hostname or a *.domain wildcard")
    return h


def parse_hosts(value: str, what: str) -> list[str]:
    """A comma/space separated host list → validated, normalised hostnames, each once.

    At most MAX_VALUE_BYTES of input and MAX_HOSTS hosts (settings_for calls this on
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


_NOT_A_PATH = "must start with / and hold only printable ASCII, without spaces, '?' or '#'"


def parse_path(value: str, what: str) -> str:
    """One path prefix (`/api`, `/api/`, `/`), kept as written apart from surrounding spaces."""
    p = value.strip()
    if "{" in p or "}" in p:
        raise LabelError(f"{what}: {_shown(p)} is a path template ({{name:regexp}}), which wakeproxy does not "
                         "support (write the prefix itself)")
    if not p.startswith("/") or not p.isascii() or not p.isprintable() or any(ch in p for ch in " ?#"):
        raise LabelError(f"{what}: {_shown(p)} is not a path: it {_NOT_A_PATH}")
    return p


def parse_paths(value: str, what: str) -> list[str]:
    """A comma/space separated list of path prefixes, each once (bounded: check_limits)."""
    paths = list(dict.fromkeys(parse_path(part, what) for part in value.replace(",", " ").split()))
    if not paths:
        raise LabelError(f"{what}: no path given")
    return paths


def _valid_hosts(values: Iterable[str]) -> list[str]:
    """The values that are hostnames or wildcards, normalised (for `LabelError.hosts`)."""
    return [h for h in (normalize_host(v) for v in values) if is_host_pattern(h)]


@dataclass
class _Declaration:
    """What one container declares, collected source by source (see routes_for)."""

    errors: _Errors = field(default_factory=_Errors)
    hosts: dict[str, None] = field(default_factory=dict)  # every host that could be read, even beside an error

    def routes(self, source: str, hosts: list[str] | None, paths: list[str] | None, port: int | None,
               scheme: str | None, network: str | None = None) -> list[Route]:
        """hosts × path prefixes, unless a part could not be read (then its error is recorded)."""
        self.hosts.update(dict.fromkeys(hosts or ()))
        if hosts is None or paths is None or port is None or scheme is None:
            return []
        return [Route(h, port, scheme, network, source, p) for h in hosts for p in paths]


def _ours(info: ContainerInfo, out: _Declaration) -> list[Route]:
    labels = info.labels
    check = out.errors.check
    if "wakeproxy.host" not in labels:
        if "wakeproxy.path" in labels:
            out.errors.add("label wakeproxy.path: it applies to the hosts of wakeproxy.host, which is not set")
        return []
    hosts = check(parse_hosts, labels["wakeproxy.host"], "label wakeproxy.host")
    port = check(parse_port, labels["wakeproxy.port"], "label wakeproxy.port") if "wakeproxy.port" in labels \
        else _default_port(info)
    scheme = check(parse_scheme, labels["wakeproxy.scheme"], "label wakeproxy.scheme") \
        if "wakeproxy.scheme" in labels else "http"
    paths = check(parse_paths, labels["wakeproxy.path"], "label wakeproxy.path") if "wakeproxy.path" in labels \
        else ["/"]
    return out.routes("wakeproxy", hosts, paths, port, scheme, labels.get("wakeproxy.network") or None)


def _trailing_wildcard(part: str) -> bool:
    return part.endswith(".*")


def docksal_note(labels: Mapping[str, str]) -> str | None:
    """What is not served of io.docksal.virtual-host: nginx's trailing wildcards (`name.*`), if any.
    Docksal's default label is `${VIRTUAL_HOST},*.${VIRTUAL_HOST},${VIRTUAL_HOST}.*`, so nearly every
    Docksal project has one: its other names are served (this note is logged once), rather than the
    whole container skipped."""
    left = [p for p in labels.get("io.docksal.virtual-host", "").replace(",", " ").split() if _trailing_wildcard(p)]
    if not left:
        return None
    shown = ", ".join(_shown(p) for p in left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
    return (f"its io.docksal.virtual-host entries {shown} are not served: wakeproxy does not support trailing "
            "wildcards (name.*); its other names are")


def _docksal_hosts(value: str) -> list[str]:
    kept = [p for p in value.replace(",", " ").split() if not _trailing_wildcard(p)]
    if not kept and value.replace(",", " ").split():
        raise LabelError("label io.docksal.virtual-host: it has only trailing wildcards (name.*), which wakeproxy "
                         "does not support (use exact names or *.domain)")
    return parse_hosts(" ".join(kept), "label io.docksal.virtual-host")


def _docksal(info: ContainerInfo, out: _Declaration) -> list[Route]:
    labels = info.labels
    if "io.docksal.virtual-host" not in labels:
        return []
    check = out.errors.check
    hosts = check(_docksal_hosts, labels["io.docksal.virtual-host"])
    # Docksal's rule, as nginx-proxy's: the only exposed port, else 80.
    port = check(parse_port, labels["io.docksal.virtual-port"], "label io.docksal.virtual-port") \
        if "io.docksal.virtual-port" in labels else _default_port(info)
    return out.routes("docksal", hosts, ["/"], port, "http")


def _virtual_host(raw: str) -> list[str]:
    # nginx-proxy's regex hosts start with "~"; its trailing wildcards (`foo.*`, `foo.example.*`) are
    # the only other way to write ".*" (no hostname contains it), so a substring test finds both.
    if "~" in raw or ".*" in raw:
        raise LabelError(
            f"env VIRTUAL_HOST: {_shown(raw)} uses a regular expression or a trailing wildcard, "
            "which wakeproxy does not support (use exact names or *.domain)"
        )
    return parse_hosts(raw, "env VIRTUAL_HOST")


def _virtual_path(raw: str) -> str:
    if raw.strip().startswith("~"):
        raise LabelError(f"env VIRTUAL_PATH: {_shown(raw.strip())} is a regular expression, which wakeproxy does "
                         "not support (write the path prefix itself)")
    return parse_path(raw, "env VIRTUAL_PATH")


def _nginx_proxy(info: ContainerInfo, out: _Declaration) -> list[Route]:
    env = info.env
    if not env.get("VIRTUAL_HOST"):
        return []
    check = out.errors.check
    hosts = check(_virtual_host, env["VIRTUAL_HOST"])
    port = check(parse_port, env["VIRTUAL_PORT"], "env VIRTUAL_PORT") if env.get("VIRTUAL_PORT") else _default_port(info)
    scheme = check(parse_scheme, env["VIRTUAL_PROTO"], "env VIRTUAL_PROTO") if env.get("VIRTUAL_PROTO") else "http"
    path = check(_virtual_path, env["VIRTUAL_PATH"]) if env.get("VIRTUAL_PATH", "").strip() else "/"
    if env.get("VIRTUAL_DEST", "").strip():
        out.errors.add(f"env VIRTUAL_DEST: {_shown(env['VIRTUAL_DEST'].strip())}: rewriting the request path is not "
                       "supported (wakeproxy forwards the path unchanged)")
    return out.routes("nginx-proxy", hosts, None if path is None else [path], port, scheme)


# --- Traefik rules → (host, path) routes ---------------------------------------------------------

# The matchers wakeproxy routes, under their Traefik names (v2 also takes them in lower case).
_ROUTED = {"Host": "host", "Path": "path", "PathPrefix": "prefix"}
_ROUTED.update({k.lower(): v for k, v in list(_ROUTED.items())})


class RuleRoute(NamedTuple):
    """One alternative of a Traefik rule: a host and the paths of it that the rule takes."""

    host: str
    path: str = "/"
    exact: bool = False


class _Atom(NamedTuple):
    kind: str  # host | path | prefix
    name: str  # the matcher's name as written
    arg: str
    pos: int


def _unsupported(expr: Expr, found: list[str]) -> None:
    """Describe every part of `expr` wakeproxy cannot route (a `!`, a matcher other than
    Host, Path, PathPrefix) into `found`, in rule order."""
    if isinstance(expr, Matcher):
        if expr.name not in _ROUTED:
            found.append(f"{expr.name[:32]}(…) at character {expr.pos + 1}")
    elif isinstance(expr, Not):
        found.append(f"'!' at character {expr.pos + 1}")
    else:
        for operand in expr.operands:
            _unsupported(operand, found)


def _alternatives(expr: Expr, what: str) -> list[tuple[_Atom, ...]]:
    """`expr` (only Host/Path/PathPrefix, `&&`, `||`) multiplied out into alternatives, each the
    matchers that must all hold (a matcher with several arguments is one alternative per
    argument, as in Traefik v2).  At most MAX_ROUTES alternatives."""
    if isinstance(expr, Matcher):
        return [(_Atom(_ROUTED[expr.name], expr.name, arg, expr.pos),) for arg in expr.args]
    assert isinstance(expr, (And, Or))  # Not was refused by _unsupported
    parts = [_alternatives(operand, what) for operand in expr.operands]
    count = 0 if isinstance(expr, Or) else 1
    for p in parts:  # each part has at most MAX_ROUTES alternatives already
        count = count + len(p) if isinstance(expr, Or) else count * len(p)
        if count > MAX_ROUTES:
            raise LabelError(f"{what}: the rule has more than {MAX_ROUTES} alternatives (host × path)")
    if isinstance(expr, Or):
        return [alt for p in parts for alt in p]
    out: list[tuple[_Atom, ...]] = [()]
    for p in parts:
        out = [a + b for a in out for b in p]
    return out


def _traefik_host(atom: _Atom, what: str) -> str:
    """A Host argument: one hostname. Traefik matches `*.d` literally (wildcards are HostRegexp's)."""
    where = f"{what}: Host at character {atom.pos + 1}"
    host = parse_host(atom.arg, where)
    if host.startswith("*."):
        raise LabelError(f"{where}: {_shown(atom.arg.strip())} is a wildcard, which Traefik's Host does not match "
                         "(HostRegexp is not supported; wakeproxy.host takes *.domain)")
    return host


def _rule_route(alt: tuple[_Atom, ...], what: str) -> RuleRoute:
    """One alternative → its route: exactly one host, at most one path matcher."""
    hosts = {_traefik_host(a, what): a for a in alt if a.kind == "host"}
    paths = {(a.kind, a.arg): a for a in alt if a.kind != "host"}
    if not hosts:
        first = alt[0]
        raise LabelError(f"{what}: {first.name}(…) at character {first.pos + 1} has no Host(…) with it: routes "
                         "without a host are not supported")
    if len(hosts) > 1:
        second = list(hosts.values())[1]
        raise LabelError(f"{what}: Host at character {second.pos + 1}: two different hosts joined by && are "
                         "not supported")
    if len(paths) > 1:
        second = list(paths.values())[1]
        raise LabelError(f"{what}: {second.name} at character {second.pos + 1}: two path matchers joined by && "
                         "are not supported")
    host = next(iter(hosts))
    if not paths:
        return RuleRoute(host)
    atom = next(iter(paths.values()))
    return RuleRoute(host, parse_path(atom.arg, f"{what}: {atom.name} at character {atom.pos + 1}"),
                     atom.kind == "path")


def traefik_routes(rule: str, what: str) -> list[RuleRoute]:
    """A Traefik rule → the (host, path) routes it stands for, each once, in rule order.

    Routed: Host, Path (exact) and PathPrefix matchers joined by `&&`, `||` and parentheses,
    when every alternative of the multiplied-out rule has one host and at most one path
    matcher: `Host(a) || Host(b)`, `Host(a) && (PathPrefix(x) || Path(y))`, `(Host(a) &&
    PathPrefix(x)) || Host(b)`.  Anything else — another matcher (HostRegexp, Header, Method,
    Query, ClientIP, PathRegexp…), a `!`, an alternative without a host — is a LabelError that
    names the part: a route that matched more or less than Traefik's would be worse than none."""
    try:
        tree = parse_rule(rule)
    except RuleError as e:
        raise LabelError(f"{what}: {e}") from None
    found: list[str] = []
    _unsupported(tree, found)
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise LabelError(f"{what}: {shown} {'is' if len(found) == 1 else 'are'} not supported (wakeproxy routes "
                         "Host, Path and PathPrefix joined by && and ||)")
    routes: dict[RuleRoute, None] = {}
    for alt in _alternatives(tree, what):
        routes[_rule_route(alt, what)] = None
    if len({r.host for r in routes}) > MAX_HOSTS:
        raise LabelError(f"{what}: more than {MAX_HOSTS} hosts")
    return list(routes)


def _traefik(info: ContainerInfo, out: _Declaration) -> list[Route]:
    labels = info.labels
    check = out.errors.check
    if check(_flag, labels.get("traefik.enable"), "label traefik.enable") is False:
        return []
    routers = {
        k[len(_ROUTERS): -len(".rule")]: v
        for k, v in labels.items()
        if k.startswith(_ROUTERS) and k.endswith(".rule")
    }
    if not routers:
        return []
    if len(routers) > MAX_ROUTERS:
        out.errors.add(f"labels {_ROUTERS}*.rule: {len(routers)} routers, more than the {MAX_ROUTERS} allowed")
        return []
    services = {
        k.split(".")[3]
        for k in labels
        if k.startswith(_SERVICES) and len(k.split(".")) > 4
    }
    network = labels.get("traefik.swarm.network") or labels.get("traefik.docker.network") or None
    routes: list[Route] = []
    for router, rule in sorted(routers.items()):
        what = f"label {_ROUTERS}{router}.rule"
        matched = check(traefik_routes, rule, what)
        if matched is None:
            out.hosts.update(dict.fromkeys(_valid_hosts(host_arguments(rule))))
        if f"{_ROUTERS}{router}.priority" in labels:
            out.errors.add(f"label {_ROUTERS}{router}.priority: router priorities are not supported "
                           "(the longest matching path wins)")
        service = labels.get(f"{_ROUTERS}{router}.service")
        if service is None and len(services) == 1:
            service = next(iter(services))
        port: int | None = _default_port(info)
        scheme: str | None = "http"
        if service is not None:
            base = f"{_SERVICES}{service}.loadbalancer.server"
            if f"{base}.port" in labels:
                port = check(parse_port, labels[f"{base}.port"], f"label {base}.port")
            if f"{base}.scheme" in labels:
                scheme = check(parse_scheme, labels[f"{base}.scheme"], f"label {base}.scheme")
        out.hosts.update(dict.fromkeys(r.host for r in matched or ()))
        if matched is not None and port is not None and scheme is not None:
            routes.extend(Route(r.host, port, scheme, network, "traefik", r.path, r.exact) for r in matched)
    return routes


_SOURCES = (("wakeproxy", _ours), ("docksal", _docksal), ("nginx_proxy", _nginx_proxy), ("traefik", _traefik))
_DECLARED_BY = {"wakeproxy": "label wakeproxy.host", "docksal": "label io.docksal.virtual-host",
                "nginx_proxy": "env VIRTUAL_HOST", "traefik": f"labels {_ROUTERS}*.rule"}


def routes_for(info: ContainerInfo, sources: SourcesConfig) -> list[Route]:
    """Every route `info` declares through the enabled conventions.

    A (host, path) declared by several conventions keeps the first (ours, Docksal,
    nginx-proxy, Traefik).  Raises LabelError for a malformed declaration, so the
    caller can skip this one container and keep every other site up; the error
    names every bad label (and carries the hosts that could be read); also when
    the container is over one of the limits (check_limits, MAX_HOSTS, MAX_ROUTES).
    """
    check_limits(info, sources)
    out = _Declaration()
    if out.errors.check(_flag, info.labels.get("wakeproxy.enable"), "label wakeproxy.enable") is False:
        return []
    routes: list[Route] = []
    seen: set[tuple[str, str, bool]] = set()
    hosts: set[str] = set()
    for name, parse in _SOURCES:
        if not getattr(sources, name):
            continue
        for route in parse(info, out):
            key = (route.host, route.path, route.exact)
            if key not in seen:
                seen.add(key)
                hosts.add(route.host)
                routes.append(route)
        if len(hosts) > MAX_HOSTS:
            out.errors.add(f"{_DECLARED_BY[name]}: brings the container to more than {MAX_HOSTS} hosts")
            break
        if len(seen) > MAX_ROUTES:
            out.errors.add(f"{_DECLARED_BY[name]}: brings the container to more than {MAX_ROUTES} routes (host × path)")
            break
    out.errors.raise_any(out.hosts)
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


def _strategy(value: str) -> str:
    strategy = value.strip().lower()
    if strategy not in WAKE_STRATEGIES:
        raise LabelError(f"label wakeproxy.wake-strategy: {_shown(value)} is not one of auto, hold, page")
    return strategy


def _wake_timeout(labels: Mapping[str, str]) -> float | None:
    timeout = _duration_label(labels, "wakeproxy.wake-timeout")
    if timeout is not None and timeout <= 0:
        raise LabelError("label wakeproxy.wake-timeout: must be more than 0")
    return timeout


def _ready_path(value: str) -> str:
    ready_path = value.strip()
    if not ready_path.startswith("/") or not ready_path.isascii() or not ready_path.isprintable() \
            or " " in ready_path:
        raise LabelError(f"label wakeproxy.ready-path: {_shown(ready_path)} must be a path starting with /")
    return ready_path


def _cert_name(labels: Mapping[str, str]) -> str | None:
    # `none` is "not set": Docksal's stacks write io.docksal.cert-name=${VIRTUAL_HOST_CERT_NAME:-none}.
    cert_name = next((v for k in CERT_NAME_LABELS if (v := labels.get(k, "").strip().lower()) not in ("", "none")),
                     None)
    if cert_name is not None and not _CERT_BASE.fullmatch(cert_name):
        raise LabelError(f"label cert-name: {cert_name[:80]!r} is not a certificate file name")
    return cert_name


def _replicas(labels: Mapping[str, str]) -> int | None:
    key = next((k for k in REPLICAS_LABELS if labels.get(k, "").strip()), None)
    if key is None:
        return None
    value = labels[key].strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 4 or not 1 <= int(value) <= MAX_REPLICAS:
        raise LabelError(f"label {key}: {_shown(value)} is not a replica count from 1 to {MAX_REPLICAS}")
    return int(value)


def _idle_action(value: str) -> str:
    action = value.strip().lower()
    if action not in ("stop", "pause"):
        raise LabelError(f"label wakeproxy.idle-action: {_shown(value)} is not stop or pause")
    return action


def settings_for(info: ContainerInfo) -> ContainerSettings:
    """The container's wake settings; raises LabelError naming every malformed label (or the
    labels over the size limit: check_limits)."""
    check_limits(info, None)
    labels = info.labels
    errors = _Errors()
    check = errors.check

    def label(key: str, parse: Callable[[str], _T]) -> _T | None:
        return check(parse, labels[key]) if key in labels else None

    strategy = label("wakeproxy.wake-strategy", _strategy)
    timeout = check(_wake_timeout, labels)
    ready_path = label("wakeproxy.ready-path", _ready_path)
    deps: tuple[Dependency, ...] = ()
    if labels.get("com.docker.compose.depends_on"):
        deps = check(parse_depends_on, labels["com.docker.compose.depends_on"],
                     "label com.docker.compose.depends_on") or ()
    idle_timeout = check(_duration_label, labels, "wakeproxy.idle-timeout")
    # Docksal's meaning: a permanent project is never cleaned up, and still hibernates when inactive.
    permanent = check(_flag, labels.get("io.docksal.permanent"), "label io.docksal.permanent") is True
    check(check_group_labels, labels)
    acme = check(_flag, labels.get(ACME_LABEL), f"label {ACME_LABEL}") or False
    letsencrypt: tuple[str, ...] = ()
    if info.env.get(LETSENCRYPT_ENV, "").strip():
        letsencrypt = tuple(check(parse_hosts, info.env[LETSENCRYPT_ENV], f"env {LETSENCRYPT_ENV}") or ())
    cert_name = check(_cert_name, labels)
    redirect = check(_flag, labels.get(REDIRECT_LABEL), f"label {REDIRECT_LABEL}")
    idle_action = label("wakeproxy.idle-action", _idle_action)
    replicas = check(_replicas, labels) if info.kind == SERVICE else None
    debug = check(_flag, labels.get(DEBUG_LABEL), f"label {DEBUG_LABEL}")
    errors.raise_any()
    return ContainerSettings(strategy, timeout, ready_path, labels.get("com.docker.compose.service"), deps,
                             idle_timeout, idle_action, acme, letsencrypt, cert_name, redirect, replicas,
                             debug is True, permanent)
