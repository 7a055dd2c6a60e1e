"""wakeproxy.acme, the pure parts: which names, renewal time, backoff, Retry-After, ARI, challenge
answers, storage, retries as RFC 8555 asks, status()."""

from __future__ import annotations

import dataclasses
import datetime
import random
import time
from types import SimpleNamespace

import pytest
import requests
from acme import errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mitmproxy.test import tflow
from mitmproxy.test.tutils import treq
from wakeproxy.certs.acme.challenges import ID_PE_ACME_IDENTIFIER, alpn_challenge_cert
from wakeproxy.certs.acme.client import AcmeFailure, RetryingNetwork, describe
from wakeproxy.certs.acme.manager import AcmeManager, NameState
from wakeproxy.certs.acme.storage import CertStorage, new_certificate_key
from wakeproxy.certs.acme.timing import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    ari_cert_id,
    ari_pick,
    backoff_delay,
    parse_retry_after,
    renewal_time,
)
from wakeproxy.certs.challenges import ChallengeAnswers, ChallengeTokens
from wakeproxy.certs.store import load_cert
from wakeproxy.config import SourcesConfig
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.snapshot import build_snapshot

UTC = datetime.UTC


def info(name, labels=None, env=None, state="exited") -> ContainerInfo:
    return ContainerInfo(id=f"id-{name}", name=name, state=state, labels=labels or {}, env=env or {})


# --- names (decided in the snapshot: only names the group owns) ------------------------------


def acme_names(*containers, **kw) -> dict[str, str]:
    return {n: c for n, (c, _) in build_snapshot(containers, SourcesConfig(), (), {}, **kw).acme.items()}


def test_label_takes_every_non_wildcard_host_of_any_convention():
    c = info("a", labels={"wakeproxy.acme": "true", "wakeproxy.host": "a.example.com,*.x.example.com",
                          "traefik.http.routers.r.rule": "Host(`t.example.com`)"})
    assert acme_names(c) == {"a.example.com": "a", "t.example.com": "a"}


def test_no_label_no_names_and_false_means_false():
    assert acme_names(info("a", labels={"wakeproxy.host": "a.example.com"})) == {}
    assert acme_names(info("a", labels={"wakeproxy.host": "a.example.com", "wakeproxy.acme": "false"})) == {}


def test_a_malformed_acme_label_skips_the_container():
    snap = build_snapshot([info("a", labels={"wakeproxy.host": "a.example.com", "wakeproxy.acme": "maybe"})],
                          SourcesConfig(), (), {})
    assert snap.acme == {} and "wakeproxy.acme" in snap.skipped["a"]


def test_letsencrypt_host_env_alone_is_enough_and_is_deduplicated():
    c = info("a", env={"LETSENCRYPT_HOST": "A.example.com, b.example.com,a.example.com"})
    assert acme_names(c) == {"a.example.com": "a", "b.example.com": "a"}


def test_names_without_a_public_form_are_left_out():
    c = info("a", env={"LETSENCRYPT_HOST": "localhost,*.w.example.com,ok.example.com,10.0.0.1"})
    assert acme_names(c) == {"ok.example.com": "a"}


def test_a_malformed_letsencrypt_host_skips_the_container():
    snap = build_snapshot([info("b", env={"LETSENCRYPT_HOST": "not a host!"})], SourcesConfig(), (), {})
    assert snap.acme == {} and "LETSENCRYPT_HOST" in snap.skipped["b"]


def test_names_cover_stopped_containers_and_forget_removed_ones():
    a = info("a", env={"LETSENCRYPT_HOST": "a.example.com"}, state="created")
    b = info("b", labels={"wakeproxy.acme": "1", "wakeproxy.host": "b.example.com"}, state="running")
    assert acme_names(a, b) == {"a.example.com": "a", "b.example.com": "b"}
    assert acme_names(b) == {"b.example.com": "b"}


def test_no_certificate_for_another_groups_name():
    owner = info("owner", labels={"wakeproxy.host": "bank.example.com"}, state="running")
    owner = dataclasses.replace(owner, created=1.0)
    thief = dataclasses.replace(info("thief", env={"LETSENCRYPT_HOST": "bank.example.com,thief.example.com"}),
                                created=2.0)
    snap = build_snapshot([owner, thief], SourcesConfig(), (), {})
    assert {n: c for n, (c, _) in snap.acme.items()} == {"thief.example.com": "thief"}
    assert [(r.name, r.group, r.owner) for r in snap.refused] == [("bank.example.com", "thief", "owner")]


def test_names_outside_the_policy_get_no_certificate():
    from wakeproxy.routing.policy import NamePolicy
    from wakeproxy.routing.snapshot import Policy

    c = info("pr-1-web-1", env={"LETSENCRYPT_HOST": "pr-1.sb.example.com,www.some-bank.example"},
             labels={"com.docker.compose.project": "pr-1"})
    policy = Policy(names=NamePolicy(allow=("{group}.sb.example.com",)))
    assert acme_names(c, policy=policy) == {"pr-1.sb.example.com": "pr-1-web-1"}


def test_names_per_group_are_capped():
    from wakeproxy.routing.snapshot import Policy

    hosts = ",".join(f"n{i}.example.com" for i in range(5))
    snap = build_snapshot([info("a", env={"LETSENCRYPT_HOST": hosts})], SourcesConfig(), (), {},
                          policy=Policy(acme_max=3))
    assert sorted(snap.acme) == ["n0.example.com", "n1.example.com", "n2.example.com"]
    assert sum("acme.max_names_per_group" in r.reason for r in snap.refused) == 2


# --- timing -------------------------------------------------------------------------------


def test_renewal_when_a_third_is_left():
    nb = datetime.datetime(2030, 1, 1, tzinfo=UTC)
    assert renewal_time(nb, nb + datetime.timedelta(days=90)) == nb + datetime.timedelta(days=60)


def test_backoff_doubles_with_jitter_inside_bounds():
    rng = random.Random(1)
    delays = [backoff_delay(n, rng) for n in range(1, 20)]
    assert all(BACKOFF_MIN <= d <= BACKOFF_MAX for d in delays)
    assert delays[0] < 1.21 * BACKOFF_MIN
    assert 0.8 * 8 * BACKOFF_MIN <= backoff_delay(4, rng) <= 1.2 * 8 * BACKOFF_MIN
    assert delays[-1] >= 0.8 * BACKOFF_MAX
    assert len({round(backoff_delay(3, rng), 3) for _ in range(10)}) > 1  # jittered


def test_retry_after_seconds_and_dates():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    date = datetime.datetime.fromtimestamp(now + 30, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 28 <= parse_retry_after(date, now) <= 31


def _leaf(serial: int = 0x87654321AB):
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.example.com")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=89))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("a.example.com")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def test_ari_cert_id_is_aki_dot_serial_base64url():
    # RFC 9773's example: AKI 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4, serial 00:87:65:43:21
    _, cert = _leaf(0x87654321)
    aki_part, serial_part = ari_cert_id(cert).split(".")
    assert serial_part == "AIdlQyE"
    assert "=" not in aki_part and len(aki_part) == 27  # 20 bytes, unpadded


def test_ari_pick_is_inside_the_window():
    w = {"start": "2030-01-01T00:00:00Z", "end": "2030-01-02T00:00:00.123456789Z"}
    t = ari_pick(w, random.Random(3))
    assert datetime.datetime(2030, 1, 1, tzinfo=UTC) <= t <= datetime.datetime(2030, 1, 2, 1, tzinfo=UTC)


# --- challenges -------------------------------------------------------------------------------


def _flow(path: str, host: str = "sleepy.example.com"):
    f = tflow.tflow(req=treq(path=path.encode(), headers=[(b"Host", host.encode())]))
    return f


def test_pending_token_is_answered_for_any_host_and_unknown_ones_pass_through():
    tokens = ChallengeTokens()
    tokens.add("tok", "tok.thumb")
    f = _flow("/.well-known/acme-challenge/tok")
    assert tokens.answer(f)
    assert f.response.status_code == 200 and f.response.content == b"tok.thumb"
    assert f.response.headers["content-type"] == "text/plain"
    other = _flow("/.well-known/acme-challenge/other")
    assert not tokens.answer(other) and other.response is None
    tokens.remove("tok")
    assert not tokens.answer(_flow("/.well-known/acme-challenge/tok"))


def test_manager_answers_before_routing_only_while_tokens_are_pending():
    m = ChallengeAnswers(ChallengeTokens())
    f = _flow("/.well-known/acme-challenge/t")
    m.requestheaders(f)
    assert f.response is None
    m.tokens.add("t", "t.k")
    m.requestheaders(f)
    assert f.response.status_code == 200


# --- storage ---------------------------------------------------------------------------------


def test_storage_atomic_live_switch_private_modes_and_reload(tmp_path):
    from cryptography.hazmat.primitives import serialization

    storage = CertStorage(tmp_path)
    account = storage.account_key()
    assert (tmp_path / "acme" / "account.key").stat().st_mode & 0o777 == 0o600
    assert storage.account_key().thumbprint() == account.thumbprint()  # created once
    paths = []
    for serial in (0x1111, 0x2222, 0x3333):
        key, cert = _leaf(serial)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        paths.append(storage.save("a.example.com", key_pem, cert.public_bytes(serialization.Encoding.PEM)))
    assert len(set(paths)) == 3  # a new file name per issuance (mitmproxy caches contexts by path)
    base = tmp_path / "acme" / "certs" / "a.example.com"
    assert (base / "live").resolve() == base / "3333"
    assert sorted(p.name for p in base.iterdir()) == ["2222", "3333", "live"]  # older ones pruned
    for f in ("privkey.pem", "combined.pem"):
        assert (base / "3333" / f).stat().st_mode & 0o777 == 0o600
    loaded = CertStorage(tmp_path).load_all()
    assert loaded["a.example.com"].serial == 0x3333
    assert loaded["a.example.com"].source == "acme"


def test_storage_skips_a_broken_entry(tmp_path):
    base = tmp_path / "acme" / "certs" / "b.example.com" / "1"
    base.mkdir(parents=True)
    (base / "combined.pem").write_text("garbage")
    (base.parent / "live").symlink_to("1")
    assert CertStorage(tmp_path).load_all() == {}


@pytest.mark.parametrize("kt", ["ec256", "ec384", "rsa2048"])
def test_certificate_keys(kt):
    assert b"PRIVATE KEY" in new_certificate_key(kt)


# --- retries ---------------------------------------------------------------------------------


class FakeNet(RetryingNetwork):
    """RetryingNetwork whose requests are scripted: each item is an exception (with a status) or 'ok'."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0
        self._nonces = {"n"}

    def _post_once(self, *args, **kwargs):
        self.calls += 1
        step = self.script.pop(0)
        if step == "ok":
            return "response"
        status, headers, exc = step
        self.last_response = SimpleNamespace(status_code=status, headers=headers)
        raise exc


def _err(code, detail="x"):
    return messages.Error.with_code(code, detail=detail)


def test_bad_nonce_is_retried_at_once(monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    net = FakeNet([(400, {}, _err("badNonce")), (400, {}, _err("badNonce")), "ok"])
    assert net.post("url", None) == "response"
    assert net.calls == 3 and sleeps == []


def test_429_and_5xx_wait_for_a_short_retry_after(monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    net = FakeNet([(429, {"Retry-After": "3"}, _err("rateLimited")),
                   (503, {}, errors.ClientError("Service Unavailable")), "ok"])
    assert net.post("url", None) == "response"
    assert sleeps == [3.0, 2.0]


def test_long_retry_after_ends_the_attempt_with_it(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    net = FakeNet([(429, {"Retry-After": "3600"}, _err("rateLimited", "too many certificates"))])
    with pytest.raises(AcmeFailure) as e:
        net.post("url", None)
    assert e.value.retry_after == 3600.0
    assert "rateLimited: too many certificates" in str(e.value)


def test_other_problems_are_not_retried():
    net = FakeNet([(403, {}, _err("unauthorized"))])
    with pytest.raises(messages.Error):
        net.post("url", None)
    assert net.calls == 1


def test_describe_gives_the_problem_detail():
    assert describe(_err("rejectedIdentifier", "forbidden name")) == "rejectedIdentifier: forbidden name"
    assert describe(requests.exceptions.ConnectionError("refused")).startswith("CA unreachable")
    assert describe(ValueError("Requesting x/dir: Connection refused")).startswith("CA unreachable")


# --- status ----------------------------------------------------------------------------------


def test_status_is_json_able_per_name(tmp_path):
    import json

    from cryptography.hazmat.primitives import serialization

    key, cert = _leaf(0x99)
    p = tmp_path / "c.pem"
    p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
    loaded = load_cert(p, None, "acme")
    ok = NameState("a.example.com", container="app", cert=loaded,
                   renew_at=renewal_time(loaded.not_before, loaded.not_after))
    failing = NameState("b.example.com", container="app", failures=2, next_attempt=time.time() + 60,
                        last_error="CA unreachable", phase="failed")
    m = AcmeManager(SimpleNamespace(config=None), None)  # type: ignore[arg-type]
    m.states = {s.name: s for s in (ok, failing)}
    status = json.loads(json.dumps(m.status()))
    assert status["a.example.com"]["state"] == "valid"
    assert status["a.example.com"]["not_after"].startswith(str(loaded.not_after.year))
    assert status["b.example.com"]["state"] == "failed"
    assert status["b.example.com"]["last_error"] == "CA unreachable"
    assert status["b.example.com"]["next_attempt"] is not None


# --- TLS-ALPN-01 ----------------------------------------------------------------------------


def test_alpn_challenge_certificate_carries_the_key_authorization_digest():
    import hashlib

    cert, _ = alpn_challenge_cert("a.example.com", "tok.thumb")
    c = cert.to_cryptography()
    ext = c.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()
    assert c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["a.example.com"]


def test_alpn_connection_only_for_acme_tls_1_and_a_pending_name():
    tokens = ChallengeTokens()
    tokens.add_alpn("a.example.com", alpn_challenge_cert("a.example.com", "k"))

    def data(offers, sni):
        return SimpleNamespace(conn=SimpleNamespace(alpn_offers=offers, sni=sni), ssl_conn=None)

    assert tokens.alpn_connection(data([b"acme-tls/1"], "A.example.com")) is not None
    assert tokens.alpn_connection(data([b"h2", b"http/1.1"], "a.example.com")) is None
    assert tokens.alpn_connection(data([b"acme-tls/1"], "b.example.com")) is None
    m = ChallengeAnswers(tokens)
    d = data([b"h2"], "a.example.com")
    m.tls_start_client(d)  # nothing pending: untouched
    assert d.ssl_conn is None


# --- ARI -------------------------------------------------------------------------------------


def _loaded(tmp_path, serial=0x42):
    from cryptography.hazmat.primitives import serialization

    key, cert = _leaf(serial)
    p = tmp_path / f"{serial}.pem"
    p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
    return load_cert(p, None, "acme")


def test_ari_window_can_only_bring_renewal_forward(tmp_path):
    import asyncio

    loaded = _loaded(tmp_path)
    ours = renewal_time(loaded.not_before, loaded.not_after)
    now = datetime.datetime.now(UTC)
    iso = lambda d: d.isoformat().replace("+00:00", "Z")  # noqa: E731

    async def check(window):
        m = AcmeManager(SimpleNamespace(config=None), None)  # type: ignore[arg-type]
        m._kick = asyncio.Event()
        m.client = SimpleNamespace(renewal_window=lambda cert: window)
        st = NameState("a.example.com", container="app", cert=loaded, renew_at=ours)
        await m._check_ari(st)
        return st.renew_at, m._kick.is_set()

    early = {"start": iso(now + datetime.timedelta(days=1)), "end": iso(now + datetime.timedelta(days=2))}
    at, kicked = asyncio.run(check(early))
    assert now + datetime.timedelta(days=1) <= at <= now + datetime.timedelta(days=2) and kicked
    late = {"start": iso(ours + datetime.timedelta(days=1)), "end": iso(ours + datetime.timedelta(days=2))}
    assert asyncio.run(check(late)) == (ours, False)
    assert asyncio.run(check(None)) == (ours, False)  # the CA offers no ARI


def test_challenges_cross_the_channel_as_plain_data_and_every_change_is_announced():
    import msgpack

    seen = []
    tokens = ChallengeTokens()
    tokens.listener = lambda: seen.append(len(tokens))
    tokens.add("t", "t.k")
    tokens.add_alpn("a.example.com", alpn_challenge_cert("a.example.com", "k"))
    worker = ChallengeTokens()
    worker.replace(msgpack.unpackb(msgpack.packb(tokens.export())))
    f = _flow("/.well-known/acme-challenge/t")
    assert worker.answer(f) and f.response.content == b"t.k"
    conn = SimpleNamespace(conn=SimpleNamespace(alpn_offers=[b"acme-tls/1"], sni="a.example.com"))
    assert worker.alpn_connection(conn) is not None
    tokens.remove("t")
    tokens.remove_alpn("a.example.com")
    assert seen == [1, 1, 0, 0]
    worker.replace(tokens.export())
    assert len(worker) == 0 and not worker.alpn
