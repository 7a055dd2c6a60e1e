"""Hostile tenants (issue 10): what a tenant who controls only its own containers' labels can do
to another tenant's names, certificates, redirects and containers — against the real Docker
engine and the real proxy process, tried the way an attacker would.

Cast (all named with the run's prefix, removed at the end even on failure):

- victim:    Compose project `<run>-victim` (web: routed; db: not routed), created FIRST; no
             idle-timeout label, so only the proxy's 30 min default would ever put it to sleep.
- hijacker:  Compose project `<run>-evil`, created at least a second later (its project name sorts
             before the victim's, so a tie on creation time would go to the attacker: the order
             really is decided by time). It claims the victim's names, wildcards over them, a bank's
             name (LETSENCRYPT_HOST), and sets cert-name / https-redirect=false.
- foreign:   containers outside Compose that set `wakeproxy.group` to a bystander's name or to the
             victim's project, with `wakeproxy.idle-timeout=2s` + `idle-action=pause`.
- bystanders: unlabelled containers, on a network the proxy may not use (running, and never
             started), and one on the proxy's own network.

One proxy (`world.proxy`) serves the tricks whose config agrees; the others start their own.
Docker's event log is the witness for what was started, stopped or paused.

Every test that fails because the proxy misbehaves carries a `# DEFECT:` comment.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import docker.errors
import httpx
import pytest
from cryptography import x509
from harness import REPO, backend_of, make_self_signed, proxied, wait_for

WAKEPROXY = REPO / ".venv" / "bin" / "wakeproxy"
JSON = {"Accept": "application/json"}
NAV = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
       "Upgrade-Insecure-Requests": "1",
       "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0 Safari/537.36"}
EVIL_UA = "Mozilla/5.0 (compatible; EvilBot/1.0)"
UNREACHABLE_ACME = "https://127.0.0.1:1/dir"  # nothing listens on port 1: every order fails at once
LIFECYCLE = {"start", "restart", "stop", "die", "kill", "pause", "unpause"}


# --------------------------------------------------------------------------
# helpers


def make_all(jobs: dict) -> dict:
    """Create containers in parallel: {key: callable} → {key: container}."""
    if not jobs:
        return {}
    with ThreadPoolExecutor(min(8, len(jobs))) as pool:
        futures = {k: pool.submit(job) for k, job in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def docker_events(client, since: float, until: float | None = None, **filters) -> list[dict]:
    """Docker's recorded container events in [since, until], oldest first."""
    until = time.time() + 0.05 if until is None else until
    stream = client.events(decode=True, since=f"{since:.6f}", until=f"{until:.6f}",
                           filters={"type": "container", **filters})
    try:
        return list(stream)
    finally:
        stream.close()


def lifecycle(client, containers, since: float) -> list[tuple[str, str]]:
    """(container name, action) of every start/stop/pause/… event of `containers` since `since`."""
    ids = {c.id: c.name for c in containers}
    ev = docker_events(client, since, container=list(ids))
    return [(ids.get(e["id"], e["id"][:12]), e["Action"]) for e in ev if e.get("Action") in LIFECYCLE]


def state_of(c) -> dict:
    c.reload()
    return c.attrs["State"]


def status_json(p) -> dict:
    r = httpx.get(f"http://127.0.0.1:{p.status_port}/status", timeout=5, trust_env=False)
    r.raise_for_status()
    return r.json()


def cli_status(p) -> str:
    """`wakeproxy status --config CFG`, as an operator runs it."""
    cmd = [str(WAKEPROXY), "status", "--config", str(p.config_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    assert out.returncode == 0, f"{cmd}: {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def conflict(report: dict, name: str, group: str) -> dict | None:
    return next((c for c in report.get("conflicts", []) if c["name"] == name and c["group"] == group), None)


def refusal(report: dict, name: str, group: str) -> dict | None:
    return next((c for c in [*report.get("conflicts", []), *report.get("refused", [])]
                 if c["name"] == name and c["group"] == group), None)


def backends(p, h: str, n: int = 20, **kw) -> list[str | None]:
    """Who answers `n` requests for `h` (bounded: n requests, 5 s each)."""
    return [backend_of(proxied(p, h, timeout=5, **kw)) for _ in range(n)]


def leaf_serial(p, sni: str) -> int:
    """The serial of the leaf certificate the proxy serves for SNI `sni`."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", p.https_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            der = s.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def cert_file(directory: Path, base: str, cn: str) -> int:
    """A self-signed certificate for `cn` as `<base>.crt` + `<base>.key` in `directory`; its serial."""
    tmp = directory / f".make-{base}"
    cert, key = make_self_signed(tmp, cn)
    shutil.copy(cert, directory / f"{base}.crt")
    shutil.copy(key, directory / f"{base}.key")
    serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    shutil.rmtree(tmp)
    return serial


def log_lines(p) -> list[str]:
    return p.log().splitlines()


def assert_untouched(p, docker_client, victims, since: float, victim_group: str) -> None:
    """No start/stop/pause of `victims` since `since` — as far as THIS proxy is concerned.

    Each group this proxy puts to sleep or wakes must have exactly one member (a group that had
    pulled in a foreign container would say "2 container(s)" or more: members are counted).
    Docker's event log does not say who called: other wakeproxy processes on this engine (another
    session's ad-hoc proxies with docker.networks: [] = every bridge, possibly running older code)
    also act on the attackers' 2 s idle labels. Pauses (and this proxy's unpause of a paused victim
    that a test request asks for) with a clean log are reported as xfail, naming the other process."""
    lines = log_lines(p)
    acts = [ln for ln in lines if ("idle " in ln and "no activity" in ln) or ("wake " in ln and ": starting" in ln)]
    # (the victim's own wake, for a request to the victim's host, is the one exception)
    assert all(" 1 container(s)" in ln for ln in acts if f"wake {victim_group}: " not in ln), acts
    touched = lifecycle(docker_client, victims, since)
    if touched and not [a for _, a in touched if a in ("start", "restart", "stop", "kill")]:
        pytest.xfail(f"foreign containers paused by ANOTHER process on this Docker engine, not by this "
                     f"proxy (its actions: {acts}): {touched}")
    assert touched == [], f"foreign containers were started/stopped/paused: {touched}. Proxy log:\n" + \
        "\n".join(lines[-40:])


# --------------------------------------------------------------------------
# the cast, and one proxy for the tricks that share a config


@pytest.fixture(scope="module")
def world(module_containers, module_proxy, docker_client, run_id, host, other_network, test_network,
          tmp_path_factory):
    mk = module_containers
    H = host
    P_V, P_E, P_E2 = f"{run_id}-victim", f"{run_id}-evil", f"{run_id}-evil2"
    vzone = f"victimzone.{run_id}.test"
    names = SimpleNamespace(
        victim=H("victim"), home=H("home"), vzone=vzone, evil=H("evil"), bank="www.some-bank.example",
        g1=H("evil-g1"), g2=H("evil-g2"), g3=H("evil-g3"), g4=H("evil-g4"), g5=H("evil-g5"),
    )
    compose = lambda project, service: {"com.docker.compose.project": project,  # noqa: E731
                                        "com.docker.compose.service": service}

    # 1. The victim and the bystanders exist first.
    first = make_all({
        "victim": lambda: mk("victim-web", keep_awake=False, labels={
            **compose(P_V, "web"),
            "wakeproxy.host": f"{names.victim},{names.home},*.{vzone}"}),
        "victim_db": lambda: mk("victim-db", keep_awake=False, labels=compose(P_V, "db")),
        "bystander": lambda: mk("bystander", keep_awake=False, network=other_network),
        "bystander_off": lambda: mk("bystander-off", keep_awake=False, network=other_network, start=False),
        "bystander_local": lambda: mk("bystander-local", keep_awake=False),
    })
    # Creation times are whole seconds: make sure every attacker is strictly younger.
    newest = max(state_created(c) for c in first.values())
    while time.time() < newest + 1.05:
        time.sleep(0.05)

    foreign = {"wakeproxy.idle-timeout": "2s", "wakeproxy.idle-action": "pause"}
    by = first["bystander"].name
    by_off = first["bystander_off"].name
    by_local = first["bystander_local"].name
    # 2. The attackers.
    second = make_all({
        "hijacker": lambda: mk("hijacker", keep_awake=False, labels={
            **compose(P_E, "web"),
            "wakeproxy.host": ",".join([
                names.victim, names.home, names.evil,
                f"*.{vzone}", f"foo.{vzone}", f"*.deep.{vzone}",  # inside the victim's wildcard
                "*.test", f"*.{run_id}.test",  # over everything / over the victim's names
            ]),
            "wakeproxy.cert-name": "evilcert",
            "wakeproxy.https-redirect": "false",
        }, env={"LETSENCRYPT_HOST": f"{names.bank},{names.victim},{names.evil}"}),
        # wakeproxy.group naming someone else's container or project, with a short idle pause
        "g1": lambda: mk("evil-g1", keep_awake=False,
                         labels={"wakeproxy.host": names.g1, "wakeproxy.group": by, **foreign}),
        "g2": lambda: mk("evil-g2", keep_awake=False,
                         labels={"wakeproxy.host": names.g2, "wakeproxy.group": by_off, **foreign}),
        "g3": lambda: mk("evil-g3", keep_awake=False,
                         labels={"wakeproxy.host": names.g3, "wakeproxy.group": P_V, **foreign}),
        "g4": lambda: mk("evil-g4", keep_awake=False,
                         labels={"wakeproxy.host": names.g4, "wakeproxy.group": by_local, **foreign}),
        "g5": lambda: mk("evil-g5", keep_awake=False,
                         labels={**compose(P_E2, "web"), "wakeproxy.host": names.g5,
                                 "wakeproxy.group": P_V, **foreign}),
        # the victim's name again, through the other conventions and spelled differently
        "hijacker_alt": lambda: mk("hijacker-alt", keep_awake=False, labels={
            "traefik.http.routers.web.rule": f"Host(`{names.victim.upper()}`)",
            "io.docksal.virtual-host": names.victim + ".",
        }, env={"VIRTUAL_HOST": f" {names.victim.upper()}. "}),
        # many certificates from one group (the CA's rate limits are shared by every tenant)
        "flood": lambda: mk("acme-flood", keep_awake=False, start=False, labels={"wakeproxy.host": H("flood")},
                            env={"LETSENCRYPT_HOST": ",".join(f"f{i}.flood.{run_id}.test" for i in range(15))}),
        # many names from one group (names.max_per_group, default 50)
        "name_flood": lambda: mk("name-flood", keep_awake=False, start=False, labels={
            "wakeproxy.host": ",".join(f"n{i}.nflood.{run_id}.test" for i in range(55))}),
        # log forging: Docker allows newlines in label values
        "forged_group": lambda: mk("forged-group", keep_awake=False, start=False, labels={
            "wakeproxy.host": H("forged-group"), "wakeproxy.group": "x\nFORGED wake ready"}),
        "forged_net": lambda: mk("forged-net", keep_awake=False, start=False, labels={
            "wakeproxy.host": H("forged-net"), "wakeproxy.network": "x\nFORGED network ready"}),
    })
    c = {**first, **second}

    certs = tmp_path_factory.mktemp("hostile-certs")
    serials = {
        "victim": cert_file(certs, names.victim, names.victim),  # the operator's certificate for the victim
        "evil": cert_file(certs, "evilcert", names.evil),  # a file the attacker's cert-name label names
    }
    since = time.time()
    p = module_proxy({
        "names": {"allow": [f"*.{run_id}.test"]},  # a shared sandbox server: only names under the run's domain
        "labels": {"cert_name": True, "https_redirect": True},  # only ownership protects the victim
        "acme": {"enabled": True, "directory": UNREACHABLE_ACME},
        "tls": {"certs_dir": str(certs)},
    })
    wait_for(lambda: backend_of(proxied(p, names.victim, https=True, timeout=5)) == "victim-web", 10, 0.1,
             "victim routed")
    return SimpleNamespace(proxy=p, c=c, names=names, P_V=P_V, P_E=P_E, P_E2=P_E2, since=since,
                           serials=serials, run_id=run_id, H=H)


def state_created(c) -> float:
    import datetime

    c.reload()
    text = c.attrs["Created"].rstrip("Z").split(".", 1)[0]
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


# --------------------------------------------------------------------------
# 1. host hijack


def test_hijacked_host_still_reaches_victim_and_conflict_is_reported(world):
    p, n = world.proxy, world.names
    got = backends(p, n.victim, 20, https=True)
    assert got == ["victim-web"] * 20, got
    got = backends(p, n.home, 5)  # no certificate for home: plain HTTP is served
    assert got == ["victim-web"] * 5, got
    assert backend_of(proxied(p, n.evil)) == "hijacker"  # the attacker's own name works (control)

    report = status_json(p)
    alt = world.c["hijacker_alt"].name  # a lone container: its own group
    c = conflict(report, n.victim, alt)
    assert c is not None and c["owner"] == world.P_V, report["conflicts"]
    for name in (n.victim, n.home):
        c = conflict(report, name, world.P_E)
        assert c is not None, (name, report["conflicts"])
        assert c["owner"] == world.P_V and world.c["hijacker"].name in c["containers"], c
    victim_hosts = next(g for g in report["groups"] if g["group"] == world.P_V)["hosts"]
    assert n.victim in victim_hosts
    evil_hosts = next(g for g in report["groups"] if g["group"] == world.P_E)["hosts"]
    assert n.victim not in evil_hosts and n.home not in evil_hosts, evil_hosts

    text = cli_status(p)
    assert "conflicts" in text, text
    rows = [ln.split() for ln in text.splitlines() if ln.split()[:1] == [n.victim]]
    assert any(world.P_E in r and world.P_V in r for r in rows), text


# --------------------------------------------------------------------------
# 2. wildcards


def test_wildcards_over_the_victim_are_refused(world):
    p, n, run_id = world.proxy, world.names, world.run_id
    report = status_json(p)
    tld = refusal(report, "*.test", world.P_E)
    assert tld is not None and "two labels" in tld["reason"], report["refused"]
    for name in (f"*.{n.vzone}", f"foo.{n.vzone}", f"*.deep.{n.vzone}"):
        c = conflict(report, name, world.P_E)
        assert c is not None and c["owner"] == world.P_V, (name, report["conflicts"])
    # `*.<run>.test` covers the victim's names and other tenants' (whichever is named first)
    c = conflict(report, f"*.{run_id}.test", world.P_E)
    assert c is not None and c["owner"] not in (None, world.P_E), report["conflicts"]
    # Names under the victim's wildcard are the victim's; names nobody owns are nobody's.
    for h in (f"a.{n.vzone}", f"foo.{n.vzone}", f"x.deep.{n.vzone}"):
        assert backends(p, h, 3) == ["victim-web"] * 3, h
    for h in (f"nobody.{run_id}.test", "nobody.test", f"a.b.{run_id}.test"):
        r = proxied(p, h, headers=JSON)
        assert r.status_code == 404 and backend_of(r) is None, (h, r.status_code, r.text[:200])


def test_default_host_and_wildcards_covering_it_are_refused(world, proxy):
    n, run_id = world.names, world.run_id
    p = proxy({
        "default_host": n.home,
        "names": {"allow": [f"*.{run_id}.test"], "reserved": {n.home: world.P_V}},
    })
    wait_for(lambda: backend_of(proxied(p, n.home, timeout=5)) == "victim-web", 10, 0.1, "default site")
    for h in (n.home, f"nobody.{run_id}.test", "nobody.test", "random.example", f"a.b.c.{run_id}.test"):
        got = backends(p, h, 3)
        assert got == ["victim-web"] * 3, (h, got)
    assert backend_of(proxied(p, n.evil)) == "hijacker"  # its own name still works (control)
    report = status_json(p)
    home = refusal(report, n.home, world.P_E)
    assert home is not None and "reserved" in home["reason"], report
    wide = refusal(report, f"*.{run_id}.test", world.P_E)
    assert wide is not None, report
    tld = refusal(report, "*.test", world.P_E)
    assert tld is not None, report
    evil_hosts = next(g for g in report["groups"] if g["group"] == world.P_E)["hosts"]
    assert not any(h.startswith("*.") for h in evil_hosts), evil_hosts
    assert n.home not in evil_hosts


# --------------------------------------------------------------------------
# 3. foreign containers: wakeproxy.group naming someone else's container or project


def test_group_label_never_reaches_foreign_containers(world, docker_client):
    p, c, n = world.proxy, world.c, world.names
    attackers = [c[k] for k in ("g1", "g2", "g3", "g4", "g5")]
    # The attackers' own groups do go to sleep (the trick "fires") …
    wait_for(lambda: all(state_of(a)["Paused"] for a in attackers), 12, 0.2,
             "the attackers' own 2 s idle pause")
    time.sleep(1.0)  # … and one more idle period passes
    victims = [c["victim"], c["victim_db"], c["bystander"], c["bystander_off"], c["bystander_local"]]
    assert_untouched(p, docker_client, victims, world.since, world.P_V)
    for v in (c["victim"], c["victim_db"], c["bystander"], c["bystander_local"]):
        st = state_of(v)
        assert st["Running"] and not st["Paused"], (v.name, st)
    assert state_of(c["bystander_off"])["Status"] == "created"

    # Waking the attackers (unpause) starts nothing of anyone else's.
    t0 = time.time()
    for h, name in ((n.g2, "evil-g2"), (n.g1, "evil-g1"), (n.g3, "evil-g3")):
        r = proxied(p, h, headers=JSON, timeout=20)
        assert r.status_code == 200 and backend_of(r) == name, (h, r.status_code, r.text[:300])
    time.sleep(0.5)
    assert_untouched(p, docker_client, victims, t0, world.P_V)
    assert state_of(c["bystander_off"])["Status"] == "created"

    report = status_json(p)
    for g in report["groups"]:
        names = {m["name"] for m in g["containers"]}
        if names & {a.name for a in attackers}:
            assert not names & {v.name for v in victims}, f"an attacker's group holds foreign containers: {g}"


# --------------------------------------------------------------------------
# 4. certificates, cert-name, https-redirect


def test_letsencrypt_host_gets_no_certificate_for_foreign_names(world):
    p, n = world.proxy, world.names
    # Control: the attacker's own name is ordered (and fails: the directory is unreachable).
    wait_for(lambda: n.evil in (status_json(p).get("certificates") or {}), 10, 0.2,
             "the attacker's own name in certificates (ACME is working)")
    time.sleep(0.5)
    report = status_json(p)
    certs = report.get("certificates") or {}
    for name in (n.bank, n.victim, n.home):
        assert name not in certs, (name, certs)
    bank = refusal(report, n.bank, world.P_E)
    assert bank is not None and "names.allow" in bank["reason"], report["refused"]
    assert conflict(report, n.victim, world.P_E) is not None, report["conflicts"]
    assert not any("acme: internal error" in ln for ln in log_lines(p)), p.log()[-3000:]
    text = cli_status(p)
    assert "refused names" in text and n.bank in text, text


def test_one_group_gets_at_most_max_names_per_group_certificates(world):
    p, run_id = world.proxy, world.run_id
    flood = [f"f{i}.flood.{run_id}.test" for i in range(15)]
    group = world.c["flood"].name
    wait_for(lambda: sum(n in (status_json(p).get("certificates") or {}) for n in flood) >= 10, 10, 0.2,
             "the flood's certificates")
    time.sleep(0.5)
    report = status_json(p)
    ordered = [n for n in flood if n in report["certificates"]]
    assert len(ordered) == 10, ordered  # acme.max_names_per_group (default 10)
    capped = [r for r in report["refused"] if r["group"] == group and "max_names_per_group" in r["reason"]]
    assert sorted(r["name"] for r in capped) == sorted(set(flood) - set(ordered)), report["refused"]


def test_one_group_owns_at_most_max_per_group_names(world):
    report = status_json(world.proxy)
    group = world.c["name_flood"].name
    hosts = next(g for g in report["groups"] if g["group"] == group)["hosts"]
    capped = [r for r in report["refused"] if r["group"] == group and "max_per_group" in r["reason"]]
    assert len(hosts) == 50 and len(capped) == 5, (len(hosts), capped)


def test_cert_name_and_redirect_labels_change_nothing_for_victim(world):
    p, n = world.proxy, world.names
    assert leaf_serial(p, n.victim) == world.serials["victim"]  # not the attacker's cert-name file
    r = proxied(p, n.victim, "/x?y=1")
    assert r.status_code == 308, (r.status_code, r.text[:200])  # not turned off by the attacker's label
    assert r.headers["location"] == f"https://{n.victim}:{p.https_port}/x?y=1"
    # Control: the same labels do work for the attacker's own name (the trust switches are on).
    assert leaf_serial(p, n.evil) == world.serials["evil"]
    r = proxied(p, n.evil)
    assert r.status_code == 200 and backend_of(r) == "hijacker", r.status_code


# --------------------------------------------------------------------------
# 9. log forging with a newline in a label


def test_label_with_newline_cannot_forge_log_lines(world):
    p, c = world.proxy, world.c
    report = status_json(p)
    name = c["forged_group"].name
    assert name in report["skipped"], report["skipped"]
    lines = log_lines(p)
    mentions = [ln for ln in lines if name in ln]
    assert len(mentions) == 1 and "skipped" in mentions[0], mentions
    forged = [ln for ln in lines if ln.lstrip().startswith("FORGED")]
    # DEFECT: the `wakeproxy.network` label's value is written to the log as is
    # ("container '…': its network label 'x\nFORGED network ready' is ignored …", addons/snapshot.py
    # `_parse`), so a tenant can append arbitrary lines to the proxy's log (here, one that looks
    # like a readiness line). The value should be shown with repr() or rejected like the group label.
    assert forged == [], f"forged log lines: {forged}"


# --------------------------------------------------------------------------
# 1b. the victim asleep: a request wakes the victim, not the attacker (runs last on `world`)


def test_sleeping_victim_is_woken_not_the_attacker(world, docker_client):
    p, c, n = world.proxy, world.c, world.names
    c["hijacker"].stop(timeout=5)
    c["victim"].stop(timeout=5)
    def web_exited():
        g = next(g for g in status_json(p)["groups"] if g["group"] == world.P_V)
        return any(m["name"] == c["victim"].name and m["state"] == "exited" for m in g["containers"])
    wait_for(web_exited, 10, 0.1, "the victim's web container exited in the status")
    t0 = time.time()
    r = proxied(p, n.victim, https=True, headers=JSON, timeout=30)
    assert r.status_code == 200 and backend_of(r) == "victim-web", (r.status_code, r.text[:300])
    time.sleep(0.5)
    assert (c["victim"].name, "start") in lifecycle(docker_client, [c["victim"]], t0)
    assert lifecycle(docker_client, [c["hijacker"]], t0) == [], "the attacker was started"
    assert state_of(c["hijacker"])["Status"] == "exited"
    # The conflict was logged once, with both claimants, however many snapshots came since.
    lines = [ln for ln in log_lines(p) if f"names: {n.victim} claimed by group '{world.P_E}'" in ln]
    assert len(lines) == 1, lines
    assert world.P_V in lines[0] and c["hijacker"].name in lines[0], lines[0]


# --------------------------------------------------------------------------
# 5. ownership survives restarts; a fresh state decides by creation time


def _compose(project: str, service: str, h: str) -> dict:
    return {"com.docker.compose.project": project, "com.docker.compose.service": service, "wakeproxy.host": h}


def _younger_than(c) -> None:
    created = state_created(c)
    while time.time() < created + 1.05:
        time.sleep(0.05)


def test_fresh_state_older_container_wins(backend_container, proxy, run_id, host):
    h = host("own5")
    victim = backend_container("own5-victim", labels=_compose(f"{run_id}-zz-own5", "web", h))
    _younger_than(victim)
    backend_container("own5-late", labels=_compose(f"{run_id}-aa-own5", "web", h))  # newest: listed first
    p = proxy({})
    wait_for(lambda: backend_of(proxied(p, h, timeout=5)) is not None, 10, 0.1, "routed")
    got = backends(p, h, 10)
    assert got == ["own5-victim"] * 10, got
    c = conflict(status_json(p), h, f"{run_id}-aa-own5")
    assert c is not None and c["owner"] == f"{run_id}-zz-own5", status_json(p)["conflicts"]


def test_ownership_survives_restart_and_recreate(backend_container, proxy, docker_client, run_id, host):
    h = host("own6")
    pv, pa = f"{run_id}-zz-own6", f"{run_id}-aa-own6"
    v1 = backend_container("own6-v1", labels=_compose(pv, "web", h))
    p1 = proxy({})
    wait_for(lambda: backend_of(proxied(p1, h, timeout=5)) == "own6-v1", 10, 0.1, "victim routed")
    _younger_than(v1)
    attacker = backend_container("own6-squat", labels=_compose(pa, "web", h))
    wait_for(lambda: conflict(status_json(p1), h, pa), 5, 0.1, "the attacker's claim refused")
    # `docker compose up --force-recreate`: the victim's container is replaced, now YOUNGER than the attacker.
    _younger_than(attacker)
    v1.remove(force=True)
    v2 = backend_container("own6-v2", labels=_compose(pv, "web", h))
    assert state_created(v2) > state_created(attacker)
    wait_for(lambda: backend_of(proxied(p1, h, timeout=5)) == "own6-v2", 10, 0.1, "recreated victim routed")
    assert backends(p1, h, 5) == ["own6-v2"] * 5
    state_dir = Path(p1.config["state_dir"])
    p1.stop()
    owners = json.loads((state_dir / "owners.json").read_text())["owners"]
    assert owners[h]["group"] == pv, owners.get(h)

    p2 = proxy({"state_dir": str(state_dir)})  # same state, claimants now listed attacker-first
    wait_for(lambda: backend_of(proxied(p2, h, timeout=5)) is not None, 10, 0.1, "routed after restart")
    got = backends(p2, h, 10)
    assert got == ["own6-v2"] * 10, got
    c = conflict(status_json(p2), h, pa)
    assert c is not None and c["owner"] == pv, status_json(p2)["conflicts"]


# --------------------------------------------------------------------------
# 6. ownership moves only when the owner's containers are removed (after release_after)


def test_name_moves_only_after_owner_removed_and_release_after(backend_container, proxy, run_id, host):
    h = host("own7")
    pv, pa = f"{run_id}-zz-own7", f"{run_id}-aa-own7"
    victim = backend_container("own7-victim", labels=_compose(pv, "web", h), keep_awake=False)
    _younger_than(victim)
    backend_container("own7-taker", labels=_compose(pa, "web", h))
    p = proxy({"names": {"release_after": "2s"}, "wake": {"ignore_user_agents": ["EvilBot"]}})
    wait_for(lambda: backend_of(proxied(p, h, timeout=5)) == "own7-victim", 10, 0.1, "victim routed")
    assert backends(p, h, 5) == ["own7-victim"] * 5
    # Removed (a running container: kill, die, destroy): held for release_after, then the claimant gets it.
    # (EvilBot: a request that arrives between `die` and `destroy` must not start a wake of the victim.)
    victim.remove(force=True)
    t_rm = time.time()
    early = []
    while time.time() < t_rm + 1.5:
        early.append(backend_of(proxied(p, h, timeout=2, headers={"User-Agent": EVIL_UA})))
        time.sleep(0.1)
    assert "own7-taker" not in early, f"the name moved before release_after: {early}"
    assert conflict(status_json(p), h, pa) is not None  # "still held for group …"
    wait_for(lambda: backend_of(proxied(p, h, timeout=2)) == "own7-taker", 6, 0.1, "the name released")
    moved = time.time() - t_rm
    assert moved >= 1.8, f"moved after {moved:.2f} s, release_after is 2 s"
    print(f"name moved {moved:.2f} s after the owner's container was removed (release_after 2 s)")


def test_quiet_owner_keeps_name_for_release_after_when_removed(backend_container, proxy, run_id, host):
    """`docker compose up --force-recreate` of a sandbox that has been quiet (no Docker event) for
    longer than release_after: the name must stay the owner's for release_after after the removal."""
    h = host("own8")
    pv, pa = f"{run_id}-zz-own8", f"{run_id}-aa-own8"
    victim = backend_container("own8-victim", labels=_compose(pv, "web", h), keep_awake=False)
    _younger_than(victim)
    backend_container("own8-taker", labels=_compose(pa, "web", h))
    p = proxy({"names": {"release_after": "2s"}, "wake": {"ignore_user_agents": ["EvilBot"]}})
    wait_for(lambda: backend_of(proxied(p, h, timeout=5)) == "own8-victim", 10, 0.1, "victim routed")
    # Stopped is not gone: the name stays the victim's well past release_after.
    victim.stop(timeout=5)
    time.sleep(3.0)
    r = proxied(p, h, headers={"User-Agent": EVIL_UA, **JSON})
    assert r.status_code == 503 and backend_of(r) is None, (r.status_code, r.text[:200])
    assert conflict(status_json(p), h, pa) is not None
    victim.remove(force=True)
    t_rm = time.time()
    early = []
    while time.time() < t_rm + 1.5:
        early.append(backend_of(proxied(p, h, timeout=2, headers={"User-Agent": EVIL_UA})))
        time.sleep(0.1)
    # DEFECT: the name moves at once, not release_after after the removal. Ownership.resolve
    # (addons/policy.py, step 2) measures release_after from `rec.seen`, the last *snapshot* in
    # which the owner claimed the name; with no Docker event for longer than release_after before
    # the removal (here: 3 s of a stopped victim; in production: any sandbox quiet for 60 s, then
    # `docker compose up --force-recreate`), the record is already "expired" when the claim
    # vanishes, and a waiting attacker takes the name for good (the recreated victim is then the
    # refused one). The clock should start at the first resolve that no longer sees the claim.
    assert "own8-taker" not in early, f"the name moved at once after the removal: {early}"


# --------------------------------------------------------------------------
# 7. wake abuse


def test_wake_budget_and_ignored_user_agent(backend_container, proxy, docker_client, host):
    sleepers = make_all({
        i: (lambda i=i: backend_container(f"w7-{i}", labels={"wakeproxy.host": host(f"w7-{i}")},
                                          start=False, keep_awake=False))
        for i in range(6)
    })
    bot_site = backend_container("w7-bot", labels={"wakeproxy.host": host("w7-bot")}, start=False)
    p = proxy({"wake": {"per_client": 3, "ignore_user_agents": ["EvilBot"]}})
    wait_for(lambda: proxied(p, host("w7-bot"), headers={"User-Agent": EVIL_UA}).status_code == 503, 10, 0.1,
             "sites known")
    t0 = time.time()
    w = proxied(p, host("w7-bot"), "/__wakeproxy/wait", headers={"User-Agent": EVIL_UA, **JSON})
    assert w.status_code == 503 and w.json()["state"] == "failed", (w.status_code, w.text)
    r = proxied(p, host("w7-bot"), headers={**NAV, "User-Agent": EVIL_UA})
    assert r.status_code == 503, r.status_code
    results = []
    for i in range(6):
        # The last ones also pretend to be other clients: an untrusted X-Forwarded-For changes nothing.
        extra = {"X-Forwarded-For": f"198.51.100.{i}"} if i >= 3 else {}
        r = proxied(p, host(f"w7-{i}"), headers={**JSON, **extra}, timeout=30)
        results.append((r.status_code, r.headers.get("retry-after"), backend_of(r)))
    time.sleep(1.0)
    assert [s for s, _, _ in results] == [200, 200, 200, 429, 429, 429], results
    for _, retry, _ in results[3:]:
        assert retry is not None and int(retry) > 0, results
    for i in range(6):
        started = [a for _, a in lifecycle(docker_client, [sleepers[i]], t0) if a == "start"]
        assert started == (["start"] if i < 3 else []), (i, started)
    assert lifecycle(docker_client, [bot_site], t0) == [], "the ignored User-Agent woke the site"


# --------------------------------------------------------------------------
# 8. disclosure: anonymous clients learn the host, nothing internal


def _leaks(resp: httpx.Response, secrets: list[str]) -> list[str]:
    text = (resp.text + "\n" + "\n".join(f"{k}: {v}" for k, v in resp.headers.items())).lower()
    found = [s for s in secrets if s.lower() in text]
    found += [f"ip {m}" for m in re.findall(r"\b(?:\d{1,3}\.){3}\d{1,3}\b", text) if m != "127.0.0.1"]
    return found


def test_pages_disclose_nothing_to_anonymous_clients(backend_container, proxy, docker_client, run_id,
                                                     host, other_network, test_network):
    mk = backend_container
    project = f"{run_id}-secretproj"
    cs = make_all({
        "unreach": lambda: mk("d-unreach", network=other_network, env={"PORT": "8731"},
                              labels={"wakeproxy.host": host("site-u"), "wakeproxy.port": "8731"}),
        "crash": lambda: mk("d-crash", image=mk.busybox, start=False, command=["sh", "-c", "exit 213"],
                            labels={"com.docker.compose.project": project, "com.docker.compose.service": "app",
                                    "wakeproxy.host": host("site-c"), "wakeproxy.port": "8731"}),
        "sleep1": lambda: mk("d-sleep1", start=False, env={"PORT": "8731"},
                             labels={"com.docker.compose.project": f"{project}-1", "com.docker.compose.service": "s1",
                                     "wakeproxy.host": host("site-s1"), "wakeproxy.port": "8731"}),
        "sleep2": lambda: mk("d-sleep2", start=False, env={"PORT": "8731"},
                             labels={"com.docker.compose.project": f"{project}-2", "com.docker.compose.service": "s2",
                                     "wakeproxy.host": host("site-s2"), "wakeproxy.port": "8731"}),
        "refuse": lambda: mk("d-refuse", env={"PORT": "8731"},
                             labels={"wakeproxy.host": host("site-r"), "wakeproxy.port": "8732"}),
    })
    ips = []
    for c in cs.values():
        c.reload()
        ips += [n.get("IPAddress") for n in c.attrs["NetworkSettings"]["Networks"].values() if n.get("IPAddress")]
    secrets = [*(c.name for c in cs.values()), *(c.id[:12] for c in cs.values()), project, "secretproj",
               other_network, test_network, "8731", "8732", "213", "mitmproxy", *ips]
    public = proxy({"debug_clients": [], "wake": {"retry_after": "30s"}})
    debug = proxy({"wake": {"retry_after": "30s"}})  # loopback is a debug client by default
    for p in (public, debug):
        wait_for(lambda p=p: proxied(p, host("site-u"), timeout=5).status_code == 503, 10, 0.1, "sites known")

    leaks: dict[str, list[str]] = {}

    def check(what: str, resp: httpx.Response, status: int) -> None:
        assert resp.status_code == status, (what, resp.status_code, resp.text[:300])
        found = _leaks(resp, secrets)
        if found:
            server = resp.headers.get("server", "")
            leaks[what] = [*found, f"Server: {server}", f"body: {resp.text[-300:]!r}"]

    for accept in (NAV, JSON):
        kind = "html" if accept is NAV else "plain"
        check(f"unreachable 503 ({kind})", proxied(public, host("site-u"), headers=accept), 503)
    check("failed wake 502 (held)", proxied(public, host("site-c"), headers=JSON, timeout=30), 502)
    check("failed wake 502 (cool-down, html)", proxied(public, host("site-c"), headers=NAV), 502)
    w = proxied(public, host("site-c"), "/__wakeproxy/wait", headers=JSON, timeout=30)
    check("wait after a failed wake", w, w.status_code)
    assert set(w.json()) == {"state"}, w.text
    page = proxied(public, host("site-s1"), headers=NAV)
    check("waking page", page, 503)
    assert host("site-s1") in page.text
    w = proxied(public, host("site-s1"), "/__wakeproxy/wait", headers=JSON, timeout=30)
    check("wait while waking", w, 200)
    assert set(w.json()) == {"state"}, w.text
    for accept in (NAV, JSON):
        kind = "html" if accept is NAV else "plain"
        r = proxied(public, host("site-r"), headers=accept)
        check(f"backend refuses ({kind})", r, 502)
    # DEFECT: a running site whose app does not accept connections (crashed, or still starting
    # after a restart by someone else) is answered by mitmproxy's own error page: `Server: mitmproxy`
    # and "Connect call failed ('<container IP>', <port>)" to every client, debug or not. The
    # proxy should answer upstream errors with its own page (an `error` hook in addons/router.py,
    # or a `responseheaders`/`error` handler that replaces mitmproxy's), detail only for debug_clients.
    # A Host header is echoed escaped (no markup from the client).
    r = proxied(public, "a<script>x", headers=NAV)
    assert r.status_code in (400, 404) and "<script>" not in r.text, r.text[:300]
    assert leaks == {}, f"internal detail shown to an anonymous client: {leaks}"

    # The same pages for a debug client (loopback, the default) carry the detail.
    r = proxied(debug, host("site-u"), headers=JSON)
    assert r.status_code == 503 and other_network in r.text and cs["unreach"].name in r.text, r.text
    r = proxied(debug, host("site-c"), headers=JSON, timeout=30)
    assert r.status_code == 502 and cs["crash"].name in r.text and "213" in r.text, r.text
    page = proxied(debug, host("site-s2"), headers=NAV)
    assert page.status_code == 503 and f"{project}-2" in page.text, page.text[-600:]
    w = proxied(debug, host("site-s2"), "/__wakeproxy/wait", headers=JSON, timeout=30)
    # (waking and failed answers carry the detail; "ready" has none to give)
    assert w.status_code == 200 and (w.json()["state"] == "ready" or set(w.json()) - {"state"}), w.text


# --------------------------------------------------------------------------
# 10. a group's name in names.allow / names.reserved is taken over by a look-alike group

LOOKALIKE_DEFECT = """the victim's key becomes `container:<name>` (or `group:<name>`) once another tenant
creates a Compose project with that name (addons/snapshot.py `_group_keys`), and NamePolicy
(addons/policy.py: `allowed` substitutes `{group}` with that display key, `refuse` compares
names.reserved with it) then refuses the victim and accepts the look-alike; Ownership.resolve even
drops the victim's record ("no longer allowed"). Policy should match the GroupId (kind + base)."""


def _solo_and_lookalike(backend_container, run_id, suffix, h, after_proxy):
    solo = f"{run_id}-{suffix}"
    backend_container(suffix, labels={"wakeproxy.host": h})
    p = after_proxy()
    wait_for(lambda: backend_of(proxied(p, h, timeout=5)) == suffix, 10, 0.1, "the lone container routed")
    backend_container(f"{suffix}-lookalike", labels={"com.docker.compose.project": solo,
                                                     "com.docker.compose.service": "web", "wakeproxy.host": h})
    time.sleep(1.5)  # the create event is in
    return p


def test_lookalike_group_cannot_take_a_lone_containers_allowed_names(backend_container, proxy, run_id):
    """names.allow `*.<domain>` (no {group}: that placeholder is for Compose projects only): a lone
    container N owns `N.<domain>`; another tenant then creates a Compose project named N claiming it."""
    h = f"{run_id}-solo.{run_id}.test"
    p = _solo_and_lookalike(backend_container, run_id, "solo", h,
                            lambda: proxy({"names": {"allow": [f"*.{run_id}.test"]}}))
    got = backends(p, h, 10)
    # (was a DEFECT, see LOOKALIKE_DEFECT: the look-alike project took the lone container's name)
    assert got == ["solo"] * 10, f"requests for the lone container's name went to: {got}"


def test_lookalike_group_cannot_take_a_reserved_default_host(backend_container, proxy, run_id, host):
    h = host("solohome")
    p = _solo_and_lookalike(backend_container, run_id, "solor", h, lambda: proxy({
        "default_host": h, "names": {"reserved": {h: f"{run_id}-solor"}, "allow": [f"*.{run_id}.test"]}}))
    got = backends(p, h, 5) + backends(p, "unknown.example", 5)
    # DEFECT: the reserved default_host (and with it every unknown host) goes to the look-alike
    # project: see LOOKALIKE_DEFECT.
    assert got == ["solor"] * 10, f"the reserved default_host went to: {got}"


def test_presquatted_project_name_returns_to_the_project(backend_container, proxy, run_id):
    """Before project P exists, a lone container labelled wakeproxy.group=P claims `P.<domain>`:
    `{group}` stands for Compose projects only, so the squatter never gets it, and the real Compose
    project P does when it appears."""
    proj = f"{run_id}-future"
    h = f"{proj}.{run_id}.test"
    backend_container("squatter", labels={"wakeproxy.group": proj, "wakeproxy.host": h})
    p = proxy({"names": {"allow": [f"{{group}}.{run_id}.test"]}})
    wait_for(lambda: refusal(status_json(p), h, proj) is not None, 10, 0.1, "the squatter refused")
    assert proxied(p, h, timeout=5).status_code == 404
    backend_container("future-web", labels={"com.docker.compose.project": proj,
                                            "com.docker.compose.service": "web", "wakeproxy.host": h})
    wait_for(lambda: backend_of(proxied(p, h, timeout=5)) == "future-web", 5, 0.1, "the project gets its name")
    assert backends(p, h, 10) == ["future-web"] * 10
    r = refusal(status_json(p), h, f"group:{proj}")
    assert r is not None and r.get("reason") == "outside names.allow", status_json(p)


def test_traefik_label_names_cannot_forge_log_lines(world, backend_container, docker_client, host):
    """Label NAMES (the Traefik router name is part of one) and traefik.docker.network values."""
    p = world.proxy
    made = []
    for suffix, labels in (
        ("forged-router", {"traefik.http.routers.x\nFORGED router ready\nx.rule": "Host(`bad host!`)"}),
        ("forged-tnet", {"traefik.http.routers.web.rule": f"Host(`{host('forged-tnet')}`)",
                         "traefik.docker.network": "x\nFORGED traefik network ready"}),
    ):
        try:
            made.append(backend_container(suffix, labels=labels, start=False))
        except docker.errors.APIError as e:  # the engine refuses such a label: nothing to forge
            print(f"{suffix}: Docker refuses the label: {e}")
    if not made:
        pytest.skip("Docker refuses newlines in these labels")
    wait_for(lambda: all(any(c.name in ln for ln in log_lines(p)) for c in made), 5, 0.1, "the containers seen")
    forged = [ln for ln in log_lines(p) if ln.lstrip().startswith("FORGED") and "FORGED network ready" not in ln]
    # DEFECT (expected, same cause as test_label_with_newline_cannot_forge_log_lines): the Traefik
    # router name (addons/labels.py `_traefik`: `what = f"label traefik.http.routers.{router}.rule"`)
    # and the traefik.docker.network value reach the log unquoted.
    assert forged == [], f"forged log lines: {forged}"
