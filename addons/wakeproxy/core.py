"""The bundle's root addon: loads the config, sets mitmproxy up as a reverse proxy,
and runs the Docker view.

The same addon instances serve the lean `wakeproxy` command and
`mitmdump`/`mitmweb -s addons/wakeproxy.py`: everything that makes the proxy
what it is (listeners, lazy upstream connections, kept Host header, our
default certificate) is set here from the config, not on a command line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from mitmproxy import ctx, exceptions, tls

from wakeproxy.certs.store import ensure_default_cert, repair_mitmproxy_confdir
from wakeproxy.config import Config, ConfigError, load_config
from wakeproxy.observe.logsafe import get_logger
from wakeproxy.routing.snapshot import Snapshot
from wakeproxy.runtime import EngineState, Runtime

if TYPE_CHECKING:  # the Docker side is imported where it runs: never in a serving worker
    from wakeproxy.docker.view import DockerView

logger = get_logger(__name__)

# Placeholder reverse target: we route per request, so it is never contacted.
_PLACEHOLDER = "http://127.0.0.1:1"


def proxy_options(config: Config, default_cert: str, known: set[str]) -> dict[str, Any]:
    """The mitmproxy options that make a reverse proxy out of mitmproxy for `config`."""
    listeners = [a for a in (config.listen.http, config.listen.https) if a is not None]
    opts: dict[str, Any] = {
        "mode": [f"reverse:{_PLACEHOLDER}@{a}" for a in listeners],
        # Eager would connect to the placeholder as soon as a client connects.
        "connection_strategy": "lazy",
        "keep_host_header": True,
        # Our default certificate answers every SNI, so mitmproxy's CA never signs anything we serve.
        "certs": [f"*={default_cert}"],
        "confdir": str(config.state_dir / "mitmproxy"),
        "upstream_cert": False,
        # Sandboxes behind wakeproxy.scheme=https use self-signed certificates on private networks.
        "ssl_insecure": True,
        "stream_large_bodies": "1m",
        "http2": True,
        "websocket": True,
        # Options of stock mitmdump/mitmweb addons that would get in a reverse proxy's way:
        "block_global": False,
        "showhost": True,
        "onboarding": False,
    }
    return {k: v for k, v in opts.items() if k in known}


# Config sections only a restart applies; every other change (listeners, Docker, names, labels,
# wake, idle, limits, upstream, TLS files) is applied live by the addon that owns it.
FIXED_WHILE_RUNNING = ("state_dir", "acme", "status", "shutdown")


class _ListenLine(logging.Filter):
    """mitmproxy announces each listener as "reverse proxy to http://127.0.0.1:1 listening at …", which
    reads like a wrong upstream: say what the listener is instead."""

    PREFIX = f"reverse proxy to {_PLACEHOLDER} listening at "

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith(self.PREFIX):
            record.msg = f"listening on {msg[len(self.PREFIX):].rstrip('.')} (HTTP and HTTPS; sites from Docker labels)"
            record.args = ()
        return True


_LISTEN_LINE = _ListenLine()


class WakeProxy:
    """Owns the config and the Docker view; publishes snapshots into the runtime."""

    watches_docker = True  # a serving worker's (planes.worker.WorkerCore) gets snapshots from the controller

    def __init__(self, runtime: Runtime, announce: str = "wakeproxy ready") -> None:
        self.runtime = runtime
        self.announce = announce  # the first-snapshot line (the supervisor says "wakeproxy ready" itself)
        self.view: DockerView | None = None
        self._ready_logged = False
        self._running = False
        self.reloads: dict[str, int] = {"ok": 0, "error": 0}  # config loads after the first (metrics)
        self.loaded_at = 0.0  # when the config in force was loaded (wall clock)

    def load(self, loader: Any) -> None:
        loader.add_option(
            "wakeproxy_config", Optional[str], None,  # noqa: UP045 - mitmproxy's option types need typing.Optional
            "Path of wakeproxy's YAML config (listeners, Docker, state directory).",
        )
        loader.add_option(
            "wakeproxy_manage", bool, True,
            "Start, stop and pause containers and order certificates. `wakeproxy web` (a debugging copy "
            "beside the real proxy) turns this off unless given --manage.",
        )
        logging.getLogger("mitmproxy.proxy.mode_servers").addFilter(_LISTEN_LINE)

    def configure(self, updated: set[str]) -> None:
        if "wakeproxy_manage" in updated:
            self.runtime.manage = ctx.options.wakeproxy_manage
            if not self.runtime.manage:
                logger.warning("wakeproxy: a debugging copy: it never starts, stops or pauses containers and "
                               "orders no certificates (the proxy serving these sites does that)")
        if "wakeproxy_config" not in updated or not ctx.options.wakeproxy_config:
            return
        try:
            config = load_config(ctx.options.wakeproxy_config)
        except ConfigError as e:
            if self._running:
                self.reloads["error"] += 1
            raise exceptions.OptionsError(str(e)) from None
        if self._running:
            fixed = [key for key in FIXED_WHILE_RUNNING if getattr(config, key) != getattr(self.runtime.config, key)]
            if fixed:
                self.reloads["error"] += 1
                # mitmproxy rolls the option back: the running proxy keeps its config, nothing half-applied.
                raise exceptions.OptionsError(
                    f"{config.source}: {', '.join(fixed)} cannot change while the proxy runs (the ACME account, "
                    "the state files, the status listener and the drain are set up once): restart wakeproxy "
                    "to apply the new config")
        options = self.options_for(config, set(ctx.options.keys()))
        self.runtime.config = config
        if self._running:
            self.reloads["ok"] += 1
        self.loaded_at = time.time()
        ctx.options.update(**options)
        if self._running and self.watches_docker:
            self._restart_view()

    def options_for(self, config: Config, known: set[str]) -> dict[str, Any]:
        """The mitmproxy options for `config` (and the state files they name, made if missing)."""
        try:
            cert = ensure_default_cert(config.state_dir)
            repair_mitmproxy_confdir(config.state_dir / "mitmproxy")
        except OSError as e:
            raise exceptions.OptionsError(
                f"state_dir {config.state_dir}: cannot write the default certificate: {e}"
            ) from None
        return proxy_options(config, str(cert), known)

    def running(self) -> None:
        self._running = True
        if self.watches_docker:
            self._restart_view()

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # Prefer HTTP/2 whenever the client offers it. mitmproxy honours the client's order, and
        # some clients (httpx, Python's ssl) list http/1.1 first although they speak h2 — so they
        # would lose multiplexing. Presetting the client's ALPN makes TlsConfig select it.
        if ctx.options.http2 and b"h2" in data.client_hello.alpn_protocols:
            data.context.client.alpn = b"h2"

    def done(self) -> None:
        logging.getLogger("mitmproxy.proxy.mode_servers").removeFilter(_LISTEN_LINE)
        self._running = False
        if self.view is not None:
            self.view.stop()
            self.view = None

    def _restart_view(self) -> None:
        from wakeproxy.docker.view import DockerView

        if self.view is not None:
            self.view.stop()
        self._ready_logged = False
        self.view = DockerView(self.runtime.config, asyncio.get_running_loop(), self._publish, self.runtime.emit,
                               self._engine)
        self.view.start()

    def _engine(self, state: EngineState) -> None:
        self.runtime.engine = state

    def container_status(self) -> dict[str, Any] | None:
        """The proxy's own container and its joined networks (docker/networks.py); None outside one."""
        return self.view.networks_status() if self.view is not None else None

    def _publish(self, snapshot: Snapshot) -> None:
        self.runtime.publish(snapshot)
        if not self._ready_logged:
            self._ready_logged = True
            listen = self.runtime.config.listen
            urls = [f"http://{listen.http}" if listen.http else "", f"https://{listen.https}" if listen.https else ""]
            logger.info(
                f"{self.announce}: {' '.join(u for u in urls if u)}; "
                f"{len(snapshot.containers)} containers, {len(snapshot.exact) + len(snapshot.wildcards)} hosts"
            )
