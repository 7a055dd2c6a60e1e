"""Custom certificates (tls.certs_dir, wildcard files, cert-name labels), the default certificate,
HTTP → HTTPS redirects and HSTS — through the real proxy, no ACME server needed."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from acme_harness import handshake, http_get, https_get, leaf_of
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import backend_of, wait_for


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class PrivateCA:
    """root → intermediate → leaves, like a real CA (so the served chain matters)."""

    def __init__(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.now = now
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._cert(_name("wptest root"), self.root_key, _name("wptest root"), self.root_key, ca=True)
        self.int_key = ec.generate_private_key(ec.SECP256R1())
        self.inter = self._cert(_name("wptest intermediate"), self.int_key, self.root.subject, self.root_key, ca=True)

    def _cert(self, subject, key, issuer, issuer_key, ca=False, sans=()):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(self.now - datetime.timedelta(hours=1))
             .not_valid_after(self.now + datetime.timedelta(days=5))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def leaf(self, directory: Path, base: str, *sans: str) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._cert(_name(sans[0]), key, self.inter.subject, self.int_key, sans=sans)
        (directory / f"{base}.crt").write_bytes(_pem(cert) + _pem(self.inter))
        (directory / f"{base}.key").write_bytes(_pem(key))
        return cert

    @property
    def root_pem(self) -> str:
        return _pem(self.root).decode()


@pytest.fixture(scope="module")
def custom(tmp_path_factory, host, module_containers, module_proxy):
    ca = PrivateCA()
    d = tmp_path_factory.mktemp("certs")
    names = {
        "exact": host("exact"),
        "wild": "a." + host("wild"),
        "deep": "a.b." + host("wild"),
        "label": host("label"),
        "noredirect": host("noredirect"),
        "plain": host("plain"),
    }
    certs = {
        "exact": ca.leaf(d, names["exact"], names["exact"]),
        "wild": ca.leaf(d, "_wildcard." + host("wild"), "*." + host("wild")),
        "label": ca.leaf(d, "team-cert", names["label"]),
        "noredirect": ca.leaf(d, names["noredirect"], names["noredirect"]),
    }
    module_containers("exact", labels={"wakeproxy.host": names["exact"]})
    module_containers("wild", labels={"wakeproxy.host": "*." + host("wild")})
    module_containers("label", labels={"io.docksal.virtual-host": names["label"], "io.docksal.cert-name": "team-cert"})
    module_containers("noredirect", labels={"wakeproxy.host": names["noredirect"],
                                            "wakeproxy.https-redirect": "false"})
    module_containers("plain", labels={"wakeproxy.host": names["plain"]})
    # The labels that choose a certificate or turn the redirect off are the operator's to allow.
    proxy = module_proxy({"tls": {"certs_dir": str(d), "hsts": "1h"},
                          "labels": {"cert_name": True, "https_redirect": True}})
    for n in names.values():  # 308 or the backend's 200: routed (404 until the snapshot has it)
        wait_for(lambda n=n: http_get(proxy, n).status_code in (200, 308), 10, 0.1, f"{n} routed")
    return ca, names, certs, proxy


def test_custom_certificates_by_file_wildcard_and_label(custom):
    ca, names, certs, proxy = custom
    for key in ("exact", "wild", "label", "noredirect"):
        peer, der, alpn = handshake(proxy, names[key], ca.root_pem)  # chain verifies against our root only
        assert x509.load_der_x509_certificate(der).serial_number == certs[key].serial_number, key
        assert alpn == "h2"


def test_unknown_or_uncovered_sni_gets_the_default_certificate(custom):
    ca, names, certs, proxy = custom
    for sni in ("nobody.example.test", names["plain"], None):  # None: a client that sends no SNI
        leaf = leaf_of(proxy, sni)  # a handshake, never a failure
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "wakeproxy default certificate"
        assert "mitmproxy" not in leaf.issuer.rfc4514_string()
    # `*.wild` matches one label only: a.b.wild gets the wildcard entry from mitmproxy's lookup,
    # but is never redirected, since that certificate does not cover it.
    assert http_get(proxy, names["deep"]).status_code != 308


def test_redirect_to_https_and_hsts(custom):
    ca, names, certs, proxy = custom
    r = http_get(proxy, names["exact"], "/some/path?q=1&r=2")
    assert r.status_code == 308
    assert r.headers["location"] == f"https://{names['exact']}:{proxy.https_port}/some/path?q=1&r=2"
    assert http_get(proxy, names["wild"], "/x").status_code == 308
    assert http_get(proxy, names["label"], "/x").status_code == 308
    # Opted out by label; no certificate of its own; unknown host: no redirect.
    assert backend_of(http_get(proxy, names["noredirect"])) == "noredirect"
    assert backend_of(http_get(proxy, names["plain"])) == "plain"
    assert http_get(proxy, "nobody.example.test").status_code == 404
    r = https_get(proxy, names["exact"], ca.root_pem)
    assert r.http_version == "HTTP/2" and backend_of(r) == "exact"
    assert r.headers["strict-transport-security"] == "max-age=3600"
    # Never for a name served with the self-signed default, never on plain HTTP.
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    import httpx
    with httpx.Client(verify=ctx, trust_env=False) as c:
        r = c.get(f"{proxy.https_url}/", headers={"Host": names["plain"]}, extensions={"sni_hostname": names["plain"]})
    assert backend_of(r) == "plain" and "strict-transport-security" not in r.headers
    assert "strict-transport-security" not in http_get(proxy, names["noredirect"]).headers
