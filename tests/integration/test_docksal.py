"""Docksal drop-in: the proxy's image run with Docksal's variables and certificate folder, in front of
Docksal-shaped sandboxes (Compose projects whose web container carries `io.docksal.*` labels), checked
the way Docksal's own suite (docksal/service-vhost-proxy tests/test.bats) checks its proxy.

One proxy container for the module (host networking, the recommended mode), with
PROJECT_INACTIVITY_TIMEOUT=3s, PROJECT_DANGLING_TIMEOUT=12s, DEFAULT_CERT and /etc/certs/custom.
"""

from __future__ import annotations

import datetime
import ssl
import time
from pathlib import Path

import docker.errors
import docker.types
import httpx
import pytest
from container_harness import ProxyContainer
from harness import backend_of, proxied, remove_network, wait_for

INACTIVITY = 3.0
DANGLING = 12.0


def _cert(directory: Path, base: str, *names: str) -> None:
    """`base`.crt/.key in `directory`: a self-signed certificate for `names` (SANs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))
    (directory / f"{base}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{base}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture(scope="module")
def docksal(docker_client, run_id, image, tmp_path_factory):
    """The proxy container, as a Docksal server would run it, and the names its certificates cover."""
    workdir = tmp_path_factory.mktemp("docksal")
    certs = workdir / "certs"
    certs.mkdir()
    tag = run_id.split("-")[-1]
    domain = f"{tag}.example.com"  # project hosts are one label under it
    _cert(certs, domain, domain, f"*.{domain}")  # Docksal's closest match: p.<domain> gets <domain>.crt
    _cert(certs, "special", f"special.{domain}")  # chosen by io.docksal.cert-name=special
    _cert(certs, "fallback", "fallback.invalid")  # DEFAULT_CERT=fallback
    for p in (workdir, certs, *certs.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    # No labels.cert_name here: with Docksal's folder mounted, io.docksal.cert-name labels count by themselves.
    config = {"docker": {"networks": []}, "wake": {"per_client": 0}}
    proxy = ProxyContainer(docker_client, image, f"{run_id}-docksal", "host", workdir, config,
                           env={"PROJECT_INACTIVITY_TIMEOUT": f"{INACTIVITY:g}s",
                                "PROJECT_DANGLING_TIMEOUT": f"{DANGLING:g}s", "PROJECT_AUTOSTART": "1",
                                "DEFAULT_CERT": "fallback",
                                # Docksal serves plain HTTP as it is; ours sends hosts with a valid
                                # certificate to https unless told not to (README "Coming from Docksal").
                                "WAKEPROXY_HTTPS_REDIRECT": "false"},
                           volumes={str(certs): {"bind": "/etc/certs/custom", "mode": "ro"}})
    try:
        proxy.start()
        yield proxy, domain
    finally:
        proxy.remove()


class Projects:
    """Docksal-shaped Compose projects: `<run_id>-<name>` with a `<project>_default` network, a web container
    labelled as Docksal's stacks label it (`io.docksal.virtual-host=${VIRTUAL_HOST},*.${VIRTUAL_HOST},
    ${VIRTUAL_HOST}.*`, `io.docksal.cert-name=none` unless set, `io.docksal.project-root`), and optionally a
    db beside it with a named volume."""

    def __init__(self, client, run_id: str, factory) -> None:
        self.client, self.run_id, self.factory = client, run_id, factory
        self.networks: list = []
        self.volumes: list[str] = []

    def __call__(self, name: str, host: str, port: int | None = None, db: bool = False,
                 labels: dict | None = None, start: bool = True):
        project = f"{self.run_id}-{name}"
        net = self.client.networks.create(f"{project}_default", driver="bridge", labels={
            "com.docker.compose.project": project, "com.docker.compose.network": "default"})
        self.networks.append(net)
        compose = {"com.docker.compose.project": project}
        env = {"PORT": str(port)} if port else {}
        web = self.factory(f"{name}-web", network=net.name, keep_awake=False, env=env, start=start, labels={
            **compose, "com.docker.compose.service": "web", "io.docksal.virtual-host": f"{host},*.{host},{host}.*",
            "io.docksal.cert-name": "none", "io.docksal.project-root": f"/home/docker/projects/{name}",
            **({"io.docksal.virtual-port": str(port)} if port else {}), **(labels or {})})
        out = [web]
        if db:
            volume = f"{project}_db_data"
            self.client.volumes.create(volume, labels={"com.docker.compose.project": project})
            self.volumes.append(volume)
            out.append(self.factory(f"{name}-db", network=net.name, keep_awake=False, start=start,
                                    volumes={volume: {"bind": "/data", "mode": "rw"}},
                                    labels={**compose, "com.docker.compose.service": "db", **(labels or {})}))
        return net, out

    def cleanup(self) -> None:
        self.factory.cleanup()
        for net in self.networks:
            remove_network(net)
        for v in self.volumes:
            try:
                self.client.volumes.get(v).remove(force=True)
            except docker.errors.NotFound:
                pass


@pytest.fixture
def projects(docker_client, run_id, backend_container):
    p = Projects(docker_client, run_id, backend_container)
    yield p
    p.cleanup()



def _https(proxy: ProxyContainer, host: str, path: str = "/", http2: bool = True,
           timeout: float = 30.0) -> httpx.Response:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with httpx.Client(verify=ctx, http2=http2, timeout=timeout, trust_env=False) as c:
        return c.get(f"{proxy.https_url}{path}", headers={"Host": host}, extensions={"sni_hostname": host})


def _served_names(proxy: ProxyContainer, host: str) -> list[str]:
    """The DNS names of the certificate the proxy serves for SNI `host`."""
    import socket

    from cryptography import x509

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as s:
        der = s.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


def _group(proxy: ProxyContainer, group: str) -> dict:
    import json

    code, out = proxy.exec("wakeproxy", "status", "--json")
    assert code == 0, out
    return next(g for g in json.loads(out)["groups"] if g["group"] == group)


def _status(c) -> str:
    c.reload()
    return c.status


def test_unknown_host_404_over_http1_and_http2(docksal):
    proxy, domain = docksal
    r = proxy.get(f"nobody.{domain}")
    assert r.status_code == 404 and r.http_version == "HTTP/1.1"
    r = _https(proxy, f"nobody.{domain}")
    assert r.status_code == 404 and r.http_version == "HTTP/2"


def test_a_started_project_answers_within_2_s_and_a_stopped_one_is_woken_over_http_and_https(docksal, projects):
    proxy, domain = docksal
    host = f"p1.{domain}"
    _, (web,) = projects("dk-p1", host, start=False)
    web.start()
    t0 = time.monotonic()
    wait_for(lambda: proxy.get(host, timeout=5).status_code == 200, 10, 0.05, f"{host} after its start")
    assert time.monotonic() - t0 < 2.0
    group = f"{projects.run_id}-dk-p1"
    for scheme in ("http", "https"):
        web.stop(timeout=5)
        wait_for(lambda: _group(proxy, group)["state"] == "asleep", 10, 0.1, "the stop to be seen")
        t0 = time.monotonic()
        r = proxy.get(host, "/api") if scheme == "http" else _https(proxy, host, "/api")  # held, then answered
        assert r.status_code == 200 and backend_of(r) == "dk-p1-web", (scheme, r.status_code, r.text[:300])
        assert _status(web) == "running"
        print(f"\n[docksal] woken over {scheme} in {time.monotonic() - t0:.2f} s")


def test_an_idle_stack_is_stopped_whole_and_a_permanent_one_is_not(docksal, projects):
    proxy, domain = docksal
    _, idle = projects("dk-idle", f"idle.{domain}", db=True)
    _, perm = projects("dk-perm", f"perm.{domain}", db=True, labels={"io.docksal.permanent": "true"})
    for h in (f"idle.{domain}", f"perm.{domain}"):
        wait_for(lambda h=h: proxy.get(h).status_code == 200, 10, 0.1, h)
    wait_for(lambda: all(_status(c) == "exited" for c in idle), INACTIVITY + 10, 0.2, "the idle stack stopped")
    assert all(_status(c) == "running" for c in perm)
    for c in idle:  # stopped, not removed
        c.reload()
        assert c.attrs["State"]["Status"] == "exited"


def test_a_non_default_port_label_for_a_stack_and_a_standalone_container(docksal, projects, backend_container, run_id):
    proxy, domain = docksal
    projects("dk-port", f"port.{domain}", port=8080)
    backend_container("dk-lone", keep_awake=False, env={"PORT": "8081"},
                      labels={"io.docksal.virtual-host": f"lone.{domain}", "io.docksal.virtual-port": "8081"})
    for h, name in ((f"port.{domain}", "dk-port-web"), (f"lone.{domain}", "dk-lone")):
        r = wait_for(lambda h=h: (resp := proxy.get(h)).status_code == 200 and resp, 10, 0.1, h)
        assert backend_of(r) == name


def test_certificates_by_closest_match_by_cert_name_and_the_default(docksal, projects):
    proxy, domain = docksal
    projects("dk-cert", f"project2.{domain}")
    projects("dk-named", f"special.{domain}", labels={"io.docksal.cert-name": "special"})
    projects("dk-deep", f"a.b.{domain}")
    for h in (f"special.{domain}", f"a.b.{domain}"):
        wait_for(lambda h=h: proxy.get(h).status_code == 200, 10, 0.1, h)
    assert sorted(_served_names(proxy, f"project2.{domain}")) == sorted([domain, f"*.{domain}"])
    wait_for(lambda: _served_names(proxy, f"special.{domain}") == [f"special.{domain}"], 10, 0.2,
             "the cert-name certificate")
    # Nothing covers a site two labels under the domain: the default (DEFAULT_CERT), not *.<domain>.
    wait_for(lambda: _served_names(proxy, f"a.b.{domain}") == ["fallback.invalid"], 10, 0.2, "the default")
    assert _https(proxy, f"project2.{domain}").status_code == 200


def test_a_dangling_project_is_removed_but_a_permanent_and_a_recently_used_one_stay(docksal, projects, docker_client):
    proxy, domain = docksal
    net, dangling = projects("dk-dang", f"dang.{domain}", db=True, start=False)
    _, perm = projects("dk-perm2", f"perm2.{domain}", start=False, labels={"io.docksal.permanent": "true"})
    _, used = projects("dk-used", f"used.{domain}", start=False)
    # Not a Docksal project (no io.docksal.project-root): Docksal's cleanup never removes it, nor does ours.
    lone = projects.factory("dk-lone-dang", keep_awake=False, start=False,
                            labels={"io.docksal.virtual-host": f"lone-dang.{domain}"})
    volume = f"{projects.run_id}-dk-dang_db_data"
    t0 = time.monotonic()
    code, out = proxy.exec("wakeproxy", "status")
    while time.monotonic() - t0 < DANGLING + 15 and any(_exists(c) for c in dangling):
        proxy.get(f"used.{domain}")  # used now and then: it stays
        time.sleep(2)
    assert not any(_exists(c) for c in dangling), "the dangling project was not removed"
    with pytest.raises(docker.errors.NotFound):
        docker_client.networks.get(net.id)  # its own network is gone
    assert docker_client.volumes.get(volume) is not None  # its volume is kept
    assert all(_exists(c) for c in [*perm, *used, lone])
    log = proxy.log()
    assert f"retire {projects.run_id}-dk-dang: removed container(s)" in log and "volumes kept" in log, log[-3000:]
    assert f"retire {projects.run_id}-dk-perm2" not in log and f"retire {projects.run_id}-dk-used" not in log
    assert "dk-lone-dang" not in "".join(line for line in log.splitlines() if "retire" in line)
    # Docksal's default label: its trailing wildcard is noted once, its other names served.
    assert f"'dang.{domain}.*'" in log and "trailing wildcards" in log
    assert "REMOVED IN" in out, out
    # Docksal's habit: `docker exec … proxyctl stats`
    code, stats = proxy.exec("proxyctl", "stats")
    assert code == 0 and stats.startswith("docker: connected") and "projects: " in stats, stats


def _exists(c) -> bool:
    try:
        c.reload()
        return True
    except docker.errors.NotFound:
        return False


def test_project_autostart_0_answers_a_page_and_starts_nothing(docker_client, run_id, image, tmp_path, projects):
    """PROJECT_AUTOSTART=0: a request for a stopped project gets a page saying so (Docksal answered 406; ours
    is a 503 without Retry-After), and the project stays stopped."""
    proxy = ProxyContainer(docker_client, image, f"{run_id}-docksal-noauto", "host", tmp_path,
                           {"docker": {"networks": []}, "wake": {"per_client": 0}},
                           # `fin` always passes DEFAULT_CERT (docksal: its built-in certificate, no file here)
                           env={"PROJECT_AUTOSTART": "0", "PROJECT_INACTIVITY_TIMEOUT": "0", "DEFAULT_CERT": "docksal"})
    try:
        proxy.start()
        assert "note: DEFAULT_CERT=docksal: docksal.crt and docksal.key not in /etc/certs/custom" in proxy.log()
        host = f"stopped.{run_id.split('-')[-1]}.example.com"
        _, (web,) = projects("dk-noauto", host, start=False)
        r = wait_for(lambda: (resp := proxy.get(host)).status_code != 404 and resp, 10, 0.1, "the site known")
        assert r.status_code == 503 and "Retry-After" not in r.headers
        assert "Sandbox stopped" in r.text and "PROJECT_AUTOSTART=0" in r.text  # 127.0.0.1: a debug client
        time.sleep(1)
        assert _status(web) == "created"  # never started
        assert f"wake {run_id}-dk-noauto" not in proxy.log()  # (this engine may hold others' containers)
    finally:
        proxy.remove()


def test_a_wake_on_a_network_without_free_addresses_is_a_503_naming_the_fix(proxy, backend_container, busybox_image,
                                                                             docker_client, run_id, host):
    """Docker's own out-of-addresses error at `docker start`, for real: a /29 network filled up first."""
    from harness import choose_free_block

    block = choose_free_block(docker_client)
    subnet = f"{block.network_address}/29"
    net = docker_client.networks.create(f"{run_id}-full", driver="bridge", ipam=docker.types.IPAMConfig(
        pool_configs=[docker.types.IPAMPool(subnet=subnet)]))
    try:
        for i in range(10):  # take every address (Docker keeps the gateway's; a /29 has 5 more)
            filler = backend_container(f"filler{i}", image=busybox_image, command=["sleep", "300"],
                                       network=net.name, start=False)
            try:
                filler.start()
            except docker.errors.APIError as e:
                assert "no available" in str(e).lower(), e
                filler.remove(force=True)
                break
        else:
            pytest.fail("the /29 network never filled up")
        backend_container("full-web", network=net.name, keep_awake=False, start=False,
                          labels={"wakeproxy.host": host("full-web")})
        p = proxy({"docker": {"networks": []}})
        r = proxied(p, host("full-web"), headers={"Accept": "application/json"}, timeout=20)
        assert r.status_code == 503, r.text[:500]
        assert "Out of network addresses" in r.text and "bigger subnet" in r.text  # 127.0.0.1 sees the detail
        assert "bigger subnet" in p.log()  # and the log line names the fix
    finally:
        backend_container.cleanup()
        remove_network(net)


def _docksal_stop(net, containers: list) -> None:
    """What Docksal's `fin stop` and its vhost-proxy do to put a project to sleep: `docker compose stop`,
    `docker network disconnect -f <project>_default` for each container, `docker network rm` the network."""
    for c in containers:
        c.stop(timeout=5)
    for c in containers:
        net.disconnect(c, force=True)
    net.remove()


def test_a_project_whose_network_docksal_removed_is_listed_asleep_and_woken_by_making_it_again(
        proxy, projects, docker_client, run_id, host):
    """A Docksal server switching over has sleeping projects without a network: a request makes
    `<project>_default` again as Compose would (its labels), connects the project's containers under
    their service names, and starts them."""
    from harness import free_port

    project, site = f"{run_id}-dk-gone", host("dk-gone")
    net, (web, db) = projects("dk-gone", site, db=True)
    name = net.name
    status_port = free_port()
    p = proxy({"docker": {"networks": []}, "wake": {"per_client": 0},
               "status": {"listen": f"127.0.0.1:{status_port}"}})

    def state() -> str | None:
        r = httpx.get(f"http://127.0.0.1:{status_port}/status", timeout=5, trust_env=False)
        return next((g["state"] for g in r.json()["groups"] if g["group"] == project), None)

    try:
        wait_for(lambda: proxied(p, site).status_code == 200, 15, 0.1, "the project served")
        _docksal_stop(net, [web, db])
        wait_for(lambda: state() == "asleep", 10, 0.1, "the project listed asleep without its network")
        r = proxied(p, site, "/api", headers={"Accept": "application/json"}, timeout=30)
        assert r.status_code == 200 and backend_of(r) == "dk-gone-web", (r.status_code, r.text[:500])
        made = docker_client.networks.get(name)
        projects.networks.append(made)
        assert made.attrs["Driver"] == "bridge"
        assert made.attrs["Labels"] == {"com.docker.compose.project": project, "com.docker.compose.network": "default"}
        for c, service in ((web, "web"), (db, "db")):
            c.reload()
            assert c.status == "running"
            assert service in (c.attrs["NetworkSettings"]["Networks"][name].get("Aliases") or []), c.attrs[
                "NetworkSettings"]["Networks"]
        assert f"network {name} did not exist; created it" in p.log()
    finally:
        try:
            remove_network(docker_client.networks.get(name))
        except docker.errors.NotFound:
            pass
