"""wakeproxy.tls: which certificate a name gets, keeping mitmproxy's store filled across rebuilds,
HTTP → HTTPS redirects and HSTS."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy.test import tflow
from mitmproxy.test.tutils import treq
from wakeproxy.certs.https import HttpsPolicy
from wakeproxy.certs.store import (
    Certificates,
    CertRegistry,
    file_base_to_name,
    load_cert,
    name_matches,
    scan_custom_dir,
)
from wakeproxy.config import Address, Config, LabelTrustConfig, ListenConfig, SourcesConfig, TlsConfig
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import Policy, build_snapshot
from wakeproxy.runtime import Runtime

UTC = datetime.UTC


def make_cert(directory: Path, base: str, *sans: str, days: int = 30, past: bool = False,
              split: bool = True) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    start = now - datetime.timedelta(days=days + 1) if past else now - datetime.timedelta(hours=1)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    if split:
        (directory / f"{base}.crt").write_bytes(cert_pem)
        (directory / f"{base}.key").write_bytes(key_pem)
        return directory / f"{base}.crt"
    (directory / f"{base}.pem").write_bytes(key_pem + cert_pem)
    return directory / f"{base}.pem"


def test_name_matching_is_one_label_deep():
    assert name_matches("*.example.com", "a.example.com")
    assert not name_matches("*.example.com", "a.b.example.com")
    assert not name_matches("*.example.com", "example.com")
    assert name_matches("a.example.com", "a.example.com")


def test_file_bases():
    assert file_base_to_name("_wildcard.example.com") == "*.example.com"
    assert file_base_to_name("a.example.com") == "a.example.com"


def test_scan_custom_dir_skips_broken_pairs(tmp_path):
    make_cert(tmp_path, "a.example.com", "a.example.com")
    make_cert(tmp_path, "_wildcard.example.com", "*.example.com")
    (tmp_path / "lonely.crt").write_bytes((tmp_path / "a.example.com.crt").read_bytes())
    (tmp_path / "broken.crt").write_text("nope")
    (tmp_path / "broken.key").write_text("nope")
    make_cert(tmp_path, "mismatch", "m.example.com")
    (tmp_path / "mismatch.key").write_bytes((tmp_path / "a.example.com.key").read_bytes())
    found = scan_custom_dir(tmp_path)
    assert sorted(found) == ["_wildcard.example.com", "a.example.com"]


def test_priority_acme_then_custom_then_label_then_default(tmp_path):
    default = load_cert(make_cert(tmp_path, "default", "localhost", split=False), None, "default")
    exact = load_cert(make_cert(tmp_path, "a.example.com", "a.example.com"), tmp_path / "a.example.com.key")
    wild = load_cert(make_cert(tmp_path, "_wildcard.example.com", "*.example.com"),
                     tmp_path / "_wildcard.example.com.key")
    team = load_cert(make_cert(tmp_path, "team", "t.other.com"), tmp_path / "team.key")
    acme_a = dataclasses.replace(load_cert(make_cert(tmp_path, "acme", "a.example.com", split=False), None),
                                 source="acme")
    reg = CertRegistry(default=default, custom={"a.example.com": exact, "_wildcard.example.com": wild, "team": team},
                       label_names={"t.other.com": "team", "x.other.com": "missing"})
    assert reg.choose("a.example.com") is exact
    assert reg.choose("b.example.com") is wild
    assert reg.choose("t.other.com") is team
    assert reg.choose("x.other.com") is default  # a label naming a file that is not there
    assert reg.choose("unknown.test") is default
    reg.acme["a.example.com"] = acme_a
    assert reg.choose("a.example.com") is acme_a


def test_cert_name_labels_follow_the_owners_hosts_when_trusted():
    c1 = ContainerInfo("id1", "one", "exited", labels={"wakeproxy.host": "a.test,*.w.test",
                                                       "io.docksal.cert-name": "Team"})
    c2 = ContainerInfo("id2", "two", "running", labels={"wakeproxy.host": "b.test"},
                       networks={"bridge": "172.17.0.3"})
    # A second group naming a certificate for a name it does not own changes nothing.
    c3 = ContainerInfo("id3", "three", "running", labels={"wakeproxy.host": "a.test", "wakeproxy.cert-name": "evil"},
                       networks={"bridge": "172.17.0.4"}, created=5)
    trusting = Policy(trust=LabelTrustConfig(cert_name=True))
    snap = build_snapshot([c1, c2, c3], SourcesConfig(), (), {}, policy=trusting)
    assert snap.cert_names == {"a.test": "team", "*.w.test": "team"}
    # Untrusted by default: ignored.
    assert build_snapshot([c1, c2], SourcesConfig(), (), {}).cert_names == {}


class FakeStore:
    def __init__(self, generated=()):
        self.certs = {"*": "mitmproxy's", "localhost": "mitmproxy's", **dict(generated)}


def _certificates(tmp_path, store_holder, config=None) -> Certificates:
    c = Certificates(Runtime(config=config or Config(state_dir=tmp_path)))
    c._store = lambda: store_holder[0]  # type: ignore[method-assign]
    c.load_static(c.runtime.config)
    return c


def test_store_is_refilled_after_every_rebuild(tmp_path):
    holder = [FakeStore()]
    c = _certificates(tmp_path, holder)
    c.sync()
    assert holder[0].certs == {"*": c.registry.default.entry}  # TlsConfig's extras are gone
    acme_cert = dataclasses.replace(load_cert(make_cert(tmp_path, "x", "a.test", split=False), None),
                                    source="acme")
    c.set_acme("a.test", acme_cert)
    assert holder[0].certs["a.test"] is acme_cert.entry
    holder[0] = FakeStore()  # TlsConfig rebuilt its store (confdir/certs changed, or its running())
    c.tls_clienthello(None)  # type: ignore[arg-type]
    assert holder[0].certs["a.test"] is acme_cert.entry and holder[0].certs["*"] is c.registry.default.entry


def test_default_cert_from_config_and_self_signed_otherwise(tmp_path):
    holder = [FakeStore()]
    c = _certificates(tmp_path, holder)
    assert (tmp_path / "default-cert.pem").exists() and c.registry.default.source == "default"
    own = make_cert(tmp_path, "own", "default.example.com")
    cfg = Config(state_dir=tmp_path / "other", tls=TlsConfig(default_cert=own, default_key=tmp_path / "own.key"))
    c2 = _certificates(tmp_path, holder, cfg)
    assert c2.registry.default.names == ("default.example.com",)
    assert not (tmp_path / "other" / "default-cert.pem").exists()


# --- redirect and HSTS -------------------------------------------------------------------------


def _flow(host: str, path: str = "/p?q=1", tls: bool = False):
    f = tflow.tflow(req=treq(path=path.encode(), headers=[(b"Host", host.encode())]))
    f.client_conn.timestamp_tls_setup = 946681201.0 if tls else None
    return f


def _policy(tmp_path, https_port=8443, redirect=True, hsts=0.0, labels=None, trust_redirect=True):
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir(exist_ok=True)
    make_cert(certs_dir, "a.test", "a.test")
    make_cert(certs_dir, "old.test", "old.test", days=1, past=True)
    cfg = Config(state_dir=tmp_path, listen=ListenConfig(http=Address("0.0.0.0", 80),
                                                         https=Address("0.0.0.0", https_port)),
                 tls=TlsConfig(certs_dir=certs_dir, redirect=redirect, hsts=hsts))
    containers = [ContainerInfo("id1", "one", "running", labels={"wakeproxy.host": "a.test", **(labels or {})},
                                networks={"bridge": "172.17.0.2"})]
    policy = Policy(trust=LabelTrustConfig(https_redirect=trust_redirect))
    rt = Runtime(config=cfg, snapshot=build_snapshot(containers, SourcesConfig(), (), {}, policy=policy))
    c = Certificates(rt)
    c.load_static(cfg)
    return HttpsPolicy(rt, c)


def test_redirect_label_is_ignored_unless_the_operator_trusts_it(tmp_path):
    f = _flow("a.test", "/p")
    _policy(tmp_path, labels={"wakeproxy.https-redirect": "false"}, trust_redirect=False).requestheaders(f)
    assert f.response.status_code == 308


def test_redirect_308_keeps_path_and_query(tmp_path):
    p = _policy(tmp_path)
    f = _flow("A.test:80")
    p.requestheaders(f)
    assert f.response.status_code == 308
    assert f.response.headers["location"] == "https://a.test:8443/p?q=1"


def test_redirect_omits_port_443(tmp_path):
    f = _flow("a.test")
    _policy(tmp_path, https_port=443).requestheaders(f)
    assert f.response.headers["location"] == "https://a.test/p?q=1"


@pytest.mark.parametrize("case", ["default-cert", "expired", "challenge", "config-off", "label-off", "https",
                                  "answered"])
def test_no_redirect(tmp_path, case):
    host, path, tls = "a.test", "/p", False
    kw = {}
    if case == "default-cert":
        host = "b.test"
    elif case == "expired":
        host = "old.test"
    elif case == "challenge":
        path = "/.well-known/acme-challenge/tok"
    elif case == "config-off":
        kw["redirect"] = False
    elif case == "label-off":
        kw["labels"] = {"wakeproxy.https-redirect": "false"}
    elif case == "https":
        tls = True
    f = _flow(host, path, tls)
    if case == "answered":
        f.response = SimpleNamespace(status_code=200)
    _policy(tmp_path, **kw).requestheaders(f)
    assert f.response is None or f.response.status_code == 200


def test_hsts_only_over_https_for_real_certificates(tmp_path):
    from mitmproxy.test.tutils import tresp

    p = _policy(tmp_path, hsts=86400.0)
    f = _flow("a.test", tls=True)
    f.response = tresp()
    p.responseheaders(f)
    assert f.response.headers["strict-transport-security"] == "max-age=86400"
    for f in (_flow("b.test", tls=True), _flow("a.test", tls=False)):
        f.response = tresp()
        p.response(f)
        assert "strict-transport-security" not in f.response.headers
    off = _policy(tmp_path)
    f = _flow("a.test", tls=True)
    f.response = tresp()
    off.responseheaders(f)
    assert "strict-transport-security" not in f.response.headers


def test_custom_chains_are_served_from_content_named_copies(tmp_path):
    """mitmproxy caches TLS contexts by chain-file path: a .crt replaced in place must get a new path."""
    d = tmp_path / "certs"
    d.mkdir()
    chains = tmp_path / "chains"
    make_cert(d, "a.test", "a.test")
    first = scan_custom_dir(d, chains)["a.test"]
    assert first.entry.chain_file.parent == chains
    assert b"PRIVATE KEY" not in first.entry.chain_file.read_bytes()
    assert scan_custom_dir(d, chains)["a.test"].entry.chain_file == first.entry.chain_file  # unchanged: same
    make_cert(d, "a.test", "a.test")  # renewed in place
    second = scan_custom_dir(d, chains)["a.test"]
    assert second.entry.chain_file != first.entry.chain_file
    assert not first.entry.chain_file.exists()  # the old copy is pruned


def test_custom_certificates_are_chosen_by_the_names_they_cover_closest_file_first(tmp_path):
    """Docksal's rule: project2.example.com gets example.com.crt (SANs example.com, *.example.com); never a
    certificate that does not cover the host, whatever its file is called."""
    base = load_cert(make_cert(tmp_path, "example.com", "example.com", "*.example.com"), tmp_path / "example.com.key")
    other = load_cert(make_cert(tmp_path, "zzz-bundle", "*.example.com", "shop.test"), tmp_path / "zzz-bundle.key")
    deep = load_cert(make_cert(tmp_path, "b.example.com", "*.b.example.com"), tmp_path / "b.example.com.key")
    misnamed = load_cert(make_cert(tmp_path, "wrong.example.org", "right.example.net"), tmp_path / "wrong.example.org.key")
    default = load_cert(make_cert(tmp_path, "default", "localhost", split=False), None, "default")
    reg = CertRegistry(default=default, custom={"example.com": base, "zzz-bundle": other, "b.example.com": deep,
                                                "wrong.example.org": misnamed},
                       label_names={"shop.example.com": "zzz-bundle"},
                       hosts=frozenset({"project2.example.com", "x.y.example.com", "example.com"}))
    assert reg.choose("project2.example.com") is base  # both cover it: the closer file name wins
    assert reg.choose("example.com") is base
    assert reg.choose("x.b.example.com") is deep  # one label under b.example.com: only that one covers it
    assert reg.choose("x.y.example.com") is default  # a site: *.example.com is one label deep, it does not cover it
    assert reg.choose("shop.test") is other  # covered by one certificate only, whatever its file is called
    assert reg.choose("wrong.example.org") is default  # the file's name is not one of its names
    assert reg.choose("right.example.net") is misnamed
    assert reg.choose("shop.example.com") is other  # io.docksal.cert-name / wakeproxy.cert-name still wins
    for host in ("project2.example.com", "x.b.example.com", "shop.test", "right.example.net"):
        assert reg.choose(host).covers(host)


def test_a_cert_name_label_never_picks_a_certificate_that_does_not_cover_its_host(tmp_path, caplog):
    bank = load_cert(make_cert(tmp_path, "bank.example.com", "bank.example.com"), tmp_path / "bank.example.com.key")
    team = load_cert(make_cert(tmp_path, "team", "*.sandbox.test"), tmp_path / "team.key")
    default = load_cert(make_cert(tmp_path, "default", "localhost", split=False), None, "default")
    reg = CertRegistry(default=default, custom={"bank.example.com": bank, "team": team},
                       label_names={"pr-1.sandbox.test": "bank.example.com", "pr-2.sandbox.test": "team"},
                       hosts=frozenset({"pr-1.sandbox.test", "pr-2.sandbox.test"}))
    with caplog.at_level("WARNING"):
        assert reg.choose("pr-1.sandbox.test") is team  # the label's bank certificate does not cover it
        reg.table()
    assert reg.choose("pr-2.sandbox.test") is team
    said = [r for r in caplog.records if "does not cover" in r.getMessage()]
    assert len(said) == 1 and "pr-1.sandbox.test" in said[0].getMessage()  # once, however often it is asked
