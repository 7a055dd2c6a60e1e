"""Certificates from a real ACME server (pebble): issuance, serving, restart, renewal, outages."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from pathlib import Path

import httpx
from acme_harness import handshake, http_get, https_get, leaf_of, wait_issued
from harness import backend_of, wait_for

log = logging.getLogger("wptest.acme")


def _roundtrip(conn, reader, request: bytes) -> int:
    """One HTTP/1.1 request on an open connection; the status, with the whole body read."""
    conn.sendall(request)
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    reader.read(length)
    return status


def _status(proxy) -> dict:
    return httpx.get(f"http://127.0.0.1:{proxy.status_port}/status", timeout=5, trust_env=False).json()


def _serial(proxy, name) -> int:
    return leaf_of(proxy, name).serial_number


def test_label_acme_issues_and_serves_full_chain_over_h2(pebble, acme_proxy, backend_container, host):
    name = host("labelled")
    backend_container("labelled", labels={"wakeproxy.host": name, "wakeproxy.acme": "true"})
    proxy = acme_proxy(pebble.acme_config())
    seconds = wait_issued(proxy, name)
    log.warning(f"issuance for {name}: {seconds:.2f} s")
    root = pebble.root_pem()
    # Only pebble's root is trusted: verifying needs the intermediate from the proxy.
    peer, _, alpn = handshake(proxy, name, root)
    assert alpn == "h2"
    assert ("DNS", name) in peer["subjectAltName"]
    status = _status(proxy)["certificates"][name]
    assert status["state"] == "valid" and status["last_error"] is None and status["not_after"]
    r = https_get(proxy, name, root)
    assert r.http_version == "HTTP/2"
    assert backend_of(r) == "labelled"
    # Challenge tokens are gone once the order is done: the path is the backend's again.
    assert http_get(proxy, name, "/.well-known/acme-challenge/nope").status_code in (404, 200, 308)


def test_letsencrypt_host_env_of_a_stopped_container_one_order_at_a_time(pebble, acme_proxy, backend_container,
                                                                         host):
    """acme-companion's LETSENCRYPT_HOST on a container that never started: the proxy answers the
    challenges itself (nobody wakes the sandbox) and the certificates are ready before anyone asks."""
    names = [host("sleeper"), "www." + host("sleeper"), "api." + host("sleeper")]
    c = backend_container("sleeper", env={"VIRTUAL_HOST": names[0], "LETSENCRYPT_HOST": ",".join(names)},
                          start=False)
    proxy = acme_proxy({**pebble.acme_config(), "acme": {**pebble.acme_config()["acme"], "concurrency": 1}})
    times = [wait_issued(proxy, n) for n in names]
    log.warning("issuance, LETSENCRYPT_HOST: " + ", ".join(f"{n}: {t:.2f} s" for n, t in zip(names, times)))
    root = pebble.root_pem()
    for n in names:
        handshake(proxy, n, root)
    c.reload()
    assert c.status == "created"
    assert "validate w/ HTTP" in pebble.log()
    # acme.concurrency 1: each order ends before the next begins.
    events = re.findall(r"acme: (\S+): (ordering a certificate|certificate issued)", proxy.log())
    assert [e[1] for e in events] == ["ordering a certificate", "certificate issued"] * 3


def test_restart_serves_the_same_certificate_without_a_new_order(pebble, acme_proxy, backend_container, host,
                                                                   tmp_path):
    name = host("restart")
    backend_container("restart", labels={"wakeproxy.host": name, "wakeproxy.acme": "true"}, start=False)
    state = str(tmp_path / "shared-state")
    first = acme_proxy({**pebble.acme_config(), "state_dir": state})
    wait_issued(first, name)
    serial = _serial(first, name)
    orders = pebble.orders()
    first.stop()
    key = Path(state) / "acme" / "account.key"
    assert key.stat().st_mode & 0o777 == 0o600
    # The same state under stock mitmdump (-s addons/wakeproxy.py): there our addon's running() comes
    # before TlsConfig's store rebuild, which the certificates must survive.
    second = acme_proxy({**pebble.acme_config(), "state_dir": state}, launcher="mitmdump")
    wait_for(lambda: "stored certificates loaded" in second.log(), 10, 0.05, "stored certificates")
    assert _serial(second, name) == serial
    time.sleep(1.0)  # time enough for an (unwanted) order to show
    assert pebble.orders() == orders
    assert "order created" not in second.log()


def test_renewal_at_a_third_of_the_lifetime_left(pebble_factory, acme_proxy, backend_container, host):
    """pebble issues 9-second certificates here: renewal is due 6 s after issuance."""
    pebble = pebble_factory(validity=9)
    name = host("renew")
    backend_container("renew", labels={"wakeproxy.host": name, "wakeproxy.acme": "true"}, start=False)
    proxy = acme_proxy(pebble.acme_config())
    wait_issued(proxy, name)
    first = leaf_of(proxy, name)
    lifetime = first.not_valid_after_utc - first.not_valid_before_utc
    # A connection opened before the renewal keeps working after it (nothing restarts).
    ctx = ssl.create_default_context(cadata=pebble.root_pem())
    conn = ctx.wrap_socket(socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5),
                           server_hostname=name)
    request = b"GET / HTTP/1.1\r\nHost: nobody.example.test\r\n\r\n"  # a proxy answer: wakes nothing
    reader = conn.makefile("rb")
    assert _roundtrip(conn, reader, request) == 404
    wait_issued(proxy, name, timeout=lifetime.total_seconds(), count=2)
    assert _roundtrip(conn, reader, request) == 404
    conn.close()
    second = leaf_of(proxy, name)
    assert second.serial_number != first.serial_number
    # Renewed when about a third of the first one's lifetime was left, not at its end.
    assert second.not_valid_before_utc <= first.not_valid_after_utc - lifetime / 4
    assert re.search(rf"acme: {re.escape(name)}: renewing a certificate", proxy.log())
    handshake(proxy, name, pebble.root_pem())


def test_ca_unreachable_backs_off_keeps_serving_and_recovers(pebble_factory, acme_proxy, backend_container, host):
    pebble = pebble_factory(validity=10)  # renewal due after 6.7 s
    name = host("outage")
    backend_container("outage", labels={"wakeproxy.host": name, "wakeproxy.acme": "true"}, start=False)
    proxy = acme_proxy(pebble.acme_config())
    wait_issued(proxy, name)
    old = _serial(proxy, name)
    pebble.gate.close()
    fail = re.compile(rf"acme: {re.escape(name)}: attempt (\d+) failed: (.*); next attempt in")
    wait_for(lambda: fail.search(proxy.log()), 20, 0.1, "a failed renewal attempt")
    assert "stays in service" in proxy.log()
    assert _serial(proxy, name) == old  # the old certificate is still served
    handshake(proxy, name, pebble.root_pem())
    # Exponential backoff: a second failure comes later than the first retry step.
    wait_for(lambda: len(fail.findall(proxy.log())) >= 2, 10, 0.1, "a second failed attempt")
    pebble.gate.open()
    wait_issued(proxy, name, timeout=15, count=2)
    assert _serial(proxy, name) != old
    handshake(proxy, name, pebble.root_pem())


def test_external_account_binding(pebble_factory, acme_proxy, backend_container, host):
    hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    pebble = pebble_factory(eab={"kid-1": hmac})
    name = host("eab")
    backend_container("eab", labels={"wakeproxy.host": name, "wakeproxy.acme": "true"}, start=False)
    cfg = pebble.acme_config()
    proxy = acme_proxy({"acme": {**cfg["acme"], "eab_kid": "kid-1", "eab_hmac_key": hmac}})
    wait_issued(proxy, name)
    handshake(proxy, name, pebble.root_pem())


def test_failed_validation_is_logged_with_the_problem_and_the_default_cert_serves(
        pebble_factory, acme_proxy, backend_container, host):
    from harness import free_port

    pebble = pebble_factory(http_port=free_port())  # pebble validates against a port nobody listens on
    name = host("invalid")
    backend_container("invalid", labels={"wakeproxy.host": name, "wakeproxy.acme": "true"}, start=False)
    proxy = acme_proxy(pebble.acme_config())
    fail = re.compile(rf"acme: {re.escape(name)}: attempt 1 failed: validation failed: {re.escape(name)}: "
                      r"connection: .*; next attempt in \d+s")
    wait_for(lambda: fail.search(proxy.log()), 20, 0.1, "the validation failure in the log")
    assert leaf_of(proxy, name).subject.rfc4514_string() == "O=wakeproxy,CN=wakeproxy default certificate"
    assert http_get(proxy, name).status_code != 308
    assert len(re.findall(rf"acme: {re.escape(name)}: attempt 1 failed", proxy.log())) == 1  # once per attempt
    cert = _status(proxy)["certificates"][name]  # what `wakeproxy status` shows
    assert cert["state"] in ("failed", "ordering") and cert["not_after"] is None
    assert cert["failures"] >= 1 and "validation failed" in cert["last_error"]


def test_ca_that_forgot_the_account_gets_it_registered_again(pebble_factory, acme_proxy, backend_container, host):
    """pebble keeps nothing across a restart: the renewal finds its account gone, and re-registers."""
    pebble = pebble_factory(validity=8)  # renewal due after ~5.3 s
    name = host("forgot")
    backend_container("forgot", labels={"wakeproxy.host": name, "wakeproxy.acme": "true"}, start=False)
    proxy = acme_proxy(pebble.acme_config())
    wait_issued(proxy, name)
    pebble.restart()
    wait_issued(proxy, name, timeout=20, count=2)
    assert re.search(rf"acme: {re.escape(name)}: attempt 1 failed: accountDoesNotExist", proxy.log())
    assert proxy.log().count("acme: account registered") == 2
    handshake(proxy, name, pebble.root_pem())  # chains to the new pebble's root


def test_tls_alpn_01_when_there_is_no_http_listener(pebble, acme_proxy, backend_container, host):
    name = host("alpn")
    backend_container("alpn", labels={"wakeproxy.host": name, "wakeproxy.acme": "true"}, start=False)
    proxy = acme_proxy({**pebble.acme_config(), "listen": {"http": None}})
    seconds = wait_issued(proxy, name)
    log.warning(f"issuance over tls-alpn-01 for {name}: {seconds:.2f} s")
    assert f"acme: {name}: tls-alpn-01 challenge answered" in proxy.log()
    assert "set VALID by completed challenge" in pebble.log() and "validate w/ HTTP" not in pebble.log()
    _, _, alpn = handshake(proxy, name, pebble.root_pem())
    assert alpn == "h2"  # ordinary handshakes are untouched
