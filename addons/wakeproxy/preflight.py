"""What start-up would trip over, found before anything starts (`wakeproxy check` and `run`).

A config can parse and still fail at start: an operator-provided certificate
that is not one, a `state_dir` below a regular file, a port someone else holds.
`problems()` lists the first kind (files), `taken_ports()` the second; each
message names the key, the path or port, and the reason.  Files the proxy makes
itself are not checked here: they are repaired at start (`repair_own_files`).
"""

from __future__ import annotations

import datetime
import errno
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from wakeproxy.config import Address, Config
from wakeproxy.observe.logsafe import get_logger

logger = get_logger(__name__)


def problems(config: Config) -> list[str]:
    """Operator-provided files and folders that cannot be used, one message each."""
    from cryptography import x509

    from wakeproxy.certs.store import load_cert

    out: list[str] = []
    tls = config.tls
    if tls.default_cert is not None:
        try:
            load_cert(tls.default_cert, tls.default_key, "default")
        except OSError as e:
            out.append(f"tls.default_cert: cannot read {e.filename or tls.default_cert}: {e.strerror or e}")
        except ValueError as e:
            out.append(f"tls.default_cert: {e}")
    if tls.certs_dir is not None:
        if not tls.certs_dir.is_dir():
            out.append(f"tls.certs_dir: {tls.certs_dir} is not a folder")
        elif not os.access(tls.certs_dir, os.R_OK | os.X_OK):
            out.append(f"tls.certs_dir: {tls.certs_dir} cannot be read")
    bundle = config.acme.ca_bundle
    if bundle is not None:
        try:
            x509.load_pem_x509_certificates(bundle.read_bytes())
        except OSError as e:
            out.append(f"acme.ca_bundle: cannot read {bundle}: {e.strerror or e}")
        except ValueError:
            out.append(f"acme.ca_bundle: {bundle} holds no PEM certificate")
    why = _unusable_dir(config.state_dir)
    if why:
        out.append(f"state_dir: {why}")
    return out


def notes(config: Config, env: Mapping[str, str]) -> list[str]:
    """What the proxy does differently from what the environment may have meant (Docksal's variables):
    said once at start and by `wakeproxy check`, never an error."""
    from wakeproxy.config import DOCKSAL_CERTS_DIR, DOCKSAL_DEFAULT_CERT, DOCKSAL_UNUSED, docksal_default_cert_missing

    out: list[str] = []
    name = env.get(DOCKSAL_DEFAULT_CERT, "").strip()
    if name and config.tls.default_cert is None:
        why = docksal_default_cert_missing(name, config.tls.certs_dir or DOCKSAL_CERTS_DIR)
        if why:
            out.append(why)
    for var in DOCKSAL_UNUSED:
        if env.get(var, "").strip() not in ("", "0"):
            out.append(f"{var}: Docksal's variable has no counterpart and is not used (wakeproxy status, metrics "
                       "and log.access tell what the proxy does)")
    if config.idle.remove_after > 0 and Path("/projects").is_dir():
        out.append("/projects is mounted: abandoned projects are removed with their containers and own networks, "
                   "never their folders (Docksal's cleanup deleted them)")
    return out


def _unusable_dir(path: Path) -> str | None:
    """Why the proxy could not create or write `path`, else None (nothing is created here)."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        return f"{path} cannot be made: {p} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{path} cannot be written: no write permission on {p}"
    return None


def taken_ports(config: Config) -> list[str]:
    """Listeners of `config` whose port is already taken, naming the holder when it can be found."""
    out: list[str] = []
    for key, addr in (("listen.http", config.listen.http), ("listen.https", config.listen.https),
                      ("status.listen", config.status.listen)):
        if addr is None:
            continue
        err = _bind_error(addr)
        if err is not None:
            holder = _holder(addr.port)
            out.append(f"{key}: cannot listen on {addr}: {err}" + (f" (held by {holder})" if holder else ""))
    return out


def _bind_error(addr: Address) -> str | None:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what the proxy's listeners do too
        s.bind((addr.host or "0.0.0.0", addr.port))
        s.listen(1)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return "the port is in use"
        return e.strerror or str(e)
    finally:
        s.close()
    return None


def _holder(port: int) -> str | None:
    """`pid N (command)` of a process listening on TCP `port`, from /proc (Linux; best effort)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in (d for d in os.listdir("/proc") if d.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    return f"pid {pid}: {cmd.strip()[:120]}"
            except OSError:
                continue
    return None


def move_aside(path: Path, why: str) -> Path:
    """Rename a broken file (or folder) of our own to `NAME.broken-TIMESTAMP`, with one warning."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.broken-{stamp}")
    os.replace(path, target)
    logger.warning(f"{path} is unusable ({why}); moved aside to {target.name}, a new one is made")
    return target
