"""Helpers for the ACME tests: pebble + pebble-challtestsrv processes, a closable gate in front of
pebble's API, a proxy launcher with fixed ports, and TLS/HTTP clients that check what the proxy serves.

Only 127.0.0.1 is contacted.  Kept out of conftest.py so that test modules import it by a unique name.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from harness import ProxyLauncher, ProxyProcess, deep_merge, free_port, tcp_relay, wait_for  # noqa: E402

# --------------------------------------------------------------------------
# processes


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not installed (Debian package: pebble)", pytrace=False)
    return path


class Proc:
    """One child process with its log file; stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict | None = None):
        self.cmd, self.log_path = cmd, log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


def make_api_cert(directory: Path, ips: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A self-signed certificate for pebble's API on 127.0.0.1 (and `ips`; the proxy trusts it via ca_bundle)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble API (wakeproxy tests)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), *(
                x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", *ips))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "api-cert.pem", directory / "api-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Pebble:
    """pebble + pebble-challtestsrv for one test; `directory` goes through the `gate`."""

    def __init__(self, workdir: Path, http_port: int, https_port: int, validity: int | None = None,
                 eab: dict[str, str] | None = None, api_ips: tuple[str, ...] = ()):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.api_cert, api_key = make_api_cert(workdir, api_ips)
        self.api_port, self.mgmt_port, self.dns_port = free_port(), free_port(), free_port()
        self.dns = Proc([_need("pebble-challtestsrv"), "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                         "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "",
                         "-tlsalpn01", "", "-management", f"127.0.0.1:{free_port()}"],
                        workdir / "challtestsrv.log")
        cfg = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.api_port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(self.api_cert), "privateKey": str(api_key),
            "httpPort": http_port, "tlsPort": https_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }}
        if validity is not None:
            cfg["pebble"]["certificateValidityPeriod"] = validity
        if eab:
            cfg["pebble"]["externalAccountBindingRequired"] = True
            cfg["pebble"]["externalAccountMACKeys"] = eab
        (workdir / "pebble.json").write_text(json.dumps(cfg))
        # A relay to the API that the test can cut (the CA unreachable) and open again.
        self.gate, self.gate_port = tcp_relay(self.api_port)
        self._start()

    def _start(self) -> None:
        self.proc = Proc([_need("pebble"), "-config", str(self.workdir / "pebble.json"),
                          "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                         self.workdir / "pebble.log", env={"PEBBLE_VA_NOSLEEP": "1"})
        wait_for(self._up, 15, 0.05, "pebble's directory")

    def restart(self) -> None:
        """A new pebble on the same ports: every account, order and key of the old one is gone."""
        self.proc.stop()
        self._start()

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.gate_port}/dir"

    def _up(self) -> bool:
        if self.proc.proc.poll() is not None:
            raise RuntimeError(f"pebble exited:\n{self.proc.log()}")
        r = httpx.get(f"https://127.0.0.1:{self.api_port}/dir", timeout=2, trust_env=False,
                      verify=ssl.create_default_context(cafile=str(self.api_cert)))
        return r.status_code == 200

    def root_pem(self) -> str:
        r = httpx.get(f"https://127.0.0.1:{self.mgmt_port}/roots/0", verify=False, timeout=5, trust_env=False)
        r.raise_for_status()
        return r.text

    def log(self) -> str:
        return self.proc.log()

    def orders(self) -> int:
        """New orders pebble has seen (from its request log)."""
        return self.log().count("POST /order-plz")

    def acme_config(self) -> dict:
        return {"acme": {"enabled": True, "directory": self.directory, "ca_bundle": str(self.api_cert),
                         "email": "admin@example.test"}}

    def stop(self) -> None:
        self.gate.close()
        self.proc.stop()
        self.dns.stop()


class FixedPortLauncher(ProxyLauncher):
    """The integration launcher, with the ports fixed in advance (pebble must know the HTTP port)."""

    def __init__(self, workdir: Path, networks: list[str], http_port: int, https_port: int):
        super().__init__(workdir, networks)
        self.http_port, self.https_port = http_port, https_port

    def __call__(self, overrides: dict | None = None, launcher: str = "module",
                 ready_timeout: float = 20.0, extra_args: list[str] | None = None,
                 env: dict | None = None) -> ProxyProcess:
        from harness import proxy_command

        workdir = self.workdir / f"proxy{len(self.started)}"
        workdir.mkdir(parents=True)
        config = deep_merge(self.base_config(workdir, self.http_port, self.https_port), overrides or {})
        cfg_path = workdir / "wakeproxy.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = proxy_command(launcher, cfg_path) + list(extra_args or [])
        p = ProxyProcess(cmd, config, cfg_path, workdir / "proxy.log", self.http_port, self.https_port)
        self.started.append(p)
        old = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            return p.start(ready_timeout)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v



# --------------------------------------------------------------------------
# TLS client helpers


def handshake(proxy: ProxyProcess, sni: str, root_pem: str | None = None,
              alpn: tuple[str, ...] = ("h2", "http/1.1")) -> tuple[dict | None, bytes, str | None]:
    """TLS to the proxy with `sni`: (verified peer cert dict or None, leaf DER, ALPN).

    With `root_pem` the chain must verify against it (so the proxy must send
    the intermediates) and match `sni`; without, nothing is verified.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if root_pem is not None:
        ctx.load_verify_locations(cadata=root_pem)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(list(alpn))
    with socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            return (s.getpeercert() if root_pem else None), s.getpeercert(binary_form=True), \
                s.selected_alpn_protocol()


def leaf_of(proxy: ProxyProcess, sni: str):
    from cryptography import x509

    return x509.load_der_x509_certificate(handshake(proxy, sni)[1])


class _H2First(ssl.SSLContext):
    """httpcore offers ALPN http/1.1 first; mitmproxy follows the client's order. Offer h2 first."""

    def set_alpn_protocols(self, protocols):  # noqa: D401 - override
        super().set_alpn_protocols(["h2", "http/1.1"] if "h2" in protocols else protocols)


def https_get(proxy: ProxyProcess, name: str, root_pem: str, path: str = "/", http2: bool = True,
              headers: dict | None = None) -> httpx.Response:
    """GET https://name/path through the proxy, verifying against `root_pem`, SNI and Host = name."""
    ctx = _H2First(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=root_pem)
    with httpx.Client(verify=ctx, http2=http2, timeout=10, trust_env=False) as c:
        return c.get(f"{proxy.https_url}{path}", headers={"Host": name, **(headers or {})},
                     extensions={"sni_hostname": name})


def http_get(proxy: ProxyProcess, name: str, path: str = "/") -> httpx.Response:
    with httpx.Client(timeout=10, trust_env=False, follow_redirects=False) as c:
        return c.get(f"{proxy.http_url}{path}", headers={"Host": name})


def wait_issued(proxy: ProxyProcess, name: str, timeout: float = 30.0, count: int = 1) -> float:
    """Wait for the proxy's log to report `count` issuances for `name`; returns the last one's seconds."""
    pat = re.compile(rf"acme: {re.escape(name)}: certificate issued in ([0-9.]+) s")

    def done():
        found = pat.findall(proxy.log())
        return found[count - 1] if len(found) >= count else None
    seconds = float(wait_for(done, timeout, 0.05, f"certificate #{count} for {name}"))
    # The controller logs the issuance; each serving worker puts it in service a few ms later (pushed
    # over the channel) and says so: served means every worker has said so since.
    workers = len(proxy.children("worker"))
    if workers:
        def installed() -> bool:
            text = proxy.log()
            after = text[[m.end() for m in pat.finditer(text)][count - 1]:]
            return len(set(re.findall(r"worker (\d+): \d+ new certificate\(s\) in service", after))) >= workers
        wait_for(installed, 5, 0.02, f"{name} in service on every worker")
    return seconds
